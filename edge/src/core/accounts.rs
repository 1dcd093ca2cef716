//! Accounts: unlinking devices, contact discovery, profiles, reports, read-receipt
//! privacy.
//!
//! - **Unlink** removes a device (its token stops working at once: the device record and
//!   its token hash go), drops its mailbox, closes its connection and tells the account's
//!   other devices. The primary unlinks anyone; a companion only itself.
//! - **Discovery** answers which of the given truncated SHA-256 phone hashes are
//!   registered, never more: each core keeps an index of the numbers homed on its shards
//!   and looks up only what is asked; the asking core counts hashes against a daily
//!   budget per account (so the user base cannot be enumerated) and gathers the other
//!   cores' answers.
//! - **Profiles**: name, about and avatar, each shown only as the owner's privacy setting
//!   allows (and nothing to someone the owner blocked).
//! - **Reports** are stored for the operator with what the reporter chose to share.

use std::collections::HashMap;

use tern_engine::{ReportRecord, StateOp, Storage};
use tern_wire::accounts::{phone_hash, pow_solves};
use tern_wire::messages::*;
use tern_wire::{ErrorCode, MessageType};

use super::{home_shard_of_user, Awaiting, ConnId, ConnState, Core};
use crate::mesh::{GroupMembership, Reply, Request};

/// A request that needs every core's part (each core knows only its own shards):
/// started with [`Core::gather`], completed as the answers come in.
#[derive(Debug)]
pub(super) struct Gathering {
    conn: ConnId,
    rid: u32,
    remaining_cores: usize,
    parts: Gathered,
}

/// What a gathering has collected so far.
#[derive(Debug)]
pub(super) enum Gathered {
    /// The registered numbers among those asked.
    Discovery { matches: Vec<ContactMatch>, remaining_today: u32 },
    /// The groups `me` belongs to, for an export.
    Export { me: UserId, groups: Vec<GroupMembership>, now_ms: u64 },
}

const DAY_MS: u64 = 24 * 3600 * 1000;

impl<S: Storage> Core<S> {
    /// Indexes the phone numbers of the accounts on this core's shards.
    pub(super) fn build_phone_index(&mut self) {
        let mut index = HashMap::new();
        for (_, shard) in self.owned_shards() {
            for account in shard.borrow().state().accounts.values() {
                index.insert(phone_hash(&account.phone), account.user_id);
            }
        }
        self.phone_index = index;
    }

    /// Removes a device from `me`'s account.
    pub(super) fn unlink(
        &mut self,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        device_id: DeviceId,
    ) {
        let ty = MessageType::Unlink.code();
        if me.1 != 1 && device_id != me.1 {
            let message = "only the primary device unlinks other devices";
            return self.error_reply(conn, rid, ty, ErrorCode::Forbidden, message, 0);
        }
        if device_id == 1 {
            let message = "the primary device cannot be unlinked (register again to move it)";
            return self.error_reply(conn, rid, ty, ErrorCode::Forbidden, message, 0);
        }
        let shard_id = home_shard_of_user(me.0);
        let Some(handle) = self.local_shard(shard_id).cloned() else { return };
        if handle.borrow().state().device(me.0, device_id).is_none() {
            return self.error_reply(conn, rid, ty, ErrorCode::NotFound, "no such device", 0);
        }
        let device = (me.0, device_id);
        // Its mailbox goes: everything queued is released.
        let last = handle.borrow().mailbox_next_seq(device);
        if last > 0 {
            if let Err(error) = handle.borrow_mut().ack(device, last - 1) {
                tracing::warn!(%error, "could not drop an unlinked device's mailbox");
            }
        }
        let op = StateOp::RemoveDevice { user_id: me.0, device_id };
        let removed = handle.borrow_mut().apply_state(op);
        let seq = match removed {
            Ok(seq) => seq,
            Err(error) => return self.storage_error(conn, rid, ty, &error),
        };
        // Its connection is closed at once.
        if let Some(old) = self.online.remove(&device) {
            if let Some(c) = self.conns.get_mut(&old) {
                c.state = ConnState::Open;
                c.closing = true;
                c.wake();
            }
        }
        self.pushed.remove(&device);
        let remaining: Vec<(UserId, DeviceId)> = self.devices_of(me.0).unwrap_or_default();
        let changed = DeviceListChanged {
            user_id: me.0,
            device_ids: remaining.iter().map(|d| d.1).collect(),
        };
        for other in remaining {
            if let Some(&other_conn) = self.online.get(&other) {
                self.push(other_conn, &changed);
            }
        }
        self.reply_when_durable(conn, rid, &Done {}, vec![(shard_id, seq)]);
    }

    /// Which of `hashes` are registered on this core's shards.
    pub(super) fn discover_here(&self, hashes: &[PhoneHash]) -> Vec<ContactMatch> {
        hashes
            .iter()
            .filter_map(|hash| {
                let user_id = *self.phone_index.get(hash)?;
                Some(ContactMatch { hash: *hash, user_id })
            })
            .collect()
    }

    /// A device asks which of its address book's numbers are registered.
    pub(super) fn discover(
        &mut self,
        conn: ConnId,
        rid: u32,
        me: UserId,
        hashes: Vec<PhoneHash>,
        now_ms: u64,
    ) {
        let ty = MessageType::ContactDiscover.code();
        let day = now_ms / DAY_MS;
        let budget = self.config.discovery_per_day;
        let used = self.discovery_used.entry(me).or_insert((day, 0));
        if used.0 != day {
            *used = (day, 0);
        }
        let asked = hashes.len() as u32;
        if used.1.saturating_add(asked) > budget {
            let retry_after = ((day + 1) * DAY_MS).saturating_sub(now_ms);
            let message = "the daily contact-discovery budget is used up";
            let wait = retry_after.min(u64::from(u32::MAX)) as u32;
            return self.error_reply(conn, rid, ty, ErrorCode::RateLimited, message, wait);
        }
        used.1 += asked;
        let remaining_today = budget - used.1;
        let matches = self.discover_here(&hashes);
        let request = || Request::Discover { hashes: hashes.clone() };
        self.gather(conn, rid, request, Gathered::Discovery { matches, remaining_today });
    }

    /// Asks every other core for its part (`request()` for each), starting from this
    /// core's `parts`; finishes at once on a single core.
    fn gather(&mut self, conn: ConnId, rid: u32, request: impl Fn() -> Request, parts: Gathered) {
        let others: Vec<u32> =
            (0..self.placement.count).filter(|c| *c != self.placement.index).collect();
        let gathering = Gathering { conn, rid, remaining_cores: others.len(), parts };
        if others.is_empty() {
            return self.finish_gathering(gathering);
        }
        let id = self.next_token;
        self.next_token += 1;
        self.gatherings.insert(id, gathering);
        for core in others {
            self.ask(core, request(), Some(Awaiting::Gather { gather_id: id }));
        }
    }

    /// Another core's part of a gathering.
    pub(super) fn gathered(&mut self, gather_id: u64, reply: Reply) {
        let Some(gathering) = self.gatherings.get_mut(&gather_id) else { return };
        match (&mut gathering.parts, reply) {
            (Gathered::Discovery { matches, .. }, Reply::Discovered(more)) => matches.extend(more),
            (Gathered::Export { groups, .. }, Reply::Memberships(more)) => groups.extend(more),
            (_, other) => tracing::warn!(?other, "a gathering got an answer of another kind"),
        }
        gathering.remaining_cores -= 1;
        if gathering.remaining_cores == 0 {
            let done = self.gatherings.remove(&gather_id).expect("present");
            self.finish_gathering(done);
        }
    }

    fn finish_gathering(&mut self, gathering: Gathering) {
        let Gathering { conn, rid, parts, .. } = gathering;
        match parts {
            Gathered::Discovery { matches, remaining_today } => {
                self.reply(conn, rid, &ContactMatches { matches, remaining_today })
            }
            Gathered::Export { me, mut groups, now_ms } => {
                groups.sort_by_key(|g| g.group_id);
                self.export_ready(conn, rid, me, &groups, now_ms)
            }
        }
    }

    /// The groups homed on this core that `user_id` belongs to.
    pub(super) fn memberships_here(&self, user_id: UserId) -> Vec<GroupMembership> {
        let mut found = Vec::new();
        for (_, shard) in self.owned_shards() {
            let shard = shard.borrow();
            for group in shard.state().groups.values() {
                if let Some(member) = group.members.iter().find(|m| m.user_id == user_id) {
                    found.push(GroupMembership {
                        group_id: group.group_id,
                        name: group.name.clone(),
                        admin: member.admin,
                        joined_ms: member.joined_ms,
                        members: group.members.len() as u32,
                    });
                }
            }
        }
        found
    }

    /// Sets this account's profile (fields given replace, the others stay).
    pub(super) fn profile_set(&mut self, conn: ConnId, rid: u32, me: UserId, set: ProfileSet) {
        let Some(shard) = self.local_shard(home_shard_of_user(me)).cloned() else { return };
        let mut profile =
            shard.borrow().state().account(me).map(|a| a.profile.clone()).unwrap_or_default();
        if let Some(name) = set.display_name {
            profile.display_name = Some(name);
        }
        if let Some(about) = set.about {
            profile.about = Some(about);
        }
        if let Some(avatar) = set.avatar {
            profile.avatar = Some(avatar);
        }
        self.set_account_state(conn, rid, me, StateOp::SetProfile { user_id: me, profile });
    }

    /// Someone asks for `target`'s profile: routed to its core.
    pub(super) fn profile_get(&mut self, conn: ConnId, rid: u32, me: UserId, target: UserId) {
        let shard = home_shard_of_user(target);
        if shard >= self.shard_count() {
            let ty = MessageType::ProfileGet.code();
            return self.error_reply(conn, rid, ty, ErrorCode::NotFound, "no such user", 0);
        }
        if self.local_shard(shard).is_some() {
            let reply = self.profile_seen_by(target, me);
            return self.answer_profile(conn, rid, reply);
        }
        let core = self.placement.core_of_shard(shard);
        let request = Request::Profile { requester: me, target };
        self.ask(core, request, Some(Awaiting::Profile { conn, rid }));
    }

    pub(super) fn answer_profile(&mut self, conn: ConnId, rid: u32, profile: Option<Profile>) {
        match profile {
            Some(profile) => self.reply(conn, rid, &profile),
            None => {
                let ty = MessageType::ProfileGet.code();
                self.error_reply(conn, rid, ty, ErrorCode::NotFound, "no such user", 0)
            }
        }
    }

    /// What `viewer` may see of `target`'s profile (homed here).
    pub(super) fn profile_seen_by(&self, target: UserId, viewer: UserId) -> Option<Profile> {
        let shard = self.local_shard(home_shard_of_user(target))?.borrow();
        let account = shard.state().account(target)?;
        let blocked = account.blocked.contains(&viewer);
        let is_contact = account.contacts.contains(&viewer);
        let visible = |visibility: &Visibility| {
            target == viewer
                || !blocked
                    && match visibility {
                        Visibility::Everyone => true,
                        Visibility::Contacts => is_contact,
                        Visibility::Nobody => false,
                    }
        };
        let privacy = &account.privacy;
        let profile = &account.profile;
        Some(Profile {
            user_id: target,
            display_name: profile.display_name.clone().filter(|_| visible(&privacy.display_name)),
            about: profile.about.clone().filter(|_| visible(&privacy.about)),
            avatar: profile.avatar.filter(|_| visible(&privacy.avatar)),
        })
    }

    /// Stores a report for the operator.
    pub(super) fn report(
        &mut self,
        conn: ConnId,
        rid: u32,
        me: UserId,
        report: Report,
        now_ms: u64,
    ) {
        let record = ReportRecord {
            reporter: me,
            reported: report.user_id,
            message_ids: report.message_ids,
            reason: report.reason,
            comment: report.comment.chars().take(2000).collect(),
            time_ms: now_ms,
        };
        self.set_account_state(conn, rid, me, StateOp::AddReport { report: record });
    }

    /// Whether `user` (homed here) turned read receipts off.
    pub(super) fn read_receipts_off(&self, user: UserId) -> bool {
        self.local_shard(home_shard_of_user(user)).is_some_and(|shard| {
            shard.borrow().state().account(user).is_some_and(|a| !a.privacy.read_receipts)
        })
    }

    /// Serves another core's account requests.
    pub(super) fn serve_account_request(&mut self, request: Request) -> Option<Reply> {
        match request {
            Request::Discover { hashes } => Some(Reply::Discovered(self.discover_here(&hashes))),
            Request::Memberships { user_id } => {
                Some(Reply::Memberships(self.memberships_here(user_id)))
            }
            Request::Profile { requester, target } => {
                Some(Reply::Profile(self.profile_seen_by(target, requester).map(Box::new)))
            }
            _ => None,
        }
    }
}

/// JSON text for a string (escaped).
fn json(value: &str) -> String {
    crate::code_sender::json_string(value)
}

impl<S: Storage> Core<S> {
    /// Everything the server holds about `me` (homed here), as JSON, stored as a media
    /// blob the user downloads like any other (`ExportReady` names it). Group
    /// memberships are gathered from every core first.
    pub(super) fn export(&mut self, conn: ConnId, rid: u32, me: UserId, now_ms: u64) {
        let groups = self.memberships_here(me);
        let request = || Request::Memberships { user_id: me };
        self.gather(conn, rid, request, Gathered::Export { me, groups, now_ms });
    }

    fn export_ready(
        &mut self,
        conn: ConnId,
        rid: u32,
        me: UserId,
        groups: &[GroupMembership],
        now_ms: u64,
    ) {
        let ty = MessageType::ExportRequest.code();
        let shard_id = home_shard_of_user(me);
        let Some(handle) = self.local_shard(shard_id).cloned() else { return };
        let text = {
            let shard = handle.borrow();
            let state = shard.state();
            let Some(account) = state.account(me) else {
                let message = "the account was deleted";
                return self.error_reply(conn, rid, ty, ErrorCode::NotFound, message, 0);
            };
            let devices: Vec<String> = account
                .devices
                .iter()
                .map(|d| {
                    format!(
                        "{{\"device_id\":{},\"name\":{},\"created_ms\":{},\
                         \"one_time_keys\":{},\"push\":{}}}",
                        d.device_id,
                        json(&d.name),
                        d.created_ms,
                        d.one_time_keys.len(),
                        d.push.as_ref().map_or("null".into(), |p| json(&p.address)),
                    )
                })
                .collect();
            let visibility = |v: &Visibility| match v {
                Visibility::Everyone => "\"everyone\"",
                Visibility::Contacts => "\"contacts\"",
                Visibility::Nobody => "\"nobody\"",
            };
            let p = &account.privacy;
            let media: Vec<String> = state
                .media
                .values()
                .filter(|m| m.owner == me)
                .map(|m| {
                    let id: String = m.media_id.iter().map(|b| format!("{b:02x}")).collect();
                    format!("{{\"media_id\":\"{id}\",\"size_bytes\":{}}}", m.size_bytes)
                })
                .collect();
            let reports: Vec<String> = state
                .reports
                .iter()
                .filter(|r| r.reporter == me)
                .map(|r| format!("{{\"reported\":{},\"time_ms\":{}}}", r.reported, r.time_ms))
                .collect();
            let groups: Vec<String> = groups
                .iter()
                .map(|g| {
                    format!(
                        "{{\"group_id\":{},\"name\":{},\"admin\":{},\"joined_ms\":{},\
                         \"members\":{}}}",
                        g.group_id,
                        json(&g.name),
                        g.admin,
                        g.joined_ms,
                        g.members
                    )
                })
                .collect();
            let list =
                |ids: &[UserId]| ids.iter().map(|u| u.to_string()).collect::<Vec<_>>().join(",");
            format!(
                "{{\"user_id\":{me},\"phone\":{},\"created_ms\":{},\"last_seen_ms\":{},\
                 \"devices\":[{}],\"profile\":{{\"display_name\":{},\"about\":{}}},\
                 \"privacy\":{{\"last_seen\":{},\"online\":{},\"display_name\":{},\"about\":{},\
                 \"avatar\":{},\"read_receipts\":{}}},\"contacts\":[{}],\"blocked\":[{}],\
                 \"groups\":[{}],\"media\":[{}],\"reports\":[{}],\"exported_ms\":{now_ms}}}",
                json(&account.phone),
                account.created_ms,
                account.last_seen_ms,
                devices.join(","),
                account.profile.display_name.as_deref().map_or("null".into(), json),
                account.profile.about.as_deref().map_or("null".into(), json),
                visibility(&p.last_seen),
                visibility(&p.online),
                visibility(&p.display_name),
                visibility(&p.about),
                visibility(&p.avatar),
                p.read_receipts,
                list(&account.contacts),
                list(&account.blocked),
                groups.join(","),
                media.join(","),
                reports.join(","),
            )
        };
        match self.store_blob(me, MediaKind::Archive, text.as_bytes(), now_ms) {
            Ok((media_id, waits)) => {
                let ready = ExportReady { media_id, size_bytes: text.len() as u64 };
                self.reply_when_durable(conn, rid, &ready, waits);
            }
            Err((code, message)) => self.error_reply(conn, rid, ty, code, message, 0),
        }
    }
}

/// Wrong registration-lock PINs accepted per number and day.
const PIN_ATTEMPTS_PER_DAY: u32 = 5;

impl<S: Storage> Core<S> {
    /// Whether registering `phone` may take its account over: a locked account needs its
    /// PIN, with a few tries a day.
    pub(super) fn check_registration_lock(
        &mut self,
        phone: &str,
        verify: &ArchivedVerify,
        now_ms: u64,
    ) -> Result<(), (ErrorCode, &'static str, u32)> {
        let shard = super::home_shard_of_phone(phone, self.shard_count());
        let lock = self.local_shard(shard).and_then(|s| {
            let s = s.borrow();
            let user = s.state().user_by_phone(phone)?;
            s.state().account(user)?.registration_lock.clone()
        });
        let Some(lock) = lock else { return Ok(()) };
        let day = now_ms / DAY_MS;
        let attempts = self.pin_attempts.entry(phone.to_string()).or_insert((day, 0));
        if attempts.0 != day {
            *attempts = (day, 0);
        }
        if attempts.1 >= PIN_ATTEMPTS_PER_DAY {
            let wait = ((day + 1) * DAY_MS).saturating_sub(now_ms).min(u64::from(u32::MAX)) as u32;
            return Err((ErrorCode::RateLimited, "too many wrong PINs today", wait));
        }
        let pin = verify.registration_lock_pin.as_ref().map(|p| p.as_str());
        if pin.is_some_and(|pin| crate::secrets::pin_matches(pin, &lock)) {
            return Ok(());
        }
        attempts.1 += 1;
        Err((ErrorCode::RegistrationLocked, "this number is locked: give its PIN", 0))
    }
}

/// How long a proof-of-work challenge stays valid.
const POW_TTL_MS: u64 = 10 * 60 * 1000;

impl<S: Storage> Core<S> {
    /// The defences against SMS pumping before a code is sent: budgets per client
    /// address and per number prefix and hour, and (if configured) a proof of work.
    /// `Err` means the request was answered (a refusal or a challenge); `Ok` gives what
    /// to count once the code is sent ([`Core::spend_code_budget`]).
    pub(super) fn code_budget(
        &mut self,
        conn: ConnId,
        rid: u32,
        request: &ArchivedRequestCode,
        now_ms: u64,
    ) -> Result<CodeBudgetKeys, ()> {
        let phone = request.phone.as_str();
        let ty = MessageType::RequestCode.code();
        let prefix: String = phone.chars().take(6).collect();
        let address = self
            .conns
            .get(&conn)
            .and_then(|c| c.peer_ip)
            .filter(|ip| self.config.code_budget_loopback || !ip.is_loopback())
            .map(address_budget_key);
        let refused = match address.map(|a| self.code_address_requests.check(&a, now_ms)) {
            Some(Err(wait)) => Some((wait, "too many codes requested from this network address")),
            _ => match self.code_prefix_requests.check(&prefix, now_ms) {
                Err(wait) => Some((wait, "too many codes requested for numbers like this one")),
                Ok(()) => None,
            },
        };
        if let Some((wait, message)) = refused {
            self.counters.codes_refused += 1;
            self.error_reply(conn, rid, ty, ErrorCode::RateLimited, message, wait as u32);
            return Err(());
        }
        let bits = self.config.code_pow_bits;
        if bits > 0 {
            let solved = match (request.proof_of_work.as_ref(), self.pow_challenges.get(phone)) {
                (Some(pow), Some((challenge, expires))) => {
                    *expires > now_ms
                        && pow.challenge.as_slice() == challenge.as_slice()
                        && pow_solves(challenge, pow.nonce.to_native(), bits)
                }
                _ => false,
            };
            if !solved {
                let mut challenge = vec![0u8; 16];
                getrandom::fill(&mut challenge).expect("the OS random source works");
                let answer = PowChallenge { challenge: challenge.clone(), difficulty_bits: bits };
                self.pow_challenges.insert(phone.to_string(), (challenge, now_ms + POW_TTL_MS));
                self.counters.pow_challenges += 1;
                self.reply(conn, rid, &answer);
                return Err(());
            }
            self.pow_challenges.remove(phone);
        }
        Ok(CodeBudgetKeys { prefix, address })
    }

    /// Counts a code sent against the prefix and address budgets.
    pub(super) fn spend_code_budget(&mut self, keys: CodeBudgetKeys, now_ms: u64) {
        self.code_prefix_requests.record(keys.prefix, now_ms);
        if let Some(address) = keys.address {
            self.code_address_requests.record(address, now_ms);
        }
    }
}

/// What a code request is counted under once a code is sent.
pub(super) struct CodeBudgetKeys {
    prefix: String,
    address: Option<std::net::IpAddr>,
}

/// What a per-address budget counts: an IPv4 address, or the /64 network of an IPv6
/// address (one host usually holds a whole /64, so single addresses cost nothing).
fn address_budget_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V4(_) => ip,
        std::net::IpAddr::V6(v6) => {
            let network = u128::from(v6) & !((1u128 << 64) - 1);
            std::net::IpAddr::V6(network.into())
        }
    }
}

impl<S: Storage> Core<S> {
    /// Deletes `me`'s account (primary only, the phone number as confirmation): its
    /// devices and tokens (refused at once), keys, mailboxes, profile, privacy, contacts,
    /// blocks, media and group memberships. Groups keep their epoch: the other members'
    /// verified views are not disturbed, and a member without devices receives nothing.
    pub(super) fn delete_account(
        &mut self,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        phone: &str,
    ) {
        let ty = MessageType::DeleteAccount.code();
        let shard_id = home_shard_of_user(me.0);
        let Some(handle) = self.local_shard(shard_id).cloned() else { return };
        let account_phone = handle.borrow().state().account(me.0).map(|a| a.phone.clone());
        if me.1 != 1 {
            let message = "only the primary device deletes the account";
            return self.error_reply(conn, rid, ty, ErrorCode::Forbidden, message, 0);
        }
        if account_phone.as_deref() != Some(phone) {
            let message = "give the account's phone number to confirm";
            return self.error_reply(conn, rid, ty, ErrorCode::InvalidArgument, message, 0);
        }
        // Mailboxes go, and every connection of the account.
        for device in self.devices_of(me.0).unwrap_or_default() {
            let last = handle.borrow().mailbox_next_seq(device);
            if last > 0 {
                let dropped = handle.borrow_mut().ack(device, last - 1);
                if let Err(error) = dropped {
                    tracing::warn!(%error, "could not drop a deleted account's mailbox");
                }
            }
            if let Some(other) = self.online.remove(&device) {
                if other != conn {
                    if let Some(c) = self.conns.get_mut(&other) {
                        c.state = ConnState::Open;
                        c.closing = true;
                        c.wake();
                    }
                }
            }
            self.pushed.remove(&device);
        }
        // Its media.
        let owned: Vec<MediaId> = handle
            .borrow()
            .state()
            .media
            .values()
            .filter(|m| m.owner == me.0)
            .map(|m| m.media_id)
            .collect();
        for media_id in owned {
            self.forget_media(&media_id);
        }
        // Its group memberships, on every core.
        for core in 0..self.placement.count {
            if core == self.placement.index {
                self.forget_member(me.0);
            } else {
                self.ask(core, Request::ForgetMember { user_id: me.0 }, None);
            }
        }
        self.watching.remove(&me.0);
        self.watchers.remove(&me.0);
        if let Some(phone) = account_phone {
            self.phone_index.remove(&phone_hash(&phone));
        }
        let deleted = handle.borrow_mut().apply_state(StateOp::DeleteAccount { user_id: me.0 });
        match deleted {
            Ok(seq) => {
                tracing::info!(user_id = me.0, "account deleted");
                self.reply_when_durable(conn, rid, &Done {}, vec![(shard_id, seq)]);
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.state = ConnState::Open;
                }
            }
            Err(error) => self.storage_error(conn, rid, ty, &error),
        }
    }

    /// Removes a deleted user from the groups homed on this core.
    pub(super) fn forget_member(&mut self, user_id: UserId) {
        for (_, shard) in self.owned_shards() {
            let groups: Vec<_> = shard
                .borrow()
                .state()
                .groups
                .values()
                .filter(|g| g.members.iter().any(|m| m.user_id == user_id))
                .cloned()
                .collect();
            for mut group in groups {
                group.members.retain(|m| m.user_id != user_id);
                if !group.members.is_empty() && !group.members.iter().any(|m| m.admin) {
                    if let Some(oldest) = group.members.iter_mut().min_by_key(|m| m.joined_ms) {
                        oldest.admin = true;
                    }
                }
                let stored = shard.borrow_mut().apply_state(StateOp::PutGroup { group });
                if let Err(error) = stored {
                    tracing::warn!(%error, "could not remove a deleted user from a group");
                }
            }
            for watchers in self.watchers.values_mut() {
                watchers.remove(&user_id);
            }
        }
    }
}
