//! Engine errors: one type per kind of operation, each saying what to do.

use std::fmt;
use std::io;

use crate::record::RecordFault;

/// Opening (recovering) a shard failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum OpenError {
    /// A file operation failed.
    Io {
        /// What the engine was doing.
        during: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A segment holding records newer than the newest checkpoint is missing or has no
    /// valid header: acknowledged data would be lost, so the shard refuses to open.
    SegmentLost {
        /// The segment.
        segment_id: u64,
    },
    /// The data directory is from another shard or an unknown format version.
    WrongShard {
        /// Shard id found in a segment header.
        found: u32,
        /// Shard id expected.
        expected: u32,
    },
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Io { during, source } => write!(f, "I/O error while {during}: {source}"),
            OpenError::SegmentLost { segment_id } => write!(
                f,
                "segment {segment_id} is missing or unreadable but holds records newer than \
                 the last checkpoint; restore it from a backup (see docs/STORAGE.md)"
            ),
            OpenError::WrongShard { found, expected } => write!(
                f,
                "segment belongs to shard {found}, expected {expected}: wrong data directory?"
            ),
        }
    }
}

impl std::error::Error for OpenError {}

/// Appending, committing, acknowledging, checkpointing or reclaiming failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriteError {
    /// An earlier write or sync failed; this shard no longer trusts its files and refuses
    /// writes until it is reopened (which recovers from what is on disk). Never retry a
    /// failed fsync: the kernel may have dropped the dirty pages.
    Poisoned {
        /// The error that poisoned it.
        cause: io::ErrorKind,
    },
    /// The disk is full. Nothing of the failed batch was acknowledged; the shard keeps
    /// it and refuses appends until a commit, once space is freed, writes it.
    StorageFull,
    /// A file operation failed (the shard is now poisoned).
    Io {
        /// What the engine was doing.
        during: &'static str,
        /// The OS error kind.
        kind: io::ErrorKind,
    },
    /// A record larger than a segment can hold.
    RecordTooLarge {
        /// Its size.
        record_bytes: u64,
    },
    /// An envelope must go to at least one mailbox.
    NoRecipients,
}

impl WriteError {
    pub(crate) fn from_io(during: &'static str, error: &io::Error) -> WriteError {
        if is_storage_full(error) {
            WriteError::StorageFull
        } else {
            WriteError::Io { during, kind: error.kind() }
        }
    }
}

/// Whether an I/O error means "no space left".
pub(crate) fn is_storage_full(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::StorageFull || error.raw_os_error() == Some(28)
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Poisoned { cause } => {
                write!(f, "shard refuses writes after an earlier I/O failure ({cause}); reopen it")
            }
            WriteError::StorageFull => {
                write!(f, "disk full: nothing is acknowledged until space is freed")
            }
            WriteError::Io { during, kind } => write!(f, "I/O error while {during}: {kind}"),
            WriteError::RecordTooLarge { record_bytes } => {
                write!(f, "record of {record_bytes} bytes does not fit in a segment")
            }
            WriteError::NoRecipients => write!(f, "an envelope needs at least one mailbox"),
        }
    }
}

impl std::error::Error for WriteError {}

/// A stored record failed its checks: it is not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CorruptRecord {
    /// The mailbox position it held, when it was read through a mailbox.
    pub mailbox_seq: Option<u64>,
    /// Segment id and offset, when known (a record found damaged at recovery, before it
    /// could be indexed, leaves only a gap in the mailbox; see `Shard::quarantined`).
    pub location: Option<(u32, u32)>,
    /// What was wrong.
    pub fault: RecordFault,
}

impl fmt::Display for CorruptRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "corrupt record ({:?})", self.fault)?;
        if let Some((segment_id, offset)) = self.location {
            write!(f, " in segment {segment_id} at offset {offset}")?;
        }
        if let Some(seq) = self.mailbox_seq {
            write!(f, " (mailbox position {seq})")?;
        }
        write!(f, "; it is quarantined and not served; `ternctl verify` lists such records")
    }
}

impl std::error::Error for CorruptRecord {}
