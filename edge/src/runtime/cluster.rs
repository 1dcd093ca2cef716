//! A node of a cluster (`ternd --cluster`): joining through `tern_cluster`'s control
//! thread before the cores start, and each core's task that follows the shard map.
//!
//! The control thread owns the etcd client; a core only receives `Arc<ClusterMap>`
//! snapshots (a `tokio::sync::watch` channel, awaited from the glommio executor) and
//! keeps its own copy in the core's state (`routing::Homes`). Nothing is shared
//! mutably across cores.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use tern_cluster::{ClusterConfig, ClusterMap, ControlPlane, JoinConfig, Listeners, NodeInfo};
use tokio::sync::watch;

use super::ctx::Ctx;
use super::listen::Addresses;
use super::ServerError;
use crate::routing::Homes;

/// How a node joins a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSettings {
    /// etcd's client endpoints.
    pub endpoints: Vec<String>,
    /// The cluster's name (its keys in etcd are under `/tern/<name>/`).
    pub name: String,
    /// This node's id, unique in the cluster.
    pub node: String,
    /// A new cluster places its shards once this many nodes are up.
    pub initial_nodes: u32,
    /// The node's lease: it is gone from the cluster this long after it stops renewing.
    pub lease_ttl_s: i64,
    /// The host clients are redirected to (`None`: each listener's own address, which
    /// must then not be a wildcard such as 0.0.0.0).
    pub advertise_host: Option<String>,
}

impl ClusterSettings {
    /// Parses `etcd://host:port[,host:port...]/name` (the `--cluster` flag).
    pub fn parse_url(url: &str) -> Result<(Vec<String>, String), String> {
        let rest = url.strip_prefix("etcd://").ok_or_else(|| {
            format!("{url}: a cluster is named etcd://host:port[,host:port]/name")
        })?;
        let (hosts, name) = rest.split_once('/').ok_or_else(|| {
            format!("{url}: the cluster's name is missing (etcd://host:port/name)")
        })?;
        let endpoints: Vec<String> =
            hosts.split(',').filter(|h| !h.is_empty()).map(str::to_owned).collect();
        let name_ok = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if endpoints.is_empty() || !name_ok {
            return Err(format!(
                "{url}: give at least one etcd endpoint and a name of letters, digits, - and _"
            ));
        }
        Ok((endpoints, name.to_owned()))
    }
}

/// Joins the cluster (creating it with this data directory's shard count if it does not
/// exist): returns once the node is registered and the map read.
pub fn join(
    settings: &ClusterSettings,
    addresses: &Addresses,
    cores: u32,
    shard_count: u32,
) -> Result<ControlPlane, ServerError> {
    let listeners = advertised(addresses, settings.advertise_host.as_deref())?;
    tracing::info!(node = %settings.node, cluster = %settings.name, %listeners, "joining");
    let plane = ControlPlane::join(JoinConfig {
        endpoints: settings.endpoints.clone(),
        cluster: settings.name.clone(),
        node: settings.node.clone(),
        info: NodeInfo { listeners, cores, capacity: 1 },
        create: ClusterConfig { shards: shard_count, initial_nodes: settings.initial_nodes },
        lease_ttl_s: settings.lease_ttl_s,
    })
    .map_err(ServerError::Cluster)?;
    let map = plane.map();
    let owned = map.owned_by(&settings.node).len();
    tracing::info!(nodes = map.nodes.len(), shards_owned = owned, "joined the cluster");
    tracing::warn!(
        "cluster mode is partial: clients are sent to their home node, but users homed on \
         different nodes cannot reach each other yet (no node-to-node mesh)"
    );
    Ok(plane)
}

/// What this node tells clients to connect to.
fn advertised(addresses: &Addresses, host: Option<&str>) -> Result<Listeners, ServerError> {
    let show = |address: Option<SocketAddr>| -> Result<String, ServerError> {
        let Some(address) = address else { return Ok(String::new()) };
        match host {
            Some(host) => Ok(format!("{host}:{}", address.port())),
            None if address.ip().is_unspecified() => Err(ServerError::Advertise { address }),
            None => Ok(address.to_string()),
        }
    };
    Ok(Listeners {
        tcp: show(Some(addresses.tcp))?,
        tls: show(addresses.tls)?,
        ws: show(addresses.ws)?,
        wss: show(addresses.wss)?,
    })
}

/// The map a core starts with.
pub fn homes(node: &str, maps: &watch::Receiver<Arc<ClusterMap>>) -> Homes {
    Homes::Cluster { node: node.to_owned(), map: maps.borrow().clone() }
}

/// Hands this core every new map until the control thread stops. Core 0 logs the
/// shards this node serves, at the start and at each change, once it serves by the map.
pub async fn follow(ctx: Rc<Ctx>, node: String, mut maps: watch::Receiver<Arc<ClusterMap>>) {
    let first = ctx.core.borrow().placement().index == 0;
    let mut serving = None;
    loop {
        let map = maps.borrow_and_update().clone();
        let owned = map.owned_by(&node);
        ctx.core.borrow_mut().set_homes(Homes::Cluster { node: node.clone(), map: map.clone() });
        if first && serving.as_ref() != Some(&owned) {
            let (nodes, placed) = (map.nodes.len(), map.shards.len());
            tracing::info!(shards = ?owned, nodes, placed, "serving the cluster's shards");
            serving = Some(owned);
        }
        if maps.changed().await.is_err() {
            break;
        }
    }
    tracing::error!(node, "the cluster's control thread stopped: this core keeps its last map");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_name_endpoints_and_a_cluster() {
        let parsed = ClusterSettings::parse_url("etcd://10.0.0.1:2379,10.0.0.2:2379/chat-eu");
        let endpoints = vec!["10.0.0.1:2379".to_string(), "10.0.0.2:2379".to_string()];
        assert_eq!(parsed, Ok((endpoints, "chat-eu".to_string())));
        for bad in
            ["http://h:2379/x", "etcd://h:2379", "etcd:///x", "etcd://h:2379/", "etcd://h/a/b"]
        {
            let error = ClusterSettings::parse_url(bad).unwrap_err();
            assert!(error.starts_with(bad), "{error}");
        }
    }
}
