//! The first load generator: many client connections on loopback, closed loop.
//!
//! It starts a `ternd` (release build, temporary data directory on the target file
//! system), registers `--users` accounts through the protocol (reading the codes from the
//! server log, as a developer would), connects them all, and for `--seconds` has every
//! user send 100-byte messages to random other users with at most `--window` sends in
//! flight. Every message carries its send time; the recipient side records
//! send→deliver latency, the sender records send→sent (the durable ack). Deliveries are
//! acknowledged in batches. Prints messages/s and p50/p99/p999 of both latencies.
//!
//! Other scenarios (`--scenario`): `presence` (a presence storm), `groups` (fan-out),
//! `media` (upload and download), `drain` (store and forward: offline users' mailboxes
//! filled, then read), `recovery` (mailboxes filled, the server killed with SIGKILL and
//! restarted on the same data directory: time until it serves them again, per GiB of
//! log) and `abuse` (issue 20's abuse run: the honest 1:1 load alone, then beside
//! `--hostile` attacking connections; `abuse.rs`, `hostile.rs`). Every run ends with one
//! JSON object on stdout (after `JSON `), also appended to `--json FILE`, with the
//! scenario's figures and the server's RSS and CPU from `/proc`.
//!
//! Run: `cargo run --release -p tern-bench --bin loadgen -- --users 1000 --seconds 20`
//! (closed loop) or add `--rate 50000` for an open-loop run at a fixed total rate
//! (build ternd first: `cargo build --release --bin ternd`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod abuse;
mod hostile;

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tern_bench::proto::{frame, handshake, read_until, register_with_keys};
use tern_bench::server::cpu_seconds;
use tern_wire::messages::*;
use tern_wire::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Parser)]
struct Args {
    /// Users (one connection each).
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Seconds of load after all users are connected.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Sends in flight per user (unacknowledged by the server).
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Open loop: total messages per second over all users (0: closed loop, as fast as
    /// the window allows).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Ciphertext bytes per message.
    #[arg(long, default_value_t = 100)]
    message_bytes: usize,
    /// Messages scenario: sample the server every second (RSS, open descriptors, bytes
    /// allocated to the data directory, CPU, messages so far) into this CSV file, and
    /// print how the first and last minutes compare (a soak run).
    #[arg(long)]
    sample_file: Option<PathBuf>,
    /// An extra flag for ternd (repeatable): `--ternd-arg=--dedup-entries-per-shard=65536`.
    #[arg(long, allow_hyphen_values = true)]
    ternd_arg: Vec<String>,
    /// The ternd binary.
    #[arg(long, default_value = "target/release/ternd")]
    ternd: PathBuf,
    /// Also append the run's results as one JSON object per line to this file (the same
    /// object is printed on stdout after `JSON `).
    #[arg(long)]
    json: Option<PathBuf>,
    /// `messages` (the default: users send to each other), `presence` (a presence storm:
    /// users with large contact lists go offline and online), `groups` (fan-out), `media`,
    /// `drain` (store and forward), `recovery` (queue messages as `drain` does, kill the
    /// server, time its restart until it serves them) or `abuse` (the honest load of
    /// `messages` at `--rate`, alone and then beside `--hostile` attackers).
    #[arg(
        long,
        default_value = "messages",
        value_parser = ["messages", "presence", "groups", "media", "drain", "recovery", "abuse"]
    )]
    scenario: String,
    /// Abuse: rounds of (baseline, attack), each phase `--seconds` long; the figures
    /// are over all rounds.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Abuse: hostile connections beside the honest users (0: the baseline only).
    #[arg(long, default_value_t = 1000)]
    hostile: usize,
    /// Abuse: only these attacks (comma-separated: preauth-noread, download-noread,
    /// ping-noread, slowloris, oversized, send-flood, receipts, profiles, groups,
    /// key-fetches, reports, churn); all by default.
    #[arg(long, value_delimiter = ',')]
    attacks: Vec<String>,
    /// Abuse: worker threads of the attackers' own tokio runtime (the honest users keep
    /// the generator's 2).
    #[arg(long, default_value_t = 1)]
    hostile_threads: usize,
    /// Abuse: requests per second of each flooding hostile connection (sends, receipts,
    /// profile lookups, group changes, key fetches, reports).
    #[arg(long, default_value_t = 100.0)]
    flood_rate: f64,
    /// Abuse: seconds a never-reading hostile connection holds its connection unread.
    #[arg(long, default_value_t = 12.0)]
    hostile_hold_s: f64,
    /// Abuse: milliseconds a hostile connection waits before it starts over.
    #[arg(long, default_value_t = 100)]
    hostile_pause_ms: u64,
    /// Abuse: the bound ternd's RSS must stay under while attacked (the run says whether
    /// it did, with the other goals: p99 within 2× of the baseline, nothing lost).
    #[arg(long, default_value_t = 1024)]
    rss_bound_mib: u64,
    /// Abuse: one-time prekeys each honest user registers with (drained by key fetches).
    #[arg(long, default_value_t = 20)]
    one_time_keys: usize,
    /// Abuse: also copy ternd's log to this file.
    #[arg(long)]
    ternd_log: Option<PathBuf>,
    /// Drain (store and forward): messages queued for each offline user.
    #[arg(long, default_value_t = 100)]
    drain_messages: usize,
    /// Crash recovery: drop the page cache before the restart (root only), so recovery
    /// reads the log from the disk as after a power cut or reboot.
    #[arg(long)]
    cold: bool,
    /// Media: MiB uploaded and then downloaded by one user.
    #[arg(long, default_value_t = 100)]
    media_mib: usize,
    /// Group fan-out: groups (each of `--group-size` members, one sender each).
    #[arg(long, default_value_t = 50)]
    groups: usize,
    /// Group fan-out: members per group (at most 256).
    #[arg(long, default_value_t = 256)]
    group_size: usize,
    /// Group fan-out: messages each group's sender sends (one at a time).
    #[arg(long, default_value_t = 20)]
    group_messages: usize,
    /// Presence storm: contacts per user (each follows this many others and lets them see).
    #[arg(long, default_value_t = 100)]
    contacts: usize,
    /// Presence storm: disconnect+reconnect cycles per second over all users.
    #[arg(long, default_value_t = 200)]
    churn: u64,
    /// Messages scenario: one more user uploads a file of this many MiB during the
    /// warm-up and commits it halfway through the measurement; latencies of the sends
    /// made while the commit runs are reported apart (0: no upload).
    #[arg(long, default_value_t = 0)]
    commit_mib: usize,
    /// Run ternd on these CPUs only (`taskset -c`, e.g. `0`): with `--cores 1` and the
    /// generator pinned elsewhere (`taskset -c 1 loadgen ...`), no server shares a core
    /// with its load
    #[arg(long)]
    ternd_cpus: Option<String>,
    /// `ternd --cores` (default: ternd's own, every CPU).
    #[arg(long)]
    cores: Option<u32>,
    /// Where the temporary data directory goes (a real file system: O_DIRECT).
    #[arg(long, default_value = "target/loadgen")]
    work_dir: PathBuf,
}

struct Stats {
    sent: AtomicU64,
    delivered: AtomicU64,
    errors: AtomicU64,
    send_to_sent: Mutex<Histogram<u64>>,
    send_to_deliver: Mutex<Histogram<u64>>,
    /// Open loop: a message's intended send time → its bytes handed to the socket (the
    /// generator's own lateness, included in the latencies above).
    lateness: Mutex<Histogram<u64>>,
    /// `--commit-mib`: when the commit was sent and answered (µs since the epoch; 0: not
    /// yet), and the latencies of sends made in between.
    commit_from_us: AtomicU64,
    commit_to_us: AtomicU64,
    during_commit_sent: Mutex<Histogram<u64>>,
    during_commit_deliver: Mutex<Histogram<u64>>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            sent: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            send_to_sent: Mutex::new(Histogram::new(3).unwrap()),
            send_to_deliver: Mutex::new(Histogram::new(3).unwrap()),
            lateness: Mutex::new(Histogram::new(3).unwrap()),
            commit_from_us: AtomicU64::new(0),
            commit_to_us: AtomicU64::new(0),
            during_commit_sent: Mutex::new(Histogram::new(3).unwrap()),
            during_commit_deliver: Mutex::new(Histogram::new(3).unwrap()),
        }
    }

    /// Whether a send made at `t` (µs since the epoch) overlapped the commit.
    fn during_commit(&self, t: u64) -> bool {
        let from = self.commit_from_us.load(Ordering::Relaxed);
        let to = self.commit_to_us.load(Ordering::Relaxed);
        from > 0 && t >= from && (to == 0 || t <= to)
    }

    fn record(
        &self,
        histogram: &Mutex<Histogram<u64>>,
        during: &Mutex<Histogram<u64>>,
        t: u64,
        now: u64,
    ) {
        let _ = histogram.lock().unwrap().record(now.saturating_sub(t));
        if self.during_commit(t) {
            let _ = during.lock().unwrap().record(now.saturating_sub(t));
        }
    }
}

/// Connects and authenticates as `account`, then starts an upload of `blob`'s size.
async fn begin_upload(
    addr: SocketAddr,
    (user_id, token): (u64, [u8; 32]),
    blob: &[u8],
) -> (TcpStream, FrameDecoder, MediaId) {
    let (mut stream, mut decoder) = handshake(addr).await;
    stream.write_all(&frame(2, &Auth { user_id, device_id: 1, token })).await.unwrap();
    read_until(&mut stream, &mut decoder, |f| f.header.request_id == 2).await;
    let begin = MediaBegin { size_bytes: blob.len() as u64, kind: MediaKind::Video };
    stream.write_all(&frame(3, &begin)).await.unwrap();
    let (ty, payload) = read_until(&mut stream, &mut decoder, |f| f.header.request_id == 3).await;
    assert_eq!(ty, MessageType::MediaBegun, "upload starts (is --media-max-bytes big enough?)");
    let media_id = access::<MediaBegun>(&payload).unwrap().media_id;
    (stream, decoder, media_id)
}

/// Sends `blob` as 256 KiB chunks and waits until the server has them all (a status).
async fn send_chunks(
    stream: &mut TcpStream,
    decoder: &mut FrameDecoder,
    media_id: MediaId,
    blob: &[u8],
) {
    let mut out = Vec::new();
    for (i, piece) in blob.chunks(256 * 1024).enumerate() {
        out.clear();
        let chunk = MediaChunk { media_id, offset: (i * 256 * 1024) as u64, data: piece.to_vec() };
        encode_frame(&mut out, 0, 0, &chunk, DEFAULT_MAX_FRAME_BYTES).unwrap();
        stream.write_all(&out).await.unwrap();
    }
    stream.write_all(&frame(4, &MediaStatusRequest { media_id })).await.unwrap();
    read_until(stream, decoder, |f| f.header.request_id == 4).await;
}

/// `--commit-mib`: uploads a file at once, then commits it at `commit_at` and records
/// how long the commit took in `stats`.
async fn upload_then_commit(
    addr: SocketAddr,
    (user_id, token): (u64, [u8; 32]),
    mib: usize,
    epoch: Instant,
    commit_at: Instant,
    stats: Arc<Stats>,
) {
    use sha2::Digest as _;
    let blob: Vec<u8> =
        (0..mib << 20).map(|i| (i as u64).wrapping_mul(0x9E37_79B9) as u8).collect();
    let (mut stream, mut decoder, media_id) = begin_upload(addr, (user_id, token), &blob).await;
    send_chunks(&mut stream, &mut decoder, media_id, &blob).await;
    let sha256: [u8; 32] = sha2::Sha256::digest(&blob).into();
    tokio::time::sleep_until(commit_at.into()).await;
    stats.commit_from_us.store(now_us(epoch), Ordering::Relaxed);
    stream.write_all(&frame(5, &MediaCommit { media_id, sha256 })).await.unwrap();
    let (ty, _) = read_until(&mut stream, &mut decoder, |f| f.header.request_id == 5).await;
    stats.commit_to_us.store(now_us(epoch), Ordering::Relaxed);
    assert_eq!(ty, MessageType::MediaStatus, "commit accepted");
}

/// Appends a 1:1 `SendMessage` of `body` to `peer`'s device 1 (request and client
/// message id `id`), laid out without an owned copy of the body.
fn encode_text(out: &mut Vec<u8>, id: u32, peer: u64, body: &[u8]) {
    let copies = [DeviceCopyRef {
        user_id: peer,
        device_id: 1,
        e2e_type: E2eType::OlmMessage,
        ciphertext: body,
    }];
    let send = SendMessageRef {
        client_message_id: u64::from(id),
        to: Conversation::User(peer),
        kind: EnvelopeKind::Text,
        ttl_s: 0,
        copies: &copies,
    };
    encode_frame(out, id, 0, &send, DEFAULT_MAX_FRAME_BYTES).unwrap();
}

fn now_us(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

fn main() {
    let args = Args::parse();
    // One worker thread per CPU the generator may use: two workers time-sliced on the one
    // CPU of a pinned run (`taskset -c 1`) put scheduler quanta of milliseconds into the
    // latencies measured.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("the generator's runtime starts")
        .block_on(run(args));
}

async fn run(args: Args) {
    std::fs::create_dir_all(&args.work_dir).unwrap();
    let data_dir = tempfile::tempdir_in(&args.work_dir).unwrap();
    let bench_dir = tempfile::tempdir_in(&args.work_dir).unwrap();
    let mut extra = vec!["--media-max-bytes".to_string(), "10000000000".to_string()];
    extra.extend(args.cores.iter().flat_map(|cores| ["--cores".to_string(), cores.to_string()]));
    if args.scenario == "abuse" {
        // Registration stays relaxed (codes per number and prefix, as every scenario),
        // but the send rates are ternd's own: the attackers must meet them (the honest
        // users write to random others a few times a second, under both).
        extra.extend(["--sends-per-second".to_string(), "50".to_string()]);
        use tern_bench::server::{known_flags, LIFTED_BUDGETS};
        let known = known_flags(&args.ternd, &LIFTED_BUDGETS);
        for (flag, default) in LIFTED_BUDGETS.into_iter().zip(["5", "100"]) {
            if known.contains(&flag) {
                extra.extend([flag.to_string(), default.to_string()]);
            }
        }
    }
    if matches!(args.scenario.as_str(), "drain" | "recovery") {
        // Ten senders fill every mailbox: each may fill all of it (the per-sender share
        // of issue 20 refused the fill past half of `--mailbox-max-messages`).
        let flag = "--mailbox-sender-share-percent";
        if tern_bench::server::known_flags(&args.ternd, &[flag]).contains(&flag) {
            extra.extend([flag.to_string(), "100".to_string()]);
        }
    }
    extra.extend(args.ternd_arg.iter().cloned());
    let log = args.ternd_log.as_deref();
    let cpus = args.ternd_cpus.as_deref();
    let ternd = tern_bench::server::start_logged(&args.ternd, data_dir.path(), &extra, log, cpus);
    let (mut child, addr, codes) = (ternd.child, ternd.addr, ternd.codes);

    // Register everyone (sequentially: registration is not what is measured).
    let mut accounts = Vec::with_capacity(args.users);
    let mut signers = Vec::with_capacity(args.users);
    let started = Instant::now();
    let one_time_keys = if args.scenario == "abuse" { args.one_time_keys } else { 0 };
    for i in 0..args.users {
        let phone = format!("+1555{:07}", i);
        let registered = register_with_keys(addr, &phone, &codes, one_time_keys).await;
        signers.push(registered.signer);
        accounts.push((registered.user_id, registered.token));
    }
    eprintln!("registered {} users in {:.1} s", args.users, started.elapsed().as_secs_f64());
    let uploader = if args.commit_mib > 0 {
        let registered = register_with_keys(addr, "+15559999999", &codes, 0).await;
        Some((registered.user_id, registered.token))
    } else {
        None
    };
    let pid = child.id();
    let mut result = match args.scenario.as_str() {
        "drain" => store_and_forward(&args, addr, &accounts).await,
        "recovery" => {
            let restart = |binary: &std::path::Path| {
                tern_bench::server::start(binary, data_dir.path(), &extra, cpus)
            };
            crash_recovery(&args, &mut child, restart, addr, &accounts, data_dir.path()).await
        }
        "media" => media_transfer(&args, addr, accounts, bench_dir.path()).await,
        "groups" => group_fanout(&args, addr, accounts, signers).await,
        "presence" => presence_storm(&args, addr, accounts, pid).await,
        "abuse" => abuse::run(&args, addr, &accounts, &codes, pid).await,
        _ => one_to_one(&args, addr, accounts, uploader, pid, data_dir.path()).await,
    };
    let pid = child.id();
    // Named as `peerbench` names its runs, so that `bench/peers/run.sh` gathers both.
    let scenario = if args.scenario == "messages" { "online" } else { args.scenario.as_str() };
    result["peer"] = json!("tern");
    result["label"] = json!("fdatasync before sent");
    result["scenario"] = json!(scenario);
    result["users"] = json!(args.users);
    result["message_bytes"] = json!(args.message_bytes);
    result["server_rss_kib"] = json!(tern_bench::server::rss_kib(pid));
    result["server_cpu_s"] = json!(cpu_seconds(pid));
    // The generator shares the machine with the server: what it used says how much of
    // the two cores the server had.
    result["generator_cpu_s"] = json!(cpu_seconds(std::process::id()));
    let _ = child.kill();
    let _ = child.wait();
    let line = result.to_string();
    println!("JSON {line}");
    if let Some(path) = &args.json {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        writeln!(file, "{line}").expect("the JSON file is writable");
    }
}

/// Online 1:1: every user sends to random others with at most `--window` sends in flight
/// (closed loop) or at `--rate` in total (open loop), for `--seconds` after a warm-up.
async fn one_to_one(
    args: &Args,
    addr: SocketAddr,
    accounts: Vec<(u64, [u8; 32])>,
    uploader: Option<(u64, [u8; 32])>,
    pid: u32,
    data_dir: &std::path::Path,
) -> Value {
    let stats = Arc::new(Stats::new());
    let running = Arc::new(AtomicBool::new(true));
    let measuring = Arc::new(AtomicBool::new(false));
    let epoch = Instant::now();
    let commit_at = epoch + Duration::from_secs(2) + Duration::from_secs(args.seconds) / 2;
    let upload = uploader.map(|account| {
        let (mib, stats) = (args.commit_mib, stats.clone());
        tokio::spawn(upload_then_commit(addr, account, mib, epoch, commit_at, stats))
    });
    let user_ids: Arc<Vec<u64>> = Arc::new(accounts.iter().map(|a| a.0).collect());
    let mut schedules = (args.rate > 0).then(|| {
        let schedules = tern_bench::pacer::start(args.rate, accounts.len(), epoch, running.clone());
        schedules.into_iter().collect::<std::collections::VecDeque<_>>()
    });
    let mut tasks = Vec::new();
    for (index, (user_id, token)) in accounts.into_iter().enumerate() {
        let (stats, running, measuring, user_ids) =
            (stats.clone(), running.clone(), measuring.clone(), user_ids.clone());
        let (window, message_bytes) = (args.window, args.message_bytes);
        // Open loop: the pacer hands this user the intended send time of each of its
        // messages (one per `users / rate` seconds).
        let mut schedule = schedules.as_mut().map(|s| s.pop_front().expect("one per user"));
        tasks.push(tokio::spawn(async move {
            let (stream, mut decoder) = handshake(addr).await;
            let (mut reader, mut writer) = stream.into_split();
            let auth = Auth { user_id, device_id: 1, token };
            writer.write_all(&frame(2, &auth)).await.unwrap();
            let mut buffer = vec![0u8; 65536];
            let mut in_flight: HashMap<u32, u64> = HashMap::new();
            let mut next_id = 10u32;
            let mut rng = (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut out = Vec::new();
            let mut authed = false;
            // Coordinated-omission-safe: a message whose time came while the window was
            // full is still due, and its latency counts from the time it was meant to
            // go, not the time it went.
            let mut due: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
            let mut oldest_intended = None;
            loop {
                if authed && running.load(Ordering::Relaxed) {
                    let open_loop = schedule.is_some();
                    while in_flight.len() < window && (!open_loop || !due.is_empty()) {
                        let intended = due.pop_front();
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let mut peer = user_ids[(rng % user_ids.len() as u64) as usize];
                        if peer == user_id {
                            peer = user_ids[(index + 1) % user_ids.len()];
                        }
                        let t = intended.unwrap_or_else(|| now_us(epoch));
                        if intended.is_some() {
                            oldest_intended.get_or_insert(t);
                        }
                        let mut body = vec![0u8; message_bytes.max(8)];
                        body[..8].copy_from_slice(&t.to_le_bytes());
                        encode_text(&mut out, next_id, peer, &body);
                        in_flight.insert(next_id, t);
                        next_id += 1;
                    }
                }
                if !out.is_empty() {
                    if writer.write_all(&out).await.is_err() {
                        break;
                    }
                    out.clear();
                    if let Some(t) = oldest_intended.take() {
                        if measuring.load(Ordering::Relaxed) {
                            let late = now_us(epoch).saturating_sub(t);
                            let _ = stats.lateness.lock().unwrap().record(late);
                        }
                    }
                }
                if !running.load(Ordering::Relaxed) && in_flight.is_empty() {
                    break;
                }
                let read = tokio::time::timeout(Duration::from_secs(2), reader.read(&mut buffer));
                let n = match &mut schedule {
                    Some(schedule) => tokio::select! {
                        result = read => match result {
                            Ok(Ok(n)) if n > 0 => n,
                            _ => break,
                        },
                        intended = schedule.recv() => {
                            due.extend(intended);
                            tern_bench::pacer::drain(schedule, &mut due);
                            continue;
                        }
                    },
                    None => match read.await {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => break,
                    },
                };
                decoder.feed(&buffer[..n]);
                let mut ack_up_to = None;
                while let Some(frame) = decoder.next_frame().expect("server frames decode") {
                    let now = now_us(epoch);
                    match frame.message {
                        Message::AuthOk(_) => authed = true,
                        Message::SendAck(_) => {
                            if let Some(t) = in_flight.remove(&frame.header.request_id) {
                                if measuring.load(Ordering::Relaxed) {
                                    stats.sent.fetch_add(1, Ordering::Relaxed);
                                    let (all, during) =
                                        (&stats.send_to_sent, &stats.during_commit_sent);
                                    stats.record(all, during, t, now);
                                }
                            }
                        }
                        Message::Deliver(d) => {
                            ack_up_to = Some(d.mailbox_seq);
                            if d.envelope.kind == ArchivedEnvelopeKind::Text
                                && measuring.load(Ordering::Relaxed)
                            {
                                let t =
                                    u64::from_le_bytes(d.envelope.body[..8].try_into().unwrap());
                                stats.delivered.fetch_add(1, Ordering::Relaxed);
                                let (all, during) =
                                    (&stats.send_to_deliver, &stats.during_commit_deliver);
                                stats.record(all, during, t, now);
                            }
                        }
                        Message::SendError(_) | Message::ErrorFrame(_) => {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                            in_flight.remove(&frame.header.request_id);
                        }
                        _ => {}
                    }
                }
                if let Some(seq) = ack_up_to {
                    encode_frame(
                        &mut out,
                        0,
                        0,
                        &DeliveryAck { up_to_mailbox_seq: seq },
                        DEFAULT_MAX_FRAME_BYTES,
                    )
                    .unwrap();
                }
            }
        }));
    }
    // Warm up, then measure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let (server_cpu0, generator_cpu0) = (cpu_seconds(pid), cpu_seconds(std::process::id()));
    let sampler = args.sample_file.clone().map(|path| {
        let (stats, running) = (stats.clone(), running.clone());
        tokio::spawn(sample_server(path, pid, data_dir.to_path_buf(), stats, running))
    });
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let server_cpu_s = cpu_seconds(pid) - server_cpu0;
    let generator_cpu_s = cpu_seconds(std::process::id()) - generator_cpu0;
    running.store(false, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    if let Some(sampler) = sampler {
        let _ = sampler.await;
    }
    if let Some(upload) = upload {
        upload.await.expect("the upload ran");
    }

    let sent = stats.sent.load(Ordering::Relaxed);
    let delivered = stats.delivered.load(Ordering::Relaxed);
    let s = stats.send_to_sent.lock().unwrap();
    let d = stats.send_to_deliver.lock().unwrap();
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "users {} window {} size {} B, {:.0} s: sent {:.0} msg/s, delivered {:.0} msg/s, errors {}",
        args.users,
        args.window,
        args.message_bytes,
        elapsed,
        sent as f64 / elapsed,
        delivered as f64 / elapsed,
        stats.errors.load(Ordering::Relaxed)
    );
    println!(
        "send→sent    p50 {:.2} ms  p99 {:.2} ms  p999 {:.2} ms",
        ms(&s, 0.5),
        ms(&s, 0.99),
        ms(&s, 0.999)
    );
    println!(
        "send→deliver p50 {:.2} ms  p99 {:.2} ms  p999 {:.2} ms",
        ms(&d, 0.5),
        ms(&d, 0.99),
        ms(&d, 0.999)
    );
    let late = stats.lateness.lock().unwrap();
    if args.rate > 0 {
        println!(
            "generator lateness (tick → written) p50 {:.2} ms  p99 {:.2} ms  p999 {:.2} ms",
            ms(&late, 0.5),
            ms(&late, 0.99),
            ms(&late, 0.999)
        );
    }
    let server_cpu_us_per_message = server_cpu_s * 1e6 / delivered.max(1) as f64;
    println!(
        "server CPU {:.2} s/s, {server_cpu_us_per_message:.1} µs per delivered message; \
         generator {:.2} s/s",
        server_cpu_s / elapsed,
        generator_cpu_s / elapsed,
    );
    let mut commit = json!(null);
    if args.commit_mib > 0 {
        let from = stats.commit_from_us.load(Ordering::Relaxed);
        let commit_ms =
            stats.commit_to_us.load(Ordering::Relaxed).saturating_sub(from) as f64 / 1e3;
        let (ds, dd) =
            (stats.during_commit_sent.lock().unwrap(), stats.during_commit_deliver.lock().unwrap());
        println!(
            "commit of {} MiB took {commit_ms:.1} ms; sends during it ({}): \
             send→sent p99 {:.2} ms, send→deliver p99 {:.2} ms (max {:.2} ms)",
            args.commit_mib,
            dd.len(),
            ms(&ds, 0.99),
            ms(&dd, 0.99),
            dd.max() as f64 / 1000.0,
        );
        commit = json!({
            "mib": args.commit_mib,
            "commit_ms": commit_ms,
            "samples": dd.len(),
            "sent_ms": quantiles(&ds),
            "deliver_ms": quantiles(&dd),
        });
    }
    json!({
        "commit_during_load": commit,
        "window": args.window,
        "rate": args.rate,
        "seconds": elapsed,
        "sent_per_s": sent as f64 / elapsed,
        "delivered_per_s": delivered as f64 / elapsed,
        "errors": stats.errors.load(Ordering::Relaxed),
        "sent_ms": quantiles(&s),
        "deliver_ms": quantiles(&d),
        "generator_lateness_ms": quantiles(&late),
        "server_cpu_per_s": server_cpu_s / elapsed,
        "server_cpu_us_per_message": server_cpu_us_per_message,
        "generator_cpu_per_s": generator_cpu_s / elapsed,
    })
}

/// p50, p99 and p999 of a histogram of microseconds, in milliseconds (for the JSON line).
fn quantiles(h: &Histogram<u64>) -> Value {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({ "p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999) })
}

/// One sample of the server: (seconds, RSS KiB, open descriptors, data dir bytes).
type Sample = (f64, u64, u64, u64);

/// Samples the server every second until the load stops; writes a CSV and prints the
/// first and last minute side by side (what a soak run must show: nothing grows).
async fn sample_server(
    path: PathBuf,
    pid: u32,
    data_dir: PathBuf,
    stats: Arc<Stats>,
    running: Arc<AtomicBool>,
) {
    let mut csv = String::from("seconds,rss_kib,open_fds,data_dir_bytes,cpu_s,sent,delivered\n");
    let mut samples: Vec<Sample> = Vec::new();
    let start = Instant::now();
    while running.load(Ordering::Relaxed) {
        let rss = tern_bench::server::rss_kib(pid);
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
        let disk = allocated_bytes(&data_dir);
        let t = start.elapsed().as_secs_f64();
        let (sent, delivered) =
            (stats.sent.load(Ordering::Relaxed), stats.delivered.load(Ordering::Relaxed));
        csv.push_str(&format!(
            "{t:.1},{rss},{fds},{disk},{:.1},{sent},{delivered}\n",
            cpu_seconds(pid)
        ));
        samples.push((t, rss, fds, disk));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    std::fs::write(&path, csv).expect("the sample file is writable");
    let window = |from: f64, to: f64| -> Option<(f64, f64, f64)> {
        let part: Vec<&Sample> = samples.iter().filter(|s| s.0 >= from && s.0 < to).collect();
        let n = part.len() as f64;
        (n > 0.0).then(|| {
            let avg = |f: fn(&Sample) -> u64| part.iter().map(|s| f(s) as f64).sum::<f64>() / n;
            (avg(|s| s.1), avg(|s| s.2), avg(|s| s.3))
        })
    };
    let end = samples.last().map_or(0.0, |s| s.0);
    let max = |f: fn(&Sample) -> u64| samples.iter().map(f).max().unwrap_or(0);
    if let (Some(first), Some(last)) = (window(0.0, 60.0), window(end - 60.0, end + 1.0)) {
        println!(
            "soak: {} samples; first minute avg RSS {:.0} KiB, fds {:.0}, data dir {:.1} MiB; \
             last minute avg RSS {:.0} KiB, fds {:.0}, data dir {:.1} MiB; max RSS {} KiB, \
             fds {}, data dir {:.1} MiB ({})",
            samples.len(),
            first.0,
            first.1,
            first.2 / 1048576.0,
            last.0,
            last.1,
            last.2 / 1048576.0,
            max(|s| s.1),
            max(|s| s.2),
            max(|s| s.3) as f64 / 1048576.0,
            path.display()
        );
    }
}

/// Bytes allocated on disk to the files under `dir` (segments are preallocated).
fn allocated_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Connects, authenticates, publishes contacts and follows them; returns the stream.
async fn presence_session(
    addr: SocketAddr,
    (user_id, token): (u64, [u8; 32]),
    contacts: &[u64],
    follows: &[u64],
) -> (TcpStream, FrameDecoder) {
    let (mut stream, mut decoder) = handshake(addr).await;
    stream.write_all(&frame(2, &Auth { user_id, device_id: 1, token })).await.unwrap();
    read_until(&mut stream, &mut decoder, |f| f.header.request_id == 2).await;
    stream.write_all(&frame(3, &SetContacts { user_ids: contacts.to_vec() })).await.unwrap();
    stream.write_all(&frame(4, &PresenceSubscribe { user_ids: follows.to_vec() })).await.unwrap();
    (stream, decoder)
}

/// The presence storm: every user lets its next `contacts` users see it and follows its
/// previous `contacts`; then users are disconnected and reconnected at `churn` per
/// second. Reports presence events delivered, events per cycle and the server's CPU time
/// per cycle.
async fn presence_storm(
    args: &Args,
    addr: SocketAddr,
    accounts: Vec<(u64, [u8; 32])>,
    pid: u32,
) -> Value {
    let n = accounts.len();
    let k = args.contacts.min(n - 1);
    let ids: Vec<u64> = accounts.iter().map(|a| a.0).collect();
    let contacts_of = |i: usize| -> Vec<u64> { (1..=k).map(|j| ids[(i + j) % n]).collect() };
    let follows_of = |i: usize| -> Vec<u64> { (1..=k).map(|j| ids[(i + n - j) % n]).collect() };
    let events = Arc::new(AtomicU64::new(0));
    let cycles = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let mut toggles = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    for (i, account) in accounts.iter().copied().enumerate() {
        let (contacts, follows) = (contacts_of(i), follows_of(i));
        let (events, cycles, running) = (events.clone(), cycles.clone(), running.clone());
        let toggle = Arc::new(tokio::sync::Notify::new());
        toggles.push(toggle.clone());
        tasks.push(tokio::spawn(async move {
            let mut buffer = vec![0u8; 65536];
            while running.load(Ordering::Relaxed) {
                let (mut stream, mut decoder) =
                    presence_session(addr, account, &contacts, &follows).await;
                loop {
                    tokio::select! {
                        read = stream.read(&mut buffer) => {
                            let Ok(read) = read else { break };
                            if read == 0 {
                                break;
                            }
                            decoder.feed(&buffer[..read]);
                            while let Some(frame) = decoder.next_frame().expect("frames decode") {
                                if frame.header.message_type == MessageType::PresenceEvent {
                                    events.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        _ = toggle.notified() => break,
                    }
                }
                drop(stream);
                cycles.fetch_add(1, Ordering::Relaxed);
                // Offline for a moment, then back (re-following, as a client does).
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // Everyone connected and subscribed.
    let (events_before, cycles_before) =
        (events.load(Ordering::Relaxed), cycles.load(Ordering::Relaxed));
    let cpu_before = cpu_seconds(pid);
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.churn.max(1) as f64));
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    while start.elapsed() < Duration::from_secs(args.seconds) {
        ticker.tick().await;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        toggles[(rng % n as u64) as usize].notify_one();
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // Let the last events arrive.
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu_before;
    let events = events.load(Ordering::Relaxed) - events_before;
    let cycles = cycles.load(Ordering::Relaxed) - cycles_before;
    running.store(false, Ordering::Relaxed);
    for toggle in &toggles {
        toggle.notify_one();
    }
    for task in tasks {
        task.abort();
    }
    println!(
        "presence storm: {n} users, {k} contacts each, {:.0} s: {cycles} offline+online cycles \
         ({:.0}/s), {events} presence events ({:.0}/s, {:.1} per cycle), ternd CPU {:.2} s \
         ({:.0} µs per cycle, {:.1} µs per event)",
        elapsed,
        cycles as f64 / elapsed,
        events as f64 / elapsed,
        events as f64 / cycles.max(1) as f64,
        cpu,
        cpu * 1e6 / cycles.max(1) as f64,
        cpu * 1e6 / events.max(1) as f64,
    );
    json!({
        "contacts": k,
        "seconds": elapsed,
        "cycles_per_s": cycles as f64 / elapsed,
        "events_per_s": events as f64 / elapsed,
        "events_per_cycle": events as f64 / cycles.max(1) as f64,
        "server_cpu_us_per_cycle": cpu * 1e6 / cycles.max(1) as f64,
        "server_cpu_us_per_event": cpu * 1e6 / events.max(1) as f64,
    })
}

/// Senders that fill the offline users' mailboxes in the drain scenario (as `peerbench`).
const DRAIN_SENDERS: usize = 10;

/// Store and forward: the last `DRAIN_SENDERS` users queue `--drain-messages` messages for
/// each of the others while those are offline (`fill_mailboxes`); then every recipient
/// connects and reads its mailbox (`drain_mailboxes`). Reports the time from the first
/// connect to the last delivery, and msg/s.
async fn store_and_forward(args: &Args, addr: SocketAddr, accounts: &[(u64, [u8; 32])]) -> Value {
    let fill_s = fill_mailboxes(args, addr, accounts).await;
    let (recipients, want) = (accounts.len() - DRAIN_SENDERS, args.drain_messages);
    let start = Instant::now();
    let (got, _) = drain_mailboxes(addr, &accounts[..recipients], want).await;
    let elapsed = start.elapsed().as_secs_f64();
    let expected = (recipients * want) as u64;
    println!(
        "drain: {recipients} users × {want} queued (filled in {fill_s:.2} s = {:.0} msg/s): \
         {got} of {expected} delivered in {elapsed:.2} s = {:.0} msg/s",
        expected as f64 / fill_s,
        got as f64 / elapsed,
    );
    json!({
        "drain_messages": want,
        "fill_seconds": fill_s,
        "expected": expected,
        "delivered": got,
        "seconds": elapsed,
        "delivered_per_s": got as f64 / elapsed,
    })
}

/// Queues `--drain-messages` messages for each user but the last `DRAIN_SENDERS`, sent by
/// those (each keeps 64 sends in flight and waits for their sent ticks: every message is
/// durable when this returns). Returns the seconds it took.
async fn fill_mailboxes(args: &Args, addr: SocketAddr, accounts: &[(u64, [u8; 32])]) -> f64 {
    assert!(accounts.len() > DRAIN_SENDERS, "--users must exceed {DRAIN_SENDERS}");
    let (recipients, senders) = accounts.split_at(accounts.len() - DRAIN_SENDERS);
    let (want, body) = (args.drain_messages, vec![0u8; args.message_bytes.max(8)]);
    let fill = Instant::now();
    let mut tasks = Vec::new();
    for (s, &(user_id, token)) in senders.iter().enumerate() {
        let to: Vec<u64> = recipients.iter().skip(s).step_by(DRAIN_SENDERS).map(|a| a.0).collect();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let (mut stream, mut decoder) = handshake(addr).await;
            stream.write_all(&frame(2, &Auth { user_id, device_id: 1, token })).await.unwrap();
            read_until(&mut stream, &mut decoder, |f| f.header.request_id == 2).await;
            let mut queue = to.iter().flat_map(|&peer| std::iter::repeat_n(peer, want));
            let (mut in_flight, mut done, mut next_id) = (0usize, false, 10u32);
            let (mut out, mut buffer) = (Vec::new(), vec![0u8; 65536]);
            loop {
                while !done && in_flight < 64 {
                    let Some(peer) = queue.next() else {
                        done = true;
                        break;
                    };
                    encode_text(&mut out, next_id, peer, &body);
                    (in_flight, next_id) = (in_flight + 1, next_id + 1);
                }
                if !out.is_empty() {
                    stream.write_all(&out).await.unwrap();
                    out.clear();
                }
                if done && in_flight == 0 {
                    break;
                }
                let n = stream.read(&mut buffer).await.expect("read");
                assert!(n > 0, "server closed the connection");
                decoder.feed(&buffer[..n]);
                while let Some(frame) = decoder.next_frame().expect("server frames decode") {
                    match frame.message {
                        Message::SendAck(_) => in_flight -= 1,
                        Message::SendError(e) => panic!("send refused: {:?}", e.code),
                        Message::ErrorFrame(e) => panic!("refused: {:?}", e.code),
                        _ => {}
                    }
                }
            }
        }));
    }
    for task in tasks.drain(..) {
        task.await.unwrap();
    }
    fill.elapsed().as_secs_f64()
}

/// Every recipient connects (at most 100 handshakes at a time, as `peerbench` does) and
/// reads `want` messages from its mailbox, acknowledging each read batch as the messages
/// scenario does (so delivered receipts are stored for the senders). Returns how many
/// arrived (a recipient gives up after 10 s without data) and when the first did.
async fn drain_mailboxes(
    addr: SocketAddr,
    recipients: &[(u64, [u8; 32])],
    want: usize,
) -> (u64, Option<Instant>) {
    let mut tasks = Vec::new();
    let delivered = Arc::new(AtomicU64::new(0));
    let first = Arc::new(std::sync::OnceLock::new());
    let gate = Arc::new(tokio::sync::Semaphore::new(100));
    for &(user_id, token) in recipients {
        let (delivered, gate, first) = (delivered.clone(), gate.clone(), first.clone());
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire().await.unwrap();
            let (mut stream, mut decoder) = handshake(addr).await;
            stream.write_all(&frame(2, &Auth { user_id, device_id: 1, token })).await.unwrap();
            drop(permit);
            let (mut got, mut buffer) = (0, vec![0u8; 65536]);
            while got < want {
                let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer));
                let n = match read.await {
                    Ok(Ok(n)) if n > 0 => n,
                    _ => break,
                };
                decoder.feed(&buffer[..n]);
                let mut ack = None;
                while let Some(frame) = decoder.next_frame().expect("server frames decode") {
                    if let Message::Deliver(d) = frame.message {
                        ack = Some(d.mailbox_seq);
                        if d.envelope.kind == ArchivedEnvelopeKind::Text {
                            got += 1;
                            delivered.fetch_add(1, Ordering::Relaxed);
                            let _ = first.set(Instant::now());
                        }
                    }
                }
                if let Some(seq) = ack {
                    let ack = frame(0, &DeliveryAck { up_to_mailbox_seq: seq });
                    if stream.write_all(&ack).await.is_err() {
                        break;
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    (delivered.load(Ordering::Relaxed), first.get().copied())
}

/// Crash recovery: queue messages as the drain does (`--drain-messages` for each offline
/// user), kill the server with SIGKILL, start it again on the same data directory, and time
/// (1) until it listens (recovery done: the listeners open after every shard is rebuilt),
/// (2) until one recipient has its first queued message, (3) until every queued message
/// has been delivered (none may be missing). The log's size is what the segments hold
/// (scanned to their last committed record) plus the checkpoints.
async fn crash_recovery(
    args: &Args,
    child: &mut std::process::Child,
    restart: impl FnOnce(&std::path::Path) -> tern_bench::server::Ternd,
    addr: SocketAddr,
    accounts: &[(u64, [u8; 32])],
    data_dir: &std::path::Path,
) -> Value {
    let fill_s = fill_mailboxes(args, addr, accounts).await;
    let _ = child.kill();
    let _ = child.wait();
    let log = tern_bench::server::log_bytes(data_dir);
    let gib = (log.segments + log.checkpoints) as f64 / f64::from(1 << 30);
    if args.cold {
        // `sync` first, so that the dirty pages can be dropped too.
        let synced = std::process::Command::new("sync").status().is_ok_and(|s| s.success());
        let dropped = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
        assert!(synced && dropped.is_ok(), "--cold needs root to drop the page cache");
    }
    let start = Instant::now();
    let ternd = restart(&args.ternd);
    let listening = start.elapsed().as_secs_f64();
    *child = ternd.child;
    let (recipients, want) = (&accounts[..accounts.len() - DRAIN_SENDERS], args.drain_messages);
    let (got, first) = drain_mailboxes(ternd.addr, recipients, want).await;
    let first_delivery = first.map_or(f64::NAN, |t| (t - start).as_secs_f64());
    let all = start.elapsed().as_secs_f64();
    let expected = (recipients.len() * want) as u64;
    let cache = if args.cold { "cold page cache" } else { "warm page cache" };
    println!(
        "crash recovery ({cache}): {} messages queued in {fill_s:.1} s; log {:.1} MiB in \
         segments + {:.1} MiB of checkpoints ({} segments, {} checkpoints); after SIGKILL: \
         listening in {listening:.3} s ({:.3} s per GiB), first queued message in \
         {first_delivery:.3} s, {got} of {expected} delivered in {all:.2} s",
        expected,
        log.segments as f64 / 1048576.0,
        log.checkpoints as f64 / 1048576.0,
        log.segment_files,
        log.checkpoint_files,
        listening / gib.max(1e-9),
    );
    json!({
        "drain_messages": want,
        "queued": expected,
        "fill_seconds": fill_s,
        "log_segment_bytes": log.segments,
        "log_checkpoint_bytes": log.checkpoints,
        "segment_files": log.segment_files,
        "checkpoint_files": log.checkpoint_files,
        "cold": args.cold,
        "listening_seconds": listening,
        "seconds_per_gib": listening / gib.max(1e-9),
        "first_delivery_seconds": first_delivery,
        "delivered": got,
        "all_delivered_seconds": all,
    })
}

/// Group fan-out: `groups` groups of `group_size` members, each created by its own
/// sender (the last `groups` users, who only send: a device has one connection) with
/// `group_size - 1` members drawn from the other users, who listen and acknowledge. Each
/// sender sends `group_messages` messages one after another. Reports deliveries per
/// second and send→deliver latency over all member deliveries.
async fn group_fanout(
    args: &Args,
    addr: SocketAddr,
    accounts: Vec<(u64, [u8; 32])>,
    signers: Vec<Vec<u8>>,
) -> Value {
    assert!(accounts.len() > args.groups + 1, "--users must exceed --groups");
    let (accounts, creators) = accounts.split_at(accounts.len() - args.groups);
    let (signers, n) = (&signers[accounts.len()..], accounts.len());
    let size = args.group_size.min(256).min(n + 1);
    let epoch = Instant::now();
    let delivered = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let running = Arc::new(AtomicBool::new(true));
    // Every user listens and acknowledges.
    let mut listeners = Vec::with_capacity(n);
    for &(user_id, token) in accounts {
        let (delivered, latency, running) = (delivered.clone(), latency.clone(), running.clone());
        listeners.push(tokio::spawn(async move {
            let (mut stream, mut decoder) = handshake(addr).await;
            stream.write_all(&frame(2, &Auth { user_id, device_id: 1, token })).await.unwrap();
            let mut buffer = vec![0u8; 65536];
            while running.load(Ordering::Relaxed) {
                let read =
                    tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buffer));
                let n = match read.await {
                    Ok(Ok(n)) if n > 0 => n,
                    Ok(_) => break,
                    Err(_) => continue,
                };
                decoder.feed(&buffer[..n]);
                let mut ack = None;
                while let Some(frame) = decoder.next_frame().expect("frames decode") {
                    if let Message::Deliver(d) = frame.message {
                        ack = Some(d.mailbox_seq);
                        let group_text = d.envelope.kind == ArchivedEnvelopeKind::Text
                            && matches!(d.envelope.conversation, ArchivedConversation::Group(_));
                        if group_text {
                            let sent = u64::from_le_bytes(d.envelope.body[..8].try_into().unwrap());
                            delivered.fetch_add(1, Ordering::Relaxed);
                            let _ =
                                latency.lock().unwrap().record(now_us(epoch).saturating_sub(sent));
                        }
                    }
                }
                if let Some(seq) = ack {
                    let ack = frame(0, &DeliveryAck { up_to_mailbox_seq: seq });
                    if stream.write_all(&ack).await.is_err() {
                        break;
                    }
                }
            }
        }));
    }
    // Groups: group g has the users g*7 .. g*7+size (mod n); its first member sends.
    let mut senders = Vec::with_capacity(args.groups);
    for g in 0..args.groups {
        let members: Vec<usize> = (0..size - 1).map(|j| (g * 7 + j) % n).collect();
        let (user_id, token) = creators[g];
        let signer = ring::signature::Ed25519KeyPair::from_pkcs8(&signers[g]).expect("key");
        let group_id = 0xF00D_0000 + g as u64;
        let change = GroupChange::Create {
            name: format!("load {g}"),
            members: members.iter().map(|&m| accounts[m].0).collect(),
        };
        let bytes = GroupChangeSigned::bytes(group_id, 0, (user_id, 1), &change).unwrap();
        let signature = signer.sign(&bytes).as_ref().try_into().unwrap();
        let (mut stream, mut decoder) = handshake(addr).await;
        stream.write_all(&frame(2, &Auth { user_id, device_id: 1, token })).await.unwrap();
        read_until(&mut stream, &mut decoder, |f| f.header.request_id == 2).await;
        let update = GroupUpdate { group_id, base_epoch: 0, change, signature };
        stream.write_all(&frame(3, &update)).await.unwrap();
        let (ty, _) = read_until(&mut stream, &mut decoder, |f| f.header.request_id == 3).await;
        assert_eq!(ty, MessageType::GroupUpdated, "group {g} created");
        senders.push((stream, decoder, group_id));
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // Group events drained.
    let before = delivered.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (mut stream, mut decoder, group_id) in senders {
        let count = args.group_messages;
        let body_bytes = args.message_bytes.max(8);
        tasks.push(tokio::spawn(async move {
            for m in 0..count {
                let mut body = vec![0u8; body_bytes];
                body[..8].copy_from_slice(&now_us(epoch).to_le_bytes());
                let copies = [DeviceCopyRef {
                    user_id: 0,
                    device_id: 0,
                    e2e_type: E2eType::Megolm,
                    ciphertext: &body,
                }];
                let send = SendMessageRef {
                    client_message_id: m as u64 + 1,
                    to: Conversation::Group(group_id),
                    kind: EnvelopeKind::Text,
                    ttl_s: 0,
                    copies: &copies,
                };
                let id = 10 + m as u32;
                let mut out = Vec::new();
                encode_frame(&mut out, id, 0, &send, DEFAULT_MAX_FRAME_BYTES).unwrap();
                stream.write_all(&out).await.unwrap();
                let (ty, _) =
                    read_until(&mut stream, &mut decoder, |f| f.header.request_id == id).await;
                assert_eq!(ty, MessageType::SendAck);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let expected = (args.groups * args.group_messages * (size - 1)) as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while delivered.load(Ordering::Relaxed) - before < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let got = delivered.load(Ordering::Relaxed) - before;
    running.store(false, Ordering::Relaxed);
    for listener in listeners {
        listener.abort();
    }
    let h = latency.lock().unwrap();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "group fan-out: {} groups × {size} members × {} messages: {got} of {expected} deliveries \
         in {elapsed:.2} s = {:.0} deliveries/s; send→deliver p50 {:.2} ms p99 {:.2} ms \
         p999 {:.2} ms",
        args.groups,
        args.group_messages,
        got as f64 / elapsed,
        ms(0.5),
        ms(0.99),
        ms(0.999),
    );
    json!({
        "groups": args.groups,
        "group_size": size,
        "group_messages": args.group_messages,
        "expected": expected,
        "delivered": got,
        "seconds": elapsed,
        "deliveries_per_s": got as f64 / elapsed,
        "deliver_ms": quantiles(&h),
    })
}

/// Media: one user uploads a `media_mib` MiB blob in 256 KiB chunks (pipelined, one
/// status round trip at the end, then the commit with its SHA-256) and downloads it back
/// in ranges; the same bytes are copied with `std::fs::copy` on the same file system as
/// the local limit.
async fn media_transfer(
    args: &Args,
    addr: SocketAddr,
    accounts: Vec<(u64, [u8; 32])>,
    work_dir: &std::path::Path,
) -> Value {
    use sha2::Digest as _;
    let size = args.media_mib << 20;
    let mut blob = vec![0u8; size];
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for byte in &mut blob {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
    let (mut stream, mut decoder, media_id) = begin_upload(addr, accounts[0], &blob).await;
    let start = Instant::now();
    send_chunks(&mut stream, &mut decoder, media_id, &blob).await;
    let sha256: [u8; 32] = sha2::Sha256::digest(&blob).into();
    stream.write_all(&frame(5, &MediaCommit { media_id, sha256 })).await.unwrap();
    let (ty, _) = read_until(&mut stream, &mut decoder, |f| f.header.request_id == 5).await;
    assert_eq!(ty, MessageType::MediaStatus, "commit accepted");
    let upload = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut received = 0usize;
    let mut id = 10u32;
    while received < size {
        let request = MediaDownload { media_id, offset: received as u64, length: 1 << 20 };
        stream.write_all(&frame(id, &request)).await.unwrap();
        let want = id;
        let (ty, payload) =
            read_until(&mut stream, &mut decoder, |f| f.header.request_id == want).await;
        assert_eq!(ty, MessageType::MediaData);
        received += access::<MediaData>(&payload).unwrap().data.len();
        id += 1;
    }
    let download = start.elapsed().as_secs_f64();

    let source = work_dir.join("media-bench.src");
    std::fs::write(&source, &blob).unwrap();
    let start = Instant::now();
    std::fs::copy(&source, work_dir.join("media-bench.dst")).unwrap();
    let copy = start.elapsed().as_secs_f64();
    let mib = args.media_mib as f64;
    println!(
        "media {} MiB: upload {:.0} MiB/s ({upload:.2} s, hash check and syncs included), \
         download {:.0} MiB/s ({download:.2} s), local copy {:.0} MiB/s ({copy:.2} s)",
        args.media_mib,
        mib / upload,
        mib / download,
        mib / copy,
    );
    json!({
        "media_mib": args.media_mib,
        "upload_mib_per_s": mib / upload,
        "download_mib_per_s": mib / download,
        "local_copy_mib_per_s": mib / copy,
    })
}
