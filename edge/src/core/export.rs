//! An account's export: everything the server holds about a user, as JSON.
//!
//! The account lives on its home core, its group memberships on every core that homes
//! one of its groups: the export asks every core ([`ListMemberships`]), then writes the
//! document as a media blob the user downloads like any other (`ExportReady` names
//! it). The JSON is made by `serde_json` from the types below: their field names are the
//! document's (documented in `docs/PROTOCOL.md`, "Account export").
//!
//! Each export asks every core and keeps a blob for the media TTL, so an account has
//! one in progress at a time and [`EXPORTS_PER_DAY_MAX`] a day (counted on its home
//! core, in memory); the blob counts in the account's media bytes.

use std::collections::HashMap;

use serde::Serialize;
use tern_engine::{AccountRecord, Storage};
use tern_wire::messages::{MediaKind, UserId, Visibility};
use tern_wire::MessageType;

use super::conns::ConnId;
use super::media::{Media, StoredBlob};
use super::shared::Shared;
use crate::limits::DailyCount;
use crate::mesh::calls::ListMemberships;
use crate::mesh::GroupMembership;
use crate::refusal::AccountRefusal;
use crate::routing::Address;

/// Exports one account may ask for per day (more is a quota refusal).
pub const EXPORTS_PER_DAY_MAX: u32 = 3;

/// An export waiting for every core's memberships.
#[derive(Debug)]
struct Pending {
    conn: ConnId,
    rid: u32,
    me: UserId,
    remaining_cores: usize,
    groups: Vec<GroupMembership>,
}

/// Exports in progress on one core.
#[derive(Debug, Default)]
pub struct Exports {
    pending: HashMap<u64, Pending>,
    parts: HashMap<u64, u64>,
    /// Exports asked for today, per account.
    today: DailyCount<UserId>,
}

impl Exports {
    /// `me` (homed here) asks for an export.
    pub fn start<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        me: UserId,
    ) {
        let ty = MessageType::ExportRequest.code();
        if let Err(refusal) = super::media::check_disk_reserve(shared) {
            return shared.conns.refuse(conn, rid, ty, &AccountRefusal::Export { refusal });
        }
        if self.pending.values().any(|p| p.me == me) {
            let refusal = AccountRefusal::TooMany { what: "exports in progress", count: 2, max: 1 };
            return shared.conns.refuse(conn, rid, ty, &refusal);
        }
        if let Err(count) = self.today.take(me, shared.now_ms(), EXPORTS_PER_DAY_MAX) {
            let (count, max) = (count as usize, EXPORTS_PER_DAY_MAX as usize);
            let refusal = AccountRefusal::TooMany { what: "exports today", count, max };
            return shared.conns.refuse(conn, rid, ty, &refusal);
        }
        let id = shared.outbox.token();
        let cores = shared.shards.placement().count;
        for core in 0..cores {
            let token = shared.outbox.ask(Address::local(core), ListMemberships { user_id: me });
            self.parts.insert(token, id);
        }
        let pending =
            Pending { conn, rid, me, remaining_cores: cores as usize, groups: Vec::new() };
        self.pending.insert(id, pending);
    }

    /// One core's memberships; with the last, the document is written.
    pub fn on_memberships<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        media: &mut Media,
        token: u64,
        groups: Vec<GroupMembership>,
    ) {
        let Some(id) = self.parts.remove(&token) else { return };
        let Some(pending) = self.pending.get_mut(&id) else { return };
        pending.groups.extend(groups);
        pending.remaining_cores -= 1;
        if pending.remaining_cores > 0 {
            return;
        }
        let Some(Pending { conn, rid, me, mut groups, .. }) = self.pending.remove(&id) else {
            return;
        };
        groups.sort_by_key(|g| g.group_id);
        let document =
            shared.shards.with_account(me, |account| export_json(shared, account, &groups));
        let ty = MessageType::ExportRequest.code();
        let Some(Ok(json)) = document else {
            return shared.conns.refuse(conn, rid, ty, &AccountRefusal::Deleted);
        };
        let stored =
            media.store_blob(shared, me, MediaKind::Archive, json, StoredBlob { conn, rid });
        if let Err(refusal) = stored {
            // Refused for space, not made: it does not count against today's exports.
            self.today.give_back(&me, shared.now_ms());
            shared.conns.refuse(conn, rid, ty, &AccountRefusal::Export { refusal });
        }
    }
}

/// The export document (field names are the JSON's).
#[derive(Serialize)]
struct Export<'a> {
    user_id: UserId,
    phone: &'a str,
    created_ms: u64,
    last_seen_ms: u64,
    devices: Vec<Device<'a>>,
    profile: ExportProfile<'a>,
    privacy: Privacy,
    contacts: &'a [UserId],
    blocked: &'a [UserId],
    groups: Vec<Group<'a>>,
    media: Vec<Blob>,
    reports: Vec<ReportMade>,
    exported_ms: u64,
}

#[derive(Serialize)]
struct Device<'a> {
    device_id: u32,
    name: &'a str,
    created_ms: u64,
    one_time_keys: usize,
    push: Option<&'a str>,
}

#[derive(Serialize)]
struct ExportProfile<'a> {
    display_name: Option<&'a str>,
    about: Option<&'a str>,
}

#[derive(Serialize)]
struct Privacy {
    last_seen: &'static str,
    online: &'static str,
    display_name: &'static str,
    about: &'static str,
    avatar: &'static str,
    read_receipts: bool,
}

#[derive(Serialize)]
struct Group<'a> {
    group_id: u64,
    name: &'a str,
    admin: bool,
    joined_ms: u64,
    members: u32,
}

#[derive(Serialize)]
struct Blob {
    media_id: String,
    size_bytes: u64,
}

#[derive(Serialize)]
struct ReportMade {
    reported: UserId,
    time_ms: u64,
}

fn visibility(v: &Visibility) -> &'static str {
    match v {
        Visibility::Everyone => "everyone",
        Visibility::Contacts => "contacts",
        Visibility::Nobody => "nobody",
    }
}

/// The document for `account` (homed here) with its `groups`.
fn export_json<S: Storage>(
    shared: &Shared<S>,
    account: &AccountRecord,
    groups: &[GroupMembership],
) -> serde_json::Result<Vec<u8>> {
    let me = account.user_id;
    let shard = shared.shards.home_of(me).map(|s| s.borrow());
    let state = shard.as_ref().map(|s| s.state());
    let media = state.iter().flat_map(|s| s.media.values()).filter(|m| m.owner == me);
    let reports = state.iter().flat_map(|s| s.reports.iter()).filter(|r| r.reporter == me);
    let p = &account.privacy;
    let export = Export {
        user_id: me,
        phone: &account.phone,
        created_ms: account.created_ms,
        last_seen_ms: account.last_seen_ms,
        devices: account
            .devices
            .iter()
            .map(|d| Device {
                device_id: d.device_id,
                name: &d.name,
                created_ms: d.created_ms,
                one_time_keys: d.one_time_keys.len(),
                push: d.push.as_ref().map(|p| p.address.as_str()),
            })
            .collect(),
        profile: ExportProfile {
            display_name: account.profile.display_name.as_deref(),
            about: account.profile.about.as_deref(),
        },
        privacy: Privacy {
            last_seen: visibility(&p.last_seen),
            online: visibility(&p.online),
            display_name: visibility(&p.display_name),
            about: visibility(&p.about),
            avatar: visibility(&p.avatar),
            read_receipts: p.read_receipts,
        },
        contacts: &account.contacts,
        blocked: &account.blocked,
        groups: groups
            .iter()
            .map(|g| Group {
                group_id: g.group_id,
                name: &g.name,
                admin: g.admin,
                joined_ms: g.joined_ms,
                members: g.members,
            })
            .collect(),
        media: media
            .map(|m| Blob {
                media_id: m.media_id.iter().map(|b| format!("{b:02x}")).collect(),
                size_bytes: m.size_bytes,
            })
            .collect(),
        reports: reports.map(|r| ReportMade { reported: r.reported, time_ms: r.time_ms }).collect(),
        exported_ms: shared.now_ms(),
    };
    serde_json::to_vec(&export)
}
