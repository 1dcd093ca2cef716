//! The send dedup window: which (sender user, sender device, client message id) keys the
//! shard has accepted lately, and the server message id each got.
//!
//! A client that lost the ack of a send retries it with the same client message id; the
//! shard must answer with the original server id instead of storing the message twice,
//! also after a crash. Keys enter when an envelope is indexed (live or at replay) or a
//! send is noted, and leave oldest first once they are older than the window or the
//! window is full, so memory is bounded whatever the send rate.

use std::collections::VecDeque;

use tern_wire::messages::{DeviceId, UserId};
use tern_wire::EnvelopeRef;

use super::config::ShardConfig;
use super::loc::HashMap;

/// Set in the device id of a dedup key noted by `Shard::note_send` (device ids are
/// small), so it never matches a stored envelope's key; kept as such in checkpoints.
const NOTED_SEND: DeviceId = 1 << 31;

/// A remembered send's key: sender user, sender device, client message id.
pub(crate) type SendKey = (UserId, DeviceId, u64);

/// The dedup window of one shard.
#[derive(Debug)]
pub(crate) struct Dedup {
    /// Server message id and acceptance time per key.
    sends: HashMap<SendKey, (u64, u64)>,
    /// Keys by acceptance time, oldest first (the eviction order).
    order: VecDeque<(u64, SendKey)>,
    window_ms: u64,
    entries_max: usize,
}

impl Dedup {
    /// An empty window with the config's bounds.
    pub(crate) fn new(config: &ShardConfig) -> Dedup {
        Dedup {
            sends: HashMap::default(),
            order: VecDeque::new(),
            window_ms: config.dedup_window_ms,
            entries_max: config.dedup_entries_max,
        }
    }

    /// A window holding `sends` as a checkpoint kept them: (key, server id, time), in any
    /// order. They are entered oldest first, as they were, without eviction.
    pub(crate) fn restore(config: &ShardConfig, mut sends: Vec<(SendKey, u64, u64)>) -> Dedup {
        let mut dedup = Dedup::new(config);
        sends.sort_by_key(|(_, _, time_ms)| *time_ms);
        for (key, server_message_id, time_ms) in sends {
            dedup.sends.insert(key, (server_message_id, time_ms));
            dedup.order.push_back((time_ms, key));
        }
        dedup
    }

    /// Every remembered send: key, server message id, time (for checkpoints).
    pub(crate) fn sends(&self) -> impl Iterator<Item = (SendKey, u64, u64)> + '_ {
        self.sends
            .iter()
            .map(|(key, &(server_message_id, time_ms))| (*key, server_message_id, time_ms))
    }

    /// The server message id of an earlier stored send with this key.
    pub(crate) fn lookup(&self, key: SendKey) -> Option<u64> {
        self.sends.get(&key).map(|(id, _)| *id)
    }

    /// The server message id of a send noted with this key (see [`Dedup::remember_noted`]).
    pub(crate) fn lookup_noted(&self, (user, device, client_message_id): SendKey) -> Option<u64> {
        self.lookup((user, device | NOTED_SEND, client_message_id))
    }

    /// Enters the key of an envelope stored in this shard.
    pub(crate) fn remember_envelope(&mut self, envelope: &EnvelopeRef<'_>) {
        if envelope.client_message_id == 0 {
            return; // Server-generated envelopes have no client id.
        }
        let key = (envelope.sender_user, envelope.sender_device, envelope.client_message_id);
        self.remember(key, envelope.server_message_id, envelope.server_time_ms);
    }

    /// Enters the key of a send whose envelopes live in other shards, apart from the keys
    /// of envelopes stored here (the shard may also hold some recipients' copies).
    pub(crate) fn remember_noted(
        &mut self,
        (user, device, client_message_id): SendKey,
        server_message_id: u64,
        time_ms: u64,
    ) {
        self.remember((user, device | NOTED_SEND, client_message_id), server_message_id, time_ms);
    }

    /// Enters a key (the first acceptance wins) and evicts what fell out of the window.
    fn remember(&mut self, key: SendKey, server_message_id: u64, time_ms: u64) {
        if self.sends.contains_key(&key) {
            return;
        }
        self.sends.insert(key, (server_message_id, time_ms));
        self.order.push_back((time_ms, key));
        let horizon = time_ms.saturating_sub(self.window_ms);
        while let Some(&(time_ms, old)) = self.order.front() {
            if time_ms >= horizon && self.order.len() <= self.entries_max {
                break;
            }
            self.order.pop_front();
            self.sends.remove(&old);
        }
    }
}
