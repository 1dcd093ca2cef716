//! Who may be added to a group: asked of the added users' home cores first.
//!
//! A group change that adds members (`Create`, `Add`) is held on the actor's core while
//! each added user's home core says whether that user refuses adds from the actor: a
//! user who blocked the actor, or whose privacy lets only contacts (or nobody) add them
//! ([`PrivacySettings::group_adds`](tern_wire::messages::PrivacySettings)), is not
//! added. Only when every core answered with nobody refusing does the change go to the
//! group's core; otherwise the actor gets `CannotAdd` naming them and nothing changes.
//! Without this gate anyone could put anyone into groups — a way to reach people who
//! blocked you, and to flood a stranger's mailbox with group events.

use std::collections::HashMap;

use tern_engine::Storage;
use tern_wire::messages::{GroupChange, UserId, Visibility};

use crate::core::conns::ConnId;
use crate::core::shared::Shared;
use crate::mesh::calls::{ApplyGroupChange, CheckGroupAdds};
use crate::mesh::ReplyTo;
use crate::refusal::GroupRefusal;
use crate::routing::home_shard_of_user;

/// A change waiting for the added users' cores.
#[derive(Debug)]
pub struct Held {
    /// The asking connection.
    pub conn: ConnId,
    /// The asking request.
    pub rid: u32,
    /// The change, ready for the group's core.
    pub call: ApplyGroupChange,
    /// Cores yet to answer.
    waiting: usize,
    /// Users who refuse adds from the actor, so far.
    refusing: Vec<UserId>,
}

/// The changes held on this core.
#[derive(Debug, Default)]
pub struct Admission {
    held: HashMap<u64, Held>,
    /// Answers expected: call token → held change.
    tokens: HashMap<u64, u64>,
    next_id: u64,
}

/// The users a change adds (the actor excepted).
pub fn added_users(change: &GroupChange, actor: UserId) -> Vec<UserId> {
    let mut added = match change {
        GroupChange::Create { members, .. } | GroupChange::Add { members } => members.clone(),
        _ => Vec::new(),
    };
    added.retain(|user| *user != actor);
    added.sort_unstable();
    added.dedup();
    added
}

impl Admission {
    /// Holds `call` until the home cores of `added` (not empty) answer.
    pub fn hold<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        (conn, rid): (ConnId, u32),
        call: ApplyGroupChange,
        added: Vec<UserId>,
    ) {
        let mut by_core: HashMap<_, Vec<UserId>> = HashMap::new();
        for user in added {
            by_core
                .entry(shared.shards.address_of(home_shard_of_user(user)))
                .or_default()
                .push(user);
        }
        let id = self.next_id;
        self.next_id += 1;
        let actor = call.actor.0;
        self.held
            .insert(id, Held { conn, rid, call, waiting: by_core.len(), refusing: Vec::new() });
        for (core, users) in by_core {
            let token = shared.outbox.ask(core, CheckGroupAdds { actor, users });
            self.tokens.insert(token, id);
        }
    }

    /// A core answered: the change once every core did, if nobody refuses (else the
    /// users who do).
    pub fn on_checked(
        &mut self,
        token: u64,
        refusing: Vec<UserId>,
    ) -> Option<Result<Held, (Held, GroupRefusal)>> {
        let id = self.tokens.remove(&token)?;
        let held = self.held.get_mut(&id)?;
        held.refusing.extend(refusing);
        held.waiting -= 1;
        if held.waiting > 0 {
            return None;
        }
        let mut held = self.held.remove(&id)?;
        if held.refusing.is_empty() {
            return Some(Ok(held));
        }
        held.refusing.sort_unstable();
        let users = std::mem::take(&mut held.refusing);
        Some(Err((held, GroupRefusal::CannotAdd { users })))
    }
}

/// On an added user's home core: which of `call.users` refuse group adds from
/// `call.actor`.
pub fn serve_check<S: Storage>(
    shared: &mut Shared<S>,
    call: CheckGroupAdds,
    reply_to: Option<ReplyTo<CheckGroupAdds>>,
) {
    let actor = call.actor;
    let refuses = |user: &UserId| {
        shared.shards.with_account(*user, |account| {
            account.blocked.contains(&actor)
                || match account.privacy.group_adds {
                    Visibility::Everyone => false,
                    Visibility::Contacts => !account.contacts.contains(&actor),
                    Visibility::Nobody => true,
                }
        })
    };
    // A user with no account here is the group's core's business (it refuses unknown
    // members or not): only a refusal is answered.
    let refusing: Vec<UserId> =
        call.users.iter().filter(|user| refuses(user).unwrap_or(false)).copied().collect();
    shared.answer(reply_to, refusing);
}
