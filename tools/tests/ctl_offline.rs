//! `ternctl`'s offline commands against data a real `ternd` wrote through the SDK: what
//! `inspect`, `mailboxes`, `user`, `reports` and `dump` say agrees with what was put
//! in; `dump` never prints ciphertext; the commands leave the directory byte for byte as
//! it was; `verify` passes a clean directory and names a flipped byte; a backup taken
//! while a load runs restores to a server that delivers every message acknowledged
//! before the backup began.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use tern_client::connection::Endpoint;
use tern_client::{Client, Event, PendingRegistration, StoreSecret};
use tern_engine::record::{scan_segment, RecordType};
use tern_testkit::{Server, TIMEOUT};
use tern_wire::messages::ReportReason;

fn secret() -> StoreSecret {
    StoreSecret::Key([7; 32])
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

/// Runs `ternctl` and returns (exit code, stdout, stderr).
fn ternctl(args: &[&dyn AsRef<std::ffi::OsStr>]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_ternctl"))
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .expect("ternctl runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (output.status.code().unwrap_or(-1), text(&output.stdout), text(&output.stderr))
}

fn ternctl_ok(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let (code, out, err) = ternctl(args);
    assert_eq!(code, 0, "ternctl failed:\n{out}\n{err}");
    out
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

/// Every file under `dir` with its SHA-256.
fn fingerprint(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let hash = hex::encode(Sha256::digest(std::fs::read(&path).unwrap()));
                files.insert(path, hash);
            }
        }
    }
    files
}

/// The bodies of every envelope stored in the segments of `dir` (read with the engine's
/// own scanner, independently of `ternctl`).
fn stored_bodies(dir: &Path) -> Vec<Vec<u8>> {
    let mut bodies = Vec::new();
    for (path, _) in fingerprint(dir) {
        if !path.to_string_lossy().ends_with(".log") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let scan = scan_segment(&bytes).unwrap();
        for record in scan.records.iter().filter(|r| r.header.record_type == RecordType::Envelope) {
            let record = rkyv::access::<
                tern_engine::body::ArchivedEnvelopeRecord,
                rkyv::rancor::Failure,
            >(record.body)
            .unwrap();
            let envelope = rkyv::access::<
                tern_wire::messages::ArchivedEnvelope,
                rkyv::rancor::Failure,
            >(&record.envelope)
            .unwrap();
            bodies.push(envelope.body.to_vec());
        }
    }
    bodies
}

#[tokio::test]
async fn offline_commands_agree_with_the_server_and_never_show_ciphertext() {
    let dir = data_dir();
    let stores = data_dir();
    let mut server = Server::start(dir.path(), &["--cores", "1"]);
    let mut alice = register(&mut server, stores.path(), "alice", "+15550100001").await;
    let mut bob = register(&mut server, stores.path(), "bob", "+15550100002").await;
    let (alice_id, bob_id) = (alice.user_id(), bob.user_id());
    let group_id = alice.create_group("walkers", &[bob_id]).await.unwrap();
    bob.report(alice_id, &[], ReportReason::Spam, "test report").await.unwrap();
    drop(bob); // Bob goes offline: what Alice sends now waits in his mailbox.
    for i in 0..5 {
        alice.send_text(bob_id, &format!("queued {i}")).await.unwrap();
    }
    let d = dir.path();

    // Beside the live server.
    let top = ternctl_ok(&[&"mailboxes", &d, &"--top", &"5"]);
    let bob_row = top
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{bob_id}:1 ")))
        .unwrap_or_else(|| panic!("no row for Bob in\n{top}"));
    let queued: u64 = bob_row.split_whitespace().nth(2).unwrap().parse().unwrap();
    let dumped = json_lines(&ternctl_ok(&[&"dump", &d, &"--mailbox", &format!("{bob_id}:1")]));
    assert_eq!(dumped.len() as u64, queued, "mailboxes and dump agree");
    let texts = dumped
        .iter()
        .filter(|e| e["envelope"]["sender"] == format!("{alice_id}:1"))
        .filter(|e| e["envelope"]["kind"] == "Text")
        .count();
    assert_eq!(texts, 5, "Alice's five messages wait for Bob");

    let users: Vec<serde_json::Value> = [alice_id, bob_id]
        .iter()
        .map(|id| {
            let out = ternctl_ok(&[&"user", &d, &"--id", &id.to_string()]);
            serde_json::from_str(&out).unwrap()
        })
        .collect();
    let by_phone: serde_json::Value =
        serde_json::from_str(&ternctl_ok(&[&"user", &d, &"--phone", &"+15550100001"])).unwrap();
    assert_eq!(by_phone["user_id"], alice_id);
    assert_eq!(users[0]["phone"], "+15550100001");
    assert_eq!(users[0]["groups"][0]["group_id"], group_id);
    assert_eq!(users[0]["groups"][0]["admin"], true);
    assert_eq!(users[1]["groups"][0]["admin"], false);
    assert_eq!(users[1]["devices"][0]["queued"], queued);
    // Alice claimed one of Bob's one-time keys to reach him; nobody claimed hers.
    let stock = |u: &serde_json::Value| u["devices"][0]["one_time_keys"].as_u64().unwrap();
    assert_eq!(stock(&users[1]) + 1, stock(&users[0]));
    let (code, _, err) = ternctl(&[&"user", &d, &"--phone", &"+15559999999"]);
    assert_eq!(code, 1, "an unknown user is a problem: {err}");

    let reports = json_lines(&ternctl_ok(&[&"reports", &d]));
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0]["reporter"], bob_id);
    assert_eq!(reports[0]["reported"], alice_id);
    assert_eq!(reports[0]["reason"], "Spam");

    let inspected: serde_json::Value =
        serde_json::from_str(&ternctl_ok(&[&"inspect", &d, &"--json"])).unwrap();
    let sum = |field: &str| -> u64 {
        inspected["shards"].as_array().unwrap().iter().map(|s| s[field].as_u64().unwrap()).sum()
    };
    assert_eq!(sum("accounts"), 2);
    assert_eq!(sum("groups"), 1);
    assert_eq!(sum("reports"), 1);
    assert!(sum("queued_envelopes") >= queued);
    // Times are dates for people (the tables), milliseconds for machines (the JSON).
    let table = ternctl_ok(&[&"inspect", &d]);
    let first = table.lines().next().unwrap();
    assert!(first.contains(" created 20") && first.ends_with(" UTC"), "{first}");
    drop(alice);
    server.terminate();

    // Read-only: every command leaves every byte where it was.
    let before = fingerprint(d);
    let mut all_output = String::new();
    for args in [
        vec!["inspect"],
        vec!["verify", "--quiet"],
        vec!["mailboxes"],
        vec!["reports"],
        vec!["dump", "--mailbox", &bob_id.to_string()],
    ] {
        let mut full: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&args[0], &d];
        full.extend(args[1..].iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
        all_output.push_str(&ternctl_ok(&full));
    }
    for shard in 0..8 {
        let (_, out, _) =
            ternctl(&[&"dump", &d, &"--shard", &shard.to_string(), &"--segment", &"1"]);
        all_output.push_str(&out);
    }
    assert_eq!(fingerprint(d), before, "ternctl wrote to the data directory");

    // No ciphertext in any output: not raw, not hex, not base64; only length + hash.
    let bodies = stored_bodies(d);
    assert!(bodies.len() >= 5);
    for body in bodies.iter().filter(|b| b.len() >= 16) {
        let hash = hex::encode(Sha256::digest(body));
        assert!(all_output.contains(&hash), "each body appears as its SHA-256");
        let sample = &body[body.len() / 2 - 8..body.len() / 2 + 4];
        assert!(!all_output.contains(&hex::encode(sample)));
        use base64::Engine as _;
        for engine in [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::STANDARD_NO_PAD,
        ] {
            assert!(!all_output.contains(&engine.encode(&body[..12])));
        }
        assert!(!all_output.as_bytes().windows(12).any(|w| w == sample));
    }
}

#[tokio::test]
async fn verify_passes_a_clean_dir_and_names_a_flipped_byte() {
    let dir = data_dir();
    let stores = data_dir();
    let mut server = Server::start(
        dir.path(),
        &["--cores", "1", "--segment-mib", "1", "--sends-per-second", "100000"],
    );
    let mut alice = register(&mut server, stores.path(), "alice", "+15550200001").await;
    let bob = register(&mut server, stores.path(), "bob", "+15550200002").await;
    let bob_id = bob.user_id();
    drop(bob);
    // Enough queued mail for Bob to fill more than one 1 MiB segment of his shard.
    let long = "x".repeat(3000);
    for i in 0..450 {
        alice.send_text(bob_id, &format!("{i} {long}")).await.unwrap();
    }
    drop(alice);
    server.terminate();
    let d = dir.path();
    let out = ternctl_ok(&[&"verify", &d, &"--quiet"]);
    assert!(out.starts_with("ok:"), "{out}");

    // Flip one byte inside an envelope body of a sealed segment.
    let (shard_dir, segment) = std::fs::read_dir(d)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.file_name().unwrap().to_string_lossy().starts_with("shard-"))
        .find_map(|p| {
            let first = p.join("seg-00000000000000000001.log");
            p.join("seg-00000000000000000002.log").exists().then_some((p, first))
        })
        .expect("a shard with a sealed segment");
    let mut bytes = std::fs::read(&segment).unwrap();
    let (offset, record_bytes) = {
        let scan = scan_segment(&bytes).unwrap();
        let record = scan
            .records
            .iter()
            .filter(|r| r.header.record_type == RecordType::Envelope)
            .nth(3)
            .expect("envelopes in the sealed segment");
        (record.offset as usize, record.header.record_bytes())
    };
    bytes[offset + record_bytes - 20] ^= 0x40;
    std::fs::write(&segment, &bytes).unwrap();

    let (code, out, _) = ternctl(&[&"verify", &d, &"--quiet"]);
    assert_eq!(code, 1, "{out}");
    let shard: u32 = shard_dir.file_name().unwrap().to_string_lossy()[6..].parse().unwrap();
    let expected = format!("CORRUPT shard {shard} segment 1 offset {offset}:");
    assert!(out.contains(&expected), "expected {expected:?} in\n{out}");
    let (code, _, _) = ternctl(&[&"dump", &d, &"--shard", &shard.to_string(), &"--segment", &"1"]);
    assert_eq!(code, 1, "dump reports the corrupt record too");
}

#[tokio::test]
async fn a_backup_taken_under_load_restores_every_acknowledged_message() {
    let dir = data_dir();
    let stores = data_dir();
    let backup = data_dir();
    let backup_dir = backup.path().join("copy");
    let mut server =
        Server::start(dir.path(), &["--cores", "2", "--maintenance-interval-s", "0.2"]);
    let mut alice = register(&mut server, stores.path(), "alice", "+15550300001").await;
    let bob = register(&mut server, stores.path(), "bob", "+15550300002").await;
    let bob_id = bob.user_id();
    drop(bob);
    let mut sent = 0;
    for _ in 0..50 {
        alice.send_text(bob_id, &format!("m{sent}")).await.unwrap();
        sent += 1;
    }
    // Every message acknowledged so far must survive in the backup; the load goes on
    // while it is taken (and checkpoints and reclaim run every 0.2 s).
    let acked_before_backup = sent;
    let (source, target) = (dir.path().to_path_buf(), backup_dir.clone());
    let copying = tokio::task::spawn_blocking(move || ternctl(&[&"backup", &source, &target]));
    while !copying.is_finished() {
        alice.send_text(bob_id, &format!("m{sent}")).await.unwrap();
        sent += 1;
    }
    let (code, out, err) = copying.await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    drop(alice);
    server.terminate();

    assert!(ternctl_ok(&[&"verify", &backup_dir, &"--quiet"]).starts_with("ok:"));
    let restored = Server::start(&backup_dir, &["--cores", "1"]);
    let endpoint = Endpoint::tcp(restored.addr.to_string());
    let mut bob =
        Client::open(&stores.path().join("bob.db"), &secret(), Some(endpoint)).await.unwrap();
    let mut received = Vec::new();
    while received.len() < acked_before_backup {
        let event = tokio::time::timeout(TIMEOUT, bob.next_event()).await;
        match event.expect("Bob receives the backed-up messages in time").unwrap() {
            Event::Message(message) => received.push(message.text),
            _ => continue,
        }
    }
    let expected: Vec<String> = (0..acked_before_backup).map(|i| format!("m{i}")).collect();
    assert_eq!(received[..acked_before_backup], expected[..], "in order, none missing");
}
