//! Where things are: [`Loc`] (a record's place in the log) and [`DeviceAddr`] (a
//! mailbox's owner), with the bound on mailbox sequence numbers.
//!
//! Every part of a shard speaks in these terms (the log hands out locations, the index
//! stores them, checkpoints write them), so they live in this leaf module that depends on
//! no other part: that keeps the module graph acyclic.

use tern_wire::messages::{DeviceId, UserId};

/// Hash maps keyed partly by client-chosen ids: foldhash is fast and randomly seeded
/// per process, so a client cannot aim for collisions.
pub(crate) type HashMap<K, V> = foldhash::HashMap<K, V>;

/// A device's mailbox address.
pub type DeviceAddr = (UserId, DeviceId);

/// Where a record is: segment id and offset of its header. Ordered by log position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Loc {
    /// The segment (ids fit 32 bits: 4 billion segments).
    pub segment_id: u32,
    /// Offset of the record header in the segment.
    pub offset: u32,
}

impl Loc {
    /// A mailbox entry whose record was lost to corruption before a checkpoint covered
    /// it; reads skip it and count it.
    pub const LOST: Loc = Loc { segment_id: u32::MAX, offset: u32::MAX };
    /// A mailbox entry removed before delivery (deleted for everyone); reads skip it
    /// silently.
    pub const REMOVED: Loc = Loc { segment_id: u32::MAX, offset: u32::MAX - 1 };

    /// Whether this entry stands for a record (rather than a lost or removed one).
    pub(crate) fn is_record(self) -> bool {
        self != Loc::LOST && self != Loc::REMOVED
    }
}

/// Mailbox sequence numbers count a device's envelopes from 0, so a real one stays far
/// below 2^62 (a million a second for 140,000 years). A stored one at or above it is
/// corrupt: sequence arithmetic (`head + entries`, `seq + 1`) must never overflow.
pub(crate) const MAILBOX_SEQ_MAX: u64 = 1 << 62;
