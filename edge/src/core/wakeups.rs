//! Waking offline devices: one push per absence.
//!
//! When an envelope is queued for a device homed here that has no connection and
//! registered a push endpoint, the core asks the runtime for one wake-up
//! ([`Effect::Push`]) — and no more for that device until it connects again, however
//! many messages follow. A push carries no content. The runtime reports an endpoint the
//! push service says is gone; it is removed unless the device registered another.

use std::collections::HashSet;
use std::net::IpAddr;

use tern_engine::{StateOp, Storage};
use tern_wire::messages::{
    ArchivedPushRegister, DeviceId, Done, PushProvider, PushRegister, UserId,
};
use tern_wire::MessageType;

use super::conns::ConnId;
use super::effects::Effect;
use super::shared::Shared;
use crate::code_sender::WebhookUrl;
use crate::push::PushJob;
use crate::refusal::{AccountRefusal, SessionRefusal, StorageRefusal};

/// Push endpoint addresses are at most this long (a URL or a provider token).
const PUSH_ADDRESS_BYTES_MAX: usize = 4096;

/// The devices already woken since they were last connected.
#[derive(Debug, Default)]
pub struct Wakeups {
    woken: HashSet<(UserId, DeviceId)>,
}

impl Wakeups {
    /// `device` connected: its next absence gets a wake-up again.
    pub fn connected(&mut self, device: (UserId, DeviceId)) {
        self.woken.remove(&device);
    }

    /// `device` is gone (unlinked, deleted).
    pub fn forget(&mut self, device: (UserId, DeviceId)) {
        self.woken.remove(&device);
    }

    /// Asks for one wake-up of `device` (homed here) if it is offline, has a push
    /// endpoint and was not woken since it last connected.
    pub fn wake_if_offline<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        device: (UserId, DeviceId),
    ) {
        if shared.conns.online(device).is_some() || self.woken.contains(&device) {
            return;
        }
        let Some(shard) = shared.shards.home_of(device.0) else { return };
        let endpoint =
            shard.borrow().state().device(device.0, device.1).and_then(|d| d.push.clone());
        if let Some(endpoint) = endpoint {
            self.woken.insert(device);
            shared.effects.push(Effect::Push(PushJob { device, endpoint }));
        }
    }

    /// A device registers (or removes) its push endpoint.
    pub fn register<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        register: &ArchivedPushRegister,
    ) {
        let ty = MessageType::PushRegister.code();
        let Ok(register) = rkyv::deserialize::<PushRegister, rkyv::rancor::Failure>(register)
        else {
            return shared.conns.refuse(conn, rid, ty, &SessionRefusal::Unreadable);
        };
        if let Some(endpoint) = &register.endpoint {
            let url = match endpoint.provider {
                PushProvider::UnifiedPush => WebhookUrl::parse(&endpoint.address).ok(),
                PushProvider::Apns | PushProvider::Fcm => None,
            };
            let valid = endpoint.address.len() <= PUSH_ADDRESS_BYTES_MAX
                && match endpoint.provider {
                    PushProvider::UnifiedPush => url.is_some(),
                    PushProvider::Apns | PushProvider::Fcm => !endpoint.address.is_empty(),
                };
            if !valid {
                return shared.conns.refuse(conn, rid, ty, &AccountRefusal::BadEndpoint);
            }
            let (insecure, allowed) =
                (shared.config.push_insecure_endpoints, &shared.config.push_allowed_hosts);
            if let Some(Err(why)) = url.map(|url| check_push_url(&url, insecure, allowed)) {
                let refusal = AccountRefusal::EndpointInside { why };
                return shared.conns.refuse(conn, rid, ty, &refusal);
            }
        }
        let op = StateOp::SetPush { user_id: me.0, device_id: me.1, endpoint: register.endpoint };
        match shared.shards.apply_for(me.0, op) {
            Some(Ok(wait)) => {
                self.woken.remove(&me);
                shared.reply_when_durable(conn, rid, &Done {}, vec![wait]);
            }
            Some(Err(error)) => shared.conns.refuse(conn, rid, ty, &StorageRefusal::of(&error)),
            None => shared.conns.refuse(conn, rid, ty, &SessionRefusal::WrongCore),
        }
    }

    /// The push service said `job`'s endpoint is gone: forget it (unless the device
    /// registered another meanwhile).
    pub fn gone<S: Storage>(&mut self, shared: &mut Shared<S>, job: &PushJob) {
        let (user_id, device_id) = job.device;
        let Some(shard) = shared.shards.home_of(user_id) else { return };
        let current =
            shard.borrow().state().device(user_id, device_id).and_then(|d| d.push.clone());
        if current.as_ref() != Some(&job.endpoint) {
            return;
        }
        tracing::info!(user_id, device_id, "push endpoint gone; removed");
        let op = StateOp::SetPush { user_id, device_id, endpoint: None };
        if let Some(Err(error)) = shared.shards.apply_for(user_id, op) {
            tracing::warn!(%error, "could not remove a gone push endpoint");
        }
    }
}

/// Whether ternd may call `url` for a device's wake-ups: https, to a host that is not
/// this machine or a private, loopback, link-local or otherwise non-public address
/// literal (a client must not make the server call inside the operator's network), and
/// on the operator's list of push services when there is one (`allowed_hosts`: a host,
/// or `.domain` for any host under it). With `insecure` (`--push-insecure-endpoints`)
/// only the list is checked. Names are resolved when a push is sent, off the core's
/// thread, and a name resolving to no public address is not called (`resolve_public`
/// in the runtime's webhook module).
pub fn check_push_url(
    url: &WebhookUrl,
    insecure: bool,
    allowed_hosts: &[String],
) -> Result<(), &'static str> {
    let host = url.host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let host = host.trim_end_matches('.');
    if !allowed_hosts.is_empty() && !allowed_hosts.iter().any(|entry| host_matches(host, entry)) {
        return Err("is not on the operator's list of push services");
    }
    if insecure {
        return Ok(());
    }
    if !url.tls {
        return Err("is plain http");
    }
    if host == "localhost" || host.ends_with(".localhost") {
        return Err("names this machine");
    }
    match host.parse::<IpAddr>() {
        Ok(ip) if !is_public(ip) => Err("is a private, loopback or link-local address"),
        _ => Ok(()),
    }
}

/// Whether `host` (lowercase, no final dot) is `entry`, or under it for `.domain`.
fn host_matches(host: &str, entry: &str) -> bool {
    let entry = entry.trim_end_matches('.').to_ascii_lowercase();
    match entry.strip_prefix('.') {
        Some(domain) => host.strip_suffix(domain).is_some_and(|rest| rest.ends_with('.')),
        None => host == entry,
    }
}

/// Whether `ip` is an address of the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            let mapped = v6.to_ipv4_mapped().map(IpAddr::V4);
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || mapped.is_some_and(|v4| !is_public(v4)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_urls_cannot_reach_inside() {
        let check = |url: &str| check_push_url(&WebhookUrl::parse(url).unwrap(), false, &[]);
        assert_eq!(check("https://push.example.org/up/abc"), Ok(()));
        assert_eq!(
            check("https://203.0.113.9/up"),
            Err("is a private, loopback or link-local address")
        );
        assert_eq!(check("https://8.8.8.8/up"), Ok(()));
        assert_eq!(check("http://push.example.org/up"), Err("is plain http"));
        for inside in [
            "https://127.0.0.1/x",
            "https://10.1.2.3/x",
            "https://172.16.0.1/x",
            "https://192.168.1.1:8443/x",
            "https://169.254.169.254/latest/meta-data",
            "https://100.64.0.1/x",
            "https://0.0.0.0/x",
            "https://[::1]:443/x",
            "https://[fd00::1]:443/x",
            "https://[fe80::1]:443/x",
            "https://[::ffff:127.0.0.1]:443/x",
        ] {
            assert!(check(inside).is_err(), "{inside} was accepted");
        }
        assert_eq!(check("https://LocalHost:9000/x"), Err("names this machine"));
        assert_eq!(check("https://localhost.:9000/x"), Err("names this machine"));
        let dev = WebhookUrl::parse("http://127.0.0.1:9000/x").unwrap();
        assert_eq!(check_push_url(&dev, true, &[]), Ok(()));
    }

    #[test]
    fn the_operators_list_of_push_services_is_the_only_way_out() {
        let allowed = ["ntfy.example.org".to_string(), ".push.example.net".to_string()];
        let check = |url: &str| check_push_url(&WebhookUrl::parse(url).unwrap(), false, &allowed);
        assert_eq!(check("https://ntfy.example.org/up/1"), Ok(()));
        assert_eq!(check("https://NTFY.example.org./up/1"), Ok(()));
        assert_eq!(check("https://eu.push.example.net/up/1"), Ok(()));
        let refused = Err("is not on the operator's list of push services");
        for outside in [
            "https://example.org/up",
            "https://evil-ntfy.example.org/up",
            "https://ntfy.example.org.evil.com/up",
            "https://push.example.net/up",
            "https://xpush.example.net/up",
            "https://8.8.8.8/up",
        ] {
            assert_eq!(check(outside), refused, "{outside}");
        }
        // The list holds with development endpoints allowed too.
        let dev = WebhookUrl::parse("http://127.0.0.1:9000/x").unwrap();
        assert_eq!(check_push_url(&dev, true, &allowed), refused);
    }
}
