//! Budgets for the requests that cost the server more than a frame: a hash, a
//! signature check, a disk sync, a fan-out to another core, or a record that stays.
//!
//! Sends and key fetches have their own limits (in `delivery` and `keys`), and code
//! requests theirs (in `registration`); everything else an authenticated device may ask
//! repeatedly is one of the [`Costly`] kinds here, each with a token bucket per device.
//! The check happens once, in `frames`, before the request reaches its subsystem, so a
//! refused request costs nothing but the refusal. Buckets are per core: a device's
//! requests all reach its home core, so one bucket sees them all.

use tern_wire::messages::{DeviceId, UserId};
use tern_wire::Message;

use crate::limits::{Rate, RateLimiter};

/// A kind of request with a budget per device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Costly {
    /// `SendReceipt`: an envelope stored for the sender's devices.
    Receipt,
    /// `ProfileGet`: a lookup that may cross cores (and enumerates users).
    ProfileGet,
    /// `GroupUpdate`: signature checks, a record, a fan-out to every member.
    GroupUpdate,
    /// `Report`: a record kept for the operator.
    Report,
    /// `ContactDiscover`: a batch of hash lookups (it also has a daily budget).
    Discover,
    /// `UploadKeys`: signature checks and a record.
    UploadKeys,
    /// `SetRegistrationLock`: an Argon2id hash.
    RegistrationLock,
    /// `MediaCommit`: a seal with a sync (a retry of one too).
    MediaCommit,
    /// `MediaStatusRequest`: a blob's synced length, from the disk.
    MediaStatus,
    /// `LinkApprove`: a new device's record and its code claimed on another core.
    LinkApprove,
    /// `MediaBegin`: a file created and a record stored.
    MediaBegin,
    /// `PresenceSubscribe`: up to 5,000 watches changed on every core.
    PresenceSubscribe,
    /// `FetchBundles`: a call to the target's core, a claim that may be stored, and a
    /// bundle of keys back (the one-time keys have a budget of their own per target).
    FetchBundles,
}

impl Costly {
    /// Every kind, in the order of their buckets.
    const ALL: [Costly; 13] = [
        Costly::Receipt,
        Costly::ProfileGet,
        Costly::GroupUpdate,
        Costly::Report,
        Costly::Discover,
        Costly::UploadKeys,
        Costly::RegistrationLock,
        Costly::MediaCommit,
        Costly::MediaStatus,
        Costly::LinkApprove,
        Costly::MediaBegin,
        Costly::PresenceSubscribe,
        Costly::FetchBundles,
    ];

    /// The kind of `message`, if it has a budget here.
    pub fn of(message: &Message<'_>) -> Option<Costly> {
        Some(match message {
            Message::SendReceipt(_) => Costly::Receipt,
            Message::ProfileGet(_) => Costly::ProfileGet,
            Message::GroupUpdate(_) => Costly::GroupUpdate,
            Message::Report(_) => Costly::Report,
            Message::ContactDiscover(_) => Costly::Discover,
            Message::UploadKeys(_) => Costly::UploadKeys,
            Message::SetRegistrationLock(_) => Costly::RegistrationLock,
            Message::MediaCommit(_) => Costly::MediaCommit,
            Message::MediaStatusRequest(_) => Costly::MediaStatus,
            Message::LinkApprove(_) => Costly::LinkApprove,
            Message::MediaBegin(_) => Costly::MediaBegin,
            Message::PresenceSubscribe(_) => Costly::PresenceSubscribe,
            Message::FetchBundles(_) => Costly::FetchBundles,
            _ => return None,
        })
    }

    /// Its bucket: a burst well above what a client does in normal use (a chat read at
    /// once, a group set up, a day's keys), refilled at a sustained rate no person
    /// reaches.
    pub fn rate(self) -> Rate {
        let (burst, per_second) = match self {
            Costly::Receipt => (200.0, 50.0),
            Costly::ProfileGet => (100.0, 2.0),
            Costly::GroupUpdate => (30.0, 1.0),
            Costly::Report => (10.0, 1.0 / 60.0),
            Costly::Discover => (20.0, 1.0),
            Costly::UploadKeys => (10.0, 1.0 / 60.0),
            Costly::RegistrationLock => (5.0, 1.0 / 60.0),
            Costly::MediaCommit => (20.0, 1.0),
            Costly::MediaStatus => (60.0, 5.0),
            Costly::LinkApprove => (5.0, 1.0 / 60.0),
            Costly::MediaBegin => (20.0, 1.0),
            // Clients subscribe again after each reconnection: a flapping network
            // reconnects often, a person's list changes rarely.
            Costly::PresenceSubscribe => (10.0, 1.0 / 10.0),
            // A new group of 256 strangers is 256 fetches at once; people start a few
            // conversations a minute.
            Costly::FetchBundles => (300.0, 5.0),
        };
        Rate { burst, per_second }
    }

    /// What the refusal calls it.
    pub fn name(self) -> &'static str {
        match self {
            Costly::Receipt => "receipts",
            Costly::ProfileGet => "profile lookups",
            Costly::GroupUpdate => "group changes",
            Costly::Report => "reports",
            Costly::Discover => "contact discoveries",
            Costly::UploadKeys => "key uploads",
            Costly::RegistrationLock => "registration-lock changes",
            Costly::MediaCommit => "media commits",
            Costly::MediaStatus => "media status requests",
            Costly::LinkApprove => "link approvals",
            Costly::MediaBegin => "uploads begun",
            Costly::PresenceSubscribe => "presence subscriptions",
            Costly::FetchBundles => "key-bundle fetches",
        }
    }
}

/// One bucket per device and kind.
#[derive(Debug)]
pub struct Budgets {
    limiters: Vec<RateLimiter<(UserId, DeviceId)>>,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets { limiters: Costly::ALL.iter().map(|k| RateLimiter::new(k.rate())).collect() }
    }
}

impl Budgets {
    /// Takes one request of `kind` from `device`'s budget, or says how many
    /// milliseconds until the next is allowed.
    pub fn take(
        &mut self,
        kind: Costly,
        device: (UserId, DeviceId),
        now_ms: u64,
    ) -> Result<(), u64> {
        let index = Costly::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.limiters[index].take(device, now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_refill_rate() {
        let mut budgets = Budgets::default();
        let me = (7, 1);
        for _ in 0..10 {
            assert_eq!(budgets.take(Costly::Report, me, 0), Ok(()));
        }
        assert_eq!(budgets.take(Costly::Report, me, 0), Err(60_000));
        // Another kind and another device have their own buckets.
        assert_eq!(budgets.take(Costly::ProfileGet, me, 0), Ok(()));
        assert_eq!(budgets.take(Costly::Report, (7, 2), 0), Ok(()));
        assert_eq!(budgets.take(Costly::Report, me, 60_000), Ok(()));
    }
}
