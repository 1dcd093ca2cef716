//! The glommio driver: the only module of the edge that knows about the runtime.
//!
//! `--cores N` executors, each pinned to a CPU, each with its own [`Core`] over the
//! shards it owns (shard `s` on core `s % N`), its own listeners on the same addresses
//! (SO_REUSEPORT: the kernel spreads new connections) and its own committer. Per
//! connection, one task moves bytes: socket → `FrameDecoder` → `Core::handle_frame`, and
//! `Connection::outbound` → socket. The committer writes and syncs whatever the shards
//! accumulated, then lets the core release durable replies and deliver new envelopes.
//!
//! Cores talk only through glommio's channel mesh, built at start-up: after a loop turn,
//! one task sends each other core one [`Batch`] with everything for it — the core's
//! outbox ([`CoreMsg`]s) and connections being handed over. A connection moves when
//! [`Core::route`] says its registration or auth belongs to another core: its output is
//! flushed, its socket descriptor duplicated and sent with the transport state (TLS,
//! WebSocket) and the bytes not yet handled; the new core adopts it and carries on.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};
use glommio::net::{TcpListener, TcpStream};
use glommio::timer::Timer;
use glommio::LocalExecutorBuilder;
use tern_engine::uring::UringStorage;
use tern_engine::{DataDir, DataDirLock, ShardConfig, ShardHandle};
use tern_wire::FrameDecoder;

use crate::code_sender::{CodeSender, LogCodeSender};
use crate::core::{ConnId, ConnState, Core, CoreConfig, Placement, Session};
use crate::mesh::{CoreMsg, DiskUsage, FileSystemSpace};
use crate::websocket::WsLayer;
use webhook::WebhookCodeSender;

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
    /// How often shards are checkpointed and their space reclaimed.
    pub maintenance_interval: Duration,
    /// Size of each log segment file.
    pub segment_bytes: u64,
    /// Dedup window of each shard, in entries.
    pub dedup_entries_per_shard: usize,
    /// Protocol limits.
    pub core: CoreConfig,
}

/// How pushes are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushMode {
    /// POST to the endpoints devices registered (UnifiedPush).
    Http,
    /// Write them to the log (development).
    Log,
}

/// Milliseconds since the Unix epoch (the only place the edge reads the clock).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

thread_local! {
    /// This core's monotonic clock origin (latency metrics only).
    static EPOCH: std::time::Instant = std::time::Instant::now();
}

/// Microseconds on this core's monotonic clock.
fn now_us() -> u64 {
    EPOCH.with(|epoch| epoch.elapsed().as_micros() as u64)
}

pub use stop_signal::{ReloadSignal, StopSignal};

mod admin;
mod webhook;

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

/// A single-core wake-up flag: set by whoever has work, awaited by one task.
#[derive(Default)]
struct Notify {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
    raised: Cell<bool>,
    raised_waiters: RefCell<Vec<Waker>>,
}

impl Notify {
    fn notify(&self) {
        self.set.set(true);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
        for waker in self.raised_waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// A notification that stays raised, for broadcasts like "stopping" (every waiter,
    /// now or later, sees it).
    fn raise(&self) {
        self.raised.set(true);
        self.notify();
    }

    fn wait_raised(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.raised.get() {
                Poll::Ready(())
            } else {
                self.raised_waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
    }

    fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.set.replace(false) {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
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
    auth_deadline: std::time::Instant,
}

/// The addresses every core listens on, resolved once so that port 0 means the same
/// port on every core.
#[derive(Clone, Debug)]
struct Addresses {
    tcp: SocketAddr,
    tls: Option<SocketAddr>,
    ws: Option<SocketAddr>,
    wss: Option<SocketAddr>,
    admin: Option<SocketAddr>,
}

/// Holds each listen port between resolving it and every core binding it: a bound,
/// non-listening SO_REUSEPORT socket (it takes no connections).
struct PortReservations(#[allow(dead_code)] Vec<socket2::Socket>);

impl Addresses {
    /// Resolves and holds every listen address. Each is first bound *without*
    /// SO_REUSEPORT: that bind fails if any other socket holds the address, so a second
    /// server (which would otherwise share the port through SO_REUSEPORT and take half
    /// the clients) is refused. Only then is the shared reservation bound, on the same
    /// port, for this process's cores.
    fn reserve(config: &ServerConfig) -> Result<(Addresses, PortReservations), ServerError> {
        let mut held = Vec::new();
        let mut reserve = |address: SocketAddr| -> Result<SocketAddr, ServerError> {
            let (exclusive, bound) = exclusive_probe(address)?;
            let socket = tcp_socket(bound).map_err(ServerError::Io)?;
            socket.set_reuse_port(true).map_err(ServerError::Io)?;
            drop(exclusive);
            socket.bind(&bound.into()).map_err(|e| in_use_or(bound, e))?;
            held.push(socket);
            Ok(bound)
        };
        let addresses = Addresses {
            tcp: reserve(config.listen)?,
            tls: config.tls_listen.map(&mut reserve).transpose()?,
            ws: config.ws_listen.map(&mut reserve).transpose()?,
            wss: config.wss_listen.map(&mut reserve).transpose()?,
            admin: match config.admin {
                // Core 0 alone binds it, later; the probe only checks nobody else has it.
                Some(admin) => Some(exclusive_probe(admin)?.1),
                None => None,
            },
        };
        Ok((addresses, PortReservations(held)))
    }
}

/// A TCP socket for `address`'s family, not yet bound.
fn tcp_socket(address: SocketAddr) -> io::Result<socket2::Socket> {
    socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
}

/// Binds `address` without SO_REUSEPORT (so no other socket may hold it) and returns
/// the socket (the address is free again once it is dropped) with its resolved address
/// (port 0: a free port).
fn exclusive_probe(address: SocketAddr) -> Result<(socket2::Socket, SocketAddr), ServerError> {
    let socket = tcp_socket(address).map_err(ServerError::Io)?;
    socket.bind(&address.into()).map_err(|e| in_use_or(address, e))?;
    let bound = socket.local_addr().map_err(ServerError::Io)?.as_socket().ok_or_else(|| {
        ServerError::Io(io::Error::other(format!("{address} did not bind to an IP address")))
    })?;
    Ok((socket, bound))
}

fn in_use_or(address: SocketAddr, error: io::Error) -> ServerError {
    if error.kind() == io::ErrorKind::AddrInUse {
        ServerError::AddressInUse { address }
    } else {
        ServerError::Io(io::Error::new(error.kind(), format!("{address}: {error}")))
    }
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
}

/// Runs the server until the process is stopped.
pub fn run(config: ServerConfig) -> Result<(), ServerError> {
    // Before anything in the directory is read or written: one server per data directory.
    let lock = DataDirLock::acquire(&config.data_dir).map_err(ServerError::DataDir)?;
    let data_dir =
        DataDir::open_or_create(&lock, config.shards, now_ms()).map_err(ServerError::DataDir)?;
    let manifest = data_dir.manifest();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let cores = config.cores.unwrap_or(cpus);
    if cores == 0 || cores > 256 {
        return Err(ServerError::Cores(format!("{cores} cores; use 1 to 256")));
    }
    tracing::info!(
        data_dir = %config.data_dir.display(),
        shards = manifest.shard_count,
        cores,
        "data directory open"
    );
    if cores > manifest.shard_count {
        tracing::warn!(
            cores,
            shards = manifest.shard_count,
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
    // SIGINT/SIGTERM set a flag every core checks: stop accepting, flush, exit 0.
    let stop = StopSignal::install().map_err(ServerError::Io)?;
    let shard_dirs: Vec<PathBuf> =
        (0..manifest.shard_count).map(|id| data_dir.shard_dir(id)).collect();
    let mesh = MeshBuilder::<Batch, Full>::full(cores as usize, 1024);
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
        };
        let handle = LocalExecutorBuilder::new(glommio::Placement::Fixed((index % cpus) as usize))
            .name(&format!("tern-core-{index}"))
            .spawn(move || serve(setup))
            .map_err(|e| ServerError::Io(io::Error::other(e.to_string())))?;
        handles.push(handle);
    }
    drop(mesh);
    let mut outcome = Ok(());
    for handle in handles {
        let joined = handle.join().map_err(|e| ServerError::Io(io::Error::other(e.to_string())));
        if let Err(error) = joined.and_then(|served| served) {
            if outcome.is_ok() {
                outcome = Err(error);
            }
        }
    }
    drop(reservations);
    drop(lock);
    outcome
}

/// One core's shared state, for its tasks.
struct Ctx {
    core: Rc<RefCell<Core<UringStorage>>>,
    commit_needed: Notify,
    mesh_needed: Notify,
    stopping: Notify,
    /// Wakes the push task.
    push_needed: Notify,
    /// Sends wake-ups to offline devices.
    pusher: Box<dyn crate::push::PushSender>,
    /// Connections leaving for other cores, sent with the next batch.
    leaving: RefCell<Vec<(u32, HandOff)>>,
    /// (auth deadline, idle timeout).
    limits: (Duration, Duration),
    /// This core's TLS configuration, for the connections it accepts next (`None`: no
    /// TLS listener). Certificate renewal without a restart: on SIGHUP each core reads
    /// the files again and replaces its own `Arc` here; connections already open keep
    /// the `ServerConnection` (and so the configuration) they started with. Each core
    /// building and owning its copy follows the thread-per-core design: the accept path
    /// reads a `RefCell` on its own thread, no lock or shared atomic is involved (an
    /// `ArcSwap` of a shared `CertifiedKey` would put one cache line under every core's
    /// handshakes), and each core also gets its own TLS session cache (rustls keeps it
    /// behind a mutex, which a shared configuration would make a cross-core lock). The
    /// price is that each core reads two small files per reload, and a resumption
    /// attempt that lands on another core does a full handshake.
    tls: RefCell<Option<Arc<rustls::ServerConfig>>>,
    /// How to rebuild `tls`.
    tls_settings: crate::tls::TlsSettings,
    /// The one read buffer of this core's connections ([`READ_BUFFER_BYTES`]). glommio's
    /// `poll_read` receives synchronously into the buffer it is given and, when nothing
    /// is there, waits on a readiness poll that holds no buffer; a connection's task uses
    /// the bytes (TLS, WebSocket, frame decoder: each copies what it keeps) before its
    /// next `.await`, so no other task can see them, and an idle connection holds no read
    /// buffer at all (`bench density`, docs/BENCHMARKS.md). Borrowed only between an
    /// `.await` and the next.
    read_buffer: RefCell<Vec<u8>>,
}

/// How long a core stops accepting after `accept` failed (out of descriptors).
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// Bytes a connection reads at most at once (the shared per-core read buffer).
const READ_BUFFER_BYTES: usize = 64 * 1024;

impl Ctx {
    /// After the core did work: wake the committer and the mesh sender if it left them
    /// something.
    fn kick(&self) {
        let core = self.core.borrow();
        if core.has_pending_writes() {
            self.commit_needed.notify();
        }
        if core.has_outbox() {
            self.mesh_needed.notify();
        }
        if core.has_pushes() {
            self.push_needed.notify();
        }
    }
}

async fn serve(setup: CoreSetup) -> Result<(), ServerError> {
    let CoreSetup { index, cores, shard_dirs, config, addresses, tls, mesh, stop, reload } = setup;
    let (senders, receivers) = mesh
        .join()
        .await
        .map_err(|e| ServerError::Io(io::Error::other(format!("channel mesh: {e}"))))?;
    // Mesh peers are ordered by executor creation, which is the index order.
    debug_assert_eq!(senders.peer_id(), index as usize);
    let placement = Placement { index, count: cores };
    let shard_dirs_owned: Vec<(u32, PathBuf)> = (0..shard_dirs.len() as u32)
        .filter(|id| placement.core_of_shard(*id) == index)
        .map(|id| (id, shard_dirs[id as usize].clone()))
        .collect();
    let mut shards: Vec<Option<ShardHandle<UringStorage>>> = Vec::with_capacity(shard_dirs.len());
    for (shard_id, dir) in shard_dirs.into_iter().enumerate() {
        let shard_id = shard_id as u32;
        if placement.core_of_shard(shard_id) != index {
            shards.push(None);
            continue;
        }
        let storage = UringStorage::new(dir).map_err(ServerError::Io)?;
        let mut shard_config = ShardConfig::new(shard_id);
        shard_config.segment_bytes = config.segment_bytes;
        shard_config.dedup_entries_max = config.dedup_entries_per_shard;
        let shard = ShardHandle::open(storage, shard_config)
            .await
            .map_err(|error| ServerError::Shard { shard_id, error })?;
        shards.push(Some(shard));
    }
    let owned: Vec<usize> = (0..shards.len()).filter(|s| shards[*s].is_some()).collect();
    tracing::info!(core = index, shards = ?owned, "core serving");
    let code_sender: Box<dyn CodeSender> = match &config.code_webhook {
        Some(url) => {
            if index == 0 {
                let (host, port) = (&url.host, url.port);
                tracing::info!(%host, port, "verification codes go to the webhook");
            }
            Box::new(WebhookCodeSender::new(url.clone(), 5, Duration::from_millis(200)))
        }
        None => {
            if index == 0 {
                tracing::warn!("verification codes are written to this log (development only)");
            }
            Box::new(LogCodeSender)
        }
    };
    let mut core_config = config.core.clone();
    let media_dir = config.data_dir.join("media");
    std::fs::create_dir_all(&media_dir).map_err(ServerError::Io)?;
    core_config.media_dir = Some(media_dir);
    let core = Core::new(placement, shards, core_config, code_sender);
    let ctx = Rc::new(Ctx {
        core: Rc::new(RefCell::new(core)),
        commit_needed: Notify::default(),
        mesh_needed: Notify::default(),
        stopping: Notify::default(),
        leaving: RefCell::new(Vec::new()),
        push_needed: Notify::default(),
        pusher: match config.push {
            PushMode::Http => Box::new(webhook::HttpPushSender::new(5, Duration::from_millis(200))),
            PushMode::Log => Box::new(crate::push::LogPushSender),
        },
        limits: (config.auth_deadline, config.idle_timeout),
        tls: RefCell::new(match tls {
            true => Some(crate::tls::reload_config(&config.tls).map_err(ServerError::Io)?),
            false => None,
        }),
        tls_settings: config.tls.clone(),
        read_buffer: RefCell::new(vec![0u8; READ_BUFFER_BYTES]),
    });

    glommio::spawn_local(committer(ctx.clone())).detach();
    glommio::spawn_local(maintenance(ctx.clone(), config.maintenance_interval)).detach();
    glommio::spawn_local(watch_signals(stop, reload, ctx.clone())).detach();
    glommio::spawn_local(mesh_out(ctx.clone(), senders)).detach();
    glommio::spawn_local(pushes(ctx.clone())).detach();
    let receivers = Rc::new(receivers);
    for peer in (0..cores).filter(|peer| *peer != index) {
        glommio::spawn_local(mesh_in(ctx.clone(), receivers.clone(), peer)).detach();
    }
    let disk = DiskPaths { data_dir: config.data_dir.clone(), shards: shard_dirs_owned };
    glommio::spawn_local(refresh_stats(ctx.clone(), disk)).detach();
    if let (0, Some(admin)) = (index, addresses.admin) {
        let listener = TcpListener::bind(admin).map_err(|e| ServerError::Io(e.into()))?;
        let local = listener.local_addr().map_err(|e| ServerError::Io(e.into()))?;
        tracing::info!(%local, "admin endpoint listening (/healthz, /metrics)");
        glommio::spawn_local(admin::serve(listener, ctx.core.clone())).detach();
    }

    let fd_limit = open_files_limit();
    // Keep descriptors for segments, checkpoints, listeners and the admin endpoint.
    let derived = fd_limit.map_or(10_000, |limit| limit.saturating_sub(256) as usize);
    let max_connections = config.max_connections.unwrap_or(derived);
    let per_core = max_connections.div_ceil(cores as usize);
    if index == 0 {
        tracing::info!(fd_limit = ?fd_limit, max_connections, per_core, "connection limit");
    }
    ctx.core.borrow_mut().set_max_connections(per_core);
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
        if index == 0 {
            tracing::info!(%local, cores, "{what}");
        }
        let layers = Layers { tls: with_tls, websocket };
        accepting.push(glommio::spawn_local(accept_loop(listener, layers, ctx.clone())));
    }
    for task in accepting {
        task.await;
    }

    // Shutdown: no new connections; make everything appended durable, release the
    // replies that waited for it, tell clients, give their sockets a moment to flush.
    tracing::info!(core = index, "stopping: flushing and closing connections");
    let shards = ctx.core.borrow().owned_shards();
    for (_, shard) in &shards {
        while shard.borrow().has_pending() {
            if shard.commit().await.is_err() {
                break;
            }
        }
    }
    ctx.core.borrow_mut().on_durable(now_ms());
    ctx.core.borrow_mut().shut_down();
    ctx.kick();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while ctx.core.borrow().connection_count() > 0 && std::time::Instant::now() < deadline {
        Timer::new(Duration::from_millis(20)).await;
    }
    tracing::info!(core = index, "stopped");
    Ok(())
}

/// Accepts connections on one listener until the server stops.
async fn accept_loop(listener: TcpListener, layers: Layers, ctx: Rc<Ctx>) {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            ctx.stopping.wait_raised().await;
            None
        })
        .await;
        let stream = match accepted {
            Some(Ok(stream)) => stream,
            Some(Err(error)) => {
                // Out of descriptors or a connection reset during accept: keep serving,
                // but pause accepting for a moment. Retrying at once never yields, so the
                // connections that hold the descriptors (refusals finishing their TLS
                // handshake, closes) would never run to release them: the core would spin
                // and flood the log (found by `bench density --processes 2` past the
                // limit).
                tracing::warn!(%error, "accept failed; pausing accepts for 50 ms");
                Timer::new(ACCEPT_PAUSE).await;
                continue;
            }
            None => break,
        };
        let _ = stream.set_nodelay(true);
        let peer_ip = stream.peer_addr().ok().map(|a| a.ip());
        let conn = ctx.core.borrow_mut().accept_connection(peer_ip);
        let max_frame_bytes = ctx.core.borrow().config().max_frame_bytes;
        // The configuration in force now (a SIGHUP may have replaced it since the last
        // accept): a borrow on this core's own state, no lock.
        let tls = if layers.tls { ctx.tls.borrow().clone() } else { None };
        let wire = match Wire::new(tls, layers.websocket, max_frame_bytes) {
            Ok(wire) => wire,
            Err(error) => {
                tracing::warn!(%error, "could not start TLS");
                let mut core = ctx.core.borrow_mut();
                core.transport_failed(conn);
                core.close_connection(conn, now_ms());
                continue;
            }
        };
        if ctx.core.borrow().connection_count() > ctx.core.borrow().max_connections() {
            // Refuse cleanly: a typed error on this connection, then close it.
            ctx.core.borrow_mut().refuse_connection(conn);
        }
        let deadline = std::time::Instant::now() + ctx.limits.0;
        let task = connection(ctx.clone(), conn, stream, wire, Vec::new(), deadline);
        glommio::spawn_local(task).detach();
    }
}

/// Periodically checkpoints every shard of this core that changed and reclaims space
/// (deleting drained segments, compacting mostly-dead ones), so recovery stays short and
/// disk use follows the backlog.
async fn maintenance(ctx: Rc<Ctx>, interval: Duration) {
    let mut checkpointed: HashMap<u32, u64> = HashMap::new();
    loop {
        Timer::new(interval).await;
        let expired = ctx.core.borrow_mut().expire_media(now_ms());
        if expired > 0 {
            tracing::info!(expired, "deleted expired media");
            ctx.kick();
        }
        let shards = ctx.core.borrow().owned_shards();
        for (shard_id, shard) in &shards {
            let durable = shard.borrow().durable_seq();
            let erasing = shard.borrow().erasure_pending();
            if checkpointed.get(shard_id) == Some(&durable) && !erasing {
                continue;
            }
            match shard.reclaim(now_ms()).await {
                Ok(deleted) => {
                    checkpointed.insert(*shard_id, shard.borrow().durable_seq());
                    if deleted > 0 {
                        tracing::info!(shard = shard_id, deleted, "reclaimed segments");
                    }
                    if erasing && !shard.borrow().erasure_pending() {
                        tracing::info!(shard = shard_id, "deleted accounts erased from disk");
                    }
                }
                Err(error) => {
                    tracing::error!(shard = shard_id, %error, "checkpoint or reclaim failed")
                }
            }
        }
    }
}

/// The soft limit on open files, from `/proc/self/limits` (Linux).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Turns the stop flag into a wake-up of the accept loops, and the reload flag into a
/// new TLS configuration for this core.
async fn watch_signals(stop: StopSignal, reload: ReloadSignal, ctx: Rc<Ctx>) {
    while !stop.raised() {
        if reload.take() {
            reload_tls(&ctx);
        }
        Timer::new(Duration::from_millis(100)).await;
    }
    ctx.stopping.raise();
}

/// SIGHUP: reads the certificate and key again for the connections accepted from now on.
/// A pair that does not load keeps the old configuration. Reading two small files on the
/// core's thread blocks it for well under a millisecond, once per reload.
fn reload_tls(ctx: &Ctx) {
    let core = ctx.core.borrow().placement().index;
    if ctx.tls.borrow().is_none() {
        tracing::info!(core, "SIGHUP: no TLS listener, nothing to reload");
        return;
    }
    match crate::tls::reload_config(&ctx.tls_settings) {
        Ok(config) => {
            *ctx.tls.borrow_mut() = Some(config);
            tracing::info!(core, "SIGHUP: TLS certificate reloaded for new connections");
        }
        Err(error) => tracing::error!(
            core,
            %error,
            "SIGHUP: TLS certificate reload failed; keeping the previous certificate"
        ),
    }
}

/// Commits whatever this core's shards accumulated, as long as there is something, then
/// lets the core release durable replies and deliver. Group commit: appends that arrive
/// while a commit is in flight go into the next one. The shards with pending records are
/// committed all at once, each in its own task: their writes and fdatasyncs are in
/// flight together (io_uring), so a round costs about one fdatasync instead of one per
/// shard in turn (a core owns several shards; 8 in a row had put ~2 ms under every sent
/// tick at low load).
async fn committer(ctx: Rc<Ctx>) {
    loop {
        ctx.commit_needed.wait().await;
        loop {
            let shards = ctx.core.borrow().owned_shards();
            let commits: Vec<_> = shards
                .into_iter()
                .filter(|(_, shard)| shard.borrow().has_pending())
                .map(|(_, shard)| glommio::spawn_local(commit_shard(ctx.clone(), shard)))
                .collect();
            let committed_any = !commits.is_empty();
            for commit in commits {
                commit.await;
            }
            let mut core = ctx.core.borrow_mut();
            core.set_clock(now_us());
            core.on_durable(now_ms());
            drop(core);
            ctx.kick();
            if !committed_any {
                break;
            }
        }
    }
}

/// Commits one shard's pending records and counts the batch.
async fn commit_shard(ctx: Rc<Ctx>, shard: ShardHandle<UringStorage>) {
    let records_before = shard.borrow().counters().committed_records;
    if let Err(error) = shard.commit().await {
        tracing::error!(%error, "commit failed; the shard refuses writes until restart");
    }
    let records = shard.borrow().counters().committed_records - records_before;
    if records > 0 {
        ctx.core.borrow_mut().commit_batch_records.observe(records as f64);
    }
}

/// Sends each other core one batch per loop turn: the core's outbox and the connections
/// leaving for it.
async fn mesh_out(ctx: Rc<Ctx>, senders: Senders<Batch>) {
    loop {
        // Woken tasks run in order: by the time this one runs, the connections that
        // were ready this turn have added to the batch.
        ctx.mesh_needed.wait().await;
        let mut batches: HashMap<u32, Batch> = HashMap::new();
        for (core, messages) in ctx.core.borrow_mut().take_outbox() {
            batches.entry(core).or_insert_with(Batch::empty).messages = messages;
        }
        for (core, hand_off) in ctx.leaving.borrow_mut().drain(..) {
            batches.entry(core).or_insert_with(Batch::empty).connections.push(hand_off);
        }
        for (core, batch) in batches {
            if senders.send_to(core as usize, batch).await.is_err() {
                tracing::warn!(core, "another core stopped; dropping what was for it");
            }
        }
    }
}

impl Batch {
    fn empty() -> Batch {
        Batch { messages: Vec::new(), connections: Vec::new() }
    }
}

/// Receives the batches `peer` sends this core, until it stops.
async fn mesh_in(ctx: Rc<Ctx>, receivers: Rc<Receivers<Batch>>, peer: u32) {
    while let Ok(Some(batch)) = receivers.recv_from(peer as usize).await {
        for hand_off in batch.connections {
            adopt(&ctx, hand_off);
        }
        if !batch.messages.is_empty() {
            let mut core = ctx.core.borrow_mut();
            core.set_clock(now_us());
            core.on_mesh(batch.messages, now_ms());
            drop(core);
            ctx.kick();
        }
    }
}

/// Sends the wake-ups the core asks for, each as its own task (a slow push service
/// delays nobody), and removes endpoints the service says are gone.
async fn pushes(ctx: Rc<Ctx>) {
    loop {
        ctx.push_needed.wait().await;
        for job in ctx.core.borrow_mut().take_pushes() {
            let ctx = ctx.clone();
            glommio::spawn_local(async move {
                let outcome = ctx.pusher.push(job.clone()).await;
                if outcome == crate::push::PushOutcome::Gone {
                    ctx.core.borrow_mut().push_gone(&job);
                    ctx.kick();
                }
            })
            .detach();
        }
    }
}

/// Where a core measures disk use: the data directory and the dirs of its shards.
struct DiskPaths {
    data_dir: PathBuf,
    shards: Vec<(u32, PathBuf)>,
}

impl DiskPaths {
    /// Bytes allocated to each shard's files (segments are preallocated, so this is what
    /// they take from the file system, not what is written in them) and, on core 0, the
    /// file system's free and total bytes. A few `stat`s of small directories: cheap
    /// enough to do inline once a second.
    fn measure(&self, with_file_system: bool) -> DiskUsage {
        use std::os::unix::fs::MetadataExt;
        let allocated = |dir: &PathBuf| -> u64 {
            let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
            let files = entries.flatten().filter_map(|entry| entry.metadata().ok());
            // `blocks` counts 512-byte units whatever the file system's block size.
            files.filter(|m| m.is_file()).map(|m| m.blocks() * 512).sum()
        };
        let shard_allocated_bytes =
            self.shards.iter().map(|(id, dir)| (*id, allocated(dir))).collect();
        let file_system = with_file_system
            .then(|| rustix::fs::statvfs(&self.data_dir).ok())
            .flatten()
            .map(|fs| FileSystemSpace {
                free_bytes: fs.f_bavail.saturating_mul(fs.f_frsize),
                size_bytes: fs.f_blocks.saturating_mul(fs.f_frsize),
            });
        DiskUsage { shard_allocated_bytes, file_system }
    }
}

/// Every second: measures this core's disk use and, on the other cores, sends this
/// core's metrics to core 0 (which serves the admin endpoint).
async fn refresh_stats(ctx: Rc<Ctx>, disk: DiskPaths) {
    loop {
        let index = ctx.core.borrow().placement().index;
        let usage = disk.measure(index == 0);
        ctx.core.borrow_mut().set_disk_usage(usage);
        if index != 0 {
            ctx.core.borrow_mut().push_stats_to(0);
            ctx.mesh_needed.notify();
        }
        Timer::new(Duration::from_secs(1)).await;
    }
}

/// Takes over a connection another core handed over.
fn adopt(ctx: &Rc<Ctx>, hand_off: HandOff) {
    let HandOff { socket, wire, unread, session, auth_deadline } = hand_off;
    let stream = socket_handoff::attach(socket);
    let conn = ctx.core.borrow_mut().adopt(session);
    tracing::debug!(conn, unread = unread.len(), "adopted a connection");
    let task = connection(ctx.clone(), conn, stream, wire, unread, auth_deadline);
    glommio::spawn_local(task).detach();
}

/// Moving a socket between executors: its descriptor is duplicated (glommio's stream
/// owns and closes the original) and the duplicate is adopted on the other core. The
/// process's descriptor table is shared by its threads, so the number is valid there.
#[allow(unsafe_code)]
mod socket_handoff {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

    use glommio::net::TcpStream;

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

enum Event {
    Read(usize),
    Wrote(usize),
    Closed,
    TimedOut,
}

/// The byte transport under the frames: the socket itself, or TLS and/or WebSocket
/// layered on it. Inbound: socket → TLS → WebSocket → frames. Outbound: frames →
/// WebSocket → TLS → socket.
struct Wire {
    tls: Option<Box<rustls::ServerConnection>>,
    ws: Option<WsLayer>,
    /// WebSocket output waiting for TLS to take it (only with both layers).
    layered: Vec<u8>,
    /// Bytes ready for the socket (with any layer; plain TCP writes `outbound` itself).
    out: Vec<u8>,
    /// Scratch for the bytes between layers.
    inner: Vec<u8>,
    /// A layer failed (a TLS error): its handshake will never complete.
    failed: bool,
}

/// Which layers a listener puts on its connections.
#[derive(Clone, Copy)]
struct Layers {
    /// TLS, with the core's configuration at accept time (`Ctx::tls`).
    tls: bool,
    websocket: bool,
}

impl Wire {
    fn new(
        tls: Option<Arc<rustls::ServerConfig>>,
        websocket: bool,
        max_frame_bytes: u32,
    ) -> io::Result<Wire> {
        let tls = match tls {
            Some(config) => {
                Some(Box::new(rustls::ServerConnection::new(config).map_err(io::Error::other)?))
            }
            None => None,
        };
        let ws = websocket.then(|| WsLayer::new(max_frame_bytes as usize));
        Ok(Wire { tls, ws, layered: Vec::new(), out: Vec::new(), inner: Vec::new(), failed: false })
    }

    fn is_layered(&self) -> bool {
        self.tls.is_some() || self.ws.is_some()
    }

    /// Whether a layer's handshake (TLS, the WebSocket upgrade) is still in progress:
    /// what the core says waits in the layer until it completes.
    fn is_handshaking(&self) -> bool {
        !self.failed
            && (self.tls.as_ref().is_some_and(|tls| tls.is_handshaking())
                || self.ws.as_ref().is_some_and(|ws| ws.is_handshaking()))
    }

    /// Bytes from the socket; returns the frame bytes they carry.
    fn received<'a>(
        &'a mut self,
        bytes: &'a [u8],
        frames: &'a mut Vec<u8>,
    ) -> io::Result<&'a [u8]> {
        if !self.is_layered() {
            return Ok(bytes);
        }
        frames.clear();
        let after_tls: &[u8] = match &mut self.tls {
            None => bytes,
            Some(tls) => {
                self.inner.clear();
                let mut rest = bytes;
                while !rest.is_empty() {
                    tls.read_tls(&mut rest)?;
                    let state = tls.process_new_packets();
                    // Queue whatever rustls wants to say (handshake, alerts) even on error.
                    while tls.wants_write() {
                        tls.write_tls(&mut self.out)?;
                    }
                    let state = state.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    let mut available = state.plaintext_bytes_to_read();
                    while available > 0 {
                        let start = self.inner.len();
                        self.inner.resize(start + available, 0);
                        let n = io::Read::read(&mut tls.reader(), &mut self.inner[start..])?;
                        self.inner.truncate(start + n);
                        available -= n;
                        if n == 0 {
                            break;
                        }
                    }
                }
                &self.inner
            }
        };
        match &mut self.ws {
            None => frames.extend_from_slice(after_tls),
            Some(ws) => ws.received(after_tls, frames)?,
        }
        Ok(frames)
    }

    /// Moves frames from `outbound` down the layers into `out` (as much as TLS takes).
    fn prepare_output(&mut self, outbound: &mut Vec<u8>) -> io::Result<()> {
        let for_tls: &mut Vec<u8> = match (&mut self.ws, self.tls.is_some()) {
            (Some(ws), true) => {
                ws.send(outbound, &mut self.layered)?;
                &mut self.layered
            }
            (Some(ws), false) => return ws.send(outbound, &mut self.out),
            (None, _) => outbound,
        };
        if let Some(tls) = &mut self.tls {
            if !for_tls.is_empty() {
                let n = io::Write::write(&mut tls.writer(), for_tls)?;
                for_tls.drain(..n);
            }
            while tls.wants_write() {
                tls.write_tls(&mut self.out)?;
            }
        }
        Ok(())
    }
}

/// Moves bytes for one connection until it closes or moves to another core. `unread`:
/// frame bytes already received (from the core that handed the connection over).
async fn connection(
    ctx: Rc<Ctx>,
    conn: ConnId,
    mut stream: TcpStream,
    mut wire: Wire,
    unread: Vec<u8>,
    auth_deadline: std::time::Instant,
) {
    let core = &ctx.core;
    let mut decoder = FrameDecoder::new(core.borrow().max_frame_bytes(conn));
    let mut frames = Vec::new();
    // Until authenticated, the auth deadline runs from the connection's start (TLS and
    // handshake included, on whichever core); after, the idle timeout runs from the last
    // frame received.
    let mut timer = Timer::new(auth_deadline.saturating_duration_since(std::time::Instant::now()));
    let mut moving_to = None;
    if !unread.is_empty() {
        decoder.feed(&unread);
        moving_to = handle_frames(&ctx, conn, &mut decoder, &mut timer);
    }
    while moving_to.is_none() {
        let event = std::future::poll_fn(|cx| {
            if Pin::new(&mut timer).poll(cx).is_ready() {
                return Poll::Ready(Event::TimedOut);
            }
            let mut buffer = ctx.read_buffer.borrow_mut();
            poll_connection(core, conn, &mut stream, &mut wire, &mut buffer, cx, true)
        })
        .await;
        match event {
            Event::Read(n) => {
                let buffer = ctx.read_buffer.borrow();
                let bytes = match wire.received(&buffer[..n], &mut frames) {
                    Ok(bytes) => bytes,
                    Err(error) => {
                        if let Some(too_large) = crate::websocket::MessageTooLarge::of(&error) {
                            // A WebSocket message over the frame limit gets the typed error
                            // a frame over the limit gets on a bare stream, then a close.
                            let max = too_large.max_bytes.min(u64::from(u32::MAX)) as u32;
                            let error = tern_wire::DecodeError::FrameTooLarge {
                                frame_bytes: too_large.bytes,
                                max_frame_bytes: max,
                            };
                            core.borrow_mut().reject_malformed(conn, error);
                            continue;
                        }
                        // Send rustls's alert (queued in `tls_out`), then close.
                        tracing::debug!(%error, "TLS error; closing");
                        wire.failed = true;
                        let mut core = core.borrow_mut();
                        core.transport_failed(conn);
                        if let Some(c) = core.connection(conn) {
                            c.closing = true;
                        }
                        continue;
                    }
                };
                decoder.feed(bytes);
                drop(buffer);
                // The layers' scratch space is used within this read only.
                release_if_empty(&mut frames);
                release_if_empty(&mut wire.inner);
                moving_to = handle_frames(&ctx, conn, &mut decoder, &mut timer);
                decoder.release_if_drained();
            }
            Event::Wrote(n) => wrote(core, conn, &mut wire, n),
            Event::TimedOut => {
                core.borrow_mut().time_out(conn);
                // Give the error frame a moment to go out, then close regardless.
                timer = Timer::new(Duration::from_secs(1));
                let _ = flush(core, conn, &mut stream, &mut wire, &mut timer).await;
                break;
            }
            Event::Closed => break,
        }
    }
    if let Some(to) = moving_to {
        // Everything said so far goes out from here, so that the other core's output
        // follows it; then the socket and what was not handled yet move.
        timer = Timer::new(auth_deadline.saturating_duration_since(std::time::Instant::now()));
        let flushed = flush(core, conn, &mut stream, &mut wire, &mut timer).await;
        let session = core.borrow_mut().hand_off(conn);
        if let (true, Some(session)) = (flushed, session) {
            match socket_handoff::detach(stream) {
                Ok(socket) => {
                    let unread = decoder.take_buffered();
                    tracing::debug!(to, unread = unread.len(), "handing a connection over");
                    let hand_off = HandOff { socket, wire, unread, session, auth_deadline };
                    ctx.leaving.borrow_mut().push((to, hand_off));
                    ctx.mesh_needed.notify();
                }
                Err(error) => tracing::warn!(%error, "could not hand a connection over"),
            }
        }
        return;
    }
    core.borrow_mut().close_connection(conn, now_ms());
    ctx.kick();
}

/// Handles every whole frame the decoder holds. Returns the core the connection must
/// move to if a frame belongs there (that frame and the rest stay in the decoder).
fn handle_frames(
    ctx: &Ctx,
    conn: ConnId,
    decoder: &mut FrameDecoder,
    timer: &mut Timer,
) -> Option<u32> {
    let mut core = ctx.core.borrow_mut();
    core.set_clock(now_us());
    let now = now_ms();
    let mut moving = None;
    let mut handled = 0usize;
    loop {
        decoder.set_max_frame_bytes(core.max_frame_bytes(conn));
        match decoder.next_frame() {
            Ok(Some(frame)) => {
                if let Some(to) = core.route(conn, &frame.message) {
                    moving = Some((to, frame.header.frame_bytes()));
                    break;
                }
                core.handle_frame(conn, &frame, now);
                handled += 1;
            }
            Ok(None) => break,
            Err(error) => {
                core.reject_malformed(conn, error);
                break;
            }
        }
    }
    let authenticated =
        core.connection(conn).is_some_and(|c| matches!(c.state, ConnState::Authenticated { .. }));
    // Only a whole frame counts as traffic: a client trickling a byte at a time into a
    // frame it never finishes (slowloris) must still meet the idle timeout.
    if authenticated && handled > 0 {
        *timer = Timer::new(ctx.limits.1);
    } else if core.awaiting_link(conn) {
        // A device being linked waits for a person to approve it on the primary.
        *timer = Timer::new(Duration::from_millis(crate::core::LINK_CODE_TTL_MS));
    }
    drop(core);
    ctx.kick();
    let (to, frame_bytes) = moving?;
    decoder.unread(frame_bytes);
    Some(to)
}

/// The socket took `n` bytes of pending output.
fn wrote(core: &RefCell<Core<UringStorage>>, conn: ConnId, wire: &mut Wire, n: usize) {
    if wire.is_layered() {
        wire.out.drain(..n);
        release_if_empty(&mut wire.out);
        if let Some(c) = core.borrow_mut().connection(conn) {
            release_if_empty(&mut c.outbound);
        }
        release_if_empty(&mut wire.layered);
    } else if let Some(c) = core.borrow_mut().connection(conn) {
        c.outbound.drain(..n);
        release_if_empty(&mut c.outbound);
    }
    core.borrow_mut().on_writable(conn, now_ms());
}

/// Frees an empty buffer's memory. A connection's buffers grow to its largest burst (a
/// TLS handshake flight, a mailbox drained at reconnect); an idle connection keeps none
/// of it. Costs one allocation when the buffer is next used, against a syscall per
/// write or read.
fn release_if_empty(buffer: &mut Vec<u8>) {
    if buffer.is_empty() && buffer.capacity() > 0 {
        *buffer = Vec::new();
    }
}

/// Writes all pending output (reading nothing) until it is out, the socket fails or
/// `timer` fires. Returns whether everything went out.
async fn flush(
    core: &RefCell<Core<UringStorage>>,
    conn: ConnId,
    stream: &mut TcpStream,
    wire: &mut Wire,
    timer: &mut Timer,
) -> bool {
    let mut buffer = [0u8; 0];
    loop {
        let pending = wire.out.len()
            + core.borrow_mut().connection(conn).map_or(0, |c| c.outbound.len())
            + wire.layered.len();
        if pending == 0 {
            return true;
        }
        let event = std::future::poll_fn(|cx| {
            if Pin::new(&mut *timer).poll(cx).is_ready() {
                return Poll::Ready(Event::TimedOut);
            }
            poll_connection(core, conn, stream, wire, &mut buffer, cx, false)
        })
        .await;
        match event {
            Event::Wrote(n) => wrote(core, conn, wire, n),
            Event::Read(_) => {}
            Event::Closed | Event::TimedOut => return false,
        }
    }
}

/// One step of a connection: write pending output if the socket takes it, else (if
/// `read`) read.
fn poll_connection(
    core: &RefCell<Core<UringStorage>>,
    conn: ConnId,
    stream: &mut TcpStream,
    wire: &mut Wire,
    buffer: &mut [u8],
    cx: &mut Context<'_>,
    read: bool,
) -> Poll<Event> {
    let mut core_ref = core.borrow_mut();
    let Some(c) = core_ref.connection(conn) else { return Poll::Ready(Event::Closed) };
    c.waker = Some(cx.waker().clone());
    // With layers, frames go down through them first; what TLS accepts leaves
    // `outbound`, so the core's output bound still applies to what is not yet encrypted.
    if wire.is_layered() && wire.prepare_output(&mut c.outbound).is_err() {
        return Poll::Ready(Event::Closed);
    }
    // A connection closing before its layers' handshake is done (refused at the
    // connection limit, say) first completes it, so that the client reads the typed
    // error instead of a reset; the connection's timer bounds how long that may take.
    let closing = c.closing && !wire.is_handshaking();
    let pending_output: &[u8] = if wire.is_layered() { &wire.out } else { &c.outbound };
    if !pending_output.is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, pending_output) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Event::Closed),
            Poll::Ready(Ok(n)) => return Poll::Ready(Event::Wrote(n)),
            Poll::Pending => {}
        }
    } else if closing {
        return Poll::Ready(Event::Closed);
    }
    if closing || !read {
        // Flushing before close or hand-over: read nothing more now.
        return Poll::Pending;
    }
    drop(core_ref);
    match Pin::new(&mut *stream).poll_read(cx, buffer) {
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Event::Closed),
        Poll::Ready(Ok(n)) => Poll::Ready(Event::Read(n)),
        Poll::Pending => Poll::Pending,
    }
}
