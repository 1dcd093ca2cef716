//! Push against a real HTTP receiver on loopback (standing in for a UnifiedPush
//! endpoint): one content-free wake-up per absence however many messages arrive, a retry
//! after a 500, and an endpoint pruned after a 410.

// The receiver thread shares what it saw with the test thread: test plumbing, not the
// per-core state the ban is about.
#![allow(clippy::disallowed_types)]

mod common;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tern_wire::messages::*;
use tern_wire::*;

/// Requests the receiver got: (path, body).
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// An HTTP receiver answering with the scripted statuses, then 200.
fn receiver(script: Arc<Mutex<VecDeque<u16>>>) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/up/device", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let recorded = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            let (head, body) = loop {
                let n = stream.read(&mut buffer).unwrap_or(0);
                if n == 0 {
                    break (String::new(), String::new());
                }
                request.extend_from_slice(&buffer[..n]);
                let text = String::from_utf8_lossy(&request).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if body.len() >= length {
                        break (head.to_string(), body.to_string());
                    }
                }
            };
            let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
            recorded.lock().unwrap().push((path, body));
            let status = script.lock().unwrap().pop_front().unwrap_or(200);
            let reply =
                format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    (url, seen)
}

fn wait_for_requests(seen: &Seen, count: usize) {
    let deadline = Instant::now() + TIMEOUT;
    while seen.lock().unwrap().len() < count {
        assert!(Instant::now() < deadline, "only {} pushes arrived", seen.lock().unwrap().len());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Bob connects (which resets his wake-up) and leaves again.
fn visit(server: &Server, bob: Account) {
    let mut b = login(server, bob);
    b.request(&Ping { nonce: 0 }).access::<Pong>();
    drop(b);
    // Let the server see the close before the next messages arrive.
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn offline_devices_get_one_content_free_push_with_retries_and_pruning() {
    let dir = data_dir();
    // The receiver is on loopback over http: development endpoints.
    // Alice writes to Bob, who never wrote back, more than the budget for strangers.
    let args = ["--push-insecure-endpoints", "--stranger-sends-per-second", "1000"];
    let mut server = Server::start(dir.path(), &args);
    let script = Arc::new(Mutex::new(VecDeque::new()));
    let (url, seen) = receiver(script.clone());
    let alice = register(&mut server, "+15600001", 0);
    let bob = register(&mut server, "+15600002", 0);
    let mut b = login(&server, bob);
    let bad = PushRegister {
        endpoint: Some(PushEndpoint {
            provider: PushProvider::UnifiedPush,
            address: "ftp://x".into(),
        }),
    };
    assert_eq!(b.request(&bad).error_code(), Some(ErrorCode::InvalidArgument));
    let endpoint = PushEndpoint { provider: PushProvider::UnifiedPush, address: url };
    b.request(&PushRegister { endpoint: Some(endpoint) }).access::<Done>();
    drop(b);
    std::thread::sleep(Duration::from_millis(300));

    // A burst of 100 messages to offline Bob: exactly one push, with no content.
    let mut a = login(&server, alice);
    for id in 1..=100u64 {
        a.request(&text(bob, id, b"secret words")).access::<SendAck>();
    }
    wait_for_requests(&seen, 1);
    std::thread::sleep(Duration::from_millis(500));
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].0, "/up/device");
        assert!(!seen[0].1.contains("secret"), "{:?}", seen[0]);
        assert_eq!(seen[0].1, "{\"tern\":\"wake\"}");
    }

    // The push service fails once: the push is retried.
    visit(&server, bob);
    script.lock().unwrap().push_back(500);
    a.request(&text(bob, 200, b"more")).access::<SendAck>();
    wait_for_requests(&seen, 3);

    // The endpoint is gone (410): pruned, and no more pushes go there.
    visit(&server, bob);
    script.lock().unwrap().push_back(410);
    a.request(&text(bob, 300, b"more")).access::<SendAck>();
    wait_for_requests(&seen, 4);
    std::thread::sleep(Duration::from_millis(300));
    visit(&server, bob);
    a.request(&text(bob, 400, b"more")).access::<SendAck>();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(seen.lock().unwrap().len(), 4, "a pruned endpoint got a push");
}

/// Goal: a client cannot make ternd call inside the operator's network (hardening item
/// 3): without `--push-insecure-endpoints`, a UnifiedPush endpoint over plain http, at
/// a loopback, private or link-local address (the cloud metadata service's among them)
/// or naming localhost is refused with `InvalidArgument` saying why; https to a public
/// host is stored. Before the fix every one of them was stored and called.
#[test]
fn push_endpoints_cannot_reach_inside() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &[]);
    let bob = register(&mut server, "+15600011", 0);
    let mut b = login(&server, bob);
    let register = |address: &str| PushRegister {
        endpoint: Some(PushEndpoint {
            provider: PushProvider::UnifiedPush,
            address: address.into(),
        }),
    };
    for inside in [
        "http://push.example.org/up/bob",
        "https://127.0.0.1:8443/up",
        "https://10.0.0.7/up",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::1]:443/up",
        "https://localhost/up",
    ] {
        let refused = b.request(&register(inside));
        assert_eq!(refused.error_code(), Some(ErrorCode::InvalidArgument), "{inside}");
        assert!(refused.describe().contains("https to a public host"), "{}", refused.describe());
    }
    b.request(&register("https://push.example.org/up/bob")).access::<Done>();
}

/// Goal: with `--push-allowed-hosts`, the operator's list is the only way out (hardening
/// item 3): an endpoint elsewhere, public or not, is refused with `InvalidArgument`
/// saying so; one on the list (or under a listed `.domain`) is stored.
#[test]
fn only_the_operators_push_services_are_called() {
    let dir = data_dir();
    let list = "ntfy.example.org,.push.example.net";
    let mut server = Server::start(dir.path(), &["--push-allowed-hosts", list]);
    let bob = register(&mut server, "+15600021", 0);
    let mut b = login(&server, bob);
    let register = |address: &str| PushRegister {
        endpoint: Some(PushEndpoint {
            provider: PushProvider::UnifiedPush,
            address: address.into(),
        }),
    };
    for elsewhere in ["https://push.example.org/up/bob", "https://ntfy.example.org.evil.com/up"] {
        let refused = b.request(&register(elsewhere));
        assert_eq!(refused.error_code(), Some(ErrorCode::InvalidArgument), "{elsewhere}");
        assert!(refused.describe().contains("operator's list"), "{}", refused.describe());
    }
    b.request(&register("https://ntfy.example.org/up/bob")).access::<Done>();
    b.request(&register("https://eu.push.example.net/up/bob")).access::<Done>();
}
