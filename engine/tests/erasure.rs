//! Erasure: after an account is deleted, the next reclaim leaves no file of the shard
//! holding its phone number or profile — not the old segments (sealed or active), not
//! the checkpoint (scanned decompressed) — while every other mailbox keeps its envelopes.
//! A crash between the deletion and the reclaim only postpones the erasure.

mod common;

use common::*;
use futures_lite::future::block_on;
use tern_engine::{ProfileRecord, ShardHandle, StateOp, StdStorage};
use tern_testkit::files_holding;

const PHONE: &str = "+4915550001234";
const NAME: &str = "Canary Display Name";
const USER: u64 = 7;

/// An account with a profile, then enough traffic for other users to span several
/// segments, some of it left unread (live) in every segment.
fn populate(shard: &ShardHandle<StdStorage>) {
    let ops = [
        StateOp::PutAccount { user_id: USER, phone: PHONE.into(), created_ms: NOW_MS },
        StateOp::SetProfile {
            user_id: USER,
            profile: ProfileRecord { display_name: Some(NAME.into()), about: None, avatar: None },
        },
    ];
    for op in ops {
        shard.borrow_mut().apply_state(op).unwrap();
    }
    for id in 1..=600u64 {
        let body = [id as u8; 300];
        let device = (100 + id % 3, 1);
        shard.borrow_mut().append_envelope(&envelope(USER, id, id, &body), &[device]).unwrap();
        if id % 40 == 0 {
            block_on(shard.commit()).unwrap();
        }
    }
    block_on(shard.commit()).unwrap();
    // Device 100 reads everything; 101 and 102 keep theirs (live in every segment).
    let next = shard.borrow().mailbox_next_seq((100, 1));
    shard.borrow_mut().ack((100, 1), next - 1).unwrap();
    block_on(shard.commit()).unwrap();
}

fn delete(shard: &ShardHandle<StdStorage>) {
    shard.borrow_mut().apply_state(StateOp::DeleteAccount { user_id: USER }).unwrap();
    block_on(shard.commit()).unwrap();
    assert!(shard.borrow().erasure_pending());
}

fn assert_erased_and_intact(dir: &std::path::Path, shard: &ShardHandle<StdStorage>) {
    assert_eq!(files_holding(dir, PHONE.as_bytes()), Vec::<std::path::PathBuf>::new());
    assert_eq!(files_holding(dir, NAME.as_bytes()), Vec::<std::path::PathBuf>::new());
    assert!(!shard.borrow().erasure_pending());
    assert!(shard.borrow().state().account(USER).is_none());
    assert_eq!(read_all(shard, (101, 1)).len(), 200);
    assert_eq!(read_all(shard, (102, 1)).len(), 200);
    assert!(read_all(shard, (100, 1)).is_empty());
}

#[test]
fn deleted_account_leaves_no_file_after_the_next_reclaim() {
    let dir = tempfile::tempdir().unwrap();
    let shard = open(StdStorage::new(dir.path()).unwrap(), small_config());
    populate(&shard);
    block_on(shard.reclaim(NOW_MS)).unwrap();
    // An ordinary reclaim keeps the segments: most of their bytes are live.
    assert!(!files_holding(dir.path(), PHONE.as_bytes()).is_empty());

    delete(&shard);
    block_on(shard.reclaim(NOW_MS)).unwrap();
    assert_erased_and_intact(dir.path(), &shard);

    // And the shard reopens from what is left, still intact.
    drop(shard);
    let shard = open(StdStorage::new(dir.path()).unwrap(), small_config());
    assert_erased_and_intact(dir.path(), &shard);
}

#[test]
fn a_crash_before_the_reclaim_postpones_the_erasure() {
    let dir = tempfile::tempdir().unwrap();
    let shard = open(StdStorage::new(dir.path()).unwrap(), small_config());
    populate(&shard);
    block_on(shard.checkpoint()).unwrap();
    delete(&shard);
    drop(shard); // The deletion is durable; the erasure never ran.

    let shard = open(StdStorage::new(dir.path()).unwrap(), small_config());
    assert!(shard.borrow().erasure_pending(), "replaying the deletion schedules the erasure");
    block_on(shard.reclaim(NOW_MS)).unwrap();
    assert_erased_and_intact(dir.path(), &shard);
}
