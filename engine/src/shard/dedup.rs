//! The send dedup window: which (sender user, sender device, client message id) keys the
//! shard has accepted lately, and the server message id each got.
//!
//! A client that lost the ack of a send retries it with the same client message id; the
//! shard must answer with the original server id instead of storing the message twice,
//! also after a crash. Keys enter when an envelope is indexed (live or at replay) or a
//! send is noted, and leave oldest first once they are older than the window or the
//! window is full, so memory is bounded whatever the send rate.

use std::collections::VecDeque;
use std::hash::BuildHasher as _;

use hashbrown::HashTable;
use tern_wire::messages::{DeviceId, UserId};
use tern_wire::EnvelopeRef;

use super::config::ShardConfig;

/// Set in the device id of a dedup key noted by `Shard::note_send` (device ids are
/// small), so it never matches a stored envelope's key; kept as such in checkpoints.
const NOTED_SEND: DeviceId = 1 << 31;

/// A remembered send's key: sender user, sender device, client message id.
pub(crate) type SendKey = (UserId, DeviceId, u64);

/// One remembered send.
#[derive(Debug, Clone, Copy)]
struct Remembered {
    key: SendKey,
    server_message_id: u64,
    time_ms: u64,
}

/// The dedup window of one shard.
///
/// Laid out for its size, as a full window holds a million keys (40 bytes each in
/// `entries`, about 5 in `index`, against about 120 for a map of keys beside a queue of
/// them): the sends in acceptance order, which is also the eviction order, and a hash
/// table of their positions. A position counts every send ever entered, modulo 2^32
/// (`entries_max` stays far below that), so evicting from the front moves no other.
#[derive(Debug)]
pub(crate) struct Dedup {
    /// Remembered sends, oldest first.
    entries: VecDeque<Remembered>,
    /// The position of `entries[0]`.
    front: u32,
    /// Positions of the entries, by their key's hash.
    index: HashTable<u32>,
    /// Randomly seeded per process: keys are partly client-chosen.
    hasher: foldhash::fast::RandomState,
    window_ms: u64,
    entries_max: usize,
}

impl Dedup {
    /// An empty window with the config's bounds.
    pub(crate) fn new(config: &ShardConfig) -> Dedup {
        Dedup {
            entries: VecDeque::new(),
            front: 0,
            index: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
            window_ms: config.dedup_window_ms,
            entries_max: config.dedup_entries_max,
        }
    }

    /// A window holding `sends` as a checkpoint kept them: (key, server id, time), in any
    /// order. They are entered oldest first, as they were, without eviction.
    pub(crate) fn restore(config: &ShardConfig, mut sends: Vec<(SendKey, u64, u64)>) -> Dedup {
        let mut dedup = Dedup::new(config);
        sends.sort_by_key(|(_, _, time_ms)| *time_ms);
        dedup.entries.reserve_exact(sends.len());
        dedup.index.reserve(sends.len(), |_| 0);
        for (key, server_message_id, time_ms) in sends {
            dedup.enter(Remembered { key, server_message_id, time_ms });
        }
        dedup
    }

    /// Every remembered send: key, server message id, time (for checkpoints).
    pub(crate) fn sends(&self) -> impl Iterator<Item = (SendKey, u64, u64)> + '_ {
        self.entries.iter().map(|e| (e.key, e.server_message_id, e.time_ms))
    }

    /// The server message id of an earlier stored send with this key.
    pub(crate) fn lookup(&self, key: SendKey) -> Option<u64> {
        self.find(key).map(|e| e.server_message_id)
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
        let hash = self.hasher.hash_one(key);
        if self.find_hashed(hash, key).is_some() {
            return;
        }
        self.enter_hashed(hash, Remembered { key, server_message_id, time_ms });
        let horizon = time_ms.saturating_sub(self.window_ms);
        while let Some(oldest) = self.entries.front() {
            if oldest.time_ms >= horizon && self.entries.len() <= self.entries_max {
                break;
            }
            self.evict_oldest();
        }
    }

    /// The entry with this key, if remembered.
    fn find(&self, key: SendKey) -> Option<&Remembered> {
        self.find_hashed(self.hasher.hash_one(key), key)
    }

    fn find_hashed(&self, hash: u64, key: SendKey) -> Option<&Remembered> {
        let (entries, front) = (&self.entries, self.front);
        let position = self.index.find(hash, |&p| entries[offset(front, p)].key == key)?;
        Some(&entries[offset(front, *position)])
    }

    /// Appends an entry whose key is not remembered.
    fn enter(&mut self, entry: Remembered) {
        self.enter_hashed(self.hasher.hash_one(entry.key), entry);
    }

    fn enter_hashed(&mut self, hash: u64, entry: Remembered) {
        let position = self.front.wrapping_add(self.entries.len() as u32);
        self.entries.push_back(entry);
        let (entries, front, hasher) = (&self.entries, self.front, &self.hasher);
        let rehash = |&p: &u32| hasher.hash_one(entries[offset(front, p)].key);
        self.index.insert_unique(hash, position, rehash);
    }

    /// Forgets the oldest entry.
    fn evict_oldest(&mut self) {
        let Some(oldest) = self.entries.front() else { return };
        let (hash, front) = (self.hasher.hash_one(oldest.key), self.front);
        if let Ok(found) = self.index.find_entry(hash, |&p| p == front) {
            found.remove();
        }
        self.entries.pop_front();
        self.front = self.front.wrapping_add(1);
    }
}

/// Where the entry at `position` sits in the entries starting at position `front`.
fn offset(front: u32, position: u32) -> usize {
    position.wrapping_sub(front) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(window_ms: u64, entries_max: usize) -> Dedup {
        let mut config = ShardConfig::new(0);
        (config.dedup_window_ms, config.dedup_entries_max) = (window_ms, entries_max);
        Dedup::new(&config)
    }

    #[test]
    fn the_first_acceptance_wins_and_the_oldest_leave_first() {
        let mut dedup = window(1_000, 3);
        dedup.remember((1, 1, 7), 100, 10);
        dedup.remember((1, 1, 7), 101, 11); // A retry: the first id stays.
        assert_eq!(dedup.lookup((1, 1, 7)), Some(100));
        for cmid in 8..=10 {
            dedup.remember((1, 1, cmid), 100 + cmid, 12);
        }
        // Four keys in a window of three: the oldest left.
        assert_eq!(dedup.lookup((1, 1, 7)), None);
        assert_eq!(dedup.lookup((1, 1, 8)), Some(108));
        assert_eq!(dedup.lookup((1, 1, 10)), Some(110));
        // Past the window's time, everything older than the horizon leaves.
        dedup.remember((2, 1, 1), 200, 1_013);
        assert_eq!(dedup.lookup((1, 1, 10)), None);
        assert_eq!(dedup.sends().map(|(key, ..)| key).collect::<Vec<_>>(), vec![(2, 1, 1)]);
    }

    #[test]
    fn noted_sends_and_stored_envelopes_are_told_apart() {
        let mut dedup = window(1_000, 10);
        dedup.remember_noted((1, 2, 3), 50, 1);
        assert_eq!(dedup.lookup((1, 2, 3)), None);
        assert_eq!(dedup.lookup_noted((1, 2, 3)), Some(50));
    }

    #[test]
    fn positions_wrap_around_without_losing_a_key() {
        let mut dedup = window(u64::MAX, 4);
        dedup.front = u32::MAX - 5; // As after four billion sends.
        for cmid in 0..20u64 {
            dedup.remember((9, 1, cmid), 1_000 + cmid, cmid);
            for kept in cmid.saturating_sub(3)..=cmid {
                assert_eq!(dedup.lookup((9, 1, kept)), Some(1_000 + kept), "{cmid}: {kept}");
            }
            assert_eq!(dedup.index.len(), dedup.entries.len());
        }
        let restored = Dedup::restore(&ShardConfig::new(0), dedup.sends().collect());
        assert_eq!(restored.lookup((9, 1, 19)), Some(1_019));
        assert_eq!(restored.lookup((9, 1, 15)), None);
    }
}
