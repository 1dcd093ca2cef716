//! Feeding connections from their mailboxes, acknowledgements, and mailbox quotas.
//!
//! [`pump`] writes a connected device's durable envelopes into its output as `Deliver`
//! frames (the stored bytes, unchanged), within its delivery window and the output
//! bound, and is called whenever either may have room again. A `DeliveryAck` removes
//! what the device received and sends **delivered** receipts to the senders.
//!
//! Quotas: a full mailbox takes nothing more from others ([`admit`]): their messages are
//! refused, their receipts and notices dropped, and nothing it holds is dropped for them
//! — a message a sender was told is stored stays stored (an abuse run with many
//! flooding accounts showed drop-the-oldest losing honest, acknowledged messages). One
//! sender may fill only its share of a mailbox ([`within_sender_share`]). Only the
//! owner's own copies (its other devices' sync copies: a device that never comes back
//! must not stop its user from sending) make room: [`make_room`] drops the oldest down
//! to 90 % of each limit and announces it, a `Dropped` notice to the device and
//! `SentDropped` to each sender. Never silent.

use std::collections::BTreeMap;

use rkyv::rancor::Failure;
use tern_engine::Storage;
use tern_wire::messages::{
    ArchivedConversation, ArchivedEnvelope, ArchivedEnvelopeKind, ArchivedNoticeBody, Conversation,
    DeviceId, EnvelopeKind, GroupId, MessageId, NoticeBody, ReceiptBody, ReceiptKind, UserId,
};
use tern_wire::{encode_deliver, MessageType};

use super::server_envelope::{append_envelope_to, archive};
use crate::core::conns::{ConnId, ConnState, OUTBOUND_BYTES_MAX};
use crate::core::shared::Shared;
use crate::mesh::calls::StoreServerEnvelope;
use crate::refusal::{SendRefusal, StorageRefusal};
use crate::routing::home_shard_of_user;

/// Envelopes sent to a device and not yet acknowledged, at most. 256 keeps a fast
/// client busy across a 100 ms round trip at ~2,500 messages/s, while bounding what a
/// slow one holds in flight.
pub const DELIVERY_WINDOW: u64 = 256;

/// Whether an envelope is a client's message (not a receipt, notice or group event).
fn is_message(kind: &ArchivedEnvelopeKind) -> bool {
    matches!(
        kind,
        ArchivedEnvelopeKind::Text | ArchivedEnvelopeKind::Media | ArchivedEnvelopeKind::Control
    )
}

/// Feeds `conn` from its device's mailbox, within its delivery window and output bound.
pub fn pump<S: Storage>(shared: &mut Shared<S>, conn: ConnId) {
    let now_ms = shared.now_ms();
    let Some(c) = shared.conns.get_mut(conn) else { return };
    let ConnState::Authenticated { user_id, device_id } = c.state else { return };
    let device = (user_id, device_id);
    if c.closing || c.outbound.len() >= OUTBOUND_BYTES_MAX {
        return;
    }
    let room = DELIVERY_WINDOW.saturating_sub(c.deliver_cursor.saturating_sub(c.acked_through));
    let Some(handle) = shared.shards.home_of(user_id) else { return };
    if room == 0 {
        return;
    }
    let shard = handle.borrow();
    let read = shard.read_mailbox(device, c.deliver_cursor, room as usize, now_ms);
    let (mut messages, mut receipts) = (0, 0);
    for entry in &read.entries {
        if c.outbound.len() >= OUTBOUND_BYTES_MAX {
            break;
        }
        let written = encode_deliver(
            &mut c.outbound,
            0,
            entry.mailbox_seq,
            entry.envelope,
            c.max_frame_bytes,
        );
        if written.is_err() {
            tracing::warn!(
                user_id,
                device_id,
                seq = entry.mailbox_seq,
                "envelope larger than the frame limit"
            );
        }
        c.deliver_cursor = entry.mailbox_seq + 1;
        let Ok(envelope) = rkyv::access::<ArchivedEnvelope, Failure>(entry.envelope) else {
            continue;
        };
        if is_message(&envelope.kind) {
            messages += 1;
            let waited_ms = now_ms.saturating_sub(envelope.server_time_ms.to_native());
            shared.histograms.send_to_deliver.observe(waited_ms as f64 / 1e3);
        } else if envelope.kind == ArchivedEnvelopeKind::Receipt {
            receipts += 1;
        }
    }
    if read.entries.is_empty() {
        // Skip what is expired or corrupt (reported by the engine) at the head.
        c.deliver_cursor = c.deliver_cursor.max(read.next_seq.min(shard.mailbox_next_seq(device)));
    }
    for corrupt in &read.corrupt {
        tracing::error!(%corrupt, user_id, device_id, "corrupt envelope not delivered");
    }
    let delivered = !read.entries.is_empty();
    drop(shard);
    if delivered {
        shared.counters.messages_delivered += messages;
        shared.counters.receipts_delivered += receipts;
        shared.conns.wake(conn);
    }
}

/// The device restarts delivery from `from` (never before what it acknowledged).
pub fn resync<S: Storage>(shared: &mut Shared<S>, conn: ConnId, from: u64) {
    if let Some(c) = shared.conns.get_mut(conn) {
        c.deliver_cursor = from.max(c.acked_through);
    }
    pump(shared, conn);
}

/// Whether an acknowledgement tells the senders: `DeliveryAck` does (delivered
/// receipts), `DiscardAck` (what the device could not read) does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Receipts {
    /// Delivered receipts to the senders of the acknowledged messages.
    Send,
    /// None: the device could not read them.
    Withhold,
}

/// The device received everything up to `up_to`: drops it from the mailbox, sends the
/// senders their delivered receipts (unless `receipts` withholds them), and feeds the
/// device more.
pub fn acknowledge<S: Storage>(
    shared: &mut Shared<S>,
    conn: ConnId,
    me: (UserId, DeviceId),
    up_to: u64,
    receipts: Receipts,
) {
    // Only what this connection was sent can be acknowledged: an ack beyond it (a bug or
    // a hostile client) must not delete envelopes the device never received.
    let Some((acked_through, cursor)) =
        shared.conns.get(conn).map(|c| (c.acked_through, c.deliver_cursor))
    else {
        return;
    };
    if cursor <= acked_through || up_to < acked_through {
        return;
    }
    let up_to = up_to.min(cursor - 1);
    let Some(handle) = shared.shards.home_of(me.0).cloned() else { return };
    let receipts = match receipts {
        Receipts::Send => receipts_for(shared, &handle, me, acked_through, up_to),
        Receipts::Withhold => BTreeMap::new(),
    };
    if let Err(error) = handle.borrow_mut().ack(me, up_to) {
        let ty = MessageType::DeliveryAck.code();
        return shared.conns.refuse(conn, 0, ty, &StorageRefusal::of(&error));
    }
    if let Some(c) = shared.conns.get_mut(conn) {
        c.acked_through = c.acked_through.max(up_to.saturating_add(1)).min(c.deliver_cursor);
    }
    for ((sender, group), message_ids) in receipts {
        let body = ReceiptBody {
            kind: ReceiptKind::Delivered,
            by_user: me.0,
            by_device: me.1,
            conversation: group.map_or(Conversation::User(me.0), Conversation::Group),
            message_ids,
            time_ms: shared.now_ms(),
        };
        // A receipt that cannot be stored is not the acking device's problem: logged there.
        tell_server_envelope(shared, sender, me, EnvelopeKind::Receipt, &body);
    }
    pump(shared, conn);
}

/// The delivered receipts owed for `from..=up_to`, grouped by sender (a group message's
/// receipt names the group: the sender counts them per message).
fn receipts_for<S: Storage>(
    shared: &Shared<S>,
    handle: &tern_engine::ShardHandle<S>,
    me: (UserId, DeviceId),
    from: u64,
    up_to: u64,
) -> BTreeMap<(UserId, Option<GroupId>), Vec<MessageId>> {
    let mut receipts: BTreeMap<(UserId, Option<GroupId>), Vec<MessageId>> = BTreeMap::new();
    let shard = handle.borrow();
    let count = up_to.saturating_add(1).saturating_sub(from) as usize;
    let read = shard.read_mailbox(me, from, count, shared.now_ms());
    for entry in read.entries.iter().filter(|e| e.mailbox_seq <= up_to) {
        let Ok(envelope) = rkyv::access::<ArchivedEnvelope, Failure>(entry.envelope) else {
            continue;
        };
        let sender = envelope.sender_user.to_native();
        if !is_message(&envelope.kind) || sender == me.0 {
            continue;
        }
        let group = match &envelope.conversation {
            ArchivedConversation::Group(group) => Some(group.to_native()),
            ArchivedConversation::User(_) => None,
        };
        receipts.entry((sender, group)).or_default().push(envelope.server_message_id.to_native());
    }
    receipts
}

/// Sends a server-made envelope to `to_user`'s core with nobody waiting for the answer.
pub fn tell_server_envelope<S: Storage, T>(
    shared: &mut Shared<S>,
    to_user: UserId,
    from: (UserId, DeviceId),
    kind: EnvelopeKind,
    body: &T,
) where
    T: for<'a, 'b> rkyv::Serialize<tern_wire::WireSerializer<'a, 'b>>,
{
    let shard = home_shard_of_user(to_user);
    let Some(body) = archive(body) else { return };
    if shared.shards.exists(shard) {
        let to = shared.shards.address_of(shard);
        let call = StoreServerEnvelope { to_user, from, kind, body, now_ms: shared.now_ms() };
        shared.outbox.ask_without_answer(to, call);
    }
}

/// Whether `sender` may queue one more envelope of about `incoming` bytes for `device`
/// (homed here): a sender may hold its share of a mailbox's limits and no more, so that
/// flooding somebody's mailbox refuses the flooder's messages instead of dropping
/// everyone else's. The server and the device's own user are not held to it.
fn within_sender_share<S: Storage>(
    shared: &Shared<S>,
    device: (UserId, DeviceId),
    sender: UserId,
    incoming: u64,
) -> bool {
    let percent = shared.config.mailbox_sender_share_percent;
    if sender == 0 || sender == device.0 || percent >= 100 {
        return true; // (At 100 % the mailbox's own limits decide: the oldest go.)
    }
    let Some(handle) = shared.shards.home_of(device.0) else { return true };
    let held = handle.borrow_mut().mailbox_sender_share(device, sender);
    let max_entries = (shared.config.mailbox_max_messages * percent / 100).max(1);
    let max_bytes = shared.config.mailbox_max_bytes / 100 * percent;
    held.entries < max_entries && held.bytes + incoming <= max_bytes
}

/// Whether `sender` may add an envelope of about `incoming` bytes to `device`'s mailbox
/// (homed here): within its share, and with room left. A full mailbox takes nothing more
/// from others — nothing it holds is dropped for them, so what a sender was told is
/// stored stays stored; its owner's own copies make room instead ([`make_room`]).
pub fn admit<S: Storage>(
    shared: &Shared<S>,
    device: (UserId, DeviceId),
    sender: UserId,
    incoming: u64,
) -> Result<(), SendRefusal> {
    if sender == device.0 {
        return Ok(());
    }
    if !within_sender_share(shared, device, sender, incoming) {
        return Err(SendRefusal::OverMailboxShare);
    }
    let Some(handle) = shared.shards.home_of(device.0) else { return Ok(()) };
    let mut shard = handle.borrow_mut();
    let (len, bytes) = (shard.mailbox_len(device), shard.mailbox_bytes(device));
    if len >= shared.config.mailbox_max_messages
        || bytes + incoming > shared.config.mailbox_max_bytes
    {
        return Err(SendRefusal::MailboxFull);
    }
    Ok(())
}

/// What a full mailbox drops and who is told.
struct Overflow {
    count: u64,
    /// Messages dropped per sender.
    lost: BTreeMap<UserId, Vec<MessageId>>,
    /// Messages announced (earlier `Dropped` notices that go too hand their count on).
    announced: u64,
}

/// Keeps `device`'s mailbox (homed here) within its quota before an envelope of about
/// `incoming` bytes joins it.
pub fn make_room<S: Storage>(shared: &mut Shared<S>, device: (UserId, DeviceId), incoming: u64) {
    let Some(handle) = shared.shards.home_of(device.0).cloned() else { return };
    let (len, bytes, head) = {
        let mut shard = handle.borrow_mut();
        (shard.mailbox_len(device), shard.mailbox_bytes(device), shard.mailbox_head_seq(device))
    };
    let Some(drop) = plan_drop(shared, &handle, device, (len, bytes, head), incoming) else {
        return;
    };
    let dropped = match handle.borrow_mut().ack(device, head + drop.count - 1) {
        Ok(dropped) => dropped,
        Err(error) => return tracing::warn!(%error, "could not drop envelopes from a full mailbox"),
    };
    if dropped == 0 {
        return; // Only envelopes still in flight to the disk: over quota until then.
    }
    let new_head = head + dropped;
    shared.counters.dropped_envelopes += dropped;
    tracing::warn!(user_id = device.0, device_id = device.1, dropped, "mailbox full");
    if let Some(c) = shared.conns.online(device).and_then(|conn| shared.conns.get_mut(conn)) {
        c.acked_through = c.acked_through.max(new_head);
        c.deliver_cursor = c.deliver_cursor.max(new_head);
    }
    announce_drop(shared, device, drop);
}

/// How many envelopes to drop, or `None` when the mailbox has room.
fn plan_drop<S: Storage>(
    shared: &Shared<S>,
    handle: &tern_engine::ShardHandle<S>,
    device: (UserId, DeviceId),
    (len, bytes, head): (u64, u64, u64),
    incoming: u64,
) -> Option<Overflow> {
    let (max_messages, max_bytes) =
        (shared.config.mailbox_max_messages, shared.config.mailbox_max_bytes);
    if len < max_messages && bytes + incoming <= max_bytes {
        return None;
    }
    // Down to 90 % of each limit, with room for the notice and the newcomer.
    let keep_messages = (max_messages * 9 / 10).min(max_messages.saturating_sub(2));
    let by_count = len.saturating_sub(keep_messages);
    let average = bytes / len.max(1);
    let over = (bytes + incoming).saturating_sub(max_bytes * 9 / 10);
    let by_bytes = if bytes + incoming > max_bytes { over.div_ceil(average.max(1)) } else { 0 };
    let count = by_count.max(by_bytes).min(len);
    if count == 0 {
        return None;
    }
    let mut drop = Overflow { count, lost: BTreeMap::new(), announced: 0 };
    let shard = handle.borrow();
    // At time 0 nothing counts as expired: every dropped message is announced.
    let read = shard.read_mailbox(device, head, count as usize, 0);
    for entry in &read.entries {
        let Ok(envelope) = rkyv::access::<ArchivedEnvelope, Failure>(entry.envelope) else {
            continue;
        };
        if is_message(&envelope.kind) {
            let id = envelope.server_message_id.to_native();
            drop.lost.entry(envelope.sender_user.to_native()).or_default().push(id);
            drop.announced += 1;
        } else if let Ok(tern_wire::EnvelopeContent::Notice(ArchivedNoticeBody::Dropped {
            count,
        })) = envelope.content()
        {
            drop.announced += count.to_native();
        }
    }
    Some(drop)
}

/// Tells the device (a `Dropped` notice in its mailbox) and each sender (`SentDropped`).
fn announce_drop<S: Storage>(shared: &mut Shared<S>, device: (UserId, DeviceId), drop: Overflow) {
    let server = (0, 0);
    if drop.announced > 0 {
        let notice = archive(&NoticeBody::Dropped { count: drop.announced });
        let appended = notice.map(|marker| {
            append_envelope_to(shared, vec![device], server, EnvelopeKind::Notice, &marker)
        });
        if let Some(Err(error)) = appended {
            tracing::warn!(%error, "could not queue a dropped-messages notice");
        }
    }
    for (sender, message_ids) in drop.lost {
        if sender != device.0 {
            let notice = NoticeBody::SentDropped { recipient: device.0, message_ids };
            tell_server_envelope(shared, sender, server, EnvelopeKind::Notice, &notice);
        }
    }
}
