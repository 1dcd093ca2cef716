//! The SDK when the network, the server or a sender is hostile (issue 20, items 10 to
//! 12), against a real `ternd` and, where the server itself must misbehave, raw devices
//! and relays that do what a malicious server could.
//!
//! - A device keeps the transport and trust root it registered with: reopening it
//!   without an endpoint is TLS with the same pinned certificate, and a plaintext or
//!   differently trusted endpoint is refused before a byte is sent (item 11).
//! - Receipts leak no activity: an envelope the device cannot decrypt is acknowledged
//!   without a delivered receipt, and with read receipts off none leaves the device, as a
//!   recorder between the SDK and the server sees (item 12).
//! - Device lists are signed by the primary (item 10): a companion linked behind the
//!   primary's back reads nothing until the primary signs it, then is announced; a relay
//!   playing a malicious server that swaps a device's signing key, or calls a device
//!   "extra" and then serves other keys for it, is caught by the pins; only the primary
//!   publishes the list, and bundles carry it as published; a joining group member takes
//!   the membership from signed changes and its admin, not from the server.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_client::connection::{Connection, Endpoint, OwnedFrame};
use tern_client::crypto::DeviceCrypto;
use tern_client::store::Store;
use tern_client::{
    Client, ClientError, Event, PendingLink, PendingRegistration, StoreSecret, Trust,
};
use tern_testkit::Server;
use tern_wire::messages::*;
use tern_wire::{EnvelopeContent, Message, MessageType};

const WAIT: Duration = Duration::from_secs(10);

fn secret() -> StoreSecret {
    StoreSecret::Passphrase("correct horse battery staple".into())
}

fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

async fn register_at(
    server: &mut Server,
    endpoint: &Endpoint,
    stores: &Path,
    name: &str,
    phone: &str,
) -> Client {
    let pending = PendingRegistration::request_code(endpoint, phone).await.unwrap();
    let code = server.code_for(phone);
    let path = stores.join(format!("{name}.db"));
    pending.verify(&code, name, &path, &secret()).await.unwrap()
}

async fn register(server: &mut Server, stores: &Path, name: &str, phone: &str) -> Client {
    let endpoint = Endpoint::tcp(server.addr.to_string());
    register_at(server, &endpoint, stores, name, phone).await
}

/// Reads events until `wanted` matches one; returns it and the events before it.
async fn until(client: &mut Client, wanted: impl Fn(&Event) -> bool) -> (Event, Vec<Event>) {
    let mut before = Vec::new();
    let found = tokio::time::timeout(WAIT, async {
        loop {
            let event = client.next_event().await.unwrap();
            if wanted(&event) {
                return event;
            }
            before.push(event);
        }
    });
    let event = found.await.unwrap_or_else(|_| panic!("{client:?}: no such event in time"));
    (event, before)
}

/// Acts as a registered device below the SDK (what a hostile sender can do): the
/// store's keys, a raw connection, logged in.
async fn raw_device(server: &Server, store: &Path) -> (Connection, DeviceCrypto) {
    let store = Store::open(store, &secret()).unwrap();
    let identity = store.identity().unwrap().unwrap();
    let crypto = store.device_crypto().unwrap().unwrap();
    let mut connection = Connection::open(&Endpoint::tcp(server.addr.to_string())).await.unwrap();
    let auth =
        Auth { user_id: identity.user_id, device_id: identity.device_id, token: identity.token };
    let id = connection.send(&auth).await.unwrap();
    let Message::AuthOk(_) = answer(&mut connection, id).await.frame().message else {
        panic!("not logged in")
    };
    (connection, crypto)
}

async fn answer(connection: &mut Connection, id: u32) -> OwnedFrame {
    let read = tokio::time::timeout(WAIT, async {
        loop {
            let frame = connection.next_frame().await.unwrap();
            if frame.frame().header.request_id == id && frame.frame().header.is_response() {
                return frame;
            }
        }
    });
    read.await.expect("an answer in time")
}

/// Sends one pairwise copy to `to`'s device 1; returns its server id.
async fn send_copy(raw: &mut Connection, to: u64, copy: (u64, E2eType, Vec<u8>)) -> u64 {
    let (client_message_id, e2e_type, ciphertext) = copy;
    let send = SendMessage {
        client_message_id,
        to: Conversation::User(to),
        kind: EnvelopeKind::Text,
        ttl_s: 0,
        copies: vec![DeviceCopy { user_id: to, device_id: 1, e2e_type, ciphertext }],
    };
    let id = raw.send(&send).await.unwrap();
    let reply = answer(raw, id).await;
    let Message::SendAck(ack) = reply.frame().message else { panic!("not sent") };
    ack.server_message_id.to_native()
}

/// The message ids of the delivered receipts `raw` gets, until one names `last`.
async fn delivered_receipts_until(raw: &mut Connection, last: u64) -> Vec<u64> {
    let mut named = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        while !named.contains(&last) {
            let frame = raw.next_frame().await.unwrap();
            let Message::Deliver(deliver) = frame.frame().message else { continue };
            let Ok(EnvelopeContent::Receipt(receipt)) = deliver.envelope.content() else {
                continue;
            };
            if receipt.kind == ArchivedReceiptKind::Delivered {
                named.extend(receipt.message_ids.iter().map(|id| id.to_native()));
            }
        }
    });
    read.await.expect("the delivered receipt in time");
    named
}

/// A hostile sender sends Bob a tampered ciphertext, then a genuine one. Bob's SDK
/// reports the first as undecryptable and acknowledges it with `DiscardAck`: the sender
/// gets a delivered receipt for the genuine message only (before: for both, so garbage
/// sent to anyone told whether their device was online).
#[tokio::test(flavor = "current_thread")]
async fn an_undecryptable_envelope_earns_no_delivered_receipt() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let mallory = register(&mut server, stores.path(), "mallory", "+15581201").await;
    let mut bob = register(&mut server, stores.path(), "bob", "+15581202").await;
    let bob_id = bob.user_id();
    drop(mallory);
    let (mut raw, crypto) = raw_device(&server, &stores.path().join("mallory.db")).await;
    let id = raw.send(&FetchBundles { user_id: bob_id, device_ids: vec![1] }).await.unwrap();
    let reply = answer(&mut raw, id).await;
    let Message::Bundles(bundles) = reply.frame().message else { panic!("no bundle") };
    let bundles: Bundles = rkyv::deserialize::<Bundles, rkyv::rancor::Failure>(bundles).unwrap();
    let mut session = crypto.outbound_session(bob_id, &bundles.devices[0]).unwrap();
    let (e2e_type, genuine) = session.encrypt(b"\x01genuine");
    let mut tampered = genuine.clone();
    *tampered.last_mut().unwrap() ^= 0x40;

    let probe = send_copy(&mut raw, bob_id, (1, e2e_type, tampered)).await;
    let real = send_copy(&mut raw, bob_id, (2, e2e_type, genuine)).await;
    let genuine = |e: &Event| matches!(e, Event::Message(m) if m.text == "genuine");
    let (_, before) = until(&mut bob, genuine).await;
    assert!(before.iter().any(|e| matches!(e, Event::Undecryptable { .. })), "{before:?}");
    let named = delivered_receipts_until(&mut raw, real).await;
    assert!(!named.contains(&probe), "the probe {probe} got a delivered receipt: {named:?}");
}

/// Every frame type the client sent through a recorder, in order.
fn frame_types(bytes: &[u8]) -> Vec<MessageType> {
    let mut decoder = tern_wire::FrameDecoder::new(tern_wire::ABSOLUTE_MAX_FRAME_BYTES);
    decoder.feed(bytes);
    let mut types = Vec::new();
    while let Some(frame) = decoder.next_frame().unwrap() {
        types.push(frame.header.message_type);
    }
    types
}

/// A TCP relay to `server` that records what the client sends.
async fn recording_relay(server: std::net::SocketAddr) -> (String, Arc<Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let recorded = sent.clone();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let upstream = tokio::net::TcpStream::connect(server).await.unwrap();
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = upstream.into_split();
        tokio::spawn(async move { tokio::io::copy(&mut server_read, &mut client_write).await });
        let mut buffer = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = client_read.read(&mut buffer).await {
            recorded.lock().unwrap().extend_from_slice(&buffer[..n]);
            if server_write.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    });
    (address, sent)
}

/// With read receipts off, `mark_read` sends nothing: a recorder between Bob's SDK and
/// the server sees his other requests but no `SendReceipt` (before: the SDK sent it and
/// relied on the server to drop it). The setting survives reopening the store.
#[tokio::test(flavor = "current_thread")]
async fn with_read_receipts_off_none_leaves_the_device() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let mut alice = register(&mut server, stores.path(), "alice", "+15581301").await;
    let mut bob = register(&mut server, stores.path(), "bob", "+15581302").await;
    let alice_id = alice.user_id();
    bob.set_read_receipts(false).await.unwrap();
    assert!(!bob.privacy().await.unwrap().read_receipts);
    drop(bob);

    let (relay, sent) = recording_relay(server.addr).await;
    let path = stores.path().join("bob.db");
    let mut bob = Client::open(&path, &secret(), Some(Endpoint::tcp(relay))).await.unwrap();
    assert!(!bob.read_receipts().unwrap());
    let hello = alice.send_text(bob.user_id(), "hello bob").await.unwrap();
    until(&mut bob, |e| matches!(e, Event::Message(m) if m.text == "hello bob")).await;
    bob.mark_read(alice_id, &[hello.server_id]).await.unwrap();
    // A request after it: everything before it has been written through the relay.
    bob.send_text(alice_id, "read it").await.unwrap();
    let types = frame_types(&sent.lock().unwrap());
    assert!(types.contains(&MessageType::SendMessage), "{types:?}");
    assert!(!types.contains(&MessageType::SendReceipt), "a read receipt left: {types:?}");
}

/// Registered over TLS with a pinned certificate, a device reconnects over TLS with that
/// certificate's bytes, even when opened without an endpoint (before: plain TCP to the
/// registration's address, so the token would have crossed in clear) or after the file
/// changed; an endpoint without TLS, or trusting something else, is refused.
#[tokio::test(flavor = "current_thread")]
async fn a_device_keeps_the_transport_and_trust_root_it_registered_with() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let certificate = stores.path().join("server.pem");
    std::fs::copy(server.data_dir.join("tls/dev-cert.pem"), &certificate).unwrap();
    let tls = Endpoint {
        tls: Some(Trust::Pinned(certificate.clone())),
        ..Endpoint::tcp(server.tls_addr.to_string())
    };
    let alice = register_at(&mut server, &tls, stores.path(), "alice", "+15581101").await;
    let bob = register(&mut server, stores.path(), "bob", "+15581102").await;
    let bob_id = bob.user_id();
    drop((alice, bob));
    // The pinned file is replaced: the device still trusts what it registered with.
    std::fs::write(&certificate, b"not a certificate").unwrap();

    let path = stores.path().join("alice.db");
    let mut alice = Client::open(&path, &secret(), None).await.unwrap();
    assert!(matches!(alice.endpoint().tls, Some(Trust::Certificate(_))), "{:?}", alice.endpoint());
    assert_eq!(alice.endpoint().address, server.tls_addr.to_string());
    alice.send_text(bob_id, "over tls").await.unwrap();
    drop(alice);

    let plain = Endpoint::tcp(server.addr.to_string());
    let web_pki = Endpoint { tls: Some(Trust::WebPki), ..tls.clone() };
    for endpoint in [plain, web_pki] {
        let refused = Client::open(&path, &secret(), Some(endpoint.clone())).await;
        let refused = refused.map(|_| ());
        assert!(
            matches!(refused, Err(ClientError::TransportChanged { .. })),
            "{endpoint:?}: {refused:?}"
        );
    }
}

/// A device linked to Bob's account without his primary's signature (here approved by a
/// raw connection with the primary's token, as a malicious server could add one) reads
/// nothing Alice sends: it gets an empty copy, and Alice is told it is unverified.
/// Once Bob's primary signs the list, Alice is told of the new device and the next
/// message reaches it. (Before: Alice encrypted to every device the server listed.)
#[tokio::test(flavor = "current_thread")]
async fn a_companion_the_primary_did_not_sign_reads_nothing() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let mut alice = register(&mut server, stores.path(), "alice", "+15581401").await;
    let bob = register(&mut server, stores.path(), "bob", "+15581402").await;
    let bob_id = bob.user_id();
    drop(bob);
    let endpoint = Endpoint::tcp(server.addr.to_string());
    let pending = PendingLink::request(&endpoint, "not bob's").await.unwrap();
    let (mut raw, _) = raw_device(&server, &stores.path().join("bob.db")).await;
    let id = raw.send(&LinkApprove { code: pending.code().into() }).await.unwrap();
    let Message::Done(_) = answer(&mut raw, id).await.frame().message else { panic!("approve") };
    drop(raw);
    let mut intruder = pending.wait(&stores.path().join("intruder.db"), &secret()).await.unwrap();
    assert_eq!((intruder.user_id(), intruder.device_id()), (bob_id, 2));

    alice.send_text(bob_id, "for bob only").await.unwrap();
    let got = |e: &Event| matches!(e, Event::Message(_) | Event::Undecryptable { .. });
    let (first, _) = until(&mut intruder, got).await;
    assert!(matches!(first, Event::Undecryptable { .. }), "the intruder read: {first:?}");
    let (unverified, _) = until(&mut alice, |e| matches!(e, Event::DeviceUnverified { .. })).await;
    assert_eq!(unverified, Event::DeviceUnverified { user_id: bob_id, device_id: 2 });
    let mut bob = Client::open(&stores.path().join("bob.db"), &secret(), None).await.unwrap();
    until(&mut bob, |e| matches!(e, Event::Message(m) if m.text == "for bob only")).await;

    // Bob's primary signs the list with device 2 in it: Alice is told, then it reads.
    bob.publish_device_list().await.unwrap();
    alice.refresh_devices(bob_id).await.unwrap();
    let (added, _) = until(&mut alice, |e| matches!(e, Event::DeviceAdded { .. })).await;
    assert_eq!(added, Event::DeviceAdded { user_id: bob_id, device_id: 2 });
    alice.send_text(bob_id, "now for both").await.unwrap();
    until(&mut intruder, |e| matches!(e, Event::Message(m) if m.text == "now for both")).await;
}

/// What the hostile relay does to the server's answers.
#[derive(Default)]
struct Tampering {
    /// Bundles of this user name the impostor's signing key (with the prekeys signed
    /// again by it), or, with `replace`, all of the impostor's keys.
    impostor: Option<(u64, bool)>,
    /// The next `SendAck` becomes a `StaleDevices` error naming this device extra.
    extra: Option<(u64, u32)>,
    /// Every `GroupInfo` lists this user as a member too.
    listener: Option<u64>,
}

/// A server's answer as the hostile relay rewrites it, or `None` to pass it on.
fn tamper(
    frame: &tern_wire::Frame<'_>,
    rules: &mut Tampering,
    impostor: &DeviceCrypto,
) -> Option<Vec<u8>> {
    let header = frame.header;
    let mut out = Vec::new();
    let max = tern_wire::ABSOLUTE_MAX_FRAME_BYTES;
    match frame.message {
        Message::Bundles(bundles) => {
            let (user, replace) = rules.impostor?;
            let mut bundles: Bundles =
                rkyv::deserialize::<Bundles, rkyv::rancor::Failure>(bundles).unwrap();
            if bundles.user_id != user {
                return None;
            }
            for bundle in &mut bundles.devices {
                impersonate(bundle, impostor, replace);
            }
            tern_wire::encode_frame(&mut out, header.request_id, header.flags, &bundles, max)
        }
        Message::SendAck(ack) => {
            let extra = rules.extra.take()?;
            let error = SendError {
                client_message_id: ack.client_message_id.to_native(),
                code: tern_wire::ErrorCode::StaleDevices as u16,
                retry_after_ms: 0,
                missing_devices: vec![],
                extra_devices: vec![extra],
                message: "that device is gone (it is not)".into(),
            };
            tern_wire::encode_frame(&mut out, header.request_id, header.flags, &error, max)
        }
        Message::GroupInfo(info) => {
            let listener = rules.listener?;
            let mut info: GroupInfo =
                rkyv::deserialize::<GroupInfo, rkyv::rancor::Failure>(info).unwrap();
            info.members.push(GroupMember { user_id: listener, admin: false, joined_ms: 0 });
            tern_wire::encode_frame(&mut out, header.request_id, header.flags, &info, max)
        }
        _ => return None,
    }
    .unwrap();
    Some(out)
}

/// The impostor's signing key in the bundle, with its prekeys signed again by it; with
/// `replace`, the impostor's identity and prekeys too.
fn impersonate(bundle: &mut DeviceBundle, impostor: &DeviceCrypto, replace: bool) {
    if replace {
        bundle.identity_key = impostor.identity_key();
        bundle.fallback_key = impostor.fallback_key();
        bundle.one_time_key = None;
    }
    bundle.signing_key = impostor.signing_key();
    let sign = |key: &mut SignedPrekey| {
        key.signature = impostor.sign(&SignedPrekey::signed_bytes(key.key_id, &key.public_key));
    };
    sign(&mut bundle.fallback_key);
    bundle.one_time_key.as_mut().map(sign);
}

/// A TCP relay to `server` that plays a malicious server: it rewrites answers as the
/// shared [`Tampering`] says.
async fn hostile_relay(server: std::net::SocketAddr) -> (String, Arc<Mutex<Tampering>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let rules = Arc::new(Mutex::new(Tampering::default()));
    let shared = rules.clone();
    tokio::spawn(async move {
        let impostor = DeviceCrypto::new();
        while let Ok((client, _)) = listener.accept().await {
            let upstream = tokio::net::TcpStream::connect(server).await.unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = upstream.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut client_read, &mut server_write).await });
            let mut decoder = tern_wire::FrameDecoder::new(tern_wire::ABSOLUTE_MAX_FRAME_BYTES);
            let mut buffer = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = server_read.read(&mut buffer).await {
                decoder.feed(&buffer[..n]);
                let mut out = Vec::new();
                while let Some(frame) = decoder.next_frame().unwrap() {
                    match tamper(&frame, &mut shared.lock().unwrap(), &impostor) {
                        Some(bytes) => out.extend_from_slice(&bytes),
                        None => {
                            out.extend_from_slice(&frame.header.to_bytes());
                            out.extend_from_slice(frame.payload);
                        }
                    }
                }
                if client_write.write_all(&out).await.is_err() {
                    break;
                }
            }
        }
    });
    (address, rules)
}

/// Alice talks to Bob through a relay that plays a malicious server. It swaps Bob's
/// signing key (his Curve25519 key unchanged): `pin` compares both keys, so Alice is
/// told (before: only the Curve25519 key was compared). Then it calls Bob's device
/// "extra" in a send error and serves someone else's keys for it: the pin was kept,
/// so the change is reported, not trusted as a new device (before: the pin was deleted
/// on the server's word and the impostor's keys pinned silently).
#[tokio::test(flavor = "current_thread")]
async fn pins_hold_both_keys_and_outlive_the_servers_word() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let alice = register(&mut server, stores.path(), "alice", "+15581501").await;
    let mut bob = register(&mut server, stores.path(), "bob", "+15581502").await;
    let bob_id = bob.user_id();
    drop(alice);
    let (relay, rules) = hostile_relay(server.addr).await;
    let path = stores.path().join("alice.db");
    let mut alice = Client::open(&path, &secret(), Some(Endpoint::tcp(relay))).await.unwrap();
    alice.send_text(bob_id, "hello").await.unwrap();
    until(&mut bob, |e| matches!(e, Event::Message(m) if m.text == "hello")).await;

    rules.lock().unwrap().impostor = Some((bob_id, false));
    alice.refresh_devices(bob_id).await.unwrap();
    let (changed, _) = until(&mut alice, |e| matches!(e, Event::IdentityChanged { .. })).await;
    assert_eq!(changed, Event::IdentityChanged { user_id: bob_id, device_id: 1 });

    let (impostor, extra) = (Some((bob_id, true)), Some((bob_id, 1)));
    *rules.lock().unwrap() = Tampering { impostor, extra, listener: None };
    let sent = alice.send_text(bob_id, "are you still you?").await;
    let (changed, _) = until(&mut alice, |e| matches!(e, Event::IdentityChanged { .. })).await;
    assert_eq!(changed, Event::IdentityChanged { user_id: bob_id, device_id: 1 }, "{sent:?}");
}

/// Carol is added to Alice's group through a relay that plays a malicious server and
/// lists Mallory as a member in every group answer. Carol's view comes only from the
/// signed change that added her and from Alice's own view, sent end to end encrypted:
/// Mallory is not in it, so Carol's group key never goes to him. (Before: a joiner took
/// the membership the server reported, Mallory included.)
#[tokio::test(flavor = "current_thread")]
async fn a_joining_member_takes_the_membership_only_from_signed_changes() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let mut alice = register(&mut server, stores.path(), "alice", "+15581601").await;
    let bob = register(&mut server, stores.path(), "bob", "+15581602").await;
    let carol = register(&mut server, stores.path(), "carol", "+15581603").await;
    let mallory = register(&mut server, stores.path(), "mallory", "+15581604").await;
    let (bob_id, carol_id, mallory_id) = (bob.user_id(), carol.user_id(), mallory.user_id());
    drop(carol);
    let (relay, rules) = hostile_relay(server.addr).await;
    rules.lock().unwrap().listener = Some(mallory_id);
    let path = stores.path().join("carol.db");
    let mut carol = Client::open(&path, &secret(), Some(Endpoint::tcp(relay))).await.unwrap();

    let group = alice.create_group("club", &[bob_id]).await.unwrap();
    alice.change_group(group, GroupChange::Add { members: vec![carol_id] }).await.unwrap();
    let named = tokio::time::timeout(WAIT, async {
        while carol.group(group).unwrap().is_none_or(|view| view.name != "club") {
            carol.next_event().await.unwrap();
        }
    });
    named.await.expect("Carol learns the group from Alice in time");
    let view = carol.group(group).unwrap().unwrap();
    let members: Vec<u64> = view.members.iter().map(|(m, _)| *m).collect();
    assert!(!members.contains(&mallory_id), "the server slipped in a listener: {view:?}");
    assert_eq!(members, vec![alice.user_id(), bob_id, carol_id], "{view:?}");
}

/// The server side of signed device lists: only the primary publishes one (a companion
/// gets `Forbidden`), at most 4 KiB (`TooLarge`), and every `Bundles` of the account
/// carries the bytes as published, unread. (Before: no such frame; bundles carried no
/// list.)
#[tokio::test(flavor = "current_thread")]
async fn only_the_primary_publishes_the_device_list_and_bundles_carry_it() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let alice = register(&mut server, stores.path(), "alice", "+15581701").await;
    let mut bob = register(&mut server, stores.path(), "bob", "+15581702").await;
    let bob_id = bob.user_id();
    let endpoint = Endpoint::tcp(server.addr.to_string());
    let pending = PendingLink::request(&endpoint, "laptop").await.unwrap();
    let code = pending.code().to_string();
    let laptop_db = stores.path().join("laptop.db");
    let secret = secret();
    let (approved, laptop) =
        tokio::join!(bob.approve_link(&code), pending.wait(&laptop_db, &secret));
    approved.unwrap();
    drop((alice, bob, laptop.unwrap()));

    let publish = |bytes: usize| PublishDeviceList { device_list: vec![7; bytes] };
    let refusal = |frame: &OwnedFrame| match frame.frame().message {
        Message::ErrorFrame(error) => tern_wire::ErrorCode::from_u16(error.code.to_native()),
        _ => None,
    };
    let (mut laptop, _) = raw_device(&server, &laptop_db).await;
    let id = laptop.send(&publish(100)).await.unwrap();
    let answered = answer(&mut laptop, id).await;
    assert_eq!(refusal(&answered), Some(tern_wire::ErrorCode::Forbidden));
    let (mut primary, _) = raw_device(&server, &stores.path().join("bob.db")).await;
    let id = primary.send(&publish(4097)).await.unwrap();
    let answered = answer(&mut primary, id).await;
    assert_eq!(refusal(&answered), Some(tern_wire::ErrorCode::TooLarge));
    let id = primary.send(&publish(4096)).await.unwrap();
    let Message::Done(_) = answer(&mut primary, id).await.frame().message else { panic!("done") };

    let (mut other, _) = raw_device(&server, &stores.path().join("alice.db")).await;
    let id = other.send(&FetchBundles { user_id: bob_id, device_ids: vec![2] }).await.unwrap();
    let reply = answer(&mut other, id).await;
    let Message::Bundles(bundles) = reply.frame().message else { panic!("no bundles") };
    assert_eq!(bundles.device_list.as_slice(), &[7u8; 4096][..]);
}

/// Bob links a laptop (his primary signs it). Alice's next text finds it: the send
/// stops before anything is encrypted to it, Alice's app gets `DeviceAdded` first, and
/// the text goes out by itself after that, the laptop included. (Before: the new device
/// got the text at once and no event said so.)
#[tokio::test(flavor = "current_thread")]
async fn a_new_device_is_announced_before_anything_is_encrypted_to_it() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let mut alice = register(&mut server, stores.path(), "alice", "+15581801").await;
    let mut bob = register(&mut server, stores.path(), "bob", "+15581802").await;
    let bob_id = bob.user_id();
    alice.send_text(bob_id, "hi bob").await.unwrap();
    until(&mut bob, |e| matches!(e, Event::Message(m) if m.text == "hi bob")).await;

    let endpoint = Endpoint::tcp(server.addr.to_string());
    let pending = PendingLink::request(&endpoint, "laptop").await.unwrap();
    let code = pending.code().to_string();
    let (laptop_db, secret) = (stores.path().join("laptop.db"), secret());
    let (approved, laptop) =
        tokio::join!(bob.approve_link(&code), pending.wait(&laptop_db, &secret));
    approved.unwrap();
    let mut laptop = laptop.unwrap();

    let waiting = alice.send_text(bob_id, "who is there?").await.unwrap();
    assert_eq!(waiting.status, tern_client::Status::Sending, "sent before the event");
    let is_sent = |e: &Event| matches!(e, Event::Sent(m) if m.client_id == waiting.client_id);
    let (_, before) = until(&mut alice, is_sent).await;
    let added = Event::DeviceAdded { user_id: bob_id, device_id: 2 };
    assert!(before.contains(&added), "{before:?}");
    until(&mut laptop, |e| matches!(e, Event::Message(m) if m.text == "who is there?")).await;
}
