//! The edge's protocol rules, each stated once against the simulated server: in
//! process, on two cores and four shards, with the clock moved by hand (no sleeping for
//! a TTL or a code's expiry) and the interleaving chosen by the seed. The binary-level
//! tests in `edge/tests/` keep what needs the runtime: sockets, transports, signals.

use tern_wire::messages::{
    ArchivedNoticeBody, Block, CodeSent, Conversation, DeliveryAck, Done, ErrorFrame, GroupChange,
    GroupInfo, GroupInfoRequest, GroupUpdated, Ping, Pong, PresenceEvent, PresenceSubscribe,
    ProfileGet, ReceiptKind, Registered, Report, ReportReason, SendAck, SendReceipt, SetContacts,
};
use tern_wire::messages::{Bundles, FetchBundles, Profile, ProfileSet, Visibility};
use tern_wire::{EnvelopeContent, ErrorCode, MessageType};

use crate::core::config::CoreConfig;
use crate::sim::peer::{self, group_text, login, register, signed_update, text, Peer};
use crate::sim::{Event, Received, SimConfig, World};

fn world_with(core: CoreConfig) -> World {
    World::new(SimConfig { core, ..SimConfig::default() }, 1)
}

fn world() -> World {
    world_with(CoreConfig::default())
}

/// The texts and the dropped count a device is handed, acknowledging as it goes.
fn drain(world: &mut World, peer: &mut Peer) -> (Vec<Vec<u8>>, u64) {
    let (mut texts, mut dropped) = (Vec::new(), 0);
    loop {
        let frames = peer.take_all(world, MessageType::Deliver);
        if frames.is_empty() {
            return (texts, dropped);
        }
        for frame in frames {
            let deliver = frame.deliver();
            match deliver.envelope.content() {
                Ok(EnvelopeContent::Ciphertext(body)) => texts.push(body.to_vec()),
                Ok(EnvelopeContent::Notice(ArchivedNoticeBody::Dropped { count })) => {
                    dropped += count.to_native()
                }
                _ => {}
            }
            peer.send(world, &DeliveryAck { up_to_mailbox_seq: deliver.mailbox_seq });
        }
    }
}

#[test]
fn registration_takes_the_code_once_and_only_before_it_expires() {
    let mut world = world();
    let ttl_ms = CoreConfig::default().code_ttl_ms;
    let mut c = Peer::connect(&mut world);
    let phone = "+15550061";
    c.request(&mut world, &peer::request_code(phone)).access::<CodeSent>();
    let wrong = c.request(&mut world, &peer::verify(phone, "000000x".into(), 0));
    assert_eq!(wrong.error_code(), Some(ErrorCode::InvalidCode), "{}", wrong.describe());
    // The clock passes the code's lifetime: the right code no longer works.
    world.advance(ttl_ms + 1);
    let mut c = Peer::connect(&mut world);
    let code = world.code_for(phone).unwrap();
    let late = c.request(&mut world, &peer::verify(phone, code, 0));
    assert!(late.error_code().is_some(), "an expired code registered: {}", late.describe());
    // A fresh code registers a new account, once.
    c.request(&mut world, &peer::request_code(phone)).access::<CodeSent>();
    let code = world.code_for(phone).unwrap();
    let first = c.request(&mut world, &peer::verify(phone, code.clone(), 0));
    assert!(first.access::<Registered>().new_account);
    let again = c.request(&mut world, &peer::verify(phone, code, 0));
    assert!(again.error_code().is_some(), "a code was used twice: {}", again.describe());
}

/// A second code request for a number (a stranger's, say) sends the pending code again
/// instead of replacing it: the code its owner already holds keeps working. (Before the
/// fix, every request drew a new code, so anyone could void the owner's.)
#[test]
fn a_pending_code_is_sent_again_not_replaced() {
    let mut world = world();
    let phone = "+15550062";
    let mut owner = Peer::connect(&mut world);
    owner.request(&mut world, &peer::request_code(phone)).access::<CodeSent>();
    drop(owner);
    let code = world.code_for(phone).unwrap();
    world.advance(60_000);
    let mut stranger = Peer::connect(&mut world);
    let again = stranger.request(&mut world, &peer::request_code(phone));
    let left_s = u64::from(again.access::<CodeSent>().expires_in_s.to_native());
    assert_eq!(left_s, CoreConfig::default().code_ttl_ms / 1000 - 60, "the expiry stays");
    assert_eq!(world.code_for(phone).unwrap(), code, "the second request drew another code");
    let mut owner = Peer::connect(&mut world); // Later, from another connection.
    let registered = owner.request(&mut world, &peer::verify(phone, code, 0));
    assert!(registered.access::<Registered>().new_account, "{}", registered.describe());
}

/// A device's costly requests have budgets (hardening item 4): profile lookups come in
/// a burst of 100, then 2 a second; the 101st at once is `RateLimited` with the wait,
/// and after the wait one more goes through. Before the fix there was no limit.
#[test]
fn costly_requests_have_a_budget_per_device() {
    let mut world = world();
    let alice = register(&mut world, "+15550071", 0);
    let bob = register(&mut world, "+15550072", 0);
    let mut a = login(&mut world, &alice);
    let lookup = ProfileGet { user_id: bob.user_id };
    for _ in 0..100 {
        let answer = a.request(&mut world, &lookup);
        assert_ne!(answer.error_code(), Some(ErrorCode::RateLimited), "{}", answer.describe());
    }
    let refused = a.request(&mut world, &lookup);
    assert_eq!(refused.error_code(), Some(ErrorCode::RateLimited), "{}", refused.describe());
    let retry_after_ms = refused.access::<ErrorFrame>().retry_after_ms.to_native();
    assert_eq!(retry_after_ms, 500, "{}", refused.describe());
    world.advance(u64::from(retry_after_ms));
    let again = a.request(&mut world, &lookup);
    assert_ne!(again.error_code(), Some(ErrorCode::RateLimited), "{}", again.describe());
}

/// Per-account quotas (hardening item 5): a contact list over 5,000, a report naming
/// over 100 messages and a 10,001st blocked user are refused with `QuotaExceeded`, and
/// nothing of them is stored; at the limit each passes. Before the fix each was stored.
#[test]
fn account_quotas_refuse_what_is_over_them() {
    let mut world = world();
    let alice = register(&mut world, "+15550081", 0);
    let mut a = login(&mut world, &alice);
    let over = |answer: Received| {
        assert_eq!(answer.error_code(), Some(ErrorCode::QuotaExceeded), "{}", answer.describe());
    };
    let contacts = |n: u64| SetContacts { user_ids: (1..=n).collect() };
    over(a.request(&mut world, &contacts(5_001)));
    a.request(&mut world, &contacts(5_000)).access::<Done>();
    let report = |n: u64| Report {
        user_id: 1 << 48,
        message_ids: (1..=n).collect(),
        reason: ReportReason::Spam,
        comment: String::new(),
    };
    over(a.request(&mut world, &report(101)));
    a.request(&mut world, &report(100)).access::<Done>();
    for user_id in 1..=10_000 {
        a.send(&mut world, &Block { user_id });
    }
    world.settle();
    over(a.request(&mut world, &Block { user_id: 10_001 }));
    // Blocking someone already blocked adds nobody: still allowed at the limit.
    a.request(&mut world, &Block { user_id: 10_000 }).access::<Done>();
}

/// User ids say nothing of when or in which order accounts were made (hardening item
/// 8): below the shard's 16 bits they are random, so they cannot be enumerated by
/// counting. Before the fix they were the shard's time-ordered message ids, increasing
/// with every registration.
#[test]
fn user_ids_are_not_in_registration_order() {
    let mut world = world();
    let low_bits: Vec<u64> = (0..8)
        .map(|i| register(&mut world, &format!("+1555009{i:04}"), 0).user_id & ((1 << 48) - 1))
        .collect();
    assert!(low_bits.windows(2).any(|w| w[0] > w[1]), "ids in registration order: {low_bits:?}");
    assert!(low_bits.iter().all(|b| *b != 0));
}

#[test]
fn the_sent_tick_waits_for_the_disk_then_delivered_and_read_follow() {
    let mut world = world();
    let alice = register(&mut world, "+15550001", 0);
    let bob = register(&mut world, "+15550002", 0);
    let mut a = login(&mut world, &alice);
    let mut b = login(&mut world, &bob);
    let id = a.send(&mut world, &text(&bob, 1, b"hello bob"));
    // Everything but a commit: the message is not durable, so no tick and no delivery.
    world.settle_only(|e| !matches!(e, Event::Commit(_)));
    assert!(a.response(&mut world, id).is_none(), "a sent tick before the commit");
    b.collect(&mut world);
    let deliveries = b.inbox.iter().filter(|f| f.header.message_type == MessageType::Deliver);
    let early: Vec<String> = deliveries.map(Received::describe).collect();
    assert!(early.is_empty(), "delivered before the commit: {early:?}");
    world.settle();
    let ack = a.response(&mut world, id).expect("the sent tick after the commit");
    let message_id = ack.access::<SendAck>().server_message_id.to_native();
    let frame = b.next_of(&mut world, MessageType::Deliver).expect("Bob gets it");
    assert_eq!(frame.deliver().envelope.body.as_slice(), b"hello bob");
    b.send(&mut world, &DeliveryAck { up_to_mailbox_seq: frame.deliver().mailbox_seq });
    let receipt = a.next_of(&mut world, MessageType::Deliver).expect("a receipt").receipt();
    assert_eq!((receipt.kind, receipt.message_ids), (ReceiptKind::Delivered, vec![message_id]));
    let read = SendReceipt {
        kind: ReceiptKind::Read,
        to_user: alice.user_id,
        conversation: Conversation::User(alice.user_id),
        message_ids: vec![message_id],
    };
    b.request(&mut world, &read).access::<Done>();
    let receipt = a.next_of(&mut world, MessageType::Deliver).expect("a receipt").receipt();
    assert_eq!(receipt.kind, ReceiptKind::Read);
}

#[test]
fn a_read_receipt_goes_only_to_who_wrote_to_the_reader() {
    let mut world = world();
    let alice = register(&mut world, "+15550013", 0);
    let stranger = register(&mut world, "+15550014", 0);
    let mut a = login(&mut world, &alice);
    let mut s = login(&mut world, &stranger);
    let read = SendReceipt {
        kind: ReceiptKind::Read,
        to_user: alice.user_id,
        conversation: Conversation::User(stranger.user_id),
        message_ids: vec![1, 2, 3],
    };
    let refused = s.request(&mut world, &read);
    assert_eq!(refused.error_code(), Some(ErrorCode::Forbidden), "{}", refused.describe());
    let mut many = read.clone();
    many.message_ids = (1..=257).collect();
    let refused = s.request(&mut world, &many);
    assert_eq!(refused.error_code(), Some(ErrorCode::TooLarge), "{}", refused.describe());
    assert!(a.take_all(&mut world, MessageType::Deliver).is_empty(), "no receipt reached Alice");
    // Once Alice wrote to the stranger, its receipts reach her.
    a.request(&mut world, &text(&stranger, 1, b"hi")).access::<SendAck>();
    let frame = s.next_of(&mut world, MessageType::Deliver).expect("the stranger gets it");
    s.send(&mut world, &DeliveryAck { up_to_mailbox_seq: frame.deliver().mailbox_seq });
    s.request(&mut world, &read).access::<Done>();
    let kinds: Vec<_> =
        a.take_all(&mut world, MessageType::Deliver).iter().map(|f| f.receipt().kind).collect();
    assert_eq!(kinds, vec![ReceiptKind::Delivered, ReceiptKind::Read]);
}

#[test]
fn a_retried_send_is_stored_once() {
    let mut world = world();
    let alice = register(&mut world, "+15550011", 0);
    let bob = register(&mut world, "+15550012", 0);
    let mut a = login(&mut world, &alice);
    let first = a.request(&mut world, &text(&bob, 7, b"once"));
    let again = a.request(&mut world, &text(&bob, 7, b"once"));
    let (first, again) = (first.access::<SendAck>(), again.access::<SendAck>());
    assert!(!first.duplicate && again.duplicate);
    assert_eq!(first.server_message_id, again.server_message_id, "the same stored message");
    let mut b = login(&mut world, &bob);
    assert_eq!(drain(&mut world, &mut b).0, vec![b"once".to_vec()]);
}

#[test]
fn a_full_mailbox_refuses_more_and_loses_nothing() {
    // One sender may fill the whole mailbox here (no share), to reach its limit alone.
    let core = CoreConfig {
        mailbox_max_messages: 5,
        mailbox_sender_share_percent: 100,
        ..CoreConfig::default()
    };
    let mut world = world_with(core);
    let alice = register(&mut world, "+15550021", 0);
    let bob = register(&mut world, "+15550022", 0);
    let mut a = login(&mut world, &alice);
    let mut refused = 0;
    for id in 1..=12u64 {
        let reply = a.request(&mut world, &text(&bob, id, format!("m{id}").as_bytes()));
        match reply.error_code() {
            None => drop(reply.access::<SendAck>()),
            Some(code) => {
                assert_eq!(code, ErrorCode::QuotaExceeded, "{}", reply.describe());
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 7, "five fit; the rest are refused, not stored");
    let mut b = login(&mut world, &bob);
    let (texts, dropped) = drain(&mut world, &mut b);
    let kept: Vec<Vec<u8>> = (1..=5).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!((texts, dropped), (kept, 0), "every acknowledged message, nothing dropped");
    assert!(a
        .take_all(&mut world, MessageType::Deliver)
        .iter()
        .all(|f| f.deliver().envelope.kind != tern_wire::messages::ArchivedEnvelopeKind::Notice));
    // Read, the mailbox takes messages again.
    a.request(&mut world, &text(&bob, 13, b"again")).access::<SendAck>();
}

#[test]
fn one_sender_fills_only_its_share_of_a_mailbox() {
    let core = CoreConfig { mailbox_max_messages: 10, ..CoreConfig::default() };
    let mut world = world_with(core);
    let friend = register(&mut world, "+15550024", 0);
    let flooder = register(&mut world, "+15550025", 0);
    let bob = register(&mut world, "+15550026", 0);
    let mut f = login(&mut world, &friend);
    for id in 1..=3u64 {
        f.request(&mut world, &text(&bob, id, format!("friend {id}").as_bytes()))
            .access::<SendAck>();
    }
    // The flooder gets half of Bob's mailbox (5 of 10), then typed refusals.
    let mut x = login(&mut world, &flooder);
    let mut refused = 0;
    for id in 1..=30u64 {
        let reply = x.request(&mut world, &text(&bob, id, b"spam"));
        match reply.error_code() {
            None => drop(reply.access::<SendAck>()),
            Some(code) => {
                assert_eq!(code, ErrorCode::QuotaExceeded, "{}", reply.describe());
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 25);
    let mut b = login(&mut world, &bob);
    let (texts, dropped) = drain(&mut world, &mut b);
    assert_eq!(dropped, 0, "nothing of anyone else's was dropped");
    let friends: Vec<_> = texts.iter().filter(|t| t.starts_with(b"friend")).collect();
    assert_eq!(friends.len(), 3, "the friend's messages all arrived");
    assert_eq!(texts.len(), 8);
    // Delivered, the flooder's share is free again.
    let reply = x.request(&mut world, &text(&bob, 31, b"later"));
    assert!(reply.error_code().is_none(), "{}", reply.describe());
}

#[test]
fn a_number_registered_again_without_the_pin_starts_afresh() {
    let mut world = world();
    let alice = register(&mut world, "+15550027", 0);
    let bob = register(&mut world, "+15550028", 0);
    let mut a = login(&mut world, &alice);
    let group_id = 0x5EED_0027;
    let create = GroupChange::Create { name: "old".into(), members: vec![bob.user_id] };
    a.request(&mut world, &signed_update(&alice, group_id, 0, create)).access::<GroupUpdated>();
    let mut b = login(&mut world, &bob);
    drain(&mut world, &mut b);
    // The number gets a new owner, who has no PIN (there is no lock).
    let fresh = register(&mut world, "+15550027", 0);
    assert_ne!(fresh.user_id, alice.user_id, "a new account, not the old one moved");
    let members = |world: &mut World, b: &mut Peer| -> Vec<u64> {
        let info = b.request(world, &GroupInfoRequest { group_id });
        let info = info.access::<GroupInfo>();
        info.members.iter().map(|m| m.user_id.to_native()).collect()
    };
    world.settle();
    assert_eq!(members(&mut world, &mut b), vec![bob.user_id], "the old account left its groups");
    // Bob's message to the old account does not reach the new owner.
    let refused = b.request(&mut world, &text(&alice, 1, b"for the old owner"));
    assert!(refused.error_code().is_some(), "{}", refused.describe());
    let mut f = login(&mut world, &fresh);
    assert!(drain(&mut world, &mut f).0.is_empty(), "nothing of the old account arrived");
}

#[test]
fn blocks_and_privacy_decide_who_may_add_whom_to_groups() {
    let mut world = world();
    let alice = register(&mut world, "+15550061", 0);
    let bob = register(&mut world, "+15550062", 0);
    let carol = register(&mut world, "+15550063", 0);
    let mut a = login(&mut world, &alice);
    let mut c = login(&mut world, &carol);
    c.request(&mut world, &Block { user_id: alice.user_id }).access::<Done>();
    // Carol blocked Alice: Alice's group with Bob and Carol is refused, naming Carol.
    let create = |members| GroupChange::Create { name: "g".into(), members };
    let both = create(vec![bob.user_id, carol.user_id]);
    let refused = a.request(&mut world, &signed_update(&alice, 0x5EED_0061, 0, both));
    assert_eq!(refused.error_code(), Some(ErrorCode::Forbidden), "{}", refused.describe());
    assert!(refused.describe().contains(&carol.user_id.to_string()), "{}", refused.describe());
    let mut b = login(&mut world, &bob);
    assert!(b.take_all(&mut world, MessageType::Deliver).is_empty(), "nothing was created");
    // Bob lets only contacts add him; Alice is none, then she is.
    let mut privacy = tern_engine::state::default_privacy();
    privacy.group_adds = Visibility::Contacts;
    b.request(&mut world, &privacy).access::<Done>();
    let just_bob = create(vec![bob.user_id]);
    let refused = a.request(&mut world, &signed_update(&alice, 0x5EED_0062, 0, just_bob.clone()));
    assert_eq!(refused.error_code(), Some(ErrorCode::Forbidden), "{}", refused.describe());
    b.request(&mut world, &SetContacts { user_ids: vec![alice.user_id] }).access::<Done>();
    let made = a.request(&mut world, &signed_update(&alice, 0x5EED_0062, 0, just_bob));
    assert_eq!(made.access::<GroupUpdated>().epoch.to_native(), 1);
}

#[test]
fn a_new_accounts_name_is_for_its_contacts() {
    let mut world = world();
    let alice = register(&mut world, "+15550064", 0);
    let stranger = register(&mut world, "+15550065", 0);
    let mut a = login(&mut world, &alice);
    let name = ProfileSet { display_name: Some("Alice".into()), about: None, avatar: None };
    a.request(&mut world, &name).access::<Done>();
    let mut s = login(&mut world, &stranger);
    let seen = |world: &mut World, s: &mut Peer| {
        let profile = s.request(world, &ProfileGet { user_id: alice.user_id });
        profile.access::<Profile>().display_name.as_ref().map(|n| n.to_string())
    };
    assert_eq!(seen(&mut world, &mut s), None, "a stranger sees no name");
    a.request(&mut world, &SetContacts { user_ids: vec![stranger.user_id] }).access::<Done>();
    assert_eq!(seen(&mut world, &mut s), Some("Alice".to_string()), "a contact does");
}

#[test]
fn many_accounts_together_cannot_drain_ones_one_time_keys() {
    let mut world = world();
    let target = register(&mut world, "+15550081", 60);
    let fetch = FetchBundles { user_id: target.user_id, device_ids: vec![] };
    let mut with_key = 0;
    for n in 0..31 {
        let requester = register(&mut world, &format!("+1555009{n:04}"), 0);
        let mut r = login(&mut world, &requester);
        let bundles = r.request(&mut world, &fetch);
        let bundles = bundles.access::<Bundles>();
        let key = bundles.devices[0].one_time_key.as_ref();
        with_key += usize::from(key.is_some());
        world.close(r.link);
    }
    // 30 an hour take one-time keys, the rest get the fallback key; 30 of 60 are left.
    assert_eq!(with_key, 30);
}

#[test]
fn an_expired_message_is_never_delivered() {
    let mut world = world();
    let alice = register(&mut world, "+15550031", 0);
    let bob = register(&mut world, "+15550032", 0);
    let mut a = login(&mut world, &alice);
    let mut short = text(&bob, 1, b"disappearing");
    short.ttl_s = 1;
    a.request(&mut world, &short).access::<SendAck>();
    a.request(&mut world, &text(&bob, 2, b"lasting")).access::<SendAck>();
    world.advance(1_500);
    world.maintain();
    let mut b = login(&mut world, &bob);
    assert_eq!(drain(&mut world, &mut b).0, vec![b"lasting".to_vec()]);
}

#[test]
fn a_group_message_reaches_every_member_and_only_members() {
    let mut world = world();
    let alice = register(&mut world, "+15550041", 0);
    let bob = register(&mut world, "+15550042", 0);
    let carol = register(&mut world, "+15550043", 0);
    let dave = register(&mut world, "+15550044", 0);
    let mut a = login(&mut world, &alice);
    let group_id = 0x5EED_0001;
    let create =
        GroupChange::Create { name: "club".into(), members: vec![bob.user_id, carol.user_id] };
    let reply = a.request(&mut world, &signed_update(&alice, group_id, 0, create));
    assert_eq!(reply.access::<GroupUpdated>().epoch.to_native(), 1);
    a.request(&mut world, &group_text(group_id, 1, b"megolm")).access::<SendAck>();
    // Dave is no member: his send is refused and he gets nothing.
    let mut d = login(&mut world, &dave);
    let refused = d.request(&mut world, &group_text(group_id, 1, b"intruder"));
    assert!(refused.error_code().is_some(), "{}", refused.describe());
    assert!(drain(&mut world, &mut d).0.is_empty());
    // Bob and Carol each get it once (after the group event).
    for member in [&bob, &carol] {
        let mut m = login(&mut world, member);
        assert_eq!(drain(&mut world, &mut m).0, vec![b"megolm".to_vec()]);
    }
    // A forged change (Bob signs as Alice) is refused.
    let mut b = login(&mut world, &bob);
    let add = GroupChange::Add { members: vec![dave.user_id] };
    let mut forged = signed_update(&alice, group_id, 1, add);
    forged.signature[0] ^= 1;
    let reply = b.request(&mut world, &forged);
    assert!(reply.error_code().is_some(), "{}", reply.describe());
}

fn presence(frames: &[Received]) -> Vec<(u64, bool)> {
    let events = frames.iter().map(|f| f.access::<PresenceEvent>());
    events.map(|e| (e.user_id.to_native(), e.online)).collect()
}

#[test]
fn presence_goes_to_contacts_only() {
    let mut world = world();
    let alice = register(&mut world, "+15550051", 0);
    let bob = register(&mut world, "+15550052", 0);
    let carol = register(&mut world, "+15550053", 0);
    // Bob counts Alice as a contact; his visibility is the default, "contacts".
    let mut b = login(&mut world, &bob);
    b.request(&mut world, &SetContacts { user_ids: vec![alice.user_id] }).access::<Done>();
    world.close(b.link);
    let mut a = login(&mut world, &alice);
    let mut c = login(&mut world, &carol);
    let subscribe = PresenceSubscribe { user_ids: vec![bob.user_id] };
    a.request(&mut world, &subscribe).access::<Done>();
    c.request(&mut world, &subscribe).access::<Done>();
    assert_eq!(
        presence(&a.take_all(&mut world, MessageType::PresenceEvent)),
        [(bob.user_id, false)]
    );
    let b = login(&mut world, &bob);
    assert_eq!(
        presence(&a.take_all(&mut world, MessageType::PresenceEvent)),
        [(bob.user_id, true)]
    );
    world.close(b.link);
    world.settle();
    assert_eq!(
        presence(&a.take_all(&mut world, MessageType::PresenceEvent)),
        [(bob.user_id, false)]
    );
    c.request(&mut world, &Ping { nonce: 9 }).access::<Pong>();
    assert!(c.take_all(&mut world, MessageType::PresenceEvent).is_empty(), "not a contact");
}

#[test]
fn an_unauthenticated_connection_is_closed_at_its_deadline() {
    let mut world = world();
    let peer = Peer::connect(&mut world);
    world.advance(CoreConfig::default().auth_deadline_ms + 1);
    world.settle();
    assert!(!world.is_open(peer.link), "still open past the auth deadline");
}

#[test]
fn what_was_acknowledged_survives_a_power_cut() {
    let mut world = world();
    let alice = register(&mut world, "+15550061", 0);
    let bob = register(&mut world, "+15550062", 0);
    let mut a = login(&mut world, &alice);
    for id in 1..=5u64 {
        a.request(&mut world, &text(&bob, id, format!("m{id}").as_bytes())).access::<SendAck>();
    }
    world.power_cut();
    let mut b = login(&mut world, &bob);
    let expected: Vec<Vec<u8>> = (1..=5).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(drain(&mut world, &mut b).0, expected);
}
