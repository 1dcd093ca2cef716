//! Fuzz target: the incremental frame decoder over an arbitrary byte stream.
//!
//! Property: the decoder never panics; fed in arbitrary chunks (sizes taken from the
//! input) it yields exactly the frames, in order, that one-shot `decode_frame` finds
//! in the whole stream, stops at the same error, and the bytes add up.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_wire::{decode_frame, FrameDecoder, MessageType};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk_seed, stream)) = data.split_first() else { return };
    let max_frame_bytes = 64 + u32::from(chunk_seed) * 64;

    // Reference: one-shot decoding of the whole stream.
    let mut expected: Vec<(MessageType, u32, Vec<u8>)> = Vec::new();
    let mut expected_error = None;
    let mut rest = stream;
    loop {
        match decode_frame(rest, max_frame_bytes) {
            Ok(Some((frame, used))) => {
                assert_eq!(used, frame.header.frame_bytes());
                expected.push((
                    frame.header.message_type,
                    frame.header.request_id,
                    frame.payload.to_vec(),
                ));
                rest = &rest[used..];
            }
            Ok(None) => break,
            Err(error) => {
                expected_error = Some(error);
                break;
            }
        }
    }
    let consumed: usize = stream.len() - rest.len();

    // Incremental decoding in chunks of 1..=16 bytes.
    let mut decoder = FrameDecoder::new(max_frame_bytes);
    let mut got = Vec::new();
    let mut got_error = None;
    let mut offset = 0;
    let mut i = 0usize;
    'feed: while offset < stream.len() {
        let n = (1 + (usize::from(chunk_seed) + i) % 16).min(stream.len() - offset);
        i += 1;
        decoder.feed(&stream[offset..offset + n]);
        offset += n;
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => got.push((
                    frame.header.message_type,
                    frame.header.request_id,
                    frame.payload.to_vec(),
                )),
                Ok(None) => break,
                Err(error) => {
                    got_error = Some(error);
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(got, expected);
    assert_eq!(got_error, expected_error);
    if got_error.is_none() {
        assert_eq!(decoder.buffered_bytes(), stream.len() - consumed);
    }
});
