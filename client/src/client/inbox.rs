//! What the server pushes: deliveries (messages, receipts, group events, notices),
//! typing, presence, key warnings and errors, turned into [`Event`]s.
//!
//! An envelope is acknowledged only after what it carries is stored with the ratchet
//! state that decrypted it (one transaction), or is known undecryptable: a crash in
//! between redelivers it, and the history's (sender, client id) key drops the repeat.

use rkyv::rancor::Failure;
use tern_wire::messages::*;
use tern_wire::{EnvelopeContent, ErrorCode, Message, MessageType};

use super::{unreachable_frame, Client, Event};
use super::{CONTENT_DELETE, CONTENT_GROUP_KEY, CONTENT_GROUP_STATE, CONTENT_HISTORY};
use super::{CONTENT_MEDIA, CONTENT_TEXT};
use crate::connection::{server_error, OwnedFrame};
use crate::crypto::{prekey_session_id, PairSession};
use crate::media::MediaDescriptor;
use crate::store::{Status, StoredMessage};
use crate::{ClientError, CryptoError, PeerIdentity};

/// A decrypted pairwise message: the session after it, the plaintext, and the sender's
/// identity key when the message started a new session.
type Opened = (PairSession, Vec<u8>, Option<[u8; 32]>);

/// How a file is shown in the history: its name and its real size.
pub(crate) fn media_line(descriptor: &MediaDescriptor) -> String {
    let size = descriptor.original_size.max(1);
    format!("📎 {} ({})", descriptor.name, human_size(size))
}

/// Bytes for people: "812 B", "293.0 KiB", "4.2 MiB".
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

impl Client {
    /// Handles one frame the server pushed.
    pub(super) async fn handle_push(&mut self, frame: OwnedFrame) -> Result<(), ClientError> {
        let ty = frame.frame().message.message_type();
        match (ty, frame.frame().message) {
            (MessageType::Deliver, _) => self.on_deliver(&frame).await,
            (_, Message::KeysLow(low)) => {
                let remaining = low.one_time_keys_remaining.to_native() as usize;
                self.refill_keys(remaining).await
            }
            (_, Message::TypingEvent(typing)) => {
                let (user_id, active) = (typing.user_id.to_native(), typing.active);
                self.events.push_back(Event::Typing { user_id, active });
                Ok(())
            }
            (_, Message::PresenceEvent(event)) => {
                self.events.push_back(Event::Presence {
                    user_id: event.user_id.to_native(),
                    online: event.online,
                    last_seen_ms: event.last_seen_ms.to_native(),
                });
                Ok(())
            }
            (MessageType::ErrorFrame, _) => {
                // The server closes the connection after an unsolicited error (stopping,
                // idle timeout): a drop like any other, except a revoked token.
                let error = server_error(&frame);
                if let ClientError::Server { code: ErrorCode::BadToken, .. } = error {
                    return Err(error);
                }
                self.dropped(&error);
                Ok(())
            }
            _ => Ok(()), // Pongs, and events this SDK version does not use yet.
        }
    }

    async fn refill_keys(&mut self, remaining: usize) -> Result<(), ClientError> {
        self.crypto.refill_one_time_keys(remaining);
        self.store.save_account(&self.crypto.pickle(self.store.pickle_key()))?;
        let keys = self.crypto.unpublished_one_time_keys();
        let count = keys.len() as u32;
        if count == 0 {
            return Ok(());
        }
        let upload = UploadKeys { one_time_keys: keys, fallback_key: None };
        self.request(&upload).await?;
        // Only now: a lost upload must leave the keys unpublished, to be sent again.
        self.crypto.mark_published();
        self.store.save_account(&self.crypto.pickle(self.store.pickle_key()))?;
        self.events.push_back(Event::KeysRefilled(count));
        Ok(())
    }

    async fn on_deliver(&mut self, frame: &OwnedFrame) -> Result<(), ClientError> {
        let Message::Deliver(deliver) = frame.frame().message else { unreachable_frame() };
        let mailbox_seq = deliver.mailbox_seq;
        let envelope = &deliver.envelope;
        let mut readable = true;
        match envelope.kind {
            ArchivedEnvelopeKind::Text
            | ArchivedEnvelopeKind::Media
            | ArchivedEnvelopeKind::Control => {
                let sender = (envelope.sender_user.to_native(), envelope.sender_device.to_native());
                self.vouch_for_sender(sender).await?;
                readable = self.on_message(envelope)?
            }
            ArchivedEnvelopeKind::Receipt => {
                if let Ok(EnvelopeContent::Receipt(body)) = envelope.content() {
                    self.on_receipt(body)?;
                }
            }
            ArchivedEnvelopeKind::GroupEvent => {
                if let Ok(EnvelopeContent::GroupEvent(body)) = envelope.content() {
                    if let Ok(body) = rkyv::deserialize::<GroupEventBody, Failure>(body) {
                        self.on_group_event(body).await?;
                    }
                }
            }
            ArchivedEnvelopeKind::Notice => {
                if let Ok(EnvelopeContent::Notice(body)) = envelope.content() {
                    self.on_notice(body);
                }
            }
        }
        self.link.pending = self.link.pending.saturating_sub(1);
        // Stored (or known undecryptable): the server may forget it. Each envelope is
        // acknowledged on its own, so what this device could not read is discarded
        // without a delivered receipt: an undecryptable probe learns nothing.
        let up_to_mailbox_seq = mailbox_seq;
        if readable {
            self.connection()?.send(&DeliveryAck { up_to_mailbox_seq }).await?;
        } else {
            self.connection()?.send(&DiscardAck { up_to_mailbox_seq }).await?;
        }
        Ok(())
    }

    /// A message envelope (text, file, control): decrypted, stored, reported. Returns
    /// whether it was readable (an undecryptable one is reported, never stored).
    fn on_message(&mut self, envelope: &ArchivedEnvelope) -> Result<bool, ClientError> {
        let sender = (envelope.sender_user.to_native(), envelope.sender_device.to_native());
        let client_id = envelope.client_message_id.to_native();
        if self.store.has_message(sender, client_id)? {
            return Ok(true); // A redelivery.
        }
        if self.store.unvouched_devices(sender.0)?.contains(&sender.1) {
            // A companion its user's primary did not sign: nothing from it is read.
            let reason = format!(
                "device {} of user {} is not vouched for by their primary device",
                sender.1, sender.0
            );
            self.events.push_back(Event::Undecryptable { sender, reason });
            return Ok(false);
        }
        let e2e_type = match envelope.e2e_type {
            ArchivedE2eType::OlmPreKey => E2eType::OlmPreKey,
            ArchivedE2eType::OlmMessage => E2eType::OlmMessage,
            ArchivedE2eType::Megolm => E2eType::Megolm,
            ArchivedE2eType::Plain => E2eType::Plain,
        };
        let mine = sender.0 == self.identity.user_id;
        let stored = StoredMessage {
            server_id: envelope.server_message_id.to_native(),
            client_id,
            peer: match &envelope.conversation {
                ArchivedConversation::User(user) => user.to_native(),
                ArchivedConversation::Group(_) => sender.0,
            },
            sender,
            outgoing: mine,
            text: String::new(),
            time_ms: envelope.server_time_ms.to_native(),
            status: if mine { Status::Sent } else { Status::Received },
        };
        let mut body = envelope.body.as_slice();
        if envelope.kind == ArchivedEnvelopeKind::Media && body.len() >= 16 {
            body = &body[16..]; // The media id in clear; the descriptor is inside.
        }
        let decrypted = match &envelope.conversation {
            ArchivedConversation::Group(group) if e2e_type == E2eType::Megolm => {
                self.decrypt_group(group.to_native(), stored, body)
            }
            _ => self.decrypt_and_store(stored, e2e_type, body),
        };
        match decrypted {
            Ok(message) => self.events.push_back(Event::Message(message)),
            Err(ClientError::NotAMessage) => {}
            Err(ClientError::Crypto(error)) => {
                let reason = error.to_string();
                self.events.push_back(Event::Undecryptable { sender, reason });
                return Ok(false);
            }
            Err(other) => return Err(other),
        }
        Ok(true)
    }

    /// A delivered or read receipt: the ticks of this user's messages go up — only of
    /// messages the receipt's reader was sent (its peer, or a member of its group).
    fn on_receipt(&mut self, body: &ArchivedReceiptBody) -> Result<(), ClientError> {
        let ids: Vec<u64> = body.message_ids.iter().map(|id| id.to_native()).collect();
        let status = match body.kind {
            ArchivedReceiptKind::Read => Status::Read,
            _ => Status::Delivered,
        };
        let by = (body.by_user.to_native(), body.by_device.to_native());
        let group = match &body.conversation {
            ArchivedConversation::Group(group) => Some(group.to_native()),
            ArchivedConversation::User(_) => None,
        };
        let ids = self.store.receiptable(&ids, by.0, group)?;
        for id in &ids {
            self.store.add_receipt(*id, by, status == Status::Read)?;
        }
        let messages = self.store.raise_status(&ids, status)?;
        if !messages.is_empty() {
            self.events.push_back(Event::Receipt { status, by, messages });
        }
        Ok(())
    }

    /// A notice from the server: messages lost from a full mailbox.
    fn on_notice(&mut self, body: &ArchivedNoticeBody) {
        match body {
            ArchivedNoticeBody::Dropped { count } => {
                self.events.push_back(Event::Dropped(count.to_native()))
            }
            ArchivedNoticeBody::SentDropped { recipient, message_ids } => {
                self.events.push_back(Event::SentDropped {
                    recipient: recipient.to_native(),
                    server_ids: message_ids.iter().map(|id| id.to_native()).collect(),
                })
            }
        }
    }

    /// Decrypts one pairwise copy: with the session a pre-key message names (never a
    /// second session from one pre-key message, so a replay fails), a new inbound
    /// session, or the known sessions in turn.
    fn open_pairwise(
        &mut self,
        sender: (u64, u32),
        e2e_type: E2eType,
        ciphertext: &[u8],
    ) -> Result<Opened, ClientError> {
        let key = *self.store.pickle_key();
        let sessions = self.store.sessions(sender.0, sender.1)?;
        if e2e_type == E2eType::OlmPreKey {
            let session_id = prekey_session_id(ciphertext)?;
            let Some((_, pickle)) = sessions.iter().find(|(id, _)| *id == session_id) else {
                let (session, plaintext, identity) = self.crypto.inbound_session(ciphertext)?;
                return Ok((session, plaintext, Some(identity)));
            };
            let mut session = PairSession::from_pickle(pickle, &key)?;
            let plaintext = session.decrypt(e2e_type, ciphertext)?;
            return Ok((session, plaintext, None));
        }
        let mut last_error = None;
        for (_, pickle) in &sessions {
            let mut session = PairSession::from_pickle(pickle, &key)?;
            match session.decrypt(e2e_type, ciphertext) {
                Ok(plaintext) => return Ok((session, plaintext, None)),
                Err(error) => last_error = Some(error),
            }
        }
        let reason =
            last_error.map_or("no session with this device".to_string(), |e| e.to_string());
        Err(ClientError::Crypto(CryptoError::Decrypt(reason)))
    }

    /// Decrypts one copy and stores the message with the session state, in one
    /// transaction; a control message (a group key, a history offer, a deletion) is
    /// applied instead and answers `NotAMessage`.
    fn decrypt_and_store(
        &mut self,
        mut message: StoredMessage,
        e2e_type: E2eType,
        ciphertext: &[u8],
    ) -> Result<StoredMessage, ClientError> {
        let sender = message.sender;
        let key = *self.store.pickle_key();
        let (session, plaintext, new_identity) =
            self.open_pairwise(sender, e2e_type, ciphertext)?;
        if let Some(curve25519) = new_identity {
            self.pin(sender, PeerIdentity { curve25519, ed25519: None })?;
        }
        // What the plaintext is: a message for the history, or a control message.
        let (content, payload) = match plaintext.split_first() {
            Some((&CONTENT_TEXT, text)) => {
                message.text = String::from_utf8_lossy(text).into_owned();
                (CONTENT_TEXT, text)
            }
            Some((&CONTENT_MEDIA, descriptor)) => {
                let descriptor = MediaDescriptor::decode(descriptor)?;
                self.store.save_media(message.sender, message.client_id, &descriptor.encode())?;
                message.text = media_line(&descriptor);
                (CONTENT_MEDIA, &[][..])
            }
            Some((&CONTENT_GROUP_KEY, payload)) => (CONTENT_GROUP_KEY, payload),
            Some((&CONTENT_GROUP_STATE, payload)) => (CONTENT_GROUP_STATE, payload),
            Some((&CONTENT_HISTORY, payload)) if sender.0 == self.identity.user_id => {
                (CONTENT_HISTORY, payload)
            }
            Some((&CONTENT_DELETE, id)) if id.len() == 8 => (CONTENT_DELETE, id),
            _ => return Err(CryptoError::Decrypt("unknown content".into()).into()),
        };
        let is_message = matches!(content, CONTENT_TEXT | CONTENT_MEDIA);
        // The ratchet moved: saved with the message it decrypted (or alone for a control
        // message), in one transaction.
        let account = new_identity.map(|_| self.crypto.pickle(&key));
        let pickle = session.pickle(&key);
        let stored = is_message.then_some(&message);
        self.store.save_session(sender, &session.id(), &pickle, account.as_deref(), stored)?;
        if is_message {
            return Ok(message);
        }
        self.apply_control(sender, content, payload)?;
        Err(ClientError::NotAMessage)
    }

    /// A control message, decrypted and with its ratchet state saved.
    fn apply_control(
        &mut self,
        sender: (u64, u32),
        content: u8,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        match content {
            CONTENT_GROUP_KEY => self.accept_group_key(sender, payload)?,
            CONTENT_GROUP_STATE => self.accept_group_state(sender, payload)?,
            CONTENT_HISTORY => {
                if let Some((device, descriptor)) = payload.split_first_chunk::<4>() {
                    if u32::from_le_bytes(*device) == self.identity.device_id {
                        MediaDescriptor::decode(descriptor)?;
                        self.store.save_history_offer(descriptor)?;
                        self.events.push_back(Event::HistoryOffered { from_device: sender.1 });
                    }
                }
            }
            _ => {
                // A deletion for everyone: the history loses the message.
                let server_id = u64::from_le_bytes(payload.try_into().expect("8 bytes"));
                self.store.delete_message(sender.0, server_id)?;
                self.events.push_back(Event::Deleted { sender: sender.0, server_id });
            }
        }
        Ok(())
    }
}
