//! `tern`, the chat CLI, as a person uses it in two terminals: register two users,
//! send, chat (from a pipe), history, search and safety numbers, against a real `ternd`.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};

use tern_testkit::{Server, TIMEOUT};

/// A running `tern` with its output read line by line.
struct Tern {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
}

fn tern(server: &Server, store: &Path, args: &[&str]) -> Tern {
    tern_with(server, store, "a passphrase", args)
}

fn tern_with(server: &Server, store: &Path, passphrase: &str, args: &[&str]) -> Tern {
    let address = server.addr.to_string();
    tern_raw(store, passphrase, &[&["--server", &*address], args].concat())
}

/// `tern` with exactly these arguments (no `--server` added).
fn tern_raw(store: &Path, passphrase: &str, args: &[&str]) -> Tern {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("--store")
        .arg(store)
        .args(args)
        .env("TERN_PASSPHRASE", passphrase)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tern starts");
    let (tx, lines) = channel();
    for output in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    let stdin = child.stdin.take();
    Tern { child, stdin, lines, seen: Vec::new() }
}

impl Tern {
    /// Waits for an output line containing `text`.
    fn expect(&mut self, text: &str) -> String {
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            if let Some(line) = self.seen.iter().find(|l| l.contains(text)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("no line with {text:?}; output so far:\n{}", self.seen.join("\n")),
            }
        }
    }

    fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes stdin and waits for the exit; returns whether it succeeded.
    fn finish(mut self) -> (bool, Vec<String>) {
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(std::time::Instant::now() < deadline, "tern did not exit");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        while let Ok(line) = self.lines.recv_timeout(std::time::Duration::from_millis(200)) {
            self.seen.push(line);
        }
        (status.success(), self.seen)
    }
}

fn register(server: &mut Server, store: &Path, phone: &str) -> u64 {
    let mut run = tern(server, store, &["register", "--phone", phone]);
    run.expect("a code was sent");
    let code = server.code_for(phone);
    run.type_line(&code);
    let line = run.expect("registered: user");
    let (ok, _) = run.finish();
    assert!(ok);
    let after = line.split("registered: user ").nth(1).unwrap();
    after.split_whitespace().next().unwrap().parse().unwrap()
}

fn one_shot(server: &Server, store: &Path, args: &[&str]) -> Vec<String> {
    let (ok, lines) = tern(server, store, args).finish();
    assert!(ok, "tern {args:?} failed:\n{}", lines.join("\n"));
    lines
}

#[test]
fn two_people_chat_in_two_terminals() {
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let (alice_db, bob_db) = (stores.path().join("alice.db"), stores.path().join("bob.db"));
    let alice = register(&mut server, &alice_db, "+15590001");
    let bob = register(&mut server, &bob_db, "+15590002");

    let sent = one_shot(&server, &alice_db, &["send", "--to", &bob.to_string(), "hello", "bob"]);
    assert!(sent.iter().any(|l| l.contains("✓ sent")), "{sent:?}");

    // Bob opens the chat: the message arrives live; he answers.
    let mut chat = tern(&server, &bob_db, &["chat", "--with", &alice.to_string()]);
    chat.expect(&format!("{alice}: hello bob"));
    chat.type_line("hi alice");
    chat.expect("me: hi alice ✓");
    let (ok, _) = chat.finish();
    assert!(ok);

    // Alice's chat shows Bob's answer, and her message's ticks move to read.
    let mut chat = tern(&server, &alice_db, &["chat", "--with", &bob.to_string()]);
    chat.expect(&format!("{bob}: hi alice"));
    chat.expect("me: hello bob ✓✓ read");
    chat.finish();

    let history = one_shot(&server, &alice_db, &["history", "--with", &bob.to_string()]);
    assert!(history.iter().any(|l| l.contains("me: hello bob ✓✓ read")), "{history:?}");
    assert!(history.iter().any(|l| l.contains(&format!("{bob}: hi alice"))), "{history:?}");
    let found = one_shot(&server, &bob_db, &["search", "hello"]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("hello bob"));

    let from_alice = one_shot(&server, &alice_db, &["safety-number", "--with", &bob.to_string()]);
    let from_bob = one_shot(&server, &bob_db, &["safety-number", "--with", &alice.to_string()]);
    assert_eq!(from_alice, from_bob);
    assert_eq!(from_alice[0].split(' ').count(), 12);

    let (ok, lines) = tern_with(&server, &bob_db, "not the passphrase", &["whoami"]).finish();
    assert!(!ok);
    assert!(lines.iter().any(|l| l.contains("wrong passphrase")), "{lines:?}");
}

#[test]
fn a_linked_laptop_gets_the_history_from_the_command_line() {
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let (alice_db, bob_db) = (stores.path().join("alice.db"), stores.path().join("bob.db"));
    let laptop_db = stores.path().join("laptop.db");
    register(&mut server, &alice_db, "+15594000001");
    let bob = register(&mut server, &bob_db, "+15594000002");
    one_shot(&server, &alice_db, &["send", "--to", &bob.to_string(), "before", "the", "laptop"]);

    let mut linking = tern(&server, &laptop_db, &["link", "--name", "laptop"]);
    let line = linking.expect("tern approve ");
    let code = line.rsplit(' ').next().unwrap().to_string();
    one_shot(&server, &alice_db, &["approve", &code]);
    linking.expect("linked:");
    assert!(linking.finish().0);

    let sent = one_shot(&server, &alice_db, &["devices", "--send-history", "2"]);
    assert!(sent.iter().any(|l| l.contains("sent 1 messages of history to device 2")), "{sent:?}");
    let mut chat = tern(&server, &laptop_db, &["chat", "--with", &bob.to_string()]);
    chat.expect("imported 1 messages of history from device 1");
    chat.finish();
    let history = one_shot(&server, &laptop_db, &["history", "--with", &bob.to_string()]);
    assert!(history.iter().any(|l| l.contains("me: before the laptop")), "{history:?}");
}

#[test]
fn a_group_from_the_command_line() {
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let dbs: Vec<_> = ["alice", "bob", "carol"].iter().map(|n| stores.path().join(n)).collect();
    let ids: Vec<u64> = dbs
        .iter()
        .enumerate()
        .map(|(i, db)| register(&mut server, db, &format!("+1559100000{i}")))
        .collect();
    let members = format!("{},{}", ids[1], ids[2]);
    let created =
        one_shot(&server, &dbs[0], &["group", "create", "--name", "club", "--members", &members]);
    let line = created.iter().find(|l| l.starts_with("created group")).expect("a group id");
    let group = line.rsplit(' ').next().unwrap().to_string();

    let sent = one_shot(&server, &dbs[0], &["group", "send", &group, "hello", "club"]);
    assert!(sent.iter().any(|l| l.contains("✓ sent")), "{sent:?}");
    for db in &dbs[1..] {
        let shown = one_shot(&server, db, &["group", "show", &group]);
        assert!(shown.iter().any(|l| l.contains("\"club\"")), "{shown:?}");
        assert!(shown.iter().any(|l| l.contains(&format!("{}: hello club", ids[0]))), "{shown:?}");
    }
    let shown = one_shot(&server, &dbs[0], &["group", "show", &group]);
    assert!(
        shown.iter().any(|l| l.contains("me: hello club") && l.contains("2 delivered")),
        "{shown:?}"
    );

    // Carol is no admin: she cannot remove Bob.
    let (ok, lines) =
        tern(&server, &dbs[2], &["group", "remove", &group, &ids[1].to_string()]).finish();
    assert!(!ok);
    assert!(lines.iter().any(|l| l.contains("NotAdmin")), "{lines:?}");
}

#[test]
fn a_file_with_send_and_get() {
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let (alice_db, bob_db) = (stores.path().join("alice.db"), stores.path().join("bob.db"));
    let _alice = register(&mut server, &alice_db, "+15592000001");
    let bob = register(&mut server, &bob_db, "+15592000002");
    let voice = stores.path().join("voice-note.ogg");
    let bytes: Vec<u8> =
        (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&voice, &bytes).unwrap();
    let file = voice.to_str().unwrap();
    let sent = one_shot(&server, &alice_db, &["send", "--to", &bob.to_string(), "--file", file]);
    assert!(sent.iter().any(|l| l.contains("✓ sent") && l.contains("voice-note.ogg")), "{sent:?}");
    let id = sent[0].split("(id ").nth(1).unwrap().split(')').next().unwrap().to_string();
    let out = tempfile::tempdir().unwrap();
    let got = one_shot(&server, &bob_db, &["get", &id, "--out", out.path().to_str().unwrap()]);
    assert!(got.iter().any(|l| l.starts_with("saved")), "{got:?}");
    assert!(std::fs::read(out.path().join("voice-note.ogg")).unwrap() == bytes);
}

#[test]
fn discovery_profiles_and_blocks_from_the_command_line() {
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let (alice_db, bob_db) = (stores.path().join("alice.db"), stores.path().join("bob.db"));
    let alice = register(&mut server, &alice_db, "+15593000001");
    let bob = register(&mut server, &bob_db, "+15593000002");
    let found = one_shot(&server, &alice_db, &["discover", "+15593000002", "+15593999999"]);
    assert!(found.contains(&format!("+15593000002: user {bob}")), "{found:?}");
    assert!(found.contains(&"+15593999999: not on Tern".to_string()), "{found:?}");

    one_shot(&server, &bob_db, &["profile", "--name", "Bob B.", "--about", "hello"]);
    let hidden = one_shot(&server, &alice_db, &["profile", &bob.to_string()]);
    assert!(hidden.iter().any(|l| l.contains("(hidden or unset)")), "not a contact: {hidden:?}");
    one_shot(&server, &bob_db, &["contacts", &alice.to_string()]);
    let shown = one_shot(&server, &alice_db, &["profile", &bob.to_string()]);
    assert!(shown.iter().any(|l| l.contains("name:  Bob B.")), "{shown:?}");
    one_shot(&server, &bob_db, &["block", &alice.to_string()]);
    let hidden = one_shot(&server, &alice_db, &["profile", &bob.to_string()]);
    assert!(hidden.iter().any(|l| l.contains("name:  (hidden or unset)")), "{hidden:?}");
    let devices = one_shot(&server, &alice_db, &["devices"]);
    assert!(
        devices.iter().any(|l| l.contains("device 1") && l.contains("(primary)")),
        "{devices:?}"
    );
}

#[test]
fn proof_of_work_lock_and_export_from_the_command_line() {
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let stores = tempfile::tempdir().unwrap();
    // This server asks for a proof of work before sending a code: `tern` solves it.
    let mut server = Server::start(data.path(), &["--code-pow-bits", "12"]);
    let db = stores.path().join("alice.db");
    let alice = register(&mut server, &db, "+15594000001");
    let locked = one_shot(&server, &db, &["lock", "--pin", "9753"]);
    assert!(locked.contains(&"registration lock set".to_string()), "{locked:?}");
    let out = tempfile::tempdir().unwrap();
    let saved = one_shot(&server, &db, &["export", "--out", out.path().to_str().unwrap()]);
    assert!(saved.iter().any(|l| l.starts_with("saved")), "{saved:?}");
    let export =
        std::fs::read_to_string(out.path().join(format!("tern-export-{alice}.json"))).unwrap();
    assert!(export.contains("\"phone\":\"+15594000001\""), "{export}");
}

fn ids_of(line: &str) -> u64 {
    let after = line.split("user ").nth(1).unwrap();
    after.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn misleading_errors_say_what_to_do() {
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let (alice_db, bob_db) = (stores.path().join("alice.db"), stores.path().join("bob.db"));

    // A wrong verification code asks again instead of ending the registration.
    let mut run = tern(&server, &alice_db, &["register", "--phone", "+15595000001"]);
    run.expect("a code was sent");
    let code = server.code_for("+15595000001");
    let wrong = if code == "000000" { "111111" } else { "000000" };
    run.type_line(wrong);
    run.expect("that code is not right; type it again");
    run.type_line(&code);
    let alice = ids_of(&run.expect("registered: user"));
    assert!(run.finish().0);
    let bob = register(&mut server, &bob_db, "+15595000002");

    // whoami says the phone number too (offline: no connection needed).
    let me = one_shot(&server, &alice_db, &["whoami"]);
    assert!(me[0].contains(&format!("user {alice} device 1 phone +15595000001")), "{me:?}");

    // chat --with a user id that does not exist is refused at once, saying why.
    let nobody = (bob + 7919).to_string();
    let (ok, lines) = tern(&server, &alice_db, &["chat", "--with", &nobody]).finish();
    assert!(!ok);
    assert!(lines.iter().any(|l| l.contains(&format!("there is no user {nobody}"))), "{lines:?}");

    // A send to no one fails that message only; the next send works; history says why.
    let (ok, lines) = tern(&server, &alice_db, &["send", "--to", &nobody, "hello?"]).finish();
    assert!(!ok);
    assert!(lines.iter().any(|l| l.contains("not sent: no such user")), "{lines:?}");
    let sent = one_shot(&server, &alice_db, &["send", "--to", &bob.to_string(), "hi", "bob"]);
    assert!(sent.iter().any(|l| l.contains("✓ sent") && l.contains("hi bob")), "{sent:?}");
    let failed = one_shot(&server, &alice_db, &["history", "--with", &nobody]);
    assert!(failed[0].contains("hello? ✗ not sent: no such user"), "{failed:?}");
    // A note to self is kept, and a text over the limit is refused before it is queued.
    let note = one_shot(&server, &alice_db, &["send", "--to", &alice.to_string(), "note"]);
    assert!(note[0].contains("✓ sent") && note[0].contains("yourself"), "{note:?}");
    let long = "x".repeat(70_000);
    let (ok, lines) = tern(&server, &alice_db, &["send", "--to", &bob.to_string(), &long]).finish();
    assert!(!ok);
    assert!(lines.iter().any(|l| l.contains("send it as a file")), "{lines:?}");

    // Ports that speak something else: the message names the option to change.
    let cases = [
        (server.tls_addr, vec![], "add --tls"),
        (server.ws_addr, vec![], "speaks WebSocket: add --websocket"),
        (server.admin, vec![], "answers HTTP: it is no client port"),
        (server.addr, vec!["--tls"], "drop --tls"),
    ];
    for (address, extra, advice) in cases {
        let mut args = vec!["--server", &*Box::leak(address.to_string().into_boxed_str())];
        args.extend(extra);
        args.push("approve");
        args.push("123456");
        let mut command = Command::new(env!("CARGO_BIN_EXE_tern"));
        command.arg("--store").arg(&alice_db).args(&args).env("TERN_PASSPHRASE", "a passphrase");
        let output = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(advice), "{address} {args:?}: {stderr}");
    }
}

#[test]
fn search_takes_words_and_says_where_they_were_said() {
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let (alice_db, bob_db) = (stores.path().join("alice.db"), stores.path().join("bob.db"));
    let alice = register(&mut server, &alice_db, "+15596000001");
    let bob = register(&mut server, &bob_db, "+15596000002");
    one_shot(&server, &bob_db, &["profile", "--name", "Bob"]);
    one_shot(&server, &bob_db, &["contacts", &alice.to_string()]); // Names are for contacts.
    one_shot(
        &server,
        &alice_db,
        &["send", "--to", &bob.to_string(), "e-mail", "me", "AND", "call"],
    );
    let found = one_shot(&server, &alice_db, &["search", "e-mail"]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("with Bob: [20") && found[0].contains("UTC]"), "{found:?}");
    assert!(found[0].contains("me: e-mail me AND call"), "{found:?}");
    assert_eq!(one_shot(&server, &alice_db, &["search", "cal", "AND"]).len(), 1);
    let none = one_shot(&server, &alice_db, &["search", "\"", "OR", "zebra"]);
    assert_eq!(none, ["no matches for \"\\\" OR zebra\""]);
}

#[test]
fn group_send_is_handed_to_a_running_listen_on_the_same_store() {
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let (alice_db, bob_db) = (stores.path().join("alice.db"), stores.path().join("bob.db"));
    let _alice = register(&mut server, &alice_db, "+15597000001");
    let bob = register(&mut server, &bob_db, "+15597000002");
    let created = one_shot(
        &server,
        &alice_db,
        &["group", "create", "--name", "club", "--members", &bob.to_string()],
    );
    let group = created[0].rsplit(' ').next().unwrap().to_string();
    one_shot(&server, &alice_db, &["group", "rename", &group, "the", "club"]);

    let mut listen = tern(&server, &alice_db, &["group", "listen"]);
    listen.expect("listening");
    // The store is held: the send goes through the running listen, on its connection.
    let sent = one_shot(&server, &alice_db, &["group", "send", &group, "hello", "club"]);
    assert!(sent.iter().any(|l| l.contains("✓ sent") && l.contains("hello club")), "{sent:?}");
    listen.expect("me: hello club");
    // Anything else that needs the connection is refused while it runs, saying why.
    let (ok, lines) = tern(&server, &alice_db, &["devices"]).finish();
    assert!(!ok);
    assert!(lines.iter().any(|l| l.contains("is in use by tern (pid")), "{lines:?}");

    let shown = one_shot(&server, &bob_db, &["group", "show", &group]);
    assert!(shown.iter().any(|l| l.contains("\"the club\"")), "{shown:?}");
    assert!(shown.iter().any(|l| l.contains("hello club")), "{shown:?}");
    let _ = listen.child.kill();
}

#[test]
fn every_binary_reports_its_version_with_the_commit() {
    for binary in [env!("CARGO_BIN_EXE_tern"), env!("CARGO_BIN_EXE_ternctl")] {
        let output = Command::new(binary).arg("--version").output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains(" 0.1.0"), "{binary}: {text}");
        // Built from a checkout (the test is), the commit is there.
        assert!(text.contains("(git "), "{binary}: {text}");
    }
}

/// `alice`'s device 1 queued envelopes, as `ternctl mailboxes` reads them off the disk.
fn queued_for(data: &Path, user: u64) -> u64 {
    let output = Command::new(env!("CARGO_BIN_EXE_ternctl"))
        .arg("mailboxes")
        .arg(data)
        .output()
        .expect("ternctl runs");
    let text = String::from_utf8_lossy(&output.stdout);
    let row = text.lines().find(|l| l.split_whitespace().next() == Some(&format!("{user}:1")));
    row.map_or(0, |r| r.split_whitespace().nth(2).unwrap().parse().unwrap())
}

/// Waits (bounded) until `check` holds for what is queued for `user`.
fn until_queued(data: &Path, user: u64, check: impl Fn(u64) -> bool) -> u64 {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let queued = queued_for(data, user);
        if check(queued) {
            return queued;
        }
        assert!(std::time::Instant::now() < deadline, "{queued} queued for {user}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn a_one_shot_send_acknowledges_what_was_waiting_for_it() {
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let (alice_db, bob_db) = (stores.path().join("alice.db"), stores.path().join("bob.db"));
    let alice = register(&mut server, &alice_db, "+15598500001");
    let bob = register(&mut server, &bob_db, "+15598500002");
    one_shot(&server, &alice_db, &["send", "--to", &bob.to_string(), "one"]);
    // Bob's history catches up: his device acknowledges, and Alice gets a receipt.
    let history = one_shot(&server, &bob_db, &["history", "--with", &alice.to_string()]);
    assert!(history.iter().any(|l| l.contains(": one")), "{history:?}");
    until_queued(data.path(), alice, |queued| queued >= 1);
    // Alice's next one-shot send takes that receipt and acknowledges it before leaving.
    one_shot(&server, &alice_db, &["send", "--to", &bob.to_string(), "two"]);
    assert_eq!(until_queued(data.path(), alice, |queued| queued == 0), 0);
    let history = one_shot(&server, &alice_db, &["history", "--with", &bob.to_string()]);
    assert!(history.iter().any(|l| l.contains("me: one ✓✓")), "{history:?}");
}

/// Registered over TLS, a device's later commands need no flag to use TLS with the
/// registration's certificate (before: they dialled the registration's address in plain
/// TCP, and failed on the TLS port); plain TCP to the same server is refused, and
/// plaintext to an address off this machine needs --insecure-plaintext.
#[test]
fn a_device_keeps_the_transport_it_registered_with() {
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let db = stores.path().join("alice.db");
    let (tls, ca) = (server.tls_addr.to_string(), server.data_dir.join("tls/dev-cert.pem"));
    let ca = ca.to_string_lossy().into_owned();
    let register =
        ["--server", &*tls, "--tls", "--ca", &*ca, "register", "--phone", "+15595200001"];
    let mut run = tern_raw(&db, "a passphrase", &register);
    run.expect("a code was sent");
    let code = server.code_for("+15595200001");
    run.type_line(&code);
    run.expect("registered: user");
    assert!(run.finish().0);

    let (ok, lines) = tern_raw(&db, "a passphrase", &["profile", "--name", "Alice"]).finish();
    assert!(ok && lines.iter().any(|l| l.contains("profile updated")), "{lines:?}");
    let (ok, lines) = tern(&server, &db, &["profile"]).finish();
    assert!(!ok);
    assert!(lines.iter().any(|l| l.contains("this device registered over TLS")), "{lines:?}");
    let outside = ["--server", "192.0.2.1:7400", "register", "--phone", "+15595200002"];
    let other = stores.path().join("other.db");
    let (ok, lines) = tern_raw(&other, "a passphrase", &outside).finish();
    assert!(!ok);
    assert!(lines.iter().any(|l| l.contains("--insecure-plaintext")), "{lines:?}");
}
