//! What the core asks the outside world to do, as values the runtime polls.
//!
//! The core never calls out: a verification code to send, a wake-up for an offline
//! device, blob I/O and CPU-heavy checks leave as [`Effect`]s, taken with
//! `Core::poll_effect` (quinn-proto's `poll_*`). The runtime does them (an SMS gateway,
//! a push service, a blocking pool) and reports back what the core must know (a gone
//! push endpoint, a finished job). The simulation does them in its own time, so every
//! interleaving the runtime could produce, it can too.

use std::collections::VecDeque;

use crate::push::PushJob;
use crate::work::{Job, WorkOrder};

/// One thing for the runtime to do.
#[derive(Debug)]
pub enum Effect {
    /// Send a verification code (SMS gateway, or the log in development).
    SendCode {
        /// To this number.
        phone: String,
        /// The code.
        code: String,
    },
    /// Wake an offline device through its push endpoint.
    Push(PushJob),
    /// Run a job off the core's thread; its result comes back with its token.
    Work(WorkOrder),
}

/// The effects of one core, in the order they were asked for.
#[derive(Debug, Default)]
pub struct Effects {
    queue: VecDeque<Effect>,
    next_token: u64,
}

impl Effects {
    /// Queues `effect`.
    pub fn push(&mut self, effect: Effect) {
        self.queue.push_back(effect);
    }

    /// Queues `job`; returns the token its result will carry.
    pub fn work<J: Job>(&mut self, job: J) -> u64 {
        self.next_token += 1;
        let token = self.next_token;
        self.queue.push_back(Effect::Work(job.into_order(token)));
        token
    }

    /// The next effect.
    pub fn poll(&mut self) -> Option<Effect> {
        self.queue.pop_front()
    }

    /// Whether effects wait.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}
