//! `tern-wire`: the protocol Tern's clients, server, tools and fuzzers speak.
//!
//! A connection is a stream of frames: a 12-byte header ([`FrameHeader`]) followed by
//! a payload that is the rkyv archive of one type of the v1 catalogue ([`messages`]),
//! validated before it is read in place ([`Message`]). `docs/PROTOCOL.md` specifies
//! every byte; this crate is its reference implementation.
//!
//! The crate is sans-IO: bytes in ([`FrameDecoder`]), bytes out ([`encode_frame`] into
//! a buffer the caller owns). It never touches a socket, a file or a clock, and it does
//! not depend on a runtime, so the server, the SDK, the tools and the fuzzers share it.
//!
//! # Hot path
//! The server lays an [`Envelope`](messages::Envelope) out once ([`EnvelopeRef`]
//! borrows the ciphertext from the received `SendMessage`, so nothing is copied
//! twice), the engine stores those exact bytes, and [`encode_deliver`] frames them for
//! the recipient unchanged.

#![forbid(unsafe_code)]

pub mod accounts;
mod borrowed;
mod catalogue;
mod error;
#[doc(hidden)]
pub mod fixtures;
mod frame;
pub mod messages;
mod types;

pub use borrowed::{DeviceCopyRef, EnvelopeRef, SendMessageRef, SliceAsVec};
pub use catalogue::{access, Deliver, EnvelopeContent, Message, Payload, DELIVER_PREFIX_BYTES};
pub use error::{DecodeError, EncodeError, ErrorCode};
pub use frame::{
    decode_frame, deliver_preamble, encode_archive, encode_deliver, encode_frame, Frame,
    FrameDecoder, FrameHeader, WireSerializer, FLAGS_KNOWN, FLAG_RESPONSE, HEADER_BYTES,
};
pub use types::MessageType;

/// The magic bytes of a [`messages::Hello`]: `TERN`.
pub const HELLO_MAGIC: [u8; 4] = *b"TERN";
/// Lowest protocol version this build speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// Highest protocol version this build speaks.
pub const PROTOCOL_VERSION_MAX: u16 = 1;
/// The frame size limit until the handshake has negotiated one: `Hello` and `Welcome`
/// must fit in it.
pub const HANDSHAKE_MAX_FRAME_BYTES: u32 = 4096;
/// The default frame size limit after the handshake: a 256 KiB media chunk plus room.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 1024 * 1024;
/// No implementation may negotiate frames larger than this.
pub const ABSOLUTE_MAX_FRAME_BYTES: u32 = 16 * 1024 * 1024;

/// Picks the protocol version for a connection from a client's `Hello`: the highest
/// version both sides speak.
pub fn negotiate_version(hello: &messages::ArchivedHello) -> Result<u16, DecodeError> {
    if hello.magic != HELLO_MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let peer_min = hello.version_min.to_native();
    let peer_max = hello.version_max.to_native();
    let high = peer_max.min(PROTOCOL_VERSION_MAX);
    let low = peer_min.max(PROTOCOL_VERSION_MIN);
    if low > high {
        return Err(DecodeError::UnsupportedVersion { peer_min, peer_max });
    }
    Ok(high)
}

/// The frame size limit for a connection: the smaller of what the client asked for and
/// what the server allows, never below the handshake limit.
pub fn negotiate_max_frame_bytes(client_max: u32, server_max: u32) -> u32 {
    client_max.min(server_max).clamp(HANDSHAKE_MAX_FRAME_BYTES, ABSOLUTE_MAX_FRAME_BYTES)
}

#[cfg(test)]
mod tests;
