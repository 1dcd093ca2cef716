//! Frames in: which subsystem handles each validated frame, given the connection's state.
//!
//! Before `Hello` only `Hello`; before auth only registration, auth and linking (and
//! `Ping`); after auth everything a device does. Each arm hands the frame to one
//! subsystem with the parts it needs; a refusal is written by that subsystem through
//! `Conns::refuse`. The arms are grouped by subsystem in `authenticated`.

use rkyv::rancor::Failure;
use tern_engine::{StateOp, Storage};
use tern_wire::messages::{
    ArchivedConversation, ArchivedSendMessage, DeviceId, MessageId, PhoneHash, Pong,
    PrivacySettings, ProfileSet, Report, UserId,
};
use tern_wire::{Frame, Message};

use super::accounts;
use super::budgets::Costly;
use super::conns::{ConnId, ConnState};
use super::deletion::{self, Reach};
use super::delivery::{mailbox, ttl_ms, Target};
use super::handshake;
use super::keys;
use super::parts::Parts;
use super::presence;
use super::shared::Shared;
use crate::mesh::calls::OrderGroupMessage;
use crate::mesh::EnvelopeMeta;
use crate::refusal::{retry_hint, MediaRefusal, SendRefusal, SessionRefusal};

/// Handles one validated frame from `conn`.
pub fn handle<S: Storage>(
    shared: &mut Shared<S>,
    parts: &mut Parts,
    conn: ConnId,
    frame: &Frame<'_>,
) {
    shared.counters.frames_in += 1;
    let Some(state) = shared.conns.get(conn).map(|c| c.state) else { return };
    shared.conns.touch(conn, shared.now.mono_ms());
    shared.conns.charge_request(conn, &frame.message);
    let rid = frame.header.request_id;
    let ty = frame.header.message_type.code();
    let now_ms = shared.now.mono_ms();
    match (state, frame.message) {
        (ConnState::AwaitHello, Message::Hello(hello)) => {
            handshake::hello(shared, conn, rid, hello)
        }
        (ConnState::AwaitHello, _) => {
            shared.conns.fatal(conn, rid, ty, &SessionRefusal::NotHello, now_ms)
        }
        (_, Message::Hello(_)) => {
            shared.conns.fatal(conn, rid, ty, &SessionRefusal::HelloAgain, now_ms)
        }
        (_, Message::Ping(ping)) => {
            shared.conns.send(conn, rid, &Pong { nonce: ping.nonce.to_native() })
        }
        (_, Message::Pong(_)) => {}
        (ConnState::Open, message)
            if handshake::answered_by_another_node(shared, conn, rid, &message) => {}
        (ConnState::Open, Message::RequestCode(request)) => {
            parts.registration.request_code(shared, conn, rid, request)
        }
        (ConnState::Open, Message::Verify(verify)) => {
            parts.registration.verify(shared, conn, rid, verify)
        }
        (ConnState::Open, Message::Auth(auth)) => {
            let Parts { presence, wakeups, .. } = parts;
            if handshake::auth(shared, presence, wakeups, conn, rid, auth) {
                mailbox::pump(shared, conn);
            }
        }
        (ConnState::Open, Message::LinkRequest(request)) => {
            parts.linking.request(shared, conn, rid, request)
        }
        (ConnState::Open, _) => shared.conns.refuse(conn, rid, ty, &SessionRefusal::AuthRequired),
        (ConnState::Authenticated { user_id, device_id }, message) => {
            authenticated(shared, parts, (conn, rid, ty), (user_id, device_id), message)
        }
    }
}

/// The frames of an authenticated device.
fn authenticated<S: Storage>(
    shared: &mut Shared<S>,
    parts: &mut Parts,
    request: (ConnId, u32, u16),
    me: (UserId, DeviceId),
    message: Message<'_>,
) {
    let (conn, rid, ty) = request;
    if let Some(kind) = Costly::of(&message) {
        if let Err(wait_ms) = parts.budgets.take(kind, me, shared.now_ms()) {
            let refusal = SessionRefusal::OverBudget {
                what: kind.name(),
                retry_after_ms: retry_hint(wait_ms),
            };
            return shared.conns.refuse(conn, rid, ty, &refusal);
        }
    }
    match message {
        Message::SendMessage(send) => send_message(shared, parts, (conn, rid), me, send),
        Message::DeliveryAck(ack) => {
            let up_to = ack.up_to_mailbox_seq.to_native();
            mailbox::acknowledge(shared, conn, me, up_to, mailbox::Receipts::Send)
        }
        Message::DiscardAck(ack) => {
            let up_to = ack.up_to_mailbox_seq.to_native();
            mailbox::acknowledge(shared, conn, me, up_to, mailbox::Receipts::Withhold)
        }
        Message::Resync(resync) => {
            mailbox::resync(shared, conn, resync.from_mailbox_seq.to_native())
        }
        Message::SendReceipt(receipt) => {
            parts.delivery.receipts().send_read(shared, conn, rid, me, receipt)
        }
        Message::DeleteForEveryone(delete) => {
            let ids: Vec<MessageId> = delete.message_ids.iter().map(|i| i.to_native()).collect();
            parts.delivery.receipts().delete_for_everyone(
                shared,
                (conn, rid),
                me,
                delete.peer.to_native(),
                ids,
            )
        }
        Message::Typing(typing) => {
            if let ArchivedConversation::User(peer) = &typing.conversation {
                presence::route_typing(shared, peer.to_native(), me, typing.active);
            }
        }
        Message::PresenceSubscribe(subscribe) => {
            let targets = subscribe.user_ids.iter().map(|u| u.to_native()).collect();
            parts.presence.subscribe(shared, conn, rid, me.0, targets)
        }
        Message::UploadKeys(upload) => parts.keys.upload(shared, conn, rid, me, upload),
        Message::FetchBundles(fetch) => parts.keys.fetch(shared, conn, rid, me, fetch),
        Message::DeviceListRequest(_) => keys::device_list(shared, conn, rid, me),
        Message::LinkApprove(approve) => {
            parts.linking.approve(shared, conn, rid, me, approve.code.as_str())
        }
        Message::GroupUpdate(update) => parts.groups.update(shared, conn, rid, me, update),
        Message::GroupInfoRequest(info) => {
            parts.groups.read(shared, conn, rid, me.0, info.group_id.to_native())
        }
        Message::MediaBegin(_)
        | Message::MediaChunk(_)
        | Message::MediaStatusRequest(_)
        | Message::MediaCommit(_)
        | Message::MediaDownload(_) => media_frame(shared, parts, (conn, rid, ty), me.0, &message),
        other => account_frame(shared, parts, request, me, other),
    }
}

/// The account frames of an authenticated device.
fn account_frame<S: Storage>(
    shared: &mut Shared<S>,
    parts: &mut Parts,
    (conn, rid, ty): (ConnId, u32, u16),
    me: (UserId, DeviceId),
    message: Message<'_>,
) {
    if let Err(refusal) = accounts::check_quota(shared, me.0, &message) {
        return shared.conns.refuse(conn, rid, ty, &refusal);
    }
    let presence = &mut parts.presence;
    let setting = |op: StateOp| (op, (conn, rid, ty));
    let state_op = match message {
        Message::Block(block) => setting(StateOp::SetBlocked {
            user_id: me.0,
            other: block.user_id.to_native(),
            blocked: true,
        }),
        Message::Unblock(unblock) => setting(StateOp::SetBlocked {
            user_id: me.0,
            other: unblock.user_id.to_native(),
            blocked: false,
        }),
        Message::SetContacts(contacts) => {
            let contacts = contacts.user_ids.iter().map(|u| u.to_native()).collect();
            setting(StateOp::SetContacts { user_id: me.0, contacts })
        }
        Message::PrivacySettings(privacy) => {
            match rkyv::deserialize::<PrivacySettings, Failure>(privacy) {
                Ok(privacy) => setting(StateOp::SetPrivacy { user_id: me.0, privacy }),
                Err(_) => return shared.conns.refuse(conn, rid, ty, &SessionRefusal::Unreadable),
            }
        }
        other => return other_frame(shared, parts, (conn, rid, ty), me, other),
    };
    let (op, request) = state_op;
    accounts::set_state(shared, presence, request, me.0, op);
}

/// The remaining frames of an authenticated device.
fn other_frame<S: Storage>(
    shared: &mut Shared<S>,
    parts: &mut Parts,
    (conn, rid, ty): (ConnId, u32, u16),
    me: (UserId, DeviceId),
    message: Message<'_>,
) {
    match message {
        Message::PublishDeviceList(list) => {
            keys::publish_device_list(shared, (conn, rid), me, &list.device_list)
        }
        Message::ContactDiscover(discover) => {
            let hashes: Vec<PhoneHash> = discover.hashes.to_vec();
            parts.accounts.discover(shared, conn, rid, me.0, hashes)
        }
        Message::ProfileGet(get) => {
            parts.accounts.profile_get(shared, conn, rid, me.0, get.user_id.to_native())
        }
        Message::ProfileSet(set) => match rkyv::deserialize::<ProfileSet, Failure>(set) {
            Ok(set) => accounts::profile_set(shared, &mut parts.presence, conn, rid, me.0, set),
            Err(_) => shared.conns.refuse(conn, rid, ty, &SessionRefusal::Unreadable),
        },
        Message::Report(report) => match rkyv::deserialize::<Report, Failure>(report) {
            Ok(report) => accounts::report(shared, &mut parts.presence, conn, rid, me.0, report),
            Err(_) => shared.conns.refuse(conn, rid, ty, &SessionRefusal::Unreadable),
        },
        Message::PrivacyGet(_) => accounts::privacy_get(shared, conn, rid, me.0),
        Message::Unlink(unlink) => accounts::unlink(
            shared,
            &mut parts.wakeups,
            conn,
            rid,
            me,
            unlink.device_id.to_native(),
        ),
        Message::ExportRequest(_) => parts.exports.start(shared, conn, rid, me.0),
        Message::DeleteAccount(delete) => {
            let Parts { accounts, media, presence, wakeups, .. } = parts;
            let reach = Reach { accounts, media, presence, wakeups };
            deletion::delete_account(shared, reach, (conn, rid), me, delete.phone.as_str())
        }
        Message::SetRegistrationLock(lock) => {
            parts.registration.set_lock(shared, conn, rid, me, lock)
        }
        Message::PushRegister(register) => parts.wakeups.register(shared, conn, rid, me, register),
        Message::Auth(_) | Message::Verify(_) | Message::RequestCode(_) => {
            shared.conns.refuse(conn, rid, ty, &SessionRefusal::AlreadyAuthenticated)
        }
        _ => shared.conns.refuse(conn, rid, ty, &SessionRefusal::Unsupported),
    }
}

/// A send: the rules every send obeys, then the 1:1 path or the group's core.
fn send_message<S: Storage>(
    shared: &mut Shared<S>,
    parts: &mut Parts,
    (conn, rid): (ConnId, u32),
    me: (UserId, DeviceId),
    send: &ArchivedSendMessage,
) {
    let client_message_id = send.client_message_id.to_native();
    let sent = match parts.delivery.check(shared, me, send) {
        Ok((kind, Target::User(peer))) => {
            let Parts { delivery, wakeups, media, .. } = parts;
            delivery.send_to_user(shared, wakeups, media, (conn, rid), me, send, (kind, peer))
        }
        Ok((kind, Target::Group(group_id))) => {
            // One ciphertext (the sender's Megolm session) for every member device.
            let [copy] = send.copies.as_slice() else {
                return shared.conns.refuse_send(
                    conn,
                    rid,
                    client_message_id,
                    &SendRefusal::GroupCopyCount,
                );
            };
            let now_ms = shared.now_ms();
            let meta = EnvelopeMeta {
                server_message_id: 0,
                client_message_id,
                server_time_ms: now_ms,
                expires_ms: now_ms + ttl_ms(&shared.config, send.ttl_s.to_native()),
                sender: me,
                peer: 0,
                kind,
            };
            let e2e_type = super::delivery::store::e2e_type_of(&copy.e2e_type);
            let call = OrderGroupMessage {
                meta,
                group_id,
                e2e_type,
                ciphertext: copy.ciphertext.to_vec(),
            };
            parts.groups.send(shared, conn, rid, call);
            Ok(())
        }
        Err(refusal) => Err(refusal),
    };
    if let Err(refusal) = sent {
        shared.conns.refuse_send(conn, rid, client_message_id, &refusal);
    }
}

/// The media frames of an authenticated user.
fn media_frame<S: Storage>(
    shared: &mut Shared<S>,
    parts: &mut Parts,
    (conn, rid, ty): (ConnId, u32, u16),
    me: UserId,
    message: &Message<'_>,
) {
    let media = &mut parts.media;
    let result: Result<(), MediaRefusal> = match message {
        Message::MediaBegin(begin) => media.begin(shared, conn, rid, me, begin),
        Message::MediaChunk(chunk) => media.chunk(shared, conn, me, chunk),
        Message::MediaStatusRequest(request) => {
            media.status(shared, conn, rid, me, &request.media_id)
        }
        Message::MediaCommit(commit) => media.commit(shared, conn, rid, me, commit),
        Message::MediaDownload(download) => {
            let request =
                (download.media_id, download.offset.to_native(), download.length.to_native());
            media.download(shared, conn, rid, me, request)
        }
        _ => Ok(()),
    };
    if let Err(refusal) = result {
        shared.conns.refuse(conn, rid, ty, &refusal);
    }
}

/// Undecodable input: a typed error, then the connection closes.
pub fn malformed<S: Storage>(shared: &mut Shared<S>, conn: ConnId, error: tern_wire::DecodeError) {
    let refusal = SessionRefusal::Malformed { code: error.error_code(), why: error.to_string() };
    shared.conns.fatal(conn, 0, 0, &refusal, shared.now.mono_ms());
}
