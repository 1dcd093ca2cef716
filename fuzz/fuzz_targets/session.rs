//! Fuzz target: the server's session handling, through the deterministic simulation of
//! the whole server (`tern_edge::sim`: two cores, four shards on the engine's simulated
//! disk, the mesh, the work pool and the sockets; no glommio executor).
//!
//! Setup (the same for every input): two users registered the way a client does, and
//! four connection slots: user A and user B (authenticated), one after `Hello` only, one
//! raw. The input is then a list of operations, each on one slot (the first byte
//! chooses): a payload of a chosen type in a well-formed frame header, raw bytes (any
//! framing), the socket closing (the slot reconnects with its setup), time passing, or
//! some of the server's pending events in the world's order. After each operation the
//! world settles; at the end the server stops cleanly.
//!
//! Properties: nothing panics (a core's invariant, the world's bookkeeping); every byte
//! the server writes decodes as whole frames (`World::take_frames` panics otherwise),
//! none larger than the frame limit the clients announced.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_edge::sim::peer::{auth, register};
use tern_edge::sim::{Account, Peer, SimConfig, World};
use tern_wire::{FrameHeader, MessageType, DEFAULT_MAX_FRAME_BYTES};

/// Operations per input, at most (bounds the time one input takes).
const OPERATIONS_MAX: usize = 64;

/// Placeholders for the two registered users' ids, replaced in fuzzed payloads so that
/// seeds (and the fuzzer) can address the other user.
const USER_A: u64 = 0x5555_0000_0000_000a;
const USER_B: u64 = 0x5555_0000_0000_000b;

#[derive(Clone, Copy)]
enum Script {
    Auth(Account),
    Hello,
    Raw,
}

fn connect(world: &mut World, script: Script) -> Peer {
    match script {
        Script::Auth(account) => {
            // Not asserted: the fuzzer may have revoked the token (unlink, deletion).
            let mut peer = Peer::connect(world);
            peer.send(world, &auth(&account));
            world.settle();
            peer
        }
        Script::Hello => Peer::connect(world),
        Script::Raw => Peer::connect_raw(world),
    }
}

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

/// Takes what each slot received, checking the frame limit.
fn drain(world: &mut World, slots: &[Peer]) {
    for slot in slots {
        for frame in world.take_frames(slot.link) {
            assert!(frame.header.frame_bytes() <= DEFAULT_MAX_FRAME_BYTES as usize);
        }
    }
}

fn framed(message_type: MessageType, request_id: u32, payload: &[u8], users: [u64; 2]) -> Vec<u8> {
    let header =
        FrameHeader { payload_len: payload.len() as u32, message_type, flags: 0, request_id };
    let mut bytes = header.to_bytes().to_vec();
    bytes.extend_from_slice(payload);
    substitute_users(&mut bytes[12..], users);
    bytes
}

fuzz_target!(|data: &[u8]| {
    let mut world = World::new(SimConfig::default(), 0);
    let a = register(&mut world, "+15550000001", 2);
    let b = register(&mut world, "+15550000002", 2);
    let users = [a.user_id, b.user_id];
    let scripts = [Script::Auth(a), Script::Auth(b), Script::Hello, Script::Raw];
    let mut slots: Vec<Peer> = scripts.iter().map(|s| connect(&mut world, *s)).collect();
    let mut input = Input(data);
    let mut request_id = 1_000;
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
                request_id += 1;
                let bytes = framed(message_type, request_id, payload, users);
                world.write(slots[index].link, &bytes);
            }
            // Raw bytes (any framing, partial frames included).
            4 => {
                let Some(len) = input.byte() else { break };
                let bytes = input.take(usize::from(len)).to_vec();
                world.write(slots[index].link, &bytes);
            }
            // Some of the server's events only, in the world's order (a partial settle).
            5 => {
                let Some(count) = input.byte() else { break };
                for _ in 0..count {
                    world.step();
                }
                drain(&mut world, &slots);
                continue;
            }
            // The socket closes; the slot connects again.
            6 => {
                world.close(slots[index].link);
                world.settle();
                slots[index] = connect(&mut world, scripts[index]);
            }
            // Time passes: up to ~18 hours.
            _ => {
                let Some(seconds) = input.u16() else { break };
                world.advance(u64::from(seconds) * 1000);
            }
        }
        world.settle();
        drain(&mut world, &slots);
        for (i, slot) in slots.iter_mut().enumerate() {
            if !world.is_open(slot.link) {
                *slot = connect(&mut world, scripts[i]);
            }
        }
    }
    world.shut_down();
    world.settle();
    drain(&mut world, &slots);
});
