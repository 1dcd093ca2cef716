//! Companion devices and key hygiene against the real `ternd`: linking a device with a
//! code approved on the primary (on the same or another core), the copies a send then
//! needs, prekeys whose signatures do not verify, and typing indicators crossing cores.

mod common;

use common::*;
use tern_edge::routing::home_shard_of_phone;
use tern_wire::messages::*;
use tern_wire::*;

/// A phone number whose account lands on `core` of 2 (4 shards, as `Server::start` asks).
fn phone_on_core(base: u64, core: u32) -> String {
    (base..)
        .map(|n| format!("+1556{n:07}"))
        .find(|p| home_shard_of_phone(p, 4) % 2 == core)
        .unwrap()
}

#[test]
fn a_linked_device_gets_its_own_copies_on_any_core() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &["--cores", "2"]);
    let alice = register(&mut server, &phone_on_core(100, 0), 5);
    let bob = register(&mut server, &phone_on_core(200, 1), 5);
    let mut a1 = login(&server, alice);
    // Several links: the new device's connection lands on either core, so both the
    // local and the cross-core approval paths run.
    let mut linked = Vec::new();
    for expected_id in 2..=4u32 {
        let device = link(&server, &mut a1, alice.user_id);
        assert_eq!(device.device_id, expected_id);
        let changed = a1.next_of(MessageType::DeviceListChanged);
        let ids: Vec<u32> = changed
            .access::<DeviceListChanged>()
            .device_ids
            .iter()
            .map(|d| d.to_native())
            .collect();
        assert_eq!(ids, (1..=expected_id).collect::<Vec<_>>());
        linked.push(device);
    }
    let mut a2 = login(&server, linked[0]);

    // Bob must now encrypt for every device of Alice.
    let stale = bob_sends(&server, bob, alice, &[1]);
    let error = stale.access::<SendError>();
    assert_eq!(error.code.to_native(), ErrorCode::StaleDevices as u16);
    assert_eq!(error.missing_devices.len(), 3);
    let ack = bob_sends(&server, bob, alice, &[1, 2, 3, 4]);
    assert!(!ack.access::<SendAck>().duplicate);
    for device in [&mut a1, &mut a2] {
        let frame = device.next_of(MessageType::Deliver);
        assert_eq!(frame.deliver().envelope.sender_user.to_native(), bob.user_id);
    }

    // Alice's second device writes to Bob: Bob's device and Alice's other devices.
    let mut to_bob = text(bob, 9, b"from the laptop");
    for other in [1u32, 3, 4] {
        to_bob.copies.push(DeviceCopy {
            user_id: alice.user_id,
            device_id: other,
            e2e_type: E2eType::OlmMessage,
            ciphertext: b"sync copy".to_vec(),
        });
    }
    a2.request(&to_bob).access::<SendAck>();
    let copy = a1.next_of(MessageType::Deliver);
    assert_eq!(copy.deliver().envelope.body.as_slice(), b"sync copy");
    assert_eq!(copy.deliver().envelope.sender_device.to_native(), 2);

    // Only the primary links devices; a wrong code is a typed error.
    let refused = a2.request(&LinkApprove { code: "123456789".into() });
    assert_eq!(refused.error_code(), Some(ErrorCode::Forbidden));
    let wrong = a1.request(&LinkApprove { code: "000000000".into() });
    assert!(matches!(wrong.error_code(), Some(ErrorCode::InvalidCode)), "{}", wrong.describe());
}

fn bob_sends(server: &Server, bob: Account, alice: Account, devices: &[u32]) -> Received {
    let mut b = login(server, bob);
    let mut send = text(alice, 100 + devices.len() as u64, b"to all of alice");
    send.copies = devices
        .iter()
        .map(|d| DeviceCopy {
            user_id: alice.user_id,
            device_id: *d,
            e2e_type: E2eType::OlmMessage,
            ciphertext: b"to all of alice".to_vec(),
        })
        .collect();
    b.request(&send)
}

#[test]
fn prekeys_with_bad_signatures_are_refused() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &[]);
    let mut c = Client::connect(server.addr);
    let phone = "+15570001";
    let request = RequestCode {
        phone: phone.into(),
        channel: CodeChannel::Sms,
        locale: "en".into(),
        proof_of_work: None,
    };
    c.request(&request).access::<CodeSent>();
    let code = server.code_for(phone);
    let mut forged = keys(3);
    forged.one_time_keys[1].signature[0] ^= 1;
    let refused = c.request(&Verify {
        phone: phone.into(),
        code: code.clone(),
        device: NewDevice { name: "x".into(), keys: forged },
        registration_lock_pin: None,
    });
    assert_eq!(refused.error_code(), Some(ErrorCode::InvalidSignature), "{}", refused.describe());
    // The code was not used up by the refusal.
    let registered = c.request(&Verify {
        phone: phone.into(),
        code,
        device: NewDevice { name: "x".into(), keys: keys(3) },
        registration_lock_pin: None,
    });
    let registered = registered.access::<Registered>();
    let account = Account {
        user_id: registered.user_id.to_native(),
        device_id: registered.device_id.to_native(),
        token: registered.token,
    };
    // Uploads are checked against the device's registered signing key.
    let mut a = login(&server, account);
    let stranger = test_signer();
    let upload =
        UploadKeys { one_time_keys: vec![sign_prekey(&stranger, 77, [7; 32])], fallback_key: None };
    assert_eq!(a.request(&upload).error_code(), Some(ErrorCode::InvalidSignature));
}

#[test]
fn typing_reaches_online_devices_across_cores_and_is_never_stored() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &["--cores", "2"]);
    let alice = register(&mut server, &phone_on_core(300, 0), 0);
    let bob = register(&mut server, &phone_on_core(400, 1), 0);
    let mut a = login(&server, alice);
    let mut b = login(&server, bob);
    a.send(&Typing { conversation: Conversation::User(bob.user_id), active: true });
    let typing = b.next_of(MessageType::TypingEvent);
    let typing = typing.access::<TypingEvent>();
    assert_eq!(typing.user_id.to_native(), alice.user_id);
    assert!(typing.active);
    // Bob offline: a typing indicator is dropped, not queued.
    drop(b);
    a.send(&Typing { conversation: Conversation::User(bob.user_id), active: true });
    a.request(&Ping { nonce: 1 }).access::<Pong>();
    a.request(&text(bob, 1, b"after typing")).access::<SendAck>();
    let mut b = login(&server, bob);
    let first = b.next_of(MessageType::Deliver);
    assert_eq!(first.deliver().envelope.body.as_slice(), b"after typing");
    assert!(b.inbox_types().iter().all(|t| *t != MessageType::TypingEvent));
}
