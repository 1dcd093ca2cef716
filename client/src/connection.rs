//! One connection to `ternd`: TCP, or TLS 1.3 with rustls, optionally carrying
//! WebSocket (one binary message per frame, for networks that only pass HTTP), with
//! `tern-wire` frames and the handshake done.
//!
//! It only moves frames: [`Connection::send`] encodes one and writes it;
//! [`Connection::next_frame`] reads until a whole frame is there. Reading is
//! cancel-safe (bytes read go into the decoder before anything awaits again), so a
//! caller may race it against user input in `tokio::select!`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_wire::messages::{ArchivedRedirect, Hello, Ping};
use tern_wire::{
    decode_frame, encode_frame, ErrorCode, Frame, FrameDecoder, Message, Payload, WireSerializer,
    ABSOLUTE_MAX_FRAME_BYTES, DEFAULT_MAX_FRAME_BYTES, HELLO_MAGIC,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ClientError;

/// How to reach the server.
///
/// Without `tls`, everything — the bearer token included — crosses the network in
/// clear: such a connection is made only to an address of this machine (every address
/// the name resolves to is loopback) unless `allow_plaintext` says the user asked for it
/// ([`ClientError::PlaintextRefused`] otherwise, before a byte is sent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`.
    pub address: String,
    /// TLS, and whom to trust.
    pub tls: Option<Trust>,
    /// Frames as binary WebSocket messages (to `ternd`'s WebSocket listener).
    pub websocket: bool,
    /// Plain TCP or WebSocket to an address off this machine, knowingly (the user gave a
    /// flag such as `tern --insecure-plaintext`): only behind a network that protects it.
    pub allow_plaintext: bool,
}

/// Which certificates a TLS connection accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// The public web PKI (Mozilla's roots).
    WebPki,
    /// Exactly this certificate (PEM file): for a development server's self-signed one.
    Pinned(PathBuf),
    /// Exactly this certificate (PEM bytes): what a device's store keeps of a `Pinned`
    /// file chosen at registration, so that a changed file changes nothing.
    Certificate(Vec<u8>),
}

/// `Redirect`s followed in a row before giving up (a shard map in flux can bounce a
/// request between nodes for a moment; more than this is a broken cluster).
pub const REDIRECTS_MAX: usize = 3;

/// The version byte of [`Endpoint::encode`].
const ENDPOINT_ENCODING_V1: u8 = 1;

impl Endpoint {
    /// Plain TCP to `address` (refused off this machine unless `allow_plaintext`).
    pub fn tcp(address: impl Into<String>) -> Endpoint {
        Endpoint { address: address.into(), tls: None, websocket: false, allow_plaintext: false }
    }

    /// The same endpoint with a `Pinned` file read into a `Certificate`: what a store
    /// remembers, and what a later endpoint is compared with.
    pub fn resolved(&self) -> Result<Endpoint, ClientError> {
        let tls = match &self.tls {
            Some(Trust::Pinned(path)) => {
                let pem = std::fs::read(path)
                    .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
                Some(Trust::Certificate(pem))
            }
            other => other.clone(),
        };
        Ok(Endpoint { tls, ..self.clone() })
    }

    /// The same kind of endpoint (framing, trust, plaintext rule) at the node a
    /// [`Redirect`](tern_wire::messages::Redirect) names; an error when that node has no
    /// listener of this kind.
    pub fn redirected(&self, redirect: &ArchivedRedirect) -> Result<Endpoint, ClientError> {
        let (address, kind) = match (self.tls.is_some(), self.websocket) {
            (false, false) => (redirect.tcp.as_str(), "TCP"),
            (true, false) => (redirect.tls.as_str(), "TLS"),
            (false, true) => (redirect.ws.as_str(), "WebSocket"),
            (true, true) => (redirect.wss.as_str(), "WebSocket-over-TLS"),
        };
        if address.is_empty() {
            return Err(ClientError::Protocol(format!(
                "the cluster sent this request to node {}, which has no {kind} listener",
                redirect.node.as_str()
            )));
        }
        Ok(Endpoint { address: address.to_owned(), ..self.clone() })
    }

    /// Bytes for the store: version, flags (WebSocket, plaintext allowed), trust kind
    /// (0 none, 1 web PKI, 2 certificate), the address and the certificate, each with its
    /// length. A `Pinned` trust must be [`Endpoint::resolved`] first (it is kept as 1).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![ENDPOINT_ENCODING_V1];
        out.push(u8::from(self.websocket) | u8::from(self.allow_plaintext) << 1);
        let pem: &[u8] = match &self.tls {
            None => {
                out.push(0);
                &[]
            }
            Some(Trust::WebPki | Trust::Pinned(_)) => {
                out.push(1);
                &[]
            }
            Some(Trust::Certificate(pem)) => {
                out.push(2);
                pem
            }
        };
        out.extend_from_slice(&(self.address.len() as u32).to_le_bytes());
        out.extend_from_slice(self.address.as_bytes());
        out.extend_from_slice(&(pem.len() as u32).to_le_bytes());
        out.extend_from_slice(pem);
        out
    }

    /// Parses [`Endpoint::encode`]; `None` for bytes it did not make.
    pub fn decode(bytes: &[u8]) -> Option<Endpoint> {
        let (&[version, flags, trust], rest) = bytes.split_first_chunk::<3>()?;
        if version != ENDPOINT_ENCODING_V1 || flags > 3 {
            return None;
        }
        let (address, rest) = take_counted(rest)?;
        let (pem, rest) = take_counted(rest)?;
        let tls = match (trust, pem.is_empty()) {
            (0, true) => None,
            (1, true) => Some(Trust::WebPki),
            (2, false) => Some(Trust::Certificate(pem.to_vec())),
            _ => return None,
        };
        let address = String::from_utf8(address.to_vec()).ok()?;
        let (websocket, allow_plaintext) = (flags & 1 != 0, flags & 2 != 0);
        rest.is_empty().then_some(Endpoint { address, tls, websocket, allow_plaintext })
    }
}

/// A `u32` (LE) length and that many bytes, and what follows.
fn take_counted(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (length, rest) = bytes.split_first_chunk::<4>()?;
    let length = u32::from_le_bytes(*length) as usize;
    (rest.len() >= length).then(|| rest.split_at(length))
}

/// The rule for plaintext: a connection without TLS goes only to addresses of this
/// machine, unless the user allowed it. `addresses` are what the endpoint's name
/// resolved to; checked before connecting, so nothing leaves in clear.
pub fn check_plaintext(endpoint: &Endpoint, addresses: &[SocketAddr]) -> Result<(), ClientError> {
    let on_this_machine = !addresses.is_empty() && addresses.iter().all(|a| a.ip().is_loopback());
    if endpoint.tls.is_some() || endpoint.allow_plaintext || on_this_machine {
        return Ok(());
    }
    Err(ClientError::PlaintextRefused { address: endpoint.address.clone() })
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A frame read from the server, owned.
#[derive(Clone, Debug)]
pub struct OwnedFrame {
    bytes: Vec<u8>,
}

impl OwnedFrame {
    /// The frame, validated when it was read.
    pub fn frame(&self) -> Frame<'_> {
        let (frame, _) = decode_frame(&self.bytes, ABSOLUTE_MAX_FRAME_BYTES)
            .expect("validated when read")
            .expect("a whole frame");
        frame
    }
}

/// The bytes under the frames.
enum Transport {
    Bytes(Box<dyn Stream>),
    WebSocket(Box<tokio_tungstenite::WebSocketStream<Box<dyn Stream>>>),
}

/// How long connecting (TCP, TLS, WebSocket and the handshake) may take before the
/// attempt counts as failed: a black-holed address must not hang a reconnect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long the answer to the hello may take once connected.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(4);

/// How long each probe of a port that did not answer the hello may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The keepalive used when a server advertises none.
const HEARTBEAT_DEFAULT: Duration = Duration::from_secs(30);

/// An open, handshaken connection.
pub struct Connection {
    transport: Transport,
    decoder: FrameDecoder,
    max_frame_bytes: u32,
    next_request_id: u32,
    buffer: Vec<u8>,
    /// Ping when nothing was sent for this long (the server's `Welcome` says).
    heartbeat: Duration,
    /// When a frame last left: the server's idle clock restarts then.
    last_sent: Instant,
    /// The first bytes the server sent, kept until the handshake is done: when they are
    /// not a frame they tell what the port speaks instead.
    first_bytes: Option<Vec<u8>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("next_request_id", &self.next_request_id).finish()
    }
}

impl Connection {
    /// Connects and performs the protocol handshake. A port that speaks another protocol
    /// (TLS without `tls`, WebSocket or HTTP without `websocket`, or the reverse) gets an
    /// error saying which option to change.
    pub async fn open(endpoint: &Endpoint) -> Result<Connection, ClientError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, Connection::open_now(endpoint)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer from {} in {} s", endpoint.address, CONNECT_TIMEOUT.as_secs()),
            ))),
        }
    }

    async fn open_now(endpoint: &Endpoint) -> Result<Connection, ClientError> {
        let transport = open_transport(endpoint).await?;
        let mut connection = Connection {
            transport,
            decoder: FrameDecoder::new(ABSOLUTE_MAX_FRAME_BYTES),
            max_frame_bytes: tern_wire::HANDSHAKE_MAX_FRAME_BYTES,
            next_request_id: 1,
            buffer: vec![0u8; 64 * 1024],
            heartbeat: HEARTBEAT_DEFAULT,
            last_sent: Instant::now(),
            first_bytes: Some(Vec::new()),
        };
        let hello = Hello {
            magic: HELLO_MAGIC,
            version_min: 1,
            version_max: 1,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            client: concat!("tern-client/", env!("CARGO_PKG_VERSION")).into(),
        };
        let id = connection.send(&hello).await?;
        // A port that waits for something else (an HTTP server wants a whole request)
        // never answers a hello: give up on it sooner than on a slow network.
        let read = tokio::time::timeout(WELCOME_TIMEOUT, connection.next_frame()).await;
        let read = read.unwrap_or(Err(ClientError::Disconnected));
        let reply = match read {
            Ok(reply) => reply,
            Err(error) => {
                let error = wrong_protocol(endpoint, connection.first_bytes, error);
                return Err(probe_tls(endpoint, error).await);
            }
        };
        connection.first_bytes = None;
        let frame = reply.frame();
        match frame.message {
            Message::Welcome(welcome) if frame.header.request_id == id => {
                connection.max_frame_bytes = welcome.max_frame_bytes.to_native();
                let heartbeat_ms = welcome.heartbeat_interval_ms.to_native();
                if heartbeat_ms > 0 {
                    connection.heartbeat = Duration::from_millis(heartbeat_ms.into());
                }
                Ok(connection)
            }
            _ => Err(server_error(&reply)),
        }
    }

    /// The largest frame the server accepts on this connection.
    pub fn max_frame_bytes(&self) -> u32 {
        self.max_frame_bytes
    }

    /// When a ping is due: the heartbeat after the last frame sent.
    pub fn ping_due(&self) -> Instant {
        self.last_sent + self.heartbeat
    }

    /// Sends a ping (the server's idle clock restarts; its `Pong` is ignored).
    pub async fn ping(&mut self) -> Result<(), ClientError> {
        self.send(&Ping { nonce: u64::from(self.next_request_id) }).await.map(drop)
    }

    /// Connects to `endpoint` and sends `request`, following the cluster's `Redirect`s
    /// to the node that owns what it needs (at most [`REDIRECTS_MAX`]); returns that
    /// connection, the endpoint it reached and the answer.
    pub async fn open_at_home<T>(
        endpoint: &Endpoint,
        request: &T,
        backlog: &mut VecDeque<OwnedFrame>,
    ) -> Result<(Connection, Endpoint, OwnedFrame), ClientError>
    where
        T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    {
        let mut endpoint = endpoint.clone();
        for _ in 0..=REDIRECTS_MAX {
            let mut connection = Connection::open(&endpoint).await?;
            let id = connection.send(request).await?;
            let reply = connection.answer(id, backlog).await?;
            if let Message::Redirect(redirect) = reply.frame().message {
                endpoint = endpoint.redirected(redirect)?;
                continue;
            }
            return Ok((connection, endpoint, reply));
        }
        Err(ClientError::Protocol(format!(
            "redirected more than {REDIRECTS_MAX} times in a row: the cluster's shard map \
             is not settling"
        )))
    }

    /// Reads until the answer to request `id`, keeping everything else in `backlog`. An
    /// unsolicited error (the server stopping, an idle timeout) is the answer's error.
    pub async fn answer(
        &mut self,
        id: u32,
        backlog: &mut VecDeque<OwnedFrame>,
    ) -> Result<OwnedFrame, ClientError> {
        loop {
            let frame = self.next_frame().await?;
            let header = frame.frame().header;
            if header.is_response() && header.request_id == id {
                return Ok(frame);
            }
            if let Message::ErrorFrame(_) = frame.frame().message {
                if header.request_id == 0 {
                    return Err(server_error(&frame));
                }
            }
            backlog.push_back(frame);
        }
    }
}

/// TCP, then TLS and WebSocket as the endpoint asks. A plaintext endpoint off this
/// machine is refused first ([`check_plaintext`]).
async fn open_transport(endpoint: &Endpoint) -> Result<Transport, ClientError> {
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host(&endpoint.address).await?.collect();
    check_plaintext(endpoint, &addresses)?;
    let tcp = TcpStream::connect(&addresses[..]).await?;
    tcp.set_nodelay(true)?;
    let stream: Box<dyn Stream> = match &endpoint.tls {
        None => Box::new(tcp),
        Some(trust) => {
            let config = tls_config(trust)?;
            let host = endpoint.address.rsplit_once(':').map_or(&*endpoint.address, |h| h.0);
            let host = if host.parse::<std::net::IpAddr>().is_ok() { "localhost" } else { host };
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| ClientError::Config(format!("server name {host}: {e}")))?;
            let connector = tokio_rustls::TlsConnector::from(config);
            let tls = connector.connect(name, tcp).await.map_err(|e| {
                if e.to_string().contains("certificate") {
                    // A TLS server whose certificate is not trusted: say that, as is.
                    return ClientError::Io(e);
                }
                ClientError::Config(format!(
                    "TLS handshake with {} failed ({e}): if this port does not speak TLS, \
                         drop --tls or use ternd's TLS port (7443 by default)",
                    endpoint.address
                ))
            })?;
            Box::new(tls)
        }
    };
    if !endpoint.websocket {
        return Ok(Transport::Bytes(stream));
    }
    let scheme = if endpoint.tls.is_some() { "wss" } else { "ws" };
    let url = format!("{scheme}://{}/", endpoint.address);
    let (websocket, _) = tokio_tungstenite::client_async(url, stream).await.map_err(|e| {
        ClientError::Config(format!(
            "WebSocket upgrade at {} failed ({e}): if this port does not speak WebSocket, \
                 drop --websocket or use ternd's WebSocket port (7480, or 7481 with --tls)",
            endpoint.address
        ))
    })?;
    Ok(Transport::WebSocket(Box::new(websocket)))
}

impl Connection {
    /// Sends a frame; returns its request id.
    pub async fn send<T>(&mut self, value: &T) -> Result<u32, ClientError>
    where
        T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    {
        let id = self.next_request_id;
        self.next_request_id = self.next_request_id.wrapping_add(1).max(1);
        self.last_sent = Instant::now();
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, id, 0, value, self.max_frame_bytes).map_err(|e| match e {
            tern_wire::EncodeError::FrameTooLarge { frame_bytes, max_frame_bytes } => {
                ClientError::TooLong {
                    bytes: frame_bytes as usize,
                    max_bytes: max_frame_bytes as usize,
                }
            }
            other => ClientError::Protocol(format!("cannot encode {}: {other}", T::TYPE.name())),
        })?;
        match &mut self.transport {
            Transport::Bytes(stream) => {
                stream.write_all(&bytes).await?;
                stream.flush().await?;
            }
            Transport::WebSocket(websocket) => {
                use futures_util::SinkExt;
                let message = tokio_tungstenite::tungstenite::Message::Binary(bytes.into());
                websocket.send(message).await.map_err(websocket_error)?;
            }
        }
        Ok(id)
    }

    /// The next frame from the server.
    pub async fn next_frame(&mut self) -> Result<OwnedFrame, ClientError> {
        loop {
            if let Some(frame) = self
                .decoder
                .next_frame()
                .map_err(|e| ClientError::Protocol(format!("bad frame from the server: {e}")))?
            {
                let mut bytes = Vec::with_capacity(frame.header.frame_bytes());
                bytes.extend_from_slice(&frame.header.to_bytes());
                bytes.extend_from_slice(frame.payload);
                return Ok(OwnedFrame { bytes });
            }
            match &mut self.transport {
                Transport::Bytes(stream) => {
                    let n = stream.read(&mut self.buffer).await?;
                    if n == 0 {
                        return Err(ClientError::Disconnected);
                    }
                    if let Some(first) = self.first_bytes.as_mut() {
                        first.extend_from_slice(&self.buffer[..n.min(64)]);
                    }
                    self.decoder.feed(&self.buffer[..n]);
                }
                Transport::WebSocket(websocket) => {
                    use futures_util::StreamExt;
                    use tokio_tungstenite::tungstenite::Message as WsMessage;
                    match websocket.next().await {
                        Some(Ok(WsMessage::Binary(bytes))) => self.decoder.feed(&bytes),
                        Some(Ok(WsMessage::Close(_))) | None => {
                            return Err(ClientError::Disconnected)
                        }
                        Some(Ok(_)) => {} // Pings are answered by tungstenite.
                        Some(Err(error)) => return Err(websocket_error(error)),
                    }
                }
            }
        }
    }
}

/// The typed error of an `ErrorFrame` (or of an unexpected frame).
pub(crate) fn server_error(frame: &OwnedFrame) -> ClientError {
    let frame = frame.frame();
    match frame.message {
        Message::ErrorFrame(error) => ClientError::Server {
            code: ErrorCode::from_u16(error.code.to_native()).unwrap_or(ErrorCode::Internal),
            message: error.message.to_string(),
            retry_after_ms: error.retry_after_ms.to_native(),
        },
        other => ClientError::Protocol(format!("unexpected {}", other.message_type().name())),
    }
}

/// What a handshake that got no `Welcome` means, from the first bytes the port sent: a
/// TLS record, an HTTP answer, or nothing at all.
fn wrong_protocol(endpoint: &Endpoint, first: Option<Vec<u8>>, error: ClientError) -> ClientError {
    let first = first.unwrap_or_default();
    let address = &endpoint.address;
    let advice = if first.len() >= 2 && (first[0] == 0x15 || first[0] == 0x16) && first[1] == 3 {
        format!("{address} speaks TLS: add --tls (and --ca FILE for a development server)")
    } else if first.starts_with(b"HTTP/") {
        format!(
            "{address} answers HTTP: for ternd's WebSocket port add --websocket; the admin \
             port (7401) serves no clients; plain TCP is 7400 by default"
        )
    } else if endpoint.websocket || endpoint.tls.is_some() {
        return error;
    } else {
        format!(
            "{address} closed the handshake ({error}): is it ternd's plain TCP port? \
             (7400 by default; 7443 needs --tls, 7480 needs --websocket)"
        )
    };
    ClientError::Config(advice)
}

/// A plain port that hung up on the handshake may be a TLS port (a TLS server drops
/// a plaintext hello without a word): one TLS attempt tells, since it gets as far as
/// the certificate. Returns the better error.
async fn probe_tls(endpoint: &Endpoint, error: ClientError) -> ClientError {
    if endpoint.tls.is_some() || !matches!(error, ClientError::Config(_)) {
        return error;
    }
    let address = &endpoint.address;
    // A WebSocket upgrade tells a WebSocket port (it accepts) from another HTTP server
    // (it answers, but not with an upgrade).
    if let Ok(Ok(tcp)) = tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(address)).await {
        let upgrade = tokio_tungstenite::client_async(format!("ws://{address}/"), tcp);
        match tokio::time::timeout(PROBE_TIMEOUT, upgrade).await {
            Ok(Ok(_)) => {
                return ClientError::Config(format!("{address} speaks WebSocket: add --websocket"))
            }
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(_))) => {
                return ClientError::Config(format!(
                    "{address} answers HTTP: it is no client port (ternd's admin port is \
                     7401; clients use 7400, or 7443 with --tls, or 7480 with --websocket)"
                ))
            }
            _ => {}
        }
    }
    let probe = Endpoint { tls: Some(Trust::WebPki), ..endpoint.clone() };
    match tokio::time::timeout(PROBE_TIMEOUT, open_transport(&probe)).await {
        Ok(Ok(_) | Err(ClientError::Io(_))) => ClientError::Config(format!(
            "{address} speaks TLS: add --tls (and --ca FILE for a development server's \
             certificate)"
        )),
        _ => error,
    }
}

fn websocket_error(error: tokio_tungstenite::tungstenite::Error) -> ClientError {
    use tokio_tungstenite::tungstenite::Error;
    match error {
        Error::Io(error) => ClientError::Io(error),
        Error::ConnectionClosed | Error::AlreadyClosed => ClientError::Disconnected,
        other => ClientError::Protocol(format!("WebSocket: {other}")),
    }
}

fn tls_config(trust: &Trust) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = match trust {
        Trust::WebPki => {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            Vec::new()
        }
        Trust::Pinned(path) => std::fs::read(path)
            .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?,
        Trust::Certificate(pem) => pem.clone(),
    };
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| ClientError::Config(format!("pinned certificate: {e}")))?;
        roots.add(cert).map_err(|e| ClientError::Config(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plaintext rule: TLS, or the user's flag, or every resolved address on this
    /// machine. One address off it is enough to refuse.
    #[test]
    fn plaintext_goes_only_to_this_machine_unless_allowed() {
        let at = |a: &str| -> SocketAddr { a.parse().unwrap() };
        let plain = Endpoint::tcp("chat.example:7400");
        for loopback in [vec![at("127.0.0.1:7400")], vec![at("[::1]:7400"), at("127.0.0.2:1")]] {
            assert!(check_plaintext(&plain, &loopback).is_ok(), "{loopback:?}");
        }
        for outside in [
            vec![at("192.0.2.1:7400")],
            vec![at("127.0.0.1:7400"), at("[2001:db8::1]:7400")],
            vec![at("[::ffff:192.0.2.1]:7400")],
            vec![],
        ] {
            let refused = check_plaintext(&plain, &outside);
            assert!(matches!(refused, Err(ClientError::PlaintextRefused { .. })), "{outside:?}");
        }
        let outside = [at("192.0.2.1:7400")];
        let allowed = Endpoint { allow_plaintext: true, ..plain.clone() };
        assert!(check_plaintext(&allowed, &outside).is_ok());
        let tls = Endpoint { tls: Some(Trust::WebPki), ..plain };
        assert!(check_plaintext(&tls, &outside).is_ok());
    }

    #[test]
    fn an_endpoint_survives_its_encoding_and_refuses_other_bytes() {
        let endpoints = [
            Endpoint::tcp("127.0.0.1:7400"),
            Endpoint { websocket: true, allow_plaintext: true, ..Endpoint::tcp("h:1") },
            Endpoint { tls: Some(Trust::WebPki), ..Endpoint::tcp("chat.example:7443") },
            Endpoint { tls: Some(Trust::Certificate(b"PEM".to_vec())), ..Endpoint::tcp("h:2") },
        ];
        for endpoint in endpoints {
            let bytes = endpoint.encode();
            assert_eq!(Endpoint::decode(&bytes), Some(endpoint));
            assert_eq!(Endpoint::decode(&bytes[..bytes.len() - 1]), None);
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(Endpoint::decode(&longer), None);
        }
        assert_eq!(Endpoint::decode(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), None);
    }

    /// A plaintext endpoint off this machine is refused before any connection: nothing,
    /// not even the hello, leaves (192.0.2.1 is TEST-NET-1; before, the client dialled it).
    #[tokio::test(flavor = "current_thread")]
    async fn a_plaintext_connection_off_this_machine_is_refused_before_dialling() {
        let refused = Connection::open(&Endpoint::tcp("192.0.2.1:7400")).await;
        assert!(matches!(refused, Err(ClientError::PlaintextRefused { .. })), "{refused:?}");
    }
}
