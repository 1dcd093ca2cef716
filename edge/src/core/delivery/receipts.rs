//! Read receipts and deletion for everyone: requests answered once another core (or
//! this one) has stored or removed what they name.
//!
//! A read receipt is a server-made envelope for the sender's devices, stored on the
//! sender's home core ([`StoreServerEnvelope`]); the reader gets `Done` once it is
//! durable there. Who turned read receipts off neither sends nor receives them. A
//! device sends them only to users it received messages from ([`check_read`]). A
//! deletion for everyone removes the sender's queued copies from the peer's mailboxes
//! (on the peer's core, [`UnqueueMessages`]) and from the sender's own other devices'
//! (here), then answers `Done`.

use std::collections::HashMap;

use tern_engine::Storage;
use tern_wire::messages::{
    ArchivedConversation, ArchivedSendReceipt, Conversation, DeviceId, Done, EnvelopeKind,
    MessageId, ReceiptBody, ReceiptKind, UserId,
};
use tern_wire::MessageType;

use super::server_envelope::archive;
use crate::core::conns::ConnId;
use crate::core::shards::Waits;
use crate::core::shared::Shared;
use crate::mesh::calls::{StoreServerEnvelope, UnqueueMessages};
use crate::mesh::ReplyTo;
use crate::refusal::{ReceiptRefusal, StorageRefusal};
use crate::routing::home_shard_of_user;

/// Receipts and deletions waiting for answers.
#[derive(Debug, Default)]
pub struct Receipts {
    /// Read receipts stored elsewhere: token → (connection, request).
    read: HashMap<u64, (ConnId, u32)>,
    /// Deletions waiting for the peer's core: token → (connection, request, local waits).
    deletions: HashMap<u64, (ConnId, u32, Waits)>,
}

impl Receipts {
    /// A device read messages: a read receipt for their sender.
    pub fn send_read<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        receipt: &ArchivedSendReceipt,
    ) {
        let to_user = receipt.to_user.to_native();
        let shard = home_shard_of_user(to_user);
        if let Err(refusal) = check_read(shared, me, to_user, receipt) {
            return shared.conns.refuse(conn, rid, MessageType::SendReceipt.code(), &refusal);
        }
        if shared.shards.read_receipts_off(me.0) || !shared.shards.exists(shard) {
            // Who turns read receipts off neither sends nor receives them.
            return shared.conns.send(conn, rid, &Done {});
        }
        let body = ReceiptBody {
            kind: ReceiptKind::Read,
            by_user: me.0,
            by_device: me.1,
            conversation: match &receipt.conversation {
                ArchivedConversation::Group(group) => Conversation::Group(group.to_native()),
                ArchivedConversation::User(_) => Conversation::User(me.0),
            },
            message_ids: receipt.message_ids.iter().map(|id| id.to_native()).collect(),
            time_ms: shared.now_ms(),
        };
        let Some(body) = archive(&body) else { return };
        let call = StoreServerEnvelope {
            to_user,
            from: me,
            kind: EnvelopeKind::Receipt,
            body,
            now_ms: shared.now_ms(),
        };
        let token = shared.outbox.ask(shared.shards.address_of(shard), call);
        self.read.insert(token, (conn, rid));
    }

    /// The sender's core stored (or refused) a read receipt.
    pub fn on_read_stored<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        token: u64,
        answer: Result<(), StorageRefusal>,
    ) {
        let Some((conn, rid)) = self.read.remove(&token) else { return };
        match answer {
            Ok(()) => shared.conns.send(conn, rid, &Done {}),
            Err(refusal) => {
                shared.conns.refuse(conn, rid, MessageType::SendReceipt.code(), &refusal)
            }
        }
    }

    /// Deletes messages for everyone: their copies still queued for the peer's devices
    /// and this user's other devices. Only the sender's own messages are found.
    pub fn delete_for_everyone<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        (conn, rid): (ConnId, u32),
        me: (UserId, DeviceId),
        peer: UserId,
        message_ids: Vec<MessageId>,
    ) {
        let waits = unqueue(shared, me.0, me.0, &message_ids);
        let peer_shard = home_shard_of_user(peer);
        if peer == me.0 || !shared.shards.exists(peer_shard) {
            return shared.reply_when_durable(conn, rid, &Done {}, waits);
        }
        let call = UnqueueMessages { sender: me.0, from_user: peer, message_ids };
        let token = shared.outbox.ask(shared.shards.address_of(peer_shard), call);
        self.deletions.insert(token, (conn, rid, waits));
    }

    /// The peer's core removed its copies.
    pub fn on_unqueued<S: Storage>(&mut self, shared: &mut Shared<S>, token: u64) {
        let Some((conn, rid, waits)) = self.deletions.remove(&token) else { return };
        shared.reply_when_durable(conn, rid, &Done {}, waits);
    }
}

/// Message ids one read receipt may name.
pub const RECEIPT_MESSAGE_IDS_MAX: usize = 256;

/// A read receipt is for messages this device received: `to_user` must have sent it
/// something (the shard's per-sender numbering, kept across restarts, says so). A
/// stranger cannot send receipts to people who never wrote to it.
fn check_read<S: Storage>(
    shared: &Shared<S>,
    me: (UserId, DeviceId),
    to_user: UserId,
    receipt: &ArchivedSendReceipt,
) -> Result<(), ReceiptRefusal> {
    let count = receipt.message_ids.len();
    if count > RECEIPT_MESSAGE_IDS_MAX {
        return Err(ReceiptRefusal::TooManyIds { count, max: RECEIPT_MESSAGE_IDS_MAX });
    }
    let Some(handle) = shared.shards.home_of(me.0) else { return Ok(()) };
    if to_user == me.0 || handle.borrow().next_conversation_seq(me, to_user) > 1 {
        Ok(())
    } else {
        Err(ReceiptRefusal::NothingReceived)
    }
}

/// Serves a deletion for everyone of copies queued for a user homed here.
pub fn serve_unqueue<S: Storage>(
    shared: &mut Shared<S>,
    call: UnqueueMessages,
    reply_to: Option<ReplyTo<UnqueueMessages>>,
) {
    let waits = unqueue(shared, call.sender, call.from_user, &call.message_ids);
    shared.answer_when_durable(reply_to, (), waits);
}

/// Removes the queued copies of `sender`'s messages from the mailboxes of `from_user`'s
/// devices (homed here); returns what the answer waits for.
fn unqueue<S: Storage>(
    shared: &mut Shared<S>,
    sender: UserId,
    from_user: UserId,
    message_ids: &[MessageId],
) -> Waits {
    let shard_id = home_shard_of_user(from_user);
    let Some(handle) = shared.shards.local(shard_id).cloned() else { return Vec::new() };
    let mut waits = Vec::new();
    for device in shared.shards.devices_of(from_user).unwrap_or_default() {
        for &id in message_ids {
            let Some(seq) = handle.borrow().find_queued(device, sender, id) else { continue };
            match handle.borrow_mut().remove_queued(device, seq) {
                Ok(Some(record_seq)) => waits.push((shard_id, record_seq)),
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "could not remove a deleted message"),
            }
        }
    }
    waits
}
