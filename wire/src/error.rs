//! What can go wrong: decoding errors (local, `Copy`, cheap) and the machine-readable
//! error codes that travel in `ErrorFrame` and `SendError` frames.

use core::fmt;

use crate::types::MessageType;

/// Why bytes could not be decoded as a frame. "Need more bytes" is not an error: the
/// decoder returns `Ok(None)` for it.
///
/// After any of these the connection is out of sync and must be closed (after sending
/// an `ErrorFrame` with [`DecodeError::error_code`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The header announces a frame larger than the negotiated maximum.
    FrameTooLarge {
        /// Header plus payload length announced.
        frame_bytes: u64,
        /// The limit in force.
        max_frame_bytes: u32,
    },
    /// No v1 frame type has this code.
    UnknownType {
        /// The code.
        code: u16,
    },
    /// Flag bits or the reserved header byte that v1 does not define were set.
    ReservedBits {
        /// The flags byte.
        flags: u8,
        /// The reserved byte.
        reserved: u8,
    },
    /// The payload is not a valid archive of its type (bad length, pointer, enum tag,
    /// UTF-8, or missing bytes).
    BadPayload {
        /// The frame's type.
        message_type: MessageType,
    },
    /// The `Hello` frame did not carry the Tern magic bytes.
    BadMagic,
    /// The peer speaks no protocol version in common with us.
    UnsupportedVersion {
        /// Lowest version the peer offered.
        peer_min: u16,
        /// Highest version the peer offered.
        peer_max: u16,
    },
}

impl DecodeError {
    /// The code to send to the peer in an `ErrorFrame` before closing.
    pub fn error_code(self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::UnknownType { .. } => ErrorCode::UnknownType,
            DecodeError::ReservedBits { .. }
            | DecodeError::BadPayload { .. }
            | DecodeError::BadMagic => ErrorCode::Malformed,
            DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DecodeError::FrameTooLarge { frame_bytes, max_frame_bytes } => write!(
                f,
                "frame of {frame_bytes} bytes exceeds the negotiated maximum of \
                 {max_frame_bytes}; split the payload (media goes in chunks)"
            ),
            DecodeError::UnknownType { code } => {
                write!(f, "unknown frame type 0x{code:04x}: the peer speaks a newer protocol?")
            }
            DecodeError::ReservedBits { flags, reserved } => write!(
                f,
                "reserved header bits set (flags 0x{flags:02x}, reserved 0x{reserved:02x})"
            ),
            DecodeError::BadPayload { message_type } => {
                write!(f, "payload is not a valid {} archive", message_type.name())
            }
            DecodeError::BadMagic => write!(f, "Hello without the TERN magic: not a Tern client"),
            DecodeError::UnsupportedVersion { peer_min, peer_max } => write!(
                f,
                "no common protocol version: peer speaks {peer_min}..={peer_max}, we speak \
                 {}..={}",
                crate::PROTOCOL_VERSION_MIN,
                crate::PROTOCOL_VERSION_MAX
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Why encoding failed. The output buffer is left as it was before the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// The frame would exceed the limit the caller gave.
    FrameTooLarge {
        /// Header plus payload length.
        frame_bytes: u64,
        /// The limit.
        max_frame_bytes: u32,
    },
    /// The archiver refused the value (a length beyond the 32-bit archive format).
    Unrepresentable,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            EncodeError::FrameTooLarge { frame_bytes, max_frame_bytes } => {
                write!(f, "frame of {frame_bytes} bytes exceeds the maximum of {max_frame_bytes}")
            }
            EncodeError::Unrepresentable => {
                write!(f, "value cannot be archived (a length does not fit in 32 bits)")
            }
        }
    }
}

impl std::error::Error for EncodeError {}

macro_rules! error_codes {
    ($( $code:literal => $name:ident : $doc:literal, )*) => {
        /// Machine-readable error codes, carried as `u16` in `ErrorFrame.code` and
        /// `SendError.code`. A receiver must accept codes it does not know.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        #[repr(u16)]
        pub enum ErrorCode {
            $( #[doc = $doc] $name = $code, )*
        }

        impl ErrorCode {
            /// Every code (tests walk it).
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The code with this number, if this version knows it.
            pub fn from_u16(code: u16) -> Option<ErrorCode> {
                match code {
                    $($code => Some(ErrorCode::$name),)*
                    _ => None,
                }
            }

            /// Its name, for logs.
            pub fn name(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => stringify!($name),)*
                }
            }
        }
    };
}

error_codes! {
    1 => Malformed: "A frame could not be decoded; the connection is closed.",
    2 => UnsupportedVersion: "No protocol version in common.",
    3 => FrameTooLarge: "A frame exceeded the negotiated maximum size.",
    4 => UnknownType: "A frame type this server does not know.",
    5 => UnexpectedFrame: "A valid frame that is not allowed in the connection's state.",
    6 => AuthRequired: "The operation needs an authenticated device.",
    7 => BadToken: "Unknown device, wrong or revoked token.",
    8 => RateLimited: "Too many requests; retry after `retry_after_ms`.",
    9 => StaleDevices: "The copies do not match the recipient's device list.",
    10 => NotFound: "No such user, device, group or media.",
    11 => Forbidden: "The device may not do this (not a member, not its data).",
    12 => QuotaExceeded: "A mailbox, storage or daily quota is full.",
    13 => Conflict: "The state changed meanwhile (for example a stale group epoch).",
    14 => Internal: "The server failed; the request may be retried.",
    15 => ShuttingDown: "The server is stopping; reconnect later.",
    16 => InvalidCode: "Wrong verification or linking code.",
    17 => CodeExpired: "The code expired; request a new one.",
    18 => GroupFull: "The group would exceed 256 members.",
    19 => NotAdmin: "Only a group admin may do this.",
    20 => TooLarge: "An upload or field exceeds its limit.",
    21 => HashMismatch: "The uploaded blob does not match the committed hash.",
    22 => RegistrationLocked: "The number has a registration lock; give the PIN.",
    23 => ProofOfWorkRequired: "Solve the `PowChallenge` first.",
    24 => TooManyConnections: "The server holds its maximum number of connections.",
    25 => Timeout: "A handshake or auth deadline passed.",
    26 => StorageFull: "The server's disk is full; nothing was accepted.",
    27 => InvalidSignature: "A key or group change signature does not verify.",
    28 => InvalidArgument: "A field has a value outside its range.",
    29 => NotReading: "Output piled up unread past its bound; the connection is closed.",
    30 => ShardUnavailable: "A cluster's shard is not served from here yet; retry later.",
}
