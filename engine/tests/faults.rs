//! Storage faults, injected through the engine's storage seam (`SimStorage`): a failed
//! fsync poisons the shard (never retry-and-hope), a full disk and a short write are
//! clear errors, a full disk stalls the shard until a commit finds space again (the
//! stalled batches written whole once more, nothing acknowledged early), a failure at
//! any step of a checkpoint is survived, corrupt records are quarantined and never
//! served, and a damaged checkpoint falls back to the log. In every
//! case nothing acknowledged is lost. (Torn writes at every byte offset: `torn_sweep.rs`;
//! power cuts that drop, tear and reorder unsynced writes: `power_cut.rs`.)

mod common;

use std::io::ErrorKind;

use common::*;
use futures_lite::future::block_on;
use tern_engine::{PowerCut, SimStorage, Storage, WriteError};

fn fill(shard: &tern_engine::ShardHandle<SimStorage>, device: (u64, u32), from: u64, count: u64) {
    for id in from..from + count {
        shard
            .borrow_mut()
            .append_envelope(&envelope(5, id, id, &id.to_le_bytes()), &[device])
            .unwrap();
    }
}

#[test]
fn failed_fsync_poisons_the_shard_and_loses_nothing_acknowledged() {
    let disk = SimStorage::new(512);
    let shard = open(disk.clone(), small_config());
    let device = (1, 1);
    fill(&shard, device, 1, 10);
    block_on(shard.commit()).unwrap();

    fill(&shard, device, 11, 5);
    let seq = shard.borrow_mut().append_envelope(&envelope(5, 99, 99, b"x"), &[device]).unwrap();
    disk.fail_after(1, ErrorKind::Other); // write succeeds, fdatasync fails
    let error = block_on(shard.commit()).unwrap_err();
    assert_eq!(error, WriteError::Io { during: "syncing a batch", kind: ErrorKind::Other });
    disk.clear_failure();

    // Waiters for the failed batch get the error, not an ack.
    let waited = block_on(shard.borrow().durable(seq.record_seq));
    assert_eq!(waited, Err(error.clone()));
    // The shard refuses further writes even though the disk "works" again.
    let refused = shard.borrow_mut().append_envelope(&envelope(5, 100, 100, b"y"), &[device]);
    assert_eq!(refused.unwrap_err(), error);
    assert!(matches!(block_on(shard.commit()), Err(WriteError::Io { .. })));
    drop(shard);

    // Power cut: the unsynced batch may vanish; the acknowledged ten never do.
    let disk = disk.power_cut(|_, _| PowerCut::DropAll);
    let shard = open(disk, small_config());
    let read = read_all(&shard, device);
    assert_eq!(read.len(), 10);
    assert_eq!(read[9].1, 10u64.to_le_bytes());
}

#[test]
fn full_disk_is_a_clear_error_and_loses_nothing_acknowledged() {
    let disk = SimStorage::new(512);
    let shard = open(disk.clone(), small_config());
    let device = (1, 1);
    fill(&shard, device, 1, 3);
    block_on(shard.commit()).unwrap();

    fill(&shard, device, 4, 3);
    disk.fail_after(0, ErrorKind::StorageFull);
    assert_eq!(block_on(shard.commit()), Err(WriteError::StorageFull));
    disk.clear_failure();
    drop(shard);

    // After space is freed (here: the failure cleared) a reopen serves what was acked.
    let shard = open(disk, small_config());
    assert_eq!(read_all(&shard, device).len(), 3);
    fill(&shard, device, 10, 1);
    block_on(shard.commit()).unwrap();
    assert_eq!(read_all(&shard, device).len(), 4);
}

/// A full disk stalls the shard instead of poisoning it: what the failed commit held is
/// not acknowledged (its waiters hear `StorageFull`), appends are refused meanwhile and
/// nothing spins on the full disk (`has_pending` is false), and once space is back the
/// next commit writes the kept batches and the shard works on, without a reopen. The
/// old engine refused every write until the shard was reopened (a server restart).
#[test]
fn a_full_disk_stalls_the_shard_until_space_is_back() {
    let disk = SimStorage::new(512);
    let shard = open(disk.clone(), small_config());
    let device = (1, 1);
    fill(&shard, device, 1, 3);
    block_on(shard.commit()).unwrap();
    let durable_before = shard.borrow().durable_seq();

    fill(&shard, device, 4, 3);
    let last = shard.borrow_mut().append_envelope(&envelope(5, 7, 7, b"7"), &[device]).unwrap();
    disk.fail_after(0, ErrorKind::StorageFull);
    assert_eq!(block_on(shard.commit()), Err(WriteError::StorageFull));
    assert!(shard.borrow().write_stalled());
    assert_eq!(shard.borrow().durable_seq(), durable_before, "nothing of it is durable");
    assert_eq!(block_on(shard.borrow().durable(last.record_seq)), Err(WriteError::StorageFull));
    let refused = shard.borrow_mut().append_envelope(&envelope(5, 8, 8, b"8"), &[device]);
    assert_eq!(refused.unwrap_err(), WriteError::StorageFull);
    assert!(!shard.borrow().has_pending(), "a commit loop must not spin on a full disk");
    // Still full: the retry fails alike and changes nothing.
    assert_eq!(block_on(shard.commit()), Err(WriteError::StorageFull));
    assert_eq!(read_all(&shard, device).len(), 3, "reads stop at the durable end");

    disk.clear_failure(); // space is back
    assert_eq!(block_on(shard.commit()), Ok(shard.borrow().appended_seq()));
    assert!(!shard.borrow().write_stalled() && shard.borrow().write_error().is_none());
    assert_eq!(block_on(shard.borrow().durable(last.record_seq)), Ok(()));
    fill(&shard, device, 8, 1);
    block_on(shard.commit()).unwrap();
    let bodies: Vec<Vec<u8>> = read_all(&shard, device).into_iter().map(|(_, b)| b).collect();
    let expected: Vec<Vec<u8>> = (1..=8u64)
        .map(|id| if id == 7 { b"7".to_vec() } else { id.to_le_bytes().to_vec() })
        .collect();
    assert_eq!(bodies, expected);
    drop(shard);
    let shard = open(disk.power_cut(|_, _| PowerCut::DropAll), small_config());
    assert_eq!(read_all(&shard, device).len(), 8, "all of it was synced");
}

/// The disk fills at each step of a commit that rolls to a new segment — the batch
/// closing the old segment, creating the new file, syncing the directory, the write and
/// the sync of the first batch there — with and without a short write. Every time: a
/// clear `StorageFull`, then, once space is back, a commit without a reopen that
/// writes it all (a new segment file left by the failed attempt is made again), and a
/// power cut after that loses nothing.
#[test]
fn a_full_disk_at_every_step_of_a_segment_roll_is_recovered_in_place() {
    let mut steps = 0;
    for fail_at in 0.. {
        let mut failed = false;
        for short in [false, true] {
            failed |= full_disk_during_a_roll(fail_at, short);
        }
        if !failed {
            break; // the commit has fewer operations than that
        }
        steps += 1;
    }
    assert!(steps >= 6, "the roll commit took {steps} storage operations");
}

/// One case of the sweep above; whether the failure fired.
fn full_disk_during_a_roll(fail_at: u32, short: bool) -> bool {
    let disk = SimStorage::new(512);
    let shard = open(disk.clone(), small_config());
    let device = (1, 1);
    let append = |id: u64| {
        let body = vec![id as u8; 200];
        shard.borrow_mut().append_envelope(&envelope(5, id, id, &body), &[device]).unwrap();
    };
    (1..=100).for_each(append);
    block_on(shard.commit()).unwrap();
    let segments = |s: &tern_engine::ShardHandle<SimStorage>| s.borrow().segment_stats().len();
    assert_eq!(segments(&shard), 1);
    (101..=250).for_each(append); // crosses into segment 2
    assert_eq!(segments(&shard), 2);
    match short {
        true => disk.fail_short_after(fail_at, ErrorKind::StorageFull),
        false => disk.fail_after(fail_at, ErrorKind::StorageFull),
    }
    let case = format!("failing at operation {fail_at}, short write {short}");
    let first = block_on(shard.commit());
    let failed = first.is_err();
    if failed {
        assert_eq!(first, Err(WriteError::StorageFull), "{case}");
        assert_eq!(read_all(&shard, device).len(), 100, "{case}");
    }
    disk.clear_failure();
    block_on(shard.commit()).unwrap_or_else(|e| panic!("{case}: {e}"));
    (251..=260).for_each(append);
    block_on(shard.commit()).unwrap();
    assert_eq!(read_all(&shard, device).len(), 260, "{case}");
    drop(shard);
    let shard = open(disk.power_cut(|_, _| PowerCut::DropAll), small_config());
    let read = read_all(&shard, device);
    assert_eq!(read.len(), 260, "{case}");
    assert_eq!(read[259].1, vec![4u8; 200], "{case}"); // 260 as u8
    failed
}

#[test]
fn corrupt_record_in_a_sealed_segment_is_quarantined_not_served() {
    let disk = SimStorage::new(512);
    let shard = open(disk.clone(), small_config());
    let device = (1, 1);
    let other = (2, 1);
    // Enough to fill several 64 KiB segments; one commit per 20 appends.
    for batch in 0..30u64 {
        for i in 0..20 {
            let id = batch * 20 + i + 1;
            let body = vec![id as u8; 200];
            let target = if id == 7 { other } else { device };
            shard.borrow_mut().append_envelope(&envelope(5, id, id, &body), &[target]).unwrap();
        }
        block_on(shard.commit()).unwrap();
    }
    drop(shard);

    // Flip a byte inside the body of the 5th record of segment 1 (sealed).
    let segment = "seg-00000000000000000001.log";
    let map = disk.map(segment).unwrap();
    let scan = tern_engine::record::scan_segment(&map).unwrap();
    let victim = scan.records[4];
    assert_eq!(victim.header.record_type, tern_engine::record::RecordType::Envelope);
    disk.corrupt(segment, |bytes| bytes[victim.offset as usize + 40] ^= 0x55);

    let shard = open(disk.clone(), small_config());
    let borrowed = shard.borrow();
    let read = borrowed.read_mailbox(device, 0, usize::MAX, NOW_MS);
    assert_eq!(read.corrupt.len(), 1, "the damaged record is reported");
    assert_eq!(read.corrupt[0].mailbox_seq, Some(4));
    let quarantined = borrowed.quarantined();
    assert_eq!(quarantined.len(), 1);
    assert_eq!(quarantined[0].location, Some((1, victim.offset as u32)));
    assert_eq!(read.entries.len(), 600 - 1 - 1, "everything else is served");
    assert!(read.entries.iter().all(|e| e.mailbox_seq != 4));
    // Another mailbox is unaffected.
    assert_eq!(borrowed.read_mailbox(other, 0, 10, NOW_MS).entries.len(), 1);
    assert!(borrowed.counters().corrupt_records >= 1);
}

#[test]
fn damaged_checkpoint_falls_back_to_the_log() {
    let disk = SimStorage::new(512);
    let shard = open(disk.clone(), small_config());
    let device = (1, 1);
    fill(&shard, device, 1, 20);
    block_on(shard.checkpoint()).unwrap();
    fill(&shard, device, 21, 5);
    block_on(shard.commit()).unwrap();
    drop(shard);

    let name = disk.list().unwrap().into_iter().find(|n| n.starts_with("checkpoint-")).unwrap();
    disk.corrupt(&name, |bytes| {
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
    });
    let shard = open(disk, small_config());
    assert_eq!(read_all(&shard, device).len(), 25);
    assert!(shard.borrow().counters().corrupt_records >= 1, "the bad checkpoint is counted");
}

#[test]
fn a_short_write_is_an_error_and_loses_nothing_acknowledged() {
    let disk = SimStorage::new(512);
    let shard = open(disk.clone(), small_config());
    let device = (1, 1);
    fill(&shard, device, 1, 40);
    block_on(shard.commit()).unwrap();
    fill(&shard, device, 41, 40);
    disk.fail_short_after(0, ErrorKind::StorageFull); // half the batch lands, then ENOSPC
    assert_eq!(block_on(shard.commit()), Err(WriteError::StorageFull));
    disk.clear_failure();
    assert!(shard.borrow().write_error().is_some(), "the shard refuses writes until a commit");
    drop(shard);
    // Whatever part of the failed batch reached the disk, it has no Commit record: it
    // is a torn tail, discarded; the forty acknowledged records are all there.
    for cut in [PowerCut::DropAll, PowerCut::KeepFirst(usize::MAX)] {
        let shard = open(disk.power_cut(|_, _| cut), small_config());
        let read = read_all(&shard, device);
        assert_eq!(read.len(), 40, "after {cut:?}");
        assert_eq!(read[39].1, 40u64.to_le_bytes());
    }
}

/// ENOSPC (or any I/O error) at each step of a checkpoint — the commit it starts with,
/// writing the temp file, the rename, the directory syncs, removing the old checkpoint —
/// ends in a clear error or success, and a power cut right after loses nothing that was
/// acknowledged; the shard keeps working or, if a commit failed, reopens cleanly.
#[test]
fn a_failure_at_every_step_of_a_checkpoint_loses_nothing_acknowledged() {
    let setup = || {
        let disk = SimStorage::new(512);
        let shard = open(disk.clone(), small_config());
        fill(&shard, (1, 1), 1, 30);
        block_on(shard.checkpoint()).unwrap(); // An old checkpoint to replace.
        fill(&shard, (1, 1), 31, 30);
        block_on(shard.commit()).unwrap();
        fill(&shard, (1, 1), 61, 10); // Pending: the checkpoint commits them first.
        (disk, shard)
    };
    let steps = {
        let (disk, shard) = setup();
        let before = disk.operations();
        block_on(shard.checkpoint()).unwrap();
        disk.operations() - before
    };
    assert!(steps >= 6, "a checkpoint is several operations ({steps})");
    for step in 0..steps as u32 {
        for kind in [ErrorKind::StorageFull, ErrorKind::Other] {
            let (disk, shard) = setup();
            disk.fail_after(step, kind);
            let result = block_on(shard.checkpoint());
            disk.clear_failure();
            let healthy = shard.borrow().write_error().is_none();
            let committed = shard.borrow().durable_seq() >= shard.borrow().appended_seq();
            let mut acked = if healthy && committed { 70 } else { 60 };
            if healthy {
                // The shard still takes writes (only the checkpoint may have failed).
                fill(&shard, (1, 1), 71, 1);
                block_on(shard.commit()).unwrap();
                acked = 71;
            }
            drop(shard);
            let shard = open(disk.power_cut(|_, _| PowerCut::DropAll), small_config());
            let read = read_all(&shard, (1, 1));
            assert!(
                read.len() >= acked,
                "step {step} ({kind:?}): {} of {acked} acknowledged records left ({result:?})",
                read.len()
            );
            let ids: Vec<u64> =
                read.iter().map(|(_, b)| u64::from_le_bytes(b[..8].try_into().unwrap())).collect();
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "step {step}: order kept");
        }
    }
}

#[test]
fn a_sealed_record_damaged_while_the_shard_runs_is_reported_on_read() {
    // Real files: sealed segments are read through an mmap of the file, so damage on the
    // disk after recovery (bit rot, another process) shows in what is read. Those reads
    // check every CRC; records in the active segment's buffer (this process's own
    // bytes) skip the body CRC, so the check must still happen for sealed ones.
    let dir = tempfile::tempdir().unwrap();
    let storage = tern_engine::StdStorage::new(dir.path()).unwrap();
    let shard = open(storage, small_config());
    let device = (1, 1);
    for batch in 0..30u64 {
        for i in 0..20 {
            let id = batch * 20 + i + 1;
            let body = vec![id as u8; 200];
            shard.borrow_mut().append_envelope(&envelope(5, id, id, &body), &[device]).unwrap();
        }
        block_on(shard.commit()).unwrap();
    }
    let path = dir.path().join("seg-00000000000000000001.log");
    let bytes = std::fs::read(&path).unwrap();
    let scan = tern_engine::record::scan_segment(&bytes).unwrap();
    let victim = scan.records[4];
    let at = victim.offset + 40;
    let flipped = [bytes[at as usize] ^ 0x55];
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::File::options().write(true).open(&path).unwrap(),
        &flipped,
        at,
    )
    .unwrap();

    let borrowed = shard.borrow();
    let read = borrowed.read_mailbox(device, 0, usize::MAX, NOW_MS);
    assert_eq!(read.corrupt.len(), 1, "the damaged sealed record is reported, not served");
    assert_eq!(read.corrupt[0].mailbox_seq, Some(4));
    assert_eq!(read.entries.len(), 600 - 1, "everything else is served");
}
