//! Opening a shard: newest valid checkpoint, then replay of the log after it.
//!
//! The cases, in the order `docs/STORAGE.md` (section 6) argues them:
//! 1. No files: a fresh shard; segment 1 is created and its header synced.
//! 2. Checkpoints: the newest one that passes its CRCs and decodes is used; damaged ones
//!    are skipped (an older one, or none, means a longer replay, never lost data, since
//!    segments are deleted only after a newer checkpoint covers them).
//! 3. Segments are scanned in id order; records newer than the checkpoint are replayed.
//!    A gap in the ids, or an unreadable segment with records newer than the checkpoint,
//!    refuses to open (`SegmentLost`): acknowledged data would be missing.
//! 4. Damage inside synced data (valid records after it) is quarantined and counted; the
//!    records around it are replayed.
//! 5. The last segment may end in a torn batch (a crash between write and sync): it is
//!    cut at the last complete batch and the torn bytes are zeroed on disk, so a later
//!    scan cannot mistake them for data.
//! 6. A last segment whose header never reached the disk (a crash right after it was
//!    created) held nothing acknowledged: it is removed.

use std::collections::BTreeMap;
use std::rc::Rc;

use crate::checkpoint;
use crate::error::{CorruptRecord, OpenError};
use crate::record::{
    align_up, first_record_offset, scan_segment, segment_file_name, ScanEnd, SegmentHeader,
    RECORD_HEADER_BYTES,
};
use crate::shard::{segment_ids, Loc, Shard, ShardConfig};
use crate::storage::{Mapped, Storage, StorageFile};

fn io_error(during: &'static str) -> impl FnOnce(std::io::Error) -> OpenError {
    move |source| OpenError::Io { during, source }
}

pub(crate) async fn recover<S: Storage + Clone>(
    storage: S,
    config: ShardConfig,
) -> Result<Shard<S>, OpenError> {
    let alignment = storage.write_alignment().max(1);
    let names = storage.list().map_err(io_error("listing the shard directory"))?;
    for temp in names.iter().filter(|n| n.ends_with(".tmp")) {
        // A checkpoint that was being written when we stopped: never renamed, never used.
        storage.remove(temp).await.map_err(io_error("removing a temp file"))?;
    }

    // Case 2: the newest checkpoint that reads back.
    let mut checkpoints: Vec<(u64, &String)> =
        names.iter().filter_map(|n| checkpoint::parse_file_name(n).map(|seq| (seq, n))).collect();
    checkpoints.sort_by_key(|c| std::cmp::Reverse(c.0));
    let mut bad_checkpoints = 0;
    let mut snapshot = None;
    for (_, name) in &checkpoints {
        let bytes = storage.map(name).map_err(io_error("reading a checkpoint"))?;
        match checkpoint::decode(&bytes) {
            Ok(found) => {
                snapshot = Some(found);
                break;
            }
            Err(_) => bad_checkpoints += 1,
        }
    }
    let covered_seq = snapshot.as_ref().map_or(0, |s| s.covered_seq);
    let covered_segments: BTreeMap<u32, u64> = snapshot
        .as_ref()
        .map(|s| s.segments.iter().map(|g| (g.segment_id, g.last_record_seq)).collect())
        .unwrap_or_default();
    // The segment that was active when the checkpoint was taken kept receiving records
    // afterwards: only segments before it were sealed, hence fully covered.
    let active_at_checkpoint = covered_segments.keys().next_back().copied().unwrap_or(0);

    let mut ids = segment_ids(&names);
    // Case 6: a last segment whose header was never synced.
    if let Some(&last) = ids.last() {
        let name = segment_file_name(last);
        let map = storage.map(&name).map_err(io_error("mapping a segment"))?;
        if SegmentHeader::decode(&map).is_none() {
            storage.remove(&name).await.map_err(io_error("removing an empty segment"))?;
            storage.sync_dir().await.map_err(io_error("syncing the directory"))?;
            ids.pop();
        }
    }

    // Case 1: nothing on disk yet.
    if ids.is_empty() {
        let segment_id = covered_segments.keys().next_back().map_or(1, |id| id + 1);
        let next_record_seq = snapshot.as_ref().map_or(1, |s| s.next_record_seq);
        let (file, buffer) =
            create_segment(&storage, &config, alignment, segment_id, next_record_seq).await?;
        let mut shard = Shard::assemble(
            storage,
            config,
            alignment,
            segment_id,
            Rc::new(file),
            buffer,
            BTreeMap::new(),
            next_record_seq,
        );
        if let Some(snapshot) = snapshot {
            shard.restore_snapshot(snapshot);
        }
        shard.counters_mut().corrupt_records += bad_checkpoints;
        return Ok(shard);
    }

    // Case 3: space reclaim deletes dead segments in any order, but only segments sealed
    // before the checkpoint it wrote; a gap at or after the segment that was active at
    // the loaded checkpoint means records it does not cover are gone.
    for pair in ids.windows(2) {
        for missing in pair[0] + 1..pair[1] {
            if missing >= u64::from(active_at_checkpoint) {
                return Err(OpenError::SegmentLost { segment_id: missing });
            }
        }
    }

    let mut maps: BTreeMap<u32, Mapped> = BTreeMap::new();
    for &id in &ids {
        let map = storage.map(&segment_file_name(id)).map_err(io_error("mapping a segment"))?;
        maps.insert(id as u32, map);
    }
    let last_id = *ids.last().expect("non-empty") as u32;

    // Scan what is not covered by the checkpoint (and always the last segment).
    // Case 5: the last segment decides the active end; zero whatever lies past it.
    let last_map = maps.get(&last_id).expect("last segment mapped").clone();
    let last_scan = scan_segment(&last_map)
        .map_err(|_| OpenError::SegmentLost { segment_id: u64::from(last_id) })?;
    let committed_end = last_scan.end.committed_end();
    // The next batch is written at `active_end`, so it must sit on the storage's write
    // alignment (a DMA write demands it). A clean end is aligned already, but after damage
    // the scan resumes at the next valid record, at any byte offset, and a torn batch
    // after that leaves the committed end there.
    let active_end = align_up(committed_end, alignment);
    let torn = u64::from(matches!(last_scan.end, ScanEnd::TornTail { .. }));
    drop(last_scan);
    let last_nonzero = last_map.iter().rposition(|b| *b != 0).map_or(0, |i| i as u64 + 1);
    let active_file = storage
        .open(&segment_file_name(u64::from(last_id)))
        .await
        .map_err(io_error("opening the active segment"))?;
    // The file may end before the committed end: a batch's padding up to the alignment
    // is zeros, and a copy or a filesystem may have cut trailing zeros off. Bytes past
    // the end of a file read as zeros, so the buffer is the file, padded with zeros.
    let kept = last_map.len().min(committed_end as usize);
    let mut active_buffer = last_map[..kept].to_vec();
    active_buffer.resize(active_end as usize, 0);
    if last_nonzero > committed_end {
        // Zero the torn bytes in whole aligned blocks: the block holding the committed
        // end is rewritten with its committed bytes, then zeros.
        let start = committed_end & !(u64::from(alignment) - 1);
        let zero_end = align_up(last_nonzero, alignment).max(active_end);
        let mut block = active_buffer[start as usize..].to_vec();
        block.resize((zero_end - start) as usize, 0);
        active_file.write_at(&block, start).await.map_err(io_error("zeroing a torn tail"))?;
        active_file.sync_data().await.map_err(io_error("syncing a truncated segment"))?;
    }

    let mut sealed = maps.clone();
    sealed.remove(&last_id);
    let next_record_seq = snapshot.as_ref().map_or(1, |s| s.next_record_seq);
    let mut shard = Shard::assemble(
        storage,
        config.clone(),
        alignment,
        last_id,
        Rc::new(active_file),
        active_buffer,
        sealed,
        next_record_seq,
    );
    if let Some(snapshot) = snapshot {
        shard.restore_snapshot(snapshot);
    }

    // Every lost mailbox entry stands for an unreadable record in these bytes.
    let log_bytes: u64 = maps.values().map(|m| m.len() as u64).sum();
    shard.set_replay_gap_budget(log_bytes / RECORD_HEADER_BYTES as u64);

    // Cases 3 and 4: replay what the checkpoint does not cover, straight from the maps.
    let mut corrupt = bad_checkpoints;
    let mut max_seq = covered_seq;
    let mut written: BTreeMap<u32, u64> = BTreeMap::new();
    for (&id, map) in &maps {
        let fully_covered = id < active_at_checkpoint
            && covered_segments.get(&id).is_some_and(|last| *last <= covered_seq);
        if fully_covered {
            continue;
        }
        let scan = match scan_segment(map) {
            Ok(scan) => scan,
            Err(_) => return Err(OpenError::SegmentLost { segment_id: u64::from(id) }),
        };
        if scan.header.shard_id != config.shard_id {
            return Err(OpenError::WrongShard {
                found: scan.header.shard_id,
                expected: config.shard_id,
            });
        }
        corrupt += scan.faults.len() as u64;
        for fault in &scan.faults {
            shard.quarantine(CorruptRecord {
                mailbox_seq: None,
                location: Some((id, fault.offset as u32)),
                fault: fault.fault,
            });
        }
        for record in &scan.records {
            let header = record.header;
            max_seq = max_seq.max(header.record_seq);
            if header.record_seq > covered_seq {
                let loc = Loc { segment_id: id, offset: record.offset as u32 };
                shard.replay(loc, header.record_type, header.flags, header.record_seq, record.body);
            }
        }
        written.insert(id, scan.end.committed_end());
    }
    shard.set_replay_gap_budget(0);
    shard.resume_after(max_seq);
    shard.note_written(&written);
    shard.set_checkpoint_seq(covered_seq);
    let counters = shard.counters_mut();
    counters.corrupt_records += corrupt;
    counters.torn_tails += torn;
    Ok(shard)
}

/// Creates a segment and makes its header durable (file, data and directory).
async fn create_segment<S: Storage>(
    storage: &S,
    config: &ShardConfig,
    alignment: u32,
    segment_id: u32,
    first_record_seq: u64,
) -> Result<(S::File, Vec<u8>), OpenError> {
    let name = segment_file_name(u64::from(segment_id));
    let file = storage
        .create(&name, config.segment_bytes)
        .await
        .map_err(io_error("creating a segment"))?;
    let header = SegmentHeader {
        shard_id: config.shard_id,
        segment_id: u64::from(segment_id),
        first_record_seq,
        commit_alignment: alignment,
    };
    let mut bytes = header.to_bytes().to_vec();
    bytes.resize(first_record_offset(alignment) as usize, 0);
    file.write_at(&bytes, 0).await.map_err(io_error("writing a segment header"))?;
    file.sync_data().await.map_err(io_error("syncing a segment header"))?;
    storage.sync_dir().await.map_err(io_error("syncing the directory"))?;
    Ok((file, bytes))
}
