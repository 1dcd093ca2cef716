//! The mailbox index: per recipient device, the queue of [`Loc`]s of its undelivered
//! envelopes (with their record bytes, for quotas), the references of envelope records
//! shared by several mailboxes, and the last conversation sequence number per sender.
//!
//! Live appends and replay change the index through the same methods, so a shard
//! rebuilt from its log indexes exactly what the live shard did. The index holds only
//! locations; it reads the records themselves through [`Segments`], which also keeps the
//! per-segment live counts that every added or released entry changes.

use std::collections::VecDeque;

use tern_wire::messages::{DeviceId, UserId};
use tern_wire::EnvelopeRef;

use super::loc::{DeviceAddr, HashMap, Loc, MAILBOX_SEQ_MAX};
use super::segments::Segments;
use crate::body::MailboxSlot;
use crate::error::CorruptRecord;

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

/// (mailbox owner user, owner device, sender user): whose numbering a conversation
/// sequence number continues.
pub(crate) type ConversationKey = (UserId, DeviceId, UserId);

/// What one sender has queued in a mailbox (the per-sender share a recipient's quota
/// checks, so that one sender cannot fill somebody's mailbox alone).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SenderShare {
    /// Envelopes queued.
    pub entries: u64,
    /// Their record bytes (headers included).
    pub bytes: u64,
}

/// What a mailbox holds, for quotas: record bytes in all, and per sender.
#[derive(Debug, Default)]
struct Tally {
    bytes: u64,
    senders: HashMap<UserId, SenderShare>,
}

impl Tally {
    fn add(&mut self, sender: UserId, bytes: u64) {
        self.bytes += bytes;
        let share = self.senders.entry(sender).or_default();
        share.entries += 1;
        share.bytes += bytes;
    }

    fn remove(&mut self, sender: UserId, bytes: u64) {
        self.bytes = self.bytes.saturating_sub(bytes);
        let Some(share) = self.senders.get_mut(&sender) else { return };
        share.entries = share.entries.saturating_sub(1);
        share.bytes = share.bytes.saturating_sub(bytes);
        if share.entries == 0 {
            self.senders.remove(&sender);
            if self.senders.is_empty() {
                // An online device's mailbox empties after every delivery: keep no
                // table allocated for it meanwhile.
                self.senders = HashMap::default();
            }
        }
    }
}

#[derive(Debug)]
struct Mailbox {
    /// Sequence number of `entries[0]`.
    head_seq: u64,
    entries: VecDeque<Loc>,
    /// Bytes and per-sender shares of the entries; `None` for mailboxes restored from a
    /// checkpoint (which does not store them): the first query counts them, so recovery
    /// does not pay for it.
    tally: Option<Tally>,
}

impl Default for Mailbox {
    fn default() -> Mailbox {
        Mailbox { head_seq: 0, entries: VecDeque::new(), tally: Some(Tally::default()) }
    }
}

impl Mailbox {
    fn next_seq(&self) -> u64 {
        self.head_seq + self.entries.len() as u64
    }

    /// The entry at `mailbox_seq`, if the mailbox still holds it.
    fn entry_mut(&mut self, mailbox_seq: u64) -> Option<&mut Loc> {
        let index = mailbox_seq.checked_sub(self.head_seq)?;
        self.entries.get_mut(index as usize)
    }

    /// The tally, counted from the records if it is not known yet.
    fn tally(&mut self, segments: &Segments) -> &Tally {
        self.tally.get_or_insert_with(|| {
            let mut tally = Tally::default();
            for loc in self.entries.iter().filter(|loc| loc.is_record()) {
                if let Some((sender, bytes)) = segments.sender_and_len(*loc) {
                    tally.add(sender, bytes);
                }
            }
            tally
        })
    }

    /// Takes a released entry out of the tally (if it is known).
    fn untally(&mut self, segments: &Segments, loc: Loc) {
        let Some(tally) = &mut self.tally else { return };
        let released = loc.is_record().then(|| segments.sender_and_len(loc)).flatten();
        if let Some((sender, bytes)) = released {
            tally.remove(sender, bytes);
        }
    }
}

/// What indexing an envelope did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Indexed {
    /// Whether some mailbox took the envelope (then it is live and its send is new).
    pub(crate) stored: bool,
    /// Slots refused as corrupt (a sequence number past the bound or a gap too long).
    pub(crate) corrupt_slots: u64,
}

/// The mailbox index of one shard.
#[derive(Debug, Default)]
pub(crate) struct Index {
    mailboxes: HashMap<DeviceAddr, Mailbox>,
    /// Remaining references of envelope records that are in more than one mailbox.
    shared_refs: HashMap<Loc, u32>,
    /// Last conversation sequence number per (mailbox owner, sender): each device sees
    /// every sender's messages numbered 1, 2, 3... and can spot a gap.
    conversation_seqs: HashMap<ConversationKey, u64>,
    /// Mailbox entries replay may still mark lost. A gap in a mailbox's sequence numbers
    /// stands for envelope records that could not be read, each at least a record header
    /// long, so recovery sets this to the log's bytes over the header size; a record
    /// claiming a longer gap is corrupt. Without the bound, one record with a huge mailbox
    /// sequence number made replay fill memory with lost entries (found by fuzzing).
    /// Zero outside recovery: live appends never leave gaps.
    replay_gap_budget: u64,
}

impl Index {
    /// An index as a checkpoint kept it: mailboxes (owner, head sequence number, entries),
    /// shared references and conversation sequence numbers. Mailboxes past the sequence
    /// bound are corrupt and dropped; the second value says how many were (duplicates
    /// included), for the corrupt-record counter.
    pub(crate) fn restore(
        mailboxes: impl ExactSizeIterator<Item = (DeviceAddr, u64, VecDeque<Loc>)>,
        shared_refs: impl Iterator<Item = (Loc, u32)>,
        conversation_seqs: impl Iterator<Item = (ConversationKey, u64)>,
    ) -> (Index, u64) {
        let mailboxes_before = mailboxes.len();
        let mailboxes: HashMap<DeviceAddr, Mailbox> = mailboxes
            .filter(|(_, head_seq, entries)| {
                head_seq.saturating_add(entries.len() as u64) < MAILBOX_SEQ_MAX
            })
            .map(|(device, head_seq, entries)| (device, Mailbox { head_seq, entries, tally: None }))
            .collect();
        let dropped = (mailboxes_before - mailboxes.len()) as u64;
        let index = Index {
            mailboxes,
            shared_refs: shared_refs.collect(),
            conversation_seqs: conversation_seqs.collect(),
            replay_gap_budget: 0,
        };
        (index, dropped)
    }

    /// Lets replay mark up to `entries` mailbox entries lost (see `replay_gap_budget`);
    /// zero again once replay is done.
    pub(crate) fn allow_gaps(&mut self, entries: u64) {
        self.replay_gap_budget = entries;
    }

    // -----------------------------------------------------------------------------------
    // Queries
    // -----------------------------------------------------------------------------------

    /// The next mailbox sequence number of a device.
    pub(crate) fn next_seq(&self, device: DeviceAddr) -> u64 {
        self.mailboxes.get(&device).map_or(0, Mailbox::next_seq)
    }

    /// The mailbox sequence number of a device's oldest queued envelope.
    pub(crate) fn head_seq(&self, device: DeviceAddr) -> u64 {
        self.mailboxes.get(&device).map_or(0, |m| m.head_seq)
    }

    /// Number of envelopes queued for a device.
    pub(crate) fn len(&self, device: DeviceAddr) -> u64 {
        self.mailboxes.get(&device).map_or(0, |m| m.entries.len() as u64)
    }

    /// The conversation sequence number the next envelope from `sender` to `device`
    /// should carry (1 for the first).
    pub(crate) fn next_conversation_seq(&self, device: DeviceAddr, sender: UserId) -> u64 {
        self.conversation_seqs.get(&(device.0, device.1, sender)).map_or(1, |last| last + 1)
    }

    /// Devices with a non-empty mailbox and their backlog.
    pub(crate) fn backlogs(&self) -> impl Iterator<Item = (DeviceAddr, u64)> + '_ {
        self.mailboxes
            .iter()
            .filter(|(_, m)| !m.entries.is_empty())
            .map(|(a, m)| (*a, m.entries.len() as u64))
    }

    /// Index memory for queued envelopes, in bytes.
    pub(crate) fn memory_bytes(&self) -> usize {
        let entry = std::mem::size_of::<Loc>();
        let per_mailbox = std::mem::size_of::<(DeviceAddr, Mailbox)>() + 8;
        let per_sender = std::mem::size_of::<(UserId, SenderShare)>() + 1;
        let tally = |m: &Mailbox| m.tally.as_ref().map_or(0, |t| t.senders.capacity() * per_sender);
        let mailbox = |m: &Mailbox| m.entries.capacity() * entry + per_mailbox + tally(m);
        self.mailboxes.values().map(mailbox).sum::<usize>()
            + self.shared_refs.capacity() * (std::mem::size_of::<(Loc, u32)>() + 1)
    }

    /// The entry a slot names, if its mailbox still holds it.
    pub(crate) fn entry_at(&self, slot: MailboxSlot) -> Option<Loc> {
        let mailbox = self.mailboxes.get(&(slot.user_id, slot.device_id))?;
        let index = slot.mailbox_seq.checked_sub(mailbox.head_seq)?;
        mailbox.entries.get(index as usize).copied()
    }

    /// Whether a device's mailbox holds an envelope at `mailbox_seq` (not lost, not
    /// removed).
    pub(crate) fn holds(&self, device: DeviceAddr, mailbox_seq: u64) -> bool {
        let present = self.mailboxes.get(&device).and_then(|m| {
            let index = mailbox_seq.checked_sub(m.head_seq)?;
            m.entries.get(index as usize).filter(|l| l.is_record())
        });
        present.is_some()
    }

    /// The mailbox sequence number an ack of `device` up to `up_to_mailbox_seq` really
    /// covers: clamped to the durable entries (those that could have been delivered).
    /// `None` when it covers nothing.
    pub(crate) fn ack_limit(
        &self,
        device: DeviceAddr,
        up_to_mailbox_seq: u64,
        segments: &Segments,
    ) -> Option<u64> {
        let mailbox = self.mailboxes.get(&device)?;
        let durable_entries =
            mailbox.entries.iter().take_while(|loc| segments.is_durable(**loc)).count() as u64;
        let limit = (mailbox.head_seq + durable_entries).min(up_to_mailbox_seq.saturating_add(1));
        (limit > mailbox.head_seq).then(|| limit - 1)
    }

    // -----------------------------------------------------------------------------------
    // Reads
    // -----------------------------------------------------------------------------------

    /// Reads up to `limit` durable envelopes of a mailbox from `from_mailbox_seq`, in
    /// order; expired, corrupt and lost entries are reported instead.
    pub(crate) fn read<'a>(
        &self,
        segments: &'a Segments,
        device: DeviceAddr,
        from_mailbox_seq: u64,
        limit: usize,
        now_ms: u64,
    ) -> MailboxRead<'a> {
        let mut read = MailboxRead { next_seq: from_mailbox_seq, ..MailboxRead::default() };
        let Some(mailbox) = self.mailboxes.get(&device) else { return read };
        let skip = from_mailbox_seq.saturating_sub(mailbox.head_seq) as usize;
        let first_seq = mailbox.head_seq + skip as u64;
        read.next_seq = read.next_seq.max(first_seq);
        for (seq, loc) in (first_seq..).zip(mailbox.entries.iter().skip(skip)) {
            if read.entries.len() >= limit || !segments.is_durable(*loc) {
                break;
            }
            read.next_seq = seq + 1;
            if *loc == Loc::REMOVED {
                continue;
            }
            match segments.envelope_at(*loc) {
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

    /// Finds the durable queued envelope `server_message_id` from `sender_user` in a
    /// device's mailbox; returns its mailbox sequence number.
    pub(crate) fn find_queued(
        &self,
        segments: &Segments,
        device: DeviceAddr,
        sender_user: UserId,
        server_message_id: u64,
    ) -> Option<u64> {
        let mailbox = self.mailboxes.get(&device)?;
        for (seq, loc) in (mailbox.head_seq..).zip(mailbox.entries.iter()) {
            if !segments.is_durable(*loc) {
                break;
            }
            if !loc.is_record() {
                continue;
            }
            let Ok((_, envelope)) = segments.envelope_at(*loc) else { continue };
            if envelope.server_message_id.to_native() == server_message_id
                && envelope.sender_user.to_native() == sender_user
            {
                return Some(seq);
            }
        }
        None
    }

    /// Bytes of the records queued for a device. Summed once after a restart from a
    /// checkpoint, then kept up to date.
    pub(crate) fn mailbox_bytes(&mut self, segments: &Segments, device: DeviceAddr) -> u64 {
        self.mailboxes.get_mut(&device).map_or(0, |m| m.tally(segments).bytes)
    }

    /// What `sender` has queued in a device's mailbox. Counted once after a restart from
    /// a checkpoint, then kept up to date.
    pub(crate) fn sender_share(
        &mut self,
        segments: &Segments,
        device: DeviceAddr,
        sender: UserId,
    ) -> SenderShare {
        let Some(mailbox) = self.mailboxes.get_mut(&device) else { return SenderShare::default() };
        mailbox.tally(segments).senders.get(&sender).copied().unwrap_or_default()
    }

    // -----------------------------------------------------------------------------------
    // Changes (shared by live appends and replay)
    // -----------------------------------------------------------------------------------

    /// Indexes the envelope record at `loc` in the mailboxes of `slots`. Slots already
    /// indexed (replay over a checkpoint) are skipped; a gap before a slot (records lost
    /// to corruption) is filled with [`Loc::LOST`] entries, within the replay budget.
    pub(crate) fn add_envelope(
        &mut self,
        segments: &mut Segments,
        slots: &[MailboxSlot],
        loc: Loc,
        record_bytes: u64,
        envelope: &EnvelopeRef<'_>,
        record_seq: u64,
    ) -> Indexed {
        let mut added = 0u32;
        let mut corrupt_slots = 0;
        for slot in slots {
            if slot.mailbox_seq >= MAILBOX_SEQ_MAX {
                corrupt_slots += 1;
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
                corrupt_slots += 1;
                continue;
            }
            self.replay_gap_budget -= gap;
            for _ in 0..gap {
                mailbox.entries.push_back(Loc::LOST);
            }
            mailbox.entries.push_back(loc);
            if let Some(tally) = &mut mailbox.tally {
                tally.add(envelope.sender_user, record_bytes);
            }
            added += 1;
            if envelope.conversation_seq > 0 {
                let key = (slot.user_id, slot.device_id, envelope.sender_user);
                let last = self.conversation_seqs.entry(key).or_insert(0);
                *last = (*last).max(envelope.conversation_seq);
            }
        }
        if added > 1 {
            self.shared_refs.insert(loc, added);
        }
        if added > 0 {
            segments.note_live(loc, record_bytes, envelope.expires_ms, record_seq);
        }
        Indexed { stored: added > 0, corrupt_slots }
    }

    /// Releases a device's entries up to and including `up_to`; returns how many.
    pub(crate) fn ack(&mut self, segments: &mut Segments, device: DeviceAddr, up_to: u64) -> u64 {
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
        for loc in &released {
            mailbox.untally(segments, *loc);
        }
        for loc in released {
            self.release(segments, loc);
        }
        count
    }

    /// Turns a device's entry at `mailbox_seq` into [`Loc::REMOVED`] (deleted for
    /// everyone), releasing its record.
    pub(crate) fn remove(&mut self, segments: &mut Segments, device: DeviceAddr, mailbox_seq: u64) {
        let Some(mailbox) = self.mailboxes.get_mut(&device) else { return };
        let Some(entry) = mailbox.entry_mut(mailbox_seq) else { return };
        let loc = std::mem::replace(entry, Loc::REMOVED);
        mailbox.untally(segments, loc);
        self.release(segments, loc);
    }

    /// Points the entries of `slots` that still reference an older copy of a record at
    /// `loc` instead (compaction moved it there).
    pub(crate) fn relocate(
        &mut self,
        segments: &mut Segments,
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
            let Some(entry) = mailbox.entry_mut(slot.mailbox_seq) else { continue };
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
            let old_bytes = segments.record_len(old).unwrap_or(record_bytes);
            self.shared_refs.remove(&old);
            segments.note_released(old.segment_id, old_bytes);
        }
        if moved > 1 {
            self.shared_refs.insert(loc, moved);
        }
        segments.note_live(loc, record_bytes, expires_ms, seq);
    }

    /// Drops the leading entries of every mailbox whose envelope expired by `now_ms`;
    /// returns how many.
    pub(crate) fn drop_expired(&mut self, segments: &mut Segments, now_ms: u64) -> u64 {
        let mut dropped = 0;
        let devices: Vec<DeviceAddr> = self.mailboxes.keys().copied().collect();
        for device in devices {
            while let Some(loc) = self.mailboxes[&device].entries.front().copied() {
                if !segments.is_durable(loc) {
                    break;
                }
                let expired = match segments.envelope_at(loc) {
                    Ok((_, envelope)) => envelope.expires_ms.to_native() <= now_ms,
                    Err(_) => false,
                };
                if !expired {
                    break;
                }
                let mailbox = self.mailboxes.get_mut(&device).expect("present");
                mailbox.entries.pop_front();
                mailbox.head_seq += 1;
                mailbox.untally(segments, loc); // (Its bytes used to stay counted.)
                dropped += 1;
                self.release(segments, loc);
            }
        }
        dropped
    }

    /// Drops one reference to an envelope record; the last one makes it garbage.
    fn release(&mut self, segments: &mut Segments, loc: Loc) {
        if !loc.is_record() {
            return;
        }
        if let Some(refs) = self.shared_refs.get_mut(&loc) {
            *refs -= 1;
            if *refs > 0 {
                return;
            }
            self.shared_refs.remove(&loc);
        }
        let record_bytes = segments.record_len(loc).unwrap_or(0);
        segments.note_released(loc.segment_id, record_bytes);
    }

    // -----------------------------------------------------------------------------------
    // What a checkpoint keeps
    // -----------------------------------------------------------------------------------

    /// Every mailbox: owner, head sequence number, entries.
    pub(crate) fn mailboxes(&self) -> impl Iterator<Item = (DeviceAddr, u64, &VecDeque<Loc>)> {
        self.mailboxes.iter().map(|(device, m)| (*device, m.head_seq, &m.entries))
    }

    /// Every shared record and its references left.
    pub(crate) fn shared_refs(&self) -> impl Iterator<Item = (Loc, u32)> + '_ {
        self.shared_refs.iter().map(|(loc, refs)| (*loc, *refs))
    }

    /// Every last conversation sequence number.
    pub(crate) fn conversation_seqs(&self) -> impl Iterator<Item = (ConversationKey, u64)> + '_ {
        self.conversation_seqs.iter().map(|(key, seq)| (*key, *seq))
    }
}
