//! Accounts: unlinking devices, contact discovery, profiles, privacy, blocks, reports.
//!
//! - **Unlink** removes a device (its token stops working at once: the device record and
//!   its token hash go), drops its mailbox, closes its connection and tells the account's
//!   other devices. The primary unlinks anyone; a companion only itself.
//! - **Discovery** answers which of the given truncated SHA-256 phone hashes are
//!   registered, never more: each core keeps an index of the numbers homed on its shards
//!   and looks up only what is asked; the asking core counts hashes against a daily
//!   budget per account (so the user base cannot be enumerated) and gathers every core's
//!   answer ([`FindPhones`], its own included).
//! - **Profiles**: name, about and avatar, each shown only as the owner's privacy setting
//!   allows (and nothing to someone the owner blocked).
//! - **Settings** that change what others may see (privacy, contacts, blocks) re-tell
//!   the presence watchers.

use std::collections::HashMap;

use tern_engine::{ReportRecord, StateOp, Storage};
use tern_wire::accounts::phone_hash;
use tern_wire::messages::{
    ContactMatch, ContactMatches, DeviceId, DeviceListChanged, Done, PhoneHash, Profile,
    ProfileSet, Report, UserId, Visibility,
};
use tern_wire::{Message, MessageType};

use super::conns::ConnId;
use super::presence::Presence;
use super::shared::Shared;
use super::wakeups::Wakeups;
use crate::mesh::calls::{FindPhones, ReadProfile};
use crate::mesh::ReplyTo;
use crate::refusal::{retry_hint, AccountRefusal, OtherNodeRefusal, StorageRefusal};
use crate::routing::home_shard_of_user;

const DAY_MS: u64 = 24 * 3600 * 1000;
/// Characters of a report's comment kept.
const REPORT_COMMENT_CHARS_MAX: usize = 2000;
/// Contacts an account may list.
pub const CONTACTS_MAX: usize = 5_000;
/// Users an account may block.
pub const BLOCKS_MAX: usize = 10_000;
/// Message ids one report may name.
pub const REPORT_MESSAGE_IDS_MAX: usize = 100;
/// Reports one account may file in any 24 hours: reports are kept for the operator
/// for good, so they need a bound beyond the request budget's rate.
pub const REPORTS_PER_DAY_MAX: usize = 50;

/// The per-account quotas an account frame could pass: contacts, blocks, the message
/// ids of a report, reports a day. Checked before anything is stored.
pub fn check_quota<S: Storage>(
    shared: &Shared<S>,
    me: UserId,
    message: &Message<'_>,
) -> Result<(), AccountRefusal> {
    let over = |what, count: usize, max: usize| match count > max {
        true => Err(AccountRefusal::TooMany { what, count, max }),
        false => Ok(()),
    };
    match message {
        Message::SetContacts(contacts) => over("contacts", contacts.user_ids.len(), CONTACTS_MAX),
        Message::Report(report) => {
            over("message ids in a report", report.message_ids.len(), REPORT_MESSAGE_IDS_MAX)?;
            let filed = reports_filed_today(shared, me);
            over("reports in 24 hours", filed + 1, REPORTS_PER_DAY_MAX)
        }
        Message::Block(block) => {
            let other = block.user_id.to_native();
            let (count, already) = shared
                .shards
                .with_account(me, |a| (a.blocked.len(), a.blocked.contains(&other)))
                .unwrap_or((0, false));
            over("blocked users", count + usize::from(!already), BLOCKS_MAX)
        }
        _ => Ok(()),
    }
}

/// Reports `me` filed in the last 24 hours. They are stored on its home shard in the
/// order they came, so the scan goes back from the newest and stops at the first older
/// than a day: it reads only the shard's last day of reports.
fn reports_filed_today<S: Storage>(shared: &Shared<S>, me: UserId) -> usize {
    let Some(shard) = shared.shards.home_of(me) else { return 0 };
    let since_ms = shared.now_ms().saturating_sub(DAY_MS);
    let shard = shard.borrow();
    let recent = shard.state().reports.iter().rev().take_while(|r| r.time_ms > since_ms);
    recent.filter(|r| r.reporter == me).count()
}

/// A discovery waiting for every core's part.
#[derive(Debug)]
struct Discovery {
    conn: ConnId,
    rid: u32,
    remaining_cores: usize,
    matches: Vec<ContactMatch>,
    remaining_today: u32,
}

/// The account state of one core.
#[derive(Debug, Default)]
pub struct Accounts {
    /// Truncated phone hashes of the accounts on this core's shards (discovery).
    phone_index: HashMap<PhoneHash, UserId>,
    /// Hashes each account looked up today: (day, count).
    discovery_used: HashMap<UserId, (u64, u32)>,
    discovery_day: u64,
    /// Discoveries by gathering id; their parts by call token.
    discoveries: HashMap<u64, Discovery>,
    parts: HashMap<u64, u64>,
    /// Profile reads waiting for the target's core: token → (connection, request).
    profiles: HashMap<u64, (ConnId, u32)>,
}

impl Accounts {
    /// Indexes the phone numbers of the accounts on this core's shards.
    pub fn new<S: Storage>(shared: &Shared<S>) -> Accounts {
        let mut phone_index = HashMap::new();
        for (_, shard) in shared.shards.owned() {
            for account in shard.borrow().state().accounts.values() {
                phone_index.insert(phone_hash(&account.phone), account.user_id);
            }
        }
        Accounts { phone_index, ..Accounts::default() }
    }

    /// A number was registered here.
    pub fn registered(&mut self, phone: &str, user_id: UserId) {
        self.phone_index.insert(phone_hash(phone), user_id);
    }

    /// An account homed here is gone.
    pub fn deleted(&mut self, phone: &str, user_id: UserId) {
        self.phone_index.remove(&phone_hash(phone));
        self.discovery_used.remove(&user_id);
    }

    /// A device asks which of its address book's numbers are registered.
    pub fn discover<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        me: UserId,
        hashes: Vec<PhoneHash>,
    ) {
        let now_ms = shared.now_ms();
        let day = now_ms / DAY_MS;
        if day != self.discovery_day {
            // Yesterday's counts are void: the map holds today's askers only.
            self.discovery_day = day;
            self.discovery_used.clear();
        }
        let budget = shared.config.discovery_per_day;
        let used = self.discovery_used.entry(me).or_insert((day, 0));
        let asked = hashes.len() as u32;
        if used.1.saturating_add(asked) > budget {
            let wait = ((day + 1) * DAY_MS).saturating_sub(now_ms);
            let refusal = AccountRefusal::DiscoveryBudget { retry_after_ms: retry_hint(wait) };
            return shared.conns.refuse(conn, rid, MessageType::ContactDiscover.code(), &refusal);
        }
        used.1 += asked;
        let remaining_today = budget - used.1;
        let id = shared.outbox.token();
        let cores = shared.shards.placement().count;
        for core in 0..cores {
            let token = shared
                .outbox
                .ask(crate::routing::Address::local(core), FindPhones { hashes: hashes.clone() });
            self.parts.insert(token, id);
        }
        let discovery = Discovery {
            conn,
            rid,
            remaining_cores: cores as usize,
            matches: Vec::new(),
            remaining_today,
        };
        self.discoveries.insert(id, discovery);
    }

    /// Which of the asked hashes are registered here.
    pub fn serve_find(
        &self,
        shared: &mut Shared<impl Storage>,
        call: FindPhones,
        reply_to: Option<ReplyTo<FindPhones>>,
    ) {
        let matches = call
            .hashes
            .iter()
            .filter_map(|hash| {
                Some(ContactMatch { hash: *hash, user_id: *self.phone_index.get(hash)? })
            })
            .collect();
        shared.answer(reply_to, matches);
    }

    /// One core's part of a discovery.
    pub fn on_found<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        token: u64,
        matches: Vec<ContactMatch>,
    ) {
        let Some(id) = self.parts.remove(&token) else { return };
        let Some(discovery) = self.discoveries.get_mut(&id) else { return };
        discovery.matches.extend(matches);
        discovery.remaining_cores -= 1;
        if discovery.remaining_cores == 0 {
            if let Some(d) = self.discoveries.remove(&id) {
                let answer =
                    ContactMatches { matches: d.matches, remaining_today: d.remaining_today };
                shared.conns.send(d.conn, d.rid, &answer);
            }
        }
    }

    /// Someone asks for `target`'s profile: read on its core.
    pub fn profile_get<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        me: UserId,
        target: UserId,
    ) {
        let shard = home_shard_of_user(target);
        if !shared.shards.exists(shard) {
            return shared.conns.refuse(
                conn,
                rid,
                MessageType::ProfileGet.code(),
                &AccountRefusal::NoSuchUser,
            );
        }
        if !shared.homes.serves(shard) {
            let refusal = OtherNodeRefusal { shard };
            return shared.conns.refuse(conn, rid, MessageType::ProfileGet.code(), &refusal);
        }
        let token = shared
            .outbox
            .ask(shared.shards.address_of(shard), ReadProfile { requester: me, target });
        self.profiles.insert(token, (conn, rid));
    }

    /// The target's core answered a profile read.
    pub fn on_profile<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        token: u64,
        profile: Option<Profile>,
    ) {
        let Some((conn, rid)) = self.profiles.remove(&token) else { return };
        match profile {
            Some(profile) => shared.conns.send(conn, rid, &profile),
            None => shared.conns.refuse(
                conn,
                rid,
                MessageType::ProfileGet.code(),
                &AccountRefusal::NoSuchUser,
            ),
        }
    }
}

/// What `viewer` may see of `target`'s profile (homed here).
pub fn serve_profile<S: Storage>(
    shared: &mut Shared<S>,
    call: ReadProfile,
    reply_to: Option<ReplyTo<ReadProfile>>,
) {
    let ReadProfile { requester: viewer, target } = call;
    let profile = shared.shards.with_account(target, |account| {
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
        let (privacy, profile) = (&account.privacy, &account.profile);
        Profile {
            user_id: target,
            display_name: profile.display_name.clone().filter(|_| visible(&privacy.display_name)),
            about: profile.about.clone().filter(|_| visible(&privacy.about)),
            avatar: profile.avatar.filter(|_| visible(&privacy.avatar)),
        }
    });
    shared.answer(reply_to, profile);
}

/// Applies an account setting that changes what others may see, then re-tells the
/// watchers; `Done` once durable.
pub fn set_state<S: Storage>(
    shared: &mut Shared<S>,
    presence: &mut Presence,
    (conn, rid, ty): (ConnId, u32, u16),
    me: UserId,
    op: StateOp,
) {
    match shared.shards.apply_for(me, op) {
        Some(Ok(wait)) => {
            presence.changed(shared, me, true);
            shared.reply_when_durable(conn, rid, &Done {}, vec![wait]);
        }
        Some(Err(error)) => shared.conns.refuse(conn, rid, ty, &StorageRefusal::of(&error)),
        None => shared.conns.refuse(conn, rid, ty, &AccountRefusal::NoAccount),
    }
}

/// Sets this account's profile (fields given replace, the others stay).
pub fn profile_set<S: Storage>(
    shared: &mut Shared<S>,
    presence: &mut Presence,
    conn: ConnId,
    rid: u32,
    me: UserId,
    set: ProfileSet,
) {
    let mut profile = shared.shards.with_account(me, |a| a.profile.clone()).unwrap_or_default();
    profile.display_name = set.display_name.or(profile.display_name);
    profile.about = set.about.or(profile.about);
    profile.avatar = set.avatar.or(profile.avatar);
    let ty = MessageType::ProfileSet.code();
    set_state(shared, presence, (conn, rid, ty), me, StateOp::SetProfile { user_id: me, profile });
}

/// Stores a report for the operator.
pub fn report<S: Storage>(
    shared: &mut Shared<S>,
    presence: &mut Presence,
    conn: ConnId,
    rid: u32,
    me: UserId,
    report: Report,
) {
    let record = ReportRecord {
        reporter: me,
        reported: report.user_id,
        message_ids: report.message_ids,
        reason: report.reason,
        comment: report.comment.chars().take(REPORT_COMMENT_CHARS_MAX).collect(),
        time_ms: shared.now_ms(),
    };
    let ty = MessageType::Report.code();
    set_state(shared, presence, (conn, rid, ty), me, StateOp::AddReport { report: record });
}

/// The account's privacy settings.
pub fn privacy_get<S: Storage>(shared: &mut Shared<S>, conn: ConnId, rid: u32, me: UserId) {
    match shared.shards.with_account(me, |a| a.privacy.clone()) {
        Some(privacy) => shared.conns.send(conn, rid, &privacy),
        None => shared.conns.refuse(
            conn,
            rid,
            MessageType::PrivacyGet.code(),
            &AccountRefusal::NoAccount,
        ),
    }
}

/// Removes a device from `me`'s account.
pub fn unlink<S: Storage>(
    shared: &mut Shared<S>,
    wakeups: &mut Wakeups,
    conn: ConnId,
    rid: u32,
    me: (UserId, DeviceId),
    device_id: DeviceId,
) {
    let ty = MessageType::Unlink.code();
    let refused = if me.1 != 1 && device_id != me.1 {
        Some(AccountRefusal::UnlinkOthers)
    } else if device_id == 1 {
        Some(AccountRefusal::UnlinkPrimary)
    } else if shared.shards.devices_of(me.0).is_none_or(|d| !d.contains(&(me.0, device_id))) {
        Some(AccountRefusal::NoSuchDevice)
    } else {
        None
    };
    if let Some(refusal) = refused {
        return shared.conns.refuse(conn, rid, ty, &refusal);
    }
    let device = (me.0, device_id);
    drop_mailbox(shared, device);
    let wait = match shared
        .shards
        .apply_for(me.0, StateOp::RemoveDevice { user_id: me.0, device_id })
    {
        Some(Ok(wait)) => wait,
        Some(Err(error)) => return shared.conns.refuse(conn, rid, ty, &StorageRefusal::of(&error)),
        None => return,
    };
    // Its connection is closed at once.
    shared.conns.end_session(device);
    wakeups.forget(device);
    let remaining = shared.shards.devices_of(me.0).unwrap_or_default();
    let changed =
        DeviceListChanged { user_id: me.0, device_ids: remaining.iter().map(|d| d.1).collect() };
    for (_, other) in shared.conns.online_devices(me.0) {
        shared.conns.send(other, 0, &changed);
    }
    shared.reply_when_durable(conn, rid, &Done {}, vec![wait]);
}

/// Releases everything queued for `device` (homed here).
pub fn drop_mailbox<S: Storage>(shared: &mut Shared<S>, device: (UserId, DeviceId)) {
    let Some(handle) = shared.shards.home_of(device.0).cloned() else { return };
    let last = handle.borrow().mailbox_next_seq(device);
    if last > 0 {
        if let Err(error) = handle.borrow_mut().ack(device, last - 1) {
            tracing::warn!(%error, "could not drop a mailbox");
        }
    }
}
