//! Fuzz target: payload validation of every frame type.
//!
//! The first two input bytes pick the type (an index into the catalogue), the rest is
//! the payload. Property: validation never panics, and a payload that validates
//! deserializes to a value whose re-encoding reads back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_wire::{Message, MessageType};

fuzz_target!(|data: &[u8]| {
    let Some((selector, payload)) = data.split_first_chunk::<2>() else { return };
    let index = usize::from(u16::from_le_bytes(*selector)) % MessageType::ALL.len();
    let message_type = MessageType::ALL[index];
    if let Ok(message) = Message::validate(message_type, payload) {
        assert_eq!(message.message_type(), message_type);
    }
    Message::check_reencode(message_type, payload);
});
