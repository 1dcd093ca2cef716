//! What a shard is told and what it tells: [`ShardConfig`] (its tunables, each limit
//! saying why it is what it is) and [`ShardCounters`] (what an operator reads).
//!
//! A leaf module: every part of the shard reads the config or bumps a counter, and
//! recovery builds the counters before the shard exists.

/// Tunables of a shard. Each limit says why it is what it is.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// The shard's id (also the top 16 bits of its message ids).
    pub shard_id: u32,
    /// Segment file size. 32 MiB: large enough that rotation (a file create and a
    /// directory sync) is rare, small enough that one mostly-dead segment is cheap to
    /// compact and the active segment's in-memory copy stays small.
    pub segment_bytes: u64,
    /// Undelivered envelopes are dropped after this (30 days).
    pub default_ttl_ms: u64,
    /// How long a (sender device, client message id) pair is remembered (24 hours: a
    /// client retries within minutes; a day covers a phone offline overnight).
    pub dedup_window_ms: u64,
    /// At most this many remembered pairs (bounds memory whatever the send rate).
    pub dedup_entries_max: usize,
    /// A sealed segment whose live bytes fall below this percentage of its size is
    /// compacted (live records rewritten at the head).
    pub compact_live_percent_max: u8,
}

impl ShardConfig {
    /// Defaults for shard `shard_id`.
    pub fn new(shard_id: u32) -> ShardConfig {
        ShardConfig {
            shard_id,
            segment_bytes: 32 * 1024 * 1024,
            default_ttl_ms: 30 * 24 * 3600 * 1000,
            dedup_window_ms: 24 * 3600 * 1000,
            dedup_entries_max: 1 << 20,
            compact_live_percent_max: 25,
        }
    }
}

/// Counters an operator reads (exported as metrics by the edge).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardCounters {
    /// Batches written and synced.
    pub commits: u64,
    /// Records in those batches.
    pub committed_records: u64,
    /// Bytes written by commits (with padding).
    pub committed_bytes: u64,
    /// Records found corrupt (at recovery or on read) and quarantined.
    pub corrupt_records: u64,
    /// Torn tails truncated at recovery.
    pub torn_tails: u64,
    /// Segments deleted by space reclaim.
    pub segments_deleted: u64,
    /// Live records rewritten by compaction.
    pub records_compacted: u64,
    /// Mailbox entries dropped because their envelope expired.
    pub expired_entries: u64,
}
