//! The per-core server logic: sessions, registration, auth and 1:1 messaging over the
//! engine's shards. Synchronous and I/O-free.
//!
//! The runtime (`runtime.rs`) feeds it decoded frames (`Core::handle_frame`) and tells
//! it when a commit made records durable (`Core::on_durable`); the core answers by
//! appending frames to each connection's outbound buffer and waking its writer. Nothing
//! here awaits: a reply that must wait for durability (the **sent** tick, a handed-out
//! one-time key, a registration) is parked as a [`PendingReply`] with the record
//! sequence numbers it needs, and released by `on_durable`. Time comes in as `now_ms`.
//!
//! Each core holds the shards it owns (shard `s` belongs to core `s % cores`). A
//! connection is served where its user's home shard lives: before registration or auth
//! [`Core::route`] names the core a frame must go to and the runtime hands the connection
//! over. Work on a user homed elsewhere (a message to them, a receipt for them, their
//! key bundles) becomes a [`CoreMsg`] in the outbox for that core, and the answer comes
//! back through [`Core::on_mesh`] to finish the reply: the **sent** tick of a cross-core
//! message is given once the recipient's core has its copies durable, and then the
//! sender's own other devices' copies are durable here.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::task::Waker;

use rkyv::rancor::Failure;
use tern_engine::{DeviceRecord, Shard, ShardHandle, StateOp, Storage};
use tern_wire::messages::*;
use tern_wire::{
    encode_archive, encode_deliver, encode_frame, negotiate_max_frame_bytes, negotiate_version,
    EnvelopeRef, ErrorCode, Frame, Message, MessageType, Payload, WireSerializer, FLAG_RESPONSE,
    HANDSHAKE_MAX_FRAME_BYTES,
};

use crate::code_sender::CodeSender;

mod accounts;
mod groups;
mod media;
use crate::limits::{HourlyWindow, Rate, RateLimiter};
use crate::mesh::{
    CoreMsg, CoreStats, DeliverOutcome, DeliverRequest, DiskUsage, OwnedCopy, Reply, Request,
};
use crate::metrics::{Histogram, BATCH_BUCKETS, LATENCY_BUCKETS_S};
use crate::push::PushJob;
use crate::secrets;
use accounts::Gathering;
pub use groups::{home_shard_of_group, GroupAnswer, GROUP_MEMBERS_MAX};
use groups::{GroupFanout, GroupReplyTo};
pub use media::{home_shard_of_media, MEDIA_CHUNK_BYTES};

/// (shard, record sequence number) pairs a reply waits for: all durable, it may go.
type Waits = Vec<(u32, u64)>;

/// A connection's id within its core.
pub type ConnId = u64;

/// Envelopes sent to a device and not yet acknowledged, at most. 256 keeps a fast
/// client busy across a 100 ms round trip at ~2,500 messages/s, while bounding what a
/// slow one holds in flight.
pub const DELIVERY_WINDOW: u64 = 256;
/// A connection whose unsent output exceeds this is not fed from its mailbox until it
/// drains: a slow reader stops costing memory (its messages wait on disk).
pub const OUTBOUND_BYTES_MAX: usize = 1 << 20;
/// A device is told to upload more one-time prekeys below this stock.
pub const ONE_TIME_KEYS_LOW: u32 = 15;
/// Devices per account (a primary and four companions).
pub const DEVICES_MAX: usize = 5;
/// Users one user may follow the presence of.
pub const PRESENCE_SUBSCRIPTIONS_MAX: usize = 5_000;
/// Subscribers told of one user's presence at most (the fan-out budget).
pub const PRESENCE_WATCHERS_MAX: usize = 5_000;

/// Tunables of the core that tests and operators change.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// Largest frame the server accepts after the handshake.
    pub max_frame_bytes: u32,
    /// Verification codes stop working after this.
    pub code_ttl_ms: u64,
    /// Code requests per phone number per hour.
    pub code_requests_per_hour: u32,
    /// Wrong codes accepted per issued code before it is burnt.
    pub code_attempts_max: u32,
    /// Default time-to-live of undelivered envelopes.
    pub default_ttl_ms: u64,
    /// Heartbeat interval advertised in `Welcome`.
    pub heartbeat_interval_ms: u32,
    /// Sends per device: a burst, then a steady rate (typed `RateLimited` beyond it).
    pub send_rate: Rate,
    /// Key-bundle fetches per (requester, target) pair: a client needs a handful per
    /// contact; draining someone's one-time keys needs many.
    pub fetch_rate: Rate,
    /// Envelopes queued per device at most (the oldest are dropped, with notices).
    pub mailbox_max_messages: u64,
    /// Bytes queued per device at most (likewise).
    pub mailbox_max_bytes: u64,
    /// Where media blobs are stored (`None`: this server takes no media).
    pub media_dir: Option<std::path::PathBuf>,
    /// Largest media blob accepted.
    pub media_max_bytes: u64,
    /// Committed media blobs are deleted after this.
    pub media_ttl_ms: u64,
    /// Phone hashes one account may look up per day (contact discovery).
    pub discovery_per_day: u32,
    /// Codes sent per number prefix (the first 6 characters, like `+15551`) per hour, per
    /// core: SMS pumping targets ranges of premium numbers.
    pub code_requests_per_prefix_per_hour: u32,
    /// Codes sent per client network address (an IPv4 address, an IPv6 /64) per hour,
    /// per core.
    pub code_requests_per_address_per_hour: u32,
    /// Whether loopback clients count against the per-address budget (by default a
    /// local process, such as a load generator or a TLS terminator, is exempt).
    pub code_budget_loopback: bool,
    /// Leading zero bits a proof of work must have before a code is sent (0: none asked).
    pub code_pow_bits: u8,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            max_frame_bytes: tern_wire::DEFAULT_MAX_FRAME_BYTES,
            code_ttl_ms: 10 * 60 * 1000,
            code_requests_per_hour: 5,
            code_attempts_max: 5,
            default_ttl_ms: 30 * 24 * 3600 * 1000,
            heartbeat_interval_ms: 30_000,
            send_rate: Rate { burst: 200.0, per_second: 50.0 },
            fetch_rate: Rate { burst: 10.0, per_second: 10.0 / 3600.0 },
            mailbox_max_messages: 10_000,
            mailbox_max_bytes: 256 << 20,
            media_dir: None,
            media_max_bytes: 100 << 20,
            media_ttl_ms: 30 * 24 * 3600 * 1000,
            discovery_per_day: 5_000,
            code_requests_per_prefix_per_hour: 1_000,
            code_requests_per_address_per_hour: 20,
            code_budget_loopback: false,
            code_pow_bits: 0,
        }
    }
}

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
pub struct Connection {
    /// Its state.
    pub state: ConnState,
    /// Bytes waiting to be written to the socket.
    pub outbound: Vec<u8>,
    /// Wakes the connection's task when `outbound` grows or it must close.
    pub waker: Option<Waker>,
    /// Close once `outbound` is flushed.
    pub closing: bool,
    /// The negotiated frame limit.
    pub max_frame_bytes: u32,
    /// Already counted in `connections_failed` (a connection counts once).
    failed: bool,
    /// The client's network address (code budgets per address), when known.
    peer_ip: Option<IpAddr>,
    /// Next mailbox sequence number to deliver.
    deliver_cursor: u64,
    /// Everything before this mailbox sequence number was acknowledged.
    acked_through: u64,
}

impl Connection {
    fn new() -> Connection {
        Connection {
            state: ConnState::AwaitHello,
            outbound: Vec::new(),
            waker: None,
            closing: false,
            max_frame_bytes: HANDSHAKE_MAX_FRAME_BYTES,
            failed: false,
            peer_ip: None,
            deliver_cursor: 0,
            acked_through: 0,
        }
    }

    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

#[derive(Debug)]
struct PendingCode {
    code: String,
    expires_ms: u64,
    attempts_left: u32,
}

/// Something that may happen only once some records are durable.
#[derive(Debug)]
struct PendingReply {
    /// (shard, record sequence number) pairs, all on this core.
    waits: Vec<(u32, u64)>,
    release: Release,
}

/// What a durable wait releases.
#[derive(Debug)]
enum Release {
    /// A frame for a connection of this core.
    Frame {
        conn: ConnId,
        frame: Vec<u8>,
        /// For a sent tick: when the send arrived (µs), to measure send→sent.
        started_us: Option<u64>,
    },
    /// An answer to another core's request.
    Mesh { core: u32, token: u64, reply: Reply },
    /// A request to another core that needs no answer.
    Tell { core: u32, request: Request },
}

/// A request to another core whose answer finishes a client's request here.
#[derive(Debug)]
enum Awaiting {
    /// A send to a user homed elsewhere: the sender's own other devices' copies are
    /// stored here once the recipient's are.
    Send { conn: ConnId, rid: u32, meta: EnvelopeMeta, own_copies: Vec<OwnedCopy>, since_us: u64 },
    /// A request answered with `Done`.
    /// Once answered, `Done` goes out when `waits` (work done here too) are durable.
    Done { conn: ConnId, rid: u32, failed_type: u16, waits: Waits },
    /// A key-bundle fetch.
    Bundles { conn: ConnId, rid: u32, target: UserId },
    /// A primary device approved a linking code held by another core.
    Link { conn: ConnId, rid: u32, user_id: UserId, code: String },
    /// A group request handled by the group's core.
    Group { conn: ConnId, rid: u32 },
    /// A member core's part of a group fan-out.
    Fanout { fanout_id: u64 },
    /// A download from a blob on another core.
    Media { conn: ConnId, rid: u32 },
    /// Another core's part of a request gathered from every core (discovery, export).
    Gather { gather_id: u64 },
    /// A profile homed on another core.
    Profile { conn: ConnId, rid: u32 },
}

/// A device waiting for its account's primary device to approve it.
#[derive(Debug)]
struct PendingLink {
    conn: ConnId,
    rid: u32,
    /// `None` once claimed by the approving core (the connection waits for the result).
    device: Option<NewDevice>,
    expires_ms: u64,
}

/// Linking codes stay valid this long (the new device's connection waits meanwhile).
pub const LINK_CODE_TTL_MS: u64 = 5 * 60 * 1000;

/// The core that holds a linking code: codes are drawn until they hash to the core of
/// the connection that asked, so the approving core knows where to go.
fn core_of_link_code(code: &str, cores: u32) -> u32 {
    home_shard_of_phone(code, cores)
}

/// What every copy of one message shares.
#[derive(Clone, Copy, Debug)]
pub struct EnvelopeMeta {
    server_message_id: MessageId,
    client_message_id: u64,
    server_time_ms: u64,
    expires_ms: u64,
    sender: (UserId, DeviceId),
    /// The user the message is to (unused for groups).
    peer: UserId,
    kind: EnvelopeKind,
}

/// What a connection takes along to another core (its socket and transport state
/// travel beside it, in the runtime). Only a connection past `Hello` and not yet
/// authenticated moves.
#[derive(Debug)]
pub struct Session {
    max_frame_bytes: u32,
    /// Already counted as failed on the core it left.
    failed: bool,
    peer_ip: Option<IpAddr>,
}

/// Where this core sits among the server's cores.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    /// This core's index.
    pub index: u32,
    /// How many cores serve.
    pub count: u32,
}

impl Placement {
    /// The core that owns `shard_id`.
    pub fn core_of_shard(&self, shard_id: u32) -> u32 {
        shard_id % self.count
    }
}

/// Counters exported as metrics.
#[derive(Clone, Debug, Default)]
pub struct CoreCounters {
    /// Frames decoded.
    pub frames_in: u64,
    /// Messages accepted (sent ticks given).
    pub messages_sent: u64,
    /// Envelopes written to sockets.
    pub messages_delivered: u64,
    /// Receipts written to sockets.
    pub receipts_delivered: u64,
    /// Connections closed for a protocol error.
    pub protocol_errors: u64,
    /// Envelopes dropped from full mailboxes (each one announced).
    pub dropped_envelopes: u64,
    /// Verification codes sent.
    pub codes_sent: u64,
    /// Code requests refused by a budget (SMS-pumping defence).
    pub codes_refused: u64,
    /// Proof-of-work challenges given.
    pub pow_challenges: u64,
    /// Presence events sent (after coalescing).
    pub presence_events: u64,
    /// Batches sent to other cores.
    pub mesh_batches_out: u64,
    /// Items in those batches.
    pub mesh_items_out: u64,
    /// Connections handed to another core (registration or auth belonged there).
    pub handed_over: u64,
    /// Connections accepted by this core's listeners (not those handed over to it).
    pub connections_accepted: u64,
    /// Connections that failed: a TLS or WebSocket handshake error or an auth deadline
    /// missed before authenticating, a bad token, a protocol error, or a refusal at the
    /// connection limit. Each connection counts once.
    pub connections_failed: u64,
}

/// The state of one core.
pub struct Core<S: Storage> {
    placement: Placement,
    /// Every shard by id; `None` where another core owns it.
    shards: Vec<Option<ShardHandle<S>>>,
    /// Messages for other cores, by destination, sent once per loop turn.
    outbox: Vec<Vec<CoreMsg>>,
    next_token: u64,
    awaiting: HashMap<u64, Awaiting>,
    /// Presence subscribers of the users homed here: target → subscribers.
    watchers: HashMap<UserId, std::collections::BTreeSet<UserId>>,
    /// What each user homed here subscribed to (a new subscription replaces it).
    watching: HashMap<UserId, Vec<UserId>>,
    /// Presence to tell this loop turn, coalesced per (subscriber, target).
    presence_out: HashMap<(UserId, UserId), PresenceEvent>,
    /// Wake-ups for the runtime to send.
    pushes: Vec<PushJob>,
    /// Offline devices already woken since they were last connected (one push per
    /// absence, however many messages).
    pushed: std::collections::HashSet<(UserId, DeviceId)>,
    /// Code requests per number prefix in the last hour.
    code_prefix_requests: HourlyWindow<String>,
    /// Code requests per network address (IPv4 address, IPv6 /64) in the last hour.
    code_address_requests: HourlyWindow<IpAddr>,
    /// Outstanding proof-of-work challenges per phone number: (challenge, expires).
    pow_challenges: HashMap<String, (Vec<u8>, u64)>,
    /// Wrong registration-lock PINs per phone number: (day, count).
    pin_attempts: HashMap<String, (u64, u32)>,
    /// Truncated phone hashes of the accounts on this core's shards (discovery).
    phone_index: HashMap<PhoneHash, UserId>,
    /// Hashes each account looked up today: (day, count).
    discovery_used: HashMap<UserId, (u64, u32)>,
    /// Discoveries waiting for other cores.
    gatherings: HashMap<u64, Gathering>,
    /// Group sends waiting for their member cores.
    fanouts: HashMap<u64, GroupFanout>,
    /// Devices waiting to be linked, by code (the new device's connection is here).
    links: HashMap<String, PendingLink>,
    /// The latest metrics other cores pushed here (the admin endpoint's core).
    peer_stats: Vec<Option<CoreStats>>,
    config: CoreConfig,
    code_sender: Box<dyn CodeSender>,
    conns: HashMap<ConnId, Connection>,
    next_conn_id: ConnId,
    online: BTreeMap<(UserId, DeviceId), ConnId>,
    codes: HashMap<String, PendingCode>,
    code_requests: HourlyWindow<String>,
    pending: Vec<PendingReply>,
    /// Devices whose mailboxes got envelopes since the last delivery pass.
    /// (The last record appended for each, which must be durable before delivery.)
    dirty: HashMap<(UserId, DeviceId), (u32, u64)>,
    send_limits: RateLimiter<(UserId, DeviceId)>,
    max_connections: usize,
    /// The runtime's monotonic clock in µs, set before each call (latency metrics only).
    now_us: u64,
    /// Send → sent tick (durable), seconds.
    pub send_to_sent: Histogram,
    /// Send → written to the recipient's connection, seconds (ms resolution).
    pub send_to_deliver: Histogram,
    /// Records per group commit.
    pub commit_batch_records: Histogram,
    fetch_limits: RateLimiter<(UserId, UserId)>,
    counters: CoreCounters,
    /// Disk use of each owned shard and of the data directory's file system, as the
    /// runtime last measured it (the core does no I/O).
    disk: DiskUsage,
}

impl<S: Storage> std::fmt::Debug for Core<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("placement", &self.placement)
            .field("shards", &self.shards.len())
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

/// The home shard of a user: its id carries it in the top 16 bits.
pub fn home_shard_of_user(user_id: UserId) -> u32 {
    (user_id >> 48) as u32
}

/// The shard that owns a phone number (and so the account registered with it).
pub fn home_shard_of_phone(phone: &str, shard_count: u32) -> u32 {
    // FNV-1a: stable across builds and machines, which a std hasher is not.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in phone.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(shard_count)) as u32
}

fn valid_phone(phone: &str) -> bool {
    let digits = phone.strip_prefix('+').unwrap_or("");
    (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
}

impl<S: Storage> Core<S> {
    /// A core at `placement` over `shards` (index = shard id; `None` for those other
    /// cores own).
    pub fn new(
        placement: Placement,
        shards: Vec<Option<ShardHandle<S>>>,
        config: CoreConfig,
        code_sender: Box<dyn CodeSender>,
    ) -> Core<S> {
        let cores = placement.count as usize;
        let code_requests_per_hour = config.code_requests_per_hour;
        let mut core = Core {
            placement,
            shards,
            outbox: (0..cores).map(|_| Vec::new()).collect(),
            next_token: 1,
            awaiting: HashMap::new(),
            links: HashMap::new(),
            phone_index: HashMap::new(),
            pin_attempts: HashMap::new(),
            code_prefix_requests: HourlyWindow::new(config.code_requests_per_prefix_per_hour),
            code_address_requests: HourlyWindow::new(config.code_requests_per_address_per_hour),
            pow_challenges: HashMap::new(),
            discovery_used: HashMap::new(),
            gatherings: HashMap::new(),
            fanouts: HashMap::new(),
            watchers: HashMap::new(),
            watching: HashMap::new(),
            presence_out: HashMap::new(),
            pushes: Vec::new(),
            pushed: std::collections::HashSet::new(),
            peer_stats: vec![None; cores],
            send_limits: RateLimiter::new(config.send_rate),
            now_us: 0,
            max_connections: usize::MAX,
            send_to_sent: Histogram::new(LATENCY_BUCKETS_S),
            send_to_deliver: Histogram::new(LATENCY_BUCKETS_S),
            commit_batch_records: Histogram::new(BATCH_BUCKETS),
            fetch_limits: RateLimiter::new(config.fetch_rate),
            config,
            code_sender,
            conns: HashMap::new(),
            next_conn_id: 1,
            online: BTreeMap::new(),
            codes: HashMap::new(),
            code_requests: HourlyWindow::new(code_requests_per_hour),
            pending: Vec::new(),
            dirty: HashMap::new(),
            counters: CoreCounters::default(),
            disk: DiskUsage::default(),
        };
        core.build_phone_index();
        core
    }

    /// Sets the monotonic clock (µs) used for latency metrics; the runtime calls it before
    /// handing the core frames or commit results.
    pub fn set_clock(&mut self, now_us: u64) {
        self.now_us = now_us;
    }

    /// Records the disk use the runtime measured, for the metrics.
    pub fn set_disk_usage(&mut self, disk: DiskUsage) {
        self.disk = disk;
    }

    /// Sets the connection limit.
    pub fn set_max_connections(&mut self, max: usize) {
        self.max_connections = max;
    }

    /// The connection limit.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Answers a connection over the limit with `TooManyConnections` and closes it.
    pub fn refuse_connection(&mut self, conn: ConnId) {
        let message = "the server holds its maximum number of connections; retry later";
        self.error_reply(conn, 0, 0, ErrorCode::TooManyConnections, message, 1000);
        self.note_failed(conn);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.closing = true;
        }
    }

    /// Bytes waiting in connections' outbound buffers (bounded per connection).
    pub fn outbound_bytes(&self) -> usize {
        self.conns.values().map(|c| c.outbound.len()).sum()
    }

    /// The configuration.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// The shards this core owns, with their ids (for the committer and maintenance).
    pub fn owned_shards(&self) -> Vec<(u32, ShardHandle<S>)> {
        let owned = self.shards.iter().enumerate();
        owned.filter_map(|(id, s)| Some((id as u32, s.clone()?))).collect()
    }

    /// Where this core sits.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    /// A shard this core owns.
    fn local_shard(&self, shard_id: u32) -> Option<&ShardHandle<S>> {
        self.shards.get(shard_id as usize)?.as_ref()
    }

    /// Whether `owner` (homed here) blocked `other`: their 1:1 messages, typing and
    /// presence stop (shared groups are not affected).
    fn blocked_by(&self, owner: UserId, other: UserId) -> bool {
        self.local_shard(home_shard_of_user(owner)).is_some_and(|shard| {
            shard.borrow().state().account(owner).is_some_and(|a| a.blocked.contains(&other))
        })
    }

    /// The devices of a user homed on this core; `None` if there is no such account.
    fn devices_of(&self, user: UserId) -> Option<Vec<(UserId, DeviceId)>> {
        let shard = self.local_shard(home_shard_of_user(user))?.borrow();
        let account = shard.state().account(user)?;
        Some(account.devices.iter().map(|d| (user, d.device_id)).collect())
    }

    /// Counters for metrics.
    pub fn counters(&self) -> &CoreCounters {
        &self.counters
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Registers a connection a listener of this core accepted from `peer_ip` (counted
    /// as accepted).
    pub fn accept_connection(&mut self, peer_ip: Option<IpAddr>) -> ConnId {
        self.counters.connections_accepted += 1;
        let conn = self.open_connection();
        if let Some(c) = self.conns.get_mut(&conn) {
            c.peer_ip = peer_ip;
        }
        conn
    }

    /// Counts `conn` as failed, once per connection (see
    /// [`CoreCounters::connections_failed`]).
    fn note_failed(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if !c.failed {
                c.failed = true;
                self.counters.connections_failed += 1;
            }
        }
    }

    /// The TLS or WebSocket layer of `conn` failed (handshake, upgrade, a bad record):
    /// a failed connection if it had not authenticated yet (after that, a WebSocket
    /// close is how clients leave).
    pub fn transport_failed(&mut self, conn: ConnId) {
        let authenticated = self
            .conns
            .get(&conn)
            .is_some_and(|c| matches!(c.state, ConnState::Authenticated { .. }));
        if !authenticated {
            self.note_failed(conn);
        }
    }

    /// Registers a new connection.
    fn open_connection(&mut self) -> ConnId {
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        self.conns.insert(id, Connection::new());
        id
    }

    /// A connection, for its driver.
    pub fn connection(&mut self, conn: ConnId) -> Option<&mut Connection> {
        self.conns.get_mut(&conn)
    }

    /// Forgets a connection (its socket closed).
    pub fn close_connection(&mut self, conn: ConnId, now_ms: u64) {
        if let Some(c) = self.conns.remove(&conn) {
            if let ConnState::Authenticated { user_id, device_id } = c.state {
                if self.online.get(&(user_id, device_id)) == Some(&conn) {
                    self.online.remove(&(user_id, device_id));
                    if !self.user_online(user_id) {
                        self.went_offline(user_id, now_ms);
                    }
                }
            }
        }
        self.pending.retain(|p| !matches!(p.release, Release::Frame { conn: c, .. } if c == conn));
        self.links.retain(|_, link| link.conn != conn);
    }

    /// The frame size limit currently in force for reading from `conn`.
    pub fn max_frame_bytes(&self, conn: ConnId) -> u32 {
        self.conns.get(&conn).map_or(HANDSHAKE_MAX_FRAME_BYTES, |c| c.max_frame_bytes)
    }

    /// The driver wrote some output: feed the connection more of its mailbox if it had
    /// been held back.
    pub fn on_writable(&mut self, conn: ConnId, now_ms: u64) {
        self.pump(conn, now_ms);
    }

    /// A connection missed its auth deadline or idled too long: tell it, then close.
    pub fn time_out(&mut self, conn: ConnId) {
        let message = "no authentication or traffic in time; reconnect";
        // A missed auth deadline is a failed connection; an idle one closing is not.
        self.transport_failed(conn);
        self.counters.protocol_errors += 1;
        self.close_with_error(conn, 0, MessageType::Ping, ErrorCode::Timeout, message);
    }

    /// The server is stopping: tell every client and close after flushing.
    pub fn shut_down(&mut self) {
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            let message = "the server is stopping; reconnect later";
            self.error_reply(conn, 0, 0, ErrorCode::ShuttingDown, message, 1000);
            if let Some(c) = self.conns.get_mut(&conn) {
                c.closing = true;
                c.wake();
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Placement: connections move to their home core, work crosses to the owning core
    // -----------------------------------------------------------------------------------

    /// The core that must handle `message` from `conn`, if it is not this one:
    /// registration runs where the phone number's shard lives, auth where the user's home
    /// shard lives, so that an authenticated connection sits beside its mailboxes.
    pub fn route(&self, conn: ConnId, message: &Message<'_>) -> Option<u32> {
        if !matches!(self.conns.get(&conn)?.state, ConnState::Open) {
            return None;
        }
        let shard = match message {
            Message::RequestCode(request) => {
                home_shard_of_phone(request.phone.as_str(), self.shard_count())
            }
            Message::Verify(verify) => {
                home_shard_of_phone(verify.phone.as_str(), self.shard_count())
            }
            Message::Auth(auth) => home_shard_of_user(auth.user_id.to_native()),
            _ => return None,
        };
        if shard >= self.shard_count() {
            return None; // No such user: answered here.
        }
        let core = self.placement.core_of_shard(shard);
        (core != self.placement.index).then_some(core)
    }

    /// Lets go of `conn` so that another core can adopt it. The driver has flushed its
    /// output; the socket and transport state travel separately.
    pub fn hand_off(&mut self, conn: ConnId) -> Option<Session> {
        let c = self.conns.remove(&conn)?;
        self.counters.handed_over += 1;
        debug_assert!(c.outbound.is_empty(), "output is flushed before a hand-off");
        Some(Session { max_frame_bytes: c.max_frame_bytes, failed: c.failed, peer_ip: c.peer_ip })
    }

    /// Takes over a connection another core handed off.
    pub fn adopt(&mut self, session: Session) -> ConnId {
        let conn = self.open_connection();
        if let Some(c) = self.conns.get_mut(&conn) {
            c.state = ConnState::Open;
            c.max_frame_bytes = session.max_frame_bytes;
            c.failed = session.failed;
            c.peer_ip = session.peer_ip;
        }
        conn
    }

    /// Whether messages wait for other cores.
    pub fn has_outbox(&self) -> bool {
        self.outbox.iter().any(|o| !o.is_empty()) || !self.presence_out.is_empty()
    }

    /// Takes the messages for other cores: one batch per destination.
    pub fn take_outbox(&mut self) -> Vec<(u32, Vec<CoreMsg>)> {
        self.flush_presence();
        let mut batches = Vec::new();
        for (core, outbox) in self.outbox.iter_mut().enumerate() {
            if !outbox.is_empty() {
                self.counters.mesh_batches_out += 1;
                self.counters.mesh_items_out += outbox.len() as u64;
                batches.push((core as u32, std::mem::take(outbox)));
            }
        }
        batches
    }

    /// Queues this core's metrics for `core` (the one serving the admin endpoint).
    pub fn push_stats_to(&mut self, core: u32) {
        let stats = Box::new(self.stats());
        if let Some(outbox) = self.outbox.get_mut(core as usize) {
            outbox.push(CoreMsg::Stats(stats));
        }
    }

    /// This core's metrics.
    pub fn stats(&self) -> CoreStats {
        let owned = self.owned_shards();
        let failed_shards = owned
            .iter()
            .filter_map(|(id, s)| s.borrow().write_error().map(|e| (*id, e.to_string())))
            .collect();
        let shards = owned.into_iter();
        CoreStats {
            core: self.placement.index,
            connections: self.conns.len() as u64,
            outbound_bytes: self.outbound_bytes() as u64,
            frames_in: self.counters.frames_in,
            messages_sent: self.counters.messages_sent,
            messages_delivered: self.counters.messages_delivered,
            receipts_delivered: self.counters.receipts_delivered,
            protocol_errors: self.counters.protocol_errors,
            mesh_batches_out: self.counters.mesh_batches_out,
            mesh_items_out: self.counters.mesh_items_out,
            dropped_envelopes: self.counters.dropped_envelopes,
            codes_sent: self.counters.codes_sent,
            codes_refused: self.counters.codes_refused,
            pow_challenges: self.counters.pow_challenges,
            presence_events: self.counters.presence_events,
            handed_over: self.counters.handed_over,
            connections_accepted: self.counters.connections_accepted,
            connections_failed: self.counters.connections_failed,
            disk: self.disk.clone(),
            shards: shards.map(|(id, s)| (id, s.borrow().counters().clone())).collect(),
            failed_shards,
            send_to_sent: self.send_to_sent.clone(),
            send_to_deliver: self.send_to_deliver.clone(),
            commit_batch_records: self.commit_batch_records.clone(),
        }
    }

    /// This core's metrics and the latest each other core pushed here.
    pub fn all_stats(&self) -> Vec<CoreStats> {
        let mut all = vec![self.stats()];
        all.extend(self.peer_stats.iter().flatten().cloned());
        all.sort_by_key(|s| s.core);
        all
    }

    /// Handles a batch from another core.
    pub fn on_mesh(&mut self, messages: Vec<CoreMsg>, now_ms: u64) {
        for message in messages {
            match message {
                CoreMsg::Request { from, token, request } => {
                    self.serve_request(from, token, request)
                }
                CoreMsg::Reply { token, reply } => self.on_reply(token, reply, now_ms),
                CoreMsg::Stats(stats) => {
                    if let Some(slot) = self.peer_stats.get_mut(stats.core as usize) {
                        *slot = Some(*stats);
                    }
                }
            }
        }
    }

    /// Queues `request` for `core`; its answer will finish `awaiting` (if any).
    fn ask(&mut self, core: u32, request: Request, awaiting: Option<Awaiting>) {
        let token = match awaiting {
            Some(awaiting) => {
                let token = self.next_token;
                self.next_token += 1;
                self.awaiting.insert(token, awaiting);
                token
            }
            None => 0,
        };
        let from = self.placement.index;
        self.outbox[core as usize].push(CoreMsg::Request { from, token, request });
    }

    /// Does what another core asked; answers (if asked to) once it is durable.
    fn serve_request(&mut self, from: u32, token: u64, request: Request) {
        let (waits, reply) = match request {
            Request::Deliver(request) => {
                let (waits, outcome) = self.store_delivery(&request);
                (waits, Reply::Deliver(outcome))
            }
            Request::ServerEnvelope { to_user, from: author, kind, body, now_ms: sent_ms } => {
                match self.append_server_envelope(to_user, author, kind, &body, sent_ms) {
                    Ok(waits) => (waits, Reply::Done(Ok(()))),
                    Err(error) => {
                        tracing::warn!(%error, to_user, "could not store a server envelope");
                        (Vec::new(), Reply::Done(Err(write_error_code(&error))))
                    }
                }
            }
            Request::ClaimLink { code, now_ms } => {
                let claimed = self.claim_link(&code, now_ms);
                (Vec::new(), Reply::Link(claimed.map(Box::new)))
            }
            Request::LinkDone { code, registered } => {
                self.finish_link(&code, registered);
                return;
            }
            Request::Watch { subscriber, targets, watch } => {
                self.watch(subscriber, &targets, watch);
                return;
            }
            Request::Presence { subscriber, events } => {
                self.push_presence(subscriber, &events);
                return;
            }
            Request::Unqueue { sender, from_user, message_ids } => {
                let waits = self.unqueue(sender, from_user, &message_ids);
                (waits, Reply::Done(Ok(())))
            }
            request @ Request::GroupUpdate { .. } => self.serve_group_update(request),
            request @ Request::GroupSend { .. } => {
                return self.serve_group_send(request, GroupReplyTo::Core { core: from, token });
            }
            Request::GroupDeliver(mut delivery) => {
                (self.deliver_group(&mut delivery), Reply::Done(Ok(())))
            }
            request @ Request::GroupInfo { .. } => (Vec::new(), self.serve_group_info(request)),
            Request::ForgetMember { user_id } => {
                self.forget_member(user_id);
                return;
            }
            request @ (Request::Discover { .. }
            | Request::Memberships { .. }
            | Request::Profile { .. }) => {
                let reply = self.serve_account_request(request).expect("an account request");
                (Vec::new(), reply)
            }
            Request::MediaRead { reader, media_id, offset, length } => {
                let read = self.read_media(reader, media_id, offset, length);
                (Vec::new(), Reply::Media(read.map_err(|(code, why)| (code, why.to_string()))))
            }
            Request::Typing { to_user, from, active } => {
                self.push_typing(to_user, from, active);
                return;
            }
            Request::FetchBundles { target, wanted } => match self.claim_bundles(target, &wanted) {
                Ok((bundles, waits)) => (waits, Reply::Bundles(Ok(bundles))),
                Err(code) => (Vec::new(), Reply::Bundles(Err(code))),
            },
        };
        if token != 0 {
            self.when_durable(waits, Release::Mesh { core: from, token, reply });
        }
    }

    /// The recipient's side of a cross-core send: dedup, device check, append.
    fn store_delivery(&mut self, request: &DeliverRequest) -> (Vec<(u32, u64)>, DeliverOutcome) {
        let (sender, peer) = (request.sender, request.peer);
        if self.blocked_by(peer, sender.0) {
            // Like a delivery that never happens: the sender learns nothing of the block.
            return (Vec::new(), DeliverOutcome::Stored);
        }
        let peer_shard = home_shard_of_user(peer);
        let duplicate = self.local_shard(peer_shard).and_then(|shard| {
            let shard = shard.borrow();
            let id = shard.lookup_send(sender.0, sender.1, request.client_message_id)?;
            Some((id, shard.appended_seq()))
        });
        if let Some((id, seq)) = duplicate {
            return (vec![(peer_shard, seq)], DeliverOutcome::Duplicate(id));
        }
        let Some(mut expected) = self.devices_of(peer) else {
            return (Vec::new(), DeliverOutcome::Failed(ErrorCode::NotFound));
        };
        expected.retain(|d| *d != sender);
        let mut given: Vec<_> = request.copies.iter().map(|c| (peer, c.device_id)).collect();
        given.sort_unstable();
        if let Err(outcome) = check_copies(&expected, &given) {
            return (Vec::new(), outcome);
        }
        let meta = EnvelopeMeta {
            server_message_id: request.server_message_id,
            client_message_id: request.client_message_id,
            server_time_ms: request.server_time_ms,
            expires_ms: request.expires_ms,
            sender,
            peer,
            kind: request.kind,
        };
        let copies =
            request.copies.iter().map(|c| ((peer, c.device_id), c.e2e_type, &c.ciphertext[..]));
        match self.append_copies(&meta, copies) {
            Ok(waits) => (waits, DeliverOutcome::Stored),
            Err(error) => {
                tracing::error!(%error, "storage refused a write");
                (Vec::new(), DeliverOutcome::Failed(write_error_code(&error)))
            }
        }
    }

    /// Another core answered: finish the client's request it was for.
    fn on_reply(&mut self, token: u64, reply: Reply, now_ms: u64) {
        let Some(awaiting) = self.awaiting.remove(&token) else { return };
        match (awaiting, reply) {
            (Awaiting::Send { conn, rid, meta, own_copies, since_us }, Reply::Deliver(outcome)) => {
                let ty = MessageType::SendMessage.code();
                let client_message_id = meta.client_message_id;
                let send_error = |code: ErrorCode, missing, extra, message: &str| SendError {
                    client_message_id,
                    code: code as u16,
                    retry_after_ms: 0,
                    missing_devices: missing,
                    extra_devices: extra,
                    message: message.to_string(),
                };
                match outcome {
                    DeliverOutcome::Stored => {
                        let me = meta.sender.0;
                        let copies = own_copies
                            .iter()
                            .map(|c| ((me, c.device_id), c.e2e_type, &c.ciphertext[..]));
                        match self.append_copies(&meta, copies) {
                            Ok(waits) => {
                                self.counters.messages_sent += 1;
                                let ack = SendAck {
                                    client_message_id,
                                    server_message_id: meta.server_message_id,
                                    server_time_ms: meta.server_time_ms,
                                    duplicate: false,
                                };
                                self.reply_when_durable_timed(
                                    conn,
                                    rid,
                                    &ack,
                                    waits,
                                    Some(since_us),
                                );
                            }
                            Err(error) => self.storage_error(conn, rid, ty, &error),
                        }
                    }
                    DeliverOutcome::Duplicate(server_message_id) => {
                        let ack = SendAck {
                            client_message_id,
                            server_message_id,
                            server_time_ms: now_ms,
                            duplicate: true,
                        };
                        self.reply(conn, rid, &ack);
                    }
                    DeliverOutcome::Stale { missing, extra } => self.reply(
                        conn,
                        rid,
                        &send_error(
                            ErrorCode::StaleDevices,
                            missing,
                            extra,
                            "the copies do not match the recipient's devices",
                        ),
                    ),
                    DeliverOutcome::Failed(code) => {
                        let why = if code == ErrorCode::NotFound {
                            "no such user"
                        } else {
                            "the recipient's server could not store it"
                        };
                        let mut error = send_error(code, Vec::new(), Vec::new(), why);
                        if code != ErrorCode::NotFound {
                            error.retry_after_ms = 1000;
                        }
                        self.reply(conn, rid, &error)
                    }
                }
            }
            (Awaiting::Done { conn, rid, failed_type, waits }, Reply::Done(result)) => match result
            {
                Ok(()) => self.reply_when_durable(conn, rid, &Done {}, waits),
                Err(code) => {
                    self.error_reply(conn, rid, failed_type, code, "could not store this", 1000)
                }
            },
            (Awaiting::Bundles { conn, rid, target }, Reply::Bundles(result)) => match result {
                Ok(devices) => self.reply(conn, rid, &Bundles { user_id: target, devices }),
                Err(code) => {
                    let ty = MessageType::FetchBundles.code();
                    let message =
                        if code == ErrorCode::NotFound { "no such user" } else { "retry later" };
                    self.error_reply(conn, rid, ty, code, message, 0)
                }
            },
            (Awaiting::Link { conn, rid, user_id, code }, Reply::Link(result)) => {
                let ty = MessageType::LinkApprove.code();
                match result {
                    Ok(device) => {
                        self.add_linked_device(conn, rid, user_id, &code, *device, now_ms)
                    }
                    Err(error_code) => {
                        self.error_reply(conn, rid, ty, error_code, "no such linking code", 0)
                    }
                }
            }
            (Awaiting::Group { conn, rid }, reply @ Reply::Group(_)) => {
                let release = self.group_reply_release(conn, rid, reply);
                self.when_durable(Vec::new(), release);
            }
            (Awaiting::Fanout { fanout_id }, Reply::Done(_)) => {
                self.fanout_answered(fanout_id, true)
            }
            (Awaiting::Gather { gather_id }, reply) => self.gathered(gather_id, reply),
            (Awaiting::Profile { conn, rid }, Reply::Profile(profile)) => {
                self.answer_profile(conn, rid, profile.map(|p| *p))
            }
            (Awaiting::Media { conn, rid }, Reply::Media(result)) => match result {
                Ok(data) => self.reply(conn, rid, &data),
                Err((code, message)) => {
                    let ty = MessageType::MediaDownload.code();
                    self.error_reply(conn, rid, ty, code, &message, 0)
                }
            },
            (awaiting, reply) => {
                tracing::error!(?awaiting, ?reply, "a core answered with the wrong kind of reply")
            }
        }
    }

    /// Sends a typed error for undecodable input and marks the connection for closing.
    pub fn reject_malformed(&mut self, conn: ConnId, error: tern_wire::DecodeError) {
        self.counters.protocol_errors += 1;
        self.note_failed(conn);
        self.error_reply(conn, 0, 0, error.error_code(), &error.to_string(), 0);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.closing = true;
            c.wake();
        }
    }

    // -----------------------------------------------------------------------------------
    // Frames in
    // -----------------------------------------------------------------------------------

    /// Handles one validated frame from `conn`.
    pub fn handle_frame(&mut self, conn: ConnId, frame: &Frame<'_>, now_ms: u64) {
        self.counters.frames_in += 1;
        let Some(state) = self.conns.get(&conn).map(|c| c.state) else { return };
        let rid = frame.header.request_id;
        let ty = frame.header.message_type;
        match (state, frame.message) {
            (ConnState::AwaitHello, Message::Hello(hello)) => self.hello(conn, rid, hello, now_ms),
            (ConnState::AwaitHello, _) => self.fatal(
                conn,
                rid,
                ty,
                ErrorCode::UnexpectedFrame,
                "the first frame must be Hello",
            ),
            (_, Message::Hello(_)) => {
                self.fatal(conn, rid, ty, ErrorCode::UnexpectedFrame, "Hello was already sent")
            }
            (_, Message::Ping(ping)) => {
                let pong = Pong { nonce: ping.nonce.to_native() };
                self.reply(conn, rid, &pong);
            }
            (_, Message::Pong(_)) => {}
            (ConnState::Open, Message::RequestCode(request)) => {
                self.request_code(conn, rid, request, now_ms)
            }
            (ConnState::Open, Message::Verify(verify)) => self.verify(conn, rid, verify, now_ms),
            (ConnState::Open, Message::Auth(auth)) => self.auth(conn, rid, auth, now_ms),
            (ConnState::Open, Message::LinkRequest(request)) => {
                self.link_request(conn, rid, request, now_ms)
            }
            (ConnState::Open, _) => self.error_reply(
                conn,
                rid,
                ty.code(),
                ErrorCode::AuthRequired,
                "authenticate (Auth) or register (RequestCode, Verify) first",
                0,
            ),
            (ConnState::Authenticated { user_id, device_id }, message) => {
                self.authenticated(conn, rid, (user_id, device_id), message, now_ms)
            }
        }
    }

    fn authenticated(
        &mut self,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        message: Message<'_>,
        now_ms: u64,
    ) {
        let ty = message.message_type();
        match message {
            Message::SendMessage(send) => self.send(conn, rid, me, send, now_ms),
            Message::DeliveryAck(ack) => {
                self.delivery_ack(conn, me, ack.up_to_mailbox_seq.to_native(), now_ms)
            }
            Message::Resync(resync) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    let from = resync.from_mailbox_seq.to_native().max(c.acked_through);
                    c.deliver_cursor = from;
                }
                self.pump(conn, now_ms);
            }
            Message::SendReceipt(receipt) => self.send_receipt(conn, rid, me, receipt, now_ms),
            Message::GroupUpdate(update) => self.group_update(conn, rid, me, update, now_ms),
            Message::Unlink(unlink) => self.unlink(conn, rid, me, unlink.device_id.to_native()),
            Message::ExportRequest(_) => self.export(conn, rid, me.0, now_ms),
            Message::DeleteAccount(delete) => {
                self.delete_account(conn, rid, me, delete.phone.as_str())
            }
            Message::SetRegistrationLock(lock) => {
                if me.1 != 1 {
                    let message = "only the primary device sets the registration lock";
                    return self.error_reply(
                        conn,
                        rid,
                        ty.code(),
                        ErrorCode::Forbidden,
                        message,
                        0,
                    );
                }
                let pin_hash = lock.pin.as_ref().map(|pin| secrets::hash_pin(pin.as_str()));
                let op = StateOp::SetRegistrationLock { user_id: me.0, pin_hash };
                self.set_account_state(conn, rid, me.0, op)
            }
            Message::ContactDiscover(discover) => {
                let hashes: Vec<PhoneHash> = discover.hashes.to_vec();
                self.discover(conn, rid, me.0, hashes, now_ms)
            }
            Message::ProfileGet(get) => self.profile_get(conn, rid, me.0, get.user_id.to_native()),
            Message::ProfileSet(set) => match rkyv::deserialize::<ProfileSet, Failure>(set) {
                Ok(set) => self.profile_set(conn, rid, me.0, set),
                Err(_) => {
                    self.error_reply(conn, rid, ty.code(), ErrorCode::Malformed, "unreadable", 0)
                }
            },
            Message::Report(report) => match rkyv::deserialize::<Report, Failure>(report) {
                Ok(report) => self.report(conn, rid, me.0, report, now_ms),
                Err(_) => {
                    self.error_reply(conn, rid, ty.code(), ErrorCode::Malformed, "unreadable", 0)
                }
            },
            Message::MediaBegin(_)
            | Message::MediaChunk(_)
            | Message::MediaStatusRequest(_)
            | Message::MediaCommit(_)
            | Message::MediaDownload(_) => self.media_frame(conn, rid, me, &message, now_ms),
            Message::GroupInfoRequest(request) => {
                self.group_info(conn, rid, me.0, request.group_id.to_native())
            }
            Message::DeleteForEveryone(delete) => {
                let ids: Vec<MessageId> =
                    delete.message_ids.iter().map(|i| i.to_native()).collect();
                self.delete_for_everyone(conn, rid, me, delete.peer.to_native(), ids)
            }
            Message::UploadKeys(upload) => self.upload_keys(conn, rid, me, upload),
            Message::FetchBundles(fetch) => self.fetch_bundles(conn, rid, me, fetch, now_ms),
            Message::DeviceListRequest(_) => self.device_list(conn, rid, me),
            Message::LinkApprove(approve) => {
                self.link_approve(conn, rid, me, approve.code.as_str(), now_ms)
            }
            Message::PushRegister(register) => self.push_register(conn, rid, me, register),
            Message::PresenceSubscribe(subscribe) => {
                let targets: Vec<UserId> =
                    subscribe.user_ids.iter().map(|u| u.to_native()).collect();
                self.presence_subscribe(conn, rid, me.0, targets)
            }
            Message::Block(block) => {
                let op = StateOp::SetBlocked {
                    user_id: me.0,
                    other: block.user_id.to_native(),
                    blocked: true,
                };
                self.set_account_state(conn, rid, me.0, op)
            }
            Message::Unblock(unblock) => {
                let other = unblock.user_id.to_native();
                let op = StateOp::SetBlocked { user_id: me.0, other, blocked: false };
                self.set_account_state(conn, rid, me.0, op)
            }
            Message::SetContacts(contacts) => {
                let contacts: Vec<UserId> =
                    contacts.user_ids.iter().map(|u| u.to_native()).collect();
                self.set_account_state(
                    conn,
                    rid,
                    me.0,
                    StateOp::SetContacts { user_id: me.0, contacts },
                )
            }
            Message::PrivacySettings(privacy) => {
                match rkyv::deserialize::<PrivacySettings, Failure>(privacy) {
                    Ok(privacy) => self.set_account_state(
                        conn,
                        rid,
                        me.0,
                        StateOp::SetPrivacy { user_id: me.0, privacy },
                    ),
                    Err(_) => self.error_reply(
                        conn,
                        rid,
                        ty.code(),
                        ErrorCode::Malformed,
                        "unreadable",
                        0,
                    ),
                }
            }
            Message::PrivacyGet(_) => {
                let privacy = self.devices_of(me.0).and_then(|_| {
                    let shard = self.local_shard(home_shard_of_user(me.0))?.borrow();
                    Some(shard.state().account(me.0)?.privacy.clone())
                });
                match privacy {
                    Some(privacy) => self.reply(conn, rid, &privacy),
                    None => {
                        self.error_reply(conn, rid, ty.code(), ErrorCode::NotFound, "no account", 0)
                    }
                }
            }
            Message::Typing(typing) => {
                if let ArchivedConversation::User(peer) = &typing.conversation {
                    self.route_typing(peer.to_native(), me, typing.active);
                }
            }
            Message::Auth(_) | Message::Verify(_) | Message::RequestCode(_) => self.error_reply(
                conn,
                rid,
                ty.code(),
                ErrorCode::UnexpectedFrame,
                "this connection is already authenticated",
                0,
            ),
            _ => self.error_reply(
                conn,
                rid,
                ty.code(),
                ErrorCode::UnexpectedFrame,
                "not supported by this server version yet",
                0,
            ),
        }
    }

    // -----------------------------------------------------------------------------------
    // Handshake, registration, auth
    // -----------------------------------------------------------------------------------

    fn hello(&mut self, conn: ConnId, rid: u32, hello: &ArchivedHello, now_ms: u64) {
        match negotiate_version(hello) {
            Ok(version) => {
                let max = negotiate_max_frame_bytes(
                    hello.max_frame_bytes.to_native(),
                    self.config.max_frame_bytes,
                );
                let welcome = Welcome {
                    version,
                    max_frame_bytes: max,
                    server_time_ms: now_ms,
                    heartbeat_interval_ms: self.config.heartbeat_interval_ms,
                    server: concat!("ternd/", env!("CARGO_PKG_VERSION")).to_string(),
                };
                self.reply(conn, rid, &welcome);
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.state = ConnState::Open;
                    c.max_frame_bytes = max;
                }
            }
            Err(error) => {
                self.fatal(conn, rid, MessageType::Hello, error.error_code(), &error.to_string())
            }
        }
    }

    fn request_code(&mut self, conn: ConnId, rid: u32, request: &ArchivedRequestCode, now_ms: u64) {
        let phone = request.phone.as_str();
        let ty = MessageType::RequestCode.code();
        if !valid_phone(phone) {
            let message = "phone must be E.164: '+' and 8 to 15 digits";
            return self.error_reply(conn, rid, ty, ErrorCode::InvalidArgument, message, 0);
        }
        let Ok(budget_keys) = self.code_budget(conn, rid, request, now_ms) else {
            return; // Refused or challenged: answered.
        };
        if let Err(wait) = self.code_requests.check(&phone.to_string(), now_ms) {
            let message = "too many codes requested for this number";
            return self.error_reply(conn, rid, ty, ErrorCode::RateLimited, message, wait as u32);
        }
        self.code_requests.record(phone.to_string(), now_ms);
        self.spend_code_budget(budget_keys, now_ms);
        let code = secrets::new_code(6);
        self.counters.codes_sent += 1;
        self.code_sender.send_code(phone, &code);
        self.codes.insert(
            phone.to_string(),
            PendingCode {
                code,
                expires_ms: now_ms + self.config.code_ttl_ms,
                attempts_left: self.config.code_attempts_max,
            },
        );
        let sent = CodeSent {
            expires_in_s: (self.config.code_ttl_ms / 1000) as u32,
            retry_after_s: 0,
            code_length: 6,
        };
        self.reply(conn, rid, &sent);
    }

    fn verify(&mut self, conn: ConnId, rid: u32, verify: &ArchivedVerify, now_ms: u64) {
        let phone = verify.phone.as_str();
        let ty = MessageType::Verify.code();
        let checked = match self.codes.get_mut(phone) {
            None => Err((ErrorCode::InvalidCode, "no code was requested for this number")),
            Some(pending) if pending.expires_ms <= now_ms => {
                Err((ErrorCode::CodeExpired, "the code expired; request a new one"))
            }
            Some(pending) if !secrets::code_matches(verify.code.as_str(), &pending.code) => {
                pending.attempts_left = pending.attempts_left.saturating_sub(1);
                if pending.attempts_left == 0 {
                    self.codes.remove(phone);
                    Err((
                        ErrorCode::InvalidCode,
                        "wrong code; too many attempts, request a new one",
                    ))
                } else {
                    Err((ErrorCode::InvalidCode, "wrong code"))
                }
            }
            Some(_) => Ok(()),
        };
        if let Err((code, message)) = checked {
            return self.error_reply(conn, rid, ty, code, message, 0);
        }
        let Ok(device_keys) = rkyv::deserialize::<NewDevice, Failure>(&verify.device) else {
            let message = "unreadable device keys";
            return self.error_reply(conn, rid, ty, ErrorCode::Malformed, message, 0);
        };
        // Checked before the code is used up: a client bug does not cost a new code.
        if let Err(message) = secrets::check_device_keys(&device_keys.keys) {
            return self.error_reply(conn, rid, ty, ErrorCode::InvalidSignature, message, 0);
        }
        // A locked number moves only with its PIN; wrong PINs are limited per number and
        // day (the code stays valid meanwhile).
        if let Err((code, message, wait)) = self.check_registration_lock(phone, verify, now_ms) {
            return self.error_reply(conn, rid, ty, code, message, wait);
        }
        self.codes.remove(phone);
        let shard_id = home_shard_of_phone(phone, self.shard_count());
        let Some(handle) = self.local_shard(shard_id) else {
            // `route` sends registration to the phone's core; this is a bug if reached.
            let message = "registration reached the wrong core";
            return self.error_reply(conn, rid, ty, ErrorCode::Internal, message, 1000);
        };
        let token = secrets::new_token();
        let result = register(&mut handle.borrow_mut(), phone, device_keys, &token, now_ms);
        match result {
            Ok((user_id, new_account, seq)) => {
                self.phone_index.insert(tern_wire::accounts::phone_hash(phone), user_id);
                if !new_account {
                    // The account moved to a new primary: every old device and token is
                    // revoked, so their live sessions end too (as an unlinked device's
                    // does), or they would go on sending as the user and reading (and
                    // acking) the new device's mailbox.
                    self.close_sessions_of(user_id);
                }
                let registered = Registered { user_id, device_id: 1, token, new_account };
                self.reply_when_durable(conn, rid, &registered, vec![(shard_id, seq)]);
            }
            Err(error) => self.storage_error(conn, rid, ty, &error),
        }
    }

    /// Closes every authenticated connection of `user_id` (homed here, as all its
    /// sessions are), after its devices were revoked.
    fn close_sessions_of(&mut self, user_id: UserId) {
        let devices: Vec<(UserId, DeviceId)> =
            self.online.range((user_id, 0)..=(user_id, DeviceId::MAX)).map(|(d, _)| *d).collect();
        for device in devices {
            let Some(old) = self.online.remove(&device) else { continue };
            if let Some(c) = self.conns.get_mut(&old) {
                c.state = ConnState::Open;
                c.closing = true;
                c.wake();
            }
            self.pushed.remove(&device);
        }
    }

    fn auth(&mut self, conn: ConnId, rid: u32, auth: &ArchivedAuth, now_ms: u64) {
        let user_id = auth.user_id.to_native();
        let device_id = auth.device_id.to_native();
        let shard_id = home_shard_of_user(user_id);
        let ty = MessageType::Auth.code();
        let found = self.local_shard(shard_id).and_then(|shard| {
            let shard = shard.borrow();
            let device = shard.state().device(user_id, device_id)?;
            let head = shard.mailbox_next_seq((user_id, device_id));
            let pending = shard.mailbox_len((user_id, device_id));
            secrets::token_matches(&auth.token, &device.token_hash)
                .then(|| (pending, head - pending, device.one_time_keys.len() as u32))
        });
        let Some((pending, head, keys)) = found else {
            self.counters.protocol_errors += 1;
            self.note_failed(conn);
            let message = "unknown device or wrong token";
            return self.error_reply(conn, rid, ty, ErrorCode::BadToken, message, 0);
        };
        let was_online = self.user_online(user_id);
        // One connection per device: a newer login replaces the older one.
        if let Some(old) = self.online.insert((user_id, device_id), conn) {
            if old != conn {
                if let Some(c) = self.conns.get_mut(&old) {
                    c.state = ConnState::Open;
                    c.closing = true;
                    c.wake();
                }
            }
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.state = ConnState::Authenticated { user_id, device_id };
            c.deliver_cursor = head;
            c.acked_through = head;
        }
        tracing::debug!(conn, user_id, device_id, pending, head, "authenticated");
        if !was_online {
            self.presence_changed(user_id, false);
        }
        self.pushed.remove(&(user_id, device_id));
        let ok =
            AuthOk { user_id, device_id, mailbox_pending: pending, one_time_keys_remaining: keys };
        self.reply(conn, rid, &ok);
        if keys < ONE_TIME_KEYS_LOW {
            let low = KeysLow { one_time_keys_remaining: keys, threshold: ONE_TIME_KEYS_LOW };
            self.push(conn, &low);
        }
        self.pump(conn, now_ms);
    }

    // -----------------------------------------------------------------------------------
    // Presence and last seen
    // -----------------------------------------------------------------------------------

    /// Whether any device of `user_id` (homed here) is connected.
    fn user_online(&self, user_id: UserId) -> bool {
        self.online.range((user_id, 0)..=(user_id, DeviceId::MAX)).next().is_some()
    }

    /// The last device of `user_id` left: record when, and tell the watchers.
    fn went_offline(&mut self, user_id: UserId, now_ms: u64) {
        if let Some(shard) = self.local_shard(home_shard_of_user(user_id)).cloned() {
            let op = StateOp::SetLastSeen { user_id, last_seen_ms: now_ms };
            let recorded = shard.borrow_mut().apply_state(op);
            if let Err(error) = recorded {
                tracing::warn!(%error, user_id, "could not record last seen");
            }
        }
        self.presence_changed(user_id, false);
    }

    /// `target`'s presence changed: queue an event for each watcher allowed to see it,
    /// coalesced with any other change this turn. After a change of what its owner lets
    /// be seen (`settings_changed`), watchers no longer allowed hear "hidden" (offline,
    /// no last seen) once, so that they do not keep a stale "online".
    fn presence_changed(&mut self, target: UserId, settings_changed: bool) {
        let Some(watchers) = self.watchers.get(&target) else { return };
        let watchers: Vec<UserId> = watchers.iter().copied().collect();
        for subscriber in watchers {
            let hidden = PresenceEvent { user_id: target, online: false, last_seen_ms: 0 };
            let event = match self.presence_seen_by(target, subscriber) {
                Some(event) => event,
                None if settings_changed => hidden,
                None => continue,
            };
            self.presence_out.insert((subscriber, target), event);
        }
    }

    /// What `subscriber` may see of `target`'s presence (`None`: nothing at all).
    fn presence_seen_by(&self, target: UserId, subscriber: UserId) -> Option<PresenceEvent> {
        let shard = self.local_shard(home_shard_of_user(target))?.borrow();
        let account = shard.state().account(target)?;
        if account.blocked.contains(&subscriber) {
            return None;
        }
        let is_contact = account.contacts.contains(&subscriber);
        let visible = |visibility: &Visibility| match visibility {
            Visibility::Everyone => true,
            Visibility::Contacts => is_contact,
            Visibility::Nobody => false,
        };
        if !visible(&account.privacy.online) {
            return None;
        }
        let last_seen_ms =
            if visible(&account.privacy.last_seen) { account.last_seen_ms } else { 0 };
        drop(shard);
        Some(PresenceEvent { user_id: target, online: self.user_online(target), last_seen_ms })
    }

    /// A user homed here replaces the set of users whose presence it follows.
    fn presence_subscribe(&mut self, conn: ConnId, rid: u32, me: UserId, mut targets: Vec<UserId>) {
        targets.sort_unstable();
        targets.dedup();
        targets.retain(|t| *t != me);
        if targets.len() > PRESENCE_SUBSCRIPTIONS_MAX {
            let ty = MessageType::PresenceSubscribe.code();
            let message = "too many users to follow at once";
            return self.error_reply(conn, rid, ty, ErrorCode::TooLarge, message, 0);
        }
        let old = self.watching.insert(me, targets.clone()).unwrap_or_default();
        let gone: Vec<UserId> =
            old.iter().filter(|t| targets.binary_search(t).is_err()).copied().collect();
        let new: Vec<UserId> = targets.iter().filter(|t| !old.contains(t)).copied().collect();
        for (list, watch) in [(gone, false), (new, true)] {
            let mut by_core: BTreeMap<u32, Vec<UserId>> = BTreeMap::new();
            for target in list {
                let shard = home_shard_of_user(target);
                if shard < self.shard_count() {
                    by_core.entry(self.placement.core_of_shard(shard)).or_default().push(target);
                }
            }
            for (core, targets) in by_core {
                if core == self.placement.index {
                    self.watch(me, &targets, watch);
                } else {
                    self.ask(core, Request::Watch { subscriber: me, targets, watch }, None);
                }
            }
        }
        self.reply(conn, rid, &Done {});
    }

    /// Starts or stops telling `subscriber` about `targets` (homed here); a new watcher
    /// hears the current state at once.
    fn watch(&mut self, subscriber: UserId, targets: &[UserId], watch: bool) {
        for &target in targets {
            if !watch {
                if let Some(watchers) = self.watchers.get_mut(&target) {
                    watchers.remove(&subscriber);
                }
                continue;
            }
            if self.devices_of(target).is_none() {
                continue;
            }
            let watchers = self.watchers.entry(target).or_default();
            if watchers.len() >= PRESENCE_WATCHERS_MAX && !watchers.contains(&subscriber) {
                // The fan-out budget: a user's presence goes to this many at most.
                continue;
            }
            watchers.insert(subscriber);
            if let Some(event) = self.presence_seen_by(target, subscriber) {
                self.presence_out.insert((subscriber, target), event);
            }
        }
    }

    /// Sends this turn's presence: one push per event to local subscribers, one mesh
    /// request per remote subscriber.
    fn flush_presence(&mut self) {
        if self.presence_out.is_empty() {
            return;
        }
        let mut by_subscriber: BTreeMap<UserId, Vec<PresenceEvent>> = BTreeMap::new();
        for ((subscriber, _), event) in self.presence_out.drain() {
            by_subscriber.entry(subscriber).or_default().push(event);
        }
        for (subscriber, events) in by_subscriber {
            self.counters.presence_events += events.len() as u64;
            let core = self.placement.core_of_shard(home_shard_of_user(subscriber));
            if core == self.placement.index {
                self.push_presence(subscriber, &events);
            } else {
                self.ask(core, Request::Presence { subscriber, events }, None);
            }
        }
    }

    /// Pushes presence events to the connected devices of `subscriber` (homed here).
    fn push_presence(&mut self, subscriber: UserId, events: &[PresenceEvent]) {
        for device in self.devices_of(subscriber).unwrap_or_default() {
            if let Some(&conn) = self.online.get(&device) {
                for event in events {
                    self.push(conn, event);
                }
            }
        }
    }

    /// Applies an account setting that changes what others may see, then re-tells the
    /// watchers.
    fn set_account_state(&mut self, conn: ConnId, rid: u32, me: UserId, op: StateOp) {
        let Some(shard) = self.local_shard(home_shard_of_user(me)).cloned() else { return };
        let applied = shard.borrow_mut().apply_state(op);
        match applied {
            Ok(seq) => {
                self.presence_changed(me, true);
                self.reply_when_durable(conn, rid, &Done {}, vec![(home_shard_of_user(me), seq)]);
            }
            Err(error) => self.storage_error(conn, rid, 0, &error),
        }
    }

    // -----------------------------------------------------------------------------------
    // Mailbox quotas
    // -----------------------------------------------------------------------------------

    /// Keeps `device`'s mailbox (homed here) within its quota before an envelope of about
    /// `incoming` bytes joins it: when full, the oldest envelopes are dropped down to 90 %
    /// of each limit, the device gets a `Dropped` notice at that point of its sequence,
    /// and the senders of the dropped messages a `SentDropped` notice. Never silent.
    fn make_room(&mut self, device: (UserId, DeviceId), incoming: u64, now_ms: u64) {
        let (max_messages, max_bytes) =
            (self.config.mailbox_max_messages, self.config.mailbox_max_bytes);
        let Some(handle) = self.local_shard(home_shard_of_user(device.0)).cloned() else { return };
        let (len, bytes, head) = {
            let mut shard = handle.borrow_mut();
            (shard.mailbox_len(device), shard.mailbox_bytes(device), shard.mailbox_head_seq(device))
        };
        if len < max_messages && bytes + incoming <= max_bytes {
            return;
        }
        // Down to 90 % of each limit, with room for the notice and the newcomer.
        let keep_messages = (max_messages * 9 / 10).min(max_messages.saturating_sub(2));
        let by_count = len.saturating_sub(keep_messages);
        let average = bytes / len.max(1);
        let over = (bytes + incoming).saturating_sub(max_bytes * 9 / 10);
        let by_bytes = if bytes + incoming > max_bytes { over.div_ceil(average.max(1)) } else { 0 };
        let drop_count = by_count.max(by_bytes).min(len);
        if drop_count == 0 {
            return;
        }
        // Who loses what, before the envelopes go. An earlier notice that goes too hands
        // its count on to the new one.
        let mut lost: BTreeMap<UserId, Vec<MessageId>> = BTreeMap::new();
        let mut announced = 0u64;
        {
            let shard = handle.borrow();
            // At time 0 nothing counts as expired: every dropped message is announced.
            let read = shard.read_mailbox(device, head, drop_count as usize, 0);
            for entry in &read.entries {
                let Ok(envelope) = rkyv::access::<ArchivedEnvelope, Failure>(entry.envelope) else {
                    continue;
                };
                let client_kind = matches!(
                    envelope.kind,
                    ArchivedEnvelopeKind::Text
                        | ArchivedEnvelopeKind::Media
                        | ArchivedEnvelopeKind::Control
                );
                if client_kind {
                    let sender = envelope.sender_user.to_native();
                    lost.entry(sender).or_default().push(envelope.server_message_id.to_native());
                    announced += 1;
                } else if let Ok(tern_wire::EnvelopeContent::Notice(
                    ArchivedNoticeBody::Dropped { count },
                )) = envelope.content()
                {
                    announced += count.to_native();
                }
            }
        }
        let dropped = match handle.borrow_mut().ack(device, head + drop_count - 1) {
            Ok(dropped) => dropped,
            Err(error) => {
                tracing::warn!(%error, "could not drop envelopes from a full mailbox");
                return;
            }
        };
        if dropped == 0 {
            return; // Only envelopes still in flight to the disk: over quota until then.
        }
        let new_head = head + dropped;
        self.counters.dropped_envelopes += dropped;
        tracing::warn!(user_id = device.0, device_id = device.1, dropped, "mailbox full");
        if let Some(&conn) = self.online.get(&device) {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.acked_through = c.acked_through.max(new_head);
                c.deliver_cursor = c.deliver_cursor.max(new_head);
            }
        }
        let server = (0, 0);
        if announced > 0 {
            let mut marker = Vec::new();
            encode_archive(&mut marker, &NoticeBody::Dropped { count: announced })
                .expect("server bodies always archive");
            let kind = EnvelopeKind::Notice;
            if let Err(error) = self.append_envelope_to(vec![device], server, kind, &marker, now_ms)
            {
                tracing::warn!(%error, "could not queue a dropped-messages notice");
            }
        }
        for (sender, message_ids) in lost {
            if sender == device.0 {
                continue;
            }
            let notice = NoticeBody::SentDropped { recipient: device.0, message_ids };
            self.route_server_envelope(sender, server, EnvelopeKind::Notice, &notice, now_ms, None);
        }
    }

    // -----------------------------------------------------------------------------------
    // Push
    // -----------------------------------------------------------------------------------

    /// Asks for one wake-up of `device` (homed here) if it is offline, has a push
    /// endpoint and was not woken since it last connected.
    fn wake_if_offline(&mut self, device: (UserId, DeviceId)) {
        if self.online.contains_key(&device) || self.pushed.contains(&device) {
            return;
        }
        let Some(shard) = self.local_shard(home_shard_of_user(device.0)) else { return };
        let endpoint =
            shard.borrow().state().device(device.0, device.1).and_then(|d| d.push.clone());
        if let Some(endpoint) = endpoint {
            self.pushed.insert(device);
            self.pushes.push(PushJob { device, endpoint });
        }
    }

    /// Whether wake-ups wait for the runtime.
    pub fn has_pushes(&self) -> bool {
        !self.pushes.is_empty()
    }

    /// Takes the wake-ups to send.
    pub fn take_pushes(&mut self) -> Vec<PushJob> {
        std::mem::take(&mut self.pushes)
    }

    /// The push service said `job`'s endpoint is gone: forget it (unless the device
    /// registered another meanwhile).
    pub fn push_gone(&mut self, job: &PushJob) {
        let (user_id, device_id) = job.device;
        let Some(shard) = self.local_shard(home_shard_of_user(user_id)).cloned() else { return };
        let current =
            shard.borrow().state().device(user_id, device_id).and_then(|d| d.push.clone());
        if current.as_ref() != Some(&job.endpoint) {
            return;
        }
        tracing::info!(user_id, device_id, "push endpoint gone; removed");
        let op = StateOp::SetPush { user_id, device_id, endpoint: None };
        let removed = shard.borrow_mut().apply_state(op);
        if let Err(error) = removed {
            tracing::warn!(%error, "could not remove a gone push endpoint");
        }
    }

    fn push_register(
        &mut self,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        register: &ArchivedPushRegister,
    ) {
        let ty = MessageType::PushRegister.code();
        let Ok(register) = rkyv::deserialize::<PushRegister, Failure>(register) else {
            return self.error_reply(conn, rid, ty, ErrorCode::Malformed, "unreadable endpoint", 0);
        };
        if let Some(endpoint) = &register.endpoint {
            let valid = match endpoint.provider {
                PushProvider::UnifiedPush => {
                    crate::code_sender::WebhookUrl::parse(&endpoint.address).is_ok()
                }
                PushProvider::Apns | PushProvider::Fcm => {
                    !endpoint.address.is_empty() && endpoint.address.len() <= 4096
                }
            };
            if !valid || endpoint.address.len() > 4096 {
                let message = "a UnifiedPush endpoint must be an http(s) URL";
                return self.error_reply(conn, rid, ty, ErrorCode::InvalidArgument, message, 0);
            }
        }
        let Some(shard) = self.local_shard(home_shard_of_user(me.0)).cloned() else { return };
        let op = StateOp::SetPush { user_id: me.0, device_id: me.1, endpoint: register.endpoint };
        let applied = shard.borrow_mut().apply_state(op);
        match applied {
            Ok(seq) => {
                self.pushed.remove(&me);
                self.reply_when_durable(conn, rid, &Done {}, vec![(home_shard_of_user(me.0), seq)]);
            }
            Err(error) => self.storage_error(conn, rid, ty, &error),
        }
    }

    // -----------------------------------------------------------------------------------
    // Linking a companion device
    // -----------------------------------------------------------------------------------

    /// A new device asks to join an account: it gets a code to approve on the primary
    /// device, and its connection waits here for the outcome.
    fn link_request(&mut self, conn: ConnId, rid: u32, request: &ArchivedLinkRequest, now_ms: u64) {
        let ty = MessageType::LinkRequest.code();
        let Ok(device) = rkyv::deserialize::<NewDevice, Failure>(&request.device) else {
            return self.error_reply(conn, rid, ty, ErrorCode::Malformed, "unreadable keys", 0);
        };
        if let Err(message) = secrets::check_device_keys(&device.keys) {
            return self.error_reply(conn, rid, ty, ErrorCode::InvalidSignature, message, 0);
        }
        self.links.retain(|_, link| link.expires_ms > now_ms || link.device.is_none());
        let code = loop {
            let code = secrets::new_code(9);
            let here = core_of_link_code(&code, self.placement.count) == self.placement.index;
            if here && !self.links.contains_key(&code) {
                break code;
            }
        };
        let expires_ms = now_ms + LINK_CODE_TTL_MS;
        let link = PendingLink { conn, rid, device: Some(device), expires_ms };
        self.links.insert(code.clone(), link);
        let reply = LinkCode { code, expires_in_s: (LINK_CODE_TTL_MS / 1000) as u32 };
        // Unsolicited-looking but answering the request: the final answer (Registered)
        // comes with the same request id once the primary device approves.
        self.push(conn, &reply);
    }

    /// Whether a connection waits for its link to be approved (its auth deadline is
    /// then the linking code's lifetime).
    pub fn awaiting_link(&self, conn: ConnId) -> bool {
        self.links.values().any(|link| link.conn == conn)
    }

    /// The approving core takes a pending device (once).
    fn claim_link(&mut self, code: &str, now_ms: u64) -> Result<NewDevice, ErrorCode> {
        let link = self.links.get_mut(code).ok_or(ErrorCode::InvalidCode)?;
        if link.expires_ms <= now_ms {
            self.links.remove(code);
            return Err(ErrorCode::CodeExpired);
        }
        link.device.take().ok_or(ErrorCode::InvalidCode)
    }

    /// Tells the waiting new device how its link ended.
    fn finish_link(&mut self, code: &str, registered: Result<Registered, ErrorCode>) {
        let Some(link) = self.links.remove(code) else { return };
        match registered {
            Ok(registered) => self.reply(link.conn, link.rid, &registered),
            Err(code) => {
                let ty = MessageType::LinkRequest.code();
                self.error_reply(link.conn, link.rid, ty, code, "the link was not completed", 0)
            }
        }
    }

    fn link_approve(
        &mut self,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        code: &str,
        now_ms: u64,
    ) {
        if me.1 != 1 {
            let ty = MessageType::LinkApprove.code();
            let message = "only the primary device links devices";
            return self.error_reply(conn, rid, ty, ErrorCode::Forbidden, message, 0);
        }
        let core = core_of_link_code(code, self.placement.count);
        if core == self.placement.index {
            match self.claim_link(code, now_ms) {
                Ok(device) => self.add_linked_device(conn, rid, me.0, code, device, now_ms),
                Err(error_code) => {
                    let ty = MessageType::LinkApprove.code();
                    self.error_reply(conn, rid, ty, error_code, "no such linking code", 0)
                }
            }
        } else {
            let awaiting = Awaiting::Link { conn, rid, user_id: me.0, code: code.to_string() };
            let request = Request::ClaimLink { code: code.to_string(), now_ms };
            self.ask(core, request, Some(awaiting));
        }
    }

    /// Adds a claimed device to `user_id` (homed here); once durable the approver gets
    /// `Done`, the new device `Registered`, and the user's other devices the new list.
    fn add_linked_device(
        &mut self,
        conn: ConnId,
        rid: u32,
        user_id: UserId,
        code: &str,
        device: NewDevice,
        now_ms: u64,
    ) {
        let ty = MessageType::LinkApprove.code();
        let link_core = core_of_link_code(code, self.placement.count);
        let Some(handle) = self.local_shard(home_shard_of_user(user_id)).cloned() else { return };
        let existing = self.devices_of(user_id).unwrap_or_default();
        let refuse = |core: &mut Self, error_code: ErrorCode, message: &str| {
            core.error_reply(conn, rid, ty, error_code, message, 0);
            core.finish_link_anywhere(link_core, code, Err(error_code));
        };
        if existing.len() >= DEVICES_MAX {
            return refuse(
                self,
                ErrorCode::QuotaExceeded,
                "this account has its maximum of devices",
            );
        }
        let device_id = existing.iter().map(|d| d.1).max().unwrap_or(0) + 1;
        let token = secrets::new_token();
        let record = DeviceRecord {
            device_id,
            name: device.name,
            token_hash: secrets::token_hash(&token),
            identity_key: device.keys.identity_key,
            signing_key: device.keys.signing_key,
            fallback_key: device.keys.fallback_key,
            one_time_keys: device.keys.one_time_keys,
            push: None,
            created_ms: now_ms,
        };
        let seq = match handle
            .borrow_mut()
            .apply_state(StateOp::PutDevice { user_id, device: record })
        {
            Ok(seq) => seq,
            Err(error) => {
                tracing::error!(%error, "storage refused a write");
                return refuse(self, write_error_code(&error), "the server could not store this");
            }
        };
        let waits = vec![(home_shard_of_user(user_id), seq)];
        let registered = Registered { user_id, device_id, token, new_account: false };
        let done = |core: &Self| -> Vec<u8> {
            let mut frame = Vec::new();
            let max = core.max_frame_bytes(conn);
            let _ = encode_frame(&mut frame, rid, FLAG_RESPONSE, &Done {}, max);
            frame
        };
        let frame = done(self);
        self.when_durable(waits.clone(), Release::Frame { conn, frame, started_us: None });
        if link_core == self.placement.index {
            if let Some(link) = self.links.remove(code) {
                let mut frame = Vec::new();
                let max = self.max_frame_bytes(link.conn);
                let _ = encode_frame(&mut frame, link.rid, FLAG_RESPONSE, &registered, max);
                let release = Release::Frame { conn: link.conn, frame, started_us: None };
                self.when_durable(waits.clone(), release);
            }
        } else {
            let request = Request::LinkDone { code: code.to_string(), registered: Ok(registered) };
            self.when_durable(waits.clone(), Release::Tell { core: link_core, request });
        }
        // The account's other online devices learn of the new one.
        let device_ids: Vec<DeviceId> =
            existing.iter().map(|d| d.1).chain(std::iter::once(device_id)).collect();
        let changed = DeviceListChanged { user_id, device_ids };
        for other in existing {
            if let Some(&other_conn) = self.online.get(&other) {
                self.push(other_conn, &changed);
            }
        }
    }

    fn finish_link_anywhere(
        &mut self,
        core: u32,
        code: &str,
        outcome: Result<Registered, ErrorCode>,
    ) {
        if core == self.placement.index {
            self.finish_link(code, outcome);
        } else {
            let request = Request::LinkDone { code: code.to_string(), registered: outcome };
            self.ask(core, request, None);
        }
    }

    // -----------------------------------------------------------------------------------
    // Messaging
    // -----------------------------------------------------------------------------------

    fn send(
        &mut self,
        conn: ConnId,
        rid: u32,
        (user_id, device_id): (UserId, DeviceId),
        send: &ArchivedSendMessage,
        now_ms: u64,
    ) {
        let ty = MessageType::SendMessage.code();
        let client_message_id = send.client_message_id.to_native();
        let send_error = |code: ErrorCode, missing, extra, message: &str| SendError {
            client_message_id,
            code: code as u16,
            retry_after_ms: 0,
            missing_devices: missing,
            extra_devices: extra,
            message: message.to_string(),
        };
        let (peer, group) = match &send.to {
            ArchivedConversation::User(peer) => (peer.to_native(), None),
            ArchivedConversation::Group(group) => (0, Some(group.to_native())),
        };
        let kind = match send.kind {
            ArchivedEnvelopeKind::Text => EnvelopeKind::Text,
            ArchivedEnvelopeKind::Media => EnvelopeKind::Media,
            ArchivedEnvelopeKind::Control => EnvelopeKind::Control,
            _ => {
                let error = send_error(
                    ErrorCode::InvalidArgument,
                    Vec::new(),
                    Vec::new(),
                    "a client may send only text, media or control messages",
                );
                return self.reply(conn, rid, &error);
            }
        };
        // `Plain` marks server-made envelopes (receipts, notices, group events): a client
        // may not dress its own bytes up as one.
        if send.copies.iter().any(|copy| copy.e2e_type == ArchivedE2eType::Plain) {
            let error = send_error(
                ErrorCode::InvalidArgument,
                Vec::new(),
                Vec::new(),
                "a copy marked Plain: only the server makes unencrypted envelopes",
            );
            return self.reply(conn, rid, &error);
        }
        if let Err(wait_ms) = self.send_limits.take((user_id, device_id), now_ms) {
            let why = "too many messages from this device; slow down";
            let mut error = send_error(ErrorCode::RateLimited, Vec::new(), Vec::new(), why);
            error.retry_after_ms = wait_ms.min(u64::from(u32::MAX)) as u32;
            return self.reply(conn, rid, &error);
        }
        if let Some(group_id) = group {
            // One ciphertext (the sender's Megolm session) for every member device.
            let [copy] = send.copies.as_slice() else {
                let error = send_error(
                    ErrorCode::InvalidArgument,
                    Vec::new(),
                    Vec::new(),
                    "a group message carries exactly one (Megolm) copy",
                );
                return self.reply(conn, rid, &error);
            };
            let ttl_ms = match send.ttl_s.to_native() {
                0 => self.config.default_ttl_ms,
                s => (u64::from(s) * 1000).min(self.config.default_ttl_ms),
            };
            let meta = EnvelopeMeta {
                server_message_id: 0,
                client_message_id,
                server_time_ms: now_ms,
                expires_ms: now_ms + ttl_ms,
                sender: (user_id, device_id),
                peer: 0,
                kind,
            };
            let e2e_type = e2e_type_of(&copy.e2e_type);
            let ciphertext = copy.ciphertext.to_vec();
            return self.group_send(conn, rid, meta, group_id, e2e_type, ciphertext);
        }
        let peer_shard = home_shard_of_user(peer);
        if peer_shard >= self.shard_count() {
            let error = send_error(ErrorCode::NotFound, Vec::new(), Vec::new(), "no such user");
            return self.reply(conn, rid, &error);
        }
        // An account has at most a handful of devices: sorted vectors beat hash sets here.
        let mut given: Vec<(UserId, DeviceId)> =
            send.copies.iter().map(|c| (c.user_id.to_native(), c.device_id.to_native())).collect();
        given.sort_unstable();
        if given.windows(2).any(|pair| pair[0] == pair[1]) {
            let error = send_error(
                ErrorCode::InvalidArgument,
                Vec::new(),
                Vec::new(),
                "two copies for the same device",
            );
            return self.reply(conn, rid, &error);
        }
        let peer_is_local = self.local_shard(peer_shard).is_some();
        if peer_is_local {
            // A retry of an accepted send: answer with the original id once it is durable.
            let duplicate = self.local_shard(peer_shard).and_then(|shard| {
                let shard = shard.borrow();
                let id = shard.lookup_send(user_id, device_id, client_message_id)?;
                Some((id, shard.appended_seq()))
            });
            if let Some((server_message_id, seq)) = duplicate {
                let ack = SendAck {
                    client_message_id,
                    server_message_id,
                    server_time_ms: now_ms,
                    duplicate: true,
                };
                return self.reply_when_durable(conn, rid, &ack, vec![(peer_shard, seq)]);
            }
        }
        // The copies must match the recipient's devices and the sender's other devices.
        // Those of a user homed on another core are checked there.
        let expected = if peer_is_local {
            let Some(mut expected) = self.devices_of(peer) else {
                let error = send_error(ErrorCode::NotFound, Vec::new(), Vec::new(), "no such user");
                return self.reply(conn, rid, &error);
            };
            if peer != user_id {
                expected.extend(self.devices_of(user_id).unwrap_or_default());
            }
            expected
        } else {
            self.devices_of(user_id).unwrap_or_default()
        };
        let mut expected = expected;
        expected.retain(|d| *d != (user_id, device_id));
        if !peer_is_local {
            given.retain(|d| d.0 != peer);
        }
        if let Err(DeliverOutcome::Stale { missing, extra }) = check_copies(&expected, &given) {
            let error = send_error(
                ErrorCode::StaleDevices,
                missing,
                extra,
                "the copies do not match the devices of the recipient and the sender",
            );
            return self.reply(conn, rid, &error);
        }

        if kind == EnvelopeKind::Media && peer != user_id {
            // By convention a media message's copies start with the blob's id in clear.
            if let Some(copy) = send.copies.iter().find(|c| c.user_id.to_native() == peer) {
                if let Some(id) = copy.ciphertext.get(..16) {
                    let media_id: MediaId = id.try_into().expect("16 bytes");
                    self.grant_media(user_id, &media_id, &[peer]);
                }
            }
        }
        let sender_shard = home_shard_of_user(user_id);
        let Some(server_message_id) =
            self.local_shard(sender_shard).map(|s| s.borrow_mut().allocate_message_id(now_ms))
        else {
            return self.error_reply(conn, rid, ty, ErrorCode::Internal, "not the home core", 0);
        };
        let ttl_ms = match send.ttl_s.to_native() {
            0 => self.config.default_ttl_ms,
            s => (u64::from(s) * 1000).min(self.config.default_ttl_ms),
        };
        let meta = EnvelopeMeta {
            server_message_id,
            client_message_id,
            server_time_ms: now_ms,
            expires_ms: now_ms + ttl_ms,
            sender: (user_id, device_id),
            peer,
            kind,
        };
        let copies = send.copies.iter().map(|c| {
            let owner = (c.user_id.to_native(), c.device_id.to_native());
            (owner, e2e_type_of(&c.e2e_type), c.ciphertext.as_slice())
        });
        if !peer_is_local {
            // The recipient's core stores its copies first; ours follow on its answer.
            let (peer_copies, own_copies): (Vec<_>, Vec<_>) = copies
                .map(|((owner, device_id), e2e_type, ciphertext)| {
                    let copy = OwnedCopy { device_id, e2e_type, ciphertext: ciphertext.to_vec() };
                    (owner, copy)
                })
                .partition(|(owner, _)| *owner == peer);
            let request = DeliverRequest {
                sender: meta.sender,
                peer,
                client_message_id,
                server_message_id,
                server_time_ms: now_ms,
                expires_ms: meta.expires_ms,
                kind,
                copies: peer_copies.into_iter().map(|(_, copy)| copy).collect(),
            };
            let own_copies = own_copies.into_iter().map(|(_, copy)| copy).collect();
            let started_us = self.now_us;
            let awaiting = Awaiting::Send { conn, rid, meta, own_copies, since_us: started_us };
            let core = self.placement.core_of_shard(peer_shard);
            return self.ask(core, Request::Deliver(request), Some(awaiting));
        }
        let blocked = peer != user_id && self.blocked_by(peer, user_id);
        let copies = copies.filter(|((owner, _), _, _)| !(blocked && *owner == peer));
        match self.append_copies(&meta, copies) {
            Ok(waits) => {
                self.counters.messages_sent += 1;
                let ack = SendAck {
                    client_message_id,
                    server_message_id,
                    server_time_ms: now_ms,
                    duplicate: false,
                };
                let started = Some(self.now_us);
                self.reply_when_durable_timed(conn, rid, &ack, waits, started);
            }
            Err(error) => self.storage_error(conn, rid, ty, &error),
        }
    }

    /// Appends one envelope per copy to its owner's mailbox (every owner is homed on this
    /// core); returns what the sent tick waits for.
    fn append_copies<'c>(
        &mut self,
        meta: &EnvelopeMeta,
        copies: impl Iterator<Item = ((UserId, DeviceId), E2eType, &'c [u8])>,
    ) -> Result<Vec<(u32, u64)>, tern_engine::WriteError> {
        let (user_id, device_id) = meta.sender;
        let mut waits = Vec::new();
        for (owner, e2e_type, ciphertext) in copies {
            let shard_id = home_shard_of_user(owner.0);
            if self.local_shard(shard_id).is_none() {
                tracing::error!(?owner, "a copy for a device homed on another core");
                continue;
            }
            self.make_room(owner, ciphertext.len() as u64, meta.server_time_ms);
            let handle = self.local_shard(shard_id).cloned().expect("checked above");
            let mut shard = handle.borrow_mut();
            // The conversation as the mailbox owner sees it: the other party.
            let conversation = if owner.0 == meta.peer && meta.peer != user_id {
                Conversation::User(user_id)
            } else {
                Conversation::User(meta.peer)
            };
            let envelope = EnvelopeRef {
                server_message_id: meta.server_message_id,
                client_message_id: meta.client_message_id,
                server_time_ms: meta.server_time_ms,
                expires_ms: meta.expires_ms,
                sender_user: user_id,
                sender_device: device_id,
                conversation,
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
            self.dirty.insert(owner, (shard_id, appended.record_seq));
            self.wake_if_offline(owner);
        }
        Ok(waits)
    }

    fn delivery_ack(&mut self, conn: ConnId, me: (UserId, DeviceId), up_to: u64, now_ms: u64) {
        // Only what this connection was sent can be acknowledged: an ack beyond it (a bug
        // or a hostile client) must not delete envelopes the device never received.
        let Some((acked_through, deliver_cursor)) =
            self.conns.get(&conn).map(|c| (c.acked_through, c.deliver_cursor))
        else {
            return;
        };
        if deliver_cursor <= acked_through || up_to < acked_through {
            return;
        }
        let up_to = up_to.min(deliver_cursor - 1);
        let shard_id = home_shard_of_user(me.0);
        let Some(handle) = self.local_shard(shard_id).cloned() else { return };
        // Collect delivered receipts for what is acknowledged now, grouped by sender.
        // (A group message's receipt names the group: the sender counts them per message.)
        let mut receipts: BTreeMap<(UserId, Option<GroupId>), Vec<MessageId>> = BTreeMap::new();
        {
            let shard = handle.borrow();
            let from = self.conns.get(&conn).map_or(0, |c| c.acked_through);
            let count = up_to.saturating_add(1).saturating_sub(from) as usize;
            let read = shard.read_mailbox(me, from, count, now_ms);
            for entry in read.entries.iter().filter(|e| e.mailbox_seq <= up_to) {
                let Ok(envelope) = rkyv::access::<ArchivedEnvelope, Failure>(entry.envelope) else {
                    continue;
                };
                let client_kind = matches!(
                    envelope.kind,
                    ArchivedEnvelopeKind::Text
                        | ArchivedEnvelopeKind::Media
                        | ArchivedEnvelopeKind::Control
                );
                let sender = envelope.sender_user.to_native();
                if client_kind && sender != me.0 {
                    let group = match &envelope.conversation {
                        ArchivedConversation::Group(group) => Some(group.to_native()),
                        ArchivedConversation::User(_) => None,
                    };
                    receipts
                        .entry((sender, group))
                        .or_default()
                        .push(envelope.server_message_id.to_native());
                }
            }
        }
        let acked = handle.borrow_mut().ack(me, up_to);
        if let Err(error) = acked {
            return self.storage_error(conn, 0, MessageType::DeliveryAck.code(), &error);
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.acked_through = c.acked_through.max(up_to.saturating_add(1)).min(c.deliver_cursor);
        }
        for ((sender, group), message_ids) in receipts {
            let body = ReceiptBody {
                kind: ReceiptKind::Delivered,
                by_user: me.0,
                by_device: me.1,
                conversation: group.map_or(Conversation::User(me.0), Conversation::Group),
                message_ids,
                time_ms: now_ms,
            };
            // A failed receipt append is not the acking device's problem; it is logged.
            self.route_server_envelope(sender, me, EnvelopeKind::Receipt, &body, now_ms, None);
        }
        self.pump(conn, now_ms);
    }

    fn send_receipt(
        &mut self,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        receipt: &ArchivedSendReceipt,
        now_ms: u64,
    ) {
        let to_user = receipt.to_user.to_native();
        if self.read_receipts_off(me.0) {
            // Who turns read receipts off neither sends nor receives them.
            return self.reply(conn, rid, &Done {});
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
            time_ms: now_ms,
        };
        let reply_to = Some((conn, rid));
        self.route_server_envelope(to_user, me, EnvelopeKind::Receipt, &body, now_ms, reply_to);
    }

    /// Deletes messages for everyone: removes their copies still queued for the peer's
    /// devices and this user's other devices. Only the sender's own messages are found.
    fn delete_for_everyone(
        &mut self,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        peer: UserId,
        message_ids: Vec<MessageId>,
    ) {
        let mut waits = self.unqueue(me.0, me.0, &message_ids);
        let peer_shard = home_shard_of_user(peer);
        if peer == me.0 || peer_shard >= self.shard_count() {
            return self.reply_when_durable(conn, rid, &Done {}, waits);
        }
        if self.local_shard(peer_shard).is_some() {
            waits.extend(self.unqueue(me.0, peer, &message_ids));
            return self.reply_when_durable(conn, rid, &Done {}, waits);
        }
        let failed_type = MessageType::DeleteForEveryone.code();
        let awaiting = Awaiting::Done { conn, rid, failed_type, waits };
        let request = Request::Unqueue { sender: me.0, from_user: peer, message_ids };
        let core = self.placement.core_of_shard(peer_shard);
        self.ask(core, request, Some(awaiting));
    }

    /// Removes the queued copies of `sender`'s messages from the mailboxes of
    /// `from_user`'s devices (homed here); returns what the answer waits for.
    fn unqueue(&mut self, sender: UserId, from_user: UserId, message_ids: &[MessageId]) -> Waits {
        let shard_id = home_shard_of_user(from_user);
        let Some(handle) = self.local_shard(shard_id).cloned() else { return Vec::new() };
        let mut waits = Vec::new();
        for device in self.devices_of(from_user).unwrap_or_default() {
            for &id in message_ids {
                let found = handle.borrow().find_queued(device, sender, id);
                let Some(seq) = found else { continue };
                match handle.borrow_mut().remove_queued(device, seq) {
                    Ok(Some(record_seq)) => waits.push((shard_id, record_seq)),
                    Ok(None) => {}
                    Err(error) => tracing::warn!(%error, "could not remove a deleted message"),
                }
            }
        }
        waits
    }

    /// Appends a server-made envelope (receipt, notice) for `to_user` here, or asks the
    /// core it is homed on. `reply_to` gets `Done` once it is durable; without it a
    /// failure is only logged.
    fn route_server_envelope<T>(
        &mut self,
        to_user: UserId,
        from: (UserId, DeviceId),
        kind: EnvelopeKind,
        body: &T,
        now_ms: u64,
        reply_to: Option<(ConnId, u32)>,
    ) where
        T: for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    {
        let mut bytes = Vec::new();
        encode_archive(&mut bytes, body).expect("server bodies always archive");
        let shard_id = home_shard_of_user(to_user);
        let failed_type = MessageType::SendReceipt.code();
        if shard_id < self.shard_count() && self.local_shard(shard_id).is_none() {
            let awaiting = reply_to.map(|(conn, rid)| Awaiting::Done {
                conn,
                rid,
                failed_type,
                waits: Vec::new(),
            });
            let request = Request::ServerEnvelope { to_user, from, kind, body: bytes, now_ms };
            let core = self.placement.core_of_shard(shard_id);
            return self.ask(core, request, awaiting);
        }
        match (self.append_server_envelope(to_user, from, kind, &bytes, now_ms), reply_to) {
            (Ok(waits), Some((conn, rid))) => self.reply_when_durable(conn, rid, &Done {}, waits),
            (Ok(_), None) => {}
            (Err(error), Some((conn, rid))) => self.storage_error(conn, rid, failed_type, &error),
            (Err(error), None) => {
                tracing::warn!(%error, to_user, "could not queue a server envelope")
            }
        }
    }

    /// Appends a server-made envelope with an archived `body` to every device of
    /// `to_user`, who is homed on this core (nothing if there is no such user).
    fn append_server_envelope(
        &mut self,
        to_user: UserId,
        from: (UserId, DeviceId),
        kind: EnvelopeKind,
        body: &[u8],
        now_ms: u64,
    ) -> Result<Vec<(u32, u64)>, tern_engine::WriteError> {
        if kind == EnvelopeKind::Receipt && self.read_receipts_off(to_user) {
            let read = rkyv::access::<ArchivedReceiptBody, Failure>(body)
                .is_ok_and(|r| r.kind == ArchivedReceiptKind::Read);
            if read {
                return Ok(Vec::new());
            }
        }
        let devices = self.devices_of(to_user).unwrap_or_default();
        for device in &devices {
            self.make_room(*device, body.len() as u64, now_ms);
        }
        self.append_envelope_to(devices, from, kind, body, now_ms)
    }

    /// Appends one server-made envelope for `devices` (all homed on one shard here).
    fn append_envelope_to(
        &mut self,
        devices: Vec<(UserId, DeviceId)>,
        from: (UserId, DeviceId),
        kind: EnvelopeKind,
        body: &[u8],
        now_ms: u64,
    ) -> Result<Vec<(u32, u64)>, tern_engine::WriteError> {
        let Some(first) = devices.first() else { return Ok(Vec::new()) };
        let shard_id = home_shard_of_user(first.0);
        let Some(handle) = self.local_shard(shard_id).cloned() else { return Ok(Vec::new()) };
        let mut shard = handle.borrow_mut();
        let envelope = EnvelopeRef {
            server_message_id: shard.allocate_message_id(now_ms),
            client_message_id: 0,
            server_time_ms: now_ms,
            expires_ms: now_ms + self.config.default_ttl_ms,
            sender_user: from.0,
            sender_device: from.1,
            conversation: Conversation::User(from.0),
            conversation_seq: 0,
            kind,
            e2e_type: E2eType::Plain,
            body,
        };
        let appended = shard.append_envelope(&envelope, &devices)?;
        drop(shard);
        self.dirty.extend(devices.into_iter().map(|d| (d, (shard_id, appended.record_seq))));
        Ok(vec![(shard_id, appended.record_seq)])
    }

    // -----------------------------------------------------------------------------------
    // Keys and devices
    // -----------------------------------------------------------------------------------

    fn upload_keys(
        &mut self,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        upload: &ArchivedUploadKeys,
    ) {
        let ty = MessageType::UploadKeys.code();
        let Ok(upload) = rkyv::deserialize::<UploadKeys, Failure>(upload) else {
            return self.error_reply(conn, rid, ty, ErrorCode::Malformed, "unreadable keys", 0);
        };
        let shard_id = home_shard_of_user(me.0);
        let Some(handle) = self.local_shard(shard_id).cloned() else { return };
        let signing_key = handle.borrow().state().device(me.0, me.1).map(|d| d.signing_key);
        let Some(signing_key) = signing_key else { return };
        let prekeys = upload.one_time_keys.iter().chain(upload.fallback_key.as_ref());
        if secrets::check_prekeys(&signing_key, prekeys).is_err() {
            let message = "a key's signature does not verify with this device's signing key";
            return self.error_reply(conn, rid, ty, ErrorCode::InvalidSignature, message, 0);
        }
        let result = (|| {
            let mut shard = handle.borrow_mut();
            let mut seq = shard.appended_seq();
            if let Some(key) = upload.fallback_key {
                seq = shard.apply_state(StateOp::SetFallbackKey {
                    user_id: me.0,
                    device_id: me.1,
                    key,
                })?;
            }
            if !upload.one_time_keys.is_empty() {
                let keys = upload.one_time_keys;
                seq = shard.apply_state(StateOp::AddOneTimeKeys {
                    user_id: me.0,
                    device_id: me.1,
                    keys,
                })?;
            }
            let stored =
                shard.state().device(me.0, me.1).map_or(0, |d| d.one_time_keys.len() as u32);
            Ok::<_, tern_engine::WriteError>((seq, stored))
        })();
        match result {
            Ok((seq, stored)) => {
                let reply = KeysUploaded { one_time_keys_stored: stored };
                self.reply_when_durable(conn, rid, &reply, vec![(shard_id, seq)]);
            }
            Err(error) => self.storage_error(conn, rid, ty, &error),
        }
    }

    fn fetch_bundles(
        &mut self,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        fetch: &ArchivedFetchBundles,
        now_ms: u64,
    ) {
        let ty = MessageType::FetchBundles.code();
        let target = fetch.user_id.to_native();
        if let Err(wait_ms) = self.fetch_limits.take((me.0, target), now_ms) {
            let message = "too many key fetches for this user";
            let wait = wait_ms.min(u64::from(u32::MAX)) as u32;
            return self.error_reply(conn, rid, ty, ErrorCode::RateLimited, message, wait);
        }
        let shard_id = home_shard_of_user(target);
        if shard_id >= self.shard_count() {
            return self.error_reply(conn, rid, ty, ErrorCode::NotFound, "no such user", 0);
        }
        let wanted: Vec<DeviceId> = fetch.device_ids.iter().map(|d| d.to_native()).collect();
        if self.local_shard(shard_id).is_none() {
            let awaiting = Awaiting::Bundles { conn, rid, target };
            let core = self.placement.core_of_shard(shard_id);
            return self.ask(core, Request::FetchBundles { target, wanted }, Some(awaiting));
        }
        match self.claim_bundles(target, &wanted) {
            Ok((devices, waits)) => {
                let reply = Bundles { user_id: target, devices };
                self.reply_when_durable(conn, rid, &reply, waits);
            }
            Err(code) => {
                let message =
                    if code == ErrorCode::NotFound { "no such user" } else { "retry later" };
                self.error_reply(conn, rid, ty, code, message, 0)
            }
        }
    }

    /// Forwards a typing indicator to the online devices of `to_user` (on its core).
    /// Never stored: an offline device never hears of it.
    fn route_typing(&mut self, to_user: UserId, from: (UserId, DeviceId), active: bool) {
        let shard = home_shard_of_user(to_user);
        if shard >= self.shard_count() {
            return;
        }
        if self.local_shard(shard).is_some() {
            return self.push_typing(to_user, from, active);
        }
        let core = self.placement.core_of_shard(shard);
        self.ask(core, Request::Typing { to_user, from, active }, None);
    }

    fn push_typing(&mut self, to_user: UserId, from: (UserId, DeviceId), active: bool) {
        if self.blocked_by(to_user, from.0) {
            return;
        }
        let event = TypingEvent {
            user_id: from.0,
            device_id: from.1,
            conversation: Conversation::User(from.0),
            active,
        };
        for device in self.devices_of(to_user).unwrap_or_default() {
            if let Some(&conn) = self.online.get(&device) {
                self.push(conn, &event);
            }
        }
    }

    /// Hands out the key bundles of `target` (homed here): each one-time key leaves the
    /// stock for good before it is handed out, so the answer must wait for the returned
    /// records. Devices whose stock runs low are told.
    fn claim_bundles(
        &mut self,
        target: UserId,
        wanted: &[DeviceId],
    ) -> Result<(Vec<DeviceBundle>, Waits), ErrorCode> {
        let shard_id = home_shard_of_user(target);
        let handle = self.local_shard(shard_id).cloned().ok_or(ErrorCode::NotFound)?;
        let devices: Vec<DeviceRecord> = match handle.borrow().state().account(target) {
            Some(account) => account
                .devices
                .iter()
                .filter(|d| wanted.is_empty() || wanted.contains(&d.device_id))
                .cloned()
                .collect(),
            None => return Err(ErrorCode::NotFound),
        };
        let mut bundles = Vec::with_capacity(devices.len());
        let mut waits = Vec::new();
        let mut low = Vec::new();
        for device in devices {
            let claimed = handle.borrow_mut().claim_one_time_key(target, device.device_id);
            let one_time_key = match claimed {
                Ok(Some((key, seq))) => {
                    waits.push((shard_id, seq));
                    Some(key)
                }
                Ok(None) => None,
                Err(error) => {
                    tracing::error!(%error, "storage refused a write");
                    return Err(write_error_code(&error));
                }
            };
            let left = device.one_time_keys.len().saturating_sub(1) as u32;
            if left < ONE_TIME_KEYS_LOW {
                low.push(((target, device.device_id), left));
            }
            bundles.push(DeviceBundle {
                device_id: device.device_id,
                identity_key: device.identity_key,
                signing_key: device.signing_key,
                one_time_key,
                fallback_key: device.fallback_key,
            });
        }
        for (device, left) in low {
            if let Some(&owner_conn) = self.online.get(&device) {
                let event = KeysLow { one_time_keys_remaining: left, threshold: ONE_TIME_KEYS_LOW };
                self.push(owner_conn, &event);
            }
        }
        Ok((bundles, waits))
    }

    fn device_list(&mut self, conn: ConnId, rid: u32, me: (UserId, DeviceId)) {
        let Some(shard) = self.local_shard(home_shard_of_user(me.0)).cloned() else { return };
        let devices = shard
            .borrow()
            .state()
            .account(me.0)
            .map(|a| {
                a.devices
                    .iter()
                    .map(|d| DeviceInfo {
                        device_id: d.device_id,
                        name: d.name.clone(),
                        created_ms: d.created_ms,
                        last_seen_ms: 0,
                        primary: d.device_id == 1,
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.reply(conn, rid, &DeviceList { devices });
    }

    // -----------------------------------------------------------------------------------
    // Durability and delivery
    // -----------------------------------------------------------------------------------

    /// After a commit: releases replies whose records are durable and delivers new
    /// envelopes to connected devices.
    pub fn on_durable(&mut self, now_ms: u64) {
        let durable: Vec<u64> = self
            .shards
            .iter()
            .map(|s| s.as_ref().map_or(0, |s| s.borrow().durable_seq()))
            .collect();
        tracing::debug!(?durable, pending = self.pending.len(), "records durable");
        let mut still_waiting = Vec::new();
        for reply in std::mem::take(&mut self.pending) {
            if reply.waits.iter().all(|(shard, seq)| durable[*shard as usize] >= *seq) {
                self.release(reply.release);
            } else {
                still_waiting.push(reply);
            }
        }
        self.pending = still_waiting;
        // Only envelopes that are durable are delivered: a device whose latest one is
        // still in flight stays dirty until the commit that carries it.
        let mut ready = Vec::new();
        self.dirty.retain(|device, (shard, seq)| {
            let is_durable = durable.get(*shard as usize).is_some_and(|d| d >= seq);
            if is_durable {
                ready.push(*device);
            }
            !is_durable
        });
        for device in ready {
            if let Some(&conn) = self.online.get(&device) {
                self.pump(conn, now_ms);
            }
        }
    }

    /// Whether any shard has records waiting for a commit.
    pub fn has_pending_writes(&self) -> bool {
        self.shards.iter().flatten().any(|s| s.borrow().has_pending())
    }

    /// Feeds a connection from its mailbox, within its delivery window and output bound.
    fn pump(&mut self, conn: ConnId, now_ms: u64) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let ConnState::Authenticated { user_id, device_id } = c.state else { return };
        if c.closing || c.outbound.len() >= OUTBOUND_BYTES_MAX {
            return;
        }
        let in_flight = c.deliver_cursor.saturating_sub(c.acked_through);
        let room = DELIVERY_WINDOW.saturating_sub(in_flight);
        if room == 0 {
            return;
        }
        let home = self.shards.get(home_shard_of_user(user_id) as usize);
        let Some(shard) = home.and_then(Option::as_ref) else { return };
        let shard = shard.borrow();
        let read =
            shard.read_mailbox((user_id, device_id), c.deliver_cursor, room as usize, now_ms);
        let (mut delivered, mut messages, mut receipts) = (0, 0, 0);
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
            delivered += 1;
            if let Ok(envelope) = rkyv::access::<ArchivedEnvelope, Failure>(entry.envelope) {
                match envelope.kind {
                    ArchivedEnvelopeKind::Text
                    | ArchivedEnvelopeKind::Media
                    | ArchivedEnvelopeKind::Control => {
                        messages += 1;
                        let waited_ms = now_ms.saturating_sub(envelope.server_time_ms.to_native());
                        self.send_to_deliver.observe(waited_ms as f64 / 1e3);
                    }
                    ArchivedEnvelopeKind::Receipt => receipts += 1,
                    _ => {}
                }
            }
        }
        if read.entries.is_empty() {
            // Skip what is expired or corrupt (reported by the engine) at the head.
            c.deliver_cursor = c
                .deliver_cursor
                .max(read.next_seq.min(shard.mailbox_next_seq((user_id, device_id))));
        }
        for corrupt in &read.corrupt {
            tracing::error!(%corrupt, user_id, device_id, "corrupt envelope not delivered");
        }
        drop(shard);
        tracing::debug!(conn, user_id, delivered, "pumped");
        if delivered > 0 {
            self.counters.messages_delivered += messages;
            self.counters.receipts_delivered += receipts;
            c.wake();
        }
    }

    // -----------------------------------------------------------------------------------
    // Replies
    // -----------------------------------------------------------------------------------

    fn reply<T>(&mut self, conn: ConnId, rid: u32, value: &T)
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
        c.wake();
    }

    fn push<T>(&mut self, conn: ConnId, value: &T)
    where
        T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    {
        self.reply(conn, 0, value);
    }

    fn reply_when_durable<T>(&mut self, conn: ConnId, rid: u32, value: &T, waits: Vec<(u32, u64)>)
    where
        T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    {
        self.reply_when_durable_timed(conn, rid, value, waits, None);
    }

    fn reply_when_durable_timed<T>(
        &mut self,
        conn: ConnId,
        rid: u32,
        value: &T,
        waits: Vec<(u32, u64)>,
        started_us: Option<u64>,
    ) where
        T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    {
        let max = self.max_frame_bytes(conn);
        let mut frame = Vec::new();
        let flags = if rid == 0 { 0 } else { FLAG_RESPONSE };
        if encode_frame(&mut frame, rid, flags, value, max).is_err() {
            tracing::warn!(
                message_type = T::TYPE.name(),
                "reply larger than the client's frame limit"
            );
            return;
        }
        self.when_durable(waits, Release::Frame { conn, frame, started_us });
    }

    /// Releases `release` once every wait is durable (now, if they already are: no
    /// commit would come to release it later).
    fn when_durable(&mut self, waits: Vec<(u32, u64)>, release: Release) {
        let durable_now = waits.iter().all(|(shard, seq)| {
            self.local_shard(*shard).is_some_and(|s| s.borrow().durable_seq() >= *seq)
        });
        if durable_now {
            self.release(release);
        } else {
            tracing::debug!(?waits, "reply waits for durability");
            self.pending.push(PendingReply { waits, release });
        }
    }

    fn release(&mut self, release: Release) {
        match release {
            Release::Frame { conn, frame, started_us } => {
                if let Some(started) = started_us {
                    self.send_to_sent.observe(self.now_us.saturating_sub(started) as f64 / 1e6);
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.outbound.extend_from_slice(&frame);
                    c.wake();
                }
            }
            Release::Mesh { core, token, reply } => {
                self.outbox[core as usize].push(CoreMsg::Reply { token, reply });
            }
            Release::Tell { core, request } => self.ask(core, request, None),
        }
    }

    fn error_reply(
        &mut self,
        conn: ConnId,
        rid: u32,
        failed_type: u16,
        code: ErrorCode,
        message: &str,
        retry_after_ms: u32,
    ) {
        let error = ErrorFrame {
            code: code as u16,
            failed_type,
            retry_after_ms,
            message: message.to_string(),
        };
        self.reply(conn, rid, &error);
    }

    fn fatal(&mut self, conn: ConnId, rid: u32, ty: MessageType, code: ErrorCode, message: &str) {
        self.counters.protocol_errors += 1;
        self.note_failed(conn);
        self.close_with_error(conn, rid, ty, code, message);
    }

    /// Sends a typed error and closes the connection once it is flushed.
    fn close_with_error(
        &mut self,
        conn: ConnId,
        rid: u32,
        ty: MessageType,
        code: ErrorCode,
        message: &str,
    ) {
        self.error_reply(conn, rid, ty.code(), code, message, 0);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.closing = true;
            c.wake();
        }
    }

    fn storage_error(&mut self, conn: ConnId, rid: u32, ty: u16, error: &tern_engine::WriteError) {
        tracing::error!(%error, "storage refused a write");
        let code = write_error_code(error);
        self.error_reply(conn, rid, ty, code, "the server could not store this; retry later", 1000);
    }
}

/// Compares the copies a sender gave (sorted, no repeats) with the devices that must
/// get one.
fn check_copies(
    expected: &[(UserId, DeviceId)],
    given: &[(UserId, DeviceId)],
) -> Result<(), DeliverOutcome> {
    let missing: Vec<_> =
        expected.iter().filter(|d| given.binary_search(d).is_err()).copied().collect();
    let extra: Vec<_> = given.iter().filter(|d| !expected.contains(d)).copied().collect();
    if missing.is_empty() && extra.is_empty() {
        Ok(())
    } else {
        Err(DeliverOutcome::Stale { missing, extra })
    }
}

/// The error code a client gets for a write the storage refused.
pub(super) fn write_error_code(error: &tern_engine::WriteError) -> ErrorCode {
    match error {
        tern_engine::WriteError::StorageFull => ErrorCode::StorageFull,
        tern_engine::WriteError::RecordTooLarge { .. } => ErrorCode::TooLarge,
        _ => ErrorCode::Internal,
    }
}

fn e2e_type_of(archived: &ArchivedE2eType) -> E2eType {
    match archived {
        ArchivedE2eType::Plain => E2eType::Plain,
        ArchivedE2eType::OlmPreKey => E2eType::OlmPreKey,
        ArchivedE2eType::OlmMessage => E2eType::OlmMessage,
        ArchivedE2eType::Megolm => E2eType::Megolm,
    }
}

/// Creates the account for `phone` (or moves an existing one to a new primary device,
/// revoking every old device and token). Returns (user id, new account?, record seq).
fn register<S: Storage>(
    shard: &mut Shard<S>,
    phone: &str,
    device: NewDevice,
    token: &Token,
    now_ms: u64,
) -> Result<(UserId, bool, u64), tern_engine::WriteError> {
    let existing = shard.state().user_by_phone(phone);
    let (user_id, new_account) = match existing {
        Some(user_id) => (user_id, false),
        None => {
            let user_id = shard.allocate_message_id(now_ms);
            shard.apply_state(StateOp::PutAccount {
                user_id,
                phone: phone.to_string(),
                created_ms: now_ms,
            })?;
            (user_id, true)
        }
    };
    if !new_account {
        let old: Vec<DeviceId> = shard
            .state()
            .account(user_id)
            .map(|a| a.devices.iter().map(|d| d.device_id).collect())
            .unwrap_or_default();
        for device_id in old.into_iter().filter(|d| *d != 1) {
            shard.apply_state(StateOp::RemoveDevice { user_id, device_id })?;
        }
    }
    let record = DeviceRecord {
        device_id: 1,
        name: device.name,
        token_hash: secrets::token_hash(token),
        identity_key: device.keys.identity_key,
        signing_key: device.keys.signing_key,
        fallback_key: device.keys.fallback_key,
        one_time_keys: device.keys.one_time_keys,
        push: None,
        created_ms: now_ms,
    };
    let seq = shard.apply_state(StateOp::PutDevice { user_id, device: record })?;
    Ok((user_id, new_account, seq))
}
