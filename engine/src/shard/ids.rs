//! Server message ids: the shard's allocator and the floor it keeps across restarts.
//!
//! An id is the shard id in the top 16 bits, then milliseconds since 2024 shifted left
//! by 8 (`docs/STORAGE.md`, section 8). Ids must stay strictly increasing per shard, also
//! after a restart, so the allocator remembers the highest id of this shard it has seen:
//! allocated live, replayed from an envelope or a noted send, or read from a checkpoint.

/// Milliseconds of the message-id epoch (2024-01-01T00:00:00Z).
const MESSAGE_ID_EPOCH_MS: u64 = 1_704_067_200_000;

/// The message ids of one shard.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MessageIds {
    shard_id: u32,
    /// The highest id of this shard allocated or seen.
    last: u64,
}

impl MessageIds {
    /// The allocator of shard `shard_id`, with `last` as the highest id so far.
    pub(crate) fn new(shard_id: u32, last: u64) -> MessageIds {
        MessageIds { shard_id, last }
    }

    /// The highest id of this shard allocated or seen (what a checkpoint keeps).
    pub(crate) fn last(&self) -> u64 {
        self.last
    }

    /// Allocates an id, bumped past the last one so ids are unique per shard across
    /// restarts as long as the clock does not run backwards past the last id recovered.
    pub(crate) fn allocate(&mut self, now_ms: u64) -> u64 {
        let time_part = (now_ms.saturating_sub(MESSAGE_ID_EPOCH_MS) << 8) & ((1 << 48) - 1);
        let low = time_part.max((self.last & ((1 << 48) - 1)) + 1);
        self.last = (u64::from(self.shard_id) << 48) | low;
        self.last
    }

    /// Raises the floor to an id found in the log, if it is one of this shard's.
    pub(crate) fn observe(&mut self, server_message_id: u64) {
        if server_message_id >> 48 == u64::from(self.shard_id) {
            self.last = self.last.max(server_message_id);
        }
    }
}
