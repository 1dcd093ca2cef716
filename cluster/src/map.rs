//! The cluster as one node sees it at one etcd revision: the configuration, the live
//! nodes, each shard's owner and the controller. Rebuilt from the keys (a full read, then
//! the watch's events) on the control thread, and handed to the cores as an immutable
//! snapshot: a new map per change, never a shared mutable one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::keys::{Key, Keys};

/// What a cluster is created with and keeps for its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Shards, fixed: user and group ids carry their shard, so the count never changes.
    pub shards: u32,
    /// The controller assigns the shards once this many nodes are alive, so that the
    /// first node up does not take them all (a shard moves only with its data).
    pub initial_nodes: u32,
}

/// Where clients reach a node: `host:port` per kind of listener, `""` where it has none.
/// A client redirected to the node connects over the kind it was using.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listeners {
    /// Plain TCP.
    #[serde(default)]
    pub tcp: String,
    /// TLS.
    #[serde(default)]
    pub tls: String,
    /// WebSocket.
    #[serde(default)]
    pub ws: String,
    /// WebSocket over TLS.
    #[serde(default)]
    pub wss: String,
}

impl Listeners {
    /// Only a plain TCP listener at `address`.
    pub fn tcp(address: impl Into<String>) -> Listeners {
        Listeners { tcp: address.into(), ..Listeners::default() }
    }
}

impl std::fmt::Display for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kinds = [("tcp", &self.tcp), ("tls", &self.tls), ("ws", &self.ws), ("wss", &self.wss)];
        let mut first = true;
        for (kind, address) in kinds.into_iter().filter(|(_, a)| !a.is_empty()) {
            write!(f, "{}{kind} {address}", if first { "" } else { ", " })?;
            first = false;
        }
        if first {
            write!(f, "no listeners")?;
        }
        Ok(())
    }
}

/// A live node, as it registered (the key lives as long as its lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Where clients reach it.
    pub listeners: Listeners,
    /// Its cores (executors).
    pub cores: u32,
    /// Its relative weight in placement (1 for a typical node).
    pub capacity: u32,
}

/// A shard's owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardOwner {
    /// The owning node's id.
    pub node: String,
    /// Bumped by every change of owner: work stamped with an older epoch is refused.
    pub epoch: u64,
}

/// The cluster at one etcd revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterMap {
    /// The etcd revision this map reflects.
    pub revision: i64,
    /// The configuration, once the cluster exists.
    pub config: Option<ClusterConfig>,
    /// Live nodes by id.
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Owners of the assigned shards, by shard.
    pub shards: BTreeMap<u32, ShardOwner>,
    /// Each assigned shard's key's last modification (for compare-and-swap).
    pub shard_revisions: BTreeMap<u32, i64>,
    /// Election candidates: key → (creation revision, node id). The earliest leads.
    pub(crate) candidates: BTreeMap<Vec<u8>, (i64, String)>,
}

impl ClusterMap {
    /// The node that currently leads the controller election.
    pub fn controller(&self) -> Option<&str> {
        self.candidates.values().min_by_key(|(created, _)| *created).map(|(_, n)| n.as_str())
    }

    /// The shards `node` owns, in order.
    pub fn owned_by(&self, node: &str) -> Vec<u32> {
        self.shards.iter().filter(|(_, owner)| owner.node == node).map(|(s, _)| *s).collect()
    }

    /// Takes in a key's new value. A value that does not parse is skipped and logged:
    /// one bad key must not blind a node to the rest of the map.
    pub(crate) fn put(&mut self, keys: &Keys, key: &[u8], value: &[u8], revisions: (i64, i64)) {
        let (created, modified) = revisions;
        let Some(parsed) = keys.parse(key) else { return };
        let ok = match parsed {
            Key::Config => serde_json::from_slice(value).map(|c| self.config = Some(c)).is_ok(),
            Key::Node(id) => {
                serde_json::from_slice(value).map(|n| self.nodes.insert(id, n)).is_ok()
            }
            Key::Shard(shard) => serde_json::from_slice(value)
                .map(|owner| {
                    self.shards.insert(shard, owner);
                    self.shard_revisions.insert(shard, modified);
                })
                .is_ok(),
            Key::Controller => {
                let node = String::from_utf8_lossy(value).into_owned();
                self.candidates.insert(key.to_vec(), (created, node));
                true
            }
        };
        if !ok {
            tracing::warn!(key = %String::from_utf8_lossy(key), "unreadable cluster key; skipped");
        }
    }

    /// Forgets a deleted key (a node whose lease expired, a resigned candidate).
    pub(crate) fn delete(&mut self, keys: &Keys, key: &[u8]) {
        match keys.parse(key) {
            Some(Key::Config) => self.config = None,
            Some(Key::Node(id)) => {
                self.nodes.remove(&id);
            }
            Some(Key::Shard(shard)) => {
                self.shards.remove(&shard);
                self.shard_revisions.remove(&shard);
            }
            Some(Key::Controller) => {
                self.candidates.remove(key);
            }
            None => {}
        }
    }
}
