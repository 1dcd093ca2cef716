//! A connection's life: `Hello`, auth, moving to its home core, deadlines, the close.
//!
//! Before registration or auth a connection may live on any core; [`route`] names the
//! core a frame must go to (registration where the phone number's shard lives, auth
//! where the user's home shard lives) and the runtime hands the connection over, with
//! its auth deadline ([`Session`]). After auth a connection sits beside its mailboxes:
//! one connection per device (a newer login replaces the older one), and the user's
//! first device connecting or last leaving is a presence change.

use std::net::IpAddr;

use tern_engine::{StateOp, Storage};
use tern_wire::messages::{ArchivedAuth, ArchivedHello, AuthOk, KeysLow, Redirect, Welcome};
use tern_wire::{negotiate_max_frame_bytes, negotiate_version, Message, MessageType};

use super::conns::{ConnId, ConnState, Expiry, OUTBOUND_BYTES_MAX};
use super::keys::ONE_TIME_KEYS_LOW;
use super::presence::Presence;
use super::shared::Shared;
use super::wakeups::Wakeups;
use crate::refusal::SessionRefusal;
use crate::routing::{home_shard_of_phone, home_shard_of_user, Home};

/// What a connection takes along to another core (its socket and transport state
/// travel beside it, in the runtime). Only a connection past `Hello` and not yet
/// authenticated moves.
#[derive(Debug)]
pub struct Session {
    max_frame_bytes: u32,
    /// Already counted as failed on the core it left.
    failed: bool,
    peer_ip: Option<IpAddr>,
    /// Its auth deadline (monotonic ms, a clock all cores share).
    auth_deadline_ms: u64,
    /// It asked to be linked on the core it left.
    link_asked: bool,
}

/// The server's name and version in `Welcome`.
const SERVER_NAME: &str = concat!("ternd/", env!("CARGO_PKG_VERSION"));

/// Answers `Hello`: the version and frame limit both sides accept.
pub fn hello<S: Storage>(shared: &mut Shared<S>, conn: ConnId, rid: u32, hello: &ArchivedHello) {
    let now_ms = shared.now_ms();
    let version = match negotiate_version(hello) {
        Ok(version) => version,
        Err(error) => {
            let refusal = SessionRefusal::Version { why: error.to_string() };
            let ty = MessageType::Hello.code();
            return shared.conns.fatal(conn, rid, ty, &refusal, shared.now.mono_ms());
        }
    };
    let max =
        negotiate_max_frame_bytes(hello.max_frame_bytes.to_native(), shared.config.max_frame_bytes);
    let welcome = Welcome {
        version,
        max_frame_bytes: max,
        server_time_ms: now_ms,
        heartbeat_interval_ms: shared.config.heartbeat_interval_ms,
        server: SERVER_NAME.to_string(),
    };
    shared.conns.send(conn, rid, &welcome);
    if let Some(c) = shared.conns.get_mut(conn) {
        c.state = ConnState::Open;
        c.max_frame_bytes = max;
    }
}

/// The core that must handle `message` from `conn`, if it is not this one.
pub fn route<S: Storage>(shared: &Shared<S>, conn: ConnId, message: &Message<'_>) -> Option<u32> {
    if shared.conns.get(conn)?.state != ConnState::Open {
        return None;
    }
    let shard = shard_needed(shared, message)?;
    if !shared.shards.exists(shard) || !shared.homes.serves(shard) {
        return None; // No such user, or another node's: answered here.
    }
    let core = shared.shards.placement().core_of_shard(shard);
    (core != shared.shards.placement().index).then_some(core)
}

/// The shard a session request needs: the phone number's for registration, the user's
/// home shard for auth.
fn shard_needed<S: Storage>(shared: &Shared<S>, message: &Message<'_>) -> Option<u32> {
    let shards = shared.shards.count();
    match message {
        Message::RequestCode(request) => Some(home_shard_of_phone(request.phone.as_str(), shards)),
        Message::Verify(verify) => Some(home_shard_of_phone(verify.phone.as_str(), shards)),
        Message::Auth(auth) => Some(home_shard_of_user(auth.user_id.to_native())),
        _ => None,
    }
}

/// On a node of a cluster: answers a session request whose shard another node owns
/// with a [`Redirect`] to it, or one no live node owns with `ShardUnavailable`; returns
/// whether it did (the connection stays open either way, so the client may ask again).
pub fn answered_by_another_node<S: Storage>(
    shared: &mut Shared<S>,
    conn: ConnId,
    rid: u32,
    message: &Message<'_>,
) -> bool {
    let Some(shard) = shard_needed(shared, message) else { return false };
    if !shared.shards.exists(shard) {
        return false;
    }
    let redirect = match shared.homes.of_shard(shard) {
        Home::Here => return false,
        Home::Node { id, info, epoch } => Ok(Redirect {
            epoch,
            shard,
            node: id.to_owned(),
            tcp: info.listeners.tcp.clone(),
            tls: info.listeners.tls.clone(),
            ws: info.listeners.ws.clone(),
            wss: info.listeners.wss.clone(),
        }),
        Home::Nowhere => Err(SessionRefusal::ShardUnplaced { shard }),
    };
    match redirect {
        Ok(redirect) => {
            shared.counters.redirects += 1;
            shared.conns.send(conn, rid, &redirect);
        }
        Err(refusal) => {
            let ty = message.message_type().code();
            shared.conns.refuse(conn, rid, ty, &refusal);
        }
    }
    true
}

/// Authenticates `conn` as a device homed here; returns whether it succeeded (the
/// caller then feeds it its mailbox).
pub fn auth<S: Storage>(
    shared: &mut Shared<S>,
    presence: &mut Presence,
    wakeups: &mut Wakeups,
    conn: ConnId,
    rid: u32,
    auth: &ArchivedAuth,
) -> bool {
    let device = (auth.user_id.to_native(), auth.device_id.to_native());
    let found = shared.shards.home_of(device.0).and_then(|shard| {
        let shard = shard.borrow();
        let record = shard.state().device(device.0, device.1)?;
        let head = shard.mailbox_next_seq(device);
        let pending = shard.mailbox_len(device);
        crate::secrets::token_matches(&auth.token, &record.token_hash)
            .then(|| (pending, head - pending, record.one_time_keys.len() as u32))
    });
    let Some((pending, head, keys)) = found else {
        let ty = MessageType::Auth.code();
        shared.conns.counters_mut().protocol_errors += 1;
        shared.conns.note_failed(conn);
        shared.conns.refuse(conn, rid, ty, &SessionRefusal::BadToken);
        return false;
    };
    let was_online = shared.conns.user_online(device.0);
    // One connection per device: a newer login replaces the older one.
    if let Some(old) = shared.conns.set_online(device, conn) {
        if let Some(c) = shared.conns.get_mut(old) {
            c.state = ConnState::Open;
        }
        shared.conns.close(old, shared.now.mono_ms());
    }
    if let Some(c) = shared.conns.get_mut(conn) {
        c.state = ConnState::Authenticated { user_id: device.0, device_id: device.1 };
        c.deliver_cursor = head;
        c.acked_through = head;
    }
    shared.conns.authenticated(conn);
    shared.conns.touch(conn, shared.now.mono_ms());
    tracing::debug!(conn, user_id = device.0, device_id = device.1, pending, "authenticated");
    if !was_online {
        presence.changed(shared, device.0, false);
    }
    wakeups.connected(device);
    let ok = AuthOk {
        user_id: device.0,
        device_id: device.1,
        mailbox_pending: pending,
        one_time_keys_remaining: keys,
    };
    shared.conns.send(conn, rid, &ok);
    if keys < ONE_TIME_KEYS_LOW {
        let low = KeysLow { one_time_keys_remaining: keys, threshold: ONE_TIME_KEYS_LOW };
        shared.conns.send(conn, 0, &low);
    }
    true
}

/// The socket of `conn` closed: forget it; its user's last device leaving is recorded
/// (last seen) and told to the watchers.
pub fn closed<S: Storage>(shared: &mut Shared<S>, presence: &mut Presence, conn: ConnId) {
    let Some(c) = shared.conns.remove(conn) else { return };
    shared.durable.forget_conn(conn);
    let Some((user_id, _)) = c.device() else { return };
    if shared.conns.user_online(user_id) {
        return;
    }
    let op = StateOp::SetLastSeen { user_id, last_seen_ms: shared.now_ms() };
    if let Some(Err(error)) = shared.shards.apply_for(user_id, op) {
        tracing::warn!(%error, user_id, "could not record last seen");
    }
    presence.changed(shared, user_id, false);
}

/// Deadlines that passed: time-outs get their error and close; closes that outlived
/// their grace are aborted (the runtime drops the socket).
pub fn handle_timeout<S: Storage>(shared: &mut Shared<S>) {
    let now_ms = shared.now.mono_ms();
    for (conn, expiry) in shared.conns.take_expired(now_ms) {
        if expiry == Expiry::NotReading {
            shared.conns.counters_mut().protocol_errors += 1;
            let refusal = SessionRefusal::NotReading { bytes: OUTBOUND_BYTES_MAX };
            shared.conns.refuse(conn, 0, 0, &refusal); // Logged with it, if never read.
            shared.conns.abort(conn);
        }
        if expiry == Expiry::TimedOut {
            // A missed auth deadline is a failed connection; an idle one closing is not.
            transport_failed(shared, conn);
            shared.conns.counters_mut().protocol_errors += 1;
            let ty = MessageType::Ping.code();
            shared.conns.refuse(conn, 0, ty, &SessionRefusal::Timeout);
            shared.conns.close(conn, now_ms);
        }
    }
}

/// The TLS or WebSocket layer of `conn` failed: a failed connection if it had not
/// authenticated yet (after that, a WebSocket close is how clients leave).
pub fn transport_failed<S: Storage>(shared: &mut Shared<S>, conn: ConnId) {
    if shared.conns.device(conn).is_none() {
        shared.conns.note_failed(conn);
    }
}

/// Answers a connection over the limit with `TooManyConnections` and closes it.
pub fn refuse_connection<S: Storage>(shared: &mut Shared<S>, conn: ConnId) {
    shared.conns.refuse(conn, 0, 0, &SessionRefusal::TooManyConnections);
    shared.conns.note_failed(conn);
    shared.conns.close(conn, shared.now.mono_ms());
}

/// The server is stopping: tell every client and close after flushing.
pub fn shut_down<S: Storage>(shared: &mut Shared<S>) {
    for conn in shared.conns.ids() {
        shared.conns.refuse(conn, 0, 0, &SessionRefusal::ShuttingDown);
        shared.conns.close(conn, shared.now.mono_ms());
    }
}

/// Lets go of `conn` so that another core can adopt it (its output is flushed).
pub fn hand_off<S: Storage>(shared: &mut Shared<S>, conn: ConnId) -> Option<Session> {
    let c = shared.conns.remove(conn)?;
    shared.durable.forget_conn(conn);
    shared.conns.counters_mut().handed_over += 1;
    debug_assert!(c.outbound.is_empty(), "output is flushed before a hand-off");
    Some(Session {
        max_frame_bytes: c.max_frame_bytes,
        failed: c.failed,
        peer_ip: c.peer_ip,
        auth_deadline_ms: c.auth_deadline_ms,
        link_asked: c.link_asked,
    })
}

/// Takes over a connection another core handed off.
pub fn adopt<S: Storage>(shared: &mut Shared<S>, session: Session) -> ConnId {
    let now_ms = shared.now.mono_ms();
    let conn = shared.conns.open(session.peer_ip, Some(session.auth_deadline_ms), now_ms);
    if let Some(c) = shared.conns.get_mut(conn) {
        c.state = ConnState::Open;
        c.max_frame_bytes = session.max_frame_bytes;
        c.failed = session.failed;
        c.link_asked = session.link_asked;
    }
    conn
}
