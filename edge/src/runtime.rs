//! The glommio driver: the only module of the edge that knows about the runtime.
//!
//! One executor (pinned to the first core) owns every shard, the listener and the
//! connections. Per connection, one task moves bytes: socket → `FrameDecoder` →
//! `Core::handle_frame`, and `Connection::outbound` → socket. One committer task writes
//! and syncs whatever the shards accumulated, then lets the core release durable replies
//! and deliver new envelopes. Several executors with a channel mesh come next.

use std::cell::{Cell, RefCell};
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
use glommio::net::{TcpListener, TcpStream};
use glommio::timer::Timer;
use glommio::{LocalExecutorBuilder, Placement};
use tern_engine::uring::UringStorage;
use tern_engine::{DataDir, ShardConfig, ShardHandle};
use tern_wire::FrameDecoder;

use crate::code_sender::{CodeSender, LogCodeSender, WebhookCodeSender};
use crate::core::{ConnId, ConnState, Core, CoreConfig};
use crate::websocket::WsLayer;

/// How `ternd` is started.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The TCP listen address (port 0 picks a free port; the log says which).
    pub listen: SocketAddr,
    /// Shards of a new data directory (an existing one keeps its own count).
    pub shards: u32,
    /// The TLS listen address, if any.
    pub tls_listen: Option<SocketAddr>,
    /// The WebSocket listen address, if any.
    pub ws_listen: Option<SocketAddr>,
    /// The WebSocket-over-TLS listen address, if any.
    pub wss_listen: Option<SocketAddr>,
    /// The TLS certificate.
    pub tls: crate::tls::CertSource,
    /// The admin HTTP address (`/healthz`, `/metrics`), if any.
    pub admin: Option<SocketAddr>,
    /// A connection must finish the handshake and authenticate (or register) this fast.
    pub auth_deadline: Duration,
    /// An authenticated connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Where verification codes go: an SMS gateway webhook, or the log if `None`.
    pub code_webhook: Option<crate::code_sender::WebhookUrl>,
    /// Client connections held at most (beyond it new ones get `TooManyConnections`);
    /// `None`: derived from the process's file descriptor limit.
    pub max_connections: Option<usize>,
    /// How often shards are checkpointed and their space reclaimed.
    pub maintenance_interval: Duration,
    /// Protocol limits.
    pub core: CoreConfig,
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

pub use stop_signal::StopSignal;

/// The stop request raised by SIGINT or SIGTERM.
///
/// It is an atomic written by the OS signal handler and read by one core's watcher task:
/// not state shared between cores, which the ban in `clippy.toml` is about.
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
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerError::DataDir(e) => write!(f, "{e}"),
            ServerError::Shard { shard_id, error } => write!(f, "shard {shard_id}: {error}"),
            ServerError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ServerError {}

/// Runs the server until the process is stopped.
pub fn run(config: ServerConfig) -> Result<(), ServerError> {
    let data_dir = DataDir::open_or_create(&config.data_dir, config.shards, now_ms())
        .map_err(ServerError::DataDir)?;
    let manifest = data_dir.manifest();
    tracing::info!(
        data_dir = %config.data_dir.display(),
        shards = manifest.shard_count,
        "data directory open"
    );
    // SIGINT/SIGTERM set a flag the executor checks: stop accepting, flush, exit 0.
    let stop = StopSignal::install().map_err(ServerError::Io)?;
    let handle = LocalExecutorBuilder::new(Placement::Fixed(0))
        .name("tern-core-0")
        .spawn(move || serve(config, data_dir, stop))
        .map_err(|e| ServerError::Io(io::Error::other(e.to_string())))?;
    handle.join().map_err(|e| ServerError::Io(io::Error::other(e.to_string())))?
}

async fn serve(
    config: ServerConfig,
    data_dir: DataDir,
    stop: StopSignal,
) -> Result<(), ServerError> {
    let shard_count = data_dir.manifest().shard_count;
    let mut shards = Vec::with_capacity(shard_count as usize);
    for shard_id in 0..shard_count {
        let storage = UringStorage::new(data_dir.shard_dir(shard_id)).map_err(ServerError::Io)?;
        let shard = ShardHandle::open(storage, ShardConfig::new(shard_id))
            .await
            .map_err(|error| ServerError::Shard { shard_id, error })?;
        shards.push(shard);
    }
    let code_sender: Box<dyn CodeSender> = match &config.code_webhook {
        Some(url) => {
            let (host, port) = (&url.host, url.port);
            tracing::info!(%host, port, "verification codes go to the webhook");
            Box::new(WebhookCodeSender::new(url.clone(), 5, Duration::from_millis(200)))
        }
        None => {
            tracing::warn!("verification codes are written to this log (development only)");
            Box::new(LogCodeSender)
        }
    };
    let core = Rc::new(RefCell::new(Core::new(shards, config.core.clone(), code_sender)));
    let commit_needed = Rc::new(Notify::default());
    let stopping = Rc::new(Notify::default());

    glommio::spawn_local(committer(core.clone(), commit_needed.clone())).detach();
    glommio::spawn_local(maintenance(core.clone(), config.maintenance_interval)).detach();
    glommio::spawn_local(watch_signals(stop, stopping.clone())).detach();
    if let Some(admin) = config.admin {
        let listener = TcpListener::bind(admin).map_err(|e| ServerError::Io(e.into()))?;
        let local = listener.local_addr().map_err(|e| ServerError::Io(e.into()))?;
        tracing::info!(%local, "admin endpoint listening (/healthz, /metrics)");
        glommio::spawn_local(crate::admin::serve(listener, core.clone())).detach();
    }

    let limits = (config.auth_deadline, config.idle_timeout);
    let fd_limit = open_files_limit();
    // Keep descriptors for segments, checkpoints, listeners and the admin endpoint.
    let derived = fd_limit.map_or(10_000, |limit| limit.saturating_sub(256) as usize);
    let max_connections = config.max_connections.unwrap_or(derived);
    tracing::info!(fd_limit = ?fd_limit, max_connections, "connection limit");
    core.borrow_mut().set_max_connections(max_connections);
    let listener = TcpListener::bind(config.listen).map_err(|e| ServerError::Io(e.into()))?;
    let local = listener.local_addr().map_err(|e| ServerError::Io(e.into()))?;
    tracing::info!(%local, "listening (tcp)");
    let plain = Layers { tls: None, websocket: false };
    let mut accepting = vec![glommio::spawn_local(accept_loop(
        listener,
        plain,
        core.clone(),
        commit_needed.clone(),
        stopping.clone(),
        limits,
    ))];
    let tls_config = match (config.tls_listen, config.wss_listen) {
        (None, None) => None,
        _ => Some(crate::tls::server_config(&config.tls).map_err(ServerError::Io)?),
    };
    let extra = [
        (config.tls_listen, "listening (tls)", true, false),
        (config.ws_listen, "listening (websocket)", false, true),
        (config.wss_listen, "listening (websocket over tls)", true, true),
    ];
    for (address, what, tls, websocket) in extra {
        let Some(address) = address else { continue };
        let listener = TcpListener::bind(address).map_err(|e| ServerError::Io(e.into()))?;
        let local = listener.local_addr().map_err(|e| ServerError::Io(e.into()))?;
        tracing::info!(%local, "{what}");
        let layers = Layers { tls: if tls { tls_config.clone() } else { None }, websocket };
        accepting.push(glommio::spawn_local(accept_loop(
            listener,
            layers,
            core.clone(),
            commit_needed.clone(),
            stopping.clone(),
            limits,
        )));
    }
    for task in accepting {
        task.await;
    }

    // Shutdown: no new connections; make everything appended durable, release the
    // replies that waited for it, tell clients, give their sockets a moment to flush.
    tracing::info!("stopping: flushing and closing connections");
    let shards: Vec<_> = core.borrow().shards().to_vec();
    for shard in &shards {
        while shard.borrow().has_pending() {
            if shard.commit().await.is_err() {
                break;
            }
        }
    }
    core.borrow_mut().on_durable(now_ms());
    core.borrow_mut().shut_down();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while core.borrow().connection_count() > 0 && std::time::Instant::now() < deadline {
        Timer::new(Duration::from_millis(20)).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Accepts connections on one listener until the server stops.
async fn accept_loop(
    listener: TcpListener,
    layers: Layers,
    core: Rc<RefCell<Core<UringStorage>>>,
    commit_needed: Rc<Notify>,
    stopping: Rc<Notify>,
    limits: (Duration, Duration),
) {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            stopping.wait_raised().await;
            None
        })
        .await;
        let stream = match accepted {
            Some(Ok(stream)) => stream,
            Some(Err(error)) => {
                // Out of descriptors or a connection reset during accept: keep serving.
                tracing::warn!(%error, "accept failed");
                continue;
            }
            None => break,
        };
        let _ = stream.set_nodelay(true);
        let max_frame_bytes = core.borrow().config().max_frame_bytes;
        let wire = match Wire::new(&layers, max_frame_bytes) {
            Ok(wire) => wire,
            Err(error) => {
                tracing::warn!(%error, "could not start TLS");
                continue;
            }
        };
        let conn = core.borrow_mut().open_connection();
        if core.borrow().connection_count() > core.borrow().max_connections() {
            // Refuse cleanly: a typed error on this connection, then close it.
            core.borrow_mut().refuse_connection(conn);
        }
        let task = connection(core.clone(), commit_needed.clone(), conn, stream, limits, wire);
        glommio::spawn_local(task).detach();
    }
}

/// Periodically checkpoints every shard that changed and reclaims space (deleting
/// drained segments, compacting mostly-dead ones), so recovery stays short and disk use
/// follows the backlog.
async fn maintenance(core: Rc<RefCell<Core<UringStorage>>>, interval: Duration) {
    let mut checkpointed: Vec<u64> = Vec::new();
    loop {
        Timer::new(interval).await;
        let shards: Vec<_> = core.borrow().shards().to_vec();
        checkpointed.resize(shards.len(), 0);
        for (index, shard) in shards.iter().enumerate() {
            let durable = shard.borrow().durable_seq();
            if durable == checkpointed[index] {
                continue;
            }
            match shard.reclaim(now_ms()).await {
                Ok(deleted) => {
                    checkpointed[index] = shard.borrow().durable_seq();
                    if deleted > 0 {
                        tracing::info!(shard = index, deleted, "reclaimed segments");
                    }
                }
                Err(error) => {
                    tracing::error!(shard = index, %error, "checkpoint or reclaim failed")
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

/// Turns the signal flag into a wake-up of the accept loops.
async fn watch_signals(stop: StopSignal, stopping: Rc<Notify>) {
    while !stop.raised() {
        Timer::new(Duration::from_millis(100)).await;
    }
    stopping.raise();
}

/// Commits whatever the shards accumulated, as long as there is something, then lets
/// the core release durable replies and deliver. Group commit: appends that arrive while
/// a commit is in flight go into the next one.
async fn committer(core: Rc<RefCell<Core<UringStorage>>>, commit_needed: Rc<Notify>) {
    loop {
        commit_needed.wait().await;
        loop {
            let shards: Vec<_> = core.borrow().shards().to_vec();
            let mut committed_any = false;
            for shard in &shards {
                if shard.borrow().has_pending() {
                    committed_any = true;
                    let records_before = shard.borrow().counters().committed_records;
                    if let Err(error) = shard.commit().await {
                        let why = "commit failed; the shard refuses writes until restart";
                        tracing::error!(%error, "{why}");
                    }
                    let records = shard.borrow().counters().committed_records - records_before;
                    if records > 0 {
                        core.borrow_mut().commit_batch_records.observe(records as f64);
                    }
                }
            }
            let mut core_ref = core.borrow_mut();
            core_ref.set_clock(now_us());
            core_ref.on_durable(now_ms());
            drop(core_ref);
            if !committed_any {
                break;
            }
        }
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
}

/// Which layers a listener puts on its connections.
#[derive(Clone)]
struct Layers {
    tls: Option<Arc<rustls::ServerConfig>>,
    websocket: bool,
}

impl Wire {
    fn new(layers: &Layers, max_frame_bytes: u32) -> io::Result<Wire> {
        let tls = match &layers.tls {
            Some(config) => Some(Box::new(
                rustls::ServerConnection::new(config.clone()).map_err(io::Error::other)?,
            )),
            None => None,
        };
        let ws = layers.websocket.then(|| WsLayer::new(max_frame_bytes as usize));
        Ok(Wire { tls, ws, layered: Vec::new(), out: Vec::new(), inner: Vec::new() })
    }

    fn is_layered(&self) -> bool {
        self.tls.is_some() || self.ws.is_some()
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

/// Moves bytes for one connection until it closes.
async fn connection(
    core: Rc<RefCell<Core<UringStorage>>>,
    commit_needed: Rc<Notify>,
    conn: ConnId,
    mut stream: TcpStream,
    (auth_deadline, idle_timeout): (Duration, Duration),
    mut wire: Wire,
) {
    let mut decoder = FrameDecoder::new(core.borrow().max_frame_bytes(conn));
    let mut buffer = vec![0u8; 64 * 1024];
    let mut frames = Vec::new();
    // Until authenticated, the auth deadline runs from the connection's start (TLS and
    // handshake included); after, the idle timeout runs from the last frame received.
    let mut timer = Timer::new(auth_deadline);
    loop {
        let event = std::future::poll_fn(|cx| {
            if Pin::new(&mut timer).poll(cx).is_ready() {
                return Poll::Ready(Event::TimedOut);
            }
            poll_connection(&core, conn, &mut stream, &mut wire, &mut buffer, cx)
        })
        .await;
        match event {
            Event::Read(n) => {
                let bytes = match wire.received(&buffer[..n], &mut frames) {
                    Ok(bytes) => bytes,
                    Err(error) => {
                        // Send rustls's alert (queued in `tls_out`), then close.
                        tracing::debug!(%error, "TLS error; closing");
                        if let Some(c) = core.borrow_mut().connection(conn) {
                            c.closing = true;
                        }
                        continue;
                    }
                };
                decoder.feed(bytes);
                let mut core_ref = core.borrow_mut();
                core_ref.set_clock(now_us());
                loop {
                    decoder.set_max_frame_bytes(core_ref.max_frame_bytes(conn));
                    match decoder.next_frame() {
                        Ok(Some(frame)) => core_ref.handle_frame(conn, &frame, now_ms()),
                        Ok(None) => break,
                        Err(error) => {
                            core_ref.reject_malformed(conn, error);
                            break;
                        }
                    }
                }
                let authenticated = core_ref
                    .connection(conn)
                    .is_some_and(|c| matches!(c.state, ConnState::Authenticated { .. }));
                if authenticated {
                    timer = Timer::new(idle_timeout);
                }
                if core_ref.has_pending_writes() {
                    commit_needed.notify();
                }
            }
            Event::Wrote(n) => {
                if wire.is_layered() {
                    wire.out.drain(..n);
                } else {
                    let mut core_ref = core.borrow_mut();
                    if let Some(c) = core_ref.connection(conn) {
                        c.outbound.drain(..n);
                    }
                }
                core.borrow_mut().on_writable(conn, now_ms());
            }
            Event::TimedOut => {
                core.borrow_mut().time_out(conn);
                // Give the error frame a moment to go out, then close regardless.
                timer = Timer::new(Duration::from_secs(1));
                loop {
                    let flushed = std::future::poll_fn(|cx| {
                        if Pin::new(&mut timer).poll(cx).is_ready() {
                            return Poll::Ready(Event::Closed);
                        }
                        poll_connection(&core, conn, &mut stream, &mut wire, &mut buffer, cx)
                    })
                    .await;
                    match flushed {
                        Event::Wrote(n) if wire.is_layered() => {
                            wire.out.drain(..n);
                        }
                        Event::Wrote(n) => {
                            if let Some(c) = core.borrow_mut().connection(conn) {
                                c.outbound.drain(..n);
                            }
                        }
                        Event::Read(_) => {}
                        Event::Closed | Event::TimedOut => break,
                    }
                }
                break;
            }
            Event::Closed => break,
        }
    }
    core.borrow_mut().close_connection(conn);
}

/// One step of a connection: write pending output if the socket takes it, else read.
fn poll_connection(
    core: &Rc<RefCell<Core<UringStorage>>>,
    conn: ConnId,
    stream: &mut TcpStream,
    wire: &mut Wire,
    buffer: &mut [u8],
    cx: &mut Context<'_>,
) -> Poll<Event> {
    let mut core_ref = core.borrow_mut();
    let Some(c) = core_ref.connection(conn) else { return Poll::Ready(Event::Closed) };
    c.waker = Some(cx.waker().clone());
    // With layers, frames go down through them first; what TLS accepts leaves
    // `outbound`, so the core's output bound still applies to what is not yet encrypted.
    if wire.is_layered() && wire.prepare_output(&mut c.outbound).is_err() {
        return Poll::Ready(Event::Closed);
    }
    let pending_output: &[u8] = if wire.is_layered() { &wire.out } else { &c.outbound };
    if !pending_output.is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, pending_output) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Event::Closed),
            Poll::Ready(Ok(n)) => return Poll::Ready(Event::Wrote(n)),
            Poll::Pending => {}
        }
    } else if c.closing {
        return Poll::Ready(Event::Closed);
    }
    if c.closing {
        // Flushing before close: read nothing more from a peer we are dropping.
        return Poll::Pending;
    }
    drop(core_ref);
    match Pin::new(&mut *stream).poll_read(cx, buffer) {
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Event::Closed),
        Poll::Ready(Ok(n)) => Poll::Ready(Event::Read(n)),
        Poll::Pending => Poll::Pending,
    }
}
