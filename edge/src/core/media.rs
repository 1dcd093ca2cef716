//! Media: client-encrypted blobs, uploaded in chunks, resumable, checked by hash.
//!
//! A blob belongs to its uploader's home shard: its 128-bit id starts with that shard's
//! number (2 bytes, big-endian) and goes on with 14 random bytes, so any core can tell
//! where it lives and nobody can guess one. Its bytes are a file under the data
//! directory's `media/` (`<id>.part` while uploading), its metadata a `MediaRecord` in
//! the shard's state. Chunks must arrive in order (`offset` = bytes received); a
//! reconnecting client asks `MediaStatusRequest` where to resume — the answer is what is
//! on disk after an `fdatasync`, so a crash never makes it skip bytes. `MediaCommit`
//! checks the SHA-256 of the stored bytes (streamed, so memory stays a buffer whatever
//! the size) before the blob becomes downloadable.
//!
//! Who may download: the uploader, and the recipients of the uploader's `Media` messages
//! that name the blob — by protocol convention the first 16 bytes of each copy of a
//! `Media` message are the media id in clear (the rest is the E2E ciphertext carrying the
//! key and hash). The grant is recorded in the `MediaRecord`. Downloads from another core
//! go to the blob's core over the mesh.
//!
//! Blob I/O is plain `std::fs` on the core's thread (a chunk write is a page-cache copy;
//! the syncs happen on status and commit). Uncommitted uploads expire after a day,
//! committed blobs after the message TTL (30 days), when the maintenance pass deletes
//! them.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use tern_engine::{MediaRecord, StateOp, Storage};
use tern_wire::messages::*;
use tern_wire::ErrorCode;

use super::{home_shard_of_user, ConnId, Core};

/// Bytes a client should put in one chunk.
pub const MEDIA_CHUNK_BYTES: u32 = 256 * 1024;
/// Bytes one download answer carries at most.
pub const MEDIA_READ_MAX: u32 = 1024 * 1024;
/// An upload not committed by then is dropped.
const UPLOAD_TTL_MS: u64 = 24 * 3600 * 1000;

/// The shard a blob lives on (from its id).
pub fn home_shard_of_media(media_id: &MediaId) -> u32 {
    u32::from(u16::from_be_bytes([media_id[0], media_id[1]]))
}

fn hex(media_id: &MediaId) -> String {
    media_id.iter().map(|b| format!("{b:02x}")).collect()
}

/// A media failure, as the client sees it.
type MediaError = (ErrorCode, &'static str);

impl<S: Storage> Core<S> {
    fn media_path(&self, media_id: &MediaId, part: bool) -> Option<PathBuf> {
        let dir = self.config.media_dir.as_ref()?;
        Some(dir.join(if part { format!("{}.part", hex(media_id)) } else { hex(media_id) }))
    }

    fn media_record(&self, media_id: &MediaId) -> Option<MediaRecord> {
        let shard = self.local_shard(home_shard_of_media(media_id))?;
        let record = shard.borrow().state().media.get(media_id).cloned();
        record
    }

    fn put_media(&mut self, record: MediaRecord) -> Result<(u32, u64), MediaError> {
        let shard_id = home_shard_of_media(&record.media_id);
        let shard =
            self.local_shard(shard_id).cloned().ok_or((ErrorCode::NotFound, "no such media"))?;
        let seq = shard
            .borrow_mut()
            .apply_state(StateOp::PutMedia { media: record })
            .map_err(|_| (ErrorCode::StorageFull, "the server could not store this"))?;
        Ok((shard_id, seq))
    }

    /// Handles the media frames of an authenticated device.
    pub(super) fn media_frame(
        &mut self,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        message: &tern_wire::Message<'_>,
        now_ms: u64,
    ) {
        let ty = message.message_type();
        let result = match message {
            tern_wire::Message::MediaBegin(begin) => {
                self.media_begin(conn, rid, me.0, begin, now_ms)
            }
            tern_wire::Message::MediaChunk(chunk) => self.media_chunk(me.0, chunk).map(|_| ()),
            tern_wire::Message::MediaStatusRequest(request) => {
                self.media_status(conn, rid, me.0, &request.media_id)
            }
            tern_wire::Message::MediaCommit(commit) => {
                self.media_commit(conn, rid, me.0, commit, now_ms)
            }
            tern_wire::Message::MediaDownload(download) => {
                let (media_id, offset, length) =
                    (download.media_id, download.offset.to_native(), download.length.to_native());
                self.media_download(conn, rid, me.0, media_id, offset, length)
            }
            _ => Ok(()),
        };
        if let Err((code, message)) = result {
            self.error_reply(conn, rid, ty.code(), code, message, 0);
        }
    }

    fn media_begin(
        &mut self,
        conn: ConnId,
        rid: u32,
        me: UserId,
        begin: &ArchivedMediaBegin,
        now_ms: u64,
    ) -> Result<(), MediaError> {
        let size = begin.size_bytes.to_native();
        if size > self.config.media_max_bytes {
            return Err((ErrorCode::TooLarge, "the file is larger than this server accepts"));
        }
        if self.config.media_dir.is_none() {
            return Err((ErrorCode::Internal, "this server stores no media"));
        }
        let kind = rkyv::deserialize::<MediaKind, rkyv::rancor::Failure>(&begin.kind)
            .map_err(|_| (ErrorCode::Malformed, "unknown media kind"))?;
        let shard = home_shard_of_user(me);
        let mut media_id = [0u8; 16];
        getrandom::fill(&mut media_id[2..]).map_err(|_| (ErrorCode::Internal, "no randomness"))?;
        media_id[..2].copy_from_slice(&(shard as u16).to_be_bytes());
        let path = self.media_path(&media_id, true).expect("checked above");
        std::fs::File::create(&path).map_err(|_| (ErrorCode::StorageFull, "cannot store media"))?;
        let expires_ms = now_ms + UPLOAD_TTL_MS;
        let record = MediaRecord {
            media_id,
            owner: me,
            kind,
            size_bytes: size,
            sha256: None,
            created_ms: now_ms,
            expires_ms,
            readers: Vec::new(),
        };
        let (shard_id, seq) = self.put_media(record)?;
        let begun = MediaBegun { media_id, chunk_bytes: MEDIA_CHUNK_BYTES, expires_ms };
        self.reply_when_durable(conn, rid, &begun, vec![(shard_id, seq)]);
        Ok(())
    }

    /// The upload's record, for its owner only.
    fn own_upload(&self, me: UserId, media_id: &MediaId) -> Result<MediaRecord, MediaError> {
        match self.media_record(media_id) {
            Some(record) if record.owner == me => Ok(record),
            _ => Err((ErrorCode::NotFound, "no such upload")),
        }
    }

    fn media_chunk(&mut self, me: UserId, chunk: &ArchivedMediaChunk) -> Result<u64, MediaError> {
        let record = self.own_upload(me, &chunk.media_id)?;
        if record.sha256.is_some() {
            return Err((ErrorCode::Conflict, "this upload is committed"));
        }
        let path =
            self.media_path(&chunk.media_id, true).ok_or((ErrorCode::Internal, "no media"))?;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|_| (ErrorCode::NotFound, "the upload expired"))?;
        let received = file.metadata().map(|m| m.len()).unwrap_or(0);
        let offset = chunk.offset.to_native();
        if offset != received {
            return Err((ErrorCode::Conflict, "chunks must come in order: ask for the status"));
        }
        if received + chunk.data.len() as u64 > record.size_bytes {
            return Err((ErrorCode::TooLarge, "more bytes than declared"));
        }
        file.write_all(&chunk.data).map_err(|_| (ErrorCode::StorageFull, "cannot store media"))?;
        Ok(received + chunk.data.len() as u64)
    }

    fn media_status(
        &mut self,
        conn: ConnId,
        rid: u32,
        me: UserId,
        media_id: &MediaId,
    ) -> Result<(), MediaError> {
        let record = self.own_upload(me, media_id)?;
        let committed = record.sha256.is_some();
        let path =
            self.media_path(media_id, !committed).ok_or((ErrorCode::Internal, "no media"))?;
        // What is on disk after a sync: a resumed upload never skips bytes.
        let received = match std::fs::File::open(&path) {
            Ok(file) => {
                file.sync_data().map_err(|_| (ErrorCode::Internal, "cannot sync media"))?;
                file.metadata().map(|m| m.len()).unwrap_or(0)
            }
            Err(_) => return Err((ErrorCode::NotFound, "the upload expired")),
        };
        let status = MediaStatus {
            media_id: *media_id,
            received_bytes: received,
            size_bytes: record.size_bytes,
            committed,
        };
        self.reply(conn, rid, &status);
        Ok(())
    }

    fn media_commit(
        &mut self,
        conn: ConnId,
        rid: u32,
        me: UserId,
        commit: &ArchivedMediaCommit,
        now_ms: u64,
    ) -> Result<(), MediaError> {
        let mut record = self.own_upload(me, &commit.media_id)?;
        if record.sha256.is_some() {
            return Err((ErrorCode::Conflict, "this upload is committed"));
        }
        let part =
            self.media_path(&commit.media_id, true).ok_or((ErrorCode::Internal, "no media"))?;
        let mut file =
            std::fs::File::open(&part).map_err(|_| (ErrorCode::NotFound, "the upload expired"))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        if size != record.size_bytes {
            return Err((ErrorCode::InvalidArgument, "the upload is not complete"));
        }
        // Streamed: memory is one buffer whatever the size.
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let n =
                file.read(&mut buffer).map_err(|_| (ErrorCode::Internal, "cannot read media"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        let sha256: [u8; 32] = hasher.finalize().into();
        if sha256 != commit.sha256 {
            return Err((ErrorCode::HashMismatch, "the stored bytes do not have this hash"));
        }
        file.sync_all().map_err(|_| (ErrorCode::Internal, "cannot sync media"))?;
        let done = self.media_path(&commit.media_id, false).expect("checked above");
        std::fs::rename(&part, &done).map_err(|_| (ErrorCode::Internal, "cannot store media"))?;
        if let Some(dir) = done.parent() {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        record.sha256 = Some(sha256);
        record.expires_ms = now_ms + self.config.media_ttl_ms;
        let size_bytes = record.size_bytes;
        let (shard_id, seq) = self.put_media(record)?;
        let status = MediaStatus {
            media_id: commit.media_id,
            received_bytes: size,
            size_bytes,
            committed: true,
        };
        self.reply_when_durable(conn, rid, &status, vec![(shard_id, seq)]);
        Ok(())
    }

    /// Stores a whole blob made by the server for `owner` (an export), committed at once.
    pub(super) fn store_blob(
        &mut self,
        owner: UserId,
        kind: MediaKind,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<(MediaId, Vec<(u32, u64)>), MediaError> {
        let shard = home_shard_of_user(owner);
        let mut media_id = [0u8; 16];
        getrandom::fill(&mut media_id[2..]).map_err(|_| (ErrorCode::Internal, "no randomness"))?;
        media_id[..2].copy_from_slice(&(shard as u16).to_be_bytes());
        let path = self.media_path(&media_id, false).ok_or((ErrorCode::Internal, "no media"))?;
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&path)?;
            file.write_all(bytes)?;
            file.sync_all()
        };
        write().map_err(|_| (ErrorCode::StorageFull, "cannot store media"))?;
        let record = MediaRecord {
            media_id,
            owner,
            kind,
            size_bytes: bytes.len() as u64,
            sha256: Some(Sha256::digest(bytes).into()),
            created_ms: now_ms,
            expires_ms: now_ms + self.config.media_ttl_ms,
            readers: Vec::new(),
        };
        let wait = self.put_media(record)?;
        Ok((media_id, vec![wait]))
    }

    /// Records that the recipients of a `Media` message from the blob's owner may
    /// download it (the message's copies start with the media id).
    pub(super) fn grant_media(&mut self, owner: UserId, media_id: &MediaId, readers: &[UserId]) {
        let Some(mut record) = self.media_record(media_id) else { return };
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
            if let Err((_, why)) = self.put_media(record) {
                tracing::warn!(why, "could not record a media grant");
            }
        }
    }

    fn media_download(
        &mut self,
        conn: ConnId,
        rid: u32,
        me: UserId,
        media_id: MediaId,
        offset: u64,
        length: u32,
    ) -> Result<(), MediaError> {
        let shard = home_shard_of_media(&media_id);
        if shard >= self.shard_count() {
            return Err((ErrorCode::NotFound, "no such media"));
        }
        // The answer must fit the connection's frame limit (header and fields included).
        let length = length.min(self.max_frame_bytes(conn).saturating_sub(256));
        if self.local_shard(shard).is_none() {
            let core = self.placement.core_of_shard(shard);
            let request = crate::mesh::Request::MediaRead { reader: me, media_id, offset, length };
            let awaiting = super::Awaiting::Media { conn, rid };
            self.ask(core, request, Some(awaiting));
            return Ok(());
        }
        let data = self.read_media(me, media_id, offset, length)?;
        self.reply(conn, rid, &data);
        Ok(())
    }

    /// Reads part of a committed blob homed here for a reader allowed to.
    pub(super) fn read_media(
        &self,
        reader: UserId,
        media_id: MediaId,
        offset: u64,
        length: u32,
    ) -> Result<MediaData, MediaError> {
        // A guessed id and a forbidden one look the same.
        let record = self
            .media_record(&media_id)
            .filter(|r| r.sha256.is_some() && (r.owner == reader || r.readers.contains(&reader)));
        let record = record.ok_or((ErrorCode::NotFound, "no such media"))?;
        let path = self.media_path(&media_id, false).ok_or((ErrorCode::Internal, "no media"))?;
        let mut file =
            std::fs::File::open(&path).map_err(|_| (ErrorCode::NotFound, "no such media"))?;
        let length = length.min(MEDIA_READ_MAX) as u64;
        let end = (offset + length).min(record.size_bytes);
        let mut data = vec![0u8; end.saturating_sub(offset) as usize];
        file.seek(SeekFrom::Start(offset))
            .map_err(|_| (ErrorCode::Internal, "cannot read media"))?;
        file.read_exact(&mut data).map_err(|_| (ErrorCode::Internal, "cannot read media"))?;
        Ok(MediaData { media_id, offset, total_bytes: record.size_bytes, data })
    }

    /// Deletes a blob and its record (its owner's account is being deleted).
    pub(super) fn forget_media(&mut self, media_id: &MediaId) {
        for part in [true, false] {
            if let Some(path) = self.media_path(media_id, part) {
                let _ = std::fs::remove_file(path);
            }
        }
        if let Some(shard) = self.local_shard(home_shard_of_media(media_id)).cloned() {
            let removed =
                shard.borrow_mut().apply_state(StateOp::DeleteMedia { media_id: *media_id });
            if let Err(error) = removed {
                tracing::warn!(%error, "could not forget media");
            }
        }
    }

    /// Deletes blobs past their time (uncommitted uploads after a day, committed ones
    /// after the message TTL); returns how many.
    pub fn expire_media(&mut self, now_ms: u64) -> usize {
        let expired: Vec<MediaId> = self
            .owned_shards()
            .into_iter()
            .flat_map(|(_, shard)| {
                let shard = shard.borrow();
                let ids: Vec<MediaId> = shard
                    .state()
                    .media
                    .values()
                    .filter(|m| m.expires_ms <= now_ms)
                    .map(|m| m.media_id)
                    .collect();
                ids
            })
            .collect();
        for media_id in &expired {
            self.forget_media(media_id);
        }
        expired.len()
    }
}
