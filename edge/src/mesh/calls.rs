//! Typed calls between cores: each request type names its answer type.
//!
//! One table ([`calls!`]) lists every call as `Variant(RequestType) -> AnswerType` and
//! generates the [`Request`] and [`Reply`] enums from it, with one variant each, and the
//! [`Call`] impls that tie them together. A core serving a call gets the request and a
//! [`ReplyTo<RequestType>`], whose [`ReplyTo::answer`] takes only that call's answer
//! type; a reply carries the token the asker chose, and the asker looks the token up in
//! its continuations *for that call* only. So an answer of the wrong kind cannot be
//! written, and cannot meet the wrong continuation (the failure the untyped mesh logged
//! and dropped, leaving the client unanswered).

use std::marker::PhantomData;

use tern_wire::messages::{
    Bundles, ContactMatch, DeviceId, E2eType, EnvelopeKind, GroupId, GroupInfo, GroupUpdate,
    GroupUpdated, MediaData, MediaId, MessageId, NewDevice, PhoneHash, Profile, SendAck, UserId,
};

use super::{CoreMsg, EnvelopeMeta, GroupDelivery, GroupMembership, OwnedCopy};
use crate::refusal::{
    GroupRefusal, KeysRefusal, LinkRefusal, MediaRefusal, SendRefusal, StorageRefusal,
};
use crate::routing::Address;

/// A request whose answer has one type.
pub trait Call: Sized {
    /// What the serving core answers.
    type Answer;
    /// The request, with where its answer goes (`None`: nobody waits for it).
    fn into_request(self, reply_to: Option<ReplyTo<Self>>) -> Request;
    /// The reply for the asker's `token`.
    fn into_reply(token: u64, answer: Self::Answer) -> Reply;
}

/// Where the answer to one call of type `C` goes: the asking core and its token. Only
/// `C`'s answer type fits.
pub struct ReplyTo<C> {
    to: Address,
    token: u64,
    call: PhantomData<fn() -> C>,
}

impl<C> std::fmt::Debug for ReplyTo<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyTo").field("to", &self.to).field("token", &self.token).finish()
    }
}

impl<C: Call> ReplyTo<C> {
    /// The answer to `token` goes to `to`.
    pub fn new(to: Address, token: u64) -> ReplyTo<C> {
        ReplyTo { to, token, call: PhantomData }
    }

    /// The asking core.
    pub fn to(&self) -> Address {
        self.to
    }

    /// The message that carries `answer` back.
    pub fn answer(self, answer: C::Answer) -> (Address, CoreMsg) {
        (self.to, CoreMsg::Reply(C::into_reply(self.token, answer)))
    }
}

/// Declares the calls: `Variant(Request) -> Answer;` per line.
macro_rules! calls {
    ($( $(#[$meta:meta])* $variant:ident($request:ident) -> $answer:ty; )*) => {
        /// Work one core asks of another, with where the answer goes.
        #[derive(Debug)]
        pub enum Request {
            $( $(#[$meta])* $variant($request, Option<ReplyTo<$request>>), )*
        }

        /// An answer, with the asker's token.
        #[derive(Debug)]
        pub enum Reply {
            $( $(#[$meta])* $variant(u64, $answer), )*
        }

        $(
            impl Call for $request {
                type Answer = $answer;
                fn into_request(self, reply_to: Option<ReplyTo<Self>>) -> Request {
                    Request::$variant(self, reply_to)
                }
                fn into_reply(token: u64, answer: Self::Answer) -> Reply {
                    Reply::$variant(token, answer)
                }
            }
        )*
    };
}

calls! {
    /// Store a 1:1 message's copies for the recipient's devices (answered once durable).
    StoreCopies(StoreCopies) -> Result<Stored, SendRefusal>;
    /// Append a server-made envelope (a receipt, a notice) for every device of a user.
    StoreServerEnvelope(StoreServerEnvelope) -> Result<(), StorageRefusal>;
    /// Remove the queued copies of messages deleted for everyone (answered once durable).
    UnqueueMessages(UnqueueMessages) -> ();
    /// Hand out a user's key bundles (one-time keys claimed; answered once durable).
    ClaimBundles(ClaimBundles) -> Result<Bundles, KeysRefusal>;
    /// Take the device waiting with a linking code.
    ClaimLink(ClaimLink) -> Result<NewDevice, LinkRefusal>;
    /// A group change, checked and stored on the group's core (answered once durable).
    ApplyGroupChange(ApplyGroupChange) -> Result<GroupUpdated, GroupRefusal>;
    /// A group message for the group's core to order and fan out (answered once every
    /// member core has its copies durable).
    OrderGroupMessage(OrderGroupMessage) -> Result<SendAck, GroupRefusal>;
    /// Store a group envelope for members homed on the receiving core (once durable).
    StoreGroupCopies(GroupDelivery) -> ();
    /// A member asks for a group's state.
    ReadGroup(ReadGroup) -> Result<GroupInfo, GroupRefusal>;
    /// Which of these users (homed on the receiving core) refuse to be added to a group
    /// by the actor.
    CheckGroupAdds(CheckGroupAdds) -> Vec<UserId>;
    /// Read part of a blob homed on the receiving core.
    ReadMedia(ReadMedia) -> Result<MediaData, MediaRefusal>;
    /// Which of these phone hashes are registered on the receiving core.
    FindPhones(FindPhones) -> Vec<ContactMatch>;
    /// The groups homed on the receiving core that a user belongs to.
    ListMemberships(ListMemberships) -> Vec<GroupMembership>;
    /// What one user may see of another's profile (`None`: no such user).
    ReadProfile(ReadProfile) -> Option<Profile>;
}

/// A send's copies for one recipient user, checked and appended on its home core.
#[derive(Debug)]
pub struct StoreCopies {
    /// Sender, ids, times, kind.
    pub meta: EnvelopeMeta,
    /// One ciphertext per recipient device.
    pub copies: Vec<OwnedCopy>,
}

/// What became of the recipient's copies of a send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Stored durably now.
    New,
    /// A retry: stored before, under this id (durable).
    Duplicate(MessageId),
}

/// A server-made envelope for every device of `to_user`.
#[derive(Debug)]
pub struct StoreServerEnvelope {
    /// The recipient.
    pub to_user: UserId,
    /// On whose behalf (a receipt's author; `(0, 0)` for the server itself).
    pub from: (UserId, DeviceId),
    /// Envelope kind.
    pub kind: EnvelopeKind,
    /// The archived body.
    pub body: Vec<u8>,
    /// The asker's clock.
    pub now_ms: u64,
}

/// Messages deleted for everyone: their queued copies go from `from_user`'s mailboxes.
#[derive(Debug)]
pub struct UnqueueMessages {
    /// Whose messages.
    pub sender: UserId,
    /// Whose mailboxes.
    pub from_user: UserId,
    /// Which.
    pub message_ids: Vec<MessageId>,
}

/// A key-bundle fetch.
#[derive(Debug)]
pub struct ClaimBundles {
    /// Whose keys.
    pub target: UserId,
    /// Which devices (empty: all).
    pub wanted: Vec<DeviceId>,
}

/// The primary device approved a linking code held by the receiving core.
#[derive(Debug)]
pub struct ClaimLink {
    /// The code.
    pub code: String,
    /// The asker's clock.
    pub now_ms: u64,
}

/// A group change, with the acting device's signing key (from its home core).
#[derive(Debug)]
pub struct ApplyGroupChange {
    /// The acting device.
    pub actor: (UserId, DeviceId),
    /// Its Ed25519 key.
    pub signing_key: [u8; 32],
    /// The change.
    pub update: GroupUpdate,
    /// The asker's clock.
    pub now_ms: u64,
}

/// A group message to order and fan out.
#[derive(Debug)]
pub struct OrderGroupMessage {
    /// Sender, ids, times, kind (`server_message_id` is given by the group's core).
    pub meta: EnvelopeMeta,
    /// The group.
    pub group_id: GroupId,
    /// How it is encrypted (Megolm).
    pub e2e_type: E2eType,
    /// The one ciphertext.
    pub ciphertext: Vec<u8>,
}

/// Whether users may be added to a group by `actor`.
#[derive(Debug)]
pub struct CheckGroupAdds {
    /// Who adds.
    pub actor: UserId,
    /// Whom (homed on the receiving core).
    pub users: Vec<UserId>,
}

/// A member asks for a group's state.
#[derive(Debug)]
pub struct ReadGroup {
    /// Who asks.
    pub requester: UserId,
    /// The group.
    pub group_id: GroupId,
}

/// Part of a blob for a reader.
#[derive(Debug)]
pub struct ReadMedia {
    /// Who downloads.
    pub reader: UserId,
    /// The blob.
    pub media_id: MediaId,
    /// First byte.
    pub offset: u64,
    /// Bytes wanted.
    pub length: u32,
}

/// Contact discovery's question to one core.
#[derive(Debug)]
pub struct FindPhones {
    /// Truncated SHA-256 hashes.
    pub hashes: Vec<PhoneHash>,
}

/// An export's question to one core.
#[derive(Debug)]
pub struct ListMemberships {
    /// Whose.
    pub user_id: UserId,
}

/// A profile as `requester` may see it.
#[derive(Debug)]
pub struct ReadProfile {
    /// Who asks.
    pub requester: UserId,
    /// Whose.
    pub target: UserId,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answer of a call comes back as that call's reply, with the asker's token.
    #[test]
    fn an_answer_is_the_reply_of_its_call() {
        let reply_to = ReplyTo::<ClaimBundles>::new(Address::local(3), 42);
        let (to, message) = reply_to.answer(Err(KeysRefusal::NoSuchUser));
        assert_eq!(to, Address::local(3));
        assert!(matches!(
            message,
            CoreMsg::Reply(Reply::ClaimBundles(42, Err(KeysRefusal::NoSuchUser)))
        ));
    }
}
