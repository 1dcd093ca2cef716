//! Engine figures for `docs/BENCHMARKS.md`: durable append throughput and commit latency
//! at batch sizes 1, 64 and 1024 (io_uring, as the server runs it), recovery replay speed,
//! index memory per queued message, and reading a 10,000-message mailbox.
//!
//! Run: `cargo run --release -p tern-bench --bin engine_figures -- [DIR] [--quick]
//! [--only append|rounds|recovery|read] [--batch 1|64|1024]`. `rounds`: 1, 2, 4 and 8
//! shards on one executor committed together, as a server core commits its shards.
//! DIR must be on a real file system (O_DIRECT); default `target/engine-figures`. The
//! directory is emptied first. Compare with `bench/fio-baseline.sh` in the same session.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tern_engine::uring::UringStorage;
use tern_engine::{ShardConfig, ShardHandle, StdStorage};
use tern_wire::messages::{Conversation, E2eType, EnvelopeKind};
use tern_wire::EnvelopeRef;

const CIPHERTEXT: [u8; 100] = [0x5A; 100];
const NOW_MS: u64 = 1_800_000_000_000;

fn envelope(id: u64) -> EnvelopeRef<'static> {
    EnvelopeRef {
        server_message_id: id,
        client_message_id: id,
        server_time_ms: NOW_MS,
        expires_ms: NOW_MS + 30 * 86_400_000,
        sender_user: 42,
        sender_device: 1,
        conversation: Conversation::User(42),
        conversation_seq: id,
        kind: EnvelopeKind::Text,
        e2e_type: E2eType::OlmMessage,
        body: &CIPHERTEXT,
    }
}

fn fresh(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).unwrap();
    path
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Durable appends through io_uring: `batches` commits of `batch` envelopes each. As in
/// the server, the next batch is appended while the previous one is being written and
/// synced (one commit in flight at a time), so CPU and disk overlap.
fn durable_append(dir: &Path, batch: u64, batches: u64) {
    let path = fresh(dir, &format!("append-{batch}"));
    glommio::LocalExecutorBuilder::default().make().unwrap().run(async move {
        let shard = ShardHandle::open(UringStorage::new(&path).unwrap(), ShardConfig::new(0))
            .await
            .unwrap();
        let devices = 1000u64;
        let mut latencies = Vec::with_capacity(batches as usize);
        let bytes_before = shard.borrow().counters().committed_bytes;
        let start = Instant::now();
        let mut id = 0u64;
        let mut in_flight: Option<(
            Instant,
            glommio::task::JoinHandle<Result<Duration, tern_engine::WriteError>>,
        )> = None;
        for _ in 0..batches {
            let appended_at = Instant::now();
            for _ in 0..batch {
                id += 1;
                let device = (id % devices, 1);
                shard.borrow_mut().append_envelope(&envelope(id), &[device]).unwrap();
            }
            if let Some((_, task)) = in_flight.take() {
                latencies.push(task.await.unwrap().unwrap());
            }
            let committer = shard.clone();
            let task = glommio::spawn_local(async move {
                let started = Instant::now();
                committer.commit().await.map(|_| started.elapsed())
            })
            .detach();
            // Let the commit submit its write before appending the next batch.
            glommio::yield_if_needed().await;
            glommio::executor().yield_task_queue_now().await;
            in_flight = Some((appended_at, task));
        }
        if let Some((_, task)) = in_flight.take() {
            latencies.push(task.await.unwrap().unwrap());
        }
        let elapsed = start.elapsed();
        let messages = batch * batches;
        let written = shard.borrow().counters().committed_bytes - bytes_before;
        latencies.sort();
        println!(
            "durable append batch {batch:>4}: {:>9.0} msg/s {:>7.1} MB/s written | \
             commit (write+fdatasync) p50 {:>7.1} µs p99 {:>7.1} µs | {messages} msgs in {:.2} s",
            messages as f64 / elapsed.as_secs_f64(),
            written as f64 / elapsed.as_secs_f64() / 1e6,
            percentile(&latencies, 0.5).as_secs_f64() * 1e6,
            percentile(&latencies, 0.99).as_secs_f64() * 1e6,
            elapsed.as_secs_f64(),
        );
    });
}

/// Several shards on one executor, as one `ternd` core owns them: each round appends one
/// envelope to every shard and commits them all at once (one task per shard, their
/// writes and fdatasyncs in flight together, as the server's committer does). Prints the
/// round's latency: what a sent tick waits for at low load.
fn concurrent_commits(dir: &Path, shards: u32, rounds: u64) {
    let path = fresh(dir, &format!("rounds-{shards}"));
    glommio::LocalExecutorBuilder::default().make().unwrap().run(async move {
        let mut handles = Vec::new();
        for shard_id in 0..shards {
            let shard_dir = path.join(format!("shard-{shard_id}"));
            std::fs::create_dir_all(&shard_dir).unwrap();
            let storage = UringStorage::new(&shard_dir).unwrap();
            handles.push(ShardHandle::open(storage, ShardConfig::new(shard_id)).await.unwrap());
        }
        let mut latencies = Vec::with_capacity(rounds as usize);
        let mut id = 0u64;
        let start = Instant::now();
        for _ in 0..rounds {
            let round = Instant::now();
            let mut commits = Vec::new();
            for shard in &handles {
                id += 1;
                shard.borrow_mut().append_envelope(&envelope(id), &[(id % 1000, 1)]).unwrap();
                let shard = shard.clone();
                commits.push(glommio::spawn_local(async move { shard.commit().await }));
            }
            for commit in commits {
                commit.await.unwrap();
            }
            latencies.push(round.elapsed());
        }
        let elapsed = start.elapsed();
        latencies.sort();
        println!(
            "{shards} shard(s) committed together: round (write+fdatasync each) p50 {:>7.1} µs \
             p99 {:>7.1} µs | {:.0} rounds/s",
            percentile(&latencies, 0.5).as_secs_f64() * 1e6,
            percentile(&latencies, 0.99).as_secs_f64() * 1e6,
            rounds as f64 / elapsed.as_secs_f64(),
        );
    });
}

/// Builds a log of about `target_bytes` with std I/O, then times recovery (page cache warm).
fn recovery(dir: &Path, target_bytes: u64) {
    let path = fresh(dir, "recovery");
    let storage = StdStorage::new(&path).unwrap();
    let config = ShardConfig::new(0);
    futures_lite::future::block_on(async {
        let shard = ShardHandle::open(storage.clone(), config.clone()).await.unwrap();
        let mut id = 0u64;
        while shard.borrow().counters().committed_bytes < target_bytes {
            for _ in 0..4096 {
                id += 1;
                shard.borrow_mut().append_envelope(&envelope(id), &[(id % 10_000, 1)]).unwrap();
            }
            shard.commit().await.unwrap();
        }
        let bytes = shard.borrow().counters().committed_bytes;
        drop(shard);
        // Warm the page cache, as after a process restart on a live machine.
        for entry in std::fs::read_dir(&path).unwrap() {
            let _ = std::fs::read(entry.unwrap().path());
        }
        let start = Instant::now();
        let shard = ShardHandle::open(storage.clone(), config.clone()).await.unwrap();
        let elapsed = start.elapsed();
        let queued: u64 = shard.borrow().mailbox_backlogs().map(|(_, n)| n).sum();
        println!(
            "recovery: {:.0} MiB log, {queued} queued envelopes, replayed in {:.3} s = {:.2} GB/s",
            bytes as f64 / (1 << 20) as f64,
            elapsed.as_secs_f64(),
            bytes as f64 / elapsed.as_secs_f64() / 1e9,
        );
        let index = shard.borrow().index_bytes();
        println!(
            "index memory: {index} bytes for {queued} queued envelopes = {:.1} bytes/envelope",
            index as f64 / queued as f64
        );
    });
}

/// Reads a 10,000-message mailbox (zero-copy slices) and frames it for delivery.
fn mailbox_read(dir: &Path) {
    let path = fresh(dir, "read");
    let storage = StdStorage::new(&path).unwrap();
    futures_lite::future::block_on(async {
        let shard = ShardHandle::open(storage, ShardConfig::new(0)).await.unwrap();
        let device = (7, 1);
        for id in 1..=10_000u64 {
            shard.borrow_mut().append_envelope(&envelope(id), &[device]).unwrap();
        }
        shard.commit().await.unwrap();
        let borrowed = shard.borrow();
        let mut out = Vec::with_capacity(4 << 20);
        let rounds = 50;
        let start = Instant::now();
        for _ in 0..rounds {
            out.clear();
            let read = borrowed.read_mailbox(device, 0, usize::MAX, NOW_MS);
            assert_eq!(read.entries.len(), 10_000);
            for entry in &read.entries {
                tern_wire::encode_deliver(&mut out, 0, entry.mailbox_seq, entry.envelope, u32::MAX)
                    .unwrap();
            }
        }
        let elapsed = start.elapsed();
        println!(
            "mailbox read: 10,000 envelopes read + framed as Deliver in {:.2} ms = {:.2} M msg/s",
            elapsed.as_secs_f64() * 1e3 / rounds as f64,
            (10_000 * rounds) as f64 / elapsed.as_secs_f64() / 1e6
        );
    });
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let dir = args
        .iter()
        .find(|a| {
            !a.starts_with("--")
                && !["append", "rounds", "recovery", "read"].contains(&a.as_str())
                && a.parse::<u64>().is_err()
        })
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/engine-figures"));
    std::fs::create_dir_all(&dir).unwrap();
    let scale = if quick { 10 } else { 1 };
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let wanted = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let batch: Option<u64> =
        args.iter().position(|a| a == "--batch").and_then(|i| args.get(i + 1)?.parse().ok());
    if wanted("append") {
        for (size, batches) in [(1, 5000), (64, 1000), (1024, 200)] {
            if batch.is_none_or(|b| b == size) {
                durable_append(&dir, size, batches / scale);
            }
        }
    }
    if wanted("rounds") {
        for shards in [1, 2, 4, 8] {
            concurrent_commits(&dir, shards, 2000 / scale);
        }
    }
    if wanted("recovery") {
        recovery(&dir, if quick { 64 << 20 } else { 1 << 30 });
    }
    if wanted("read") {
        mailbox_read(&dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
