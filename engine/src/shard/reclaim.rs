//! Space reclaim's decisions (`docs/STORAGE.md`, section 7): which sealed segments to
//! compact, rewriting their live envelopes at the head of the log, and which segments a
//! checkpoint lets go.
//!
//! The async steps (commit, checkpoint, file removal) belong to the handle; this module
//! holds the synchronous part, over the log, the segments and the index, so that the
//! rules for "mostly dead", "erased" and "reclaimable" sit in one place.

use rkyv::rancor::Failure;
use tern_wire::encode_archive;
use tern_wire::messages::ArchivedEnvelope;

use super::index::Index;
use super::loc::Loc;
use super::log::Log;
use super::segments::Segments;
use crate::body::{ArchivedEnvelopeRecord, EnvelopeRecordRef, MailboxSlot};
use crate::error::WriteError;
use crate::record::{scan_segment, RecordType, FLAG_MOVED};
use crate::storage::Storage;

/// Which segments a compaction pass rewrites.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Compaction {
    /// A sealed segment whose live bytes are below this percentage of its written bytes.
    pub(crate) live_percent_max: u8,
    /// Envelopes expired by then are not worth moving.
    pub(crate) now_ms: u64,
    /// Every sealed segment up to this one, whatever its live share (an erasure).
    pub(crate) erase_through: Option<u32>,
}

/// Rewrites the live envelopes of the segments `compaction` picks at the head of the
/// log (records with flag `MOVED`) and re-points their mailbox entries. Returns how many
/// records were rewritten.
pub(crate) fn compact<S: Storage>(
    log: &mut Log<S>,
    segments: &mut Segments,
    index: &mut Index,
    compaction: Compaction,
) -> Result<u64, WriteError> {
    let mut rewritten = 0;
    for segment_id in candidates(segments, compaction) {
        rewritten += compact_segment(log, segments, index, segment_id)?;
    }
    Ok(rewritten)
}

/// Sealed segments with live, unexpired envelopes that are mostly dead or erased.
fn candidates(segments: &Segments, compaction: Compaction) -> Vec<u32> {
    let limit = u64::from(compaction.live_percent_max);
    segments
        .sealed_ids()
        .filter(|id| {
            let stats = segments.stats_of(*id);
            let mostly_dead = stats.live_bytes * 100 < stats.written_bytes.max(1) * limit;
            let erased = compaction.erase_through.is_some_and(|through| *id <= through);
            stats.live_records > 0
                && stats.max_expires_ms > compaction.now_ms
                && (mostly_dead || erased)
        })
        .collect()
}

/// Rewrites the envelopes of one sealed segment that some mailbox still points at.
fn compact_segment<S: Storage>(
    log: &mut Log<S>,
    segments: &mut Segments,
    index: &mut Index,
    segment_id: u32,
) -> Result<u64, WriteError> {
    let Some(map) = segments.sealed_map(segment_id).cloned() else { return Ok(0) };
    let Ok(scan) = scan_segment(&map) else { return Ok(0) };
    let mut rewritten = 0;
    for record in scan.records.iter().filter(|r| r.header.record_type == RecordType::Envelope) {
        let old = Loc { segment_id, offset: record.offset as u32 };
        let Ok(archived) = rkyv::access::<ArchivedEnvelopeRecord, Failure>(record.body) else {
            continue;
        };
        let live_slots: Vec<MailboxSlot> = archived
            .slots
            .iter()
            .map(|s| MailboxSlot {
                user_id: s.user_id.to_native(),
                device_id: s.device_id.to_native(),
                mailbox_seq: s.mailbox_seq.to_native(),
            })
            .filter(|s| index.entry_at(*s) == Some(old))
            .collect();
        if live_slots.is_empty() {
            continue;
        }
        let envelope_bytes: &[u8] = &archived.envelope;
        let copy = EnvelopeRecordRef { slots: &live_slots, envelope: envelope_bytes };
        let (seq, loc, record_bytes) =
            log.append(segments, RecordType::Envelope, FLAG_MOVED, |out| {
                encode_archive(out, &copy).map(|_| ()).map_err(|_| WriteError::NoRecipients)
            })?;
        let expires_ms = rkyv::access::<ArchivedEnvelope, Failure>(envelope_bytes)
            .map(|e| e.expires_ms.to_native())
            .unwrap_or(u64::MAX);
        index.relocate(segments, &live_slots, loc, record_bytes, expires_ms, seq);
        rewritten += 1;
    }
    Ok(rewritten)
}

/// Sealed segments that may be deleted: a checkpoint up to `checkpoint_seq` covers their
/// records, and none of their envelopes is live and unexpired at `now_ms`.
pub(crate) fn reclaimable(segments: &Segments, checkpoint_seq: u64, now_ms: u64) -> Vec<u32> {
    segments
        .sealed_ids()
        .filter(|id| {
            let stats = segments.stats_of(*id);
            stats.last_record_seq <= checkpoint_seq
                && (stats.live_records == 0 || stats.max_expires_ms <= now_ms)
        })
        .collect()
}

/// Whether an erasure through `through` is done: no segment up to it is left.
pub(crate) fn erased(segments: &Segments, through: u32) -> bool {
    segments.sealed_ids().all(|id| id > through)
}
