//! Groups in the SDK: signed changes, the device's verified view, Megolm sessions.
//!
//! Sending: this device keeps one Megolm session per group (rotated after a member left
//! or was removed, every 100 messages and every 7 days) and shares its key, over Olm
//! only, with every device of every member of its *verified* view that has not had it.
//! Receiving: a key is accepted only from an Olm message of a device whose user is a
//! member in this device's view; a group message is decrypted with the session it names,
//! and a Megolm index seen before is refused (Megolm alone would decrypt a replay).

use tern_wire::messages::*;
use tern_wire::Message;

use super::{server_error, Client, Event, CONTENT_GROUP_KEY, CONTENT_GROUP_STATE};
use crate::crypto::{group_session_id, verify_signature, GroupReceiver, GroupSender};
use crate::groups::GroupChangeError;
use crate::groups::{apply_change, decode_state, encode_state, joined_view, signed_bytes};
use crate::store::{GroupView, Status, Store, StoredMessage};
use crate::{ClientError, CryptoError};

/// A sending session is replaced after this many messages.
const ROTATE_AFTER_MESSAGES: u64 = 100;
/// ... or this long.
const ROTATE_AFTER_MS: u64 = 7 * 24 * 3600 * 1000;

fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| d.as_millis() as u64)
}

impl Client {
    /// Creates a group with this user as admin; returns its id.
    pub async fn create_group(&mut self, name: &str, members: &[u64]) -> Result<u64, ClientError> {
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| ClientError::Config(format!("random: {e}")))?;
        let group_id = u64::from_le_bytes(id) >> 1;
        let change = GroupChange::Create { name: name.into(), members: members.to_vec() };
        self.change_group_at(group_id, 0, change).await?;
        Ok(group_id)
    }

    /// Applies a change (admins only, except `Leave`) to a group this device knows.
    pub async fn change_group(
        &mut self,
        group_id: u64,
        change: GroupChange,
    ) -> Result<(), ClientError> {
        let epoch =
            self.store.group(group_id)?.map(|g| g.epoch).ok_or_else(|| {
                ClientError::Config(format!("no group {group_id} on this device"))
            })?;
        self.change_group_at(group_id, epoch, change).await
    }

    async fn change_group_at(
        &mut self,
        group_id: u64,
        base_epoch: u64,
        change: GroupChange,
    ) -> Result<(), ClientError> {
        let me = (self.identity.user_id, self.identity.device_id);
        let signature = self.crypto.sign(&signed_bytes(group_id, base_epoch, me, &change));
        let update = GroupUpdate { group_id, base_epoch, change: change.clone(), signature };
        let reply = self.request(&update).await?;
        let Message::GroupUpdated(updated) = reply.frame().message else {
            return Err(server_error(&reply));
        };
        let epoch = updated.epoch.to_native();
        let view = self.store.group(group_id)?;
        let applied = apply_change(view.as_ref(), group_id, epoch, me.0, &change, now_ms())
            .map_err(|e| ClientError::Protocol(format!("own group change: {e}")))?;
        self.store.save_group(&applied)?;
        if let GroupChange::Add { members } = &change {
            // The members added take the group's state from this admin, end to end
            // encrypted, never from the server.
            let mut state = vec![CONTENT_GROUP_STATE];
            state.extend_from_slice(&encode_state(&applied));
            for member in members.iter().filter(|m| **m != me.0) {
                let client_id = Store::new_client_id()?;
                self.send_encrypted(*member, client_id, EnvelopeKind::Control, &state).await?;
            }
        }
        Ok(())
    }

    /// A group's state from the admin who added this user, over Olm: it replaces the view
    /// the signed change gave if the sender is an admin of that view, the state is not
    /// older, and it names the sender as admin and this user as member.
    pub(super) fn accept_group_state(
        &mut self,
        sender: (u64, u32),
        payload: &[u8],
    ) -> Result<(), ClientError> {
        let me = self.identity.user_id;
        let Some(state) = decode_state(payload) else {
            return Err(CryptoError::Decrypt("a malformed group state".into()).into());
        };
        let Some(view) = self.store.group(state.group_id)? else { return Ok(()) };
        let from_admin = view.members.contains(&(sender.0, true));
        let names = state.members.contains(&(sender.0, true))
            && state.members.iter().any(|(m, _)| *m == me);
        if !from_admin || !names || state.epoch < view.epoch {
            let group_id = state.group_id;
            let reason = "a group state not from an admin of this device's view".to_string();
            self.events.push_back(Event::GroupChangeRejected { group_id, reason });
            return Ok(());
        }
        let (group_id, epoch) = (state.group_id, state.epoch);
        self.store.save_group(&GroupView { needs_rotation: view.needs_rotation, ..state })?;
        self.events.push_back(Event::GroupChanged { group_id, epoch });
        Ok(())
    }

    /// Tells the sender of these group messages that the user read them; nothing when
    /// the user turned read receipts off.
    pub async fn mark_group_read(
        &mut self,
        group_id: u64,
        sender: u64,
        server_ids: &[u64],
    ) -> Result<(), ClientError> {
        if !self.store.read_receipts()? {
            return Ok(());
        }
        let receipt = SendReceipt {
            kind: ReceiptKind::Read,
            to_user: sender,
            conversation: Conversation::Group(group_id),
            message_ids: server_ids.to_vec(),
        };
        self.request(&receipt).await?;
        Ok(())
    }

    /// This device's verified view of a group.
    pub fn group(&self, group_id: u64) -> Result<Option<GroupView>, ClientError> {
        Ok(self.store.group(group_id)?)
    }

    /// The last `limit` messages of a group, oldest first.
    pub fn group_history(
        &self,
        group_id: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, ClientError> {
        Ok(self.store.group_history(group_id, limit)?)
    }

    /// Who received and who read a message this user sent (devices).
    pub fn receipts(&self, server_id: u64) -> Result<crate::store::ReceiptSets, ClientError> {
        Ok(self.store.receipts(server_id)?)
    }

    /// Sends `text` to a group: once, with this device's Megolm session, after sharing
    /// the session's key with member devices that lack it.
    pub async fn send_group_text(
        &mut self,
        group_id: u64,
        text: &str,
    ) -> Result<StoredMessage, ClientError> {
        let view = self
            .store
            .group(group_id)?
            .ok_or_else(|| ClientError::Config(format!("no group {group_id} on this device")))?;
        let key = *self.store.pickle_key();
        let now = now_ms();
        let mut sender = match self.store.group_sender(group_id)? {
            Some((pickle, created, sent))
                if !view.needs_rotation
                    && sent < ROTATE_AFTER_MESSAGES
                    && now.saturating_sub(created) < ROTATE_AFTER_MS =>
            {
                (GroupSender::from_pickle(&pickle, &key)?, created, sent)
            }
            _ => {
                let fresh = GroupSender::new();
                self.store.save_group_sender(group_id, &fresh.pickle(&key), now, 0)?;
                if view.needs_rotation {
                    let mut rotated = view.clone();
                    rotated.needs_rotation = false;
                    self.store.save_group(&rotated)?;
                }
                (fresh, now, 0)
            }
        };
        self.share_group_key(group_id, &view, &sender.0).await?;
        let mut plaintext = vec![super::CONTENT_TEXT];
        plaintext.extend_from_slice(text.as_bytes());
        let ciphertext = sender.0.encrypt(&plaintext);
        sender.2 += 1;
        // The ratchet moved: saved before the message leaves.
        self.store.save_group_sender(group_id, &sender.0.pickle(&key), sender.1, sender.2)?;
        let client_id = Store::new_client_id()?;
        let send = SendMessage {
            client_message_id: client_id,
            to: Conversation::Group(group_id),
            kind: EnvelopeKind::Text,
            ttl_s: 0,
            copies: vec![DeviceCopy {
                user_id: 0,
                device_id: 0,
                e2e_type: E2eType::Megolm,
                ciphertext,
            }],
        };
        let reply = self.request(&send).await?;
        let Message::SendAck(ack) = reply.frame().message else {
            return Err(server_error(&reply));
        };
        let message = StoredMessage {
            server_id: ack.server_message_id.to_native(),
            client_id,
            peer: 0,
            sender: (self.identity.user_id, self.identity.device_id),
            outgoing: true,
            text: text.into(),
            time_ms: ack.server_time_ms.to_native(),
            status: Status::Sent,
        };
        self.store.add_group_message(group_id, &message)?;
        Ok(message)
    }

    /// Shares a sending session's key (over Olm) with every device of every verified
    /// member that has not had it, this user's other devices included.
    async fn share_group_key(
        &mut self,
        group_id: u64,
        view: &GroupView,
        sender: &GroupSender,
    ) -> Result<(), ClientError> {
        let session = sender.id();
        let me = (self.identity.user_id, self.identity.device_id);
        let mut plaintext = vec![CONTENT_GROUP_KEY];
        plaintext.extend_from_slice(&group_id.to_le_bytes());
        plaintext.extend_from_slice(&sender.session_key());
        for &(member, _) in &view.members {
            if self.store.known_devices(member)?.is_empty() && member != me.0 {
                self.start_sessions(member, &[]).await?;
            }
            let devices: Vec<u32> =
                self.store.known_devices(member)?.into_iter().map(|(d, _)| d).collect();
            let mut missing = false;
            for device in &devices {
                if (member, *device) != me
                    && !self.store.shared(group_id, &session, (member, *device))?
                {
                    missing = true;
                }
            }
            if !missing {
                continue;
            }
            // One Olm message to the member's devices (and ours): the key goes over Olm
            // only.
            let client_id = Store::new_client_id()?;
            self.send_encrypted(member, client_id, EnvelopeKind::Control, &plaintext).await?;
            for device in self.store.known_devices(member)?.into_iter().map(|(d, _)| d) {
                self.store.mark_shared(group_id, &session, (member, device))?;
            }
        }
        Ok(())
    }

    /// A key share arrived over Olm from `sender`: keep it if the sender is a member.
    pub(super) fn accept_group_key(
        &mut self,
        sender: (u64, u32),
        payload: &[u8],
    ) -> Result<(), ClientError> {
        if payload.len() < 8 {
            return Err(ClientError::Crypto(CryptoError::Decrypt("short group key".into())));
        }
        let group_id = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
        let member = self
            .store
            .group(group_id)?
            .is_some_and(|g| g.members.iter().any(|(m, _)| *m == sender.0));
        if !member {
            self.events.push_back(Event::Undecryptable {
                sender,
                reason: format!("a key for group {group_id} from a non-member: ignored"),
            });
            return Ok(());
        }
        let receiver = GroupReceiver::from_key(&payload[8..])?;
        let key = *self.store.pickle_key();
        self.store.save_group_receiver(group_id, &receiver.id(), sender, &receiver.pickle(&key))?;
        Ok(())
    }

    /// A group message: decrypt with the session it names, refuse a replayed index.
    pub(super) fn decrypt_group(
        &mut self,
        group_id: u64,
        mut message: StoredMessage,
        ciphertext: &[u8],
    ) -> Result<StoredMessage, ClientError> {
        let (session, megolm) = group_session_id(ciphertext)?;
        let key = *self.store.pickle_key();
        let Some((pickle, owner)) = self.store.group_receiver(group_id, &session)? else {
            return Err(CryptoError::Decrypt("no key for this group session".into()).into());
        };
        if owner != message.sender {
            return Err(CryptoError::Decrypt("the session belongs to another device".into()).into());
        }
        let mut receiver = GroupReceiver::from_pickle(&pickle, &key)?;
        let (plaintext, index) = receiver.decrypt(megolm)?;
        if !self.store.first_sight(&session, index)? {
            return Err(
                CryptoError::Decrypt(format!("a replayed group message (index {index})")).into()
            );
        }
        message.text = match plaintext.split_first() {
            Some((&super::CONTENT_TEXT, text)) => String::from_utf8_lossy(text).into_owned(),
            _ => return Err(CryptoError::Decrypt("unknown content".into()).into()),
        };
        message.peer = 0;
        self.store.add_group_message(group_id, &message)?;
        Ok(message)
    }

    /// A group change the server reports: verified (signature, order, rights) before it
    /// changes this device's view.
    pub(super) async fn on_group_event(&mut self, body: GroupEventBody) -> Result<(), ClientError> {
        let actor = (body.actor_user, body.actor_device);
        let me = (self.identity.user_id, self.identity.device_id);
        let signing_key = if actor == me {
            Some(self.crypto.signing_key())
        } else {
            if self.store.pinned(actor.0, actor.1)?.and_then(|p| p.ed25519).is_none() {
                // Learn the author's signing key from its bundle (pinned on first use).
                let _ = self.start_sessions(actor.0, &[actor.1]).await;
            }
            self.store.pinned(actor.0, actor.1)?.and_then(|p| p.ed25519)
        };
        let base_epoch = body.epoch.saturating_sub(1);
        let signed = signed_bytes(body.group_id, base_epoch, actor, &body.change);
        let outcome = match signing_key {
            Some(key) if verify_signature(&key, &signed, &body.signature) => {
                let view = self.store.group(body.group_id)?;
                if view.as_ref().is_some_and(|v| v.epoch >= body.epoch) {
                    return Ok(()); // Already applied (this device's own change).
                }
                let added = match &body.change {
                    GroupChange::Add { members } if members.contains(&me.0) => Some(members),
                    _ => None,
                };
                if let (None, Some(added)) = (&view, added) {
                    // Joining: only what the signed change says (its author, taken as
                    // an admin, and the users it added); the rest comes from that admin,
                    // end to end encrypted (`accept_group_state`), never the server.
                    Ok(joined_view(body.group_id, body.epoch, actor.0, added))
                } else {
                    let (group, epoch) = (body.group_id, body.epoch);
                    apply_change(view.as_ref(), group, epoch, actor.0, &body.change, now_ms())
                }
            }
            _ => Err(GroupChangeError::BadSignature),
        };
        match outcome {
            Ok(view) => {
                self.store.save_group(&view)?;
                self.events
                    .push_back(Event::GroupChanged { group_id: body.group_id, epoch: body.epoch });
            }
            Err(error) => self.events.push_back(Event::GroupChangeRejected {
                group_id: body.group_id,
                reason: error.to_string(),
            }),
        }
        Ok(())
    }
}
