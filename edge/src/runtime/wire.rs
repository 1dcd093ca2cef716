//! The byte transport under the frames: the socket itself, or TLS and/or WebSocket
//! layered on it (rustls, and tungstenite over an in-memory duplex). Inbound: socket →
//! TLS → WebSocket → frames. Outbound: frames → WebSocket → TLS → socket. Plain data
//! and synchronous calls: the connection task moves the bytes.

use std::io;
use std::sync::Arc;

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, InsufficientSizeError, UnbufferedStatus};

use crate::websocket::WsLayer;

/// Output a layer (TLS, WebSocket) holds for the socket before it takes more of the
/// core's: past it the frames wait in the core, whose output bound then applies.
pub const LAYERED_BYTES_MAX: usize = 256 * 1024;

/// The byte transport under the frames: the socket itself, or TLS and/or WebSocket
/// layered on it. Inbound: socket → TLS → WebSocket → frames. Outbound: frames →
/// WebSocket → TLS → socket.
pub struct Wire {
    pub(super) tls: Option<Box<TlsLayer>>,
    pub(super) ws: Option<WsLayer>,
    /// WebSocket output waiting for TLS to take it (only with both layers).
    pub(super) layered: Vec<u8>,
    /// Bytes ready for the socket (with any layer; plain TCP writes `outbound` itself).
    pub(super) out: Vec<u8>,
    /// Scratch for the bytes between layers.
    pub(super) inner: Vec<u8>,
    /// A layer failed (a TLS error): its handshake will never complete.
    pub(super) failed: bool,
}

/// Which layers a listener puts on its connections.
#[derive(Clone, Copy)]
pub struct Layers {
    /// TLS, with the core's configuration at accept time (`Ctx::tls`).
    pub tls: bool,
    /// WebSocket binary messages.
    pub websocket: bool,
}

impl Wire {
    pub fn new(
        tls: Option<Arc<rustls::ServerConfig>>,
        websocket: bool,
        max_frame_bytes: u32,
    ) -> io::Result<Wire> {
        let tls = match tls {
            Some(config) => Some(Box::new(TlsLayer::new(config)?)),
            None => None,
        };
        let ws = websocket.then(|| WsLayer::new(max_frame_bytes as usize));
        Ok(Wire { tls, ws, layered: Vec::new(), out: Vec::new(), inner: Vec::new(), failed: false })
    }

    pub fn is_layered(&self) -> bool {
        self.tls.is_some() || self.ws.is_some()
    }

    /// Whether a layer's handshake (TLS, the WebSocket upgrade) is still in progress:
    /// what the core says waits in the layer until it completes.
    pub fn is_handshaking(&self) -> bool {
        !self.failed
            && (self.tls.as_ref().is_some_and(|tls| tls.handshaking)
                || self.ws.as_ref().is_some_and(|ws| ws.is_handshaking()))
    }

    /// Bytes from the socket; returns the frame bytes they carry.
    pub fn received<'a>(
        &'a mut self,
        bytes: &'a [u8],
        frames: &'a mut Vec<u8>,
    ) -> io::Result<&'a [u8]> {
        if !self.is_layered() {
            return Ok(bytes);
        }
        frames.clear();
        let after_tls: &[u8] = match &mut self.tls {
            None => bytes,
            Some(tls) => {
                self.inner.clear();
                tls.received(bytes, &mut self.inner, &mut self.out)?;
                &self.inner
            }
        };
        match &mut self.ws {
            None => frames.extend_from_slice(after_tls),
            Some(ws) => ws.received(after_tls, frames)?,
        }
        Ok(frames)
    }

    /// Bytes the layers hold: encrypted or framed, waiting for the socket.
    pub fn held_bytes(&self) -> usize {
        self.out.len() + self.layered.len()
    }

    /// Moves frames from `outbound` down the layers into `out` (as much as TLS takes);
    /// returns how many bytes of `outbound` were taken.
    pub fn prepare_output(&mut self, outbound: &[u8]) -> io::Result<usize> {
        let (taken, for_tls) = match (&mut self.ws, self.tls.is_some()) {
            (Some(ws), true) => (ws.send(outbound, &mut self.layered)?, None),
            (Some(ws), false) => return ws.send(outbound, &mut self.out),
            (None, _) => (0, Some(outbound)),
        };
        let Some(tls) = &mut self.tls else { return Ok(taken) };
        match for_tls {
            Some(outbound) => tls.encrypt(outbound, &mut self.out),
            None => {
                let n = tls.encrypt(&self.layered, &mut self.out)?;
                self.layered.drain(..n);
                Ok(taken)
            }
        }
    }
}

/// Plaintext encrypted at once, at most: what the socket's output holds stays near
/// [`LAYERED_BYTES_MAX`].
const ENCRYPT_BYTES_MAX: usize = 64 * 1024;

/// TLS on rustls's unbuffered API. The wire holds the received bytes itself, and only
/// while a record is incomplete: rustls's buffered connection keeps a 4 KiB receive
/// buffer for the connection's whole life, which was 40 % of an idle TLS connection's
/// memory (`docs/BENCHMARKS.md`, "Memory per account and per connection").
pub struct TlsLayer {
    conn: UnbufferedServerConnection,
    /// Bytes received and not yet processed: the start of an incomplete record.
    incoming: Vec<u8>,
    /// The handshake is not done: application data cannot go out yet.
    handshaking: bool,
}

/// What one step of processing decided.
enum Step {
    /// Ask rustls again.
    Again,
    /// Nothing more to do until more bytes come (or, for output, a plaintext was taken).
    Done(usize),
}

impl TlsLayer {
    fn new(config: Arc<rustls::ServerConfig>) -> io::Result<TlsLayer> {
        let conn = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
        Ok(TlsLayer { conn, incoming: Vec::new(), handshaking: true })
    }

    /// Bytes from the socket: their application data goes to `plaintext`, and whatever
    /// rustls answers (handshake records, alerts, tickets) to `out`. On an error the
    /// alert is in `out` too.
    fn received(
        &mut self,
        bytes: &[u8],
        plaintext: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        self.incoming.extend_from_slice(bytes);
        let result = loop {
            match self.step(Some(plaintext), &[], out) {
                Ok(Step::Again) => {}
                Ok(Step::Done(_)) => break Ok(()),
                Err(error) => break Err(error),
            }
        };
        if self.incoming.is_empty() {
            self.incoming = Vec::new(); // An idle connection keeps no receive buffer.
        }
        result
    }

    /// Encrypts the start of `plaintext` into `out` once the handshake allows it;
    /// returns how many bytes it took.
    fn encrypt(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> io::Result<usize> {
        if plaintext.is_empty() {
            return Ok(0);
        }
        loop {
            if let Step::Done(taken) = self.step(None, plaintext, out)? {
                return Ok(taken);
            }
        }
    }

    /// One call into rustls and the handling of the state it reports. Reading
    /// (`plaintext` given) processes `incoming`; writing passes no input and encrypts
    /// the start of `outbound` when rustls may send application data.
    fn step(
        &mut self,
        plaintext: Option<&mut Vec<u8>>,
        outbound: &[u8],
        out: &mut Vec<u8>,
    ) -> io::Result<Step> {
        let reading = plaintext.is_some();
        let input: &mut [u8] = if reading { &mut self.incoming } else { &mut [] };
        let UnbufferedStatus { discard, state } = self.conn.process_tls_records(input);
        let step = match state {
            Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                self.handshaking = false;
                // Writing: nothing is left unread, as reading takes every record.
                let Some(plaintext) = plaintext else { return Ok(Step::Done(0)) };
                while let Some(record) = traffic.next_record() {
                    plaintext.extend_from_slice(record.map_err(invalid_data)?.payload);
                }
                Ok(Step::Again)
            }
            Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                append(out, 1024, |buffer| encode.encode(buffer).map_err(EncodeFailed::from))?;
                Ok(Step::Again)
            }
            Ok(ConnectionState::TransmitTlsData(transmit)) => {
                transmit.done(); // The records are in `out`, for the socket.
                Ok(Step::Again)
            }
            Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                self.handshaking = false;
                let taken = if reading { 0 } else { outbound.len().min(ENCRYPT_BYTES_MAX) };
                if taken > 0 {
                    let chunk = &outbound[..taken];
                    // A record per 16 KiB of plaintext, each with its header and tag.
                    let room = taken + taken.div_ceil(16 * 1024) * 32;
                    append(out, room, |buffer| {
                        traffic.encrypt(chunk, buffer).map_err(EncodeFailed::from)
                    })?;
                }
                Ok(Step::Done(taken))
            }
            // Waiting for the peer, or it closed (the socket's end follows).
            Ok(_) => Ok(Step::Done(0)),
            Err(error) => Err(error),
        };
        if reading {
            self.incoming.drain(..discard);
        }
        step.map_err(|error| {
            self.queue_alerts(out);
            invalid_data(error)
        })
    }

    /// After an error: the alert rustls queued goes to `out`.
    fn queue_alerts(&mut self, out: &mut Vec<u8>) {
        loop {
            match self.conn.process_tls_records(&mut []).state {
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    let encoded = append(out, 1024, |buffer| {
                        encode.encode(buffer).map_err(EncodeFailed::from)
                    });
                    if encoded.is_err() {
                        return;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                _ => return,
            }
        }
    }
}

/// rustls's "the buffer is too small" (with the size it needs), or another failure.
enum EncodeFailed {
    TooSmall(usize),
    Other(String),
}

impl From<rustls::unbuffered::EncodeError> for EncodeFailed {
    fn from(error: rustls::unbuffered::EncodeError) -> EncodeFailed {
        match error {
            rustls::unbuffered::EncodeError::InsufficientSize(InsufficientSizeError {
                required_size,
            }) => EncodeFailed::TooSmall(required_size),
            other => EncodeFailed::Other(other.to_string()),
        }
    }
}

impl From<rustls::unbuffered::EncryptError> for EncodeFailed {
    fn from(error: rustls::unbuffered::EncryptError) -> EncodeFailed {
        match error {
            rustls::unbuffered::EncryptError::InsufficientSize(InsufficientSizeError {
                required_size,
            }) => EncodeFailed::TooSmall(required_size),
            other => EncodeFailed::Other(other.to_string()),
        }
    }
}

/// Appends what `write` writes to `out`, growing it to the size rustls asks for.
fn append(
    out: &mut Vec<u8>,
    room_hint: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, EncodeFailed>,
) -> io::Result<()> {
    let start = out.len();
    let mut room = room_hint;
    loop {
        out.resize(start + room, 0);
        match write(&mut out[start..]) {
            Ok(written) => {
                out.truncate(start + written);
                return Ok(());
            }
            Err(EncodeFailed::TooSmall(required)) if required > room => room = required,
            Err(EncodeFailed::TooSmall(required)) => {
                out.truncate(start);
                let error = format!("TLS asked for {required} bytes after {room}");
                return Err(io::Error::other(error));
            }
            Err(EncodeFailed::Other(error)) => {
                out.truncate(start);
                return Err(io::Error::other(format!("TLS could not encode a record: {error}")));
            }
        }
    }
}

fn invalid_data(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}
