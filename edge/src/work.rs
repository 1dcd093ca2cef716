//! Work the core hands off: blob file I/O and CPU-heavy checks.
//!
//! A core's thread serves thousands of connections; a 100 MiB media commit, an Argon2id
//! PIN hash or a hundred prekey signatures on it would stall all of them. So the core
//! emits a [`WorkOrder`] as an effect, the runtime runs it in a bounded blocking pool
//! (the simulation runs it in its own time), and the result comes back as a
//! [`WorkDone`] through `Core::handle_work_done`. Like the mesh's calls, each job type
//! names its result type ([`works!`]), and the core keeps its continuations per job
//! type, so a result cannot meet the wrong continuation.
//!
//! [`run`] does the CPU jobs (pure functions); blob jobs go to a
//! [`tern_engine::blobs::BlobStore`].

use tern_engine::blobs::{BlobDone, BlobError, BlobOp, BlobStore};
use tern_wire::messages::{DeviceKeys, SignedPrekey};

use crate::secrets;

/// A job whose result has one type.
pub trait Job: Sized {
    /// What running it gives.
    type Output;
    /// The order for the runtime.
    fn into_order(self, token: u64) -> WorkOrder;
}

/// Declares the jobs: `Variant(JobType) -> Output;` per line.
macro_rules! works {
    ($( $(#[$meta:meta])* $variant:ident($job:ident) -> $output:ty; )*) => {
        /// One job for the pool, with the core's token.
        #[derive(Debug)]
        pub enum WorkOrder {
            $( $(#[$meta])* $variant(u64, $job), )*
        }

        /// A job's result, with its token.
        #[derive(Debug)]
        pub enum WorkDone {
            $( $(#[$meta])* $variant(u64, $output), )*
        }

        $(
            impl Job for $job {
                type Output = $output;
                fn into_order(self, token: u64) -> WorkOrder {
                    WorkOrder::$variant(token, self)
                }
            }
        )*
    };
}

works! {
    /// A media file operation.
    Blob(BlobJob) -> Result<BlobDone, BlobError>;
    /// A new device's prekey signatures (registration, linking).
    CheckDeviceKeys(CheckDeviceKeys) -> Result<(), &'static str>;
    /// Uploaded prekeys' signatures.
    CheckPrekeys(CheckPrekeys) -> bool;
    /// A registration-lock PIN to hash (Argon2id).
    HashPin(HashPin) -> Vec<u8>;
    /// A registration-lock PIN to check against its hash (Argon2id).
    CheckPin(CheckPin) -> bool;
}

/// A blob operation.
#[derive(Debug)]
pub struct BlobJob(pub BlobOp);

/// A device's keys to check.
#[derive(Debug)]
pub struct CheckDeviceKeys(pub DeviceKeys);

/// Prekeys to check against a device's signing key.
#[derive(Debug)]
pub struct CheckPrekeys {
    /// The device's Ed25519 key.
    pub signing_key: [u8; 32],
    /// The keys.
    pub prekeys: Vec<SignedPrekey>,
}

/// A PIN to hash with a salt the core drew.
#[derive(Debug)]
pub struct HashPin {
    /// The PIN.
    pub pin: String,
    /// 16 random bytes.
    pub salt: [u8; 16],
}

/// A PIN to check.
#[derive(Debug)]
pub struct CheckPin {
    /// The PIN given.
    pub pin: String,
    /// The stored hash.
    pub hash: Vec<u8>,
}

/// Runs `order` to completion (blocking: off the core's thread).
pub fn run(order: WorkOrder, blobs: &mut dyn BlobStore) -> WorkDone {
    match order {
        WorkOrder::Blob(token, BlobJob(op)) => WorkDone::Blob(token, blobs.run(op)),
        WorkOrder::CheckDeviceKeys(token, CheckDeviceKeys(keys)) => {
            WorkDone::CheckDeviceKeys(token, secrets::check_device_keys(&keys))
        }
        WorkOrder::CheckPrekeys(token, job) => {
            let valid = secrets::check_prekeys(&job.signing_key, &job.prekeys).is_ok();
            WorkDone::CheckPrekeys(token, valid)
        }
        WorkOrder::HashPin(token, job) => {
            WorkDone::HashPin(token, secrets::hash_pin(&job.pin, &job.salt))
        }
        WorkOrder::CheckPin(token, job) => {
            WorkDone::CheckPin(token, secrets::pin_matches(&job.pin, &job.hash))
        }
    }
}

impl WorkOrder {
    /// Whether this is blob I/O (the runtime runs blob jobs of one core in order).
    pub fn is_blob(&self) -> bool {
        matches!(self, WorkOrder::Blob(..))
    }
}
