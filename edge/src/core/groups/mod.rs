//! Groups of up to 256 members: membership on the group's home shard, messages fanned
//! out from there.
//!
//! A group lives on shard `group_id % shards` (ids are random, chosen by the creator), so
//! its core is the one place that orders its changes and its messages. A change goes
//! there with the actor's signing key (an [`ApplyGroupChange`] call): the server checks
//! the Ed25519 signature over `GroupChangeSigned` as hygiene and the rules
//! ([`change::apply`]), stores the group (`PutGroup`) and, once durable, answers; the
//! change is fanned out to every affected member's devices as a `GroupEvent` envelope.
//!
//! A group message ([`OrderGroupMessage`]) carries one ciphertext (the sender's Megolm
//! session). The home core checks membership and dedup, takes a server message id from
//! its shard — monotonic per shard, so it is the group's total order and is used as the
//! `conversation_seq` — and asks each core holding members to store it
//! ([`StoreGroupCopies`]: one envelope record per shard for all its member devices).
//! The sent tick is given once every core has its copies durable. Members are those at
//! send time: someone removed receives nothing after, someone added nothing from before.

pub mod admission;
pub mod change;

use std::collections::{BTreeMap, HashMap};

use tern_engine::{StateOp, Storage};
use tern_wire::messages::{
    ArchivedGroupUpdate, Conversation, DeviceId, E2eType, EnvelopeKind, GroupChange,
    GroupChangeSigned, GroupEventBody, GroupId, GroupInfo, GroupUpdate, GroupUpdated, NoticeBody,
    SendAck, UserId,
};
use tern_wire::MessageType;

use self::admission::{added_users, Admission};
use super::conns::ConnId;
use super::delivery::mailbox::{admit, make_room, tell_server_envelope};
use super::delivery::server_envelope::archive;
use super::shards::Waits;
use super::shared::Shared;
use super::wakeups::Wakeups;
use crate::limits::DailyCount;
use crate::mesh::calls::{ApplyGroupChange, OrderGroupMessage, ReadGroup};
use crate::mesh::{EnvelopeMeta, GroupDelivery, GroupMembership, ReplyTo};
use crate::refusal::{GroupRefusal, SessionRefusal, StorageRefusal};
use crate::routing::{home_shard_of_group, home_shard_of_user, Address};

/// Groups one account may create per day (counted on its home core when asked, given
/// back when the group's core refuses): a group is a record kept until its last member
/// leaves, so creating them needs a bound beyond the group-change budget's rate.
pub const GROUPS_CREATED_PER_DAY_MAX: u32 = 20;

/// A group message waiting for its member cores to have their copies durable.
#[derive(Debug)]
struct Fanout {
    remaining: usize,
    reply_to: Option<ReplyTo<OrderGroupMessage>>,
    ack: SendAck,
    /// The group shard's own record of the send (dedup across restarts).
    noted: Waits,
}

/// The group state of one core.
#[derive(Debug, Default)]
pub struct Groups {
    fanouts: HashMap<u64, Fanout>,
    /// Member cores' answers: call token → fan-out id.
    parts: HashMap<u64, u64>,
    /// Requests of this core's clients waiting for the group's core.
    updates: HashMap<u64, (ConnId, u32)>,
    sends: HashMap<u64, (ConnId, u32)>,
    reads: HashMap<u64, (ConnId, u32)>,
    /// Creations asked for today, per account; and those in flight (token → creator).
    created_today: DailyCount<UserId>,
    creating: HashMap<u64, UserId>,
    /// Changes that add members, waiting for the added users' cores.
    admission: Admission,
}

fn group_address<S: Storage>(shared: &Shared<S>, group_id: GroupId) -> Address {
    shared.shards.address_of(home_shard_of_group(group_id, shared.shards.count()))
}

impl Groups {
    /// A device asks for a group change: it goes, with the device's signing key, to the
    /// group's core.
    pub fn update<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        update: &ArchivedGroupUpdate,
    ) {
        let ty = MessageType::GroupUpdate.code();
        let Ok(update) = rkyv::deserialize::<GroupUpdate, rkyv::rancor::Failure>(update) else {
            return shared.conns.refuse(conn, rid, ty, &GroupRefusal::Unreadable);
        };
        let Some(signing_key) = shared.shards.signing_key(me.0, me.1) else {
            return shared.conns.refuse(conn, rid, ty, &SessionRefusal::WrongCore);
        };
        let creates = matches!(update.change, GroupChange::Create { .. });
        let now_ms = shared.now_ms();
        if creates {
            if let Err(count) = self.created_today.take(me.0, now_ms, GROUPS_CREATED_PER_DAY_MAX) {
                let refusal = GroupRefusal::CreatedToday { count, max: GROUPS_CREATED_PER_DAY_MAX };
                return shared.conns.refuse(conn, rid, ty, &refusal);
            }
        }
        let added = added_users(&update.change, me.0);
        let call = ApplyGroupChange { actor: me, signing_key, update, now_ms };
        match added.is_empty() {
            true => self.apply(shared, (conn, rid), call),
            false => self.admission.hold(shared, (conn, rid), call, added),
        }
    }

    /// Sends a change to the group's core.
    fn apply<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        (conn, rid): (ConnId, u32),
        call: ApplyGroupChange,
    ) {
        let (to, actor) = (group_address(shared, call.update.group_id), call.actor.0);
        let creates = matches!(call.update.change, GroupChange::Create { .. });
        let token = shared.outbox.ask(to, call);
        self.updates.insert(token, (conn, rid));
        if creates {
            self.creating.insert(token, actor);
        }
    }

    /// An added user's core answered which users refuse adds from the actor.
    pub fn on_adds_checked<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        token: u64,
        refusing: Vec<UserId>,
    ) {
        match self.admission.on_checked(token, refusing) {
            None => {}
            Some(Ok(held)) => self.apply(shared, (held.conn, held.rid), held.call),
            Some(Err((held, refusal))) => {
                if matches!(held.call.update.change, GroupChange::Create { .. }) {
                    self.created_today.give_back(&held.call.actor.0, shared.now_ms());
                }
                let ty = MessageType::GroupUpdate.code();
                shared.conns.refuse(held.conn, held.rid, ty, &refusal);
            }
        }
    }

    /// The group's core applied (or refused) a change.
    pub fn on_updated<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        token: u64,
        answer: Result<GroupUpdated, GroupRefusal>,
    ) {
        let Some((conn, rid)) = self.updates.remove(&token) else { return };
        if let Some(creator) = self.creating.remove(&token) {
            if answer.is_err() {
                self.created_today.give_back(&creator, shared.now_ms());
            }
        }
        match answer {
            Ok(updated) => shared.conns.send(conn, rid, &updated),
            Err(refusal) => shared.conns.refuse(conn, rid, 0, &refusal),
        }
    }

    /// A member sends a message to a group: it goes to the group's core.
    pub fn send<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        call: OrderGroupMessage,
    ) {
        let shard = home_shard_of_group(call.group_id, shared.shards.count());
        if !shared.homes.serves(shard) {
            return shared.conns.refuse(conn, rid, 0, &GroupRefusal::OtherNode { shard });
        }
        let to = group_address(shared, call.group_id);
        let token = shared.outbox.ask(to, call);
        self.sends.insert(token, (conn, rid));
    }

    /// The group's core stored a message for every member (or refused it).
    pub fn on_sent<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        token: u64,
        answer: Result<SendAck, GroupRefusal>,
    ) {
        let Some((conn, rid)) = self.sends.remove(&token) else { return };
        match answer {
            Ok(ack) => shared.conns.send(conn, rid, &ack),
            Err(refusal) => shared.conns.refuse(conn, rid, 0, &refusal),
        }
    }

    /// A member asks for the group's state.
    pub fn read<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        me: UserId,
        group_id: GroupId,
    ) {
        let to = group_address(shared, group_id);
        let token = shared.outbox.ask(to, ReadGroup { requester: me, group_id });
        self.reads.insert(token, (conn, rid));
    }

    /// The group's core answered a read.
    pub fn on_read<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        token: u64,
        answer: Result<GroupInfo, GroupRefusal>,
    ) {
        let Some((conn, rid)) = self.reads.remove(&token) else { return };
        match answer {
            Ok(info) => shared.conns.send(conn, rid, &info),
            Err(refusal) => shared.conns.refuse(conn, rid, 0, &refusal),
        }
    }

    /// On the group's core: checks and applies a change; answers once it is durable and
    /// fans the event out.
    pub fn serve_change<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        call: ApplyGroupChange,
        reply_to: Option<ReplyTo<ApplyGroupChange>>,
    ) {
        match apply_change(shared, call) {
            Ok((updated, wait)) => shared.answer_when_durable(reply_to, Ok(updated), vec![wait]),
            Err(refusal) => shared.answer(reply_to, Err(refusal)),
        }
    }

    /// On the group's core: checks membership and dedup, orders, fans out; answers with
    /// the `SendAck` once every member core has its copies durable.
    pub fn serve_order<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        call: OrderGroupMessage,
        reply_to: Option<ReplyTo<OrderGroupMessage>>,
    ) {
        let OrderGroupMessage { meta, group_id, e2e_type, ciphertext } = call;
        let shard_id = home_shard_of_group(group_id, shared.shards.count());
        let Some(handle) = shared.shards.local(shard_id).cloned() else {
            return shared
                .answer(reply_to, Err(GroupRefusal::Storage { refusal: StorageRefusal::Failed }));
        };
        let group = handle.borrow().state().groups.get(&group_id).cloned();
        let Some(group) = group else {
            return shared.answer(reply_to, Err(GroupRefusal::NoSuchGroup));
        };
        if !group.members.iter().any(|m| m.user_id == meta.sender.0) {
            return shared.answer(reply_to, Err(GroupRefusal::NotMember));
        }
        let elsewhere = group
            .members
            .iter()
            .map(|m| home_shard_of_user(m.user_id))
            .find(|shard| !shared.homes.serves(*shard));
        if let Some(shard) = elsewhere {
            return shared.answer(reply_to, Err(GroupRefusal::OtherNode { shard }));
        }
        let (server_message_id, noted, duplicate) = match order(shared, &handle, shard_id, &meta) {
            Ok(ordered) => ordered,
            Err(refusal) => return shared.answer(reply_to, Err(refusal)),
        };
        let delivery = GroupDelivery {
            group_id,
            sender: meta.sender,
            client_message_id: meta.client_message_id,
            server_message_id,
            server_time_ms: meta.server_time_ms,
            expires_ms: meta.expires_ms,
            kind: meta.kind,
            e2e_type,
            body: ciphertext,
            recipients: Vec::new(),
        };
        let ack = SendAck {
            client_message_id: meta.client_message_id,
            server_message_id,
            server_time_ms: meta.server_time_ms,
            duplicate,
        };
        let members = group.members.iter().map(|m| m.user_id).collect();
        let fanout_id = shared.outbox.token();
        let parts = fan_out(shared, delivery, members, true);
        self.parts.extend(parts.iter().map(|token| (*token, fanout_id)));
        let remaining = parts.len();
        self.fanouts.insert(fanout_id, Fanout { remaining, reply_to, ack, noted });
        self.part_done(shared, fanout_id, false);
    }

    /// A member core has its copies durable (or, with `answered` false, just check
    /// whether none is outstanding).
    fn part_done<S: Storage>(&mut self, shared: &mut Shared<S>, fanout_id: u64, answered: bool) {
        let Some(fanout) = self.fanouts.get_mut(&fanout_id) else { return };
        if answered {
            fanout.remaining = fanout.remaining.saturating_sub(1);
        }
        if fanout.remaining == 0 {
            if let Some(fanout) = self.fanouts.remove(&fanout_id) {
                shared.answer_when_durable(fanout.reply_to, Ok(fanout.ack), fanout.noted);
            }
        }
    }

    /// A member core answered a `StoreGroupCopies`.
    pub fn on_part_stored<S: Storage>(&mut self, shared: &mut Shared<S>, token: u64) {
        if let Some(fanout_id) = self.parts.remove(&token) {
            self.part_done(shared, fanout_id, true);
        }
    }
}

/// Sends one `StoreGroupCopies` per core holding `recipients`; returns the tokens of
/// their answers (none unless `answered`: group events are fire and forget).
fn fan_out<S: Storage>(
    shared: &mut Shared<S>,
    delivery: GroupDelivery,
    recipients: Vec<UserId>,
    answered: bool,
) -> Vec<u64> {
    let mut by_core: BTreeMap<Address, Vec<UserId>> = BTreeMap::new();
    for user in recipients {
        let shard = home_shard_of_user(user);
        if shared.shards.exists(shard) {
            by_core.entry(shared.shards.address_of(shard)).or_default().push(user);
        }
    }
    let mut tokens = Vec::new();
    for (to, users) in by_core {
        let part = GroupDelivery { recipients: users, ..delivery.clone() };
        if answered {
            tokens.push(shared.outbox.ask(to, part));
        } else {
            shared.outbox.ask_without_answer(to, part);
        }
    }
    tokens
}

/// Gives a group message its place in the group's order (or finds the place a retry
/// got): (server message id, the record noting it, duplicate?).
fn order<S: Storage>(
    shared: &mut Shared<S>,
    handle: &tern_engine::ShardHandle<S>,
    shard_id: u32,
    meta: &EnvelopeMeta,
) -> Result<(u64, Waits, bool), GroupRefusal> {
    // A retry (the same sender device and client message id) gets the original id, and
    // is fanned out again: after a crash some member shards may lack it; those that have
    // it skip it. The group's shard remembers every send durably in its dedup window
    // (`note_send`), so this holds across restarts.
    let (sender, client_id) = (meta.sender, meta.client_message_id);
    if let Some(id) = handle.borrow().lookup_noted_send(sender.0, sender.1, client_id) {
        return Ok((id, Vec::new(), true));
    }
    let mut shard = handle.borrow_mut();
    // The group's order: ids from its home shard only grow.
    let id = shard.allocate_message_id(meta.server_time_ms);
    let seq = shard
        .note_send(meta.sender, client_id, id, meta.server_time_ms)
        .map_err(|error| GroupRefusal::Storage { refusal: StorageRefusal::of(&error) })?;
    drop(shard);
    shared.counters.messages_sent += 1;
    Ok((id, vec![(shard_id, seq)], false))
}

/// Checks the signature and the rules, stores the group and fans the event out.
fn apply_change<S: Storage>(
    shared: &mut Shared<S>,
    call: ApplyGroupChange,
) -> Result<(GroupUpdated, (u32, u64)), GroupRefusal> {
    let ApplyGroupChange { actor, signing_key, update, now_ms } = call;
    let group_id = update.group_id;
    let shard_id = home_shard_of_group(group_id, shared.shards.count());
    let storage_failed = GroupRefusal::Storage { refusal: StorageRefusal::Failed };
    let handle = shared.shards.local(shard_id).cloned().ok_or(storage_failed)?;
    // The signature covers exactly what the clients will check.
    let bytes = GroupChangeSigned::bytes(group_id, update.base_epoch, actor, &update.change)
        .map_err(|_| GroupRefusal::Unreadable)?;
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, signing_key);
    key.verify(&bytes, &update.signature).map_err(|_| GroupRefusal::BadSignature)?;
    let current = handle.borrow().state().groups.get(&group_id).cloned();
    let shard_count = shared.shards.count();
    let valid_user = |user: UserId| home_shard_of_user(user) < shard_count;
    let applied = change::apply(
        group_id,
        current,
        &update.change,
        (actor.0, update.base_epoch),
        now_ms,
        valid_user,
    )?;
    let epoch = applied.group.epoch;
    let mut recipients: Vec<UserId> = applied.group.members.iter().map(|m| m.user_id).collect();
    recipients.extend(applied.removed);
    let seq = handle
        .borrow_mut()
        .apply_state(StateOp::PutGroup { group: applied.group })
        .map_err(|error| GroupRefusal::Storage { refusal: StorageRefusal::of(&error) })?;
    let body = GroupEventBody {
        group_id,
        epoch,
        actor_user: actor.0,
        actor_device: actor.1,
        change: update.change,
        signature: update.signature,
    };
    if let Some(event) = archive(&body) {
        let server_message_id = handle.borrow_mut().allocate_message_id(now_ms);
        let delivery = GroupDelivery {
            group_id,
            sender: actor,
            client_message_id: 0,
            server_message_id,
            server_time_ms: now_ms,
            expires_ms: now_ms + shared.config.default_ttl_ms,
            kind: EnvelopeKind::GroupEvent,
            e2e_type: E2eType::Plain,
            body: event,
            recipients: Vec::new(),
        };
        // Fire and forget: the change itself is durable; the events follow it.
        fan_out(shared, delivery, recipients, false);
    }
    Ok((GroupUpdated { group_id, epoch }, (shard_id, seq)))
}

/// On a member core: appends one envelope for every device of the listed members homed
/// here (the sending device excepted), one record per shard; answers once durable.
pub fn serve_store<S: Storage>(
    shared: &mut Shared<S>,
    wakeups: &mut Wakeups,
    delivery: GroupDelivery,
    reply_to: Option<ReplyTo<GroupDelivery>>,
) {
    let mut by_shard: BTreeMap<u32, Vec<(UserId, DeviceId)>> = BTreeMap::new();
    for &user in &delivery.recipients {
        for device in shared.shards.devices_of(user).unwrap_or_default() {
            if device != delivery.sender {
                by_shard.entry(home_shard_of_user(user)).or_default().push(device);
            }
        }
    }
    let mut waits = Vec::new();
    for (shard_id, devices) in by_shard {
        if let Some(wait) = store_for_shard(shared, wakeups, &delivery, shard_id, devices) {
            waits.push(wait);
        }
    }
    shared.answer_when_durable(reply_to, (), waits);
}

fn store_for_shard<S: Storage>(
    shared: &mut Shared<S>,
    wakeups: &mut Wakeups,
    delivery: &GroupDelivery,
    shard_id: u32,
    devices: Vec<(UserId, DeviceId)>,
) -> Option<(u32, u64)> {
    let devices = within_share_or_told(shared, delivery, devices);
    if devices.is_empty() {
        return None;
    }
    for device in devices.iter().filter(|d| d.0 == delivery.sender.0) {
        // The sender's own other devices make room; the members' were admitted.
        make_room(shared, *device, delivery.body.len() as u64);
    }
    let handle = shared.shards.local(shard_id).cloned()?;
    let (sender, client_id) = (delivery.sender, delivery.client_message_id);
    if client_id != 0 && handle.borrow().lookup_send(sender.0, sender.1, client_id).is_some() {
        return None; // A retry: this shard stored it before the crash.
    }
    let envelope = tern_wire::EnvelopeRef {
        server_message_id: delivery.server_message_id,
        client_message_id: delivery.client_message_id,
        server_time_ms: delivery.server_time_ms,
        expires_ms: delivery.expires_ms,
        sender_user: delivery.sender.0,
        sender_device: delivery.sender.1,
        conversation: Conversation::Group(delivery.group_id),
        conversation_seq: delivery.server_message_id,
        kind: delivery.kind,
        e2e_type: delivery.e2e_type,
        body: &delivery.body,
    };
    let appended = handle.borrow_mut().append_envelope(&envelope, &devices);
    let appended = match appended {
        Ok(appended) => appended,
        Err(error) => {
            tracing::error!(%error, "could not store a group envelope");
            return None;
        }
    };
    for device in devices {
        shared.durable.mark_dirty(device, shard_id, appended.record_seq);
        if delivery.kind != EnvelopeKind::GroupEvent {
            wakeups.wake_if_offline(shared, device);
        }
    }
    Some((shard_id, appended.record_seq))
}

/// The devices whose mailbox admits the envelope (room left, the sender within its
/// share); for a message, the sender is told (`SentDropped`) which members' devices it
/// could not reach.
fn within_share_or_told<S: Storage>(
    shared: &mut Shared<S>,
    delivery: &GroupDelivery,
    devices: Vec<(UserId, DeviceId)>,
) -> Vec<(UserId, DeviceId)> {
    let (sender, bytes) = (delivery.sender.0, delivery.body.len() as u64);
    let (within, over): (Vec<_>, Vec<_>) =
        devices.into_iter().partition(|d| admit(shared, *d, sender, bytes).is_ok());
    if delivery.kind == EnvelopeKind::GroupEvent {
        return within;
    }
    let mut missed: Vec<UserId> = over.iter().map(|d| d.0).collect();
    missed.dedup();
    for recipient in missed {
        let message_ids = vec![delivery.server_message_id];
        let notice = NoticeBody::SentDropped { recipient, message_ids };
        tell_server_envelope(shared, sender, (0, 0), EnvelopeKind::Notice, &notice);
    }
    within
}

/// On the group's core: the group's state, for a member.
pub fn serve_read<S: Storage>(
    shared: &mut Shared<S>,
    call: ReadGroup,
    reply_to: Option<ReplyTo<ReadGroup>>,
) {
    let shard_id = home_shard_of_group(call.group_id, shared.shards.count());
    let group = shared
        .shards
        .local(shard_id)
        .and_then(|s| s.borrow().state().groups.get(&call.group_id).cloned());
    let answer = match group {
        Some(group) if group.members.iter().any(|m| m.user_id == call.requester) => Ok(GroupInfo {
            group_id: call.group_id,
            epoch: group.epoch,
            name: group.name,
            members: group.members,
            created_ms: group.created_ms,
        }),
        Some(_) => Err(GroupRefusal::NotMember),
        None => Err(GroupRefusal::NoSuchGroup),
    };
    shared.answer(reply_to, answer);
}

/// The groups homed on this core that `user_id` belongs to.
pub fn memberships_here<S: Storage>(shared: &Shared<S>, user_id: UserId) -> Vec<GroupMembership> {
    let mut found = Vec::new();
    for (_, shard) in shared.shards.owned() {
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

/// Removes a deleted user from the groups homed on this core.
pub fn forget_member<S: Storage>(shared: &mut Shared<S>, user_id: UserId) {
    for (_, shard) in shared.shards.owned() {
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
            change::keep_an_admin(&mut group);
            if let Err(error) = shard.borrow_mut().apply_state(StateOp::PutGroup { group }) {
                tracing::warn!(%error, "could not remove a deleted user from a group");
            }
        }
    }
}
