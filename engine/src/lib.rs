//! `tern-engine`: Tern's embedded store. Per shard: an append-only log of numbered
//! segment files, a mailbox index keyed by recipient device, state tables, group
//! commit, checkpoints, recovery and space reclaim. `docs/STORAGE.md` specifies the files
//! to the byte and argues crash safety case by case.
//!
//! A shard belongs to one core: its state is plain owned data behind an `Rc<RefCell>`,
//! nothing is `Send`, and there is no lock. I/O goes through the [`storage::Storage`]
//! seam: glommio DMA files (io_uring) in the server ([`uring`]), `std::fs` for tools and
//! tests, and a simulated disk that models power cuts and failing operations.
//!
//! The record is the frame: an envelope is archived once (`tern_wire::EnvelopeRef`),
//! appended inside an envelope record, and read back as the same bytes, which the edge
//! frames with `tern_wire::encode_deliver`.

#![deny(unsafe_code)] // mmap needs it, once, in `storage::map_file` (with its SAFETY note).

pub mod blobs;
pub mod body;
mod error;
mod handle;
pub mod manifest;
pub mod prefetch;
pub mod record;
mod shard;
pub mod state;
pub mod storage;
pub mod uring;

pub use body::{
    AccountRecord, DeviceRecord, GroupRecord, MediaRecord, ProfileRecord, RegistrationFailures,
    ReportRecord, StateOp,
};
pub use error::{CorruptRecord, OpenError, WriteError};
pub use handle::ShardHandle;
pub use manifest::{DataDir, DataDirLock, Manifest, ManifestError};
pub use shard::checkpoint;
pub use shard::config::{ShardConfig, ShardCounters};
pub use shard::durable::Durable;
pub use shard::index::{MailboxEntry, MailboxRead, SenderShare};
pub use shard::loc::{DeviceAddr, Loc};
pub use shard::segments::SegmentStats;
pub use shard::{Appended, Shard};
pub use storage::{PowerCut, ReadOnlyStorage, SimStorage, StdStorage, Storage, StorageFile};
