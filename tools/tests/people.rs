//! Tern as people use it: the real `ternd` and the real `tern` in pseudo-terminals, their
//! screens emulated (vt100), and what each person sees asserted. Alice, Bob and Carol
//! register, name themselves, link a laptop, chat (ticks that move in place, typing
//! that comes and goes), idle past the server's idle timeout, live through a clean
//! server stop and restart on the same ports mid-conversation, make a bad send, share
//! a file and talk in a group.
//!
//! Loopback only, temporary directories, every wait bounded (`SCREEN_WAIT`), every
//! process stopped when its handle drops (the server by `tern_testkit::Server`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_testkit::Server;

/// How long a screen may take to show what a person expects.
const SCREEN_WAIT: Duration = Duration::from_secs(25);

/// The server's idle timeout here: short, so idling past it is quick.
const IDLE_TIMEOUT_S: &str = "2";

/// A `tern` in a pseudo-terminal of 60 rows by 140 columns.
struct Terminal {
    name: String,
    child: std::process::Child,
    input: std::fs::File,
    screen: Arc<Mutex<vt100::Parser>>,
}

impl Terminal {
    fn open(name: &str, server: &Server, store: &Path, args: &[&str]) -> Terminal {
        let (pty, pts) = pty_process::blocking::open().expect("a pty");
        pty.resize(pty_process::Size::new(60, 140)).expect("a size");
        let child = pty_process::blocking::Command::new(env!("CARGO_BIN_EXE_tern"))
            .arg("--store")
            .arg(store)
            .args(["--server", &server.addr.to_string()])
            .args(args)
            .env("TERN_PASSPHRASE", format!("{name}'s passphrase"))
            .env("TERM", "xterm")
            .spawn(pts)
            .expect("tern starts");
        let input = std::fs::File::from(std::os::fd::OwnedFd::from(pty));
        let mut output = input.try_clone().expect("a second handle");
        let rows = std::num::NonZeroU16::new(60).unwrap();
        let columns = std::num::NonZeroU16::new(140).unwrap();
        let screen = Arc::new(Mutex::new(vt100::Parser::new(rows, columns, 0)));
        let parser = screen.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            // Ends when the process is gone (EIO on the pty).
            while let Ok(n @ 1..) = output.read(&mut buffer) {
                parser.lock().unwrap().process(&buffer[..n]);
            }
        });
        Terminal { name: name.into(), child, input, screen }
    }

    fn contents(&self) -> String {
        self.screen.lock().unwrap().screen().contents()
    }

    /// Waits until the screen satisfies `check`; returns the screen.
    fn wait_until(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + SCREEN_WAIT;
        loop {
            let contents = self.contents();
            if check(&contents) {
                return contents;
            }
            assert!(
                Instant::now() < deadline,
                "{}'s screen never showed {what}:\n{contents}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn expect(&self, text: &str) -> String {
        self.wait_until(&format!("{text:?}"), |screen| screen.contains(text))
    }

    fn type_text(&mut self, text: &str) {
        self.input.write_all(text.as_bytes()).unwrap();
        self.input.flush().unwrap();
    }

    fn type_line(&mut self, text: &str) {
        self.type_text(&format!("{text}\r"));
    }

    /// Ctrl-D, then waits for the exit; returns whether it succeeded.
    fn leave(mut self) -> bool {
        self.type_text("\u{4}");
        self.wait_exit()
    }

    fn wait_exit(&mut self) -> bool {
        let deadline = Instant::now() + SCREEN_WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(Instant::now() < deadline, "{} did not exit:\n{}", self.name, self.contents());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The people's stores, in one temporary directory.
struct People {
    dir: tempfile::TempDir,
}

impl People {
    fn store(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.db"))
    }

    /// A one-shot command in a terminal: its screen once it exited successfully.
    fn run(&self, server: &Server, name: &str, args: &[&str]) -> String {
        let mut terminal = Terminal::open(name, server, &self.store(name), args);
        let ok = terminal.wait_exit();
        let screen = terminal.contents();
        assert!(ok, "tern {args:?} failed for {name}:\n{screen}");
        screen
    }

    /// Registers and names a person; returns their user id.
    fn register(&self, server: &mut Server, name: &str, phone: &str) -> u64 {
        let store = self.store(name);
        let mut terminal = Terminal::open(name, server, &store, &["register", "--phone", phone]);
        terminal.expect("code: ");
        terminal.type_line(&server.code_for(phone));
        let screen = terminal.expect("registered: user ");
        assert!(terminal.wait_exit());
        let id = screen.split("registered: user ").nth(1).unwrap().split(' ').next().unwrap();
        let shown = self.run(server, name, &["profile", "--name", name]);
        assert!(shown.contains(&format!("name:  {name}")), "{shown}");
        id.parse().unwrap()
    }
}

fn start_server(data: &Path, ports: &[String]) -> Server {
    let [tcp, tls, ws, wss, admin] = ports else { unreachable!("five ports") };
    Server::start(
        data,
        &[
            "--listen",
            tcp,
            "--tls-listen",
            tls,
            "--ws-listen",
            ws,
            "--wss-listen",
            wss,
            "--admin",
            admin,
            "--idle-timeout-s",
            IDLE_TIMEOUT_S,
        ],
    )
}

#[test]
fn three_people_live_with_tern() {
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let people = People { dir: tempfile::tempdir().unwrap() };
    // Fixed ports, so that the restarted server is where everyone's tern expects it.
    let ports: Vec<String> =
        (0..5).map(|_| format!("127.0.0.1:{}", tern_testkit::free_port())).collect();
    let mut server = start_server(data.path(), &ports);
    let alice = people.register(&mut server, "Alice", "+15598000001");
    let bob = people.register(&mut server, "Bob", "+15598000002");
    let carol = people.register(&mut server, "Carol", "+15598000003");
    // Names show to contacts only: the three know one another.
    for (name, others) in
        [("Alice", [bob, carol]), ("Bob", [alice, carol]), ("Carol", [alice, bob])]
    {
        let others = others.map(|id| id.to_string());
        people.run(&server, name, &["contacts", &others[0], &others[1]]);
    }
    let (alice_id, bob_id) = (alice.to_string(), bob.to_string());
    let me = people.run(&server, "Alice", &["whoami"]);
    assert!(me.contains(&format!("user {alice} device 1 phone +15598000001")), "{me}");

    // Alice links her laptop: both sides show the same key fingerprint.
    let laptop_store = people.store("laptop");
    let mut laptop =
        Terminal::open("laptop", &server, &laptop_store, &["link", "--name", "laptop"]);
    let shown = laptop.expect("key fingerprint: ");
    let code = shown.split("tern approve ").nth(1).unwrap().split_whitespace().next().unwrap();
    let fingerprint = shown.split("key fingerprint: ").nth(1).unwrap().lines().next().unwrap();
    let approved = people.run(&server, "Alice", &["approve", code]);
    assert!(approved.contains(&format!("key fingerprint {}", fingerprint.trim())), "{approved}");
    laptop.expect("linked: user");
    assert!(laptop.wait_exit());

    // Bob and Alice chat. Names, not numbers; ticks move on the message's own line.
    let mut bob_chat =
        Terminal::open("Bob", &server, &people.store("Bob"), &["chat", "--with", &alice_id]);
    bob_chat.expect("chatting with Alice");
    let mut alice_chat =
        Terminal::open("Alice", &server, &people.store("Alice"), &["chat", "--with", &bob_id]);
    alice_chat.expect("chatting with Bob");
    alice_chat.type_line("hello bob");
    bob_chat.expect("Alice: hello bob");
    let screen = alice_chat.expect("me: hello bob ✓✓ read");
    assert_eq!(screen.matches("hello bob").count(), 1, "one line per message:\n{screen}");
    assert!(!screen.contains(&bob_id), "no ids on the chat screen:\n{screen}");

    // Typing shows while Bob types and goes when he sends.
    bob_chat.type_text("hi al");
    alice_chat.expect("(Bob is typing…)");
    bob_chat.type_line("ice");
    alice_chat.expect("Bob: hi alice");
    alice_chat.wait_until("no typing", |s| !s.contains("is typing"));

    // Idle past the server's idle timeout: the chats stay up.
    std::thread::sleep(Duration::from_secs(3 * IDLE_TIMEOUT_S.parse::<u64>().unwrap()));
    alice_chat.type_line("still here?");
    bob_chat.expect("Alice: still here?");
    for chat in [&alice_chat, &bob_chat] {
        assert!(!chat.contents().contains("connection lost"), "{}", chat.contents());
    }

    // A bad send from another terminal on Alice's store goes through her running chat
    // and fails alone; the next one arrives.
    let nobody = (bob + 7919).to_string();
    let mut bad =
        Terminal::open("Alice", &server, &people.store("Alice"), &["send", "--to", &nobody, "hi?"]);
    assert!(!bad.wait_exit(), "a send to no one fails");
    assert!(bad.contents().contains("no such user"), "{}", bad.contents());
    people.run(&server, "Alice", &["send", "--to", &bob_id, "from", "the", "other", "terminal"]);
    bob_chat.expect("Alice: from the other terminal");

    // The server stops cleanly and comes back on the same ports: a status line, and
    // what Alice typed meanwhile arrives.
    assert!(server.terminate().success());
    alice_chat.expect("(connection lost: the server is stopping");
    bob_chat.expect("(connection lost: the server is stopping");
    alice_chat.type_line("during the restart");
    alice_chat.expect("me: during the restart …");
    for port in &ports {
        tern_testkit::wait_until_bindable(port.parse().unwrap());
    }
    let server = start_server(data.path(), &ports);
    bob_chat.expect("Alice: during the restart");
    let screen = alice_chat.expect("me: during the restart ✓");
    assert!(screen.contains("(connection lost, and back)"), "{screen}");
    assert_eq!(screen.matches("connection lost").count(), 1, "one status line:\n{screen}");
    bob_chat.expect("(connection lost, and back)");
    assert!(alice_chat.leave() && bob_chat.leave());

    // A file, shown with its real size.
    let file = people.dir.path().join("notes.txt");
    std::fs::write(&file, "tern ".repeat(3000)).unwrap();
    let sent =
        people.run(&server, "Bob", &["send", "--to", &alice_id, "--file", file.to_str().unwrap()]);
    assert!(sent.contains("📎 notes.txt (14.6 KiB)"), "{sent}");
    let history = people.run(&server, "Alice", &["history", "--with", &bob_id]);
    assert!(history.contains("Bob: 📎 notes.txt (14.6 KiB)"), "{history}");
    // The laptop has Alice's side of the conversation too.
    let laptop_history = people.run(&server, "laptop", &["history", "--with", &bob_id]);
    assert!(laptop_history.contains("me: hello bob"), "{laptop_history}");

    // A group: Carol and Bob in group chats, Alice writes from the command line.
    let created = people.run(
        &server,
        "Alice",
        &["group", "create", "--name", "club", "--members", &format!("{bob},{carol}")],
    );
    let group = created.split("created group ").nth(1).unwrap().split_whitespace().next().unwrap();
    let group = group.to_string();
    let mut carol_chat =
        Terminal::open("Carol", &server, &people.store("Carol"), &["chat", "--group", &group]);
    carol_chat.expect("chatting in group \"club\"");
    let bob_chat =
        Terminal::open("Bob", &server, &people.store("Bob"), &["chat", "--group", &group]);
    bob_chat.expect("chatting in group \"club\"");
    people.run(&server, "Alice", &["group", "send", &group, "welcome", "to", "the", "club"]);
    carol_chat.expect("Alice: welcome to the club");
    bob_chat.expect("Alice: welcome to the club");
    carol_chat.type_line("thanks!");
    bob_chat.expect("Carol: thanks!");
    carol_chat.expect("me: thanks! ✓");
    let shown = people.run(&server, "Alice", &["group", "show", &group]);
    assert!(shown.contains("welcome to the club ✓") && shown.contains("2 read"), "{shown}");
    assert!(carol_chat.leave() && bob_chat.leave());
    assert!(server.terminate().success());
}
