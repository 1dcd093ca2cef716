//! Clients find their home node: two `ternd` nodes of one cluster on a real etcd
//! (`tern_testkit::etcd`). Before the cluster has its initial nodes a request gets
//! `ShardUnavailable` with a retry hint; once shards are placed, registering through
//! either node lands on the node that owns the number (the SDK follows the `Redirect`),
//! an account's later connections through the other node are redirected to its home and
//! the SDK remembers it, a raw `Auth` at the wrong node gets the typed `Redirect` naming
//! the owner, and two users homed on one node chat there. A node whose etcd cannot be
//! reached refuses to start, saying so.

use std::path::Path;
use std::time::Duration;

use tern_client::connection::Endpoint;
use tern_client::{Client, ClientError, Event, PendingRegistration, Status, StoreSecret};
use tern_testkit::etcd::Etcd;
use tern_testkit::Server;
use tern_wire::ErrorCode;

const WAIT: Duration = Duration::from_secs(15);

fn secret() -> StoreSecret {
    StoreSecret::Key([5; 32])
}

fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn node(etcd: &Etcd, data: &Path, id: &str) -> Server {
    let url = format!("etcd://{}/chat", etcd.endpoint);
    let args = ["--cores", "1", "--cluster", &url, "--node-id", id, "--cluster-initial-nodes", "2"];
    Server::start(data, &args)
}

/// Registers `phone` through `entry`; the code comes from whichever node the SDK was
/// sent to. Returns the client and whether it was redirected to `other`.
async fn register(entry: &mut Server, other: &mut Server, stores: &Path, phone: &str) -> Client {
    let endpoint = Endpoint::tcp(entry.addr.to_string());
    let pending = PendingRegistration::request_code(&endpoint, phone).await.unwrap();
    let home = if pending.endpoint().address == other.addr.to_string() { other } else { entry };
    assert_eq!(pending.endpoint().address, home.addr.to_string());
    let code = home.code_for(phone);
    let store = stores.join(format!("{phone}.db"));
    pending.verify(&code, phone, &store, &secret()).await.unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn clients_are_sent_to_their_home_node() {
    let Some(etcd) = Etcd::start() else { return };
    let (data_a, data_b, stores) = (data_dir(), data_dir(), tempfile::tempdir().unwrap());
    let mut a = node(&etcd, data_a.path(), "a");

    // One node of the two the cluster waits for: no shard is placed, and saying so is
    // a typed answer with a retry hint, not a hang or a closed socket.
    let at_a = Endpoint::tcp(a.addr.to_string());
    match PendingRegistration::request_code(&at_a, "+15590001").await {
        Err(ClientError::Server { code: ErrorCode::ShardUnavailable, retry_after_ms, .. }) => {
            assert_eq!(retry_after_ms, 1000)
        }
        other => panic!("expected ShardUnavailable, got {other:?}"),
    }

    let mut b = node(&etcd, data_b.path(), "b");
    wait_for_placement([&mut a, &mut b]);

    // Registering through node a: numbers owned by b end on b, the others stay on a.
    let (mut on_b, mut on_a) = (Vec::new(), Vec::new());
    for n in 0..40 {
        if on_b.len() == 2 && !on_a.is_empty() {
            break;
        }
        let client = register(&mut a, &mut b, stores.path(), &format!("+1559100{n:04}")).await;
        if client.endpoint().address == b.addr.to_string() {
            on_b.push(client);
        } else {
            assert_eq!(client.endpoint().address, a.addr.to_string());
            on_a.push(client);
        }
    }
    assert!(on_b.len() == 2 && !on_a.is_empty(), "numbers on both nodes among 40");
    let (admin, metrics) = a.admin_get("/metrics");
    assert!(admin.contains("200"), "{admin}");
    let redirects: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("tern_redirects_total"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert!(redirects >= 2.0, "{metrics}");

    // Two users homed on b chat there, with the sent tick and delivery.
    let mut bob = on_b.pop().unwrap();
    let mut alice = on_b.pop().unwrap();
    let sent = alice.send_text(bob.user_id(), "hello from b").await.unwrap();
    assert_ne!(sent.server_id, 0, "sent tick");
    let event = tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Message(message) = bob.next_event().await.unwrap() {
                return message;
            }
        }
    });
    assert_eq!(event.await.expect("delivered in time").text, "hello from b");
    across_nodes(&mut alice, &on_a[0]).await;

    // Alice's device opened with node a's address: its connection is redirected home,
    // and the store remembers b for the next start without an address.
    let store = stores.path().join(format!("{}.db", alice_phone(&alice)));
    drop(alice);
    let reopened =
        Client::open(&store, &secret(), Some(Endpoint::tcp(a.addr.to_string()))).await.unwrap();
    assert_eq!(reopened.endpoint().address, b.addr.to_string());
    drop(reopened);
    let later = Client::open(&store, &secret(), None).await.unwrap();
    assert_eq!(later.endpoint().address, b.addr.to_string());
    drop(later);
    drop((a, b, etcd));
}

/// A message to a user homed on the other node: nodes do not reach each other yet, so
/// it must wait (the typed, passing `ShardUnavailable`), never be lost or be refused as
/// if the user did not exist.
async fn across_nodes(sender: &mut Client, other: &Client) {
    let waiting = sender.send_text(other.user_id(), "across nodes").await.unwrap();
    assert_eq!((waiting.status, waiting.server_id), (Status::Sending, 0), "{waiting:?}");
    let history = sender.history(other.user_id(), 10).unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].status, Status::Sending, "kept to be sent again: {history:?}");
    assert_eq!(sender.failure(waiting.client_id).unwrap(), None);
}

/// Waits until each node serves its 2 of the 4 shards (each logs it once its cores
/// have the map).
fn wait_for_placement(nodes: [&mut Server; 2]) {
    for node in nodes {
        node.wait_for_log(|l| l.contains("serving the cluster's shards") && l.contains("placed=4"));
    }
}

/// The phone a test client registered with (its store is named after it).
fn alice_phone(client: &Client) -> String {
    client.own_phone().unwrap().expect("registered with a phone")
}

#[test]
fn a_node_that_cannot_reach_etcd_does_not_start() {
    let data = data_dir();
    let nobody = format!("127.0.0.1:{}", tern_testkit::free_port());
    let output = std::process::Command::new(tern_testkit::ternd_binary())
        .arg("--data-dir")
        .arg(data.path())
        .args(["--listen", "127.0.0.1:0", "--admin", "off", "--tls-listen", "off"])
        .args(["--ws-listen", "off", "--wss-listen", "off", "--node-id", "a"])
        .args(["--cluster", &format!("etcd://{nobody}/chat")])
        .output()
        .expect("ternd runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--cluster: etcd failed while"), "{stderr}");
}
