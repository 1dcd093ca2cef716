//! Sending and fetching files: sealed on the device (`crate::media`), uploaded in chunks
//! that resume after a disconnect where the server says, announced in an end-to-end
//! encrypted `Media` message, downloaded in ranges and checked before they are opened.
//!
//! A download trusts neither the sender's descriptor nor the server: the descriptor's
//! sizes are checked against the file limit before the first request, the server may
//! not send more than was asked or than the blob holds, and the file is written under a
//! name that is not taken yet ("name (2).ext"), never over an existing file.

use std::path::{Path, PathBuf};

use tern_wire::messages::*;
use tern_wire::Message;

use super::{server_error, Client, CONTENT_HISTORY, CONTENT_MEDIA};
use crate::media::{open, seal, MediaDescriptor, SealedFile, FILE_MAX_BYTES};
use crate::store::{Status, Store, StoredMessage};
use crate::{ClientError, FileError};

/// What a history bundle holds: messages as the sending device stored them (an rkyv
/// archive, sealed like any file; only this user's devices ever hold its key).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct HistoryBundle {
    messages: Vec<HistoryEntry>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct HistoryEntry {
    server_id: u64,
    client_id: u64,
    peer: u64,
    sender_user: u64,
    sender_device: u32,
    outgoing: bool,
    text: String,
    time_ms: u64,
    status: u8,
    group_id: u64,
}

/// Bytes asked for per download request.
const DOWNLOAD_BYTES: u32 = 512 * 1024;

/// Names tried for a download before giving up: `name`, then `name (2)` to this.
const SAVE_NAMES_MAX: u32 = 1000;

/// Creates a new file for `name` in `dir`: `name` itself if it does not exist, else
/// `stem (2).ext`, `stem (3).ext`, ... Creation is exclusive (`create_new`), so a file
/// that appears meanwhile is not overwritten either.
fn create_unused(dir: &Path, name: &Path) -> Result<(std::fs::File, PathBuf), ClientError> {
    let stem = name.file_stem().map_or("file".into(), |s| s.to_string_lossy().into_owned());
    let extension = name.extension().map(|e| e.to_string_lossy().into_owned());
    for n in 1..=SAVE_NAMES_MAX {
        let path = match (n, &extension) {
            (1, _) => dir.join(name),
            (_, Some(extension)) => dir.join(format!("{stem} ({n}).{extension}")),
            (_, None) => dir.join(format!("{stem} ({n})")),
        };
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((file, path)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(ClientError::Config(format!("{}: {e}", path.display()))),
        }
    }
    Err(ClientError::Config(format!(
        "{}: {SAVE_NAMES_MAX} files named like {} are there already",
        dir.display(),
        name.display()
    )))
}

impl Client {
    /// Sends a file to `peer`: compressed and encrypted here, uploaded (resuming after
    /// disconnects), then announced. Returns the message once the server has it.
    pub async fn send_file(
        &mut self,
        peer: u64,
        path: &Path,
    ) -> Result<StoredMessage, ClientError> {
        let unreadable =
            |e: std::io::Error| ClientError::Config(format!("{}: {e}", path.display()));
        let size_bytes = std::fs::metadata(path).map_err(unreadable)?.len();
        if size_bytes > FILE_MAX_BYTES {
            return Err(FileError::TooLarge { size_bytes, max_bytes: FILE_MAX_BYTES }.into());
        }
        let plaintext = std::fs::read(path).map_err(unreadable)?;
        let name = path.file_name().map_or("file".into(), |n| n.to_string_lossy().into_owned());
        let sealed = seal(&name, &plaintext)?;
        let kind = if sealed.descriptor.thumbnail.is_empty() {
            MediaKind::Document
        } else {
            MediaKind::Image
        };
        let descriptor = self.store_sealed(sealed, kind).await?;
        let mut plaintext = vec![CONTENT_MEDIA];
        plaintext.extend_from_slice(&descriptor.encode());
        let client_id = Store::new_client_id()?;
        let (server_id, time_ms) =
            self.announce_blob(peer, client_id, descriptor.media_id, &plaintext).await?;

        let me = (self.identity.user_id, self.identity.device_id);
        let message = StoredMessage {
            server_id,
            client_id,
            peer,
            sender: me,
            outgoing: true,
            text: super::inbox::media_line(&descriptor),
            time_ms,
            status: Status::Sent,
        };
        self.store.add_message(&message)?;
        self.store.save_media(me, client_id, &descriptor.encode())?;
        Ok(message)
    }

    /// Uploads a sealed blob (resuming after disconnects) and commits it; returns its
    /// descriptor with the server's media id.
    async fn store_sealed(
        &mut self,
        mut sealed: SealedFile,
        kind: MediaKind,
    ) -> Result<MediaDescriptor, ClientError> {
        let begin = MediaBegin { size_bytes: sealed.ciphertext.len() as u64, kind };
        let reply = self.request(&begin).await?;
        let Message::MediaBegun(begun) = reply.frame().message else {
            return Err(server_error(&reply));
        };
        let media_id = begun.media_id;
        let chunk = begun.chunk_bytes.to_native().max(4096) as usize;
        self.upload(media_id, &sealed.ciphertext, chunk).await?;
        let commit = MediaCommit { media_id, sha256: sealed.descriptor.sha256 };
        let reply = self.request(&commit).await?;
        let Message::MediaStatus(_) = reply.frame().message else {
            return Err(server_error(&reply));
        };
        sealed.descriptor.media_id = media_id;
        Ok(sealed.descriptor)
    }

    /// Sends `plaintext` (which describes the blob `media_id`) to `peer` as a `Media`
    /// envelope whose copies name the blob in clear, so the server lets the recipients
    /// download it.
    async fn announce_blob(
        &mut self,
        peer: u64,
        client_id: u64,
        media_id: MediaId,
        plaintext: &[u8],
    ) -> Result<(u64, u64), ClientError> {
        self.clear_prefix = Some(media_id.to_vec());
        let sent = self.send_encrypted(peer, client_id, EnvelopeKind::Media, plaintext).await;
        self.clear_prefix = None;
        sent
    }

    /// Sends this user's device `device_id` (a newly linked one) the recent history of
    /// this device: the last `per_conversation` messages of every conversation, sealed
    /// and uploaded like a file, then offered end-to-end encrypted. Returns how many
    /// messages the bundle holds.
    pub async fn send_history(
        &mut self,
        device_id: u32,
        per_conversation: usize,
    ) -> Result<usize, ClientError> {
        let messages = self.store.recent_messages(per_conversation)?;
        let bundle = HistoryBundle {
            messages: messages
                .iter()
                .map(|(m, group_id)| HistoryEntry {
                    server_id: m.server_id,
                    client_id: m.client_id,
                    peer: m.peer,
                    sender_user: m.sender.0,
                    sender_device: m.sender.1,
                    outgoing: m.outgoing,
                    text: m.text.clone(),
                    time_ms: m.time_ms,
                    status: m.status as u8,
                    group_id: *group_id,
                })
                .collect(),
        };
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&bundle)
            .map_err(|e| ClientError::Protocol(format!("history bundle: {e}")))?;
        let descriptor = self.store_sealed(seal("history", &bytes)?, MediaKind::Archive).await?;
        let mut plaintext = vec![CONTENT_HISTORY];
        plaintext.extend_from_slice(&device_id.to_le_bytes());
        plaintext.extend_from_slice(&descriptor.encode());
        let me = self.identity.user_id;
        let client_id = Store::new_client_id()?;
        self.announce_blob(me, client_id, descriptor.media_id, &plaintext).await?;
        Ok(bundle.messages.len())
    }

    /// Fetches the history bundle another device offered ([`super::Event::HistoryOffered`])
    /// and adds its messages to this device's history. Returns how many were new.
    pub async fn import_history(&mut self) -> Result<usize, ClientError> {
        let descriptor = self
            .store
            .history_offer()?
            .ok_or_else(|| ClientError::Config("no history bundle was offered".into()))?;
        let descriptor = MediaDescriptor::decode(&descriptor)?;
        let bytes = self.fetch_blob(&descriptor).await?;
        let bundle = rkyv::from_bytes::<HistoryBundle, rkyv::rancor::Error>(&bytes)
            .map_err(|e| ClientError::Protocol(format!("unreadable history bundle: {e}")))?;
        let messages: Vec<(StoredMessage, u64)> = bundle
            .messages
            .into_iter()
            .map(|e| {
                let message = StoredMessage {
                    server_id: e.server_id,
                    client_id: e.client_id,
                    peer: e.peer,
                    sender: (e.sender_user, e.sender_device),
                    outgoing: e.outgoing,
                    text: e.text,
                    time_ms: e.time_ms,
                    status: Status::from_i64(i64::from(e.status)),
                };
                (message, e.group_id)
            })
            .collect();
        let added = self.store.import_messages(&messages)?;
        self.store.forget_history_offer()?;
        Ok(added)
    }

    /// Downloads a blob in ranges and opens it (checking its sizes and hash). The
    /// sender's sizes are checked against the limit first; the buffer grows with the
    /// bytes that really came, never to a number someone sent.
    async fn fetch_blob(&mut self, descriptor: &MediaDescriptor) -> Result<Vec<u8>, ClientError> {
        descriptor.check()?;
        let mut ciphertext = Vec::new();
        while (ciphertext.len() as u64) < descriptor.size {
            let left = descriptor.size - ciphertext.len() as u64;
            let length = u64::from(DOWNLOAD_BYTES).min(left) as u32;
            let request = MediaDownload {
                media_id: descriptor.media_id,
                offset: ciphertext.len() as u64,
                length,
            };
            let reply = self.request(&request).await?;
            let Message::MediaData(data) = reply.frame().message else {
                return Err(server_error(&reply));
            };
            if data.data.is_empty() {
                return Err(ClientError::Protocol("the server sent no bytes".into()));
            }
            let sent_bytes = data.data.len() as u64;
            if sent_bytes > u64::from(length) {
                let asked_bytes = u64::from(length);
                return Err(FileError::Oversent { sent_bytes, asked_bytes }.into());
            }
            ciphertext.extend_from_slice(&data.data);
        }
        open(descriptor, &ciphertext)
    }

    /// Uploads `data` in chunks; after a disconnect, reconnects and resumes from what
    /// the server has durably.
    async fn upload(
        &mut self,
        media_id: MediaId,
        data: &[u8],
        chunk: usize,
    ) -> Result<(), ClientError> {
        let mut offset = 0usize;
        let mut attempts = 0;
        loop {
            match self.upload_from(media_id, data, chunk, offset).await {
                Ok(()) => return Ok(()),
                Err(ClientError::Disconnected | ClientError::Io(_)) if attempts < 20 => {
                    attempts += 1;
                    self.reconnect_with_backoff(20).await?;
                    let reply = self.request(&MediaStatusRequest { media_id }).await?;
                    let Message::MediaStatus(status) = reply.frame().message else {
                        return Err(server_error(&reply));
                    };
                    offset = status.received_bytes.to_native() as usize;
                }
                Err(other) => return Err(other),
            }
        }
    }

    async fn upload_from(
        &mut self,
        media_id: MediaId,
        data: &[u8],
        chunk: usize,
        mut offset: usize,
    ) -> Result<(), ClientError> {
        while offset < data.len() {
            let end = (offset + chunk).min(data.len());
            let piece =
                MediaChunk { media_id, offset: offset as u64, data: data[offset..end].to_vec() };
            self.connection()?.send(&piece).await?;
            offset = end;
        }
        // The status answer comes after every chunk was handled: a refused chunk shows.
        let reply = self.request(&MediaStatusRequest { media_id }).await?;
        let Message::MediaStatus(status) = reply.frame().message else {
            return Err(server_error(&reply));
        };
        if status.received_bytes.to_native() != data.len() as u64 {
            return Err(ClientError::Protocol("the server did not take the whole file".into()));
        }
        Ok(())
    }

    /// Fetches the file carried by the message `server_id`, checks and opens it, and
    /// writes it into `dir` under its name, or under `name (2).ext` and so on when that
    /// is taken (an existing file is never overwritten). Returns the path.
    pub async fn download(&mut self, server_id: u64, dir: &Path) -> Result<PathBuf, ClientError> {
        let descriptor = self
            .store
            .media_of(server_id)?
            .ok_or_else(|| ClientError::Config(format!("message {server_id} carries no file")))?;
        let descriptor = MediaDescriptor::decode(&descriptor)?;
        let plaintext = self.fetch_blob(&descriptor).await?;
        // Only the file name, never a path from the sender.
        let name = Path::new(&descriptor.name).file_name().map_or("file".into(), |n| n.to_owned());
        let (mut file, path) = create_unused(dir, Path::new(&name))?;
        let written = std::io::Write::write_all(&mut file, &plaintext);
        written.map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
        Ok(path)
    }
}
