//! A scripted client of the simulated server, for tests that state one protocol rule:
//! send a request, let the world settle, look at what came back.
//!
//! It speaks the wire protocol as the SDK does (frames from `tern-wire`, prekeys and
//! group changes signed with a real Ed25519 key derived from the phone number, so runs
//! are reproducible), but holds no crypto state: ciphertexts are whatever the test
//! passes, which the server never looks into anyway.

use rkyv::rancor::Failure;
use tern_wire::messages::{
    ArchivedEnvelopeKind, Auth, AuthOk, CodeChannel, CodeSent, Conversation, DeviceCopy,
    DeviceKeys, E2eType, EnvelopeKind, GroupChange, GroupChangeSigned, GroupUpdate, Hello,
    NewDevice, ReceiptBody, Registered, RequestCode, SendMessage, SignedPrekey, Verify, Welcome,
};
use tern_wire::{
    encode_frame, Deliver, EnvelopeContent, ErrorCode, Message, MessageType, Payload,
    WireSerializer, DEFAULT_MAX_FRAME_BYTES, HELLO_MAGIC,
};

use super::world::{LinkId, Received, World};
use tern_wire::messages::{DeviceId, GroupId, Token, UserId};

impl Received {
    /// The payload as `T` (panics, naming the frame, if it is another type).
    pub fn access<T: Payload>(&self) -> &T::Archived
    where
        T::Archived:
            for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, Failure>>,
    {
        assert_eq!(self.header.message_type, T::TYPE, "unexpected frame: {}", self.describe());
        tern_wire::access::<T>(&self.payload).expect("the server's payload validates")
    }

    /// The `Deliver` this frame is (panics on any other frame).
    pub fn deliver(&self) -> Deliver<'_> {
        match Message::validate(self.header.message_type, &self.payload) {
            Ok(Message::Deliver(deliver)) => deliver,
            _ => panic!("expected Deliver, got {}", self.describe()),
        }
    }

    /// The receipt a `Deliver` carries (panics on anything else).
    pub fn receipt(&self) -> ReceiptBody {
        let deliver = self.deliver();
        match deliver.envelope.content() {
            Ok(EnvelopeContent::Receipt(body)) => {
                rkyv::deserialize::<ReceiptBody, Failure>(body).expect("a receipt deserializes")
            }
            _ => panic!("expected a receipt, got {:?}", deliver.envelope.kind),
        }
    }

    /// Whether this is a `Deliver` of an envelope of `kind`.
    pub fn is_delivery_of(&self, kind: ArchivedEnvelopeKind) -> bool {
        self.header.message_type == MessageType::Deliver && self.deliver().envelope.kind == kind
    }

    /// The error code of an `ErrorFrame` (or `None`).
    pub fn error_code(&self) -> Option<ErrorCode> {
        match Message::validate(self.header.message_type, &self.payload) {
            Ok(Message::ErrorFrame(e)) => ErrorCode::from_u16(e.code.to_native()),
            Ok(Message::SendError(e)) => ErrorCode::from_u16(e.code.to_native()),
            _ => None,
        }
    }

    /// The frame in a line, for failure messages.
    pub fn describe(&self) -> String {
        match Message::validate(self.header.message_type, &self.payload) {
            Ok(Message::ErrorFrame(e)) => format!(
                "ErrorFrame {:?}: {}",
                ErrorCode::from_u16(e.code.to_native()),
                e.message.as_str()
            ),
            Ok(Message::SendError(e)) => format!("SendError {}: {}", e.code, e.message.as_str()),
            Ok(m) => format!("{:?}", m.message_type()),
            Err(e) => format!("undecodable: {e}"),
        }
    }
}

/// Encodes `value` as a request frame with id `request_id`.
pub fn frame<T>(request_id: u32, value: &T) -> Vec<u8>
where
    T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
{
    let mut bytes = Vec::new();
    encode_frame(&mut bytes, request_id, 0, value, DEFAULT_MAX_FRAME_BYTES)
        .expect("a test frame encodes");
    bytes
}

/// One client connection and what it received.
#[derive(Debug)]
pub struct Peer {
    /// Its socket.
    pub link: LinkId,
    next_request_id: u32,
    /// Frames received and not taken yet.
    pub inbox: Vec<Received>,
}

/// How long [`Peer::request`] lets the clock run, a step at a time, while the server
/// paces the peer's reading: 5 simulated minutes at most.
const PACED_WAIT_STEP_MS: u64 = 100;
const PACED_WAIT_STEPS_MAX: u32 = 3000;

impl Peer {
    /// Connects and says `Hello`.
    pub fn connect(world: &mut World) -> Peer {
        let mut peer = Peer::connect_raw(world);
        let hello = Hello {
            magic: HELLO_MAGIC,
            version_min: 1,
            version_max: 1,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            client: "tern-sim".into(),
        };
        peer.request(world, &hello).access::<Welcome>();
        peer
    }

    /// Connects without a handshake.
    pub fn connect_raw(world: &mut World) -> Peer {
        Peer { link: world.connect(), next_request_id: 1, inbox: Vec::new() }
    }

    /// Sends `value` as a request; returns its id.
    pub fn send<T>(&mut self, world: &mut World, value: &T) -> u32
    where
        T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    {
        let id = self.next_request_id;
        self.next_request_id += 1;
        world.write(self.link, &frame(id, value));
        id
    }

    /// Takes what arrived into the inbox.
    pub fn collect(&mut self, world: &mut World) {
        self.inbox.extend(world.take_frames(self.link));
    }

    /// Sends `value`, lets the world settle, and returns the response.
    pub fn request<T>(&mut self, world: &mut World, value: &T) -> Received
    where
        T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    {
        let id = self.send(world, value);
        world.settle();
        // A client waits for its answer while the server paces its reading (it made
        // requests or drew refusals faster than its budgets allow): time passes.
        let mut answer = self.response(world, id);
        for _ in 0..PACED_WAIT_STEPS_MAX {
            if answer.is_some() || !world.reading_paused(self.link) {
                break;
            }
            world.advance(PACED_WAIT_STEP_MS);
            world.settle();
            answer = self.response(world, id);
        }
        answer.unwrap_or_else(|| {
            let inbox: Vec<String> = self.inbox.iter().map(Received::describe).collect();
            panic!("no response to request {id}; inbox: {inbox:?}")
        })
    }

    /// The response to request `id`, if it arrived.
    pub fn response(&mut self, world: &mut World, id: u32) -> Option<Received> {
        self.collect(world);
        let at = self
            .inbox
            .iter()
            .position(|r| r.header.request_id == id && r.header.is_response() && !is_push(r))?;
        Some(self.inbox.remove(at))
    }

    /// Settles the world and takes every received frame of type `ty`.
    pub fn take_all(&mut self, world: &mut World, ty: MessageType) -> Vec<Received> {
        world.settle();
        self.collect(world);
        let (taken, kept) = self.inbox.drain(..).partition(|r| r.header.message_type == ty);
        self.inbox = kept;
        taken
    }

    /// Settles the world and takes the first received frame of type `ty`, if any.
    pub fn next_of(&mut self, world: &mut World, ty: MessageType) -> Option<Received> {
        world.settle();
        self.collect(world);
        let at = self.inbox.iter().position(|r| r.header.message_type == ty)?;
        Some(self.inbox.remove(at))
    }
}

/// Whether the server pushed this frame rather than answering a request.
fn is_push(frame: &Received) -> bool {
    frame.header.message_type == MessageType::Deliver
}

/// A registered device and its credentials.
#[derive(Clone, Copy, Debug)]
pub struct Account {
    /// The user.
    pub user_id: UserId,
    /// The device.
    pub device_id: DeviceId,
    /// Its token.
    pub token: Token,
    /// The seed of its Ed25519 signing key.
    pub signing_seed: [u8; 32],
}

impl Account {
    /// The (user, device) pair.
    pub fn device(&self) -> (u64, u32) {
        (self.user_id, self.device_id)
    }
}

/// A signing key seed derived from `phone` (reproducible runs).
pub fn seed_of(phone: &str) -> [u8; 32] {
    let mut seed = [0x5e; 32];
    for (i, b) in phone.bytes().enumerate() {
        seed[i % 32] ^= b.rotate_left(i as u32);
    }
    seed
}

fn signer(seed: &[u8; 32]) -> ring::signature::Ed25519KeyPair {
    ring::signature::Ed25519KeyPair::from_seed_unchecked(seed).expect("a 32-byte seed")
}

/// Key material with `one_time` prekeys, signed as clients sign them.
pub fn keys(seed: &[u8; 32], one_time: u64) -> DeviceKeys {
    use ring::signature::KeyPair as _;
    let pair = signer(seed);
    let key = |key_id: u64| {
        let public_key = [key_id as u8; 32];
        let signed = SignedPrekey::signed_bytes(key_id, &public_key);
        let signature = pair.sign(&signed).as_ref().try_into().expect("64 bytes");
        SignedPrekey { key_id, public_key, signature }
    };
    DeviceKeys {
        identity_key: [seed[0]; 32],
        signing_key: pair.public_key().as_ref().try_into().expect("32 bytes"),
        fallback_key: key(1_000),
        one_time_keys: (1..=one_time).map(key).collect(),
    }
}

/// The `RequestCode` a client sends for `phone`.
pub fn request_code(phone: &str) -> RequestCode {
    RequestCode {
        phone: phone.into(),
        channel: CodeChannel::Sms,
        locale: "en".into(),
        proof_of_work: None,
    }
}

/// The `Verify` a client sends with `code`.
pub fn verify(phone: &str, code: String, one_time_keys: u64) -> Verify {
    let device = NewDevice { name: "sim phone".into(), keys: keys(&seed_of(phone), one_time_keys) };
    Verify { phone: phone.into(), code, device, registration_lock_pin: None }
}

/// Registers `phone` through the protocol (the code taken from the world's SMS log).
pub fn register(world: &mut World, phone: &str, one_time_keys: u64) -> Account {
    let mut peer = Peer::connect(world);
    peer.request(world, &request_code(phone)).access::<CodeSent>();
    let code = world.code_for(phone).expect("a code was sent");
    let reply = peer.request(world, &verify(phone, code, one_time_keys));
    let registered = reply.access::<Registered>();
    let account = Account {
        user_id: registered.user_id.to_native(),
        device_id: registered.device_id.to_native(),
        token: registered.token,
        signing_seed: seed_of(phone),
    };
    world.close(peer.link);
    account
}

/// The `Auth` of `account`.
pub fn auth(account: &Account) -> Auth {
    Auth { user_id: account.user_id, device_id: account.device_id, token: account.token }
}

/// Connects and authenticates as `account`.
pub fn login(world: &mut World, account: &Account) -> Peer {
    let mut peer = Peer::connect(world);
    let ok = peer.request(world, &auth(account));
    assert_eq!(ok.access::<AuthOk>().user_id.to_native(), account.user_id, "{}", ok.describe());
    peer
}

/// A text to `to`'s device.
pub fn text(to: &Account, client_message_id: u64, body: &[u8]) -> SendMessage {
    SendMessage {
        client_message_id,
        to: Conversation::User(to.user_id),
        kind: EnvelopeKind::Text,
        ttl_s: 0,
        copies: vec![DeviceCopy {
            user_id: to.user_id,
            device_id: to.device_id,
            e2e_type: E2eType::OlmMessage,
            ciphertext: body.to_vec(),
        }],
    }
}

/// A text to a group: one Megolm ciphertext for every member.
pub fn group_text(group_id: GroupId, client_message_id: u64, body: &[u8]) -> SendMessage {
    SendMessage {
        client_message_id,
        to: Conversation::Group(group_id),
        kind: EnvelopeKind::Text,
        ttl_s: 0,
        copies: vec![DeviceCopy {
            user_id: 0,
            device_id: 0,
            e2e_type: E2eType::Megolm,
            ciphertext: body.to_vec(),
        }],
    }
}

/// A group change signed by `actor` as a client signs it.
pub fn signed_update(
    actor: &Account,
    group_id: GroupId,
    base_epoch: u64,
    change: GroupChange,
) -> GroupUpdate {
    let signer_id = (actor.user_id, actor.device_id);
    let bytes = GroupChangeSigned::bytes(group_id, base_epoch, signer_id, &change)
        .expect("a group change encodes");
    let signature = signer(&actor.signing_seed).sign(&bytes).as_ref().try_into().expect("64 bytes");
    GroupUpdate { group_id, base_epoch, change, signature }
}
