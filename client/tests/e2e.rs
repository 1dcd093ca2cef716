//! The SDK against a real `ternd` (started by the test on loopback with a temporary data
//! directory): devices of two users talking end to end encrypted, what the server keeps,
//! tampered and replayed ciphertexts, one-time key exhaustion and refill, and a restart
//! from the SQLite store.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tern_client::connection::{Connection, Endpoint};
use tern_client::crypto::DeviceCrypto;
use tern_client::store::Store;
use tern_client::{
    Client, ClientError, Event, PendingLink, PendingRegistration, Status, StoreSecret,
};
use tern_testkit::Server;
use tern_wire::messages::*;
use tern_wire::Message;

const WAIT: Duration = Duration::from_secs(10);

fn secret() -> StoreSecret {
    StoreSecret::Passphrase("correct horse battery staple".into())
}

fn endpoint(server: &Server) -> Endpoint {
    Endpoint::tcp(server.addr.to_string())
}

fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

async fn register(server: &mut Server, stores: &Path, name: &str, phone: &str) -> Client {
    let pending = PendingRegistration::request_code(&endpoint(server), phone).await.unwrap();
    let code = server.code_for(phone);
    let path = stores.join(format!("{name}.db"));
    pending.verify(&code, name, &path, &secret()).await.unwrap()
}

async fn link(server: &Server, primary: &mut Client, stores: &Path, name: &str) -> Client {
    let pending = PendingLink::request(&endpoint(server), name).await.unwrap();
    let code = pending.code().to_string();
    let path = stores.join(format!("{name}.db"));
    let secret = secret();
    let (approved, linked) =
        tokio::join!(primary.approve_link(&code), pending.wait(&path, &secret));
    approved.unwrap();
    linked.unwrap()
}

/// Reads events until `wanted` matches one; returns it.
async fn until(client: &mut Client, wanted: impl Fn(&Event) -> bool) -> Event {
    tokio::time::timeout(WAIT, async {
        loop {
            let event = client.next_event().await.unwrap();
            if wanted(&event) {
                return event;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{client:?}: no such event in time"))
}

async fn message_with(client: &mut Client, text: &str) -> tern_client::StoredMessage {
    let text = text.to_string();
    match until(client, |e| matches!(e, Event::Message(m) if m.text == text)).await {
        Event::Message(message) => message,
        _ => unreachable_event(),
    }
}

fn unreachable_event() -> ! {
    panic!("matched just before")
}

#[tokio::test(flavor = "current_thread")]
async fn every_device_of_both_users_gets_each_message_and_the_receipts() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let mut alice1 = register(&mut server, stores.path(), "alice-phone", "+15580001").await;
    let mut alice2 = link(&server, &mut alice1, stores.path(), "alice-laptop").await;
    let mut bob1 = register(&mut server, stores.path(), "bob-phone", "+15580002").await;
    let mut bob2 = link(&server, &mut bob1, stores.path(), "bob-laptop").await;
    let (alice, bob) = (alice1.user_id(), bob1.user_id());
    assert_eq!((alice2.user_id(), alice2.device_id()), (alice, 2));

    let sent = alice1.send_text(bob, "hello bob").await.unwrap();
    assert_eq!(sent.status, Status::Sent);
    for device in [&mut bob1, &mut bob2] {
        let got = message_with(device, "hello bob").await;
        assert_eq!((got.sender, got.peer, got.outgoing), ((alice, 1), alice, false));
        assert_eq!(got.server_id, sent.server_id);
    }
    // Alice's other device has its own copy, as an outgoing message.
    let copy = message_with(&mut alice2, "hello bob").await;
    assert!(copy.outgoing);
    assert_eq!(copy.peer, bob);
    // Both of Alice's devices see the delivered tick.
    for device in [&mut alice1, &mut alice2] {
        let receipt = until(device, |e| matches!(e, Event::Receipt { .. })).await;
        let Event::Receipt { status, messages, .. } = receipt else { unreachable_event() };
        assert_eq!(status, Status::Delivered);
        assert_eq!(messages[0].server_id, sent.server_id);
    }

    // The other way, from Bob's second device; then read receipts.
    let reply = bob2.send_text(alice, "hi alice, from the laptop").await.unwrap();
    for device in [&mut alice1, &mut alice2, &mut bob1] {
        message_with(device, "hi alice, from the laptop").await;
    }
    alice1.mark_read(bob, &[reply.server_id]).await.unwrap();
    for device in [&mut bob1, &mut bob2] {
        let read =
            until(device, |e| matches!(e, Event::Receipt { status: Status::Read, .. })).await;
        let Event::Receipt { messages, .. } = read else { unreachable_event() };
        assert_eq!(messages[0].server_id, reply.server_id);
    }
    // Safety numbers agree on both sides (and are computed from the pinned keys).
    let from_alice = alice1.safety_number(bob).await.unwrap();
    let from_bob = bob1.safety_number(alice).await.unwrap();
    assert_eq!(from_alice, from_bob);
}

/// Every file under `dir`, read whole.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

#[tokio::test(flavor = "current_thread")]
async fn the_server_never_holds_the_plaintext() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let alice = register(&mut server, stores.path(), "alice", "+15580011").await;
    let bob = register(&mut server, stores.path(), "bob", "+15580012").await;
    let bob_id = bob.user_id();
    drop(bob); // Offline: the envelope waits in the server's log.

    // Everything Alice's client says to the server, and hears back, passes a recorder.
    let (proxy, traffic) = recording_proxy(server.addr).await;
    drop(alice);
    let mut alice =
        Client::open(&stores.path().join("alice.db"), &secret(), Some(Endpoint::tcp(proxy)))
            .await
            .unwrap();

    let mut random = [0u8; 16];
    getrandom::fill(&mut random).unwrap();
    let marker: String = random.iter().map(|b| format!("{b:02x}")).collect();
    alice.send_text(bob_id, &marker).await.unwrap();

    let utf16: Vec<u8> = marker.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
    let base64 = vodozemac::base64_encode(marker.as_bytes());
    let files = files_under(data.path());
    assert!(files.iter().any(|(p, _)| p.to_string_lossy().contains("seg")), "{files:?}");
    for (path, bytes) in &files {
        for needle in [marker.as_bytes(), &utf16, base64.as_bytes()] {
            let found = bytes.windows(needle.len()).any(|w| w == needle);
            assert!(!found, "{} holds the plaintext", path.display());
        }
    }
    let seen = traffic.lock().unwrap().clone();
    // At least the pre-key message (≥ 289 bytes for 32 characters) went through it.
    assert!(seen.len() > 400, "the recorder saw the session ({} bytes)", seen.len());
    for needle in [marker.as_bytes(), &utf16, base64.as_bytes()] {
        assert!(!seen.windows(needle.len()).any(|w| w == needle), "plaintext on the wire");
    }
    // And the message was really there, for Bob.
    let mut bob = Client::open(&stores.path().join("bob.db"), &secret(), None).await.unwrap();
    message_with(&mut bob, &marker).await;
}

/// A TCP relay to `server` that records every byte in both directions.
async fn recording_proxy(
    server: std::net::SocketAddr,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let traffic = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorded = traffic.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = tokio::net::TcpStream::connect(server).await.unwrap();
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = upstream.into_split();
            tokio::spawn(relay(client_read, server_write, recorded.clone()));
            tokio::spawn(relay(server_read, client_write, recorded.clone()));
        }
    });
    (address, traffic)
}

async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    recorded: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        recorded.lock().unwrap().extend_from_slice(&buffer[..n]);
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// Acts as a registered device below the SDK: its store, its keys, a raw connection.
async fn raw_device(server: &Server, store: &Path) -> (Connection, DeviceCrypto, u64) {
    let store = Store::open(store, &secret()).unwrap();
    let identity = store.identity().unwrap().unwrap();
    let crypto = store.device_crypto().unwrap().unwrap();
    let mut connection = Connection::open(&endpoint(server)).await.unwrap();
    let auth =
        Auth { user_id: identity.user_id, device_id: identity.device_id, token: identity.token };
    connection.send(&auth).await.unwrap();
    loop {
        let frame = connection.next_frame().await.unwrap();
        if let Message::AuthOk(_) = frame.frame().message {
            break;
        }
    }
    (connection, crypto, identity.user_id)
}

async fn answer(connection: &mut Connection, id: u32) -> tern_client::connection::OwnedFrame {
    loop {
        let frame = connection.next_frame().await.unwrap();
        if frame.frame().header.request_id == id && frame.frame().header.is_response() {
            return frame;
        }
    }
}

async fn fetch_bundle(connection: &mut Connection, user_id: u64) -> DeviceBundle {
    let id = connection.send(&FetchBundles { user_id, device_ids: vec![] }).await.unwrap();
    let reply = answer(connection, id).await;
    let Message::Bundles(bundles) = reply.frame().message else { panic!("no bundles") };
    let bundles: Bundles = rkyv::deserialize::<Bundles, rkyv::rancor::Failure>(bundles).unwrap();
    bundles.devices[0].clone()
}

#[tokio::test(flavor = "current_thread")]
async fn tampered_and_replayed_ciphertexts_are_refused() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let alice = register(&mut server, stores.path(), "alice", "+15580021").await;
    let mut bob = register(&mut server, stores.path(), "bob", "+15580022").await;
    drop(alice);
    let (mut raw, crypto, _) = raw_device(&server, &stores.path().join("alice.db")).await;
    let bundle = fetch_bundle(&mut raw, bob.user_id()).await;
    let mut session = crypto.outbound_session(bob.user_id(), &bundle).unwrap();
    let (e2e_type, genuine) = session.encrypt(b"\x01genuine");
    let mut tampered = genuine.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x40;
    let copy = |ciphertext: &[u8]| DeviceCopy {
        user_id: bob.user_id(),
        device_id: 1,
        e2e_type,
        ciphertext: ciphertext.to_vec(),
    };
    for (client_message_id, ciphertext) in [(1, &tampered), (2, &genuine), (3, &genuine)] {
        let send = SendMessage {
            client_message_id,
            to: Conversation::User(bob.user_id()),
            kind: EnvelopeKind::Text,
            ttl_s: 0,
            copies: vec![copy(ciphertext)],
        };
        let id = raw.send(&send).await.unwrap();
        let Message::SendAck(_) = answer(&mut raw, id).await.frame().message else { panic!() };
    }
    let first = until(&mut bob, |_| true).await;
    assert!(matches!(first, Event::Undecryptable { .. }), "{first:?}");
    let second = until(&mut bob, |_| true).await;
    assert!(matches!(&second, Event::Message(m) if m.text == "genuine"), "{second:?}");
    let third = until(&mut bob, |_| true).await;
    let Event::Undecryptable { reason, .. } = third else { panic!("replay accepted: {third:?}") };
    assert!(!reason.is_empty());
    assert_eq!(bob.search("genuine", 10).unwrap().len(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn keys_run_out_fall_back_and_are_refilled() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    // Both fetch budgets high, so that one requester can drain Bob's keys here.
    let budgets = ["--key-fetches-per-hour", "1000", "--one-time-key-fetches-per-hour", "1000"];
    let mut server = Server::start(data.path(), &budgets);
    let alice = register(&mut server, stores.path(), "alice", "+15580031").await;
    let bob = register(&mut server, stores.path(), "bob", "+15580032").await;
    let bob_id = bob.user_id();
    drop(bob);
    drop(alice);
    // Someone drains Bob's one-time keys while he is offline.
    let (mut raw, _, _) = raw_device(&server, &stores.path().join("alice.db")).await;
    let mut handed = 0;
    while fetch_bundle(&mut raw, bob_id).await.one_time_key.is_some() {
        handed += 1;
    }
    assert_eq!(handed, tern_client::crypto::ONE_TIME_KEY_STOCK);
    drop(raw);
    // A session on the fallback key still works.
    let mut alice = Client::open(&stores.path().join("alice.db"), &secret(), None).await.unwrap();
    alice.send_text(bob_id, "on the fallback key").await.unwrap();
    let mut bob = Client::open(&stores.path().join("bob.db"), &secret(), None).await.unwrap();
    let refilled = until(&mut bob, |e| matches!(e, Event::KeysRefilled(_))).await;
    assert_eq!(refilled, Event::KeysRefilled(tern_client::crypto::ONE_TIME_KEY_STOCK as u32));
    message_with(&mut bob, "on the fallback key").await;
    // The refill reached the server: a fetch gets a one-time key again.
    drop(alice);
    let (mut raw, _, _) = raw_device(&server, &stores.path().join("alice.db")).await;
    assert!(fetch_bundle(&mut raw, bob_id).await.one_time_key.is_some());
}

#[tokio::test(flavor = "current_thread")]
async fn a_restarted_client_continues_its_sessions_and_finds_old_messages() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let mut alice = register(&mut server, stores.path(), "alice", "+15580041").await;
    let mut bob = register(&mut server, stores.path(), "bob", "+15580042").await;
    let (alice_id, bob_id) = (alice.user_id(), bob.user_id());
    alice.send_text(bob_id, "the quick brown fox").await.unwrap();
    message_with(&mut bob, "the quick brown fox").await;
    bob.send_text(alice_id, "jumps over the lazy dog").await.unwrap();
    message_with(&mut alice, "jumps over the lazy dog").await;
    drop(alice);
    drop(bob);

    // A wrong passphrase does not open the store.
    let wrong = StoreSecret::Passphrase("wrong".into());
    let refused = Client::open(&stores.path().join("bob.db"), &wrong, None).await.unwrap_err();
    assert!(matches!(refused, ClientError::Store(tern_client::StoreError::WrongKey)), "{refused}");

    // A self-signed certificate is refused unless pinned.
    let untrusted = Endpoint {
        address: server.tls_addr.to_string(),
        tls: Some(tern_client::Trust::WebPki),
        websocket: false,
        allow_plaintext: false,
    };
    let refused = Client::open(&stores.path().join("alice.db"), &secret(), Some(untrusted)).await;
    assert!(matches!(refused, Err(ClientError::Io(_))), "{refused:?}");
    // Alice comes back over TLS 1.3, trusting exactly the server's development cert.
    let tls = Endpoint {
        address: server.tls_addr.to_string(),
        tls: Some(tern_client::Trust::Pinned(server.data_dir.join("tls/dev-cert.pem"))),
        websocket: false,
        allow_plaintext: false,
    };
    let mut alice =
        Client::open(&stores.path().join("alice.db"), &secret(), Some(tls)).await.unwrap();
    // Bob over WebSocket.
    let websocket = Endpoint { websocket: true, ..Endpoint::tcp(server.ws_addr.to_string()) };
    let mut bob =
        Client::open(&stores.path().join("bob.db"), &secret(), Some(websocket)).await.unwrap();
    alice.send_text(bob_id, "after the restart").await.unwrap();
    message_with(&mut bob, "after the restart").await;
    // Still the one session each way: no new pre-key exchange was needed.
    let bob_store = Store::open(&stores.path().join("bob.db"), &secret()).unwrap();
    assert_eq!(bob_store.sessions(alice_id, 1).unwrap().len(), 1);

    let found = bob.search("fox", 10).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].text, "the quick brown fox");
    let history = alice.history(bob_id, 10).unwrap();
    let texts: Vec<&str> = history.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["the quick brown fox", "jumps over the lazy dog", "after the restart"]);
    assert!(history[0].status >= Status::Delivered, "{:?}", history[0]);
}

#[tokio::test(flavor = "current_thread")]
async fn a_changed_identity_is_reported_and_a_new_session_follows() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let mut alice = register(&mut server, stores.path(), "alice", "+15580051").await;
    let mut bob = register(&mut server, stores.path(), "bob", "+15580052").await;
    let bob_id = bob.user_id();
    alice.send_text(bob_id, "before").await.unwrap();
    message_with(&mut bob, "before").await;
    let number_before = alice.safety_number(bob_id).await.unwrap();
    bob.set_registration_lock(Some("4321")).await.unwrap();
    drop(bob);
    // Bob reinstalls: the same number and account (his PIN proves it), a new device 1
    // with new keys.
    let pending = PendingRegistration::request_code(&endpoint(&server), "+15580052").await;
    let pending = pending.unwrap().with_pin("4321");
    let (code, path) = (server.code_for("+15580052"), stores.path().join("bob-again.db"));
    let mut bob = pending.verify(&code, "bob-again", &path, &secret()).await.unwrap();
    assert_eq!(bob.user_id(), bob_id);
    alice.refresh_devices(bob_id).await.unwrap();
    let changed = until(&mut alice, |e| matches!(e, Event::IdentityChanged { .. })).await;
    assert_eq!(changed, Event::IdentityChanged { user_id: bob_id, device_id: 1 });
    assert_ne!(alice.safety_number(bob_id).await.unwrap(), number_before);
    alice.send_text(bob_id, "after the reinstall").await.unwrap();
    message_with(&mut bob, "after the reinstall").await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_client_rides_out_a_server_restart_and_resends_what_was_not_acknowledged() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    // A fixed port, so that the restarted server is where the clients expect it.
    let listen = format!("127.0.0.1:{}", tern_testkit::free_port());
    let mut server = Server::start(data.path(), &["--listen", &listen]);
    let mut alice = register(&mut server, stores.path(), "alice", "+15580061").await;
    let bob = register(&mut server, stores.path(), "bob", "+15580062").await;
    let bob_id = bob.user_id();
    drop(bob);
    alice.send_text(bob_id, "one").await.unwrap();
    server.kill();

    // The server is gone: the send is queued, and the message waits in Alice's store.
    let queued = alice.send_text(bob_id, "two").await.unwrap();
    assert_eq!(queued.status, Status::Sending);
    assert_eq!(alice.history(bob_id, 10).unwrap()[1].status, Status::Sending);
    tern_testkit::wait_until_bindable(listen.parse().unwrap());
    let server = Server::start(data.path(), &["--listen", &listen]);
    alice.reconnect_with_backoff(50).await.unwrap();
    let history = alice.history(bob_id, 10).unwrap();
    assert_eq!(history[1].status, Status::Sent, "re-sent on reconnect: {history:?}");

    let mut bob = Client::open(&stores.path().join("bob.db"), &secret(), None).await.unwrap();
    assert_eq!(message_with(&mut bob, "one").await.text, "one");
    assert_eq!(message_with(&mut bob, "two").await.text, "two");
    drop(server);
}

#[tokio::test(flavor = "current_thread")]
async fn presence_deletions_and_a_full_mailbox_reach_the_app() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    // One sender may fill the whole mailbox here (by default only its share), so that
    // Alice alone reaches Bob's limit.
    let flags = ["--mailbox-max-messages", "20", "--mailbox-sender-share-percent", "100"];
    let mut server = Server::start(data.path(), &flags);
    let mut alice = register(&mut server, stores.path(), "alice", "+15580071").await;
    let mut bob = register(&mut server, stores.path(), "bob", "+15580072").await;
    let (alice_id, bob_id) = (alice.user_id(), bob.user_id());

    // Presence: Bob lets his contacts see him; Alice follows him.
    bob.set_contacts(&[alice_id]).await.unwrap();
    alice.follow_presence(&[bob_id]).await.unwrap();
    let online = until(&mut alice, |e| matches!(e, Event::Presence { .. })).await;
    assert!(matches!(online, Event::Presence { user_id, online: true, .. } if user_id == bob_id));

    // Deleted for everyone: it leaves Bob's history too.
    let oops = alice.send_text(bob_id, "oops, wrong chat").await.unwrap();
    message_with(&mut bob, "oops, wrong chat").await;
    alice.delete_for_everyone(bob_id, oops.server_id).await.unwrap();
    let deleted = until(&mut bob, |e| matches!(e, Event::Deleted { .. })).await;
    assert_eq!(deleted, Event::Deleted { sender: alice_id, server_id: oops.server_id });
    assert!(bob.history(alice_id, 10).unwrap().iter().all(|m| m.text != "oops, wrong chat"));
    assert!(alice.history(bob_id, 10).unwrap().is_empty());

    drop(bob);
    let offline = until(&mut alice, |e| matches!(e, Event::Presence { online: false, .. })).await;
    let Event::Presence { last_seen_ms, .. } = offline else { unreachable_event() };
    assert!(last_seen_ms > 0);

    // Over Bob's quota while he is away: the server takes no more (nothing it holds is
    // dropped); Alice's app keeps the rest waiting, to be sent again later.
    let mut statuses = Vec::new();
    for i in 0..40 {
        statuses.push(alice.send_text(bob_id, &format!("flood {i}")).await.unwrap().status);
    }
    let sent = statuses.iter().filter(|s| **s == Status::Sent).count();
    assert_eq!(sent, 20, "{statuses:?}");
    assert!(statuses[20..].iter().all(|s| *s == Status::Sending), "{statuses:?}");
    let mut bob = Client::open(&stores.path().join("bob.db"), &secret(), None).await.unwrap();
    for i in 0..20 {
        let event = until(&mut bob, |e| matches!(e, Event::Message(_) | Event::Dropped(_))).await;
        let Event::Message(message) = event else { panic!("{event:?}: nothing is dropped") };
        assert_eq!(message.text, format!("flood {i}"), "every acknowledged one, in order");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_group_talks_end_to_end_and_membership_bounds_who_can_read() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &["--cores", "2"]);
    let mut alice = register(&mut server, stores.path(), "alice", "+15580081").await;
    let mut bob = register(&mut server, stores.path(), "bob", "+15580082").await;
    let mut bob2 = link(&server, &mut bob, stores.path(), "bob-laptop").await;
    let mut carol = register(&mut server, stores.path(), "carol", "+15580083").await;
    let mut dave = register(&mut server, stores.path(), "dave", "+15580084").await;
    let (bob_id, carol_id, dave_id) = (bob.user_id(), carol.user_id(), dave.user_id());

    let group = alice.create_group("club", &[bob_id, carol_id]).await.unwrap();
    for member in [&mut bob, &mut bob2, &mut carol] {
        let changed = until(member, |e| matches!(e, Event::GroupChanged { .. })).await;
        assert_eq!(changed, Event::GroupChanged { group_id: group, epoch: 1 });
    }
    let first = alice.send_group_text(group, "hello club").await.unwrap();
    for member in [&mut bob, &mut bob2, &mut carol] {
        let got = message_with(member, "hello club").await;
        assert_eq!(got.server_id, first.server_id);
    }
    // Delivered by all three member devices.
    let deadline = std::time::Instant::now() + WAIT;
    while alice.receipts(first.server_id).unwrap().0.len() < 3 {
        assert!(std::time::Instant::now() < deadline, "receipts did not arrive");
        let _ = tokio::time::timeout(Duration::from_millis(100), alice.next_event()).await;
    }
    let (delivered, _) = alice.receipts(first.server_id).unwrap();
    assert!(delivered.contains(&(bob_id, 2)) && delivered.contains(&(carol_id, 1)));

    // Carol is removed: Alice's next message uses a new session Carol never gets.
    alice.change_group(group, GroupChange::Remove { members: vec![carol_id] }).await.unwrap();
    until(&mut carol, |e| matches!(e, Event::GroupChanged { epoch: 2, .. })).await;
    // Dave joins after the first message: he never gets it, nor its key.
    alice.change_group(group, GroupChange::Add { members: vec![dave_id] }).await.unwrap();
    until(&mut dave, |e| matches!(e, Event::GroupChanged { epoch: 3, .. })).await;
    let second = alice.send_group_text(group, "without carol").await.unwrap();
    for member in [&mut bob, &mut dave] {
        message_with(member, "without carol").await;
    }
    assert!(dave.group_history(group, 10).unwrap().iter().all(|m| m.text != "hello club"));
    // Bob replies; his key reaches Alice (and his other device) over Olm.
    bob.send_group_text(group, "bob here").await.unwrap();
    message_with(&mut alice, "bob here").await;
    message_with(&mut bob2, "bob here").await;
    // Nothing after her removal reached Carol.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let late = tokio::time::timeout(Duration::from_millis(300), carol.next_event()).await;
    assert!(
        !matches!(late, Ok(Ok(Event::Message(ref m))) if m.server_id >= second.server_id),
        "{late:?}"
    );
    let history: Vec<String> =
        bob.group_history(group, 10).unwrap().into_iter().map(|m| m.text).collect();
    assert_eq!(history, ["hello club", "without carol", "bob here"]);
    // Read receipts name who read.
    let from_alice = bob.group_history(group, 10).unwrap()[0].server_id;
    bob.mark_group_read(group, alice.user_id(), &[from_alice]).await.unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while alice.receipts(from_alice).unwrap().1.is_empty() {
        assert!(std::time::Instant::now() < deadline, "no read receipt");
        let _ = tokio::time::timeout(Duration::from_millis(100), alice.next_event()).await;
    }
    assert_eq!(alice.receipts(from_alice).unwrap().1, vec![(bob_id, 1)]);
    // Only admins change the group.
    let refused = bob.change_group(group, GroupChange::Rename { name: "mine".into() }).await;
    assert!(
        matches!(refused, Err(ClientError::Server { code: tern_client::ErrorCode::NotAdmin, .. })),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_replayed_group_message_is_refused() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let mut alice = register(&mut server, stores.path(), "alice", "+15580091").await;
    let mut bob = register(&mut server, stores.path(), "bob", "+15580092").await;
    let bob_id = bob.user_id();
    let group = alice.create_group("two", &[bob_id]).await.unwrap();
    until(&mut bob, |e| matches!(e, Event::GroupChanged { .. })).await;
    drop(alice);
    // Alice's device, below the SDK: its own Megolm session, its key sent to Bob over Olm,
    // then one genuine group message sent twice.
    let (mut raw, crypto, _) = raw_device(&server, &stores.path().join("alice.db")).await;
    let bundle = fetch_bundle(&mut raw, bob_id).await;
    let mut olm = crypto.outbound_session(bob_id, &bundle).unwrap();
    let mut sender = tern_client::crypto::GroupSender::new();
    let mut share = vec![3u8];
    share.extend_from_slice(&group.to_le_bytes());
    share.extend_from_slice(&sender.session_key());
    let (e2e_type, ciphertext) = olm.encrypt(&share);
    let control = SendMessage {
        client_message_id: 1,
        to: Conversation::User(bob_id),
        kind: EnvelopeKind::Control,
        ttl_s: 0,
        copies: vec![DeviceCopy { user_id: bob_id, device_id: 1, e2e_type, ciphertext }],
    };
    let id = raw.send(&control).await.unwrap();
    let Message::SendAck(_) = answer(&mut raw, id).await.frame().message else { panic!() };
    let megolm = sender.encrypt(b"\x01only once");
    for client_message_id in [2, 3] {
        let send = SendMessage {
            client_message_id,
            to: Conversation::Group(group),
            kind: EnvelopeKind::Text,
            ttl_s: 0,
            copies: vec![DeviceCopy {
                user_id: 0,
                device_id: 0,
                e2e_type: E2eType::Megolm,
                ciphertext: megolm.clone(),
            }],
        };
        let id = raw.send(&send).await.unwrap();
        let Message::SendAck(_) = answer(&mut raw, id).await.frame().message else { panic!() };
    }
    message_with(&mut bob, "only once").await;
    let replay =
        until(&mut bob, |e| matches!(e, Event::Undecryptable { .. } | Event::Message(_))).await;
    let Event::Undecryptable { reason, .. } = replay else { panic!("replay accepted: {replay:?}") };
    assert!(reason.contains("replayed"), "{reason}");
    assert_eq!(bob.group_history(group, 10).unwrap().len(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_file_travels_encrypted_and_arrives_byte_identical() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let mut alice = register(&mut server, stores.path(), "alice", "+15580101").await;
    let mut bob = register(&mut server, stores.path(), "bob", "+15580102").await;
    // 3 MiB of noise with a findable marker inside.
    let mut file = vec![0u8; 3 << 20];
    getrandom::fill(&mut file).unwrap();
    let marker = b"TERN-PLAINTEXT-MARKER-8c1f0e";
    file[1_000_000..1_000_000 + marker.len()].copy_from_slice(marker);
    let path = stores.path().join("holiday.bin");
    std::fs::write(&path, &file).unwrap();

    let sent = alice.send_file(bob.user_id(), &path).await.unwrap();
    assert!(sent.text.starts_with("📎 holiday.bin"), "{}", sent.text);
    let got = until(&mut bob, |e| matches!(e, Event::Message(_))).await;
    let Event::Message(message) = got else { unreachable_event() };
    assert_eq!(message.server_id, sent.server_id);
    let out = tempfile::tempdir().unwrap();
    let saved = bob.download(message.server_id, out.path()).await.unwrap();
    assert_eq!(saved.file_name().unwrap(), "holiday.bin");
    assert!(std::fs::read(&saved).unwrap() == file, "the file changed on the way");
    // Downloading it again never overwrites the first copy (or anything else there).
    std::fs::write(&saved, b"edited by bob").unwrap();
    let again = bob.download(message.server_id, out.path()).await.unwrap();
    assert_eq!(again.file_name().unwrap(), "holiday (2).bin");
    assert_eq!(std::fs::read(&saved).unwrap(), b"edited by bob");
    assert!(std::fs::read(&again).unwrap() == file);

    // The server holds the blob, never the plaintext.
    for (path, bytes) in files_under(data.path()) {
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker),
            "{} holds the plaintext",
            path.display()
        );
    }
    assert!(files_under(&data.path().join("media")).len() == 1, "one blob");
}

#[tokio::test(flavor = "current_thread")]
async fn a_new_device_gets_the_recent_history_from_the_primary() {
    let data = data_dir();
    let stores = data_dir();
    let mut server = Server::start(data.path(), &["--cores", "2"]);
    let mut alice = register(&mut server, stores.path(), "alice", "+15550700001").await;
    let mut bob = register(&mut server, stores.path(), "bob", "+15550700002").await;
    let bob_id = bob.user_id();
    for i in 0..4 {
        alice.send_text(bob_id, &format!("old {i}")).await.unwrap();
    }
    let reply = "a reply from bob";
    bob.send_text(alice.user_id(), reply).await.unwrap();
    message_with(&mut alice, reply).await;

    let mut laptop = link(&server, &mut alice, stores.path(), "alice-laptop").await;
    assert!(laptop.history(bob_id, 10).unwrap().is_empty(), "a new device starts empty");
    // The bundle holds the last 3 messages of the conversation; the laptop asks for it.
    let bundled = alice.send_history(laptop.device_id(), 3).await.unwrap();
    assert_eq!(bundled, 3);
    until(&mut laptop, |e| matches!(e, Event::HistoryOffered { from_device: 1 })).await;
    assert_eq!(laptop.import_history().await.unwrap(), 3);
    let texts: Vec<String> =
        laptop.history(bob_id, 10).unwrap().into_iter().map(|m| m.text).collect();
    assert_eq!(texts, vec!["old 2", "old 3", reply]);
    // Nothing is offered twice, and Bob (another user) was never offered it.
    assert!(laptop.import_history().await.is_err());
    alice.send_text(bob_id, "new").await.unwrap();
    let seen = until(&mut bob, |e| {
        assert!(!matches!(e, Event::HistoryOffered { .. }), "Bob was offered Alice's history");
        matches!(e, Event::Message(m) if m.text == "new")
    });
    seen.await;
}
