//! The write side of the log: the pending batch that appends queue into, record
//! sequence numbers, segment rotation, and group commit (one write and one `fdatasync`
//! per batch, `docs/STORAGE.md`, section 2).
//!
//! Appends are synchronous: a record is laid out straight at the end of the pending
//! batch, and the caller learns its [`Loc`] at once. Committing is split so that no
//! borrow of the shard is held across I/O: [`Log::next_commit_step`] closes the batch
//! and takes it out as a [`CommitJob`], the handle awaits [`CommitJob::run`], and
//! [`Log::finish_commit`] makes the bytes readable ([`Segments`]) and durable. Appends
//! arriving meanwhile form the next batch. A failed write or sync poisons the log for
//! good: nothing is retried, and only reopening the shard clears it. The one exception
//! is a full disk (`ENOSPC`): the log *stalls* — it keeps the batches that failed,
//! refuses appends with [`WriteError::StorageFull`], and the next commit writes and
//! syncs those same batches again, from its own buffers, at the same offsets. Writing
//! them whole again is what makes a retry safe where retrying an `fdatasync` is not: any
//! page the kernel dropped after the failed sync is written again, and nothing reads as
//! durable before a sync of all of it succeeded.

use std::rc::Rc;

use tern_wire::encode_archive;

use super::config::{ShardConfig, ShardCounters};
use super::durable::{Durable, Notifier};
use super::loc::Loc;
use super::segments::Segments;
use crate::body::CommitRecord;
use crate::error::WriteError;
use crate::record::{
    align_up, append_record, first_record_offset, segment_file_name, RecordType, SegmentHeader,
    RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES,
};
use crate::storage::{Storage, StorageFile};

/// Committed batch buffers kept for reuse: two cover a commit in flight plus the batch
/// forming behind it.
const SPARE_BUFFERS_MAX: usize = 2;

/// Space reserved at the end of a batch for its `Commit` record.
const COMMIT_RESERVE_BYTES: u64 = 64;

/// The preallocated size of a new shard's first segment (or `segment_bytes`, if
/// smaller). Each next segment doubles the last, up to `segment_bytes`: a shard that
/// holds little costs little disk (a node holds hundreds of shards, most of them
/// quiet), and a busy one reaches full-size segments after a few rolls.
pub(crate) const FIRST_SEGMENT_BYTES: u64 = 1 << 20;

/// The size of a new shard's first segment.
pub(crate) fn first_segment_bytes(config: &ShardConfig) -> u64 {
    config.segment_bytes.min(FIRST_SEGMENT_BYTES)
}

/// Records laid out for one write, in one segment.
#[derive(Debug)]
struct PendingBatch {
    segment_id: u32,
    start_offset: u64,
    bytes: Vec<u8>,
    first_seq: u64,
    records: u32,
    /// The batch opens its segment (and carries its header): the file is created first.
    new_segment: bool,
    /// The size of the batch's segment (its file is preallocated to it).
    capacity: u64,
}

/// The write side of one shard's log.
pub(crate) struct Log<S: Storage> {
    storage: S,
    shard_id: u32,
    /// The largest segment (`ShardConfig::segment_bytes`): the bound on a record.
    segment_bytes: u64,
    /// The size of the segment at the write head (segments grow from
    /// [`FIRST_SEGMENT_BYTES`] to `segment_bytes`).
    head_capacity: u64,
    alignment: u32,
    /// The file of the segment being written.
    active_file: Rc<S::File>,
    /// Batches being formed, in log order (two when a batch had to open a new segment).
    pending: Vec<PendingBatch>,
    /// Where the next batch starts when `pending` is empty.
    next_batch_start: (u32, u64),
    commit_in_flight: bool,
    /// Whether a pending record is awaited: anything but an `Ack`. An `Ack` record
    /// answers nobody, so it rides with the next commit instead of starting one (a lost
    /// one only delivers again what the device had acknowledged; the client drops the
    /// copy as a duplicate). At low load this saves a commit round per delivery.
    awaited_pending: bool,
    /// The last record of the commit in flight.
    in_flight_last_seq: u64,
    next_record_seq: u64,
    poisoned: Option<WriteError>,
    /// Batches of a commit that failed for lack of space, written again (before
    /// `pending`) by the next commit.
    retry: Vec<PendingBatch>,
    /// Set while `retry` waits: appends are refused with this error.
    stalled: Option<WriteError>,
    notifier: Rc<Notifier>,
    /// Scratch for record bodies, reused to avoid an allocation per record.
    body_scratch: Vec<u8>,
    /// Batch buffers of committed batches, reused for the next ones.
    spare_buffers: Vec<Vec<u8>>,
}

/// What a caller of [`Log::next_commit_step`] does next.
pub(crate) enum CommitStep<S: Storage> {
    /// Nothing to commit: everything up to this sequence number is durable.
    Done(u64),
    /// Another task's commit is in flight: wait for it, then ask again.
    Wait(Durable),
    /// Run this job (with no borrow held), then hand it to [`Log::finish_commit`].
    Run(CommitJob<S>),
}

/// Batches taken out of the log for writing.
pub(crate) struct CommitJob<S: Storage> {
    storage: S,
    active_file: Rc<S::File>,
    last_seq: u64,
    batches: Vec<PendingBatch>,
    /// The batches were written before, and failed for lack of space: a segment file
    /// they open may exist from that attempt (holding nothing acknowledged).
    retry: bool,
}

/// What [`CommitJob::run`] did: the segment files it created, and how it ended.
pub(crate) struct CommitOutcome<F> {
    created: Vec<Rc<F>>,
    result: Result<(), WriteError>,
}

impl<S: Storage> Log<S> {
    /// A log whose next batch starts at `batch_start` (segment, offset) of the segment
    /// open as `active_file` (`active_capacity` bytes long), and whose next record is
    /// `next_record_seq` (everything before it is durable).
    pub(crate) fn new(
        storage: S,
        config: &ShardConfig,
        alignment: u32,
        (active_file, active_capacity): (Rc<S::File>, u64),
        batch_start: (u32, u64),
        next_record_seq: u64,
    ) -> Log<S> {
        Log {
            storage,
            shard_id: config.shard_id,
            segment_bytes: config.segment_bytes,
            head_capacity: active_capacity,
            alignment,
            active_file,
            pending: Vec::new(),
            next_batch_start: batch_start,
            commit_in_flight: false,
            awaited_pending: false,
            in_flight_last_seq: 0,
            next_record_seq,
            poisoned: None,
            retry: Vec::new(),
            stalled: None,
            notifier: Rc::new(Notifier::new(next_record_seq.saturating_sub(1))),
            body_scratch: Vec::new(),
            spare_buffers: Vec::new(),
        }
    }

    /// The storage the log's files live in.
    pub(crate) fn storage(&self) -> &S {
        &self.storage
    }

    /// The error that makes the log refuse writes, if any: for good after an I/O
    /// error, until a commit gets the stalled batches out after a full disk.
    pub(crate) fn write_error(&self) -> Option<&WriteError> {
        self.poisoned.as_ref().or(self.stalled.as_ref())
    }

    /// Whether a commit failed for lack of space and its batches wait to be written
    /// again (by the next [`Log::next_commit_step`]).
    pub(crate) fn is_stalled(&self) -> bool {
        self.stalled.is_some()
    }

    /// Whether records wait for a commit. Not while stalled: committing again at once
    /// would spin on a full disk; whoever retries calls commit when space may be back.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty() && self.stalled.is_none()
    }

    /// Whether a pending record is awaited (anything but an `Ack`): the committer starts
    /// a commit for these at once, and lets `Ack`-only batches wait for the next one.
    pub(crate) fn needs_commit(&self) -> bool {
        self.awaited_pending && self.has_pending()
    }

    /// The sequence number of the next record.
    pub(crate) fn next_record_seq(&self) -> u64 {
        self.next_record_seq
    }

    /// The highest durable record sequence number.
    pub(crate) fn durable_seq(&self) -> u64 {
        self.notifier.durable_seq()
    }

    /// Resolves once `record_seq` is durable, or with the error that prevents it.
    pub(crate) fn durable(&self, record_seq: u64) -> Durable {
        Durable::new(self.notifier.clone(), record_seq)
    }

    /// Where the next record goes: the end of the last pending batch, or the start of
    /// the next batch.
    pub(crate) fn write_head(&self) -> (u32, u64) {
        match self.pending.last() {
            Some(batch) => (batch.segment_id, batch.start_offset + batch.bytes.len() as u64),
            None => self.next_batch_start,
        }
    }

    // -----------------------------------------------------------------------------------
    // Appends
    // -----------------------------------------------------------------------------------

    /// Appends one record to the pending batch; returns its sequence number, location and
    /// size.
    pub(crate) fn append(
        &mut self,
        segments: &mut Segments,
        record_type: RecordType,
        flags: u8,
        write_body: impl FnOnce(&mut Vec<u8>) -> Result<(), WriteError>,
    ) -> Result<(u64, Loc, u64), WriteError> {
        if let Some(error) = self.write_error() {
            return Err(error.clone());
        }
        self.awaited_pending |= record_type != RecordType::Ack;
        // Lay the record out straight at the end of the current batch: almost always it
        // fits, and then nothing is copied again.
        let seq = self.next_record_seq;
        let (segment_id, offset) = self.write_head();
        let usable = self.segment_bytes - SEGMENT_HEADER_BYTES as u64 - COMMIT_RESERVE_BYTES;
        let limit = usable - u64::from(self.alignment);
        let head_capacity = self.head_capacity;
        let mut body = std::mem::take(&mut self.body_scratch);
        let batch = self.pending_batch_at_head();
        let start = batch.bytes.len();
        let appended =
            append_record(&mut batch.bytes, record_type, flags, seq, segment_id, write_body);
        let header = match appended {
            Ok(header) => header,
            Err(error) => {
                self.body_scratch = body;
                self.drop_empty_batch();
                return Err(error);
            }
        };
        let record_bytes = header.record_bytes() as u64;
        if record_bytes > limit {
            batch.bytes.truncate(start);
            self.body_scratch = body;
            self.drop_empty_batch();
            return Err(WriteError::RecordTooLarge { record_bytes });
        }
        if offset + record_bytes + COMMIT_RESERVE_BYTES <= head_capacity {
            batch.records += 1;
            self.next_record_seq += 1;
            self.body_scratch = body;
            return Ok((seq, Loc { segment_id, offset: offset as u32 }, record_bytes));
        }
        // It does not fit in this segment (once per segment): move it to the next one,
        // whose id goes into the record header.
        body.clear();
        body.extend_from_slice(&batch.bytes[start + RECORD_HEADER_BYTES..]);
        batch.bytes.truncate(start);
        self.drop_empty_batch();
        let result = self.place_record(segments, record_type, flags, &body);
        self.body_scratch = body;
        result
    }

    /// Removes a pending batch that got no record (so no empty batch is closed).
    fn drop_empty_batch(&mut self) {
        if self
            .pending
            .last()
            .is_some_and(|b| b.records == 0 && !b.new_segment && b.bytes.is_empty())
        {
            let batch = self.pending.pop().expect("just checked");
            self.spare_buffers.push(batch.bytes);
        }
    }

    /// Copies a laid-out record body into the pending batch (opening the next segment
    /// when it does not fit).
    fn place_record(
        &mut self,
        segments: &mut Segments,
        record_type: RecordType,
        flags: u8,
        body: &[u8],
    ) -> Result<(u64, Loc, u64), WriteError> {
        let record_bytes = (RECORD_HEADER_BYTES + body.len()) as u64;
        let usable = self.segment_bytes - SEGMENT_HEADER_BYTES as u64 - COMMIT_RESERVE_BYTES;
        if record_bytes > usable - u64::from(self.alignment) {
            return Err(WriteError::RecordTooLarge { record_bytes });
        }

        let (segment_id, offset) = self.write_head();
        if offset + record_bytes + COMMIT_RESERVE_BYTES > self.head_capacity {
            self.open_segment_batch_for(segments, record_bytes);
        }
        let seq = self.next_record_seq;
        let (segment_id_now, offset) = self.write_head();
        debug_assert!(segment_id_now >= segment_id);
        let batch = self.pending_batch_at_head();
        let loc = Loc { segment_id: segment_id_now, offset: offset as u32 };
        append_record(&mut batch.bytes, record_type, flags, seq, segment_id_now, |out| {
            out.extend_from_slice(body);
            Ok::<(), WriteError>(())
        })?;
        batch.records += 1;
        self.next_record_seq += 1;
        Ok((seq, loc, record_bytes))
    }

    fn pending_batch_at_head(&mut self) -> &mut PendingBatch {
        if self.pending.is_empty() {
            let (segment_id, start_offset) = self.next_batch_start;
            self.pending.push(PendingBatch {
                segment_id,
                start_offset,
                bytes: self.spare_buffers.pop().unwrap_or_default(),
                first_seq: self.next_record_seq,
                records: 0,
                new_segment: false,
                capacity: self.head_capacity,
            });
        }
        self.pending.last_mut().expect("just ensured")
    }

    /// Closes the current batch with its `Commit` record and starts one at the beginning
    /// of the next segment (whose header it carries).
    pub(crate) fn open_next_segment_batch(&mut self, segments: &mut Segments) {
        self.open_segment_batch_for(segments, 0);
    }

    /// Like [`Log::open_next_segment_batch`], with a next segment big enough for a
    /// record of `record_bytes`: twice the last one, or more for the record, at most
    /// `segment_bytes`.
    fn open_segment_batch_for(&mut self, segments: &mut Segments, record_bytes: u64) {
        let needed = first_record_offset(self.alignment)
            + record_bytes
            + COMMIT_RESERVE_BYTES
            + u64::from(self.alignment);
        let grown = self.head_capacity.saturating_mul(2).max(needed);
        self.head_capacity = align_up(grown, 4096).min(self.segment_bytes);
        if !self.pending.is_empty() {
            self.close_last_batch(segments);
        }
        let (segment_id, _) = self.write_head();
        let next_segment = segment_id + 1;
        let header = SegmentHeader {
            shard_id: self.shard_id,
            segment_id: u64::from(next_segment),
            first_record_seq: self.next_record_seq,
            commit_alignment: self.alignment,
        };
        let mut bytes = self.spare_buffers.pop().unwrap_or_default();
        bytes.extend_from_slice(&header.to_bytes());
        bytes.resize(first_record_offset(self.alignment) as usize, 0);
        self.pending.push(PendingBatch {
            segment_id: next_segment,
            start_offset: 0,
            bytes,
            first_seq: self.next_record_seq,
            records: 0,
            new_segment: true,
            capacity: self.head_capacity,
        });
        segments.note_opened(next_segment);
    }

    /// Appends the `Commit` record to the last pending batch and pads it to alignment.
    fn close_last_batch(&mut self, segments: &mut Segments) {
        let seq = self.next_record_seq;
        let alignment = self.alignment;
        let batch = self.pending.last_mut().expect("a batch to close");
        let commit =
            CommitRecord { batch_first_seq: batch.first_seq, batch_records: batch.records + 1 };
        let segment_id = batch.segment_id;
        append_record(&mut batch.bytes, RecordType::Commit, 0, seq, segment_id, |out| {
            encode_archive(out, &commit).map(|_| ())
        })
        .expect("a commit record always archives");
        batch.records += 1;
        let end = batch.start_offset + batch.bytes.len() as u64;
        batch.bytes.resize((align_up(end, alignment) - batch.start_offset) as usize, 0);
        segments.note_batch_closed(segment_id, seq);
        self.next_record_seq += 1;
    }

    // -----------------------------------------------------------------------------------
    // Commit (the I/O runs in between, awaited by the handle)
    // -----------------------------------------------------------------------------------

    /// Decides the next step of a commit: an error if the log is poisoned, a wait for a
    /// commit in flight, the job of writing the pending batches, or done.
    pub(crate) fn next_commit_step(
        &mut self,
        segments: &mut Segments,
    ) -> Result<CommitStep<S>, WriteError> {
        if let Some(error) = &self.poisoned {
            return Err(error.clone());
        }
        if self.commit_in_flight {
            return Ok(CommitStep::Wait(self.durable(self.in_flight_last_seq)));
        }
        Ok(match self.take_commit_job(segments) {
            Some(job) => CommitStep::Run(job),
            None => CommitStep::Done(self.durable_seq()),
        })
    }

    fn take_commit_job(&mut self, segments: &mut Segments) -> Option<CommitJob<S>> {
        let nothing = self.pending.is_empty() && self.retry.is_empty();
        if nothing || self.commit_in_flight || self.poisoned.is_some() {
            return None;
        }
        if !self.pending.is_empty() {
            self.close_last_batch(segments);
        }
        // The stalled batches first: the pending ones were laid out after them.
        let mut batches = std::mem::take(&mut self.retry);
        batches.append(&mut self.pending);
        self.awaited_pending = false;
        let last = batches.last().expect("non-empty");
        self.next_batch_start = (last.segment_id, last.start_offset + last.bytes.len() as u64);
        self.commit_in_flight = true;
        self.in_flight_last_seq = self.next_record_seq - 1;
        Some(CommitJob {
            storage: self.storage.clone(),
            active_file: self.active_file.clone(),
            last_seq: self.next_record_seq - 1,
            batches,
            retry: self.stalled.is_some(),
        })
    }

    /// Ends a commit: on success the batches become readable and durable (and a batch
    /// that opened a segment seals the previous one); on a full disk the log stalls
    /// with the batches kept for the next commit; on any other failure it is poisoned.
    /// Returns the durable sequence number.
    pub(crate) fn finish_commit(
        &mut self,
        segments: &mut Segments,
        counters: &mut ShardCounters,
        job: CommitJob<S>,
        outcome: CommitOutcome<S::File>,
    ) -> Result<u64, WriteError> {
        self.commit_in_flight = false;
        match outcome.result {
            Ok(()) => self.stalled = None,
            Err(WriteError::StorageFull) => return Err(self.stall(job.batches)),
            Err(error) => return Err(self.poison(error)),
        }
        let mut created = outcome.created.into_iter();
        for batch in job.batches {
            if batch.new_segment {
                let file = created.next().expect("a file per new segment");
                let name = segment_file_name(u64::from(segments.active_id()));
                let map = self.storage.map(&name).map_err(|e| {
                    self.poison(WriteError::from_io("mapping a sealed segment", &e))
                })?;
                segments.roll(map, batch.segment_id, batch.capacity as usize);
                self.active_file = file;
            }
            segments.append_committed(batch.segment_id, batch.start_offset, &batch.bytes);
            counters.commits += 1;
            counters.committed_records += u64::from(batch.records);
            counters.committed_bytes += batch.bytes.len() as u64;
            // Keep the buffer: a fresh large allocation per batch costs page faults.
            if self.spare_buffers.len() < SPARE_BUFFERS_MAX {
                let mut bytes = batch.bytes;
                bytes.clear();
                self.spare_buffers.push(bytes);
            }
        }
        self.notifier.advance(job.last_seq);
        Ok(job.last_seq)
    }

    /// Keeps the batches of a commit that found the disk full, to write them again.
    /// Their records stay where they were laid out (the index already points there) and
    /// are not durable; waiters hear the error but may wait again.
    fn stall(&mut self, batches: Vec<PendingBatch>) -> WriteError {
        debug_assert!(self.retry.is_empty(), "a retry takes the stalled batches with it");
        self.retry = batches;
        self.stalled = Some(WriteError::StorageFull);
        self.notifier.stall(WriteError::StorageFull);
        WriteError::StorageFull
    }

    fn poison(&mut self, error: WriteError) -> WriteError {
        self.poisoned = Some(error.clone());
        self.notifier.fail(error.clone());
        error
    }
}

impl<S: Storage> CommitJob<S> {
    /// Writes and syncs every batch, creating segments as needed. One write and one
    /// `fdatasync` per batch (two batches only when the log rolls to a new segment).
    pub(crate) async fn run(&self) -> CommitOutcome<S::File> {
        let mut created = Vec::new();
        let result = self.write_batches(&mut created).await;
        CommitOutcome { created, result }
    }

    async fn write_batches(&self, created: &mut Vec<Rc<S::File>>) -> Result<(), WriteError> {
        let mut file = self.active_file.clone();
        for batch in &self.batches {
            if batch.new_segment {
                let name = segment_file_name(u64::from(batch.segment_id));
                if self.retry {
                    // An earlier attempt may have created it before the disk filled. It
                    // holds nothing acknowledged: this batch, which opens it, never was.
                    let _ = self.storage.remove(&name).await;
                }
                let new_file = self
                    .storage
                    .create(&name, batch.capacity)
                    .await
                    .map_err(|e| WriteError::from_io("creating a segment", &e))?;
                file = Rc::new(new_file);
                // The new file must survive a crash before anything in it is acknowledged.
                self.storage
                    .sync_dir()
                    .await
                    .map_err(|e| WriteError::from_io("syncing the directory", &e))?;
                created.push(file.clone());
            }
            file.write_at(&batch.bytes, batch.start_offset)
                .await
                .map_err(|e| WriteError::from_io("writing a batch", &e))?;
            file.sync_data().await.map_err(|e| WriteError::from_io("syncing a batch", &e))?;
        }
        Ok(())
    }
}
