//! Borrowing twins of the hot-path payloads, for encoding without building a `Vec`.
//!
//! The server makes one [`Envelope`] per accepted copy of a message, and clients make a
//! [`SendMessage`] per message. Building the owned types would mean allocating a `Vec`
//! for each ciphertext only to archive it. The `*Ref` types here borrow instead, and
//! archive *as the same archived type* (`#[rkyv(as = ...)]`): the compiler checks that
//! every field resolves to the field of the owned type's archive, and a property test
//! (`tests::borrowed_twins_encode_identically`) checks the bytes are equal.

use rkyv::rancor::Fallible;
use rkyv::ser::{Allocator, Writer};
use rkyv::vec::{ArchivedVec, VecResolver};
use rkyv::with::{ArchiveWith, SerializeWith};
use rkyv::{Archive, Place, Serialize};

use crate::messages::{
    ArchivedDeviceCopy, ArchivedEnvelope, ArchivedSendMessage, Conversation, DeviceId, E2eType,
    EnvelopeKind, MessageId, UserId,
};

/// Archives a borrowed slice exactly as a `Vec` of the same elements.
pub struct SliceAsVec;

impl<'a, T: Archive> ArchiveWith<&'a [T]> for SliceAsVec {
    type Archived = ArchivedVec<T::Archived>;
    type Resolver = VecResolver;

    fn resolve_with(field: &&'a [T], resolver: VecResolver, out: Place<Self::Archived>) {
        ArchivedVec::resolve_from_len(field.len(), resolver, out);
    }
}

impl<'a, T, S> SerializeWith<&'a [T], S> for SliceAsVec
where
    T: Serialize<S>,
    S: Fallible + Allocator + Writer + ?Sized,
{
    fn serialize_with(field: &&'a [T], serializer: &mut S) -> Result<VecResolver, S::Error> {
        ArchivedVec::<T::Archived>::serialize_from_slice(field, serializer)
    }
}

/// [`crate::messages::Envelope`] with a borrowed body.
#[derive(Archive, Serialize, Debug, Clone)]
#[rkyv(as = ArchivedEnvelope, serialize_bounds(__S: Allocator + Writer))]
pub struct EnvelopeRef<'a> {
    /// See [`crate::messages::Envelope::server_message_id`].
    pub server_message_id: MessageId,
    /// See [`crate::messages::Envelope::client_message_id`].
    pub client_message_id: u64,
    /// See [`crate::messages::Envelope::server_time_ms`].
    pub server_time_ms: u64,
    /// See [`crate::messages::Envelope::expires_ms`].
    pub expires_ms: u64,
    /// See [`crate::messages::Envelope::sender_user`].
    pub sender_user: UserId,
    /// See [`crate::messages::Envelope::sender_device`].
    pub sender_device: DeviceId,
    /// See [`crate::messages::Envelope::conversation`].
    pub conversation: Conversation,
    /// See [`crate::messages::Envelope::conversation_seq`].
    pub conversation_seq: u64,
    /// See [`crate::messages::Envelope::kind`].
    pub kind: EnvelopeKind,
    /// See [`crate::messages::Envelope::e2e_type`].
    pub e2e_type: E2eType,
    /// See [`crate::messages::Envelope::body`].
    #[rkyv(with = SliceAsVec, omit_bounds)]
    pub body: &'a [u8],
}

/// [`crate::messages::DeviceCopy`] with a borrowed ciphertext.
#[derive(Archive, Serialize, Debug, Clone)]
#[rkyv(as = ArchivedDeviceCopy, serialize_bounds(__S: Allocator + Writer))]
pub struct DeviceCopyRef<'a> {
    /// See [`crate::messages::DeviceCopy::user_id`].
    pub user_id: UserId,
    /// See [`crate::messages::DeviceCopy::device_id`].
    pub device_id: DeviceId,
    /// See [`crate::messages::DeviceCopy::e2e_type`].
    pub e2e_type: E2eType,
    /// See [`crate::messages::DeviceCopy::ciphertext`].
    #[rkyv(with = SliceAsVec, omit_bounds)]
    pub ciphertext: &'a [u8],
}

/// [`crate::messages::SendMessage`] with borrowed copies.
#[derive(Archive, Serialize, Debug, Clone)]
#[rkyv(as = ArchivedSendMessage, serialize_bounds(__S: Allocator + Writer))]
pub struct SendMessageRef<'a> {
    /// See [`crate::messages::SendMessage::client_message_id`].
    pub client_message_id: u64,
    /// See [`crate::messages::SendMessage::to`].
    pub to: Conversation,
    /// See [`crate::messages::SendMessage::kind`].
    pub kind: EnvelopeKind,
    /// See [`crate::messages::SendMessage::ttl_s`].
    pub ttl_s: u32,
    /// See [`crate::messages::SendMessage::copies`].
    #[rkyv(with = SliceAsVec, omit_bounds)]
    pub copies: &'a [DeviceCopyRef<'a>],
}

impl crate::Payload for SendMessageRef<'_> {
    const TYPE: crate::MessageType = crate::MessageType::SendMessage;
}
