//! Connections not yet authenticated, counted per network address.
//!
//! The global connection limit alone lets one host take every slot: it opens
//! connections and never authenticates, and until the auth deadline each one holds a
//! descriptor and its buffers. So each address may hold only so many connections that
//! have not authenticated yet; past it a new one is refused with `TooManyConnections`.
//! Only those count: behind a carrier-grade NAT thousands of honest people share one
//! address, and an honest client authenticates within a round trip, so the limit is
//! generous and authenticated connections are not held to it. Loopback is exempt unless
//! the operator asks (a local TLS terminator or load generator is many clients at once).
//!
//! The key is the one every per-address budget uses ([`budget_key`]): an IPv4 address,
//! or the /64 network of an IPv6 address (one host usually holds a whole /64).

use std::collections::HashMap;
use std::net::IpAddr;

/// What a per-address budget counts: an IPv4 address, or the /64 network of an IPv6
/// address (one host usually holds a whole /64, so single addresses cost nothing).
pub fn budget_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
    }
}

/// The budget key of a client at `peer_ip`, if it counts: loopback clients only with
/// `count_loopback` (`--code-budget-loopback`), unknown ones never.
pub fn budget_key_of(peer_ip: Option<IpAddr>, count_loopback: bool) -> Option<IpAddr> {
    peer_ip.filter(|ip| count_loopback || !ip.is_loopback()).map(budget_key)
}

/// Counts of unauthenticated connections per address key, with their limit.
#[derive(Debug)]
pub struct PreAuthCounts {
    counts: HashMap<IpAddr, u32>,
    /// At most this many per address (0: no limit).
    max: u32,
    /// Whether loopback addresses count.
    count_loopback: bool,
}

impl PreAuthCounts {
    /// No connections yet; at most `max` per address (0: no limit).
    pub fn new(max: u32, count_loopback: bool) -> PreAuthCounts {
        PreAuthCounts { counts: HashMap::new(), max, count_loopback }
    }

    /// Counts a new connection from `ip`: its key, if it counts (release it once the
    /// connection authenticates or closes), and whether its address is now over the limit.
    pub fn admit(&mut self, ip: Option<IpAddr>) -> (Option<IpAddr>, bool) {
        let key = budget_key_of(ip, self.count_loopback).filter(|_| self.max > 0);
        let Some(key) = key else { return (None, false) };
        let count = self.counts.entry(key).or_insert(0);
        *count += 1;
        (Some(key), *count > self.max)
    }

    /// A counted connection authenticated or closed.
    pub fn release(&mut self, key: IpAddr) {
        if let Some(count) = self.counts.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                self.counts.remove(&key);
            }
        }
    }

    /// Addresses with unauthenticated connections now (for metrics and tests).
    pub fn addresses(&self) -> usize {
        self.counts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_holds_at_most_its_share_of_unauthenticated_connections() {
        let mut counts = PreAuthCounts::new(2, false);
        let host: IpAddr = "203.0.113.7".parse().unwrap();
        let (first, over) = counts.admit(Some(host));
        assert_eq!((first, over), (Some(host), false));
        assert!(!counts.admit(Some(host)).1);
        assert!(counts.admit(Some(host)).1, "the third is over");
        // One /64 is one address; another address has its own share.
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        counts.admit(Some(a));
        counts.admit(Some(b));
        assert!(counts.admit(Some(a)).1);
        assert!(!counts.admit(Some("2001:db8:1:3::1".parse().unwrap())).1);
        // Released, there is room again; loopback and unknown peers do not count.
        for _ in 0..3 {
            counts.release(host);
        }
        assert!(!counts.admit(Some(host)).1);
        assert_eq!(counts.admit(Some("127.0.0.1".parse().unwrap())), (None, false));
        assert_eq!(counts.admit(None), (None, false));
        let mut loopback_counts = PreAuthCounts::new(1, true);
        loopback_counts.admit(Some("::1".parse().unwrap()));
        assert!(loopback_counts.admit(Some("::1".parse().unwrap())).1);
    }
}
