//! One shard's store: the segment log with group commit, the mailbox index, the state
//! tables, the dedup window, and their recovery.
//!
//! The shard is split the quinn way. [`Shard`] is plain owned state with synchronous
//! methods: appends queue records into the pending batch and update the in-memory
//! index at once; nothing here awaits. [`ShardHandle`] wraps it in `Rc<RefCell<_>>` and
//! owns the I/O: [`ShardHandle::commit`] takes the pending batch out (a short borrow),
//! writes and syncs it with no borrow held — so appends keep arriving meanwhile and form
//! the next batch by themselves — then marks it durable. That is group commit with no
//! timer: an idle shard commits one record at once, a busy one commits whatever
//! accumulated during the previous sync.
//!
//! Visibility: index entries point into the log by [`Loc`]; a mailbox read stops at the
//! first entry at or past the durable end, so nothing is served before it is on disk.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};

/// Hash maps keyed partly by client-chosen ids: foldhash is fast and randomly seeded
/// per process, so a client cannot aim for collisions.
pub(crate) type HashMap<K, V> = foldhash::HashMap<K, V>;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use rkyv::rancor::Failure;
use tern_wire::messages::{ArchivedEnvelope, DeviceId, SignedPrekey, UserId};
use tern_wire::{encode_archive, EnvelopeRef};

use crate::body::{
    AckRecord, ArchivedEnvelopeRecord, CommitRecord, EnvelopeRecordRef, MailboxSlot, RemoveRecord,
    StateOp,
};
use crate::checkpoint::{self, Snapshot};
use crate::error::{CorruptRecord, OpenError, WriteError};
use crate::record::{
    align_up, append_record, check_record, first_record_offset, parse_segment_file_name,
    record_body_of_checked_bytes, scan_segment, segment_file_name, RecordFault, RecordType,
    SegmentHeader, FLAG_MOVED, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES,
};
use crate::state::StateTables;
use crate::storage::{Mapped, Storage, StorageFile};

/// A device's mailbox address.
pub type DeviceAddr = (UserId, DeviceId);

/// Where a record is: segment id and offset of its header. Ordered by log position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Loc {
    /// The segment (ids fit 32 bits: 4 billion segments).
    pub segment_id: u32,
    /// Offset of the record header in the segment.
    pub offset: u32,
}

impl Loc {
    /// A mailbox entry whose record was lost to corruption before a checkpoint covered
    /// it; reads skip it and count it.
    pub const LOST: Loc = Loc { segment_id: u32::MAX, offset: u32::MAX };
    /// A mailbox entry removed before delivery (deleted for everyone); reads skip it
    /// silently.
    pub const REMOVED: Loc = Loc { segment_id: u32::MAX, offset: u32::MAX - 1 };
}

/// Set in the device id of a dedup key noted by [`Shard::note_send`] (device ids are
/// small), so it never matches a stored envelope's key; kept as such in checkpoints.
const NOTED_SEND: DeviceId = 1 << 31;

/// Tunables of a shard. Each limit says why it is what it is.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// The shard's id (also the top 16 bits of its message ids).
    pub shard_id: u32,
    /// Segment file size. 32 MiB: large enough that rotation (a file create and a
    /// directory sync) is rare, small enough that one mostly-dead segment is cheap to
    /// compact and the active segment's in-memory copy stays small.
    pub segment_bytes: u64,
    /// Undelivered envelopes are dropped after this (30 days).
    pub default_ttl_ms: u64,
    /// How long a (sender device, client message id) pair is remembered (24 hours: a
    /// client retries within minutes; a day covers a phone offline overnight).
    pub dedup_window_ms: u64,
    /// At most this many remembered pairs (bounds memory whatever the send rate).
    pub dedup_entries_max: usize,
    /// A sealed segment whose live bytes fall below this percentage of its size is
    /// compacted (live records rewritten at the head).
    pub compact_live_percent_max: u8,
}

impl ShardConfig {
    /// Defaults for shard `shard_id`.
    pub fn new(shard_id: u32) -> ShardConfig {
        ShardConfig {
            shard_id,
            segment_bytes: 32 * 1024 * 1024,
            default_ttl_ms: 30 * 24 * 3600 * 1000,
            dedup_window_ms: 24 * 3600 * 1000,
            dedup_entries_max: 1 << 20,
            compact_live_percent_max: 25,
        }
    }
}

/// Counters an operator reads (exported as metrics by the edge).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardCounters {
    /// Batches written and synced.
    pub commits: u64,
    /// Records in those batches.
    pub committed_records: u64,
    /// Bytes written by commits (with padding).
    pub committed_bytes: u64,
    /// Records found corrupt (at recovery or on read) and quarantined.
    pub corrupt_records: u64,
    /// Torn tails truncated at recovery.
    pub torn_tails: u64,
    /// Segments deleted by space reclaim.
    pub segments_deleted: u64,
    /// Live records rewritten by compaction.
    pub records_compacted: u64,
    /// Mailbox entries dropped because their envelope expired.
    pub expired_entries: u64,
}

/// The result of appending an envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The record's sequence number: durable once [`ShardHandle::durable_seq`] reaches it.
    pub record_seq: u64,
    /// The mailbox sequence number the envelope got in each recipient's mailbox.
    pub mailbox_seqs: Vec<u64>,
}

/// One envelope read from a mailbox: its sequence number and the stored bytes.
#[derive(Clone, Copy, Debug)]
pub struct MailboxEntry<'a> {
    /// Position in the mailbox.
    pub mailbox_seq: u64,
    /// The `Envelope` archive, exactly as stored: frame it with `encode_deliver`.
    pub envelope: &'a [u8],
}

/// What a mailbox read found.
#[derive(Debug, Default)]
pub struct MailboxRead<'a> {
    /// Envelopes in order.
    pub entries: Vec<MailboxEntry<'a>>,
    /// Entries skipped because their record is corrupt or lost (reported, not served).
    pub corrupt: Vec<CorruptRecord>,
    /// Entries skipped because their envelope expired.
    pub expired: u64,
    /// The mailbox sequence number after the last entry examined: where the next read
    /// should start (expired and corrupt entries included, so a reader never stalls on
    /// them).
    pub next_seq: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Mailbox {
    /// Sequence number of `entries[0]`.
    head_seq: u64,
    entries: VecDeque<Loc>,
    /// Record bytes of the entries (for quotas), unless `bytes_unknown`.
    bytes: u64,
    /// Set for mailboxes restored from a checkpoint (which does not store sizes): the
    /// first [`Shard::mailbox_bytes`] sums them, so recovery does not pay for it.
    bytes_unknown: bool,
}

impl Mailbox {
    fn next_seq(&self) -> u64 {
        self.head_seq + self.entries.len() as u64
    }
}

/// What a checkpoint captures, borrowed from a shard with nothing pending.
pub(crate) struct SnapshotParts<'a> {
    pub(crate) mailboxes: &'a HashMap<DeviceAddr, Mailbox>,
    pub(crate) shared_refs: &'a HashMap<Loc, u32>,
    pub(crate) stats: &'a BTreeMap<u32, SegmentStats>,
    pub(crate) state: &'a StateTables,
    pub(crate) dedup: &'a HashMap<(UserId, DeviceId, u64), (u64, u64)>,
    pub(crate) conversation_seqs: &'a HashMap<(UserId, DeviceId, UserId), u64>,
    pub(crate) last_message_id: u64,
    pub(crate) next_record_seq: u64,
}

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

struct SealedSegment {
    map: Mapped,
}

struct ActiveSegment<F> {
    segment_id: u32,
    file: Rc<F>,
    /// The segment's bytes from 0 to its committed end (reads of the active segment).
    buffer: Vec<u8>,
}

#[derive(Debug)]
struct PendingBatch {
    segment_id: u32,
    start_offset: u64,
    bytes: Vec<u8>,
    first_seq: u64,
    records: u32,
    new_segment: bool,
}

/// Committed batch buffers kept for reuse: two cover a commit in flight plus the batch
/// forming behind it.
const SPARE_BUFFERS_MAX: usize = 2;

/// Space reserved at the end of a batch for its `Commit` record.
const COMMIT_RESERVE_BYTES: u64 = 64;

/// Durability notifications: the watermark and the tasks waiting for it.
#[derive(Default)]
struct Notifier {
    durable_seq: Cell<u64>,
    failed: Cell<Option<WriteError>>,
    waiters: RefCell<Vec<Waker>>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").field("durable_seq", &self.durable_seq.get()).finish()
    }
}

impl Notifier {
    fn wake_all(&self) {
        for waker in self.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }
}

/// Resolves when a record is durable (or the shard failed).
#[derive(Debug)]
pub struct Durable {
    notifier: Rc<Notifier>,
    record_seq: u64,
}

impl Future for Durable {
    type Output = Result<(), WriteError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.notifier.durable_seq.get() >= self.record_seq {
            return Poll::Ready(Ok(()));
        }
        if let Some(error) = self.notifier.failed.take() {
            self.notifier.failed.set(Some(error.clone()));
            return Poll::Ready(Err(error));
        }
        self.notifier.waiters.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}

/// The in-memory state of one shard (see the module docs for the split).
pub struct Shard<S: Storage> {
    storage: S,
    config: ShardConfig,
    alignment: u32,
    sealed: BTreeMap<u32, SealedSegment>,
    stats: BTreeMap<u32, SegmentStats>,
    active: ActiveSegment<S::File>,
    /// Batches being formed, in log order (two when a batch had to open a new segment).
    pending: Vec<PendingBatch>,
    /// Where the next batch starts when `pending` is empty.
    next_batch_start: (u32, u64),
    commit_in_flight: bool,
    /// The last record of the commit in flight.
    in_flight_last_seq: u64,
    next_record_seq: u64,
    /// End of the durable log: entries at or past it are not served.
    durable_end: Loc,
    poisoned: Option<WriteError>,
    notifier: Rc<Notifier>,
    mailboxes: HashMap<DeviceAddr, Mailbox>,
    /// Remaining references of envelope records that are in more than one mailbox.
    shared_refs: HashMap<Loc, u32>,
    state: StateTables,
    dedup: HashMap<(UserId, DeviceId, u64), (u64, u64)>,
    dedup_order: VecDeque<(u64, (UserId, DeviceId, u64))>,
    /// Last conversation sequence number per (mailbox owner, sender): each device sees
    /// every sender's messages numbered 1, 2, 3... and can spot a gap.
    conversation_seqs: HashMap<(UserId, DeviceId, UserId), u64>,
    last_message_id: u64,
    checkpoint_seq: u64,
    /// Set when an account was deleted: every segment up to this one holds records that
    /// must leave the disk (the account's phone number, devices, profile). The next
    /// reclaim seals the active segment, rewrites every live envelope of these segments
    /// at the head, checkpoints and deletes them.
    erase_through_segment: Option<u32>,
    scratch: Vec<u8>,
    counters: ShardCounters,
    quarantined: Vec<CorruptRecord>,
    /// Scratch for mailbox slots (appends and replay), reused to avoid an allocation per
    /// record.
    replay_slots: Vec<MailboxSlot>,
    /// Mailbox entries replay may still mark lost. A gap in a mailbox's sequence numbers
    /// stands for envelope records that could not be read, each at least a record header
    /// long, so recovery sets this to the log's bytes over the header size; a record
    /// claiming a longer gap is corrupt. Without the bound, one record with a huge mailbox
    /// sequence number made replay fill memory with lost entries (found by fuzzing).
    /// Zero outside recovery: live appends never leave gaps.
    replay_gap_budget: u64,
    /// Scratch for record bodies, reused likewise.
    body_scratch: Vec<u8>,
    /// Batch buffers of committed batches, reused for the next ones.
    spare_buffers: Vec<Vec<u8>>,
}

impl<S: Storage> std::fmt::Debug for Shard<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("shard_id", &self.config.shard_id)
            .field("active_segment", &self.active.segment_id)
            .field("next_record_seq", &self.next_record_seq)
            .field("durable_seq", &self.notifier.durable_seq.get())
            .finish_non_exhaustive()
    }
}

/// Milliseconds of the message-id epoch (2024-01-01T00:00:00Z).
const MESSAGE_ID_EPOCH_MS: u64 = 1_704_067_200_000;

/// Mailbox sequence numbers count a device's envelopes from 0, so a real one stays far
/// below 2^62 (a million a second for 140,000 years). A stored one at or above it is
/// corrupt: sequence arithmetic (`head + entries`, `seq + 1`) must never overflow.
const MAILBOX_SEQ_MAX: u64 = 1 << 62;

impl<S: Storage> Shard<S> {
    // -----------------------------------------------------------------------------------
    // Appends (synchronous: they queue into the pending batch)
    // -----------------------------------------------------------------------------------

    /// Allocates a server message id: shard id in the top 16 bits, then milliseconds
    /// since 2024 shifted left by 8, bumped to stay strictly increasing (so ids are unique
    /// per shard across restarts as long as the clock does not run backwards past the
    /// last id recovered from the log).
    pub fn allocate_message_id(&mut self, now_ms: u64) -> u64 {
        let time_part = (now_ms.saturating_sub(MESSAGE_ID_EPOCH_MS) << 8) & ((1 << 48) - 1);
        let low = time_part.max((self.last_message_id & ((1 << 48) - 1)) + 1);
        self.last_message_id = (u64::from(self.config.shard_id) << 48) | low;
        self.last_message_id
    }

    /// The conversation sequence number the next envelope from `sender` to `device`'s
    /// mailbox should carry (1 for the first). Lay the envelope out with it, then append.
    pub fn next_conversation_seq(&self, device: DeviceAddr, sender: UserId) -> u64 {
        self.conversation_seqs.get(&(device.0, device.1, sender)).map_or(1, |last| last + 1)
    }

    /// The server message id of an earlier send with this key, if it is remembered.
    pub fn lookup_send(
        &self,
        sender_user: UserId,
        sender_device: DeviceId,
        client_message_id: u64,
    ) -> Option<u64> {
        self.dedup.get(&(sender_user, sender_device, client_message_id)).map(|(id, _)| *id)
    }

    /// The server message id of a send noted with [`Shard::note_send`], if remembered.
    pub fn lookup_noted_send(
        &self,
        sender_user: UserId,
        sender_device: DeviceId,
        client_message_id: u64,
    ) -> Option<u64> {
        let key = (sender_user, sender_device | NOTED_SEND, client_message_id);
        self.dedup.get(&key).map(|(id, _)| *id)
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
        let mut slots = std::mem::take(&mut self.replay_slots);
        slots.clear();
        slots.extend(recipients.iter().map(|&(user_id, device_id)| MailboxSlot {
            user_id,
            device_id,
            mailbox_seq: self.mailboxes.get(&(user_id, device_id)).map_or(0, Mailbox::next_seq),
        }));
        let mut envelope_bytes = std::mem::take(&mut self.scratch);
        envelope_bytes.clear();
        encode_archive(&mut envelope_bytes, envelope).expect("an envelope always archives");
        let record = EnvelopeRecordRef { slots: &slots, envelope: &envelope_bytes };
        let result = self.append(RecordType::Envelope, 0, |out| {
            encode_archive(out, &record).map(|_| ()).map_err(|_| WriteError::NoRecipients)
        });
        self.scratch = envelope_bytes;
        let appended = result.map(|(record_seq, loc, record_bytes)| {
            self.index_envelope(&slots, loc, record_bytes, envelope, record_seq);
            Appended { record_seq, mailbox_seqs: slots.iter().map(|s| s.mailbox_seq).collect() }
        });
        self.replay_slots = slots;
        appended
    }

    /// Acknowledges a device's mailbox up to and including `up_to_mailbox_seq` (clamped
    /// to what has been durable, i.e. could have been delivered). Returns how many
    /// entries were released.
    pub fn ack(&mut self, device: DeviceAddr, up_to_mailbox_seq: u64) -> Result<u64, WriteError> {
        let Some(mailbox) = self.mailboxes.get(&device) else { return Ok(0) };
        let durable_entries =
            mailbox.entries.iter().take_while(|loc| self.is_durable(**loc)).count() as u64;
        let limit = (mailbox.head_seq + durable_entries).min(up_to_mailbox_seq.saturating_add(1));
        if limit <= mailbox.head_seq {
            return Ok(0);
        }
        let up_to = limit - 1;
        let record = AckRecord { user_id: device.0, device_id: device.1, up_to_mailbox_seq: up_to };
        self.append(RecordType::Ack, 0, |out| {
            encode_archive(out, &record).map(|_| ()).map_err(|_| WriteError::NoRecipients)
        })?;
        Ok(self.apply_ack(device, up_to))
    }

    /// Finds the queued envelope `server_message_id` from `sender_user` in a device's
    /// mailbox (durable entries only); returns its mailbox sequence number.
    pub fn find_queued(
        &self,
        device: DeviceAddr,
        sender_user: UserId,
        server_message_id: u64,
    ) -> Option<u64> {
        let mailbox = self.mailboxes.get(&device)?;
        for (seq, loc) in (mailbox.head_seq..).zip(mailbox.entries.iter()) {
            if !self.is_durable(*loc) {
                break;
            }
            if *loc == Loc::LOST || *loc == Loc::REMOVED {
                continue;
            }
            let Ok((_, envelope)) = self.envelope_at(*loc) else { continue };
            if envelope.server_message_id.to_native() == server_message_id
                && envelope.sender_user.to_native() == sender_user
            {
                return Some(seq);
            }
        }
        None
    }

    /// Removes one queued envelope from a device's mailbox before delivery (deleted for
    /// everyone). Returns the record's sequence number (durable once committed), or
    /// `None` if there was nothing to remove.
    pub fn remove_queued(
        &mut self,
        device: DeviceAddr,
        mailbox_seq: u64,
    ) -> Result<Option<u64>, WriteError> {
        let present = self.mailboxes.get(&device).and_then(|m| {
            let index = mailbox_seq.checked_sub(m.head_seq)?;
            m.entries.get(index as usize).filter(|l| **l != Loc::LOST && **l != Loc::REMOVED)
        });
        if present.is_none() {
            return Ok(None);
        }
        let record = RemoveRecord { user_id: device.0, device_id: device.1, mailbox_seq };
        let (seq, _, _) = self.append(RecordType::Remove, 0, |out| {
            encode_archive(out, &record).map(|_| ()).map_err(|_| WriteError::NoRecipients)
        })?;
        self.apply_remove(device, mailbox_seq);
        Ok(Some(seq))
    }

    fn apply_remove(&mut self, device: DeviceAddr, mailbox_seq: u64) {
        let Some(mailbox) = self.mailboxes.get_mut(&device) else { return };
        let Some(index) = mailbox_seq.checked_sub(mailbox.head_seq) else { return };
        let Some(entry) = mailbox.entries.get_mut(index as usize) else { return };
        let loc = std::mem::replace(entry, Loc::REMOVED);
        if loc == Loc::LOST || loc == Loc::REMOVED {
            return;
        }
        let bytes = self.record_len(loc).unwrap_or(0);
        if let Some(mailbox) = self.mailboxes.get_mut(&device) {
            mailbox.bytes = mailbox.bytes.saturating_sub(bytes);
        }
        self.release(loc);
    }

    /// Appends a change to the state tables and applies it at once (later reads see it;
    /// it is durable when the returned sequence number is).
    pub fn apply_state(&mut self, op: StateOp) -> Result<u64, WriteError> {
        let (seq, _, _) = self.append(RecordType::State, 0, |out| {
            encode_archive(out, &op).map(|_| ()).map_err(|_| WriteError::NoRecipients)
        })?;
        self.state.apply(&op);
        self.after_state_op(&op, None);
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

    /// What a state op does besides the tables (live and at replay, where `segment` is
    /// the segment that holds it).
    fn after_state_op(&mut self, op: &StateOp, segment: Option<u32>) {
        match *op {
            StateOp::DeleteAccount { .. } => match segment {
                // A crash before the erasure finished: do it again.
                Some(segment) => self.erase_through_segment = Some(segment),
                None => self.schedule_erasure(),
            },
            StateOp::NoteSend {
                sender_user,
                sender_device,
                client_message_id,
                server_message_id,
                time_ms,
            } => {
                let key = (sender_user, sender_device | NOTED_SEND, client_message_id);
                self.remember_key(key, server_message_id, time_ms);
                if server_message_id >> 48 == u64::from(self.config.shard_id) {
                    self.last_message_id = self.last_message_id.max(server_message_id);
                }
            }
            _ => {}
        }
    }

    /// The write error that made this shard refuse every later write (a failed
    /// `fdatasync`, a full disk), if any: only reopening the shard clears it.
    pub fn write_error(&self) -> Option<&WriteError> {
        self.poisoned.as_ref()
    }

    /// Whether a deleted account's records still wait to be erased from disk (by the
    /// next [`ShardHandle::reclaim`]).
    pub fn erasure_pending(&self) -> bool {
        self.erase_through_segment.is_some()
    }

    /// Marks every segment written so far for erasure at the next reclaim.
    fn schedule_erasure(&mut self) {
        let (segment_id, _) = self.write_head();
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

    /// Appends one record to the pending batch; returns its sequence number, location and
    /// size.
    fn append(
        &mut self,
        record_type: RecordType,
        flags: u8,
        write_body: impl FnOnce(&mut Vec<u8>) -> Result<(), WriteError>,
    ) -> Result<(u64, Loc, u64), WriteError> {
        if let Some(error) = &self.poisoned {
            return Err(error.clone());
        }
        // Lay the record out straight at the end of the current batch: almost always it
        // fits, and then nothing is copied again.
        let seq = self.next_record_seq;
        let (segment_id, offset) = self.write_head();
        let usable = self.config.segment_bytes - SEGMENT_HEADER_BYTES as u64 - COMMIT_RESERVE_BYTES;
        let limit = usable - u64::from(self.alignment);
        let segment_bytes = self.config.segment_bytes;
        let mut body = std::mem::take(&mut self.body_scratch);
        let batch = self.pending_batch_at_head();
        let start = batch.bytes.len();
        let appended =
            append_record(&mut batch.bytes, record_type, flags, seq, segment_id, write_body);
        let header = match appended {
            Ok(header) => header,
            Err(error) => {
                self.body_scratch = body;
                self.drop_empty_batch();
                return Err(error);
            }
        };
        let record_bytes = header.record_bytes() as u64;
        if record_bytes > limit {
            batch.bytes.truncate(start);
            self.body_scratch = body;
            self.drop_empty_batch();
            return Err(WriteError::RecordTooLarge { record_bytes });
        }
        if offset + record_bytes + COMMIT_RESERVE_BYTES <= segment_bytes {
            batch.records += 1;
            self.next_record_seq += 1;
            self.body_scratch = body;
            return Ok((seq, Loc { segment_id, offset: offset as u32 }, record_bytes));
        }
        // It does not fit in this segment (once per segment): move it to the next one,
        // whose id goes into the record header.
        body.clear();
        body.extend_from_slice(&batch.bytes[start + RECORD_HEADER_BYTES..]);
        batch.bytes.truncate(start);
        self.drop_empty_batch();
        let result = self.place_record(record_type, flags, &body);
        self.body_scratch = body;
        result
    }

    /// Removes a pending batch that got no record (so no empty batch is closed).
    fn drop_empty_batch(&mut self) {
        if self
            .pending
            .last()
            .is_some_and(|b| b.records == 0 && !b.new_segment && b.bytes.is_empty())
        {
            let batch = self.pending.pop().expect("just checked");
            self.spare_buffers.push(batch.bytes);
        }
    }

    /// Copies a laid-out record body into the pending batch (opening the next segment
    /// when it does not fit).
    fn place_record(
        &mut self,
        record_type: RecordType,
        flags: u8,
        body: &[u8],
    ) -> Result<(u64, Loc, u64), WriteError> {
        let record_bytes = (RECORD_HEADER_BYTES + body.len()) as u64;
        let usable = self.config.segment_bytes - SEGMENT_HEADER_BYTES as u64 - COMMIT_RESERVE_BYTES;
        if record_bytes > usable - u64::from(self.alignment) {
            return Err(WriteError::RecordTooLarge { record_bytes });
        }

        let (segment_id, offset) = self.write_head();
        if offset + record_bytes + COMMIT_RESERVE_BYTES > self.config.segment_bytes {
            self.open_next_segment_batch();
        }
        let seq = self.next_record_seq;
        let (segment_id_now, offset) = self.write_head();
        debug_assert!(segment_id_now >= segment_id);
        let batch = self.pending_batch_at_head();
        let loc = Loc { segment_id: segment_id_now, offset: offset as u32 };
        append_record(&mut batch.bytes, record_type, flags, seq, segment_id_now, |out| {
            out.extend_from_slice(body);
            Ok::<(), WriteError>(())
        })?;
        batch.records += 1;
        self.next_record_seq += 1;
        Ok((seq, loc, record_bytes))
    }

    /// Where the next record goes: the end of the last pending batch, or the start of
    /// the next batch.
    fn write_head(&self) -> (u32, u64) {
        match self.pending.last() {
            Some(batch) => (batch.segment_id, batch.start_offset + batch.bytes.len() as u64),
            None => self.next_batch_start,
        }
    }

    fn pending_batch_at_head(&mut self) -> &mut PendingBatch {
        if self.pending.is_empty() {
            let (segment_id, start_offset) = self.next_batch_start;
            self.pending.push(PendingBatch {
                segment_id,
                start_offset,
                bytes: self.spare_buffers.pop().unwrap_or_default(),
                first_seq: self.next_record_seq,
                records: 0,
                new_segment: false,
            });
        }
        self.pending.last_mut().expect("just ensured")
    }

    /// Closes the current batch with its `Commit` record and starts one at the beginning
    /// of the next segment (whose header it carries).
    fn open_next_segment_batch(&mut self) {
        if !self.pending.is_empty() {
            self.close_last_batch();
        }
        let (segment_id, _) = self.write_head();
        let next_segment = segment_id + 1;
        let header = SegmentHeader {
            shard_id: self.config.shard_id,
            segment_id: u64::from(next_segment),
            first_record_seq: self.next_record_seq,
            commit_alignment: self.alignment,
        };
        let mut bytes = self.spare_buffers.pop().unwrap_or_default();
        bytes.extend_from_slice(&header.to_bytes());
        bytes.resize(first_record_offset(self.alignment) as usize, 0);
        self.pending.push(PendingBatch {
            segment_id: next_segment,
            start_offset: 0,
            bytes,
            first_seq: self.next_record_seq,
            records: 0,
            new_segment: true,
        });
        self.stats.entry(next_segment).or_default();
    }

    /// Appends the `Commit` record to the last pending batch and pads it to alignment.
    fn close_last_batch(&mut self) {
        let seq = self.next_record_seq;
        let alignment = self.alignment;
        let batch = self.pending.last_mut().expect("a batch to close");
        let commit =
            CommitRecord { batch_first_seq: batch.first_seq, batch_records: batch.records + 1 };
        let segment_id = batch.segment_id;
        append_record(&mut batch.bytes, RecordType::Commit, 0, seq, segment_id, |out| {
            encode_archive(out, &commit).map(|_| ())
        })
        .expect("a commit record always archives");
        batch.records += 1;
        let end = batch.start_offset + batch.bytes.len() as u64;
        batch.bytes.resize((align_up(end, alignment) - batch.start_offset) as usize, 0);
        self.stats.entry(segment_id).or_default().last_record_seq = seq;
        self.next_record_seq += 1;
    }

    // -----------------------------------------------------------------------------------
    // Index maintenance (shared by live appends and replay)
    // -----------------------------------------------------------------------------------

    fn index_envelope(
        &mut self,
        slots: &[MailboxSlot],
        loc: Loc,
        record_bytes: u64,
        envelope: &EnvelopeRef<'_>,
        record_seq: u64,
    ) {
        let mut added = 0u32;
        for slot in slots {
            if slot.mailbox_seq >= MAILBOX_SEQ_MAX {
                self.counters.corrupt_records += 1;
                continue;
            }
            let mailbox = self.mailboxes.entry((slot.user_id, slot.device_id)).or_default();
            if slot.mailbox_seq < mailbox.next_seq() {
                continue; // Already indexed (replay over a checkpoint).
            }
            if mailbox.entries.is_empty() && mailbox.head_seq < slot.mailbox_seq {
                mailbox.head_seq = slot.mailbox_seq; // Earlier entries were all acked.
            }
            // A corrupt record left a gap: mark its entries lost, within the budget.
            let gap = slot.mailbox_seq - mailbox.next_seq();
            if gap > self.replay_gap_budget {
                self.counters.corrupt_records += 1;
                continue;
            }
            self.replay_gap_budget -= gap;
            for _ in 0..gap {
                mailbox.entries.push_back(Loc::LOST);
            }
            mailbox.entries.push_back(loc);
            mailbox.bytes += record_bytes;
            added += 1;
            if envelope.conversation_seq > 0 {
                let key = (slot.user_id, slot.device_id, envelope.sender_user);
                let last = self.conversation_seqs.entry(key).or_insert(0);
                *last = (*last).max(envelope.conversation_seq);
            }
        }
        if added == 0 {
            return;
        }
        if added > 1 {
            self.shared_refs.insert(loc, added);
        }
        let stats = self.stats.entry(loc.segment_id).or_default();
        stats.live_records += 1;
        stats.live_bytes += record_bytes;
        stats.max_expires_ms = stats.max_expires_ms.max(envelope.expires_ms);
        stats.last_record_seq = stats.last_record_seq.max(record_seq);
        self.remember_send(envelope);
    }

    fn remember_send(&mut self, envelope: &EnvelopeRef<'_>) {
        if envelope.server_message_id >> 48 == u64::from(self.config.shard_id) {
            self.last_message_id = self.last_message_id.max(envelope.server_message_id);
        }
        if envelope.client_message_id == 0 {
            return; // Server-generated envelopes have no client id.
        }
        let key = (envelope.sender_user, envelope.sender_device, envelope.client_message_id);
        self.remember_key(key, envelope.server_message_id, envelope.server_time_ms);
    }

    /// Enters a (sender user, sender device, client message id) key in the dedup window.
    fn remember_key(&mut self, key: (UserId, DeviceId, u64), server_message_id: u64, time_ms: u64) {
        if self.dedup.contains_key(&key) {
            return;
        }
        self.dedup.insert(key, (server_message_id, time_ms));
        self.dedup_order.push_back((time_ms, key));
        let horizon = time_ms.saturating_sub(self.config.dedup_window_ms);
        while let Some(&(time_ms, old)) = self.dedup_order.front() {
            if time_ms >= horizon && self.dedup_order.len() <= self.config.dedup_entries_max {
                break;
            }
            self.dedup_order.pop_front();
            self.dedup.remove(&old);
        }
    }

    fn apply_ack(&mut self, device: DeviceAddr, up_to: u64) -> u64 {
        let Some(mailbox) = self.mailboxes.get_mut(&device) else { return 0 };
        let mut released = Vec::new();
        while mailbox.head_seq <= up_to {
            let Some(loc) = mailbox.entries.pop_front() else {
                mailbox.head_seq = up_to + 1;
                break;
            };
            mailbox.head_seq += 1;
            released.push(loc);
        }
        let count = released.len() as u64;
        let released_bytes: u64 = released.iter().filter_map(|loc| self.record_len(*loc)).sum();
        if let Some(mailbox) = self.mailboxes.get_mut(&device) {
            mailbox.bytes = mailbox.bytes.saturating_sub(released_bytes);
        }
        for loc in released {
            self.release(loc);
        }
        count
    }

    /// Drops one reference to an envelope record; the last one makes it garbage.
    fn release(&mut self, loc: Loc) {
        if loc == Loc::LOST || loc == Loc::REMOVED {
            return;
        }
        if let Some(refs) = self.shared_refs.get_mut(&loc) {
            *refs -= 1;
            if *refs > 0 {
                return;
            }
            self.shared_refs.remove(&loc);
        }
        let record_bytes = self.record_len(loc).unwrap_or(0);
        if let Some(stats) = self.stats.get_mut(&loc.segment_id) {
            stats.live_records = stats.live_records.saturating_sub(1);
            stats.live_bytes = stats.live_bytes.saturating_sub(record_bytes);
        }
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
        let mut read = MailboxRead { next_seq: from_mailbox_seq, ..MailboxRead::default() };
        let Some(mailbox) = self.mailboxes.get(&device) else { return read };
        let skip = from_mailbox_seq.saturating_sub(mailbox.head_seq) as usize;
        let first_seq = mailbox.head_seq + skip as u64;
        read.next_seq = read.next_seq.max(first_seq);
        for (seq, loc) in (first_seq..).zip(mailbox.entries.iter().skip(skip)) {
            if read.entries.len() >= limit || !self.is_durable(*loc) {
                break;
            }
            read.next_seq = seq + 1;
            if *loc == Loc::REMOVED {
                continue;
            }
            match self.envelope_at(*loc) {
                Ok((bytes, envelope)) => {
                    if envelope.expires_ms.to_native() <= now_ms {
                        read.expired += 1;
                    } else {
                        read.entries.push(MailboxEntry { mailbox_seq: seq, envelope: bytes });
                    }
                }
                Err(corrupt) => {
                    read.corrupt.push(CorruptRecord { mailbox_seq: Some(seq), ..corrupt })
                }
            }
        }
        read
    }

    /// Number of envelopes queued for a device (acked ones excluded).
    pub fn mailbox_len(&self, device: DeviceAddr) -> u64 {
        self.mailboxes.get(&device).map_or(0, |m| m.entries.len() as u64)
    }

    /// The next mailbox sequence number of a device.
    pub fn mailbox_next_seq(&self, device: DeviceAddr) -> u64 {
        self.mailboxes.get(&device).map_or(0, Mailbox::next_seq)
    }

    /// The mailbox sequence number of a device's oldest queued envelope.
    pub fn mailbox_head_seq(&self, device: DeviceAddr) -> u64 {
        self.mailboxes.get(&device).map_or(0, |m| m.head_seq)
    }

    /// Bytes of the records queued for a device (what its quota counts). Summed once
    /// after a restart from a checkpoint, then kept up to date.
    pub fn mailbox_bytes(&mut self, device: DeviceAddr) -> u64 {
        let unknown = self.mailboxes.get(&device).is_some_and(|m| m.bytes_unknown);
        if unknown {
            let bytes = self.mailboxes[&device]
                .entries
                .iter()
                .filter_map(|loc| self.record_len(*loc))
                .sum();
            let mailbox = self.mailboxes.get_mut(&device).expect("checked above");
            mailbox.bytes = bytes;
            mailbox.bytes_unknown = false;
        }
        self.mailboxes.get(&device).map_or(0, |m| m.bytes)
    }

    /// Devices with a non-empty mailbox and their backlog.
    pub fn mailbox_backlogs(&self) -> impl Iterator<Item = (DeviceAddr, u64)> + '_ {
        self.mailboxes
            .iter()
            .filter(|(_, m)| !m.entries.is_empty())
            .map(|(a, m)| (*a, m.entries.len() as u64))
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
        &self.stats
    }

    /// Whether records wait for a commit.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The sequence number of the last record appended (durable or not).
    pub fn appended_seq(&self) -> u64 {
        self.next_record_seq - 1
    }

    /// The highest durable record sequence number.
    pub fn durable_seq(&self) -> u64 {
        self.notifier.durable_seq.get()
    }

    /// Resolves once `record_seq` is durable, or with the error that prevents it.
    pub fn durable(&self, record_seq: u64) -> Durable {
        Durable { notifier: self.notifier.clone(), record_seq }
    }

    /// Index memory for queued envelopes, in bytes (a benchmark divides by the count).
    pub fn index_bytes(&self) -> usize {
        let entry = std::mem::size_of::<Loc>();
        let per_mailbox = std::mem::size_of::<(DeviceAddr, Mailbox)>() + 8;
        self.mailboxes.values().map(|m| m.entries.capacity() * entry + per_mailbox).sum::<usize>()
            + self.shared_refs.capacity() * (std::mem::size_of::<(Loc, u32)>() + 1)
    }

    /// Whether a mailbox entry may be served: its record is on disk (or known lost).
    fn is_durable(&self, loc: Loc) -> bool {
        loc == Loc::LOST || loc == Loc::REMOVED || loc < self.durable_end
    }

    fn segment_bytes(&self, segment_id: u32) -> Option<&[u8]> {
        if segment_id == self.active.segment_id {
            Some(&self.active.buffer)
        } else {
            self.sealed.get(&segment_id).map(|s| &s.map[..])
        }
    }

    fn record_len(&self, loc: Loc) -> Option<u64> {
        let bytes = self.segment_bytes(loc.segment_id)?.get(loc.offset as usize..)?;
        crate::record::check_header(bytes, loc.segment_id).ok().map(|h| h.record_bytes() as u64)
    }

    /// The envelope stored at `loc`, checked (record CRCs and archive validation).
    fn envelope_at(&self, loc: Loc) -> Result<(&[u8], &ArchivedEnvelope), CorruptRecord> {
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
        let segment = self.segment_bytes(loc.segment_id).ok_or(corrupt(RecordFault::Truncated))?;
        let bytes = segment.get(loc.offset as usize..).ok_or(corrupt(RecordFault::Truncated))?;
        // The active segment's buffer holds records this process appended, or that
        // recovery checked (CRCs included) when it loaded the segment: only records read
        // back from a sealed segment's file can have changed since they were checked.
        let (_, body) = if loc.segment_id == self.active.segment_id {
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

    // -----------------------------------------------------------------------------------
    // Commit (the I/O half lives in ShardHandle)
    // -----------------------------------------------------------------------------------

    fn take_commit_job(&mut self) -> Option<CommitJob<S>> {
        if self.pending.is_empty() || self.commit_in_flight || self.poisoned.is_some() {
            return None;
        }
        self.close_last_batch();
        let batches = std::mem::take(&mut self.pending);
        let last = batches.last().expect("non-empty");
        self.next_batch_start = (last.segment_id, last.start_offset + last.bytes.len() as u64);
        self.commit_in_flight = true;
        self.in_flight_last_seq = self.next_record_seq - 1;
        Some(CommitJob {
            storage: self.storage.clone(),
            active_file: self.active.file.clone(),
            segment_bytes: self.config.segment_bytes,
            last_seq: self.next_record_seq - 1,
            batches,
        })
    }

    fn finish_commit(
        &mut self,
        batches: Vec<PendingBatch>,
        created: Vec<Rc<S::File>>,
        result: Result<(), WriteError>,
        last_seq: u64,
    ) -> Result<u64, WriteError> {
        self.commit_in_flight = false;
        if let Err(error) = result {
            self.poisoned = Some(error.clone());
            self.notifier.failed.set(Some(error.clone()));
            self.notifier.wake_all();
            return Err(error);
        }
        let mut created = created.into_iter();
        for batch in batches {
            if batch.new_segment {
                let file = created.next().expect("a file per new segment");
                self.seal_active().map_err(|e| {
                    self.poison(WriteError::from_io("mapping a sealed segment", &e))
                })?;
                let buffer = Vec::with_capacity(self.config.segment_bytes as usize);
                self.active = ActiveSegment { segment_id: batch.segment_id, file, buffer };
            }
            debug_assert_eq!(batch.segment_id, self.active.segment_id);
            debug_assert_eq!(self.active.buffer.len() as u64, batch.start_offset);
            self.active.buffer.extend_from_slice(&batch.bytes);
            self.counters.commits += 1;
            self.counters.committed_records += u64::from(batch.records);
            self.counters.committed_bytes += batch.bytes.len() as u64;
            let end = self.active.buffer.len() as u64;
            self.stats.entry(batch.segment_id).or_default().written_bytes = end;
            self.durable_end = Loc { segment_id: batch.segment_id, offset: end as u32 };
            // Keep the buffer: a fresh large allocation per batch costs page faults.
            if self.spare_buffers.len() < SPARE_BUFFERS_MAX {
                let mut bytes = batch.bytes;
                bytes.clear();
                self.spare_buffers.push(bytes);
            }
        }
        self.notifier.durable_seq.set(last_seq);
        self.notifier.wake_all();
        Ok(last_seq)
    }

    fn poison(&mut self, error: WriteError) -> WriteError {
        self.poisoned = Some(error.clone());
        self.notifier.failed.set(Some(error.clone()));
        self.notifier.wake_all();
        error
    }

    fn seal_active(&mut self) -> std::io::Result<()> {
        let name = segment_file_name(u64::from(self.active.segment_id));
        let map = self.storage.map(&name)?;
        self.sealed.insert(self.active.segment_id, SealedSegment { map });
        Ok(())
    }
}

enum CommitStep<S: Storage> {
    Wait(Durable),
    Run(CommitJob<S>),
}

struct CommitJob<S: Storage> {
    storage: S,
    active_file: Rc<S::File>,
    segment_bytes: u64,
    last_seq: u64,
    batches: Vec<PendingBatch>,
}

impl<S: Storage> CommitJob<S> {
    /// Writes and syncs every batch, creating segments as needed. One write and one
    /// `fdatasync` per batch (two batches only when the log rolls to a new segment).
    async fn run(&self) -> (Vec<Rc<S::File>>, Result<(), WriteError>) {
        let mut created = Vec::new();
        let mut file = self.active_file.clone();
        for batch in &self.batches {
            if batch.new_segment {
                let name = segment_file_name(u64::from(batch.segment_id));
                match self.storage.create(&name, self.segment_bytes).await {
                    Ok(new_file) => file = Rc::new(new_file),
                    Err(e) => return (created, Err(WriteError::from_io("creating a segment", &e))),
                }
                // The new file must survive a crash before anything in it is acknowledged.
                if let Err(e) = self.storage.sync_dir().await {
                    return (created, Err(WriteError::from_io("syncing the directory", &e)));
                }
                created.push(file.clone());
            }
            if let Err(e) = file.write_at(&batch.bytes, batch.start_offset).await {
                return (created, Err(WriteError::from_io("writing a batch", &e)));
            }
            if let Err(e) = file.sync_data().await {
                return (created, Err(WriteError::from_io("syncing a batch", &e)));
            }
        }
        (created, Ok(()))
    }
}

/// A shard shared by the tasks of one core: appends through [`ShardHandle::borrow_mut`],
/// I/O through the async methods. Not `Send`, by design.
pub struct ShardHandle<S: Storage> {
    shard: Rc<RefCell<Shard<S>>>,
}

impl<S: Storage> Clone for ShardHandle<S> {
    fn clone(&self) -> Self {
        ShardHandle { shard: self.shard.clone() }
    }
}

impl<S: Storage> std::fmt::Debug for ShardHandle<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shard.borrow().fmt(f)
    }
}

impl<S: Storage + Clone> ShardHandle<S> {
    /// Borrows the shard for synchronous work. Never hold the borrow across an await.
    pub fn borrow(&self) -> std::cell::Ref<'_, Shard<S>> {
        self.shard.borrow()
    }

    /// Borrows the shard mutably for appends. Never hold the borrow across an await.
    pub fn borrow_mut(&self) -> std::cell::RefMut<'_, Shard<S>> {
        self.shard.borrow_mut()
    }

    /// Writes and syncs everything appended so far, as one batch. Returns the durable
    /// sequence number (unchanged when there was nothing to commit or a commit is in
    /// flight: call again after it).
    pub async fn commit(&self) -> Result<u64, WriteError> {
        // Another task's commit may be in flight (the server's committer while a
        // checkpoint runs): wait for it, then commit what is left. Never return early
        // while records are pending, or a caller looping "until nothing is pending" would
        // spin without ever letting the in-flight commit finish.
        loop {
            let step = {
                let mut shard = self.shard.borrow_mut();
                if let Some(error) = &shard.poisoned {
                    return Err(error.clone());
                }
                if shard.commit_in_flight {
                    CommitStep::Wait(shard.durable(shard.in_flight_last_seq))
                } else {
                    match shard.take_commit_job() {
                        Some(job) => CommitStep::Run(job),
                        None => return Ok(shard.durable_seq()),
                    }
                }
            };
            match step {
                CommitStep::Wait(durable) => durable.await?,
                CommitStep::Run(job) => {
                    let (created, result) = job.run().await;
                    let CommitJob { batches, last_seq, .. } = job;
                    return self
                        .shard
                        .borrow_mut()
                        .finish_commit(batches, created, result, last_seq);
                }
            }
        }
    }

    /// Writes a checkpoint of the state tables and indexes (zstd, CRC, temp file +
    /// sync + rename + directory sync) and removes older ones. Commits first, so the
    /// checkpoint covers a batch boundary.
    pub async fn checkpoint(&self) -> Result<u64, WriteError> {
        // Commit until nothing is pending, so the snapshot matches a log position.
        loop {
            self.commit().await?;
            if !self.shard.borrow().has_pending() {
                break;
            }
        }
        let (bytes, covered_seq, storage, old) = {
            let shard = self.shard.borrow();
            let snapshot = Snapshot::capture(&shard);
            let bytes = checkpoint::encode(&snapshot, shard.config.shard_id);
            let old: Vec<String> = shard
                .storage
                .list()
                .unwrap_or_default()
                .into_iter()
                .filter(|n| checkpoint::parse_file_name(n).is_some())
                .collect();
            (bytes, shard.durable_seq(), shard.storage.clone(), old)
        };
        let name = checkpoint::file_name(covered_seq);
        let temp = format!("{name}.tmp");
        let result: Result<(), WriteError> = async {
            storage
                .write_file(&temp, &bytes)
                .await
                .map_err(|e| WriteError::from_io("writing a checkpoint", &e))?;
            storage
                .rename(&temp, &name)
                .await
                .map_err(|e| WriteError::from_io("renaming a checkpoint", &e))?;
            // The rename must be durable before older checkpoints go.
            storage.sync_dir().await.map_err(|e| WriteError::from_io("syncing the directory", &e))
        }
        .await;
        if let Err(error) = result {
            // A failed checkpoint loses nothing (the log still has everything); remove
            // the temp file if we can and report.
            let _ = storage.remove(&temp).await;
            return Err(error);
        }
        for old_name in old.iter().filter(|n| **n != name) {
            let _ = storage.remove(old_name).await;
        }
        let _ = storage.sync_dir().await;
        self.shard.borrow_mut().checkpoint_seq = covered_seq;
        Ok(covered_seq)
    }

    /// Reclaims space: rewrites the live envelopes of mostly-dead sealed segments at the
    /// head (compaction), checkpoints, then deletes sealed segments that the checkpoint
    /// covers and that hold no live or unexpired envelope. Returns segments deleted.
    ///
    /// After an account deletion it also erases: the active segment is sealed and every
    /// segment up to it is compacted whatever its live share, so that once the
    /// checkpoint is written no file holds the deleted account's records.
    pub async fn reclaim(&self, now_ms: u64) -> Result<u64, WriteError> {
        let erase = self.shard.borrow().erase_through_segment;
        if let Some(through) = erase {
            {
                let mut shard = self.shard.borrow_mut();
                if shard.write_head().0 <= through {
                    shard.open_next_segment_batch();
                }
            }
            // The roll must be committed, so the segment is sealed before compaction.
            loop {
                self.commit().await?;
                if !self.shard.borrow().has_pending() {
                    break;
                }
            }
        }
        let compacted = self.shard.borrow_mut().compact(now_ms, erase)?;
        self.shard.borrow_mut().drop_expired_entries(now_ms);
        if compacted > 0
            || self.shard.borrow().checkpoint_seq < self.shard.borrow().durable_seq()
            || self.shard.borrow().has_pending()
        {
            self.checkpoint().await?;
        }
        let (storage, doomed) = {
            let shard = self.shard.borrow();
            let doomed: Vec<u32> = shard
                .sealed
                .keys()
                .copied()
                .filter(|id| {
                    let stats = shard.stats.get(id).copied().unwrap_or_default();
                    stats.last_record_seq <= shard.checkpoint_seq
                        && (stats.live_records == 0 || stats.max_expires_ms <= now_ms)
                })
                .collect();
            (shard.storage.clone(), doomed)
        };
        let mut deleted = 0;
        for segment_id in &doomed {
            let name = segment_file_name(u64::from(*segment_id));
            storage
                .remove(&name)
                .await
                .map_err(|e| WriteError::from_io("removing a segment", &e))?;
            deleted += 1;
        }
        if deleted > 0 {
            storage
                .sync_dir()
                .await
                .map_err(|e| WriteError::from_io("syncing the directory", &e))?;
            let mut shard = self.shard.borrow_mut();
            for segment_id in doomed {
                shard.sealed.remove(&segment_id);
                shard.stats.remove(&segment_id);
            }
            shard.counters.segments_deleted += deleted;
        }
        if let Some(through) = erase {
            let mut shard = self.shard.borrow_mut();
            let erased = shard.sealed.keys().all(|id| *id > through);
            if erased && shard.erase_through_segment == Some(through) {
                shard.erase_through_segment = None;
            }
        }
        Ok(deleted)
    }

    /// Opens (recovers) a shard from `storage`: the newest valid checkpoint, then the log
    /// after it. A torn tail is truncated; corrupt records are quarantined and counted.
    pub async fn open(storage: S, config: ShardConfig) -> Result<ShardHandle<S>, OpenError> {
        let shard = crate::recovery::recover(storage, config).await?;
        Ok(ShardHandle { shard: Rc::new(RefCell::new(shard)) })
    }
}

// Internals used by recovery, compaction and checkpoints.
impl<S: Storage> Shard<S> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn assemble(
        storage: S,
        config: ShardConfig,
        alignment: u32,
        active_segment_id: u32,
        active_file: Rc<S::File>,
        active_buffer: Vec<u8>,
        sealed: BTreeMap<u32, Mapped>,
        next_record_seq: u64,
    ) -> Shard<S> {
        let end = active_buffer.len() as u64;
        let notifier = Rc::new(Notifier::default());
        notifier.durable_seq.set(next_record_seq.saturating_sub(1));
        Shard {
            storage,
            config,
            alignment,
            sealed: sealed.into_iter().map(|(id, map)| (id, SealedSegment { map })).collect(),
            stats: BTreeMap::new(),
            active: ActiveSegment {
                segment_id: active_segment_id,
                file: active_file,
                buffer: active_buffer,
            },
            pending: Vec::new(),
            next_batch_start: (active_segment_id, end),
            commit_in_flight: false,
            in_flight_last_seq: 0,
            next_record_seq,
            durable_end: Loc { segment_id: active_segment_id, offset: end as u32 },
            poisoned: None,
            notifier,
            mailboxes: HashMap::default(),
            shared_refs: HashMap::default(),
            state: StateTables::default(),
            dedup: HashMap::default(),
            dedup_order: VecDeque::new(),
            conversation_seqs: HashMap::default(),
            last_message_id: 0,
            checkpoint_seq: 0,
            erase_through_segment: None,
            scratch: Vec::new(),
            counters: ShardCounters::default(),
            quarantined: Vec::new(),
            replay_slots: Vec::new(),
            replay_gap_budget: 0,
            body_scratch: Vec::new(),
            spare_buffers: Vec::new(),
        }
    }

    /// Applies one replayed record (recovery), whose location is `loc`.
    pub(crate) fn replay(
        &mut self,
        loc: Loc,
        record_type: RecordType,
        flags: u8,
        seq: u64,
        body: &[u8],
    ) {
        match record_type {
            RecordType::Envelope => {
                let Ok(record) = rkyv::access::<ArchivedEnvelopeRecord, Failure>(body) else {
                    self.counters.corrupt_records += 1;
                    return;
                };
                let Ok(envelope) = rkyv::access::<ArchivedEnvelope, Failure>(&record.envelope)
                else {
                    self.counters.corrupt_records += 1;
                    return;
                };
                let mut slots = std::mem::take(&mut self.replay_slots);
                slots.clear();
                slots.extend(record.slots.iter().map(|s| MailboxSlot {
                    user_id: s.user_id.to_native(),
                    device_id: s.device_id.to_native(),
                    mailbox_seq: s.mailbox_seq.to_native(),
                }));
                let record_bytes = (RECORD_HEADER_BYTES + body.len()) as u64;
                if flags & FLAG_MOVED != 0 {
                    self.relocate(&slots, loc, record_bytes, envelope.expires_ms.to_native(), seq);
                } else {
                    let owned = envelope_ref_of(envelope);
                    self.index_envelope(&slots, loc, record_bytes, &owned, seq);
                }
                self.replay_slots = slots;
            }
            RecordType::Ack => {
                let ack = rkyv::access::<crate::body::ArchivedAckRecord, Failure>(body);
                // An ack past the sequence bound is corrupt (`apply_ack` adds one to it).
                let ack = ack.ok().filter(|a| a.up_to_mailbox_seq.to_native() < MAILBOX_SEQ_MAX);
                if let Some(ack) = ack {
                    let device = (ack.user_id.to_native(), ack.device_id.to_native());
                    self.apply_ack(device, ack.up_to_mailbox_seq.to_native());
                } else {
                    self.counters.corrupt_records += 1;
                }
            }
            RecordType::Remove => {
                if let Ok(remove) = rkyv::access::<crate::body::ArchivedRemoveRecord, Failure>(body)
                {
                    let device = (remove.user_id.to_native(), remove.device_id.to_native());
                    self.apply_remove(device, remove.mailbox_seq.to_native());
                } else {
                    self.counters.corrupt_records += 1;
                }
            }
            RecordType::State => {
                match rkyv::access::<crate::body::ArchivedStateOp, Failure>(body)
                    .and_then(rkyv::deserialize::<StateOp, Failure>)
                {
                    Ok(op) => {
                        self.state.apply(&op);
                        self.after_state_op(&op, Some(loc.segment_id));
                    }
                    Err(_) => self.counters.corrupt_records += 1,
                }
            }
            RecordType::Commit => {}
        }
        let stats = self.stats.entry(loc.segment_id).or_default();
        stats.last_record_seq = stats.last_record_seq.max(seq);
    }

    /// Points the mailbox entries of `slots` that still reference an older copy of a
    /// record at `loc` instead (compaction moved it).
    fn relocate(
        &mut self,
        slots: &[MailboxSlot],
        loc: Loc,
        record_bytes: u64,
        expires_ms: u64,
        seq: u64,
    ) {
        let mut moved = 0u32;
        let mut old_loc = None;
        for slot in slots {
            let Some(mailbox) = self.mailboxes.get_mut(&(slot.user_id, slot.device_id)) else {
                continue;
            };
            let Some(index) = slot.mailbox_seq.checked_sub(mailbox.head_seq) else { continue };
            let Some(entry) = mailbox.entries.get_mut(index as usize) else { continue };
            if *entry == Loc::LOST || *entry >= loc {
                continue;
            }
            old_loc = Some(*entry);
            *entry = loc;
            moved += 1;
        }
        if moved == 0 {
            return;
        }
        if let Some(old) = old_loc {
            let old_bytes = self.record_len(old).unwrap_or(record_bytes);
            self.shared_refs.remove(&old);
            if let Some(stats) = self.stats.get_mut(&old.segment_id) {
                stats.live_records = stats.live_records.saturating_sub(1);
                stats.live_bytes = stats.live_bytes.saturating_sub(old_bytes);
            }
        }
        if moved > 1 {
            self.shared_refs.insert(loc, moved);
        }
        let stats = self.stats.entry(loc.segment_id).or_default();
        stats.live_records += 1;
        stats.live_bytes += record_bytes;
        stats.max_expires_ms = stats.max_expires_ms.max(expires_ms);
        stats.last_record_seq = stats.last_record_seq.max(seq);
    }

    /// Rewrites the live envelopes of mostly-dead sealed segments (and of every sealed
    /// segment up to `erase_through`) at the head of the log. Returns how many records
    /// were rewritten.
    fn compact(&mut self, now_ms: u64, erase_through: Option<u32>) -> Result<u64, WriteError> {
        let limit = u64::from(self.config.compact_live_percent_max);
        let candidates: Vec<u32> = self
            .sealed
            .keys()
            .copied()
            .filter(|id| {
                let stats = self.stats.get(id).copied().unwrap_or_default();
                let mostly_dead = stats.live_bytes * 100 < stats.written_bytes.max(1) * limit;
                let erased = erase_through.is_some_and(|through| *id <= through);
                stats.live_records > 0 && stats.max_expires_ms > now_ms && (mostly_dead || erased)
            })
            .collect();
        let mut rewritten = 0;
        for segment_id in candidates {
            let map = self.sealed[&segment_id].map.clone();
            let Ok(scan) = scan_segment(&map) else { continue };
            for record in
                scan.records.iter().filter(|r| r.header.record_type == RecordType::Envelope)
            {
                let old = Loc { segment_id, offset: record.offset as u32 };
                let Ok(archived) = rkyv::access::<ArchivedEnvelopeRecord, Failure>(record.body)
                else {
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
                    .filter(|s| self.entry_at(*s) == Some(old))
                    .collect();
                if live_slots.is_empty() {
                    continue;
                }
                let envelope_bytes: &[u8] = &archived.envelope;
                let copy = EnvelopeRecordRef { slots: &live_slots, envelope: envelope_bytes };
                let (seq, loc, record_bytes) =
                    self.append(RecordType::Envelope, FLAG_MOVED, |out| {
                        encode_archive(out, &copy).map(|_| ()).map_err(|_| WriteError::NoRecipients)
                    })?;
                let expires_ms = rkyv::access::<ArchivedEnvelope, Failure>(envelope_bytes)
                    .map(|e| e.expires_ms.to_native())
                    .unwrap_or(u64::MAX);
                self.relocate(&live_slots, loc, record_bytes, expires_ms, seq);
                rewritten += 1;
            }
        }
        self.counters.records_compacted += rewritten;
        Ok(rewritten)
    }

    fn entry_at(&self, slot: MailboxSlot) -> Option<Loc> {
        let mailbox = self.mailboxes.get(&(slot.user_id, slot.device_id))?;
        let index = slot.mailbox_seq.checked_sub(mailbox.head_seq)?;
        mailbox.entries.get(index as usize).copied()
    }

    /// Drops leading mailbox entries whose segment is gone or whose envelope expired.
    fn drop_expired_entries(&mut self, now_ms: u64) {
        let devices: Vec<DeviceAddr> = self.mailboxes.keys().copied().collect();
        for device in devices {
            while let Some(loc) = self.mailboxes[&device].entries.front().copied() {
                if !self.is_durable(loc) {
                    break;
                }
                let expired = match self.envelope_at(loc) {
                    Ok((_, envelope)) => envelope.expires_ms.to_native() <= now_ms,
                    Err(_) => false,
                };
                if !expired {
                    break;
                }
                let mailbox = self.mailboxes.get_mut(&device).expect("present");
                mailbox.entries.pop_front();
                mailbox.head_seq += 1;
                self.counters.expired_entries += 1;
                self.release(loc);
            }
        }
    }

    pub(crate) fn quarantine(&mut self, record: CorruptRecord) {
        self.quarantined.push(record);
    }

    pub(crate) fn counters_mut(&mut self) -> &mut ShardCounters {
        &mut self.counters
    }

    /// After replay: new records continue after the highest sequence number seen.
    /// Sets how many mailbox entries replay may mark lost (see `replay_gap_budget`).
    pub(crate) fn set_replay_gap_budget(&mut self, entries: u64) {
        self.replay_gap_budget = entries;
    }

    pub(crate) fn resume_after(&mut self, max_seq: u64) {
        self.next_record_seq = self.next_record_seq.max(max_seq + 1);
        self.notifier.durable_seq.set(self.next_record_seq - 1);
    }

    pub(crate) fn note_written(&mut self, written: &BTreeMap<u32, u64>) {
        for (id, end) in written {
            self.stats.entry(*id).or_default().written_bytes = *end;
        }
    }

    pub(crate) fn set_checkpoint_seq(&mut self, seq: u64) {
        self.checkpoint_seq = seq;
    }

    pub(crate) fn snapshot_parts(&self) -> SnapshotParts<'_> {
        SnapshotParts {
            mailboxes: &self.mailboxes,
            shared_refs: &self.shared_refs,
            stats: &self.stats,
            state: &self.state,
            dedup: &self.dedup,
            conversation_seqs: &self.conversation_seqs,
            last_message_id: self.last_message_id,
            next_record_seq: self.next_record_seq,
        }
    }

    pub(crate) fn restore_snapshot(&mut self, snapshot: Snapshot) {
        let corrupt_before = snapshot.mailboxes.len();
        self.mailboxes = snapshot
            .mailboxes
            .into_iter()
            .filter(|m| m.head_seq.saturating_add(m.entries.len() as u64) < MAILBOX_SEQ_MAX)
            .map(|m| {
                let entries = m
                    .entries
                    .into_iter()
                    .map(|(segment_id, offset)| Loc { segment_id, offset })
                    .collect();
                let mailbox =
                    Mailbox { head_seq: m.head_seq, entries, bytes: 0, bytes_unknown: true };
                ((m.user_id, m.device_id), mailbox)
            })
            .collect();
        // A mailbox past the sequence bound is corrupt (see `MAILBOX_SEQ_MAX`): dropped.
        self.counters.corrupt_records += (corrupt_before - self.mailboxes.len()) as u64;
        self.shared_refs = snapshot
            .shared_refs
            .into_iter()
            .map(|(segment_id, offset, refs)| (Loc { segment_id, offset }, refs))
            .collect();
        self.stats = snapshot.segments.iter().map(|s| (s.segment_id, s.stats())).collect();
        self.state = snapshot.state.into_tables();
        let mut dedup: Vec<_> = snapshot.dedup;
        dedup.sort_by_key(|d| d.time_ms);
        for d in dedup {
            let key = (d.sender_user, d.sender_device, d.client_message_id);
            self.dedup.insert(key, (d.server_message_id, d.time_ms));
            self.dedup_order.push_back((d.time_ms, key));
        }
        self.conversation_seqs = snapshot
            .conversation_seqs
            .into_iter()
            .map(|(owner, device, sender, seq)| ((owner, device, sender), seq))
            .collect();
        self.last_message_id = snapshot.last_message_id;
        self.checkpoint_seq = snapshot.covered_seq;
    }

    pub(crate) fn mailbox_parts(m: &Mailbox) -> (u64, &VecDeque<Loc>) {
        (m.head_seq, &m.entries)
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

/// Used by recovery to list segment files in order.
pub(crate) fn segment_ids(names: &[String]) -> Vec<u64> {
    let mut ids: Vec<u64> = names.iter().filter_map(|n| parse_segment_file_name(n)).collect();
    ids.sort_unstable();
    ids
}
