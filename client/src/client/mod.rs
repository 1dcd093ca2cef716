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
//! state that decrypted it. The connection is kept alive (`link.rs`: pings inside the
//! server's idle timeout) and comes back by itself after any drop, the server stopping
//! included: [`Client::next_event`] reconnects with backoff and jitter, re-sends what was
//! not acknowledged, and the server redelivers what was not acked. One message the
//! server refuses for good fails alone (`outbox.rs`); it never blocks the device.
//!
//! Files: `register.rs` (new devices), `link.rs` (the connection's life), `outbox.rs`
//! (sending), `inbox.rs` (what the server pushes), `trust.rs` (whose devices to trust:
//! signed device lists, pinned identities), `groups.rs`, `media.rs`, `accounts.rs`.

use std::collections::VecDeque;
use std::path::Path;

use tern_wire::messages::*;
use tern_wire::Message;

use crate::connection::{server_error, Connection, Endpoint, OwnedFrame, Trust};
use crate::crypto::DeviceCrypto;
use crate::store::{Identity, Status, Store, StoreSecret, StoredMessage};
use crate::ClientError;

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
/// A plaintext carrying a group's state (`groups::encode_state`) as the admin who added
/// this user sees it; only ever accepted over Olm from an admin of this device's view.
const CONTENT_GROUP_STATE: u8 = 6;

mod accounts;
mod groups;
mod inbox;
mod link;
mod media;
mod outbox;
mod register;
mod trust;
pub use accounts::{phone_hash, ProfileView};
pub use outbox::TEXT_MAX_BYTES;
pub use register::{PendingLink, PendingRegistration};

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
    /// A device's identity keys (Curve25519 or Ed25519) are not the ones seen before:
    /// show it, with the new safety number, and let the user compare. The new keys are
    /// pinned; a message that was being sent waits until this event was given.
    IdentityChanged {
        /// Whose.
        user_id: u64,
        /// Which device.
        device_id: u32,
    },
    /// A contact (or this account) has a new device, vouched for by their primary
    /// device's signed device list: show it before anything is encrypted to it (a
    /// message that was being sent waits until this event was given).
    DeviceAdded {
        /// Whose.
        user_id: u64,
        /// Which device.
        device_id: u32,
    },
    /// The server lists a device of this user that their primary device did not sign:
    /// it gets nothing readable (an empty copy) until the primary vouches for it.
    DeviceUnverified {
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
    /// A message that was waiting (the connection was down, or the server asked to try
    /// later) is now on the server: the sent tick.
    Sent(StoredMessage),
    /// The server refused a message for good; it is marked failed in the history and
    /// will not be sent again.
    SendFailed {
        /// The message, with its status `Failed`.
        message: StoredMessage,
        /// Which rule refused it.
        reason: String,
    },
    /// The connection dropped (network, idle timeout, the server stopping); the client
    /// reconnects by itself, with backoff. Sends meanwhile wait in the store.
    Disconnected {
        /// Why, in words.
        reason: String,
    },
    /// The connection is back (logged in again; waiting messages re-sent).
    Reconnected,
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
    /// Reconnecting, keepalive and retry timers.
    link: link::Link,
    /// How many new or changed devices were found (a send that sees this move stops
    /// before encrypting: `trust.rs`).
    device_news: u64,
    /// When each device without its primary's signature was last asked about.
    unvouched_checked: std::collections::HashMap<(u64, u32), std::time::Instant>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("user_id", &self.identity.user_id)
            .field("device_id", &self.identity.device_id)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Opens a registered device's store and connects: through the endpoint chosen at
    /// registration (its transport and trust root, kept in the store), or through
    /// `endpoint` if given — another address, or TLS where registration had none, but
    /// never less protection than registration chose ([`ClientError::TransportChanged`]).
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
        let endpoint = chosen_endpoint(&store, &identity, endpoint)?;
        Client::start(endpoint, store, crypto, identity).await
    }

    /// How this client reaches its server (what [`Client::open`] chose).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
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
            link: link::Link::default(),
            device_news: 0,
            unvouched_checked: Default::default(),
        };
        client.reconnect().await?;
        if client.identity.device_id == 1 && !client.store.device_list_published()? {
            // A primary from before signed device lists (or whose first try failed). Not
            // fatal: until it works (it is tried at every start), contacts trust only
            // this device, not its companions.
            if let Err(error @ ClientError::Store(_)) = client.publish_device_list().await {
                return Err(error);
            }
        }
        Ok(client)
    }

    /// Approves a device waiting with `code` (shown on it) into this account, and signs
    /// the new device list with it ([`Client::publish_device_list`]). Only the primary
    /// device may.
    pub async fn approve_link(&mut self, code: &str) -> Result<(), ClientError> {
        self.request(&LinkApprove { code: code.into() }).await?;
        self.publish_device_list().await
    }

    /// This device's user id.
    pub fn user_id(&self) -> u64 {
        self.identity.user_id
    }

    /// This device's id.
    pub fn device_id(&self) -> u32 {
        self.identity.device_id
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
        let result = match connection.send(value).await {
            Ok(id) => connection.answer(id, &mut self.backlog).await,
            Err(error) => Err(error),
        };
        let reply = match result {
            Err(error) if error.is_disconnect() => {
                self.dropped(&error);
                return Err(error);
            }
            other => other?,
        };
        if let Message::ErrorFrame(_) = reply.frame().message {
            return Err(server_error(&reply));
        }
        Ok(reply)
    }

    /// Tells `peer` this user is typing (or stopped). Not stored anywhere.
    pub async fn typing(&mut self, peer: u64, active: bool) -> Result<(), ClientError> {
        let typing = Typing { conversation: Conversation::User(peer), active };
        // Typing is a hint: with no connection it is simply not shown.
        let Some(connection) = self.connection.as_mut() else { return Ok(()) };
        if let Err(error) = connection.send(&typing).await {
            self.dropped(&error);
        }
        Ok(())
    }

    /// Tells these users (a group's members, say) that this user is typing or stopped;
    /// at most 32 of them, since it costs a frame each.
    pub async fn typing_to(&mut self, users: &[u64], active: bool) -> Result<(), ClientError> {
        let me = self.identity.user_id;
        for &user in users.iter().filter(|u| **u != me).take(32) {
            self.typing(user, active).await?;
        }
        Ok(())
    }

    /// The group a message of the history belongs to (0: a one-to-one conversation,
    /// with its `peer`).
    pub fn group_of(&self, message: &StoredMessage) -> Result<u64, ClientError> {
        Ok(self.store.group_of(message.sender, message.client_id)?)
    }

    /// Opens a registered device's store without connecting: for what only reads the
    /// local history (it connects by itself when something needs the server).
    pub fn open_offline(store_path: &Path, secret: &StoreSecret) -> Result<Client, ClientError> {
        let store = Store::open(store_path, secret)?;
        let identity = store.identity()?.ok_or_else(|| {
            ClientError::Config(format!("{} holds no registered device", store_path.display()))
        })?;
        let crypto =
            store.device_crypto()?.ok_or_else(|| ClientError::Config("no E2E account".into()))?;
        Ok(Client {
            endpoint: chosen_endpoint(&store, &identity, None)?,
            store,
            crypto,
            identity,
            connection: None,
            backlog: VecDeque::new(),
            events: VecDeque::new(),
            clear_prefix: None,
            link: link::Link::default(),
            device_news: 0,
            unvouched_checked: Default::default(),
        })
    }

    /// Why an outgoing message failed (the server's reason), if it did.
    pub fn failure(&self, client_id: u64) -> Result<Option<String>, ClientError> {
        Ok(self.store.failure(client_id)?)
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

    /// Tells the senders of these incoming messages that the user read them; nothing
    /// when the user turned read receipts off ([`Client::set_read_receipts`]).
    pub async fn mark_read(&mut self, peer: u64, server_ids: &[u64]) -> Result<(), ClientError> {
        if server_ids.is_empty() || !self.store.read_receipts()? {
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

    /// Messages holding every one of these words (as typed: no query syntax; each word
    /// also matches as a prefix), newest first.
    pub fn search(&self, words: &str, limit: usize) -> Result<Vec<StoredMessage>, ClientError> {
        Ok(self.store.search(words, limit)?.into_iter().map(|(m, _)| m).collect())
    }

    /// Like [`Client::search`], with each message's conversation: its group id, or 0 for
    /// a one-to-one conversation (the message's `peer`).
    pub fn search_conversations(
        &self,
        words: &str,
        limit: usize,
    ) -> Result<Vec<(StoredMessage, u64)>, ClientError> {
        Ok(self.store.search(words, limit)?)
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
}

/// The endpoint a store is opened with: the one kept at registration, or `given`
/// checked against it. A given endpoint may change the address or the framing, or add
/// TLS to a registration without it; where registration chose TLS it must keep that
/// trust root (a pinned certificate is compared by its bytes). A store from before the
/// endpoint was kept learns the first one given (or connects as before: plain TCP to the
/// address it registered with, itself subject to the plaintext rule).
fn chosen_endpoint(
    store: &Store,
    identity: &Identity,
    given: Option<Endpoint>,
) -> Result<Endpoint, ClientError> {
    let stored = match store.endpoint()? {
        Some(bytes) => Some(Endpoint::decode(&bytes).ok_or_else(|| {
            crate::StoreError::Corrupt("the registration's endpoint is unreadable".into())
        })?),
        None => None,
    };
    let Some(given) = given else {
        return Ok(stored.unwrap_or_else(|| Endpoint::tcp(identity.server.clone())));
    };
    let given = given.resolved()?;
    match stored {
        None => store.save_endpoint(&given.encode())?,
        Some(stored) if stored.tls.is_some() && stored.tls != given.tls => {
            return Err(ClientError::TransportChanged {
                registered: protection(&stored),
                given: protection(&given),
            })
        }
        Some(_) => {}
    }
    Ok(given)
}

/// An endpoint's protection, in words, for [`ClientError::TransportChanged`].
fn protection(endpoint: &Endpoint) -> String {
    let framing = if endpoint.websocket { "WebSocket" } else { "TCP" };
    match &endpoint.tls {
        None => format!("plain {framing} (no TLS)"),
        Some(Trust::WebPki) => format!("TLS ({framing}) trusting the web PKI"),
        Some(Trust::Pinned(path)) => format!("TLS ({framing}) trusting {}", path.display()),
        Some(Trust::Certificate(pem)) => {
            let digest = crate::crypto::fingerprint(&sha256(pem));
            format!("TLS ({framing}) trusting the pinned certificate {digest}")
        }
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

fn unreachable_frame() -> ! {
    panic!("the message type was matched just before")
}
