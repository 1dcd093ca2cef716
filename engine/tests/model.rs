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
use tern_engine::{PowerCut, ShardHandle, SimStorage};

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

fn assert_matches(shard: &ShardHandle<SimStorage>, committed: &Model) {
    for device in DEVICES {
        let actual: BTreeMap<u64, Vec<u8>> = read_all(shard, device).into_iter().collect();
        let expected = committed.get(&device).cloned().unwrap_or_default();
        assert_eq!(actual, expected, "mailbox {device:?}");
    }
}

/// The shard under test, its disk, and the model of what it must hold.
struct Harness {
    disk: SimStorage,
    shard: ShardHandle<SimStorage>,
    /// Entries of committed batches that are not acked.
    committed: Model,
    /// Entries appended since the last commit: (device, mailbox sequence number, body).
    pending: Vec<((u64, u32), u64, Vec<u8>)>,
    next_id: u64,
}

impl Harness {
    fn new() -> Harness {
        let disk = SimStorage::new(512);
        let shard = open(disk.clone(), small_config());
        Harness { disk, shard, committed: BTreeMap::new(), pending: Vec::new(), next_id: 1 }
    }

    fn append(&mut self, first: usize, fanout: usize, len: usize) {
        let next_id = self.next_id;
        let recipients: Vec<_> = (0..fanout).map(|i| DEVICES[(first + i) % 3]).collect();
        let body: Vec<u8> = (0..len).map(|i| (i as u64 * 31 + next_id) as u8).collect();
        let appended = self
            .shard
            .borrow_mut()
            .append_envelope(&envelope(3, next_id, next_id, &body), &recipients)
            .unwrap();
        self.next_id += 1;
        for (device, seq) in recipients.iter().zip(appended.mailbox_seqs) {
            self.pending.push((*device, seq, body.clone()));
        }
    }

    /// A commit made everything pending durable: the model takes it.
    fn settle(&mut self) {
        for (d, seq, body) in self.pending.drain(..) {
            self.committed.entry(d).or_default().insert(seq, body);
        }
    }

    /// Commits, then acks all but the last `keep` entries of a device.
    fn ack(&mut self, device: usize, keep: usize) {
        block_on(self.shard.commit()).unwrap();
        self.settle();
        let device = DEVICES[device];
        let mailbox = self.committed.entry(device).or_default();
        let drop_count = mailbox.len().saturating_sub(keep);
        if let Some((&last, _)) = mailbox.iter().nth(drop_count.saturating_sub(1)) {
            if drop_count > 0 {
                self.shard.borrow_mut().ack(device, last).unwrap();
                block_on(self.shard.commit()).unwrap();
                mailbox.retain(|seq, _| *seq > last);
            }
        }
    }

    /// What a device's mailbox serves, and what the model says it must.
    fn read(&self, device: usize) -> (BTreeMap<u64, Vec<u8>>, BTreeMap<u64, Vec<u8>>) {
        let device = DEVICES[device];
        let actual = read_all(&self.shard, device).into_iter().collect();
        (actual, self.committed.get(&device).cloned().unwrap_or_default())
    }

    /// Reopens the shard (after a power cut if `cut` says so); pending appends were
    /// never acked and are gone.
    fn reopen(&mut self, cut: Option<PowerCutOf>) {
        self.pending.clear();
        if let Some(tear_bytes) = cut {
            self.disk = self.disk.power_cut(|_, n| match tear_bytes {
                None => PowerCut::DropAll,
                Some(bytes) => PowerCut::Tear { whole: n / 2, bytes },
            });
        }
        self.shard = open(self.disk.clone(), small_config());
        assert_matches(&self.shard, &self.committed);
    }
}

/// A power cut: drop every unsynced write (`None`) or tear one after keeping half.
type PowerCutOf = Option<usize>;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn store_equals_model_after_every_restart(ops in proptest::collection::vec(op(), 1..80)) {
        let mut harness = Harness::new();
        for op in ops {
            match op {
                Op::Append { first, fanout, len } => harness.append(first, fanout, len),
                Op::Ack { device, keep } => harness.ack(device, keep),
                Op::Read { device } => {
                    // Reads serve exactly the committed entries (pending ones are not yet
                    // durable).
                    let (actual, expected) = harness.read(device);
                    prop_assert_eq!(actual, expected);
                }
                Op::Commit => {
                    block_on(harness.shard.commit()).unwrap();
                    harness.settle();
                }
                Op::Checkpoint => {
                    block_on(harness.shard.checkpoint()).unwrap();
                    harness.settle();
                }
                Op::Reclaim => {
                    block_on(harness.shard.reclaim(NOW_MS)).unwrap();
                    harness.settle();
                }
                // A clean restart without committing.
                Op::Restart => harness.reopen(None),
                Op::Crash { tear_bytes } => harness.reopen(Some(tear_bytes)),
            }
        }
    }
}
