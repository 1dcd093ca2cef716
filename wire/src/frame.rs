//! The 12-byte frame header, the incremental decoder and the encoder.
//!
//! Decoding is two-phase (see `docs/PROTOCOL.md`): first the fixed header is checked
//! (size limit, known type, reserved bits) before a single payload byte is buffered, so
//! a hostile length cannot make us allocate; then the whole payload is validated as the
//! archive of its type and handed out as a zero-copy view.
//!
//! Encoding appends to a buffer the caller owns and reuses (a connection's write
//! buffer, a log segment's write batch), so the steady state allocates nothing.

use rkyv::api::high::HighSerializer;
use rkyv::rancor::Failure;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::Serialize;

use crate::catalogue::{Message, Payload, DELIVER_PREFIX_BYTES};
use crate::error::{DecodeError, EncodeError};
use crate::types::MessageType;

/// Size of the frame header.
pub const HEADER_BYTES: usize = 12;

/// Flag: this frame answers the request that carried the same `request_id`.
pub const FLAG_RESPONSE: u8 = 0x01;
/// Flag bits v1 defines; any other bit set is a [`DecodeError::ReservedBits`].
pub const FLAGS_KNOWN: u8 = FLAG_RESPONSE;

/// A decoded frame header. On the wire (little-endian):
///
/// | offset | size | field        |
/// |-------:|-----:|--------------|
/// | 0      | 4    | payload_len  |
/// | 4      | 2    | type code    |
/// | 6      | 1    | flags        |
/// | 7      | 1    | reserved (0) |
/// | 8      | 4    | request_id   |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Bytes of payload after the header.
    pub payload_len: u32,
    /// What the payload is.
    pub message_type: MessageType,
    /// [`FLAG_RESPONSE`] or 0.
    pub flags: u8,
    /// Correlates a response with its request; 0 for unsolicited frames.
    pub request_id: u32,
}

impl FrameHeader {
    /// Header plus payload.
    pub fn frame_bytes(&self) -> usize {
        HEADER_BYTES + self.payload_len as usize
    }

    /// Whether this frame answers a request.
    pub fn is_response(&self) -> bool {
        self.flags & FLAG_RESPONSE != 0
    }

    /// Checks and decodes a header. Allocates nothing; looks at nothing past the header.
    pub fn decode(
        bytes: &[u8; HEADER_BYTES],
        max_frame_bytes: u32,
    ) -> Result<FrameHeader, DecodeError> {
        let payload_len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let code = u16::from_le_bytes([bytes[4], bytes[5]]);
        let flags = bytes[6];
        let reserved = bytes[7];
        let request_id = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);

        let frame_bytes = HEADER_BYTES as u64 + u64::from(payload_len);
        if frame_bytes > u64::from(max_frame_bytes) {
            return Err(DecodeError::FrameTooLarge { frame_bytes, max_frame_bytes });
        }
        let message_type = MessageType::from_code(code).ok_or(DecodeError::UnknownType { code })?;
        if flags & !FLAGS_KNOWN != 0 || reserved != 0 {
            return Err(DecodeError::ReservedBits { flags, reserved });
        }
        Ok(FrameHeader { payload_len, message_type, flags, request_id })
    }

    /// The header's 12 bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..4].copy_from_slice(&self.payload_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.message_type.code().to_le_bytes());
        out[6] = self.flags;
        out[7] = 0;
        out[8..12].copy_from_slice(&self.request_id.to_le_bytes());
        out
    }
}

/// A validated frame: its header and a zero-copy view of its payload.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    /// The header.
    pub header: FrameHeader,
    /// The validated payload.
    pub message: Message<'a>,
    /// The raw payload bytes (what `message` points into).
    pub payload: &'a [u8],
}

/// Decodes one frame from the start of `bytes`.
///
/// Returns `Ok(None)` when `bytes` holds only part of a frame (read more and call
/// again), or the frame and the number of bytes it used.
pub fn decode_frame(
    bytes: &[u8],
    max_frame_bytes: u32,
) -> Result<Option<(Frame<'_>, usize)>, DecodeError> {
    let Some(header_bytes) = bytes.first_chunk::<HEADER_BYTES>() else {
        return Ok(None);
    };
    let header = FrameHeader::decode(header_bytes, max_frame_bytes)?;
    let frame_bytes = header.frame_bytes();
    let Some(payload) = bytes.get(HEADER_BYTES..frame_bytes) else {
        return Ok(None);
    };
    let message = Message::validate(header.message_type, payload)?;
    Ok(Some((Frame { header, message, payload }, frame_bytes)))
}

/// The incremental decoder a connection owns: feed it whatever the socket returned
/// (partial frames, many frames at once), take out validated frames.
///
/// Its buffer never holds more than one maximum-size frame plus one read: a header
/// that announces an oversize frame fails before its payload is buffered. After an
/// error the decoder stays failed (the stream is out of sync) and returns that error.
#[derive(Debug)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    /// Start of the undecoded bytes in `buffer`.
    start: usize,
    max_frame_bytes: u32,
    failed: Option<DecodeError>,
}

impl FrameDecoder {
    /// A decoder that accepts frames up to `max_frame_bytes` (header included).
    pub fn new(max_frame_bytes: u32) -> FrameDecoder {
        FrameDecoder { buffer: Vec::new(), start: 0, max_frame_bytes, failed: None }
    }

    /// Changes the limit (after the handshake negotiated one).
    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: u32) {
        self.max_frame_bytes = max_frame_bytes;
    }

    /// The limit in force.
    pub fn max_frame_bytes(&self) -> u32 {
        self.max_frame_bytes
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.len() - self.start
    }

    /// Bytes of memory the buffer holds (what an idle connection costs).
    pub fn capacity_bytes(&self) -> usize {
        self.buffer.capacity()
    }

    /// Frees the buffer if every byte in it was returned as frames: an idle connection
    /// then keeps no memory for its last burst (the next `feed` allocates again).
    pub fn release_if_drained(&mut self) {
        if self.start == self.buffer.len() {
            self.buffer = Vec::new();
            self.start = 0;
        }
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.compact();
        self.buffer.extend_from_slice(bytes);
    }

    /// A writable region of at least `min_bytes` at the end of the buffer, for reading
    /// from a socket straight into the decoder; call [`FrameDecoder::commit`] with the
    /// count read.
    pub fn spare(&mut self, min_bytes: usize) -> &mut [u8] {
        self.compact();
        let len = self.buffer.len();
        self.buffer.resize(len + min_bytes, 0);
        &mut self.buffer[len..]
    }

    /// Keeps `read_bytes` of the region [`FrameDecoder::spare`] returned and forgets the
    /// rest of it.
    pub fn commit(&mut self, spare_bytes: usize, read_bytes: usize) {
        assert!(read_bytes <= spare_bytes, "read more bytes than the spare region holds");
        let new_len = self.buffer.len() - (spare_bytes - read_bytes);
        self.buffer.truncate(new_len);
    }

    /// The next validated frame, `Ok(None)` when more bytes are needed, or the error
    /// that makes the stream unusable.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, DecodeError> {
        if let Some(error) = self.failed {
            return Err(error);
        }
        // Borrow the buffer and the cursor separately: the returned frame points into
        // `buffer` while `start` moves past it.
        let buffer = &self.buffer[self.start..];
        match decode_frame(buffer, self.max_frame_bytes) {
            Ok(Some((frame, used))) => {
                self.start += used;
                Ok(Some(frame))
            }
            Ok(None) => Ok(None),
            Err(error) => {
                self.failed = Some(error);
                Err(error)
            }
        }
    }

    /// Steps back over the last `frame_bytes` returned by [`FrameDecoder::next_frame`]
    /// (header included), so that they are decoded again or taken with
    /// [`FrameDecoder::take_buffered`]: a server that must hand a connection to another
    /// thread before handling a frame gives that frame along.
    ///
    /// # Panics
    /// If more bytes are given back than were returned since the last `feed`/`spare`.
    pub fn unread(&mut self, frame_bytes: usize) {
        assert!(frame_bytes <= self.start, "unread more than the last frames returned");
        self.start -= frame_bytes;
    }

    /// Takes every byte received but not yet returned as a frame, leaving the decoder
    /// empty (its limit and any sticky error stay).
    pub fn take_buffered(&mut self) -> Vec<u8> {
        let rest = self.buffer.split_off(self.start);
        self.buffer.clear();
        self.start = 0;
        rest
    }

    /// Moves the undecoded bytes to the front once the consumed prefix dominates, so
    /// the buffer does not grow with the stream.
    fn compact(&mut self) {
        if self.start == 0 {
            return;
        }
        if self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        } else if self.start >= self.buffer.len() / 2 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
    }
}

/// The serializer the encoder runs: output appended to a caller's `Vec`, scratch space
/// from rkyv's thread-local arena (reused, so no allocation in the steady state).
pub type WireSerializer<'a, 'b> = HighSerializer<&'a mut Vec<u8>, ArenaHandle<'b>, Failure>;

/// Appends the rkyv archive of `value` to `out` and returns its length. This is the
/// raw archive with no frame header: the form records take in the engine's log.
pub fn encode_archive<T>(out: &mut Vec<u8>, value: &T) -> Result<usize, EncodeError>
where
    T: for<'a, 'b> Serialize<WireSerializer<'a, 'b>>,
{
    let start = out.len();
    match rkyv::api::high::to_bytes_in::<_, Failure>(value, &mut *out) {
        Ok(_) => Ok(out.len() - start),
        Err(_) => {
            out.truncate(start);
            Err(EncodeError::Unrepresentable)
        }
    }
}

/// Appends one frame (header + archived `value`) to `out`.
///
/// `max_frame_bytes` is the peer's negotiated limit; a frame over it is not written.
/// Returns the frame's total length.
pub fn encode_frame<T>(
    out: &mut Vec<u8>,
    request_id: u32,
    flags: u8,
    value: &T,
    max_frame_bytes: u32,
) -> Result<usize, EncodeError>
where
    T: Payload + for<'a, 'b> Serialize<WireSerializer<'a, 'b>>,
{
    encode_frame_with(out, T::TYPE, request_id, flags, max_frame_bytes, |out| {
        encode_archive(out, value).map(|_| ())
    })
}

/// Appends a `Deliver` frame: the mailbox sequence and an envelope record exactly as
/// stored (see [`crate::Deliver`]). The record is copied, never re-encoded.
pub fn encode_deliver(
    out: &mut Vec<u8>,
    request_id: u32,
    mailbox_seq: u64,
    envelope_record: &[u8],
    max_frame_bytes: u32,
) -> Result<usize, EncodeError> {
    encode_frame_with(out, MessageType::Deliver, request_id, 0, max_frame_bytes, |out| {
        out.extend_from_slice(&mailbox_seq.to_le_bytes());
        out.extend_from_slice(envelope_record);
        Ok(())
    })
}

/// The header of a `Deliver` frame and its 8-byte prefix, for writers that send the
/// envelope record from elsewhere (an mmap of a sealed segment) with vectored I/O.
pub fn deliver_preamble(
    request_id: u32,
    mailbox_seq: u64,
    envelope_record_bytes: u32,
) -> [u8; HEADER_BYTES + DELIVER_PREFIX_BYTES] {
    let header = FrameHeader {
        payload_len: envelope_record_bytes + DELIVER_PREFIX_BYTES as u32,
        message_type: MessageType::Deliver,
        flags: 0,
        request_id,
    };
    let mut out = [0u8; HEADER_BYTES + DELIVER_PREFIX_BYTES];
    out[..HEADER_BYTES].copy_from_slice(&header.to_bytes());
    out[HEADER_BYTES..].copy_from_slice(&mailbox_seq.to_le_bytes());
    out
}

/// Writes a header placeholder, lets `write_payload` append the payload, then fills in
/// the header, or rolls `out` back when the payload fails or is too large.
fn encode_frame_with(
    out: &mut Vec<u8>,
    message_type: MessageType,
    request_id: u32,
    flags: u8,
    max_frame_bytes: u32,
    write_payload: impl FnOnce(&mut Vec<u8>) -> Result<(), EncodeError>,
) -> Result<usize, EncodeError> {
    debug_assert_eq!(flags & !FLAGS_KNOWN, 0, "unknown flag bits");
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_BYTES]);
    if let Err(error) = write_payload(out) {
        out.truncate(start);
        return Err(error);
    }
    let frame_bytes = out.len() - start;
    if frame_bytes as u64 > u64::from(max_frame_bytes) {
        out.truncate(start);
        return Err(EncodeError::FrameTooLarge {
            frame_bytes: frame_bytes as u64,
            max_frame_bytes,
        });
    }
    let header = FrameHeader {
        payload_len: (frame_bytes - HEADER_BYTES) as u32,
        message_type,
        flags,
        request_id,
    };
    out[start..start + HEADER_BYTES].copy_from_slice(&header.to_bytes());
    Ok(frame_bytes)
}
