//! Appending envelopes to mailboxes, and the calls that ask for it.
//!
//! An envelope is laid out once ([`tern_wire::EnvelopeRef`]) and appended to the home
//! shard of its owner, whose mailbox makes room first if it is full. Each append marks
//! the device dirty (delivered once the record is durable) and wakes it by push if it
//! is offline. What the callers wait for is returned as [`Waits`].

use tern_engine::{Storage, WriteError};
use tern_wire::messages::{
    ArchivedE2eType, ArchivedReceiptBody, ArchivedReceiptKind, Conversation, DeviceId, E2eType,
    EnvelopeKind, SendAck, UserId,
};
use tern_wire::EnvelopeRef;

use super::mailbox::{admit, make_room};
use super::server_envelope::append_envelope_to;
use crate::core::shards::Waits;
use crate::core::shared::Shared;
use crate::core::wakeups::Wakeups;
use crate::mesh::calls::{StoreCopies, StoreServerEnvelope, Stored};
use crate::mesh::{EnvelopeMeta, ReplyTo};
use crate::refusal::{SendRefusal, StorageRefusal};
use crate::routing::home_shard_of_user;

/// The wire's e2e type of an archived one.
pub fn e2e_type_of(archived: &ArchivedE2eType) -> E2eType {
    match archived {
        ArchivedE2eType::Plain => E2eType::Plain,
        ArchivedE2eType::OlmPreKey => E2eType::OlmPreKey,
        ArchivedE2eType::OlmMessage => E2eType::OlmMessage,
        ArchivedE2eType::Megolm => E2eType::Megolm,
    }
}

/// Compares the copies a sender gave (sorted, no repeats) with the devices that must
/// get one.
pub fn check_copies(
    expected: &[(UserId, DeviceId)],
    given: &[(UserId, DeviceId)],
) -> Result<(), SendRefusal> {
    let missing: Vec<_> =
        expected.iter().filter(|d| given.binary_search(d).is_err()).copied().collect();
    let extra: Vec<_> = given.iter().filter(|d| !expected.contains(d)).copied().collect();
    if missing.is_empty() && extra.is_empty() {
        Ok(())
    } else {
        Err(SendRefusal::StaleDevices { missing, extra })
    }
}

/// A retry of a send `peer`'s shard (homed here) accepted before: the original ack, and
/// the wait for it to be durable.
pub fn duplicate_of<S: Storage>(
    shared: &Shared<S>,
    sender: (UserId, DeviceId),
    peer: UserId,
    client_message_id: u64,
) -> Option<(SendAck, (u32, u64))> {
    let peer_shard = home_shard_of_user(peer);
    let shard = shared.shards.local(peer_shard)?.borrow();
    let server_message_id = shard.lookup_send(sender.0, sender.1, client_message_id)?;
    let ack = SendAck {
        client_message_id,
        server_message_id,
        server_time_ms: shared.now_ms(),
        duplicate: true,
    };
    Some((ack, (peer_shard, shard.appended_seq())))
}

/// Appends one envelope per copy to its owner's mailbox (every owner homed on this
/// core); returns what the sent tick waits for.
pub fn append_copies<'c, S: Storage>(
    shared: &mut Shared<S>,
    wakeups: &mut Wakeups,
    meta: &EnvelopeMeta,
    copies: impl Iterator<Item = ((UserId, DeviceId), E2eType, &'c [u8])>,
) -> Result<Waits, WriteError> {
    let (user_id, device_id) = meta.sender;
    let mut waits: Waits = Vec::new();
    for (owner, e2e_type, ciphertext) in copies {
        let shard_id = home_shard_of_user(owner.0);
        if shared.shards.local(shard_id).is_none() {
            tracing::error!(?owner, "a copy for a device homed on another core");
            continue;
        }
        if owner.0 == user_id {
            // The sender's own devices' copies make room; others' were admitted.
            make_room(shared, owner, ciphertext.len() as u64);
        }
        let Some(handle) = shared.shards.local(shard_id).cloned() else { continue };
        let mut shard = handle.borrow_mut();
        // The conversation as the mailbox owner sees it: the other party.
        let other = if owner.0 == meta.peer && meta.peer != user_id { user_id } else { meta.peer };
        let envelope = EnvelopeRef {
            server_message_id: meta.server_message_id,
            client_message_id: meta.client_message_id,
            server_time_ms: meta.server_time_ms,
            expires_ms: meta.expires_ms,
            sender_user: user_id,
            sender_device: device_id,
            conversation: Conversation::User(other),
            conversation_seq: shard.next_conversation_seq(owner, user_id),
            kind: meta.kind,
            e2e_type,
            body: ciphertext,
        };
        let appended = shard.append_envelope(&envelope, &[owner])?;
        drop(shard);
        match waits.iter_mut().find(|(s, _)| *s == shard_id) {
            Some(wait) => wait.1 = appended.record_seq,
            None => waits.push((shard_id, appended.record_seq)),
        }
        shared.durable.mark_dirty(owner, shard_id, appended.record_seq);
        wakeups.wake_if_offline(shared, owner);
    }
    Ok(waits)
}

/// The recipient's side of a cross-core send: block, dedup, device check, append.
pub fn serve_store_copies<S: Storage>(
    shared: &mut Shared<S>,
    wakeups: &mut Wakeups,
    call: StoreCopies,
    reply_to: Option<ReplyTo<StoreCopies>>,
) {
    let (outcome, waits) = store_copies(shared, wakeups, &call);
    shared.answer_when_durable(reply_to, outcome, waits);
}

fn store_copies<S: Storage>(
    shared: &mut Shared<S>,
    wakeups: &mut Wakeups,
    call: &StoreCopies,
) -> (Result<Stored, SendRefusal>, Waits) {
    let StoreCopies { meta, copies } = call;
    let (sender, peer) = (meta.sender, meta.peer);
    if shared.shards.blocked_by(peer, sender.0) {
        // Like a delivery that never happens: the sender learns nothing of the block.
        return (Ok(Stored::New), Vec::new());
    }
    if let Some((ack, wait)) = duplicate_of(shared, sender, peer, meta.client_message_id) {
        return (Ok(Stored::Duplicate(ack.server_message_id)), vec![wait]);
    }
    let Some(mut expected) = shared.shards.devices_of(peer) else {
        return (Err(SendRefusal::NoSuchUser), Vec::new());
    };
    expected.retain(|d| *d != sender);
    let mut given: Vec<_> = copies.iter().map(|c| (peer, c.device_id)).collect();
    given.sort_unstable();
    if let Err(refusal) = check_copies(&expected, &given) {
        return (Err(refusal), Vec::new());
    }
    let admitted = copies
        .iter()
        .try_for_each(|c| admit(shared, (peer, c.device_id), sender.0, c.ciphertext.len() as u64));
    if let Err(refusal) = admitted {
        return (Err(refusal), Vec::new());
    }
    let copies = copies.iter().map(|c| ((peer, c.device_id), c.e2e_type, &c.ciphertext[..]));
    match append_copies(shared, wakeups, meta, copies) {
        Ok(waits) => (Ok(Stored::New), waits),
        Err(error) => {
            tracing::error!(%error, "storage refused a write");
            (Err(SendRefusal::Storage { refusal: StorageRefusal::of(&error) }), Vec::new())
        }
    }
}

/// Serves a server-made envelope for a user homed here.
pub fn serve_server_envelope<S: Storage>(
    shared: &mut Shared<S>,
    call: StoreServerEnvelope,
    reply_to: Option<ReplyTo<StoreServerEnvelope>>,
) {
    let StoreServerEnvelope { to_user, from, kind, body, .. } = call;
    match append_server_envelope(shared, to_user, from, kind, &body) {
        Ok(waits) => shared.answer_when_durable(reply_to, Ok(()), waits),
        Err(error) => {
            tracing::warn!(%error, to_user, "could not store a server envelope");
            shared.answer(reply_to, Err(StorageRefusal::of(&error)));
        }
    }
}

/// Appends a server-made envelope with an archived `body` to every device of
/// `to_user`, homed here (nothing if there is no such user, for a receipt from someone
/// `to_user` blocked, or for a read receipt to someone who turned read receipts off; not
/// to devices whose mailbox is full or holds `from`'s whole share of it).
pub fn append_server_envelope<S: Storage>(
    shared: &mut Shared<S>,
    to_user: UserId,
    from: (UserId, DeviceId),
    kind: EnvelopeKind,
    body: &[u8],
) -> Result<Waits, WriteError> {
    if kind == EnvelopeKind::Receipt && shared.shards.blocked_by(to_user, from.0) {
        return Ok(Vec::new()); // A receipt is a message from its reader: blocked alike.
    }
    if kind == EnvelopeKind::Receipt && shared.shards.read_receipts_off(to_user) {
        let read = rkyv::access::<ArchivedReceiptBody, rkyv::rancor::Failure>(body)
            .is_ok_and(|r| r.kind == ArchivedReceiptKind::Read);
        if read {
            return Ok(Vec::new());
        }
    }
    let mut devices = shared.shards.devices_of(to_user).unwrap_or_default();
    // Not to a full mailbox, nor past the sender's share of it: a receipt or a notice is
    // dropped there (nothing the mailbox holds is dropped for it).
    devices.retain(|device| admit(shared, *device, from.0, body.len() as u64).is_ok());
    append_envelope_to(shared, devices, from, kind, body)
}
