//! The log as readers see it: the sealed segments (mmapped), the active segment's bytes
//! up to its committed end, the durable end, and what each segment still holds
//! ([`SegmentStats`], for space reclaim).
//!
//! Reads, index maintenance, compaction and checkpoints all look at segments this way;
//! only the write side (`log.rs`) adds to them, one committed batch at a time. Keeping the
//! read view apart from the writer lets the index resolve a [`Loc`] to bytes while the
//! writer holds a batch of its own.

use std::collections::BTreeMap;

use rkyv::rancor::Failure;
use tern_wire::messages::{ArchivedEnvelope, UserId};

use super::loc::Loc;
use crate::body::ArchivedEnvelopeRecord;
use crate::error::CorruptRecord;
use crate::record::{check_header, check_record, record_body_of_checked_bytes, RecordFault};
use crate::storage::Mapped;

/// Per-segment accounting for space reclaim.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentStats {
    /// Envelope records some mailbox still references.
    pub live_records: u64,
    /// Their bytes (headers included).
    pub live_bytes: u64,
    /// Latest expiry of any envelope in the segment.
    pub max_expires_ms: u64,
    /// Sequence number of the segment's last record.
    pub last_record_seq: u64,
    /// Bytes written (committed end).
    pub written_bytes: u64,
}

/// The segments of one shard, as readers see them.
pub(crate) struct Segments {
    sealed: BTreeMap<u32, Mapped>,
    active_id: u32,
    /// The active segment's bytes from 0 to its committed end (reads of the active
    /// segment never touch the file).
    active: Vec<u8>,
    /// End of the durable log: entries at or past it are not served.
    durable_end: Loc,
    stats: BTreeMap<u32, SegmentStats>,
}

impl std::fmt::Debug for Segments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segments")
            .field("sealed", &self.sealed.keys().collect::<Vec<_>>())
            .field("active_id", &self.active_id)
            .field("durable_end", &self.durable_end)
            .finish_non_exhaustive()
    }
}

impl Segments {
    /// Segments whose active one is `active_id` with `active` as its committed bytes:
    /// everything up to their end is durable.
    pub(crate) fn new(
        sealed: BTreeMap<u32, Mapped>,
        active_id: u32,
        active: Vec<u8>,
        stats: BTreeMap<u32, SegmentStats>,
    ) -> Segments {
        let durable_end = Loc { segment_id: active_id, offset: active.len() as u32 };
        Segments { sealed, active_id, active, durable_end, stats }
    }

    /// The segment being written.
    pub(crate) fn active_id(&self) -> u32 {
        self.active_id
    }

    /// The active segment's committed end.
    pub(crate) fn active_len(&self) -> u64 {
        self.active.len() as u64
    }

    /// The ids of the sealed segments, in order.
    pub(crate) fn sealed_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.sealed.keys().copied()
    }

    /// A sealed segment's mapped bytes.
    pub(crate) fn sealed_map(&self, segment_id: u32) -> Option<&Mapped> {
        self.sealed.get(&segment_id)
    }

    /// Per-segment accounting.
    pub(crate) fn stats(&self) -> &BTreeMap<u32, SegmentStats> {
        &self.stats
    }

    /// One segment's accounting (zeros for a segment without any).
    pub(crate) fn stats_of(&self, segment_id: u32) -> SegmentStats {
        self.stats.get(&segment_id).copied().unwrap_or_default()
    }

    // -----------------------------------------------------------------------------------
    // Reads
    // -----------------------------------------------------------------------------------

    /// Whether a mailbox entry may be served: its record is on disk (or known lost).
    pub(crate) fn is_durable(&self, loc: Loc) -> bool {
        !loc.is_record() || loc < self.durable_end
    }

    fn bytes(&self, segment_id: u32) -> Option<&[u8]> {
        if segment_id == self.active_id {
            Some(&self.active)
        } else {
            self.sealed.get(&segment_id).map(|map| &map[..])
        }
    }

    /// The length of the record at `loc` (header included), if its header is intact.
    pub(crate) fn record_len(&self, loc: Loc) -> Option<u64> {
        let bytes = self.bytes(loc.segment_id)?.get(loc.offset as usize..)?;
        check_header(bytes, loc.segment_id).ok().map(|h| h.record_bytes() as u64)
    }

    /// The envelope stored at `loc`, checked (record CRCs and archive validation).
    pub(crate) fn envelope_at(
        &self,
        loc: Loc,
    ) -> Result<(&[u8], &ArchivedEnvelope), CorruptRecord> {
        if loc == Loc::LOST {
            return Err(CorruptRecord {
                mailbox_seq: None,
                location: None,
                fault: RecordFault::BadBody,
            });
        }
        let corrupt = |fault| CorruptRecord {
            mailbox_seq: None,
            location: Some((loc.segment_id, loc.offset)),
            fault,
        };
        let segment = self.bytes(loc.segment_id).ok_or(corrupt(RecordFault::Truncated))?;
        let bytes = segment.get(loc.offset as usize..).ok_or(corrupt(RecordFault::Truncated))?;
        // The active segment's buffer holds records this process appended, or that
        // recovery checked (CRCs included) when it loaded the segment: only records read
        // back from a sealed segment's file can have changed since they were checked.
        let (_, body) = if loc.segment_id == self.active_id {
            record_body_of_checked_bytes(bytes, loc.segment_id).map_err(corrupt)?
        } else {
            check_record(bytes, loc.segment_id).map_err(corrupt)?
        };
        let record = rkyv::access::<ArchivedEnvelopeRecord, Failure>(body)
            .map_err(|_| corrupt(RecordFault::BadBody))?;
        let envelope_bytes: &[u8] = &record.envelope;
        let envelope = rkyv::access::<ArchivedEnvelope, Failure>(envelope_bytes)
            .map_err(|_| corrupt(RecordFault::BadBody))?;
        Ok((envelope_bytes, envelope))
    }

    /// The sender and record length of the envelope at `loc`, for a mailbox's tallies:
    /// the header is checked, the body's CRC is not (a tally off by one damaged record is
    /// harmless; a CRC over every acknowledged envelope's body is not free).
    pub(crate) fn sender_and_len(&self, loc: Loc) -> Option<(UserId, u64)> {
        let bytes = self.bytes(loc.segment_id)?.get(loc.offset as usize..)?;
        let (header, body) = record_body_of_checked_bytes(bytes, loc.segment_id).ok()?;
        let record = rkyv::access::<ArchivedEnvelopeRecord, Failure>(body).ok()?;
        let envelope = rkyv::access::<ArchivedEnvelope, Failure>(&record.envelope).ok()?;
        Some((envelope.sender_user.to_native(), header.record_bytes() as u64))
    }

    // -----------------------------------------------------------------------------------
    // Accounting
    // -----------------------------------------------------------------------------------

    /// An envelope record at `loc` became live (indexed, or moved there by compaction).
    pub(crate) fn note_live(&mut self, loc: Loc, record_bytes: u64, expires_ms: u64, seq: u64) {
        let stats = self.stats.entry(loc.segment_id).or_default();
        stats.live_records += 1;
        stats.live_bytes += record_bytes;
        stats.max_expires_ms = stats.max_expires_ms.max(expires_ms);
        stats.last_record_seq = stats.last_record_seq.max(seq);
    }

    /// An envelope record of `segment_id` lost its last reference.
    pub(crate) fn note_released(&mut self, segment_id: u32, record_bytes: u64) {
        if let Some(stats) = self.stats.get_mut(&segment_id) {
            stats.live_records = stats.live_records.saturating_sub(1);
            stats.live_bytes = stats.live_bytes.saturating_sub(record_bytes);
        }
    }

    /// A record `seq` was found in `segment_id` (replay).
    pub(crate) fn note_record(&mut self, segment_id: u32, seq: u64) {
        let stats = self.stats.entry(segment_id).or_default();
        stats.last_record_seq = stats.last_record_seq.max(seq);
    }

    /// A batch of `segment_id` was closed with its `Commit` record `seq`.
    pub(crate) fn note_batch_closed(&mut self, segment_id: u32, seq: u64) {
        self.stats.entry(segment_id).or_default().last_record_seq = seq;
    }

    /// A batch will open `segment_id`.
    pub(crate) fn note_opened(&mut self, segment_id: u32) {
        self.stats.entry(segment_id).or_default();
    }

    /// `segment_id` was written up to `end` (recovery's scan).
    pub(crate) fn note_written(&mut self, segment_id: u32, end: u64) {
        self.stats.entry(segment_id).or_default().written_bytes = end;
    }

    // -----------------------------------------------------------------------------------
    // Changes by the log and by reclaim
    // -----------------------------------------------------------------------------------

    /// A committed batch of the active segment, starting at `start_offset`: its bytes
    /// become readable and durable.
    pub(crate) fn append_committed(&mut self, segment_id: u32, start_offset: u64, bytes: &[u8]) {
        debug_assert_eq!(segment_id, self.active_id);
        debug_assert_eq!(self.active.len() as u64, start_offset);
        self.active.extend_from_slice(bytes);
        let end = self.active.len() as u64;
        self.stats.entry(segment_id).or_default().written_bytes = end;
        self.durable_end = Loc { segment_id, offset: end as u32 };
    }

    /// The active segment was sealed (`map` is its file) and `next_id` is active now,
    /// empty, with room for `capacity_bytes`.
    pub(crate) fn roll(&mut self, map: Mapped, next_id: u32, capacity_bytes: usize) {
        self.sealed.insert(self.active_id, map);
        self.active_id = next_id;
        self.active = Vec::with_capacity(capacity_bytes);
    }

    /// A sealed segment was deleted: forget it and its accounting.
    pub(crate) fn forget(&mut self, segment_id: u32) {
        self.sealed.remove(&segment_id);
        self.stats.remove(&segment_id);
    }
}
