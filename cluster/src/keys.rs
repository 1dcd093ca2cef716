//! Where the control plane's facts live in etcd. Every key of a cluster is under
//! `/tern/<cluster>/`, so several clusters can share one etcd and `etcdctl get --prefix
//! /tern/<cluster>/` shows one whole cluster.
//!
//! | key | value (JSON) | written by |
//! |---|---|---|
//! | `config` | [`crate::ClusterConfig`] | the first node to join, once |
//! | `nodes/<node id>` | [`crate::NodeInfo`] | the node, under its lease |
//! | `shards/<shard, 5 digits>` | [`crate::ShardOwner`] | the controller, by compare-and-swap |
//! | `controller/<lease>` | the candidate's node id | etcd's election API |

/// The keys of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The keys of the cluster named `cluster`.
    pub fn new(cluster: &str) -> Keys {
        Keys { prefix: format!("/tern/{cluster}/") }
    }

    /// Every key of the cluster.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The cluster's fixed configuration.
    pub fn config(&self) -> String {
        format!("{}config", self.prefix)
    }

    /// One node's key.
    pub fn node(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.prefix)
    }

    /// One shard's key (zero-padded, so that keys sort as shards do).
    pub fn shard(&self, shard: u32) -> String {
        format!("{}shards/{shard:05}", self.prefix)
    }

    /// The controller election's name (its candidates' keys are under it).
    pub fn election(&self) -> String {
        format!("{}controller", self.prefix)
    }

    /// What `key` is, if it is one of this cluster's.
    pub fn parse(&self, key: &[u8]) -> Option<Key> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(self.prefix.as_str())?;
        if rest == "config" {
            return Some(Key::Config);
        }
        if let Some(node) = rest.strip_prefix("nodes/") {
            return Some(Key::Node(node.to_owned()));
        }
        if let Some(shard) = rest.strip_prefix("shards/") {
            return shard.parse().ok().map(Key::Shard);
        }
        rest.starts_with("controller").then_some(Key::Controller)
    }
}

/// One of a cluster's keys, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// `config`.
    Config,
    /// `nodes/<id>`.
    Node(String),
    /// `shards/<n>`.
    Shard(u32),
    /// A candidate of the controller election.
    Controller,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back() {
        let keys = Keys::new("prod");
        assert_eq!(keys.parse(keys.config().as_bytes()), Some(Key::Config));
        assert_eq!(keys.parse(keys.node("n1").as_bytes()), Some(Key::Node("n1".into())));
        assert_eq!(keys.parse(keys.shard(42).as_bytes()), Some(Key::Shard(42)));
        assert_eq!(keys.shard(42), "/tern/prod/shards/00042");
        let candidate = format!("{}/694d7c1b2a", keys.election());
        assert_eq!(keys.parse(candidate.as_bytes()), Some(Key::Controller));
        assert_eq!(Keys::new("other").parse(keys.config().as_bytes()), None);
    }
}
