//! The server's storage path: glommio DMA files through io_uring, on a real file
//! system, with a real restart. (Power cuts are shown by the simulated disk; this shows
//! that the io_uring implementation of the seam behaves like the others.)

mod common;

use common::*;
use tern_engine::uring::UringStorage;
use tern_engine::ShardHandle;

fn run<T>(future: impl std::future::Future<Output = T>) -> T {
    glommio::LocalExecutorBuilder::default().make().expect("a glommio executor").run(future)
}

#[test]
fn append_commit_restart_through_io_uring() {
    // O_DIRECT needs a real file system (not tmpfs): use the target directory.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().to_path_buf();
    let device = (5, 1);
    run(async {
        let shard =
            ShardHandle::open(UringStorage::new(&path).unwrap(), small_config()).await.unwrap();
        for id in 1..=300u64 {
            let body = vec![id as u8; 150];
            shard.borrow_mut().append_envelope(&envelope(2, id, id, &body), &[device]).unwrap();
            if id % 7 == 0 {
                shard.commit().await.unwrap();
            }
        }
        shard.commit().await.unwrap();
        shard.borrow_mut().ack(device, 99).unwrap();
        shard.checkpoint().await.unwrap();
        assert_eq!(read_all(&shard, device).len(), 200);
    });
    run(async {
        let shard =
            ShardHandle::open(UringStorage::new(&path).unwrap(), small_config()).await.unwrap();
        let all = read_all(&shard, device);
        assert_eq!(all.len(), 200);
        assert_eq!(all[0], (100, vec![101u8; 150]));
        assert_eq!(all[199].0, 299);
    });
}

/// Regression: a checkpoint (which commits until nothing is pending) started while
/// another task's commit was in flight used to spin forever: `commit` returned at once
/// without waiting, so the in-flight commit never got the executor back. The server's
/// maintenance task and committer do exactly this. Method: start a commit, append more
/// while it is in flight, checkpoint; a watchdog fails the test instead of hanging.
#[test]
fn checkpoint_while_a_commit_is_in_flight_completes() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().to_path_buf();
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        run(async {
            let storage = UringStorage::new(&path).unwrap();
            let shard = ShardHandle::open(storage, small_config()).await.unwrap();
            let device = (7, 1);
            for id in 1..=50u64 {
                shard
                    .borrow_mut()
                    .append_envelope(&envelope(2, id, id, b"first"), &[device])
                    .unwrap();
            }
            let committer = shard.clone();
            let in_flight = glommio::spawn_local(async move { committer.commit().await }).detach();
            // Let it submit its write, then append behind it.
            glommio::executor().yield_task_queue_now().await;
            for id in 51..=60u64 {
                shard
                    .borrow_mut()
                    .append_envelope(&envelope(2, id, id, b"second"), &[device])
                    .unwrap();
            }
            shard.checkpoint().await.unwrap();
            in_flight.await.unwrap().unwrap();
            assert!(!shard.borrow().has_pending());
            assert_eq!(read_all(&shard, device).len(), 60);
        });
        let _ = done_tx.send(());
    });
    done.recv_timeout(std::time::Duration::from_secs(30)).expect("checkpoint hung");
}
