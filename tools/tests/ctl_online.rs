//! `ternctl stats` against a real two-core `ternd`: the table names every core and its
//! figures add up to what the test did; an unreachable admin address is a clear exit 2.

use std::process::{Command, Output};

use tern_testkit::{Server, TIMEOUT};

fn ternctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ternctl")).args(args).output().expect("ternctl runs")
}

/// The sum of every sample of `name` in a `/metrics` body.
fn metric_sum(metrics: &str, name: &str) -> f64 {
    let samples = metrics.lines().filter(|l| {
        l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
    });
    samples.map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap()).sum()
}

/// Registers `phone` with the `tern` CLI (the code comes from the server's log).
fn register(server: &mut Server, store: &std::path::Path, phone: &str) -> u64 {
    use std::io::{BufRead, BufReader, Write};
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("--store")
        .arg(store)
        .args(["--server", &server.addr.to_string(), "register", "--phone", phone])
        .env("TERN_PASSPHRASE", "a passphrase")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tern starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("a code was sent") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "tern register stopped early");
    }
    let code = server.code_for(phone);
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{code}").unwrap();
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "tern register failed: {rest}");
    let after = rest.split("registered: user ").nth(1).expect("a user id");
    after.split_whitespace().next().unwrap().parse().unwrap()
}

/// Goal: `ternctl stats` shows one row per core and a total, with figures that match
/// what happened. Method: a two-core server; two users registered and a message sent
/// with the `tern` CLI; three idle connections held open (a long auth deadline keeps
/// them); wait (bounded) until `/metrics` shows all of that, core 1's push included;
/// then run `ternctl stats` and read its table. Rates depend on timing, so only their
/// shape is checked; counts since start and open connections are exact lower bounds.
#[test]
fn stats_shows_every_core_and_totals() {
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let stores = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &["--cores", "2", "--auth-deadline-s", "600"]);
    let alice_db = stores.path().join("alice.db");
    let bob_db = stores.path().join("bob.db");
    register(&mut server, &alice_db, "+15595000001");
    let bob = register(&mut server, &bob_db, "+15595000002");
    let sent = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("--store")
        .arg(&alice_db)
        .args(["--server", &server.addr.to_string(), "send", "--to", &bob.to_string(), "hi"])
        .env("TERN_PASSPHRASE", "a passphrase")
        .output()
        .unwrap();
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    let _idle: Vec<std::net::TcpStream> =
        (0..3).map(|_| std::net::TcpStream::connect(server.addr).unwrap()).collect();

    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let (_, metrics) = server.admin_get("/metrics");
        let settled = metric_sum(&metrics, "tern_connections") >= 3.0
            && metric_sum(&metrics, "tern_messages_sent_total") >= 1.0
            && metrics.contains("tern_connections{core=\"1\"}");
        if settled {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the figures never settled:\n{metrics}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    let admin = server.admin.to_string();
    let output = ternctl(&["stats", "--admin", &admin]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].contains(&admin), "{stdout}");
    let headings: Vec<&str> =
        lines[1].split("  ").map(str::trim).filter(|h| !h.is_empty()).collect();
    assert_eq!(
        headings,
        [
            "conns",
            "msgs in/s",
            "msgs out/s",
            "batch",
            "sent p50",
            "sent p99",
            "deliver p50",
            "deliver p99",
            "disk used"
        ],
        "{stdout}"
    );
    // Rows: label, then the figures; the label has a space, so split it off first.
    let row = |label: &str| -> Vec<String> {
        let line = lines.iter().find(|l| l.starts_with(label)).unwrap_or_else(|| {
            panic!("no row {label:?}:\n{stdout}");
        });
        let cells = line[label.len()..].split("  ").map(str::trim).filter(|c| !c.is_empty());
        cells.map(str::to_string).collect()
    };
    let mut connections = 0.0;
    for label in ["core 0", "core 1", "total"] {
        let cells = row(label);
        assert_eq!(cells.len(), 9, "{label}: {cells:?}\n{stdout}");
        let conns: f64 = cells[0].parse().unwrap();
        let msgs_in: f64 = cells[1].parse().unwrap();
        let msgs_out: f64 = cells[2].parse().unwrap();
        assert!(msgs_in >= 0.0 && msgs_out >= 0.0, "{stdout}");
        assert!(cells[8].ends_with("iB"), "disk used in binary units: {stdout}");
        if label == "total" {
            assert_eq!(conns, connections, "total = sum of the cores:\n{stdout}");
        } else {
            connections += conns;
        }
    }
    // The idle connections are still open.
    assert!(connections >= 3.0, "{stdout}");
    let disk = lines.iter().find(|l| l.starts_with("disk: ")).expect("a disk line");
    assert!(disk.contains(" free of "), "{stdout}");
    let since = lines.iter().find(|l| l.starts_with("since start: ")).expect("totals");
    let messages: f64 = since["since start: ".len()..].split(' ').next().unwrap().parse().unwrap();
    assert!(messages >= 1.0, "{stdout}");
}

#[test]
fn stats_names_an_unreachable_address_and_exits_2() {
    let output = ternctl(&["stats", "--admin", "127.0.0.1:1"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
    assert!(stderr.contains("cannot reach"), "{stderr}");
    assert!(output.stdout.is_empty());
}
