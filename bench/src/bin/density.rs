//! Connection density: how many idle authenticated connections one `ternd` holds and
//! what each costs, and what a registered account costs while offline. Registers
//! `--users` accounts, restarts ternd on the same data directory and compares its
//! anonymous memory with an empty server's (memory per offline account), then opens one
//! authenticated idle connection per account (plain TCP or TLS 1.3), from source
//! addresses 127.0.0.1, 127.0.0.2, ... (`--sources`, past one address's ephemeral
//! ports), and reports the
//! server's RSS before and after (memory per connection), the kernel's slab growth (both
//! ends of each loopback connection), and the connect rate. One process holds at most
//! about 19,900 descriptors here: 19,000 connections fit in one generator and one ternd.
//! With `--processes P` the connections are opened by P child processes (this binary
//! again, each given its share of the accounts in a file), so the generator side is not
//! bound by one process's descriptors; past ternd's own limit the connections it refuses
//! (`TooManyConnections`, then a close) are counted, not fatal.
//!
//! Run: `cargo build --release -p tern-edge --bin ternd -p tern-bench --bin density`, then
//! `./target/release/density --users 19000 [--tls]` or
//! `./target/release/density --users 21000 --processes 2` (past ternd's limit).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tern_bench::proto::{authenticate, register_with_keys, try_hello};
use tern_bench::server::{active_segment_bytes, rss_anon_kib, rss_kib, slab_kib, start};
use tern_wire::messages::Token;
use tern_wire::ErrorCode;
use tokio::net::{TcpSocket, TcpStream};

#[derive(Debug, Parser)]
struct Args {
    /// Idle connections (one account each).
    #[arg(long, default_value_t = 19_000)]
    users: usize,
    /// Over TLS 1.3 (trusting the server's development certificate).
    #[arg(long)]
    tls: bool,
    /// Loopback source addresses to spread the connections over.
    #[arg(long, default_value_t = 4)]
    sources: u8,
    /// The ternd binary.
    #[arg(long, default_value = "target/release/ternd")]
    ternd: PathBuf,
    /// Where the temporary data directory goes (a real file system: O_DIRECT).
    #[arg(long, default_value = "target/loadgen")]
    work_dir: PathBuf,
    /// One-time prekeys each account's device uploads at registration (the SDK keeps a
    /// stock of 50, `tern_client::crypto::ONE_TIME_KEY_STOCK`; 0 shows the account alone).
    #[arg(long, default_value_t = 50)]
    one_time_keys: usize,
    /// Only register the accounts and measure what they cost offline; open no connection.
    /// The data directory is kept (printed) for a closer look, e.g. a heap profile.
    #[arg(long)]
    accounts_only: bool,
    /// Generator processes holding the connections (each its share of `--users`).
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// (Child process) the accounts to connect, one `USER_ID HEX_TOKEN` per line.
    #[arg(long, hide = true)]
    child_accounts: Option<PathBuf>,
    /// (Child process) the server's address.
    #[arg(long, hide = true)]
    child_target: Option<SocketAddr>,
    /// (Child process) the server's certificate, for `--tls`.
    #[arg(long, hide = true)]
    child_cert: Option<PathBuf>,
}

/// An idle connection kept open until the end (TCP or TLS).
enum Idle {
    Tcp(#[allow(dead_code)] TcpStream),
    Tls(#[allow(dead_code)] Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

async fn connect_from(addr: SocketAddr, source: u8) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("a socket");
    // A port in TIME_WAIT (earlier runs, registrations) may be bound again: without this,
    // binding before connecting runs out of ports long before the connections do.
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, source)), 0);
    socket.bind(local).expect("bind a loopback source address");
    let stream = socket.connect(addr).await.expect("connect");
    stream.set_nodelay(true).unwrap();
    stream
}

fn tls_connector(cert_pem: &std::path::Path) -> tokio_rustls::TlsConnector {
    let pem = std::fs::read(cert_pem).expect("the development certificate");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.expect("a PEM certificate")).expect("a usable certificate");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    if let Some(file) = &args.child_accounts {
        return child(&args, file).await;
    }
    std::fs::create_dir_all(&args.work_dir).unwrap();
    let data_dir = tempfile::tempdir_in(&args.work_dir).unwrap();
    let mut ternd = start(&args.ternd, data_dir.path(), &[], None);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let anon_empty = rss_anon_kib(ternd.child.id());

    let started = Instant::now();
    let mut accounts = Vec::with_capacity(args.users);
    let indexes: Vec<usize> = (0..args.users).collect();
    for chunk in indexes.chunks(64) {
        let keys = args.one_time_keys;
        let jobs = chunk.iter().map(|&i| {
            let (addr, codes) = (ternd.addr, ternd.codes.clone());
            let phone = format!("+1556{i:07}");
            tokio::spawn(async move { register_with_keys(addr, &phone, &codes, keys).await })
        });
        for job in jobs.collect::<Vec<_>>() {
            accounts.push(job.await.expect("registration"));
        }
    }
    eprintln!("registered {} users in {:.1} s", args.users, started.elapsed().as_secs_f64());
    // What a registered, offline account costs: ternd's anonymous memory after a restart
    // on the same data directory (so nothing of the registrations' traffic is left, only
    // the state rebuilt from the log) against a ternd on an empty one.
    let _ = ternd.child.kill();
    let _ = ternd.child.wait();
    ternd = start(&args.ternd, data_dir.path(), &[], None);
    let pid = ternd.child.id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let anon_accounts = rss_anon_kib(pid);
    // The active segments' buffers are the log's newest bytes, bounded per shard by the
    // segment size whatever the number of accounts: counted apart.
    let active_kib = active_segment_bytes(data_dir.path()) / 1024;
    let grown_kib = anon_accounts.saturating_sub(anon_empty);
    let per_account = grown_kib.saturating_sub(active_kib) as f64 * 1024.0 / args.users as f64;
    println!(
        "{} registered accounts ({} one-time keys each), offline: ternd's anonymous memory \
         {anon_empty} KiB (empty) → {anon_accounts} KiB after a restart, of which {active_kib} \
         KiB are the active segments' buffers = {per_account:.0} bytes per account",
        args.users, args.one_time_keys,
    );
    if args.accounts_only {
        let _ = ternd.child.kill();
        let _ = ternd.child.wait();
        println!("data directory kept: {}", data_dir.keep().display());
        return;
    }
    let (rss_before, slab_before) = (rss_kib(pid), slab_kib());

    let cert = data_dir.path().join("tls/dev-cert.pem");
    let target = if args.tls { ternd.tls_addr } else { ternd.addr };
    let started = Instant::now();
    let accounts: Vec<(u64, Token)> = accounts.iter().map(|a| (a.user_id, a.token)).collect();
    let (mut idle, mut children, mut held, mut refused) = (Vec::new(), Vec::new(), 0, 0);
    if args.processes <= 1 {
        let connector = args.tls.then(|| tls_connector(&cert));
        (idle, refused) = open_idle(&accounts, target, connector, args.sources).await;
        held = idle.len();
    } else {
        let share = accounts.len().div_ceil(args.processes);
        for (p, part) in accounts.chunks(share).enumerate() {
            let file = args.work_dir.join(format!("density-accounts-{p}"));
            let lines: Vec<String> = part.iter().map(|(u, t)| format!("{u} {}", hex(t))).collect();
            std::fs::write(&file, lines.join("\n")).unwrap();
            children.push(spawn_child(&args, &file, target, &cert));
        }
        for child in &mut children {
            let (child_held, child_refused) = child_ready(child);
            eprintln!("a generator process holds {child_held} ({child_refused} refused)");
            (held, refused) = (held + child_held, refused + child_refused);
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss_after, slab_after) = (rss_kib(pid), slab_kib());
    let n = held as f64;
    let per_conn = (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / n;
    let slab_per_conn = (slab_after.saturating_sub(slab_before)) as f64 * 1024.0 / n;
    let transport = if args.tls { "tls" } else { "tcp" };
    println!(
        "{held} idle authenticated {transport} connections ({refused} refused by ternd, \
         {} generator process(es)): connected in {connect_s:.1} s ({:.0}/s); ternd RSS {} → \
         {} KiB = {per_conn:.0} bytes per connection; kernel slab +{} KiB = {slab_per_conn:.0} \
         bytes per connection (both ends)",
        args.processes.max(1),
        n / connect_s,
        rss_before,
        rss_after,
        slab_after.saturating_sub(slab_before)
    );
    println!(
        "{{\"scenario\":\"density\",\"transport\":\"{transport}\",\"connections\":{held},\
         \"refused\":{refused},\"processes\":{},\
         \"connect_per_s\":{:.0},\"rss_before_kib\":{rss_before},\"rss_after_kib\":{rss_after},\
         \"bytes_per_connection\":{per_conn:.0},\"slab_bytes_per_connection\":{slab_per_conn:.0},\
         \"bytes_per_offline_account\":{per_account:.0}}}",
        args.processes.max(1),
        n / connect_s
    );
    drop(idle);
    for mut child in children {
        drop(child.stdin.take()); // The child holds its connections until its stdin closes.
        let _ = child.wait();
    }
    let _ = ternd.child.kill();
    let _ = ternd.child.wait();
}

/// Opens one idle authenticated connection per account, 128 at a time, spread over
/// `sources` loopback addresses. Returns the connections and how many ternd refused.
async fn open_idle(
    accounts: &[(u64, Token)],
    target: SocketAddr,
    connector: Option<tokio_rustls::TlsConnector>,
    sources: u8,
) -> (Vec<Idle>, usize) {
    let (mut idle, mut refused) = (Vec::with_capacity(accounts.len()), 0);
    for (n, chunk) in accounts.chunks(128).enumerate() {
        let jobs = chunk.iter().enumerate().map(|(i, &(user_id, token))| {
            let source = 1 + ((n * 128 + i) % usize::from(sources.max(1))) as u8;
            let connector = connector.clone();
            tokio::spawn(async move {
                let tcp = connect_from(target, source).await;
                match connector {
                    None => {
                        let mut tcp = tcp;
                        let mut decoder = try_hello(&mut tcp).await?;
                        authenticate(&mut tcp, &mut decoder, user_id, token).await;
                        Ok(Idle::Tcp(tcp))
                    }
                    Some(connector) => {
                        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                        let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
                        let mut decoder = try_hello(&mut tls).await?;
                        authenticate(&mut tls, &mut decoder, user_id, token).await;
                        Ok(Idle::Tls(Box::new(tls)))
                    }
                }
            })
        });
        for job in jobs.collect::<Vec<_>>() {
            match job.await.expect("a connection task") {
                Ok(connection) => idle.push(connection),
                Err(Some(ErrorCode::TooManyConnections)) => refused += 1,
                Err(other) => panic!("connection refused for another reason: {other:?}"),
            }
        }
    }
    (idle, refused)
}

/// A child generator process: connects the accounts in `file`, reports `HELD n REFUSED m`
/// on stdout, and holds the connections until its stdin closes.
async fn child(args: &Args, file: &std::path::Path) {
    let text = std::fs::read_to_string(file).expect("the accounts file");
    let accounts: Vec<(u64, Token)> = text
        .lines()
        .map(|line| {
            let (user, token) = line.split_once(' ').expect("USER_ID HEX_TOKEN");
            let mut bytes = [0u8; 32];
            for (i, byte) in bytes.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&token[2 * i..2 * i + 2], 16).expect("hex");
            }
            (user.parse().expect("a user id"), bytes)
        })
        .collect();
    let target = args.child_target.expect("--child-target");
    let connector = args.child_cert.as_deref().filter(|_| args.tls).map(tls_connector);
    let (idle, refused) = open_idle(&accounts, target, connector, args.sources).await;
    println!("HELD {} REFUSED {refused}", idle.len());
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest);
    drop(idle);
}

fn spawn_child(
    args: &Args,
    file: &std::path::Path,
    target: SocketAddr,
    cert: &std::path::Path,
) -> std::process::Child {
    let mut command = std::process::Command::new(std::env::current_exe().unwrap());
    command.arg("--child-accounts").arg(file).arg("--child-target").arg(target.to_string());
    command.arg("--child-cert").arg(cert).arg("--sources").arg(args.sources.to_string());
    if args.tls {
        command.arg("--tls");
    }
    command.stdin(Stdio::piped()).stdout(Stdio::piped());
    command.spawn().expect("a generator process starts")
}

/// Waits for a child's `HELD n REFUSED m` line.
fn child_ready(child: &mut std::process::Child) -> (usize, usize) {
    let mut line = String::new();
    let stdout = child.stdout.as_mut().expect("piped");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    match fields.as_slice() {
        ["HELD", held, "REFUSED", refused] => (held.parse().unwrap(), refused.parse().unwrap()),
        _ => panic!("a generator process failed: {line:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
