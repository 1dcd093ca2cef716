//! Replies that wait for durability, and devices that wait for delivery.
//!
//! Nothing is acknowledged before `fdatasync`: a sent tick, a registration, a handed-out
//! one-time key or an answer to another core's request that stored something is parked
//! here with the `(shard, record sequence)` pairs it needs, and released by the commit
//! that makes them durable ([`Durability::take_released`]). Likewise a device whose
//! mailbox got an envelope is marked dirty with the record that carries it, and is fed
//! only once that record is durable: mailbox reads never serve past the durable end.

use std::collections::HashMap;

use tern_wire::messages::{DeviceId, UserId};

use super::conns::ConnId;
use super::shards::Waits;
use crate::mesh::CoreMsg;
use crate::routing::Address;

/// What a durable wait releases.
#[derive(Debug)]
pub enum Release {
    /// A frame for a connection of this core.
    Frame {
        /// The connection.
        conn: ConnId,
        /// The encoded frame.
        frame: Vec<u8>,
        /// For a sent tick: when the send arrived (µs), to measure send→sent.
        started_us: Option<u64>,
    },
    /// A message for a core (an answer to its request, or a tell).
    Mesh {
        /// The destination.
        to: Address,
        /// The message.
        message: CoreMsg,
    },
}

#[derive(Debug)]
struct Parked {
    waits: Waits,
    release: Release,
}

/// The replies and deliveries of one core that wait for commits.
#[derive(Debug, Default)]
pub struct Durability {
    parked: Vec<Parked>,
    /// Devices whose mailboxes got envelopes since the last delivery pass, with the last
    /// record appended for each (durable first, then delivered).
    dirty: HashMap<(UserId, DeviceId), (u32, u64)>,
}

impl Durability {
    /// Parks `release` until `waits` are durable.
    pub fn park(&mut self, waits: Waits, release: Release) {
        tracing::debug!(?waits, "reply waits for durability");
        self.parked.push(Parked { waits, release });
    }

    /// `device` got an envelope in record `seq` of `shard`.
    pub fn mark_dirty(&mut self, device: (UserId, DeviceId), shard: u32, seq: u64) {
        self.dirty.insert(device, (shard, seq));
    }

    /// Drops the replies parked for `conn` (it closed).
    pub fn forget_conn(&mut self, conn: ConnId) {
        self.parked.retain(|p| !matches!(p.release, Release::Frame { conn: c, .. } if c == conn));
    }

    /// Replies parked (for the metrics and tests).
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// After a commit, with every shard's durable sequence number: the releases whose
    /// waits are all durable, and the dirty devices whose envelopes are.
    pub fn take_released(&mut self, durable: &[u64]) -> (Vec<Release>, Vec<(UserId, DeviceId)>) {
        let is_durable =
            |shard: u32, seq: u64| durable.get(shard as usize).is_some_and(|d| *d >= seq);
        let mut released = Vec::new();
        let mut still = Vec::new();
        for parked in std::mem::take(&mut self.parked) {
            if parked.waits.iter().all(|(shard, seq)| is_durable(*shard, *seq)) {
                released.push(parked.release);
            } else {
                still.push(parked);
            }
        }
        self.parked = still;
        let mut ready = Vec::new();
        self.dirty.retain(|device, (shard, seq)| {
            let durable_now = is_durable(*shard, *seq);
            if durable_now {
                ready.push(*device);
            }
            !durable_now
        });
        (released, ready)
    }
}
