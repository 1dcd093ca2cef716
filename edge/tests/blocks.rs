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
