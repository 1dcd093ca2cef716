//! The control thread of a node: joins the cluster, keeps its lease alive, follows the
//! cluster's keys into [`ClusterMap`] snapshots, and runs for controller.
//!
//! One thread with a single-threaded tokio runtime (etcd-client is tokio-based; the
//! cores are glommio executors and never block on etcd). What leaves the thread is an
//! `Arc<ClusterMap>` per change, through a `tokio::sync::watch` channel that any
//! executor can await.
//!
//! Every controller write is a transaction that also checks that the controller still
//! holds the election: a controller whose lease lapsed (a pause, a partition) and who has
//! not noticed yet writes nothing, because its candidate key is gone.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use tokio::sync::{oneshot, watch};

use crate::keys::Keys;
use crate::map::{ClusterConfig, ClusterMap, NodeInfo, ShardOwner};
use crate::placement::assign_unowned;

/// Shards assigned in one controller transaction (etcd allows 128 operations in one;
/// each assignment is a compare and a put, plus the leadership check).
const ASSIGNMENTS_PER_TXN: usize = 60;

/// How a node joins.
#[derive(Debug, Clone)]
pub struct JoinConfig {
    /// etcd client endpoints, `host:port` or `http://host:port`.
    pub endpoints: Vec<String>,
    /// The cluster's name (its keys are under `/tern/<cluster>/`).
    pub cluster: String,
    /// This node's id, unique in the cluster.
    pub node: String,
    /// What it registers.
    pub info: NodeInfo,
    /// The configuration to create the cluster with if it does not exist; if it does,
    /// its shard count must be the same.
    pub create: ClusterConfig,
    /// The lease's time to live: a node that stops renewing it is gone this long after.
    pub lease_ttl_s: i64,
}

/// Why the control plane could not do what it was asked, naming the rule or the step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterError {
    /// An etcd request failed (unreachable, timed out, refused).
    Etcd {
        /// What was being done.
        step: &'static str,
        /// etcd-client's error.
        error: String,
    },
    /// The cluster exists with another shard count: a shard count never changes.
    ShardCountMismatch {
        /// The cluster's.
        cluster: u32,
        /// The joining node's.
        asked: u32,
    },
    /// Another live node holds this node id (its lease has not lapsed within a TTL).
    NodeIdTaken {
        /// The id.
        node: String,
    },
    /// The control thread stopped.
    Stopped,
}

impl std::fmt::Display for ClusterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterError::Etcd { step, error } => write!(f, "etcd failed while {step}: {error}"),
            ClusterError::ShardCountMismatch { cluster, asked } => write!(
                f,
                "the cluster has {cluster} shards and this node was started for {asked}; a \
                 cluster's shard count is fixed when it is created"
            ),
            ClusterError::NodeIdTaken { node } => {
                write!(f, "node id {node} is held by a live node (a lease that has not lapsed)")
            }
            ClusterError::Stopped => write!(f, "the control thread stopped"),
        }
    }
}

impl std::error::Error for ClusterError {}

fn etcd(step: &'static str) -> impl FnOnce(etcd_client::Error) -> ClusterError {
    move |error| ClusterError::Etcd { step, error: error.to_string() }
}

/// A node's membership in a cluster: its control thread and the map it follows.
/// Dropping it leaves the cluster (the lease is revoked, so the node is gone at once).
pub struct ControlPlane {
    maps: watch::Receiver<Arc<ClusterMap>>,
    stop: Option<oneshot::Sender<Leave>>,
    thread: Option<JoinHandle<()>>,
}

/// How the control thread ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leave {
    /// Revoke the lease: the node's key and candidacy go at once.
    Revoke,
    /// Stop renewing only, as a crashed node would: its keys go when the lease lapses.
    Abandon,
}

impl ControlPlane {
    /// Joins the cluster (creating it with `config.create` if it does not exist) and
    /// returns once this node is registered and the map has been read. A node id whose
    /// previous holder crashed is free again one lease TTL later; this waits that long.
    pub fn join(config: JoinConfig) -> Result<ControlPlane, ClusterError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("tern-control".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
                match runtime {
                    Ok(runtime) => runtime.block_on(run(config, ready_tx, stop_rx)),
                    Err(error) => {
                        let error =
                            ClusterError::Etcd { step: "starting", error: error.to_string() };
                        let _ = ready_tx.send(Err(error));
                    }
                }
            })
            .map_err(|error| ClusterError::Etcd { step: "starting", error: error.to_string() })?;
        match ready_rx.recv() {
            Ok(Ok(maps)) => Ok(ControlPlane { maps, stop: Some(stop_tx), thread: Some(thread) }),
            Ok(Err(error)) => {
                let _ = thread.join();
                Err(error)
            }
            Err(_) => Err(ClusterError::Stopped),
        }
    }

    /// The latest map.
    pub fn map(&self) -> Arc<ClusterMap> {
        self.maps.borrow().clone()
    }

    /// A receiver of every new map (for a core: await `changed()`, then `borrow()`).
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterMap>> {
        self.maps.clone()
    }

    /// Blocks until a map satisfies `done` or `timeout` passes; returns the last map
    /// and whether it did.
    pub fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&ClusterMap) -> bool,
    ) -> (Arc<ClusterMap>, bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let map = self.map();
            if done(&map) {
                return (map, true);
            }
            if Instant::now() >= deadline {
                return (map, false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Leaves the cluster now: the lease is revoked, so the node's key and candidacy
    /// are deleted at once.
    pub fn leave(mut self) {
        self.stop_with(Leave::Revoke);
    }

    /// Stops renewing the lease without revoking it, as a crash would: the node stays
    /// in the map until the lease lapses. For tests and for fencing drills.
    pub fn abandon(mut self) {
        self.stop_with(Leave::Abandon);
    }

    fn stop_with(&mut self, how: Leave) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(how);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_with(Leave::Revoke);
    }
}

/// Reads a cluster's map once, without joining it (for operators' tools). Runs on a
/// thread of its own, so that it may be called from inside an async runtime too.
pub fn read_map(endpoints: &[String], cluster: &str) -> Result<ClusterMap, ClusterError> {
    let (endpoints, keys) = (endpoints.to_vec(), Keys::new(cluster));
    let reader = std::thread::Builder::new().name("tern-read-map".into()).spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| ClusterError::Etcd { step: "starting", error: error.to_string() })?;
        runtime.block_on(async {
            let mut client = Client::connect(&endpoints, Some(connect_options()))
                .await
                .map_err(etcd("connecting"))?;
            read_all(&mut client, &keys).await
        })
    });
    let reader = reader
        .map_err(|error| ClusterError::Etcd { step: "starting", error: error.to_string() })?;
    reader.join().map_err(|_| ClusterError::Stopped)?
}

fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(5))
}

/// Every key of the cluster, as a map at the read's revision.
async fn read_all(client: &mut Client, keys: &Keys) -> Result<ClusterMap, ClusterError> {
    let all = client
        .get(keys.prefix(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(etcd("reading the cluster"))?;
    let revision = all.header().map_or(0, |h| h.revision());
    let mut map = ClusterMap { revision, ..ClusterMap::default() };
    for kv in all.kvs() {
        map.put(keys, kv.key(), kv.value(), (kv.create_revision(), kv.mod_revision()));
    }
    Ok(map)
}

type Ready = std::sync::mpsc::Sender<Result<watch::Receiver<Arc<ClusterMap>>, ClusterError>>;

/// The control thread's body: join, then follow, keep alive and campaign until told to
/// stop or the lease is lost.
async fn run(config: JoinConfig, ready: Ready, stop: oneshot::Receiver<Leave>) {
    let keys = Keys::new(&config.cluster);
    let joined = join(&config, &keys).await;
    let (client, lease, map) = match joined {
        Ok(joined) => joined,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let (maps, receiver) = watch::channel(Arc::new(map));
    if ready.send(Ok(receiver)).is_err() {
        return;
    }
    tracing::info!(node = %config.node, cluster = %config.cluster, "joined the cluster");
    let ended = tokio::select! {
        result = keep_alive(client.clone(), lease, config.lease_ttl_s) => result,
        result = follow(client.clone(), &keys, &maps) => result,
        result = control(client.clone(), &keys, &config.node, lease, maps.subscribe()) => result,
        how = stop => {
            if how == Ok(Leave::Revoke) {
                let _ = client.clone().lease_revoke(lease).await;
            }
            return;
        }
    };
    if let Err(error) = ended {
        tracing::error!(%error, node = %config.node, "left the cluster: control plane failed");
    }
}

/// Connects, creates or checks the cluster's configuration, takes a lease, registers
/// the node under it and reads the whole map.
async fn join(config: &JoinConfig, keys: &Keys) -> Result<(Client, i64, ClusterMap), ClusterError> {
    let mut client = Client::connect(&config.endpoints, Some(connect_options()))
        .await
        .map_err(etcd("connecting"))?;
    ensure_config(&mut client, keys, config.create).await?;
    let lease =
        client.lease_grant(config.lease_ttl_s, None).await.map_err(etcd("taking a lease"))?.id();
    register(&mut client, keys, config, lease).await?;
    let map = read_all(&mut client, keys).await?;
    Ok((client, lease, map))
}

/// Creates the configuration if the cluster has none; else checks the shard count.
async fn ensure_config(
    client: &mut Client,
    keys: &Keys,
    create: ClusterConfig,
) -> Result<(), ClusterError> {
    let value = serde_json::to_vec(&create).expect("a config serializes");
    let txn = Txn::new()
        .when([Compare::version(keys.config(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(keys.config(), value, None)])
        .or_else([TxnOp::get(keys.config(), None)]);
    let response = client.txn(txn).await.map_err(etcd("creating the cluster"))?;
    if response.succeeded() {
        tracing::info!(shards = create.shards, "created the cluster");
        return Ok(());
    }
    let existing = response.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
        _ => None,
    });
    let existing: Option<ClusterConfig> =
        existing.and_then(|bytes| serde_json::from_slice(&bytes).ok());
    match existing {
        Some(existing) if existing.shards != create.shards => {
            Err(ClusterError::ShardCountMismatch { cluster: existing.shards, asked: create.shards })
        }
        Some(_) => Ok(()),
        None => Err(ClusterError::Etcd {
            step: "reading the cluster's configuration",
            error: format!("{} holds no readable configuration", keys.config()),
        }),
    }
}

/// Puts the node's key under its lease, if no live node holds the id. A holder that
/// crashed lapses within a TTL, so this retries for one TTL before giving up.
async fn register(
    client: &mut Client,
    keys: &Keys,
    config: &JoinConfig,
    lease: i64,
) -> Result<(), ClusterError> {
    let value = serde_json::to_vec(&config.info).expect("node info serializes");
    let key = keys.node(&config.node);
    let deadline = Instant::now() + Duration::from_secs(config.lease_ttl_s.max(1) as u64 + 1);
    loop {
        let txn = Txn::new().when([Compare::version(key.clone(), CompareOp::Equal, 0)]).and_then([
            TxnOp::put(key.clone(), value.clone(), Some(PutOptions::new().with_lease(lease))),
        ]);
        if client.txn(txn).await.map_err(etcd("registering the node"))?.succeeded() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::NodeIdTaken { node: config.node.clone() });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Renews the lease every third of its TTL; returns when it cannot (etcd unreachable
/// or the lease already expired).
async fn keep_alive(mut client: Client, lease: i64, ttl_s: i64) -> Result<(), ClusterError> {
    let (mut keeper, mut responses) =
        client.lease_keep_alive(lease).await.map_err(etcd("keeping the lease alive"))?;
    let period = Duration::from_millis((ttl_s.max(1) as u64 * 1000) / 3);
    loop {
        tokio::time::sleep(period).await;
        keeper.keep_alive().await.map_err(etcd("keeping the lease alive"))?;
        match responses.message().await.map_err(etcd("keeping the lease alive"))? {
            Some(response) if response.ttl() > 0 => {}
            _ => {
                return Err(ClusterError::Etcd {
                    step: "keeping the lease alive",
                    error: "the lease expired".into(),
                })
            }
        }
    }
}

/// Follows every key of the cluster from the map's revision on, publishing a new map
/// per watch response.
async fn follow(
    mut client: Client,
    keys: &Keys,
    maps: &watch::Sender<Arc<ClusterMap>>,
) -> Result<(), ClusterError> {
    let mut map = ClusterMap::clone(&maps.borrow());
    let options = WatchOptions::new().with_prefix().with_start_revision(map.revision + 1);
    let mut stream =
        client.watch(keys.prefix(), Some(options)).await.map_err(etcd("watching the cluster"))?;
    while let Some(response) = stream.message().await.map_err(etcd("watching the cluster"))? {
        if response.canceled() {
            return Err(ClusterError::Etcd {
                step: "watching the cluster",
                error: format!("watch canceled (compacted at {})", response.compact_revision()),
            });
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            match event.event_type() {
                EventType::Put => {
                    map.put(keys, kv.key(), kv.value(), (kv.create_revision(), kv.mod_revision()))
                }
                EventType::Delete => map.delete(keys, kv.key()),
            }
        }
        map.revision = response.header().map_or(map.revision, |h| h.revision());
        maps.send_replace(Arc::new(map.clone()));
    }
    Err(ClusterError::Etcd { step: "watching the cluster", error: "the watch ended".into() })
}

/// Campaigns for controller; once elected, assigns unowned shards whenever the map
/// changes, each write conditional on still leading.
async fn control(
    mut client: Client,
    keys: &Keys,
    node: &str,
    lease: i64,
    mut maps: watch::Receiver<Arc<ClusterMap>>,
) -> Result<(), ClusterError> {
    let elected = client
        .campaign(keys.election(), node.as_bytes(), lease)
        .await
        .map_err(etcd("campaigning for controller"))?;
    let Some(leader_key) = elected.leader().map(|leader| leader.key().to_vec()) else {
        return Err(ClusterError::Etcd {
            step: "campaigning for controller",
            error: "no leader key".into(),
        });
    };
    tracing::info!(node, "elected controller");
    loop {
        let map = maps.borrow_and_update().clone();
        for chunk in assign_unowned(&map).chunks(ASSIGNMENTS_PER_TXN) {
            assign(&mut client, keys, &leader_key, chunk).await?;
        }
        maps.changed().await.map_err(|_| ClusterError::Stopped)?;
    }
}

/// Writes owners for unowned shards, all or none: each shard key must still be absent,
/// and the controller must still hold the election.
async fn assign(
    client: &mut Client,
    keys: &Keys,
    leader_key: &[u8],
    assignments: &[(u32, String)],
) -> Result<(), ClusterError> {
    let mut compares = vec![Compare::version(leader_key.to_vec(), CompareOp::Greater, 0)];
    let mut puts = Vec::new();
    for (shard, node) in assignments {
        let owner = ShardOwner { node: node.clone(), epoch: 1 };
        let value = serde_json::to_vec(&owner).expect("an owner serializes");
        compares.push(Compare::version(keys.shard(*shard), CompareOp::Equal, 0));
        puts.push(TxnOp::put(keys.shard(*shard), value, None));
    }
    let txn = Txn::new().when(compares).and_then(puts);
    let response = client.txn(txn).await.map_err(etcd("assigning shards"))?;
    if response.succeeded() {
        tracing::info!(shards = assignments.len(), "assigned shards");
    } else {
        // Another write got there first, or this node no longer leads: the watch
        // brings the change, and the next round decides again.
        tracing::info!("shard assignment lost a compare-and-swap; deciding again");
    }
    Ok(())
}
