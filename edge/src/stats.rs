//! What a core counts and the snapshot of it that travels to the admin endpoint's core.
//!
//! Plain owned data and a leaf module: the core fills a [`Counters`] as it works, takes a
//! [`CoreStats`] snapshot once a second (other cores send theirs over the mesh), and
//! `metrics` renders the snapshots. Nothing here does I/O.

use tern_engine::ShardCounters;

use crate::histogram::{Histogram, BATCH_BUCKETS, LATENCY_BUCKETS_S};

/// Counters exported as metrics (each is also in [`CoreStats`]).
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Frames decoded.
    pub frames_in: u64,
    /// Messages accepted (sent ticks given).
    pub messages_sent: u64,
    /// Messages (text, media, control) written to sockets.
    pub messages_delivered: u64,
    /// Receipts written to sockets.
    pub receipts_delivered: u64,
    /// Connections closed for a protocol error.
    pub protocol_errors: u64,
    /// Session requests sent to another node of the cluster (`Redirect`).
    pub redirects: u64,
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
    /// Times a connection's reading was paced for drawing refusals past its budget.
    pub connections_paced: u64,
    /// Connections accepted by this core's listeners (not those handed over to it).
    pub connections_accepted: u64,
    /// Connections that failed: a TLS or WebSocket handshake error or an auth deadline
    /// missed before authenticating, a bad token, a protocol error, or a refusal at the
    /// connection limit. Each connection counts once.
    pub connections_failed: u64,
}

/// A snapshot of one core's metrics.
#[derive(Clone, Debug)]
pub struct CoreStats {
    /// Which core.
    pub core: u32,
    /// Open client connections.
    pub connections: u64,
    /// Bytes queued for client sockets.
    pub outbound_bytes: u64,
    /// What the core counted.
    pub counters: Counters,
    /// Disk use of this core's shards (and, on core 0, of the file system).
    pub disk: DiskUsage,
    /// The counters of each shard this core owns, by shard id.
    pub shards: Vec<(u32, ShardCounters)>,
    /// Shards of this core that refuse writes since an I/O error, with the error.
    pub failed_shards: Vec<(u32, String)>,
    /// Latencies, stage by stage, and commit batch sizes.
    pub histograms: Histograms,
}

/// Latency and batch histograms: the whole path of a message, and its stages, so a tail
/// can be traced to the stage that makes it (`docs/OPERATIONS.md`, "Where a message's
/// time goes").
#[derive(Clone, Debug)]
pub struct Histograms {
    /// Send → sent tick (durable), seconds.
    pub send_to_sent: Histogram,
    /// Send → written to the recipient's connection, seconds (ms resolution).
    pub send_to_deliver: Histogram,
    /// Records per group commit.
    pub commit_batch_records: Histogram,
    /// The first record asking for a commit round → the round's start, seconds (the
    /// committer's wake-up; a record appended during a round waits for it to end, then
    /// goes in the next).
    pub commit_wait: Histogram,
    /// One shard's commit: its write and fdatasync, seconds.
    pub commit: Histogram,
}

impl Histograms {
    /// Empty histograms.
    pub fn new() -> Histograms {
        Histograms {
            send_to_sent: Histogram::new(LATENCY_BUCKETS_S),
            send_to_deliver: Histogram::new(LATENCY_BUCKETS_S),
            commit_batch_records: Histogram::new(BATCH_BUCKETS),
            commit_wait: Histogram::new(LATENCY_BUCKETS_S),
            commit: Histogram::new(LATENCY_BUCKETS_S),
        }
    }
}

impl Default for Histograms {
    fn default() -> Histograms {
        Histograms::new()
    }
}

/// Disk use as the runtime measured it (the core itself does no I/O).
#[derive(Clone, Debug, Default)]
pub struct DiskUsage {
    /// Bytes allocated to each owned shard's files (segments, which are preallocated,
    /// and checkpoints), by shard id.
    pub shard_allocated_bytes: Vec<(u32, u64)>,
    /// The data directory's file system (`None` if statvfs failed).
    pub file_system: Option<FileSystemSpace>,
}

/// Space on the data directory's file system (statvfs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileSystemSpace {
    /// Bytes available to the server (`f_bavail`: what an unprivileged writer can use).
    pub free_bytes: u64,
    /// Bytes in all (`f_blocks`).
    pub size_bytes: u64,
}
