//! The frame type table: every v1 frame type and its 16-bit code, written once.
//!
//! `frame_types!` holds the table and hands it to a macro: this module turns it into
//! [`MessageType`], `catalogue.rs` into the payload views and the validating dispatcher,
//! so they can never disagree. The table sits below both `error.rs` (a decode error names
//! the frame type) and `catalogue.rs` (which returns decode errors), so the crate's
//! module graph has no cycle.
//!
//! Code ranges: `0x00xx` session, `0x01xx` registration and devices, `0x02xx` keys,
//! `0x03xx` messaging, `0x04xx` presence and typing, `0x05xx` groups, `0x06xx` media,
//! `0x07xx` accounts. Codes are never reused.

use rkyv::Archive;

use crate::messages::*;

/// Calls `$callback!` with the table: one `code => PayloadType,` line per frame type but
/// `Deliver` (code `0x0301`, whose payload is not a single archive).
macro_rules! frame_types {
    ($callback:ident) => {
        $callback! {
            // Session.
            0x0001 => Hello,
            0x0002 => Welcome,
            0x0003 => Auth,
            0x0004 => AuthOk,
            0x0005 => Ping,
            0x0006 => Pong,
            0x0007 => ErrorFrame,
            0x0008 => Done,
            0x0009 => Redirect,
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
            0x0207 => PublishDeviceList,
            // Messaging (0x0301 is Deliver).
            0x0300 => SendMessage,
            0x0302 => SendAck,
            0x0303 => SendError,
            0x0304 => DeliveryAck,
            0x0305 => Resync,
            0x0306 => SendReceipt,
            0x0307 => DeleteForEveryone,
            0x0308 => DiscardAck,
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
    };
}
pub(crate) use frame_types;

macro_rules! message_type {
    ($( $code:literal => $name:ident, )*) => {
        /// Every frame type of protocol v1, with its 16-bit code.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        #[repr(u16)]
        pub enum MessageType {
            /// Mailbox sequence + stored envelope (see [`Deliver`](crate::Deliver)).
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
    };
}

frame_types!(message_type);
