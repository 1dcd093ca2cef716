//! Segment and record framing: the byte layout of `docs/STORAGE.md`, sections 2 and 3.
//!
//! Pure functions over byte slices: write a header, check a header, scan a segment.
//! Nothing here does I/O, so recovery logic and `ternctl` share it and tests can sweep
//! every torn offset without a disk.

/// Magic at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"TERNSEG1";
/// Segment file format version.
pub const SEGMENT_FORMAT_VERSION: u32 = 1;
/// Size of the segment header.
pub const SEGMENT_HEADER_BYTES: usize = 40;
/// Magic at the start of every record header.
pub const RECORD_MAGIC: [u8; 2] = *b"TR";
/// Size of a record header.
pub const RECORD_HEADER_BYTES: usize = 28;
/// Largest record body accepted (a record never spans segments).
pub const RECORD_BODY_BYTES_MAX: u32 = 8 * 1024 * 1024;

/// What a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordType {
    /// An envelope and the mailboxes it was appended to.
    Envelope = 1,
    /// A device acknowledged its mailbox up to a sequence number.
    Ack = 2,
    /// A change to the state tables.
    State = 3,
    /// End of a group-commit batch; the next batch starts at the next aligned offset.
    Commit = 4,
    /// One queued envelope was removed from one mailbox (deleted for everyone).
    Remove = 5,
}

impl RecordType {
    /// The type with this code.
    pub fn from_u8(code: u8) -> Option<RecordType> {
        Some(match code {
            1 => RecordType::Envelope,
            2 => RecordType::Ack,
            3 => RecordType::State,
            4 => RecordType::Commit,
            5 => RecordType::Remove,
            _ => return None,
        })
    }
}

/// Record flag: this envelope record is a compaction copy of an earlier one; replay
/// moves the mailbox entries it names instead of adding them.
pub const FLAG_MOVED: u8 = 0x01;

/// A checked record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// What the body is.
    pub record_type: RecordType,
    /// [`FLAG_MOVED`] or 0.
    pub flags: u8,
    /// Body length.
    pub body_len: u32,
    /// The record's sequence number in its shard (increasing by one per record).
    pub record_seq: u64,
    /// Low 32 bits of the segment id the record was written to.
    pub segment_id: u32,
    /// CRC32 of the body.
    pub body_crc: u32,
}

impl RecordHeader {
    /// Header plus body.
    pub fn record_bytes(&self) -> usize {
        RECORD_HEADER_BYTES + self.body_len as usize
    }

    /// The 28 header bytes, with their CRC.
    pub fn to_bytes(&self) -> [u8; RECORD_HEADER_BYTES] {
        let mut out = [0u8; RECORD_HEADER_BYTES];
        out[0..2].copy_from_slice(&RECORD_MAGIC);
        out[2] = self.record_type as u8;
        out[3] = self.flags;
        out[4..8].copy_from_slice(&self.body_len.to_le_bytes());
        out[8..16].copy_from_slice(&self.record_seq.to_le_bytes());
        out[16..20].copy_from_slice(&self.segment_id.to_le_bytes());
        out[20..24].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = crc32fast::hash(&out[0..24]);
        out[24..28].copy_from_slice(&crc.to_le_bytes());
        out
    }
}

/// Why bytes at an offset are not a valid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordFault {
    /// All-zero header: nothing was ever written here (the preallocated tail).
    Empty,
    /// Fewer bytes left than a header or the announced body.
    Truncated,
    /// Wrong magic, unknown type, header CRC mismatch or an impossible length.
    BadHeader,
    /// The header is valid but names another segment.
    WrongSegment,
    /// The header is valid but the body's CRC does not match.
    BadBody,
}

/// Checks the record header at the start of `bytes` (and nothing else).
pub fn check_header(bytes: &[u8], segment_id: u32) -> Result<RecordHeader, RecordFault> {
    let Some(raw) = bytes.first_chunk::<RECORD_HEADER_BYTES>() else {
        return Err(if bytes.iter().all(|b| *b == 0) {
            RecordFault::Empty
        } else {
            RecordFault::Truncated
        });
    };
    if raw.iter().all(|b| *b == 0) {
        return Err(RecordFault::Empty);
    }
    let stored_crc = u32::from_le_bytes([raw[24], raw[25], raw[26], raw[27]]);
    if raw[0..2] != RECORD_MAGIC || crc32fast::hash(&raw[0..24]) != stored_crc {
        return Err(RecordFault::BadHeader);
    }
    let record_type = RecordType::from_u8(raw[2]).ok_or(RecordFault::BadHeader)?;
    let body_len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
    if body_len > RECORD_BODY_BYTES_MAX {
        return Err(RecordFault::BadHeader);
    }
    let header = RecordHeader {
        record_type,
        flags: raw[3],
        body_len,
        record_seq: u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes")),
        segment_id: u32::from_le_bytes([raw[16], raw[17], raw[18], raw[19]]),
        body_crc: u32::from_le_bytes([raw[20], raw[21], raw[22], raw[23]]),
    };
    if header.segment_id != segment_id {
        return Err(RecordFault::WrongSegment);
    }
    Ok(header)
}

/// Checks the whole record at the start of `bytes` and returns its header and body.
pub fn check_record(bytes: &[u8], segment_id: u32) -> Result<(RecordHeader, &[u8]), RecordFault> {
    let (header, body) = record_body_of_checked_bytes(bytes, segment_id)?;
    if crc32fast::hash(body) != header.body_crc {
        return Err(RecordFault::BadBody);
    }
    Ok((header, body))
}

/// The body of the record at the start of `bytes` whose header is checked, without
/// checking the body's CRC: for bytes this process wrote itself, or checked whole before
/// (the active segment's buffer), where the CRC cannot find anything and a record shared
/// by 256 group members would have its body checked 256 times.
pub fn record_body_of_checked_bytes(
    bytes: &[u8],
    segment_id: u32,
) -> Result<(RecordHeader, &[u8]), RecordFault> {
    let header = check_header(bytes, segment_id)?;
    let body =
        bytes.get(RECORD_HEADER_BYTES..header.record_bytes()).ok_or(RecordFault::Truncated)?;
    Ok((header, body))
}

/// Appends a record (header + body) to `out`. The body is written by `write_body`,
/// which appends to `out`; the header is filled in afterwards.
pub fn append_record<E>(
    out: &mut Vec<u8>,
    record_type: RecordType,
    flags: u8,
    record_seq: u64,
    segment_id: u32,
    write_body: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<RecordHeader, E> {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_BYTES]);
    if let Err(error) = write_body(out) {
        out.truncate(start);
        return Err(error);
    }
    let body = &out[start + RECORD_HEADER_BYTES..];
    let header = RecordHeader {
        record_type,
        flags,
        body_len: body.len() as u32,
        record_seq,
        segment_id,
        body_crc: crc32fast::hash(body),
    };
    debug_assert!(header.body_len <= RECORD_BODY_BYTES_MAX, "record body over the limit");
    out[start..start + RECORD_HEADER_BYTES].copy_from_slice(&header.to_bytes());
    Ok(header)
}

/// A segment file's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The shard the segment belongs to.
    pub shard_id: u32,
    /// The segment's id (its file name).
    pub segment_id: u64,
    /// Sequence number of its first record.
    pub first_record_seq: u64,
    /// Batches start at multiples of this (the storage's write alignment).
    pub commit_alignment: u32,
}

impl SegmentHeader {
    /// The 40 header bytes.
    pub fn to_bytes(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut out = [0u8; SEGMENT_HEADER_BYTES];
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..12].copy_from_slice(&SEGMENT_FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.shard_id.to_le_bytes());
        out[16..24].copy_from_slice(&self.segment_id.to_le_bytes());
        out[24..32].copy_from_slice(&self.first_record_seq.to_le_bytes());
        out[32..36].copy_from_slice(&self.commit_alignment.to_le_bytes());
        let crc = crc32fast::hash(&out[0..36]);
        out[36..40].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Checks and decodes a segment header.
    pub fn decode(bytes: &[u8]) -> Option<SegmentHeader> {
        let raw = bytes.first_chunk::<SEGMENT_HEADER_BYTES>()?;
        let crc = u32::from_le_bytes([raw[36], raw[37], raw[38], raw[39]]);
        if raw[0..8] != SEGMENT_MAGIC || crc32fast::hash(&raw[0..36]) != crc {
            return None;
        }
        if u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]) != SEGMENT_FORMAT_VERSION {
            return None;
        }
        let commit_alignment = u32::from_le_bytes([raw[32], raw[33], raw[34], raw[35]]);
        if commit_alignment == 0 || !commit_alignment.is_power_of_two() {
            return None;
        }
        Some(SegmentHeader {
            shard_id: u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]),
            segment_id: u64::from_le_bytes(raw[16..24].try_into().expect("8 bytes")),
            first_record_seq: u64::from_le_bytes(raw[24..32].try_into().expect("8 bytes")),
            commit_alignment,
        })
    }
}

/// Where the first record of a segment goes: the header, padded to the alignment.
pub fn first_record_offset(alignment: u32) -> u64 {
    align_up(SEGMENT_HEADER_BYTES as u64, alignment)
}

/// Rounds `offset` up to a multiple of `alignment` (a power of two).
pub fn align_up(offset: u64, alignment: u32) -> u64 {
    let mask = u64::from(alignment) - 1;
    (offset + mask) & !mask
}

/// The file name of a segment: `seg-` + 20-digit id + `.log`, so names sort by id.
pub fn segment_file_name(segment_id: u64) -> String {
    format!("seg-{segment_id:020}.log")
}

/// The segment id in a segment file name.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?.strip_suffix(".log")?.parse().ok()
}

/// One valid record found by [`scan_segment`].
#[derive(Clone, Copy, Debug)]
pub struct ScannedRecord<'a> {
    /// Offset of the record header in the segment.
    pub offset: u64,
    /// Its header.
    pub header: RecordHeader,
    /// Its body.
    pub body: &'a [u8],
}

/// How a scan of a segment ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// Clean: zeros after the last batch (or the end of the file).
    Clean {
        /// Offset just past the last complete batch (aligned).
        committed_end: u64,
    },
    /// A bad record after the last `Commit` record, with no valid record after it: a
    /// write torn by a crash. Everything from `committed_end` on is discarded.
    TornTail {
        /// Offset just past the last complete batch (aligned).
        committed_end: u64,
        /// Where the first bad bytes are.
        fault_offset: u64,
        /// What was wrong there.
        fault: RecordFault,
    },
}

impl ScanEnd {
    /// Offset just past the last complete batch.
    pub fn committed_end(&self) -> u64 {
        match *self {
            ScanEnd::Clean { committed_end } | ScanEnd::TornTail { committed_end, .. } => {
                committed_end
            }
        }
    }
}

/// Damage found inside synced data (a bad record with valid records after it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanFault {
    /// Where the damage starts.
    pub offset: u64,
    /// What was wrong there.
    pub fault: RecordFault,
    /// Where the scan resumed (the next valid record).
    pub resumed_at: u64,
}

/// The result of scanning one segment.
#[derive(Debug)]
pub struct SegmentScan<'a> {
    /// The segment header.
    pub header: SegmentHeader,
    /// Records of complete batches (and intact records around damage), in order.
    pub records: Vec<ScannedRecord<'a>>,
    /// Damage inside synced data: the records there are quarantined.
    pub faults: Vec<ScanFault>,
    /// How the scan ended.
    pub end: ScanEnd,
}

/// Why a segment could not be scanned at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentFault {
    /// Its header is missing or invalid.
    BadSegmentHeader,
}

/// Scans a segment: every record of every complete batch, and how the file ends.
///
/// A batch is complete when its `Commit` record is valid; records of an incomplete final
/// batch are not returned (they were never acknowledged). On a bad record the scan looks
/// for a later valid record at the storage's alignment: if there is one, the damage is
/// in synced data (a [`ScanFault`]; the scan resumes there), if not it is a torn tail.
/// The loop is bounded by the file length: every step moves forward.
pub fn scan_segment(bytes: &[u8]) -> Result<SegmentScan<'_>, SegmentFault> {
    let header = SegmentHeader::decode(bytes).ok_or(SegmentFault::BadSegmentHeader)?;
    let segment_id = header.segment_id as u32;
    let alignment = header.commit_alignment;
    let mut records = Vec::new();
    let mut faults = Vec::new();
    let mut batch_start_index = 0;
    let mut committed_end = first_record_offset(alignment);
    let mut offset = committed_end;
    let end = loop {
        let Some(rest) = bytes.get(offset as usize..).filter(|r| !r.is_empty()) else {
            break ScanEnd::Clean { committed_end };
        };
        match check_record(rest, segment_id) {
            Ok((record_header, body)) => {
                records.push(ScannedRecord { offset, header: record_header, body });
                offset += record_header.record_bytes() as u64;
                if record_header.record_type == RecordType::Commit {
                    offset = align_up(offset, alignment);
                    committed_end = offset;
                    batch_start_index = records.len();
                }
            }
            Err(RecordFault::Empty) if offset == committed_end => {
                break ScanEnd::Clean { committed_end };
            }
            Err(RecordFault::BadBody) => {
                // The header checked out, so its length is trustworthy: quarantine just
                // this record and go on with the next one.
                let length = check_header(rest, segment_id).map_or(0, |h| h.record_bytes());
                let next = offset + length as u64;
                faults.push(ScanFault { offset, fault: RecordFault::BadBody, resumed_at: next });
                offset = next;
            }
            Err(fault) => match find_later_record(bytes, offset, segment_id) {
                Some(resumed_at) => {
                    // Synced data is damaged: keep the intact records before the damage
                    // and resume at the next valid record.
                    faults.push(ScanFault { offset, fault, resumed_at });
                    batch_start_index = records.len();
                    committed_end = resumed_at;
                    offset = resumed_at;
                }
                None => break ScanEnd::TornTail { committed_end, fault_offset: offset, fault },
            },
        }
    };
    // Records after the last Commit belong to an incomplete batch: drop them, and
    // forget damage seen there (it is a torn write, not corruption).
    records.truncate(batch_start_index);
    faults.retain(|f| f.offset < end.committed_end());
    Ok(SegmentScan { header, records, faults, end })
}

/// The offset of the first valid record past `from`, if any. Every byte offset is
/// tried (records inside a batch are not aligned); a false match needs a header CRC and a
/// body CRC to agree by chance. Only runs on damage, bounded by the segment length.
fn find_later_record(bytes: &[u8], from: u64, segment_id: u32) -> Option<u64> {
    let start = from as usize + 1;
    let rest = bytes.get(start..)?;
    rest.windows(RECORD_MAGIC.len())
        .enumerate()
        .filter(|(_, window)| *window == RECORD_MAGIC)
        .map(|(i, _)| (start + i) as u64)
        .find(|&offset| check_record(&bytes[offset as usize..], segment_id).is_ok())
}
