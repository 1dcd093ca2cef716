//! Type codes: which payload a frame carries, and validated access to it.
//!
//! One table (the `catalogue!` invocation below) names every frame type once; the
//! macro turns it into [`MessageType`], the [`Message`] view enum, the [`Payload`] impls
//! and the validating dispatcher, so the four can never disagree.
//!
//! Code ranges: `0x00xx` session, `0x01xx` registration and devices, `0x02xx` keys,
//! `0x03xx` messaging, `0x04xx` presence and typing, `0x05xx` groups, `0x06xx` media,
//! `0x07xx` accounts. Codes are never reused.

use rkyv::rancor::Failure;
use rkyv::Archive;

use crate::error::DecodeError;
use crate::messages::*;

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
        /// Every frame type of protocol v1, with its 16-bit code.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        #[repr(u16)]
        pub enum MessageType {
            /// Mailbox sequence + stored envelope (see [`Deliver`]).
            Deliver = 0x0301,
            $(
                #[doc = concat!("Payload: [`", stringify!($name), "`].")]
                $name = $code,
            )*
        }

        impl MessageType {
            /// Every type, in code order of the table (tests and fuzzers walk it).
            pub const ALL: &'static [MessageType] =
                &[MessageType::Deliver, $(MessageType::$name,)*];

            /// The type with this code, if protocol v1 has one.
            pub fn from_code(code: u16) -> Option<MessageType> {
                match code {
                    0x0301 => Some(MessageType::Deliver),
                    $($code => Some(MessageType::$name),)*
                    _ => None,
                }
            }

            /// The 16-bit code on the wire.
            pub fn code(self) -> u16 {
                self as u16
            }

            /// Size of the payload's root object (for `Deliver`: the envelope's), which
            /// `docs/PROTOCOL.md` lists; variable-size data comes before it.
            pub fn archived_root_bytes(self) -> usize {
                match self {
                    MessageType::Deliver => core::mem::size_of::<ArchivedEnvelope>(),
                    $(MessageType::$name => core::mem::size_of::<<$name as Archive>::Archived>(),)*
                }
            }

            /// The type's name, for logs and errors.
            pub fn name(self) -> &'static str {
                match self {
                    MessageType::Deliver => "Deliver",
                    $(MessageType::$name => stringify!($name),)*
                }
            }
        }

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

catalogue! {
    // Session.
    0x0001 => Hello,
    0x0002 => Welcome,
    0x0003 => Auth,
    0x0004 => AuthOk,
    0x0005 => Ping,
    0x0006 => Pong,
    0x0007 => ErrorFrame,
    0x0008 => Done,
    // Registration and devices.
    0x0101 => RequestCode,
    0x0102 => CodeSent,
    0x0103 => PowChallenge,
    0x0104 => Verify,
    0x0105 => Registered,
    0x0106 => LinkRequest,
    0x0107 => LinkCode,
    0x0108 => LinkApprove,
    0x0109 => DeviceListRequest,
    0x010A => DeviceList,
    0x010B => Unlink,
    0x010C => SetRegistrationLock,
    // Keys.
    0x0201 => UploadKeys,
    0x0202 => KeysUploaded,
    0x0203 => FetchBundles,
    0x0204 => Bundles,
    0x0205 => KeysLow,
    0x0206 => DeviceListChanged,
    // Messaging (0x0301 is Deliver).
    0x0300 => SendMessage,
    0x0302 => SendAck,
    0x0303 => SendError,
    0x0304 => DeliveryAck,
    0x0305 => Resync,
    0x0306 => SendReceipt,
    0x0307 => DeleteForEveryone,
    // Presence and typing.
    0x0401 => Typing,
    0x0402 => TypingEvent,
    0x0403 => PresenceSubscribe,
    0x0404 => PresenceEvent,
    // Groups.
    0x0501 => GroupUpdate,
    0x0502 => GroupUpdated,
    0x0503 => GroupInfoRequest,
    0x0504 => GroupInfo,
    // Media.
    0x0601 => MediaBegin,
    0x0602 => MediaBegun,
    0x0603 => MediaChunk,
    0x0604 => MediaStatusRequest,
    0x0605 => MediaStatus,
    0x0606 => MediaCommit,
    0x0607 => MediaDownload,
    0x0608 => MediaData,
    // Accounts.
    0x0701 => ContactDiscover,
    0x0702 => ContactMatches,
    0x0703 => SetContacts,
    0x0704 => ProfileGet,
    0x0705 => Profile,
    0x0706 => ProfileSet,
    0x0707 => PrivacyGet,
    0x0708 => PrivacySettings,
    0x0709 => Block,
    0x070A => Unblock,
    0x070B => Report,
    0x070C => DeleteAccount,
    0x070D => ExportRequest,
    0x070E => ExportReady,
    0x070F => PushRegister,
}

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
