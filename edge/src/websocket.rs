//! WebSocket as a layer over the byte stream (tungstenite), for browsers and proxies.
//!
//! One binary WebSocket message carries exactly one protocol frame, both ways; a text
//! message is a protocol error. tungstenite is blocking-style, so it runs over an
//! in-memory [`Duplex`]: the driver puts received bytes in, tungstenite takes them
//! out (or reports `WouldBlock` when it needs more), and what it writes collects in
//! the duplex's output for the driver to send. No socket is touched here.

use std::io::{self, Read, Write};

use tern_wire::HEADER_BYTES;
use tungstenite::handshake::server::{NoCallback, ServerHandshake};
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

/// The in-memory stream tungstenite reads from and writes to.
#[derive(Debug, Default)]
pub struct Duplex {
    input: Vec<u8>,
    read_at: usize,
    output: Vec<u8>,
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.read_at == self.input.len() {
            self.input.clear();
            self.read_at = 0;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.input.len() - self.read_at);
        buf[..n].copy_from_slice(&self.input[self.read_at..self.read_at + n]);
        self.read_at += n;
        Ok(n)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum State {
    Handshaking(Box<MidHandshake<ServerHandshake<Duplex, NoCallback>>>),
    Open(Box<WebSocket<Duplex>>),
    Failed,
}

/// The WebSocket layer of one connection.
pub struct WsLayer {
    state: State,
}

impl std::fmt::Debug for WsLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            State::Handshaking(_) => "handshaking",
            State::Open(_) => "open",
            State::Failed => "failed",
        };
        f.debug_struct("WsLayer").field("state", &state).finish()
    }
}

/// A binary message larger than the frame limit: the driver answers it with the
/// protocol's typed `FrameTooLarge` error (like a frame header over the limit on a bare
/// stream), not a silent close. Carried inside the `io::Error` of [`WsLayer::received`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageTooLarge {
    /// The message's size in bytes, as far as tungstenite counted it.
    pub bytes: u64,
    /// The limit.
    pub max_bytes: u64,
}

impl std::fmt::Display for MessageTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "websocket message of {} bytes exceeds {}", self.bytes, self.max_bytes)
    }
}

impl std::error::Error for MessageTooLarge {}

impl MessageTooLarge {
    /// The message-size error inside `error`, if that is what it is.
    pub fn of(error: &io::Error) -> Option<MessageTooLarge> {
        error.get_ref()?.downcast_ref::<MessageTooLarge>().copied()
    }
}

fn protocol_error(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

impl WsLayer {
    /// A layer waiting for the HTTP upgrade request; messages are limited to
    /// `max_message_bytes` (the protocol's frame limit).
    pub fn new(max_message_bytes: usize) -> WsLayer {
        let config = WebSocketConfig::default()
            .max_message_size(Some(max_message_bytes))
            .max_frame_size(Some(max_message_bytes));
        match tungstenite::accept_with_config(Duplex::default(), Some(config)) {
            Err(HandshakeError::Interrupted(mid)) => {
                WsLayer { state: State::Handshaking(Box::new(mid)) }
            }
            Ok(socket) => WsLayer { state: State::Open(Box::new(socket)) },
            Err(HandshakeError::Failure(_)) => WsLayer { state: State::Failed },
        }
    }

    /// Whether the HTTP upgrade is still to come (nothing can be sent before it).
    pub fn is_handshaking(&self) -> bool {
        matches!(self.state, State::Handshaking(_))
    }

    /// Bytes from below; appends the protocol frames they complete to `frames`.
    pub fn received(&mut self, bytes: &[u8], frames: &mut Vec<u8>) -> io::Result<()> {
        match &mut self.state {
            State::Handshaking(mid) => mid.get_mut().get_mut().input.extend_from_slice(bytes),
            State::Open(socket) => socket.get_mut().input.extend_from_slice(bytes),
            State::Failed => return Err(protocol_error("websocket failed")),
        }
        if let State::Handshaking(_) = self.state {
            let State::Handshaking(mid) = std::mem::replace(&mut self.state, State::Failed) else {
                unreachable!()
            };
            match (*mid).handshake() {
                Ok(socket) => self.state = State::Open(Box::new(socket)),
                Err(HandshakeError::Interrupted(mid)) => {
                    self.state = State::Handshaking(Box::new(mid));
                    return Ok(());
                }
                Err(HandshakeError::Failure(error)) => {
                    return Err(protocol_error(format!("websocket upgrade: {error}")))
                }
            }
        }
        let State::Open(socket) = &mut self.state else { return Ok(()) };
        loop {
            match socket.read() {
                Ok(Message::Binary(data)) => frames.extend_from_slice(&data),
                Ok(Message::Text(_)) => {
                    return Err(protocol_error("text websocket messages are not allowed"))
                }
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Ok(Message::Close(_)) => return Err(protocol_error("websocket closed by peer")),
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(())
                }
                Err(tungstenite::Error::Capacity(
                    tungstenite::error::CapacityError::MessageTooLong { size, max_size },
                )) => {
                    let too_large =
                        MessageTooLarge { bytes: size as u64, max_bytes: max_size as u64 };
                    return Err(io::Error::new(io::ErrorKind::InvalidData, too_large));
                }
                Err(error) => return Err(protocol_error(format!("websocket: {error}"))),
            }
        }
    }

    /// Wraps each complete protocol frame of `outbound` in one binary message (frames
    /// are moved out of `outbound`), then moves the encoded bytes to `out`.
    pub fn send(&mut self, outbound: &[u8], out: &mut Vec<u8>) -> io::Result<usize> {
        match &mut self.state {
            State::Handshaking(mid) => {
                // The upgrade response, if written; frames wait for the handshake.
                out.append(&mut mid.get_mut().get_mut().output);
                Ok(0)
            }
            State::Open(socket) => {
                let mut consumed = 0;
                while let Some(header) = outbound.get(consumed..consumed + HEADER_BYTES) {
                    let payload = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
                    let end = consumed + HEADER_BYTES + payload as usize;
                    if end > outbound.len() {
                        break;
                    }
                    let message = Message::Binary(outbound[consumed..end].to_vec().into());
                    socket.write(message).map_err(|e| protocol_error(format!("websocket: {e}")))?;
                    consumed = end;
                }
                socket.flush().or_else(|e| match e {
                    tungstenite::Error::Io(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                    e => Err(protocol_error(format!("websocket: {e}"))),
                })?;
                out.append(&mut socket.get_mut().output);
                Ok(consumed)
            }
            State::Failed => Err(protocol_error("websocket failed")),
        }
    }
}
