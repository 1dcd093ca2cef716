//! Property and malformed-input tests of the codec.
//!
//! Goal: every payload type survives encode → decode → deserialize unchanged, the
//! decoder gives the same frames however the stream is cut, and no byte sequence makes
//! it panic or accept garbage. Method: proptest over derived `Arbitrary` values for
//! every catalogue type, plus targeted corruptions of real frames.

use proptest::prelude::*;
use rkyv::rancor::Failure;

use crate::messages::*;
use crate::*;

const MAX: u32 = ABSOLUTE_MAX_FRAME_BYTES;

/// Encodes `value` as a frame, decodes it back and checks header, length and content.
fn check_round_trip<T>(value: &T, request_id: u32)
where
    T: Payload + PartialEq + core::fmt::Debug + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    T::Archived: rkyv::Deserialize<T, rkyv::rancor::Strategy<rkyv::de::Pool, Failure>>
        + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, Failure>>,
{
    let mut out = vec![0xAA; 3]; // Frames append: existing bytes must be kept.
    let frame_bytes = encode_frame(&mut out, request_id, FLAG_RESPONSE, value, MAX).unwrap();
    assert_eq!(out.len(), 3 + frame_bytes);
    assert_eq!(&out[..3], &[0xAA; 3]);

    let (frame, used) = decode_frame(&out[3..], MAX).unwrap().expect("a whole frame");
    assert_eq!(used, frame_bytes);
    assert_eq!(frame.header.message_type, T::TYPE);
    assert_eq!(frame.message.message_type(), T::TYPE);
    assert_eq!(frame.header.request_id, request_id);
    assert!(frame.header.is_response());

    let archived = access::<T>(frame.payload).unwrap();
    let back: T = rkyv::deserialize::<T, Failure>(archived).unwrap();
    assert_eq!(&back, value);

    // Every strict prefix is "incomplete", never an error or a wrong frame.
    for cut in [0, 1, HEADER_BYTES - 1, HEADER_BYTES, frame_bytes - 1] {
        if cut < frame_bytes {
            assert!(decode_frame(&out[3..3 + cut], MAX).unwrap().is_none(), "cut at {cut}");
        }
    }
}

macro_rules! round_trip_tests {
    ($($test:ident: $ty:ty,)*) => {
        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            $(
                #[test]
                fn $test(value: $ty, request_id: u32) {
                    check_round_trip(&value, request_id);
                }
            )*
        }

        /// The list above must name every catalogue type but `Deliver` (tested alone).
        #[test]
        fn round_trip_tests_cover_the_catalogue() {
            let tested = [$(<$ty as Payload>::TYPE,)*];
            for ty in MessageType::ALL {
                if *ty != MessageType::Deliver {
                    assert!(tested.contains(ty), "no round-trip test for {}", ty.name());
                }
            }
        }
    };
}

round_trip_tests! {
    round_trip_hello: Hello,
    round_trip_welcome: Welcome,
    round_trip_auth: Auth,
    round_trip_auth_ok: AuthOk,
    round_trip_ping: Ping,
    round_trip_pong: Pong,
    round_trip_error_frame: ErrorFrame,
    round_trip_done: Done,
    round_trip_redirect: Redirect,
    round_trip_request_code: RequestCode,
    round_trip_code_sent: CodeSent,
    round_trip_pow_challenge: PowChallenge,
    round_trip_verify: Verify,
    round_trip_registered: Registered,
    round_trip_link_request: LinkRequest,
    round_trip_link_code: LinkCode,
    round_trip_link_approve: LinkApprove,
    round_trip_device_list_request: DeviceListRequest,
    round_trip_device_list: DeviceList,
    round_trip_unlink: Unlink,
    round_trip_set_registration_lock: SetRegistrationLock,
    round_trip_upload_keys: UploadKeys,
    round_trip_keys_uploaded: KeysUploaded,
    round_trip_fetch_bundles: FetchBundles,
    round_trip_bundles: Bundles,
    round_trip_keys_low: KeysLow,
    round_trip_device_list_changed: DeviceListChanged,
    round_trip_publish_device_list: PublishDeviceList,
    round_trip_send_message: SendMessage,
    round_trip_send_ack: SendAck,
    round_trip_send_error: SendError,
    round_trip_delivery_ack: DeliveryAck,
    round_trip_resync: Resync,
    round_trip_send_receipt: SendReceipt,
    round_trip_delete_for_everyone: DeleteForEveryone,
    round_trip_discard_ack: DiscardAck,
    round_trip_typing: Typing,
    round_trip_typing_event: TypingEvent,
    round_trip_presence_subscribe: PresenceSubscribe,
    round_trip_presence_event: PresenceEvent,
    round_trip_group_update: GroupUpdate,
    round_trip_group_updated: GroupUpdated,
    round_trip_group_info_request: GroupInfoRequest,
    round_trip_group_info: GroupInfo,
    round_trip_media_begin: MediaBegin,
    round_trip_media_begun: MediaBegun,
    round_trip_media_chunk: MediaChunk,
    round_trip_media_status_request: MediaStatusRequest,
    round_trip_media_status: MediaStatus,
    round_trip_media_commit: MediaCommit,
    round_trip_media_download: MediaDownload,
    round_trip_media_data: MediaData,
    round_trip_contact_discover: ContactDiscover,
    round_trip_contact_matches: ContactMatches,
    round_trip_set_contacts: SetContacts,
    round_trip_profile_get: ProfileGet,
    round_trip_profile: Profile,
    round_trip_profile_set: ProfileSet,
    round_trip_privacy_get: PrivacyGet,
    round_trip_privacy_settings: PrivacySettings,
    round_trip_block: Block,
    round_trip_unblock: Unblock,
    round_trip_report: Report,
    round_trip_delete_account: DeleteAccount,
    round_trip_export_request: ExportRequest,
    round_trip_export_ready: ExportReady,
    round_trip_push_register: PushRegister,
}

fn envelope_ref(envelope: &Envelope) -> EnvelopeRef<'_> {
    EnvelopeRef {
        server_message_id: envelope.server_message_id,
        client_message_id: envelope.client_message_id,
        server_time_ms: envelope.server_time_ms,
        expires_ms: envelope.expires_ms,
        sender_user: envelope.sender_user,
        sender_device: envelope.sender_device,
        conversation: envelope.conversation.clone(),
        conversation_seq: envelope.conversation_seq,
        kind: envelope.kind,
        e2e_type: envelope.e2e_type,
        body: &envelope.body,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The borrowing twins must produce the owned types' bytes exactly.
    #[test]
    fn borrowed_twins_encode_identically(envelope: Envelope, send: SendMessage) {
        let (mut owned, mut borrowed) = (Vec::new(), Vec::new());
        encode_archive(&mut owned, &envelope).unwrap();
        encode_archive(&mut borrowed, &envelope_ref(&envelope)).unwrap();
        prop_assert_eq!(&owned, &borrowed);

        let copies: Vec<DeviceCopyRef<'_>> = send
            .copies
            .iter()
            .map(|c| DeviceCopyRef {
                user_id: c.user_id,
                device_id: c.device_id,
                e2e_type: c.e2e_type,
                ciphertext: &c.ciphertext,
            })
            .collect();
        let send_ref = SendMessageRef {
            client_message_id: send.client_message_id,
            to: send.to.clone(),
            kind: send.kind,
            ttl_s: send.ttl_s,
            copies: &copies,
        };
        owned.clear();
        borrowed.clear();
        encode_frame(&mut owned, 7, 0, &send, MAX).unwrap();
        encode_frame(&mut borrowed, 7, 0, &send_ref, MAX).unwrap();
        prop_assert_eq!(owned, borrowed);
    }

    /// A stored envelope record framed as `Deliver` comes back byte for byte.
    #[test]
    fn deliver_round_trip(envelope: Envelope, mailbox_seq: u64, request_id: u32) {
        let mut record = Vec::new();
        encode_archive(&mut record, &envelope).unwrap();
        let mut out = Vec::new();
        let frame_bytes = encode_deliver(&mut out, request_id, mailbox_seq, &record, MAX).unwrap();
        prop_assert_eq!(&out[..HEADER_BYTES + DELIVER_PREFIX_BYTES],
            &deliver_preamble(request_id, mailbox_seq, record.len() as u32)[..]);
        let (frame, used) = decode_frame(&out, MAX).unwrap().unwrap();
        prop_assert_eq!(used, frame_bytes);
        let Message::Deliver(deliver) = frame.message else { panic!("not a Deliver") };
        prop_assert_eq!(deliver.mailbox_seq, mailbox_seq);
        prop_assert_eq!(deliver.envelope_bytes, &record[..]);
        let back: Envelope = rkyv::deserialize::<Envelope, Failure>(deliver.envelope).unwrap();
        prop_assert_eq!(back, envelope);
    }

    /// However a stream of frames is cut into reads, the decoder yields the same frames.
    #[test]
    fn decoder_is_independent_of_read_boundaries(
        pings in proptest::collection::vec(any::<u64>(), 1..20),
        send: SendMessage,
        cuts in proptest::collection::vec(1usize..64, 1..200),
    ) {
        let mut stream = Vec::new();
        for (i, nonce) in pings.iter().enumerate() {
            encode_frame(&mut stream, i as u32, 0, &Ping { nonce: *nonce }, MAX).unwrap();
            encode_frame(&mut stream, i as u32, 0, &send, MAX).unwrap();
        }
        let mut decoder = FrameDecoder::new(MAX);
        let mut seen = Vec::new();
        let mut rest = &stream[..];
        let mut cuts = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = (*cuts.next().unwrap()).min(rest.len());
            // Alternate the two ways of getting bytes in.
            if n % 2 == 0 {
                decoder.feed(&rest[..n]);
            } else {
                let spare = decoder.spare(64);
                spare[..n].copy_from_slice(&rest[..n]);
                decoder.commit(64, n);
            }
            rest = &rest[n..];
            while let Some(frame) = decoder.next_frame().unwrap() {
                let header = frame.header;
                seen.push((header.message_type, header.request_id, frame.payload.to_vec()));
            }
        }
        prop_assert_eq!(decoder.buffered_bytes(), 0);
        prop_assert_eq!(seen.len(), pings.len() * 2);
        for (i, nonce) in pings.iter().enumerate() {
            let (ty, id, payload) = &seen[2 * i];
            prop_assert_eq!(*ty, MessageType::Ping);
            prop_assert_eq!(*id, i as u32);
            prop_assert_eq!(access::<Ping>(payload).unwrap().nonce.to_native(), *nonce);
            prop_assert_eq!(seen[2 * i + 1].0, MessageType::SendMessage);
        }
    }

    /// A frame given back with `unread` and everything after it, taken with
    /// `take_buffered` and fed to a fresh decoder (another core's, in the server), yield
    /// the rest of the stream unchanged.
    #[test]
    fn handed_over_bytes_continue_the_stream(
        nonces in proptest::collection::vec(any::<u64>(), 2..20),
        split in 0usize..100,
        partial_tail in 0usize..20,
    ) {
        let mut stream = Vec::new();
        for (i, nonce) in nonces.iter().enumerate() {
            encode_frame(&mut stream, i as u32, 0, &Ping { nonce: *nonce }, MAX).unwrap();
        }
        let handed = split % (nonces.len() - 1); // The last frame may be partial.
        // Everything but a partial last frame arrives before the hand-over.
        let arrived = stream.len() - partial_tail.min(HEADER_BYTES);
        let mut first = FrameDecoder::new(MAX);
        first.feed(&stream[..arrived]);
        let mut size = 0;
        for _ in 0..=handed {
            size = first.next_frame().unwrap().unwrap().header.frame_bytes();
        }
        first.unread(size);
        let mut second = FrameDecoder::new(MAX);
        second.feed(&first.take_buffered());
        prop_assert_eq!(first.buffered_bytes(), 0);
        second.feed(&stream[arrived..]);
        for (i, nonce) in nonces.iter().enumerate().skip(handed) {
            let frame = second.next_frame().unwrap().unwrap();
            prop_assert_eq!(frame.header.request_id, i as u32);
            prop_assert_eq!(access::<Ping>(frame.payload).unwrap().nonce.to_native(), *nonce);
        }
        prop_assert!(second.next_frame().unwrap().is_none());
    }

    /// Arbitrary bytes after a valid header never panic and never validate as a frame
    /// of the wrong shape: either a typed error or a payload that re-validates.
    #[test]
    fn arbitrary_payloads_are_rejected_or_valid(
        code_index in 0usize..MessageType::ALL.len(),
        payload in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let ty = MessageType::ALL[code_index];
        let header = FrameHeader {
            payload_len: payload.len() as u32,
            message_type: ty,
            flags: 0,
            request_id: 1,
        };
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        match decode_frame(&bytes, MAX) {
            Ok(Some((frame, used))) => {
                prop_assert_eq!(used, bytes.len());
                prop_assert_eq!(frame.message.message_type(), ty);
            }
            Ok(None) => prop_assert!(false, "a whole frame reported incomplete"),
            Err(error) => prop_assert_eq!(error, DecodeError::BadPayload { message_type: ty }),
        }
        Message::check_reencode(ty, &payload);
    }

    /// Flipping any byte of a valid frame gives a typed error, incompleteness, or a
    /// frame that is still valid; never a panic.
    #[test]
    fn bit_flips_never_panic(
        verify: Verify,
        position in any::<prop::sample::Index>(),
        mask in 1u8..,
    ) {
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, 1, 0, &verify, MAX).unwrap();
        let i = position.index(bytes.len());
        bytes[i] ^= mask;
        let _ = decode_frame(&bytes, MAX);
        let mut decoder = FrameDecoder::new(MAX);
        decoder.feed(&bytes);
        let _ = decoder.next_frame();
    }
}

fn hello() -> Hello {
    Hello {
        magic: HELLO_MAGIC,
        version_min: 1,
        version_max: 1,
        max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        client: "tern-test/0.0.0 long enough to be out of line".into(),
    }
}

#[test]
fn oversize_frame_is_refused_from_the_header_alone() {
    // Only the 12 header bytes arrive: the decoder must refuse without waiting for (or
    // buffering) the announced 2 MiB.
    let header = FrameHeader {
        payload_len: 2 * 1024 * 1024,
        message_type: MessageType::MediaChunk,
        flags: 0,
        request_id: 0,
    };
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    decoder.feed(&header.to_bytes());
    let error = decoder.next_frame().unwrap_err();
    assert_eq!(
        error,
        DecodeError::FrameTooLarge {
            frame_bytes: 2 * 1024 * 1024 + HEADER_BYTES as u64,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES
        }
    );
    assert_eq!(error.error_code(), ErrorCode::FrameTooLarge);
    // The decoder stays failed: the stream is out of sync.
    decoder.feed(&[0; 100]);
    assert_eq!(decoder.next_frame().unwrap_err(), error);
}

#[test]
fn encoder_refuses_frames_over_the_peer_limit_and_leaves_the_buffer_alone() {
    let chunk = MediaChunk { media_id: [1; 16], offset: 0, data: vec![0; 5000] };
    let mut out = vec![1, 2, 3];
    let error = encode_frame(&mut out, 0, 0, &chunk, HANDSHAKE_MAX_FRAME_BYTES).unwrap_err();
    assert!(matches!(error, EncodeError::FrameTooLarge { max_frame_bytes: 4096, .. }));
    assert_eq!(out, [1, 2, 3]);
}

#[test]
fn unknown_type_and_reserved_bits_are_typed_errors() {
    let mut bytes = Vec::new();
    encode_frame(&mut bytes, 0, 0, &Ping { nonce: 1 }, MAX).unwrap();

    let mut unknown = bytes.clone();
    unknown[4..6].copy_from_slice(&0x7777u16.to_le_bytes());
    assert_eq!(decode_frame(&unknown, MAX).unwrap_err(), DecodeError::UnknownType { code: 0x7777 });

    let mut flags = bytes.clone();
    flags[6] = 0x80;
    assert_eq!(
        decode_frame(&flags, MAX).unwrap_err(),
        DecodeError::ReservedBits { flags: 0x80, reserved: 0 }
    );

    let mut reserved = bytes;
    reserved[7] = 1;
    assert_eq!(
        decode_frame(&reserved, MAX).unwrap_err(),
        DecodeError::ReservedBits { flags: 0, reserved: 1 }
    );
}

#[test]
fn invalid_utf8_is_a_bad_payload() {
    let mut bytes = Vec::new();
    encode_frame(&mut bytes, 0, 0, &hello(), MAX).unwrap();
    let at = bytes.windows(4).position(|w| w == b"tern").expect("client string is out of line");
    bytes[at] = 0xFF;
    assert_eq!(
        decode_frame(&bytes, MAX).unwrap_err(),
        DecodeError::BadPayload { message_type: MessageType::Hello }
    );
}

#[test]
fn invalid_enum_tag_is_a_bad_payload() {
    let typing = Typing { conversation: Conversation::User(5), active: true };
    let mut bytes = Vec::new();
    encode_frame(&mut bytes, 0, 0, &typing, MAX).unwrap();
    // The bool is the payload's last byte; 2 is not a bool.
    *bytes.last_mut().unwrap() = 2;
    assert_eq!(
        decode_frame(&bytes, MAX).unwrap_err(),
        DecodeError::BadPayload { message_type: MessageType::Typing }
    );
}

#[test]
fn lying_lengths_are_incomplete_or_bad() {
    let bytes = crate::fixtures::send_frame_100b();
    let real = u32::from_le_bytes(bytes[0..4].try_into().unwrap());

    // The header claims more than was sent: wait for it (never read past the buffer).
    let mut longer = bytes.clone();
    longer[0..4].copy_from_slice(&(real + 10).to_le_bytes());
    assert!(decode_frame(&longer, MAX).unwrap().is_none());

    // The header claims less: the archive's root is cut off, so validation fails.
    for shorter in [0, 1, real / 2, real - 1] {
        let mut cut = bytes.clone();
        cut[0..4].copy_from_slice(&shorter.to_le_bytes());
        assert_eq!(
            decode_frame(&cut, MAX).unwrap_err(),
            DecodeError::BadPayload { message_type: MessageType::SendMessage },
            "payload_len {shorter}"
        );
    }

    // The ciphertext's own length points past the payload.
    let mut vec_len = bytes.clone();
    let needle = 100u32.to_le_bytes();
    let len_at = bytes.windows(4).rposition(|w| w == needle).expect("ciphertext length");
    vec_len[len_at..len_at + 4].copy_from_slice(&100_000u32.to_le_bytes());
    assert_eq!(
        decode_frame(&vec_len, MAX).unwrap_err(),
        DecodeError::BadPayload { message_type: MessageType::SendMessage }
    );
}

#[test]
fn version_negotiation() {
    let mut bytes = Vec::new();
    let mut hello = hello();
    encode_frame(&mut bytes, 0, 0, &hello, MAX).unwrap();
    let (frame, _) = decode_frame(&bytes, MAX).unwrap().unwrap();
    let Message::Hello(archived) = frame.message else { panic!() };
    assert_eq!(negotiate_version(archived), Ok(1));

    hello.version_min = 2;
    hello.version_max = 5;
    bytes.clear();
    encode_frame(&mut bytes, 0, 0, &hello, MAX).unwrap();
    let archived = access::<Hello>(&bytes[HEADER_BYTES..]).unwrap();
    assert_eq!(
        negotiate_version(archived),
        Err(DecodeError::UnsupportedVersion { peer_min: 2, peer_max: 5 })
    );

    hello.magic = *b"HTTP";
    bytes.clear();
    encode_frame(&mut bytes, 0, 0, &hello, MAX).unwrap();
    let archived = access::<Hello>(&bytes[HEADER_BYTES..]).unwrap();
    assert_eq!(negotiate_version(archived), Err(DecodeError::BadMagic));

    assert_eq!(negotiate_max_frame_bytes(100, DEFAULT_MAX_FRAME_BYTES), HANDSHAKE_MAX_FRAME_BYTES);
    assert_eq!(negotiate_max_frame_bytes(u32::MAX, u32::MAX), ABSOLUTE_MAX_FRAME_BYTES);
    assert_eq!(negotiate_max_frame_bytes(65536, DEFAULT_MAX_FRAME_BYTES), 65536);
}

#[test]
fn envelope_content_is_validated_by_kind() {
    let receipt = ReceiptBody {
        kind: ReceiptKind::Read,
        by_user: 3,
        by_device: 1,
        conversation: Conversation::User(4),
        message_ids: vec![10, 11],
        time_ms: 5,
    };
    let mut body = Vec::new();
    encode_archive(&mut body, &receipt).unwrap();
    let mut envelope = Envelope {
        server_message_id: 1,
        client_message_id: 0,
        server_time_ms: 5,
        expires_ms: 10,
        sender_user: 3,
        sender_device: 1,
        conversation: Conversation::User(4),
        conversation_seq: 0,
        kind: EnvelopeKind::Receipt,
        e2e_type: E2eType::Plain,
        body,
    };
    let mut record = Vec::new();
    encode_archive(&mut record, &envelope).unwrap();
    let archived = rkyv::access::<ArchivedEnvelope, Failure>(&record).unwrap();
    let EnvelopeContent::Receipt(r) = archived.content().unwrap() else { panic!() };
    assert_eq!(r.message_ids.len(), 2);

    // A receipt kind whose body is not a receipt archive is refused.
    envelope.body = vec![1, 2, 3];
    record.clear();
    encode_archive(&mut record, &envelope).unwrap();
    let archived = rkyv::access::<ArchivedEnvelope, Failure>(&record).unwrap();
    assert!(archived.content().is_err());
}

#[test]
fn error_codes_are_distinct_and_stable() {
    let mut seen = std::collections::HashSet::new();
    for code in ErrorCode::ALL {
        assert!(seen.insert(*code as u16), "duplicate code {}", code.name());
        assert_eq!(ErrorCode::from_u16(*code as u16), Some(*code));
    }
    assert_eq!(ErrorCode::from_u16(0), None);
    assert_eq!(ErrorCode::StaleDevices as u16, 9);
}

#[test]
fn message_type_codes_are_distinct() {
    let mut seen = std::collections::HashSet::new();
    for ty in MessageType::ALL {
        assert!(seen.insert(ty.code()), "duplicate code for {}", ty.name());
        assert_eq!(MessageType::from_code(ty.code()), Some(*ty));
    }
}

/// `docs/PROTOCOL.md` has a catalogue table with a row per type: code, name and root
/// size. This keeps it true: a new type, a changed code or a resized root fails here.
#[test]
fn protocol_doc_catalogue_matches_the_code() {
    let doc = include_str!("../../docs/PROTOCOL.md");
    let mut missing = Vec::new();
    for ty in MessageType::ALL {
        let row = format!(
            "| `0x{:04X}` | [`{}`](#{}) | {} |",
            ty.code(),
            ty.name(),
            ty.name().to_lowercase(),
            ty.archived_root_bytes()
        );
        if !doc.contains(&row) {
            missing.push(row);
        }
    }
    assert!(missing.is_empty(), "docs/PROTOCOL.md lacks these rows:\n{}", missing.join("\n"));
}

#[test]
fn a_drained_decoder_releases_its_buffer_and_a_partial_frame_stays() {
    let mut bytes = Vec::new();
    encode_frame(&mut bytes, 1, 0, &Ping { nonce: 1 }, MAX).unwrap();
    encode_frame(&mut bytes, 2, 0, &Ping { nonce: 2 }, MAX).unwrap();
    let (first_len, cut) = (bytes.len() / 2, bytes.len() - 3);
    let mut decoder = FrameDecoder::new(MAX);
    // One whole frame and part of the next: the part is kept.
    decoder.feed(&bytes[..cut]);
    assert_eq!(decoder.next_frame().unwrap().unwrap().header.request_id, 1);
    assert!(decoder.next_frame().unwrap().is_none());
    decoder.release_if_drained();
    assert_eq!(decoder.buffered_bytes(), cut - first_len);
    decoder.feed(&bytes[cut..]);
    assert_eq!(decoder.next_frame().unwrap().unwrap().header.request_id, 2);
    // Everything returned: the buffer's memory goes, and the decoder still works.
    decoder.release_if_drained();
    assert_eq!(decoder.buffered_bytes(), 0);
    assert_eq!(decoder.capacity_bytes(), 0);
    decoder.feed(&bytes[..first_len]);
    assert_eq!(decoder.next_frame().unwrap().unwrap().header.request_id, 1);
}
