//! Presence and last seen against the real `ternd` on two cores: subscribers hear
//! online/offline and last seen only as the watched user's privacy settings allow, last
//! seen survives a restart, and a non-contact hears nothing when visibility is
//! "contacts".

mod common;

use common::*;
use tern_edge::routing::home_shard_of_phone;
use tern_wire::messages::*;
use tern_wire::*;

fn phone_on_core(base: u64, core: u32) -> String {
    (base..)
        .map(|n| format!("+1562{n:07}"))
        .find(|p| home_shard_of_phone(p, 4) % 2 == core)
        .unwrap()
}

fn presence(client: &mut Client) -> (UserId, bool, u64) {
    let frame = client.next_of(MessageType::PresenceEvent);
    let event = frame.access::<PresenceEvent>();
    (event.user_id.to_native(), event.online, event.last_seen_ms.to_native())
}

/// Nothing about presence arrived (checked after a round trip).
fn no_presence(client: &mut Client) {
    client.request(&Ping { nonce: 9 }).access::<Pong>();
    assert!(
        !client.inbox_types().contains(&MessageType::PresenceEvent),
        "{:?}",
        client.inbox_types()
    );
}

#[test]
fn presence_follows_privacy_and_last_seen_survives_a_restart() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &["--cores", "2"]);
    let alice = register(&mut server, &phone_on_core(100, 0), 0);
    let bob = register(&mut server, &phone_on_core(200, 1), 0);
    let carol = register(&mut server, &phone_on_core(300, 0), 0);

    // Bob counts Alice as a contact; his visibility is the default, "contacts".
    let mut b = login(&server, bob);
    b.request(&SetContacts { user_ids: vec![alice.user_id] }).access::<Done>();
    drop(b);
    let mut a = login(&server, alice);
    let mut c = login(&server, carol);
    a.request(&PresenceSubscribe { user_ids: vec![bob.user_id] }).access::<Done>();
    c.request(&PresenceSubscribe { user_ids: vec![bob.user_id] }).access::<Done>();
    let (who, online, first_seen) = presence(&mut a);
    assert_eq!((who, online), (bob.user_id, false));
    assert!(first_seen > 0, "Bob was connected before");

    let b = login(&server, bob);
    assert_eq!(presence(&mut a), (bob.user_id, true, first_seen));
    drop(b);
    let (_, online, last_seen) = presence(&mut a);
    assert!(!online);
    assert!(last_seen >= first_seen);
    no_presence(&mut c); // Not a contact: nothing at all.

    // Last seen is on disk. (Its record is committed with the next group commit, not
    // waited for: a kill at once could lose the newest one, so the test lets the
    // commit run first.)
    drop((a, c));
    std::thread::sleep(std::time::Duration::from_millis(300));
    server.kill();
    let server = Server::start(dir.path(), &["--cores", "2"]);
    let mut a = login(&server, alice);
    a.request(&PresenceSubscribe { user_ids: vec![bob.user_id] }).access::<Done>();
    assert_eq!(presence(&mut a), (bob.user_id, false, last_seen));

    // Bob hides last seen from everyone and shows being online to everyone.
    let mut c = login(&server, carol);
    c.request(&PresenceSubscribe { user_ids: vec![bob.user_id] }).access::<Done>();
    let mut b = login(&server, bob);
    assert!(presence(&mut a).1);
    let mut privacy = PrivacySettings {
        last_seen: Visibility::Nobody,
        online: Visibility::Everyone,
        display_name: Visibility::Everyone,
        about: Visibility::Everyone,
        avatar: Visibility::Everyone,
        read_receipts: true,
        group_adds: Visibility::Everyone,
    };
    b.request(&privacy).access::<Done>();
    assert_eq!(presence(&mut a), (bob.user_id, true, 0));
    assert_eq!(presence(&mut c), (bob.user_id, true, 0));
    let current = b.request(&PrivacyGet {});
    assert_eq!(current.access::<PrivacySettings>().last_seen, ArchivedVisibility::Nobody);
    // And back to nobody seeing anything: watchers are told "hidden".
    privacy.online = Visibility::Nobody;
    b.request(&privacy).access::<Done>();
    assert_eq!(presence(&mut a), (bob.user_id, false, 0));
}
