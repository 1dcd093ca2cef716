//! The shards a core owns, and the questions every subsystem asks of them.
//!
//! A core holds a handle to each shard it owns (shard `s` belongs to core `s % cores`)
//! and `None` for the others. The state of a user lives in its home shard's tables, so
//! "does this user exist", "which devices does it have", "did it block that user" are
//! answered here, for users homed on this core only; a subsystem that needs another
//! core's user asks that core over the mesh. Also here: which of this core's records
//! are durable (what a parked reply waits for).

use tern_engine::{AccountRecord, ShardHandle, Storage, WriteError};
use tern_wire::messages::{DeviceId, UserId};

use crate::routing::{home_shard_of_user, Address, Placement};

/// (shard, record sequence number) pairs a reply waits for: all durable, it may go.
pub type Waits = Vec<(u32, u64)>;

/// The shards of one core.
pub struct Shards<S: Storage> {
    placement: Placement,
    /// Every shard by id; `None` where another core owns it.
    handles: Vec<Option<ShardHandle<S>>>,
}

impl<S: Storage> Shards<S> {
    /// A core at `placement` over `handles` (index = shard id).
    pub fn new(placement: Placement, handles: Vec<Option<ShardHandle<S>>>) -> Shards<S> {
        Shards { placement, handles }
    }

    /// Where this core sits.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// How many shards the server has.
    pub fn count(&self) -> u32 {
        self.handles.len() as u32
    }

    /// A shard this core owns.
    pub fn local(&self, shard_id: u32) -> Option<&ShardHandle<S>> {
        self.handles.get(shard_id as usize)?.as_ref()
    }

    /// The home shard of `user` if this core owns it.
    pub fn home_of(&self, user: UserId) -> Option<&ShardHandle<S>> {
        self.local(home_shard_of_user(user))
    }

    /// Whether `shard_id` exists at all (ids from the network are checked first).
    pub fn exists(&self, shard_id: u32) -> bool {
        shard_id < self.count()
    }

    /// The core that owns `shard_id`, as a mesh address.
    pub fn address_of(&self, shard_id: u32) -> Address {
        self.placement.address_of_shard(shard_id)
    }

    /// The shards this core owns, with their ids.
    pub fn owned(&self) -> Vec<(u32, ShardHandle<S>)> {
        let owned = self.handles.iter().enumerate();
        owned.filter_map(|(id, s)| Some((id as u32, s.clone()?))).collect()
    }

    /// Whether any owned shard has records someone waits for (a mailbox `Ack` alone
    /// waits for the next commit, or the runtime's lazy flush).
    pub fn has_pending_writes(&self) -> bool {
        self.handles.iter().flatten().any(|s| s.borrow().needs_commit())
    }

    /// The durable sequence number of every shard (0 for those of other cores).
    pub fn durable_seqs(&self) -> Vec<u64> {
        self.handles.iter().map(|s| s.as_ref().map_or(0, |s| s.borrow().durable_seq())).collect()
    }

    /// Whether every wait is durable already.
    pub fn all_durable(&self, waits: &[(u32, u64)]) -> bool {
        waits.iter().all(|(shard, seq)| {
            self.local(*shard).is_some_and(|s| s.borrow().durable_seq() >= *seq)
        })
    }

    /// Reads `user`'s account (homed here) through `read`.
    pub fn with_account<T>(
        &self,
        user: UserId,
        read: impl FnOnce(&AccountRecord) -> T,
    ) -> Option<T> {
        let shard = self.home_of(user)?.borrow();
        shard.state().account(user).map(read)
    }

    /// The devices of a user homed on this core; `None` if there is no such account.
    pub fn devices_of(&self, user: UserId) -> Option<Vec<(UserId, DeviceId)>> {
        self.with_account(user, |a| a.devices.iter().map(|d| (user, d.device_id)).collect())
    }

    /// Whether `owner` (homed here) blocked `other`: their 1:1 messages, typing and
    /// presence stop (shared groups are not affected).
    pub fn blocked_by(&self, owner: UserId, other: UserId) -> bool {
        self.with_account(owner, |a| a.blocked.contains(&other)).unwrap_or(false)
    }

    /// Whether `user` (homed here) turned read receipts off.
    pub fn read_receipts_off(&self, user: UserId) -> bool {
        self.with_account(user, |a| !a.privacy.read_receipts).unwrap_or(false)
    }

    /// The Ed25519 signing key of a device homed here.
    pub fn signing_key(&self, user: UserId, device: DeviceId) -> Option<[u8; 32]> {
        let shard = self.home_of(user)?.borrow();
        shard.state().device(user, device).map(|d| d.signing_key)
    }

    /// Applies a state change to `user`'s home shard (homed here); returns its wait.
    pub fn apply_for(
        &self,
        user: UserId,
        op: tern_engine::StateOp,
    ) -> Option<Result<(u32, u64), WriteError>> {
        let shard_id = home_shard_of_user(user);
        let shard = self.local(shard_id)?;
        let applied = shard.borrow_mut().apply_state(op);
        Some(applied.map(|seq| (shard_id, seq)))
    }
}
