//! The tasks of a core besides its connections: the committer (group commit), the
//! maintenance pass, the mesh sender and receivers, the deadline timer, the metrics
//! refresher and the signal watcher. Each hands the core its input and then `kick`s.

use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::future;
use glommio::channels::channel_mesh::{Receivers, Senders};
use glommio::timer::Timer;
use tern_engine::uring::UringStorage;
use tern_engine::ShardHandle;

use super::conn::connection;
use super::ctx::{now, Ctx};
use super::{socket_handoff, Batch, HandOff, ReloadSignal, StopSignal};
use crate::stats::{DiskUsage, FileSystemSpace};

/// Periodically checkpoints every shard of this core that changed and reclaims space
/// (deleting drained segments, compacting mostly-dead ones), so recovery stays short and
/// disk use follows the backlog.
pub async fn maintenance(ctx: Rc<Ctx>, interval: Duration) {
    let mut checkpointed: HashMap<u32, u64> = HashMap::new();
    loop {
        Timer::new(interval).await;
        let expired = ctx.core.borrow_mut().expire_media(now());
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
            match shard.reclaim(now().unix_ms).await {
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

/// Turns the stop flag into a wake-up of the accept loops, and the reload flag into a
/// new TLS configuration for this core.
pub async fn watch_signals(stop: StopSignal, reload: ReloadSignal, ctx: Rc<Ctx>) {
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

/// Commits this core's shards in rounds, as long as some have records someone waits for,
/// then lets the core release durable replies and deliver. A round commits every shard
/// with awaited records at once, each in its own task, so their writes and fdatasyncs
/// are in flight together (io_uring) and a round costs about one fdatasync; appends that
/// arrive meanwhile form the next round (group commit, no timer). Two alternatives were
/// measured and dropped (docs/BENCHMARKS.md, issue 21): a commit loop per shard, which
/// made more, smaller commits, and releasing each shard's replies as soon as it is
/// durable, which scans every parked reply once per shard instead of once per round;
/// both cost 30–45 % more CPU per message at saturation.
pub async fn committer(ctx: Rc<Ctx>) {
    loop {
        ctx.commit_needed.wait().await;
        let mut asked_us = ctx.commit_asked_us.take();
        loop {
            // Shards holding only mailbox acks wait for the lazy flush.
            let lazy_too = ctx.flush_lazy.take();
            let shards = ctx.core.borrow().owned_shards();
            let commits: Vec<_> = shards
                .into_iter()
                .filter(|(_, shard)| {
                    let shard = shard.borrow();
                    shard.needs_commit() || (lazy_too && shard.has_pending())
                })
                .map(|(_, shard)| glommio::spawn_local(commit_shard(ctx.clone(), shard, asked_us)))
                .collect();
            for commit in commits {
                commit.await;
            }
            ctx.core.borrow_mut().handle_durable(now());
            ctx.kick();
            if !ctx.core.borrow().has_pending_writes() {
                break;
            }
            asked_us = ctx.commit_asked_us.take();
        }
    }
}

/// Commits what waits in shards that hold only mailbox acks (which start no commit):
/// once a second, so an acknowledged delivery is durable within about a second.
fn flush_lazy(ctx: &Rc<Ctx>) {
    let owned = ctx.core.borrow().owned_shards();
    if owned.iter().any(|(_, shard)| shard.borrow().has_pending()) {
        ctx.flush_lazy.set(true);
        ctx.commit_needed.notify();
    }
}

/// Commits one shard's pending records and counts the batch and its timing. `asked_us`:
/// when a record first asked for this round.
async fn commit_shard(ctx: Rc<Ctx>, shard: ShardHandle<UringStorage>, asked_us: Option<u64>) {
    let started_us = now().mono_us;
    let records_before = shard.borrow().counters().committed_records;
    match shard.commit().await {
        Ok(_) => {}
        Err(tern_engine::WriteError::StorageFull) => tracing::error!(
            "commit found the disk full; the shard refuses writes until space is back \
             (tried again every second)"
        ),
        Err(error) => {
            tracing::error!(%error, "commit failed; the shard refuses writes until restart")
        }
    }
    let done = now();
    let records = shard.borrow().counters().committed_records - records_before;
    let mut core = ctx.core.borrow_mut();
    if records > 0 {
        core.observe_commit_batch(records);
        let waited = started_us.saturating_sub(asked_us.unwrap_or(started_us));
        core.observe_commit(waited, done.mono_us - started_us);
    }
    drop(core);
}

/// Sends each other core one batch per loop turn: the core's outbox and the connections
/// leaving for it.
pub async fn mesh_out(ctx: Rc<Ctx>, senders: Senders<Batch>) {
    loop {
        // Woken tasks run in order: by the time this one runs, the connections that
        // were ready this turn have added to the batch.
        ctx.mesh_needed.wait().await;
        let mut batches: HashMap<u32, Batch> = HashMap::new();
        let outbox = ctx.core.borrow_mut().poll_mesh();
        ctx.kick();
        for (to, messages) in outbox {
            // Node 0, this process, is all there is until the cluster adds a transport.
            batches.entry(to.core).or_insert_with(Batch::empty).messages = messages;
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
pub async fn mesh_in(ctx: Rc<Ctx>, receivers: Rc<Receivers<Batch>>, peer: u32) {
    while let Ok(Some(batch)) = receivers.recv_from(peer as usize).await {
        for hand_off in batch.connections {
            adopt(&ctx, hand_off);
        }
        if !batch.messages.is_empty() {
            ctx.core.borrow_mut().handle_mesh(batch.messages, now());
            ctx.kick();
        }
    }
}

/// Where a core measures disk use: the data directory and the dirs of its shards.
pub struct DiskPaths {
    pub data_dir: PathBuf,
    /// Each owned shard's directory.
    pub shards: Vec<(u32, PathBuf)>,
}

impl DiskPaths {
    /// Bytes allocated to each shard's files (segments are preallocated, so this is what
    /// they take from the file system, not what is written in them) and the file
    /// system's free and total bytes. A few `stat`s of small directories and one
    /// `statvfs`: cheap enough to do inline once a second.
    fn measure(&self) -> DiskUsage {
        use std::os::unix::fs::MetadataExt;
        let allocated = |dir: &PathBuf| -> u64 {
            let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
            let files = entries.flatten().filter_map(|entry| entry.metadata().ok());
            // `blocks` counts 512-byte units whatever the file system's block size.
            files.filter(|m| m.is_file()).map(|m| m.blocks() * 512).sum()
        };
        let shard_allocated_bytes =
            self.shards.iter().map(|(id, dir)| (*id, allocated(dir))).collect();
        let file_system = rustix::fs::statvfs(&self.data_dir).ok().map(|fs| FileSystemSpace {
            free_bytes: fs.f_bavail.saturating_mul(fs.f_frsize),
            size_bytes: fs.f_blocks.saturating_mul(fs.f_frsize),
        });
        DiskUsage { shard_allocated_bytes, file_system }
    }
}

/// Every second: measures this core's disk use (each core checks its own disk reserve
/// with it), commits again any shard stalled on a full disk and, on the other cores,
/// sends this core's metrics to core 0 (which serves the admin endpoint).
pub async fn refresh_stats(ctx: Rc<Ctx>, disk: DiskPaths) {
    loop {
        let index = ctx.core.borrow().placement().index;
        let usage = disk.measure();
        ctx.core.borrow_mut().set_disk_usage(usage);
        flush_lazy(&ctx);
        retry_stalled(&ctx).await;
        if index != 0 {
            ctx.core.borrow_mut().push_stats_to(0);
            ctx.mesh_needed.notify();
        }
        Timer::new(Duration::from_secs(1)).await;
    }
}

/// Commits again each shard whose last commit found the disk full (the engine kept its
/// batches and refuses appends meanwhile): once space is back the shard writes on by
/// itself, with no restart, and the replies that waited for those records go out. While
/// the disk is still full the attempt fails as before and changes nothing.
async fn retry_stalled(ctx: &Rc<Ctx>) {
    let shards = ctx.core.borrow().owned_shards();
    for (shard_id, shard) in shards {
        if !shard.borrow().write_stalled() {
            continue;
        }
        if shard.commit().await.is_ok() {
            tracing::warn!(shard = shard_id, "the disk has space again; the shard writes again");
            ctx.core.borrow_mut().handle_durable(now());
            ctx.kick();
        }
    }
}

/// Takes over a connection another core handed over.
fn adopt(ctx: &Rc<Ctx>, hand_off: HandOff) {
    let HandOff { socket, wire, unread, session } = hand_off;
    let stream = socket_handoff::attach(socket);
    let conn = ctx.core.borrow_mut().adopt(session, now());
    tracing::debug!(conn, unread = unread.len(), "adopted a connection");
    glommio::spawn_local(connection(ctx.clone(), conn, stream, wire, unread)).detach();
}

/// Sleeps until the core's earliest deadline (or an earlier one appears), then lets the
/// core handle what passed: one timer per core, whatever the number of connections.
pub async fn timers(ctx: Rc<Ctx>) {
    loop {
        let next = ctx.core.borrow().poll_timeout();
        ctx.timer_target_ms.set(next.unwrap_or(u64::MAX));
        let sleep_ms = next.map_or(3_600_000, |t| t.saturating_sub(now().mono_us / 1000));
        let sleep = Timer::new(Duration::from_millis(sleep_ms));
        future::or(
            async {
                sleep.await;
            },
            ctx.timer_changed.wait(),
        )
        .await;
        ctx.core.borrow_mut().handle_timeout(now());
        ctx.kick();
    }
}
