//! The byte transport under the frames: the socket itself, or TLS and/or WebSocket
//! layered on it (rustls, and tungstenite over an in-memory duplex). Inbound: socket →
//! TLS → WebSocket → frames. Outbound: frames → WebSocket → TLS → socket. Plain data
//! and synchronous calls: the connection task moves the bytes.

use std::io;
use std::sync::Arc;

use crate::websocket::WsLayer;

/// Output a layer (TLS, WebSocket) holds for the socket before it takes more of the
/// core's: past it the frames wait in the core, whose output bound then applies.
pub const LAYERED_BYTES_MAX: usize = 256 * 1024;

/// The byte transport under the frames: the socket itself, or TLS and/or WebSocket
/// layered on it. Inbound: socket → TLS → WebSocket → frames. Outbound: frames →
/// WebSocket → TLS → socket.
pub struct Wire {
    pub(super) tls: Option<Box<rustls::ServerConnection>>,
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
            Some(config) => {
                Some(Box::new(rustls::ServerConnection::new(config).map_err(io::Error::other)?))
            }
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
            && (self.tls.as_ref().is_some_and(|tls| tls.is_handshaking())
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
                let mut rest = bytes;
                while !rest.is_empty() {
                    tls.read_tls(&mut rest)?;
                    let state = tls.process_new_packets();
                    // Queue whatever rustls wants to say (handshake, alerts) even on error.
                    while tls.wants_write() {
                        tls.write_tls(&mut self.out)?;
                    }
                    let state = state.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    let mut available = state.plaintext_bytes_to_read();
                    while available > 0 {
                        let start = self.inner.len();
                        self.inner.resize(start + available, 0);
                        let n = io::Read::read(&mut tls.reader(), &mut self.inner[start..])?;
                        self.inner.truncate(start + n);
                        available -= n;
                        if n == 0 {
                            break;
                        }
                    }
                }
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
        let taken = match for_tls {
            Some(outbound) if !outbound.is_empty() => {
                io::Write::write(&mut tls.writer(), outbound)?
            }
            Some(_) => 0,
            None => {
                if !self.layered.is_empty() {
                    let n = io::Write::write(&mut tls.writer(), &self.layered)?;
                    self.layered.drain(..n);
                }
                taken
            }
        };
        while tls.wants_write() {
            tls.write_tls(&mut self.out)?;
        }
        Ok(taken)
    }
}
