//! One connection to `ternd`: TCP, or TLS 1.3 with rustls, optionally carrying
//! WebSocket (one binary message per frame, for networks that only pass HTTP), with
//! `tern-wire` frames and the handshake done.
//!
//! It only moves frames: [`Connection::send`] encodes one and writes it;
//! [`Connection::next_frame`] reads until a whole frame is there. Reading is
//! cancel-safe (bytes read go into the decoder before anything awaits again), so a
//! caller may race it against user input in `tokio::select!`.

use std::path::PathBuf;
use std::sync::Arc;

use tern_wire::messages::{Hello, Welcome};
use tern_wire::{
    decode_frame, encode_frame, Frame, FrameDecoder, Payload, WireSerializer,
    ABSOLUTE_MAX_FRAME_BYTES, DEFAULT_MAX_FRAME_BYTES, HELLO_MAGIC,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ClientError;

/// How to reach the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`.
    pub address: String,
    /// TLS, and whom to trust.
    pub tls: Option<Trust>,
    /// Frames as binary WebSocket messages (to `ternd`'s WebSocket listener).
    pub websocket: bool,
}

/// Which certificates a TLS connection accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// The public web PKI (Mozilla's roots).
    WebPki,
    /// Exactly this certificate (PEM file): for a development server's self-signed one.
    Pinned(PathBuf),
}

impl Endpoint {
    /// Plain TCP to `address`.
    pub fn tcp(address: impl Into<String>) -> Endpoint {
        Endpoint { address: address.into(), tls: None, websocket: false }
    }
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

/// An open, handshaken connection.
pub struct Connection {
    transport: Transport,
    decoder: FrameDecoder,
    max_frame_bytes: u32,
    next_request_id: u32,
    buffer: Vec<u8>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("next_request_id", &self.next_request_id).finish()
    }
}

impl Connection {
    /// Connects and performs the protocol handshake.
    pub async fn open(endpoint: &Endpoint) -> Result<Connection, ClientError> {
        let tcp = TcpStream::connect(&endpoint.address).await?;
        tcp.set_nodelay(true)?;
        let stream: Box<dyn Stream> = match &endpoint.tls {
            None => Box::new(tcp),
            Some(trust) => {
                let config = tls_config(trust)?;
                let host = endpoint.address.rsplit_once(':').map_or(&*endpoint.address, |h| h.0);
                let host =
                    if host.parse::<std::net::IpAddr>().is_ok() { "localhost" } else { host };
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| ClientError::Config(format!("server name {host}: {e}")))?;
                let connector = tokio_rustls::TlsConnector::from(config);
                Box::new(connector.connect(name, tcp).await?)
            }
        };
        let transport = if endpoint.websocket {
            let scheme = if endpoint.tls.is_some() { "wss" } else { "ws" };
            let url = format!("{scheme}://{}/", endpoint.address);
            let (websocket, _) = tokio_tungstenite::client_async(url, stream)
                .await
                .map_err(|e| ClientError::Protocol(format!("WebSocket upgrade: {e}")))?;
            Transport::WebSocket(Box::new(websocket))
        } else {
            Transport::Bytes(stream)
        };
        let mut connection = Connection {
            transport,
            decoder: FrameDecoder::new(ABSOLUTE_MAX_FRAME_BYTES),
            max_frame_bytes: tern_wire::HANDSHAKE_MAX_FRAME_BYTES,
            next_request_id: 1,
            buffer: vec![0u8; 64 * 1024],
        };
        let hello = Hello {
            magic: HELLO_MAGIC,
            version_min: 1,
            version_max: 1,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            client: concat!("tern-client/", env!("CARGO_PKG_VERSION")).into(),
        };
        let id = connection.send(&hello).await?;
        let reply = connection.next_frame().await?;
        let frame = reply.frame();
        match frame.message {
            tern_wire::Message::Welcome(welcome) if frame.header.request_id == id => {
                connection.max_frame_bytes = welcome.max_frame_bytes.to_native();
                let _: &<Welcome as rkyv::Archive>::Archived = welcome;
                Ok(connection)
            }
            _ => Err(crate::client::server_error(&reply)),
        }
    }

    /// Sends a frame; returns its request id.
    pub async fn send<T>(&mut self, value: &T) -> Result<u32, ClientError>
    where
        T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    {
        let id = self.next_request_id;
        self.next_request_id = self.next_request_id.wrapping_add(1).max(1);
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, id, 0, value, self.max_frame_bytes)
            .map_err(|e| ClientError::Protocol(format!("cannot encode {}: {e}", T::TYPE.name())))?;
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
    match trust {
        Trust::WebPki => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Trust::Pinned(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert =
                    cert.map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
                roots.add(cert).map_err(|e| ClientError::Config(e.to_string()))?;
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
