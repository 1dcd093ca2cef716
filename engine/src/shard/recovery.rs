//! Opening a shard: newest valid checkpoint, then replay of the log after it. The
//! result is the plain [`RecoveredParts`] of a shard, which `Shard::from_parts` takes
//! over; recovery never sees the `Shard` type.
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

use rkyv::rancor::Failure;
use tern_wire::messages::ArchivedEnvelope;
use tern_wire::EnvelopeRef;

use super::checkpoint::{self, RestoredParts, Snapshot};
use super::config::{ShardConfig, ShardCounters};
use super::dedup::Dedup;
use super::ids::MessageIds;
use super::index::Index;
use super::loc::{Loc, MAILBOX_SEQ_MAX};
use super::log::first_segment_bytes;
use super::segments::Segments;
use crate::body::{
    ArchivedAckRecord, ArchivedEnvelopeRecord, ArchivedRemoveRecord, ArchivedStateOp, MailboxSlot,
    StateOp,
};
use crate::error::{CorruptRecord, OpenError};
use crate::record::{
    align_up, first_record_offset, parse_segment_file_name, scan_segment, segment_file_name,
    RecordType, ScanEnd, SegmentHeader, FLAG_MOVED, RECORD_HEADER_BYTES,
};
use crate::state::StateTables;
use crate::storage::{Mapped, Storage, StorageFile};

/// Everything a recovered shard is made of, as recovery left it.
pub(crate) struct RecoveredParts<S: Storage> {
    /// The shard's directory.
    pub(crate) storage: S,
    /// The storage's write alignment (every batch starts on a multiple of it).
    pub(crate) alignment: u32,
    /// The file of the active (last) segment.
    pub(crate) active_file: Rc<S::File>,
    /// Its size: the log rolls to the next segment past it.
    pub(crate) active_capacity: u64,
    /// The segments, the active one ending at its committed end (aligned).
    pub(crate) segments: Segments,
    /// The next record sequence number: every record before it is durable.
    pub(crate) next_record_seq: u64,
    /// The mailbox index.
    pub(crate) index: Index,
    /// The dedup window.
    pub(crate) dedup: Dedup,
    /// The state tables.
    pub(crate) state: StateTables,
    /// The message-id allocator, past every id of this shard found.
    pub(crate) message_ids: MessageIds,
    /// The sequence number the loaded checkpoint covers (0 without one).
    pub(crate) checkpoint_seq: u64,
    /// An erasure a crash interrupted (see `Shard::erasure_pending`).
    pub(crate) erase_through_segment: Option<u32>,
    /// Counters so far (corrupt records, torn tails).
    pub(crate) counters: ShardCounters,
    /// Damaged records found (never served).
    pub(crate) quarantined: Vec<CorruptRecord>,
}

fn io_error(during: &'static str) -> impl FnOnce(std::io::Error) -> OpenError {
    move |source| OpenError::Io { during, source }
}

/// Recovers the parts of the shard in `storage`.
pub(crate) async fn recover<S: Storage + Clone>(
    storage: S,
    config: &ShardConfig,
) -> Result<RecoveredParts<S>, OpenError> {
    let alignment = storage.write_alignment().max(1);
    let names = storage.list().map_err(io_error("listing the shard directory"))?;
    for temp in names.iter().filter(|n| n.ends_with(".tmp")) {
        // A checkpoint that was being written when we stopped: never renamed, never used.
        storage.remove(temp).await.map_err(io_error("removing a temp file"))?;
    }
    let (snapshot, bad_checkpoints) = load_checkpoint(&storage, &names)?;
    let mut ids = segment_ids(&names);
    drop_headerless_last_segment(&storage, &mut ids).await?;
    let Some(&last_id) = ids.last() else {
        return fresh_shard(storage, config, alignment, snapshot, bad_checkpoints).await;
    };
    let covered = Covered::of(snapshot.as_ref());
    check_no_segment_lost(&ids, covered.active_segment)?;
    let mut maps: BTreeMap<u32, Mapped> = BTreeMap::new();
    for &id in &ids {
        let map = storage.map(&segment_file_name(id)).map_err(io_error("mapping a segment"))?;
        maps.insert(id as u32, map);
    }
    let last_id = last_id as u32;
    let active = open_active_segment(&storage, config, &maps[&last_id], last_id, alignment).await?;
    let mut sealed = maps.clone();
    sealed.remove(&last_id);
    let mut parts = RecoveredParts::new(storage, config, alignment, sealed, active, snapshot);
    parts.counters.corrupt_records += bad_checkpoints;
    parts.replay_log(config, &maps, &covered)?;
    Ok(parts)
}

/// The newest checkpoint that reads back, and how many newer ones did not.
fn load_checkpoint<S: Storage>(
    storage: &S,
    names: &[String],
) -> Result<(Option<Snapshot>, u64), OpenError> {
    let mut checkpoints: Vec<(u64, &String)> =
        names.iter().filter_map(|n| checkpoint::parse_file_name(n).map(|seq| (seq, n))).collect();
    checkpoints.sort_by_key(|c| std::cmp::Reverse(c.0));
    let mut bad_checkpoints = 0;
    for (_, name) in &checkpoints {
        let bytes = storage.map(name).map_err(io_error("reading a checkpoint"))?;
        match checkpoint::decode(&bytes) {
            Ok(found) => return Ok((Some(found), bad_checkpoints)),
            Err(_) => bad_checkpoints += 1,
        }
    }
    Ok((None, bad_checkpoints))
}

/// The ids of the segment files among `names`, in order.
fn segment_ids(names: &[String]) -> Vec<u64> {
    let mut ids: Vec<u64> = names.iter().filter_map(|n| parse_segment_file_name(n)).collect();
    ids.sort_unstable();
    ids
}

/// Case 6: removes a last segment whose header was never synced.
async fn drop_headerless_last_segment<S: Storage>(
    storage: &S,
    ids: &mut Vec<u64>,
) -> Result<(), OpenError> {
    let Some(&last) = ids.last() else { return Ok(()) };
    let name = segment_file_name(last);
    let map = storage.map(&name).map_err(io_error("mapping a segment"))?;
    if SegmentHeader::decode(&map).is_none() {
        storage.remove(&name).await.map_err(io_error("removing an empty segment"))?;
        storage.sync_dir().await.map_err(io_error("syncing the directory"))?;
        ids.pop();
    }
    Ok(())
}

/// What the loaded checkpoint covers.
struct Covered {
    /// Every record up to and including this one.
    seq: u64,
    /// The last record sequence number of each segment it accounts for.
    segments: BTreeMap<u32, u64>,
    /// The segment that was active when the checkpoint was taken: it kept receiving
    /// records afterwards, so only segments before it were sealed, hence fully covered.
    active_segment: u32,
}

impl Covered {
    fn of(snapshot: Option<&Snapshot>) -> Covered {
        let segments: BTreeMap<u32, u64> = snapshot
            .map(|s| s.segments.iter().map(|g| (g.segment_id, g.last_record_seq)).collect())
            .unwrap_or_default();
        let active_segment = segments.keys().next_back().copied().unwrap_or(0);
        Covered { seq: snapshot.map_or(0, |s| s.covered_seq), segments, active_segment }
    }

    /// Whether a segment's records are all in the checkpoint (then it is not replayed).
    fn covers(&self, segment_id: u32) -> bool {
        segment_id < self.active_segment
            && self.segments.get(&segment_id).is_some_and(|last| *last <= self.seq)
    }
}

/// Case 3: space reclaim deletes dead segments in any order, but only segments sealed
/// before the checkpoint it wrote; a gap at or after the segment that was active at the
/// loaded checkpoint means records it does not cover are gone.
fn check_no_segment_lost(ids: &[u64], active_at_checkpoint: u32) -> Result<(), OpenError> {
    for pair in ids.windows(2) {
        for missing in pair[0] + 1..pair[1] {
            if missing >= u64::from(active_at_checkpoint) {
                return Err(OpenError::SegmentLost { segment_id: missing });
            }
        }
    }
    Ok(())
}

/// Case 1: nothing on disk yet (or only a checkpoint): a new segment after the ones the
/// checkpoint knows.
async fn fresh_shard<S: Storage>(
    storage: S,
    config: &ShardConfig,
    alignment: u32,
    snapshot: Option<Snapshot>,
    bad_checkpoints: u64,
) -> Result<RecoveredParts<S>, OpenError> {
    let covered = Covered::of(snapshot.as_ref());
    let segment_id = covered.segments.keys().next_back().map_or(1, |id| id + 1);
    let next_record_seq = snapshot.as_ref().map_or(1, |s| s.next_record_seq);
    // A new shard starts small (`log::FIRST_SEGMENT_BYTES`); its segments grow as it fills.
    let capacity = first_segment_bytes(config);
    let (file, buffer) =
        create_segment(&storage, capacity, config, alignment, segment_id, next_record_seq).await?;
    let active = ActiveSegment { segment_id, file, buffer, capacity, torn_tails: 0 };
    let mut parts =
        RecoveredParts::new(storage, config, alignment, BTreeMap::new(), active, snapshot);
    parts.counters.corrupt_records += bad_checkpoints;
    Ok(parts)
}

/// The active segment as recovery leaves it.
struct ActiveSegment<F> {
    segment_id: u32,
    file: F,
    /// Its bytes up to the committed end, padded with zeros to the write alignment.
    buffer: Vec<u8>,
    /// Its size (the file's preallocated length, at most `segment_bytes`).
    capacity: u64,
    /// 1 if its last batch was torn and cut.
    torn_tails: u64,
}

/// Case 5: opens the last segment, whose scan decides the active end, and zeroes on disk
/// whatever lies past it.
async fn open_active_segment<S: Storage>(
    storage: &S,
    config: &ShardConfig,
    last_map: &Mapped,
    last_id: u32,
    alignment: u32,
) -> Result<ActiveSegment<S::File>, OpenError> {
    let last_scan = scan_segment(last_map)
        .map_err(|_| OpenError::SegmentLost { segment_id: u64::from(last_id) })?;
    let committed_end = last_scan.end.committed_end();
    // The next batch is written at `active_end`, so it must sit on the storage's write
    // alignment (a DMA write demands it). A clean end is aligned already, but after damage
    // the scan resumes at the next valid record, at any byte offset, and a torn batch
    // after that leaves the committed end there.
    let active_end = align_up(committed_end, alignment);
    let torn_tails = u64::from(matches!(last_scan.end, ScanEnd::TornTail { .. }));
    drop(last_scan);
    let last_nonzero = last_map.iter().rposition(|b| *b != 0).map_or(0, |i| i as u64 + 1);
    let file = storage
        .open(&segment_file_name(u64::from(last_id)))
        .await
        .map_err(io_error("opening the active segment"))?;
    // The file may end before the committed end: a batch's padding up to the alignment
    // is zeros, and a copy or a filesystem may have cut trailing zeros off. Bytes past
    // the end of a file read as zeros, so the buffer is the file, padded with zeros.
    let kept = last_map.len().min(committed_end as usize);
    let mut buffer = last_map[..kept].to_vec();
    buffer.resize(active_end as usize, 0);
    if last_nonzero > committed_end {
        // Zero the torn bytes in whole aligned blocks: the block holding the committed
        // end is rewritten with its committed bytes, then zeros.
        let start = committed_end & !(u64::from(alignment) - 1);
        let zero_end = align_up(last_nonzero, alignment).max(active_end);
        let mut block = buffer[start as usize..].to_vec();
        block.resize((zero_end - start) as usize, 0);
        file.write_at(&block, start).await.map_err(io_error("zeroing a torn tail"))?;
        file.sync_data().await.map_err(io_error("syncing a truncated segment"))?;
    }
    // Its size is its file's: segments grow, and a smaller `segment_bytes` than when it
    // was made caps it (a file shortened by a copy only makes the log roll sooner).
    let capacity = (last_map.len() as u64).min(config.segment_bytes);
    Ok(ActiveSegment { segment_id: last_id, file, buffer, capacity, torn_tails })
}

impl<S: Storage> RecoveredParts<S> {
    /// Parts holding what the checkpoint (if any) restores, before replay.
    fn new(
        storage: S,
        config: &ShardConfig,
        alignment: u32,
        sealed: BTreeMap<u32, Mapped>,
        active: ActiveSegment<S::File>,
        snapshot: Option<Snapshot>,
    ) -> RecoveredParts<S> {
        let next_record_seq = snapshot.as_ref().map_or(1, |s| s.next_record_seq);
        let restored = match snapshot {
            Some(snapshot) => snapshot.into_parts(config),
            None => RestoredParts::empty(config),
        };
        let counters = ShardCounters {
            corrupt_records: restored.corrupt_records,
            torn_tails: active.torn_tails,
            ..ShardCounters::default()
        };
        let segments =
            Segments::new(sealed, active.segment_id, active.buffer, restored.segment_stats);
        RecoveredParts {
            storage,
            alignment,
            active_file: Rc::new(active.file),
            active_capacity: active.capacity,
            segments,
            next_record_seq,
            index: restored.index,
            dedup: restored.dedup,
            state: restored.state,
            message_ids: MessageIds::new(config.shard_id, restored.last_message_id),
            checkpoint_seq: restored.covered_seq,
            erase_through_segment: None,
            counters,
            quarantined: Vec::new(),
        }
    }

    /// Cases 3 and 4: replays what the checkpoint does not cover, straight from the
    /// maps, quarantining damage; then new records continue after the highest sequence
    /// number seen.
    fn replay_log(
        &mut self,
        config: &ShardConfig,
        maps: &BTreeMap<u32, Mapped>,
        covered: &Covered,
    ) -> Result<(), OpenError> {
        // Every lost mailbox entry stands for an unreadable record in these bytes.
        let log_bytes: u64 = maps.values().map(|m| m.len() as u64).sum();
        self.index.allow_gaps(log_bytes / RECORD_HEADER_BYTES as u64);
        let mut max_seq = covered.seq;
        let mut written: BTreeMap<u32, u64> = BTreeMap::new();
        for (&id, map) in maps {
            if covered.covers(id) {
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
            self.counters.corrupt_records += scan.faults.len() as u64;
            for fault in &scan.faults {
                self.quarantined.push(CorruptRecord {
                    mailbox_seq: None,
                    location: Some((id, fault.offset as u32)),
                    fault: fault.fault,
                });
            }
            for record in &scan.records {
                let header = record.header;
                max_seq = max_seq.max(header.record_seq);
                if header.record_seq > covered.seq {
                    let loc = Loc { segment_id: id, offset: record.offset as u32 };
                    self.replay(
                        loc,
                        header.record_type,
                        header.flags,
                        header.record_seq,
                        record.body,
                    );
                }
            }
            written.insert(id, scan.end.committed_end());
        }
        self.index.allow_gaps(0);
        self.next_record_seq = self.next_record_seq.max(max_seq + 1);
        for (id, end) in written {
            self.segments.note_written(id, end);
        }
        self.checkpoint_seq = covered.seq;
        Ok(())
    }

    /// Applies one replayed record, whose location is `loc`, as the live append did.
    fn replay(&mut self, loc: Loc, record_type: RecordType, flags: u8, seq: u64, body: &[u8]) {
        match record_type {
            RecordType::Envelope => {
                if self.replay_envelope(loc, flags, seq, body).is_none() {
                    // Unreadable: counted, and its sequence number is not noted either.
                    self.counters.corrupt_records += 1;
                    return;
                }
            }
            RecordType::Ack => self.replay_ack(body),
            RecordType::Remove => self.replay_remove(body),
            RecordType::State => self.replay_state(loc, body),
            RecordType::Commit => {}
        }
        self.segments.note_record(loc.segment_id, seq);
    }

    /// Indexes a replayed envelope (or, with flag `MOVED`, re-points the entries a
    /// compaction moved); `None` if its body does not validate.
    fn replay_envelope(&mut self, loc: Loc, flags: u8, seq: u64, body: &[u8]) -> Option<()> {
        let record = rkyv::access::<ArchivedEnvelopeRecord, Failure>(body).ok()?;
        let envelope = rkyv::access::<ArchivedEnvelope, Failure>(&record.envelope).ok()?;
        let slots: Vec<MailboxSlot> = record
            .slots
            .iter()
            .map(|s| MailboxSlot {
                user_id: s.user_id.to_native(),
                device_id: s.device_id.to_native(),
                mailbox_seq: s.mailbox_seq.to_native(),
            })
            .collect();
        let record_bytes = (RECORD_HEADER_BYTES + body.len()) as u64;
        let segments = &mut self.segments;
        if flags & FLAG_MOVED != 0 {
            let expires_ms = envelope.expires_ms.to_native();
            self.index.relocate(segments, &slots, loc, record_bytes, expires_ms, seq);
            return Some(());
        }
        let envelope = envelope_ref_of(envelope);
        let indexed = self.index.add_envelope(segments, &slots, loc, record_bytes, &envelope, seq);
        self.counters.corrupt_records += indexed.corrupt_slots;
        if indexed.stored {
            self.message_ids.observe(envelope.server_message_id);
            self.dedup.remember_envelope(&envelope);
        }
        Some(())
    }

    fn replay_ack(&mut self, body: &[u8]) {
        let ack = rkyv::access::<ArchivedAckRecord, Failure>(body);
        // An ack past the sequence bound is corrupt (the index adds one to it).
        let ack = ack.ok().filter(|a| a.up_to_mailbox_seq.to_native() < MAILBOX_SEQ_MAX);
        if let Some(ack) = ack {
            let device = (ack.user_id.to_native(), ack.device_id.to_native());
            self.index.ack(&mut self.segments, device, ack.up_to_mailbox_seq.to_native());
        } else {
            self.counters.corrupt_records += 1;
        }
    }

    fn replay_remove(&mut self, body: &[u8]) {
        if let Ok(remove) = rkyv::access::<ArchivedRemoveRecord, Failure>(body) {
            let device = (remove.user_id.to_native(), remove.device_id.to_native());
            self.index.remove(&mut self.segments, device, remove.mailbox_seq.to_native());
        } else {
            self.counters.corrupt_records += 1;
        }
    }

    fn replay_state(&mut self, loc: Loc, body: &[u8]) {
        let op = rkyv::access::<ArchivedStateOp, Failure>(body)
            .and_then(rkyv::deserialize::<StateOp, Failure>);
        let Ok(op) = op else {
            self.counters.corrupt_records += 1;
            return;
        };
        self.state.apply(&op);
        match op {
            // A crash before the erasure finished: do it again.
            StateOp::DeleteAccount { .. } => self.erase_through_segment = Some(loc.segment_id),
            StateOp::NoteSend {
                sender_user,
                sender_device,
                client_message_id,
                server_message_id,
                time_ms,
            } => {
                let key = (sender_user, sender_device, client_message_id);
                self.dedup.remember_noted(key, server_message_id, time_ms);
                self.message_ids.observe(server_message_id);
            }
            _ => {}
        }
    }
}

/// An `EnvelopeRef` view of an archived envelope (for replay, which indexes from the
/// stored bytes).
fn envelope_ref_of(envelope: &ArchivedEnvelope) -> EnvelopeRef<'_> {
    use tern_wire::messages::{ArchivedConversation, Conversation};
    EnvelopeRef {
        server_message_id: envelope.server_message_id.to_native(),
        client_message_id: envelope.client_message_id.to_native(),
        server_time_ms: envelope.server_time_ms.to_native(),
        expires_ms: envelope.expires_ms.to_native(),
        sender_user: envelope.sender_user.to_native(),
        sender_device: envelope.sender_device.to_native(),
        conversation: match &envelope.conversation {
            ArchivedConversation::User(u) => Conversation::User(u.to_native()),
            ArchivedConversation::Group(g) => Conversation::Group(g.to_native()),
        },
        conversation_seq: envelope.conversation_seq.to_native(),
        kind: rkyv::deserialize::<_, Failure>(&envelope.kind).expect("validated tag"),
        e2e_type: rkyv::deserialize::<_, Failure>(&envelope.e2e_type).expect("validated tag"),
        body: &envelope.body,
    }
}

/// Creates a segment and makes its header durable (file, data and directory).
async fn create_segment<S: Storage>(
    storage: &S,
    capacity: u64,
    config: &ShardConfig,
    alignment: u32,
    segment_id: u32,
    first_record_seq: u64,
) -> Result<(S::File, Vec<u8>), OpenError> {
    let name = segment_file_name(u64::from(segment_id));
    let file = storage.create(&name, capacity).await.map_err(io_error("creating a segment"))?;
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
