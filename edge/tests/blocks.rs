//! Blocking against the real `ternd` on two cores: a blocked user's 1:1 messages, typing
//! and presence stop reaching the blocker (on the same core or another), the blocked user
//! cannot tell, unblocking restores them, and a shared group keeps working.

mod common;

use common::*;
use tern_edge::routing::home_shard_of_phone;
use tern_wire::messages::*;
use tern_wire::*;

fn phone_on_core(base: u64, core: u32) -> String {
    (base..)
        .map(|n| format!("+1566{n:07}"))
        .find(|p| home_shard_of_phone(p, 4) % 2 == core)
        .unwrap()
}

#[test]
fn a_block_stops_messages_typing_and_presence_but_not_groups() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &["--cores", "2"]);
    let (alice, alice_key) = register_signing(&mut server, &phone_on_core(100, 0));
    let bob = register(&mut server, &phone_on_core(200, 1), 0); // Another core.
    let carol = register(&mut server, &phone_on_core(300, 0), 0); // Alice's core.
    let mut a = login(&server, alice);
    let mut b = login(&server, bob);
    let mut c = login(&server, carol);
    let everyone = PrivacySettings {
        last_seen: Visibility::Everyone,
        online: Visibility::Everyone,
        display_name: Visibility::Everyone,
        about: Visibility::Everyone,
        avatar: Visibility::Everyone,
        read_receipts: true,
        group_adds: Visibility::Everyone,
    };
    a.request(&everyone).access::<Done>();
    b.request(&PresenceSubscribe { user_ids: vec![alice.user_id] }).access::<Done>();
    assert!(b.next_of(MessageType::PresenceEvent).access::<PresenceEvent>().online);

    for blocked in [bob.user_id, carol.user_id] {
        a.request(&Block { user_id: blocked }).access::<Done>();
    }
    // Bob's view of Alice goes dark.
    let hidden = b.next_of(MessageType::PresenceEvent);
    assert!(!hidden.access::<PresenceEvent>().online);
    // Their messages get a sent tick, as always, and never arrive.
    assert!(!b.request(&text(alice, 1, b"from bob")).access::<SendAck>().duplicate);
    assert!(!c.request(&text(alice, 1, b"from carol")).access::<SendAck>().duplicate);
    b.send(&Typing { conversation: Conversation::User(alice.user_id), active: true });
    b.request(&Ping { nonce: 1 }).access::<Pong>();

    // A shared group still works both ways.
    let group_id = 0x5EED_0BB5;
    let change = GroupChange::Create { name: "shared".into(), members: vec![bob.user_id] };
    a.request(&signed_update(&alice_key, alice, group_id, 0, change)).access::<GroupUpdated>();
    let group_message = group_text(group_id, 2, b"in the group");
    b.request(&group_message).access::<SendAck>();
    let first = a.next_of(MessageType::Deliver);
    assert_eq!(
        first.deliver().envelope.body.as_slice(),
        b"in the group",
        "1:1 messages were dropped"
    );
    a.send(&DeliveryAck { up_to_mailbox_seq: first.deliver().mailbox_seq });
    a.request(&Ping { nonce: 2 }).access::<Pong>();
    assert!(!a.inbox_types().contains(&MessageType::TypingEvent));

    // Unblocked: messages flow again.
    a.request(&Unblock { user_id: bob.user_id }).access::<Done>();
    b.request(&text(alice, 3, b"hello again")).access::<SendAck>();
    let again = a.next_of(MessageType::Deliver);
    assert_eq!(again.deliver().envelope.body.as_slice(), b"hello again");
}

/// Reads `client`'s frames up to the answer to a ping and returns the receipts among
/// them (as kind and message ids).
fn receipts_before_a_pong(client: &mut Client, nonce: u64) -> Vec<(ReceiptKind, Vec<u64>)> {
    client.request(&Ping { nonce }).access::<Pong>();
    let frames = std::mem::take(&mut client.inbox);
    let deliveries = frames.iter().filter(|f| f.header.message_type == MessageType::Deliver);
    deliveries
        .filter(|f| f.deliver().envelope.kind == ArchivedEnvelopeKind::Receipt)
        .map(|f| {
            let receipt = f.receipt();
            (receipt.kind, receipt.message_ids)
        })
        .collect()
}

/// Goal: receipts are messages too (hardening item 6): a blocked user's delivered and
/// read receipts never reach the blocker, on another core; before the fix here they
/// did, so a blocked user could still fill the blocker's mailbox. Method: Alice writes
/// to Bob, blocks him, and Bob acknowledges and reads it; nothing reaches Alice. The
/// control: unblocked, the same two receipts for a second message arrive.
#[test]
fn a_blocked_users_receipts_do_not_reach_the_blocker() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &["--cores", "2"]);
    let alice = register(&mut server, &phone_on_core(400, 0), 0);
    let bob = register(&mut server, &phone_on_core(500, 1), 0); // Another core.
    let (mut a, mut b) = (login(&server, alice), login(&server, bob));
    let mut exchange = |a: &mut Client, id: u64, nonce: u64| {
        let sent = a.request(&text(bob, id, b"hello")).access::<SendAck>().server_message_id;
        let sent = sent.to_native();
        let got = b.next_of(MessageType::Deliver);
        b.send(&DeliveryAck { up_to_mailbox_seq: got.deliver().mailbox_seq });
        let read = SendReceipt {
            kind: ReceiptKind::Read,
            to_user: alice.user_id,
            conversation: Conversation::User(alice.user_id),
            message_ids: vec![sent],
        };
        b.request(&read).access::<Done>();
        (sent, receipts_before_a_pong(a, nonce))
    };
    a.request(&Block { user_id: bob.user_id }).access::<Done>();
    let (_, while_blocked) = exchange(&mut a, 1, 1);
    assert_eq!(while_blocked, vec![], "receipts from a blocked user arrived");

    a.request(&Unblock { user_id: bob.user_id }).access::<Done>();
    let (sent, unblocked) = exchange(&mut a, 2, 2);
    let expected = vec![(ReceiptKind::Delivered, vec![sent]), (ReceiptKind::Read, vec![sent])];
    assert_eq!(unblocked, expected);
}
