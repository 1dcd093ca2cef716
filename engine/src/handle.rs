//! [`ShardHandle`]: a shard shared by the tasks of one core, and the async side of the
//! shard — open, commit, checkpoint and reclaim.
//!
//! Every method here follows one rule: borrow the shard only for synchronous steps and
//! never across an `.await`. So a commit takes its job out under a short borrow and runs
//! it with none held, and appends arriving meanwhile form the next batch.
//!
//! The handle sits above the shard, not inside `shard/`: it uses the `Shard` type (and
//! `shard/recovery.rs` to open one), and no part of `shard/` may, so the module graph
//! stays acyclic.

use std::cell::RefCell;
use std::rc::Rc;

use crate::error::{OpenError, WriteError};
use crate::record::segment_file_name;
use crate::shard::config::ShardConfig;
use crate::shard::log::CommitStep;
use crate::shard::Shard;
use crate::shard::{checkpoint, recovery};
use crate::storage::Storage;

/// A shard shared by the tasks of one core: appends through [`ShardHandle::borrow_mut`],
/// I/O through the async methods. Not `Send`, by design.
pub struct ShardHandle<S: Storage> {
    shard: Rc<RefCell<Shard<S>>>,
}

impl<S: Storage> Clone for ShardHandle<S> {
    fn clone(&self) -> Self {
        ShardHandle { shard: self.shard.clone() }
    }
}

impl<S: Storage> std::fmt::Debug for ShardHandle<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shard.borrow().fmt(f)
    }
}

impl<S: Storage + Clone> ShardHandle<S> {
    /// Borrows the shard for synchronous work. Never hold the borrow across an await.
    pub fn borrow(&self) -> std::cell::Ref<'_, Shard<S>> {
        self.shard.borrow()
    }

    /// Borrows the shard mutably for appends. Never hold the borrow across an await.
    pub fn borrow_mut(&self) -> std::cell::RefMut<'_, Shard<S>> {
        self.shard.borrow_mut()
    }

    /// Writes and syncs everything appended so far, as one batch. Returns the durable
    /// sequence number (unchanged when there was nothing to commit or a commit is in
    /// flight: call again after it).
    pub async fn commit(&self) -> Result<u64, WriteError> {
        // Another task's commit may be in flight (the server's committer while a
        // checkpoint runs): wait for it, then commit what is left. Never return early
        // while records are pending, or a caller looping "until nothing is pending" would
        // spin without ever letting the in-flight commit finish.
        loop {
            let step = self.shard.borrow_mut().next_commit_step()?;
            match step {
                CommitStep::Done(durable_seq) => return Ok(durable_seq),
                CommitStep::Wait(durable) => durable.await?,
                CommitStep::Run(job) => {
                    let outcome = job.run().await;
                    return self.shard.borrow_mut().finish_commit(job, outcome);
                }
            }
        }
    }

    /// Commits until nothing is pending, so the shard's state matches a log position.
    async fn commit_all(&self) -> Result<(), WriteError> {
        loop {
            self.commit().await?;
            if !self.shard.borrow().has_pending() {
                return Ok(());
            }
        }
    }

    /// Writes a checkpoint of the state tables and indexes (zstd, CRC, temp file +
    /// sync + rename + directory sync) and removes older ones. Commits first, so the
    /// checkpoint covers a batch boundary.
    pub async fn checkpoint(&self) -> Result<u64, WriteError> {
        self.commit_all().await?;
        let (bytes, covered_seq, storage, old) = {
            let shard = self.shard.borrow();
            let (bytes, covered_seq) = shard.encode_checkpoint();
            let old: Vec<String> = shard
                .storage()
                .list()
                .unwrap_or_default()
                .into_iter()
                .filter(|n| checkpoint::parse_file_name(n).is_some())
                .collect();
            (bytes, covered_seq, shard.storage().clone(), old)
        };
        let name = checkpoint::file_name(covered_seq);
        let temp = format!("{name}.tmp");
        if let Err(error) = write_checkpoint_file(&storage, &temp, &name, &bytes).await {
            // A failed checkpoint loses nothing (the log still has everything); remove
            // the temp file if we can and report.
            let _ = storage.remove(&temp).await;
            return Err(error);
        }
        for old_name in old.iter().filter(|n| **n != name) {
            let _ = storage.remove(old_name).await;
        }
        let _ = storage.sync_dir().await;
        self.shard.borrow_mut().checkpointed(covered_seq);
        Ok(covered_seq)
    }

    /// Reclaims space: rewrites the live envelopes of mostly-dead sealed segments at the
    /// head (compaction), checkpoints, then deletes sealed segments that the checkpoint
    /// covers and that hold no live or unexpired envelope. Returns segments deleted.
    ///
    /// After an account deletion it also erases: the active segment is sealed and every
    /// segment up to it is compacted whatever its live share, so that once the
    /// checkpoint is written no file holds the deleted account's records.
    pub async fn reclaim(&self, now_ms: u64) -> Result<u64, WriteError> {
        let erase = self.shard.borrow().erase_through_segment();
        if let Some(through) = erase {
            self.shard.borrow_mut().seal_for_erasure(through);
            // The roll must be committed, so the segment is sealed before compaction.
            self.commit_all().await?;
        }
        let compacted = self.shard.borrow_mut().compact_and_expire(now_ms, erase)?;
        if compacted > 0 || self.shard.borrow().checkpoint_stale() {
            self.checkpoint().await?;
        }
        let (storage, doomed) = {
            let shard = self.shard.borrow();
            (shard.storage().clone(), shard.reclaimable_segments(now_ms))
        };
        for segment_id in &doomed {
            let name = segment_file_name(u64::from(*segment_id));
            storage
                .remove(&name)
                .await
                .map_err(|e| WriteError::from_io("removing a segment", &e))?;
        }
        if !doomed.is_empty() {
            storage
                .sync_dir()
                .await
                .map_err(|e| WriteError::from_io("syncing the directory", &e))?;
            self.shard.borrow_mut().forget_segments(&doomed);
        }
        if let Some(through) = erase {
            self.shard.borrow_mut().finish_erasure(through);
        }
        Ok(doomed.len() as u64)
    }

    /// Opens (recovers) a shard from `storage`: the newest valid checkpoint, then the log
    /// after it. A torn tail is truncated; corrupt records are quarantined and counted.
    pub async fn open(storage: S, config: ShardConfig) -> Result<ShardHandle<S>, OpenError> {
        let parts = recovery::recover(storage, &config).await?;
        let shard = Shard::from_parts(parts, config);
        Ok(ShardHandle { shard: Rc::new(RefCell::new(shard)) })
    }
}

/// Writes a checkpoint file durably: `temp`, then renamed to `name`, then the directory
/// synced (the rename must be durable before older checkpoints go).
async fn write_checkpoint_file<S: Storage>(
    storage: &S,
    temp: &str,
    name: &str,
    bytes: &[u8],
) -> Result<(), WriteError> {
    storage
        .write_file(temp, bytes)
        .await
        .map_err(|e| WriteError::from_io("writing a checkpoint", &e))?;
    storage
        .rename(temp, name)
        .await
        .map_err(|e| WriteError::from_io("renaming a checkpoint", &e))?;
    storage.sync_dir().await.map_err(|e| WriteError::from_io("syncing the directory", &e))
}
