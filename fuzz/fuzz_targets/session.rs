//! Fuzz target: the session state machine, driven through a real in-process server core.
//!
//! Setup (the same for every input): one `tern_edge::core::Core` (one core, three shards
//! on the engine's simulated disk), a code sender that records codes, and two users
//! registered the way a client does (Hello → RequestCode → the code → Verify → Auth),
//! so that the fuzzer starts past registration. Four connection slots: user A, user B
//! (both authenticated), one after Hello only, one raw. The input is then a list of
//! operations, each on one slot (the first byte chooses): feed raw bytes to the slot's
//! frame decoder, send a payload of a chosen type in a well-formed frame header, close
//! the connection (the slot reconnects with its setup script), or move the clock.
//!
//! The harness does what the glommio runtime does (`edge/src/runtime/mod.rs`): frames
//! out of a `FrameDecoder` go to `Core::route` then `Core::handle_frame`, a decode error
//! to `Core::reject_malformed`; after each operation every shard with pending records
//! commits and `Core::on_durable` runs; output is "written" (drained, then
//! `Core::on_writable`), and a connection marked closing is closed once flushed.
//!
//! Properties: nothing panics; every byte the server writes is a whole sequence of frames
//! that the wire decoder accepts, none larger than the frame limit negotiated with that
//! connection.
#![no_main]

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::OnceLock;

use futures_lite::future::block_on;
use libfuzzer_sys::fuzz_target;
use ring::signature::{Ed25519KeyPair, KeyPair};
use tern_edge::code_sender::CodeSender;
use tern_edge::core::{ConnId, ConnState, Core, CoreConfig, Placement};
use tern_engine::{ShardConfig, ShardHandle, SimStorage};
use tern_wire::messages::{
    Auth, CodeChannel, DeviceKeys, Hello, NewDevice, RequestCode, SignedPrekey, Verify,
};
use tern_wire::{
    decode_frame, encode_frame, FrameDecoder, FrameHeader, Message, MessageType, HELLO_MAGIC,
    PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};

const SHARDS: u32 = 3;
/// The frame limit the fuzzed clients announce in `Hello`.
const CLIENT_MAX_FRAME_BYTES: u32 = 256 * 1024;
/// Where the clock starts (ms since the epoch, any fixed day).
const START_MS: u64 = 1_750_000_000_000;
/// Operations per input, at most (bounds the time one input takes).
const OPERATIONS_MAX: usize = 64;

/// Codes the core "sent by SMS": (phone, code).
#[derive(Clone, Default)]
struct RecordingCodeSender(Rc<RefCell<Vec<(String, String)>>>);

impl CodeSender for RecordingCodeSender {
    fn send_code(&self, phone: &str, code: &str) {
        self.0.borrow_mut().push((phone.to_string(), code.to_string()));
    }
}

/// A device's public keys with valid signatures (the server checks them), made once.
fn new_device(seed: u8) -> NewDevice {
    static KEYS: OnceLock<Vec<NewDevice>> = OnceLock::new();
    let devices = KEYS.get_or_init(|| {
        (0..2u8)
            .map(|i| {
                let pair = Ed25519KeyPair::from_seed_unchecked(&[i + 1; 32]).expect("seed");
                let signing_key: [u8; 32] = pair.public_key().as_ref().try_into().expect("32");
                let prekey = |key_id: u64| {
                    let public_key = [key_id as u8 ^ 0x5a; 32];
                    let signed = SignedPrekey::signed_bytes(key_id, &public_key);
                    let signature = pair.sign(&signed).as_ref().try_into().expect("64");
                    SignedPrekey { key_id, public_key, signature }
                };
                NewDevice {
                    name: format!("fuzz-{i}"),
                    keys: DeviceKeys {
                        identity_key: [i + 7; 32],
                        signing_key,
                        fallback_key: prekey(1000),
                        one_time_keys: (1..=3).map(prekey).collect(),
                    },
                }
            })
            .collect()
    });
    devices[usize::from(seed) % devices.len()].clone()
}

fn hello_frame(out: &mut Vec<u8>) {
    let hello = Hello {
        magic: HELLO_MAGIC,
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        max_frame_bytes: CLIENT_MAX_FRAME_BYTES,
        client: "fuzz".to_string(),
    };
    encode_frame(out, 1, 0, &hello, u32::MAX).expect("Hello encodes");
}

/// What a slot's connection says right after connecting.
#[derive(Clone, Copy)]
enum Script {
    /// Nothing (the fuzzer must say Hello).
    Raw,
    /// Hello.
    Hello,
    /// Hello, then Auth as this user.
    Auth { user_id: u64, token: [u8; 32] },
}

struct Slot {
    conn: ConnId,
    decoder: FrameDecoder,
    script: Script,
}

struct Harness {
    core: Core<SimStorage>,
    codes: RecordingCodeSender,
    slots: Vec<Slot>,
    now_ms: u64,
    next_rid: u32,
}

impl Harness {
    fn new() -> Harness {
        let shards = (0..SHARDS)
            .map(|shard_id| {
                let mut config = ShardConfig::new(shard_id);
                // Small segments: rotation happens within one input.
                config.segment_bytes = 64 * 1024;
                let open = ShardHandle::open(SimStorage::new(512), config);
                Some(block_on(open).expect("an empty simulated disk opens"))
            })
            .collect();
        let config = CoreConfig {
            code_requests_per_hour: 100,
            code_requests_per_address_per_hour: 1000,
            ..CoreConfig::default()
        };
        let codes = RecordingCodeSender::default();
        let placement = Placement { index: 0, count: 1 };
        let core = Core::new(placement, shards, config, Box::new(codes.clone()));
        Harness { core, codes, slots: Vec::new(), now_ms: START_MS, next_rid: 100 }
    }

    /// Opens a connection and runs its script.
    fn connect(&mut self, script: Script) -> Slot {
        let conn = self.core.accept_connection(None);
        let decoder = FrameDecoder::new(self.core.max_frame_bytes(conn));
        let mut slot = Slot { conn, decoder, script };
        let mut bytes = Vec::new();
        if !matches!(script, Script::Raw) {
            hello_frame(&mut bytes);
        }
        if let Script::Auth { user_id, token } = script {
            let auth = Auth { user_id, device_id: 1, token };
            encode_frame(&mut bytes, 2, 0, &auth, u32::MAX).expect("Auth encodes");
        }
        self.feed(&mut slot, &bytes);
        slot
    }

    /// Registers a user from scratch and returns (user id, token).
    fn register(&mut self, phone: &str, device_seed: u8) -> (u64, [u8; 32]) {
        let mut slot = self.connect(Script::Hello);
        let request = RequestCode {
            phone: phone.to_string(),
            channel: CodeChannel::Sms,
            locale: "en".to_string(),
            proof_of_work: None,
        };
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, 3, 0, &request, u32::MAX).expect("RequestCode encodes");
        self.feed(&mut slot, &bytes);
        let code = self.codes.0.borrow().iter().rev().find(|(p, _)| p == phone).cloned();
        let (_, code) = code.expect("the core sent a code");
        let verify = Verify {
            phone: phone.to_string(),
            code,
            device: new_device(device_seed),
            registration_lock_pin: None,
        };
        bytes.clear();
        encode_frame(&mut bytes, 4, 0, &verify, u32::MAX).expect("Verify encodes");
        self.feed(&mut slot, &bytes);
        self.settle();
        let out = self.take_output(slot.conn);
        let mut registered = None;
        let mut rest = &out[..];
        while let Ok(Some((frame, used))) = decode_frame(rest, u32::MAX) {
            if let Message::Registered(r) = frame.message {
                registered = Some((r.user_id.to_native(), r.token));
            }
            rest = &rest[used..];
        }
        self.core.close_connection(slot.conn, self.now_ms);
        registered.expect("registration answered Registered")
    }

    /// What the runtime's `handle_frames` does with newly received bytes.
    fn feed(&mut self, slot: &mut Slot, bytes: &[u8]) {
        slot.decoder.feed(bytes);
        self.core.set_clock(self.now_ms * 1000);
        loop {
            slot.decoder.set_max_frame_bytes(self.core.max_frame_bytes(slot.conn));
            match slot.decoder.next_frame() {
                Ok(Some(frame)) => {
                    // One core: nothing is routed elsewhere.
                    assert_eq!(self.core.route(slot.conn, &frame.message), None);
                    self.core.handle_frame(slot.conn, &frame, self.now_ms);
                }
                Ok(None) => break,
                Err(error) => {
                    self.core.reject_malformed(slot.conn, error);
                    break;
                }
            }
        }
    }

    /// What the committer and the mesh do after a loop turn: commit every shard with
    /// pending records, release what became durable, loop back requests (one core).
    fn settle(&mut self) {
        for _ in 0..8 {
            let mut committed_any = false;
            for (_, shard) in self.core.owned_shards() {
                if shard.borrow().has_pending() {
                    committed_any = true;
                    let _ = block_on(shard.commit());
                }
            }
            self.core.set_clock(self.now_ms * 1000);
            self.core.on_durable(self.now_ms);
            for (core, batch) in self.core.take_outbox() {
                assert_eq!(core, 0, "one core: the mesh has no other destination");
                self.core.on_mesh(batch, self.now_ms);
            }
            let _ = self.core.take_pushes();
            if !committed_any && !self.core.has_outbox() {
                break;
            }
        }
    }

    /// Takes a connection's output as the socket would, checking every frame in it.
    fn take_output(&mut self, conn: ConnId) -> Vec<u8> {
        let mut all = Vec::new();
        // The driver writes, then tells the core, which may refill from the mailbox.
        for _ in 0..4 {
            let Some(c) = self.core.connection(conn) else { break };
            if c.outbound.is_empty() {
                break;
            }
            let max_frame_bytes = c.max_frame_bytes;
            let out = std::mem::take(&mut c.outbound);
            check_frames(&out, max_frame_bytes);
            all.extend_from_slice(&out);
            self.core.on_writable(conn, self.now_ms);
        }
        all
    }

    /// Flushes every slot; reconnects those whose connection closed.
    fn flush_all(&mut self) {
        for i in 0..self.slots.len() {
            let conn = self.slots[i].conn;
            self.take_output(conn);
            let closing = self.core.connection(conn).is_none_or(|c| c.closing);
            if closing {
                self.core.close_connection(conn, self.now_ms);
                let script = self.slots[i].script;
                self.slots[i] = self.connect(script);
                self.settle();
                self.take_output(self.slots[i].conn);
            }
        }
    }
}

/// Server output is whole frames, each valid and within the negotiated limit.
fn check_frames(mut out: &[u8], max_frame_bytes: u32) {
    while !out.is_empty() {
        match decode_frame(out, u32::MAX) {
            Ok(Some((frame, used))) => {
                assert!(
                    used as u64 <= u64::from(max_frame_bytes),
                    "{:?} frame of {used} bytes over the limit {max_frame_bytes}",
                    frame.header.message_type
                );
                out = &out[used..];
            }
            Ok(None) => panic!("the server wrote a partial frame ({} bytes)", out.len()),
            Err(error) => panic!("the server wrote an invalid frame: {error}"),
        }
    }
}

/// Stand-ins for the registered users' ids, which depend on the clock: an aligned
/// little-endian [`USER_A`] or [`USER_B`] in a typed payload is replaced with the real id,
/// so that seeds (and the fuzzer) can address the other user.
const USER_A: u64 = 0x5555_0000_0000_000a;
const USER_B: u64 = 0x5555_0000_0000_000b;

fn substitute_users(payload: &mut [u8], users: [u64; 2]) {
    for chunk in payload.chunks_exact_mut(8) {
        let value = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        if value == USER_A {
            chunk.copy_from_slice(&users[0].to_le_bytes());
        } else if value == USER_B {
            chunk.copy_from_slice(&users[1].to_le_bytes());
        }
    }
}

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

fuzz_target!(|data: &[u8]| {
    let mut harness = Harness::new();
    let (user_a, token_a) = harness.register("+15550000001", 0);
    let (user_b, token_b) = harness.register("+15550000002", 1);
    harness.codes.0.borrow_mut().clear();
    for script in [
        Script::Auth { user_id: user_a, token: token_a },
        Script::Auth { user_id: user_b, token: token_b },
        Script::Hello,
        Script::Raw,
    ] {
        let slot = harness.connect(script);
        harness.slots.push(slot);
    }
    harness.settle();
    harness.flush_all();
    for i in 0..2 {
        let conn = harness.slots[i].conn;
        let state = harness.core.connection(conn).map(|c| c.state);
        assert!(matches!(state, Some(ConnState::Authenticated { .. })), "setup: auth failed");
    }

    let mut input = Input(data);
    for _ in 0..OPERATIONS_MAX {
        let Some(op) = input.byte() else { break };
        let index = usize::from(op & 0x03);
        match op >> 2 & 0x07 {
            // A payload of a chosen type in a correct frame header.
            0..=3 => {
                let Some(selector) = input.u16() else { break };
                let Some(len) = input.byte() else { break };
                let payload = input.take(usize::from(len) * 2);
                let message_type = MessageType::ALL[usize::from(selector) % MessageType::ALL.len()];
                harness.next_rid += 1;
                let header = FrameHeader {
                    payload_len: payload.len() as u32,
                    message_type,
                    flags: 0,
                    request_id: harness.next_rid,
                };
                let mut bytes = header.to_bytes().to_vec();
                bytes.extend_from_slice(payload);
                substitute_users(&mut bytes[12..], [user_a, user_b]);
                let mut slot = harness.slots.remove(index);
                harness.feed(&mut slot, &bytes);
                harness.slots.insert(index, slot);
            }
            // Raw bytes (any framing, partial frames included).
            4 | 5 => {
                let Some(len) = input.byte() else { break };
                let bytes = input.take(usize::from(len)).to_vec();
                let mut slot = harness.slots.remove(index);
                harness.feed(&mut slot, &bytes);
                harness.slots.insert(index, slot);
            }
            // The socket closes.
            6 => {
                let conn = harness.slots[index].conn;
                harness.core.close_connection(conn, harness.now_ms);
                let script = harness.slots[index].script;
                harness.slots[index] = harness.connect(script);
            }
            // Time passes: up to ~18 hours, or a deadline's worth.
            _ => {
                let Some(seconds) = input.u16() else { break };
                harness.now_ms += u64::from(seconds) * 1000;
                if seconds % 7 == 0 {
                    let conn = harness.slots[index].conn;
                    harness.core.time_out(conn);
                }
            }
        }
        harness.settle();
        harness.flush_all();
    }
    harness.core.shut_down();
    harness.settle();
    harness.flush_all();
});
