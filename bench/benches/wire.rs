//! Wire codec micro-benchmarks: the per-frame cost on the message hot path.
//!
//! Run: `cargo bench -p tern-bench --bench wire`. Figures go in `docs/BENCHMARKS.md`.
//! Each case works on a 100-byte ciphertext, the size the design targets.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tern_wire::fixtures::{send_frame_100b as send_frame, CIPHERTEXT_100B as CIPHERTEXT};
use tern_wire::messages::*;
use tern_wire::*;

fn envelope_ref(body: &[u8]) -> EnvelopeRef<'_> {
    EnvelopeRef {
        server_message_id: 1 << 48 | 12345,
        client_message_id: 77,
        server_time_ms: 1_796_000_000_000,
        expires_ms: 1_798_592_000_000,
        sender_user: 4,
        sender_device: 1,
        conversation: Conversation::User(4),
        conversation_seq: 6,
        kind: EnvelopeKind::Text,
        e2e_type: E2eType::OlmMessage,
        body,
    }
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));

    let send = send_frame();
    group.bench_function("send_100B/decode+validate+fields", |b| {
        b.iter(|| {
            let (frame, used) =
                decode_frame(black_box(&send), DEFAULT_MAX_FRAME_BYTES).unwrap().unwrap();
            let Message::SendMessage(m) = frame.message else { unreachable!() };
            let copy = &m.copies[0];
            black_box((
                used,
                m.client_message_id.to_native(),
                copy.device_id.to_native(),
                copy.ciphertext.as_slice(),
            ));
        })
    });

    let mut record = Vec::new();
    encode_archive(&mut record, &envelope_ref(&CIPHERTEXT)).unwrap();
    let mut deliver = Vec::new();
    encode_deliver(&mut deliver, 0, 9, &record, DEFAULT_MAX_FRAME_BYTES).unwrap();
    group.bench_function("deliver_100B/decode+validate+fields", |b| {
        b.iter(|| {
            let (frame, _) =
                decode_frame(black_box(&deliver), DEFAULT_MAX_FRAME_BYTES).unwrap().unwrap();
            let Message::Deliver(d) = frame.message else { unreachable!() };
            black_box((
                d.mailbox_seq,
                d.envelope.server_message_id.to_native(),
                d.envelope.body.as_slice(),
            ));
        })
    });

    // The decoder as a connection uses it: bytes fed in, frames taken out.
    group.bench_function("send_100B/frame_decoder", |b| {
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
        b.iter(|| {
            decoder.feed(black_box(&send));
            let frame = decoder.next_frame().unwrap().unwrap();
            black_box(frame.payload.len());
        })
    });
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(4096);

    let copies = [DeviceCopyRef {
        user_id: 42,
        device_id: 1,
        e2e_type: E2eType::OlmMessage,
        ciphertext: &CIPHERTEXT,
    }];
    group.bench_function("send_100B/borrowed", |b| {
        b.iter(|| {
            out.clear();
            let send = SendMessageRef {
                client_message_id: 77,
                to: Conversation::User(42),
                kind: EnvelopeKind::Text,
                ttl_s: 0,
                copies: black_box(&copies),
            };
            encode_frame(&mut out, 1, 0, &send, DEFAULT_MAX_FRAME_BYTES).unwrap();
            black_box(out.len());
        })
    });

    let mut record = Vec::with_capacity(4096);
    group.bench_function("envelope_100B/record+deliver_frame", |b| {
        b.iter(|| {
            record.clear();
            out.clear();
            encode_archive(&mut record, &envelope_ref(black_box(&CIPHERTEXT))).unwrap();
            encode_deliver(&mut out, 0, 9, &record, DEFAULT_MAX_FRAME_BYTES).unwrap();
            black_box(out.len());
        })
    });

    encode_archive(&mut record, &envelope_ref(&CIPHERTEXT)).unwrap();
    group.bench_function("deliver_100B/frame_stored_record", |b| {
        b.iter(|| {
            out.clear();
            encode_deliver(&mut out, 0, 9, black_box(&record), DEFAULT_MAX_FRAME_BYTES).unwrap();
            black_box(out.len());
        })
    });
    group.finish();
}

// criterion's macros generate undocumented functions.
#[allow(missing_docs)]
mod harness {
    use super::*;
    criterion_group!(benches, decode, encode);
}
criterion_main!(harness::benches);
