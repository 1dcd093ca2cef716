//! Record bodies: the rkyv-archived contents of each record type (`docs/STORAGE.md`,
//! section 4). These are the on-disk format: change them only with a format version bump.
//!
//! Envelope records carry the wire protocol's `Envelope` archive as an embedded byte
//! string, so a mailbox read hands out the exact bytes a `Deliver` frame carries.

use rkyv::{Archive, Deserialize, Serialize};
use tern_wire::messages::{
    DeviceId, GroupId, GroupMember, MediaId, MediaKind, MessageId, PrivacySettings, PublicKey,
    PushEndpoint, ReportReason, SignedPrekey, UserId,
};
use tern_wire::SliceAsVec;

/// One mailbox an envelope was appended to.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct MailboxSlot {
    /// The recipient user.
    pub user_id: UserId,
    /// The recipient device.
    pub device_id: DeviceId,
    /// The envelope's sequence number in that device's mailbox.
    pub mailbox_seq: u64,
}

/// Body of an `Envelope` record.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct EnvelopeRecord {
    /// Every mailbox the envelope is in (one for 1:1, each member device for groups).
    pub slots: Vec<MailboxSlot>,
    /// The `tern_wire::messages::Envelope` archive, exactly as delivered.
    pub envelope: Vec<u8>,
}

/// [`EnvelopeRecord`] borrowing its parts, for appending without building `Vec`s.
#[derive(Archive, Serialize, Debug)]
#[rkyv(
    as = ArchivedEnvelopeRecord,
    serialize_bounds(__S: rkyv::ser::Allocator + rkyv::ser::Writer)
)]
pub struct EnvelopeRecordRef<'a> {
    /// See [`EnvelopeRecord::slots`].
    #[rkyv(with = SliceAsVec, omit_bounds)]
    pub slots: &'a [MailboxSlot],
    /// See [`EnvelopeRecord::envelope`].
    #[rkyv(with = SliceAsVec, omit_bounds)]
    pub envelope: &'a [u8],
}

/// Body of an `Ack` record.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct AckRecord {
    /// The device's user.
    pub user_id: UserId,
    /// The device.
    pub device_id: DeviceId,
    /// Everything up to and including this mailbox sequence number was received.
    pub up_to_mailbox_seq: u64,
}

/// Body of a `Remove` record: the envelope at this mailbox position is gone (its sender
/// deleted it for everyone before the device received it).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct RemoveRecord {
    /// The device's user.
    pub user_id: UserId,
    /// The device.
    pub device_id: DeviceId,
    /// The removed entry's mailbox sequence number.
    pub mailbox_seq: u64,
}

/// Body of a `Commit` record.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct CommitRecord {
    /// Sequence number of the batch's first record.
    pub batch_first_seq: u64,
    /// Records in the batch, this one included.
    pub batch_records: u32,
}

/// A registered device, as stored.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct DeviceRecord {
    /// Its id within the user.
    pub device_id: DeviceId,
    /// Its name.
    pub name: String,
    /// SHA-256 of its bearer token (the token itself is never stored).
    pub token_hash: [u8; 32],
    /// Curve25519 identity key.
    pub identity_key: PublicKey,
    /// Ed25519 signing key.
    pub signing_key: PublicKey,
    /// The fallback prekey.
    pub fallback_key: SignedPrekey,
    /// One-time prekeys not yet handed out, oldest first.
    pub one_time_keys: Vec<SignedPrekey>,
    /// Where to push when offline.
    pub push: Option<PushEndpoint>,
    /// When it was registered or linked.
    pub created_ms: u64,
}

/// A profile, as stored.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct ProfileRecord {
    /// Display name.
    pub display_name: Option<String>,
    /// About text.
    pub about: Option<String>,
    /// Avatar blob.
    pub avatar: Option<MediaId>,
}

/// An account, as stored.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct AccountRecord {
    /// The user.
    pub user_id: UserId,
    /// E.164 phone number.
    pub phone: String,
    /// When it was created.
    pub created_ms: u64,
    /// Devices, primary (id 1) first.
    pub devices: Vec<DeviceRecord>,
    /// Slow hash of the registration-lock PIN.
    pub registration_lock: Option<Vec<u8>>,
    /// Contacts (for `Contacts` visibility).
    pub contacts: Vec<UserId>,
    /// Users this account blocked.
    pub blocked: Vec<UserId>,
    /// Profile.
    pub profile: ProfileRecord,
    /// Privacy settings.
    pub privacy: PrivacySettings,
    /// Last time any device was connected.
    pub last_seen_ms: u64,
    /// The device list as the primary device last signed it (opaque; empty if never).
    pub device_list: Vec<u8>,
}

/// A group, as stored.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct GroupRecord {
    /// The group.
    pub group_id: GroupId,
    /// Its name.
    pub name: String,
    /// Bumped by every change.
    pub epoch: u64,
    /// When it was created.
    pub created_ms: u64,
    /// Members (at most 256), by user id.
    pub members: Vec<GroupMember>,
}

/// Media blob metadata, as stored (the blob itself is a file of its own).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct MediaRecord {
    /// The blob.
    pub media_id: MediaId,
    /// The uploading user.
    pub owner: UserId,
    /// What it is.
    pub kind: MediaKind,
    /// Declared size.
    pub size_bytes: u64,
    /// SHA-256 checked at commit; `None` until committed.
    pub sha256: Option<[u8; 32]>,
    /// When the upload began.
    pub created_ms: u64,
    /// When it may be deleted (if no undelivered message references it).
    pub expires_ms: u64,
    /// Users besides the owner who may download it (recipients of the owner's messages
    /// that carry it).
    pub readers: Vec<UserId>,
}

/// A phone number's failed registration attempts on one UTC day: wrong verification
/// codes and wrong registration-lock PINs. Stored, so that a restart does not give a
/// guesser a new budget.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct RegistrationFailures {
    /// The number.
    pub phone: String,
    /// The UTC day (days since the epoch) the counts are for; older counts are void.
    pub day: u64,
    /// Wrong codes given that day.
    pub wrong_codes: u32,
    /// Wrong PINs given that day.
    pub wrong_pins: u32,
}

/// A user report, as stored for the operator.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct ReportRecord {
    /// Who reported.
    pub reporter: UserId,
    /// Whom.
    pub reported: UserId,
    /// Message ids the reporter shared.
    pub message_ids: Vec<MessageId>,
    /// Why.
    pub reason: ReportReason,
    /// Free text.
    pub comment: String,
    /// When.
    pub time_ms: u64,
}

pub use state_op::*;
/// Holds [`StateOp`]: rkyv's generated resolver has undocumented fields.
mod state_op {
    #![allow(missing_docs)]
    use super::*;

    /// Body of a `State` record: one change to the state tables.
    #[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
    #[rkyv(derive(Debug), attr(allow(missing_docs)))]
    #[allow(missing_docs)] // Variant fields are documented by the variant.
    pub enum StateOp {
        /// Create an account (no devices yet).
        PutAccount { user_id: UserId, phone: String, created_ms: u64 },
        /// Delete an account and everything in it.
        DeleteAccount { user_id: UserId },
        /// Add or replace a device.
        PutDevice { user_id: UserId, device: DeviceRecord },
        /// Remove a device.
        RemoveDevice { user_id: UserId, device_id: DeviceId },
        /// Replace a device's token hash.
        SetToken { user_id: UserId, device_id: DeviceId, token_hash: [u8; 32] },
        /// Add one-time prekeys to a device's stock.
        AddOneTimeKeys { user_id: UserId, device_id: DeviceId, keys: Vec<SignedPrekey> },
        /// Replace a device's fallback key.
        SetFallbackKey { user_id: UserId, device_id: DeviceId, key: SignedPrekey },
        /// A one-time prekey was handed out: remove it from the stock for good.
        ClaimOneTimeKey { user_id: UserId, device_id: DeviceId, key_id: u64 },
        /// Set a device's push endpoint.
        SetPush { user_id: UserId, device_id: DeviceId, endpoint: Option<PushEndpoint> },
        /// Add or replace a group.
        PutGroup { group: GroupRecord },
        /// Delete a group.
        DeleteGroup { group_id: GroupId },
        /// Block or unblock a user.
        SetBlocked { user_id: UserId, other: UserId, blocked: bool },
        /// Replace a profile.
        SetProfile { user_id: UserId, profile: ProfileRecord },
        /// Replace privacy settings.
        SetPrivacy { user_id: UserId, privacy: PrivacySettings },
        /// Replace the contact list.
        SetContacts { user_id: UserId, contacts: Vec<UserId> },
        /// Set or clear the registration-lock hash.
        SetRegistrationLock { user_id: UserId, pin_hash: Option<Vec<u8>> },
        /// Record when a user was last seen.
        SetLastSeen { user_id: UserId, last_seen_ms: u64 },
        /// Add or replace media metadata.
        PutMedia { media: MediaRecord },
        /// Delete media metadata.
        DeleteMedia { media_id: MediaId },
        /// Store a report.
        AddReport { report: ReportRecord },
        /// A message was accepted whose envelopes live in other shards (a group
        /// message, on its group's shard): remembered in this shard's dedup window like
        /// a stored envelope, so a retry after a crash finds its server id.
        NoteSend {
            sender_user: UserId,
            sender_device: DeviceId,
            client_message_id: u64,
            server_message_id: u64,
            time_ms: u64,
        },
        /// Replace a phone number's failed registration attempts of the day.
        SetRegistrationFailures { failures: RegistrationFailures },
        /// Replace the device list the account's primary device signed (opaque bytes,
        /// the clients' format; served with the account's key bundles).
        SetDeviceList { user_id: UserId, device_list: Vec<u8> },
    }
}
