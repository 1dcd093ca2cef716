//! `ternd` on several cores: users homed on shards of different cores talk through the
//! channel mesh (sends, receipts, key hand-out, dedup, stale devices), connections are
//! handed to their home core whatever core accepted them, and a data directory written
//! with one core count is served whole with another.

mod common;

use common::*;
use tern_edge::routing::home_shard_of_phone;
use tern_wire::messages::*;
use tern_wire::*;

const SHARDS: u32 = 4; // What `Server::start` asks of a new data directory.

/// A phone number (from `base` up) whose account lands on a shard of `core` of `cores`.
fn phone_on_core(base: u64, core: u32, cores: u32) -> String {
    (base..)
        .map(|n| format!("+1555{n:07}"))
        .find(|phone| home_shard_of_phone(phone, SHARDS) % cores == core)
        .unwrap()
}

fn core_of(account: Account, cores: u32) -> u32 {
    ((account.user_id >> 48) as u32) % cores
}

/// The sum of a metric's samples (one per core) in a `/metrics` body.
fn metric_sum(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn two_cores_serve_users_homed_on_different_shards() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &["--cores", "2"]);
    let alice = register(&mut server, &phone_on_core(100, 0, 2), 3);
    let bob = register(&mut server, &phone_on_core(200, 1, 2), 3);
    assert_eq!((core_of(alice, 2), core_of(bob, 2)), (0, 1));

    // Several connections each: whichever core the kernel gives them, auth moves them
    // to their home core, and everything works from there.
    let mut a = login(&server, alice);
    let mut b = login(&server, bob);
    messages_and_receipts_cross_the_mesh(&mut a, &mut b, alice, bob);

    // A retry across cores is answered with the original id, not stored twice.
    let first = a.request(&text(bob, 500, b"once"));
    let first_id = first.access::<SendAck>().server_message_id.to_native();
    let retry = a.request(&text(bob, 500, b"once"));
    let retry = retry.access::<SendAck>();
    assert!(retry.duplicate);
    assert_eq!(retry.server_message_id.to_native(), first_id);
    let frame = b.next_of(MessageType::Deliver);
    assert_eq!(frame.deliver().envelope.body.as_slice(), b"once");
    b.send(&DeliveryAck { up_to_mailbox_seq: frame.deliver().mailbox_seq });

    // A stale device list is checked on the recipient's core.
    let mut stale = text(bob, 501, b"x");
    stale.copies[0].device_id = 7;
    let error = a.request(&stale);
    let error = error.access::<SendError>();
    assert_eq!(error.code.to_native(), ErrorCode::StaleDevices as u16);
    assert_eq!(error.missing_devices.len(), 1);
    assert_eq!(error.extra_devices.len(), 1);

    // One-time keys of a user on the other core: each handed out once, then the fallback.
    let mut handed = Vec::new();
    for _ in 0..4 {
        let reply = a.request(&FetchBundles { user_id: bob.user_id, device_ids: vec![] });
        let bundles = reply.access::<Bundles>();
        handed.push(bundles.devices[0].one_time_key.as_ref().map(|k| k.key_id.to_native()));
    }
    assert_eq!(handed, vec![Some(1), Some(2), Some(3), None]);
    // Bob's core tells him his stock ran low.
    let low = b.next_of(MessageType::KeysLow);
    assert!(low.access::<KeysLow>().one_time_keys_remaining.to_native() < 15);

    // Unknown users on the other core are a typed error, not a hang.
    let ghost = Account { user_id: bob.user_id + 1000, ..bob };
    let error = a.request(&text(ghost, 502, b"x"));
    assert_eq!(error.access::<SendError>().code.to_native(), ErrorCode::NotFound as u16);

    metrics_cover_both_cores(&server);
}

/// Alice (core 0) and Bob (core 1) exchange messages both ways: each is delivered in
/// order and acknowledged, and the delivered and read receipts cross back.
fn messages_and_receipts_cross_the_mesh(
    a: &mut Client,
    b: &mut Client,
    alice: Account,
    bob: Account,
) {
    for id in 1..=20u64 {
        let ack = a.request(&text(bob, id, format!("to bob {id}").as_bytes()));
        let ack = ack.access::<SendAck>();
        assert!(!ack.duplicate);
        let frame = b.next_of(MessageType::Deliver);
        let deliver = frame.deliver();
        assert_eq!(deliver.envelope.sender_user.to_native(), alice.user_id);
        assert_eq!(deliver.envelope.conversation_seq.to_native(), id);
        assert_eq!(deliver.envelope.body.as_slice(), format!("to bob {id}").as_bytes());
        b.send(&DeliveryAck { up_to_mailbox_seq: deliver.mailbox_seq });
        let receipt = a.next_of(MessageType::Deliver).receipt();
        assert_eq!(receipt.kind, ReceiptKind::Delivered);
        assert_eq!(receipt.message_ids, vec![ack.server_message_id.to_native()]);
    }
    // The other way, with a read receipt crossing back.
    let ack = b.request(&text(alice, 1, b"to alice"));
    let message_id = ack.access::<SendAck>().server_message_id.to_native();
    let frame = a.next_of(MessageType::Deliver);
    assert_eq!(frame.deliver().envelope.body.as_slice(), b"to alice");
    let done = a.request(&SendReceipt {
        kind: ReceiptKind::Read,
        to_user: bob.user_id,
        conversation: Conversation::User(bob.user_id),
        message_ids: vec![message_id],
    });
    done.access::<Done>();
    let read = b.next_of(MessageType::Deliver).receipt();
    assert_eq!((read.kind, read.message_ids), (ReceiptKind::Read, vec![message_id]));
}

/// `/metrics` covers both cores (core 1 pushes its figures every second) and the mesh.
fn metrics_cover_both_cores(server: &Server) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let (_, metrics) = server.admin_get("/metrics");
        let both_cores = metrics.contains("tern_connections{core=\"1\"}")
            && metrics.contains("tern_connections{core=\"0\"}");
        if both_cores && metric_sum(&metrics, "tern_messages_sent_total") >= 22 {
            assert!(metric_sum(&metrics, "tern_mesh_batches_sent_total") > 0, "{metrics}");
            assert!(metrics.contains("tern_commits_total{shard=\"1\",core=\"1\"}"), "{metrics}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "metrics never covered both cores");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn connections_move_to_their_home_core_over_tls_and_websocket() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &["--cores", "2"]);
    let alice = register(&mut server, &phone_on_core(300, 0, 2), 0);
    let bob = register(&mut server, &phone_on_core(400, 1, 2), 0);
    // Many connections so that both cores accept some of each kind and hand them over
    // with their TLS session and WebSocket state.
    for round in 0..6u64 {
        let mut a = authenticate(Client::connect_tls(&server), alice);
        let mut b = authenticate(Client::connect_ws(&server, round % 2 == 0), bob);
        a.request(&text(bob, 1000 + round, b"over the layers")).access::<SendAck>();
        let frame = b.next_of(MessageType::Deliver);
        assert_eq!(frame.deliver().envelope.body.as_slice(), b"over the layers");
        b.send(&DeliveryAck { up_to_mailbox_seq: frame.deliver().mailbox_seq });
        a.next_of(MessageType::Deliver).receipt();
    }
}

#[test]
fn a_restart_with_another_core_count_loses_nothing() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &["--cores", "2"]);
    let alice = register(&mut server, &phone_on_core(500, 0, 2), 5);
    let bob = register(&mut server, &phone_on_core(600, 1, 2), 5);
    let mut a = login(&server, alice);
    for id in 1..=5u64 {
        a.request(&text(bob, id, format!("queued {id}").as_bytes())).access::<SendAck>();
    }
    drop(a);
    server.kill();

    // One core now serves every shard: Bob's queue is whole and in order.
    let server = Server::start(dir.path(), &["--cores", "1"]);
    let mut b = login(&server, bob);
    for id in 1..=3u64 {
        let frame = b.next_of(MessageType::Deliver);
        assert_eq!(frame.deliver().envelope.body.as_slice(), format!("queued {id}").as_bytes());
        b.send(&DeliveryAck { up_to_mailbox_seq: frame.deliver().mailbox_seq });
    }
    drop(b);
    assert!(server.terminate().success());

    // Three cores (more than this machine may have): the rest is still there, and the
    // conversation sequence carries on.
    let server = Server::start(dir.path(), &["--cores", "3"]);
    let mut b = login(&server, bob);
    for id in 4..=5u64 {
        let frame = b.next_of(MessageType::Deliver);
        let deliver = frame.deliver();
        assert_eq!(deliver.envelope.body.as_slice(), format!("queued {id}").as_bytes());
        assert_eq!(deliver.envelope.conversation_seq.to_native(), id);
        b.send(&DeliveryAck { up_to_mailbox_seq: deliver.mailbox_seq });
    }
    let mut a = login(&server, alice);
    let ack = a.request(&text(bob, 6, b"after the moves"));
    assert!(!ack.access::<SendAck>().duplicate);
    let frame = b.next_of(MessageType::Deliver);
    assert_eq!(frame.deliver().envelope.conversation_seq.to_native(), 6);
    // Keys handed out before the moves stay handed out.
    let reply = a.request(&FetchBundles { user_id: bob.user_id, device_ids: vec![] });
    assert_eq!(
        reply.access::<Bundles>().devices[0].one_time_key.as_ref().unwrap().key_id.to_native(),
        1
    );
}

#[test]
fn frames_pipelined_behind_auth_follow_the_connection_to_its_core() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &["--cores", "2"]);
    let alice = register(&mut server, &phone_on_core(700, 0, 2), 0);
    let bob = register(&mut server, &phone_on_core(800, 1, 2), 0);
    let mut b = login(&server, bob);
    // Hello, Auth, Ping and a send in one write: whichever core accepts the connection,
    // the frames after Auth are handled in order on Alice's core.
    for round in 0..6u64 {
        let hello = Hello {
            magic: HELLO_MAGIC,
            version_min: 1,
            version_max: 1,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            client: "tern-test".into(),
        };
        let auth = Auth { user_id: alice.user_id, device_id: 1, token: alice.token };
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, 1, 0, &hello, DEFAULT_MAX_FRAME_BYTES).unwrap();
        encode_frame(&mut bytes, 2, 0, &auth, DEFAULT_MAX_FRAME_BYTES).unwrap();
        encode_frame(&mut bytes, 3, 0, &Ping { nonce: round }, DEFAULT_MAX_FRAME_BYTES).unwrap();
        let send = text(bob, 2000 + round, b"pipelined");
        encode_frame(&mut bytes, 4, 0, &send, DEFAULT_MAX_FRAME_BYTES).unwrap();
        let mut a = Client::connect_raw(server.addr);
        a.send_raw(&bytes);
        a.response(1).access::<Welcome>();
        a.response(2).access::<AuthOk>();
        assert_eq!(a.response(3).access::<Pong>().nonce.to_native(), round);
        assert!(!a.response(4).access::<SendAck>().duplicate);
        let frame = b.next_of(MessageType::Deliver);
        assert_eq!(frame.deliver().envelope.body.as_slice(), b"pipelined");
        b.send(&DeliveryAck { up_to_mailbox_seq: frame.deliver().mailbox_seq });
    }
}
