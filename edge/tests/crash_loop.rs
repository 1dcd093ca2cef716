//! Crash loop: a mixed load (1:1 sends, group sends, delivered receipts, key fetches)
//! from several clients while `ternd` is killed with SIGKILL at random moments and
//! restarted on the same data directory, again and again. Clients retry with the same
//! client message ids until their sent tick arrives. Afterwards every recipient drains
//! its mailbox and the shared checker (`tern_testkit::ledger`) must find nothing wrong:
//! every acknowledged message delivered to every recipient device, none stored twice,
//! order kept per sender device, every payload intact, no one-time prekey handed out
//! twice.
//!
//! `TERN_CRASH_CYCLES` sets the number of kills (20 by default, what CI runs);
//! `TERN_CRASH_SEED` the random seed. `docs/RELIABILITY.md` records long runs.

// The clients are plain threads sharing one log; the no-shared-state rule is ternd's.
#![allow(clippy::disallowed_types)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tern_testkit::ledger::{open_payload, payload, Ledger, Received as Got};
use tern_wire::messages::*;
use tern_wire::*;

const USERS: usize = 5;
const GROUP_ID: GroupId = 0xC0FFEE;
const SERVER_ARGS: [&str; 6] =
    ["--cores", "2", "--sends-per-second", "100000", "--key-fetches-per-hour", "1000000"];

/// A tiny xorshift generator: the run is reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What every client thread shares.
struct Shared {
    addr: Mutex<SocketAddr>,
    stop: AtomicBool,
    ledger: Mutex<Ledger>,
    accounts: Vec<Account>,
}

/// A connection that reports failures (the server may die at any moment) instead of
/// panicking like the other tests' client.
struct Conn {
    tcp: TcpStream,
    decoder: FrameDecoder,
    next_id: u32,
    me: Account,
}

type Io<T> = std::io::Result<T>;

fn broken(what: &str) -> std::io::Error {
    std::io::Error::other(what.to_string())
}

impl Conn {
    fn open(addr: SocketAddr, me: Account, shared: &Shared) -> Io<Conn> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        tcp.set_read_timeout(Some(Duration::from_secs(3)))?;
        tcp.set_nodelay(true)?;
        let decoder = FrameDecoder::new(ABSOLUTE_MAX_FRAME_BYTES);
        let mut conn = Conn { tcp, decoder, next_id: 1, me };
        let hello = Hello {
            magic: HELLO_MAGIC,
            version_min: 1,
            version_max: 1,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            client: "crash-loop".into(),
        };
        conn.call(&hello, shared)?;
        let auth = Auth { user_id: me.user_id, device_id: me.device_id, token: me.token };
        let authed = conn.call(&auth, shared)?;
        if authed.header.message_type != MessageType::AuthOk {
            return Err(broken(&format!("auth refused: {}", authed.describe())));
        }
        Ok(conn)
    }

    fn send<T>(&mut self, value: &T) -> Io<u32>
    where
        T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    {
        let id = self.next_id;
        self.next_id += 1;
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, id, 0, value, DEFAULT_MAX_FRAME_BYTES).unwrap();
        self.tcp.write_all(&bytes)?;
        Ok(id)
    }

    fn read(&mut self) -> Io<Received> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(f)) => {
                    return Ok(Received { header: f.header, payload: f.payload.to_vec() })
                }
                Ok(None) => {}
                Err(e) => panic!("the server sent an undecodable frame: {e}"),
            }
            let mut buf = [0u8; 65536];
            match self.tcp.read(&mut buf)? {
                0 => return Err(broken("closed")),
                n => self.decoder.feed(&buf[..n]),
            }
        }
    }

    /// Sends a request and reads until its response, logging (and acknowledging) every
    /// envelope delivered meanwhile.
    fn call<T>(&mut self, value: &T, shared: &Shared) -> Io<Received>
    where
        T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    {
        let id = self.send(value)?;
        loop {
            let frame = self.read()?;
            if frame.header.request_id == id && frame.header.is_response() {
                return Ok(frame);
            }
            self.on_unsolicited(&frame, shared)?;
        }
    }

    /// Returns whether the frame was a delivery.
    fn on_unsolicited(&mut self, frame: &Received, shared: &Shared) -> Io<bool> {
        if frame.header.message_type != MessageType::Deliver {
            return Ok(false);
        }
        let deliver = frame.deliver();
        let envelope = deliver.envelope;
        if envelope.kind == ArchivedEnvelopeKind::Text && envelope.client_message_id != 0 {
            let got = Got {
                sender: (envelope.sender_user.to_native(), envelope.sender_device.to_native()),
                client_message_id: envelope.client_message_id.to_native(),
                server_message_id: envelope.server_message_id.to_native(),
                mailbox_seq: deliver.mailbox_seq,
                stream: match envelope.conversation {
                    ArchivedConversation::Group(group) => group.to_native(),
                    _ => 0,
                },
                sequence: open_payload(&envelope.body).map(|(_, sequence)| sequence),
            };
            let me = (self.me.user_id, self.me.device_id);
            if std::env::var("TERN_CRASH_DEBUG").is_ok() {
                let group = matches!(envelope.conversation, ArchivedConversation::Group(_));
                eprintln!(
                    "DBG {me:?} {:?} c{} s{} m{} group={group}",
                    got.sender, got.client_message_id, got.server_message_id, got.mailbox_seq
                );
            }
            shared.ledger.lock().unwrap().received(me, got);
        }
        let up_to = deliver.mailbox_seq;
        self.send(&DeliveryAck { up_to_mailbox_seq: up_to })?;
        Ok(true)
    }
}

/// Keeps a connection to whichever server is up, reconnecting after a crash.
fn connected<'a>(conn: &'a mut Option<Conn>, me: Account, shared: &Shared) -> &'a mut Conn {
    loop {
        if conn.is_some() {
            return conn.as_mut().expect("just checked");
        }
        let addr = *shared.addr.lock().unwrap();
        match Conn::open(addr, me, shared) {
            Ok(c) => *conn = Some(c),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// One user's client: sends to random peers and the group, fetches keys, acknowledges
/// what it receives, until told to stop (finishing the send in hand).
fn client(index: usize, shared: Arc<Shared>, seed: u64) {
    let me = shared.accounts[index];
    let device = (me.user_id, me.device_id);
    let mut rng = Rng(seed | 1);
    let mut conn: Option<Conn> = None;
    let mut sequence = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let action = rng.below(10);
        if action >= 8 {
            let target =
                shared.accounts[(index + 1 + rng.below(USERS as u64 - 1) as usize) % USERS];
            fetch_keys(me, target, &mut conn, &shared);
            continue;
        }
        sequence += 1;
        let client_id = sequence;
        let body = payload(index as u64, sequence, 64 + rng.below(200) as usize);
        let (message, recipients): (SendMessage, Vec<(u64, u32)>) = if action >= 6 {
            let members = shared.accounts.iter().filter(|a| a.user_id != me.user_id);
            (group_text(GROUP_ID, client_id, &body), members.map(|a| (a.user_id, 1)).collect())
        } else {
            let peer = shared.accounts[(index + 1 + rng.below(USERS as u64 - 1) as usize) % USERS];
            (text(peer, client_id, &body), vec![(peer.user_id, 1)])
        };
        shared.ledger.lock().unwrap().sending(device, client_id, sequence, &recipients);
        send_until_acked(me, client_id, &message, &mut conn, &shared);
    }
}

/// Fetches `target`'s key bundles and records each one-time key handed out.
fn fetch_keys(me: Account, target: Account, conn: &mut Option<Conn>, shared: &Shared) {
    let fetch = FetchBundles { user_id: target.user_id, device_ids: vec![] };
    let c = connected(conn, me, shared);
    match c.call(&fetch, shared) {
        Ok(reply) if reply.header.message_type == MessageType::Bundles => {
            for bundle in reply.access::<Bundles>().devices.iter() {
                if let Some(key) = bundle.one_time_key.as_ref() {
                    let owner = (target.user_id, bundle.device_id.to_native());
                    shared.ledger.lock().unwrap().key_handed_out(owner, key.key_id.to_native());
                }
            }
        }
        Ok(_) => {}
        Err(_) => *conn = None,
    }
}

/// Sends `message` until its sent tick arrives: a crash means reconnect and send again,
/// with the same id.
fn send_until_acked(
    me: Account,
    client_id: u64,
    message: &SendMessage,
    conn: &mut Option<Conn>,
    shared: &Shared,
) {
    let device = (me.user_id, me.device_id);
    loop {
        let c = connected(conn, me, shared);
        let result = c.call(message, shared);
        if std::env::var("TERN_CRASH_DEBUG").is_ok() {
            let what = match &result {
                Ok(r) if r.header.message_type == MessageType::SendAck => {
                    format!(
                        "ack s{} dup={}",
                        r.access::<SendAck>().server_message_id,
                        r.access::<SendAck>().duplicate
                    )
                }
                Ok(r) => r.describe(),
                Err(e) => format!("err {e}"),
            };
            eprintln!("DBG SEND {device:?} c{client_id} {what}");
        }
        match result {
            Ok(reply) if reply.header.message_type == MessageType::SendAck => {
                shared.ledger.lock().unwrap().acked(device, client_id);
                break;
            }
            Ok(reply) => panic!("send refused: {}", reply.describe()),
            Err(_) => *conn = None,
        }
    }
}

/// Reads one user's mailbox to the end: pings until three rounds bring nothing new.
fn drain(me: Account, shared: &Shared) {
    let deadline = Instant::now() + TIMEOUT * 3;
    let mut conn = None;
    let mut quiet_rounds = 0;
    while quiet_rounds < 3 {
        assert!(Instant::now() < deadline, "user {} never drained", me.user_id);
        let c = connected(&mut conn, me, shared);
        let Ok(id) = c.send(&Ping { nonce: 1 }) else {
            conn = None;
            continue;
        };
        let mut delivered = false;
        loop {
            match c.read() {
                Ok(f) if f.header.request_id == id && f.header.is_response() => break,
                Ok(f) => delivered |= c.on_unsolicited(&f, shared).unwrap_or(false),
                Err(_) => {
                    conn = None;
                    break;
                }
            }
        }
        quiet_rounds = if delivered { 0 } else { quiet_rounds + 1 };
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Registers the users, each with as many one-time keys as a device may hold (100 in
/// the registration, 400 more uploaded), and has the first create the group of them
/// all.
fn register_users_in_a_group(server: &mut Server) -> Vec<Account> {
    let signer = test_signer();
    let accounts: Vec<Account> = (0..USERS)
        .map(|i| {
            let phone = format!("+1577000{i:04}");
            let account = register_with_keys(server, &phone, keys_signed_by(&signer, 100));
            let mut device = login(server, account);
            for from in (101..=401).step_by(100) {
                let one_time_keys =
                    (from..from + 100).map(|id| sign_prekey(&signer, id, [id as u8; 32])).collect();
                let upload = UploadKeys { one_time_keys, fallback_key: None };
                device.request(&upload).access::<KeysUploaded>();
            }
            account
        })
        .collect();
    let members: Vec<UserId> = accounts[1..].iter().map(|a| a.user_id).collect();
    let mut admin = login(server, accounts[0]);
    let create = GroupChange::Create { name: "crash".into(), members };
    admin
        .request(&signed_update(&signer, accounts[0], GROUP_ID, 0, create))
        .access::<GroupUpdated>();
    accounts
}

#[test]
fn kill_9_at_random_moments_loses_and_duplicates_nothing() {
    let cycles: u64 =
        std::env::var("TERN_CRASH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let seed: u64 = std::env::var("TERN_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::process::id() as u64 * 0x9E37_79B9);
    eprintln!("crash loop: {cycles} cycles, seed {seed} (TERN_CRASH_SEED={seed} repeats it)");
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &SERVER_ARGS);
    let accounts = register_users_in_a_group(&mut server);

    let shared = Arc::new(Shared {
        addr: Mutex::new(server.addr),
        stop: AtomicBool::new(false),
        ledger: Mutex::new(Ledger::default()),
        accounts: accounts.clone(),
    });
    let threads: Vec<_> = (0..USERS)
        .map(|i| {
            let shared = shared.clone();
            std::thread::spawn(move || client(i, shared, seed.wrapping_add(i as u64 * 7919)))
        })
        .collect();
    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    for _ in 0..cycles {
        std::thread::sleep(Duration::from_millis(50 + rng.below(350)));
        server.kill();
        if std::env::var("TERN_CRASH_DEBUG").is_ok() {
            eprintln!("DBG KILL");
        }
        server = Server::start(dir.path(), &SERVER_ARGS);
        *shared.addr.lock().unwrap() = server.addr;
    }
    // Some load on the last server, then every client finishes its send in hand.
    std::thread::sleep(Duration::from_millis(300));
    shared.stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().expect("a client thread panicked");
    }
    for account in &accounts {
        drain(*account, &shared);
    }
    let ledger = shared.ledger.lock().unwrap();
    let violations = ledger.check();
    eprintln!(
        "crash loop: {cycles} kills in {:.1} s, {} messages acknowledged, {} violations",
        started.elapsed().as_secs_f64(),
        ledger.acked_count(),
        violations.len()
    );
    assert!(violations.is_empty(), "{} violations:\n{}", violations.len(), violations.join("\n"));
    assert!(ledger.acked_count() > cycles as usize, "the load barely ran");
}
