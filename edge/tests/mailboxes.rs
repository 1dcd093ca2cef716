//! What leaves a mailbox other than by delivery, against the real `ternd`: quotas (a full
//! mailbox refuses others' messages and drops nothing for them; only its owner's own
//! copies make room, never silently — the device finds a `Dropped` notice in its
//! sequence) and deletion for everyone (a deleted message never reaches a device that was
//! offline, across cores). Expiry is tested in the simulation, where the clock moves
//! without sleeping (`edge/src/sim/tests/rules.rs`).

mod common;

use common::*;
use tern_wire::messages::*;
use tern_wire::*;

/// Reads Bob's whole backlog: (client message texts in order, dropped counts).
fn drain(b: &mut Client) -> (Vec<Vec<u8>>, u64) {
    let (mut texts, mut dropped) = (Vec::new(), 0);
    loop {
        let frame = b.next_of(MessageType::Deliver);
        let deliver = frame.deliver();
        match deliver.envelope.kind {
            ArchivedEnvelopeKind::Text => texts.push(deliver.envelope.body.to_vec()),
            ArchivedEnvelopeKind::Notice => match deliver.envelope.content().unwrap() {
                EnvelopeContent::Notice(ArchivedNoticeBody::Dropped { count }) => {
                    dropped += count.to_native()
                }
                other => panic!("unexpected notice {other:?}"),
            },
            _ => {}
        }
        b.send(&DeliveryAck { up_to_mailbox_seq: deliver.mailbox_seq });
        if deliver.envelope.body.as_slice() == b"last" {
            return (texts, dropped);
        }
    }
}

/// Sends `count` texts from `a` to `to`; returns how many were acknowledged (the rest
/// must be refused with `QuotaExceeded`).
fn send_until_full(a: &mut Client, to: Account, ids: std::ops::Range<u64>, size: usize) -> u64 {
    let mut acked = 0;
    for id in ids {
        let reply = a.request(&text(to, id, &vec![b'x'; size]));
        match reply.error_code() {
            None => acked += u64::from(reply.access::<SendAck>().client_message_id == id),
            Some(code) => assert_eq!(code, ErrorCode::QuotaExceeded, "{}", reply.describe()),
        }
    }
    acked
}

/// Goal: a full mailbox takes nothing more from others, and nothing acknowledged is lost
/// (hardening, found by the abuse run: drop-the-oldest lost honest messages to a flood
/// from many accounts); only its owner's own copies make room, announced. Method: over
/// the message limit (50) and over the byte limit (40,000) Alice's sends are refused
/// with `QuotaExceeded` and Bob and Carol get every acknowledged one; Alice's laptop,
/// away, gets 60 of her own notes: all acknowledged, the oldest dropped with a
/// `Dropped` notice.
#[test]
fn a_full_mailbox_refuses_more_and_only_own_copies_make_room() {
    let dir = data_dir();
    let limits = ["--mailbox-max-messages", "50", "--mailbox-max-bytes", "40000"];
    let share = ["--mailbox-sender-share-percent", "100", "--stranger-sends-per-second", "1000"];
    let args = [limits.as_slice(), &share].concat();
    let mut server = Server::start(dir.path(), &args);
    let alice = register(&mut server, "+15610001", 0);
    let bob = register(&mut server, "+15610002", 0);
    let carol = register(&mut server, "+15610003", 0);
    let mut a = login(&server, alice);

    let to_bob = send_until_full(&mut a, bob, 1..61, 10);
    assert_eq!(to_bob, 50);
    let to_carol = send_until_full(&mut a, carol, 1000..1020, 4000);
    assert!((5..=10).contains(&to_carol), "{to_carol} of 4,000 bytes under 40,000");
    for (who, acked) in [(bob, to_bob), (carol, to_carol)] {
        let mut r = login(&server, who);
        for _ in 0..acked {
            let frame = r.next_of(MessageType::Deliver);
            let kind = &frame.deliver().envelope.kind;
            assert_eq!(*kind, ArchivedEnvelopeKind::Text, "nothing dropped, no notice");
        }
    }

    // Alice's own laptop makes room for her notes to herself (a device that never comes
    // back must not stop her sending).
    let laptop = link(&server, &mut a, alice.user_id);
    for id in 2000..2060u64 {
        let body = if id == 2059 { b"last".to_vec() } else { format!("n{id}").into_bytes() };
        a.request(&text(laptop, id, &body)).access::<SendAck>();
    }
    let mut l = login(&server, laptop);
    let (texts, dropped) = drain(&mut l);
    assert!(texts.len() <= 50 && dropped > 0, "{} kept, {dropped} dropped", texts.len());
    assert_eq!(texts.len() as u64 + dropped, 60, "every note delivered or announced");
    let (_, metrics) = server.admin_get("/metrics");
    assert!(metrics.contains("tern_mailbox_dropped_total"), "{metrics}");
}

#[test]
fn a_message_deleted_for_everyone_never_reaches_an_offline_device() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &["--cores", "2"]);
    let on_core = |base: u64, core: u32| -> String {
        (base..)
            .map(|n| format!("+1563{n:07}"))
            .find(|p| tern_edge::routing::home_shard_of_phone(p, 4) % 2 == core)
            .unwrap()
    };
    let alice = register(&mut server, &on_core(100, 0), 0);
    let bob = register(&mut server, &on_core(200, 1), 0);
    let carol = register(&mut server, &on_core(300, 1), 0);
    let mut a = login(&server, alice);
    let mut ids = Vec::new();
    for (id, body) in [(1u64, "keep 1"), (2, "delete me"), (3, "keep 2")] {
        let ack = a.request(&text(bob, id, body.as_bytes()));
        ids.push(ack.access::<SendAck>().server_message_id.to_native());
    }
    a.request(&DeleteForEveryone { peer: bob.user_id, message_ids: vec![ids[1]] }).access::<Done>();
    // Someone else's message cannot be deleted by Carol.
    let mut c = login(&server, carol);
    c.request(&DeleteForEveryone { peer: bob.user_id, message_ids: vec![ids[0]] }).access::<Done>();
    let mut b = login(&server, bob);
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let frame = b.next_of(MessageType::Deliver);
        bodies.push(frame.deliver().envelope.body.to_vec());
        b.send(&DeliveryAck { up_to_mailbox_seq: frame.deliver().mailbox_seq });
    }
    assert_eq!(bodies, vec![b"keep 1".to_vec(), b"keep 2".to_vec()]);
    b.request(&Ping { nonce: 1 }).access::<Pong>();
    assert!(!b.inbox_types().contains(&MessageType::Deliver), "{:?}", b.inbox_types());
}
