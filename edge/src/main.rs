//! `ternd` entry point: flags, logging, then the server (see the crate docs for what is
//! built so far).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tern_edge::code_sender::WebhookUrl;
use tern_edge::core::config::CoreConfig;
use tern_edge::limits::Rate;
use tern_edge::runtime::{run, ClusterSettings, PushMode, ServerConfig};
use tern_edge::tls::{CertSource, TlsSettings};

/// Tern's messaging server.
///
/// Every flag can also be set in a TOML file given with `--config FILE`: keys are the
/// flag names (`tls_listen = "0.0.0.0:7443"`, `shards = 16`); flags on the command line win.
#[derive(Debug, Parser)]
#[command(name = "ternd", version = env!("TERN_VERSION"), args_override_self = true)]
struct Args {
    /// TOML file with flag values (flags given on the command line override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (created on first start).
    #[arg(long, default_value = "tern-data")]
    data_dir: PathBuf,
    /// TCP listen address for the binary protocol (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// Let the plaintext listeners (`--listen`, `--ws-listen`) take an address other
    /// than loopback: tokens then cross the network in clear (only behind a proxy that
    /// terminates TLS).
    #[arg(long)]
    insecure_listeners: bool,
    /// TLS listen address ("off" to disable); TLS 1.3 only unless `--tls12`.
    #[arg(long, default_value = "127.0.0.1:7443")]
    tls_listen: String,
    /// WebSocket listen address, binary messages ("off" to disable).
    #[arg(long, default_value = "127.0.0.1:7480")]
    ws_listen: String,
    /// WebSocket-over-TLS listen address ("off" to disable).
    #[arg(long, default_value = "127.0.0.1:7481")]
    wss_listen: String,
    /// TLS certificate chain (PEM); without it a development certificate is created in
    /// the data directory.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Also accept TLS 1.2 (ECDHE with AES-GCM or ChaCha20-Poly1305 only), for clients
    /// that lack TLS 1.3; without it only TLS 1.3 is offered.
    #[arg(long)]
    tls12: bool,
    /// Admin HTTP address for /healthz and /metrics ("off" to disable).
    #[arg(long, default_value = "127.0.0.1:7401")]
    admin: String,
    /// Seconds a connection has to authenticate or register.
    #[arg(long, default_value_t = 10.0)]
    auth_deadline_s: f64,
    /// Seconds without a whole frame after which an authenticated connection is closed.
    #[arg(long, default_value_t = 90.0)]
    idle_timeout_s: f64,
    /// SMS gateway webhook for verification codes (POST JSON); without it codes go to the
    /// log, which is for development only.
    #[arg(long)]
    code_webhook: Option<String>,
    /// Client connections held at most (default: the open-files limit minus 256).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Addresses of load balancers whose connections start with a PROXY protocol v2
    /// header naming the client (comma-separated); the per-address budgets then count
    /// the client, not the balancer. Connections from anyone else have no header.
    #[arg(long, value_delimiter = ',')]
    proxy_protocol_from: Vec<std::net::IpAddr>,
    /// Each client socket's kernel send and receive buffers at most, in KiB (0: the
    /// kernel's autotuning, up to its tcp_wmem/tcp_rmem maximum per socket). Bounds what
    /// clients that ask and never read cost the machine.
    #[arg(long, default_value_t = 256)]
    socket_buffer_kib: usize,
    /// Seconds between checkpoints and space reclaim of each changed shard.
    #[arg(long, default_value_t = 30.0)]
    maintenance_interval_s: f64,
    /// Size of each segment file of the log in MiB (preallocated; rotation is a file
    /// create and a directory sync). Smaller segments are reclaimed sooner.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
    segment_mib: u64,
    /// Retried sends recognised per shard: the newest this many (sender device, client
    /// message id) pairs of the last 24 hours are remembered, about 80 bytes each.
    /// A retry older than the window is stored again.
    #[arg(long, default_value_t = 1 << 20)]
    dedup_entries_per_shard: usize,
    /// Shard count of a new data directory (fixed once created; shard s is served by
    /// core s % cores, so a restart with another core count keeps every shard).
    #[arg(long, default_value_t = 8)]
    shards: u32,
    /// How offline devices are woken: `http` (POST to their UnifiedPush endpoints) or
    /// `log` (development).
    #[arg(long, default_value = "http", value_parser = ["http", "log"])]
    push: String,
    /// Envelopes queued per device at most; beyond, the oldest are dropped (the device and
    /// the senders get a notice).
    #[arg(long, default_value_t = 10_000)]
    mailbox_max_messages: u64,
    /// Bytes queued per device at most (likewise).
    #[arg(long, default_value_t = 256 << 20)]
    mailbox_max_bytes: u64,
    /// Percent of a device's mailbox (of both limits above) one sender may fill; past it
    /// the sender's messages are refused (`QuotaExceeded`) and its receipts dropped.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=100))]
    mailbox_sender_share_percent: u64,
    /// Largest media file accepted, in bytes (uploads declaring more are refused at once).
    #[arg(long, default_value_t = 100 << 20)]
    media_max_bytes: u64,
    /// Seconds a committed media file is kept (30 days: the messages carrying it have
    /// expired by then).
    #[arg(long, default_value_t = 30.0 * 24.0 * 3600.0)]
    media_ttl_s: f64,
    /// Free space kept on the data directory's file system for messages, in MiB: below
    /// it new accounts, media uploads and exports are refused (`StorageFull`) while
    /// messages are still stored. 0 turns the reserve off.
    #[arg(long, default_value_t = 1024)]
    disk_reserve_mib: u64,
    /// Media bytes one account may hold at once (its files, exports and the declared
    /// size of its uploads in progress); beyond, uploads are refused (`QuotaExceeded`).
    #[arg(long, default_value_t = 4 << 30)]
    media_account_max_bytes: u64,
    /// Phone hashes one account may look up per day (contact discovery).
    #[arg(long, default_value_t = 5_000)]
    discovery_per_day: u32,
    /// Codes sent per number prefix (first 6 characters) per hour, per core.
    #[arg(long, default_value_t = 1_000)]
    code_requests_per_prefix_per_hour: u32,
    /// Codes sent per client address (IPv4 address, IPv6 /64) per hour, per core.
    #[arg(long, default_value_t = 20)]
    code_requests_per_address_per_hour: u32,
    /// Accept UnifiedPush endpoints over plain http or at private, loopback and
    /// link-local addresses (development only: such an endpoint lets a client make ternd
    /// call inside the operator's network).
    #[arg(long)]
    push_insecure_endpoints: bool,
    /// The only UnifiedPush hosts ternd calls, comma-separated: a host name, or
    /// `.domain` for any host under it (default: any public host).
    #[arg(long, value_delimiter = ',')]
    push_allowed_hosts: Vec<String>,
    /// Count loopback clients against the per-address budgets too (codes requested,
    /// unauthenticated connections; they are exempt by default: a local load generator
    /// or TLS terminator is not one network address).
    #[arg(long, alias = "address-budget-loopback")]
    code_budget_loopback: bool,
    /// Connections from one network address (IPv4, IPv6 /64) that have not
    /// authenticated yet, at most, per core (0: no limit); more get `TooManyConnections`.
    #[arg(long, default_value_t = 64)]
    pre_auth_per_address: u32,
    /// Devices asking to be linked per client address (IPv4, IPv6 /64) per hour, per
    /// core (`RateLimited` beyond).
    #[arg(long, default_value_t = 20)]
    link_requests_per_address_per_hour: u32,
    /// Seconds a connection's output may sit over its 1 MiB bound with the client reading
    /// none of it before the connection is closed with `NotReading`.
    #[arg(long, default_value_t = 20.0)]
    stalled_output_s: f64,
    /// Requests an authenticated connection may make per second (bursts up to 10
    /// seconds' worth); past it the connection is read no faster. Acknowledgements and
    /// upload chunks do not count.
    #[arg(long, default_value_t = 100.0)]
    requests_per_second: f64,
    /// Leading zero bits of SHA-256 a client must find before a code is sent (0: off;
    /// 16 costs a phone well under a second).
    #[arg(long, default_value_t = 0)]
    code_pow_bits: u8,
    /// Executors, each pinned to a CPU (default: every CPU of the machine).
    #[arg(long)]
    cores: Option<u32>,
    /// Largest frame accepted after the handshake, in bytes.
    #[arg(long, default_value_t = tern_wire::DEFAULT_MAX_FRAME_BYTES)]
    max_frame_bytes: u32,
    /// Verification code requests allowed per phone number per hour.
    #[arg(long, default_value_t = 5)]
    code_requests_per_hour: u32,
    /// Sends per device per second (steady rate; bursts up to 4 seconds' worth).
    #[arg(long, default_value_t = 50.0)]
    sends_per_second: f64,
    /// 1:1 sends per device per second to users who never wrote to its account (steady
    /// rate; bursts up to 12 seconds' worth).
    #[arg(long, default_value_t = 5.0)]
    stranger_sends_per_second: f64,
    /// Key-bundle fetches allowed per (requester, target) pair per hour.
    #[arg(long, default_value_t = 10)]
    key_fetches_per_hour: u32,
    /// Fetches of one user's bundles that hand out one-time keys, per hour and core, from
    /// all requesters together; beyond, bundles carry the fallback key only.
    #[arg(long, default_value_t = 30)]
    one_time_key_fetches_per_hour: u32,
    /// Join a cluster whose control plane is in etcd:
    /// `etcd://host:port[,host:port...]/name`. Without it ternd is a single node and
    /// needs no etcd. The cluster is created by the first node with this data
    /// directory's shard count; every node's must be the same.
    #[arg(long)]
    cluster: Option<String>,
    /// This node's id in the cluster (letters, digits, `-`, `_`); needed with `--cluster`.
    #[arg(long, requires = "cluster")]
    node_id: Option<String>,
    /// The host name or address clients are sent to for this node's users (default:
    /// each listener's address, which must then not be a wildcard).
    #[arg(long, requires = "cluster")]
    advertise_host: Option<String>,
    /// A new cluster places its shards once this many nodes are up.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    cluster_initial_nodes: u32,
    /// Seconds the node's etcd lease lives without renewal: a stopped node is gone from
    /// the cluster this long after (a node that stops cleanly leaves at once).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(i64).range(1..=3600))]
    cluster_lease_s: i64,
}

fn main() -> ExitCode {
    let argv = match with_config_file(std::env::args().collect()) {
        Ok(argv) => argv,
        Err(error) => {
            eprintln!("ternd: {error}");
            return ExitCode::from(2);
        }
    };
    let args = Args::parse_from(argv);
    init_logging();
    let Some(config) = server_config(args) else {
        return ExitCode::from(2);
    };
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "ternd stopped");
            eprintln!("ternd: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in a log file or journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The protocol limits and quotas of every core, from the flags.
fn core_config(args: &Args) -> CoreConfig {
    CoreConfig {
        max_frame_bytes: args.max_frame_bytes,
        code_requests_per_hour: args.code_requests_per_hour,
        send_rate: Rate { burst: args.sends_per_second * 4.0, per_second: args.sends_per_second },
        stranger_send_rate: Rate {
            burst: args.stranger_sends_per_second * 12.0,
            per_second: args.stranger_sends_per_second,
        },
        fetch_rate: Rate {
            burst: f64::from(args.key_fetches_per_hour),
            per_second: f64::from(args.key_fetches_per_hour) / 3600.0,
        },
        one_time_key_fetches_per_hour: args.one_time_key_fetches_per_hour,
        mailbox_max_messages: args.mailbox_max_messages.max(2),
        mailbox_max_bytes: args.mailbox_max_bytes,
        mailbox_sender_share_percent: args.mailbox_sender_share_percent,
        media_max_bytes: args.media_max_bytes,
        discovery_per_day: args.discovery_per_day,
        code_requests_per_prefix_per_hour: args.code_requests_per_prefix_per_hour,
        code_requests_per_address_per_hour: args.code_requests_per_address_per_hour,
        code_budget_loopback: args.code_budget_loopback,
        pre_auth_per_address: args.pre_auth_per_address,
        link_requests_per_address_per_hour: args.link_requests_per_address_per_hour,
        stall_timeout_ms: (args.stalled_output_s * 1000.0) as u64,
        request_rate: Rate {
            burst: args.requests_per_second * 10.0,
            per_second: args.requests_per_second,
        },
        push_insecure_endpoints: args.push_insecure_endpoints,
        push_allowed_hosts: args.push_allowed_hosts.clone(),
        code_pow_bits: args.code_pow_bits.min(32),
        media_ttl_ms: (args.media_ttl_s * 1000.0) as u64,
        disk_reserve_bytes: args.disk_reserve_mib.saturating_mul(1 << 20),
        media_account_max_bytes: args.media_account_max_bytes,
        // Clients ping at this interval (`Welcome`): a third of the idle timeout, so an
        // idle chat survives two lost pings; at most the default 30 s.
        heartbeat_interval_ms: ((args.idle_timeout_s * 1000.0 / 3.0) as u32).clamp(100, 30_000),
        ..CoreConfig::default()
    }
}

/// The server's configuration from the flags, or `None` (after telling the operator)
/// when an address or the code webhook does not parse.
fn server_config(args: Args) -> Option<ServerConfig> {
    let core = core_config(&args);
    let cluster = cluster_settings(&args)?;
    // Every address is checked, so one run names every bad one.
    let (Some(admin), Some(tls_listen), Some(ws_listen), Some(wss_listen)) = (
        optional_address("--admin", &args.admin),
        optional_address("--tls-listen", &args.tls_listen),
        optional_address("--ws-listen", &args.ws_listen),
        optional_address("--wss-listen", &args.wss_listen),
    ) else {
        return None;
    };
    if !plaintext_allowed(args.listen, ws_listen, args.insecure_listeners) {
        return None;
    }
    let code_webhook = match args.code_webhook.as_deref().map(WebhookUrl::parse) {
        None => None,
        Some(Ok(url)) => Some(url),
        Some(Err(error)) => {
            eprintln!("ternd: --code-webhook {error}");
            return None;
        }
    };
    let source = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => CertSource::Files { cert, key },
        _ => CertSource::Development { data_dir: args.data_dir.clone() },
    };
    let tls = TlsSettings { source, allow_tls12: args.tls12 };
    Some(ServerConfig {
        data_dir: args.data_dir,
        listen: args.listen,
        shards: args.shards,
        cores: args.cores,
        push: if args.push == "log" { PushMode::Log } else { PushMode::Http },
        admin,
        tls_listen,
        ws_listen,
        wss_listen,
        tls,
        auth_deadline: Duration::from_secs_f64(args.auth_deadline_s),
        idle_timeout: Duration::from_secs_f64(args.idle_timeout_s),
        maintenance_interval: Duration::from_secs_f64(args.maintenance_interval_s),
        segment_bytes: args.segment_mib * 1024 * 1024,
        dedup_entries_per_shard: args.dedup_entries_per_shard,
        code_webhook,
        max_connections: args.max_connections,
        proxy_protocol_from: args.proxy_protocol_from.clone(),
        socket_buffer_bytes: args.socket_buffer_kib.saturating_mul(1024),
        core,
        cluster,
    })
}

/// The cluster to join, `Some(None)` for a single node, or `None` (after telling the
/// operator) when `--cluster` does not parse or comes without `--node-id`.
fn cluster_settings(args: &Args) -> Option<Option<ClusterSettings>> {
    let Some(url) = &args.cluster else { return Some(None) };
    let (endpoints, name) = match ClusterSettings::parse_url(url) {
        Ok(parsed) => parsed,
        Err(error) => {
            eprintln!("ternd: --cluster {error}");
            return None;
        }
    };
    let node = args.node_id.clone().unwrap_or_default();
    if node.is_empty() || !node.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        eprintln!("ternd: --cluster needs --node-id, of letters, digits, - and _");
        return None;
    }
    Some(Some(ClusterSettings {
        endpoints,
        name,
        node,
        initial_nodes: args.cluster_initial_nodes,
        lease_ttl_s: args.cluster_lease_s,
        advertise_host: args.advertise_host.clone(),
    }))
}

/// Whether the plaintext listeners may take their addresses: loopback always, any other
/// only with `--insecure-listeners` (after telling the operator why not).
fn plaintext_allowed(listen: SocketAddr, ws_listen: Option<SocketAddr>, insecure: bool) -> bool {
    let exposed: Vec<String> = [("--listen", Some(listen)), ("--ws-listen", ws_listen)]
        .into_iter()
        .filter_map(|(flag, address)| Some((flag, address?)))
        .filter(|(_, address)| !address.ip().is_loopback())
        .map(|(flag, address)| format!("{flag} {address}"))
        .collect();
    if exposed.is_empty() || insecure {
        return true;
    }
    eprintln!(
        "ternd: {} would carry tokens in clear beyond this machine: serve clients over TLS \
         (--tls-listen, --wss-listen) and keep the plaintext listeners on loopback (or off), \
         or pass --insecure-listeners behind a proxy that terminates TLS",
        exposed.join(" and ")
    );
    false
}

/// Parses an address flag that may be "off": `Some(None)` for off, `None` (after telling
/// the operator) when it is not an address.
fn optional_address(flag: &str, value: &str) -> Option<Option<SocketAddr>> {
    if value == "off" {
        return Some(None);
    }
    match value.parse() {
        Ok(address) => Some(Some(address)),
        Err(error) => {
            eprintln!(
                "ternd: {flag} {value}: {error} (use an address like 127.0.0.1:7401, or off)"
            );
            None
        }
    }
}

/// Puts the settings of the `--config` file (if any) before the command-line flags, so
/// that flags given on the command line override it (`args_override_self`).
fn with_config_file(argv: Vec<String>) -> Result<Vec<String>, String> {
    let position = argv.iter().position(|a| a == "--config" || a.starts_with("--config="));
    let Some(position) = position else { return Ok(argv) };
    let path = match argv[position].strip_prefix("--config=") {
        Some(path) => path.to_string(),
        None => argv.get(position + 1).cloned().ok_or("--config needs a file")?,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("--config {path}: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e| format!("--config {path}: {e}"))?;
    let mut from_file = vec![argv[0].clone()];
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            // A switch: present when true, absent when false.
            toml::Value::Boolean(true) => {
                from_file.push(flag);
                continue;
            }
            toml::Value::Boolean(false) => continue,
            other => return Err(format!("--config {path}: {key} = {other} is not a plain value")),
        };
        from_file.push(flag);
        from_file.push(value);
    }
    Ok(from_file.into_iter().chain(argv.into_iter().skip(1)).collect())
}
