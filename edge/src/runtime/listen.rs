//! Listening: the addresses every core binds (reserved once, so that port 0 means one
//! port for all, and refused if another process holds them), and the accept loop of
//! each listener.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use futures_lite::AsyncReadExt;
use glommio::net::{TcpListener, TcpStream};
use glommio::timer::Timer;

use super::conn::connection;
use super::ctx::{now, Ctx, ACCEPT_PAUSE};
use super::socket_handoff;
use super::wire::{Layers, Wire};
use super::{ServerConfig, ServerError};
use crate::proxy;

/// The addresses every core listens on, resolved once so that port 0 means the same
/// port on every core.
#[derive(Clone, Debug)]
pub struct Addresses {
    pub tcp: SocketAddr,
    pub tls: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// Holds each listen port between resolving it and every core binding it: a bound,
/// non-listening SO_REUSEPORT socket (it takes no connections).
pub struct PortReservations(#[allow(dead_code)] Vec<socket2::Socket>);

impl Addresses {
    /// Resolves and holds every listen address. Each is first bound *without*
    /// SO_REUSEPORT: that bind fails if any other socket holds the address, so a second
    /// server (which would otherwise share the port through SO_REUSEPORT and take half
    /// the clients) is refused. Only then is the shared reservation bound, on the same
    /// port, for this process's cores.
    pub fn reserve(config: &ServerConfig) -> Result<(Addresses, PortReservations), ServerError> {
        let mut held = Vec::new();
        let mut reserve = |address: SocketAddr| -> Result<SocketAddr, ServerError> {
            let (exclusive, bound) = exclusive_probe(address)?;
            let socket = tcp_socket(bound).map_err(ServerError::Io)?;
            socket.set_reuse_port(true).map_err(ServerError::Io)?;
            drop(exclusive);
            socket.bind(&bound.into()).map_err(|e| in_use_or(bound, e))?;
            held.push(socket);
            Ok(bound)
        };
        let addresses = Addresses {
            tcp: reserve(config.listen)?,
            tls: config.tls_listen.map(&mut reserve).transpose()?,
            ws: config.ws_listen.map(&mut reserve).transpose()?,
            wss: config.wss_listen.map(&mut reserve).transpose()?,
            admin: match config.admin {
                // Core 0 alone binds it, later; the probe only checks nobody else has it.
                Some(admin) => Some(exclusive_probe(admin)?.1),
                None => None,
            },
        };
        Ok((addresses, PortReservations(held)))
    }
}

/// A TCP socket for `address`'s family, not yet bound.
fn tcp_socket(address: SocketAddr) -> io::Result<socket2::Socket> {
    socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
}

/// Binds `address` without SO_REUSEPORT (so no other socket may hold it) and returns
/// the socket (the address is free again once it is dropped) with its resolved address
/// (port 0: a free port).
fn exclusive_probe(address: SocketAddr) -> Result<(socket2::Socket, SocketAddr), ServerError> {
    let socket = tcp_socket(address).map_err(ServerError::Io)?;
    socket.bind(&address.into()).map_err(|e| in_use_or(address, e))?;
    let bound = socket.local_addr().map_err(ServerError::Io)?.as_socket().ok_or_else(|| {
        ServerError::Io(io::Error::other(format!("{address} did not bind to an IP address")))
    })?;
    Ok((socket, bound))
}

fn in_use_or(address: SocketAddr, error: io::Error) -> ServerError {
    if error.kind() == io::ErrorKind::AddrInUse {
        ServerError::AddressInUse { address }
    } else {
        ServerError::Io(io::Error::new(error.kind(), format!("{address}: {error}")))
    }
}

/// Accepts connections on one listener until the server stops.
pub async fn accept_loop(listener: TcpListener, layers: Layers, ctx: Rc<Ctx>) {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            ctx.stopping.wait_raised().await;
            None
        })
        .await;
        let stream = match accepted {
            Some(Ok(stream)) => stream,
            Some(Err(error)) => {
                // Out of descriptors or a connection reset during accept: keep serving,
                // but pause accepting for a moment. Retrying at once never yields, so the
                // connections that hold the descriptors (refusals finishing their TLS
                // handshake, closes) would never run to release them: the core would spin
                // and flood the log (found by `bench density --processes 2` past the
                // limit).
                tracing::warn!(%error, "accept failed; pausing accepts for 50 ms");
                Timer::new(ACCEPT_PAUSE).await;
                continue;
            }
            None => break,
        };
        let _ = stream.set_nodelay(true);
        if ctx.socket_buffer_bytes > 0 {
            if let Err(error) = socket_handoff::cap_buffers(&stream, ctx.socket_buffer_bytes) {
                tracing::warn!(%error, "could not cap a client socket's buffers");
            }
        }
        let peer_ip = stream.peer_addr().ok().map(|a| a.ip());
        if peer_ip.is_some_and(|ip| ctx.proxy_protocol_from.contains(&ip)) {
            // The client's address comes first, from the proxy: read it in a task of its
            // own, so a proxy that stalls holds no accept.
            glommio::spawn_local(start_proxied(ctx.clone(), stream, layers)).detach();
        } else {
            start(&ctx, stream, layers, peer_ip);
        }
    }
}

/// Opens a connection from `peer_ip` on the core and starts its task.
fn start(ctx: &Rc<Ctx>, stream: TcpStream, layers: Layers, peer_ip: Option<IpAddr>) {
    let max_frame_bytes = ctx.core.borrow().config().max_frame_bytes;
    // The configuration in force now (a SIGHUP may have replaced it since the last
    // accept): a borrow on this core's own state, no lock.
    let tls = if layers.tls { ctx.tls.borrow().clone() } else { None };
    let wire = match Wire::new(tls, layers.websocket, max_frame_bytes) {
        Ok(wire) => wire,
        Err(error) => return tracing::warn!(%error, "could not start TLS"),
    };
    // Over the connection limit, the core answers `TooManyConnections` and closes.
    let conn = ctx.core.borrow_mut().handle_accept(peer_ip, now());
    ctx.kick();
    tracing::debug!(conn, ?peer_ip, "connection opened");
    glommio::spawn_local(connection(ctx.clone(), conn, stream, wire, Vec::new())).detach();
}

/// A proxy's connection reads the PROXY protocol v2 header first (within
/// [`PROXY_HEADER_DEADLINE`]); the client it names is the connection's address. A
/// connection without a valid header is closed (logged, as a proxy misconfiguration).
async fn start_proxied(ctx: Rc<Ctx>, mut stream: TcpStream, layers: Layers) {
    let proxy_ip = stream.peer_addr().ok().map(|a| a.ip());
    let read = futures_lite::future::or(read_proxy_header(&mut stream), async {
        Timer::new(PROXY_HEADER_DEADLINE).await;
        Err(io::Error::new(io::ErrorKind::TimedOut, "no PROXY header in time"))
    });
    match read.await {
        Ok(client) => start(&ctx, stream, layers, client.map(|a| a.ip()).or(proxy_ip)),
        Err(error) => tracing::warn!(%error, ?proxy_ip, "closed a proxy's connection"),
    }
}

/// A proxy has this long to send the header of a connection.
const PROXY_HEADER_DEADLINE: Duration = Duration::from_secs(5);

/// Reads exactly one PROXY protocol v2 header (nothing after it: the client's bytes
/// stay in the socket for the connection).
async fn read_proxy_header(stream: &mut TcpStream) -> io::Result<Option<SocketAddr>> {
    let invalid = |error: proxy::ProxyError| io::Error::new(io::ErrorKind::InvalidData, error);
    let mut fixed = [0u8; proxy::HEADER_FIXED_BYTES];
    stream.read_exact(&mut fixed).await?;
    let mut body = vec![0u8; proxy::body_len(&fixed).map_err(invalid)?];
    stream.read_exact(&mut body).await?;
    proxy::source_of(&fixed, &body).map_err(invalid)
}

/// The soft limit on open files, from `/proc/self/limits` (Linux).
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
