//! The simulated server: N [`Core`]s over simulated disks, a simulated clock, mesh,
//! work pool and sockets, all driven by one seeded generator.
//!
//! Why: the glommio runtime interleaves connection reads and writes, commits, mesh
//! batches and finished jobs in an order that depends on the kernel and on timing. The
//! [`World`] does what the runtime does (`edge/src/runtime/`: `conn.rs`, `ctx.rs`,
//! `tasks.rs`) but picks the next of those events with its [`Random`], so one seed is
//! one interleaving, reproduced exactly, and many seeds explore many of them. It also
//! does what the runtime cannot do on purpose: cut the power in the middle of anything.
//!
//! What is faithful and what is not:
//! - frames pass through the same `FrameDecoder` path as `runtime/conn.rs` (routing to
//!   another core hands the connection over with its unread bytes; a paused reader holds
//!   frames back); output is written in random pieces, so partial writes happen;
//! - commits go through `ShardHandle::commit` on `SimStorage`, at random moments, as the
//!   committer would run them; a power cut keeps, for each file, a random prefix of the
//!   unsynced writes (possibly torn) and restarts every core through recovery;
//! - mesh batches keep FIFO order per (from, to) pair, as glommio's channels (and any
//!   TCP transport between nodes) do, but batches of different pairs, jobs, commits and
//!   socket events interleave freely and may wait arbitrarily long;
//! - the clock moves only when the driver says so ([`World::advance`]): deadlines and
//!   TTLs are tested without sleeping.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};

use futures_lite::future::block_on;
use rand_core::RngCore;
use tern_engine::blobs::SimBlobs;
use tern_engine::{PowerCut, ShardConfig, ShardHandle, SimStorage};
use tern_wire::{FrameDecoder, FrameHeader, ABSOLUTE_MAX_FRAME_BYTES};

use crate::core::config::CoreConfig;
use crate::core::conns::ConnId;
use crate::core::effects::Effect;
use crate::core::shared::Now;
use crate::core::Core;
use crate::mesh::CoreMsg;
use crate::push::PushJob;
use crate::routing::Placement;
use crate::secrets::{random_from_seed, Random};
use crate::stats::{DiskUsage, FileSystemSpace};
use crate::work::WorkOrder;

/// Where the simulated wall clock starts (ms since the epoch, a fixed day).
pub const START_UNIX_MS: u64 = 1_750_000_000_000;
/// Alignment of the simulated disks (direct I/O's, as on the real ones).
const DISK_ALIGNMENT: u32 = 512;
/// Events [`World::settle`] runs at most: a bound that turns a livelock into a failure.
const SETTLE_EVENTS_MAX: usize = 1_000_000;
/// Connections a simulated core accepts.
const CONNECTIONS_PER_CORE: usize = 100_000;
/// How often the runtime commits shards that hold only mailbox acks (`flush_lazy`).
const LAZY_FLUSH_MS: u64 = 1_000;

/// How a simulated server is built.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Cores (each a `Core` with its own shards).
    pub cores: u32,
    /// Shards in all.
    pub shards: u32,
    /// Segment size of every shard (small, so that segments roll and get reclaimed).
    pub segment_bytes: u64,
    /// The cores' configuration.
    pub core: CoreConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig { cores: 2, shards: 4, segment_bytes: 256 * 1024, core: CoreConfig::default() }
    }
}

/// One client socket, seen from both ends.
#[derive(Debug)]
pub struct Link {
    /// The core serving it now (it moves when handed over).
    core: u32,
    conn: ConnId,
    /// Bytes the client wrote that the server has not read yet.
    to_server: Vec<u8>,
    /// The server's frame decoder for this connection.
    server_decoder: FrameDecoder,
    /// Frames are held in `server_decoder` until the core catches up.
    held: bool,
    /// What the client has received.
    to_client: FrameDecoder,
    open: bool,
}

/// A client's handle on a link.
pub type LinkId = usize;

/// A frame as a client received it, owned.
#[derive(Clone, Debug)]
pub struct Received {
    /// Its header.
    pub header: FrameHeader,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// One thing the world can do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The server reads what a client wrote (or resumes frames it held back).
    Read(LinkId),
    /// The server writes (part of) a connection's output, or closes it.
    Write(LinkId),
    /// A core's committer runs a group commit.
    Commit(u32),
    /// A core's mesh sender takes this loop turn's batches.
    FlushMesh(u32),
    /// The oldest batch from one core to another arrives.
    Mesh(u32, u32),
    /// A job of the work pool finishes.
    Work(usize),
}

/// The simulated server and the sockets of its clients.
pub struct World {
    config: SimConfig,
    seed: u64,
    /// Power cuts so far (each reboot seeds the cores anew).
    boots: u64,
    cores: Vec<Core<SimStorage>>,
    disks: Vec<SimStorage>,
    blobs: SimBlobs,
    now: Now,
    random: Random,
    mesh: BTreeMap<(u32, u32), VecDeque<Vec<CoreMsg>>>,
    jobs: Vec<(u32, WorkOrder)>,
    links: Vec<Link>,
    codes: Vec<(String, String)>,
    pushes: Vec<PushJob>,
}

impl World {
    /// A fresh server (empty disks) whose every choice follows `seed`.
    pub fn new(config: SimConfig, seed: u64) -> World {
        let disks = (0..config.shards).map(|_| SimStorage::new(DISK_ALIGNMENT)).collect();
        let now = Now { unix_ms: START_UNIX_MS, mono_us: 1_000_000 };
        let mut world = World {
            config,
            seed,
            boots: 0,
            cores: Vec::new(),
            disks,
            blobs: SimBlobs::new(),
            now,
            random: random_from_seed(seed),
            mesh: BTreeMap::new(),
            jobs: Vec::new(),
            links: Vec::new(),
            codes: Vec::new(),
            pushes: Vec::new(),
        };
        world.boot();
        world
    }

    /// Opens every shard (recovery) and builds the cores, as `ternd` starts.
    fn boot(&mut self) {
        let count = self.config.cores;
        self.cores = (0..count)
            .map(|index| {
                let placement = Placement { index, count };
                let shards = self.open_shards(placement);
                let seed = self.seed ^ (self.boots << 32) ^ u64::from(index) << 48;
                let mut core =
                    Core::new(placement, shards, self.config.core.clone(), random_from_seed(seed));
                core.set_max_connections(CONNECTIONS_PER_CORE);
                core
            })
            .collect();
    }

    fn open_shards(&self, placement: Placement) -> Vec<Option<ShardHandle<SimStorage>>> {
        let opened = self.disks.iter().enumerate().map(|(shard_id, disk)| {
            let shard_id = shard_id as u32;
            if placement.core_of_shard(shard_id) != placement.index {
                return None;
            }
            let mut config = ShardConfig::new(shard_id);
            config.segment_bytes = self.config.segment_bytes;
            let opened = block_on(ShardHandle::open(disk.clone(), config));
            Some(opened.unwrap_or_else(|e| panic!("shard {shard_id} does not recover: {e}")))
        });
        opened.collect()
    }

    // -- the clock and randomness ------------------------------------------------------

    /// The time now.
    pub fn now(&self) -> Now {
        self.now
    }

    /// Moves the clock on by `ms` and fires every deadline that passed.
    pub fn advance(&mut self, ms: u64) {
        self.now.unix_ms += ms;
        self.now.mono_us += ms * 1000;
        let now = self.now;
        for index in 0..self.cores.len() {
            let due = self.cores[index].poll_timeout().is_some_and(|t| t <= now.mono_ms());
            if due {
                self.cores[index].handle_timeout(now);
                self.kick(index as u32);
            }
        }
        // The runtime's lazy flush: mailbox acks, which start no commit, are committed
        // within about a second (`runtime/tasks.rs`, `flush_lazy`).
        let lazy_flush_due = now.mono_ms() / LAZY_FLUSH_MS != (now.mono_ms() - ms) / LAZY_FLUSH_MS;
        for index in 0..self.cores.len() as u32 {
            let owned = self.cores[index as usize].owned_shards();
            if lazy_flush_due && owned.iter().any(|(_, shard)| shard.borrow().has_pending()) {
                self.commit(index);
            }
        }
        self.abort_links();
    }

    /// Whether the server is holding off reading `link` (its output, an upload, or its
    /// pace of requests and refusals); only time passing, or the client reading, ends it.
    pub fn reading_paused(&self, link: LinkId) -> bool {
        let link = &self.links[link];
        link.open && self.cores[link.core as usize].reading_paused(link.conn)
    }

    /// A number below `bound` from the world's generator (0 when `bound` is 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else {
            self.random.next_u64() % bound
        }
    }

    /// True with probability `percent` %.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    // -- what the cores asked for ------------------------------------------------------

    /// Takes a core's outputs after an input, as `Ctx::kick` does.
    fn kick(&mut self, index: u32) {
        let core = &mut self.cores[index as usize];
        while core.poll_ready().is_some() {}
        while let Some(effect) = core.poll_effect() {
            match effect {
                Effect::SendCode { phone, code } => self.codes.push((phone, code)),
                Effect::Push(job) => self.pushes.push(job),
                Effect::Work(order) => self.jobs.push((index, order)),
            }
        }
    }

    /// The latest verification code sent to `phone`.
    pub fn code_for(&self, phone: &str) -> Option<String> {
        self.codes.iter().rev().find(|(p, _)| p == phone).map(|(_, code)| code.clone())
    }

    /// Wake-ups sent so far.
    pub fn pushes(&self) -> &[PushJob] {
        &self.pushes
    }

    /// The cores (for metrics and state a test looks at).
    pub fn cores(&self) -> &[Core<SimStorage>] {
        &self.cores
    }

    /// What every core measures of the data directory's file system from now on (the
    /// runtime's once-a-second statvfs): `free_bytes` available.
    pub fn set_free_disk_bytes(&mut self, free_bytes: u64) {
        let file_system = FileSystemSpace { free_bytes, size_bytes: 1 << 40 };
        for core in &mut self.cores {
            core.set_disk_usage(DiskUsage {
                file_system: Some(file_system),
                ..DiskUsage::default()
            });
        }
    }

    // -- sockets -----------------------------------------------------------------------

    /// A client connects; the kernel hands the connection to a random core.
    pub fn connect(&mut self) -> LinkId {
        let core = self.below(u64::from(self.config.cores)) as u32;
        let peer = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let conn = self.cores[core as usize].handle_accept(peer, self.now);
        let max = self.cores[core as usize].max_frame_bytes(conn);
        self.kick(core);
        self.links.push(Link {
            core,
            conn,
            to_server: Vec::new(),
            server_decoder: FrameDecoder::new(max),
            held: false,
            to_client: FrameDecoder::new(ABSOLUTE_MAX_FRAME_BYTES),
            open: true,
        });
        self.links.len() - 1
    }

    /// The client writes `bytes` (lost if the link is closed).
    pub fn write(&mut self, link: LinkId, bytes: &[u8]) {
        let link = &mut self.links[link];
        if link.open {
            link.to_server.extend_from_slice(bytes);
        }
    }

    /// The client closes its socket: the server sees the close at once.
    pub fn close(&mut self, link: LinkId) {
        if !self.links[link].open {
            return;
        }
        self.links[link].open = false;
        let (core, conn) = (self.links[link].core, self.links[link].conn);
        self.cores[core as usize].handle_closed(conn, self.now);
        self.kick(core);
    }

    /// Whether the link is still open.
    pub fn is_open(&self, link: LinkId) -> bool {
        self.links[link].open
    }

    /// The frames the client has received and not taken yet.
    pub fn take_frames(&mut self, link: LinkId) -> Vec<Received> {
        let decoder = &mut self.links[link].to_client;
        let mut frames = Vec::new();
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    frames.push(Received { header: frame.header, payload: frame.payload.to_vec() })
                }
                Ok(None) => return frames,
                Err(error) => panic!("the server wrote an undecodable frame: {error}"),
            }
        }
    }

    // -- events ------------------------------------------------------------------------

    /// Everything that could happen next, in a fixed order (the choice is random).
    pub fn events(&self) -> Vec<Event> {
        let mut events = Vec::new();
        for (id, link) in self.links.iter().enumerate().filter(|(_, l)| l.open) {
            let core = &self.cores[link.core as usize];
            let paused = core.reading_paused(link.conn);
            if (!link.to_server.is_empty() || link.held) && !paused {
                events.push(Event::Read(id));
            }
            let closing = core.is_closing(link.conn) || core.must_abort(link.conn);
            if !core.output(link.conn).is_empty() || closing {
                events.push(Event::Write(id));
            }
        }
        for (index, core) in self.cores.iter().enumerate() {
            if core.has_pending_writes() {
                events.push(Event::Commit(index as u32));
            }
            if core.has_mesh_output() {
                events.push(Event::FlushMesh(index as u32));
            }
        }
        let pairs = self.mesh.iter().filter(|(_, q)| !q.is_empty());
        events.extend(pairs.map(|((from, to), _)| Event::Mesh(*from, *to)));
        events.extend((0..self.jobs.len()).map(Event::Work));
        events
    }

    /// Runs one event chosen at random; false when nothing can happen.
    pub fn step(&mut self) -> bool {
        let events = self.events();
        if events.is_empty() {
            return false;
        }
        let event = events[self.below(events.len() as u64) as usize];
        self.run(event);
        true
    }

    /// Runs events until nothing can happen.
    pub fn settle(&mut self) {
        for _ in 0..SETTLE_EVENTS_MAX {
            if !self.step() {
                return;
            }
        }
        panic!("the simulated server did not settle: {:?}", self.events());
    }

    /// Runs random events that `allow` lets through until none of those is left.
    pub fn settle_only(&mut self, allow: impl Fn(&Event) -> bool) {
        for _ in 0..SETTLE_EVENTS_MAX {
            let events: Vec<Event> = self.events().into_iter().filter(&allow).collect();
            if events.is_empty() {
                return;
            }
            let event = events[self.below(events.len() as u64) as usize];
            self.run(event);
        }
        panic!("the simulated server did not settle");
    }

    /// Runs `event`.
    pub fn run(&mut self, event: Event) {
        match event {
            Event::Read(link) => self.read(link),
            Event::Write(link) => self.write_out(link),
            Event::Commit(core) => self.commit(core),
            Event::FlushMesh(core) => self.flush_mesh(core),
            Event::Mesh(from, to) => self.deliver_batch(from, to),
            Event::Work(index) => self.finish_job(index),
        }
    }

    /// The server reads a random prefix of what the client wrote (a whole read of a
    /// real socket can end anywhere) and handles the whole frames in it.
    fn read(&mut self, id: LinkId) {
        let link = &mut self.links[id];
        if !link.to_server.is_empty() {
            let n = 1 + (self.random.next_u64() % link.to_server.len() as u64) as usize;
            let bytes: Vec<u8> = link.to_server.drain(..n).collect();
            link.server_decoder.feed(&bytes);
        }
        link.held = false;
        self.handle_frames(id);
    }

    /// `runtime/conn.rs`'s `handle_frames`, hand-over included.
    fn handle_frames(&mut self, id: LinkId) {
        loop {
            let now = self.now;
            let link = &mut self.links[id];
            let core = &mut self.cores[link.core as usize];
            let mut moving = None;
            loop {
                link.server_decoder.set_max_frame_bytes(core.max_frame_bytes(link.conn));
                match link.server_decoder.next_frame() {
                    Ok(Some(frame)) => {
                        if let Some(to) = core.route(link.conn, &frame.message) {
                            moving = Some((to, frame.header.frame_bytes()));
                            break;
                        }
                        core.handle_frame(link.conn, &frame, now);
                        if core.is_closing(link.conn) {
                            break;
                        }
                        if core.reading_paused(link.conn) {
                            link.held = true;
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(error) => {
                        core.handle_malformed(link.conn, error, now);
                        break;
                    }
                }
            }
            let from = link.core;
            self.kick(from);
            let Some((to, frame_bytes)) = moving else { return };
            self.links[id].server_decoder.unread(frame_bytes);
            if !self.hand_over(id, to) {
                return;
            }
        }
    }

    /// Flushes the connection's output, then moves it to core `to`. False if it closed.
    fn hand_over(&mut self, id: LinkId, to: u32) -> bool {
        while !self.cores[self.links[id].core as usize].output(self.links[id].conn).is_empty() {
            self.write_piece(id, usize::MAX);
        }
        let (from, conn) = (self.links[id].core, self.links[id].conn);
        let Some(session) = self.cores[from as usize].hand_off(conn) else {
            self.cores[from as usize].handle_closed(conn, self.now);
            self.kick(from);
            self.links[id].open = false;
            return false;
        };
        self.kick(from);
        let conn = self.cores[to as usize].adopt(session, self.now);
        self.kick(to);
        (self.links[id].core, self.links[id].conn) = (to, conn);
        true
    }

    /// Writes a random piece of the connection's output, or closes a connection that
    /// is closing and flushed (or must be dropped).
    fn write_out(&mut self, id: LinkId) {
        let (core, conn) = (self.links[id].core, self.links[id].conn);
        let pending = self.cores[core as usize].output(conn).len();
        if self.cores[core as usize].must_abort(conn) || pending == 0 {
            self.links[id].open = false;
            self.cores[core as usize].handle_closed(conn, self.now);
            self.kick(core);
            return;
        }
        let n = 1 + self.below(pending as u64) as usize;
        self.write_piece(id, n);
    }

    fn write_piece(&mut self, id: LinkId, at_most: usize) {
        let link = &mut self.links[id];
        let core = &mut self.cores[link.core as usize];
        let output = core.output(link.conn);
        let n = output.len().min(at_most);
        link.to_client.feed(&output[..n]);
        core.consume_output(link.conn, n, self.now);
        let index = link.core;
        self.kick(index);
    }

    /// Connections the core gave up on (a deadline passed) are dropped.
    fn abort_links(&mut self) {
        for id in 0..self.links.len() {
            let link = &self.links[id];
            if link.open && self.cores[link.core as usize].must_abort(link.conn) {
                self.write_out(id);
            }
        }
    }

    /// One group commit of every shard of `core` with pending records (awaited or not),
    /// then the core learns what became durable (`runtime/tasks.rs`'s committer).
    fn commit(&mut self, index: u32) {
        let core = &mut self.cores[index as usize];
        for (shard_id, shard) in core.owned_shards() {
            if shard.borrow().has_pending() {
                if let Err(error) = block_on(shard.commit()) {
                    panic!("shard {shard_id}: a simulated commit failed: {error}");
                }
            }
        }
        core.handle_durable(self.now);
        self.kick(index);
    }

    fn flush_mesh(&mut self, index: u32) {
        for (to, batch) in self.cores[index as usize].poll_mesh() {
            self.mesh.entry((index, to.core)).or_default().push_back(batch);
        }
        self.kick(index);
    }

    fn deliver_batch(&mut self, from: u32, to: u32) {
        let Some(batch) = self.mesh.get_mut(&(from, to)).and_then(VecDeque::pop_front) else {
            return;
        };
        self.cores[to as usize].handle_mesh(batch, self.now);
        self.kick(to);
    }

    fn finish_job(&mut self, index: usize) {
        let (core, order) = self.jobs.swap_remove(index);
        let done = crate::work::run(order, &mut self.blobs);
        self.cores[core as usize].handle_work_done(done, self.now);
        self.kick(core);
    }

    /// The maintenance pass of every core: expired media go, shards checkpoint and
    /// reclaim space (`runtime/tasks.rs`'s `maintenance`).
    pub fn maintain(&mut self) {
        for index in 0..self.cores.len() {
            self.cores[index].expire_media(self.now);
            for (shard_id, shard) in self.cores[index].owned_shards() {
                if let Err(error) = block_on(shard.reclaim(self.now.unix_ms)) {
                    panic!("shard {shard_id}: a simulated reclaim failed: {error}");
                }
            }
            self.cores[index].handle_durable(self.now);
            self.kick(index as u32);
        }
    }

    /// A clean stop: every core tells its clients and closes them once flushed.
    pub fn shut_down(&mut self) {
        for index in 0..self.cores.len() {
            self.cores[index].shut_down(self.now);
            self.kick(index as u32);
        }
    }

    // -- faults ------------------------------------------------------------------------

    /// The power goes: every unsynced write is kept, lost or torn at random (per
    /// file, a prefix survives), blobs not yet named are lost, every connection drops,
    /// whatever was in the mesh or the work pool is gone; then the server boots again.
    pub fn power_cut(&mut self) {
        let mut random = random_from_seed(self.random.next_u64());
        let mut choose = |_: &str, unsynced: usize| match random.next_u64() % 4 {
            0 => PowerCut::DropAll,
            1 => PowerCut::KeepFirst(unsynced),
            2 => PowerCut::KeepFirst((random.next_u64() % (unsynced as u64 + 1)) as usize),
            _ => PowerCut::Tear {
                whole: (random.next_u64() % (unsynced as u64 + 1)) as usize,
                bytes: (random.next_u64() % 4096) as usize,
            },
        };
        self.cores.clear();
        self.disks = self.disks.iter().map(|disk| disk.power_cut(&mut choose)).collect();
        self.blobs.power_cut();
        for link in &mut self.links {
            link.open = false;
        }
        self.mesh.clear();
        self.jobs.clear();
        self.boots += 1;
        self.boot();
    }

    /// Shard `shard`'s disk is replaced by an empty one (takes effect at the next
    /// boot): a fault beyond what the server promises to survive, for checking the
    /// checkers.
    pub fn lose_disk(&mut self, shard: u32) {
        self.disks[shard as usize] = SimStorage::new(DISK_ALIGNMENT);
    }

    /// Power cuts so far.
    pub fn boots(&self) -> u64 {
        self.boots
    }
}
