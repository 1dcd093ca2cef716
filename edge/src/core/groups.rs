//! Groups of up to 256 members: membership on the group's home shard, messages fanned
//! out from there.
//!
//! A group lives on shard `group_id % shards` (ids are random, chosen by the creator), so
//! its core is the one place that orders its changes and its messages. A change
//! (`GroupUpdate`) goes there with the actor's signing key (from the actor's home core):
//! the server checks the Ed25519 signature over [`GroupChangeSigned`] as hygiene — clients
//! check again before trusting a membership — and the rules (admins only, epochs, 256
//! members, the last admin leaving promotes the longest member). The change is stored
//! (`PutGroup`) and, once durable, delivered to every affected member's devices as a
//! `GroupEvent` envelope with the signature.
//!
//! A group message (`SendMessage` to `Conversation::Group`) carries one ciphertext (the
//! sender's Megolm session). The home core checks membership, takes a server message id
//! from its shard — monotonic per shard, so it is the group's total order and is used as
//! the `conversation_seq` — and sends one `GroupDeliver` per core holding members; each
//! of those appends one envelope record per shard for all its member devices (the
//! ciphertext is stored once per shard, not per recipient). The sent tick is given once
//! every core has its copies durable. Members are those at send time: someone removed
//! receives nothing after, someone added nothing from before.

use std::collections::BTreeMap;

use rkyv::rancor::Failure;
use tern_engine::{GroupRecord, StateOp, Storage};
use tern_wire::messages::*;
use tern_wire::{encode_archive, ErrorCode, MessageType};

use super::{home_shard_of_user, Awaiting, ConnId, Core, EnvelopeMeta, Release, Waits};
use crate::mesh::{GroupDelivery, Reply, Request};

/// Members per group at most.
pub const GROUP_MEMBERS_MAX: usize = 256;

/// The shard that owns a group.
pub fn home_shard_of_group(group_id: GroupId, shard_count: u32) -> u32 {
    (group_id % u64::from(shard_count)) as u32
}

/// A group send waiting for the member cores to have their copies durable.
#[derive(Debug)]
pub(super) struct GroupFanout {
    /// Member cores that have not answered yet.
    remaining: usize,
    /// What goes out when all have.
    release: Release,
    /// Local waits (the home core's own member devices).
    waits: Waits,
}

impl<S: Storage> Core<S> {
    fn group_core(&self, group_id: GroupId) -> u32 {
        self.placement.core_of_shard(home_shard_of_group(group_id, self.shard_count()))
    }

    /// A device asks for a group change: route it, with the device's signing key, to the
    /// group's core.
    pub(super) fn group_update(
        &mut self,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        update: &ArchivedGroupUpdate,
        now_ms: u64,
    ) {
        let ty = MessageType::GroupUpdate.code();
        let Ok(update) = rkyv::deserialize::<GroupUpdate, Failure>(update) else {
            return self.error_reply(conn, rid, ty, ErrorCode::Malformed, "unreadable change", 0);
        };
        let signing_key = self
            .local_shard(home_shard_of_user(me.0))
            .and_then(|s| s.borrow().state().device(me.0, me.1).map(|d| d.signing_key));
        let Some(signing_key) = signing_key else { return };
        let core = self.group_core(update.group_id);
        let request = Request::GroupUpdate { actor: me, signing_key, update, now_ms };
        if core == self.placement.index {
            let (waits, reply) = self.serve_group_update(request);
            let frame_release = self.group_reply_release(conn, rid, reply);
            self.when_durable(waits, frame_release);
        } else {
            self.ask(core, request, Some(Awaiting::Group { conn, rid }));
        }
    }

    /// Turns a group answer into what the connection gets.
    pub(super) fn group_reply_release(&mut self, conn: ConnId, rid: u32, reply: Reply) -> Release {
        let max = self.max_frame_bytes(conn);
        let mut frame = Vec::new();
        let flags = tern_wire::FLAG_RESPONSE;
        let encoded = match reply {
            Reply::Group(Ok(GroupAnswer::Updated(updated))) => {
                tern_wire::encode_frame(&mut frame, rid, flags, &updated, max)
            }
            Reply::Group(Ok(GroupAnswer::Info(info))) => {
                tern_wire::encode_frame(&mut frame, rid, flags, &*info, max)
            }
            Reply::Group(Ok(GroupAnswer::Sent(ack))) => {
                tern_wire::encode_frame(&mut frame, rid, flags, &ack, max)
            }
            Reply::Group(Err((code, message))) => {
                let error =
                    ErrorFrame { code: code as u16, failed_type: 0, retry_after_ms: 0, message };
                tern_wire::encode_frame(&mut frame, rid, flags, &error, max)
            }
            other => {
                tracing::error!(?other, "a group request got the wrong kind of answer");
                return Release::Frame { conn, frame, started_us: None };
            }
        };
        if encoded.is_err() {
            tracing::warn!("a group answer larger than the client's frame limit");
        }
        Release::Frame { conn, frame, started_us: None }
    }

    /// On the group's core: checks and applies a change; returns the waits and answer.
    pub(super) fn serve_group_update(&mut self, request: Request) -> (Waits, Reply) {
        let Request::GroupUpdate { actor, signing_key, update, now_ms } = request else {
            return (Vec::new(), Reply::Group(Err((ErrorCode::Internal, "bad request".into()))));
        };
        match self.apply_group_update(actor, &signing_key, update, now_ms) {
            Ok((waits, updated)) => (waits, Reply::Group(Ok(GroupAnswer::Updated(updated)))),
            Err((code, message)) => (Vec::new(), Reply::Group(Err((code, message.into())))),
        }
    }

    fn apply_group_update(
        &mut self,
        (actor, actor_device): (UserId, DeviceId),
        signing_key: &[u8; 32],
        update: GroupUpdate,
        now_ms: u64,
    ) -> Result<(Waits, GroupUpdated), (ErrorCode, &'static str)> {
        let group_id = update.group_id;
        let shard_id = home_shard_of_group(group_id, self.shard_count());
        let handle =
            self.local_shard(shard_id).cloned().ok_or((ErrorCode::Internal, "wrong core"))?;
        // The signature covers exactly what the clients will check.
        let bytes = GroupChangeSigned::bytes(
            group_id,
            update.base_epoch,
            (actor, actor_device),
            &update.change,
        )
        .map_err(|_| (ErrorCode::Malformed, "unsignable"))?;
        let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, signing_key);
        key.verify(&bytes, &update.signature).map_err(|_| {
            (ErrorCode::InvalidSignature, "the change is not signed by this device")
        })?;

        let current = handle.borrow().state().groups.get(&group_id).cloned();
        let is_member = |g: &GroupRecord, user: UserId| g.members.iter().any(|m| m.user_id == user);
        let is_admin =
            |g: &GroupRecord, user: UserId| g.members.iter().any(|m| m.user_id == user && m.admin);
        let valid_user = |user: UserId| home_shard_of_user(user) < self.shard_count();
        let mut removed: Vec<UserId> = Vec::new();
        let group = match (&update.change, current) {
            (GroupChange::Create { name, members }, None) => {
                if update.base_epoch != 0 {
                    return Err((ErrorCode::Conflict, "a new group starts at epoch 0"));
                }
                let mut all = vec![actor];
                for member in members {
                    if !all.contains(member) && valid_user(*member) {
                        all.push(*member);
                    }
                }
                if all.len() > GROUP_MEMBERS_MAX {
                    return Err((ErrorCode::GroupFull, "a group has at most 256 members"));
                }
                let members = all
                    .into_iter()
                    .map(|user_id| GroupMember {
                        user_id,
                        admin: user_id == actor,
                        joined_ms: now_ms,
                    })
                    .collect();
                GroupRecord { group_id, name: name.clone(), epoch: 1, created_ms: now_ms, members }
            }
            (GroupChange::Create { .. }, Some(_)) => {
                return Err((ErrorCode::Conflict, "this group id is taken; draw another"))
            }
            (_, None) => return Err((ErrorCode::NotFound, "no such group")),
            (change, Some(mut group)) => {
                if update.base_epoch != group.epoch {
                    return Err((ErrorCode::Conflict, "the group changed meanwhile; refresh"));
                }
                if !is_member(&group, actor) {
                    return Err((ErrorCode::Forbidden, "not a member of this group"));
                }
                let admin_only = !matches!(change, GroupChange::Leave);
                if admin_only && !is_admin(&group, actor) {
                    return Err((ErrorCode::NotAdmin, "only a group admin may do this"));
                }
                match change {
                    GroupChange::Add { members } => {
                        for member in members {
                            if !is_member(&group, *member) && valid_user(*member) {
                                let joined = GroupMember {
                                    user_id: *member,
                                    admin: false,
                                    joined_ms: now_ms,
                                };
                                group.members.push(joined);
                            }
                        }
                        if group.members.len() > GROUP_MEMBERS_MAX {
                            return Err((ErrorCode::GroupFull, "a group has at most 256 members"));
                        }
                    }
                    GroupChange::Remove { members } => {
                        group.members.retain(|m| !members.contains(&m.user_id));
                        removed.extend(members.iter().copied());
                    }
                    GroupChange::Leave => {
                        group.members.retain(|m| m.user_id != actor);
                        removed.push(actor);
                    }
                    GroupChange::Promote { member } | GroupChange::Demote { member } => {
                        let admin = matches!(change, GroupChange::Promote { .. });
                        let Some(m) = group.members.iter_mut().find(|m| m.user_id == *member)
                        else {
                            return Err((ErrorCode::NotFound, "not a member"));
                        };
                        m.admin = admin;
                    }
                    GroupChange::Rename { name } => group.name = name.clone(),
                    GroupChange::Create { .. } => unreachable_change(),
                }
                // The last admin gone: the longest member takes over.
                if !group.members.is_empty() && !group.members.iter().any(|m| m.admin) {
                    if let Some(oldest) = group.members.iter_mut().min_by_key(|m| m.joined_ms) {
                        oldest.admin = true;
                    }
                }
                group.epoch += 1;
                group
            }
        };
        let epoch = group.epoch;
        let members: Vec<UserId> = group.members.iter().map(|m| m.user_id).collect();
        let seq = handle
            .borrow_mut()
            .apply_state(StateOp::PutGroup { group })
            .map_err(|_| (ErrorCode::StorageFull, "the server could not store this"))?;
        // Everyone concerned hears of it, those who just left included.
        let body = GroupEventBody {
            group_id,
            epoch,
            actor_user: actor,
            actor_device,
            change: update.change,
            signature: update.signature,
        };
        let mut event = Vec::new();
        encode_archive(&mut event, &body).expect("server bodies always archive");
        let mut recipients = members;
        recipients.extend(removed);
        let server_message_id = handle.borrow_mut().allocate_message_id(now_ms);
        let delivery = GroupDelivery {
            group_id,
            sender: (actor, actor_device),
            client_message_id: 0,
            server_message_id,
            server_time_ms: now_ms,
            expires_ms: now_ms + self.config.default_ttl_ms,
            kind: EnvelopeKind::GroupEvent,
            e2e_type: E2eType::Plain,
            body: event,
            recipients: Vec::new(),
        };
        // Fire and forget: the change itself is durable; the events follow it.
        self.fan_out(delivery, recipients, None, None);
        Ok((vec![(shard_id, seq)], GroupUpdated { group_id, epoch }))
    }

    /// Sends one delivery per core holding `recipients` (users); `done` (if any) is
    /// released once every core has its copies durable.
    fn fan_out(
        &mut self,
        delivery: GroupDelivery,
        recipients: Vec<UserId>,
        done: Option<Release>,
        also_wait: Option<(u32, u64)>,
    ) {
        let mut by_core: BTreeMap<u32, Vec<UserId>> = BTreeMap::new();
        for user in recipients {
            let shard = home_shard_of_user(user);
            if shard < self.shard_count() {
                by_core.entry(self.placement.core_of_shard(shard)).or_default().push(user);
            }
        }
        let fanout_id = self.next_token;
        self.next_token += 1;
        let mut local_waits = Vec::new();
        let mut remote = 0;
        for (core, users) in by_core {
            let mut part = GroupDelivery { recipients: users, ..delivery.clone() };
            if core == self.placement.index {
                local_waits = self.deliver_group(&mut part);
            } else {
                remote += 1;
                let awaiting = done.is_some().then_some(Awaiting::Fanout { fanout_id });
                self.ask(core, Request::GroupDeliver(part), awaiting);
            }
        }
        local_waits.extend(also_wait);
        if let Some(release) = done {
            let fanout = GroupFanout { remaining: remote, release, waits: local_waits };
            self.fanouts.insert(fanout_id, fanout);
            self.fanout_answered(fanout_id, false);
        }
    }

    /// A member core answered a fan-out (or, with `answered` false, just check whether
    /// none is outstanding).
    pub(super) fn fanout_answered(&mut self, fanout_id: u64, answered: bool) {
        let Some(fanout) = self.fanouts.get_mut(&fanout_id) else { return };
        if answered {
            fanout.remaining = fanout.remaining.saturating_sub(1);
        }
        if fanout.remaining == 0 {
            let fanout = self.fanouts.remove(&fanout_id).expect("present");
            self.when_durable(fanout.waits, fanout.release);
        }
    }

    /// On a member core: appends one envelope for every device of the listed members
    /// homed here (the sending device excepted), one record per shard. Returns the waits.
    pub(super) fn deliver_group(&mut self, delivery: &mut GroupDelivery) -> Waits {
        let mut by_shard: BTreeMap<u32, Vec<(UserId, DeviceId)>> = BTreeMap::new();
        for &user in &delivery.recipients {
            for device in self.devices_of(user).unwrap_or_default() {
                if device != delivery.sender {
                    by_shard.entry(home_shard_of_user(user)).or_default().push(device);
                }
            }
        }
        let client_kind = delivery.kind != EnvelopeKind::GroupEvent;
        let mut waits = Vec::new();
        for (shard_id, devices) in by_shard {
            for device in &devices {
                self.make_room(*device, delivery.body.len() as u64, delivery.server_time_ms);
            }
            let Some(handle) = self.local_shard(shard_id).cloned() else { continue };
            let (sender, client_id) = (delivery.sender, delivery.client_message_id);
            if client_id != 0
                && handle.borrow().lookup_send(sender.0, sender.1, client_id).is_some()
            {
                continue; // A retry: this shard stored it before the crash.
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
            match appended {
                Ok(appended) => {
                    waits.push((shard_id, appended.record_seq));
                    for device in devices {
                        self.dirty.insert(device, (shard_id, appended.record_seq));
                        if client_kind {
                            self.wake_if_offline(device);
                        }
                    }
                }
                Err(error) => tracing::error!(%error, "could not store a group envelope"),
            }
        }
        waits
    }

    /// A member sends a message to a group: route it to the group's core.
    pub(super) fn group_send(
        &mut self,
        conn: ConnId,
        rid: u32,
        meta: EnvelopeMeta,
        group_id: GroupId,
        e2e_type: E2eType,
        ciphertext: Vec<u8>,
    ) {
        let request = Request::GroupSend { meta: Box::new(meta), group_id, e2e_type, ciphertext };
        let core = self.group_core(group_id);
        if core == self.placement.index {
            self.serve_group_send(request, GroupReplyTo::Local { conn, rid });
        } else {
            self.ask(core, request, Some(Awaiting::Group { conn, rid }));
        }
    }

    /// On the group's core: checks membership and dedup, orders, fans out; answers with
    /// the `SendAck` once every member core has its copies durable.
    pub(super) fn serve_group_send(&mut self, request: Request, reply_to: GroupReplyTo) {
        let Request::GroupSend { meta, group_id, e2e_type, ciphertext } = request else { return };
        let shard_id = home_shard_of_group(group_id, self.shard_count());
        let Some(handle) = self.local_shard(shard_id).cloned() else { return };
        let group = handle.borrow().state().groups.get(&group_id).cloned();
        let answer = |core: &mut Self, reply: Reply| match &reply_to {
            GroupReplyTo::Local { conn, rid } => {
                let release = core.group_reply_release(*conn, *rid, reply);
                core.when_durable(Vec::new(), release);
            }
            GroupReplyTo::Core { core: from, token } => {
                core.when_durable(Vec::new(), Release::Mesh { core: *from, token: *token, reply });
            }
        };
        let Some(group) = group else {
            return answer(self, Reply::Group(Err((ErrorCode::NotFound, "no such group".into()))));
        };
        if !group.members.iter().any(|m| m.user_id == meta.sender.0) {
            let refusal = Reply::Group(Err((ErrorCode::Forbidden, "not a member".into())));
            return answer(self, refusal);
        }
        // A retry (the same sender device and client message id) gets the original id,
        // and is fanned out again: after a crash some member shards may lack it; those
        // that have it skip it (`deliver_group`). The group's shard remembers every send
        // durably in its dedup window (`note_send`), so this holds across restarts.
        let (sender, client_id) = (meta.sender, meta.client_message_id);
        let previous = handle.borrow().lookup_noted_send(sender.0, sender.1, client_id);
        let (server_message_id, noted) = match previous {
            Some(id) => (id, None),
            None => {
                // The group's order: ids from its home shard only grow.
                let mut shard = handle.borrow_mut();
                let id = shard.allocate_message_id(meta.server_time_ms);
                let noted =
                    shard.note_send(meta.sender, meta.client_message_id, id, meta.server_time_ms);
                match noted {
                    Ok(seq) => (id, Some(seq)),
                    Err(error) => {
                        drop(shard);
                        let code = super::write_error_code(&error);
                        let refusal = Reply::Group(Err((code, error.to_string())));
                        return answer(self, refusal);
                    }
                }
            }
        };
        if noted.is_some() {
            self.counters.messages_sent += 1;
        }
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
            duplicate: previous.is_some(),
        };
        let release = match reply_to {
            GroupReplyTo::Local { conn, rid } => {
                let reply = Reply::Group(Ok(GroupAnswer::Sent(ack)));
                self.group_reply_release(conn, rid, reply)
            }
            GroupReplyTo::Core { core, token } => {
                Release::Mesh { core, token, reply: Reply::Group(Ok(GroupAnswer::Sent(ack))) }
            }
        };
        let members = group.members.iter().map(|m| m.user_id).collect();
        let noted = noted.map(|seq| (shard_id, seq));
        self.fan_out(delivery, members, Some(release), noted);
    }

    /// A member asks for the group's state.
    pub(super) fn group_info(&mut self, conn: ConnId, rid: u32, me: UserId, group_id: GroupId) {
        let core = self.group_core(group_id);
        let request = Request::GroupInfo { requester: me, group_id };
        if core == self.placement.index {
            let reply = self.serve_group_info(request);
            let release = self.group_reply_release(conn, rid, reply);
            self.when_durable(Vec::new(), release);
        } else {
            self.ask(core, request, Some(Awaiting::Group { conn, rid }));
        }
    }

    pub(super) fn serve_group_info(&mut self, request: Request) -> Reply {
        let Request::GroupInfo { requester, group_id } = request else {
            return Reply::Group(Err((ErrorCode::Internal, "bad request".into())));
        };
        let shard_id = home_shard_of_group(group_id, self.shard_count());
        let group = self
            .local_shard(shard_id)
            .and_then(|s| s.borrow().state().groups.get(&group_id).cloned());
        match group {
            Some(group) if group.members.iter().any(|m| m.user_id == requester) => {
                let info = GroupInfo {
                    group_id,
                    epoch: group.epoch,
                    name: group.name,
                    members: group.members,
                    created_ms: group.created_ms,
                };
                Reply::Group(Ok(GroupAnswer::Info(Box::new(info))))
            }
            Some(_) => Reply::Group(Err((ErrorCode::Forbidden, "not a member".into()))),
            None => Reply::Group(Err((ErrorCode::NotFound, "no such group".into()))),
        }
    }
}

/// Where a group answer goes.
#[derive(Debug)]
pub(super) enum GroupReplyTo {
    /// A connection of this core.
    Local {
        /// The connection.
        conn: ConnId,
        /// Its request.
        rid: u32,
    },
    /// Another core's request.
    Core {
        /// That core.
        core: u32,
        /// Its token.
        token: u64,
    },
}

/// A successful group answer.
#[derive(Debug)]
pub enum GroupAnswer {
    /// A change was applied.
    Updated(GroupUpdated),
    /// The group's state.
    Info(Box<GroupInfo>),
    /// A message was stored for every member.
    Sent(SendAck),
}

fn unreachable_change() -> ! {
    panic!("Create is matched before")
}
