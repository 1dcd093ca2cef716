//! One shard's store: the [`Shard`] type, composed of owned parts that each keep their
//! own state in their own module.
//!
//! The shard is split the quinn way. [`Shard`] is plain owned state with synchronous
//! methods: appends queue records into the pending batch and update the in-memory
//! index at once; nothing here awaits. [`ShardHandle`](crate::ShardHandle)
//! (`engine/src/handle.rs`) wraps it in `Rc<RefCell<_>>` and owns the I/O: its `commit`
//! takes the pending batch out (a short borrow), writes and syncs it with no borrow held
//! — so appends keep arriving meanwhile and form the next batch by themselves — then
//! marks it durable. That is group commit with no timer: an idle shard commits one
//! record at once, a busy one commits whatever accumulated during the previous sync.
//!
//! The parts, leaves first:
//! - `loc.rs`: [`Loc`] and [`DeviceAddr`], the terms every part speaks in;
//! - `config.rs`: [`ShardConfig`] and [`ShardCounters`];
//! - `durable.rs`: the durable watermark and the [`Durable`] future;
//! - `ids.rs`: server message ids; `dedup.rs`: the send dedup window;
//! - `segments.rs`: the log as readers see it, with per-segment accounting;
//! - `index.rs`: the mailboxes (per-device queues of [`Loc`]s) and shared references;
//! - `log.rs`: the write side, pending batches and group commit;
//! - `reclaim.rs`: which segments to compact and which to delete;
//! - `checkpoint.rs`: checkpoints capture and restore the parts, never the `Shard`;
//! - `recovery.rs`: builds the parts from a checkpoint and the log, and
//!   [`Shard::from_parts`] takes them over.
//!
//! No part names anything defined in this file (this file uses them, never the reverse),
//! so shared types live in the leaves and the module graph is acyclic. Above the shard,
//! in `engine/src/`, the handle (`handle.rs`) drives the I/O.
//!
//! Visibility: index entries point into the log by [`Loc`]; a mailbox read stops at the
//! first entry at or past the durable end, so nothing is served before it is on disk.

pub mod checkpoint;
pub(crate) mod config;
pub(crate) mod dedup;
pub(crate) mod durable;
pub(crate) mod ids;
pub(crate) mod index;
pub(crate) mod loc;
pub(crate) mod log;
mod reclaim;
pub(crate) mod recovery;
pub(crate) mod segments;

use std::collections::BTreeMap;

use tern_wire::messages::{DeviceId, SignedPrekey, UserId};
use tern_wire::{encode_archive, EnvelopeRef};

use self::checkpoint::{CapturedParts, Snapshot};
use self::config::{ShardConfig, ShardCounters};
use self::dedup::Dedup;
use self::durable::Durable;
use self::ids::MessageIds;
use self::index::{Index, MailboxRead, SenderShare};
use self::loc::{DeviceAddr, Loc};
use self::log::{CommitJob, CommitOutcome, CommitStep, Log};
use self::reclaim::Compaction;
use self::recovery::RecoveredParts;
use self::segments::{SegmentStats, Segments};
use crate::body::{AckRecord, EnvelopeRecordRef, MailboxSlot, RemoveRecord, StateOp};
use crate::error::{CorruptRecord, WriteError};
use crate::record::RecordType;
use crate::state::StateTables;
use crate::storage::Storage;

/// The result of appending an envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The record's sequence number: durable once [`Shard::durable_seq`] reaches it.
    pub record_seq: u64,
    /// The mailbox sequence number the envelope got in each recipient's mailbox.
    pub mailbox_seqs: Vec<u64>,
}

/// The in-memory state of one shard (see the module docs for the split).
pub struct Shard<S: Storage> {
    config: ShardConfig,
    /// The write side: pending batches, sequence numbers, group commit.
    log: Log<S>,
    /// The read side of the log, with per-segment accounting.
    segments: Segments,
    index: Index,
    dedup: Dedup,
    message_ids: MessageIds,
    state: StateTables,
    /// The sequence number the newest checkpoint covers.
    checkpoint_seq: u64,
    /// Set when an account was deleted: every segment up to this one holds records that
    /// must leave the disk (the account's phone number, devices, profile). The next
    /// reclaim seals the active segment, rewrites every live envelope of these segments
    /// at the head, checkpoints and deletes them.
    erase_through_segment: Option<u32>,
    counters: ShardCounters,
    quarantined: Vec<CorruptRecord>,
    /// Scratch for envelope archives, reused to avoid an allocation per append.
    envelope_scratch: Vec<u8>,
    /// Scratch for mailbox slots, reused likewise.
    slots_scratch: Vec<MailboxSlot>,
}

impl<S: Storage> std::fmt::Debug for Shard<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("shard_id", &self.config.shard_id)
            .field("active_segment", &self.segments.active_id())
            .field("next_record_seq", &self.log.next_record_seq())
            .field("durable_seq", &self.log.durable_seq())
            .finish_non_exhaustive()
    }
}

impl<S: Storage> Shard<S> {
    // -----------------------------------------------------------------------------------
    // Appends (synchronous: they queue into the pending batch)
    // -----------------------------------------------------------------------------------

    /// Allocates a server message id: shard id in the top 16 bits, then milliseconds
    /// since 2024 shifted left by 8, bumped to stay strictly increasing (so ids are unique
    /// per shard across restarts as long as the clock does not run backwards past the
    /// last id recovered from the log).
    pub fn allocate_message_id(&mut self, now_ms: u64) -> u64 {
        self.message_ids.allocate(now_ms)
    }

    /// The conversation sequence number the next envelope from `sender` to `device`'s
    /// mailbox should carry (1 for the first). Lay the envelope out with it, then append.
    pub fn next_conversation_seq(&self, device: DeviceAddr, sender: UserId) -> u64 {
        self.index.next_conversation_seq(device, sender)
    }

    /// The server message id of an earlier send with this key, if it is remembered.
    pub fn lookup_send(
        &self,
        sender_user: UserId,
        sender_device: DeviceId,
        client_message_id: u64,
    ) -> Option<u64> {
        self.dedup.lookup((sender_user, sender_device, client_message_id))
    }

    /// The server message id of a send noted with [`Shard::note_send`], if remembered.
    pub fn lookup_noted_send(
        &self,
        sender_user: UserId,
        sender_device: DeviceId,
        client_message_id: u64,
    ) -> Option<u64> {
        self.dedup.lookup_noted((sender_user, sender_device, client_message_id))
    }

    /// Appends an envelope to the mailboxes of `recipients` (one record, however many
    /// recipients: the ciphertext is stored once). The envelope's bytes are laid out
    /// here, once; reads hand out exactly these bytes.
    pub fn append_envelope(
        &mut self,
        envelope: &EnvelopeRef<'_>,
        recipients: &[DeviceAddr],
    ) -> Result<Appended, WriteError> {
        if recipients.is_empty() {
            return Err(WriteError::NoRecipients);
        }
        let mut slots = std::mem::take(&mut self.slots_scratch);
        slots.clear();
        slots.extend(recipients.iter().map(|&(user_id, device_id)| MailboxSlot {
            user_id,
            device_id,
            mailbox_seq: self.index.next_seq((user_id, device_id)),
        }));
        let mut envelope_bytes = std::mem::take(&mut self.envelope_scratch);
        envelope_bytes.clear();
        encode_archive(&mut envelope_bytes, envelope).expect("an envelope always archives");
        let record = EnvelopeRecordRef { slots: &slots, envelope: &envelope_bytes };
        let result = self.log.append(&mut self.segments, RecordType::Envelope, 0, |out| {
            encode_archive(out, &record).map(|_| ()).map_err(|_| WriteError::NoRecipients)
        });
        self.envelope_scratch = envelope_bytes;
        let appended = result.map(|(record_seq, loc, record_bytes)| {
            self.index_envelope(&slots, loc, record_bytes, envelope, record_seq);
            Appended { record_seq, mailbox_seqs: slots.iter().map(|s| s.mailbox_seq).collect() }
        });
        self.slots_scratch = slots;
        appended
    }

    /// Indexes an appended envelope; a new send enters the dedup window (as at replay).
    fn index_envelope(
        &mut self,
        slots: &[MailboxSlot],
        loc: Loc,
        record_bytes: u64,
        envelope: &EnvelopeRef<'_>,
        record_seq: u64,
    ) {
        let segments = &mut self.segments;
        let indexed =
            self.index.add_envelope(segments, slots, loc, record_bytes, envelope, record_seq);
        self.counters.corrupt_records += indexed.corrupt_slots;
        if indexed.stored {
            self.message_ids.observe(envelope.server_message_id);
            self.dedup.remember_envelope(envelope);
        }
    }

    /// Acknowledges a device's mailbox up to and including `up_to_mailbox_seq` (clamped
    /// to what has been durable, i.e. could have been delivered). Returns how many
    /// entries were released.
    pub fn ack(&mut self, device: DeviceAddr, up_to_mailbox_seq: u64) -> Result<u64, WriteError> {
        let Some(up_to) = self.index.ack_limit(device, up_to_mailbox_seq, &self.segments) else {
            return Ok(0);
        };
        let record = AckRecord { user_id: device.0, device_id: device.1, up_to_mailbox_seq: up_to };
        self.log.append(&mut self.segments, RecordType::Ack, 0, |out| {
            encode_archive(out, &record).map(|_| ()).map_err(|_| WriteError::NoRecipients)
        })?;
        Ok(self.index.ack(&mut self.segments, device, up_to))
    }

    /// Finds the queued envelope `server_message_id` from `sender_user` in a device's
    /// mailbox (durable entries only); returns its mailbox sequence number.
    pub fn find_queued(
        &self,
        device: DeviceAddr,
        sender_user: UserId,
        server_message_id: u64,
    ) -> Option<u64> {
        self.index.find_queued(&self.segments, device, sender_user, server_message_id)
    }

    /// Removes one queued envelope from a device's mailbox before delivery (deleted for
    /// everyone). Returns the record's sequence number (durable once committed), or
    /// `None` if there was nothing to remove.
    pub fn remove_queued(
        &mut self,
        device: DeviceAddr,
        mailbox_seq: u64,
    ) -> Result<Option<u64>, WriteError> {
        if !self.index.holds(device, mailbox_seq) {
            return Ok(None);
        }
        let record = RemoveRecord { user_id: device.0, device_id: device.1, mailbox_seq };
        let (seq, _, _) = self.log.append(&mut self.segments, RecordType::Remove, 0, |out| {
            encode_archive(out, &record).map(|_| ()).map_err(|_| WriteError::NoRecipients)
        })?;
        self.index.remove(&mut self.segments, device, mailbox_seq);
        Ok(Some(seq))
    }

    /// Appends a change to the state tables and applies it at once (later reads see it;
    /// it is durable when the returned sequence number is).
    pub fn apply_state(&mut self, op: StateOp) -> Result<u64, WriteError> {
        let (seq, _, _) = self.log.append(&mut self.segments, RecordType::State, 0, |out| {
            encode_archive(out, &op).map(|_| ()).map_err(|_| WriteError::NoRecipients)
        })?;
        self.state.apply(&op);
        self.after_state_op(&op);
        Ok(seq)
    }

    /// Remembers a send whose envelopes live in other shards (a group message on its
    /// group's shard), durably: a retry with the same key finds `server_message_id` with
    /// [`Shard::lookup_noted_send`], also after a crash. Returns the record's sequence
    /// number. Kept apart from the keys of envelopes stored here ([`Shard::lookup_send`]):
    /// the shard may also hold some recipients' copies.
    pub fn note_send(
        &mut self,
        sender: DeviceAddr,
        client_message_id: u64,
        server_message_id: u64,
        time_ms: u64,
    ) -> Result<u64, WriteError> {
        self.apply_state(StateOp::NoteSend {
            sender_user: sender.0,
            sender_device: sender.1,
            client_message_id,
            server_message_id,
            time_ms,
        })
    }

    /// What a live state op does besides the tables (replay does the same in
    /// `recovery.rs`, where a deleted account marks the segment holding its record).
    fn after_state_op(&mut self, op: &StateOp) {
        match *op {
            StateOp::DeleteAccount { .. } => self.schedule_erasure(),
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

    /// The write error that makes this shard refuse writes, if any: after a failed
    /// write or `fdatasync`, for good (only reopening the shard clears it); after a full
    /// disk ([`WriteError::StorageFull`]), until a commit writes the stalled batches
    /// (see [`Shard::write_stalled`]).
    pub fn write_error(&self) -> Option<&WriteError> {
        self.log.write_error()
    }

    /// Whether a commit found the disk full: its batches are kept (nothing in them is
    /// durable or acknowledged), appends are refused with `StorageFull`, and the next
    /// [`ShardHandle::commit`](crate::ShardHandle::commit) writes them again. Call it
    /// when space may be back (the server tries every second); it fails alike while
    /// the disk is still full. [`Shard::has_pending`] is false meanwhile, so a loop
    /// that commits while records are pending does not spin on a full disk.
    pub fn write_stalled(&self) -> bool {
        self.log.is_stalled()
    }

    /// Whether a deleted account's records still wait to be erased from disk (by the
    /// next [`ShardHandle::reclaim`](crate::ShardHandle::reclaim)).
    pub fn erasure_pending(&self) -> bool {
        self.erase_through_segment.is_some()
    }

    /// Marks every segment written so far for erasure at the next reclaim.
    fn schedule_erasure(&mut self) {
        let (segment_id, _) = self.log.write_head();
        self.erase_through_segment =
            Some(self.erase_through_segment.map_or(segment_id, |s| s.max(segment_id)));
    }

    /// Takes the oldest one-time prekey of a device out of its stock, for good. Hand it
    /// out only once the returned sequence number is durable: then it is handed out at
    /// most once even across a crash. `None` when the stock is empty (use the fallback).
    pub fn claim_one_time_key(
        &mut self,
        user_id: UserId,
        device_id: DeviceId,
    ) -> Result<Option<(SignedPrekey, u64)>, WriteError> {
        let Some(key) =
            self.state.device(user_id, device_id).and_then(|d| d.one_time_keys.first()).cloned()
        else {
            return Ok(None);
        };
        let seq =
            self.apply_state(StateOp::ClaimOneTimeKey { user_id, device_id, key_id: key.key_id })?;
        Ok(Some((key, seq)))
    }

    // -----------------------------------------------------------------------------------
    // Reads
    // -----------------------------------------------------------------------------------

    /// Reads up to `limit` envelopes of a mailbox starting at `from_mailbox_seq`, in
    /// order, zero-copy (slices of the active segment's buffer or of an mmap). Only
    /// durable, unexpired, intact envelopes are returned; the others are reported.
    pub fn read_mailbox(
        &self,
        device: DeviceAddr,
        from_mailbox_seq: u64,
        limit: usize,
        now_ms: u64,
    ) -> MailboxRead<'_> {
        self.index.read(&self.segments, device, from_mailbox_seq, limit, now_ms)
    }

    /// Number of envelopes queued for a device (acked ones excluded).
    pub fn mailbox_len(&self, device: DeviceAddr) -> u64 {
        self.index.len(device)
    }

    /// The next mailbox sequence number of a device.
    pub fn mailbox_next_seq(&self, device: DeviceAddr) -> u64 {
        self.index.next_seq(device)
    }

    /// The mailbox sequence number of a device's oldest queued envelope.
    pub fn mailbox_head_seq(&self, device: DeviceAddr) -> u64 {
        self.index.head_seq(device)
    }

    /// Bytes of the records queued for a device (what its quota counts). Summed once
    /// after a restart from a checkpoint, then kept up to date.
    pub fn mailbox_bytes(&mut self, device: DeviceAddr) -> u64 {
        self.index.mailbox_bytes(&self.segments, device)
    }

    /// What `sender` has queued in a device's mailbox (for the per-sender share).
    pub fn mailbox_sender_share(&mut self, device: DeviceAddr, sender: UserId) -> SenderShare {
        self.index.sender_share(&self.segments, device, sender)
    }

    /// Devices with a non-empty mailbox and their backlog.
    pub fn mailbox_backlogs(&self) -> impl Iterator<Item = (DeviceAddr, u64)> + '_ {
        self.index.backlogs()
    }

    /// The state tables (read-only; change them with [`Shard::apply_state`]).
    pub fn state(&self) -> &StateTables {
        &self.state
    }

    /// Damaged records found at recovery (never served).
    pub fn quarantined(&self) -> &[CorruptRecord] {
        &self.quarantined
    }

    /// Counters for metrics.
    pub fn counters(&self) -> &ShardCounters {
        &self.counters
    }

    /// Per-segment accounting.
    pub fn segment_stats(&self) -> &BTreeMap<u32, SegmentStats> {
        self.segments.stats()
    }

    /// Whether records wait for a commit.
    pub fn has_pending(&self) -> bool {
        self.log.has_pending()
    }

    /// Whether a pending record is awaited by someone (anything but a mailbox `Ack`,
    /// which rides with the next commit): a server commits these at once, and the rest
    /// within its lazy-flush bound.
    pub fn needs_commit(&self) -> bool {
        self.log.needs_commit()
    }

    /// The sequence number of the last record appended (durable or not).
    pub fn appended_seq(&self) -> u64 {
        self.log.next_record_seq() - 1
    }

    /// The highest durable record sequence number.
    pub fn durable_seq(&self) -> u64 {
        self.log.durable_seq()
    }

    /// Resolves once `record_seq` is durable, or with the error that prevents it.
    pub fn durable(&self, record_seq: u64) -> Durable {
        self.log.durable(record_seq)
    }

    /// Index memory for queued envelopes, in bytes (a benchmark divides by the count).
    pub fn index_bytes(&self) -> usize {
        self.index.memory_bytes()
    }
}

// What the handle (`engine/src/handle.rs`) drives: building the shard, and the synchronous halves
// of commit, checkpoint and reclaim.
impl<S: Storage> Shard<S> {
    /// Takes over the parts recovery rebuilt.
    pub(crate) fn from_parts(parts: RecoveredParts<S>, config: ShardConfig) -> Shard<S> {
        let batch_start = (parts.segments.active_id(), parts.segments.active_len());
        let log = Log::new(
            parts.storage,
            &config,
            parts.alignment,
            (parts.active_file, parts.active_capacity),
            batch_start,
            parts.next_record_seq,
        );
        Shard {
            config,
            log,
            segments: parts.segments,
            index: parts.index,
            dedup: parts.dedup,
            message_ids: parts.message_ids,
            state: parts.state,
            checkpoint_seq: parts.checkpoint_seq,
            erase_through_segment: parts.erase_through_segment,
            counters: parts.counters,
            quarantined: parts.quarantined,
            envelope_scratch: Vec::new(),
            slots_scratch: Vec::new(),
        }
    }

    /// The storage holding the shard's files.
    pub(crate) fn storage(&self) -> &S {
        self.log.storage()
    }

    /// The next step of a commit (see [`Log::next_commit_step`]).
    pub(crate) fn next_commit_step(&mut self) -> Result<CommitStep<S>, WriteError> {
        self.log.next_commit_step(&mut self.segments)
    }

    /// Ends a commit whose job ran (see [`Log::finish_commit`]).
    pub(crate) fn finish_commit(
        &mut self,
        job: CommitJob<S>,
        outcome: CommitOutcome<S::File>,
    ) -> Result<u64, WriteError> {
        self.log.finish_commit(&mut self.segments, &mut self.counters, job, outcome)
    }

    /// The bytes of a checkpoint of the shard as it is (nothing may be pending), and the
    /// sequence number it covers.
    pub(crate) fn encode_checkpoint(&self) -> (Vec<u8>, u64) {
        debug_assert!(!self.log.has_pending());
        let snapshot = Snapshot::capture(CapturedParts {
            index: &self.index,
            segment_stats: self.segments.stats(),
            state: &self.state,
            dedup: &self.dedup,
            last_message_id: self.message_ids.last(),
            next_record_seq: self.log.next_record_seq(),
        });
        (checkpoint::encode(&snapshot, self.config.shard_id), self.durable_seq())
    }

    /// A checkpoint covering `covered_seq` is durable.
    pub(crate) fn checkpointed(&mut self, covered_seq: u64) {
        self.checkpoint_seq = covered_seq;
    }

    /// The segment an erasure must reach, if one is pending.
    pub(crate) fn erase_through_segment(&self) -> Option<u32> {
        self.erase_through_segment
    }

    /// Starts a new segment at the next commit if the active one is among those to erase
    /// (so it is sealed, and compacted like the others).
    pub(crate) fn seal_for_erasure(&mut self, through: u32) {
        if self.log.write_head().0 <= through {
            self.log.open_next_segment_batch(&mut self.segments);
        }
    }

    /// Compacts (see `reclaim.rs`), then drops expired mailbox heads; returns how many
    /// records compaction rewrote.
    pub(crate) fn compact_and_expire(
        &mut self,
        now_ms: u64,
        erase_through: Option<u32>,
    ) -> Result<u64, WriteError> {
        let compaction = Compaction {
            live_percent_max: self.config.compact_live_percent_max,
            now_ms,
            erase_through,
        };
        let compacted =
            reclaim::compact(&mut self.log, &mut self.segments, &mut self.index, compaction)?;
        self.counters.records_compacted += compacted;
        self.counters.expired_entries += self.index.drop_expired(&mut self.segments, now_ms);
        Ok(compacted)
    }

    /// Whether something happened since the newest checkpoint.
    pub(crate) fn checkpoint_stale(&self) -> bool {
        self.checkpoint_seq < self.durable_seq() || self.has_pending()
    }

    /// Sealed segments the newest checkpoint lets go (see `reclaim.rs`).
    pub(crate) fn reclaimable_segments(&self, now_ms: u64) -> Vec<u32> {
        reclaim::reclaimable(&self.segments, self.checkpoint_seq, now_ms)
    }

    /// The files of `segment_ids` were deleted (and the directory synced).
    pub(crate) fn forget_segments(&mut self, segment_ids: &[u32]) {
        for segment_id in segment_ids {
            self.segments.forget(*segment_id);
        }
        self.counters.segments_deleted += segment_ids.len() as u64;
    }

    /// Ends an erasure through `through` if no segment up to it is left (and no newer
    /// deletion moved the target meanwhile).
    pub(crate) fn finish_erasure(&mut self, through: u32) {
        if reclaim::erased(&self.segments, through) && self.erase_through_segment == Some(through) {
            self.erase_through_segment = None;
        }
    }
}
