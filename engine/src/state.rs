//! The state tables: accounts, devices, key stocks, groups, blocks, profiles, privacy,
//! media metadata and reports, kept in memory and changed only by applying a
//! [`StateOp`].
//!
//! Applying is deterministic and total (an op on a missing account is a no-op), so the
//! same sequence of ops gives the same tables whether it runs live, at replay after a
//! crash, or on top of a checkpoint. Pure: no I/O.

use std::collections::HashMap;

use tern_wire::messages::{DeviceId, GroupId, MediaId, PrivacySettings, UserId, Visibility};

use crate::body::{
    AccountRecord, DeviceRecord, GroupRecord, MediaRecord, ProfileRecord, ReportRecord, StateOp,
};

/// Privacy settings of a new account.
pub fn default_privacy() -> PrivacySettings {
    PrivacySettings {
        last_seen: Visibility::Contacts,
        online: Visibility::Contacts,
        display_name: Visibility::Everyone,
        about: Visibility::Contacts,
        avatar: Visibility::Everyone,
        read_receipts: true,
    }
}

/// The state tables of one shard.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StateTables {
    /// Accounts by user id.
    pub accounts: HashMap<UserId, AccountRecord>,
    /// User id by phone number.
    pub phones: HashMap<String, UserId>,
    /// Groups by id.
    pub groups: HashMap<GroupId, GroupRecord>,
    /// Media metadata by id.
    pub media: HashMap<MediaId, MediaRecord>,
    /// Reports, oldest first.
    pub reports: Vec<ReportRecord>,
}

impl StateTables {
    /// Applies one change.
    pub fn apply(&mut self, op: &StateOp) {
        match op {
            StateOp::PutAccount { user_id, phone, created_ms } => {
                self.phones.insert(phone.clone(), *user_id);
                self.accounts.insert(
                    *user_id,
                    AccountRecord {
                        user_id: *user_id,
                        phone: phone.clone(),
                        created_ms: *created_ms,
                        devices: Vec::new(),
                        registration_lock: None,
                        contacts: Vec::new(),
                        blocked: Vec::new(),
                        profile: ProfileRecord::default(),
                        privacy: default_privacy(),
                        last_seen_ms: 0,
                    },
                );
            }
            StateOp::DeleteAccount { user_id } => {
                if let Some(account) = self.accounts.remove(user_id) {
                    self.phones.remove(&account.phone);
                }
            }
            StateOp::PutDevice { user_id, device } => {
                if let Some(account) = self.accounts.get_mut(user_id) {
                    account.devices.retain(|d| d.device_id != device.device_id);
                    account.devices.push(device.clone());
                    account.devices.sort_by_key(|d| d.device_id);
                }
            }
            StateOp::RemoveDevice { user_id, device_id } => {
                if let Some(account) = self.accounts.get_mut(user_id) {
                    account.devices.retain(|d| d.device_id != *device_id);
                }
            }
            StateOp::SetToken { user_id, device_id, token_hash } => {
                if let Some(device) = self.device_mut(*user_id, *device_id) {
                    device.token_hash = *token_hash;
                }
            }
            StateOp::AddOneTimeKeys { user_id, device_id, keys } => {
                if let Some(device) = self.device_mut(*user_id, *device_id) {
                    for key in keys {
                        if !device.one_time_keys.iter().any(|k| k.key_id == key.key_id) {
                            device.one_time_keys.push(key.clone());
                        }
                    }
                }
            }
            StateOp::SetFallbackKey { user_id, device_id, key } => {
                if let Some(device) = self.device_mut(*user_id, *device_id) {
                    device.fallback_key = key.clone();
                }
            }
            StateOp::ClaimOneTimeKey { user_id, device_id, key_id } => {
                if let Some(device) = self.device_mut(*user_id, *device_id) {
                    device.one_time_keys.retain(|k| k.key_id != *key_id);
                }
            }
            StateOp::SetPush { user_id, device_id, endpoint } => {
                if let Some(device) = self.device_mut(*user_id, *device_id) {
                    device.push = endpoint.clone();
                }
            }
            StateOp::PutGroup { group } => {
                self.groups.insert(group.group_id, group.clone());
            }
            StateOp::DeleteGroup { group_id } => {
                self.groups.remove(group_id);
            }
            StateOp::SetBlocked { user_id, other, blocked } => {
                if let Some(account) = self.accounts.get_mut(user_id) {
                    account.blocked.retain(|u| u != other);
                    if *blocked {
                        account.blocked.push(*other);
                    }
                }
            }
            StateOp::SetProfile { user_id, profile } => {
                if let Some(account) = self.accounts.get_mut(user_id) {
                    account.profile = profile.clone();
                }
            }
            StateOp::SetPrivacy { user_id, privacy } => {
                if let Some(account) = self.accounts.get_mut(user_id) {
                    account.privacy = privacy.clone();
                }
            }
            StateOp::SetContacts { user_id, contacts } => {
                if let Some(account) = self.accounts.get_mut(user_id) {
                    account.contacts = contacts.clone();
                }
            }
            StateOp::SetRegistrationLock { user_id, pin_hash } => {
                if let Some(account) = self.accounts.get_mut(user_id) {
                    account.registration_lock = pin_hash.clone();
                }
            }
            StateOp::SetLastSeen { user_id, last_seen_ms } => {
                if let Some(account) = self.accounts.get_mut(user_id) {
                    account.last_seen_ms = *last_seen_ms;
                }
            }
            StateOp::PutMedia { media } => {
                self.media.insert(media.media_id, media.clone());
            }
            StateOp::DeleteMedia { media_id } => {
                self.media.remove(media_id);
            }
            StateOp::AddReport { report } => self.reports.push(report.clone()),
            // Kept by the shard's dedup window, not in the tables.
            StateOp::NoteSend { .. } => {}
        }
    }

    /// An account.
    pub fn account(&self, user_id: UserId) -> Option<&AccountRecord> {
        self.accounts.get(&user_id)
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
