//! Tern's control plane: which nodes are alive and which node owns each shard, kept in
//! etcd.
//!
//! Consensus is not Tern's to write. Node liveness is an etcd lease per node, the shard
//! map is a key per shard changed only by compare-and-swap, and one node at a time (the
//! controller, elected through etcd's election API) assigns shards. Everything here runs
//! on one control thread per node, outside the glommio executors: a core never talks to
//! etcd, it receives immutable snapshots of the map ([`ClusterMap`]) over a channel.
//!
//! - `keys.rs`: the key layout under `/tern/<cluster>/` (documented in `ARCHITECTURE.md`,
//!   "Cluster control plane").
//! - `map.rs`: the map as a node sees it, rebuilt from the keys.
//! - `placement.rs`: the controller's pure decision: which node gets each unowned shard.
//! - `certs.rs`: development certificates for the node mesh (`ternctl cluster init`).
//! - `control.rs`: the control thread: join, lease keep-alive, watch, election and the
//!   controller's compare-and-swap writes.
//!
//! What this does not do yet (issue 22): move an owned shard (a move streams its data
//! first), and tell the cores to serve or refuse shards by the map.

pub mod certs;
mod control;
mod keys;
mod map;
mod placement;

pub use control::{read_map, ClusterError, ControlPlane, JoinConfig};
pub use keys::Keys;
pub use map::{ClusterConfig, ClusterMap, Listeners, NodeInfo, ShardOwner};
pub use placement::assign_unowned;
