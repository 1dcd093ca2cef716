//! Media: client-encrypted blobs, uploaded in chunks, resumable, checked by hash.
//!
//! A blob belongs to its uploader's home shard: its 128-bit id starts with that shard's
//! number (2 bytes, big-endian) and goes on with 14 random bytes, so any core can tell
//! where it lives and nobody can guess one. Its metadata is a `MediaRecord` in the
//! shard's state; its bytes are a file the runtime's blob store writes off the core's
//! thread (`tern_engine::blobs`; the core emits blob jobs and handles their results).
//!
//! Chunks must come in order (`offset` = bytes received). One job per upload is in
//! flight at a time and the rest queue behind it in order (chunks, a status request, the
//! commit); a connection whose upload queue grows past [`UPLOAD_QUEUE_BYTES_MAX`] is not
//! read until it drains. Each append carries the running SHA-256 out and back, so a
//! commit hashes nothing again; a status answer is what is on disk after an `fdatasync`,
//! so a crash never makes a resumed upload skip bytes.
//!
//! Who may download: the uploader, and the recipients of the uploader's `Media` messages
//! that name the blob — by protocol convention the first 16 bytes of each copy of a
//! `Media` message are the media id in clear. Downloads are read on the blob's core.
//! Uncommitted uploads expire after a day, committed blobs after the message TTL.
//!
//! Quotas per account: at most [`UPLOADS_IN_PROGRESS_MAX`] uploads begun and not
//! committed, and at most `media_account_max_bytes` held (committed blobs, exports, and
//! the declared size of uploads in progress), tallied on the owner's home core (where
//! its blobs live) from the first time it is needed and kept by every change here; an
//! upload counts from the moment it is asked for, so pipelined requests cannot pass the
//! check together. Below the disk reserve no blob bytes are taken at all.

use std::collections::{HashMap, VecDeque};

use rand_core::RngCore;
use tern_engine::blobs::{BlobDone, BlobError, BlobOp};
use tern_engine::{MediaRecord, StateOp, Storage};
use tern_wire::messages::{
    ArchivedMediaBegin, ArchivedMediaChunk, ArchivedMediaCommit, MediaBegun, MediaData, MediaId,
    MediaKind, MediaStatus, UserId,
};
use tern_wire::{ErrorCode, MessageType};

use super::conns::ConnId;
use super::shared::Shared;
use crate::mesh::calls::ReadMedia;
use crate::mesh::ReplyTo;
use crate::refusal::{MediaRefusal, StorageRefusal};
use crate::routing::{home_shard_of_media, home_shard_of_user};
use crate::work::BlobJob;

/// Bytes a client should put in one chunk.
pub const MEDIA_CHUNK_BYTES: u32 = 256 * 1024;
/// Bytes one download answer carries at most.
pub const MEDIA_READ_MAX: u32 = 1024 * 1024;
/// An upload not committed by then is dropped.
const UPLOAD_TTL_MS: u64 = 24 * 3600 * 1000;
/// Chunk bytes queued per upload before its connection stops being read: a few chunks
/// keep the disk busy, more would only cost memory.
pub const UPLOAD_QUEUE_BYTES_MAX: usize = 4 * MEDIA_CHUNK_BYTES as usize;
/// Uploads one account may have begun and not committed at once: an album sent at once
/// fits; more would only hold files on the server for the day an upload may wait.
pub const UPLOADS_IN_PROGRESS_MAX: usize = 16;

/// What an account holds in media (its quota's tally).
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    /// Uploads begun (asked for) and not committed.
    uploads: usize,
    /// Bytes of its blobs, uploads in progress at their declared size.
    bytes: u64,
}

/// A step of an upload, run in order.
#[derive(Debug)]
enum Step {
    Chunk { offset: u64, data: Vec<u8> },
    Status { conn: ConnId, rid: u32 },
    Commit { conn: ConnId, rid: u32, sha256: [u8; 32] },
}

/// An upload in progress on this core.
#[derive(Debug)]
struct Upload {
    /// The uploader's connection (paused while its queue is full).
    conn: ConnId,
    /// Bytes accepted (written or queued); `None` after a restart until a status says.
    received: Option<u64>,
    /// The running hash; `None` when a job holds it or after a restart.
    hasher: Option<Box<sha2::Sha256>>,
    busy: bool,
    queue: VecDeque<Step>,
    queued_bytes: usize,
}

/// What a blob job's result finishes.
#[derive(Debug)]
enum Waiter {
    Begun { conn: ConnId, rid: u32, record: MediaRecord },
    Step { media_id: MediaId, step: StepKind },
    Read { reply_to: Option<ReplyTo<ReadMedia>>, total_bytes: u64, offset: u64, media_id: MediaId },
    Stored { conn: ConnId, rid: u32, record: MediaRecord },
    Removed,
}

#[derive(Debug)]
enum StepKind {
    Chunk,
    Status { conn: ConnId, rid: u32 },
    Commit { conn: ConnId, rid: u32 },
}

/// The media state of one core.
#[derive(Debug, Default)]
pub struct Media {
    uploads: HashMap<MediaId, Upload>,
    jobs: HashMap<u64, Waiter>,
    /// Downloads waiting for the blob's core: token → (connection, request).
    downloads: HashMap<u64, (ConnId, u32)>,
    /// The quota tally of owners homed here (see [`Media::usage`]).
    usage: HashMap<UserId, Usage>,
}

/// A server-made blob written for a request (an export): answered once durable.
#[derive(Debug)]
pub struct StoredBlob {
    /// The connection.
    pub conn: ConnId,
    /// Its request.
    pub rid: u32,
}

fn media_record<S: Storage>(shared: &Shared<S>, media_id: &MediaId) -> Option<MediaRecord> {
    let shard = shared.shards.local(home_shard_of_media(media_id))?;
    let record = shard.borrow().state().media.get(media_id).cloned();
    record
}

fn put_media<S: Storage>(
    shared: &Shared<S>,
    record: MediaRecord,
) -> Result<(u32, u64), MediaRefusal> {
    let shard_id = home_shard_of_media(&record.media_id);
    let shard = shared.shards.local(shard_id).ok_or(MediaRefusal::NoSuchMedia)?;
    let seq = shard
        .borrow_mut()
        .apply_state(StateOp::PutMedia { media: record })
        .map_err(|error| MediaRefusal::Storage { refusal: StorageRefusal::of(&error) })?;
    Ok((shard_id, seq))
}

/// A fresh id for a blob of `owner` (on its home shard).
fn new_media_id<S: Storage>(shared: &mut Shared<S>, owner: UserId) -> MediaId {
    let mut media_id = [0u8; 16];
    shared.random.fill_bytes(&mut media_id[2..]);
    media_id[..2].copy_from_slice(&(home_shard_of_user(owner) as u16).to_be_bytes());
    media_id
}

/// Below the disk reserve no blob bytes are taken (uploads, exports).
pub fn check_disk_reserve<S: Storage>(shared: &Shared<S>) -> Result<(), MediaRefusal> {
    match shared.disk_low() {
        true => Err(MediaRefusal::Storage { refusal: StorageRefusal::Reserve }),
        false => Ok(()),
    }
}

fn blob_refusal(error: BlobError) -> MediaRefusal {
    match error {
        BlobError::NotFound => MediaRefusal::Expired,
        BlobError::OutOfOrder { .. } => MediaRefusal::OutOfOrder,
        BlobError::WrongSize { .. } => MediaRefusal::Incomplete,
        BlobError::HashMismatch => MediaRefusal::HashMismatch,
        BlobError::Full => MediaRefusal::Io { code: ErrorCode::StorageFull },
        BlobError::Io => MediaRefusal::Io { code: ErrorCode::Internal },
    }
}

impl Media {
    /// `owner`'s media (homed here): counted from its shard's records the first time it
    /// is needed, then kept by every change made here.
    fn usage<S: Storage>(&mut self, shared: &Shared<S>, owner: UserId) -> &mut Usage {
        self.usage.entry(owner).or_insert_with(|| {
            let mut usage = Usage::default();
            if let Some(shard) = shared.shards.home_of(owner) {
                for record in shard.borrow().state().media.values().filter(|m| m.owner == owner) {
                    usage.uploads += usize::from(record.sha256.is_none());
                    usage.bytes = usage.bytes.saturating_add(record.size_bytes);
                }
            }
            usage
        })
    }

    /// Takes `bytes` (and one upload in progress, when `upload`) of `owner`'s quota.
    fn reserve<S: Storage>(
        &mut self,
        shared: &Shared<S>,
        owner: UserId,
        bytes: u64,
        upload: bool,
    ) -> Result<(), MediaRefusal> {
        let max_bytes = shared.config.media_account_max_bytes;
        let usage = self.usage(shared, owner);
        if upload && usage.uploads >= UPLOADS_IN_PROGRESS_MAX {
            return Err(MediaRefusal::UploadsInProgress { max: UPLOADS_IN_PROGRESS_MAX });
        }
        if usage.bytes.saturating_add(bytes) > max_bytes {
            return Err(MediaRefusal::AccountBytes { max: max_bytes });
        }
        usage.uploads += usize::from(upload);
        usage.bytes += bytes;
        Ok(())
    }

    /// Gives back `bytes` (and an upload in progress, when `upload`) of `owner`'s quota.
    fn release(&mut self, owner: UserId, bytes: u64, upload: bool) {
        if let Some(usage) = self.usage.get_mut(&owner) {
            usage.uploads = usage.uploads.saturating_sub(usize::from(upload));
            usage.bytes = usage.bytes.saturating_sub(bytes);
        }
    }

    fn job<S: Storage>(&mut self, shared: &mut Shared<S>, op: BlobOp, waiter: Waiter) {
        let token = shared.effects.work(BlobJob(op));
        self.jobs.insert(token, waiter);
    }

    /// An upload begins: its file is created, then its record.
    pub fn begin<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        me: UserId,
        begin: &ArchivedMediaBegin,
    ) -> Result<(), MediaRefusal> {
        let size = begin.size_bytes.to_native();
        if size > shared.config.media_max_bytes {
            return Err(MediaRefusal::FileTooLarge);
        }
        if !shared.config.media_enabled {
            return Err(MediaRefusal::NoMedia);
        }
        check_disk_reserve(shared)?;
        let kind = rkyv::deserialize::<MediaKind, rkyv::rancor::Failure>(&begin.kind)
            .map_err(|_| MediaRefusal::UnknownKind)?;
        self.reserve(shared, me, size, true)?;
        let media_id = new_media_id(shared, me);
        let now_ms = shared.now_ms();
        let record = MediaRecord {
            media_id,
            owner: me,
            kind,
            size_bytes: size,
            sha256: None,
            created_ms: now_ms,
            expires_ms: now_ms + UPLOAD_TTL_MS,
            readers: Vec::new(),
        };
        self.job(shared, BlobOp::Begin { id: media_id }, Waiter::Begun { conn, rid, record });
        Ok(())
    }

    /// The upload's record, for its owner only.
    fn own_upload<S: Storage>(
        shared: &Shared<S>,
        me: UserId,
        media_id: &MediaId,
    ) -> Result<MediaRecord, MediaRefusal> {
        match media_record(shared, media_id) {
            Some(record) if record.owner == me => Ok(record),
            _ => Err(MediaRefusal::NoSuchUpload),
        }
    }

    /// A chunk of an upload: queued in order behind the upload's other steps.
    pub fn chunk<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        me: UserId,
        chunk: &ArchivedMediaChunk,
    ) -> Result<(), MediaRefusal> {
        let record = Self::own_upload(shared, me, &chunk.media_id)?;
        if record.sha256.is_some() {
            return Err(MediaRefusal::Committed);
        }
        // An upload under way stops too: its bytes would take the messages' space. The
        // client resumes from the status once the server takes uploads again.
        check_disk_reserve(shared)?;
        let upload = self.upload(chunk.media_id, conn);
        let offset = chunk.offset.to_native();
        let received = upload.received.unwrap_or(offset);
        if offset != received {
            return Err(MediaRefusal::OutOfOrder);
        }
        let end = received + chunk.data.len() as u64;
        if end > record.size_bytes {
            return Err(MediaRefusal::TooManyBytes);
        }
        upload.received = Some(end);
        upload.queued_bytes += chunk.data.len();
        upload.queue.push_back(Step::Chunk { offset, data: chunk.data.to_vec() });
        if upload.queued_bytes > UPLOAD_QUEUE_BYTES_MAX {
            if let Some(c) = shared.conns.get_mut(conn) {
                c.upload_queue_full = true;
            }
        }
        self.next_step(shared, chunk.media_id);
        Ok(())
    }

    fn upload(&mut self, media_id: MediaId, conn: ConnId) -> &mut Upload {
        let upload = self.uploads.entry(media_id).or_insert_with(|| Upload {
            conn,
            received: None,
            hasher: None,
            busy: false,
            queue: VecDeque::new(),
            queued_bytes: 0,
        });
        upload.conn = conn;
        upload
    }

    /// Where to resume: what is on disk after a sync (behind the queued chunks).
    pub fn status<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        me: UserId,
        media_id: &MediaId,
    ) -> Result<(), MediaRefusal> {
        let record = Self::own_upload(shared, me, media_id)?;
        if record.sha256.is_some() {
            let op = BlobOp::Status { id: *media_id, sealed: true };
            let step = StepKind::Status { conn, rid };
            self.job(shared, op, Waiter::Step { media_id: *media_id, step });
            return Ok(());
        }
        self.upload(*media_id, conn).queue.push_back(Step::Status { conn, rid });
        self.next_step(shared, *media_id);
        Ok(())
    }

    /// The upload is complete: the blob is sealed if its hash is the committed one.
    pub fn commit<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        me: UserId,
        commit: &ArchivedMediaCommit,
    ) -> Result<(), MediaRefusal> {
        let record = Self::own_upload(shared, me, &commit.media_id)?;
        if record.sha256.is_some() {
            return Err(MediaRefusal::Committed);
        }
        let step = Step::Commit { conn, rid, sha256: commit.sha256 };
        self.upload(commit.media_id, conn).queue.push_back(step);
        self.next_step(shared, commit.media_id);
        Ok(())
    }

    /// Starts the upload's next step if none is in flight.
    fn next_step<S: Storage>(&mut self, shared: &mut Shared<S>, media_id: MediaId) {
        let Some(upload) = self.uploads.get_mut(&media_id) else { return };
        if upload.busy {
            return;
        }
        let Some(step) = upload.queue.pop_front() else { return };
        upload.busy = true;
        let (op, kind) = match step {
            Step::Chunk { offset, data } => {
                upload.queued_bytes = upload.queued_bytes.saturating_sub(data.len());
                let hasher = upload.hasher.take();
                (BlobOp::Append { id: media_id, offset, data, hasher }, StepKind::Chunk)
            }
            Step::Status { conn, rid } => {
                (BlobOp::Status { id: media_id, sealed: false }, StepKind::Status { conn, rid })
            }
            Step::Commit { conn, rid, sha256 } => {
                let size_bytes = media_record(shared, &media_id).map_or(0, |r| r.size_bytes);
                let hasher = upload.hasher.take();
                (
                    BlobOp::Seal { id: media_id, size_bytes, sha256, hasher },
                    StepKind::Commit { conn, rid },
                )
            }
        };
        if upload.queued_bytes <= UPLOAD_QUEUE_BYTES_MAX / 2 {
            let conn = upload.conn;
            if let Some(c) = shared.conns.get_mut(conn).filter(|c| c.upload_queue_full) {
                c.upload_queue_full = false;
                shared.conns.wake(conn);
            }
        }
        self.job(shared, op, Waiter::Step { media_id, step: kind });
    }

    /// A blob job finished.
    pub fn on_blob_done<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        token: u64,
        done: Result<BlobDone, BlobError>,
    ) {
        let Some(waiter) = self.jobs.remove(&token) else { return };
        match waiter {
            Waiter::Begun { conn, rid, record } => {
                let (owner, size_bytes) = (record.owner, record.size_bytes);
                if !begun(shared, conn, rid, record, done) {
                    self.release(owner, size_bytes, true);
                }
            }
            Waiter::Step { media_id, step } => self.step_done(shared, media_id, step, done),
            Waiter::Read { reply_to, total_bytes, offset, media_id } => {
                let answer = match done {
                    Ok(BlobDone::Bytes(data)) => {
                        Ok(MediaData { media_id, offset, total_bytes, data })
                    }
                    Ok(_) | Err(_) => Err(MediaRefusal::NoSuchMedia),
                };
                shared.answer(reply_to, answer);
            }
            Waiter::Stored { conn, rid, record } => {
                let (owner, size_bytes) = (record.owner, record.size_bytes);
                if !stored(shared, conn, rid, record, done) {
                    self.release(owner, size_bytes, false);
                }
            }
            Waiter::Removed => {
                if let Err(error) = done {
                    tracing::warn!(%error, "could not delete a media file");
                }
            }
        }
    }

    fn step_done<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        media_id: MediaId,
        step: StepKind,
        done: Result<BlobDone, BlobError>,
    ) {
        let ty = |kind: MessageType| kind.code();
        match (step, done) {
            (StepKind::Chunk, Ok(BlobDone::Appended { hasher, .. })) => {
                if let Some(upload) = self.uploads.get_mut(&media_id) {
                    upload.hasher = Some(hasher);
                }
            }
            (StepKind::Status { conn, rid }, Ok(BlobDone::Length(length))) => {
                if let Some(upload) = self.uploads.get_mut(&media_id) {
                    upload.received.get_or_insert(length);
                }
                let record = media_record(shared, &media_id);
                let (size_bytes, committed) =
                    record.map_or((0, false), |r| (r.size_bytes, r.sha256.is_some()));
                let status =
                    MediaStatus { media_id, received_bytes: length, size_bytes, committed };
                shared.conns.send(conn, rid, &status);
            }
            (StepKind::Commit { conn, rid }, Ok(BlobDone::Sealed(sha256))) => {
                self.uploads.remove(&media_id);
                if let Some(owner) = committed(shared, conn, rid, media_id, sha256) {
                    self.release(owner, 0, true); // no longer in progress; its bytes stay
                }
                return;
            }
            (step, result) => {
                let refusal = match result {
                    Err(error) => blob_refusal(error),
                    Ok(_) => MediaRefusal::Io { code: ErrorCode::Internal },
                };
                // The failed step's request gets the error; a failed chunk (no request
                // of its own) ends the upload's queue: the client asks the status.
                let (conn, rid, kind) = match step {
                    StepKind::Chunk => {
                        (self.uploads.get(&media_id).map(|u| u.conn), 0, MessageType::MediaChunk)
                    }
                    StepKind::Status { conn, rid } => {
                        (Some(conn), rid, MessageType::MediaStatusRequest)
                    }
                    StepKind::Commit { conn, rid } => (Some(conn), rid, MessageType::MediaCommit),
                };
                if let Some(upload) = self.uploads.get_mut(&media_id) {
                    upload.received = None;
                    upload.queue.retain(|s| !matches!(s, Step::Chunk { .. }));
                    upload.queued_bytes = 0;
                }
                if let Some(conn) = conn {
                    shared.conns.refuse(conn, rid, ty(kind), &refusal);
                }
            }
        }
        if let Some(upload) = self.uploads.get_mut(&media_id) {
            upload.busy = false;
        }
        self.next_step(shared, media_id);
    }

    /// A download: read on the blob's core.
    pub fn download<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        me: UserId,
        download: (MediaId, u64, u32),
    ) -> Result<(), MediaRefusal> {
        let (media_id, offset, length) = download;
        let shard = home_shard_of_media(&media_id);
        if !shared.shards.exists(shard) {
            return Err(MediaRefusal::NoSuchMedia);
        }
        // The answer must fit the connection's frame limit (header and fields included).
        let length = length.min(shared.conns.max_frame_bytes(conn).saturating_sub(256));
        let call = ReadMedia { reader: me, media_id, offset, length };
        let token = shared.outbox.ask(shared.shards.address_of(shard), call);
        self.downloads.insert(token, (conn, rid));
        if let Some(c) = shared.conns.get_mut(conn) {
            c.downloads_in_flight += 1;
        }
        Ok(())
    }

    /// The blob's core answered a download.
    pub fn on_read<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        token: u64,
        answer: Result<MediaData, MediaRefusal>,
    ) {
        let Some((conn, rid)) = self.downloads.remove(&token) else { return };
        if let Some(c) = shared.conns.get_mut(conn) {
            c.downloads_in_flight = c.downloads_in_flight.saturating_sub(1);
            shared.conns.wake(conn); // Its reading may go on.
        }
        match answer {
            Ok(data) => shared.conns.send(conn, rid, &data),
            Err(refusal) => {
                shared.conns.refuse(conn, rid, MessageType::MediaDownload.code(), &refusal)
            }
        }
    }

    /// Reads part of a committed blob homed here for a reader allowed to.
    pub fn serve_read<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        call: ReadMedia,
        reply_to: Option<ReplyTo<ReadMedia>>,
    ) {
        let ReadMedia { reader, media_id, offset, length } = call;
        // A guessed id and a forbidden one look the same.
        let record = media_record(shared, &media_id)
            .filter(|r| r.sha256.is_some() && (r.owner == reader || r.readers.contains(&reader)));
        let Some(record) = record else {
            return shared.answer(reply_to, Err(MediaRefusal::NoSuchMedia));
        };
        let length = u64::from(length.min(MEDIA_READ_MAX));
        let op = BlobOp::Read { id: media_id, offset, length };
        let waiter = Waiter::Read { reply_to, total_bytes: record.size_bytes, offset, media_id };
        self.job(shared, op, waiter);
    }

    /// Stores a whole blob made by the server for `owner` (an export); `answer` is
    /// written to the connection once it is durable. It counts in the owner's quota.
    pub fn store_blob<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        owner: UserId,
        kind: MediaKind,
        bytes: Vec<u8>,
        answer: StoredBlob,
    ) -> Result<MediaId, MediaRefusal> {
        use sha2::Digest;
        check_disk_reserve(shared)?;
        self.reserve(shared, owner, bytes.len() as u64, false)?;
        let media_id = new_media_id(shared, owner);
        let now_ms = shared.now_ms();
        let record = MediaRecord {
            media_id,
            owner,
            kind,
            size_bytes: bytes.len() as u64,
            sha256: Some(sha2::Sha256::digest(&bytes).into()),
            created_ms: now_ms,
            expires_ms: now_ms + shared.config.media_ttl_ms,
            readers: Vec::new(),
        };
        let waiter = Waiter::Stored { conn: answer.conn, rid: answer.rid, record };
        self.job(shared, BlobOp::Write { id: media_id, bytes }, waiter);
        Ok(media_id)
    }

    /// Records that the recipients of a `Media` message from the blob's owner may
    /// download it.
    pub fn grant<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        owner: UserId,
        media_id: &MediaId,
        readers: &[UserId],
    ) {
        let Some(mut record) = media_record(shared, media_id) else { return };
        if record.owner != owner {
            return;
        }
        let before = record.readers.len();
        for reader in readers {
            if !record.readers.contains(reader) {
                record.readers.push(*reader);
            }
        }
        if record.readers.len() != before {
            if let Err(refusal) = put_media(shared, record) {
                tracing::warn!(%refusal, "could not record a media grant");
            }
        }
    }

    /// Deletes a blob and its record (expired, or its owner's account deleted).
    pub fn forget<S: Storage>(&mut self, shared: &mut Shared<S>, media_id: &MediaId) {
        self.uploads.remove(media_id);
        if let Some(record) = media_record(shared, media_id) {
            self.release(record.owner, record.size_bytes, record.sha256.is_none());
        }
        self.job(shared, BlobOp::Remove { id: *media_id }, Waiter::Removed);
        if let Some(shard) = shared.shards.local(home_shard_of_media(media_id)) {
            if let Err(error) =
                shard.borrow_mut().apply_state(StateOp::DeleteMedia { media_id: *media_id })
            {
                tracing::warn!(%error, "could not forget media");
            }
        }
    }

    /// Deletes blobs past their time; returns how many.
    pub fn expire<S: Storage>(&mut self, shared: &mut Shared<S>) -> usize {
        let now_ms = shared.now_ms();
        let expired: Vec<MediaId> = shared
            .shards
            .owned()
            .into_iter()
            .flat_map(|(_, shard)| {
                let shard = shard.borrow();
                shard
                    .state()
                    .media
                    .values()
                    .filter(|m| m.expires_ms <= now_ms)
                    .map(|m| m.media_id)
                    .collect::<Vec<_>>()
            })
            .collect();
        for media_id in &expired {
            self.forget(shared, media_id);
        }
        expired.len()
    }

    /// The blobs `owner` (homed here) uploaded.
    pub fn owned_by<S: Storage>(shared: &Shared<S>, owner: UserId) -> Vec<MediaId> {
        let Some(shard) = shared.shards.home_of(owner) else { return Vec::new() };
        let shard = shard.borrow();
        shard.state().media.values().filter(|m| m.owner == owner).map(|m| m.media_id).collect()
    }
}

/// An upload's file exists: its record follows, and the client learns the id. Returns
/// whether the record was stored.
fn begun<S: Storage>(
    shared: &mut Shared<S>,
    conn: ConnId,
    rid: u32,
    record: MediaRecord,
    done: Result<BlobDone, BlobError>,
) -> bool {
    let ty = MessageType::MediaBegin.code();
    if let Err(error) = done {
        shared.conns.refuse(conn, rid, ty, &blob_refusal(error));
        return false;
    }
    let (media_id, expires_ms) = (record.media_id, record.expires_ms);
    match put_media(shared, record) {
        Ok(wait) => {
            let begun = MediaBegun { media_id, chunk_bytes: MEDIA_CHUNK_BYTES, expires_ms };
            shared.reply_when_durable(conn, rid, &begun, vec![wait]);
            true
        }
        Err(refusal) => {
            shared.conns.refuse(conn, rid, ty, &refusal);
            false
        }
    }
}

/// A blob was sealed: it becomes downloadable once its record says so, durably.
/// Returns its owner when the record was stored.
fn committed<S: Storage>(
    shared: &mut Shared<S>,
    conn: ConnId,
    rid: u32,
    media_id: MediaId,
    sha256: [u8; 32],
) -> Option<UserId> {
    let ty = MessageType::MediaCommit.code();
    let Some(mut record) = media_record(shared, &media_id) else {
        shared.conns.refuse(conn, rid, ty, &MediaRefusal::NoSuchUpload);
        return None;
    };
    record.sha256 = Some(sha256);
    record.expires_ms = shared.now_ms() + shared.config.media_ttl_ms;
    let (size_bytes, owner) = (record.size_bytes, record.owner);
    match put_media(shared, record) {
        Ok(wait) => {
            let status =
                MediaStatus { media_id, received_bytes: size_bytes, size_bytes, committed: true };
            shared.reply_when_durable(conn, rid, &status, vec![wait]);
            Some(owner)
        }
        Err(refusal) => {
            shared.conns.refuse(conn, rid, ty, &refusal);
            None
        }
    }
}

/// A server-made blob was written: its record, then the answer. Returns whether the
/// record was stored.
fn stored<S: Storage>(
    shared: &mut Shared<S>,
    conn: ConnId,
    rid: u32,
    record: MediaRecord,
    done: Result<BlobDone, BlobError>,
) -> bool {
    let ty = MessageType::ExportRequest.code();
    if let Err(error) = done {
        shared.conns.refuse(conn, rid, ty, &blob_refusal(error));
        return false;
    }
    let ready = tern_wire::messages::ExportReady {
        media_id: record.media_id,
        size_bytes: record.size_bytes,
    };
    match put_media(shared, record) {
        Ok(wait) => {
            shared.reply_when_durable(conn, rid, &ready, vec![wait]);
            true
        }
        Err(refusal) => {
            shared.conns.refuse(conn, rid, ty, &refusal);
            false
        }
    }
}
