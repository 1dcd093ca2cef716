//! Payload views: which payload a frame carries, and validated access to it.
//!
//! The frame type table (`frame_types!` in `types.rs`) is handed to the `catalogue!`
//! macro below, which turns it into the [`Message`] view enum, the [`Payload`] impls and
//! the validating dispatcher, so they can never disagree with [`MessageType`].

use rkyv::rancor::Failure;
use rkyv::Archive;

use crate::error::DecodeError;
use crate::messages::*;
use crate::types::MessageType;

/// A payload type of the catalogue: its type code is known at compile time.
pub trait Payload: Archive {
    /// The frame type that carries this payload.
    const TYPE: MessageType;
}

/// Validates `bytes` as the archive of `T` and returns a view of it.
///
/// Every byte is checked (lengths, pointers, enum tags, UTF-8) before a reference is
/// handed out, so the view can be read without further checks.
pub fn access<T>(bytes: &[u8]) -> Result<&T::Archived, DecodeError>
where
    T: Payload,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, Failure>>,
{
    rkyv::access::<T::Archived, Failure>(bytes)
        .map_err(|_| DecodeError::BadPayload { message_type: T::TYPE })
}

/// Like [`access`], for archived types that are not frames (envelope bodies).
pub(crate) fn access_body<A>(bytes: &[u8], context: MessageType) -> Result<&A, DecodeError>
where
    A: rkyv::Portable
        + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, Failure>>,
{
    rkyv::access::<A, Failure>(bytes).map_err(|_| DecodeError::BadPayload { message_type: context })
}

/// The view of a `Deliver` frame: a mailbox sequence number and the stored envelope.
///
/// `Deliver` is the one frame whose payload is not a single archive: it is the 8-byte
/// little-endian mailbox sequence followed by the envelope record exactly as the engine
/// stored it, so the server can send a record without re-encoding it.
#[derive(Debug, Clone, Copy)]
pub struct Deliver<'a> {
    /// The envelope's position in the recipient device's mailbox.
    pub mailbox_seq: u64,
    /// The validated envelope.
    pub envelope: &'a ArchivedEnvelope,
    /// The envelope's bytes (the archive `envelope` points into).
    pub envelope_bytes: &'a [u8],
}

/// Size of the mailbox sequence prefix of a `Deliver` payload.
pub const DELIVER_PREFIX_BYTES: usize = 8;

fn access_deliver(payload: &[u8]) -> Result<Deliver<'_>, DecodeError> {
    let bad = DecodeError::BadPayload { message_type: MessageType::Deliver };
    let (prefix, envelope_bytes) =
        payload.split_first_chunk::<DELIVER_PREFIX_BYTES>().ok_or(bad)?;
    let envelope = access_body::<ArchivedEnvelope>(envelope_bytes, MessageType::Deliver)?;
    Ok(Deliver { mailbox_seq: u64::from_le_bytes(*prefix), envelope, envelope_bytes })
}

macro_rules! catalogue {
    ($( $code:literal => $name:ident, )*) => {
        $(
            impl Payload for $name {
                const TYPE: MessageType = MessageType::$name;
            }
        )*

        /// A validated, zero-copy view of a frame's payload.
        #[derive(Debug, Clone, Copy)]
        #[non_exhaustive]
        pub enum Message<'a> {
            /// A delivered envelope.
            Deliver(Deliver<'a>),
            $(
                #[doc = concat!("A [`", stringify!($name), "`].")]
                $name(&'a <$name as Archive>::Archived),
            )*
        }

        impl<'a> Message<'a> {
            /// Validates `payload` as the payload of a frame of type `message_type`.
            pub fn validate(
                message_type: MessageType,
                payload: &'a [u8],
            ) -> Result<Message<'a>, DecodeError> {
                match message_type {
                    MessageType::Deliver => access_deliver(payload).map(Message::Deliver),
                    $(MessageType::$name => access::<$name>(payload).map(Message::$name),)*
                }
            }

            /// Fuzzing property: a payload that validates deserializes to a value whose
            /// re-encoding validates and deserializes to the same value.
            #[cfg(any(test, fuzzing))]
            pub fn check_reencode(message_type: MessageType, payload: &[u8]) {
                match message_type {
                    MessageType::Deliver => {
                        if let Ok(deliver) = access_deliver(payload) {
                            reencode::<Envelope>(deliver.envelope);
                        }
                    }
                    $(MessageType::$name => {
                        if let Ok(archived) = access::<$name>(payload) {
                            reencode::<$name>(archived);
                        }
                    })*
                }
            }

            /// The frame type of this payload.
            pub fn message_type(&self) -> MessageType {
                match self {
                    Message::Deliver(_) => MessageType::Deliver,
                    $(Message::$name(_) => MessageType::$name,)*
                }
            }
        }
    };
}

crate::types::frame_types!(catalogue);

/// Deserializes `archived`, encodes the value again and checks that it reads back equal.
#[cfg(any(test, fuzzing))]
fn reencode<T>(archived: &T::Archived)
where
    T: Archive
        + PartialEq
        + core::fmt::Debug
        + for<'a, 'b> rkyv::Serialize<crate::WireSerializer<'a, 'b>>,
    T::Archived: rkyv::Deserialize<T, rkyv::rancor::Strategy<rkyv::de::Pool, Failure>>
        + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, Failure>>,
{
    let value: T = rkyv::deserialize::<T, Failure>(archived).expect("a valid archive deserializes");
    let mut bytes = Vec::new();
    crate::encode_archive(&mut bytes, &value).expect("a deserialized value encodes");
    let again = rkyv::access::<T::Archived, Failure>(&bytes).expect("a re-encoding validates");
    let back: T = rkyv::deserialize::<T, Failure>(again).expect("and deserializes");
    assert_eq!(back, value, "re-encoding changed the value");
}

/// The server-made content of an envelope, validated according to its kind.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum EnvelopeContent<'a> {
    /// Client ciphertext (text, media or control); opaque to the server.
    Ciphertext(&'a [u8]),
    /// A delivered/read receipt.
    Receipt(&'a ArchivedReceiptBody),
    /// A group change.
    GroupEvent(&'a ArchivedGroupEventBody),
    /// A server notice.
    Notice(&'a ArchivedNoticeBody),
}

impl ArchivedEnvelope {
    /// The envelope's body, validated according to its kind.
    pub fn content(&self) -> Result<EnvelopeContent<'_>, DecodeError> {
        let body: &[u8] = &self.body;
        let context = MessageType::Deliver;
        Ok(match self.kind {
            ArchivedEnvelopeKind::Text
            | ArchivedEnvelopeKind::Media
            | ArchivedEnvelopeKind::Control => EnvelopeContent::Ciphertext(body),
            ArchivedEnvelopeKind::Receipt => {
                EnvelopeContent::Receipt(access_body::<ArchivedReceiptBody>(body, context)?)
            }
            ArchivedEnvelopeKind::GroupEvent => {
                EnvelopeContent::GroupEvent(access_body::<ArchivedGroupEventBody>(body, context)?)
            }
            ArchivedEnvelopeKind::Notice => {
                EnvelopeContent::Notice(access_body::<ArchivedNoticeBody>(body, context)?)
            }
        })
    }
}
