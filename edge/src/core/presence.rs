//! Presence, last seen and typing.
//!
//! Presence lives on the watched user's home core: `watchers` (target → subscribers) is
//! fed by `PresenceSubscribe` (one `Watch` tell per core of the targets). A user's first
//! device connecting or last leaving queues one event per watcher allowed by the
//! target's privacy and contacts; events are coalesced per (subscriber, target) until
//! the loop turn's mesh flush ([`Presence::flush`]), then pushed to local subscribers or
//! sent as one `Presence` tell per subscriber. Not persisted: clients re-follow after
//! reconnecting. Typing is relayed live to the peer's online devices, never stored.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tern_engine::Storage;
use tern_wire::messages::{
    Conversation, DeviceId, Done, PresenceEvent, TypingEvent, UserId, Visibility,
};
use tern_wire::MessageType;

use super::conns::ConnId;
use super::shared::Shared;
use crate::mesh::Tell;
use crate::refusal::AccountRefusal;
use crate::routing::home_shard_of_user;

/// Users one user may follow the presence of.
pub const PRESENCE_SUBSCRIPTIONS_MAX: usize = 5_000;
/// Subscribers told of one user's presence at most (the fan-out budget).
pub const PRESENCE_WATCHERS_MAX: usize = 5_000;

/// Presence state of the users homed on one core.
#[derive(Debug, Default)]
pub struct Presence {
    /// Presence subscribers of the users homed here: target → subscribers.
    watchers: HashMap<UserId, BTreeSet<UserId>>,
    /// What each user homed here subscribed to (a new subscription replaces it).
    watching: HashMap<UserId, Vec<UserId>>,
    /// Presence to tell this loop turn, coalesced per (subscriber, target).
    out: HashMap<(UserId, UserId), PresenceEvent>,
}

impl Presence {
    /// Whether events wait for the flush.
    pub fn has_events(&self) -> bool {
        !self.out.is_empty()
    }

    /// `target`'s presence changed: queue an event for each watcher allowed to see it.
    /// After a change of what its owner lets be seen (`settings_changed`), watchers no
    /// longer allowed hear "hidden" (offline, no last seen) once, so that they do not
    /// keep a stale "online".
    pub fn changed<S: Storage>(
        &mut self,
        shared: &Shared<S>,
        target: UserId,
        settings_changed: bool,
    ) {
        let Some(watchers) = self.watchers.get(&target) else { return };
        for &subscriber in watchers {
            let hidden = PresenceEvent { user_id: target, online: false, last_seen_ms: 0 };
            let event = match seen_by(shared, target, subscriber) {
                Some(event) => event,
                None if settings_changed => hidden,
                None => continue,
            };
            self.out.insert((subscriber, target), event);
        }
    }

    /// A user homed here replaces the set of users whose presence it follows.
    pub fn subscribe<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        me: UserId,
        mut targets: Vec<UserId>,
    ) {
        targets.sort_unstable();
        targets.dedup();
        targets.retain(|t| *t != me);
        if targets.len() > PRESENCE_SUBSCRIPTIONS_MAX {
            let ty = MessageType::PresenceSubscribe.code();
            return shared.conns.refuse(conn, rid, ty, &AccountRefusal::TooManyFollowed);
        }
        let old = self.watching.insert(me, targets.clone()).unwrap_or_default();
        let gone: Vec<UserId> =
            old.iter().filter(|t| targets.binary_search(t).is_err()).copied().collect();
        let new: Vec<UserId> = targets.iter().filter(|t| !old.contains(t)).copied().collect();
        for (list, watch) in [(gone, false), (new, true)] {
            let mut by_core = BTreeMap::new();
            for target in list {
                let shard = home_shard_of_user(target);
                if shared.shards.exists(shard) {
                    by_core
                        .entry(shared.shards.address_of(shard))
                        .or_insert_with(Vec::new)
                        .push(target);
                }
            }
            for (to, targets) in by_core {
                shared.outbox.tell(to, Tell::Watch { subscriber: me, targets, watch });
            }
        }
        shared.conns.send(conn, rid, &Done {});
    }

    /// Starts or stops telling `subscriber` about `targets` (homed here); a new watcher
    /// hears the current state at once.
    pub fn watch<S: Storage>(
        &mut self,
        shared: &Shared<S>,
        subscriber: UserId,
        targets: &[UserId],
        watch: bool,
    ) {
        for &target in targets {
            if !watch {
                if let Some(watchers) = self.watchers.get_mut(&target) {
                    watchers.remove(&subscriber);
                    if watchers.is_empty() {
                        self.watchers.remove(&target);
                    }
                }
                continue;
            }
            if shared.shards.devices_of(target).is_none() {
                continue;
            }
            let watchers = self.watchers.entry(target).or_default();
            if watchers.len() >= PRESENCE_WATCHERS_MAX && !watchers.contains(&subscriber) {
                continue; // The fan-out budget: a user's presence goes to this many at most.
            }
            watchers.insert(subscriber);
            if let Some(event) = seen_by(shared, target, subscriber) {
                self.out.insert((subscriber, target), event);
            }
        }
    }

    /// Sends this turn's presence: one tell per subscriber (local ones are served
    /// before the turn ends).
    pub fn flush<S: Storage>(&mut self, shared: &mut Shared<S>) {
        if self.out.is_empty() {
            return;
        }
        let mut by_subscriber: BTreeMap<UserId, Vec<PresenceEvent>> = BTreeMap::new();
        for ((subscriber, _), event) in self.out.drain() {
            by_subscriber.entry(subscriber).or_default().push(event);
        }
        for (subscriber, events) in by_subscriber {
            shared.counters.presence_events += events.len() as u64;
            let to = shared.shards.address_of(home_shard_of_user(subscriber));
            shared.outbox.tell(to, Tell::Presence { subscriber, events });
        }
    }

    /// A deleted user follows nobody and is followed by nobody.
    pub fn forget(&mut self, user_id: UserId) {
        self.watching.remove(&user_id);
        self.watchers.remove(&user_id);
        for watchers in self.watchers.values_mut() {
            watchers.remove(&user_id);
        }
    }
}

/// Pushes presence events to the connected devices of `subscriber` (homed here).
pub fn push_presence<S: Storage>(
    shared: &mut Shared<S>,
    subscriber: UserId,
    events: &[PresenceEvent],
) {
    for (_, conn) in shared.conns.online_devices(subscriber) {
        for event in events {
            shared.conns.send(conn, 0, event);
        }
    }
}

/// What `subscriber` may see of `target`'s presence (`None`: nothing at all).
fn seen_by<S: Storage>(
    shared: &Shared<S>,
    target: UserId,
    subscriber: UserId,
) -> Option<PresenceEvent> {
    let (online_visible, last_seen_ms) = shared.shards.with_account(target, |account| {
        if account.blocked.contains(&subscriber) {
            return None;
        }
        let is_contact = account.contacts.contains(&subscriber);
        let visible = |visibility: &Visibility| match visibility {
            Visibility::Everyone => true,
            Visibility::Contacts => is_contact,
            Visibility::Nobody => false,
        };
        let last_seen = if visible(&account.privacy.last_seen) { account.last_seen_ms } else { 0 };
        Some((visible(&account.privacy.online), last_seen))
    })??;
    if !online_visible {
        return None;
    }
    Some(PresenceEvent { user_id: target, online: shared.conns.user_online(target), last_seen_ms })
}

/// Forwards a typing indicator towards `to_user`'s core (never stored: an offline
/// device never hears of it).
pub fn route_typing<S: Storage>(
    shared: &mut Shared<S>,
    to_user: UserId,
    from: (UserId, DeviceId),
    active: bool,
) {
    let shard = home_shard_of_user(to_user);
    if shared.shards.exists(shard) {
        let to = shared.shards.address_of(shard);
        shared.outbox.tell(to, Tell::Typing { to_user, from, active });
    }
}

/// Shows a typing indicator to the online devices of `to_user` (homed here).
pub fn push_typing<S: Storage>(
    shared: &mut Shared<S>,
    to_user: UserId,
    from: (UserId, DeviceId),
    active: bool,
) {
    if shared.shards.blocked_by(to_user, from.0) {
        return;
    }
    let event = TypingEvent {
        user_id: from.0,
        device_id: from.1,
        conversation: Conversation::User(from.0),
        active,
    };
    for (_, conn) in shared.conns.online_devices(to_user) {
        shared.conns.send(conn, 0, &event);
    }
}
