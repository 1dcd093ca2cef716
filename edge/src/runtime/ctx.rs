//! One core's runtime state, shared by its tasks, and what every task does after it
//! handed the core an input: [`Ctx::kick`] takes the core's outputs — connections to
//! wake, effects to run (codes, pushes, blob and CPU jobs), commits and mesh sends to
//! start, the timer to move — and sets them going.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tern_engine::blobs::FsBlobs;
use tern_engine::uring::UringStorage;

use super::HandOff;
use crate::code_sender::CodeSender;
use crate::core::conns::ConnId;
use crate::core::effects::Effect;
use crate::core::shared::Now;
use crate::core::Core;
use crate::push::{PushOutcome, PushSender};

/// The time now: the wall clock, and the monotonic clock every core shares
/// (`CLOCK_MONOTONIC`, so an auth deadline set on one core means the same on another).
pub fn now() -> Now {
    let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mono = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let mono_us = (mono.tv_sec as u64).saturating_mul(1_000_000) + (mono.tv_nsec as u64) / 1000;
    Now { unix_ms, mono_us }
}

/// A single-core wake-up flag: set by whoever has work, awaited by one task.
#[derive(Default)]
pub struct Notify {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
    raised: Cell<bool>,
    raised_waiters: RefCell<Vec<Waker>>,
}

impl Notify {
    /// Wakes the waiting task (or the next one to wait).
    pub fn notify(&self) {
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
    pub fn raise(&self) {
        self.raised.set(true);
        self.notify();
    }

    /// Waits until [`Notify::raise`].
    pub fn wait_raised(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.raised.get() {
                Poll::Ready(())
            } else {
                self.raised_waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
    }

    /// Waits for the next [`Notify::notify`].
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
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

/// One core's shared state, for its tasks.
pub struct Ctx {
    /// The core.
    pub core: Rc<RefCell<Core<UringStorage>>>,
    /// Wakes the committer.
    pub commit_needed: Notify,
    /// When a record first asked the committer for a commit since it last woke
    /// (monotonic µs), for the commit-wait histogram.
    pub commit_asked_us: Cell<Option<u64>>,
    /// Set by the once-a-second lazy flush: the next commit round also takes the shards
    /// that hold only mailbox acks.
    pub flush_lazy: Cell<bool>,
    /// Wakes the mesh sender.
    pub mesh_needed: Notify,
    /// Raised when the server stops.
    pub stopping: Notify,
    /// Wakes the timer task when an earlier deadline appears.
    pub timer_changed: Notify,
    /// The deadline the timer task sleeps until (monotonic ms; `u64::MAX`: none).
    pub timer_target_ms: Cell<u64>,
    /// The wakers of the connection tasks, by connection.
    pub wakers: RefCell<HashMap<ConnId, Waker>>,
    /// Sends verification codes.
    pub code_sender: Box<dyn CodeSender>,
    /// Sends wake-ups to offline devices.
    pub pusher: Box<dyn PushSender>,
    /// The media files (blob jobs run in the blocking pool).
    pub blobs: FsBlobs,
    /// Load balancers whose connections start with a PROXY protocol v2 header.
    pub proxy_protocol_from: Vec<std::net::IpAddr>,
    /// Each client socket's kernel buffers, at most (0: no cap).
    pub socket_buffer_bytes: usize,
    /// Connections leaving for other cores, sent with the next batch.
    pub leaving: RefCell<Vec<(u32, HandOff)>>,
    /// This core's TLS configuration, for the connections it accepts next (`None`: no
    /// TLS listener). Certificate renewal without a restart: on SIGHUP each core reads
    /// the files again and replaces its own `Arc` here; connections already open keep
    /// the `ServerConnection` (and so the configuration) they started with. Each core
    /// building and owning its copy follows the thread-per-core design: the accept path
    /// reads a `RefCell` on its own thread, no lock or shared atomic is involved, and
    /// each core also gets its own TLS session cache (rustls keeps it behind a mutex,
    /// which a shared configuration would make a cross-core lock). The price is that
    /// each core reads two small files per reload, and a resumption attempt that lands
    /// on another core does a full handshake.
    pub tls: RefCell<Option<Arc<rustls::ServerConfig>>>,
    /// How to rebuild `tls`.
    pub tls_settings: crate::tls::TlsSettings,
    /// The one read buffer of this core's connections ([`READ_BUFFER_BYTES`]). glommio's
    /// `poll_read` receives synchronously into the buffer it is given and, when nothing
    /// is there, waits on a readiness poll that holds no buffer; a connection's task uses
    /// the bytes (TLS, WebSocket, frame decoder: each copies what it keeps) before its
    /// next `.await`, so no other task can see them, and an idle connection holds no read
    /// buffer at all (`bench density`, docs/BENCHMARKS.md). Borrowed only between an
    /// `.await` and the next.
    pub read_buffer: RefCell<Vec<u8>>,
}

/// Bytes a connection reads at most at once (the shared per-core read buffer).
pub const READ_BUFFER_BYTES: usize = 64 * 1024;

impl Ctx {
    /// After the core handled an input: wake the connections it wrote to, run its
    /// effects, and wake the committer, the mesh sender and the timer as needed.
    pub fn kick(self: &Rc<Self>) {
        let mut core = self.core.borrow_mut();
        while let Some(conn) = core.poll_ready() {
            if let Some(waker) = self.wakers.borrow_mut().remove(&conn) {
                waker.wake();
            }
        }
        let mut effects = Vec::new();
        while let Some(effect) = core.poll_effect() {
            effects.push(effect);
        }
        if core.has_pending_writes() {
            if self.commit_asked_us.get().is_none() {
                self.commit_asked_us.set(Some(now().mono_us));
            }
            self.commit_needed.notify();
        }
        if core.has_mesh_output() {
            self.mesh_needed.notify();
        }
        if core.poll_timeout().is_some_and(|t| t < self.timer_target_ms.get()) {
            self.timer_changed.notify();
        }
        drop(core);
        for effect in effects {
            self.run(effect);
        }
    }

    /// Does one effect: a code now (the sender queues it), a push or a job as a task.
    fn run(self: &Rc<Self>, effect: Effect) {
        match effect {
            Effect::SendCode { phone, code } => self.code_sender.send_code(&phone, &code),
            Effect::Push(job) => {
                let ctx = self.clone();
                glommio::spawn_local(async move {
                    let outcome = ctx.pusher.push(job.clone()).await;
                    if outcome == PushOutcome::Gone {
                        ctx.core.borrow_mut().handle_push_gone(&job, now());
                        ctx.kick();
                    }
                })
                .detach();
            }
            Effect::Work(order) => {
                let ctx = self.clone();
                let mut blobs = self.blobs.clone();
                glommio::spawn_local(async move {
                    let job = move || crate::work::run(order, &mut blobs);
                    let done = glommio::executor().spawn_blocking(job).await;
                    ctx.core.borrow_mut().handle_work_done(done, now());
                    ctx.kick();
                })
                .detach();
            }
        }
    }
}

/// How long a core stops accepting after `accept` failed (out of descriptors).
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(50);
