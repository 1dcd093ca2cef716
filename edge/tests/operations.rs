//! Operating `ternd`: deadlines for silent connections, the admin endpoint, and a clean
//! stop on SIGTERM that flushes and tells clients.

mod common;

use common::*;
use tern_wire::messages::*;
use tern_wire::*;

#[test]
fn a_connection_that_does_not_authenticate_in_time_is_closed() {
    let dir = data_dir();
    let server = Server::start(dir.path(), &["--auth-deadline-s", "0.3"]);
    let mut idle = Client::connect(server.addr);
    let error = idle.read_frame().expect("a timeout error before the close");
    assert_eq!(error.error_code(), Some(ErrorCode::Timeout), "{}", error.describe());
    assert!(idle.is_closed());
    // A handshake alone is not enough either, and others are not affected.
    let mut other = Client::connect(server.addr);
    other.request(&Ping { nonce: 3 }).access::<Pong>();
}

#[test]
fn admin_endpoint_serves_health_and_metrics() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &[]);
    let (status, body) = server.admin_get("/healthz");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, "ok\n");

    let alice = register(&mut server, "+15550101", 5);
    let bob = register(&mut server, "+15550102", 5);
    let mut a = login(&server, alice);
    a.request(&text(bob, 1, b"counted")).access::<SendAck>();
    let (status, metrics) = server.admin_get("/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(metrics.contains("# TYPE tern_messages_sent_total counter"), "{metrics}");
    assert!(metrics.contains("tern_messages_sent_total{core=\"0\"} 1"), "{metrics}");
    assert!(metrics.contains("tern_connections{core=\"0\"} 1"), "{metrics}");
    let (status, _) = server.admin_get("/nope");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

#[test]
fn sigterm_flushes_tells_clients_and_exits_zero() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &[]);
    let alice = register(&mut server, "+15550111", 5);
    let bob = register(&mut server, "+15550112", 5);
    let mut a = login(&server, alice);
    a.request(&text(bob, 1, b"before the stop")).access::<SendAck>();
    let status = server.terminate();
    assert!(status.success(), "exit status {status}");
    let notice = a.read_frame().expect("a shutting-down notice");
    assert_eq!(notice.error_code(), Some(ErrorCode::ShuttingDown), "{}", notice.describe());

    // Nothing acked was lost.
    let server = Server::start(dir.path(), &[]);
    let mut b = login(&server, bob);
    let frame = b.next_of(MessageType::Deliver);
    assert_eq!(frame.deliver().envelope.body.as_slice(), b"before the stop");
}

/// Goal: the server checkpoints on its own, and what the checkpoint holds (mailboxes,
/// conversation numbering, accounts) comes back after a crash. Method: a short
/// maintenance interval; wait (bounded) for checkpoint files; kill; restart; check.
#[test]
fn periodic_checkpoints_survive_a_crash() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &["--maintenance-interval-s", "0.2"]);
    let alice = register(&mut server, "+15550121", 5);
    let bob = register(&mut server, "+15550122", 5);
    let mut a = login(&server, alice);
    for i in 1..=3u64 {
        a.request(&text(bob, i, b"checkpointed")).access::<SendAck>();
    }
    let deadline = std::time::Instant::now() + TIMEOUT;
    let checkpoints = || {
        (0..4)
            .flat_map(|shard| {
                std::fs::read_dir(dir.path().join(format!("shard-{shard:04}"))).unwrap()
            })
            .filter(|e| {
                e.as_ref().unwrap().file_name().to_string_lossy().starts_with("checkpoint-")
            })
            .count()
    };
    while checkpoints() < 2 {
        assert!(std::time::Instant::now() < deadline, "no checkpoints were written");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    server.kill();
    let server = Server::start(dir.path(), &[]);
    let mut b = login(&server, bob);
    for i in 1..=3u64 {
        let frame = b.next_of(MessageType::Deliver);
        assert_eq!(frame.deliver().envelope.conversation_seq.to_native(), i);
    }
    let mut a = login(&server, alice);
    a.request(&text(bob, 4, b"next")).access::<SendAck>();
    let frame = b.next_of(MessageType::Deliver);
    assert_eq!(frame.deliver().envelope.conversation_seq.to_native(), 4);
}
