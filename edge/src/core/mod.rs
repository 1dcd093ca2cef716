//! The per-core server logic: a deterministic state machine with no I/O.
//!
//! A [`Core`] owns the shards of one core and everything its connections need; it
//! reads no clock, touches no socket or file and spawns nothing. The caller (the glommio
//! runtime, or the simulation) drives it in quinn-proto's style:
//!
//! - **inputs**, `handle_*`, each with the time of the event ([`Now`]): a connection
//!   accepted or adopted, a validated frame ([`Core::handle_frame`]) or undecodable
//!   input, bytes the socket took, a transport failure, a close; a batch from the mesh;
//!   a commit that made records durable ([`Core::handle_durable`]); a finished job; a
//!   passed deadline ([`Core::handle_timeout`]); a gone push endpoint; shutdown.
//! - **outputs**, `poll_*`, taken after every input until they are empty: connections
//!   with output to write or a state to act on ([`Core::poll_ready`], then
//!   [`Core::output`] / [`Core::consume_output`]), effects ([`Core::poll_effect`]:
//!   codes, pushes, blob and CPU jobs), one batch per mesh destination
//!   ([`Core::poll_mesh`], once per loop turn), and the next deadline
//!   ([`Core::poll_timeout`]). Whether shards have records to commit:
//!   [`Core::has_pending_writes`].
//!
//! Inside, the state is split into owned parts: the shared services in [`shared`]
//! (shards, connections, durability waits, outbox, effects, counters) and one subsystem
//! per concern in [`parts`] (registration, linking, delivery, keys, presence, groups,
//! media, accounts, exports, wake-ups), each in its own module with private fields.
//! [`frames`] routes frames to them, [`serve`] routes mesh messages and job results.
//! A call to this core's own data goes through the same typed calls as one to another
//! core: it is queued locally and served before the input that made it returns.

pub mod accounts;
pub mod addresses;
pub mod budgets;
pub mod config;
pub mod conns;
pub mod deletion;
pub mod delivery;
pub mod durable;
pub mod effects;
pub mod export;
pub mod frames;
pub mod groups;
pub mod handshake;
pub mod keys;
pub mod linking;
pub mod media;
pub mod outbox;
pub mod parts;
pub mod presence;
pub mod registration;
pub mod serve;
pub mod shards;
pub mod shared;
pub mod wakeups;

use std::net::IpAddr;

use tern_engine::{ShardHandle, Storage};
use tern_wire::{DecodeError, Frame, Message};

use crate::mesh::CoreMsg;
use crate::push::PushJob;
use crate::routing::{Address, Placement};
use crate::secrets::Random;
use crate::stats::{CoreStats, DiskUsage};
use crate::work::WorkDone;
use config::CoreConfig;
use conns::ConnId;
use effects::Effect;
use handshake::Session;
use parts::Parts;
use shards::Shards;
use shared::{Now, Shared};

/// Local messages served per input at most: a call answered here can make more calls,
/// but every chain ends (request → answer → reply); this bound only turns a bug into a
/// logged error instead of a hang.
const LOCAL_MESSAGES_PER_INPUT_MAX: usize = 1 << 20;

/// The state of one core.
pub struct Core<S: Storage> {
    shared: Shared<S>,
    parts: Parts,
    /// The latest metrics other cores pushed here (the admin endpoint's core).
    peer_stats: Vec<Option<CoreStats>>,
}

impl<S: Storage> std::fmt::Debug for Core<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("placement", &self.shared.shards.placement())
            .field("connections", &self.shared.conns.len())
            .finish_non_exhaustive()
    }
}

impl<S: Storage> Core<S> {
    /// A core at `placement` over `shards` (index = shard id; `None` for those other
    /// cores own), drawing randomness from `random`.
    pub fn new(
        placement: Placement,
        shards: Vec<Option<ShardHandle<S>>>,
        config: CoreConfig,
        random: Random,
    ) -> Core<S> {
        let shared = Shared::new(Shards::new(placement, shards), config.clone(), random);
        let parts = Parts::new(&shared, &config);
        Core { shared, parts, peer_stats: vec![None; placement.count as usize] }
    }

    /// Sets the time of the input being handled.
    fn enter(&mut self, now: Now) -> &mut Shared<S> {
        self.shared.now = now;
        self.shared.conns.set_now_ms(now.mono_ms());
        &mut self.shared
    }

    /// Serves the calls and tells this core made to itself while handling an input.
    fn drain_local(&mut self) {
        for _ in 0..LOCAL_MESSAGES_PER_INPUT_MAX {
            let Some(message) = self.shared.outbox.take_local() else { return };
            self.dispatch(message);
        }
        tracing::error!("a chain of local calls did not end; the rest waits for the next input");
    }

    fn dispatch(&mut self, message: CoreMsg) {
        if let Some(stats) = serve::dispatch(&mut self.shared, &mut self.parts, message) {
            if let Some(slot) = self.peer_stats.get_mut(stats.core as usize) {
                *slot = Some(*stats);
            }
        }
    }

    // -- inputs ------------------------------------------------------------------------

    /// A listener of this core accepted a connection from `peer_ip`.
    pub fn handle_accept(&mut self, peer_ip: Option<IpAddr>, now: Now) -> ConnId {
        let shared = self.enter(now);
        shared.conns.counters_mut().accepted += 1;
        let conn = shared.conns.open(peer_ip, None, now.mono_ms());
        let refused = shared.conns.get(conn).is_some_and(|c| c.closing);
        if shared.conns.over_limit() && !refused {
            // Refuse cleanly: a typed error on this connection, then close it.
            handshake::refuse_connection(shared, conn);
        }
        conn
    }

    /// A new map of the cluster (a node of one): which node owns each shard from now on.
    pub fn set_homes(&mut self, homes: crate::routing::Homes) {
        self.shared.homes = homes;
    }

    /// The core that must handle `message` from `conn`, if it is not this one.
    pub fn route(&self, conn: ConnId, message: &Message<'_>) -> Option<u32> {
        handshake::route(&self.shared, conn, message)
    }

    /// One validated frame from `conn`.
    pub fn handle_frame(&mut self, conn: ConnId, frame: &Frame<'_>, now: Now) {
        self.enter(now);
        frames::handle(&mut self.shared, &mut self.parts, conn, frame);
        self.drain_local();
    }

    /// Input from `conn` that does not decode: a typed error, then a close.
    pub fn handle_malformed(&mut self, conn: ConnId, error: DecodeError, now: Now) {
        frames::malformed(self.enter(now), conn, error);
    }

    /// The TLS or WebSocket layer of `conn` failed: it closes.
    pub fn handle_transport_failed(&mut self, conn: ConnId, now: Now) {
        let shared = self.enter(now);
        handshake::transport_failed(shared, conn);
        shared.conns.close(conn, now.mono_ms());
    }

    /// The socket (or the layer above it) took `n` bytes of `conn`'s output.
    pub fn consume_output(&mut self, conn: ConnId, n: usize, now: Now) {
        let shared = self.enter(now);
        shared.conns.consume(conn, n);
        delivery::mailbox::pump(shared, conn);
    }

    /// `conn`'s socket closed.
    pub fn handle_closed(&mut self, conn: ConnId, now: Now) {
        self.enter(now);
        handshake::closed(&mut self.shared, &mut self.parts.presence, conn);
        self.parts.linking.forget_conn(conn);
        self.drain_local();
    }

    /// Lets go of `conn` for another core (its output flushed).
    pub fn hand_off(&mut self, conn: ConnId) -> Option<Session> {
        self.parts.linking.forget_conn(conn);
        handshake::hand_off(&mut self.shared, conn)
    }

    /// Takes over a connection another core handed off.
    pub fn adopt(&mut self, session: Session, now: Now) -> ConnId {
        handshake::adopt(self.enter(now), session)
    }

    /// A batch from another core.
    pub fn handle_mesh(&mut self, messages: Vec<CoreMsg>, now: Now) {
        self.enter(now);
        for message in messages {
            self.dispatch(message);
        }
        self.drain_local();
    }

    /// A commit made records durable: replies that waited go, new envelopes are fed to
    /// their connected devices.
    pub fn handle_durable(&mut self, now: Now) {
        let shared = self.enter(now);
        let durable = shared.shards.durable_seqs();
        let (released, ready) = shared.durable.take_released(&durable);
        for release in released {
            shared.release(release);
        }
        for device in ready {
            if let Some(conn) = shared.conns.online(device) {
                delivery::mailbox::pump(shared, conn);
            }
        }
        self.drain_local();
    }

    /// A job of the work pool finished.
    pub fn handle_work_done(&mut self, done: WorkDone, now: Now) {
        self.enter(now);
        if let Some(account) = serve::work_done(&mut self.shared, &mut self.parts, done) {
            if let Some((old, devices)) = &account.replaced {
                // A fresh account for the number: the old one's data goes (its record
                // went with the new one's creation).
                let Parts { accounts, media, presence, wakeups, .. } = &mut self.parts;
                let reach = deletion::Reach { accounts, media, presence, wakeups };
                let (shared, phone) = (&mut self.shared, &account.phone);
                deletion::erase_all_but_the_record(shared, reach, (*old, devices), phone, None);
                tracing::info!(old, new = account.user_id, "number registered afresh");
            }
            self.parts.accounts.registered(&account.phone, account.user_id);
            if account.moved {
                // The account moved to a new primary: every old device and token is
                // revoked, so their live sessions end too.
                for (device, _) in self.shared.conns.online_devices(account.user_id) {
                    self.shared.conns.end_session(device);
                    self.parts.wakeups.forget(device);
                }
            }
        }
        self.drain_local();
    }

    /// Deadlines passed.
    pub fn handle_timeout(&mut self, now: Now) {
        handshake::handle_timeout(self.enter(now));
    }

    /// The push service said `job`'s endpoint is gone.
    pub fn handle_push_gone(&mut self, job: &PushJob, now: Now) {
        self.enter(now);
        self.parts.wakeups.gone(&mut self.shared, job);
    }

    /// The server is stopping: every client is told, and closed once flushed.
    pub fn shut_down(&mut self, now: Now) {
        handshake::shut_down(self.enter(now));
    }

    /// The maintenance pass: expired blobs go. Returns how many.
    pub fn expire_media(&mut self, now: Now) -> usize {
        self.enter(now);
        self.parts.media.expire(&mut self.shared)
    }

    /// Disk use as the runtime measured it (for the metrics).
    pub fn set_disk_usage(&mut self, disk: DiskUsage) {
        let was_low = self.shared.disk_low();
        self.shared.disk = disk;
        let core = self.shared.shards.placement().index;
        let free_bytes = self.shared.disk.file_system.map_or(0, |fs| fs.free_bytes);
        match (was_low, self.shared.disk_low()) {
            (false, true) => tracing::warn!(
                core,
                free_bytes,
                "free disk space is under the reserve: new accounts, uploads and exports \
                 are refused, messages are still stored"
            ),
            (true, false) => tracing::info!(
                core,
                free_bytes,
                "free disk space is above the reserve again: accounts and uploads are taken"
            ),
            _ => {}
        }
    }

    /// The per-core connection limit.
    pub fn set_max_connections(&mut self, max: usize) {
        self.shared.conns.set_max(max);
    }

    /// Records per group commit (for the metrics).
    pub fn observe_commit_batch(&mut self, records: u64) {
        self.shared.histograms.commit_batch_records.observe(records as f64);
    }

    /// Counts one shard's commit: how long its first record waited for it to start, and
    /// how long its write and fdatasync took (microseconds).
    pub fn observe_commit(&mut self, waited_us: u64, took_us: u64) {
        let histograms = &mut self.shared.histograms;
        histograms.commit_wait.observe(waited_us as f64 / 1e6);
        histograms.commit.observe(took_us as f64 / 1e6);
    }

    // -- outputs -----------------------------------------------------------------------

    /// The next connection whose driver has something to do.
    pub fn poll_ready(&mut self) -> Option<ConnId> {
        self.shared.conns.poll_ready()
    }

    /// The next effect for the runtime.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.shared.effects.poll()
    }

    /// The earliest deadline (monotonic ms).
    pub fn poll_timeout(&self) -> Option<u64> {
        self.shared.conns.poll_timeout()
    }

    /// This loop turn's batches for other cores (presence coalesced until now).
    pub fn poll_mesh(&mut self) -> Vec<(Address, Vec<CoreMsg>)> {
        self.parts.presence.flush(&mut self.shared);
        self.drain_local();
        self.shared.outbox.take_batches()
    }

    /// Whether the mesh has something to send (or presence to flush).
    pub fn has_mesh_output(&self) -> bool {
        self.shared.outbox.has_remote() || self.parts.presence.has_events()
    }

    /// Whether effects wait.
    pub fn has_effects(&self) -> bool {
        !self.shared.effects.is_empty()
    }

    /// Bytes waiting for `conn`'s socket.
    pub fn output(&self, conn: ConnId) -> &[u8] {
        self.shared.conns.output(conn)
    }

    /// Whether `conn` closes once its output is flushed.
    pub fn is_closing(&self, conn: ConnId) -> bool {
        self.shared.conns.is_closing(conn)
    }

    /// Whether `conn` must be dropped now (its close outlived its grace, or it is gone).
    pub fn must_abort(&self, conn: ConnId) -> bool {
        self.shared.conns.must_abort(conn)
    }

    /// Whether reading `conn` waits for the core to catch up (a full upload queue).
    pub fn reading_paused(&self, conn: ConnId) -> bool {
        self.shared.conns.get(conn).is_some_and(|c| c.reading_paused())
    }

    /// Whether `conn` is authenticated.
    pub fn is_authenticated(&self, conn: ConnId) -> bool {
        self.shared.conns.device(conn).is_some()
    }

    /// The frame limit in force for reading from `conn` (smaller before it
    /// authenticates).
    pub fn max_frame_bytes(&self, conn: ConnId) -> u32 {
        self.shared.conns.max_inbound_frame_bytes(conn)
    }

    /// Whether any shard has records waiting for a commit.
    pub fn has_pending_writes(&self) -> bool {
        self.shared.shards.has_pending_writes()
    }

    /// The shards this core owns, with their ids (for the committer and maintenance).
    pub fn owned_shards(&self) -> Vec<(u32, ShardHandle<S>)> {
        self.shared.shards.owned()
    }

    /// Where this core sits.
    pub fn placement(&self) -> Placement {
        self.shared.shards.placement()
    }

    /// The configuration.
    pub fn config(&self) -> &CoreConfig {
        &self.shared.config
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.shared.conns.len()
    }

    /// Queues this core's metrics for `core` (the one serving the admin endpoint).
    pub fn push_stats_to(&mut self, core: u32) {
        let stats = Box::new(self.stats());
        self.shared.outbox.send(Address::local(core), CoreMsg::Stats(stats));
    }

    /// This core's metrics.
    pub fn stats(&self) -> CoreStats {
        let shared = &self.shared;
        let owned = shared.shards.owned();
        let failed_shards = owned
            .iter()
            .filter_map(|(id, s)| s.borrow().write_error().map(|e| (*id, e.to_string())))
            .collect();
        let mut counters = shared.counters.clone();
        let conns = shared.conns.counters();
        (counters.connections_accepted, counters.connections_failed) =
            (conns.accepted, conns.failed);
        (counters.protocol_errors, counters.handed_over) =
            (conns.protocol_errors, conns.handed_over);
        counters.connections_paced = conns.paced;
        (counters.mesh_batches_out, counters.mesh_items_out) = shared.outbox.sent();
        CoreStats {
            core: shared.shards.placement().index,
            connections: shared.conns.len() as u64,
            outbound_bytes: shared.conns.outbound_bytes() as u64,
            counters,
            disk: shared.disk.clone(),
            shards: owned.into_iter().map(|(id, s)| (id, s.borrow().counters().clone())).collect(),
            failed_shards,
            histograms: shared.histograms.clone(),
        }
    }

    /// This core's metrics and the latest each other core pushed here.
    pub fn all_stats(&self) -> Vec<CoreStats> {
        let mut all = vec![self.stats()];
        all.extend(self.peer_stats.iter().flatten().cloned());
        all.sort_by_key(|s| s.core);
        all
    }
}

pub use conns::ConnState;
pub use linking::LINK_CODE_TTL_MS;
pub use media::MEDIA_CHUNK_BYTES;
