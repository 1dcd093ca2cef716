//! The hot path allocates nothing.
//!
//! Goal: decoding and validating a 100-byte-ciphertext `SendMessage`, reading its
//! fields, laying out the envelope the server stores and framing it as `Deliver` must
//! not touch the heap once buffers are warm. Method: `allocation-counter` installs a
//! counting global allocator in this test binary; each step runs once to warm buffers
//! and rkyv's thread-local arena, then is measured over many iterations.

use tern_wire::messages::*;
use tern_wire::*;

#[test]
fn hot_path_does_not_allocate() {
    let frame_bytes = tern_wire::fixtures::send_frame_100b();
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut record = Vec::with_capacity(4096);
    let mut outbound = Vec::with_capacity(4096);
    let copies = [DeviceCopyRef {
        user_id: 42,
        device_id: 2,
        e2e_type: E2eType::OlmMessage,
        ciphertext: &[0xC5; 100],
    }];

    let step = |decoder: &mut FrameDecoder, record: &mut Vec<u8>, outbound: &mut Vec<u8>| {
        // Receive: bytes in, validated view out.
        decoder.feed(&frame_bytes);
        let frame = decoder.next_frame().unwrap().unwrap();
        let Message::SendMessage(send) = frame.message else { panic!("not a send") };
        let copy = &send.copies[0];
        assert_eq!(copy.ciphertext.len(), 100);

        // Lay out the stored envelope, borrowing the ciphertext from the frame.
        record.clear();
        let envelope = EnvelopeRef {
            server_message_id: 1,
            client_message_id: send.client_message_id.to_native(),
            server_time_ms: 2,
            expires_ms: 3,
            sender_user: 4,
            sender_device: 5,
            conversation: Conversation::User(4),
            conversation_seq: 6,
            kind: EnvelopeKind::Text,
            e2e_type: E2eType::OlmMessage,
            body: &copy.ciphertext,
        };
        encode_archive(record, &envelope).unwrap();

        // Frame it for the recipient, and a client-side send from borrowed copies.
        outbound.clear();
        encode_deliver(outbound, 0, 9, record, DEFAULT_MAX_FRAME_BYTES).unwrap();
        let send_ref = SendMessageRef {
            client_message_id: 78,
            to: Conversation::User(4),
            kind: EnvelopeKind::Text,
            ttl_s: 0,
            copies: &copies,
        };
        encode_frame(outbound, 2, 0, &send_ref, DEFAULT_MAX_FRAME_BYTES).unwrap();
    };

    step(&mut decoder, &mut record, &mut outbound); // warm up
    let info = allocation_counter::measure(|| {
        for _ in 0..1000 {
            step(&mut decoder, &mut record, &mut outbound);
        }
    });
    assert_eq!(info.count_total, 0, "hot path allocated: {info:?}");
}
