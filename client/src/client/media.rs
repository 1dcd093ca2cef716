//! Sending and fetching files: sealed on the device (`crate::media`), uploaded in chunks
//! that resume after a disconnect where the server says, announced in an end-to-end
//! encrypted `Media` message, downloaded in ranges and checked before they are opened.

use std::path::{Path, PathBuf};

use tern_wire::messages::*;
use tern_wire::Message;

use super::{server_error, Client, CONTENT_MEDIA};
use crate::media::{open, seal, MediaDescriptor};
use crate::store::{Status, Store, StoredMessage};
use crate::ClientError;

/// Bytes asked for per download request.
const DOWNLOAD_BYTES: u32 = 512 * 1024;

impl Client {
    /// Sends a file to `peer`: compressed and encrypted here, uploaded (resuming after
    /// disconnects), then announced. Returns the message once the server has it.
    pub async fn send_file(
        &mut self,
        peer: u64,
        path: &Path,
    ) -> Result<StoredMessage, ClientError> {
        let plaintext = std::fs::read(path)
            .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
        let name = path.file_name().map_or("file".into(), |n| n.to_string_lossy().into_owned());
        let mut sealed = seal(&name, &plaintext)?;
        let kind = if sealed.descriptor.thumbnail.is_empty() {
            MediaKind::Document
        } else {
            MediaKind::Image
        };
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
        let mut plaintext = vec![CONTENT_MEDIA];
        plaintext.extend_from_slice(&sealed.descriptor.encode());
        let client_id = Store::new_client_id()?;
        self.clear_prefix = Some(media_id.to_vec());
        let sent = self.send_encrypted(peer, client_id, EnvelopeKind::Media, &plaintext).await;
        self.clear_prefix = None;
        let (server_id, time_ms) = sent?;
        let me = (self.identity.user_id, self.identity.device_id);
        let message = StoredMessage {
            server_id,
            client_id,
            peer,
            sender: me,
            outgoing: true,
            text: format!("📎 {} ({} bytes)", sealed.descriptor.name, sealed.descriptor.size),
            time_ms,
            status: Status::Sent,
        };
        self.store.add_message(&message)?;
        self.store.save_media(me, client_id, &sealed.descriptor.encode())?;
        Ok(message)
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
    /// writes it into `dir` under its name. Returns the path.
    pub async fn download(&mut self, server_id: u64, dir: &Path) -> Result<PathBuf, ClientError> {
        let descriptor = self
            .store
            .media_of(server_id)?
            .ok_or_else(|| ClientError::Config(format!("message {server_id} carries no file")))?;
        let descriptor = MediaDescriptor::decode(&descriptor)?;
        let mut ciphertext = Vec::with_capacity(descriptor.size as usize);
        while (ciphertext.len() as u64) < descriptor.size {
            let request = MediaDownload {
                media_id: descriptor.media_id,
                offset: ciphertext.len() as u64,
                length: DOWNLOAD_BYTES,
            };
            let reply = self.request(&request).await?;
            let Message::MediaData(data) = reply.frame().message else {
                return Err(server_error(&reply));
            };
            if data.data.is_empty() {
                return Err(ClientError::Protocol("the server sent no bytes".into()));
            }
            ciphertext.extend_from_slice(&data.data);
        }
        let plaintext = open(&descriptor, &ciphertext)?;
        // Only the file name, never a path from the sender.
        let name = Path::new(&descriptor.name).file_name().map_or("file".into(), |n| n.to_owned());
        let path = dir.join(name);
        std::fs::write(&path, plaintext)
            .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
        Ok(path)
    }
}
