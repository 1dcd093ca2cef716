//! The glommio driver: the only module of the edge that knows about the runtime.
//!
//! `--cores N` executors, each pinned to a CPU, each with its own [`Core`] over the
//! shards it owns (shard `s` on core `s % N`), its own listeners on the same addresses
//! (SO_REUSEPORT: the kernel spreads new connections) and its own tasks: one per
//! connection ([`conn`]: socket → layers → `FrameDecoder` → `Core::handle_frame`, and the
//! core's output → socket), the committer (group commit, then `Core::handle_durable`),
//! the deadline timer, maintenance, the mesh sender and receivers ([`tasks`]). After
//! every input a task calls [`Ctx::kick`], which takes the core's outputs: connections
//! to wake, effects to run (codes, pushes, blob and CPU jobs in glommio's blocking
//! pool), commits and mesh sends to start.
//!
//! Cores talk only through glommio's channel mesh, built at start-up: after a loop turn,
//! the mesh task sends each other core one [`Batch`] with everything for it — the
//! core's outbox and connections being handed over. A connection moves when
//! [`Core::route`] says its registration or auth belongs to another core: its output is
//! flushed, its socket descriptor duplicated and sent with the transport state (TLS,
//! WebSocket) and the bytes not yet handled; the new core adopts it and carries on.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use glommio::channels::channel_mesh::{Full, MeshBuilder};
use glommio::net::TcpListener;
use glommio::timer::Timer;
use glommio::LocalExecutorBuilder;
use tern_engine::blobs::FsBlobs;
use tern_engine::uring::UringStorage;
use tern_engine::{DataDir, DataDirLock, ShardConfig, ShardHandle};

use crate::code_sender::{CodeSender, LogCodeSender};
use crate::core::config::CoreConfig;
use crate::core::handshake::Session;
use crate::core::Core;
use crate::mesh::CoreMsg;
use crate::routing::Placement;
use ctx::{now, Ctx, Notify, READ_BUFFER_BYTES};
use listen::{accept_loop, open_files_limit, Addresses};
use webhook::WebhookCodeSender;

pub use cluster::ClusterSettings;
use wire::{Layers, Wire};

mod admin;
mod cluster;
mod conn;
mod ctx;
mod listen;
mod tasks;
mod webhook;
mod wire;

/// Milliseconds since the Unix epoch (for callers outside the cores).
pub fn now_ms() -> u64 {
    now().unix_ms
}

/// How `ternd` is started.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The TCP listen address (port 0 picks a free port; the log says which).
    pub listen: SocketAddr,
    /// Shards of a new data directory (an existing one keeps its own count).
    pub shards: u32,
    /// Executors, one per CPU (`None`: as many as the machine has).
    pub cores: Option<u32>,
    /// The TLS listen address, if any.
    pub tls_listen: Option<SocketAddr>,
    /// The WebSocket listen address, if any.
    pub ws_listen: Option<SocketAddr>,
    /// The WebSocket-over-TLS listen address, if any.
    pub wss_listen: Option<SocketAddr>,
    /// The TLS certificate and protocol versions.
    pub tls: crate::tls::TlsSettings,
    /// The admin HTTP address (`/healthz`, `/metrics`), if any.
    pub admin: Option<SocketAddr>,
    /// A connection must finish the handshake and authenticate (or register) this fast.
    pub auth_deadline: Duration,
    /// An authenticated connection that sends no whole frame for this long is closed.
    pub idle_timeout: Duration,
    /// Where verification codes go: an SMS gateway webhook, or the log if `None`.
    pub code_webhook: Option<crate::code_sender::WebhookUrl>,
    /// How offline devices are woken: HTTP to their UnifiedPush endpoints, or the log.
    pub push: PushMode,
    /// Client connections held at most, split evenly between the cores (beyond it new
    /// ones get `TooManyConnections`); `None`: derived from the process's file
    /// descriptor limit.
    pub max_connections: Option<usize>,
    /// Load balancers whose connections start with a PROXY protocol v2 header naming the
    /// client (`crate::proxy`); everyone else connects directly.
    pub proxy_protocol_from: Vec<IpAddr>,
    /// Each client socket's kernel send and receive buffers, at most (0: the kernel's
    /// autotuning, unbounded by ternd).
    pub socket_buffer_bytes: usize,
    /// How often shards are checkpointed and their space reclaimed.
    pub maintenance_interval: Duration,
    /// Size of each log segment file.
    pub segment_bytes: u64,
    /// Dedup window of each shard, in entries.
    pub dedup_entries_per_shard: usize,
    /// Protocol limits.
    pub core: CoreConfig,
    /// The cluster this node joins (`None`: a single node, no etcd).
    pub cluster: Option<ClusterSettings>,
}

/// How pushes are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushMode {
    /// POST to the endpoints devices registered (UnifiedPush).
    Http,
    /// Write them to the log (development).
    Log,
}

pub use stop_signal::{ReloadSignal, StopSignal};

/// The stop request raised by SIGINT or SIGTERM, and the reload request raised by SIGHUP.
///
/// Each is an atomic written by the OS signal handler and read by the cores' watcher
/// tasks: not state the cores share with each other, which the ban in `clippy.toml` is
/// about.
#[allow(clippy::disallowed_types)]
mod stop_signal {
    use std::io;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// Raised once SIGINT or SIGTERM arrives.
    #[derive(Clone, Debug)]
    pub struct StopSignal(Arc<AtomicBool>);

    impl StopSignal {
        /// Installs the handlers.
        pub fn install() -> io::Result<StopSignal> {
            let flag = Arc::new(AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, flag.clone())?;
            }
            Ok(StopSignal(flag))
        }

        /// Whether a stop was requested.
        pub fn raised(&self) -> bool {
            self.0.load(Ordering::Relaxed)
        }
    }

    /// Raised when SIGHUP arrives; one per core, so that each core takes the request
    /// for itself (signal-hook runs every registered action for a signal).
    #[derive(Debug)]
    pub struct ReloadSignal(Arc<AtomicBool>);

    impl ReloadSignal {
        /// Installs one more SIGHUP handler (which also replaces the default action,
        /// ending the process, for good).
        pub fn install() -> io::Result<ReloadSignal> {
            let flag = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(signal_hook::consts::SIGHUP, flag.clone())?;
            Ok(ReloadSignal(flag))
        }

        /// Whether a reload was requested since the last call (and clears the request).
        pub fn take(&self) -> bool {
            self.0.swap(false, Ordering::Relaxed)
        }
    }
}

/// Why the server stopped.
#[derive(Debug)]
pub enum ServerError {
    /// The data directory could not be opened.
    DataDir(tern_engine::ManifestError),
    /// A shard could not be recovered.
    Shard {
        /// Which.
        shard_id: u32,
        /// Why.
        error: tern_engine::OpenError,
    },
    /// The listener or the executor failed.
    Io(io::Error),
    /// `--cores` asks for something this machine cannot do.
    Cores(String),
    /// Another process listens on one of the addresses (with SO_REUSEPORT it would
    /// silently share it and split the clients between two servers).
    AddressInUse {
        /// The address.
        address: SocketAddr,
    },
    /// Joining the cluster failed (`--cluster`).
    Cluster(tern_cluster::ClusterError),
    /// A node of a cluster listens on a wildcard address and was given no
    /// `--advertise-host`: clients could not be sent to it.
    Advertise {
        /// The listener's address.
        address: SocketAddr,
    },
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerError::DataDir(e) => write!(f, "{e}"),
            ServerError::Shard { shard_id, error } => write!(f, "shard {shard_id}: {error}"),
            ServerError::Io(e) => write!(f, "{e}"),
            ServerError::Cores(why) => write!(f, "--cores: {why}"),
            ServerError::AddressInUse { address } => write!(
                f,
                "{address}: address in use by another process; stop it or choose another \
                 address (port 0 picks a free one)"
            ),
            ServerError::Cluster(e) => write!(f, "--cluster: {e}"),
            ServerError::Advertise { address } => write!(
                f,
                "--cluster: {address} is a wildcard address; give --advertise-host, the name \
                 or address clients reach this node at"
            ),
        }
    }
}

impl std::error::Error for ServerError {}

/// One mesh message: everything one core has for another after a loop turn.
struct Batch {
    messages: Vec<CoreMsg>,
    connections: Vec<HandOff>,
}

/// A connection on its way to another core.
struct HandOff {
    socket: std::os::fd::OwnedFd,
    wire: Wire,
    /// Frame bytes received and not yet handled (the frame that must be handled there
    /// first).
    unread: Vec<u8>,
    session: Session,
}

/// What one executor needs to start.
struct CoreSetup {
    index: u32,
    cores: u32,
    shard_dirs: Vec<PathBuf>,
    config: ServerConfig,
    addresses: Addresses,
    /// Whether the TLS listeners are on (the configuration is built on the core).
    tls: bool,
    mesh: MeshBuilder<Batch, Full>,
    stop: StopSignal,
    reload: ReloadSignal,
    /// Told once this core's listeners are bound (the "ready" line waits for all).
    ready: std::sync::mpsc::Sender<()>,
    /// A node of a cluster: its id and the shard maps to follow.
    cluster: Option<Following>,
}

/// A node's id and the receiver of its cluster's maps.
type Following = (String, tokio::sync::watch::Receiver<std::sync::Arc<tern_cluster::ClusterMap>>);

/// Runs the server until the process is stopped.
pub fn run(config: ServerConfig) -> Result<(), ServerError> {
    // Before anything in the directory is read or written: one server per data directory.
    let lock = DataDirLock::acquire(&config.data_dir).map_err(ServerError::DataDir)?;
    let data_dir =
        DataDir::open_or_create(&lock, config.shards, now_ms()).map_err(ServerError::DataDir)?;
    let shard_count = data_dir.manifest().shard_count;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let cores = config.cores.unwrap_or(cpus);
    if cores == 0 || cores > 256 {
        return Err(ServerError::Cores(format!("{cores} cores; use 1 to 256")));
    }
    let path = config.data_dir.display();
    tracing::info!(data_dir = %path, shards = shard_count, cores, "data directory open");
    if cores > shard_count {
        tracing::warn!(
            cores,
            shards = shard_count,
            "more cores than shards: some cores only accept connections and hand them over"
        );
    }
    let (addresses, reservations) = Addresses::reserve(&config)?;
    // The certificate is checked (and the development one created) once, here, so that
    // a bad pair stops the start before any core runs; each core then builds its own
    // configuration from the same files.
    let tls = addresses.tls.is_some() || addresses.wss.is_some();
    if tls {
        crate::tls::server_config(&config.tls).map_err(ServerError::Io)?;
    }
    let shard_dirs: Vec<PathBuf> = (0..shard_count).map(|id| data_dir.shard_dir(id)).collect();
    // A node of a cluster joins before its cores start, so that the first connection
    // already meets the shard map. Dropping the plane (after the cores stopped) leaves.
    let plane = match &config.cluster {
        Some(settings) => Some(cluster::join(settings, &addresses, cores, shard_count)?),
        None => None,
    };
    let following = plane.as_ref().zip(config.cluster.as_ref());
    let following = following.map(|(plane, settings)| (settings.node.clone(), plane.subscribe()));
    let outcome = start_cores(&config, cores, cpus, shard_dirs, addresses, tls, following);
    drop(plane);
    drop(reservations);
    drop(lock);
    outcome
}

/// Starts one executor per core, says "ready" once every core serves, and waits for
/// them all to stop.
fn start_cores(
    config: &ServerConfig,
    cores: u32,
    cpus: u32,
    shard_dirs: Vec<PathBuf>,
    addresses: Addresses,
    tls: bool,
    cluster: Option<Following>,
) -> Result<(), ServerError> {
    // SIGINT/SIGTERM set a flag every core checks: stop accepting, flush, exit 0.
    let stop = StopSignal::install().map_err(ServerError::Io)?;
    let mesh = MeshBuilder::<Batch, Full>::full(cores as usize, 1024);
    let (ready, serving) = std::sync::mpsc::channel();
    let mut handles = Vec::with_capacity(cores as usize);
    for index in 0..cores {
        let setup = CoreSetup {
            index,
            cores,
            shard_dirs: shard_dirs.clone(),
            config: config.clone(),
            addresses: addresses.clone(),
            tls,
            mesh: mesh.clone(),
            stop: stop.clone(),
            // SIGHUP: each core re-reads the certificate (see `Ctx::tls`).
            reload: ReloadSignal::install().map_err(ServerError::Io)?,
            ready: ready.clone(),
            cluster: cluster.clone(),
        };
        // Blob I/O and CPU-heavy checks run beside the core, on any CPU: a 100 MiB
        // commit must not take the core's own CPU from its users.
        let handle = LocalExecutorBuilder::new(glommio::Placement::Fixed((index % cpus) as usize))
            .name(&format!("tern-core-{index}"))
            .blocking_thread_pool_placement(glommio::PoolPlacement::Unbound(1))
            .spawn(move || serve(setup))
            .map_err(|e| ServerError::Io(io::Error::other(e.to_string())))?;
        handles.push(handle);
    }
    drop((mesh, ready));
    if (0..cores).all(|_| serving.recv().is_ok()) {
        tracing::info!(cores, tcp = %addresses.tcp, "ready");
    }
    let mut outcome = Ok(());
    for handle in handles {
        let joined = handle.join().map_err(|e| ServerError::Io(io::Error::other(e.to_string())));
        if let Err(error) = joined.and_then(|served| served) {
            if outcome.is_ok() {
                outcome = Err(error);
            }
        }
    }
    outcome
}

async fn serve(setup: CoreSetup) -> Result<(), ServerError> {
    let CoreSetup {
        index,
        cores,
        shard_dirs,
        config,
        addresses,
        tls,
        mesh,
        stop,
        reload,
        ready,
        cluster: following,
    } = setup;
    let (senders, receivers) = mesh
        .join()
        .await
        .map_err(|e| ServerError::Io(io::Error::other(format!("channel mesh: {e}"))))?;
    // Mesh peers are ordered by executor creation, which is the index order.
    debug_assert_eq!(senders.peer_id(), index as usize);
    let placement = Placement { index, count: cores };
    let shards = open_shards(placement, &shard_dirs, &config).await?;
    let owned: Vec<u32> =
        (0..shards.len() as u32).filter(|s| shards[*s as usize].is_some()).collect();
    tracing::info!(core = index, shards = ?owned, "core serving");
    let ctx = Rc::new(make_ctx(placement, shards, &config, tls)?);
    glommio::spawn_local(tasks::committer(ctx.clone())).detach();
    glommio::spawn_local(tasks::maintenance(ctx.clone(), config.maintenance_interval)).detach();
    glommio::spawn_local(tasks::watch_signals(stop, reload, ctx.clone())).detach();
    glommio::spawn_local(tasks::mesh_out(ctx.clone(), senders)).detach();
    glommio::spawn_local(tasks::timers(ctx.clone())).detach();
    if let Some((node, maps)) = following {
        ctx.core.borrow_mut().set_homes(cluster::homes(&node, &maps));
        glommio::spawn_local(cluster::follow(ctx.clone(), node, maps)).detach();
    }
    let receivers = Rc::new(receivers);
    for peer in (0..cores).filter(|peer| *peer != index) {
        glommio::spawn_local(tasks::mesh_in(ctx.clone(), receivers.clone(), peer)).detach();
    }
    let shards = owned.iter().map(|id| (*id, shard_dirs[*id as usize].clone())).collect();
    let disk = tasks::DiskPaths { data_dir: config.data_dir.clone(), shards };
    glommio::spawn_local(tasks::refresh_stats(ctx.clone(), disk)).detach();
    if let (0, Some(admin)) = (index, addresses.admin) {
        let listener = TcpListener::bind(admin).map_err(|e| ServerError::Io(e.into()))?;
        let local = listener.local_addr().map_err(|e| ServerError::Io(e.into()))?;
        tracing::info!(%local, "admin endpoint listening (/healthz, /metrics)");
        glommio::spawn_local(admin::serve(listener, ctx.core.clone())).detach();
    }
    set_connection_limit(&ctx, &config, cores);
    let accepting = listen_all(&ctx, &addresses, cores)?;
    let _ = ready.send(());
    for task in accepting {
        task.await;
    }
    shut_down(&ctx).await;
    tracing::info!(core = index, "stopped");
    Ok(())
}

/// Opens (recovers) the shards this core owns; `None` for the others.
async fn open_shards(
    placement: Placement,
    shard_dirs: &[PathBuf],
    config: &ServerConfig,
) -> Result<Vec<Option<ShardHandle<UringStorage>>>, ServerError> {
    let owned_dirs = shard_dirs.iter().enumerate();
    let owned_dirs =
        owned_dirs.filter(|(id, _)| placement.core_of_shard(*id as u32) == placement.index);
    // A cold start overlaps reading the log with replaying it (`tern_engine::prefetch`);
    // the thread ends when it has read this core's segments.
    if let Err(error) =
        tern_engine::prefetch::read_ahead(owned_dirs.map(|(_, d)| d.clone()).collect())
    {
        tracing::warn!(%error, "could not start reading the log ahead; recovery reads it itself");
    }
    let mut shards = Vec::with_capacity(shard_dirs.len());
    for (shard_id, dir) in shard_dirs.iter().enumerate() {
        let shard_id = shard_id as u32;
        if placement.core_of_shard(shard_id) != placement.index {
            shards.push(None);
            continue;
        }
        let storage = UringStorage::new(dir.clone()).map_err(ServerError::Io)?;
        let mut shard_config = ShardConfig::new(shard_id);
        shard_config.segment_bytes = config.segment_bytes;
        shard_config.dedup_entries_max = config.dedup_entries_per_shard;
        let shard = ShardHandle::open(storage, shard_config)
            .await
            .map_err(|error| ServerError::Shard { shard_id, error })?;
        shards.push(Some(shard));
    }
    Ok(shards)
}

/// The core and what its tasks share.
fn make_ctx(
    placement: Placement,
    shards: Vec<Option<ShardHandle<UringStorage>>>,
    config: &ServerConfig,
    tls: bool,
) -> Result<Ctx, ServerError> {
    let first = placement.index == 0;
    let code_sender: Box<dyn CodeSender> = match &config.code_webhook {
        Some(url) => {
            if first {
                let (host, port) = (&url.host, url.port);
                tracing::info!(%host, port, "verification codes go to the webhook");
            }
            Box::new(WebhookCodeSender::new(url.clone(), 5, Duration::from_millis(200)))
        }
        None => {
            if first {
                tracing::warn!("verification codes are written to this log (development only)");
            }
            Box::new(LogCodeSender)
        }
    };
    let mut core_config = config.core.clone();
    core_config.auth_deadline_ms = config.auth_deadline.as_millis() as u64;
    core_config.idle_timeout_ms = config.idle_timeout.as_millis() as u64;
    let blobs = FsBlobs::open(config.data_dir.join("media")).map_err(ServerError::Io)?;
    let core = Core::new(placement, shards, core_config, crate::secrets::random_from_os());
    Ok(Ctx {
        core: Rc::new(RefCell::new(core)),
        commit_needed: Notify::default(),
        commit_asked_us: Cell::new(None),
        flush_lazy: Cell::new(false),
        mesh_needed: Notify::default(),
        stopping: Notify::default(),
        timer_changed: Notify::default(),
        timer_target_ms: Cell::new(u64::MAX),
        wakers: RefCell::new(HashMap::new()),
        code_sender,
        pusher: match config.push {
            PushMode::Http => {
                let backoff = Duration::from_millis(200);
                Box::new(webhook::HttpPushSender::new(5, backoff, &config.core))
            }
            PushMode::Log => Box::new(crate::push::LogPushSender),
        },
        blobs,
        leaving: RefCell::new(Vec::new()),
        tls: RefCell::new(match tls {
            true => Some(crate::tls::reload_config(&config.tls).map_err(ServerError::Io)?),
            false => None,
        }),
        tls_settings: config.tls.clone(),
        proxy_protocol_from: config.proxy_protocol_from.clone(),
        socket_buffer_bytes: config.socket_buffer_bytes,
        read_buffer: RefCell::new(vec![0u8; READ_BUFFER_BYTES]),
    })
}

/// Splits the connection limit (given, or from the open-files limit) between the cores.
fn set_connection_limit(ctx: &Ctx, config: &ServerConfig, cores: u32) {
    let fd_limit = open_files_limit();
    // Keep descriptors for segments, checkpoints, listeners and the admin endpoint.
    let derived = fd_limit.map_or(10_000, |limit| limit.saturating_sub(256) as usize);
    let max_connections = config.max_connections.unwrap_or(derived);
    let per_core = max_connections.div_ceil(cores as usize);
    if ctx.core.borrow().placement().index == 0 {
        tracing::info!(fd_limit = ?fd_limit, max_connections, per_core, "connection limit");
    }
    ctx.core.borrow_mut().set_max_connections(per_core);
}

/// Binds this core's listeners and starts accepting on each.
fn listen_all(
    ctx: &Rc<Ctx>,
    addresses: &Addresses,
    cores: u32,
) -> Result<Vec<glommio::Task<()>>, ServerError> {
    let listeners = [
        (Some(addresses.tcp), "listening (tcp)", false, false),
        (addresses.tls, "listening (tls)", true, false),
        (addresses.ws, "listening (websocket)", false, true),
        (addresses.wss, "listening (websocket over tls)", true, true),
    ];
    let mut accepting = Vec::new();
    for (address, what, with_tls, websocket) in listeners {
        let Some(address) = address else { continue };
        let listener = TcpListener::bind(address).map_err(|e| ServerError::Io(e.into()))?;
        let local = listener.local_addr().map_err(|e| ServerError::Io(e.into()))?;
        if ctx.core.borrow().placement().index == 0 {
            tracing::info!(%local, cores, "{what}");
        }
        let layers = Layers { tls: with_tls, websocket };
        accepting.push(glommio::spawn_local(accept_loop(listener, layers, ctx.clone())));
    }
    Ok(accepting)
}

/// Shutdown: no new connections; make everything appended durable, release the
/// replies that waited for it, tell clients, give their sockets a moment to flush.
async fn shut_down(ctx: &Rc<Ctx>) {
    tracing::info!(
        core = ctx.core.borrow().placement().index,
        "stopping: flushing and closing connections"
    );
    let shards = ctx.core.borrow().owned_shards();
    for (_, shard) in &shards {
        while shard.borrow().has_pending() {
            if shard.commit().await.is_err() {
                break;
            }
        }
    }
    ctx.core.borrow_mut().handle_durable(now());
    ctx.core.borrow_mut().shut_down(now());
    ctx.kick();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while ctx.core.borrow().connection_count() > 0 && std::time::Instant::now() < deadline {
        Timer::new(Duration::from_millis(20)).await;
    }
}

/// What glommio's streams do not expose, done on their descriptors. Moving a socket
/// between executors: its descriptor is duplicated (glommio's stream owns and closes
/// the original) and the duplicate is adopted on the other core (the process's
/// descriptor table is shared by its threads, so the number is valid there). And the
/// kernel's buffers of a client socket, bounded.
#[allow(unsafe_code)]
mod socket_handoff {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

    use glommio::net::TcpStream;

    /// Caps the kernel's send and receive buffers of `stream` at `bytes` each (the
    /// kernel doubles the figure for its bookkeeping and stops autotuning them). Without
    /// a cap each socket may grow to `tcp_wmem`/`tcp_rmem`'s maximum (4–6 MiB), so a few
    /// hundred clients that ask and never read hold gigabytes of kernel memory and push
    /// the whole machine's TCP into memory pressure, which slows every connection.
    pub fn cap_buffers(stream: &TcpStream, bytes: usize) -> io::Result<()> {
        // SAFETY: the descriptor is `stream`'s, open for as long as `stream` is borrowed
        // here; the borrowed handle does not outlive this call.
        let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
        let socket = socket2::SockRef::from(&fd);
        socket.set_send_buffer_size(bytes)?;
        socket.set_recv_buffer_size(bytes)
    }

    /// Gives up `stream`, keeping its socket open as an owned descriptor.
    pub fn detach(stream: TcpStream) -> io::Result<OwnedFd> {
        let raw = stream.as_raw_fd();
        // SAFETY: `raw` is the open descriptor of `stream`, which is alive until the
        // `drop` below, after the duplicate is made.
        let duplicate = unsafe { BorrowedFd::borrow_raw(raw) }.try_clone_to_owned()?;
        drop(stream);
        Ok(duplicate)
    }

    /// Wraps a descriptor from [`detach`] in a stream of the calling executor.
    pub fn attach(socket: OwnedFd) -> TcpStream {
        // SAFETY: `socket` is an open, connected TCP socket (made by `detach`) that we
        // own; ownership moves into the stream, which closes it when dropped.
        unsafe { TcpStream::from_raw_fd(socket.into_raw_fd()) }
    }
}
