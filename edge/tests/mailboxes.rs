//! What leaves a mailbox other than by delivery, against the real `ternd`: quotas (a full
//! mailbox drops its oldest envelopes, but never silently — the device finds a `Dropped`
//! notice in its sequence and each sender a `SentDropped` notice naming its lost
//! messages) and deletion for everyone (a deleted message never reaches a device that was
//! offline, across cores). Expiry is tested in the simulation, where the clock moves
//! without sleeping (`edge/src/sim/tests/rules.rs`).

mod common;

use common::*;
use rkyv::rancor::Failure;
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

fn sent_dropped(a: &mut Client) -> Vec<MessageId> {
    let frame = a.next_of(MessageType::Deliver);
    let deliver = frame.deliver();
    let EnvelopeContent::Notice(notice) = deliver.envelope.content().unwrap() else {
        panic!("expected a notice, got {:?}", deliver.envelope.kind)
    };
    let notice = rkyv::deserialize::<NoticeBody, Failure>(notice).unwrap();
    a.send(&DeliveryAck { up_to_mailbox_seq: deliver.mailbox_seq });
    match notice {
        NoticeBody::SentDropped { message_ids, .. } => message_ids,
        other => panic!("expected SentDropped, got {other:?}"),
    }
}

#[test]
fn a_full_mailbox_drops_the_oldest_and_tells_everyone() {
    let dir = data_dir();
    let args = ["--mailbox-max-messages", "50", "--mailbox-max-bytes", "40000"];
    let mut server = Server::start(dir.path(), &args);
    let alice = register(&mut server, "+15610001", 0);
    let bob = register(&mut server, "+15610002", 0);
    let carol = register(&mut server, "+15610003", 0);
    let mut a = login(&server, alice);

    // Over the message limit: 150 small messages to offline Bob.
    let mut ids = Vec::new();
    for id in 1..=150u64 {
        let body = if id == 150 { b"last".to_vec() } else { format!("m{id}").into_bytes() };
        let ack = a.request(&text(bob, id, &body));
        ids.push(ack.access::<SendAck>().server_message_id.to_native());
    }
    let mut b = login(&server, bob);
    let (texts, dropped) = drain(&mut b);
    assert!(texts.len() <= 50, "{} queued", texts.len());
    assert_eq!(texts.len() as u64 + dropped, 150, "every message delivered or announced");
    assert_eq!(texts.last().unwrap(), b"last", "the newest are kept");
    // Kept in order, and the kept ones are the newest.
    let first_kept = 150 - texts.len();
    let expected: Vec<Vec<u8>> =
        (first_kept + 1..150).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(&texts[..texts.len() - 1], &expected[..]);
    // Alice learns exactly which of hers were lost.
    let mut lost = Vec::new();
    while (lost.len() as u64) < dropped {
        lost.extend(sent_dropped(&mut a));
    }
    assert_eq!(lost, ids[..dropped as usize].to_vec());

    // Over the byte limit: 4,000-byte messages to offline Carol.
    for id in 1000..1020u64 {
        let body = if id == 1019 { b"last".to_vec() } else { vec![b'x'; 4000] };
        a.request(&text(carol, id, &body)).access::<SendAck>();
    }
    let mut c = login(&server, carol);
    let (texts, dropped) = drain(&mut c);
    let queued: usize = texts.iter().map(Vec::len).sum();
    assert!(queued <= 40_000, "{queued} bytes queued");
    assert!(dropped > 0);
    assert_eq!(texts.len() as u64 + dropped, 20);
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
