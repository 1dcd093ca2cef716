//! Messages for other cores, gathered per destination until the loop turn's flush.
//!
//! A subsystem that needs another core's data asks through here ([`Outbox::ask`]:
//! a typed call, its answer routed back with a token this outbox allocates) or tells
//! ([`Outbox::tell`]). A call to this very core does not cross the mesh: it is queued
//! locally and served before the handler that asked returns (`Core` drains
//! [`Outbox::take_local`]), so each subsystem has one code path whether the data is
//! here or elsewhere, and no extra loop turn. The runtime takes one batch per
//! destination per turn ([`Outbox::take_batches`]): "batch what crosses".

use std::collections::{BTreeMap, VecDeque};

use crate::mesh::{Call, CoreMsg, ReplyTo, Tell};
use crate::routing::Address;

/// The outbox of one core.
#[derive(Debug)]
pub struct Outbox {
    here: Address,
    remote: BTreeMap<Address, Vec<CoreMsg>>,
    local: VecDeque<CoreMsg>,
    next_token: u64,
    batches_out: u64,
    items_out: u64,
}

impl Outbox {
    /// The outbox of the core at `here`.
    pub fn new(here: Address) -> Outbox {
        Outbox {
            here,
            remote: BTreeMap::new(),
            local: VecDeque::new(),
            next_token: 1,
            batches_out: 0,
            items_out: 0,
        }
    }

    /// This core's address.
    pub fn here(&self) -> Address {
        self.here
    }

    /// A fresh token (for a call's continuation or a fan-out).
    pub fn token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    /// Sends `call` to `to`; its answer comes back with the returned token.
    pub fn ask<C: Call>(&mut self, to: Address, call: C) -> u64 {
        let token = self.token();
        let reply_to = ReplyTo::new(self.here, token);
        self.send(to, CoreMsg::Request(call.into_request(Some(reply_to))));
        token
    }

    /// Sends `call` to `to` with nobody waiting for its answer.
    pub fn ask_without_answer<C: Call>(&mut self, to: Address, call: C) {
        self.send(to, CoreMsg::Request(call.into_request(None)));
    }

    /// Sends a tell to `to`.
    pub fn tell(&mut self, to: Address, tell: Tell) {
        self.send(to, CoreMsg::Tell(tell));
    }

    /// Queues `message` for `to` (this core: served before the current handler returns).
    pub fn send(&mut self, to: Address, message: CoreMsg) {
        if to == self.here {
            self.local.push_back(message);
        } else {
            self.remote.entry(to).or_default().push(message);
        }
    }

    /// The next message for this core itself.
    pub fn take_local(&mut self) -> Option<CoreMsg> {
        self.local.pop_front()
    }

    /// Whether messages wait for other cores.
    pub fn has_remote(&self) -> bool {
        !self.remote.is_empty()
    }

    /// One batch per destination.
    pub fn take_batches(&mut self) -> Vec<(Address, Vec<CoreMsg>)> {
        let batches: Vec<_> = std::mem::take(&mut self.remote).into_iter().collect();
        self.batches_out += batches.len() as u64;
        self.items_out += batches.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
        batches
    }

    /// (batches, items) sent so far.
    pub fn sent(&self) -> (u64, u64) {
        (self.batches_out, self.items_out)
    }
}
