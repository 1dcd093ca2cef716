//! The SDK when the network, the server or a sender is hostile (issue 20, items 10 to
//! 12), against a real `ternd` and, where the server itself must misbehave, raw devices
//! and relays that do what a malicious server could.
//!
//! - A device keeps the transport and trust root it registered with: reopening it
//!   without an endpoint is TLS with the same pinned certificate, and a plaintext or
//!   differently trusted endpoint is refused before a byte is sent (item 11).

use std::path::Path;

use tern_client::connection::Endpoint;
use tern_client::{Client, ClientError, PendingRegistration, StoreSecret, Trust};
use tern_testkit::Server;

fn secret() -> StoreSecret {
    StoreSecret::Passphrase("correct horse battery staple".into())
}

fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

async fn register_at(
    server: &mut Server,
    endpoint: &Endpoint,
    stores: &Path,
    name: &str,
    phone: &str,
) -> Client {
    let pending = PendingRegistration::request_code(endpoint, phone).await.unwrap();
    let code = server.code_for(phone);
    let path = stores.join(format!("{name}.db"));
    pending.verify(&code, name, &path, &secret()).await.unwrap()
}

async fn register(server: &mut Server, stores: &Path, name: &str, phone: &str) -> Client {
    let endpoint = Endpoint::tcp(server.addr.to_string());
    register_at(server, &endpoint, stores, name, phone).await
}

/// Registered over TLS with a pinned certificate, a device reconnects over TLS with that
/// certificate's bytes, even when opened without an endpoint (before: plain TCP to the
/// registration's address, so the token would have crossed in clear) or after the file
/// changed; an endpoint without TLS, or trusting something else, is refused.
#[tokio::test(flavor = "current_thread")]
async fn a_device_keeps_the_transport_and_trust_root_it_registered_with() {
    let data = data_dir();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let certificate = stores.path().join("server.pem");
    std::fs::copy(server.data_dir.join("tls/dev-cert.pem"), &certificate).unwrap();
    let tls = Endpoint {
        tls: Some(Trust::Pinned(certificate.clone())),
        ..Endpoint::tcp(server.tls_addr.to_string())
    };
    let alice = register_at(&mut server, &tls, stores.path(), "alice", "+15581101").await;
    let bob = register(&mut server, stores.path(), "bob", "+15581102").await;
    let bob_id = bob.user_id();
    drop((alice, bob));
    // The pinned file is replaced: the device still trusts what it registered with.
    std::fs::write(&certificate, b"not a certificate").unwrap();

    let path = stores.path().join("alice.db");
    let mut alice = Client::open(&path, &secret(), None).await.unwrap();
    assert!(matches!(alice.endpoint().tls, Some(Trust::Certificate(_))), "{:?}", alice.endpoint());
    assert_eq!(alice.endpoint().address, server.tls_addr.to_string());
    alice.send_text(bob_id, "over tls").await.unwrap();
    drop(alice);

    let plain = Endpoint::tcp(server.addr.to_string());
    let web_pki = Endpoint { tls: Some(Trust::WebPki), ..tls.clone() };
    for endpoint in [plain, web_pki] {
        let refused = Client::open(&path, &secret(), Some(endpoint.clone())).await;
        let refused = refused.map(|_| ());
        assert!(
            matches!(refused, Err(ClientError::TransportChanged { .. })),
            "{endpoint:?}: {refused:?}"
        );
    }
}
