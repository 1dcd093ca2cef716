//! Connection density: how many idle authenticated connections one `ternd` holds and
//! what each costs. Registers `--users` accounts, then opens one authenticated idle
//! connection per account (plain TCP or TLS 1.3), from source addresses 127.0.0.1,
//! 127.0.0.2, ... (`--sources`, past one address's ephemeral ports), and reports the
//! server's RSS before and after (memory per connection), the kernel's slab growth (both
//! ends of each loopback connection), and the connect rate. One process holds at most
//! about 19,900 descriptors here: 19,000 connections fit in one generator and one ternd.
//!
//! Run: `cargo build --release -p tern-edge --bin ternd -p tern-bench --bin density`, then
//! `./target/release/density --users 19000 [--tls]`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tern_bench::proto::{authenticate, hello, register};
use tern_bench::server::{rss_kib, slab_kib, start};
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
}

/// An idle connection kept open until the end (TCP or TLS).
enum Idle {
    Tcp(#[allow(dead_code)] TcpStream),
    Tls(#[allow(dead_code)] Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

async fn connect_from(addr: SocketAddr, source: u8) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("a socket");
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
    std::fs::create_dir_all(&args.work_dir).unwrap();
    let data_dir = tempfile::tempdir_in(&args.work_dir).unwrap();
    let mut ternd = start(&args.ternd, data_dir.path(), &[]);
    let pid = ternd.child.id();

    let started = Instant::now();
    let mut accounts = Vec::with_capacity(args.users);
    let indexes: Vec<usize> = (0..args.users).collect();
    for chunk in indexes.chunks(64) {
        let jobs = chunk.iter().map(|&i| {
            let (addr, codes) = (ternd.addr, ternd.codes.clone());
            tokio::spawn(async move { register(addr, &format!("+1556{i:07}"), &codes).await })
        });
        for job in jobs.collect::<Vec<_>>() {
            accounts.push(job.await.expect("registration"));
        }
    }
    eprintln!("registered {} users in {:.1} s", args.users, started.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_before, slab_before) = (rss_kib(pid), slab_kib());

    let connector = args.tls.then(|| tls_connector(&data_dir.path().join("tls/dev-cert.pem")));
    let target = if args.tls { ternd.tls_addr } else { ternd.addr };
    let started = Instant::now();
    let mut idle = Vec::with_capacity(args.users);
    for (n, chunk) in accounts.chunks(128).enumerate() {
        let jobs = chunk.iter().enumerate().map(|(i, account)| {
            let source = 1 + ((n * 128 + i) % usize::from(args.sources.max(1))) as u8;
            let (user_id, token, connector) = (account.user_id, account.token, connector.clone());
            tokio::spawn(async move {
                let tcp = connect_from(target, source).await;
                match connector {
                    None => {
                        let mut tcp = tcp;
                        let mut decoder = hello(&mut tcp).await;
                        authenticate(&mut tcp, &mut decoder, user_id, token).await;
                        Idle::Tcp(tcp)
                    }
                    Some(connector) => {
                        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                        let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
                        let mut decoder = hello(&mut tls).await;
                        authenticate(&mut tls, &mut decoder, user_id, token).await;
                        Idle::Tls(Box::new(tls))
                    }
                }
            })
        });
        for job in jobs.collect::<Vec<_>>() {
            idle.push(job.await.expect("an idle connection"));
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss_after, slab_after) = (rss_kib(pid), slab_kib());
    let n = idle.len() as f64;
    let per_conn = (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / n;
    let slab_per_conn = (slab_after.saturating_sub(slab_before)) as f64 * 1024.0 / n;
    let transport = if args.tls { "tls" } else { "tcp" };
    println!(
        "{} idle authenticated {transport} connections: connected in {connect_s:.1} s ({:.0}/s); \
         ternd RSS {} → {} KiB = {per_conn:.0} bytes per connection; kernel slab +{} KiB = \
         {slab_per_conn:.0} bytes per connection (both ends)",
        idle.len(),
        n / connect_s,
        rss_before,
        rss_after,
        slab_after.saturating_sub(slab_before)
    );
    println!(
        "{{\"scenario\":\"density\",\"transport\":\"{transport}\",\"connections\":{},\
         \"connect_per_s\":{:.0},\"rss_before_kib\":{rss_before},\"rss_after_kib\":{rss_after},\
         \"bytes_per_connection\":{per_conn:.0},\"slab_bytes_per_connection\":{slab_per_conn:.0}}}",
        idle.len(),
        n / connect_s
    );
    drop(idle);
    let _ = ternd.child.kill();
    let _ = ternd.child.wait();
}
