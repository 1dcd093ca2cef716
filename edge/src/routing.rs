//! Where things live: the one place that maps users, phone numbers, groups, blobs and
//! linking codes to their home shard, shards to cores, and cores to mesh addresses.
//!
//! Everything that routes goes through these functions (STYLE.md: "route through one
//! function"), so that the cluster can later put a node in front of the core without
//! touching the callers. Pure functions over ids: stable across builds and machines.

use std::sync::Arc;

use tern_cluster::{ClusterMap, NodeInfo};
use tern_wire::messages::{GroupId, MediaId, UserId};

/// A node of the cluster (0: this process; a single node has only 0).
pub type NodeId = u32;

/// Where a core sits: `(node, core)`. The mesh is addressed by it, so that messages to
/// another machine's core need a transport, not a new protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address {
    /// The node (0: this process).
    pub node: NodeId,
    /// The core on that node.
    pub core: u32,
}

impl Address {
    /// Core `core` of this process.
    pub fn local(core: u32) -> Address {
        Address { node: 0, core }
    }
}

/// Where this core sits among the server's cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// This core's index.
    pub index: u32,
    /// How many cores serve.
    pub count: u32,
}

impl Placement {
    /// The core that owns `shard_id`.
    pub fn core_of_shard(&self, shard_id: u32) -> u32 {
        shard_id % self.count
    }

    /// The mesh address of the core that owns `shard_id`.
    pub fn address_of_shard(&self, shard_id: u32) -> Address {
        Address::local(self.core_of_shard(shard_id))
    }

    /// This core's mesh address.
    pub fn here(&self) -> Address {
        Address::local(self.index)
    }

    /// Every other core of this node.
    pub fn others(&self) -> impl Iterator<Item = Address> + '_ {
        (0..self.count).filter(|c| *c != self.index).map(Address::local)
    }
}

/// Which node owns each shard, as this core last heard it from the control thread
/// (`tern_cluster::ControlPlane`, through `runtime::tasks::follow_cluster`). A single
/// node owns every shard.
#[derive(Clone, Debug, Default)]
pub enum Homes {
    /// `ternd` without `--cluster`.
    #[default]
    Single,
    /// A node of a cluster.
    Cluster {
        /// This node's id.
        node: String,
        /// The latest map: an immutable snapshot, replaced whole on every change.
        map: Arc<ClusterMap>,
    },
}

/// Where a shard lives, for a request that needs it.
#[derive(Debug, PartialEq, Eq)]
pub enum Home<'a> {
    /// On this node.
    Here,
    /// On another live node.
    Node {
        /// Its id.
        id: &'a str,
        /// How it registered.
        info: &'a NodeInfo,
        /// The owner's epoch in the shard map.
        epoch: u64,
    },
    /// On no live node: not placed yet, or its owner's lease lapsed.
    Nowhere,
}

impl Homes {
    /// Whether this node serves `shard` (a single node serves them all).
    pub fn serves(&self, shard: u32) -> bool {
        self.of_shard(shard) == Home::Here
    }

    /// Where `shard` lives.
    pub fn of_shard(&self, shard: u32) -> Home<'_> {
        let Homes::Cluster { node, map } = self else { return Home::Here };
        match map.shards.get(&shard) {
            Some(owner) if owner.node == *node => Home::Here,
            Some(owner) => match map.nodes.get_key_value(&owner.node) {
                Some((id, info)) => Home::Node { id, info, epoch: owner.epoch },
                None => Home::Nowhere,
            },
            None => Home::Nowhere,
        }
    }
}

/// The home shard of a user: its id carries it in the top 16 bits.
pub fn home_shard_of_user(user_id: UserId) -> u32 {
    (user_id >> 48) as u32
}

/// The shard that owns a phone number (and so the account registered with it).
pub fn home_shard_of_phone(phone: &str, shard_count: u32) -> u32 {
    // FNV-1a: stable across builds and machines, which a std hasher is not.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in phone.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(shard_count)) as u32
}

/// The shard that owns a group (ids are random, chosen by the creator).
pub fn home_shard_of_group(group_id: GroupId, shard_count: u32) -> u32 {
    (group_id % u64::from(shard_count)) as u32
}

/// The shard a blob lives on: its id starts with the shard (2 bytes, big-endian).
pub fn home_shard_of_media(media_id: &MediaId) -> u32 {
    u32::from(u16::from_be_bytes([media_id[0], media_id[1]]))
}

/// The core that holds a linking code: codes are drawn until they hash to the core of
/// the connection that asked, so the approving core knows where to go.
pub fn core_of_link_code(code: &str, cores: u32) -> u32 {
    home_shard_of_phone(code, cores)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The phone hash is part of the data directory's meaning (an account lives on the
    /// shard of its number): it must never change between builds.
    #[test]
    fn phone_shards_are_stable() {
        assert_eq!(home_shard_of_phone("+15550001", 8), home_shard_of_phone("+15550001", 8));
        let spread: std::collections::BTreeSet<u32> =
            (0..64).map(|i| home_shard_of_phone(&format!("+1555000{i:02}"), 8)).collect();
        assert_eq!(spread.len(), 8, "64 numbers reach every one of 8 shards");
        assert_eq!(home_shard_of_user(3 << 48 | 77), 3);
        assert_eq!(home_shard_of_media(&[0, 5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]), 5);
    }

    #[test]
    fn a_shard_lives_here_on_a_live_node_or_nowhere() {
        use tern_cluster::{Listeners, ShardOwner};
        assert_eq!(Homes::Single.of_shard(7), Home::Here);
        let mut map = ClusterMap::default();
        let info = NodeInfo { listeners: Listeners::tcp("b:7400"), cores: 2, capacity: 1 };
        map.nodes
            .insert("a".into(), NodeInfo { listeners: Listeners::tcp("a:7400"), ..info.clone() });
        map.nodes.insert("b".into(), info.clone());
        map.shards.insert(0, ShardOwner { node: "a".into(), epoch: 1 });
        map.shards.insert(1, ShardOwner { node: "b".into(), epoch: 3 });
        map.shards.insert(2, ShardOwner { node: "gone".into(), epoch: 1 });
        let homes = Homes::Cluster { node: "a".into(), map: Arc::new(map) };
        assert_eq!(homes.of_shard(0), Home::Here);
        assert_eq!(homes.of_shard(1), Home::Node { id: "b", info: &info, epoch: 3 });
        // Owned by a node whose lease lapsed, or not placed yet: nobody serves it.
        assert_eq!(homes.of_shard(2), Home::Nowhere);
        assert_eq!(homes.of_shard(3), Home::Nowhere);
    }
}
