//! Power-cut campaign: the engine never loses a committed envelope and never serves
//! one that was not committed in full.
//!
//! Method: a seeded, deterministic loop over a simulated disk (`SimStorage`) that keeps
//! every write since the last sync apart. Each cycle opens the shard, checks it against
//! a model of what was committed, runs random appends (to several mailboxes, some fanned
//! out), acks, commits, checkpoints and space reclaims, then ends with a clean stop or a
//! power cut: an I/O failure is injected inside a commit (the batch is never
//! acknowledged) and the disk loses all, some or a torn part of its unsynced writes.
//! The failed batch may then survive whole or not at all; anything else is a violation.
//!
//! Scale: `TERN_POWER_CUT_CYCLES` (default 2000, what CI runs); the long campaign for the
//! record is 100,000 (see `docs/STORAGE.md`).

mod common;

use std::collections::BTreeMap;
use std::io::ErrorKind;

use common::*;
use futures_lite::future::block_on;
use tern_engine::{PowerCut, ShardHandle, SimStorage, WriteError};

/// SplitMix64: tiny, deterministic, good enough to pick test operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const DEVICES: [(u64, u32); 4] = [(1, 1), (1, 2), (2, 1), (3, 7)];

/// What the model knows of one mailbox: committed entries not yet acked.
#[derive(Default, Clone, Debug, PartialEq)]
struct ModelMailbox {
    entries: BTreeMap<u64, Vec<u8>>,
    next_seq: u64,
}

fn check(
    shard: &ShardHandle<SimStorage>,
    model: &BTreeMap<(u64, u32), ModelMailbox>,
    context: &str,
) {
    for device in DEVICES {
        let actual: BTreeMap<u64, Vec<u8>> = read_all(shard, device).into_iter().collect();
        let expected = model.get(&device).map(|m| m.entries.clone()).unwrap_or_default();
        if actual != expected {
            let summary = |m: &BTreeMap<u64, Vec<u8>>| -> Vec<(u64, usize)> {
                m.iter().map(|(seq, body)| (*seq, body.len())).collect()
            };
            panic!(
                "{context}: mailbox {device:?} differs from the model\n actual (seq, len): {:?}\n \
                 model (seq, len): {:?}",
                summary(&actual),
                summary(&expected)
            );
        }
    }
}

#[test]
fn power_cut_campaign() {
    let cycles: u64 =
        std::env::var("TERN_POWER_CUT_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    // Long runs per seed: reclaim and rotation bugs need many segments to show.
    let seeds = (cycles / 500).max(1);
    for seed in 0..seeds {
        let mut campaign = Campaign::new(seed);
        for cycle in 0..cycles / seeds {
            campaign.cycle(&format!("seed {seed} cycle {cycle}"));
        }
    }
}

/// One seed's run: the disk that outlives every cycle, and the model of what it holds.
struct Campaign {
    rng: Rng,
    disk: SimStorage,
    model: BTreeMap<(u64, u32), ModelMailbox>,
    next_id: u64,
    /// Appends not yet known durable.
    pending: Pending,
    /// `TERN_DEBUG` set: narrate every step on stderr.
    debug: bool,
}

impl Campaign {
    fn new(seed: u64) -> Campaign {
        Campaign {
            rng: Rng(seed * 7919 + 1),
            disk: SimStorage::new(512),
            model: BTreeMap::new(),
            next_id: 1,
            pending: Vec::new(),
            debug: std::env::var_os("TERN_DEBUG").is_some(),
        }
    }

    /// Opens the shard, checks it, runs random operations, then stops cleanly or cuts
    /// power inside a commit.
    fn cycle(&mut self, context: &str) {
        let shard = open(self.disk.clone(), small_config());
        if self.debug {
            eprintln!(
                "{context}: files {:?} counters {:?}",
                disk_files(&self.disk),
                shard.borrow().counters()
            );
        }
        // Adopt the next sequences the shard reports (a failed batch may or may not
        // have survived; the check below decides which is allowed).
        check(&shard, &self.model, context);
        for device in DEVICES {
            self.model.entry(device).or_default().next_seq =
                shard.borrow().mailbox_next_seq(device);
        }
        let ops = 1 + self.rng.below(30);
        for _ in 0..ops {
            self.random_op(&shard, context);
        }
        if self.rng.below(3) == 0 {
            // Clean stop: commit what is pending, reopen from the same disk.
            block_on(shard.commit()).unwrap();
            promote_pending(&mut self.pending, &mut self.model);
            return;
        }
        self.cut_power(shard, context);
    }

    fn random_op(&mut self, shard: &ShardHandle<SimStorage>, context: &str) {
        let op = self.rng.below(10);
        if self.debug {
            eprintln!(
                "  op {op} durable {} pending {}",
                shard.borrow().durable_seq(),
                shard.borrow().has_pending()
            );
        }
        match op {
            0..=5 => self.append(shard, context),
            6 | 7 => {
                block_on(shard.commit()).unwrap();
                promote_pending(&mut self.pending, &mut self.model);
            }
            8 => self.ack(shard),
            _ => {
                if self.rng.below(2) == 0 {
                    block_on(shard.checkpoint()).unwrap();
                } else {
                    block_on(shard.reclaim(NOW_MS)).unwrap();
                }
                promote_pending(&mut self.pending, &mut self.model);
            }
        }
    }

    fn append(&mut self, shard: &ShardHandle<SimStorage>, context: &str) {
        let rng = &mut self.rng;
        let fanout = 1 + rng.below(3) as usize;
        let start = rng.below(4) as usize;
        let recipients: Vec<_> = (0..fanout).map(|i| DEVICES[(start + i) % 4]).collect();
        let body: Vec<u8> = (0..rng.below(600)).map(|_| rng.next() as u8).collect();
        let id = self.next_id;
        self.next_id += 1;
        let appended =
            shard.borrow_mut().append_envelope(&envelope(9, id, id, &body), &recipients).unwrap();
        for (device, seq) in recipients.iter().zip(&appended.mailbox_seqs) {
            let mailbox = self.model.entry(*device).or_default();
            assert_eq!(*seq, mailbox.next_seq, "{context}: mailbox sequence");
            mailbox.next_seq += 1;
        }
        // Pending until its commit succeeds.
        self.pending.push((recipients, appended.mailbox_seqs, body));
    }

    /// Acks a random prefix of what is readable (durable).
    fn ack(&mut self, shard: &ShardHandle<SimStorage>) {
        block_on(shard.commit()).unwrap();
        promote_pending(&mut self.pending, &mut self.model);
        let device = DEVICES[self.rng.below(4) as usize];
        let mailbox = self.model.entry(device).or_default();
        if let Some((&last, _)) = mailbox.entries.iter().nth(self.rng.below(4) as usize) {
            shard.borrow_mut().ack(device, last).unwrap();
            block_on(shard.commit()).unwrap();
            mailbox.entries.retain(|seq, _| *seq > last);
        }
    }

    /// Power cut inside a commit: fails one of its operations, then cuts power; the
    /// failed batch must survive whole or not at all.
    fn cut_power(&mut self, shard: ShardHandle<SimStorage>, context: &str) {
        let had_pending = shard.borrow().has_pending();
        self.disk.fail_after(self.rng.below(4) as u32, ErrorKind::Other);
        let result = block_on(shard.commit());
        self.disk.clear_failure();
        if self.debug {
            eprintln!("  crash commit: {result:?} had_pending {had_pending}");
        }
        let failed = matches!(result, Err(WriteError::Io { .. }));
        if !failed {
            promote_pending(&mut self.pending, &mut self.model);
        }
        drop(shard);
        let mut choice_rng = Rng(self.rng.next());
        self.disk = self.disk.power_cut(|_, unsynced| match choice_rng.below(3) {
            0 => PowerCut::DropAll,
            1 => PowerCut::KeepFirst(choice_rng.below(unsynced as u64 + 1) as usize),
            _ => PowerCut::Tear {
                whole: choice_rng.below(unsynced as u64 + 1) as usize,
                bytes: choice_rng.below(8192) as usize,
            },
        });
        if !(failed && had_pending) {
            self.pending.clear();
            return;
        }
        // The unacknowledged batch survives whole or not at all.
        let shard = open(self.disk.clone(), small_config());
        let survived = pending_survived(&shard, &self.pending);
        drop(shard);
        self.pending.truncate(survived);
        promote_pending(&mut self.pending, &mut self.model);
        if self.debug {
            print_segments(&self.disk);
        }
        let shard = open(self.disk.clone(), small_config());
        check(&shard, &self.model, &format!("{context} (after the cut, survived {survived})"));
    }
}

/// Every segment's records and end, for `TERN_DEBUG`.
fn print_segments(disk: &SimStorage) {
    use tern_engine::Storage;
    for name in disk.list().unwrap() {
        let map = disk.map(&name).unwrap();
        if let Ok(scan) = tern_engine::record::scan_segment(&map) {
            let seqs: Vec<u64> = scan.records.iter().map(|r| r.header.record_seq).collect();
            eprintln!(
                "  {name}: {} records {:?}..{:?} end {:?} faults {:?}",
                seqs.len(),
                seqs.first(),
                seqs.last(),
                scan.end,
                scan.faults
            );
        }
    }
}

type Pending = Vec<(Vec<(u64, u32)>, Vec<u64>, Vec<u8>)>;

fn promote_pending(pending: &mut Pending, model: &mut BTreeMap<(u64, u32), ModelMailbox>) {
    for (recipients, seqs, body) in pending.drain(..) {
        for (device, seq) in recipients.iter().zip(seqs) {
            model.entry(*device).or_default().entries.insert(seq, body.clone());
        }
    }
}

/// How many of the pending (unacknowledged) appends survived the cut. A commit writes
/// one batch, or two when the log rolls to a new segment; each batch is atomic, so what
/// survives is a prefix of the appends, in order. Anything else panics.
fn pending_survived(shard: &ShardHandle<SimStorage>, pending: &Pending) -> usize {
    let mut present = Vec::new();
    for (recipients, seqs, body) in pending {
        let mut found_all = true;
        let mut found_any = false;
        for (device, seq) in recipients.iter().zip(seqs) {
            match read_all(shard, *device).into_iter().find(|(s, _)| s == seq) {
                Some((_, stored)) => {
                    assert_eq!(&stored, body, "a surviving envelope has other bytes");
                    found_any = true;
                }
                None => found_all = false,
            }
        }
        assert_eq!(found_any, found_all, "an envelope survived in some mailboxes only");
        present.push(found_all);
    }
    let survived = present.iter().take_while(|p| **p).count();
    assert!(
        present[survived..].iter().all(|p| !*p),
        "survivors are not a prefix of the appends: {present:?}"
    );
    survived
}

fn disk_files(disk: &SimStorage) -> Vec<String> {
    use tern_engine::Storage;
    disk.list().unwrap()
}
