//! Why the server says no: one enum per subsystem, one variant per rule.
//!
//! rustls-style (`PeerMisbehaved`): a handler that refuses returns the variant of the
//! rule that failed, and the one place that writes error frames
//! (`core::conns::Conns::refuse`) turns it into an `ErrorFrame` (or a `SendError` for
//! sends) with the variant's [`ErrorCode`], its text and its retry hint. So no two rules
//! answer the same bare code, a test can assert the rule, and what crosses the mesh is a
//! typed value, not a `(code, String)` pair. Texts say what to do, for people reading
//! logs and for apps that show them.
//!
//! A leaf module: the mesh's answers carry these, the core produces them.

use std::fmt;

use tern_wire::messages::{DeviceId, UserId};
use tern_wire::ErrorCode;

/// A reason to refuse a request, as a client learns it.
pub trait Refusal: fmt::Display {
    /// The machine-readable code.
    fn code(&self) -> ErrorCode;
    /// When non-zero: retry no sooner than this.
    fn retry_after_ms(&self) -> u32 {
        0
    }
}

/// Declares a refusal enum: each variant with its code (an expression over the
/// variant's fields) and its text (a format string over them).
macro_rules! refusals {
    ($(#[$meta:meta])* pub enum $name:ident {
        $( $(#[$vmeta:meta])* $variant:ident $({ $($field:ident : $ty:ty),* $(,)? })?
            => $code:expr, $text:literal ),* $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum $name {
            $( $(#[$vmeta])* $variant $({ $(#[allow(missing_docs)] $field: $ty),* })? ),*
        }

        impl $name {
            /// The machine-readable code of this rule.
            #[allow(unused_variables)]
            pub fn error_code(&self) -> ErrorCode {
                match self {
                    $( $name::$variant $({ $($field),* })? => $code, )*
                }
            }
        }

        impl fmt::Display for $name {
            #[allow(unused_variables)]
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $( $name::$variant $({ $($field),* })? => write!(f, $text), )*
                }
            }
        }
    };
}

/// Milliseconds as a wire retry hint (saturating).
pub fn retry_hint(ms: u64) -> u32 {
    ms.min(u64::from(u32::MAX)) as u32
}

/// A cluster node, asked for something homed on another node (a user's keys or
/// profile): nodes do not reach each other yet (no node-to-node mesh: issue 22), so the
/// request is refused with a hint to retry, never answered as if the user did not exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OtherNodeRefusal {
    /// The shard that holds what was asked for.
    pub shard: u32,
}

impl fmt::Display for OtherNodeRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "this is homed on shard {}, on another node of the cluster, which this node \
             cannot reach yet; retry later",
            self.shard
        )
    }
}

impl Refusal for OtherNodeRefusal {
    fn code(&self) -> ErrorCode {
        ErrorCode::ShardUnavailable
    }
    fn retry_after_ms(&self) -> u32 {
        60_000
    }
}

refusals! {
    /// The shard would not take a write.
    #[derive(Copy)]
    pub enum StorageRefusal {
        /// The disk is full.
        Full => ErrorCode::StorageFull, "the server's disk is full; retry later",
        /// Free space is under the disk reserve (`--disk-reserve-mib`): what is left is
        /// kept for messages, so new accounts, uploads and exports wait.
        Reserve => ErrorCode::StorageFull,
            "the server keeps its last free disk space for messages; retry later",
        /// A record over the engine's limit.
        TooLarge => ErrorCode::TooLarge, "too large for the server to store",
        /// The shard refuses writes since an I/O error, or another failure.
        Failed => ErrorCode::Internal, "the server could not store this; retry later",
    }
}

impl StorageRefusal {
    /// The refusal for an engine write error.
    pub fn of(error: &tern_engine::WriteError) -> StorageRefusal {
        match error {
            tern_engine::WriteError::StorageFull => StorageRefusal::Full,
            tern_engine::WriteError::RecordTooLarge { .. } => StorageRefusal::TooLarge,
            _ => StorageRefusal::Failed,
        }
    }
}

impl Refusal for StorageRefusal {
    fn code(&self) -> ErrorCode {
        self.error_code()
    }
    fn retry_after_ms(&self) -> u32 {
        match self {
            StorageRefusal::TooLarge => 0,
            // An operator has to free space: not a matter of a second.
            StorageRefusal::Reserve => 60_000,
            StorageRefusal::Full | StorageRefusal::Failed => 1000,
        }
    }
}

refusals! {
    /// The connection's state does not allow the frame, or the connection ends.
    pub enum SessionRefusal {
        /// Anything before `Hello`.
        NotHello => ErrorCode::UnexpectedFrame, "the first frame must be Hello",
        /// A second `Hello`.
        HelloAgain => ErrorCode::UnexpectedFrame, "Hello was already sent",
        /// No version in common (or a bad magic).
        Version { why: String } => ErrorCode::UnsupportedVersion, "{why}",
        /// An operation before authentication.
        AuthRequired => ErrorCode::AuthRequired,
            "authenticate (Auth) or register (RequestCode, Verify) first",
        /// Registration or auth on an authenticated connection.
        AlreadyAuthenticated => ErrorCode::UnexpectedFrame,
            "this connection is already authenticated",
        /// A frame type the server does not serve.
        Unsupported => ErrorCode::UnexpectedFrame, "not supported by this server version yet",
        /// Unknown device or wrong token.
        BadToken => ErrorCode::BadToken, "unknown device or wrong token",
        /// No auth or traffic in time.
        Timeout => ErrorCode::Timeout, "no authentication or traffic in time; reconnect",
        /// The server is stopping.
        ShuttingDown => ErrorCode::ShuttingDown, "the server is stopping; reconnect later",
        /// Output piled up past its bound: the client asked and did not read.
        NotReading { bytes: usize } => ErrorCode::NotReading,
            "more than {bytes} bytes of output unread; read what you ask for",
        /// A costly request over its budget (`core::budgets`).
        OverBudget { what: &'static str, retry_after_ms: u32 } => ErrorCode::RateLimited,
            "too many {what}; retry later",
        /// The connection limit.
        TooManyConnections => ErrorCode::TooManyConnections,
            "the server holds its maximum number of connections; retry later",
        /// The per-address limit on connections that have not authenticated.
        AddressBusy => ErrorCode::TooManyConnections,
            "too many connections from this network address have not authenticated; \
             authenticate or close them first",
        /// A payload that validated but would not deserialize.
        Unreadable => ErrorCode::Malformed, "unreadable",
        /// The request reached a core that does not own what it needs (a routing bug).
        WrongCore => ErrorCode::Internal, "the request reached the wrong core; retry",
        /// A cluster node, asked for a shard no live node owns yet (the cluster is
        /// forming, or the owner's lease lapsed).
        ShardUnplaced { shard: u32 } => ErrorCode::ShardUnavailable,
            "no node of the cluster serves shard {shard} yet; retry shortly",
        /// Undecodable input (the decoder's error).
        Malformed { code: ErrorCode, why: String } => *code, "{why}",
    }
}

impl Refusal for SessionRefusal {
    fn code(&self) -> ErrorCode {
        self.error_code()
    }
    fn retry_after_ms(&self) -> u32 {
        match self {
            SessionRefusal::ShuttingDown | SessionRefusal::TooManyConnections => 1000,
            SessionRefusal::AddressBusy => 1000,
            SessionRefusal::WrongCore => 1000,
            SessionRefusal::ShardUnplaced { .. } => 1000,
            SessionRefusal::OverBudget { retry_after_ms, .. } => *retry_after_ms,
            _ => 0,
        }
    }
}

refusals! {
    /// Why a send (1:1 or group) was refused: answered as a `SendError`.
    pub enum SendRefusal {
        /// A kind only the server makes.
        NotAClientKind => ErrorCode::InvalidArgument,
            "a client may send only text, media or control messages",
        /// A copy marked `Plain`.
        PlainCopy => ErrorCode::InvalidArgument,
            "a copy marked Plain: only the server makes unencrypted envelopes",
        /// Two copies for one device.
        DuplicateCopy => ErrorCode::InvalidArgument, "two copies for the same device",
        /// A group message with other than one copy.
        GroupCopyCount => ErrorCode::InvalidArgument,
            "a group message carries exactly one (Megolm) copy",
        /// The device's send budget.
        RateLimited { retry_after_ms: u32 } => ErrorCode::RateLimited,
            "too many messages from this device; slow down",
        /// The device's budget of messages to people who never wrote to its account.
        StrangerRate { retry_after_ms: u32 } => ErrorCode::RateLimited,
            "too many messages to people who never wrote to this account; slow down",
        /// No such recipient.
        NoSuchUser => ErrorCode::NotFound, "no such user",
        /// A cluster node: the recipient is homed on another node, and nodes do not
        /// reach each other yet (no node-to-node mesh: issue 22).
        OtherNode { shard: u32 } => ErrorCode::ShardUnavailable,
            "the recipient is homed on shard {shard}, on another node of the cluster, which \
             this node cannot reach yet; retry later",
        /// A recipient device's mailbox is full.
        MailboxFull => ErrorCode::QuotaExceeded,
            "the recipient's mailbox is full of undelivered messages; retry later",
        /// The sender holds its whole share of a recipient device's mailbox.
        OverMailboxShare => ErrorCode::QuotaExceeded,
            "the recipient's mailbox holds all the undelivered messages one sender may queue \
             there; wait until they are delivered",
        /// The copies do not match the devices.
        StaleDevices {
            missing: Vec<(UserId, DeviceId)>,
            extra: Vec<(UserId, DeviceId)>,
        } => ErrorCode::StaleDevices, "the copies do not match the devices of the conversation",
        /// The group refused it (not a member, no such group).
        Group { refusal: GroupRefusal } => refusal.error_code(), "{refusal}",
        /// A shard refused the write.
        Storage { refusal: StorageRefusal } => refusal.error_code(), "{refusal}",
    }
}

impl Refusal for SendRefusal {
    fn code(&self) -> ErrorCode {
        self.error_code()
    }
    fn retry_after_ms(&self) -> u32 {
        match self {
            SendRefusal::RateLimited { retry_after_ms } => *retry_after_ms,
            SendRefusal::StrangerRate { retry_after_ms } => *retry_after_ms,
            SendRefusal::MailboxFull | SendRefusal::OverMailboxShare => 60_000,
            SendRefusal::Storage { refusal } => refusal.retry_after_ms(),
            SendRefusal::OtherNode { .. } => 60_000,
            _ => 0,
        }
    }
}

refusals! {
    /// Read receipts.
    pub enum ReceiptRefusal {
        /// The reader's device never received anything from the receipt's addressee.
        NothingReceived => ErrorCode::Forbidden,
            "this device never received a message from that user: there is nothing to receipt",
        /// Too many message ids in one receipt.
        TooManyIds { count: usize, max: usize } => ErrorCode::TooLarge,
            "{count} message ids in one receipt; at most {max}",
    }
}

impl Refusal for ReceiptRefusal {
    fn code(&self) -> ErrorCode {
        self.error_code()
    }
}

refusals! {
    /// Registration: code requests and verification.
    pub enum RegistrationRefusal {
        /// Not E.164.
        BadPhone => ErrorCode::InvalidArgument, "phone must be E.164: '+' and 8 to 15 digits",
        /// The per-address budget.
        AddressBudget { retry_after_ms: u32 } => ErrorCode::RateLimited,
            "too many codes requested from this network address",
        /// The per-prefix budget.
        PrefixBudget { retry_after_ms: u32 } => ErrorCode::RateLimited,
            "too many codes requested for numbers like this one",
        /// The per-number budget.
        NumberBudget { retry_after_ms: u32 } => ErrorCode::RateLimited,
            "too many codes requested for this number",
        /// Too many wrong codes for this number today.
        CodeTries { retry_after_ms: u32 } => ErrorCode::RateLimited,
            "too many wrong codes for this number today; retry tomorrow",
        /// Too many proof-of-work challenges outstanding on this core.
        Challenges { retry_after_ms: u32 } => ErrorCode::RateLimited,
            "too many registrations are under way; retry later",
        /// Verify without a code.
        NoCode => ErrorCode::InvalidCode, "no code was requested for this number",
        /// The code expired.
        CodeExpired => ErrorCode::CodeExpired, "the code expired; request a new one",
        /// A wrong code (more tries left).
        WrongCode => ErrorCode::InvalidCode, "wrong code",
        /// A wrong code, the last allowed.
        WrongCodeBurnt => ErrorCode::InvalidCode,
            "wrong code; too many attempts, request a new one",
        /// Keys that do not deserialize.
        UnreadableKeys => ErrorCode::Malformed, "unreadable device keys",
        /// A key whose signature does not verify.
        BadKeys { why: &'static str } => ErrorCode::InvalidSignature, "{why}",
        /// The number is locked.
        Locked => ErrorCode::RegistrationLocked, "this number is locked: give its PIN",
        /// Too many wrong PINs.
        PinTries { retry_after_ms: u32 } => ErrorCode::RateLimited, "too many wrong PINs today",
        /// A PIN too short to protect anything, or too long to hash cheaply.
        PinLength { bytes: usize, min: usize, max: usize } => ErrorCode::InvalidArgument,
            "a PIN of {bytes} bytes; it must have {min} to {max}",
        /// Only the primary device sets the lock.
        NotPrimary => ErrorCode::Forbidden, "only the primary device sets the registration lock",
        /// A verification that lost a race with another for the same code.
        CodeUsed => ErrorCode::InvalidCode, "the code was used meanwhile; request a new one",
        /// The registration reached the wrong core (a routing bug).
        WrongCore => ErrorCode::Internal, "registration reached the wrong core",
        /// A shard refused the write.
        Storage { refusal: StorageRefusal } => refusal.error_code(), "{refusal}",
    }
}

impl Refusal for RegistrationRefusal {
    fn code(&self) -> ErrorCode {
        self.error_code()
    }
    fn retry_after_ms(&self) -> u32 {
        match self {
            RegistrationRefusal::AddressBudget { retry_after_ms }
            | RegistrationRefusal::PrefixBudget { retry_after_ms }
            | RegistrationRefusal::NumberBudget { retry_after_ms }
            | RegistrationRefusal::Challenges { retry_after_ms }
            | RegistrationRefusal::CodeTries { retry_after_ms }
            | RegistrationRefusal::PinTries { retry_after_ms } => *retry_after_ms,
            RegistrationRefusal::Storage { refusal } => refusal.retry_after_ms(),
            RegistrationRefusal::WrongCore => 1000,
            _ => 0,
        }
    }
}

refusals! {
    /// Linking a companion device.
    pub enum LinkRefusal {
        /// Keys that do not deserialize.
        UnreadableKeys => ErrorCode::Malformed, "unreadable keys",
        /// A key whose signature does not verify.
        BadKeys { why: &'static str } => ErrorCode::InvalidSignature, "{why}",
        /// One link request per connection.
        AlreadyAsked => ErrorCode::UnexpectedFrame, "this connection already asked to be linked",
        /// The per-address budget.
        AddressBudget { retry_after_ms: u32 } => ErrorCode::RateLimited,
            "too many devices asked to be linked from this network address",
        /// Only the primary approves.
        NotPrimary => ErrorCode::Forbidden, "only the primary device links devices",
        /// No such code (or already claimed).
        NoSuchCode => ErrorCode::InvalidCode, "no such linking code",
        /// The code expired.
        Expired => ErrorCode::CodeExpired, "the linking code expired; ask for a new one",
        /// The account has its maximum of devices.
        TooManyDevices => ErrorCode::QuotaExceeded, "this account has its maximum of devices",
        /// The approving side failed.
        NotCompleted { code: ErrorCode } => *code, "the link was not completed",
        /// A shard refused the write.
        Storage { refusal: StorageRefusal } => refusal.error_code(), "{refusal}",
    }
}

impl Refusal for LinkRefusal {
    fn code(&self) -> ErrorCode {
        self.error_code()
    }
    fn retry_after_ms(&self) -> u32 {
        match self {
            LinkRefusal::AddressBudget { retry_after_ms } => *retry_after_ms,
            _ => 0,
        }
    }
}

refusals! {
    /// Keys: uploads and bundle fetches.
    pub enum KeysRefusal {
        /// Keys that do not deserialize.
        UnreadableKeys => ErrorCode::Malformed, "unreadable keys",
        /// A prekey not signed by the device.
        BadSignature => ErrorCode::InvalidSignature,
            "a key's signature does not verify with this device's signing key",
        /// The per-pair fetch budget.
        RateLimited { retry_after_ms: u32 } => ErrorCode::RateLimited,
            "too many key fetches for this user",
        /// No such user.
        NoSuchUser => ErrorCode::NotFound, "no such user",
        /// More one-time keys in one frame than a frame may carry.
        TooManyInFrame { count: usize, max: usize } => ErrorCode::TooLarge,
            "{count} one-time keys in one frame; at most {max}",
        /// The upload would leave the device holding more keys than it may.
        StockFull { stock: usize, max: usize } => ErrorCode::QuotaExceeded,
            "the server holds {stock} one-time keys of this device; at most {max}",
        /// A device name over its limit.
        NameTooLong { bytes: usize, max: usize } => ErrorCode::TooLarge,
            "a device name of {bytes} bytes; at most {max}",
        /// A companion device publishing a device list (only the primary signs it).
        NotPrimary => ErrorCode::Forbidden, "only the primary device publishes the device list",
        /// A signed device list over its limit.
        DeviceListTooLarge { bytes: usize, max: usize } => ErrorCode::TooLarge,
            "a device list of {bytes} bytes; at most {max}",
        /// A shard refused the write.
        Storage { refusal: StorageRefusal } => refusal.error_code(), "retry later",
    }
}

impl Refusal for KeysRefusal {
    fn code(&self) -> ErrorCode {
        self.error_code()
    }
    fn retry_after_ms(&self) -> u32 {
        match self {
            KeysRefusal::RateLimited { retry_after_ms } => *retry_after_ms,
            _ => 0,
        }
    }
}

refusals! {
    /// Groups: changes, messages, state.
    pub enum GroupRefusal {
        /// A change that does not deserialize or cannot be signed over.
        Unreadable => ErrorCode::Malformed, "unreadable change",
        /// The Ed25519 signature does not verify.
        BadSignature => ErrorCode::InvalidSignature, "the change is not signed by this device",
        /// A new group's epoch.
        NewGroupEpoch => ErrorCode::Conflict, "a new group starts at epoch 0",
        /// The id is taken.
        IdTaken => ErrorCode::Conflict, "this group id is taken; draw another",
        /// A name over its limit.
        NameTooLong { bytes: usize, max: usize } => ErrorCode::TooLarge,
            "a group name of {bytes} bytes; at most {max}",
        /// No such group.
        NoSuchGroup => ErrorCode::NotFound, "no such group",
        /// A cluster node: the group or one of its members is homed on another node,
        /// and nodes do not reach each other yet (no node-to-node mesh: issue 22).
        OtherNode { shard: u32 } => ErrorCode::ShardUnavailable,
            "the group or one of its members is homed on shard {shard}, on another node of \
             the cluster, which this node cannot reach yet; retry later",
        /// A stale epoch.
        StaleEpoch => ErrorCode::Conflict, "the group changed meanwhile; refresh",
        /// Not a member.
        NotMember => ErrorCode::Forbidden, "not a member of this group",
        /// Not an admin.
        NotAdmin => ErrorCode::NotAdmin, "only a group admin may do this",
        /// Over 256 members.
        Full => ErrorCode::GroupFull, "a group has at most 256 members",
        /// The account created its groups for the day.
        CreatedToday { count: u32, max: u32 } => ErrorCode::QuotaExceeded,
            "{count} groups created today; at most {max} a day",
        /// Promote/demote of a non-member.
        NoSuchMember => ErrorCode::NotFound, "not a member",
        /// Users who do not accept group adds from the actor (they blocked it, or let
        /// only contacts, or nobody, add them).
        CannotAdd { users: Vec<UserId> } => ErrorCode::Forbidden,
            "these users do not accept being added to groups by you: {users:?}",
        /// A shard refused the write.
        Storage { refusal: StorageRefusal } => refusal.error_code(), "{refusal}",
    }
}

impl Refusal for GroupRefusal {
    fn code(&self) -> ErrorCode {
        self.error_code()
    }
    fn retry_after_ms(&self) -> u32 {
        match self {
            GroupRefusal::OtherNode { .. } => 60_000,
            _ => 0,
        }
    }
}

refusals! {
    /// Media: uploads and downloads.
    pub enum MediaRefusal {
        /// Over `--media-max-bytes`.
        FileTooLarge => ErrorCode::TooLarge, "the file is larger than this server accepts",
        /// The server was started without a media directory.
        NoMedia => ErrorCode::Internal, "this server stores no media",
        /// An unknown kind.
        UnknownKind => ErrorCode::Malformed, "unknown media kind",
        /// Not the uploader's, or no such upload.
        NoSuchUpload => ErrorCode::NotFound, "no such upload",
        /// The upload's file is gone (expired).
        Expired => ErrorCode::NotFound, "the upload expired",
        /// Chunks or commits after the commit.
        Committed => ErrorCode::Conflict, "this upload is committed",
        /// A chunk out of order.
        OutOfOrder => ErrorCode::Conflict, "chunks must come in order: ask for the status",
        /// More than declared.
        TooManyBytes => ErrorCode::TooLarge, "more bytes than declared",
        /// The account has its maximum of uploads in progress.
        UploadsInProgress { max: usize } => ErrorCode::QuotaExceeded,
            "this account has {max} uploads in progress; commit one (or let it expire) first",
        /// The account holds its maximum of media bytes.
        AccountBytes { max: u64 } => ErrorCode::QuotaExceeded,
            "this account holds at most {max} bytes of media; wait until older files expire",
        /// A commit before all bytes arrived.
        Incomplete => ErrorCode::InvalidArgument, "the upload is not complete",
        /// The hash does not match.
        HashMismatch => ErrorCode::HashMismatch, "the stored bytes do not have this hash",
        /// A download of nothing visible (a guessed id and a forbidden one look alike).
        NoSuchMedia => ErrorCode::NotFound, "no such media",
        /// The blob store failed (disk full, I/O error).
        Io { code: ErrorCode } => *code, "the server could not store or read media; retry later",
        /// A shard refused the write.
        Storage { refusal: StorageRefusal } => refusal.error_code(), "{refusal}",
    }
}

impl Refusal for MediaRefusal {
    fn code(&self) -> ErrorCode {
        self.error_code()
    }
    fn retry_after_ms(&self) -> u32 {
        match self {
            MediaRefusal::Storage { refusal } => refusal.retry_after_ms(),
            _ => 0,
        }
    }
}

refusals! {
    /// Accounts: devices, discovery, profiles, privacy, reports, deletion, export.
    pub enum AccountRefusal {
        /// Only the primary unlinks others.
        UnlinkOthers => ErrorCode::Forbidden, "only the primary device unlinks other devices",
        /// The primary cannot be unlinked.
        UnlinkPrimary => ErrorCode::Forbidden,
            "the primary device cannot be unlinked (register again to move it)",
        /// No such device.
        NoSuchDevice => ErrorCode::NotFound, "no such device",
        /// The discovery budget.
        DiscoveryBudget { retry_after_ms: u32 } => ErrorCode::RateLimited,
            "the daily contact-discovery budget is used up",
        /// No such user.
        NoSuchUser => ErrorCode::NotFound, "no such user",
        /// The account is gone.
        NoAccount => ErrorCode::NotFound, "no account",
        /// Deleted meanwhile.
        Deleted => ErrorCode::NotFound, "the account was deleted",
        /// Only the primary deletes.
        DeleteNotPrimary => ErrorCode::Forbidden, "only the primary device deletes the account",
        /// The confirmation.
        DeleteConfirm => ErrorCode::InvalidArgument, "give the account's phone number to confirm",
        /// Too many users to follow.
        TooManyFollowed => ErrorCode::TooLarge, "too many users to follow at once",
        /// A per-account quota (contacts, blocks, message ids in a report).
        TooMany { what: &'static str, count: usize, max: usize } => ErrorCode::QuotaExceeded,
            "{count} {what}; at most {max}",
        /// A UnifiedPush endpoint that is not a URL (or too long).
        BadEndpoint => ErrorCode::InvalidArgument, "a UnifiedPush endpoint must be an http(s) URL",
        /// A UnifiedPush endpoint ternd will not call: it could reach inside the network.
        EndpointInside { why: &'static str } => ErrorCode::InvalidArgument,
            "a UnifiedPush endpoint must be https to a public host: this one {why}",
        /// The export could not be stored.
        Export { refusal: MediaRefusal } => refusal.error_code(), "{refusal}",
        /// A shard refused the write.
        Storage { refusal: StorageRefusal } => refusal.error_code(), "{refusal}",
    }
}

impl Refusal for AccountRefusal {
    fn code(&self) -> ErrorCode {
        self.error_code()
    }
    fn retry_after_ms(&self) -> u32 {
        match self {
            AccountRefusal::DiscoveryBudget { retry_after_ms } => *retry_after_ms,
            AccountRefusal::Storage { refusal } => refusal.retry_after_ms(),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rule says which rule it is: the four checks of a send that all answered a
    /// bare `InvalidArgument` are told apart by their text, and nested refusals keep the
    /// inner code.
    #[test]
    fn refusals_name_their_rule() {
        let texts: std::collections::BTreeSet<String> = [
            SendRefusal::NotAClientKind,
            SendRefusal::PlainCopy,
            SendRefusal::DuplicateCopy,
            SendRefusal::GroupCopyCount,
        ]
        .iter()
        .map(|r| {
            assert_eq!(r.code(), ErrorCode::InvalidArgument);
            r.to_string()
        })
        .collect();
        assert_eq!(texts.len(), 4);
        let nested = SendRefusal::Group { refusal: GroupRefusal::NotMember };
        assert_eq!(nested.code(), ErrorCode::Forbidden);
        assert_eq!(nested.to_string(), "not a member of this group");
        let full = SendRefusal::Storage { refusal: StorageRefusal::Full };
        assert_eq!((full.code(), full.retry_after_ms()), (ErrorCode::StorageFull, 1000));
        let limited = RegistrationRefusal::PrefixBudget { retry_after_ms: 7 };
        assert_eq!(limited.retry_after_ms(), 7);
    }
}
