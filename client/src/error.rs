//! The SDK's error types, in a module of their own below every other one: the
//! connection, the store and the client all name them, and none of those modules needs
//! another's file for it (no import cycle).

use tern_wire::ErrorCode;

use crate::crypto::CryptoError;

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
    /// A connection without TLS to an address off this machine, which the user did not
    /// allow (`Endpoint::allow_plaintext`): the token would cross the network in clear.
    /// Nothing was sent.
    #[error(
        "{address} is not on this machine and the connection has no TLS: the token and \
         every frame would cross the network in clear; use TLS (tern: --tls), or allow \
         plaintext knowingly (tern: --insecure-plaintext)"
    )]
    PlaintextRefused {
        /// The endpoint's address.
        address: String,
    },
    /// The endpoint given to open a store protects less than the one chosen at
    /// registration (no TLS where it had TLS, or another trust root): a reconnect keeps
    /// the registration's transport and trust root. Nothing was sent.
    #[error(
        "this device registered over {registered}; it does not connect over {given} \
         (a reconnect keeps the transport and trust root chosen at registration)"
    )]
    TransportChanged {
        /// The registration's protection, in words.
        registered: String,
        /// The given endpoint's, in words.
        given: String,
    },
    /// A send found a new or changed device of a recipient ([`crate::Event::DeviceAdded`],
    /// [`crate::Event::IdentityChanged`]) and stopped before encrypting anything to it,
    /// so that the app shows the event first. A text waits in the outbox and is sent
    /// again by itself; other sends (files, group messages) can be tried again.
    #[error(
        "the devices of user {user_id} changed (a new device, or new keys): show the event \
         and the safety number, then send again"
    )]
    DevicesChanged {
        /// The recipient whose devices changed.
        user_id: u64,
    },
    /// An envelope held a control message, not a message for the history (internal).
    #[error("not a message")]
    NotAMessage,
    /// A text is longer than one message may be; it was not queued.
    #[error("too long ({bytes} bytes; at most {max_bytes}); send it as a file")]
    TooLong {
        /// Its length in bytes (UTF-8).
        bytes: usize,
        /// The most a text may have.
        max_bytes: usize,
    },
    /// A file broke a rule of this device (too large, unpacking beyond its declared
    /// size, more bytes than asked for): refused before it is stored or opened.
    #[error(transparent)]
    File(#[from] FileError),
    /// The server refused this one message for good (no such user, not allowed, too
    /// large, ...). It is marked failed in the history and never re-sent; the device and
    /// its other messages go on.
    #[error("not sent: {reason}")]
    Refused {
        /// Why, as a code.
        code: ErrorCode,
        /// Which rule refused it, in words.
        reason: String,
        /// The message's client id (its history entry is marked failed).
        client_id: u64,
    },
}

impl ClientError {
    /// Whether this error is the connection going away (a network error, a closed
    /// socket, the server stopping or timing the connection out): the client reconnects
    /// and goes on.
    pub fn is_disconnect(&self) -> bool {
        match self {
            ClientError::Io(_) | ClientError::Disconnected => true,
            ClientError::Server { code, .. } => {
                matches!(code, ErrorCode::ShuttingDown | ErrorCode::Timeout)
            }
            _ => false,
        }
    }
}

/// Which rule a file (one to send, or one a sender or the server described) broke.
/// Every number in a descriptor comes from its sender and every byte count from the
/// server: each is checked before it sizes an allocation or a decompression.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// Larger than the server's file limit (`media::FILE_MAX_BYTES`).
    #[error("the file is {size_bytes} bytes; at most {max_bytes} are accepted")]
    TooLarge {
        /// Its size (sealed, or as the descriptor says).
        size_bytes: u64,
        /// The limit.
        max_bytes: u64,
    },
    /// It decompresses beyond the size its descriptor declared (a decompression bomb):
    /// decompression stopped there.
    #[error("the file unpacks to more than the {bound_bytes} bytes its sender declared")]
    UnpacksBeyond {
        /// The declared size, where decompression stopped.
        bound_bytes: u64,
    },
    /// It unpacked, or downloaded, to another size than its descriptor declared.
    #[error("the file has {actual_bytes} bytes, not the {declared_bytes} its sender declared")]
    SizeMismatch {
        /// What the descriptor said.
        declared_bytes: u64,
        /// What there was.
        actual_bytes: u64,
    },
    /// The server answered a download with more bytes than were asked for.
    #[error("the server sent {sent_bytes} bytes where at most {asked_bytes} were asked for")]
    Oversent {
        /// What came.
        sent_bytes: u64,
        /// What was asked.
        asked_bytes: u64,
    },
}

/// Whether a server's refusal of a message may pass, so that sending it again later can
/// work: rate limits (after `retry_after_ms`), a full disk or quota, the server failing,
/// stopping or timing out, a cluster's shard not reachable yet. Every other code (no
/// such user, not allowed, too large, bad argument, a code this SDK does not know, ...)
/// is permanent: that message fails and is never sent again, so that one bad message
/// never blocks the messages after it.
pub fn is_transient(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::RateLimited
            | ErrorCode::StorageFull
            | ErrorCode::QuotaExceeded
            | ErrorCode::Internal
            | ErrorCode::ShuttingDown
            | ErrorCode::Timeout
            | ErrorCode::ShardUnavailable
    )
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
