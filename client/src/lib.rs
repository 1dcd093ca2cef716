//! `tern-client`: the SDK apps embed to speak to `ternd`, end to end encrypted.
//!
//! - [`connection`]: TCP or TLS 1.3 (web PKI, or a pinned development certificate),
//!   the handshake, frames in and out.
//! - [`crypto`]: Olm sessions per device pair with `vodozemac` (the only module that
//!   touches it), signed prekeys, pinned identities, safety numbers.
//! - [`devices`]: device lists signed by the primary device, which vouch for companions.
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
pub mod devices;
mod error;
pub mod groups;
pub mod media;
pub mod store;

pub use client::{
    phone_hash, Client, Event, PendingLink, PendingRegistration, ProfileView, TEXT_MAX_BYTES,
};
pub use connection::{Endpoint, Trust};
pub use crypto::{CryptoError, PeerIdentity};
pub use error::{is_transient, ClientError, FileError, StoreError};
pub use store::{Status, StoreSecret, StoredMessage};
/// The protocol's message types (group changes, for instance), for apps.
pub use tern_wire::messages;
pub use tern_wire::ErrorCode;
