//! Messages from cores (this one included) and results from the work pool: which
//! subsystem serves each call, finishes each continuation, or does each tell.
//!
//! Every call's answer is matched here by its variant to the continuation of the same
//! call only (the [`Reply`] variants carry their call's answer type), so a mismatch
//! cannot be written; likewise every work result to the continuation of its job type.

use tern_engine::Storage;

use super::delivery::{receipts, store};
use super::groups;
use super::parts::Parts;
use super::presence;
use super::shared::Shared;
use crate::mesh::{CoreMsg, Reply, Request, Tell};
use crate::stats::CoreStats;
use crate::work::WorkDone;

/// Handles one message for this core; a metrics snapshot is handed back to the caller.
pub fn dispatch<S: Storage>(
    shared: &mut Shared<S>,
    parts: &mut Parts,
    message: CoreMsg,
) -> Option<Box<CoreStats>> {
    match message {
        CoreMsg::Request(request) => serve(shared, parts, request),
        CoreMsg::Reply(reply) => on_reply(shared, parts, reply),
        CoreMsg::Tell(tell) => on_tell(shared, parts, tell),
        CoreMsg::Stats(stats) => return Some(stats),
    }
    None
}

/// Serves another core's (or this core's) call.
fn serve<S: Storage>(shared: &mut Shared<S>, parts: &mut Parts, request: Request) {
    match request {
        Request::StoreCopies(call, reply_to) => {
            store::serve_store_copies(shared, &mut parts.wakeups, call, reply_to)
        }
        Request::StoreServerEnvelope(call, reply_to) => {
            store::serve_server_envelope(shared, call, reply_to)
        }
        Request::UnqueueMessages(call, reply_to) => receipts::serve_unqueue(shared, call, reply_to),
        Request::ClaimBundles(call, reply_to) => parts.keys.serve_claim(shared, call, reply_to),
        Request::ClaimLink(call, reply_to) => parts.linking.serve_claim(shared, call, reply_to),
        Request::ApplyGroupChange(call, reply_to) => {
            parts.groups.serve_change(shared, call, reply_to)
        }
        Request::OrderGroupMessage(call, reply_to) => {
            parts.groups.serve_order(shared, call, reply_to)
        }
        Request::StoreGroupCopies(delivery, reply_to) => {
            groups::serve_store(shared, &mut parts.wakeups, delivery, reply_to)
        }
        Request::ReadGroup(call, reply_to) => groups::serve_read(shared, call, reply_to),
        Request::CheckGroupAdds(call, reply_to) => {
            groups::admission::serve_check(shared, call, reply_to)
        }
        Request::ReadMedia(call, reply_to) => parts.media.serve_read(shared, call, reply_to),
        Request::FindPhones(call, reply_to) => parts.accounts.serve_find(shared, call, reply_to),
        Request::ListMemberships(call, reply_to) => {
            let memberships = groups::memberships_here(shared, call.user_id);
            shared.answer(reply_to, memberships)
        }
        Request::ReadProfile(call, reply_to) => {
            super::accounts::serve_profile(shared, call, reply_to)
        }
    }
}

/// Finishes the continuation an answer is for.
fn on_reply<S: Storage>(shared: &mut Shared<S>, parts: &mut Parts, reply: Reply) {
    match reply {
        Reply::StoreCopies(token, answer) => {
            parts.delivery.on_stored(shared, &mut parts.wakeups, token, answer)
        }
        Reply::StoreServerEnvelope(token, answer) => {
            parts.delivery.receipts().on_read_stored(shared, token, answer)
        }
        Reply::UnqueueMessages(token, ()) => parts.delivery.receipts().on_unqueued(shared, token),
        Reply::ClaimBundles(token, answer) => parts.keys.on_bundles(shared, token, answer),
        Reply::ClaimLink(token, answer) => parts.linking.on_claimed(shared, token, answer),
        Reply::ApplyGroupChange(token, answer) => parts.groups.on_updated(shared, token, answer),
        Reply::OrderGroupMessage(token, answer) => parts.groups.on_sent(shared, token, answer),
        Reply::StoreGroupCopies(token, ()) => parts.groups.on_part_stored(shared, token),
        Reply::ReadGroup(token, answer) => parts.groups.on_read(shared, token, answer),
        Reply::CheckGroupAdds(token, refusing) => {
            parts.groups.on_adds_checked(shared, token, refusing)
        }
        Reply::ReadMedia(token, answer) => parts.media.on_read(shared, token, answer),
        Reply::FindPhones(token, matches) => parts.accounts.on_found(shared, token, matches),
        Reply::ListMemberships(token, groups) => {
            parts.exports.on_memberships(shared, &mut parts.media, token, groups)
        }
        Reply::ReadProfile(token, profile) => parts.accounts.on_profile(shared, token, profile),
    }
}

/// Does what a tell asks.
fn on_tell<S: Storage>(shared: &mut Shared<S>, parts: &mut Parts, tell: Tell) {
    match tell {
        Tell::LinkDone { code, registered } => parts.linking.done(shared, &code, registered),
        Tell::Watch { subscriber, targets, watch } => {
            parts.presence.watch(shared, subscriber, &targets, watch)
        }
        Tell::Presence { subscriber, events } => {
            presence::push_presence(shared, subscriber, &events)
        }
        Tell::Typing { to_user, from, active } => {
            presence::push_typing(shared, to_user, from, active)
        }
        Tell::ForgetMember { user_id } => {
            groups::forget_member(shared, user_id);
            parts.presence.forget(user_id);
        }
    }
}

/// A job from the work pool finished; returns a newly registered account's
/// (user id, phone, moved?) for the façade to index.
pub fn work_done<S: Storage>(
    shared: &mut Shared<S>,
    parts: &mut Parts,
    done: WorkDone,
) -> Option<super::registration::NewAccount> {
    match done {
        WorkDone::Blob(token, result) => parts.media.on_blob_done(shared, token, result),
        WorkDone::CheckDeviceKeys(token, result) => {
            // Registration and linking both check new devices; the token says whose.
            let registered = parts.registration.on_device_keys_checked(shared, token, result);
            if registered.is_some() {
                return registered;
            }
            parts.linking.on_device_keys_checked(shared, token, result);
        }
        WorkDone::CheckPrekeys(token, valid) => parts.keys.on_prekeys_checked(shared, token, valid),
        WorkDone::HashPin(token, hash) => parts.registration.on_pin_hashed(shared, token, hash),
        WorkDone::CheckPin(token, matches) => {
            return parts.registration.on_pin_checked(shared, token, matches)
        }
    }
    None
}
