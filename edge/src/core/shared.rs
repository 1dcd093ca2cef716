//! The parts of a core every subsystem works through.
//!
//! A subsystem (registration, delivery, groups, …) owns its own state; what they all
//! need — the shards, the connection table and its output, the durability waits, the
//! outbox to other cores, the effects for the runtime, the counters, the clock and the
//! random generator — is one [`Shared`] passed to them by the `Core` façade. Each part
//! is its own type with private fields; this module only adds the few steps that
//! combine them (park a reply until durable, release what a commit made durable).

use tern_engine::Storage;
use tern_wire::{Payload, WireSerializer};

use super::config::CoreConfig;
use super::conns::{ConnId, Conns};
use super::durable::{Durability, Release};
use super::effects::Effects;
use super::outbox::Outbox;
use super::shards::{Shards, Waits};
use crate::mesh::{Call, ReplyTo};
use crate::routing::Homes;
use crate::secrets::Random;
use crate::stats::{Counters, DiskUsage, Histograms};

/// The time of an event, from the caller: wall time for what is stored and shown,
/// monotonic time for deadlines and latencies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// Microseconds on the caller's monotonic clock.
    pub mono_us: u64,
}

impl Now {
    /// The monotonic clock in milliseconds (deadlines).
    pub fn mono_ms(&self) -> u64 {
        self.mono_us / 1000
    }
}

/// What every subsystem of one core works through.
pub struct Shared<S: Storage> {
    /// The shards this core owns.
    pub shards: Shards<S>,
    /// The connections.
    pub conns: Conns,
    /// Replies and deliveries waiting for commits.
    pub durable: Durability,
    /// Messages for other cores.
    pub outbox: Outbox,
    /// Work for the runtime.
    pub effects: Effects,
    /// Counters for the metrics.
    pub counters: Counters,
    /// Histograms for the metrics.
    pub histograms: Histograms,
    /// Disk use as the runtime last measured it.
    pub disk: DiskUsage,
    /// Tunables.
    pub config: CoreConfig,
    /// Randomness (tokens, codes, ids).
    pub random: Random,
    /// The time of the event being handled.
    pub now: Now,
    /// Which node owns each shard (a single node: this one).
    pub homes: Homes,
}

impl<S: Storage> Shared<S> {
    /// The parts of a new core.
    pub fn new(shards: Shards<S>, config: CoreConfig, random: Random) -> Shared<S> {
        let here = shards.placement().here();
        let mut conns = Conns::new(config.auth_deadline_ms, config.idle_timeout_ms);
        conns.set_pre_auth_per_address(config.pre_auth_per_address, config.code_budget_loopback);
        conns.set_stall_timeout_ms(config.stall_timeout_ms);
        conns.set_request_rate(config.request_rate);
        Shared {
            shards,
            conns,
            durable: Durability::default(),
            outbox: Outbox::new(here),
            effects: Effects::default(),
            counters: Counters::default(),
            histograms: Histograms::new(),
            disk: DiskUsage::default(),
            config,
            random,
            now: Now { unix_ms: 0, mono_us: 0 },
            homes: Homes::default(),
        }
    }

    /// The wall clock of the event being handled.
    pub fn now_ms(&self) -> u64 {
        self.now.unix_ms
    }

    /// Whether free disk space (as last measured, once a second) is under the reserve:
    /// then new accounts, uploads and exports are refused and appends go on.
    pub fn disk_low(&self) -> bool {
        let reserve = self.config.disk_reserve_bytes;
        reserve > 0 && self.disk.file_system.is_some_and(|fs| fs.free_bytes < reserve)
    }

    /// Releases `release` once every wait is durable (now, if they already are: no
    /// commit would come to release it later).
    pub fn when_durable(&mut self, waits: Waits, release: Release) {
        if self.shards.all_durable(&waits) {
            self.release(release);
        } else {
            self.durable.park(waits, release);
        }
    }

    /// Answers `rid` on `conn` with `value` once `waits` are durable.
    pub fn reply_when_durable<T>(&mut self, conn: ConnId, rid: u32, value: &T, waits: Waits)
    where
        T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    {
        self.reply_when_durable_timed(conn, rid, value, waits, None);
    }

    /// Refuses a request once `waits` are durable: a refusal that follows a state
    /// change (a failed attempt counted) never reaches the client before the change is
    /// on disk, so a crash cannot undo what the client was told.
    pub fn refuse_when_durable(
        &mut self,
        (conn, rid): (ConnId, u32),
        failed_type: u16,
        refusal: &dyn crate::refusal::Refusal,
        waits: Waits,
    ) {
        let frame = super::conns::error_frame(failed_type, refusal);
        self.reply_when_durable(conn, rid, &frame, waits);
    }

    /// Like [`Shared::reply_when_durable`], measuring send→sent from `started_us`.
    pub fn reply_when_durable_timed<T>(
        &mut self,
        conn: ConnId,
        rid: u32,
        value: &T,
        waits: Waits,
        started_us: Option<u64>,
    ) where
        T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    {
        if let Some(frame) = self.conns.encode(conn, rid, value) {
            self.when_durable(waits, Release::Frame { conn, frame, started_us });
        }
    }

    /// Answers a call once `waits` are durable (nothing if nobody waits for it).
    pub fn answer_when_durable<C: Call>(
        &mut self,
        reply_to: Option<ReplyTo<C>>,
        answer: C::Answer,
        waits: Waits,
    ) {
        if let Some(reply_to) = reply_to {
            let (to, message) = reply_to.answer(answer);
            self.when_durable(waits, Release::Mesh { to, message });
        }
    }

    /// Answers a call now (nothing if nobody waits for it).
    pub fn answer<C: Call>(&mut self, reply_to: Option<ReplyTo<C>>, answer: C::Answer) {
        self.answer_when_durable(reply_to, answer, Vec::new());
    }

    /// Lets one durable wait's release go.
    pub fn release(&mut self, release: Release) {
        match release {
            Release::Frame { conn, frame, started_us } => {
                if let Some(started) = started_us {
                    let waited_us = self.now.mono_us.saturating_sub(started);
                    self.histograms.send_to_sent.observe(waited_us as f64 / 1e6);
                }
                self.conns.push_bytes(conn, &frame);
            }
            Release::Mesh { to, message } => self.outbox.send(to, message),
        }
    }
}
