//! The same protocol over TLS 1.3 (with the development certificate pinned), refusal
//! of clients that offer only TLS 1.2 unless `--tls12` allows it (with AEAD suites), and
//! certificate renewal on SIGHUP without dropping connections.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;

use common::*;
use tern_wire::messages::*;
use tern_wire::*;

#[test]
fn messaging_over_tls() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &[]);
    let alice = register(&mut server, "+15550201", 5);
    let bob = register(&mut server, "+15550202", 5);
    let mut a = login_tls(&server, alice);
    let mut b = login_tls(&server, bob);
    a.request(&text(bob, 1, b"over tls")).access::<SendAck>();
    let frame = b.next_of(MessageType::Deliver);
    assert_eq!(frame.deliver().envelope.body.as_slice(), b"over tls");
    // Mixed transports talk to each other.
    let mut plain = login(&server, alice);
    drop(a);
    b.request(&text(alice, 1, b"to plain")).access::<SendAck>();
    assert_eq!(plain.next_of(MessageType::Deliver).deliver().envelope.body.as_slice(), b"to plain");
}

/// Goal: bodies larger than a TLS record, and a mailbox drained at once, cross TLS whole
/// and in order: records split over reads on the way in, and output encrypted in parts
/// on the way out. Method: Alice sends 24 bodies of 100 KB (each several records) over
/// TLS while Bob is offline, then Bob logs in over TLS and takes the 2.4 MB at once.
#[test]
fn large_bodies_and_a_drained_mailbox_cross_tls_whole() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &[]);
    let alice = register(&mut server, "+15550203", 5);
    let bob = register(&mut server, "+15550204", 5);
    let mut a = login_tls(&server, alice);
    let body = |i: u64| -> Vec<u8> { (0..100_000u64).map(|j| (i * 31 + j % 251) as u8).collect() };
    for i in 1..=24 {
        a.request(&text(bob, i, &body(i))).access::<SendAck>();
    }
    let mut b = login_tls(&server, bob);
    for i in 1..=24 {
        let frame = b.next_of(MessageType::Deliver);
        let deliver = frame.deliver();
        assert_eq!(deliver.envelope.client_message_id, i);
        assert!(deliver.envelope.body.as_slice() == body(i).as_slice(), "body {i} intact");
    }
}

#[test]
fn a_client_offering_only_tls12_is_refused() {
    let dir = data_dir();
    let server = Server::start(dir.path(), &[]);
    let config = tls_client_config(&server, &[&rustls::version::TLS12]);
    let tcp = TcpStream::connect(server.tls_addr).unwrap();
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = rustls::ClientConnection::new(config, name).unwrap();
    let mut stream = rustls::StreamOwned::new(tls, tcp);
    let result = stream.write_all(b"x").and_then(|_| stream.flush());
    let error = result.expect_err("the handshake must fail");
    assert!(
        error.to_string().to_lowercase().contains("version") || error.to_string().contains("alert"),
        "unexpected error: {error}"
    );
    // The server keeps serving.
    let mut client = Client::connect(server.addr);
    client.request(&Ping { nonce: 1 }).access::<Pong>();
}

#[test]
fn messaging_over_websocket_and_websocket_over_tls() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &[]);
    let alice = register(&mut server, "+15550211", 5);
    let bob = register(&mut server, "+15550212", 5);
    let mut a = authenticate(Client::connect_ws(&server, false), alice);
    let mut b = authenticate(Client::connect_ws(&server, true), bob);
    a.request(&text(bob, 1, b"over websocket")).access::<SendAck>();
    let frame = b.next_of(MessageType::Deliver);
    assert_eq!(frame.deliver().envelope.body.as_slice(), b"over websocket");
    b.send(&DeliveryAck { up_to_mailbox_seq: frame.deliver().mailbox_seq });
    let receipt = a.next_of(MessageType::Deliver);
    assert_eq!(receipt.deliver().envelope.kind, ArchivedEnvelopeKind::Receipt);
}

/// A TLS client configuration trusting only the certificate(s) in `pem`.
fn pinning(
    pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// Runs only the TLS handshake with `config`; returns the negotiated (version, suite).
fn tls_handshake(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<(rustls::ProtocolVersion, rustls::CipherSuite)> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(TIMEOUT))?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = rustls::ClientConnection::new(config, name).unwrap();
    while tls.is_handshaking() {
        tls.complete_io(&mut tcp)?;
    }
    let version = tls.protocol_version().expect("negotiated");
    let suite = tls.negotiated_cipher_suite().expect("negotiated").suite();
    Ok((version, suite))
}

/// Goal: `--tls12` lets a client that speaks only TLS 1.2 in, with an AEAD suite, and
/// without the flag the same client is refused (see also
/// `a_client_offering_only_tls12_is_refused`). Method: the same TLS-1.2-only client
/// against a server without and one with the flag; with it, the protocol runs on top.
#[test]
fn a_tls12_client_is_accepted_only_with_the_tls12_flag() {
    let dir = data_dir();
    let server = Server::start(dir.path(), &[]);
    let config = tls_client_config(&server, &[&rustls::version::TLS12]);
    assert!(tls_handshake(server.tls_addr, config).is_err(), "TLS 1.2 without --tls12");
    drop(server);

    let mut server = Server::start(dir.path(), &["--tls12"]);
    let alice = register(&mut server, "+15550221", 0);
    let config = tls_client_config(&server, &[&rustls::version::TLS12]);
    let (version, suite) = tls_handshake(server.tls_addr, config.clone()).unwrap();
    assert_eq!(version, rustls::ProtocolVersion::TLSv1_2);
    let name = format!("{suite:?}");
    assert!(name.starts_with("TLS_ECDHE_"), "{name}");
    assert!(name.contains("_GCM_") || name.contains("CHACHA20_POLY1305"), "{name}");
    let mut a = authenticate(Client::connect_tls_with(server.tls_addr, config), alice);
    a.request(&Ping { nonce: 1 }).access::<Pong>();
    // TLS 1.3 clients still get TLS 1.3.
    let modern = tls_client_config(&server, &[&rustls::version::TLS13, &rustls::version::TLS12]);
    let (version, _) = tls_handshake(server.tls_addr, modern).unwrap();
    assert_eq!(version, rustls::ProtocolVersion::TLSv1_3);
}

/// A self-signed certificate for `localhost`: (certificate PEM, key PEM).
fn certificate() -> (String, String) {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    (generated.cert.pem(), generated.signing_key.serialize_pem())
}

/// Replaces a file as an operator's renewal tool would: write beside it, then rename.
fn replace(path: &std::path::Path, contents: &str) {
    let fresh = path.with_extension("new");
    std::fs::write(&fresh, contents).unwrap();
    std::fs::rename(&fresh, path).unwrap();
}

/// Waits until each of the first `cores` cores logged a line containing `what` (each
/// such line is logged once per core in the test below).
fn wait_for_every_core(server: &mut Server, cores: u32, what: &str) {
    for core in 0..cores {
        let field = format!(" core={core}");
        server.wait_for_log(|l| l.contains(what) && l.contains(&field));
    }
}

/// Goal: certificate renewal without dropping anyone. Method: ternd starts with
/// certificate A on two cores; a client pinning A authenticates; A's files are replaced
/// by B's and ternd gets SIGHUP; once every core logged the reload, the old connection
/// still answers pings, a client pinning B connects (TLS and WebSocket over TLS) and one
/// pinning only A is refused. Then a broken pair and another SIGHUP: every core logs an
/// error and keeps B.
#[test]
fn sighup_reloads_the_certificate_for_new_connections_only() {
    let dir = data_dir();
    let certs = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let (cert_a, key_a) = certificate();
    let (cert_b, key_b) = certificate();
    std::fs::write(&cert_path, &cert_a).unwrap();
    std::fs::write(&key_path, &key_a).unwrap();
    let (cert_arg, key_arg) = (cert_path.to_str().unwrap(), key_path.to_str().unwrap());
    let args = ["--tls-cert", cert_arg, "--tls-key", key_arg, "--cores", "2"];
    let mut server = Server::start(dir.path(), &args);
    let alice = register(&mut server, "+15550231", 0);
    // One connection per device: the new connections log in as Bob, not over Alice's.
    let bob = register(&mut server, "+15550232", 0);
    let tls13 = [&rustls::version::TLS13];
    let mut old = Client::connect_tls_with(server.tls_addr, pinning(&cert_a, &tls13));
    authenticate_ping(&mut old, alice, 1);

    replace(&cert_path, &cert_b);
    replace(&key_path, &key_b);
    server.signal("HUP");
    wait_for_every_core(&mut server, 2, "TLS certificate reloaded");

    old.request(&Ping { nonce: 2 }).access::<Pong>();
    // The kernel spreads connections over the cores: a few tries reach both.
    for nonce in 0..4 {
        let mut new = Client::connect_tls_with(server.tls_addr, pinning(&cert_b, &tls13));
        authenticate_ping(&mut new, bob, nonce);
        let refused = tls_handshake(server.tls_addr, pinning(&cert_a, &tls13));
        let error = refused.expect_err("a client pinning only the old certificate");
        assert!(error.to_string().contains("certificate"), "{error}");
    }
    let mut wss = wss_client(&server, &cert_b);
    authenticate_ping(&mut wss, bob, 9);

    // A broken renewal: a key that does not belong to the certificate.
    let (_, key_c) = certificate();
    replace(&key_path, &key_c);
    server.signal("HUP");
    wait_for_every_core(&mut server, 2, "TLS certificate reload failed");
    let mut new = Client::connect_tls_with(server.tls_addr, pinning(&cert_b, &tls13));
    authenticate_ping(&mut new, bob, 10);
    old.request(&Ping { nonce: 11 }).access::<Pong>();
}

fn authenticate_ping(client: &mut Client, account: Account, nonce: u64) {
    let ok = client.request(&Auth {
        user_id: account.user_id,
        device_id: account.device_id,
        token: account.token,
    });
    ok.access::<AuthOk>();
    client.request(&Ping { nonce }).access::<Pong>();
}

/// A WebSocket-over-TLS client pinning `cert_pem`.
fn wss_client(server: &Server, cert_pem: &str) -> Client {
    let config = pinning(cert_pem, &[&rustls::version::TLS13]);
    Client::connect_ws_with(server.wss_addr, Some(config))
}
