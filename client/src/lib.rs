//! `tern-client`: the SDK apps embed to speak to `ternd`, end to end encrypted.
//!
//! - [`connection`]: TCP or TLS 1.3 (web PKI, or a pinned development certificate),
//!   the handshake, frames in and out.
//! - [`crypto`]: Olm sessions per device pair with `vodozemac` (the only module that
//!   touches it), signed prekeys, pinned identities, safety numbers.
//! - [`store`]: one SQLite file with the device's identity, E2E state (encrypted at
//!   rest), pinned peer identities, history with delivery ticks and full-text search.
//! - [`client`]: registration, login, reconnect and resume, send with retry, events.
//!
//! The server never sees a plaintext or a private key: it gets one ciphertext per
//! recipient device and the public halves of this device's keys.

#![forbid(unsafe_code)]

pub mod client;
pub mod connection;
pub mod crypto;
pub mod groups;
pub mod media;
pub mod store;

pub use client::{phone_hash, Client, Event, PendingLink, PendingRegistration, ProfileView};
pub use connection::{Endpoint, Trust};
pub use crypto::{CryptoError, PeerIdentity};
pub use store::{Status, StoreSecret, StoredMessage};
/// The protocol's message types (group changes, for instance), for apps.
pub use tern_wire::messages;
pub use tern_wire::ErrorCode;

/// What the SDK's calls fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The network failed.
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    /// The server closed the connection (reconnect and go on).
    #[error("the server closed the connection")]
    Disconnected,
    /// The server refused a request.
    #[error("the server said {code:?}: {message}")]
    Server {
        /// Why, as a code.
        code: ErrorCode,
        /// Why, for people.
        message: String,
        /// When to try again (0: do not).
        retry_after_ms: u32,
    },
    /// The server said something this SDK does not understand.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The E2E layer refused (bad signature, undecryptable message, ...).
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A setting is wrong (store path, certificate file, ...).
    #[error("configuration: {0}")]
    Config(String),
    /// An envelope held a control message, not a message for the history (internal).
    #[error("not a message")]
    NotAMessage,
}

/// What the local store fails with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("local database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The file system failed.
    #[error("local store: {0}")]
    Io(#[from] std::io::Error),
    /// The passphrase or key does not open this store.
    #[error("wrong passphrase or key for this store")]
    WrongKey,
    /// The store holds something unreadable.
    #[error("the local store is corrupt: {0}")]
    Corrupt(String),
    /// Key derivation failed.
    #[error("key derivation: {0}")]
    Kdf(String),
    /// The OS random source failed.
    #[error("random source: {0}")]
    Random(String),
}
