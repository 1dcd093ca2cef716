//! Deleting an account: everything the server holds about it goes.
//!
//! Only the primary device deletes, with the account's phone number as confirmation.
//! Its devices and tokens (refused at once), keys, mailboxes, profile, privacy,
//! contacts, blocks and media go now; its group memberships on every core (a
//! `ForgetMember` tell each). Groups keep their epoch: the other members' verified views
//! are not disturbed, and a member without devices receives nothing. The engine's
//! `DeleteAccount` record schedules the erasure of its records from disk at the next
//! maintenance pass (docs/STORAGE.md, section 7).

use tern_engine::{StateOp, Storage};
use tern_wire::messages::{DeviceId, Done, UserId};
use tern_wire::MessageType;

use super::accounts::{drop_mailbox, Accounts};
use super::conns::{ConnId, ConnState};
use super::media::Media;
use super::presence::Presence;
use super::shared::Shared;
use super::wakeups::Wakeups;
use crate::mesh::Tell;
use crate::refusal::{AccountRefusal, StorageRefusal};
use crate::routing::Address;

/// The subsystems an account deletion reaches into.
pub struct Reach<'a> {
    /// Phone index.
    pub accounts: &'a mut Accounts,
    /// Blobs.
    pub media: &'a mut Media,
    /// Followers and followed.
    pub presence: &'a mut Presence,
    /// Wake-ups sent.
    pub wakeups: &'a mut Wakeups,
}

/// What goes with an account besides its state record (the caller applies the engine's
/// `DeleteAccount`): the mailboxes of its `devices`, their sessions (but `keep`'s, the
/// connection asking), wake-ups, media, group memberships on every core (a
/// `ForgetMember` tell each), followers, the phone index. Shared by a deletion and by a
/// number registered afresh without the registration-lock PIN (the new owner starts with
/// nothing of the old one's).
pub fn erase_all_but_the_record<S: Storage>(
    shared: &mut Shared<S>,
    reach: Reach<'_>,
    (user_id, devices): (UserId, &[DeviceId]),
    phone: &str,
    keep: Option<ConnId>,
) {
    for &device_id in devices {
        let device = (user_id, device_id);
        drop_mailbox(shared, device);
        if keep.is_some() && shared.conns.online(device) == keep {
            shared.conns.forget_online(device);
        } else {
            shared.conns.end_session(device);
        }
        reach.wakeups.forget(device);
    }
    for media_id in Media::owned_by(shared, user_id) {
        reach.media.forget(shared, &media_id);
    }
    for core in 0..shared.shards.placement().count {
        shared.outbox.tell(Address::local(core), Tell::ForgetMember { user_id });
    }
    reach.presence.forget(user_id);
    reach.accounts.deleted(phone, user_id);
}

/// Deletes `me`'s account (homed here).
pub fn delete_account<S: Storage>(
    shared: &mut Shared<S>,
    reach: Reach<'_>,
    (conn, rid): (ConnId, u32),
    me: (UserId, DeviceId),
    phone: &str,
) {
    let ty = MessageType::DeleteAccount.code();
    let account_phone = shared.shards.with_account(me.0, |a| a.phone.clone());
    if me.1 != 1 {
        return shared.conns.refuse(conn, rid, ty, &AccountRefusal::DeleteNotPrimary);
    }
    if account_phone.as_deref() != Some(phone) {
        return shared.conns.refuse(conn, rid, ty, &AccountRefusal::DeleteConfirm);
    }
    let devices = shared.shards.devices_of(me.0).unwrap_or_default();
    let devices: Vec<DeviceId> = devices.into_iter().map(|(_, device)| device).collect();
    erase_all_but_the_record(shared, reach, (me.0, &devices), phone, Some(conn));
    match shared.shards.apply_for(me.0, StateOp::DeleteAccount { user_id: me.0 }) {
        Some(Ok(wait)) => {
            tracing::info!(user_id = me.0, "account deleted");
            shared.reply_when_durable(conn, rid, &Done {}, vec![wait]);
            if let Some(c) = shared.conns.get_mut(conn) {
                c.state = ConnState::Open;
            }
        }
        Some(Err(error)) => shared.conns.refuse(conn, rid, ty, &StorageRefusal::of(&error)),
        None => {}
    }
}
