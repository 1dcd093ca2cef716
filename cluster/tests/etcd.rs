//! The control plane against a real etcd (`tern_testkit::etcd`): nodes join under
//! leases, the controller places the shards once the initial nodes are up, every node
//! sees the same map, a crashed node lapses and the controller role moves to a live
//! one, and the rules that refuse a join name themselves.

use std::time::{Duration, Instant};

use tern_cluster::{ClusterConfig, ClusterError, ControlPlane, JoinConfig, Listeners, NodeInfo};
use tern_testkit::etcd::Etcd;

const WAIT: Duration = Duration::from_secs(15);

fn config(etcd: &Etcd, node: &str, shards: u32, initial_nodes: u32, ttl_s: i64) -> JoinConfig {
    JoinConfig {
        endpoints: vec![etcd.endpoint.clone()],
        cluster: "test".into(),
        node: node.into(),
        info: NodeInfo {
            listeners: Listeners::tcp(format!("{node}.local:7000")),
            cores: 2,
            capacity: 1,
        },
        create: ClusterConfig { shards, initial_nodes },
        lease_ttl_s: ttl_s,
    }
}

fn join(etcd: &Etcd, node: &str, shards: u32, initial_nodes: u32, ttl_s: i64) -> ControlPlane {
    ControlPlane::join(config(etcd, node, shards, initial_nodes, ttl_s)).expect("joins")
}

#[test]
fn three_nodes_form_a_cluster_and_share_its_shards() {
    let Some(etcd) = Etcd::start() else { return };
    let a = join(&etcd, "a", 16, 3, 5);
    let b = join(&etcd, "b", 16, 3, 5);
    // Two of the three initial nodes: nothing is placed yet.
    std::thread::sleep(Duration::from_millis(300));
    assert!(a.map().shards.is_empty(), "placed before the initial nodes were up");
    let c = join(&etcd, "c", 16, 3, 5);
    let (map, done) = c.wait_for(WAIT, |m| m.shards.len() == 16);
    assert!(done, "every shard placed: {map:?}");
    let counts: Vec<usize> = ["a", "b", "c"].iter().map(|n| map.owned_by(n).len()).collect();
    assert_eq!(counts, vec![6, 5, 5], "spread evenly, ties to the smaller id");
    assert!(map.shards.values().all(|owner| owner.epoch == 1));
    // Every node converges on the same map, with one controller among them.
    for node in [&a, &b] {
        let (seen, done) = node.wait_for(WAIT, |m| m.shards == map.shards);
        assert!(done, "the same shards everywhere: {seen:?}");
        assert!(["a", "b", "c"].contains(&seen.controller().expect("a controller")));
    }
    assert_eq!(map.nodes.len(), 3);
    assert_eq!(map.nodes["b"].listeners.tcp, "b.local:7000");

    // A node started for another shard count is refused, naming both counts.
    let other = ControlPlane::join(config(&etcd, "d", 32, 3, 5)).err();
    assert_eq!(other, Some(ClusterError::ShardCountMismatch { cluster: 16, asked: 32 }));
    // A node id held by a live node is refused (after waiting one lease TTL for it).
    let started = Instant::now();
    let twin = ControlPlane::join(config(&etcd, "a", 16, 3, 1)).err();
    assert_eq!(twin, Some(ClusterError::NodeIdTaken { node: "a".into() }));
    assert!(started.elapsed() >= Duration::from_secs(1));

    // Leaving revokes the lease: the node is gone at once, not a TTL later.
    b.leave();
    let (seen, done) = a.wait_for(Duration::from_secs(3), |m| !m.nodes.contains_key("b"));
    assert!(done, "b gone within 3 s of leaving, its lease being 5 s: {seen:?}");
    assert_eq!(seen.owned_by("b").len(), 5, "its shards stay assigned until moved");
}

#[test]
fn a_crashed_controller_lapses_and_a_live_node_takes_over() {
    let Some(etcd) = Etcd::start() else { return };
    let a = join(&etcd, "a", 8, 2, 2);
    let b = join(&etcd, "b", 8, 2, 2);
    let (map, done) = a.wait_for(WAIT, |m| m.shards.len() == 8 && m.controller().is_some());
    assert!(done, "placed, with a controller: {map:?}");
    let leader = map.controller().expect("a controller").to_owned();
    let (crashed, survivor) = if leader == "a" { (a, b) } else { (b, a) };
    // The controller stops renewing its lease, as a crash would.
    crashed.abandon();
    let lapsed = |m: &tern_cluster::ClusterMap| {
        !m.nodes.contains_key(&leader) && m.controller().is_some_and(|c| c != leader)
    };
    let (seen, done) = survivor.wait_for(WAIT, lapsed);
    assert!(done, "the crashed node lapsed and the survivor leads: {seen:?}");
    // A node that joins later takes no owned shard: shards move only with their data.
    let c = join(&etcd, "c", 8, 2, 2);
    std::thread::sleep(Duration::from_millis(500));
    assert!(c.map().owned_by("c").is_empty());
    assert_eq!(c.map().shards.len(), 8);
}
