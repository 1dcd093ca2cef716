//! The SDK's client: a registered device talking to `ternd`, end to end encrypted.
//!
//! The app drives it: calls like [`Client::send_text`] do a request and wait for its
//! answer, and [`Client::next_event`] reads what the server pushes (messages, receipts,
//! key warnings) and turns it into [`Event`]s. Frames that arrive while a call waits for
//! its answer are kept and handled by the next `next_event`, in order. There is no
//! background task and no lock: one `&mut Client`, one connection at a time.
//!
//! What it guarantees: every message is encrypted once per recipient device and once per
//! this user's other devices; a send is retried with the same client message id (the
//! server answers a retry with the original id, never a duplicate); an incoming
//! envelope is acknowledged only after it is decrypted and stored with the ratchet
//! state that decrypted it; after a disconnect, [`Client::reconnect`] logs in again,
//! re-sends what was not acknowledged, and the server redelivers what was not acked.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use rkyv::rancor::Failure;
use tern_wire::messages::*;
use tern_wire::{ErrorCode, Message, MessageType};

use crate::connection::{Connection, Endpoint, OwnedFrame};
use crate::crypto::{prekey_session_id, DeviceCrypto, PairSession};
use crate::store::{Identity, Status, Store, StoreSecret, StoredMessage};
use crate::{ClientError, PeerIdentity};

/// The first byte of a plaintext: what it holds (the rest follows).
const CONTENT_TEXT: u8 = 1;
/// A plaintext saying "delete the message with this server id (8 bytes, LE) for
/// everyone", sent as a `Control` envelope.
const CONTENT_DELETE: u8 = 2;
/// A plaintext carrying a Megolm session key: group id (8 bytes, LE) then the key; only
/// ever accepted from an Olm message.
const CONTENT_GROUP_KEY: u8 = 3;
/// A plaintext describing a file (`media::MediaDescriptor`), sent as a `Media` envelope
/// whose copies start with the media id in clear.
const CONTENT_MEDIA: u8 = 4;
/// A plaintext offering a history bundle to one of this user's devices: the device id
/// (4 bytes, LE), then the bundle's `media::MediaDescriptor`. Sent as a `Media`
/// envelope to the user's own devices; the others ignore it.
const CONTENT_HISTORY: u8 = 5;

mod accounts;
mod media;
pub use accounts::{phone_hash, ProfileView};

mod groups;

/// Something the app should know about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A message arrived, was decrypted and stored.
    Message(StoredMessage),
    /// Outgoing messages got a tick (delivered or read).
    Receipt {
        /// The new state.
        status: Status,
        /// Whose device gave it.
        by: (u64, u32),
        /// The messages, with their new status.
        messages: Vec<StoredMessage>,
    },
    /// Someone is typing (or stopped).
    Typing {
        /// Who.
        user_id: u64,
        /// Started or stopped.
        active: bool,
    },
    /// A device's identity key is not the one seen before: show it, and let the user
    /// compare safety numbers. The new key is pinned.
    IdentityChanged {
        /// Whose.
        user_id: u64,
        /// Which device.
        device_id: u32,
    },
    /// A message could not be decrypted (tampered with, replayed, or from a session this
    /// device lost). It was acknowledged: it cannot become readable later.
    Undecryptable {
        /// From whom.
        sender: (u64, u32),
        /// Why.
        reason: String,
    },
    /// The server said this device's one-time keys ran low; this many were uploaded.
    KeysRefilled(u32),
    /// A followed user came online or went offline (as far as they let this user see).
    Presence {
        /// Who.
        user_id: u64,
        /// Whether any of their devices is connected.
        online: bool,
        /// When they were last connected (0: hidden).
        last_seen_ms: u64,
    },
    /// This device's mailbox was full while it was away: this many messages were lost.
    Dropped(u64),
    /// Messages this user sent were lost from a recipient's full mailbox.
    SentDropped {
        /// The recipient.
        recipient: u64,
        /// The lost messages (server ids), still in this device's history.
        server_ids: Vec<u64>,
    },
    /// A verified group change was applied to this device's view.
    GroupChanged {
        /// The group.
        group_id: u64,
        /// Its epoch now.
        epoch: u64,
    },
    /// A group change the server reported failed this device's checks (bad signature,
    /// out of order, or not allowed): it was not applied.
    GroupChangeRejected {
        /// The group.
        group_id: u64,
        /// Why.
        reason: String,
    },
    /// Another device of this user sent this device a history bundle: call
    /// [`Client::import_history`] to fetch and add it.
    HistoryOffered {
        /// The device that sent it.
        from_device: u32,
    },
    /// A message was deleted for everyone by its sender (and removed from the history).
    Deleted {
        /// Who deleted it.
        sender: u64,
        /// Its server id.
        server_id: u64,
    },
}

/// A registration in progress: the code was requested.
#[derive(Debug)]
pub struct PendingRegistration {
    connection: Connection,
    endpoint: Endpoint,
    phone: String,
    /// How long the code stays valid.
    pub expires_in_s: u32,
    /// The registration-lock PIN, if the number has one.
    pin: Option<String>,
}

/// A registered device, connected or not.
pub struct Client {
    endpoint: Endpoint,
    store: Store,
    crypto: DeviceCrypto,
    identity: Identity,
    connection: Option<Connection>,
    /// Frames read while waiting for an answer, to be handled in order.
    backlog: VecDeque<OwnedFrame>,
    events: VecDeque<Event>,
    /// Bytes put in clear before each copy of the message being sent (a media id).
    clear_prefix: Option<Vec<u8>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("user_id", &self.identity.user_id)
            .field("device_id", &self.identity.device_id)
            .finish_non_exhaustive()
    }
}

/// The typed error of an `ErrorFrame` (or an unexpected frame).
pub(crate) fn server_error(frame: &OwnedFrame) -> ClientError {
    let frame = frame.frame();
    match frame.message {
        Message::ErrorFrame(error) => ClientError::Server {
            code: ErrorCode::from_u16(error.code.to_native()).unwrap_or(ErrorCode::Internal),
            message: error.message.to_string(),
            retry_after_ms: error.retry_after_ms.to_native(),
        },
        other => ClientError::Protocol(format!("unexpected {}", other.message_type().name())),
    }
}

impl PendingRegistration {
    /// Asks the server to send a verification code to `phone`.
    pub async fn request_code(endpoint: &Endpoint, phone: &str) -> Result<Self, ClientError> {
        let mut connection = Connection::open(endpoint).await?;
        let mut proof_of_work = None;
        // A server defending against SMS pumping may ask for a proof of work first.
        for _ in 0..3 {
            let request = RequestCode {
                phone: phone.into(),
                channel: CodeChannel::Sms,
                locale: "en".into(),
                proof_of_work: proof_of_work.take(),
            };
            let id = connection.send(&request).await?;
            let reply = answer(&mut connection, id, &mut VecDeque::new()).await?;
            match reply.frame().message {
                Message::CodeSent(sent) => {
                    return Ok(PendingRegistration {
                        connection,
                        endpoint: endpoint.clone(),
                        phone: phone.into(),
                        expires_in_s: sent.expires_in_s.to_native(),
                        pin: None,
                    })
                }
                Message::PowChallenge(challenge) => {
                    let bytes = challenge.challenge.to_vec();
                    let nonce = tern_wire::accounts::solve_pow(&bytes, challenge.difficulty_bits);
                    proof_of_work = Some(ProofOfWork { challenge: bytes, nonce });
                }
                _ => return Err(server_error(&reply)),
            }
        }
        Err(ClientError::Protocol("the server kept asking for proofs of work".into()))
    }

    /// Gives the number's registration-lock PIN (needed when it has one).
    pub fn with_pin(mut self, pin: &str) -> Self {
        self.pin = Some(pin.into());
        self
    }

    /// Verifies the code and creates this device: a new E2E account whose public keys
    /// go to the server, and the store at `store_path` (which must not hold another
    /// device).
    pub async fn verify(
        mut self,
        code: &str,
        device_name: &str,
        store_path: &Path,
        secret: &StoreSecret,
    ) -> Result<Client, ClientError> {
        let store = open_unused_store(store_path, secret)?;
        let crypto = DeviceCrypto::new();
        let verify = Verify {
            phone: self.phone.clone(),
            code: code.into(),
            device: NewDevice { name: device_name.into(), keys: crypto.device_keys() },
            registration_lock_pin: self.pin.clone(),
        };
        let id = self.connection.send(&verify).await?;
        start_new_device(self.connection, id, self.endpoint, store, crypto).await
    }
}

/// A new device waiting to be linked to an account: show [`PendingLink::code`] to the
/// user, who approves it on the primary device ([`Client::approve_link`]).
pub struct PendingLink {
    connection: Connection,
    endpoint: Endpoint,
    crypto: DeviceCrypto,
    request_id: u32,
    code: String,
}

impl std::fmt::Debug for PendingLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingLink").field("code", &self.code).finish_non_exhaustive()
    }
}

impl PendingLink {
    /// Creates this device's keys and asks the server for a linking code.
    pub async fn request(endpoint: &Endpoint, device_name: &str) -> Result<Self, ClientError> {
        let mut connection = Connection::open(endpoint).await?;
        let crypto = DeviceCrypto::new();
        let request = LinkRequest {
            device: NewDevice { name: device_name.into(), keys: crypto.device_keys() },
        };
        let request_id = connection.send(&request).await?;
        let code = loop {
            let frame = connection.next_frame().await?;
            match frame.frame().message {
                Message::LinkCode(code) => break code.code.to_string(),
                Message::ErrorFrame(_) => return Err(server_error(&frame)),
                _ => {}
            }
        };
        Ok(PendingLink { connection, endpoint: endpoint.clone(), crypto, request_id, code })
    }

    /// The code to approve on the primary device.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// Waits for the approval (up to the code's lifetime) and creates the store.
    pub async fn wait(
        self,
        store_path: &Path,
        secret: &StoreSecret,
    ) -> Result<Client, ClientError> {
        let store = open_unused_store(store_path, secret)?;
        start_new_device(self.connection, self.request_id, self.endpoint, store, self.crypto).await
    }
}

/// Opens the store a new device will live in, refusing one that already holds a device.
fn open_unused_store(store_path: &Path, secret: &StoreSecret) -> Result<Store, ClientError> {
    let store = Store::open(store_path, secret)?;
    if store.identity()?.is_some() {
        return Err(ClientError::Config(format!(
            "{} already holds a registered device; use another file",
            store_path.display()
        )));
    }
    Ok(store)
}

/// Waits for the `Registered` answer to request `request_id` (a verification or a
/// link), saves the new device's identity and keys, and starts its client.
async fn start_new_device(
    mut connection: Connection,
    request_id: u32,
    endpoint: Endpoint,
    mut store: Store,
    mut crypto: DeviceCrypto,
) -> Result<Client, ClientError> {
    let reply = answer(&mut connection, request_id, &mut VecDeque::new()).await?;
    let identity = match reply.frame().message {
        Message::Registered(registered) => Identity {
            server: endpoint.address.clone(),
            user_id: registered.user_id.to_native(),
            device_id: registered.device_id.to_native(),
            token: registered.token,
        },
        _ => return Err(server_error(&reply)),
    };
    // The server has the keys (the reply came after they were durable).
    crypto.mark_published();
    store.save_identity(&identity, &crypto.pickle(store.pickle_key()))?;
    Client::start(endpoint, store, crypto, identity).await
}

/// Reads until the answer to request `id`, keeping everything else in `backlog`.
async fn answer(
    connection: &mut Connection,
    id: u32,
    backlog: &mut VecDeque<OwnedFrame>,
) -> Result<OwnedFrame, ClientError> {
    loop {
        let frame = connection.next_frame().await?;
        let header = frame.frame().header;
        if header.is_response() && header.request_id == id {
            return Ok(frame);
        }
        if let Message::ErrorFrame(_) = frame.frame().message {
            if header.request_id == 0 {
                return Err(server_error(&frame));
            }
        }
        backlog.push_back(frame);
    }
}

impl Client {
    /// Opens a registered device's store and connects.
    pub async fn open(
        store_path: &Path,
        secret: &StoreSecret,
        endpoint: Option<Endpoint>,
    ) -> Result<Client, ClientError> {
        let store = Store::open(store_path, secret)?;
        let identity = store.identity()?.ok_or_else(|| {
            ClientError::Config(format!("{} holds no registered device", store_path.display()))
        })?;
        let crypto =
            store.device_crypto()?.ok_or_else(|| ClientError::Config("no E2E account".into()))?;
        let endpoint = endpoint.unwrap_or_else(|| Endpoint::tcp(identity.server.clone()));
        Client::start(endpoint, store, crypto, identity).await
    }

    async fn start(
        endpoint: Endpoint,
        store: Store,
        crypto: DeviceCrypto,
        identity: Identity,
    ) -> Result<Client, ClientError> {
        let mut client = Client {
            endpoint,
            store,
            crypto,
            identity,
            connection: None,
            backlog: VecDeque::new(),
            events: VecDeque::new(),
            clear_prefix: None,
        };
        client.reconnect().await?;
        Ok(client)
    }

    /// Approves a device waiting with `code` (shown on it) into this account. Only the
    /// primary device may.
    pub async fn approve_link(&mut self, code: &str) -> Result<(), ClientError> {
        self.request(&LinkApprove { code: code.into() }).await?;
        Ok(())
    }

    /// This device's user id.
    pub fn user_id(&self) -> u64 {
        self.identity.user_id
    }

    /// This device's id.
    pub fn device_id(&self) -> u32 {
        self.identity.device_id
    }

    /// (Re)connects and authenticates; then re-sends what the server had not acked.
    /// The server redelivers unacknowledged envelopes by itself.
    pub async fn reconnect(&mut self) -> Result<(), ClientError> {
        self.connection = None;
        let mut connection = Connection::open(&self.endpoint).await?;
        let auth = Auth {
            user_id: self.identity.user_id,
            device_id: self.identity.device_id,
            token: self.identity.token,
        };
        let id = connection.send(&auth).await?;
        let reply = answer(&mut connection, id, &mut self.backlog).await?;
        let Message::AuthOk(_) = reply.frame().message else { return Err(server_error(&reply)) };
        self.connection = Some(connection);
        for message in self.store.unsent()? {
            self.send_stored(message).await?;
        }
        Ok(())
    }

    /// Reconnects with exponential backoff (100 ms doubling to 10 s) until it works or
    /// `attempts` are used up.
    pub async fn reconnect_with_backoff(&mut self, attempts: u32) -> Result<(), ClientError> {
        let mut delay = Duration::from_millis(100);
        let mut last = None;
        for _ in 0..attempts.max(1) {
            match self.reconnect().await {
                Ok(()) => return Ok(()),
                Err(error @ ClientError::Server { code: ErrorCode::BadToken, .. }) => {
                    return Err(error)
                }
                Err(error) => last = Some(error),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        Err(last.unwrap_or(ClientError::Disconnected))
    }

    fn connection(&mut self) -> Result<&mut Connection, ClientError> {
        self.connection.as_mut().ok_or(ClientError::Disconnected)
    }

    /// Sends a request and waits for its answer (an error frame becomes an error).
    async fn request<T>(&mut self, value: &T) -> Result<OwnedFrame, ClientError>
    where
        T: tern_wire::Payload + for<'a, 'b> rkyv::Serialize<tern_wire::WireSerializer<'a, 'b>>,
    {
        let connection = self.connection.as_mut().ok_or(ClientError::Disconnected)?;
        let id = connection.send(value).await?;
        let result = answer(connection, id, &mut self.backlog).await;
        if matches!(result, Err(ClientError::Disconnected | ClientError::Io(_))) {
            self.connection = None;
        }
        let reply = result?;
        if let Message::ErrorFrame(_) = reply.frame().message {
            return Err(server_error(&reply));
        }
        Ok(reply)
    }

    /// Sends `text` to `peer`, end to end encrypted; returns once the server has it
    /// durably (the sent tick), with the stored message.
    pub async fn send_text(&mut self, peer: u64, text: &str) -> Result<StoredMessage, ClientError> {
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
        // Stored first: a crash or a disconnect before the ack re-sends it.
        self.store.add_message(&message)?;
        self.send_stored(message).await
    }

    async fn send_stored(
        &mut self,
        mut message: StoredMessage,
    ) -> Result<StoredMessage, ClientError> {
        let mut plaintext = vec![CONTENT_TEXT];
        plaintext.extend_from_slice(message.text.as_bytes());
        let (server_id, time_ms) = self
            .send_encrypted(message.peer, message.client_id, EnvelopeKind::Text, &plaintext)
            .await?;
        message.server_id = server_id;
        message.time_ms = time_ms;
        message.status = Status::Sent;
        self.store.mark_sent(message.client_id, message.server_id, message.time_ms)?;
        Ok(message)
    }

    /// Encrypts `plaintext` for every device of `peer` and this user's other devices and
    /// sends it; returns (server id, server time) once durable. Stale device lists are
    /// refreshed and the message re-encrypted, a few rounds at most (devices do not come
    /// and go that fast).
    async fn send_encrypted(
        &mut self,
        peer: u64,
        client_message_id: u64,
        kind: EnvelopeKind,
        plaintext: &[u8],
    ) -> Result<(u64, u64), ClientError> {
        for _ in 0..4 {
            let mut copies = self.encrypt_for_all(peer, plaintext).await?;
            if let Some(prefix) = self.clear_prefix.as_ref() {
                // A media message names its blob in clear (see `media.rs`).
                for copy in &mut copies {
                    copy.ciphertext.splice(0..0, prefix.iter().copied());
                }
            }
            let send = SendMessage {
                client_message_id,
                to: Conversation::User(peer),
                kind,
                ttl_s: 0,
                copies,
            };
            let reply = self.request(&send).await?;
            match reply.frame().message {
                Message::SendAck(ack) => {
                    return Ok((ack.server_message_id.to_native(), ack.server_time_ms.to_native()))
                }
                Message::SendError(error) => {
                    let code =
                        ErrorCode::from_u16(error.code.to_native()).unwrap_or(ErrorCode::Internal);
                    if code != ErrorCode::StaleDevices {
                        return Err(ClientError::Server {
                            code,
                            message: "the server refused the message".into(),
                            retry_after_ms: error.retry_after_ms.to_native(),
                        });
                    }
                    let missing: Vec<(u64, u32)> = error
                        .missing_devices
                        .iter()
                        .map(|d| (d.0.to_native(), d.1.to_native()))
                        .collect();
                    for extra in error.extra_devices.iter() {
                        self.store.forget_device(extra.0.to_native(), extra.1.to_native())?;
                    }
                    for user in
                        missing.iter().map(|d| d.0).collect::<std::collections::BTreeSet<_>>()
                    {
                        let devices: Vec<u32> =
                            missing.iter().filter(|d| d.0 == user).map(|d| d.1).collect();
                        self.start_sessions(user, &devices).await?;
                    }
                }
                _ => return Err(server_error(&reply)),
            }
        }
        Err(ClientError::Protocol("the device list kept changing; try again".into()))
    }

    /// One ciphertext per device of `peer` and per other device of this user.
    async fn encrypt_for_all(
        &mut self,
        peer: u64,
        plaintext: &[u8],
    ) -> Result<Vec<DeviceCopy>, ClientError> {
        let me = (self.identity.user_id, self.identity.device_id);
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
        let mut copies = Vec::with_capacity(targets.len());
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

    /// Fetches bundles (all devices if `devices` is empty), checks them, pins identities
    /// and starts a session with each device.
    /// Returns the devices the server listed.
    async fn start_sessions(
        &mut self,
        user_id: u64,
        devices: &[u32],
    ) -> Result<Vec<u32>, ClientError> {
        let fetch = FetchBundles { user_id, device_ids: devices.to_vec() };
        let reply = self.request(&fetch).await?;
        let Message::Bundles(bundles) = reply.frame().message else {
            return Err(server_error(&reply));
        };
        let bundles: Bundles = rkyv::deserialize::<Bundles, Failure>(bundles)
            .map_err(|e| ClientError::Protocol(format!("unreadable bundles: {e}")))?;
        for bundle in &bundles.devices {
            let device = (user_id, bundle.device_id);
            if device == (self.identity.user_id, self.identity.device_id) {
                continue;
            }
            let session = self.crypto.outbound_session(user_id, bundle)?;
            let seen =
                PeerIdentity { curve25519: bundle.identity_key, ed25519: Some(bundle.signing_key) };
            self.pin(device, seen)?;
            let pickle = session.pickle(self.store.pickle_key());
            self.store.save_session(device, &session.id(), &pickle, None, None)?;
        }
        Ok(bundles.devices.iter().map(|b| b.device_id).collect())
    }

    /// Asks the server for `peer`'s current devices and keys: new devices get sessions,
    /// gone ones are forgotten, and a changed identity key is reported
    /// ([`Event::IdentityChanged`]) and re-pinned. Use it when a contact says they
    /// reinstalled, or before comparing safety numbers. (Each call uses up one of the
    /// peer's one-time keys per device.)
    pub async fn refresh_devices(&mut self, peer: u64) -> Result<(), ClientError> {
        let known: Vec<u32> = self.store.known_devices(peer)?.into_iter().map(|d| d.0).collect();
        let current = self.start_sessions(peer, &[]).await?;
        for gone in known.into_iter().filter(|d| !current.contains(d)) {
            self.store.forget_device(peer, gone)?;
        }
        Ok(())
    }

    /// Pins a device's identity on first sight; a different one later is reported.
    fn pin(
        &mut self,
        (user_id, device_id): (u64, u32),
        seen: PeerIdentity,
    ) -> Result<(), ClientError> {
        match self.store.pinned(user_id, device_id)? {
            Some(pinned) if pinned.curve25519 != seen.curve25519 => {
                self.events.push_back(Event::IdentityChanged { user_id, device_id });
                self.store.forget_device(user_id, device_id)?;
            }
            _ => {}
        }
        self.store.pin(user_id, device_id, &seen)?;
        Ok(())
    }

    /// Tells `peer` this user is typing (or stopped). Not stored anywhere.
    pub async fn typing(&mut self, peer: u64, active: bool) -> Result<(), ClientError> {
        let typing = Typing { conversation: Conversation::User(peer), active };
        self.connection()?.send(&typing).await?;
        Ok(())
    }

    /// Follows the presence of these users (replacing the previous set); events come as
    /// [`Event::Presence`], as far as each user's privacy settings allow.
    pub async fn follow_presence(&mut self, users: &[u64]) -> Result<(), ClientError> {
        self.request(&PresenceSubscribe { user_ids: users.to_vec() }).await?;
        Ok(())
    }

    /// Replaces this account's contact list (who counts for "contacts" visibility).
    pub async fn set_contacts(&mut self, users: &[u64]) -> Result<(), ClientError> {
        self.request(&SetContacts { user_ids: users.to_vec() }).await?;
        Ok(())
    }

    /// Registers where to wake this device when it is offline (a UnifiedPush endpoint
    /// URL); `None` stops the pushes.
    pub async fn register_push(&mut self, endpoint: Option<&str>) -> Result<(), ClientError> {
        let endpoint = endpoint.map(|address| PushEndpoint {
            provider: PushProvider::UnifiedPush,
            address: address.into(),
        });
        self.request(&PushRegister { endpoint }).await?;
        Ok(())
    }

    /// Deletes a message this user sent, for everyone: the server removes the copies not
    /// yet delivered, and the devices that have it are told (end to end encrypted) to
    /// remove it. It leaves this device's history too.
    pub async fn delete_for_everyone(
        &mut self,
        peer: u64,
        server_id: u64,
    ) -> Result<(), ClientError> {
        self.request(&DeleteForEveryone { peer, message_ids: vec![server_id] }).await?;
        let mut plaintext = vec![CONTENT_DELETE];
        plaintext.extend_from_slice(&server_id.to_le_bytes());
        let client_id = Store::new_client_id()?;
        self.send_encrypted(peer, client_id, EnvelopeKind::Control, &plaintext).await?;
        self.store.delete_message(self.identity.user_id, server_id)?;
        Ok(())
    }

    /// Tells the senders of these incoming messages that the user read them.
    pub async fn mark_read(&mut self, peer: u64, server_ids: &[u64]) -> Result<(), ClientError> {
        if server_ids.is_empty() {
            return Ok(());
        }
        let receipt = SendReceipt {
            kind: ReceiptKind::Read,
            to_user: peer,
            conversation: Conversation::User(peer),
            message_ids: server_ids.to_vec(),
        };
        self.request(&receipt).await?;
        Ok(())
    }

    /// The last `limit` messages with `peer`, oldest first.
    pub fn history(&self, peer: u64, limit: usize) -> Result<Vec<StoredMessage>, ClientError> {
        Ok(self.store.history(peer, limit)?)
    }

    /// Messages matching a full-text query (SQLite FTS5 syntax), newest first.
    pub fn search(&self, query: &str, limit: usize) -> Result<Vec<StoredMessage>, ClientError> {
        Ok(self.store.search(query, limit)?)
    }

    /// The safety number with `peer`: both users see the same 60 digits when no one is
    /// in the middle. It covers each account's primary device (device 1), whose identity
    /// vouches for the devices it links; its key is fetched and pinned if unknown.
    pub async fn safety_number(&mut self, peer: u64) -> Result<String, ClientError> {
        let me = self.identity.user_id;
        let mine = if self.identity.device_id == 1 {
            self.crypto.identity_key()
        } else {
            self.primary_identity(me).await?
        };
        let theirs = self.primary_identity(peer).await?;
        Ok(DeviceCrypto::safety_number((me, &[mine]), (peer, &[theirs])))
    }

    /// The pinned identity key of a user's primary device, fetched if unknown.
    async fn primary_identity(&mut self, user_id: u64) -> Result<[u8; 32], ClientError> {
        if self.store.pinned(user_id, 1)?.is_none() {
            self.start_sessions(user_id, &[1]).await?;
        }
        let pinned = self.store.pinned(user_id, 1)?;
        pinned
            .map(|p| p.curve25519)
            .ok_or_else(|| ClientError::Protocol("no primary device".into()))
    }

    /// The next event, reading from the server as needed. A disconnect is an error
    /// (`ClientError::Disconnected`): call [`Client::reconnect_with_backoff`] and go on.
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(event);
            }
            let frame = match self.backlog.pop_front() {
                Some(frame) => frame,
                None => {
                    let connection = self.connection()?;
                    match connection.next_frame().await {
                        Ok(frame) => frame,
                        Err(error) => {
                            self.connection = None;
                            return Err(error);
                        }
                    }
                }
            };
            self.handle_push(frame).await?;
        }
    }

    /// Handles one frame the server pushed.
    async fn handle_push(&mut self, frame: OwnedFrame) -> Result<(), ClientError> {
        let ty = frame.frame().message.message_type();
        match ty {
            MessageType::Deliver => self.on_deliver(&frame).await,
            MessageType::KeysLow => {
                let Message::KeysLow(low) = frame.frame().message else { unreachable_frame() };
                let remaining = low.one_time_keys_remaining.to_native() as usize;
                self.refill_keys(remaining).await
            }
            MessageType::TypingEvent => {
                let Message::TypingEvent(typing) = frame.frame().message else {
                    unreachable_frame()
                };
                self.events.push_back(Event::Typing {
                    user_id: typing.user_id.to_native(),
                    active: typing.active,
                });
                Ok(())
            }
            MessageType::PresenceEvent => {
                let Message::PresenceEvent(event) = frame.frame().message else {
                    unreachable_frame()
                };
                self.events.push_back(Event::Presence {
                    user_id: event.user_id.to_native(),
                    online: event.online,
                    last_seen_ms: event.last_seen_ms.to_native(),
                });
                Ok(())
            }
            MessageType::ErrorFrame => Err(server_error(&frame)),
            _ => Ok(()), // Events this SDK version does not use yet.
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
        let envelope = deliver.envelope;
        let sender = (envelope.sender_user.to_native(), envelope.sender_device.to_native());
        match envelope.kind {
            ArchivedEnvelopeKind::Text
            | ArchivedEnvelopeKind::Media
            | ArchivedEnvelopeKind::Control => {
                let client_id = envelope.client_message_id.to_native();
                if !self.store.has_message(sender, client_id)? {
                    let e2e_type = match envelope.e2e_type {
                        ArchivedE2eType::OlmPreKey => E2eType::OlmPreKey,
                        ArchivedE2eType::OlmMessage => E2eType::OlmMessage,
                        ArchivedE2eType::Megolm => E2eType::Megolm,
                        ArchivedE2eType::Plain => E2eType::Plain,
                    };
                    let peer = match &envelope.conversation {
                        ArchivedConversation::User(user) => user.to_native(),
                        ArchivedConversation::Group(_) => sender.0,
                    };
                    let stored = StoredMessage {
                        server_id: envelope.server_message_id.to_native(),
                        client_id,
                        peer,
                        sender,
                        outgoing: sender.0 == self.identity.user_id,
                        text: String::new(),
                        time_ms: envelope.server_time_ms.to_native(),
                        status: if sender.0 == self.identity.user_id {
                            Status::Sent
                        } else {
                            Status::Received
                        },
                    };
                    let mut body = envelope.body.as_slice().to_vec();
                    if envelope.kind == ArchivedEnvelopeKind::Media && body.len() >= 16 {
                        body.drain(..16); // The media id in clear; the descriptor is inside.
                    }
                    let decrypted = match &envelope.conversation {
                        ArchivedConversation::Group(group) if e2e_type == E2eType::Megolm => {
                            self.decrypt_group(group.to_native(), stored, &body)
                        }
                        _ => self.decrypt_and_store(stored, e2e_type, &body),
                    };
                    match decrypted {
                        Ok(message) => self.events.push_back(Event::Message(message)),
                        Err(ClientError::NotAMessage) => {}
                        Err(ClientError::Crypto(error)) => self
                            .events
                            .push_back(Event::Undecryptable { sender, reason: error.to_string() }),
                        Err(other) => return Err(other),
                    }
                }
            }
            ArchivedEnvelopeKind::Receipt => {
                if let Ok(tern_wire::EnvelopeContent::Receipt(body)) = envelope.content() {
                    let ids: Vec<u64> = body.message_ids.iter().map(|id| id.to_native()).collect();
                    let status = match body.kind {
                        ArchivedReceiptKind::Read => Status::Read,
                        _ => Status::Delivered,
                    };
                    let by = (body.by_user.to_native(), body.by_device.to_native());
                    for id in &ids {
                        self.store.add_receipt(*id, by, status == Status::Read)?;
                    }
                    let messages = self.store.raise_status(&ids, status)?;
                    if !messages.is_empty() {
                        self.events.push_back(Event::Receipt { status, by, messages });
                    }
                }
            }
            ArchivedEnvelopeKind::GroupEvent => {
                if let Ok(tern_wire::EnvelopeContent::GroupEvent(body)) = envelope.content() {
                    if let Ok(body) = rkyv::deserialize::<GroupEventBody, Failure>(body) {
                        self.on_group_event(body).await?;
                    }
                }
            }
            ArchivedEnvelopeKind::Notice => match envelope.content() {
                Ok(tern_wire::EnvelopeContent::Notice(ArchivedNoticeBody::Dropped { count })) => {
                    self.events.push_back(Event::Dropped(count.to_native()))
                }
                Ok(tern_wire::EnvelopeContent::Notice(ArchivedNoticeBody::SentDropped {
                    recipient,
                    message_ids,
                })) => self.events.push_back(Event::SentDropped {
                    recipient: recipient.to_native(),
                    server_ids: message_ids.iter().map(|id| id.to_native()).collect(),
                }),
                _ => {}
            },
        }
        // Stored (or known undecryptable): the server may forget it.
        self.connection()?.send(&DeliveryAck { up_to_mailbox_seq: mailbox_seq }).await?;
        Ok(())
    }

    /// Decrypts one copy and stores the message with the session state, in one
    /// transaction.
    fn decrypt_and_store(
        &mut self,
        mut message: StoredMessage,
        e2e_type: E2eType,
        ciphertext: &[u8],
    ) -> Result<StoredMessage, ClientError> {
        let sender = message.sender;
        let key = *self.store.pickle_key();
        let sessions = self.store.sessions(sender.0, sender.1)?;
        let mut decrypted = None;
        if e2e_type == E2eType::OlmPreKey {
            let session_id = prekey_session_id(ciphertext)?;
            match sessions.iter().find(|(id, _)| *id == session_id) {
                // Never a second session from one pre-key message: decrypt with the one
                // it made (a replay then fails).
                Some((_, pickle)) => {
                    let mut session = PairSession::from_pickle(pickle, &key)?;
                    let plaintext = session.decrypt(e2e_type, ciphertext)?;
                    decrypted = Some((session, plaintext, None));
                }
                None => {
                    let (session, plaintext, identity) = self.crypto.inbound_session(ciphertext)?;
                    decrypted = Some((session, plaintext, Some(identity)));
                }
            }
        } else {
            let mut last_error = None;
            for (_, pickle) in &sessions {
                let mut session = PairSession::from_pickle(pickle, &key)?;
                match session.decrypt(e2e_type, ciphertext) {
                    Ok(plaintext) => {
                        decrypted = Some((session, plaintext, None));
                        break;
                    }
                    Err(error) => last_error = Some(error),
                }
            }
            if decrypted.is_none() {
                let reason =
                    last_error.map_or("no session with this device".to_string(), |e| e.to_string());
                return Err(ClientError::Crypto(crate::CryptoError::Decrypt(reason)));
            }
        }
        let (session, plaintext, new_identity) = decrypted.expect("set above");
        if let Some(curve25519) = new_identity {
            self.pin(sender, PeerIdentity { curve25519, ed25519: None })?;
        }
        // What the plaintext is: a message for the history, or a control message.
        let mut control = None;
        match plaintext.split_first() {
            Some((&CONTENT_TEXT, text)) => {
                message.text = String::from_utf8_lossy(text).into_owned()
            }
            Some((&CONTENT_MEDIA, descriptor)) => {
                let descriptor = crate::media::MediaDescriptor::decode(descriptor)?;
                self.store.save_media(message.sender, message.client_id, &descriptor.encode())?;
                message.text = format!("📎 {} ({} bytes)", descriptor.name, descriptor.size);
            }
            Some((&CONTENT_GROUP_KEY, payload)) => control = Some((CONTENT_GROUP_KEY, payload)),
            Some((&CONTENT_HISTORY, payload)) if sender.0 == self.identity.user_id => {
                control = Some((CONTENT_HISTORY, payload))
            }
            Some((&CONTENT_DELETE, id)) if id.len() == 8 => control = Some((CONTENT_DELETE, id)),
            _ => {
                return Err(ClientError::Crypto(crate::CryptoError::Decrypt(
                    "unknown content".into(),
                )))
            }
        }
        // The ratchet moved: saved with the message it decrypted (or alone for a control
        // message), in one transaction.
        let account = new_identity.map(|_| self.crypto.pickle(&key));
        let pickle = session.pickle(&key);
        let stored = control.is_none().then_some(&message);
        self.store.save_session(sender, &session.id(), &pickle, account.as_deref(), stored)?;
        match control {
            None => Ok(message),
            Some((CONTENT_GROUP_KEY, payload)) => {
                self.accept_group_key(sender, payload)?;
                Err(ClientError::NotAMessage)
            }
            Some((CONTENT_HISTORY, payload)) => {
                if let Some((device, descriptor)) = payload.split_first_chunk::<4>() {
                    if u32::from_le_bytes(*device) == self.identity.device_id {
                        crate::media::MediaDescriptor::decode(descriptor)?;
                        self.store.save_history_offer(descriptor)?;
                        self.events.push_back(Event::HistoryOffered { from_device: sender.1 });
                    }
                }
                Err(ClientError::NotAMessage)
            }
            Some((_, id)) => {
                // A deletion for everyone: the history loses the message.
                let server_id = u64::from_le_bytes(id.try_into().expect("8 bytes"));
                self.store.delete_message(sender.0, server_id)?;
                self.events.push_back(Event::Deleted { sender: sender.0, server_id });
                Err(ClientError::NotAMessage)
            }
        }
    }
}

fn unreachable_frame() -> ! {
    panic!("the message type was matched just before")
}
