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
    // Mailboxes go, and every other connection of the account.
    for device in shared.shards.devices_of(me.0).unwrap_or_default() {
        drop_mailbox(shared, device);
        if shared.conns.online(device) == Some(conn) {
            shared.conns.forget_online(device);
        } else {
            shared.conns.end_session(device);
        }
        reach.wakeups.forget(device);
    }
    for media_id in Media::owned_by(shared, me.0) {
        reach.media.forget(shared, &media_id);
    }
    for core in 0..shared.shards.placement().count {
        shared.outbox.tell(Address::local(core), Tell::ForgetMember { user_id: me.0 });
    }
    reach.presence.forget(me.0);
    reach.accounts.deleted(phone, me.0);
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
