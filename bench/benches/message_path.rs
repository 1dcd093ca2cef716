//! The server's CPU per message without the sockets: a `SendMessage` frame decoded, its
//! envelope appended to the recipient's mailbox, group-committed, read back and framed
//! as a `Deliver`, and acknowledged — what `ternd` does for each 1:1 message between the
//! socket reads and writes. Regressions on the hot path show here before a load run.
//!
//! Run: `cargo bench -p tern-bench --bench message_path`. Figures go in
//! `docs/BENCHMARKS.md`. The log is written through the engine's `std::fs` storage to a
//! directory in `/dev/shm` (tmpfs: a write is a copy, an fdatasync returns at once), so
//! what is measured is the CPU of the path and its system calls, not the disk, which is
//! the load generator's to measure (and the simulated disk's own bookkeeping would
//! dominate a one-message commit).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_lite::future::block_on;
use tern_engine::{ShardConfig, ShardHandle, StdStorage};
use tern_wire::fixtures::send_frame_100b;
use tern_wire::messages::{Conversation, EnvelopeKind};
use tern_wire::{encode_deliver, EnvelopeRef, FrameDecoder, Message, DEFAULT_MAX_FRAME_BYTES};

/// Messages per fresh shard: the bench starts over (untimed) before the log grows large.
const MESSAGES_PER_SHARD: u64 = 100_000;
const NOW_MS: u64 = 1_796_000_000_000;

/// A new shard in a new directory under `/dev/shm` (or the system's temporary
/// directory where there is none); the directory goes when the returned guard drops.
fn fresh_shard() -> (ShardHandle<StdStorage>, tempfile::TempDir) {
    let parent = std::path::Path::new("/dev/shm");
    let dir = if parent.is_dir() { tempfile::tempdir_in(parent) } else { tempfile::tempdir() };
    let dir = dir.expect("a temporary directory");
    let mut config = ShardConfig::new(0);
    config.segment_bytes = 8 << 20;
    let storage = StdStorage::new(dir.path()).expect("the directory opens");
    (block_on(ShardHandle::open(storage, config)).expect("a new shard opens"), dir)
}

/// `iters` messages through decode → append → commit every `batch` → read → deliver
/// frame → ack; the time of everything but the fresh shards.
fn run(iters: u64, batch: u64) -> Duration {
    let send = send_frame_100b();
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut out = Vec::with_capacity(64 * 1024);
    let (mut shard, mut _dir) = fresh_shard();
    let mut elapsed = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let n = (iters - done).min(MESSAGES_PER_SHARD);
        let started = Instant::now();
        let mut next_read = shard.borrow().mailbox_next_seq((42, 1));
        let mut i = 0;
        while i < n {
            let in_batch = batch.min(n - i);
            for k in 0..in_batch {
                decoder.feed(black_box(&send));
                let frame = decoder.next_frame().unwrap().expect("a whole frame");
                let Message::SendMessage(m) = frame.message else { unreachable!() };
                let copy = &m.copies[0];
                let recipient = (copy.user_id.to_native(), copy.device_id.to_native());
                let envelope = EnvelopeRef {
                    server_message_id: (done + i + k) << 8,
                    client_message_id: m.client_message_id.to_native(),
                    server_time_ms: NOW_MS,
                    expires_ms: NOW_MS + 86_400_000,
                    sender_user: 4,
                    sender_device: 1,
                    conversation: Conversation::User(4),
                    conversation_seq: done + i + k,
                    kind: EnvelopeKind::Text,
                    e2e_type: tern_wire::messages::E2eType::OlmMessage,
                    body: copy.ciphertext.as_slice(),
                };
                shard.borrow_mut().append_envelope(&envelope, &[recipient]).unwrap();
            }
            block_on(shard.commit()).unwrap();
            out.clear();
            let s = shard.borrow();
            let read = s.read_mailbox((42, 1), next_read, in_batch as usize, NOW_MS);
            for entry in &read.entries {
                encode_deliver(&mut out, 0, entry.mailbox_seq, entry.envelope, 1 << 20).unwrap();
            }
            let last = read.entries.last().expect("the batch is readable").mailbox_seq;
            drop(read);
            drop(s);
            black_box(out.len());
            shard.borrow_mut().ack((42, 1), last).unwrap();
            next_read = last + 1;
            i += in_batch;
        }
        elapsed += started.elapsed();
        done += n;
        (shard, _dir) = fresh_shard();
    }
    elapsed
}

fn message_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("message_path_100B");
    group.throughput(Throughput::Elements(1));
    // One message per commit (a quiet server), and 16 (group commit under load).
    for batch in [1, 16] {
        group.bench_function(format!("decode+append+commit{batch}+deliver+ack"), |b| {
            b.iter_custom(|iters| run(iters, batch))
        });
    }
    group.finish();
}

// criterion's macros generate undocumented functions.
#[allow(missing_docs)]
mod harness {
    use super::*;
    criterion_group!(benches, message_path);
}
criterion_main!(harness::benches);
