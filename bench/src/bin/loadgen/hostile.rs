//! The hostile side of `--scenario abuse` (issue 20): connections that attack `ternd`
//! beside the honest users. Each is one async task that starts over (reconnects) whenever
//! the server closes it or its attack cycle ends, so the pressure holds for the whole run,
//! and tallies what the server answered: frames, refusal codes, closes.
//!
//! The attacks ([`Attack`]), in the proportions of [`MIX`]:
//!
//! - never-reading clients that pipeline requests: before auth (`Ping` and
//!   `FetchBundles`, the latter answered `AuthRequired`), and authenticated (`Ping`, or
//!   `MediaDownload` of all of their own 1 MiB blob); each writes until its writes stall
//!   (the server stopped reading it) or fail (closed), holds the connection unread for
//!   `--hostile-hold-s`, then reads what is there to count it;
//! - slowloris: a `Hello` dribbled a byte every 500 ms and never finished, or a whole
//!   `Hello` then an `Auth` dribbled likewise (the auth deadline must cut both);
//! - oversized frames before auth: a header over the 4 KiB handshake limit before
//!   `Hello`, or over the 64 KiB pre-auth limit after it;
//! - floods from registered hostile accounts at `--flood-rate` requests per second per
//!   connection: sends to one honest victim, read receipts to strangers, profile lookups,
//!   group creations and adds naming honest users, key-bundle fetches (draining one-time
//!   keys), reports of the victim;
//! - reconnect churn: connect, authenticate, drop, again.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ring::signature::Ed25519KeyPair;
use tern_bench::proto::{frame, try_hello};
use tern_wire::messages::*;
use tern_wire::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::encode_text;

/// One kind of hostile connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Attack {
    /// Pipelines `Ping` and `FetchBundles` before auth, never reads.
    PreAuthNoRead,
    /// Authenticated, pipelines `MediaDownload` of its own 1 MiB blob, never reads.
    DownloadNoRead,
    /// Authenticated, pipelines `Ping`, never reads.
    PingNoRead,
    /// Dribbles a handshake that never ends.
    Slowloris,
    /// Announces a frame over the limit before auth.
    Oversized,
    /// Sends to one honest victim.
    SendFlood,
    /// Read receipts to strangers.
    ReceiptFlood,
    /// Profile lookups.
    ProfileFlood,
    /// Group creations and adds naming honest users.
    GroupSpam,
    /// Key-bundle fetches of honest users.
    KeyDrain,
    /// Reports of the victim.
    ReportFlood,
    /// Connect, authenticate, drop.
    Churn,
    /// Authenticated, pipelines `Ping` and reads every answer as fast as it can (not in
    /// the default mix: `--attacks ping-pipeline`).
    PingPipeline,
}

/// Connections of each attack per 1,000 hostile connections (the default mix is the
/// first 12; the last is only run when named).
pub const MIX: [(Attack, usize); 13] = [
    (Attack::PreAuthNoRead, 100),
    (Attack::DownloadNoRead, 50),
    (Attack::PingNoRead, 50),
    (Attack::Slowloris, 250),
    (Attack::Oversized, 100),
    (Attack::SendFlood, 80),
    (Attack::ReceiptFlood, 40),
    (Attack::ProfileFlood, 40),
    (Attack::GroupSpam, 40),
    (Attack::KeyDrain, 60),
    (Attack::ReportFlood, 40),
    (Attack::Churn, 150),
    (Attack::PingPipeline, 50),
];

impl Attack {
    /// How the report names it.
    pub fn name(self) -> &'static str {
        match self {
            Attack::PreAuthNoRead => "never reads, pipelines Ping+FetchBundles before auth",
            Attack::DownloadNoRead => "never reads, pipelines 1 MiB MediaDownloads",
            Attack::PingNoRead => "never reads, pipelines Pings after auth",
            Attack::Slowloris => "slowloris (handshake dribbled, never finished)",
            Attack::Oversized => "oversized frame before auth",
            Attack::SendFlood => "SendMessage flood to one honest victim",
            Attack::ReceiptFlood => "read receipts to strangers",
            Attack::ProfileFlood => "profile lookups",
            Attack::GroupSpam => "group create/add naming honest users",
            Attack::KeyDrain => "key-bundle fetches of honest users",
            Attack::ReportFlood => "reports of the victim",
            Attack::Churn => "reconnect churn (connect, auth, drop)",
            Attack::PingPipeline => "pipelines Pings after auth, reads every answer",
        }
    }

    /// Whether it needs a registered account.
    pub fn needs_account(self) -> bool {
        !matches!(self, Attack::PreAuthNoRead | Attack::Slowloris | Attack::Oversized)
    }

    fn floods(self) -> bool {
        matches!(
            self,
            Attack::SendFlood
                | Attack::ReceiptFlood
                | Attack::ProfileFlood
                | Attack::GroupSpam
                | Attack::KeyDrain
                | Attack::ReportFlood
        )
    }

    /// Its short name (`--attacks`).
    pub fn flag(self) -> &'static str {
        match self {
            Attack::PreAuthNoRead => "preauth-noread",
            Attack::DownloadNoRead => "download-noread",
            Attack::PingNoRead => "ping-noread",
            Attack::Slowloris => "slowloris",
            Attack::Oversized => "oversized",
            Attack::SendFlood => "send-flood",
            Attack::ReceiptFlood => "receipts",
            Attack::ProfileFlood => "profiles",
            Attack::GroupSpam => "groups",
            Attack::KeyDrain => "key-fetches",
            Attack::ReportFlood => "reports",
            Attack::Churn => "churn",
            Attack::PingPipeline => "ping-pipeline",
        }
    }
}

/// The attacks of `hostile` connections in [`MIX`]'s proportions, among those named in
/// `only` (all when empty; the shares are scaled to the chosen ones, and the first
/// chosen takes what rounding leaves).
pub fn plan(hostile: usize, only: &[String]) -> Vec<Attack> {
    let chosen: Vec<(Attack, usize)> = MIX
        .into_iter()
        .filter(|(a, _)| match only.is_empty() {
            true => *a != Attack::PingPipeline,
            false => only.iter().any(|o| o == a.flag()),
        })
        .collect();
    let total: usize = chosen.iter().map(|c| c.1).sum();
    let mut attacks = Vec::with_capacity(hostile);
    for &(attack, share) in &chosen {
        attacks.extend(std::iter::repeat_n(attack, hostile * share / total.max(1)));
    }
    while attacks.len() < hostile && !chosen.is_empty() {
        attacks.push(chosen[0].0);
    }
    attacks.sort();
    attacks
}

/// What came back, by (attack, kind of outcome, outcome).
pub type Tally = BTreeMap<(Attack, &'static str, &'static str), u64>;

/// What the attackers share.
pub struct Ctx {
    /// The server.
    pub addr: SocketAddr,
    /// Cleared to stop every attacker.
    pub running: AtomicBool,
    /// The honest users (strangers to the attackers).
    pub honest: Arc<Vec<u64>>,
    /// The honest user the send flood and the reports aim at.
    pub victim: u64,
    /// How long a never-reading client holds its connection unread.
    pub hold: Duration,
    /// Pause between two cycles of one attacker.
    pub pause: Duration,
    /// Interval between two requests of one flooding connection.
    pub flood_interval: Duration,
    /// Everything tallied so far.
    pub tally: Mutex<Tally>,
}

impl Ctx {
    fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }
}

/// A hostile account: (user id, token, signing key as PKCS#8).
pub type Account = (u64, Token, Vec<u8>);

/// One attacker's own state across its cycles.
struct State {
    attack: Attack,
    account: Option<Account>,
    signer: Option<Ed25519KeyPair>,
    rng: u64,
    /// `DownloadNoRead`: its uploaded blob.
    media: Option<MediaId>,
    /// `GroupSpam`: the last group it changed, at which epoch.
    group: Option<(u64, u64)>,
    tally: Tally,
}

impl State {
    /// A state for counting only.
    fn bare(attack: Attack) -> State {
        State {
            attack,
            account: None,
            signer: None,
            rng: 1,
            media: None,
            group: None,
            tally: Tally::new(),
        }
    }

    fn count(&mut self, kind: &'static str, what: &'static str) {
        *self.tally.entry((self.attack, kind, what)).or_insert(0) += 1;
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn stranger(&mut self, ctx: &Ctx) -> u64 {
        ctx.honest[(self.next() % ctx.honest.len() as u64) as usize]
    }
}

/// Runs `attack` over and over until `ctx.running` is cleared.
pub async fn attacker(ctx: Arc<Ctx>, attack: Attack, account: Option<Account>, seed: u64) {
    let signer = account.as_ref().map(|a| Ed25519KeyPair::from_pkcs8(&a.2).expect("a key"));
    let mut st = State {
        attack,
        account,
        signer,
        rng: seed | 1,
        media: None,
        group: None,
        tally: Tally::new(),
    };
    while ctx.running() {
        match attack {
            Attack::PreAuthNoRead | Attack::DownloadNoRead | Attack::PingNoRead => {
                never_read(&ctx, &mut st).await
            }
            Attack::Slowloris => slowloris(&ctx, &mut st, seed).await,
            Attack::Oversized => oversized(&ctx, &mut st, seed).await,
            Attack::Churn => churn(&ctx, &mut st).await,
            Attack::PingPipeline => ping_pipeline(&ctx, &mut st).await,
            _ => flood(&ctx, &mut st).await,
        }
        st.count("cycles", "started");
        merge(&ctx, std::mem::take(&mut st.tally));
        idle(&ctx, ctx.pause).await;
    }
}

/// Adds an attacker's counts to the shared tally.
fn merge(ctx: &Ctx, tally: Tally) {
    let mut shared = ctx.tally.lock().unwrap();
    for (key, n) in tally {
        *shared.entry(key).or_insert(0) += n;
    }
}

/// Sleeps for `d` in short steps, returning early once the run stops.
async fn idle(ctx: &Ctx, d: Duration) {
    let until = Instant::now() + d;
    while ctx.running() && Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(Duration::from_millis(200))).await;
    }
}

fn code_name(code: u16) -> &'static str {
    ErrorCode::from_u16(code).map_or("unknown code", ErrorCode::name)
}

/// How a frame from the server is tallied: (kind, what).
fn outcome(frame: &Frame<'_>) -> (&'static str, &'static str) {
    match &frame.message {
        Message::ErrorFrame(e) => ("error", code_name(e.code.to_native())),
        Message::SendError(e) => ("send refused", code_name(e.code.to_native())),
        Message::Bundles(b) if b.devices.iter().any(|d| d.one_time_key.is_some()) => {
            ("answer", "Bundles with a one-time key")
        }
        Message::Bundles(_) => ("answer", "Bundles, fallback key only"),
        _ => ("answer", frame.header.message_type.name()),
    }
}

/// How a connection ended, as the client saw it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// The server closed it (end of stream).
    Closed,
    /// The server reset it.
    Reset,
    /// Nothing more came within the quiet time (still open).
    Quiet,
    /// Frames that do not decode.
    Undecodable,
}

impl End {
    fn name(self) -> &'static str {
        match self {
            End::Closed => "closed by the server",
            End::Reset => "reset by the server",
            End::Quiet => "still open, dropped by the client",
            End::Undecodable => "undecodable frames",
        }
    }
}

/// Reads until the server closes the connection or sends nothing for `quiet`, tallying
/// every frame (at most about `max_bytes`).
async fn read_tally<R: AsyncRead + Unpin>(
    reader: &mut R,
    decoder: &mut FrameDecoder,
    quiet: Duration,
    max_bytes: usize,
    st: &mut State,
) -> End {
    let (mut buffer, mut total) = (vec![0u8; 65536], 0usize);
    loop {
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let (kind, what) = outcome(&frame);
                    st.count(kind, what);
                }
                Ok(None) => break,
                Err(_) => return End::Undecodable,
            }
        }
        if total >= max_bytes {
            return End::Quiet;
        }
        match timeout(quiet, reader.read(&mut buffer)).await {
            Ok(Ok(0)) => return End::Closed,
            Ok(Ok(n)) => {
                total += n;
                decoder.feed(&buffer[..n]);
            }
            Ok(Err(_)) => return End::Reset,
            Err(_) => return End::Quiet,
        }
    }
}

/// Connects and says hello; a failure is tallied.
async fn open(ctx: &Ctx, st: &mut State) -> Option<(TcpStream, FrameDecoder)> {
    let Ok(Ok(mut stream)) = timeout(Duration::from_secs(5), TcpStream::connect(ctx.addr)).await
    else {
        st.count("connection", "connect failed");
        return None;
    };
    let _ = stream.set_nodelay(true);
    match timeout(Duration::from_secs(5), try_hello(&mut stream)).await {
        Ok(Ok(decoder)) => Some((stream, decoder)),
        Ok(Err(Some(code))) => {
            st.count("refused at hello", code.name());
            None
        }
        _ => {
            st.count("connection", "no Welcome");
            None
        }
    }
}

/// Waits (at most 5 s) for the answer to request `rid`, tallying other frames; returns
/// its type and payload.
async fn answer(
    stream: &mut TcpStream,
    decoder: &mut FrameDecoder,
    rid: u32,
    st: &mut State,
) -> Option<(MessageType, Vec<u8>)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buffer = vec![0u8; 65536];
    loop {
        while let Ok(Some(frame)) = decoder.next_frame() {
            if frame.header.request_id == rid {
                if let Message::ErrorFrame(e) = &frame.message {
                    st.count("error", code_name(e.code.to_native()));
                }
                return Some((frame.header.message_type, frame.payload.to_vec()));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, stream.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => decoder.feed(&buffer[..n]),
            _ => {
                st.count("connection", "closed or silent before an answer");
                return None;
            }
        }
    }
}

/// Connects, says hello and authenticates with the attacker's account.
async fn open_authed(ctx: &Ctx, st: &mut State) -> Option<(TcpStream, FrameDecoder)> {
    let (user_id, token, _) = st.account.clone().expect("an account");
    let (mut stream, mut decoder) = open(ctx, st).await?;
    let auth = frame(2, &Auth { user_id, device_id: 1, token });
    stream.write_all(&auth).await.ok()?;
    let (ty, _) = answer(&mut stream, &mut decoder, 2, st).await?;
    if ty != MessageType::AuthOk {
        return None;
    }
    st.count("answer", "AuthOk");
    Some((stream, decoder))
}

/// Uploads a 1 MiB blob (once per attacker) for the download attack.
async fn upload(stream: &mut TcpStream, decoder: &mut FrameDecoder, st: &mut State) -> bool {
    if st.media.is_some() {
        return true;
    }
    let data = vec![0x5A; 1 << 20];
    let begin = frame(3, &MediaBegin { size_bytes: data.len() as u64, kind: MediaKind::Video });
    if stream.write_all(&begin).await.is_err() {
        return false;
    }
    let Some((MessageType::MediaBegun, payload)) = answer(stream, decoder, 3, st).await else {
        return false;
    };
    let media_id = access::<MediaBegun>(&payload).expect("MediaBegun").media_id;
    let mut out = Vec::new();
    for (i, piece) in data.chunks(256 * 1024).enumerate() {
        let offset = (i * 256 * 1024) as u64;
        out.extend(frame(0, &MediaChunk { media_id, offset, data: piece.to_vec() }));
    }
    let sha256: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&data).into();
    out.extend(frame(4, &MediaCommit { media_id, sha256 }));
    if stream.write_all(&out).await.is_err() {
        return false;
    }
    let committed =
        matches!(answer(stream, decoder, 4, st).await, Some((MessageType::MediaStatus, _)));
    if committed {
        st.media = Some(media_id);
    }
    committed
}

/// What a never-reading attacker pipelines, as one batch of frames.
fn pipelined(st: &State, victim: u64) -> Vec<u8> {
    let mut batch = Vec::new();
    match st.attack {
        Attack::PreAuthNoRead => {
            for i in 0..128 {
                batch.extend(frame(10 + i, &Ping { nonce: 7 }));
                let fetch = FetchBundles { user_id: victim, device_ids: vec![] };
                batch.extend(frame(11 + i, &fetch));
            }
        }
        Attack::PingNoRead => {
            for i in 0..256 {
                batch.extend(frame(10 + i, &Ping { nonce: 7 }));
            }
        }
        _ => {
            let media_id = st.media.expect("uploaded");
            for i in 0..16 {
                let download = MediaDownload { media_id, offset: 0, length: 1 << 20 };
                batch.extend(frame(10 + i, &download));
            }
        }
    }
    batch
}

/// A never-reading client: pipelines until its writes stall (the server stopped reading
/// it) or fail, holds the connection unread, then reads what came to count it.
async fn never_read(ctx: &Ctx, st: &mut State) {
    let opened = if st.attack == Attack::PreAuthNoRead {
        open(ctx, st).await
    } else {
        open_authed(ctx, st).await
    };
    let Some((mut stream, mut decoder)) = opened else { return };
    if st.attack == Attack::DownloadNoRead && !upload(&mut stream, &mut decoder, st).await {
        st.count("setup", "upload failed");
        return;
    }
    let batch = pipelined(st, ctx.victim);
    let started = Instant::now();
    let how = loop {
        if !ctx.running() {
            break "run ended while writing";
        }
        match timeout(Duration::from_secs(1), stream.write_all(&batch)).await {
            Err(_) => break "writes stalled: the server stopped reading",
            Ok(Err(_)) => break "closed while writing",
            Ok(Ok(())) if started.elapsed() > ctx.hold => break "never stalled",
            Ok(Ok(())) => {}
        }
    };
    st.count("client", how);
    if let Some(held) = hold_unread(ctx, &stream, started).await {
        st.count("connection", "reset by the server while unread");
        st.count("held", bucket(held));
        return;
    }
    // Still open: a look at the first answers (bounded, so that the server is not made
    // to serve the pipelined backlog), then the client drops it.
    let quiet = Duration::from_millis(500);
    let end = read_tally(&mut stream, &mut decoder, quiet, 64 << 10, st).await;
    st.count("after the hold, a 64 KiB read", end.name());
}

/// Holds a connection unread until `ctx.hold` has passed since `started`, probing every
/// 200 ms whether the server reset it (without reading); returns when it was reset.
async fn hold_unread(ctx: &Ctx, stream: &TcpStream, started: Instant) -> Option<f64> {
    while ctx.running() && started.elapsed() < ctx.hold {
        let reset = matches!(stream.take_error(), Ok(Some(_))) || stream.peer_addr().is_err();
        if reset {
            return Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// A frame header announcing `frame_bytes` of type `ty` (request id 1).
fn header(frame_bytes: u32, ty: MessageType) -> Vec<u8> {
    let mut bytes = (frame_bytes - HEADER_BYTES as u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(&ty.code().to_le_bytes());
    bytes.extend_from_slice(&[0, 0]); // flags, reserved
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes
}

fn hello_frame() -> Vec<u8> {
    let hello = Hello {
        magic: HELLO_MAGIC,
        version_min: 1,
        version_max: 1,
        max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        client: "tern-bench hostile".into(),
    };
    frame(1, &hello)
}

/// Slowloris: half of them dribble a `Hello`, the others a whole `Hello` then an `Auth`,
/// a byte every 500 ms, never the last one; counted: what the server said and how long
/// the connection lived.
async fn slowloris(ctx: &Ctx, st: &mut State, seed: u64) {
    let Ok(Ok(stream)) = timeout(Duration::from_secs(5), TcpStream::connect(ctx.addr)).await else {
        st.count("connection", "connect failed");
        return;
    };
    let (mut reader, mut writer) = stream.into_split();
    let mut dribble = hello_frame();
    if seed % 2 == 1 {
        if writer.write_all(&dribble).await.is_err() {
            return;
        }
        let auth = Auth { user_id: ctx.victim, device_id: 1, token: [9; 32] };
        dribble = frame(2, &auth);
    }
    dribble.pop();
    let (started, mut sent, mut buffer) = (Instant::now(), 0, vec![0u8; 4096]);
    let mut decoder = FrameDecoder::new(ABSOLUTE_MAX_FRAME_BYTES);
    let end = loop {
        tokio::select! {
            read = reader.read(&mut buffer) => match read {
                Ok(0) => break End::Closed,
                Ok(n) => decoder.feed(&buffer[..n]),
                Err(_) => break End::Reset,
            },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if !ctx.running() {
                    break End::Quiet;
                }
                if sent < dribble.len() && writer.write_all(&dribble[sent..=sent]).await.is_ok() {
                    sent += 1;
                }
            }
        }
    };
    while let Ok(Some(frame)) = decoder.next_frame() {
        let (kind, what) = outcome(&frame);
        st.count(kind, what);
    }
    st.count("connection", end.name());
    if end != End::Quiet {
        let held = started.elapsed().as_secs_f64();
        st.count("held", bucket(held));
    }
}

fn bucket(seconds: f64) -> &'static str {
    match seconds {
        s if s < 9.0 => "under 9 s",
        s if s < 11.0 => "9 to 11 s",
        s if s < 13.0 => "11 to 13 s",
        _ => "13 s or more",
    }
}

/// An oversized frame before auth: half before `Hello` (over 4 KiB), half after it (over
/// the 64 KiB pre-auth limit); then reads until the server closes.
async fn oversized(ctx: &Ctx, st: &mut State, seed: u64) {
    let Ok(Ok(mut stream)) = timeout(Duration::from_secs(5), TcpStream::connect(ctx.addr)).await
    else {
        st.count("connection", "connect failed");
        return;
    };
    let bytes = if seed.is_multiple_of(2) {
        header(HANDSHAKE_MAX_FRAME_BYTES + 1, MessageType::Hello)
    } else {
        let mut bytes = hello_frame();
        bytes.extend(header(64 * 1024 + 1, MessageType::Verify));
        bytes
    };
    if stream.write_all(&bytes).await.is_err() {
        st.count("connection", "closed while writing");
        return;
    }
    let mut decoder = FrameDecoder::new(ABSOLUTE_MAX_FRAME_BYTES);
    let end = read_tally(&mut stream, &mut decoder, Duration::from_secs(5), 1 << 20, st).await;
    st.count("connection", end.name());
}

/// Pipelines `Ping`s in batches of 256 for as long as the server takes them, and reads
/// (and counts) every answer meanwhile.
async fn ping_pipeline(ctx: &Ctx, st: &mut State) {
    let Some((stream, mut decoder)) = open_authed(ctx, st).await else { return };
    let (mut reader, mut writer) = stream.into_split();
    let batch: Vec<u8> = (0..256).flat_map(|i| frame(10 + i, &Ping { nonce: 7 })).collect();
    let writing = async {
        while ctx.running() {
            match timeout(Duration::from_secs(1), writer.write_all(&batch)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return "closed while writing",
                Err(_) => return "writes stalled: the server stopped reading",
            }
        }
        "run ended"
    };
    let reading = async {
        let mut local = State::bare(st.attack);
        let mut buffer = vec![0u8; 65536];
        let end = loop {
            match timeout(Duration::from_secs(2), reader.read(&mut buffer)).await {
                Ok(Ok(0)) => break End::Closed,
                Ok(Ok(n)) => decoder.feed(&buffer[..n]),
                Ok(Err(_)) => break End::Reset,
                Err(_) if !ctx.running() => break End::Quiet,
                Err(_) => {}
            }
            while let Ok(Some(frame)) = decoder.next_frame() {
                let (kind, what) = outcome(&frame);
                local.count(kind, what);
            }
        };
        (end, local.tally)
    };
    let (how, (end, tally)) = tokio::join!(writing, reading);
    merge(ctx, tally);
    st.count("client", how);
    st.count("connection", end.name());
}

/// Reconnect churn: connect, authenticate, drop.
async fn churn(ctx: &Ctx, st: &mut State) {
    if let Some((stream, _)) = open_authed(ctx, st).await {
        drop(stream);
    }
}

/// The next request of a flooding attacker, request id `rid`.
fn flood_request(ctx: &Ctx, st: &mut State, rid: u32) -> Vec<u8> {
    let mut out = Vec::new();
    match st.attack {
        Attack::SendFlood => encode_text(&mut out, rid, ctx.victim, &[0xAB; 100]),
        Attack::ReceiptFlood => {
            let to = st.stranger(ctx);
            let receipt = SendReceipt {
                kind: ReceiptKind::Read,
                to_user: to,
                conversation: Conversation::User(to),
                message_ids: vec![st.next() >> 16],
            };
            out = frame(rid, &receipt);
        }
        Attack::ProfileFlood => out = frame(rid, &ProfileGet { user_id: st.stranger(ctx) }),
        Attack::KeyDrain => {
            out = frame(rid, &FetchBundles { user_id: st.stranger(ctx), device_ids: vec![] })
        }
        Attack::ReportFlood => {
            let report = Report {
                user_id: ctx.victim,
                message_ids: vec![],
                reason: ReportReason::Spam,
                comment: "spam".into(),
            };
            out = frame(rid, &report);
        }
        _ => out = group_change(ctx, st, rid),
    }
    out
}

/// A signed group change naming 8 honest users: an add to the last group it changed
/// (every other time, when it knows its epoch), or a new group.
fn group_change(ctx: &Ctx, st: &mut State, rid: u32) -> Vec<u8> {
    let members: BTreeSet<u64> = (0..8).map(|_| st.stranger(ctx)).collect();
    let members: Vec<u64> = members.into_iter().collect();
    let add = st.next().is_multiple_of(2);
    let (group_id, base_epoch, change) = match st.group.take() {
        Some((group_id, epoch)) if add => (group_id, epoch, GroupChange::Add { members }),
        _ => (st.next() >> 8, 0, GroupChange::Create { name: "spam".into(), members }),
    };
    let user_id = st.account.as_ref().expect("an account").0;
    let bytes = GroupChangeSigned::bytes(group_id, base_epoch, (user_id, 1), &change).unwrap();
    let signer = st.signer.as_ref().expect("a signer");
    let signature = signer.sign(&bytes).as_ref().try_into().expect("64 bytes");
    frame(rid, &GroupUpdate { group_id, base_epoch, change, signature })
}

/// A flooding attacker: authenticated, one request per `--flood-rate` interval whatever
/// the answers, every answer tallied, deliveries acknowledged.
async fn flood(ctx: &Ctx, st: &mut State) {
    debug_assert!(st.attack.floods());
    let Some((stream, mut decoder)) = open_authed(ctx, st).await else { return };
    let (mut reader, mut writer) = stream.into_split();
    let mut ticker = tokio::time::interval(ctx.flood_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut rid, mut buffer) = (10u32, vec![0u8; 65536]);
    let end = loop {
        let mut out = Vec::new();
        tokio::select! {
            read = reader.read(&mut buffer) => match read {
                Ok(0) => break End::Closed,
                Ok(n) => {
                    decoder.feed(&buffer[..n]);
                    match tally_flood_frames(&mut decoder, st) {
                        Some(u64::MAX) => break End::Undecodable,
                        Some(seq) => out = frame(0, &DeliveryAck { up_to_mailbox_seq: seq }),
                        None => {}
                    }
                }
                Err(_) => break End::Reset,
            },
            _ = ticker.tick() => {
                if !ctx.running() {
                    break End::Quiet;
                }
                out = flood_request(ctx, st, rid);
                rid = rid.wrapping_add(1).max(10);
            }
        }
        match timeout(Duration::from_secs(1), writer.write_all(&out)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break End::Reset,
            Err(_) => {
                st.count("client", "writes stalled: the server stopped reading");
                break End::Quiet;
            }
        }
    };
    st.count("connection", end.name());
}

/// Tallies the frames a flooding attacker got (and remembers its last group); returns the
/// mailbox sequence to acknowledge, if anything was delivered.
fn tally_flood_frames(decoder: &mut FrameDecoder, st: &mut State) -> Option<u64> {
    let mut ack = None;
    loop {
        let frame = match decoder.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => {
                // A generator built from other wire sources than the server, or a bug.
                st.count("client", "undecodable frame: stopped reading");
                return Some(u64::MAX);
            }
        };
        match &frame.message {
            Message::Deliver(d) => {
                ack = Some(d.mailbox_seq);
                st.count("delivered to the attacker", "envelope");
                continue;
            }
            Message::GroupUpdated(g) => {
                st.group = Some((g.group_id.to_native(), g.epoch.to_native()));
            }
            _ => {}
        }
        let (kind, what) = outcome(&frame);
        st.count(kind, what);
    }
    ack
}
