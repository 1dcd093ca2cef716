//! The subsystems of one core, each owning its state, gathered so that the dispatchers
//! ([`super::frames`], [`super::serve`]) can hand each handler exactly the ones it needs.

use tern_engine::Storage;

use super::accounts::Accounts;
use super::budgets::Budgets;
use super::config::CoreConfig;
use super::delivery::Delivery;
use super::export::Exports;
use super::groups::Groups;
use super::keys::Keys;
use super::linking::Linking;
use super::media::Media;
use super::presence::Presence;
use super::registration::Registration;
use super::shared::Shared;
use super::wakeups::Wakeups;

/// Every subsystem of a core.
#[derive(Debug)]
pub struct Parts {
    /// Codes, budgets, the registration lock.
    pub registration: Registration,
    /// Companion devices waiting to be linked.
    pub linking: Linking,
    /// 1:1 sends, mailboxes, receipts.
    pub delivery: Delivery,
    /// Prekeys and bundles.
    pub keys: Keys,
    /// Who follows whom.
    pub presence: Presence,
    /// Group changes and fan-outs.
    pub groups: Groups,
    /// Uploads and downloads.
    pub media: Media,
    /// Discovery, profiles, the phone index.
    pub accounts: Accounts,
    /// Exports in progress.
    pub exports: Exports,
    /// Devices woken since they were last connected.
    pub wakeups: Wakeups,
    /// What each device may still ask of the costly requests.
    pub budgets: Budgets,
}

impl Parts {
    /// The subsystems of a new core over `shared`'s shards.
    pub fn new<S: Storage>(shared: &Shared<S>, config: &CoreConfig) -> Parts {
        Parts {
            registration: Registration::new(config),
            linking: Linking::new(config),
            delivery: Delivery::new(config.send_rate, config.stranger_send_rate),
            keys: Keys::new(config.fetch_rate, config.one_time_key_fetches_per_hour),
            presence: Presence::default(),
            groups: Groups::default(),
            media: Media::default(),
            accounts: Accounts::new(shared),
            exports: Exports::default(),
            wakeups: Wakeups::default(),
            budgets: Budgets::default(),
        }
    }
}
