//! The PROXY protocol, version 2 (HAProxy's binary header): a load balancer in front of
//! `ternd` says which client a connection is for.
//!
//! Per-address budgets (codes, links, unauthenticated connections) mean nothing behind
//! a proxy unless the core sees the client's address rather than the proxy's. A proxy
//! the operator names (`--proxy-protocol-from`) starts each connection with this header;
//! connections from anyone else are taken as direct, with no header (so a client cannot
//! claim an address by sending one). Only version 2 is read: fixed-size binary fields,
//! nothing to scan for. Pure code: the runtime reads [`HEADER_FIXED_BYTES`], asks
//! [`body_len`] how many more, reads those and asks [`source_of`] for the address.
//!
//! Layout (<https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>, section 2.2):
//! 12 bytes of signature, one byte version (high nibble, 2) and command (low nibble: 0
//! `LOCAL`, 1 `PROXY`), one byte address family (high nibble: 1 IPv4, 2 IPv6) and
//! transport (low nibble: 1 stream), a big-endian `u16` length of what follows; for TCP
//! over IPv4 the source address (4), destination address (4), source port and
//! destination port (2 each), over IPv6 the same with 16-byte addresses; then TLVs, which
//! are skipped.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The first 12 bytes of every version 2 header.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version and command, family, length.
pub const HEADER_FIXED_BYTES: usize = 16;
/// The most a header may carry after its fixed part: addresses and a few TLVs. The
/// format allows 65,535; nothing a proxy sends for a TCP connection comes close.
pub const BODY_BYTES_MAX: usize = 512;

/// Why a header was refused (the connection is then closed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyError {
    /// The first 12 bytes are not the version 2 signature (a version 1 text header, or
    /// a client talking directly to a port that expects a proxy).
    NoSignature,
    /// The version nibble is not 2.
    Version(u8),
    /// The command is neither `LOCAL` nor `PROXY`.
    Command(u8),
    /// The body is longer than [`BODY_BYTES_MAX`].
    TooLong(usize),
    /// The body is shorter than its address family needs.
    Truncated,
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::NoSignature => f.write_str("no PROXY protocol v2 signature"),
            ProxyError::Version(v) => write!(f, "PROXY protocol version {v}, not 2"),
            ProxyError::Command(c) => write!(f, "PROXY protocol command {c} is unknown"),
            ProxyError::TooLong(n) => {
                write!(f, "PROXY header of {n} bytes; at most {BODY_BYTES_MAX}")
            }
            ProxyError::Truncated => f.write_str("PROXY header shorter than its addresses"),
        }
    }
}

impl std::error::Error for ProxyError {}

/// Checks the fixed part of a header and returns how many bytes follow it.
pub fn body_len(fixed: &[u8; HEADER_FIXED_BYTES]) -> Result<usize, ProxyError> {
    if fixed[..12] != SIGNATURE {
        return Err(ProxyError::NoSignature);
    }
    let (version, command) = (fixed[12] >> 4, fixed[12] & 0x0f);
    if version != 2 {
        return Err(ProxyError::Version(version));
    }
    if command > 1 {
        return Err(ProxyError::Command(command));
    }
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if len > BODY_BYTES_MAX {
        return Err(ProxyError::TooLong(len));
    }
    Ok(len)
}

/// The client's address a whole header names: `None` for `LOCAL` (the proxy's own
/// health check) and for families other than TCP over IPv4 or IPv6 (use the proxy's
/// address then, as the specification says).
pub fn source_of(
    fixed: &[u8; HEADER_FIXED_BYTES],
    body: &[u8],
) -> Result<Option<SocketAddr>, ProxyError> {
    let len = body_len(fixed)?;
    let body = body.get(..len).ok_or(ProxyError::Truncated)?;
    if fixed[12] & 0x0f == 0 {
        return Ok(None);
    }
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    match fixed[13] {
        0x11 => {
            let bytes: [u8; 12] = body.get(..12).ok_or(ProxyError::Truncated)?.try_into().unwrap();
            let ip = Ipv4Addr::from(<[u8; 4]>::try_from(&bytes[..4]).unwrap());
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port(8))))
        }
        0x21 => {
            let bytes = body.get(..36).ok_or(ProxyError::Truncated)?;
            let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[..16]).unwrap());
            Ok(Some(SocketAddr::new(IpAddr::V6(ip), port(32))))
        }
        _ => Ok(None),
    }
}

/// A version 2 `PROXY` header for a TCP connection from `source` to `destination` (both
/// of one family): what a proxy sends, for tests and the load generator.
pub fn header_for(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut header = SIGNATURE.to_vec();
    header.push(0x21);
    let mut body = Vec::new();
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            header.push(0x11);
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
        }
        (s, d) => {
            header.push(0x21);
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            body.extend_from_slice(&v6(s).octets());
            body.extend_from_slice(&v6(d).octets());
        }
    }
    body.extend_from_slice(&source.port().to_be_bytes());
    body.extend_from_slice(&destination.port().to_be_bytes());
    header.extend_from_slice(&(body.len() as u16).to_be_bytes());
    header.extend_from_slice(&body);
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(header: &[u8]) -> ([u8; HEADER_FIXED_BYTES], &[u8]) {
        (header[..HEADER_FIXED_BYTES].try_into().unwrap(), &header[HEADER_FIXED_BYTES..])
    }

    #[test]
    fn headers_name_the_client() {
        for (source, destination) in
            [("203.0.113.7:51000", "10.0.0.1:7000"), ("[2001:db8::9]:443", "[2001:db8::1]:7000")]
        {
            let source: SocketAddr = source.parse().unwrap();
            let header = header_for(source, destination.parse().unwrap());
            let (fixed, body) = split(&header);
            assert_eq!(body_len(&fixed), Ok(body.len()));
            assert_eq!(source_of(&fixed, body), Ok(Some(source)));
        }
        // The specification's own example layout, with a TLV after the addresses.
        let mut header = header_for("1.2.3.4:5".parse().unwrap(), "6.7.8.9:10".parse().unwrap());
        header[15] += 4;
        header.extend_from_slice(&[0x04, 0x00, 0x01, 0x00]); // PP2_TYPE_NOOP, 1 byte.
        let (fixed, body) = split(&header);
        assert_eq!(source_of(&fixed, body), Ok(Some("1.2.3.4:5".parse().unwrap())));
    }

    #[test]
    fn bad_headers_are_refused_with_the_rule() {
        let good = header_for("1.2.3.4:5".parse().unwrap(), "6.7.8.9:10".parse().unwrap());
        let with = |at: usize, byte: u8| {
            let mut h = good.clone();
            h[at] = byte;
            h
        };
        let cases = [
            (b"PROXY TCP4 1.2.3.4 6.7.8.9 5 10\r\n".to_vec(), ProxyError::NoSignature),
            (with(12, 0x11), ProxyError::Version(1)),
            (with(12, 0x22), ProxyError::Command(2)),
            (with(14, 0xff), ProxyError::TooLong(0xff0c)),
        ];
        for (header, error) in cases {
            let (fixed, body) = split(&header);
            assert_eq!(source_of(&fixed, body), Err(error));
        }
        let (fixed, body) = split(&good);
        assert_eq!(source_of(&fixed, &body[..5]), Err(ProxyError::Truncated));
        let mut short = good.clone();
        short[15] = 4; // Says 4 bytes: fewer than an IPv4 address pair needs.
        let (fixed, body) = split(&short);
        assert_eq!(source_of(&fixed, body), Err(ProxyError::Truncated));
        // LOCAL: the proxy's own connection, no client address.
        let local = with(12, 0x20);
        let (fixed, body) = split(&local);
        assert_eq!(source_of(&fixed, body), Ok(None));
    }
}
