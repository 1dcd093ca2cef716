//! Ready-made values for tests, benchmarks and fuzz seeds, so each does not build its own
//! copy. Not part of the protocol's API (hidden from the docs).

use crate::messages::{Conversation, DeviceCopy, E2eType, EnvelopeKind, SendMessage};
use crate::{encode_frame, DEFAULT_MAX_FRAME_BYTES};

/// The ciphertext size the design targets (a short text message).
pub const CIPHERTEXT_100B: [u8; 100] = [0xC5; 100];

/// A text message to user 42's device 1 with one 100-byte ciphertext.
pub fn send_100b() -> SendMessage {
    SendMessage {
        client_message_id: 77,
        to: Conversation::User(42),
        kind: EnvelopeKind::Text,
        ttl_s: 0,
        copies: vec![DeviceCopy {
            user_id: 42,
            device_id: 1,
            e2e_type: E2eType::OlmMessage,
            ciphertext: CIPHERTEXT_100B.to_vec(),
        }],
    }
}

/// [`send_100b`] framed with request id 1.
pub fn send_frame_100b() -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(&mut out, 1, 0, &send_100b(), DEFAULT_MAX_FRAME_BYTES).expect("fits a frame");
    out
}
