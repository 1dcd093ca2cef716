//! The controller's decision, pure: which live node gets each shard that has no owner.
//!
//! Only unowned shards are placed. Moving an owned shard means moving its data first
//! (issue 22, "moving shards while traffic runs"), so a shard's owner changes only by a
//! move, never by this function. Placement waits for the cluster's `initial_nodes`, so
//! that the first node to come up does not take every shard.

use std::collections::BTreeMap;

use crate::map::ClusterMap;

/// `(shard, node)` for every unowned shard, each to the live node with the fewest
/// shards per unit of capacity (ties to the smallest node id, so every controller
/// decides alike). Empty until the cluster has a configuration and `initial_nodes` live
/// nodes.
pub fn assign_unowned(map: &ClusterMap) -> Vec<(u32, String)> {
    let Some(config) = map.config else { return Vec::new() };
    if map.nodes.is_empty() || (map.nodes.len() as u32) < config.initial_nodes {
        return Vec::new();
    }
    let mut load: BTreeMap<&str, u64> = map.nodes.keys().map(|n| (n.as_str(), 0)).collect();
    for owner in map.shards.values() {
        if let Some(count) = load.get_mut(owner.node.as_str()) {
            *count += 1;
        }
    }
    let mut assignments = Vec::new();
    for shard in (0..config.shards).filter(|s| !map.shards.contains_key(s)) {
        // Least loaded per capacity: compare count_a / cap_a with count_b / cap_b.
        let node = map
            .nodes
            .iter()
            .min_by(|(a, info_a), (b, info_b)| {
                let (ca, cb) =
                    (u64::from(info_a.capacity.max(1)), u64::from(info_b.capacity.max(1)));
                (load[a.as_str()] * cb).cmp(&(load[b.as_str()] * ca)).then(a.cmp(b))
            })
            .map(|(id, _)| id.clone())
            .expect("at least one node");
        *load.get_mut(node.as_str()).expect("a live node") += 1;
        assignments.push((shard, node));
    }
    assignments
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::{ClusterConfig, Listeners, NodeInfo, ShardOwner};

    fn map(shards: u32, initial_nodes: u32, nodes: &[(&str, u32)]) -> ClusterMap {
        let mut map = ClusterMap {
            config: Some(ClusterConfig { shards, initial_nodes }),
            ..ClusterMap::default()
        };
        for (id, capacity) in nodes {
            let info = NodeInfo {
                listeners: Listeners::tcp(format!("{id}:7000")),
                cores: 2,
                capacity: *capacity,
            };
            map.nodes.insert(id.to_string(), info);
        }
        map
    }

    fn counts(assignments: &[(u32, String)]) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for (_, node) in assignments {
            *counts.entry(node.clone()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn nothing_is_placed_before_the_initial_nodes_are_up() {
        assert!(assign_unowned(&map(16, 3, &[("a", 1), ("b", 1)])).is_empty());
        assert!(assign_unowned(&ClusterMap::default()).is_empty());
    }

    #[test]
    fn shards_spread_by_capacity_and_every_one_is_placed_once() {
        let assignments = assign_unowned(&map(16, 3, &[("a", 1), ("b", 1), ("c", 2)]));
        let shards: Vec<u32> = assignments.iter().map(|(s, _)| *s).collect();
        assert_eq!(shards, (0..16).collect::<Vec<_>>());
        let counts = counts(&assignments);
        assert_eq!((counts["a"], counts["b"], counts["c"]), (4, 4, 8));
    }

    #[test]
    fn owned_shards_stay_and_count_toward_their_owner() {
        let mut m = map(6, 2, &[("a", 1), ("b", 1)]);
        for shard in 0..3 {
            m.shards.insert(shard, ShardOwner { node: "a".into(), epoch: 1 });
        }
        let assignments = assign_unowned(&m);
        assert_eq!(assignments, vec![(3, "b".into()), (4, "b".into()), (5, "b".into())]);
        // Owned by a node that is gone: still owned (it moves only with its data).
        m.nodes.remove("a");
        m.nodes.insert(
            "c".into(),
            NodeInfo { listeners: Listeners::tcp("c:7000"), cores: 2, capacity: 1 },
        );
        assert!(assign_unowned(&m).iter().all(|(shard, _)| *shard >= 3));
    }
}
