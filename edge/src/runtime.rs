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
use std::task::{Context, Poll, Waker};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use tern_engine::uring::UringStorage;
use tern_engine::{DataDir, ShardConfig, ShardHandle};
use tern_wire::FrameDecoder;

use crate::code_sender::LogCodeSender;
use crate::core::{ConnId, Core, CoreConfig};

/// How `ternd` is started.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The TCP listen address (port 0 picks a free port; the log says which).
    pub listen: SocketAddr,
    /// Shards of a new data directory (an existing one keeps its own count).
    pub shards: u32,
    /// Protocol limits.
    pub core: CoreConfig,
}

/// Milliseconds since the Unix epoch (the only place the edge reads the clock).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A single-core wake-up flag: set by whoever has work, awaited by one task.
#[derive(Default)]
struct Notify {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    fn notify(&self) {
        self.set.set(true);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
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
    let handle = LocalExecutorBuilder::new(Placement::Fixed(0))
        .name("tern-core-0")
        .spawn(move || serve(config, data_dir))
        .map_err(|e| ServerError::Io(io::Error::other(e.to_string())))?;
    handle.join().map_err(|e| ServerError::Io(io::Error::other(e.to_string())))?
}

async fn serve(config: ServerConfig, data_dir: DataDir) -> Result<(), ServerError> {
    let shard_count = data_dir.manifest().shard_count;
    let mut shards = Vec::with_capacity(shard_count as usize);
    for shard_id in 0..shard_count {
        let storage = UringStorage::new(data_dir.shard_dir(shard_id)).map_err(ServerError::Io)?;
        let shard = ShardHandle::open(storage, ShardConfig::new(shard_id))
            .await
            .map_err(|error| ServerError::Shard { shard_id, error })?;
        shards.push(shard);
    }
    let core =
        Rc::new(RefCell::new(Core::new(shards, config.core.clone(), Box::new(LogCodeSender))));
    let commit_needed = Rc::new(Notify::default());

    glommio::spawn_local(committer(core.clone(), commit_needed.clone())).detach();

    let listener = TcpListener::bind(config.listen).map_err(|e| ServerError::Io(e.into()))?;
    let local = listener.local_addr().map_err(|e| ServerError::Io(e.into()))?;
    tracing::info!(%local, "listening (tcp)");
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(error) => {
                // Out of descriptors or a connection reset during accept: keep serving.
                tracing::warn!(%error, "accept failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = core.borrow_mut().open_connection();
        glommio::spawn_local(connection(core.clone(), commit_needed.clone(), conn, stream))
            .detach();
    }
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
                    if let Err(error) = shard.commit().await {
                        let why = "commit failed; the shard refuses writes until restart";
                        tracing::error!(%error, "{why}");
                    }
                }
            }
            core.borrow_mut().on_durable(now_ms());
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
}

/// Moves bytes for one connection until it closes.
async fn connection(
    core: Rc<RefCell<Core<UringStorage>>>,
    commit_needed: Rc<Notify>,
    conn: ConnId,
    mut stream: TcpStream,
) {
    let mut decoder = FrameDecoder::new(core.borrow().max_frame_bytes(conn));
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let event =
            std::future::poll_fn(|cx| poll_connection(&core, conn, &mut stream, &mut buffer, cx))
                .await;
        match event {
            Event::Read(n) => {
                decoder.feed(&buffer[..n]);
                let mut core_ref = core.borrow_mut();
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
                if core_ref.has_pending_writes() {
                    commit_needed.notify();
                }
            }
            Event::Wrote(n) => {
                let mut core_ref = core.borrow_mut();
                if let Some(c) = core_ref.connection(conn) {
                    c.outbound.drain(..n);
                }
                core_ref.on_writable(conn, now_ms());
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
    buffer: &mut [u8],
    cx: &mut Context<'_>,
) -> Poll<Event> {
    let mut core_ref = core.borrow_mut();
    let Some(c) = core_ref.connection(conn) else { return Poll::Ready(Event::Closed) };
    c.waker = Some(cx.waker().clone());
    if !c.outbound.is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, &c.outbound) {
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
