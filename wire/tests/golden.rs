//! Golden vectors: the exact bytes of a handful of real frames, committed as hex.
//!
//! Goal: the byte layout of protocol v1 cannot drift silently (a dependency upgrade, a
//! reordered field, a changed rkyv feature). Method: encode fixed values and compare
//! with `tests/golden/*.hex`; also decode each file and compare with the value, so the
//! files are checked as input too. `docs/PROTOCOL.md` walks through `send.hex` byte by
//! byte. After an intended format change (with a version bump), regenerate with
//! `TERN_UPDATE_GOLDEN=1 cargo test -p tern-wire --test golden`.

use std::path::PathBuf;

use rkyv::rancor::Failure;
use tern_wire::messages::*;
use tern_wire::*;

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{name}.hex"))
}

/// Hex, 16 bytes per line, so diffs point at the changed bytes.
fn to_hex_lines(bytes: &[u8]) -> String {
    bytes.chunks(16).map(|line| hex::encode(line) + "\n").collect()
}

fn from_hex_lines(text: &str) -> Vec<u8> {
    let joined: String = text.split_whitespace().collect();
    hex::decode(joined).expect("golden file is hex")
}

/// Compares `bytes` with the committed file (or rewrites it when asked) and returns
/// the file's bytes for the decoding half of the check.
fn check_golden(name: &str, bytes: &[u8]) -> Vec<u8> {
    let path = golden_path(name);
    if std::env::var_os("TERN_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, to_hex_lines(bytes)).unwrap();
    }
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run with TERN_UPDATE_GOLDEN=1", path.display()));
    let expected = from_hex_lines(&text);
    assert_eq!(
        to_hex_lines(bytes),
        to_hex_lines(&expected),
        "{name}: encoding differs from {}",
        path.display()
    );
    expected
}

fn decode_golden<T>(bytes: &[u8]) -> (FrameHeader, T)
where
    T: Payload,
    T::Archived: rkyv::Deserialize<T, rkyv::rancor::Strategy<rkyv::de::Pool, Failure>>
        + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, Failure>>,
{
    let (frame, used) = decode_frame(bytes, DEFAULT_MAX_FRAME_BYTES).unwrap().unwrap();
    assert_eq!(used, bytes.len());
    assert_eq!(frame.header.message_type, T::TYPE);
    let value = rkyv::deserialize::<T, Failure>(access::<T>(frame.payload).unwrap()).unwrap();
    (frame.header, value)
}

#[test]
fn golden_hello() {
    let hello = Hello {
        magic: HELLO_MAGIC,
        version_min: 1,
        version_max: 1,
        max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        client: "tern-cli/0.1".into(),
    };
    let mut out = Vec::new();
    encode_frame(&mut out, 1, 0, &hello, HANDSHAKE_MAX_FRAME_BYTES).unwrap();
    let file = check_golden("hello", &out);
    let (header, back) = decode_golden::<Hello>(&file);
    assert_eq!((header.request_id, back), (1, hello));
}

#[test]
fn golden_welcome() {
    let welcome = Welcome {
        version: 1,
        max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        server_time_ms: 1_796_000_000_000,
        heartbeat_interval_ms: 30_000,
        server: "ternd/0.0.0".into(),
    };
    let mut out = Vec::new();
    encode_frame(&mut out, 1, FLAG_RESPONSE, &welcome, HANDSHAKE_MAX_FRAME_BYTES).unwrap();
    let file = check_golden("welcome", &out);
    let (header, back) = decode_golden::<Welcome>(&file);
    assert!(header.is_response());
    assert_eq!(back, welcome);
}

fn send_message() -> SendMessage {
    SendMessage {
        client_message_id: 0x0102_0304_0506_0708,
        to: Conversation::User(42),
        kind: EnvelopeKind::Text,
        ttl_s: 0,
        copies: vec![DeviceCopy {
            user_id: 42,
            device_id: 1,
            e2e_type: E2eType::OlmMessage,
            ciphertext: (0u8..16).collect(),
        }],
    }
}

#[test]
fn golden_send() {
    let send = send_message();
    let mut out = Vec::new();
    encode_frame(&mut out, 7, 0, &send, DEFAULT_MAX_FRAME_BYTES).unwrap();
    let file = check_golden("send", &out);
    let (header, back) = decode_golden::<SendMessage>(&file);
    assert_eq!((header.request_id, back), (7, send));
}

#[test]
fn golden_deliver() {
    let envelope = Envelope {
        server_message_id: 0x0001_0000_0000_0001,
        client_message_id: 0x0102_0304_0506_0708,
        server_time_ms: 1_796_000_000_000,
        expires_ms: 1_796_000_000_000 + 30 * 86_400_000,
        sender_user: 7,
        sender_device: 1,
        conversation: Conversation::User(7),
        conversation_seq: 1,
        kind: EnvelopeKind::Text,
        e2e_type: E2eType::OlmMessage,
        body: (0u8..16).collect(),
    };
    let mut record = Vec::new();
    encode_archive(&mut record, &envelope).unwrap();
    let mut out = Vec::new();
    encode_deliver(&mut out, 0, 3, &record, DEFAULT_MAX_FRAME_BYTES).unwrap();
    let file = check_golden("deliver", &out);

    let (frame, _) = decode_frame(&file, DEFAULT_MAX_FRAME_BYTES).unwrap().unwrap();
    let Message::Deliver(deliver) = frame.message else { panic!("not a Deliver") };
    assert_eq!(deliver.mailbox_seq, 3);
    assert_eq!(deliver.envelope_bytes, &record[..]);
    let back = rkyv::deserialize::<Envelope, Failure>(deliver.envelope).unwrap();
    assert_eq!(back, envelope);
}

#[test]
fn golden_error() {
    let error = ErrorFrame {
        code: ErrorCode::StaleDevices as u16,
        failed_type: MessageType::SendMessage.code(),
        retry_after_ms: 0,
        message: "device list changed".into(),
    };
    let mut out = Vec::new();
    encode_frame(&mut out, 7, FLAG_RESPONSE, &error, DEFAULT_MAX_FRAME_BYTES).unwrap();
    let file = check_golden("error", &out);
    let (_, back) = decode_golden::<ErrorFrame>(&file);
    assert_eq!(back, error);
}
