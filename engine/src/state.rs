//! The state tables: accounts, devices, key stocks, groups, blocks, profiles, privacy,
//! media metadata and reports, kept in memory and changed only by applying a
//! [`StateOp`].
//!
//! Applying is deterministic and total (an op on a missing account is a no-op), so the
//! same sequence of ops gives the same tables whether it runs live, at replay after a
//! crash, or on top of a checkpoint. Pure: no I/O.

use std::collections::HashMap;

use tern_wire::messages::{
    DeviceId, GroupId, MediaId, PrivacySettings, SignedPrekey, UserId, Visibility,
};

use crate::body::{
    AccountRecord, DeviceRecord, GroupRecord, MediaRecord, ProfileRecord, RegistrationFailures,
    ReportRecord, StateOp,
};

/// Privacy settings of a new account.
pub fn default_privacy() -> PrivacySettings {
    PrivacySettings {
        last_seen: Visibility::Contacts,
        online: Visibility::Contacts,
        // Names and avatars too: a stranger who guesses a user id learns nothing.
        display_name: Visibility::Contacts,
        about: Visibility::Contacts,
        avatar: Visibility::Contacts,
        read_receipts: true,
        group_adds: Visibility::Everyone,
    }
}

/// The state tables of one shard.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StateTables {
    /// Accounts by user id, boxed: the table's buckets (about twice as many as accounts,
    /// by its load factor) then hold a pointer each, not a whole record.
    pub accounts: HashMap<UserId, Box<AccountRecord>>,
    /// User id by phone number.
    pub phones: HashMap<String, UserId>,
    /// Groups by id.
    pub groups: HashMap<GroupId, GroupRecord>,
    /// Media metadata by id.
    pub media: HashMap<MediaId, MediaRecord>,
    /// Reports, oldest first.
    pub reports: Vec<ReportRecord>,
    /// Failed registration attempts per phone number (the latest day's).
    pub registration_failures: HashMap<String, RegistrationFailures>,
}

/// Numbers with failed registration attempts kept before older days' counts are swept.
const REGISTRATION_FAILURES_SWEEP_AT: usize = 10_000;

impl StateTables {
    /// Applies one change.
    pub fn apply(&mut self, op: &StateOp) {
        match op {
            StateOp::PutAccount { user_id, phone, created_ms } => {
                self.put_account(*user_id, phone, *created_ms)
            }
            StateOp::DeleteAccount { user_id } => {
                if let Some(account) = self.accounts.remove(user_id) {
                    self.phones.remove(&account.phone);
                }
            }
            StateOp::PutDevice { user_id, device } => {
                self.with_account(*user_id, |a| put_device(a, device))
            }
            StateOp::RemoveDevice { user_id, device_id } => self.with_account(*user_id, |a| {
                a.devices.retain(|d| d.device_id != *device_id);
            }),
            StateOp::SetToken { user_id, device_id, token_hash } => {
                self.with_device(*user_id, *device_id, |d| d.token_hash = *token_hash)
            }
            StateOp::AddOneTimeKeys { user_id, device_id, keys } => {
                self.with_device(*user_id, *device_id, |d| add_one_time_keys(d, keys))
            }
            StateOp::SetFallbackKey { user_id, device_id, key } => {
                self.with_device(*user_id, *device_id, |d| d.fallback_key = key.clone())
            }
            StateOp::ClaimOneTimeKey { user_id, device_id, key_id } => {
                self.with_device(*user_id, *device_id, |d| {
                    d.one_time_keys.retain(|k| k.key_id != *key_id)
                })
            }
            StateOp::SetPush { user_id, device_id, endpoint } => {
                self.with_device(*user_id, *device_id, |d| d.push = endpoint.clone())
            }
            StateOp::PutGroup { group } => {
                self.groups.insert(group.group_id, group.clone());
            }
            StateOp::DeleteGroup { group_id } => {
                self.groups.remove(group_id);
            }
            StateOp::SetBlocked { .. }
            | StateOp::SetProfile { .. }
            | StateOp::SetPrivacy { .. }
            | StateOp::SetContacts { .. }
            | StateOp::SetRegistrationLock { .. }
            | StateOp::SetLastSeen { .. }
            | StateOp::SetDeviceList { .. } => self.apply_setting(op),
            StateOp::PutMedia { media } => {
                self.media.insert(media.media_id, media.clone());
            }
            StateOp::DeleteMedia { media_id } => {
                self.media.remove(media_id);
            }
            StateOp::AddReport { report } => self.reports.push(report.clone()),
            // Kept by the shard's dedup window, not in the tables.
            StateOp::NoteSend { .. } => {}
            StateOp::SetRegistrationFailures { failures } => {
                let table = &mut self.registration_failures;
                if table.len() >= REGISTRATION_FAILURES_SWEEP_AT {
                    table.retain(|_, f| f.day >= failures.day); // Earlier days' are void.
                }
                table.insert(failures.phone.clone(), failures.clone());
            }
        }
    }

    /// Applies a change to one of an account's settings.
    fn apply_setting(&mut self, op: &StateOp) {
        match op {
            StateOp::SetBlocked { user_id, other, blocked } => {
                self.with_account(*user_id, |a| set_blocked(a, *other, *blocked))
            }
            StateOp::SetProfile { user_id, profile } => {
                self.with_account(*user_id, |a| a.profile = profile.clone())
            }
            StateOp::SetPrivacy { user_id, privacy } => {
                self.with_account(*user_id, |a| a.privacy = privacy.clone())
            }
            StateOp::SetContacts { user_id, contacts } => {
                self.with_account(*user_id, |a| a.contacts = contacts.clone())
            }
            StateOp::SetRegistrationLock { user_id, pin_hash } => {
                self.with_account(*user_id, |a| a.registration_lock = pin_hash.clone())
            }
            StateOp::SetLastSeen { user_id, last_seen_ms } => {
                self.with_account(*user_id, |a| a.last_seen_ms = *last_seen_ms)
            }
            StateOp::SetDeviceList { user_id, device_list } => {
                self.with_account(*user_id, |a| a.device_list = device_list.clone())
            }
            _ => {}
        }
    }

    /// Creates (or replaces) an account, with no devices and default settings.
    fn put_account(&mut self, user_id: UserId, phone: &str, created_ms: u64) {
        self.phones.insert(phone.to_owned(), user_id);
        self.accounts.insert(
            user_id,
            Box::new(AccountRecord {
                user_id,
                phone: phone.to_owned(),
                created_ms,
                devices: Vec::new(),
                registration_lock: None,
                contacts: Vec::new(),
                blocked: Vec::new(),
                profile: ProfileRecord::default(),
                privacy: default_privacy(),
                last_seen_ms: 0,
                device_list: Vec::new(),
            }),
        );
    }

    /// Changes an account, if it exists (ops on a missing account are no-ops).
    fn with_account(&mut self, user_id: UserId, change: impl FnOnce(&mut AccountRecord)) {
        if let Some(account) = self.accounts.get_mut(&user_id) {
            change(account);
        }
    }

    /// Changes a device, if it exists (ops on a missing device are no-ops).
    fn with_device(
        &mut self,
        user_id: UserId,
        device_id: DeviceId,
        change: impl FnOnce(&mut DeviceRecord),
    ) {
        if let Some(device) = self.device_mut(user_id, device_id) {
            change(device);
        }
    }

    /// An account.
    pub fn account(&self, user_id: UserId) -> Option<&AccountRecord> {
        self.accounts.get(&user_id).map(|a| &**a)
    }

    /// The user registered with a phone number.
    pub fn user_by_phone(&self, phone: &str) -> Option<UserId> {
        self.phones.get(phone).copied()
    }

    /// A device.
    pub fn device(&self, user_id: UserId, device_id: DeviceId) -> Option<&DeviceRecord> {
        self.accounts.get(&user_id)?.devices.iter().find(|d| d.device_id == device_id)
    }

    fn device_mut(&mut self, user_id: UserId, device_id: DeviceId) -> Option<&mut DeviceRecord> {
        self.accounts.get_mut(&user_id)?.devices.iter_mut().find(|d| d.device_id == device_id)
    }
}

/// Adds or replaces a device of an account, keeping devices in id order.
fn put_device(account: &mut AccountRecord, device: &DeviceRecord) {
    account.devices.retain(|d| d.device_id != device.device_id);
    // Exactly one more slot: a device record is ~300 bytes, and a vector's first growth
    // reserves four, so most accounts (one device) would carry three empty ones.
    account.devices.reserve_exact(1);
    account.devices.push(device.clone());
    account.devices.sort_by_key(|d| d.device_id);
}

/// Adds one-time prekeys to a device's stock, skipping ids it already has.
fn add_one_time_keys(device: &mut DeviceRecord, keys: &[SignedPrekey]) {
    // One pass over the stock and one over the keys (a scan of the stock per key was
    // quadratic in what a client uploads).
    let mut held: std::collections::HashSet<u64> =
        device.one_time_keys.iter().map(|k| k.key_id).collect();
    // Room for this upload and no more (a doubling vector would leave up to half of the
    // stock's ~100 bytes a key empty).
    device.one_time_keys.reserve_exact(keys.len());
    for key in keys {
        if held.insert(key.key_id) {
            device.one_time_keys.push(key.clone());
        }
    }
}

/// Blocks or unblocks `other` for an account (at most one entry per user).
fn set_blocked(account: &mut AccountRecord, other: UserId, blocked: bool) {
    account.blocked.retain(|u| *u != other);
    if blocked {
        account.blocked.push(other);
    }
}
