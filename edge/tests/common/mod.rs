//! A real `ternd` on a loopback port with a temporary data directory, and a small
//! synchronous client on top of `tern-wire` (the SDK comes later).

#![allow(dead_code)] // Each test binary uses a different subset.

use std::io::{Read, Write};

use ring::signature::KeyPair as _;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use rkyv::rancor::Failure;
use tern_wire::messages::*;
use tern_wire::*;

pub use tern_testkit::{Server, TIMEOUT};

/// A decoded frame, owned.
#[derive(Debug, Clone)]
pub struct Received {
    pub header: FrameHeader,
    pub payload: Vec<u8>,
}

impl Received {
    pub fn access<T: Payload>(&self) -> &T::Archived
    where
        T::Archived:
            for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, Failure>>,
    {
        assert_eq!(self.header.message_type, T::TYPE, "unexpected frame: {:?}", self.describe());
        access::<T>(&self.payload).unwrap()
    }

    pub fn deliver(&self) -> Deliver<'_> {
        match Message::validate(self.header.message_type, &self.payload).unwrap() {
            Message::Deliver(d) => d,
            other => panic!("expected Deliver, got {other:?}"),
        }
    }

    pub fn describe(&self) -> String {
        match Message::validate(self.header.message_type, &self.payload) {
            Ok(Message::ErrorFrame(e)) => format!(
                "ErrorFrame {:?}: {}",
                ErrorCode::from_u16(e.code.to_native()),
                e.message.as_str()
            ),
            Ok(m) => format!("{:?}", m.message_type()),
            Err(e) => format!("undecodable: {e}"),
        }
    }

    /// The receipt a `Deliver` frame carries (panics on any other frame).
    pub fn receipt(&self) -> ReceiptBody {
        let deliver = self.deliver();
        assert_eq!(deliver.envelope.kind, ArchivedEnvelopeKind::Receipt, "{}", self.describe());
        let EnvelopeContent::Receipt(body) = deliver.envelope.content().unwrap() else {
            panic!("not a receipt")
        };
        rkyv::deserialize::<ReceiptBody, Failure>(body).unwrap()
    }

    pub fn error_code(&self) -> Option<ErrorCode> {
        match Message::validate(self.header.message_type, &self.payload) {
            Ok(Message::ErrorFrame(e)) => ErrorCode::from_u16(e.code.to_native()),
            Ok(Message::SendError(e)) => ErrorCode::from_u16(e.code.to_native()),
            _ => None,
        }
    }
}

/// A byte stream: plain TCP or TLS over it.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A blocking test client.
pub struct Client {
    stream: Box<dyn Stream>,
    tcp: TcpStream,
    decoder: FrameDecoder,
    next_request_id: u32,
    /// Frames received while waiting for something else.
    pub inbox: Vec<Received>,
}

impl Client {
    /// Connects and performs the handshake.
    pub fn connect(addr: SocketAddr) -> Client {
        let mut client = Client::connect_raw(addr);
        client.handshake();
        client
    }

    /// The types of the frames read but not yet taken.
    pub fn inbox_types(&self) -> Vec<MessageType> {
        self.inbox.iter().map(|r| r.header.message_type).collect()
    }

    /// Connects from the loopback address `source` (127.0.0.2, ...) and performs the
    /// handshake: another client address for per-address limits.
    pub fn connect_from(addr: SocketAddr, source: std::net::Ipv4Addr) -> Client {
        let mut client = Client::connect_raw_from(addr, source);
        client.handshake();
        client
    }

    /// Connects from the loopback address `source` without a handshake.
    pub fn connect_raw_from(addr: SocketAddr, source: std::net::Ipv4Addr) -> Client {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::from((source, 0)).into()).unwrap();
        socket.connect(&addr.into()).expect("connect to ternd");
        let tcp: TcpStream = socket.into();
        tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
        tcp.set_nodelay(true).unwrap();
        let stream = Box::new(tcp.try_clone().unwrap());
        Client::over(stream, tcp)
    }

    /// Connects without a handshake.
    pub fn connect_raw(addr: SocketAddr) -> Client {
        let tcp = TcpStream::connect(addr).expect("connect to ternd");
        tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
        tcp.set_nodelay(true).unwrap();
        let stream = Box::new(tcp.try_clone().unwrap());
        Client::over(stream, tcp)
    }

    fn over(stream: Box<dyn Stream>, tcp: TcpStream) -> Client {
        let decoder = FrameDecoder::new(ABSOLUTE_MAX_FRAME_BYTES);
        Client { stream, tcp, decoder, next_request_id: 1, inbox: Vec::new() }
    }

    /// Connects over TLS (pinning the server's development certificate) and performs
    /// the protocol handshake.
    pub fn connect_tls(server: &Server) -> Client {
        let mut client = Client::connect_tls_raw(server);
        client.handshake();
        client
    }

    /// Connects over TLS 1.3 (pinning the server's development certificate) without the
    /// protocol handshake; the TLS handshake runs on the first read or write.
    pub fn connect_tls_raw(server: &Server) -> Client {
        let config = tls_client_config(server, &[&rustls::version::TLS13]);
        let tcp = TcpStream::connect(server.tls_addr).expect("connect to ternd (tls)");
        tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = rustls::ClientConnection::new(config, name).unwrap();
        let stream = Box::new(rustls::StreamOwned::new(tls, tcp.try_clone().unwrap()));
        Client::over(stream, tcp)
    }

    /// Connects over TLS to `addr` with a given client configuration (for example one
    /// that pins an operator's certificate) and performs the protocol handshake.
    pub fn connect_tls_with(
        addr: SocketAddr,
        config: std::sync::Arc<rustls::ClientConfig>,
    ) -> Client {
        let tcp = TcpStream::connect(addr).expect("connect to ternd (tls)");
        tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = rustls::ClientConnection::new(config, name).unwrap();
        let stream = Box::new(rustls::StreamOwned::new(tls, tcp.try_clone().unwrap()));
        let mut client = Client::over(stream, tcp);
        client.handshake();
        client
    }

    /// Connects over WebSocket (optionally over TLS) and performs the protocol handshake.
    pub fn connect_ws(server: &Server, tls: bool) -> Client {
        let addr = if tls { server.wss_addr } else { server.ws_addr };
        let config = tls.then(|| tls_client_config(server, &[&rustls::version::TLS13]));
        Client::connect_ws_with(addr, config)
    }

    /// Connects over WebSocket to `addr`, over TLS with `tls` if given, and performs the
    /// protocol handshake.
    pub fn connect_ws_with(
        addr: SocketAddr,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Client {
        let tcp = TcpStream::connect(addr).expect("connect to ternd (websocket)");
        tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        let inner: Box<dyn Stream> = match tls {
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let connection = rustls::ClientConnection::new(config, name).unwrap();
                Box::new(rustls::StreamOwned::new(connection, tcp.try_clone().unwrap()))
            }
            None => Box::new(tcp.try_clone().unwrap()),
        };
        let url = format!("{scheme}://localhost/");
        let (socket, _) = tungstenite::client(url, inner).expect("websocket upgrade");
        let stream = Box::new(WsStream { socket, pending: Vec::new(), at: 0 });
        let mut client = Client::over(stream, tcp);
        client.handshake();
        client
    }

    pub fn handshake(&mut self) {
        let hello = Hello {
            magic: HELLO_MAGIC,
            version_min: 1,
            version_max: 1,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            client: "tern-test".into(),
        };
        let welcome = self.request(&hello);
        assert_eq!(welcome.access::<Welcome>().version, 1);
    }

    /// Another handle on the socket (for a thread that writes while the test reads, or
    /// to shut it down).
    pub fn tcp(&self) -> TcpStream {
        self.tcp.try_clone().unwrap()
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends a request and returns its id.
    pub fn send<T>(&mut self, value: &T) -> u32
    where
        T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    {
        let id = self.next_request_id;
        self.next_request_id += 1;
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, id, 0, value, DEFAULT_MAX_FRAME_BYTES).unwrap();
        self.send_raw(&bytes);
        id
    }

    /// Reads the next frame from the socket.
    pub fn read_frame(&mut self) -> Option<Received> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => {
                    return Some(Received { header: frame.header, payload: frame.payload.to_vec() })
                }
                Ok(None) => {}
                Err(e) => panic!("server sent an undecodable frame: {e}"),
            }
            let mut buf = [0u8; 65536];
            match self.stream.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.decoder.feed(&buf[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    panic!(
                        "timed out waiting for a frame; inbox: {:?}",
                        self.inbox.iter().map(|r| r.describe()).collect::<Vec<_>>()
                    )
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits for the response to request `id`, keeping other frames in the inbox.
    pub fn response(&mut self, id: u32) -> Received {
        if let Some(i) =
            self.inbox.iter().position(|r| r.header.request_id == id && r.header.is_response())
        {
            return self.inbox.remove(i);
        }
        loop {
            let frame = self.read_frame().expect("connection closed while waiting for a response");
            if frame.header.request_id == id && frame.header.is_response() {
                return frame;
            }
            self.inbox.push(frame);
        }
    }

    /// Sends a request and waits for its response.
    pub fn request<T>(&mut self, value: &T) -> Received
    where
        T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    {
        let id = self.send(value);
        self.response(id)
    }

    /// Waits for the next unsolicited frame of a type.
    pub fn next_of(&mut self, ty: MessageType) -> Received {
        if let Some(i) = self.inbox.iter().position(|r| r.header.message_type == ty) {
            return self.inbox.remove(i);
        }
        loop {
            let frame = self.read_frame().expect("connection closed while waiting");
            if frame.header.message_type == ty {
                return frame;
            }
            self.inbox.push(frame);
        }
    }

    /// Whether the server closed the connection (reads until EOF or timeout).
    pub fn is_closed(&mut self) -> bool {
        self.tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

/// Test key material (real keys come with the SDK; the server does not look inside the
/// public keys, but it checks that each prekey is signed by the device's signing key).
pub fn keys(one_time: u64) -> DeviceKeys {
    keys_signed_by(&test_signer(), one_time)
}

/// Test key material signed by `signer` (a test that signs group changes keeps it).
pub fn keys_signed_by(signer: &ring::signature::Ed25519KeyPair, one_time: u64) -> DeviceKeys {
    let key = |id: u64| sign_prekey(signer, id, [id as u8; 32]);
    DeviceKeys {
        identity_key: [1; 32],
        signing_key: signer.public_key().as_ref().try_into().unwrap(),
        fallback_key: key(1_000),
        one_time_keys: (1..=one_time).map(key).collect(),
    }
}

/// A fresh Ed25519 device signing key.
pub fn test_signer() -> ring::signature::Ed25519KeyPair {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

/// A prekey signed as clients sign them: over `key_id (LE) ‖ public key`.
pub fn sign_prekey(
    signer: &ring::signature::Ed25519KeyPair,
    key_id: u64,
    public_key: [u8; 32],
) -> SignedPrekey {
    let signed = SignedPrekey::signed_bytes(key_id, &public_key);
    let signature = signer.sign(&signed).as_ref().try_into().unwrap();
    SignedPrekey { key_id, public_key, signature }
}

/// A registered device and its credentials.
#[derive(Clone, Copy, Debug)]
pub struct Account {
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub token: Token,
}

/// Registers `phone` through the protocol, reading the code from the server log.
pub fn register(server: &mut Server, phone: &str, one_time_keys: u64) -> Account {
    register_with_keys(server, phone, keys(one_time_keys))
}

/// Registers `phone` with a signing key the test keeps (for group changes).
pub fn register_signing(
    server: &mut Server,
    phone: &str,
) -> (Account, ring::signature::Ed25519KeyPair) {
    let signer = test_signer();
    let account = register_with_keys(server, phone, keys_signed_by(&signer, 0));
    (account, signer)
}

/// Registers `phone` with the given keys.
pub fn register_with_keys(server: &mut Server, phone: &str, keys: DeviceKeys) -> Account {
    let mut client = Client::connect(server.addr);
    let sent = client.request(&RequestCode {
        phone: phone.into(),
        channel: CodeChannel::Sms,
        locale: "en".into(),
        proof_of_work: None,
    });
    sent.access::<CodeSent>();
    let code = server.code_for(phone);
    let registered = client.request(&Verify {
        phone: phone.into(),
        code,
        device: NewDevice { name: "test phone".into(), keys },
        registration_lock_pin: None,
    });
    let r = registered.access::<Registered>();
    Account { user_id: r.user_id.to_native(), device_id: r.device_id.to_native(), token: r.token }
}

/// Connects and authenticates as `account`.
pub fn login(server: &Server, account: Account) -> Client {
    authenticate(Client::connect(server.addr), account)
}

/// Authenticates a connected client as `account`.
pub fn authenticate(mut client: Client, account: Account) -> Client {
    let ok = client.request(&Auth {
        user_id: account.user_id,
        device_id: account.device_id,
        token: account.token,
    });
    assert_eq!(ok.access::<AuthOk>().user_id.to_native(), account.user_id, "{}", ok.describe());
    client
}

/// A text message from `from` to `to`'s device 1.
pub fn text(to: Account, client_message_id: u64, body: &[u8]) -> SendMessage {
    SendMessage {
        client_message_id,
        to: Conversation::User(to.user_id),
        kind: EnvelopeKind::Text,
        ttl_s: 0,
        copies: vec![DeviceCopy {
            user_id: to.user_id,
            device_id: to.device_id,
            e2e_type: E2eType::OlmMessage,
            ciphertext: body.to_vec(),
        }],
    }
}

/// Links a new device to the account `primary` is logged in as; returns its account.
pub fn link(server: &Server, primary: &mut Client, user_id: UserId) -> Account {
    let mut new = Client::connect(server.addr);
    let device = NewDevice { name: "laptop".into(), keys: keys(5) };
    let asked = new.send(&LinkRequest { device });
    let code = new.next_of(MessageType::LinkCode);
    let code = code.access::<LinkCode>().code.to_string();
    assert_eq!(code.len(), 9);
    primary.request(&LinkApprove { code }).access::<Done>();
    let registered = new.response(asked);
    let registered = registered.access::<Registered>();
    assert_eq!(registered.user_id.to_native(), user_id);
    assert!(!registered.new_account);
    Account { user_id, device_id: registered.device_id.to_native(), token: registered.token }
}

/// A temp data dir on the target file system.
pub fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// A TLS client configuration that trusts only the server's development certificate.
pub fn tls_client_config(
    server: &Server,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::sync::Arc<rustls::ClientConfig> {
    let pem = std::fs::read(server.data_dir.join("tls").join("dev-cert.pem")).expect("dev cert");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    std::sync::Arc::new(config)
}

/// Logs in over TLS.
pub fn login_tls(server: &Server, account: Account) -> Client {
    authenticate(Client::connect_tls(server), account)
}

/// A WebSocket seen as a byte stream: each write is one binary message (the client
/// writes one frame at a time); reads return the bytes of binary messages in order.
pub struct WsStream {
    socket: tungstenite::WebSocket<Box<dyn Stream>>,
    pending: Vec<u8>,
    at: usize,
}

impl Read for WsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.pending.len() {
            match self.socket.read() {
                Ok(tungstenite::Message::Binary(data)) => {
                    self.pending = data.to_vec();
                    self.at = 0;
                }
                Ok(tungstenite::Message::Close(_)) => return Ok(0),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) => return Err(e),
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Ok(0)
                }
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
        }
        let n = buf.len().min(self.pending.len() - self.at);
        buf[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Write for WsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.socket
            .send(tungstenite::Message::Binary(buf.to_vec().into()))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.socket.flush().map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// A text message to a group: one Megolm ciphertext for every member.
pub fn group_text(group_id: GroupId, client_message_id: u64, body: &[u8]) -> SendMessage {
    SendMessage {
        client_message_id,
        to: Conversation::Group(group_id),
        kind: EnvelopeKind::Text,
        ttl_s: 0,
        copies: vec![DeviceCopy {
            user_id: 0,
            device_id: 0,
            e2e_type: E2eType::Megolm,
            ciphertext: body.to_vec(),
        }],
    }
}

/// A group change signed as a client signs it (over `GroupChangeSigned`).
pub fn signed_update(
    signer: &ring::signature::Ed25519KeyPair,
    actor: Account,
    group_id: GroupId,
    base_epoch: u64,
    change: GroupChange,
) -> GroupUpdate {
    let signer_id = (actor.user_id, actor.device_id);
    let bytes = GroupChangeSigned::bytes(group_id, base_epoch, signer_id, &change).unwrap();
    let signature = signer.sign(&bytes).as_ref().try_into().unwrap();
    GroupUpdate { group_id, base_epoch, change, signature }
}
