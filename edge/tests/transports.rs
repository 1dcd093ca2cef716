//! The same protocol over TLS 1.3 (with the development certificate pinned), and refusal
//! of clients that offer only older TLS versions.

mod common;

use std::io::Write;
use std::net::TcpStream;

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
