//! `--scenario abuse`: the abuse run of issue 20. Honest users exchange 1:1 messages open
//! loop (`--rate` in total, each delivery acknowledged) for `--seconds`, first alone (the
//! baseline), then beside `--hostile` attacking connections (`hostile.rs`), on the same
//! server. For each phase: send→sent and send→deliver latencies of the honest messages,
//! the server's peak RSS and descriptors (sampled from `/proc` every 100 ms), and a
//! ledger: every message acknowledged (`SendAck`) to an honest sender must reach its
//! honest recipient — after the phase the users keep reading until it has, or 20 s
//! passed, and the ones missing are printed as lost. The attack phase also prints what
//! each attack got back from the server.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tern_bench::proto::{frame, handshake, register_with_keys, Codes};
use tern_wire::messages::*;
use tern_wire::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::hostile::{self, Attack, Ctx, Tally};
use super::{cpu_seconds, encode_text, now_us, quantiles, Args, Stats};

/// One honest phase's shared state.
struct Phase {
    stats: Stats,
    epoch: Instant,
    measuring: AtomicBool,
    sending: AtomicBool,
    reading: AtomicBool,
    acked: AtomicU64,
    received: AtomicU64,
    /// Client message ids of this phase start here (a phase's ids are its own).
    first_id: u32,
    honest: HashSet<u64>,
}

/// What one honest user saw: (sender, client message id) acknowledged to it (with the
/// recipient and the server's id) and received by it, duplicates, the server ids of its
/// messages a full mailbox dropped (`SentDropped` notices), refusals by code, whether
/// the server closed it.
#[derive(Default)]
struct Ledger {
    acked: HashMap<(u64, u64), (u64, u64)>,
    received: HashSet<(u64, u64)>,
    told_dropped: HashSet<u64>,
    dropped_notices: u64,
    duplicates: u64,
    refused: BTreeMap<&'static str, u64>,
    closed: bool,
}

/// One honest user: connects, authenticates, sends one message per `interval` to random
/// honest users while the phase sends (at most `window` unacknowledged), acknowledges
/// every delivery, and keeps reading until the phase says stop.
async fn honest_user(
    addr: SocketAddr,
    phase: Arc<Phase>,
    (index, user_id, token): (usize, u64, Token),
    peers: Arc<Vec<u64>>,
    interval: Duration,
    (window, message_bytes): (usize, usize),
) -> Ledger {
    let (stream, mut decoder) = handshake(addr).await;
    let (mut reader, mut writer) = stream.into_split();
    let mut out = frame(2, &Auth { user_id, device_id: 1, token });
    let mut ledger = Ledger::default();
    let (mut in_flight, mut next_id) = (HashMap::<u32, (u64, u64)>::new(), phase.first_id);
    let mut rng = (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let (mut authed, mut due, mut buffer) = (false, 0usize, vec![0u8; 65536]);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        if authed && phase.sending.load(Ordering::Relaxed) {
            while in_flight.len() < window && due > 0 {
                due -= 1;
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let mut peer = peers[(rng % peers.len() as u64) as usize];
                if peer == user_id {
                    peer = peers[(index + 1) % peers.len()];
                }
                let t = now_us(phase.epoch);
                let mut body = vec![0u8; message_bytes.max(8)];
                body[..8].copy_from_slice(&t.to_le_bytes());
                encode_text(&mut out, next_id, peer, &body);
                in_flight.insert(next_id, (t, peer));
                next_id += 1;
            }
        }
        if !out.is_empty() {
            if writer.write_all(&out).await.is_err() {
                ledger.closed = true;
                break;
            }
            out.clear();
        }
        if !phase.reading.load(Ordering::Relaxed) {
            break;
        }
        let read = tokio::time::timeout(Duration::from_millis(200), reader.read(&mut buffer));
        tokio::select! {
            result = read => match result {
                Ok(Ok(n)) if n > 0 => decoder.feed(&buffer[..n]),
                Ok(_) => {
                    ledger.closed = true;
                    break;
                }
                Err(_) => continue,
            },
            _ = ticker.tick() => {
                due += 1;
                continue;
            }
        }
        let mut ack_up_to = None;
        while let Some(frame) = decoder.next_frame().expect("server frames decode") {
            match frame.message {
                Message::AuthOk(_) => authed = true,
                Message::Deliver(d) => {
                    ack_up_to = Some(d.mailbox_seq);
                    on_deliver(&phase, &mut ledger, &d);
                }
                message => on_answer(&phase, &mut ledger, &mut in_flight, user_id, message),
            }
        }
        if let Some(seq) = ack_up_to {
            out.extend(frame(0, &DeliveryAck { up_to_mailbox_seq: seq }));
        }
    }
    ledger
}

/// A delivery: an honest text of this phase goes in the ledger (and its latency in the
/// histogram while measuring), and so do the server's notices of dropped messages;
/// everything else (receipts, the attackers' messages) is only acknowledged.
fn on_deliver(phase: &Phase, ledger: &mut Ledger, d: &Deliver<'_>) {
    let (sender, id) = (d.envelope.sender_user.to_native(), d.envelope.client_message_id);
    let id = id.to_native();
    if let Ok(EnvelopeContent::Notice(notice)) = d.envelope.content() {
        match notice {
            ArchivedNoticeBody::SentDropped { message_ids, .. } => {
                ledger.told_dropped.extend(message_ids.iter().map(|m| m.to_native()));
            }
            ArchivedNoticeBody::Dropped { .. } => ledger.dropped_notices += 1,
        }
        return;
    }
    let ours = d.envelope.kind == ArchivedEnvelopeKind::Text
        && phase.honest.contains(&sender)
        && id >= u64::from(phase.first_id);
    if !ours {
        return;
    }
    if !ledger.received.insert((sender, id)) {
        ledger.duplicates += 1;
        return;
    }
    phase.received.fetch_add(1, Ordering::Relaxed);
    if phase.measuring.load(Ordering::Relaxed) {
        let t = u64::from_le_bytes(d.envelope.body[..8].try_into().unwrap());
        let stats = &phase.stats;
        stats.delivered.fetch_add(1, Ordering::Relaxed);
        stats.record(&stats.send_to_deliver, &stats.during_commit_deliver, t, now_us(phase.epoch));
    }
}

/// An answer to a send: a `SendAck` goes in the ledger, a refusal is counted.
fn on_answer(
    phase: &Phase,
    ledger: &mut Ledger,
    in_flight: &mut HashMap<u32, (u64, u64)>,
    user_id: u64,
    message: Message<'_>,
) {
    match message {
        Message::SendAck(ack) => {
            let id = ack.client_message_id.to_native();
            let Some((t, peer)) = in_flight.remove(&(id as u32)) else { return };
            ledger.acked.insert((user_id, id), (peer, ack.server_message_id.to_native()));
            phase.acked.fetch_add(1, Ordering::Relaxed);
            if phase.measuring.load(Ordering::Relaxed) {
                let stats = &phase.stats;
                stats.sent.fetch_add(1, Ordering::Relaxed);
                stats.record(
                    &stats.send_to_sent,
                    &stats.during_commit_sent,
                    t,
                    now_us(phase.epoch),
                );
            }
        }
        Message::SendError(e) => {
            in_flight.remove(&(e.client_message_id.to_native() as u32));
            let code = ErrorCode::from_u16(e.code.to_native()).map_or("unknown", ErrorCode::name);
            *ledger.refused.entry(code).or_insert(0) += 1;
        }
        Message::ErrorFrame(e) => {
            let code = ErrorCode::from_u16(e.code.to_native()).map_or("unknown", ErrorCode::name);
            *ledger.refused.entry(code).or_insert(0) += 1;
        }
        _ => {}
    }
}

/// What a phase cost the machine: ternd's peak RSS (KiB) and descriptors, the peak of the
/// kernel's TCP memory (pages, all sockets of the machine) and how much some of the
/// kernel's TCP counters grew (all sockets too).
#[derive(Clone, Default)]
struct Peaks {
    rss_kib: u64,
    fds: u64,
    tcp_mem_pages: u64,
    kernel: BTreeMap<&'static str, u64>,
}

/// The kernel's TCP counters reported per phase: memory pressure, segments dropped for
/// want of memory, retransmission timeouts.
const TCP_COUNTERS: [&str; 5] =
    ["TCPMemoryPressures", "TCPMemoryPressuresChrono", "TCPRcvQDrop", "PruneCalled", "TCPTimeouts"];

/// The `TcpExt` counters of `/proc/net/netstat` named in [`TCP_COUNTERS`].
fn tcp_counters() -> BTreeMap<&'static str, u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let mut counters = BTreeMap::new();
    if let [names, values] = lines[..] {
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Some(&known) = TCP_COUNTERS.iter().find(|&&c| c == name) {
                counters.insert(known, value.parse().unwrap_or(0));
            }
        }
    }
    counters
}

/// Pages of memory the kernel's TCP sockets hold (`/proc/net/sockstat`).
fn tcp_mem_pages() -> u64 {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let tcp = text.lines().find(|l| l.starts_with("TCP:")).unwrap_or("");
    let mut fields = tcp.split_whitespace().skip_while(|f| *f != "mem");
    fields.nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Samples `pid`'s RSS and open descriptors and the kernel's TCP memory every 100 ms
/// until `stop`; returns the peaks and the TCP counters' growth.
async fn sample_peaks(pid: u32, stop: Arc<AtomicBool>) -> Peaks {
    let (before, mut peaks) = (tcp_counters(), Peaks::default());
    while !stop.load(Ordering::Relaxed) {
        peaks.rss_kib = peaks.rss_kib.max(tern_bench::server::rss_kib(pid));
        let open = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
        peaks.fds = peaks.fds.max(open);
        peaks.tcp_mem_pages = peaks.tcp_mem_pages.max(tcp_mem_pages());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (name, value) in tcp_counters() {
        let grown = value.saturating_sub(before.get(name).copied().unwrap_or(0));
        peaks.kernel.insert(name, grown);
    }
    peaks
}

/// What one phase measured.
struct PhaseResult {
    seconds: f64,
    sent: u64,
    delivered: u64,
    send_to_sent: Histogram<u64>,
    deliver: Histogram<u64>,
    acked: usize,
    /// (sender, client message id, recipient, server id, whether the sender was told).
    lost: Vec<(u64, u64, u64, u64, bool)>,
    dropped_notices: u64,
    duplicates: u64,
    refused: BTreeMap<&'static str, u64>,
    closed: usize,
    drain_s: f64,
    /// CPU seconds per second while measuring: (ternd, the whole generator).
    cpu_per_s: (f64, f64),
    /// The generator's timer lag while measuring (p99, max) in ms.
    lag: (f64, f64),
    /// ternd's and the kernel's peaks over the phase.
    peaks: Peaks,
}

impl PhaseResult {
    /// Adds another round's phase to this one.
    fn absorb(&mut self, o: PhaseResult) {
        let w = |a: f64, b: f64| (a * self.seconds + b * o.seconds) / (self.seconds + o.seconds);
        self.cpu_per_s = (w(self.cpu_per_s.0, o.cpu_per_s.0), w(self.cpu_per_s.1, o.cpu_per_s.1));
        self.seconds += o.seconds;
        self.sent += o.sent;
        self.delivered += o.delivered;
        self.send_to_sent.add(&o.send_to_sent).expect("same histogram bounds");
        self.deliver.add(&o.deliver).expect("same histogram bounds");
        self.acked += o.acked;
        self.lost.extend(o.lost);
        self.dropped_notices += o.dropped_notices;
        self.duplicates += o.duplicates;
        for (code, n) in o.refused {
            *self.refused.entry(code).or_insert(0) += n;
        }
        self.closed += o.closed;
        self.drain_s = self.drain_s.max(o.drain_s);
        self.lag = (self.lag.0.max(o.lag.0), self.lag.1.max(o.lag.1));
        self.peaks.rss_kib = self.peaks.rss_kib.max(o.peaks.rss_kib);
        self.peaks.fds = self.peaks.fds.max(o.peaks.fds);
        self.peaks.tcp_mem_pages = self.peaks.tcp_mem_pages.max(o.peaks.tcp_mem_pages);
        for (name, n) in o.peaks.kernel {
            *self.peaks.kernel.entry(name).or_insert(0) += n;
        }
    }
}

/// Runs the honest users for a phase: 2 s of warm-up, `--seconds` measured, then the
/// drain; returns the figures and the ledger's verdict.
async fn honest_phase(
    args: &Args,
    addr: SocketAddr,
    accounts: &[(u64, Token)],
    first_id: u32,
    pid: u32,
) -> PhaseResult {
    let peers: Arc<Vec<u64>> = Arc::new(accounts.iter().map(|a| a.0).collect());
    let phase = Arc::new(Phase {
        stats: Stats::new(),
        epoch: Instant::now(),
        measuring: AtomicBool::new(false),
        sending: AtomicBool::new(true),
        reading: AtomicBool::new(true),
        acked: AtomicU64::new(0),
        received: AtomicU64::new(0),
        first_id,
        honest: peers.iter().copied().collect(),
    });
    let interval = Duration::from_secs_f64(accounts.len() as f64 / args.rate.max(1) as f64);
    let tasks: Vec<_> = accounts
        .iter()
        .enumerate()
        .map(|(index, &(user_id, token))| {
            let (phase, peers) = (phase.clone(), peers.clone());
            let sizes = (args.window, args.message_bytes);
            let user = (index, user_id, token);
            tokio::spawn(honest_user(addr, phase, user, peers, interval, sizes))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    phase.measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let cpu = (cpu_seconds(pid), cpu_seconds(std::process::id()));
    let lag = tokio::spawn(lag_probe(phase.clone()));
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    phase.measuring.store(false, Ordering::Relaxed);
    let seconds = start.elapsed().as_secs_f64();
    let cpu = (cpu_seconds(pid) - cpu.0, cpu_seconds(std::process::id()) - cpu.1);
    let lag = lag.await.expect("the lag probe ran");
    phase.sending.store(false, Ordering::Relaxed);
    let drain_s = drain(&phase).await;
    phase.reading.store(false, Ordering::Relaxed);
    let mut all = Ledger::default();
    for task in tasks {
        let ledger = task.await.expect("an honest user ran");
        all.acked.extend(ledger.acked);
        all.received.extend(ledger.received);
        all.told_dropped.extend(ledger.told_dropped);
        all.dropped_notices += ledger.dropped_notices;
        all.duplicates += ledger.duplicates;
        all.closed |= ledger.closed;
        for (code, n) in ledger.refused {
            *all.refused.entry(code).or_insert(0) += n;
        }
    }
    let mut lost: Vec<_> = (all.acked.iter())
        .filter(|(key, _)| !all.received.contains(key))
        .map(|(&(u, id), &(peer, server_id))| {
            (u, id, peer, server_id, all.told_dropped.contains(&server_id))
        })
        .collect();
    lost.sort_unstable();
    let stats = &phase.stats;
    let (s, d) = (stats.send_to_sent.lock().unwrap(), stats.send_to_deliver.lock().unwrap());
    PhaseResult {
        seconds,
        sent: stats.sent.load(Ordering::Relaxed),
        delivered: stats.delivered.load(Ordering::Relaxed),
        send_to_sent: s.clone(),
        deliver: d.clone(),
        acked: all.acked.len(),
        lost,
        dropped_notices: all.dropped_notices,
        duplicates: all.duplicates,
        refused: all.refused,
        closed: usize::from(all.closed),
        drain_s,
        cpu_per_s: (cpu.0 / seconds, cpu.1 / seconds),
        lag,
        peaks: Peaks::default(),
    }
}

/// How late the generator's own timers fire while the phase measures (a 5 ms sleep,
/// again and again): the part of the honest latencies that is the generator's, not the
/// server's, on a machine both share. Returns (p99, max) in ms.
async fn lag_probe(phase: Arc<Phase>) -> (f64, f64) {
    let mut lag = Histogram::<u64>::new(3).unwrap();
    while phase.measuring.load(Ordering::Relaxed) {
        let t = Instant::now();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let late = t.elapsed().saturating_sub(Duration::from_millis(5));
        let _ = lag.record(late.as_micros() as u64);
    }
    (p(&lag, 0.99), lag.max() as f64 / 1000.0)
}

/// After the sends stop: waits until every acknowledged message was received (the counts
/// agree for a second) or 20 s passed; returns how long it took.
async fn drain(phase: &Phase) -> f64 {
    let start = Instant::now();
    let mut agreed_since = None;
    while start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (acked, received) =
            (phase.acked.load(Ordering::Relaxed), phase.received.load(Ordering::Relaxed));
        if received >= acked {
            let since = *agreed_since.get_or_insert(Instant::now());
            if since.elapsed() >= Duration::from_secs(1) {
                break;
            }
        } else {
            agreed_since = None;
        }
    }
    start.elapsed().as_secs_f64()
}

/// Registers the hostile accounts the plan needs (16 at a time), in the plan's order.
async fn register_hostile(
    addr: SocketAddr,
    codes: &Codes,
    plan: &[Attack],
) -> Vec<Option<hostile::Account>> {
    let gate = Arc::new(tokio::sync::Semaphore::new(16));
    let started = Instant::now();
    let tasks: Vec<_> = plan
        .iter()
        .enumerate()
        .map(|(i, attack)| {
            let (needs, codes, gate) = (attack.needs_account(), codes.clone(), gate.clone());
            tokio::spawn(async move {
                if !needs {
                    return None;
                }
                let _permit = gate.acquire().await.unwrap();
                let r = register_with_keys(addr, &format!("+1556{i:07}"), &codes, 0).await;
                Some((r.user_id, r.token, r.signer))
            })
        })
        .collect();
    let mut accounts = Vec::with_capacity(plan.len());
    for task in tasks {
        accounts.push(task.await.expect("a hostile account registered"));
    }
    let n = accounts.iter().flatten().count();
    eprintln!("registered {n} hostile accounts in {:.1} s", started.elapsed().as_secs_f64());
    accounts
}

/// Starts the attackers on `runtime` (their starts spread over `spread`) and returns
/// their shared context and tasks.
fn start_attackers(
    runtime: &tokio::runtime::Runtime,
    args: &Args,
    addr: SocketAddr,
    honest: Arc<Vec<u64>>,
    plan: &[Attack],
    accounts: Vec<Option<hostile::Account>>,
    spread: Duration,
) -> (Arc<Ctx>, Vec<tokio::task::JoinHandle<()>>) {
    let ctx = Arc::new(Ctx {
        addr,
        running: AtomicBool::new(true),
        victim: honest[0],
        honest,
        hold: Duration::from_secs_f64(args.hostile_hold_s),
        pause: Duration::from_millis(args.hostile_pause_ms),
        flood_interval: Duration::from_secs_f64(1.0 / args.flood_rate.max(0.001)),
        tally: Mutex::new(Tally::new()),
    });
    let step = spread / plan.len().max(1) as u32;
    let tasks = plan
        .iter()
        .zip(accounts)
        .enumerate()
        .map(|(i, (&attack, account))| {
            let ctx = ctx.clone();
            runtime.spawn(async move {
                tokio::time::sleep(step * i as u32).await;
                hostile::attacker(ctx, attack, account, i as u64 * 0x9E37_79B9 + 1).await
            })
        })
        .collect();
    (ctx, tasks)
}

/// Stops the attackers: each finishes its cycle (at most a few seconds), the rest are
/// aborted after 10 s.
async fn stop_attackers(ctx: &Ctx, tasks: Vec<tokio::task::JoinHandle<()>>) {
    ctx.running.store(false, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    for task in tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        let abort = task.abort_handle();
        if tokio::time::timeout(left, task).await.is_err() {
            abort.abort();
        }
    }
}

/// The abuse run: `--rounds` times the baseline (honest users alone) and, with
/// `--hostile`, the same honest load beside the attackers (alternating, so that the rest
/// of a shared machine's load weighs on both alike); prints both and their ratio, the
/// ledger's verdict, peak RSS and what each attack got.
pub async fn run(
    args: &Args,
    addr: SocketAddr,
    honest: &[(u64, Token)],
    codes: &Codes,
    pid: u32,
) -> Value {
    let plan = hostile::plan(args.hostile, &args.attacks);
    let accounts = register_hostile(addr, codes, &plan).await;
    let ids: Arc<Vec<u64>> = Arc::new(honest.iter().map(|a| a.0).collect());
    println!("victim of the send flood and the reports: honest user {}", ids[0]);
    let rss_idle_kib = tern_bench::server::rss_kib(pid);
    // The attackers get a runtime of their own, so that the honest users' tasks do not
    // queue behind theirs in the generator.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.hostile_threads.max(1))
        .thread_name("hostile")
        .enable_all()
        .build()
        .expect("a runtime for the attackers");
    let (mut baseline, mut attack, mut tally) =
        (None::<PhaseResult>, None::<PhaseResult>, Tally::new());
    let mut rss_after_kib = 0;
    let first_id = |phase: u32| 10 + (phase << 26);
    for round in 0..args.rounds.clamp(1, 30) {
        let result =
            measured(pid, honest_phase(args, addr, honest, first_id(2 * round), pid)).await;
        print_phase(&format!("round {round}, baseline"), &result, None);
        absorb(&mut baseline, result);
        if plan.is_empty() {
            continue;
        }
        let attackers = Attackers { runtime: &runtime, plan: &plan, accounts: accounts.clone() };
        let honest_load = honest_phase(args, addr, honest, first_id(2 * round + 1), pid);
        let (result, round_tally) =
            measured_attack(args, pid, addr, &ids, attackers, honest_load).await;
        print_phase(&format!("round {round}, attack"), &result, baseline.as_ref());
        absorb(&mut attack, result);
        for (key, n) in round_tally {
            *tally.entry(key).or_insert(0) += n;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        rss_after_kib = tern_bench::server::rss_kib(pid);
    }
    runtime.shutdown_background();
    let baseline = baseline.expect("one round at least");
    let mut result = json!({
        "rate": args.rate,
        "rounds": args.rounds,
        "hostile": args.hostile,
        "attacks": args.attacks,
        "hostile_threads": args.hostile_threads,
        "flood_rate": args.flood_rate,
        "hostile_hold_s": args.hostile_hold_s,
        "hostile_pause_ms": args.hostile_pause_ms,
        "rss_idle_kib": rss_idle_kib,
        "baseline": phase_json(&baseline),
    });
    print_phase("all rounds, baseline (no attackers)", &baseline, None);
    let Some(attack) = attack else { return result };
    print_phase("all rounds, attack", &attack, Some(&baseline));
    print_tally(&plan, &tally);
    println!(
        "ternd RSS: {rss_idle_kib} KiB idle before the run, {rss_after_kib} KiB 2 s after the \
         attackers stopped"
    );
    result["attack"] = phase_json(&attack);
    let ratio = p(&attack.deliver, 0.99) / p(&baseline.deliver, 0.99);
    result["deliver_p99_ratio"] = json!(ratio);
    result["rss_bound_mib"] = json!(args.rss_bound_mib);
    let verdict = |met: bool| if met { "met" } else { "NOT MET" };
    let peak_mib = attack.peaks.rss_kib / 1024;
    println!(
        "goals: honest send→deliver p99 {ratio:.2}× the baseline (≤ 2×: {}); acknowledged \
         and lost {} (0: {}); ternd peak RSS {peak_mib} MiB (≤ {} MiB: {})",
        verdict(ratio <= 2.0),
        attack.lost.len(),
        verdict(attack.lost.is_empty()),
        args.rss_bound_mib,
        verdict(peak_mib <= args.rss_bound_mib),
    );
    result["rss_after_kib"] = json!(rss_after_kib);
    result["outcomes"] = tally_json(&plan, &tally);
    result
}

fn absorb(total: &mut Option<PhaseResult>, result: PhaseResult) {
    match total {
        Some(total) => total.absorb(result),
        None => *total = Some(result),
    }
}

/// Runs a phase while sampling ternd's peaks.
async fn measured(pid: u32, phase: impl std::future::Future<Output = PhaseResult>) -> PhaseResult {
    let (stop, sampler) = spawn_sampler(pid);
    let mut result = phase.await;
    stop.store(true, Ordering::Relaxed);
    result.peaks = sampler.await.unwrap();
    result
}

/// What a round's attack needs.
struct Attackers<'a> {
    runtime: &'a tokio::runtime::Runtime,
    plan: &'a [Attack],
    accounts: Vec<Option<hostile::Account>>,
}

/// Starts the attackers, gives them 5 s to get to work, runs the honest phase beside them
/// and stops them; returns the phase (peaks sampled from the attackers' start to their
/// end) and what the attackers got.
async fn measured_attack(
    args: &Args,
    pid: u32,
    addr: SocketAddr,
    ids: &Arc<Vec<u64>>,
    attackers: Attackers<'_>,
    honest_load: impl std::future::Future<Output = PhaseResult>,
) -> (PhaseResult, Tally) {
    let (stop, sampler) = spawn_sampler(pid);
    let spread = Duration::from_secs(3);
    let Attackers { runtime, plan, accounts } = attackers;
    let (ctx, tasks) = start_attackers(runtime, args, addr, ids.clone(), plan, accounts, spread);
    tokio::time::sleep(Duration::from_secs(5)).await; // Every attacker at work.
    let mut result = honest_load.await;
    stop_attackers(&ctx, tasks).await;
    stop.store(true, Ordering::Relaxed);
    result.peaks = sampler.await.unwrap();
    let tally = std::mem::take(&mut *ctx.tally.lock().unwrap());
    (result, tally)
}

fn spawn_sampler(pid: u32) -> (Arc<AtomicBool>, tokio::task::JoinHandle<Peaks>) {
    let stop = Arc::new(AtomicBool::new(false));
    (stop.clone(), tokio::spawn(sample_peaks(pid, stop)))
}

fn p(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn print_phase(label: &str, r: &PhaseResult, base: Option<&PhaseResult>) {
    let (rss, fds) = (r.peaks.rss_kib, r.peaks.fds);
    let ratio = |q: f64| {
        base.map_or(String::new(), |b| format!(" ({:.2}×)", p(&r.deliver, q) / p(&b.deliver, q)))
    };
    println!(
        "{label}: {:.0} s measured, sent {:.0} msg/s, delivered {:.0} msg/s; send→deliver p50 \
         {:.2} ms{} p99 {:.2} ms{} p999 {:.2} ms{}; send→sent {}",
        r.seconds,
        r.sent as f64 / r.seconds,
        r.delivered as f64 / r.seconds,
        p(&r.deliver, 0.5),
        ratio(0.5),
        p(&r.deliver, 0.99),
        ratio(0.99),
        p(&r.deliver, 0.999),
        ratio(0.999),
        quantiles(&r.send_to_sent),
    );
    println!(
        "{label}: CPU while measuring: ternd {:.2} s/s, generator {:.2} s/s (of 2 cores); \
         generator timer lag p99 {:.1} ms, max {:.1} ms",
        r.cpu_per_s.0, r.cpu_per_s.1, r.lag.0, r.lag.1,
    );
    println!(
        "{label}: kernel (whole machine): TCP memory peak {} pages (tcp_mem: {}), TCP \
         counters grew by {:?}",
        r.peaks.tcp_mem_pages,
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem").unwrap_or_default().trim(),
        r.peaks.kernel,
    );
    let told = r.lost.iter().filter(|l| l.4).count();
    println!(
        "{label}: ledger: {} acknowledged to honest senders, lost {} ({told} of them dropped \
         from a full mailbox with a SentDropped notice to the sender), duplicates {}, \
         Dropped notices to honest users {}, drained in {:.1} s; honest refusals {:?}, honest \
         connections closed by the server: {}; ternd peak RSS {rss} KiB ({:.0} MiB), peak \
         descriptors {fds}",
        r.acked,
        r.lost.len(),
        r.duplicates,
        r.dropped_notices,
        r.drain_s,
        r.refused,
        r.closed,
        rss as f64 / 1024.0,
    );
    let mut recipients: BTreeMap<u64, usize> = BTreeMap::new();
    for l in &r.lost {
        *recipients.entry(l.2).or_insert(0) += 1;
    }
    for (recipient, n) in &recipients {
        println!("{label}: lost {n} message(s) to user {recipient}");
    }
    for (u, id, peer, server_id, told) in r.lost.iter().take(10) {
        println!(
            "{label}: lost: user {u} client id {id} → user {peer}, server id {server_id}, \
             sender told: {told}"
        );
    }
}

fn phase_json(r: &PhaseResult) -> Value {
    let (rss, fds) = (r.peaks.rss_kib, r.peaks.fds);
    let lost_ids: Vec<String> =
        r.lost.iter().take(100).map(|l| format!("{}/{}→{}", l.0, l.1, l.2)).collect();
    json!({
        "seconds": r.seconds,
        "sent_per_s": r.sent as f64 / r.seconds,
        "delivered_per_s": r.delivered as f64 / r.seconds,
        "sent_ms": quantiles(&r.send_to_sent),
        "deliver_ms": quantiles(&r.deliver),
        "acked": r.acked,
        "lost": r.lost.len(),
        "lost_told_dropped": r.lost.iter().filter(|l| l.4).count(),
        "lost_ids": lost_ids,
        "dropped_notices": r.dropped_notices,
        "duplicates": r.duplicates,
        "drain_s": r.drain_s,
        "ternd_cpu_per_s": r.cpu_per_s.0,
        "generator_cpu_per_s": r.cpu_per_s.1,
        "generator_lag_ms": { "p99": r.lag.0, "max": r.lag.1 },
        "honest_refusals": r.refused,
        "peak_rss_kib": rss,
        "peak_fds": fds,
        "peak_tcp_mem_pages": r.peaks.tcp_mem_pages,
        "tcp_counters": r.peaks.kernel,
    })
}

fn connections(plan: &[Attack], attack: Attack) -> usize {
    plan.iter().filter(|&&a| a == attack).count()
}

fn print_tally(plan: &[Attack], tally: &Tally) {
    println!("what each attack got back (counts over the attack phase):");
    for (attack, _) in hostile::MIX {
        let n = connections(plan, attack);
        if n == 0 {
            continue;
        }
        let items: Vec<String> = tally
            .iter()
            .filter(|((a, _, _), _)| *a == attack)
            .map(|((_, kind, what), count)| format!("{kind}: {what} {count}"))
            .collect();
        println!("  {} ({n} connections): {}", attack.name(), items.join(", "));
    }
}

fn tally_json(plan: &[Attack], tally: &Tally) -> Value {
    let mut out = serde_json::Map::new();
    for (attack, _) in hostile::MIX {
        let mut items = serde_json::Map::new();
        for ((_, kind, what), count) in tally.iter().filter(|((a, _, _), _)| *a == attack) {
            items.insert(format!("{kind}: {what}"), json!(count));
        }
        items.insert("connections".into(), json!(connections(plan, attack)));
        out.insert(attack.name().into(), Value::Object(items));
    }
    Value::Object(out)
}
