//! Groups against the real `ternd` on two cores: 256 members, one order for everyone,
//! receipts back to the sender, the 257th refused, admin rules, signatures, removed and
//! new members, the last admin leaving, retries.

mod common;

use common::*;
use rkyv::rancor::Failure;
use tern_wire::messages::*;
use tern_wire::*;

/// The next envelope of `kind` (acknowledging everything read on the way).
fn next_kind(client: &mut Client, kind: ArchivedEnvelopeKind) -> Received {
    loop {
        let frame = client.next_of(MessageType::Deliver);
        client.send(&DeliveryAck { up_to_mailbox_seq: frame.deliver().mailbox_seq });
        if frame.deliver().envelope.kind == kind {
            return frame;
        }
    }
}

fn updated(reply: &Received) -> u64 {
    reply.access::<GroupUpdated>().epoch.to_native()
}

#[test]
fn a_group_of_256_gets_every_message_in_one_order_with_receipts() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &["--cores", "2", "--shards", "4"]);
    let (admin, signer) = register_signing(&mut server, "+15640000");
    let others: Vec<Account> =
        (1..=255).map(|i| register(&mut server, &format!("+1564{i:07}"), 0)).collect();
    let cores: std::collections::BTreeSet<u64> =
        others.iter().map(|a| (a.user_id >> 48) % 2).collect();
    assert_eq!(cores.len(), 2, "members on both cores");
    let group_id = 0x5EED_0001;
    let mut a = login(&server, admin);
    let create = GroupChange::Create {
        name: "everyone".into(),
        members: others.iter().map(|a| a.user_id).collect(),
    };
    assert_eq!(updated(&a.request(&signed_update(&signer, admin, group_id, 0, create))), 1);
    // The 257th is refused, with a typed error.
    let extra = register(&mut server, "+15649999999", 0);
    let add = GroupChange::Add { members: vec![extra.user_id] };
    let full = a.request(&signed_update(&signer, admin, group_id, 1, add));
    assert_eq!(full.error_code(), Some(ErrorCode::GroupFull), "{}", full.describe());

    let mut members: Vec<Client> = others.iter().map(|m| login(&server, *m)).collect();
    let mut ids = Vec::new();
    for n in 0..3u64 {
        let ack = a.request(&group_text(group_id, n + 1, format!("megolm {n}").as_bytes()));
        ids.push(ack.access::<SendAck>().server_message_id.to_native());
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids are the group's order");
    for member in &mut members {
        let event = next_kind(member, ArchivedEnvelopeKind::GroupEvent);
        let EnvelopeContent::GroupEvent(body) = event.deliver().envelope.content().unwrap() else {
            panic!("not a group event")
        };
        assert_eq!(body.actor_user.to_native(), admin.user_id);
        let mut seen = Vec::new();
        for _ in 0..3 {
            let frame = next_kind(member, ArchivedEnvelopeKind::Text);
            let envelope = frame.deliver().envelope;
            assert!(
                matches!(envelope.conversation, ArchivedConversation::Group(g) if g == group_id)
            );
            assert_eq!(
                envelope.conversation_seq.to_native(),
                envelope.server_message_id.to_native()
            );
            seen.push(envelope.server_message_id.to_native());
        }
        assert_eq!(seen, ids, "the same order for every member");
    }
    // Every member device's delivery comes back to the sender, naming the group.
    let mut delivered: std::collections::HashMap<u64, std::collections::HashSet<u64>> =
        Default::default();
    while delivered.values().map(|s| s.len()).sum::<usize>() < 3 * 255 {
        let frame = next_kind(&mut a, ArchivedEnvelopeKind::Receipt);
        let EnvelopeContent::Receipt(receipt) = frame.deliver().envelope.content().unwrap() else {
            panic!("not a receipt")
        };
        let receipt = rkyv::deserialize::<ReceiptBody, Failure>(receipt).unwrap();
        assert_eq!(receipt.conversation, Conversation::Group(group_id));
        for id in receipt.message_ids {
            delivered.entry(id).or_default().insert(receipt.by_user);
        }
    }
    for id in &ids {
        assert_eq!(delivered[id].len(), 255, "message {id} delivered to every member");
    }
}

#[test]
fn only_admins_change_a_group_and_membership_bounds_what_is_received() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &["--cores", "2"]);
    let (alice, alice_key) = register_signing(&mut server, "+15650001");
    let (bob, bob_key) = register_signing(&mut server, "+15650002");
    let (carol, _) = register_signing(&mut server, "+15650003");
    let (dave, _) = register_signing(&mut server, "+15650004");
    let group_id = 0x5EED_0002;
    let mut a = login(&server, alice);
    let mut b = login(&server, bob);
    let mut c = login(&server, carol);
    let mut d = login(&server, dave);
    let create =
        GroupChange::Create { name: "club".into(), members: vec![bob.user_id, carol.user_id] };
    assert_eq!(updated(&a.request(&signed_update(&alice_key, alice, group_id, 0, create))), 1);

    // Bob is no admin; a change signed with someone else's key is refused too.
    let add_dave = GroupChange::Add { members: vec![dave.user_id] };
    let refused = b.request(&signed_update(&bob_key, bob, group_id, 1, add_dave.clone()));
    assert_eq!(refused.error_code(), Some(ErrorCode::NotAdmin));
    let forged = b.request(&signed_update(&alice_key, bob, group_id, 1, add_dave.clone()));
    assert_eq!(forged.error_code(), Some(ErrorCode::InvalidSignature));
    let stale = a.request(&signed_update(&alice_key, alice, group_id, 0, add_dave.clone()));
    assert_eq!(stale.error_code(), Some(ErrorCode::Conflict));
    // Dave, not a member, cannot write to it.
    let outsider = d.request(&group_text(group_id, 1, b"let me in"));
    assert_eq!(outsider.error_code(), Some(ErrorCode::Forbidden), "{}", outsider.describe());

    // Carol is removed: she hears of it, then nothing more.
    let remove = GroupChange::Remove { members: vec![carol.user_id] };
    assert_eq!(updated(&a.request(&signed_update(&alice_key, alice, group_id, 1, remove))), 2);
    next_kind(&mut c, ArchivedEnvelopeKind::GroupEvent); // Create.
    next_kind(&mut c, ArchivedEnvelopeKind::GroupEvent); // Remove.
    a.request(&group_text(group_id, 10, b"after carol")).access::<SendAck>();
    // Dave joins after that message.
    assert_eq!(updated(&a.request(&signed_update(&alice_key, alice, group_id, 2, add_dave))), 3);
    a.request(&group_text(group_id, 11, b"with dave")).access::<SendAck>();
    // A retry is answered with the original id.
    let first = a.request(&group_text(group_id, 11, b"with dave"));
    assert!(first.access::<SendAck>().duplicate);

    let texts = |client: &mut Client, count: usize| -> Vec<Vec<u8>> {
        (0..count)
            .map(|_| next_kind(client, ArchivedEnvelopeKind::Text).deliver().envelope.body.to_vec())
            .collect()
    };
    assert_eq!(texts(&mut b, 2), vec![b"after carol".to_vec(), b"with dave".to_vec()]);
    assert_eq!(texts(&mut d, 1), vec![b"with dave".to_vec()]);
    c.request(&Ping { nonce: 1 }).access::<Pong>();
    d.request(&Ping { nonce: 1 }).access::<Pong>();
    for client in [&mut c, &mut d] {
        let late = client.inbox_types();
        assert!(!late.contains(&MessageType::Deliver), "nothing outside membership: {late:?}");
    }

    // The last admin leaves: the longest member (Bob) takes over.
    let leave = GroupChange::Leave;
    assert_eq!(updated(&a.request(&signed_update(&alice_key, alice, group_id, 3, leave))), 4);
    let info = b.request(&GroupInfoRequest { group_id });
    let info = info.access::<GroupInfo>();
    assert_eq!(info.epoch.to_native(), 4);
    let admins: Vec<u64> =
        info.members.iter().filter(|m| m.admin).map(|m| m.user_id.to_native()).collect();
    assert_eq!(admins, vec![bob.user_id]);
    let gone = a.request(&GroupInfoRequest { group_id });
    assert_eq!(gone.error_code(), Some(ErrorCode::Forbidden));
}
