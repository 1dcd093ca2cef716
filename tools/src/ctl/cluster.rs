//! `ternctl cluster status`: a cluster's control plane as etcd holds it (nodes, their
//! shards, the controller), read once without joining. Pure formatting beside one read.
//! `ternctl cluster init`: development certificates for the node mesh
//! (`tern_cluster::certs`).

use tern_cluster::ClusterMap;

use super::{CtlError, Outcome};

/// Prints the cluster's configuration, live nodes with their shard counts, the
/// controller, and the shards with no live owner; a problem when any shard has none.
pub fn status(etcd: &str, cluster: &str) -> Result<Outcome, CtlError> {
    let endpoints: Vec<String> = etcd.split(',').map(str::to_owned).collect();
    let map = tern_cluster::read_map(&endpoints, cluster)?;
    let (report, healthy) = describe(cluster, &map);
    print!("{report}");
    Ok(if healthy { Outcome::Ok } else { Outcome::Problem })
}

/// Writes a development CA and node certificates into `out`; prints what it wrote.
pub fn init(
    out: &std::path::Path,
    nodes: &[String],
    hosts: &[String],
) -> Result<Outcome, CtlError> {
    let certs = tern_cluster::certs::development(nodes, hosts)?;
    for path in tern_cluster::certs::write(out, &certs)? {
        println!("wrote {}", path.display());
    }
    println!(
        "each node loads its <node>.pem and <node>-key.pem and trusts ca.pem; keep ca-key.pem \
         off the nodes (it signs new ones)"
    );
    Ok(Outcome::Ok)
}

/// The report, and whether every shard has a live owner.
fn describe(cluster: &str, map: &ClusterMap) -> (String, bool) {
    use std::fmt::Write as _;
    let mut out = String::new();
    let Some(config) = map.config else {
        return (format!("cluster {cluster}: not created (no config key)\n"), false);
    };
    let _ = writeln!(
        out,
        "cluster {cluster}: {} shards, placed once {} nodes are up; etcd revision {}",
        config.shards, config.initial_nodes, map.revision
    );
    let _ = writeln!(out, "controller: {}", map.controller().unwrap_or("(none)"));
    for (id, node) in &map.nodes {
        let owned = map.owned_by(id).len();
        let _ = writeln!(
            out,
            "node {id}: {} ({} cores, capacity {}): {owned} shards",
            node.listeners, node.cores, node.capacity
        );
    }
    let orphaned: Vec<u32> = (0..config.shards)
        .filter(|s| map.shards.get(s).is_none_or(|owner| !map.nodes.contains_key(&owner.node)))
        .collect();
    if !orphaned.is_empty() {
        let _ = writeln!(out, "{} shards without a live owner: {orphaned:?}", orphaned.len());
    }
    (out, orphaned.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_not_created_is_a_problem() {
        let (report, healthy) = describe("prod", &ClusterMap::default());
        assert!(!healthy);
        assert!(report.contains("not created"), "{report}");
    }
}
