//! Sending: the outbox, encryption for every device, and what a refusal means.
//!
//! A text is stored (status `Sending`) before it leaves, so a crash or a drop re-sends
//! it, with the same client message id, after the next login. What the server answers
//! decides its fate, one message at a time: a sent tick; a passing refusal (rate limit,
//! full disk or mailbox, the server failing or stopping: `crate::is_transient`), after
//! which it waits and is sent again with backoff; or a permanent one (no such user, not
//! allowed, too large, ...), after which it is marked `Failed` with the server's reason
//! and never sent again. So one bad message never blocks the messages after it, and
//! one that must wait holds back only the later messages of its own conversation (a
//! recipient's full mailbox, or the budget for people who never wrote back, does not
//! stop the others). A text too long for one frame is refused before it is stored.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tern_wire::messages::*;
use tern_wire::{ErrorCode, Message};

use super::{Client, Event, CONTENT_TEXT};
use crate::connection::server_error;
use crate::crypto::PairSession;
use crate::store::{Status, Store, StoredMessage};
use crate::{is_transient, ClientError};

/// The longest text one message may carry (UTF-8 bytes). A message goes in one frame
/// of at most 1 MiB with one ciphertext per device: up to 5 of the recipient's and 4 of
/// the sender's other ones, so 64 KiB each leaves room for Olm's overhead. Longer texts
/// go as files (`Client::send_file`).
pub const TEXT_MAX_BYTES: usize = 64 * 1024;

/// Rounds of "refresh the device list and encrypt again" before a send gives up.
const STALE_ROUNDS: usize = 4;

/// Conversations held back in one round of the outbox before the round stops: a wait
/// that is the device's own (its send rate) holds every conversation, and trying them
/// all would only draw refusals.
const HELD_CONVERSATIONS_MAX: usize = 3;

/// What became of one attempt to send a stored message.
enum Outcome {
    /// On the server (the sent tick).
    Sent(StoredMessage),
    /// Still waiting (no connection, or the server asked for later).
    Waiting,
    /// Refused for good: marked failed.
    Failed { code: ErrorCode, reason: String },
}

/// How a send error is to be taken: `Some((code, reason))` for a permanent refusal of
/// this message, `None` for one that may pass (the message waits).
fn refusal(error: &ClientError) -> Option<(ErrorCode, String)> {
    match error {
        ClientError::Server { code, .. } if is_transient(*code) => None,
        ClientError::Server { code, message, .. } => Some((*code, message.clone())),
        ClientError::Protocol(reason) => Some((ErrorCode::InvalidArgument, reason.clone())),
        ClientError::Crypto(error) => Some((ErrorCode::InvalidSignature, error.to_string())),
        ClientError::TooLong { .. } => Some((ErrorCode::TooLarge, error.to_string())),
        _ => None,
    }
}

impl Client {
    /// Sends `text` to `peer` (this user's own id: a note to self, kept and synced to
    /// this user's other devices), end to end encrypted. Returns the stored message:
    /// `Sent` once the server has it durably, or `Sending` when it waits for the
    /// connection or for the server (it is sent by itself later, see
    /// [`Event::Sent`]). A permanent refusal is `ClientError::Refused`; the message is
    /// then marked failed. A text over [`TEXT_MAX_BYTES`] is refused before it is
    /// stored (`ClientError::TooLong`).
    pub async fn send_text(&mut self, peer: u64, text: &str) -> Result<StoredMessage, ClientError> {
        if text.len() > TEXT_MAX_BYTES {
            return Err(ClientError::TooLong { bytes: text.len(), max_bytes: TEXT_MAX_BYTES });
        }
        let message = StoredMessage {
            server_id: 0,
            client_id: Store::new_client_id()?,
            peer,
            sender: (self.identity.user_id, self.identity.device_id),
            outgoing: true,
            text: text.into(),
            time_ms: 0,
            status: Status::Sending,
        };
        if self.connection.is_none() {
            // Down: one attempt now (it sends older waiting messages first, in order).
            self.try_reconnect().await?;
        }
        // Stored first: a crash or a disconnect before the ack re-sends it.
        self.store.add_message(&message)?;
        let client_id = message.client_id;
        let mut outcome = self.attempt(message.clone()).await?;
        if matches!(outcome, Outcome::Waiting) && self.connection.is_none() {
            // The connection had gone stale (closed while nobody read it): log in again,
            // which re-sends this message with the others waiting.
            self.try_reconnect().await?;
            outcome = match self.store.message(client_id)? {
                Some(stored) if stored.status == Status::Sent => Outcome::Sent(stored),
                _ => Outcome::Waiting,
            };
        }
        match outcome {
            Outcome::Sent(sent) => Ok(sent),
            Outcome::Waiting => Ok(message),
            Outcome::Failed { code, reason } => {
                Err(ClientError::Refused { code, reason, client_id })
            }
        }
    }

    /// Sends a stored outgoing text once and records what became of it.
    async fn attempt(&mut self, mut message: StoredMessage) -> Result<Outcome, ClientError> {
        if self.connection.is_none() {
            return Ok(Outcome::Waiting);
        }
        let mut plaintext = vec![CONTENT_TEXT];
        plaintext.extend_from_slice(message.text.as_bytes());
        let (peer, client_id) = (message.peer, message.client_id);
        let error = match self.send_encrypted(peer, client_id, EnvelopeKind::Text, &plaintext).await
        {
            Ok((server_id, time_ms)) => {
                (message.server_id, message.time_ms) = (server_id, time_ms);
                message.status = Status::Sent;
                self.store.mark_sent(client_id, server_id, time_ms)?;
                return Ok(Outcome::Sent(message));
            }
            Err(error) => error,
        };
        if error.is_disconnect() {
            return Ok(Outcome::Waiting);
        }
        match refusal(&error) {
            Some((code, reason)) => {
                self.store.mark_failed(client_id, &reason)?;
                Ok(Outcome::Failed { code, reason })
            }
            None if matches!(
                error,
                ClientError::Server { .. } | ClientError::DevicesChanged { .. }
            ) =>
            {
                self.retry_later(&error);
                Ok(Outcome::Waiting)
            }
            None => Err(error),
        }
    }

    /// The server asked for later: the outbox is tried again after its
    /// `retry_after_ms`, or a jittered second.
    fn retry_later(&mut self, error: &ClientError) {
        let after = match error {
            ClientError::Server { retry_after_ms, .. } if *retry_after_ms > 0 => {
                Duration::from_millis(u64::from(*retry_after_ms))
            }
            _ => super::link::jittered(Duration::from_secs(1)),
        };
        // Several messages may wait in one round: the outbox goes again at the earliest.
        let at = Instant::now() + after;
        self.link.resend_at = Some(self.link.resend_at.map_or(at, |earlier| earlier.min(at)));
    }

    /// Sends the outbox in order: each message gets its sent tick ([`Event::Sent`]) or
    /// fails alone ([`Event::SendFailed`]); one that must wait holds back the later
    /// messages to the same peer (order is kept per conversation) until a reconnection or
    /// the server's delay, and the others go on. A lost connection, or a few held
    /// conversations ([`HELD_CONVERSATIONS_MAX`]), stop the round.
    pub(super) async fn resend_unsent(&mut self) -> Result<(), ClientError> {
        let mut held = BTreeSet::new();
        for message in self.store.unsent()? {
            if held.contains(&message.peer) {
                continue;
            }
            match self.attempt(message.clone()).await? {
                Outcome::Sent(sent) => self.events.push_back(Event::Sent(sent)),
                Outcome::Waiting if self.connection.is_none() => break,
                Outcome::Waiting => {
                    held.insert(message.peer);
                    if held.len() >= HELD_CONVERSATIONS_MAX {
                        break;
                    }
                }
                Outcome::Failed { reason, .. } => {
                    let message = StoredMessage { status: Status::Failed, ..message };
                    self.events.push_back(Event::SendFailed { message, reason });
                }
            }
        }
        Ok(())
    }

    /// Encrypts `plaintext` for every device of `peer` and this user's other devices and
    /// sends it; returns (server id, server time) once durable. Stale device lists are
    /// refreshed and the message re-encrypted, a few rounds at most (devices do not come
    /// and go that fast).
    pub(super) async fn send_encrypted(
        &mut self,
        peer: u64,
        client_message_id: u64,
        kind: EnvelopeKind,
        plaintext: &[u8],
    ) -> Result<(u64, u64), ClientError> {
        let news = self.device_news;
        for _ in 0..STALE_ROUNDS {
            let mut copies = self.encrypt_for_all(peer, plaintext).await?;
            if self.device_news != news {
                // The app hears of the new or changed device before anything is
                // encrypted to it: these copies are dropped unsent.
                return Err(ClientError::DevicesChanged { user_id: peer });
            }
            if let Some(prefix) = self.clear_prefix.as_ref() {
                // A media message names its blob in clear (see `media.rs`).
                for copy in &mut copies {
                    copy.ciphertext.splice(0..0, prefix.iter().copied());
                }
            }
            let to = Conversation::User(peer);
            let send = SendMessage { client_message_id, to, kind, ttl_s: 0, copies };
            let reply = self.request(&send).await?;
            match reply.frame().message {
                Message::SendAck(ack) => {
                    return Ok((ack.server_message_id.to_native(), ack.server_time_ms.to_native()))
                }
                Message::SendError(error) => self.on_send_error(error).await?,
                _ => return Err(server_error(&reply)),
            }
        }
        Err(ClientError::Server {
            code: ErrorCode::StaleDevices,
            message: "the recipient's device list kept changing".into(),
            retry_after_ms: 0,
        })
    }

    /// A `SendError`: for stale devices, fix the sessions (the caller encrypts again);
    /// anything else is the send's error.
    async fn on_send_error(
        &mut self,
        error: &<SendError as rkyv::Archive>::Archived,
    ) -> Result<(), ClientError> {
        let code = ErrorCode::from_u16(error.code.to_native()).unwrap_or(ErrorCode::Internal);
        if code != ErrorCode::StaleDevices {
            let message = match error.message.as_str() {
                "" => format!("refused ({})", code.name()),
                reason => reason.to_string(),
            };
            let retry_after_ms = error.retry_after_ms.to_native();
            return Err(ClientError::Server { code, message, retry_after_ms });
        }
        let missing: Vec<(u64, u32)> =
            error.missing_devices.iter().map(|d| (d.0.to_native(), d.1.to_native())).collect();
        for extra in error.extra_devices.iter() {
            // Gone, says the server: no more copies, but the pin stays (its word never
            // erases an identity; a device coming back with other keys is reported).
            let (user_id, device_id) = (extra.0.to_native(), extra.1.to_native());
            self.store.retire_device(user_id, device_id)?;
            self.store.set_unvouched(user_id, device_id, false)?;
        }
        for user in missing.iter().map(|d| d.0).collect::<BTreeSet<_>>() {
            let devices: Vec<u32> = missing.iter().filter(|d| d.0 == user).map(|d| d.1).collect();
            self.start_sessions(user, &devices).await?;
        }
        Ok(())
    }

    /// One ciphertext per device of `peer` and per other device of this user.
    pub(super) async fn encrypt_for_all(
        &mut self,
        peer: u64,
        plaintext: &[u8],
    ) -> Result<Vec<DeviceCopy>, ClientError> {
        let me = (self.identity.user_id, self.identity.device_id);
        self.recheck_unvouched(peer).await?;
        if self.store.known_devices(peer)?.is_empty() {
            // First contact: every device of the peer (the server says which).
            self.start_sessions(peer, &[]).await?;
        }
        let mut targets: Vec<(u64, u32)> =
            self.store.known_devices(peer)?.into_iter().map(|(d, _)| (peer, d)).collect();
        if peer != me.0 {
            let mine = self.store.known_devices(me.0)?.into_iter().map(|(d, _)| (me.0, d));
            targets.extend(mine);
        }
        targets.retain(|d| *d != me);
        // Devices the server lists that their primary did not sign: an empty copy each
        // (the server wants one per device), never a ciphertext.
        let mut unvouched: Vec<(u64, u32)> =
            self.store.unvouched_devices(peer)?.into_iter().map(|d| (peer, d)).collect();
        if peer != me.0 {
            unvouched.extend(self.store.unvouched_devices(me.0)?.into_iter().map(|d| (me.0, d)));
        }
        targets.retain(|d| !unvouched.contains(d));
        let mut copies = Vec::with_capacity(targets.len() + unvouched.len());
        for &(user_id, device_id) in unvouched.iter().filter(|d| **d != me) {
            let (e2e_type, ciphertext) = (E2eType::OlmMessage, Vec::new());
            copies.push(DeviceCopy { user_id, device_id, e2e_type, ciphertext });
        }
        for (user_id, device_id) in targets {
            let mut sessions = self.store.sessions(user_id, device_id)?;
            if sessions.is_empty() {
                self.start_sessions(user_id, &[device_id]).await?;
                sessions = self.store.sessions(user_id, device_id)?;
            }
            let Some((session_id, pickle)) = sessions.into_iter().next() else {
                continue; // The device has gone: the server will say so.
            };
            let mut session = PairSession::from_pickle(&pickle, self.store.pickle_key())?;
            let (e2e_type, ciphertext) = session.encrypt(plaintext);
            let pickle = session.pickle(self.store.pickle_key());
            self.store.save_session((user_id, device_id), &session_id, &pickle, None, None)?;
            copies.push(DeviceCopy { user_id, device_id, e2e_type, ciphertext });
        }
        Ok(copies)
    }
}
