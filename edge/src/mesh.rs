//! What cores say to each other: the messages of the channel mesh, as plain owned data.
//!
//! A user's connections, mailboxes and state live on the core that owns the user's home
//! shard, so most work never leaves its core. What does cross — a message to a user homed
//! elsewhere, a receipt routed back to its sender, a key-bundle fetch, a metrics snapshot —
//! is one of these values. The core (`core.rs`) produces them into a per-destination
//! outbox and consumes them in `Core::on_mesh`; the runtime moves each outbox as one mesh
//! message per destination per loop turn. Nothing here borrows: a value crosses a thread.

use tern_engine::ShardCounters;
use tern_wire::messages::{
    ContactMatch, DeviceBundle, DeviceId, E2eType, EnvelopeKind, GroupId, GroupUpdate, MediaData,
    MediaId, MessageId, NewDevice, PhoneHash, PresenceEvent, Profile, Registered, UserId,
};
use tern_wire::ErrorCode;

use crate::metrics::Histogram;

/// One item of a core-to-core batch.
#[derive(Debug)]
pub enum CoreMsg {
    /// Work for the receiving core; `token` comes back in the [`CoreMsg::Reply`] (0: no
    /// reply wanted).
    Request {
        /// The asking core.
        from: u32,
        /// The asker's handle on the answer.
        token: u64,
        /// What to do.
        request: Request,
    },
    /// The answer to a request.
    Reply {
        /// The asker's token.
        token: u64,
        /// The answer.
        reply: Reply,
    },
    /// A core's metrics, pushed periodically to the core that serves the admin endpoint.
    Stats(Box<CoreStats>),
}

/// Work one core asks of the core owning a user's home shard.
#[derive(Debug)]
pub enum Request {
    /// Store a message's copies for the recipient's devices (answered once durable).
    Deliver(DeliverRequest),
    /// Append a server-made envelope (a receipt) to every device of `to_user`.
    ServerEnvelope {
        /// The recipient.
        to_user: UserId,
        /// On whose behalf (the receipt's author).
        from: (UserId, DeviceId),
        /// Envelope kind.
        kind: EnvelopeKind,
        /// The archived body.
        body: Vec<u8>,
        /// The asker's clock.
        now_ms: u64,
    },
    /// Take the device waiting with a linking code (answered with [`Reply::Link`]).
    ClaimLink {
        /// The code the primary device approved.
        code: String,
        /// The asker's clock.
        now_ms: u64,
    },
    /// How a link ended, for the new device's connection waiting with `code`.
    LinkDone {
        /// The linking code.
        code: String,
        /// The new device's credentials, or why not.
        registered: Result<Registered, ErrorCode>,
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
    /// Remove the queued copies of `sender`'s messages from `from_user`'s mailboxes
    /// (deleted for everyone); answered with `Done` once durable.
    Unqueue {
        /// Whose messages.
        sender: UserId,
        /// Whose mailboxes.
        from_user: UserId,
        /// Which.
        message_ids: Vec<MessageId>,
    },
    /// A group change, with the acting device's signing key (answered `Reply::Group`).
    GroupUpdate {
        /// The acting device.
        actor: (UserId, DeviceId),
        /// Its Ed25519 key, from its home core.
        signing_key: [u8; 32],
        /// The change.
        update: GroupUpdate,
        /// The asker's clock.
        now_ms: u64,
    },
    /// A group message for the group's core to order and fan out (answered
    /// `Reply::Group` with the `SendAck`).
    GroupSend {
        /// Sender, ids, times, kind.
        meta: Box<crate::core::EnvelopeMeta>,
        /// The group.
        group_id: GroupId,
        /// How it is encrypted (Megolm).
        e2e_type: E2eType,
        /// The one ciphertext.
        ciphertext: Vec<u8>,
    },
    /// Store a group envelope for the listed members' devices here (answered `Done`).
    GroupDeliver(GroupDelivery),
    /// A member asks for a group's state (answered `Reply::Group`).
    GroupInfo {
        /// Who asks.
        requester: UserId,
        /// The group.
        group_id: GroupId,
    },
    /// Read part of a blob homed on the receiving core for `reader` (answered
    /// `Reply::Media`).
    MediaRead {
        /// Who downloads.
        reader: UserId,
        /// The blob.
        media_id: MediaId,
        /// First byte.
        offset: u64,
        /// Bytes wanted.
        length: u32,
    },
    /// A deleted user leaves the groups homed on the receiving core.
    ForgetMember {
        /// Whom.
        user_id: UserId,
    },
    /// Which of these phone hashes are registered on the receiving core (answered
    /// `Reply::Discovered`).
    Discover {
        /// Truncated SHA-256 hashes.
        hashes: Vec<PhoneHash>,
    },
    /// The groups homed on the receiving core that `user_id` belongs to (answered
    /// `Reply::Memberships`; for an account export).
    Memberships {
        /// Whose.
        user_id: UserId,
    },
    /// What `requester` may see of `target`'s profile (answered `Reply::Profile`).
    Profile {
        /// Who asks.
        requester: UserId,
        /// Whose.
        target: UserId,
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
    /// Hand out `target`'s key bundles (one-time keys claimed; answered once durable).
    FetchBundles {
        /// Whose keys.
        target: UserId,
        /// Which devices (empty: all).
        wanted: Vec<DeviceId>,
    },
}

/// A send's copies for one recipient user, checked and appended on its home core.
#[derive(Debug)]
pub struct DeliverRequest {
    /// The authenticated sending device.
    pub sender: (UserId, DeviceId),
    /// The recipient user.
    pub peer: UserId,
    /// The sender's id for the message (dedup key with `sender`).
    pub client_message_id: u64,
    /// The id the sender's core allocated.
    pub server_message_id: MessageId,
    /// When the server accepted it.
    pub server_time_ms: u64,
    /// When it expires undelivered.
    pub expires_ms: u64,
    /// Text, media or control.
    pub kind: EnvelopeKind,
    /// One ciphertext per recipient device.
    pub copies: Vec<OwnedCopy>,
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

/// One device's ciphertext, owned so that it can cross cores.
#[derive(Debug)]
pub struct OwnedCopy {
    /// The device.
    pub device_id: DeviceId,
    /// How it is encrypted.
    pub e2e_type: E2eType,
    /// The ciphertext.
    pub ciphertext: Vec<u8>,
}

/// Answers to [`Request`]s.
#[derive(Debug)]
pub enum Reply {
    /// The outcome of a [`Request::Deliver`].
    Deliver(DeliverOutcome),
    /// A request that only succeeds or fails.
    Done(Result<(), ErrorCode>),
    /// Key bundles, or why not.
    Bundles(Result<Vec<DeviceBundle>, ErrorCode>),
    /// The device waiting to be linked.
    Link(Result<Box<NewDevice>, ErrorCode>),
    /// The registered numbers among those asked.
    Discovered(Vec<ContactMatch>),
    /// Groups the user belongs to.
    Memberships(Vec<GroupMembership>),
    /// A profile as the requester may see it (`None`: no such user).
    Profile(Option<Box<Profile>>),
    /// Part of a blob, or why not.
    Media(Result<MediaData, (ErrorCode, String)>),
    /// A group change applied, a group's state, or a group message stored.
    Group(Result<crate::core::GroupAnswer, (ErrorCode, String)>),
}

/// A user's membership of one group (for an export).
#[derive(Clone, Debug)]
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

/// What became of the recipient's copies of a send.
#[derive(Debug)]
pub enum DeliverOutcome {
    /// Stored durably.
    Stored,
    /// A retry: the original id (durable).
    Duplicate(MessageId),
    /// The copies do not match the recipient's devices.
    Stale {
        /// Devices without a copy.
        missing: Vec<(UserId, DeviceId)>,
        /// Copies for devices that do not exist.
        extra: Vec<(UserId, DeviceId)>,
    },
    /// Nothing could be stored; the code says why.
    Failed(ErrorCode),
}

/// A snapshot of one core's metrics.
#[derive(Clone, Debug)]
pub struct CoreStats {
    /// Which core.
    pub core: u32,
    /// Open client connections.
    pub connections: u64,
    /// Bytes queued for client sockets.
    pub outbound_bytes: u64,
    /// Frames decoded from clients.
    pub frames_in: u64,
    /// Messages accepted with a sent tick.
    pub messages_sent: u64,
    /// Envelopes written to recipient connections.
    pub messages_delivered: u64,
    /// Receipts written to sender connections.
    pub receipts_delivered: u64,
    /// Connections refused or closed for bad input.
    pub protocol_errors: u64,
    /// Mesh messages sent to other cores (batches).
    pub mesh_batches_out: u64,
    /// Items in those batches.
    pub mesh_items_out: u64,
    /// Connections handed to another core.
    pub handed_over: u64,
    /// Envelopes dropped from full mailboxes (each announced).
    pub dropped_envelopes: u64,
    /// Verification codes sent.
    pub codes_sent: u64,
    /// Code requests refused by a budget.
    pub codes_refused: u64,
    /// Proof-of-work challenges given.
    pub pow_challenges: u64,
    /// Presence events sent after coalescing.
    pub presence_events: u64,
    /// Connections accepted by this core's listeners.
    pub connections_accepted: u64,
    /// Connections that failed (handshake, auth deadline, bad token, protocol error,
    /// refused at the limit), each counted once.
    pub connections_failed: u64,
    /// Disk use of this core's shards (and, on core 0, of the file system).
    pub disk: DiskUsage,
    /// The counters of each shard this core owns, by shard id.
    pub shards: Vec<(u32, ShardCounters)>,
    /// Shards of this core that refuse writes since an I/O error, with the error.
    pub failed_shards: Vec<(u32, String)>,
    /// Send → sent tick, seconds.
    pub send_to_sent: Histogram,
    /// Send → delivered to a connection, seconds.
    pub send_to_deliver: Histogram,
    /// Records per group commit.
    pub commit_batch_records: Histogram,
}

/// Disk use as the runtime measured it (the core itself does no I/O).
#[derive(Clone, Debug, Default)]
pub struct DiskUsage {
    /// Bytes allocated to each owned shard's files (segments, which are preallocated,
    /// and checkpoints), by shard id.
    pub shard_allocated_bytes: Vec<(u32, u64)>,
    /// The data directory's file system (measured by core 0 only).
    pub file_system: Option<FileSystemSpace>,
}

/// Space on the data directory's file system (statvfs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileSystemSpace {
    /// Bytes available to the server (`f_bavail`: what an unprivileged writer can use).
    pub free_bytes: u64,
    /// Bytes in all (`f_blocks`).
    pub size_bytes: u64,
}
