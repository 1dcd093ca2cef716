//! What cores say to each other: the messages of the channel mesh, as plain owned data.
//!
//! A user's connections, mailboxes and state live on the core that owns the user's home
//! shard, so most work never leaves its core. What does cross — a message to a user homed
//! elsewhere, a receipt routed back to its sender, a key-bundle fetch, a metrics snapshot —
//! is a [`CoreMsg`] addressed to `(node, core)` ([`Address`]; node 0 is this process).
//! The core queues them per destination and the runtime moves each destination's queue
//! as one mesh message per loop turn. Nothing here borrows: a value crosses a thread.
//!
//! Three kinds of message:
//! - a **call** ([`calls`]): a request whose answer has one type, fixed by the request's
//!   type (`ClaimBundles` → `Result<Bundles, KeysRefusal>`); the server gets a
//!   typed [`calls::ReplyTo`] that can only carry that answer, the asker keeps a
//!   continuation per call type, so a reply of the wrong kind cannot be written;
//! - a **tell** ([`Tell`]): work that needs no answer (presence, typing, link results);
//! - a metrics snapshot for the admin endpoint's core.

pub mod calls;

pub use crate::routing::Address;
pub use calls::{Call, Reply, ReplyTo, Request};

use tern_wire::messages::{
    DeviceId, E2eType, EnvelopeKind, GroupId, MessageId, PresenceEvent, Registered, UserId,
};

use crate::refusal::LinkRefusal;
use crate::stats::CoreStats;

/// One item of a core-to-core batch.
#[derive(Debug)]
pub enum CoreMsg {
    /// Work for the receiving core; its [`ReplyTo`] (if any) says where the answer goes.
    Request(Request),
    /// The answer to a request.
    Reply(Reply),
    /// Work that needs no answer.
    Tell(Tell),
    /// A core's metrics, pushed periodically to the core that serves the admin endpoint.
    Stats(Box<CoreStats>),
}

/// Work for another core that needs no answer.
#[derive(Debug)]
pub enum Tell {
    /// How a link ended, for the new device's connection waiting with `code`.
    LinkDone {
        /// The linking code.
        code: String,
        /// The new device's credentials, or why not.
        registered: Result<Registered, LinkRefusal>,
    },
    /// Start (or stop) telling `subscriber` about the presence of `targets`.
    Watch {
        /// Who follows.
        subscriber: UserId,
        /// Whom (homed on the receiving core).
        targets: Vec<UserId>,
        /// Start or stop.
        watch: bool,
    },
    /// Presence events for the connected devices of `subscriber`.
    Presence {
        /// Who is told.
        subscriber: UserId,
        /// What (coalesced for this loop turn).
        events: Vec<PresenceEvent>,
    },
    /// A typing indicator for the online devices of `to_user` (never stored).
    Typing {
        /// The recipient.
        to_user: UserId,
        /// Who types.
        from: (UserId, DeviceId),
        /// Started or stopped.
        active: bool,
    },
    /// A deleted user leaves the groups homed on the receiving core.
    ForgetMember {
        /// Whom.
        user_id: UserId,
    },
}

/// What every copy of one message shares.
#[derive(Clone, Copy, Debug)]
pub struct EnvelopeMeta {
    /// The id the server gave it.
    pub server_message_id: MessageId,
    /// The sender's id for it (dedup key with `sender`).
    pub client_message_id: u64,
    /// When the server accepted it.
    pub server_time_ms: u64,
    /// When it expires undelivered.
    pub expires_ms: u64,
    /// The authenticated sending device.
    pub sender: (UserId, DeviceId),
    /// The user the message is to (unused for groups).
    pub peer: UserId,
    /// Text, media or control.
    pub kind: EnvelopeKind,
}

/// One device's ciphertext, owned so that it can cross cores.
#[derive(Clone, Debug)]
pub struct OwnedCopy {
    /// The device.
    pub device_id: DeviceId,
    /// How it is encrypted.
    pub e2e_type: E2eType,
    /// The ciphertext.
    pub ciphertext: Vec<u8>,
}

/// One group envelope for some members of a group, on their home core.
#[derive(Clone, Debug)]
pub struct GroupDelivery {
    /// The group.
    pub group_id: GroupId,
    /// The sending device (it gets no copy).
    pub sender: (UserId, DeviceId),
    /// The sender's id for it (0 for group events).
    pub client_message_id: u64,
    /// The id the group's core gave it (also its place in the group's order).
    pub server_message_id: MessageId,
    /// When the server accepted it.
    pub server_time_ms: u64,
    /// When it expires undelivered.
    pub expires_ms: u64,
    /// A message kind, or `GroupEvent`.
    pub kind: EnvelopeKind,
    /// Megolm for messages, plain for group events.
    pub e2e_type: E2eType,
    /// The ciphertext (or the archived `GroupEventBody`).
    pub body: Vec<u8>,
    /// Members homed on the receiving core.
    pub recipients: Vec<UserId>,
}

/// A user's membership of one group (for an export).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMembership {
    /// The group.
    pub group_id: GroupId,
    /// Its name.
    pub name: String,
    /// Whether the user is an admin.
    pub admin: bool,
    /// When the user joined.
    pub joined_ms: u64,
    /// How many members it has.
    pub members: u32,
}
