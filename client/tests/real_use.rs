//! The SDK as people live with it (issue 19): one bad send never blocks a device, nor
//! one that must wait another conversation, a note
//! to self reaches one's other devices, an idle connection stays up, a clean server stop
//! is a drop the client rides out, and the store file keeps no plaintext. Against a real
//! `ternd` on loopback; every wait is bounded.

use std::path::Path;
use std::time::Duration;

use tern_client::connection::Endpoint;
use tern_client::{
    Client, ClientError, ErrorCode, Event, PendingLink, PendingRegistration, Status, StoreSecret,
    TEXT_MAX_BYTES,
};
use tern_testkit::Server;

const WAIT: Duration = Duration::from_secs(20);

fn secret() -> StoreSecret {
    StoreSecret::Passphrase("correct horse".into())
}

fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

async fn register(server: &mut Server, stores: &Path, name: &str, phone: &str) -> Client {
    let endpoint = Endpoint::tcp(server.addr.to_string());
    let pending = PendingRegistration::request_code(&endpoint, phone).await.unwrap();
    let code = server.code_for(phone);
    pending.verify(&code, name, &stores.join(format!("{name}.db")), &secret()).await.unwrap()
}

/// Reads events until `wanted` matches one; returns it and every event before it.
async fn until(client: &mut Client, wanted: impl Fn(&Event) -> bool) -> (Event, Vec<Event>) {
    let mut before = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            let event = client.next_event().await.unwrap();
            if wanted(&event) {
                return (event, before);
            }
            before.push(event);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no such event in time"))
}

#[tokio::test(flavor = "current_thread")]
async fn a_refused_send_fails_alone_and_the_device_goes_on() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let mut alice = register(&mut server, stores.path(), "alice", "+15581001").await;
    let mut bob = register(&mut server, stores.path(), "bob", "+15581002").await;
    // An id on a real shard that no account has.
    let nobody = bob.user_id() + 7919;

    let refused = alice.send_text(nobody, "hello?").await;
    let Err(ClientError::Refused { code, reason, .. }) = refused else {
        panic!("a send to no one must be refused for good: {refused:?}")
    };
    assert_eq!(code, ErrorCode::NotFound);
    assert!(reason.contains("no such user"), "{reason}");
    let history = alice.history(nobody, 10).unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].status, Status::Failed, "{history:?}");

    // Too long for one message: refused before it is queued.
    let long = "x".repeat(TEXT_MAX_BYTES + 1);
    let refused = alice.send_text(bob.user_id(), &long).await;
    assert!(matches!(refused, Err(ClientError::TooLong { .. })), "{refused:?}");
    assert!(refused.unwrap_err().to_string().contains("send it as a file"));
    assert!(alice.history(bob.user_id(), 10).unwrap().is_empty());

    // The device goes on: a reconnect re-sends nothing that fails, and Bob gets the next
    // message.
    alice.reconnect().await.unwrap();
    let sent = alice.send_text(bob.user_id(), "after the bad one").await.unwrap();
    assert_eq!(sent.status, Status::Sent);
    let (event, _) = until(&mut bob, |e| matches!(e, Event::Message(_))).await;
    let Event::Message(message) = event else { unreachable!() };
    assert_eq!(message.text, "after the bad one");
    let reopened = Client::open(&stores.path().join("alice.db"), &secret(), None).await;
    assert_eq!(reopened.unwrap().history(nobody, 10).unwrap()[0].status, Status::Failed);
}

#[tokio::test(flavor = "current_thread")]
async fn a_note_to_self_reaches_the_users_other_device() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let mut alice = register(&mut server, stores.path(), "alice", "+15581011").await;
    let me = alice.user_id();
    // Alone on one device, a note to self is kept.
    let note = alice.send_text(me, "buy milk").await.unwrap();
    assert_eq!(note.status, Status::Sent);

    let endpoint = Endpoint::tcp(server.addr.to_string());
    let pending = PendingLink::request(&endpoint, "laptop").await.unwrap();
    let code = pending.code().to_string();
    let laptop_db = stores.path().join("laptop.db");
    let secret = secret();
    let (approved, laptop) =
        tokio::join!(alice.approve_link(&code), pending.wait(&laptop_db, &secret));
    approved.unwrap();
    let mut laptop = laptop.unwrap();

    let note = alice.send_text(me, "call the bank").await.unwrap();
    assert_eq!(note.status, Status::Sent);
    let (event, _) = until(&mut laptop, |e| matches!(e, Event::Message(_))).await;
    let Event::Message(message) = event else { unreachable!() };
    assert_eq!(
        (message.text.as_str(), message.peer, message.outgoing),
        ("call the bank", me, true)
    );
    let texts: Vec<String> = laptop.history(me, 10).unwrap().into_iter().map(|m| m.text).collect();
    assert_eq!(texts, ["call the bank"]);
}

#[tokio::test(flavor = "current_thread")]
async fn an_idle_connection_is_kept_alive_past_the_servers_idle_timeout() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &["--idle-timeout-s", "1"]);
    let mut alice = register(&mut server, stores.path(), "alice", "+15581021").await;
    let mut bob = register(&mut server, stores.path(), "bob", "+15581022").await;
    // Alice idles for three idle timeouts; her client pings on the advertised heartbeat.
    let idle = tokio::time::timeout(Duration::from_secs(3), async {
        let mut events = Vec::new();
        loop {
            events.push(alice.next_event().await.unwrap());
        }
        #[allow(unreachable_code)]
        events
    })
    .await;
    assert!(idle.is_err(), "the idle wait ends only by its timeout");
    assert!(alice.is_connected(), "the server closed an idle connection that pinged");
    bob.send_text(alice.user_id(), "still there?").await.unwrap();
    let (_, before) = until(&mut alice, |e| matches!(e, Event::Message(_))).await;
    let drops: Vec<_> = before.iter().filter(|e| matches!(e, Event::Disconnected { .. })).collect();
    assert!(drops.is_empty(), "{drops:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_clean_server_stop_is_ridden_out_and_waiting_messages_are_sent() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", tern_testkit::free_port());
    let mut server = Server::start(data.path(), &["--listen", &listen]);
    let mut alice = register(&mut server, stores.path(), "alice", "+15581031").await;
    let bob = register(&mut server, stores.path(), "bob", "+15581032").await;
    let bob_id = bob.user_id();
    drop(bob);
    assert!(server.terminate().success());

    // The server's ShuttingDown is a drop: an event, not an error.
    let (event, _) = until(&mut alice, |e| matches!(e, Event::Disconnected { .. })).await;
    let Event::Disconnected { reason } = event else { unreachable!() };
    assert!(reason.contains("stopping"), "{reason}");
    let queued = alice.send_text(bob_id, "while it was down").await.unwrap();
    assert_eq!(queued.status, Status::Sending);

    tern_testkit::wait_until_bindable(listen.parse().unwrap());
    let _server = Server::start(data.path(), &["--listen", &listen]);
    let (_, before) = until(&mut alice, |e| matches!(e, Event::Sent(_))).await;
    assert!(before.contains(&Event::Reconnected), "{before:?}");
    assert_eq!(alice.history(bob_id, 10).unwrap()[0].status, Status::Sent);
    let mut bob = Client::open(&stores.path().join("bob.db"), &secret(), None).await.unwrap();
    let (event, _) = until(&mut bob, |e| matches!(e, Event::Message(_))).await;
    let Event::Message(message) = event else { unreachable!() };
    assert_eq!(message.text, "while it was down");
}

/// Goal: a message that must wait holds back only its own conversation (before, the
/// first waiting message stopped the whole outbox: one recipient's full mailbox held
/// every other conversation for the server's 60 s). Method: Bob's mailbox takes two
/// messages; Alice fills it and a third waits (`QuotaExceeded`); the server stops and
/// Alice writes to Carol meanwhile. After the restart her outbox holds Bob's third, then
/// Carol's: Carol's goes out at once, Bob's still waits.
#[tokio::test(flavor = "current_thread")]
async fn a_waiting_message_holds_back_only_its_own_conversation() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", tern_testkit::free_port());
    let mailbox = ["--mailbox-max-messages", "2", "--mailbox-sender-share-percent", "100"];
    let flags = [["--listen", listen.as_str()].as_slice(), &mailbox].concat();
    let mut server = Server::start(data.path(), &flags);
    let mut alice = register(&mut server, stores.path(), "alice", "+15581051").await;
    let bob = register(&mut server, stores.path(), "bob", "+15581052").await;
    let carol = register(&mut server, stores.path(), "carol", "+15581053").await;
    let (bob_id, carol_id) = (bob.user_id(), carol.user_id());
    drop((bob, carol));
    for text in ["one", "two"] {
        assert_eq!(alice.send_text(bob_id, text).await.unwrap().status, Status::Sent);
    }
    assert_eq!(alice.send_text(bob_id, "three").await.unwrap().status, Status::Sending);
    assert!(server.terminate().success());
    until(&mut alice, |e| matches!(e, Event::Disconnected { .. })).await;
    let queued = alice.send_text(carol_id, "hi Carol").await.unwrap();
    assert_eq!(queued.status, Status::Sending);

    tern_testkit::wait_until_bindable(listen.parse().unwrap());
    let _server = Server::start(data.path(), &flags);
    let (event, _) = until(&mut alice, |e| matches!(e, Event::Sent(_))).await;
    let Event::Sent(sent) = event else { unreachable!() };
    assert_eq!(sent.text, "hi Carol");
    let to_bob = alice.history(bob_id, 10).unwrap();
    let three = to_bob.iter().find(|m| m.text == "three").expect("kept");
    assert_eq!(three.status, Status::Sending, "still waiting for Bob's mailbox");
}

#[tokio::test(flavor = "current_thread")]
async fn the_store_file_keeps_no_plaintext_and_wants_its_passphrase() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let mut alice = register(&mut server, stores.path(), "alice", "+15581041").await;
    let mut bob = register(&mut server, stores.path(), "bob", "+15581042").await;
    let sent = "canary-outgoing-7c1f3e9a";
    let received = "canary-incoming-5b2d8e41";
    alice.send_text(bob.user_id(), sent).await.unwrap();
    bob.send_text(alice.user_id(), received).await.unwrap();
    until(&mut alice, |e| matches!(e, Event::Message(_))).await;
    until(&mut bob, |e| matches!(e, Event::Message(_))).await;
    // Searchable inside the store, while nowhere in its files (database, WAL, ...).
    assert_eq!(alice.search("canary", 10).unwrap().len(), 2);
    // Search takes words as typed: hyphens, quotes and `AND` are text; words match as
    // prefixes; every word must be there.
    let found = alice.search("canary-out", 10).unwrap();
    assert_eq!(found.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), [sent]);
    assert_eq!(alice.search("canar", 10).unwrap().len(), 2);
    assert!(alice.search("canary AND", 10).unwrap().is_empty());
    assert!(alice.search("\" -", 10).unwrap().is_empty());
    let (message, group) = alice.search_conversations("incoming", 10).unwrap().remove(0);
    assert_eq!((message.peer, group), (bob.user_id(), 0));
    drop((alice, bob));
    for canary in [sent, received, "+15581041"] {
        let hits = tern_testkit::files_holding(stores.path(), canary.as_bytes());
        assert!(hits.is_empty(), "{canary} in clear in {hits:?}");
    }
    let wrong = StoreSecret::Passphrase("not it".into());
    let opened = Client::open(&stores.path().join("alice.db"), &wrong, None).await;
    assert!(matches!(opened, Err(ClientError::Store(tern_client::StoreError::WrongKey))));
}
