//! The connections of one core: their state, their output, their deadlines.
//!
//! The core owns each connection's outbound bytes; the runtime only reads them
//! ([`Conns::output`]), reports what the socket took ([`Conns::consume`]) and polls
//! which connections have something new to write or must close ([`Conns::poll_ready`]).
//! It never writes a connection's fields. Every error frame a client gets is written in
//! one place, [`Conns::refuse`] (or [`Conns::refuse_send`] for a `SendError`), from a
//! typed refusal.
//!
//! Deadlines live here too, on the caller's monotonic clock: the auth deadline (from
//! the connection's start, carried across a hand-off), the idle timeout after auth (from
//! the last *whole* frame: a client trickling bytes into a frame it never finishes still
//! meets it), a linking code's lifetime, a grace to flush before a close, and the end
//! of a pause in reading for a connection that made requests or drew refusals faster
//! than its budgets. One heap holds
//! one live entry per connection plus stale ones: a deadline that moved later is found
//! stale when popped and pushed again, so traffic costs no heap work; one that moved
//! earlier gets a new live entry, and the old one is dropped when popped.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::IpAddr;

use tern_wire::messages::{DeviceId, ErrorFrame, SendError, UserId};
use tern_wire::{encode_frame, Payload, WireSerializer, FLAG_RESPONSE, HANDSHAKE_MAX_FRAME_BYTES};

use super::addresses::PreAuthCounts;
use crate::limits::{Rate, TokenBucket};
use crate::refusal::{Refusal, SendRefusal, SessionRefusal};

/// A connection's id within its core.
pub type ConnId = u64;

/// A connection whose unsent output exceeds this is neither read nor fed from its
/// mailbox until it drains: a slow reader stops costing memory (what it asks waits in
/// its socket, its messages on disk).
pub const OUTBOUND_BYTES_MAX: usize = 1 << 20;
/// Output that passes this anyway (pushes from others to a client that does not read)
/// closes the connection with [`SessionRefusal::NotReading`].
pub const OUTBOUND_HARD_BYTES_MAX: usize = 8 << 20;

/// A connection whose output sits over [`OUTBOUND_BYTES_MAX`] this long with the socket
/// taking none of it is closed with `NotReading` (its reading is paused, so without this
/// it lived to the idle timeout, holding its buffers: the abuse run's never-readers).
/// Any progress resets the clock, so a slow reader is not a stalled one.
pub const STALL_TIMEOUT_MS: u64 = 20_000;
/// The largest frame a connection may send before it authenticates (after `Hello`;
/// before it, `HANDSHAKE_MAX_FRAME_BYTES`): a registration or link request with a full
/// set of keys fits many times over; the negotiated limit applies once authenticated.
pub const PRE_AUTH_MAX_FRAME_BYTES: u32 = 64 * 1024;
/// Downloads one connection may have in flight; past it the connection is not read
/// until one is answered (each answer can be a megabyte).
pub const DOWNLOADS_IN_FLIGHT_MAX: u32 = 4;
/// How many refusals a connection may draw before its reading is paced: a burst no
/// working client reaches (a refusal answers a request it should not have made, or made
/// too often), then a few a second. Past it the connection is not read until the
/// bucket has a token again; the refusal itself still goes out. A client flooding
/// refused requests (a budget's `RateLimited`, a stranger's `Forbidden`, `AuthRequired`
/// before auth) is thereby slowed to this rate at no cost to the server: its requests
/// wait in its own socket, and its writes block. Nothing is dropped.
pub const REFUSAL_RATE: Rate = Rate { burst: 20.0, per_second: 2.0 };
/// The requests an authenticated connection may make by default (every frame but the
/// few that are never answered: acknowledgements, `Pong`s, upload chunks, which the
/// mailbox and the upload queue already bound). Past it the connection is not read
/// until a token is back: a client pipelining requests at line rate (pings, lookups)
/// gets its answers at this pace and costs the server no more, however fast it writes.
/// A person's client stays far below it (sends have their own, lower budget).
pub const REQUEST_RATE: Rate = Rate { burst: 1000.0, per_second: 100.0 };
/// Likewise before authentication, where a client needs a handful of frames (`Hello`,
/// a registration or a link request, `Auth`).
pub const PRE_AUTH_REQUEST_RATE: Rate = Rate { burst: 20.0, per_second: 2.0 };
/// How long a closing connection may take to flush its last frames (an error, say)
/// before it is dropped regardless.
pub const CLOSE_GRACE_MS: u64 = 1000;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Waiting for `Hello`.
    AwaitHello,
    /// Handshake done; not yet registered or authenticated.
    Open,
    /// Speaking for this device.
    Authenticated {
        /// The user.
        user_id: UserId,
        /// The device.
        device_id: DeviceId,
    },
}

/// One connection as the core sees it.
#[derive(Debug)]
pub struct Conn {
    pub(super) state: ConnState,
    /// Bytes waiting to be written to the socket.
    pub(super) outbound: Vec<u8>,
    /// Close once `outbound` is flushed.
    pub(super) closing: bool,
    /// Closing took longer than its grace: drop the socket now.
    pub(super) abort: bool,
    /// The negotiated frame limit.
    pub(super) max_frame_bytes: u32,
    /// Already counted in `connections_failed` (a connection counts once).
    pub(super) failed: bool,
    /// The client's network address (code budgets per address), when known.
    pub(super) peer_ip: Option<IpAddr>,
    /// Next mailbox sequence number to deliver.
    pub(super) deliver_cursor: u64,
    /// Everything before this mailbox sequence number was acknowledged.
    pub(super) acked_through: u64,
    /// The connection must authenticate (or register) by then (monotonic ms).
    pub(super) auth_deadline_ms: u64,
    /// When its last whole frame arrived (monotonic ms).
    pub(super) last_frame_ms: u64,
    /// When closing began (monotonic ms).
    close_deadline_ms: Option<u64>,
    /// Already in the ready queue.
    ready_queued: bool,
    /// An upload's queue is full: reading waits until the disk catches up.
    pub(super) upload_queue_full: bool,
    /// Downloads asked and not yet answered.
    pub(super) downloads_in_flight: u32,
    /// It asked to be linked (once per connection).
    pub(super) link_asked: bool,
    /// Its address key while it counts as unauthenticated ([`PreAuthCounts`]).
    pre_auth_key: Option<IpAddr>,
    /// Since when its output has been over [`OUTBOUND_BYTES_MAX`] with the socket taking
    /// none of it (monotonic ms): past the stall timeout it is closed (`NotReading`).
    stalled_since_ms: Option<u64>,
    /// The refusals it may still draw before its reading is paced ([`REFUSAL_RATE`]).
    refusals: TokenBucket,
    /// The requests it may still make before its reading is paced ([`REQUEST_RATE`]).
    requests: TokenBucket,
    /// Reading is paced until then (monotonic ms): it drew too many refusals or made
    /// too many requests.
    paced_until_ms: Option<u64>,
    /// Its live entry in the deadline heap; other entries of it are stale.
    scheduled_ms: Option<u64>,
}

impl Conn {
    fn new(peer_ip: Option<IpAddr>, auth_deadline_ms: u64, now_ms: u64) -> Conn {
        Conn {
            state: ConnState::AwaitHello,
            outbound: Vec::new(),
            closing: false,
            abort: false,
            max_frame_bytes: HANDSHAKE_MAX_FRAME_BYTES,
            failed: false,
            peer_ip,
            deliver_cursor: 0,
            acked_through: 0,
            auth_deadline_ms,
            last_frame_ms: 0,
            close_deadline_ms: None,
            ready_queued: false,
            upload_queue_full: false,
            downloads_in_flight: 0,
            link_asked: false,
            pre_auth_key: None,
            stalled_since_ms: None,
            refusals: TokenBucket::full(REFUSAL_RATE, now_ms),
            requests: TokenBucket::full(PRE_AUTH_REQUEST_RATE, now_ms),
            paced_until_ms: None,
            scheduled_ms: None,
        }
    }

    /// Whether reading waits: for the disk (an upload), for answers (downloads in
    /// flight), for the client to read its output, or for its budgets' pace. What it
    /// asks meanwhile stays in its socket, so a client that asks and never reads costs
    /// a bounded amount.
    pub fn reading_paused(&self) -> bool {
        self.paced_until_ms.is_some()
            || self.upload_queue_full
            || self.downloads_in_flight >= DOWNLOADS_IN_FLIGHT_MAX
            || self.outbound.len() >= OUTBOUND_BYTES_MAX
    }

    /// The device this connection speaks for, once authenticated.
    pub fn device(&self) -> Option<(UserId, DeviceId)> {
        match self.state {
            ConnState::Authenticated { user_id, device_id } => Some((user_id, device_id)),
            _ => None,
        }
    }

    fn deadline_ms(&self, idle_timeout_ms: u64, stall_timeout_ms: u64) -> u64 {
        let deadline = match (self.close_deadline_ms, self.state) {
            (Some(close), _) => return close,
            (None, ConnState::Authenticated { .. }) => {
                self.last_frame_ms.saturating_add(idle_timeout_ms)
            }
            (None, _) => self.auth_deadline_ms,
        };
        let paced_until = self.paced_until_ms.unwrap_or(u64::MAX);
        deadline.min(self.stall_deadline_ms(stall_timeout_ms)).min(paced_until)
    }

    /// When its stalled output closes it (`u64::MAX`: not stalled).
    fn stall_deadline_ms(&self, stall_timeout_ms: u64) -> u64 {
        self.stalled_since_ms.map_or(u64::MAX, |since| since.saturating_add(stall_timeout_ms))
    }
}

/// What a passed deadline means for its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// It did not authenticate in time, or idled too long: tell it, then close.
    TimedOut,
    /// It did not finish flushing before its close: dropped (the runtime sees
    /// [`Conns::must_abort`]).
    Aborted,
    /// Its output stalled over the bound: it asks and does not read. Closed.
    NotReading,
}

/// Connection counters (part of the core's metrics).
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnCounters {
    /// Accepted by this core's listeners.
    pub accepted: u64,
    /// Failed before authenticating, or refused (each connection once).
    pub failed: u64,
    /// Closed for a protocol error.
    pub protocol_errors: u64,
    /// Handed to another core.
    pub handed_over: u64,
    /// Times a connection's reading was paced for making requests or drawing refusals
    /// faster than its budgets.
    pub paced: u64,
}

/// The connection table of one core.
pub struct Conns {
    /// Boxed: the table's spare buckets (up to half of them, by its load factor) then
    /// hold a pointer each, not a whole connection.
    conns: HashMap<ConnId, Box<Conn>>,
    next_id: ConnId,
    /// The connection of each online device homed here (one per device).
    online: BTreeMap<(UserId, DeviceId), ConnId>,
    ready: Vec<ConnId>,
    deadlines: BinaryHeap<Reverse<(u64, ConnId)>>,
    auth_deadline_ms: u64,
    idle_timeout_ms: u64,
    /// How long output may sit over its bound with the socket taking none of it.
    stall_timeout_ms: u64,
    /// The requests an authenticated connection may make.
    request_rate: Rate,
    max_connections: usize,
    /// Unauthenticated connections per address, and their limit.
    pre_auth: PreAuthCounts,
    counters: ConnCounters,
    /// The time of the input being handled (monotonic ms).
    now_ms: u64,
}

impl Conns {
    /// An empty table with these limits.
    pub fn new(auth_deadline_ms: u64, idle_timeout_ms: u64) -> Conns {
        Conns {
            conns: HashMap::new(),
            next_id: 1,
            online: BTreeMap::new(),
            ready: Vec::new(),
            deadlines: BinaryHeap::new(),
            auth_deadline_ms,
            idle_timeout_ms,
            stall_timeout_ms: STALL_TIMEOUT_MS,
            request_rate: REQUEST_RATE,
            max_connections: usize::MAX,
            pre_auth: PreAuthCounts::new(0, false),
            counters: ConnCounters::default(),
            now_ms: 0,
        }
    }

    /// Registers a connection; it must authenticate by `auth_deadline_ms` (monotonic; a
    /// new one gets the configured deadline from `now_ms`).
    pub fn open(
        &mut self,
        peer_ip: Option<IpAddr>,
        auth_deadline_ms: Option<u64>,
        now_ms: u64,
    ) -> ConnId {
        let id = self.next_id;
        self.next_id += 1;
        let deadline = auth_deadline_ms.unwrap_or(now_ms.saturating_add(self.auth_deadline_ms));
        let mut c = Conn::new(peer_ip, deadline, now_ms);
        let (key, over) = self.pre_auth.admit(peer_ip);
        c.pre_auth_key = key;
        schedule(&mut self.deadlines, &mut c, id, deadline);
        self.conns.insert(id, Box::new(c));
        if over {
            self.refuse(id, 0, 0, &SessionRefusal::AddressBusy);
            self.note_failed(id);
            self.close(id, now_ms);
        }
        id
    }

    /// How long output may sit over its bound with the socket taking none of it before
    /// the connection is closed with `NotReading` (default [`STALL_TIMEOUT_MS`]).
    pub fn set_stall_timeout_ms(&mut self, stall_timeout_ms: u64) {
        self.stall_timeout_ms = stall_timeout_ms;
    }

    /// The requests an authenticated connection may make, a burst then a steady rate.
    pub fn set_request_rate(&mut self, rate: Rate) {
        self.request_rate = rate;
    }

    /// At most `max` unauthenticated connections per network address (0: no limit);
    /// loopback ones count only with `count_loopback`.
    pub fn set_pre_auth_per_address(&mut self, max: u32, count_loopback: bool) {
        self.pre_auth = PreAuthCounts::new(max, count_loopback);
    }

    /// `conn` no longer counts as unauthenticated (it authenticated, or is going).
    fn release_pre_auth(&mut self, conn: ConnId) {
        let key = self.conns.get_mut(&conn).and_then(|c| c.pre_auth_key.take());
        if let Some(key) = key {
            self.pre_auth.release(key);
        }
    }

    /// Forgets a connection (its socket closed or it moved to another core).
    pub fn remove(&mut self, conn: ConnId) -> Option<Conn> {
        self.release_pre_auth(conn);
        let c = self.conns.remove(&conn)?;
        if let Some(device) = c.device() {
            if self.online.get(&device) == Some(&conn) {
                self.online.remove(&device);
            }
        }
        Some(*c)
    }

    /// A connection.
    pub fn get(&self, conn: ConnId) -> Option<&Conn> {
        self.conns.get(&conn).map(|c| &**c)
    }

    /// A connection, to change.
    pub fn get_mut(&mut self, conn: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(&conn).map(|c| &mut **c)
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Every connection's id.
    pub fn ids(&self) -> Vec<ConnId> {
        self.conns.keys().copied().collect()
    }

    /// The connection limit and whether it is reached.
    pub fn set_max(&mut self, max: usize) {
        self.max_connections = max;
    }

    /// Whether more connections are open than the limit allows.
    pub fn over_limit(&self) -> bool {
        self.conns.len() > self.max_connections
    }

    /// Counters for the metrics.
    pub fn counters(&self) -> ConnCounters {
        self.counters
    }

    /// Counts counters kept for the core (accepted, handed over).
    pub fn counters_mut(&mut self) -> &mut ConnCounters {
        &mut self.counters
    }

    /// The device `conn` speaks for, once authenticated.
    pub fn device(&self, conn: ConnId) -> Option<(UserId, DeviceId)> {
        self.conns.get(&conn)?.device()
    }

    /// The frame limit in force for `conn`.
    pub fn max_frame_bytes(&self, conn: ConnId) -> u32 {
        self.conns.get(&conn).map_or(HANDSHAKE_MAX_FRAME_BYTES, |c| c.max_frame_bytes)
    }

    /// The largest frame `conn` may send now: the negotiated limit once authenticated,
    /// at most [`PRE_AUTH_MAX_FRAME_BYTES`] before.
    pub fn max_inbound_frame_bytes(&self, conn: ConnId) -> u32 {
        self.conns.get(&conn).map_or(HANDSHAKE_MAX_FRAME_BYTES, |c| match c.state {
            ConnState::Authenticated { .. } => c.max_frame_bytes,
            _ => c.max_frame_bytes.min(PRE_AUTH_MAX_FRAME_BYTES),
        })
    }

    // -- who is online -----------------------------------------------------------------

    /// The connection of an online device homed here.
    pub fn online(&self, device: (UserId, DeviceId)) -> Option<ConnId> {
        self.online.get(&device).copied()
    }

    /// `conn` now speaks for `device`; returns the connection it replaces, if any.
    pub fn set_online(&mut self, device: (UserId, DeviceId), conn: ConnId) -> Option<ConnId> {
        self.release_pre_auth(conn);
        self.online.insert(device, conn).filter(|old| *old != conn)
    }

    /// Whether any device of `user_id` is connected.
    pub fn user_online(&self, user_id: UserId) -> bool {
        self.online.range((user_id, 0)..=(user_id, DeviceId::MAX)).next().is_some()
    }

    /// The connected devices of `user_id`.
    pub fn online_devices(&self, user_id: UserId) -> Vec<((UserId, DeviceId), ConnId)> {
        let range = self.online.range((user_id, 0)..=(user_id, DeviceId::MAX));
        range.map(|(d, c)| (*d, *c)).collect()
    }

    /// `device` is no longer online, without closing its connection (it deleted its
    /// own account and stays connected, unauthenticated).
    pub fn forget_online(&mut self, device: (UserId, DeviceId)) {
        self.online.remove(&device);
    }

    /// Ends `device`'s session (revoked, replaced, deleted): its connection goes back to
    /// unauthenticated and closes. Returns whether it was online.
    pub fn end_session(&mut self, device: (UserId, DeviceId)) -> bool {
        let Some(old) = self.online.remove(&device) else { return false };
        if let Some(c) = self.conns.get_mut(&old) {
            c.state = ConnState::Open;
        }
        self.close(old, 0);
        true
    }

    // -- output ------------------------------------------------------------------------

    /// Marks `conn` ready for its driver (new output, or a state it must act on).
    pub fn wake(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if !c.ready_queued {
                c.ready_queued = true;
                self.ready.push(conn);
            }
        }
    }

    /// The next connection whose driver has something to do.
    pub fn poll_ready(&mut self) -> Option<ConnId> {
        while let Some(conn) = self.ready.pop() {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.ready_queued = false;
                return Some(conn);
            }
        }
        None
    }

    /// Bytes waiting for `conn`'s socket.
    pub fn output(&self, conn: ConnId) -> &[u8] {
        self.conns.get(&conn).map_or(&[], |c| &c.outbound)
    }

    /// The socket (or a layer) took `n` bytes of the output; an emptied buffer's memory
    /// is freed (an idle connection holds none).
    pub fn consume(&mut self, conn: ConnId, n: usize) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.outbound.drain(..n.min(c.outbound.len()));
        if c.outbound.is_empty() && c.outbound.capacity() > 0 {
            c.outbound = Vec::new();
        }
        if n == 0 {
            return;
        }
        // Progress: the stall clock starts again (its pending deadline finds it moved
        // later), or stops under the bound.
        let over = c.outbound.len() >= OUTBOUND_BYTES_MAX;
        let armed = c.stalled_since_ms.is_some();
        c.stalled_since_ms = over.then_some(self.now_ms);
        if over && !armed {
            let deadline = self.now_ms.saturating_add(self.stall_timeout_ms);
            schedule(&mut self.deadlines, c, conn, deadline);
        }
    }

    /// Bytes waiting in every connection's output.
    pub fn outbound_bytes(&self) -> usize {
        self.conns.values().map(|c| c.outbound.len()).sum()
    }

    /// Appends a frame already encoded for `conn`.
    pub fn push_bytes(&mut self, conn: ConnId, frame: &[u8]) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.outbound.extend_from_slice(frame);
            self.wake(conn);
            self.bound_output(conn);
        }
    }

    /// Closes `conn` if its output passed the hard bound: it has not been reading.
    fn bound_output(&mut self, conn: ConnId) {
        let now_ms = self.now_ms;
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.outbound.len() >= OUTBOUND_BYTES_MAX && c.stalled_since_ms.is_none() {
                c.stalled_since_ms = Some(now_ms);
                let deadline = now_ms.saturating_add(self.stall_timeout_ms);
                schedule(&mut self.deadlines, c, conn, deadline);
            }
        }
        let over = self
            .conns
            .get(&conn)
            .is_some_and(|c| c.outbound.len() > OUTBOUND_HARD_BYTES_MAX && !c.closing);
        if over {
            self.counters.protocol_errors += 1;
            self.note_failed(conn);
            // Closing first, so that the error frame does not come back here.
            self.close(conn, self.now_ms);
            let refusal = SessionRefusal::NotReading { bytes: OUTBOUND_HARD_BYTES_MAX };
            self.refuse(conn, 0, 0, &refusal);
        }
    }

    /// The time of the input being handled (monotonic ms), for closes that output
    /// starts.
    pub fn set_now_ms(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    /// Writes `value` to `conn` as the answer to `rid` (0: unsolicited).
    pub fn send<T>(&mut self, conn: ConnId, rid: u32, value: &T)
    where
        T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let flags = if rid == 0 { 0 } else { FLAG_RESPONSE };
        if encode_frame(&mut c.outbound, rid, flags, value, c.max_frame_bytes).is_err() {
            tracing::warn!(
                message_type = T::TYPE.name(),
                "reply larger than the client's frame limit"
            );
        }
        self.wake(conn);
        self.bound_output(conn);
    }

    /// Encodes `value` for `conn` without sending it (a reply parked until durable).
    pub fn encode<T>(&self, conn: ConnId, rid: u32, value: &T) -> Option<Vec<u8>>
    where
        T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    {
        let mut frame = Vec::new();
        let flags = if rid == 0 { 0 } else { FLAG_RESPONSE };
        match encode_frame(&mut frame, rid, flags, value, self.max_frame_bytes(conn)) {
            Ok(_) => Some(frame),
            Err(_) => {
                tracing::warn!(
                    message_type = T::TYPE.name(),
                    "reply larger than the client's frame limit"
                );
                None
            }
        }
    }

    /// The one place that writes an error frame: `refusal` answers request `rid` of type
    /// `failed_type`.
    pub fn refuse(&mut self, conn: ConnId, rid: u32, failed_type: u16, refusal: &dyn Refusal) {
        self.send(conn, rid, &error_frame(failed_type, refusal));
        self.charge_refusal(conn);
    }

    /// A refused send, as the `SendError` the client matches to its message.
    pub fn refuse_send(
        &mut self,
        conn: ConnId,
        rid: u32,
        client_message_id: u64,
        refusal: &SendRefusal,
    ) {
        self.send(conn, rid, &send_error(client_message_id, refusal));
        self.charge_refusal(conn);
    }

    /// A refusal went to `conn`: one token from its bucket, and its reading paced until
    /// the next token if none is left ([`REFUSAL_RATE`]).
    fn charge_refusal(&mut self, conn: ConnId) {
        self.charge(conn, |c| (&mut c.refusals, REFUSAL_RATE));
    }

    /// `conn` made a request (a frame that is answered, or acts on others): one token
    /// from its bucket ([`REQUEST_RATE`], or [`PRE_AUTH_REQUEST_RATE`] before auth).
    pub fn charge_request(&mut self, conn: ConnId, message: &tern_wire::Message<'_>) {
        use tern_wire::Message as M;
        if matches!(message, M::DeliveryAck(_) | M::DiscardAck(_) | M::Pong(_) | M::MediaChunk(_)) {
            return;
        }
        let rate = self.request_rate;
        self.charge(conn, |c| match c.state {
            ConnState::Authenticated { .. } => (&mut c.requests, rate),
            _ => (&mut c.requests, PRE_AUTH_REQUEST_RATE),
        });
    }

    /// `conn` authenticated: its requests get the authenticated budget, full.
    pub fn authenticated(&mut self, conn: ConnId) {
        let (rate, now_ms) = (self.request_rate, self.now_ms);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.requests = TokenBucket::full(rate, now_ms);
        }
    }

    /// Takes a token from the bucket `pick` names; paces `conn`'s reading until the
    /// next token if none is left.
    fn charge(&mut self, conn: ConnId, pick: impl FnOnce(&mut Conn) -> (&mut TokenBucket, Rate)) {
        let now_ms = self.now_ms;
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let (bucket, rate) = pick(c);
        let Err(wait_ms) = bucket.take_owing(rate, now_ms) else { return };
        if c.paced_until_ms.is_some() {
            return;
        }
        let until = now_ms.saturating_add(wait_ms);
        c.paced_until_ms = Some(until);
        self.counters.paced += 1;
        schedule(&mut self.deadlines, c, conn, until);
    }

    // -- closing and failing -------------------------------------------------------------

    /// Closes `conn` once its output is flushed (within the close grace, or the auth
    /// deadline for a connection that never authenticated: its TLS handshake may have
    /// to finish first so that the client reads the error).
    pub fn close(&mut self, conn: ConnId, now_ms: u64) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if !c.closing {
            c.closing = true;
            let grace = now_ms.saturating_add(CLOSE_GRACE_MS);
            let deadline = match c.state {
                ConnState::Authenticated { .. } => grace,
                _ => c.auth_deadline_ms.max(grace),
            };
            c.close_deadline_ms = Some(deadline);
            schedule(&mut self.deadlines, c, conn, deadline);
        }
        self.wake(conn);
    }

    /// Counts `conn` as failed, once per connection.
    pub fn note_failed(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if !c.failed {
                c.failed = true;
                self.counters.failed += 1;
            }
        }
    }

    /// A protocol error: counted, answered with `refusal`, then closed.
    pub fn fatal(
        &mut self,
        conn: ConnId,
        rid: u32,
        failed_type: u16,
        refusal: &dyn Refusal,
        now_ms: u64,
    ) {
        self.counters.protocol_errors += 1;
        self.note_failed(conn);
        self.refuse(conn, rid, failed_type, refusal);
        self.close(conn, now_ms);
    }

    /// Whether `conn` must be dropped now (its close outlived its grace, or it is gone).
    pub fn must_abort(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_none_or(|c| c.abort)
    }

    /// Whether `conn` closes once flushed.
    pub fn is_closing(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_none_or(|c| c.closing)
    }

    // -- deadlines -----------------------------------------------------------------------

    /// A whole frame arrived on `conn` (only whole frames count as traffic).
    pub fn touch(&mut self, conn: ConnId, now_ms: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.last_frame_ms = now_ms;
        }
    }

    /// Moves `conn`'s auth deadline to `deadline_ms` if that is later (a device waiting
    /// for its link to be approved waits for a person).
    pub fn extend_auth_deadline(&mut self, conn: ConnId, deadline_ms: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.auth_deadline_ms = c.auth_deadline_ms.max(deadline_ms);
        }
    }

    /// The earliest deadline (monotonic ms), if any connection has one.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.deadlines.peek().map(|Reverse((deadline, _))| *deadline)
    }

    /// Drops `conn` now, without flushing its output (for a client that does not read:
    /// it would never take the rest, nor the error).
    pub fn abort(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.closing = true;
            c.abort = true;
            self.wake(conn);
        }
    }

    /// The connections whose deadline passed by `now_ms`, and what that means for each.
    pub fn take_expired(&mut self, now_ms: u64) -> Vec<(ConnId, Expiry)> {
        let mut expired = Vec::new();
        while let Some(&Reverse((deadline, conn))) = self.deadlines.peek() {
            if deadline > now_ms {
                break;
            }
            self.deadlines.pop();
            let Some(c) = self.conns.get_mut(&conn) else { continue };
            if c.scheduled_ms != Some(deadline) {
                continue; // Superseded by an earlier entry.
            }
            c.scheduled_ms = None;
            let pace_over = c.paced_until_ms.is_some_and(|until| until <= now_ms);
            if pace_over {
                c.paced_until_ms = None; // Its pace allows a read again: not an expiry.
            }
            let actual = c.deadline_ms(self.idle_timeout_ms, self.stall_timeout_ms);
            if actual > now_ms {
                // It moved later (traffic, authentication, a pace over): look again then.
                schedule(&mut self.deadlines, c, conn, actual);
                if pace_over {
                    self.wake(conn);
                }
                continue;
            }
            if c.closing {
                c.abort = true;
                self.wake(conn);
                expired.push((conn, Expiry::Aborted));
            } else if c.stall_deadline_ms(self.stall_timeout_ms) <= now_ms {
                expired.push((conn, Expiry::NotReading));
            } else {
                expired.push((conn, Expiry::TimedOut));
            }
        }
        expired
    }
}

/// Puts `conn`'s deadline in the heap unless its live entry comes no later: one live
/// entry per connection (the rest are found stale when popped and dropped), however
/// often its deadline moves.
fn schedule(
    deadlines: &mut BinaryHeap<Reverse<(u64, ConnId)>>,
    c: &mut Conn,
    conn: ConnId,
    deadline: u64,
) {
    if c.scheduled_ms.is_none_or(|at| deadline < at) {
        c.scheduled_ms = Some(deadline);
        deadlines.push(Reverse((deadline, conn)));
    }
}

/// The `ErrorFrame` for a refusal.
pub fn error_frame(failed_type: u16, refusal: &dyn Refusal) -> ErrorFrame {
    ErrorFrame {
        code: refusal.code() as u16,
        failed_type,
        retry_after_ms: refusal.retry_after_ms(),
        message: refusal.to_string(),
    }
}

/// The `SendError` for a refused send.
pub fn send_error(client_message_id: u64, refusal: &SendRefusal) -> SendError {
    let (missing, extra) = match refusal {
        SendRefusal::StaleDevices { missing, extra } => (missing.clone(), extra.clone()),
        _ => (Vec::new(), Vec::new()),
    };
    SendError {
        client_message_id,
        code: refusal.code() as u16,
        retry_after_ms: refusal.retry_after_ms(),
        missing_devices: missing,
        extra_devices: extra,
        message: refusal.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Traffic moves the idle deadline without heap work; the stale entry is found when
    /// it comes due and pushed again; a connection that stays silent times out, and one
    /// that does not flush its close in time is aborted.
    #[test]
    fn deadlines_follow_traffic_and_closes() {
        let mut conns = Conns::new(100, 1000);
        let conn = conns.open(None, None, 0);
        assert_eq!(conns.poll_timeout(), Some(100));
        conns.get_mut(conn).unwrap().state = ConnState::Authenticated { user_id: 1, device_id: 1 };
        conns.touch(conn, 50);
        assert!(conns.take_expired(100).is_empty(), "authenticated: the idle timeout runs");
        assert_eq!(conns.poll_timeout(), Some(1050));
        conns.touch(conn, 900);
        assert!(conns.take_expired(1050).is_empty());
        assert_eq!(conns.take_expired(1900), vec![(conn, Expiry::TimedOut)]);
        conns.close(conn, 1900);
        assert!(!conns.must_abort(conn));
        assert_eq!(conns.take_expired(1900 + CLOSE_GRACE_MS), vec![(conn, Expiry::Aborted)]);
        assert!(conns.must_abort(conn));
    }
}
