//! Peers, side by side: `loadgen`'s scenarios against Mosquitto (MQTT QoS 1), Redis
//! Streams and NATS JetStream, each driven through its standard Rust client.
//!
//! `bench/peers/run.sh` starts each peer on loopback with a stated durability setting and
//! runs this binary against it; `loadgen` gives Tern's figures with the same parameters.
//! The generator's design is `loadgen`'s: one task per user (one connection, two for
//! Redis, whose blocking read holds its connection), the send time inside the payload,
//! HDR histograms, random recipients from a per-user xorshift, two seconds of warm-up.
//!
//! Scenarios:
//! - `online`: `--users` users all connected, each with at most `--window` sends
//!   unacknowledged, 100-byte messages to random others for `--seconds`; delivered msg/s,
//!   send→ack (the peer's durable ack) and send→deliver percentiles. With `--rate R` it
//!   is an open loop, as `loadgen --rate`: R messages a second in total, paced by
//!   `tern_bench::pacer`, latencies from each message's intended time.
//! - `drain`: the users are offline; `DRAIN_SENDERS` senders queue `--drain-messages` to
//!   each; then all users connect (at most `CONNECT_PARALLEL` handshakes at a time) and
//!   read everything: time until the last is delivered, msg/s.
//! - `groups`: `--groups` groups of `--group-size` members, one sender each (the last
//!   `--groups` users) sending `--group-messages` one at a time (waiting for the ack);
//!   the other users are members (group g holds users g*7 .. g*7+size-1, as in `loadgen`).
//!
//! How each peer maps (each adapter says more):
//! - MQTT: user i is client `u<i>` with a persistent session (clean_session=false),
//!   subscribed at QoS 1 to `u/<i>`; a send is a QoS 1 PUBLISH to the recipient's topic,
//!   acked by PUBACK (in order, so a FIFO of send times per connection matches them);
//!   a group is a topic `g/<g>` its members subscribe to.
//! - Redis: user i has a stream `u:<i>`; a send is `XADD`, a delivery an `XREAD BLOCK`
//!   from the last ID the reader saw (kept by the client: no consumer group, no `XACK`);
//!   a group is one stream `g:<g>` that every member reads (one `XREAD` over all its groups).
//! - NATS: one file-storage stream `MSG` on `u.*`, per user a durable push consumer
//!   filtered on `u.<i>` delivering to `d.<i>`, acked explicitly; a send is a JetStream
//!   publish awaiting its ack; groups: stream `GRP` on `g.*`, one durable consumer per
//!   (member, group), all of a member's delivering to its `d.<i>`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use tern_bench::server::cpu_seconds;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Senders that fill the offline users' queues in the drain scenario (as in `loadgen`).
const DRAIN_SENDERS: usize = 10;
/// Sends in flight per drain sender while filling.
const FILL_WINDOW: usize = 64;
/// Handshakes at a time when everyone connects (a listen backlog overflow would otherwise
/// cost one-second SYN retransmits and measure the kernel, not the peer).
const CONNECT_PARALLEL: usize = 100;

#[derive(Debug, Parser)]
struct Args {
    /// The peer: `mqtt` (Mosquitto), `redis` (Redis Streams) or `nats` (NATS JetStream).
    #[arg(long, value_parser = ["mqtt", "redis", "nats"])]
    peer: String,
    /// `online` (1:1 closed loop), `drain` (store and forward) or `groups` (fan-out).
    #[arg(long, default_value = "online", value_parser = ["online", "drain", "groups"])]
    scenario: String,
    /// The peer's address.
    #[arg(long)]
    addr: SocketAddr,
    /// Printed with the figures: the peer's durability setting.
    #[arg(long, default_value = "")]
    label: String,
    /// Users (one connection each; two for Redis).
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Online: seconds measured after the warm-up.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Online: sends in flight per user.
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Online: open loop at this many messages a second in total (0: closed loop, as
    /// fast as the window allows); latencies count from each message's intended time.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Bytes per message (the first 8 are the send time).
    #[arg(long, default_value_t = 100)]
    message_bytes: usize,
    /// Drain: messages queued for each user.
    #[arg(long, default_value_t = 100)]
    drain_messages: usize,
    /// Group fan-out: groups.
    #[arg(long, default_value_t = 50)]
    groups: usize,
    /// Group fan-out: members per group, the sender included.
    #[arg(long, default_value_t = 256)]
    group_size: usize,
    /// Group fan-out: messages each group's sender sends.
    #[arg(long, default_value_t = 20)]
    group_messages: usize,
    /// NATS: one stream per user (per group) instead of one shared stream.
    #[arg(long)]
    nats_stream_each: bool,
    /// The peer's process: its CPU time over the measured window is reported.
    #[arg(long)]
    server_pid: Option<u32>,
}

/// Counters and histograms shared by every user task.
struct Recorder {
    epoch: Instant,
    /// Shared with the pacer's thread, which stops with the run.
    running_flag: Arc<AtomicBool>,
    measuring: AtomicBool,
    sent: AtomicU64,
    delivered: AtomicU64,
    errors: AtomicU64,
    ack: Mutex<Histogram<u64>>,
    deliver: Mutex<Histogram<u64>>,
}

impl Recorder {
    fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            epoch: Instant::now(),
            running_flag: Arc::new(AtomicBool::new(true)),
            measuring: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            ack: Mutex::new(Histogram::new(3).unwrap()),
            deliver: Mutex::new(Histogram::new(3).unwrap()),
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn running(&self) -> bool {
        self.running_flag.load(Ordering::Relaxed)
    }

    /// A message body stamped with the current time; returns (time, body).
    fn body(&self, bytes: usize) -> (u64, Vec<u8>) {
        self.body_at(self.now(), bytes)
    }

    /// A message body stamped with `t` (µs since the epoch); returns (t, body).
    fn body_at(&self, t: u64, bytes: usize) -> (u64, Vec<u8>) {
        let mut body = vec![0u8; bytes.max(8)];
        body[..8].copy_from_slice(&t.to_le_bytes());
        (t, body)
    }

    fn acked(&self, t: u64) {
        if self.measuring.load(Ordering::Relaxed) {
            self.sent.fetch_add(1, Ordering::Relaxed);
            let _ = self.ack.lock().unwrap().record(self.now().saturating_sub(t));
        }
    }

    fn delivered(&self, body: &[u8]) {
        if self.measuring.load(Ordering::Relaxed) && body.len() >= 8 {
            let t = u64::from_le_bytes(body[..8].try_into().unwrap());
            self.delivered.fetch_add(1, Ordering::Relaxed);
            let _ = self.deliver.lock().unwrap().record(self.now().saturating_sub(t));
        }
    }

    fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    fn delivered_count(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
}

/// When a user's sending loop may send: in the closed loop whenever its window has room,
/// in the open loop (`--rate`) when the pacer (`tern_bench::pacer`, as `loadgen` uses)
/// says a message is due, stamped with the time it was due.
struct Turns {
    schedule: Option<UnboundedReceiver<u64>>,
    due: VecDeque<u64>,
}

impl Turns {
    /// One user's turns for each of `users` (the pacer started if `rate` > 0).
    fn for_users(rec: &Recorder, rate: u64, users: usize) -> Vec<Turns> {
        let schedules: Vec<Option<UnboundedReceiver<u64>>> = if rate > 0 {
            let running = rec.running_flag.clone();
            tern_bench::pacer::start(rate, users, rec.epoch, running)
                .into_iter()
                .map(Some)
                .collect()
        } else {
            (0..users).map(|_| None).collect()
        };
        schedules.into_iter().map(|schedule| Turns { schedule, due: VecDeque::new() }).collect()
    }

    /// The stamp of a message that may go now: the current time in the closed loop, the
    /// oldest due time in the open loop (`None`: nothing is due).
    fn next(&mut self, rec: &Recorder) -> Option<u64> {
        match &mut self.schedule {
            None => Some(rec.now()),
            Some(schedule) => {
                tern_bench::pacer::drain(schedule, &mut self.due);
                self.due.pop_front()
            }
        }
    }

    /// Whether the pacer says when to send (`--rate`).
    fn is_open_loop(&self) -> bool {
        self.schedule.is_some()
    }

    /// Waits until a message is due (never, in the closed loop).
    async fn wait(&mut self) {
        match &mut self.schedule {
            None => std::future::pending().await,
            Some(schedule) => match schedule.recv().await {
                Some(intended) => self.due.push_back(intended),
                None => std::future::pending().await,
            },
        }
    }
}

/// User `i` of `n`'s sends to a peer whose send is a future saying whether the peer
/// acknowledged it (Redis `XADD`, a JetStream publish): at most `window` in flight, of
/// `bytes` each, when `turns` allows; ends when the run stops and nothing is in flight.
async fn send_acked<F, Fut>(
    rec: Arc<Recorder>,
    mut turns: Turns,
    (i, n, window, bytes): (usize, usize, usize, usize),
    mut publish: F,
) where
    F: FnMut(usize, Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut in_flight = FuturesUnordered::new();
    let mut rng = seed(i);
    loop {
        if rec.running() {
            while in_flight.len() < window {
                let Some(t) = turns.next(&rec) else { break };
                let to = pick(&mut rng, i, n);
                let (t, body) = rec.body_at(t, bytes);
                let acked = publish(to, body);
                in_flight.push(async move { (t, acked.await) });
            }
        } else if in_flight.is_empty() {
            break;
        }
        if in_flight.is_empty() {
            turns.wait().await;
            continue;
        }
        let done = tokio::select! {
            done = in_flight.next() => done,
            () = turns.wait() => continue,
        };
        match done {
            Some((t, true)) => rec.acked(t),
            _ => rec.error(),
        }
    }
}

/// The recipient of user `i`'s next message: `loadgen`'s xorshift and rule.
fn pick(rng: &mut u64, i: usize, n: usize) -> usize {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    let peer = (*rng % n as u64) as usize;
    if peer == i {
        (i + 1) % n
    } else {
        peer
    }
}

fn seed(i: usize) -> u64 {
    (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Members of group `g` among `n` listening users (as `loadgen` chooses them).
fn members(g: usize, size: usize, n: usize) -> Vec<usize> {
    (0..size - 1).map(|j| (g * 7 + j) % n).collect()
}

/// For each listening user, the groups it belongs to.
fn groups_of(args: &Args, n: usize) -> Vec<Vec<usize>> {
    let mut of = vec![Vec::new(); n];
    for g in 0..args.groups {
        for m in members(g, args.group_size.min(256).min(n + 1), n) {
            of[m].push(g);
        }
    }
    of
}

/// CPU seconds of the peer and of this generator, for the share of the 2 cores each used.
fn cpu_pair(args: &Args) -> (f64, f64) {
    (args.server_pid.map_or(0.0, cpu_seconds), cpu_seconds(std::process::id()))
}

async fn join_all(tasks: Vec<JoinHandle<()>>, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    for task in tasks {
        let abort = task.abort_handle();
        if tokio::time::timeout_at(deadline, task).await.is_err() {
            abort.abort();
        }
    }
}

/// Runs the online scenario's clock: warm-up, measured window, stop; prints the figures.
async fn online_clock(args: &Args, rec: &Recorder, tasks: Vec<JoinHandle<()>>) {
    tokio::time::sleep(Duration::from_secs(2)).await;
    rec.measuring.store(true, Ordering::Relaxed);
    let (cpu0, gen0) = cpu_pair(args);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    rec.measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let (cpu1, gen1) = cpu_pair(args);
    rec.running_flag.store(false, Ordering::Relaxed);
    join_all(tasks, Duration::from_secs(10)).await;
    let sent = rec.sent.load(Ordering::Relaxed) as f64 / elapsed;
    let delivered = rec.delivered_count() as f64 / elapsed;
    let (a, d) = (rec.ack.lock().unwrap(), rec.deliver.lock().unwrap());
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let (server_cpu, gen_cpu) = ((cpu1 - cpu0) / elapsed * 100.0, (gen1 - gen0) / elapsed * 100.0);
    println!(
        "{} [{}] users {} window {} rate {} size {} B, {elapsed:.0} s: sent {sent:.0} msg/s, \
         delivered {delivered:.0} msg/s, errors {}; CPU peer {server_cpu:.0}% generator \
         {gen_cpu:.0}%",
        args.peer,
        args.label,
        args.users,
        args.window,
        args.rate,
        args.message_bytes,
        rec.errors.load(Ordering::Relaxed),
    );
    println!(
        "send→ack     p50 {:.2} ms  p99 {:.2} ms  p999 {:.2} ms",
        ms(&a, 0.5),
        ms(&a, 0.99),
        ms(&a, 0.999)
    );
    println!(
        "send→deliver p50 {:.2} ms  p99 {:.2} ms  p999 {:.2} ms",
        ms(&d, 0.5),
        ms(&d, 0.99),
        ms(&d, 0.999)
    );
    println!(
        "JSON {{\"peer\":\"{}\",\"label\":\"{}\",\"scenario\":\"online\",\"users\":{},\
         \"window\":{},\"rate\":{},\"seconds\":{elapsed:.1},\"sent_per_s\":{sent:.0},\
         \"delivered_per_s\":{delivered:.0},\"ack_p50_ms\":{:.3},\"ack_p99_ms\":{:.3},\
         \"ack_p999_ms\":{:.3},\"deliver_p50_ms\":{:.3},\"deliver_p99_ms\":{:.3},\
         \"deliver_p999_ms\":{:.3},\"server_cpu_us_per_message\":{:.1},\
         \"errors\":{},\"peer_cpu_pct\":{server_cpu:.0},\"generator_cpu_pct\":{gen_cpu:.0}}}",
        args.peer,
        args.label,
        args.users,
        args.window,
        args.rate,
        ms(&a, 0.5),
        ms(&a, 0.99),
        ms(&a, 0.999),
        ms(&d, 0.5),
        ms(&d, 0.99),
        ms(&d, 0.999),
        (cpu1 - cpu0) * 1e6 / (delivered * elapsed).max(1.0),
        rec.errors.load(Ordering::Relaxed),
    );
}

/// Times the drain: `connect_and_read` tasks are spawned by the caller after `start`.
fn drain_report(args: &Args, rec: &Recorder, fill_s: f64, elapsed: f64, cpu: (f64, f64)) {
    let expected = (args.users * args.drain_messages) as u64;
    let got = rec.delivered_count();
    let rate = got as f64 / elapsed;
    let (server_cpu, gen_cpu) = (cpu.0 / elapsed * 100.0, cpu.1 / elapsed * 100.0);
    println!(
        "{} [{}] drain: {} users × {} queued (filled in {fill_s:.2} s = {:.0} msg/s): {got} of \
         {expected} delivered in {elapsed:.2} s = {rate:.0} msg/s, errors {}; CPU peer \
         {server_cpu:.0}% generator {gen_cpu:.0}%",
        args.peer,
        args.label,
        args.users,
        args.drain_messages,
        expected as f64 / fill_s,
        rec.errors.load(Ordering::Relaxed),
    );
    println!(
        "JSON {{\"peer\":\"{}\",\"label\":\"{}\",\"scenario\":\"drain\",\"users\":{},\
         \"messages_each\":{},\"fill_s\":{fill_s:.3},\"delivered\":{got},\"expected\":{expected},\
         \"drain_s\":{elapsed:.3},\"drain_per_s\":{rate:.0},\"peer_cpu_pct\":{server_cpu:.0},\
         \"generator_cpu_pct\":{gen_cpu:.0}}}",
        args.peer, args.label, args.users, args.drain_messages,
    );
}

fn groups_report(args: &Args, rec: &Recorder, size: usize, elapsed: f64, cpu: (f64, f64)) {
    let expected = (args.groups * args.group_messages * (size - 1)) as u64;
    let got = rec.delivered_count();
    let rate = got as f64 / elapsed;
    let d = rec.deliver.lock().unwrap();
    let ms = |q: f64| d.value_at_quantile(q) as f64 / 1000.0;
    let (server_cpu, gen_cpu) = (cpu.0 / elapsed * 100.0, cpu.1 / elapsed * 100.0);
    println!(
        "{} [{}] group fan-out: {} groups × {size} members × {} messages: {got} of {expected} \
         deliveries in {elapsed:.2} s = {rate:.0} deliveries/s; send→deliver p50 {:.2} ms p99 \
         {:.2} ms p999 {:.2} ms; CPU peer {server_cpu:.0}% generator {gen_cpu:.0}%",
        args.peer,
        args.label,
        args.groups,
        args.group_messages,
        ms(0.5),
        ms(0.99),
        ms(0.999),
    );
    println!(
        "JSON {{\"peer\":\"{}\",\"label\":\"{}\",\"scenario\":\"groups\",\"groups\":{},\
         \"group_size\":{size},\"messages\":{},\"delivered\":{got},\"expected\":{expected},\
         \"seconds\":{elapsed:.3},\"deliveries_per_s\":{rate:.0},\"deliver_p50_ms\":{:.3},\
         \"deliver_p99_ms\":{:.3},\"peer_cpu_pct\":{server_cpu:.0},\
         \"generator_cpu_pct\":{gen_cpu:.0}}}",
        args.peer,
        args.label,
        args.groups,
        args.group_messages,
        ms(0.5),
        ms(0.99),
    );
}

/// Waits until `expected` deliveries were counted (or two minutes passed).
async fn await_deliveries(rec: &Recorder, expected: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while rec.delivered_count() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Arc::new(Args::parse());
    let rec = Recorder::new();
    match args.peer.as_str() {
        "mqtt" => mqtt::run(args, rec).await,
        "redis" => redis_streams::run(args, rec).await,
        _ => nats::run(args, rec).await,
    }
}

/// Mosquitto through `rumqttc`: QoS 1 everywhere, persistent sessions for the users.
mod mqtt {
    use super::*;
    use rumqttc::{
        AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Packet, QoS, SubscribeFilter,
    };

    /// Connects (and subscribes to `topics` at QoS 1), returning once the broker
    /// confirmed; anything the broker sends after that is left for the caller's loop.
    async fn connect(
        addr: SocketAddr,
        id: String,
        clean: bool,
        topics: Vec<String>,
    ) -> (AsyncClient, EventLoop) {
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_clean_session(clean);
        options.set_keep_alive(Duration::from_secs(60));
        options.set_max_packet_size(1 << 20, 1 << 20);
        options.set_inflight(1000);
        let (client, mut events) = AsyncClient::new(options, 1024);
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true); // As the other clients do (and `loadgen`).
        events.network_options = network;
        let subscribing = !topics.is_empty();
        if subscribing {
            let filters = topics.into_iter().map(|t| SubscribeFilter::new(t, QoS::AtLeastOnce));
            client.subscribe_many(filters).await.unwrap();
        }
        loop {
            match events.poll().await.expect("MQTT connect") {
                Event::Incoming(Packet::ConnAck(_)) if !subscribing => break,
                Event::Incoming(Packet::SubAck(_)) => break,
                _ => {}
            }
        }
        (client, events)
    }

    /// Connects users `ids` at most `CONNECT_PARALLEL` at a time, in order.
    async fn connect_users(
        addr: SocketAddr,
        ids: Vec<(String, Vec<String>)>,
    ) -> Vec<(AsyncClient, EventLoop)> {
        let gate = Arc::new(Semaphore::new(CONNECT_PARALLEL));
        let tasks: Vec<_> = ids
            .into_iter()
            .map(|(id, topics)| {
                let gate = gate.clone();
                tokio::spawn(async move {
                    let _permit = gate.acquire().await.unwrap();
                    connect(addr, id, false, topics).await
                })
            })
            .collect();
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.unwrap());
        }
        out
    }

    async fn disconnect(client: AsyncClient, mut events: EventLoop) {
        let _ = client.disconnect().await;
        while let Ok(Ok(event)) = timeout(Duration::from_secs(2), events.poll()).await {
            if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    }

    pub async fn run(args: Arc<Args>, rec: Arc<Recorder>) {
        let n = args.users;
        match args.scenario.as_str() {
            "online" => {
                let ids = (0..n).map(|i| (format!("u{i}"), vec![format!("u/{i}")])).collect();
                let users = connect_users(args.addr, ids).await;
                let turns = Turns::for_users(&rec, args.rate, n);
                let mut tasks = Vec::new();
                for (i, ((client, mut events), mut turns)) in
                    users.into_iter().zip(turns).enumerate()
                {
                    let (rec, window, bytes) = (rec.clone(), args.window, args.message_bytes);
                    tasks.push(tokio::spawn(async move {
                        // QoS 1 PUBACKs come back in PUBLISH order (MQTT 3.1.1, 4.6).
                        let mut in_flight: VecDeque<u64> = VecDeque::new();
                        let mut rng = seed(i);
                        loop {
                            if rec.running() {
                                while in_flight.len() < window {
                                    let Some(t) = turns.next(&rec) else { break };
                                    let to = pick(&mut rng, i, n);
                                    let (t, body) = rec.body_at(t, bytes);
                                    let topic = format!("u/{to}");
                                    if client
                                        .try_publish(topic, QoS::AtLeastOnce, false, body)
                                        .is_err()
                                    {
                                        break;
                                    }
                                    in_flight.push_back(t);
                                }
                            } else if in_flight.is_empty() {
                                break;
                            }
                            let event = tokio::select! {
                                event = timeout(Duration::from_secs(2), events.poll()) => event,
                                () = turns.wait() => continue,
                            };
                            match event {
                                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                                    if let Some(t) = in_flight.pop_front() {
                                        rec.acked(t);
                                    }
                                }
                                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                                    rec.delivered(&p.payload)
                                }
                                Ok(Ok(_)) => {}
                                // Two quiet seconds: the run is over, or (open loop) this
                                // user has nothing in flight and nothing came for it.
                                Err(_) if !rec.running() => break,
                                Err(_) if turns.is_open_loop() && in_flight.is_empty() => {}
                                _ => {
                                    rec.error();
                                    break;
                                }
                            }
                        }
                    }));
                }
                online_clock(&args, &rec, tasks).await;
            }
            "drain" => {
                // Sessions and subscriptions exist; then everyone goes offline.
                let ids = (0..n).map(|i| (format!("u{i}"), vec![format!("u/{i}")])).collect();
                for (client, events) in connect_users(args.addr, ids).await {
                    disconnect(client, events).await;
                }
                let fill = Instant::now();
                let mut senders = Vec::new();
                for s in 0..DRAIN_SENDERS {
                    let (addr, args) = (args.addr, args.clone());
                    senders.push(tokio::spawn(async move {
                        let (client, mut events) =
                            connect(addr, format!("s{s}"), true, vec![]).await;
                        let mut queue = (s..n).step_by(DRAIN_SENDERS).flat_map(|to| {
                            std::iter::repeat_n(format!("u/{to}"), args.drain_messages)
                        });
                        let (mut in_flight, mut done) = (0usize, false);
                        while !done || in_flight > 0 {
                            while !done && in_flight < FILL_WINDOW {
                                match queue.next() {
                                    Some(topic) => {
                                        let body = vec![0u8; args.message_bytes];
                                        client
                                            .try_publish(topic, QoS::AtLeastOnce, false, body)
                                            .unwrap();
                                        in_flight += 1;
                                    }
                                    None => done = true,
                                }
                            }
                            if let Event::Incoming(Packet::PubAck(_)) =
                                events.poll().await.expect("MQTT send")
                            {
                                in_flight -= 1;
                            }
                        }
                        disconnect(client, events).await;
                    }));
                }
                join_all(senders, Duration::from_secs(600)).await;
                let fill_s = fill.elapsed().as_secs_f64();
                rec.measuring.store(true, Ordering::Relaxed);
                let cpu0 = cpu_pair(&args);
                let start = Instant::now();
                let gate = Arc::new(Semaphore::new(CONNECT_PARALLEL));
                let mut tasks = Vec::new();
                for i in 0..n {
                    let (rec, gate, addr, want) =
                        (rec.clone(), gate.clone(), args.addr, args.drain_messages);
                    tasks.push(tokio::spawn(async move {
                        let permit = gate.acquire().await.unwrap();
                        let (_client, mut events) =
                            connect(addr, format!("u{i}"), false, vec![]).await;
                        drop(permit);
                        let mut got = 0;
                        while got < want {
                            match timeout(Duration::from_secs(10), events.poll()).await {
                                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                                    rec.delivered(&p.payload);
                                    got += 1;
                                }
                                Ok(Ok(_)) => {}
                                _ => {
                                    rec.error();
                                    break;
                                }
                            }
                        }
                    }));
                }
                join_all(tasks, Duration::from_secs(300)).await;
                let elapsed = start.elapsed().as_secs_f64();
                let cpu1 = cpu_pair(&args);
                drain_report(&args, &rec, fill_s, elapsed, (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1));
            }
            _ => {
                let listeners = n - args.groups;
                let size = args.group_size.min(256).min(listeners + 1);
                let of = groups_of(&args, listeners);
                let ids = (0..listeners)
                    .map(|i| (format!("u{i}"), of[i].iter().map(|g| format!("g/{g}")).collect()))
                    .collect();
                let mut tasks = Vec::new();
                for (client, mut events) in connect_users(args.addr, ids).await {
                    let rec = rec.clone();
                    tasks.push(tokio::spawn(async move {
                        let _client = client;
                        while rec.running() {
                            match timeout(Duration::from_millis(200), events.poll()).await {
                                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                                    rec.delivered(&p.payload)
                                }
                                Ok(Ok(_)) | Err(_) => {}
                                Ok(Err(_)) => {
                                    rec.error();
                                    break;
                                }
                            }
                        }
                    }));
                }
                let mut senders = Vec::new();
                for g in 0..args.groups {
                    senders.push(connect(args.addr, format!("s{g}"), true, vec![]).await);
                }
                rec.measuring.store(true, Ordering::Relaxed);
                let cpu0 = cpu_pair(&args);
                let start = Instant::now();
                let mut sending = Vec::new();
                for (g, (client, mut events)) in senders.into_iter().enumerate() {
                    let (rec, count, bytes) =
                        (rec.clone(), args.group_messages, args.message_bytes);
                    sending.push(tokio::spawn(async move {
                        for _ in 0..count {
                            let (_, body) = rec.body(bytes);
                            client
                                .try_publish(format!("g/{g}"), QoS::AtLeastOnce, false, body)
                                .unwrap();
                            while !matches!(
                                events.poll().await.expect("MQTT group send"),
                                Event::Incoming(Packet::PubAck(_))
                            ) {}
                        }
                    }));
                }
                join_all(sending, Duration::from_secs(120)).await;
                await_deliveries(&rec, (args.groups * args.group_messages * (size - 1)) as u64)
                    .await;
                let elapsed = start.elapsed().as_secs_f64();
                let cpu1 = cpu_pair(&args);
                rec.running_flag.store(false, Ordering::Relaxed);
                groups_report(&args, &rec, size, elapsed, (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1));
                join_all(tasks, Duration::from_secs(5)).await;
            }
        }
    }
}

/// Redis Streams through `redis` (tokio, multiplexed connections: commands pipeline).
mod redis_streams {
    use super::*;
    use redis::aio::MultiplexedConnection;
    use redis::streams::StreamReadReply;
    use redis::Value;

    async fn connect(client: &redis::Client) -> MultiplexedConnection {
        client.get_multiplexed_async_connection().await.expect("Redis connect")
    }

    async fn xadd(conn: &mut MultiplexedConnection, key: String, body: Vec<u8>) -> bool {
        let reply: redis::RedisResult<Value> =
            redis::cmd("XADD").arg(key).arg("*").arg("m").arg(body).query_async(conn).await;
        reply.is_ok()
    }

    /// One `XREAD` over `keys` from `last` (updated); returns the bodies read.
    async fn xread(
        conn: &mut MultiplexedConnection,
        keys: &[String],
        last: &mut [String],
        block_ms: Option<u64>,
        count: usize,
    ) -> Option<Vec<Vec<u8>>> {
        let mut command = redis::cmd("XREAD");
        if let Some(ms) = block_ms {
            command.arg("BLOCK").arg(ms);
        }
        command.arg("COUNT").arg(count).arg("STREAMS").arg(keys).arg(&*last);
        let reply: Option<StreamReadReply> = command.query_async(conn).await.ok()?;
        let mut bodies = Vec::new();
        for stream in reply.map(|r| r.keys).unwrap_or_default() {
            let k = keys.iter().position(|k| *k == stream.key)?;
            for entry in stream.ids {
                if let Some(Value::BulkString(body)) = entry.map.get("m") {
                    bodies.push(body.clone());
                }
                last[k] = entry.id;
            }
        }
        Some(bodies)
    }

    pub async fn run(args: Arc<Args>, rec: Arc<Recorder>) {
        let client = redis::Client::open(format!("redis://{}/", args.addr)).unwrap();
        let n = args.users;
        match args.scenario.as_str() {
            "online" => {
                let mut tasks = Vec::new();
                // Everyone connects first, then all start sending together.
                let pairs = futures_util::stream::iter(0..n)
                    .map(|_| async { (connect(&client).await, connect(&client).await) });
                let pairs: Vec<_> = pairs.buffered(CONNECT_PARALLEL).collect().await;
                let turns = Turns::for_users(&rec, args.rate, n);
                for (i, ((send, mut read), turns)) in pairs.into_iter().zip(turns).enumerate() {
                    let publish = move |to: usize, body: Vec<u8>| {
                        let mut conn = send.clone();
                        async move { xadd(&mut conn, format!("u:{to}"), body).await }
                    };
                    let user = (i, n, args.window, args.message_bytes);
                    tasks.push(tokio::spawn(send_acked(rec.clone(), turns, user, publish)));
                    let rec = rec.clone();
                    tasks.push(tokio::spawn(async move {
                        let (keys, mut last) = (vec![format!("u:{i}")], vec!["0-0".to_string()]);
                        while rec.running() {
                            let Some(bodies) =
                                xread(&mut read, &keys, &mut last, Some(500), 256).await
                            else {
                                rec.error();
                                break;
                            };
                            bodies.iter().for_each(|b| rec.delivered(b));
                        }
                    }));
                }
                online_clock(&args, &rec, tasks).await;
            }
            "drain" => {
                let fill = Instant::now();
                let mut senders = Vec::new();
                for s in 0..DRAIN_SENDERS {
                    let (conn, args) = (connect(&client).await, args.clone());
                    senders.push(tokio::spawn(async move {
                        let mut queue = (s..n).step_by(DRAIN_SENDERS).flat_map(|to| {
                            std::iter::repeat_n(format!("u:{to}"), args.drain_messages)
                        });
                        let mut in_flight = FuturesUnordered::new();
                        loop {
                            while in_flight.len() < FILL_WINDOW {
                                let Some(key) = queue.next() else { break };
                                let (mut conn, body) =
                                    (conn.clone(), vec![0u8; args.message_bytes]);
                                in_flight.push(async move { xadd(&mut conn, key, body).await });
                            }
                            match in_flight.next().await {
                                Some(ok) => assert!(ok, "XADD"),
                                None => break,
                            }
                        }
                    }));
                }
                join_all(senders, Duration::from_secs(600)).await;
                let fill_s = fill.elapsed().as_secs_f64();
                rec.measuring.store(true, Ordering::Relaxed);
                let cpu0 = cpu_pair(&args);
                let start = Instant::now();
                let gate = Arc::new(Semaphore::new(CONNECT_PARALLEL));
                let mut tasks = Vec::new();
                for i in 0..n {
                    let (rec, gate, client, want) =
                        (rec.clone(), gate.clone(), client.clone(), args.drain_messages);
                    tasks.push(tokio::spawn(async move {
                        let permit = gate.acquire().await.unwrap();
                        let mut conn = connect(&client).await;
                        drop(permit);
                        let (keys, mut last) = (vec![format!("u:{i}")], vec!["0-0".to_string()]);
                        let mut got = 0;
                        while got < want {
                            let Some(bodies) = xread(&mut conn, &keys, &mut last, None, 1000).await
                            else {
                                rec.error();
                                break;
                            };
                            got += bodies.len();
                            bodies.iter().for_each(|b| rec.delivered(b));
                        }
                    }));
                }
                join_all(tasks, Duration::from_secs(300)).await;
                let elapsed = start.elapsed().as_secs_f64();
                let cpu1 = cpu_pair(&args);
                drain_report(&args, &rec, fill_s, elapsed, (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1));
            }
            _ => {
                let listeners = n - args.groups;
                let size = args.group_size.min(256).min(listeners + 1);
                let mut tasks = Vec::new();
                for groups in groups_of(&args, listeners) {
                    if groups.is_empty() {
                        continue;
                    }
                    let (mut conn, rec) = (connect(&client).await, rec.clone());
                    tasks.push(tokio::spawn(async move {
                        let keys: Vec<String> = groups.iter().map(|g| format!("g:{g}")).collect();
                        let mut last = vec!["0-0".to_string(); keys.len()];
                        while rec.running() {
                            match xread(&mut conn, &keys, &mut last, Some(200), 1024).await {
                                Some(bodies) => bodies.iter().for_each(|b| rec.delivered(b)),
                                None => {
                                    rec.error();
                                    break;
                                }
                            }
                        }
                    }));
                }
                let mut senders = Vec::new();
                for _ in 0..args.groups {
                    senders.push(connect(&client).await);
                }
                tokio::time::sleep(Duration::from_millis(500)).await; // Readers blocked.
                rec.measuring.store(true, Ordering::Relaxed);
                let cpu0 = cpu_pair(&args);
                let start = Instant::now();
                let mut sending = Vec::new();
                for (g, mut conn) in senders.into_iter().enumerate() {
                    let (rec, count, bytes) =
                        (rec.clone(), args.group_messages, args.message_bytes);
                    sending.push(tokio::spawn(async move {
                        for _ in 0..count {
                            let (_, body) = rec.body(bytes);
                            assert!(xadd(&mut conn, format!("g:{g}"), body).await, "XADD");
                        }
                    }));
                }
                join_all(sending, Duration::from_secs(120)).await;
                await_deliveries(&rec, (args.groups * args.group_messages * (size - 1)) as u64)
                    .await;
                let elapsed = start.elapsed().as_secs_f64();
                let cpu1 = cpu_pair(&args);
                rec.running_flag.store(false, Ordering::Relaxed);
                groups_report(&args, &rec, size, elapsed, (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1));
                join_all(tasks, Duration::from_secs(5)).await;
            }
        }
    }
}

/// NATS JetStream through `async-nats`: file storage, durable push consumers, explicit
/// acks, publishes that wait for the stream's ack.
mod nats {
    use super::*;
    use async_nats::jetstream::{self, consumer, stream};

    async fn create_stream(js: &jetstream::Context, name: &str, subjects: &str) {
        js.create_stream(stream::Config {
            name: name.to_string(),
            subjects: vec![subjects.to_string()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("stream created");
    }

    /// Creates durable push consumers `[stream, name, filter, deliver subject]`, a few at a
    /// time.
    async fn create_consumers(js: &jetstream::Context, list: Vec<[String; 4]>) {
        let total = list.len();
        let started = Instant::now();
        futures_util::stream::iter(list)
            .map(|[stream, name, filter, deliver]| async move {
                let config = consumer::push::Config {
                    durable_name: Some(name),
                    filter_subject: filter,
                    deliver_subject: deliver,
                    ack_policy: consumer::AckPolicy::Explicit,
                    ..Default::default()
                };
                js.create_consumer_on_stream(config, stream).await.expect("consumer created");
            })
            .buffer_unordered(32)
            .collect::<Vec<()>>()
            .await;
        eprintln!("{total} consumers in {:.1} s", started.elapsed().as_secs_f64());
    }

    /// Connects and subscribes to user `i`'s deliver subject.
    async fn user(addr: SocketAddr, i: usize) -> (async_nats::Client, async_nats::Subscriber) {
        let client = async_nats::connect(addr.to_string()).await.expect("NATS connect");
        let subscriber = client.subscribe(format!("d.{i}")).await.unwrap();
        (client, subscriber)
    }

    /// Reads deliveries, acking each, until `want` were read or the run stops.
    async fn read(
        rec: Arc<Recorder>,
        client: async_nats::Client,
        mut sub: async_nats::Subscriber,
        want: usize,
        idle: Duration,
    ) {
        let mut got = 0;
        while got < want {
            match timeout(idle, sub.next()).await {
                Ok(Some(message)) => {
                    got += 1;
                    rec.delivered(&message.payload);
                    if let Some(reply) = message.reply {
                        let _ = client.publish(reply, Vec::new().into()).await;
                    }
                }
                Ok(None) => break,
                Err(_) if !rec.running() || want != usize::MAX => break,
                Err(_) => {}
            }
        }
    }

    pub async fn run(args: Arc<Args>, rec: Arc<Recorder>) {
        let admin = async_nats::connect(args.addr.to_string()).await.expect("NATS connect");
        let js = jetstream::new(admin);
        let n = args.users;
        match args.scenario.as_str() {
            // One stream for all (subjects `u.*`, `g.*`) or, with `--nats-stream-each`, one
            // per user or group: NATS 2.9 checks every consumer of a stream on each
            // message, so a shared stream slows down as consumers are added.
            "online" | "drain" => {
                let stream = |i: usize| match args.nats_stream_each {
                    true => format!("U{i}"),
                    false => "MSG".to_string(),
                };
                if args.nats_stream_each {
                    for i in 0..n {
                        create_stream(&js, &stream(i), &format!("u.{i}")).await;
                    }
                } else {
                    create_stream(&js, "MSG", "u.*").await;
                }
                let list = (0..n)
                    .map(|i| [stream(i), format!("u{i}"), format!("u.{i}"), format!("d.{i}")]);
                create_consumers(&js, list.collect()).await;
            }
            _ => {
                let stream = |g: usize| match args.nats_stream_each {
                    true => format!("G{g}"),
                    false => "GRP".to_string(),
                };
                if args.nats_stream_each {
                    for g in 0..args.groups {
                        create_stream(&js, &stream(g), &format!("g.{g}")).await;
                    }
                } else {
                    create_stream(&js, "GRP", "g.*").await;
                }
                let listeners = n - args.groups;
                let of = groups_of(&args, listeners);
                let list = (0..listeners).flat_map(|i| {
                    of[i].iter().map(move |&g| {
                        [stream(g), format!("g{g}m{i}"), format!("g.{g}"), format!("d.{i}")]
                    })
                });
                create_consumers(&js, list.collect()).await;
            }
        }
        match args.scenario.as_str() {
            "online" => {
                let mut tasks = Vec::new();
                // Everyone connects first, then all start sending together.
                let addr = args.addr;
                let users = futures_util::stream::iter(0..n).map(|i| user(addr, i));
                let users: Vec<_> = users.buffered(CONNECT_PARALLEL).collect().await;
                let turns = Turns::for_users(&rec, args.rate, n);
                for (i, ((client, sub), turns)) in users.into_iter().zip(turns).enumerate() {
                    let js = jetstream::new(client.clone());
                    let publish = move |to: usize, body: Vec<u8>| {
                        let js = js.clone();
                        async move {
                            match js.publish(format!("u.{to}"), body.into()).await {
                                Ok(ack) => ack.await.is_ok(),
                                Err(_) => false,
                            }
                        }
                    };
                    let user = (i, n, args.window, args.message_bytes);
                    tasks.push(tokio::spawn(send_acked(rec.clone(), turns, user, publish)));
                    let idle = Duration::from_millis(500);
                    tasks.push(tokio::spawn(read(rec.clone(), client, sub, usize::MAX, idle)));
                }
                online_clock(&args, &rec, tasks).await;
            }
            "drain" => {
                let fill = Instant::now();
                let mut senders = Vec::new();
                for s in 0..DRAIN_SENDERS {
                    let client = async_nats::connect(args.addr.to_string()).await.unwrap();
                    let (js, args) = (jetstream::new(client), args.clone());
                    senders.push(tokio::spawn(async move {
                        let mut queue = (s..n).step_by(DRAIN_SENDERS).flat_map(|to| {
                            std::iter::repeat_n(format!("u.{to}"), args.drain_messages)
                        });
                        let mut in_flight = FuturesUnordered::new();
                        loop {
                            while in_flight.len() < FILL_WINDOW {
                                let Some(subject) = queue.next() else { break };
                                let (js, body) = (js.clone(), vec![0u8; args.message_bytes]);
                                in_flight.push(async move {
                                    js.publish(subject, body.into()).await.unwrap().await.is_ok()
                                });
                            }
                            match in_flight.next().await {
                                Some(ok) => assert!(ok, "publish acked"),
                                None => break,
                            }
                        }
                    }));
                }
                join_all(senders, Duration::from_secs(600)).await;
                let fill_s = fill.elapsed().as_secs_f64();
                rec.measuring.store(true, Ordering::Relaxed);
                let cpu0 = cpu_pair(&args);
                let start = Instant::now();
                let gate = Arc::new(Semaphore::new(CONNECT_PARALLEL));
                let mut tasks = Vec::new();
                for i in 0..n {
                    let (rec, gate, addr, want) =
                        (rec.clone(), gate.clone(), args.addr, args.drain_messages);
                    tasks.push(tokio::spawn(async move {
                        let permit = gate.acquire().await.unwrap();
                        let (client, sub) = user(addr, i).await;
                        drop(permit);
                        read(rec, client, sub, want, Duration::from_secs(10)).await;
                    }));
                }
                join_all(tasks, Duration::from_secs(300)).await;
                let elapsed = start.elapsed().as_secs_f64();
                let cpu1 = cpu_pair(&args);
                drain_report(&args, &rec, fill_s, elapsed, (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1));
            }
            _ => {
                let listeners = n - args.groups;
                let size = args.group_size.min(256).min(listeners + 1);
                let mut tasks = Vec::new();
                for i in 0..listeners {
                    let (client, sub) = user(args.addr, i).await;
                    let idle = Duration::from_millis(200);
                    tasks.push(tokio::spawn(read(rec.clone(), client, sub, usize::MAX, idle)));
                }
                let mut senders = Vec::new();
                for _ in 0..args.groups {
                    let client = async_nats::connect(args.addr.to_string()).await.unwrap();
                    senders.push(jetstream::new(client));
                }
                tokio::time::sleep(Duration::from_millis(500)).await; // Subscriptions known.
                rec.measuring.store(true, Ordering::Relaxed);
                let cpu0 = cpu_pair(&args);
                let start = Instant::now();
                let mut sending = Vec::new();
                for (g, js) in senders.into_iter().enumerate() {
                    let (rec, count, bytes) =
                        (rec.clone(), args.group_messages, args.message_bytes);
                    sending.push(tokio::spawn(async move {
                        for _ in 0..count {
                            let (_, body) = rec.body(bytes);
                            let acked = match js.publish(format!("g.{g}"), body.into()).await {
                                Ok(ack) => ack.await.is_ok(),
                                Err(_) => false,
                            };
                            if !acked {
                                rec.error(); // Not acked in 5 s: the message may still arrive.
                            }
                        }
                    }));
                }
                join_all(sending, Duration::from_secs(120)).await;
                await_deliveries(&rec, (args.groups * args.group_messages * (size - 1)) as u64)
                    .await;
                let elapsed = start.elapsed().as_secs_f64();
                let cpu1 = cpu_pair(&args);
                rec.running_flag.store(false, Ordering::Relaxed);
                groups_report(&args, &rec, size, elapsed, (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1));
                join_all(tasks, Duration::from_secs(5)).await;
            }
        }
    }
}
