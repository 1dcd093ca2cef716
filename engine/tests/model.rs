//! Model-based property test: random sequences of append / ack / read / commit /
//! checkpoint / reclaim / restart / crash against a `BTreeMap` model.
//!
//! Invariant: after every restart or crash, each mailbox equals the model restricted to
//! what was committed (a crash drops unsynced bytes: all, or a torn part of them).
//! proptest shrinks a failure to a minimal sequence of operations.

mod common;

use std::collections::BTreeMap;

use common::*;
use futures_lite::future::block_on;
use proptest::prelude::*;
use tern_engine::{PowerCut, SimStorage};

const DEVICES: [(u64, u32); 3] = [(1, 1), (1, 2), (2, 1)];

#[derive(Debug, Clone)]
enum Op {
    Append { first: usize, fanout: usize, len: usize },
    Ack { device: usize, keep: usize },
    Read { device: usize },
    Commit,
    Checkpoint,
    Reclaim,
    Restart,
    Crash { tear_bytes: Option<usize> },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3usize, 1..=3usize, 0..700usize)
            .prop_map(|(first, fanout, len)| Op::Append { first, fanout, len }),
        2 => (0..3usize, 0..4usize).prop_map(|(device, keep)| Op::Ack { device, keep }),
        2 => (0..3usize).prop_map(|device| Op::Read { device }),
        3 => Just(Op::Commit),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Reclaim),
        1 => Just(Op::Restart),
        1 => proptest::option::of(0..4096usize).prop_map(|tear_bytes| Op::Crash { tear_bytes }),
    ]
}

type Model = BTreeMap<(u64, u32), BTreeMap<u64, Vec<u8>>>;

fn assert_matches(shard: &tern_engine::ShardHandle<SimStorage>, committed: &Model) {
    for device in DEVICES {
        let actual: BTreeMap<u64, Vec<u8>> = read_all(shard, device).into_iter().collect();
        let expected = committed.get(&device).cloned().unwrap_or_default();
        assert_eq!(actual, expected, "mailbox {device:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn store_equals_model_after_every_restart(ops in proptest::collection::vec(op(), 1..80)) {
        let mut disk = SimStorage::new(512);
        let mut shard = open(disk.clone(), small_config());
        let mut committed: Model = BTreeMap::new();
        let mut pending: Vec<((u64, u32), u64, Vec<u8>)> = Vec::new();
        let mut next_id = 1u64;
        for op in ops {
            match op {
                Op::Append { first, fanout, len } => {
                    let recipients: Vec<_> =
                        (0..fanout).map(|i| DEVICES[(first + i) % 3]).collect();
                    let body: Vec<u8> = (0..len).map(|i| (i as u64 * 31 + next_id) as u8).collect();
                    let appended = shard
                        .borrow_mut()
                        .append_envelope(&envelope(3, next_id, next_id, &body), &recipients)
                        .unwrap();
                    next_id += 1;
                    for (device, seq) in recipients.iter().zip(appended.mailbox_seqs) {
                        pending.push((*device, seq, body.clone()));
                    }
                }
                Op::Ack { device, keep } => {
                    block_on(shard.commit()).unwrap();
                    for (d, seq, body) in pending.drain(..) {
                        committed.entry(d).or_default().insert(seq, body);
                    }
                    let device = DEVICES[device];
                    let mailbox = committed.entry(device).or_default();
                    let drop_count = mailbox.len().saturating_sub(keep);
                    if let Some((&last, _)) = mailbox.iter().nth(drop_count.saturating_sub(1)) {
                        if drop_count > 0 {
                            shard.borrow_mut().ack(device, last).unwrap();
                            block_on(shard.commit()).unwrap();
                            mailbox.retain(|seq, _| *seq > last);
                        }
                    }
                }
                Op::Read { device } => {
                    // Reads serve exactly the committed entries (pending ones are not yet durable).
                    let device = DEVICES[device];
                    let actual: BTreeMap<u64, Vec<u8>> =
                        read_all(&shard, device).into_iter().collect();
                    prop_assert_eq!(actual, committed.get(&device).cloned().unwrap_or_default());
                }
                Op::Commit | Op::Checkpoint | Op::Reclaim => {
                    match op {
                        Op::Commit => { block_on(shard.commit()).unwrap(); }
                        Op::Checkpoint => { block_on(shard.checkpoint()).unwrap(); }
                        _ => { block_on(shard.reclaim(NOW_MS)).unwrap(); }
                    }
                    for (d, seq, body) in pending.drain(..) {
                        committed.entry(d).or_default().insert(seq, body);
                    }
                }
                Op::Restart => {
                    // A clean restart without committing: pending appends were never acked
                    // and are gone.
                    drop(shard);
                    pending.clear();
                    shard = open(disk.clone(), small_config());
                    assert_matches(&shard, &committed);
                }
                Op::Crash { tear_bytes } => {
                    drop(shard);
                    pending.clear();
                    disk = disk.power_cut(|_, n| match tear_bytes {
                        None => PowerCut::DropAll,
                        Some(bytes) => PowerCut::Tear { whole: n / 2, bytes },
                    });
                    shard = open(disk.clone(), small_config());
                    assert_matches(&shard, &committed);
                }
            }
        }
    }
}
