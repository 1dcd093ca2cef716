//! Linking a companion device: a code shown on the new device, approved on the primary.
//!
//! The new device's connection asks (`LinkRequest`, once per connection; its keys'
//! signatures checked off the core's thread) and gets a code drawn so that it hashes
//! to this core; its connection waits here, its auth deadline extended to the code's
//! lifetime. The primary device's core claims the device with the code (a
//! [`ClaimLink`] call to the code's core), adds it to the account, and once that is
//! durable answers the approver `Done`, the new device `Registered` (a `LinkDone` tell),
//! and tells the account's other online devices the new list.

use std::collections::HashMap;
use std::net::IpAddr;

use tern_engine::{StateOp, Storage};
use tern_wire::messages::{
    ArchivedLinkRequest, DeviceId, DeviceListChanged, Done, LinkCode, NewDevice, Registered, UserId,
};
use tern_wire::MessageType;

use super::addresses::budget_key_of;
use super::config::CoreConfig;
use super::conns::ConnId;
use super::durable::Release;
use super::keys::check_new_device;
use super::registration::device_record;
use super::shared::Shared;
use crate::limits::HourlyWindow;
use crate::mesh::calls::ClaimLink;
use crate::mesh::{CoreMsg, ReplyTo, Tell};
use crate::refusal::{retry_hint, LinkRefusal, Refusal, StorageRefusal};
use crate::routing::{core_of_link_code, home_shard_of_user, Address};
use crate::secrets;
use crate::work::CheckDeviceKeys;

/// Linking codes stay valid this long (the new device's connection waits meanwhile).
pub const LINK_CODE_TTL_MS: u64 = 5 * 60 * 1000;
/// Devices per account (a primary and four companions).
pub const DEVICES_MAX: usize = 5;
/// Digits of a linking code.
const LINK_CODE_DIGITS: u32 = 9;

/// A device waiting for its account's primary device to approve it.
#[derive(Debug)]
struct PendingLink {
    conn: ConnId,
    rid: u32,
    /// `None` once claimed by the approving core (the connection waits for the result).
    device: Option<NewDevice>,
    expires_ms: u64,
}

/// Linking state of one core.
#[derive(Debug)]
pub struct Linking {
    /// Link requests per client address (IPv4, IPv6 /64) in the last hour: each costs
    /// signature checks and a connection held for the code's lifetime.
    per_address: HourlyWindow<IpAddr>,
    /// Devices waiting to be linked, by code (the new device's connection is here).
    links: HashMap<String, PendingLink>,
    /// Requests whose keys are being checked: token → (connection, request, device).
    key_checks: HashMap<u64, (ConnId, u32, NewDevice)>,
    /// Approvals waiting for the code's core: token → (connection, request, user, code).
    claims: HashMap<u64, (ConnId, u32, UserId, String)>,
}

impl Linking {
    /// No links yet; at most `config.link_requests_per_address_per_hour` per address.
    pub fn new(config: &CoreConfig) -> Linking {
        Linking {
            per_address: HourlyWindow::new(config.link_requests_per_address_per_hour),
            links: HashMap::new(),
            key_checks: HashMap::new(),
            claims: HashMap::new(),
        }
    }

    /// A new device asks to join an account; its keys are checked first.
    pub fn request<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        request: &ArchivedLinkRequest,
    ) {
        let ty = MessageType::LinkRequest.code();
        let now_ms = shared.now_ms();
        let count_loopback = shared.config.code_budget_loopback;
        let Some(c) = shared.conns.get_mut(conn) else { return };
        if c.link_asked {
            return shared.conns.refuse(conn, rid, ty, &LinkRefusal::AlreadyAsked);
        }
        c.link_asked = true;
        if let Some(address) = budget_key_of(c.peer_ip, count_loopback) {
            if let Err(wait) = self.per_address.check(&address, now_ms) {
                let refusal = LinkRefusal::AddressBudget { retry_after_ms: retry_hint(wait) };
                return shared.conns.refuse(conn, rid, ty, &refusal);
            }
            self.per_address.record(address, now_ms);
        }
        let Ok(device) = rkyv::deserialize::<NewDevice, rkyv::rancor::Failure>(&request.device)
        else {
            return shared.conns.refuse(conn, rid, ty, &LinkRefusal::UnreadableKeys);
        };
        if let Err(refusal) = check_new_device(&device) {
            return shared.conns.refuse(conn, rid, ty, &refusal);
        }
        let token = shared.effects.work(CheckDeviceKeys(device.keys.clone()));
        self.key_checks.insert(token, (conn, rid, device));
    }

    /// The new device's keys were checked: it gets a code, and waits.
    pub fn on_device_keys_checked<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        token: u64,
        checked: Result<(), &'static str>,
    ) {
        let Some((conn, rid, device)) = self.key_checks.remove(&token) else { return };
        if let Err(why) = checked {
            let ty = MessageType::LinkRequest.code();
            return shared.conns.refuse(conn, rid, ty, &LinkRefusal::BadKeys { why });
        }
        let now_ms = shared.now_ms();
        self.links.retain(|_, link| link.expires_ms > now_ms || link.device.is_none());
        let placement = shared.shards.placement();
        let code = loop {
            let code = secrets::new_code(&mut shared.random, LINK_CODE_DIGITS);
            let here = core_of_link_code(&code, placement.count) == placement.index;
            if here && !self.links.contains_key(&code) {
                break code;
            }
        };
        let expires_ms = now_ms + LINK_CODE_TTL_MS;
        self.links
            .insert(code.clone(), PendingLink { conn, rid, device: Some(device), expires_ms });
        // A device being linked waits for a person to approve it on the primary.
        shared.conns.extend_auth_deadline(conn, shared.now.mono_ms() + LINK_CODE_TTL_MS);
        let reply = LinkCode { code, expires_in_s: (LINK_CODE_TTL_MS / 1000) as u32 };
        // Unsolicited-looking but answering the request: the final answer (Registered)
        // comes with the same request id once the primary device approves.
        shared.conns.send(conn, 0, &reply);
    }

    /// The connection of a waiting device closed.
    pub fn forget_conn(&mut self, conn: ConnId) {
        self.links.retain(|_, link| link.conn != conn);
    }

    /// The primary device approves a code: claim the device from the code's core.
    pub fn approve<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        code: &str,
    ) {
        if me.1 != 1 {
            let ty = MessageType::LinkApprove.code();
            return shared.conns.refuse(conn, rid, ty, &LinkRefusal::NotPrimary);
        }
        let to = Address::local(core_of_link_code(code, shared.shards.placement().count));
        let call = ClaimLink { code: code.to_string(), now_ms: shared.now_ms() };
        let token = shared.outbox.ask(to, call);
        self.claims.insert(token, (conn, rid, me.0, code.to_string()));
    }

    /// Serves a claim of a code held here (once).
    pub fn serve_claim<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        call: ClaimLink,
        reply_to: Option<ReplyTo<ClaimLink>>,
    ) {
        let answer = match self.links.get_mut(&call.code) {
            None => Err(LinkRefusal::NoSuchCode),
            Some(link) if link.expires_ms <= call.now_ms => {
                self.links.remove(&call.code);
                Err(LinkRefusal::Expired)
            }
            Some(link) => link.device.take().ok_or(LinkRefusal::NoSuchCode),
        };
        shared.answer(reply_to, answer);
    }

    /// The code's core answered the claim: add the device (or tell the approver why not).
    pub fn on_claimed<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        token: u64,
        answer: Result<NewDevice, LinkRefusal>,
    ) {
        let Some((conn, rid, user_id, code)) = self.claims.remove(&token) else { return };
        let device = match answer {
            Ok(device) => device,
            Err(refusal) => {
                return shared.conns.refuse(conn, rid, MessageType::LinkApprove.code(), &refusal)
            }
        };
        if let Err(refusal) = add_device(shared, (conn, rid), user_id, &code, device) {
            shared.conns.refuse(conn, rid, MessageType::LinkApprove.code(), &refusal);
            let to = Address::local(core_of_link_code(&code, shared.shards.placement().count));
            shared.outbox.tell(to, Tell::LinkDone { code, registered: Err(refusal) });
        }
    }

    /// Tells the waiting new device how its link ended.
    pub fn done<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        code: &str,
        registered: Result<Registered, LinkRefusal>,
    ) {
        let Some(link) = self.links.remove(code) else { return };
        match registered {
            Ok(registered) => shared.conns.send(link.conn, link.rid, &registered),
            Err(refusal) => {
                let failed = LinkRefusal::NotCompleted { code: refusal.code() };
                shared.conns.refuse(link.conn, link.rid, MessageType::LinkRequest.code(), &failed);
            }
        }
    }
}

/// Adds a claimed device to `user_id` (homed here); once durable the approver gets
/// `Done`, the new device `Registered`, and the user's other devices the new list.
fn add_device<S: Storage>(
    shared: &mut Shared<S>,
    (conn, rid): (ConnId, u32),
    user_id: UserId,
    code: &str,
    device: NewDevice,
) -> Result<(), LinkRefusal> {
    let existing = shared.shards.devices_of(user_id).unwrap_or_default();
    if existing.len() >= DEVICES_MAX {
        return Err(LinkRefusal::TooManyDevices);
    }
    let device_id = existing.iter().map(|d| d.1).max().unwrap_or(0) + 1;
    let token = secrets::new_token(&mut shared.random);
    let record = device_record(device_id, device, &token, shared.now_ms());
    let op = StateOp::PutDevice { user_id, device: record };
    let wait = match shared.shards.apply_for(user_id, op) {
        Some(Ok(wait)) => wait,
        Some(Err(error)) => {
            return Err(LinkRefusal::Storage { refusal: StorageRefusal::of(&error) })
        }
        None => return Err(LinkRefusal::Storage { refusal: StorageRefusal::Failed }),
    };
    debug_assert_eq!(wait.0, home_shard_of_user(user_id));
    shared.reply_when_durable(conn, rid, &Done {}, vec![wait]);
    let registered = Registered { user_id, device_id, token, new_account: false };
    let to = Address::local(core_of_link_code(code, shared.shards.placement().count));
    let tell = Tell::LinkDone { code: code.to_string(), registered: Ok(registered) };
    shared.when_durable(vec![wait], Release::Mesh { to, message: CoreMsg::Tell(tell) });
    // The account's other online devices learn of the new one.
    let device_ids = existing.iter().map(|d| d.1).chain(std::iter::once(device_id)).collect();
    let changed = DeviceListChanged { user_id, device_ids };
    for (_, other) in shared.conns.online_devices(user_id) {
        shared.conns.send(other, 0, &changed);
    }
    Ok(())
}
