//! Checkpoints: the state tables, mailbox indexes, segment accounting and dedup window
//! at one log position, so recovery replays only the log after it.
//!
//! File (`docs/STORAGE.md`, section 5): a 48-byte header (magic, version, shard,
//! covered sequence number, lengths, CRC of the payload, CRC of the header) and a zstd
//! frame of the rkyv archive of [`Snapshot`]. Written to a temp file, synced, renamed,
//! directory synced: a crash leaves either the old or the new checkpoint, never half.

use std::collections::{BTreeMap, VecDeque};

use rkyv::rancor::Failure;
use rkyv::{Archive, Deserialize, Serialize};
use tern_wire::encode_archive;
use tern_wire::messages::{DeviceId, GroupId, MediaId, UserId};

use super::config::ShardConfig;
use super::dedup::Dedup;
use super::index::Index;
use super::loc::Loc;
use super::segments::SegmentStats;
use crate::body::{AccountRecord, GroupRecord, MediaRecord, RegistrationFailures, ReportRecord};
use crate::state::StateTables;

/// Checkpoint file magic.
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"TERNCKP1";
/// Checkpoint format version.
pub const CHECKPOINT_FORMAT_VERSION: u32 = 1;
/// Size of the checkpoint header.
pub const CHECKPOINT_HEADER_BYTES: usize = 48;
/// zstd level: checkpoints are written in the background; 3 is zstd's default balance.
const ZSTD_LEVEL: i32 = 3;

/// One mailbox in a checkpoint.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MailboxSnapshot {
    /// The user.
    pub user_id: UserId,
    /// The device.
    pub device_id: DeviceId,
    /// Sequence number of the first entry.
    pub head_seq: u64,
    /// Record locations (segment id, offset), in mailbox order.
    pub entries: Vec<(u32, u32)>,
}

/// One segment's accounting in a checkpoint.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SegmentSnapshot {
    /// The segment.
    pub segment_id: u32,
    /// Live envelope records.
    pub live_records: u64,
    /// Their bytes.
    pub live_bytes: u64,
    /// Latest expiry in it.
    pub max_expires_ms: u64,
    /// Its last record's sequence number.
    pub last_record_seq: u64,
    /// Bytes written.
    pub written_bytes: u64,
}

impl SegmentSnapshot {
    /// The checkpoint form of a segment's accounting (the one place that maps it).
    pub(crate) fn of(segment_id: u32, stats: &SegmentStats) -> SegmentSnapshot {
        SegmentSnapshot {
            segment_id,
            live_records: stats.live_records,
            live_bytes: stats.live_bytes,
            max_expires_ms: stats.max_expires_ms,
            last_record_seq: stats.last_record_seq,
            written_bytes: stats.written_bytes,
        }
    }

    /// The accounting again.
    pub(crate) fn stats(&self) -> SegmentStats {
        SegmentStats {
            live_records: self.live_records,
            live_bytes: self.live_bytes,
            max_expires_ms: self.max_expires_ms,
            last_record_seq: self.last_record_seq,
            written_bytes: self.written_bytes,
        }
    }
}

/// One remembered send.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DedupSnapshot {
    /// Sender user.
    pub sender_user: UserId,
    /// Sender device.
    pub sender_device: DeviceId,
    /// The client's id.
    pub client_message_id: u64,
    /// The server's id.
    pub server_message_id: u64,
    /// When it was accepted.
    pub time_ms: u64,
}

/// The state tables in a checkpoint.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct StateSnapshot {
    /// Accounts.
    pub accounts: Vec<AccountRecord>,
    /// Groups.
    pub groups: Vec<GroupRecord>,
    /// Media metadata.
    pub media: Vec<MediaRecord>,
    /// Reports.
    pub reports: Vec<ReportRecord>,
    /// Failed registration attempts per number.
    pub registration_failures: Vec<RegistrationFailures>,
}

impl StateSnapshot {
    fn of(tables: &StateTables) -> StateSnapshot {
        let mut accounts: Vec<_> =
            tables.accounts.values().map(|a| AccountRecord::clone(a)).collect();
        accounts.sort_by_key(|a| a.user_id);
        let mut groups: Vec<_> = tables.groups.values().cloned().collect();
        groups.sort_by_key(|g| g.group_id);
        let mut media: Vec<_> = tables.media.values().cloned().collect();
        media.sort_by_key(|m| m.media_id);
        let mut registration_failures: Vec<_> =
            tables.registration_failures.values().cloned().collect();
        registration_failures.sort_by(|a, b| a.phone.cmp(&b.phone));
        let reports = tables.reports.clone();
        StateSnapshot { accounts, groups, media, reports, registration_failures }
    }

    /// The tables again.
    pub fn into_tables(self) -> StateTables {
        let phones = self.accounts.iter().map(|a| (a.phone.clone(), a.user_id)).collect();
        StateTables {
            accounts: self.accounts.into_iter().map(|a| (a.user_id, Box::new(a))).collect(),
            phones,
            groups: self
                .groups
                .into_iter()
                .map(|g| (g.group_id, g))
                .collect::<std::collections::HashMap<GroupId, _>>(),
            media: self
                .media
                .into_iter()
                .map(|m| (m.media_id, m))
                .collect::<std::collections::HashMap<MediaId, _>>(),
            reports: self.reports,
            registration_failures: self
                .registration_failures
                .into_iter()
                .map(|f| (f.phone.clone(), f))
                .collect(),
        }
    }
}

/// Everything a checkpoint holds.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Every record up to and including this sequence number is reflected.
    pub covered_seq: u64,
    /// The next record sequence number at that point.
    pub next_record_seq: u64,
    /// The highest message id this shard allocated.
    pub last_message_id: u64,
    /// Mailboxes with their entries.
    pub mailboxes: Vec<MailboxSnapshot>,
    /// Envelope records in more than one mailbox: (segment, offset, references left).
    pub shared_refs: Vec<(u32, u32, u32)>,
    /// Segment accounting.
    pub segments: Vec<SegmentSnapshot>,
    /// The state tables.
    pub state: StateSnapshot,
    /// The dedup window.
    pub dedup: Vec<DedupSnapshot>,
    /// Last conversation sequence numbers: (owner user, owner device, sender, seq).
    pub conversation_seqs: Vec<(UserId, DeviceId, UserId, u64)>,
}

/// What a checkpoint captures, borrowed from a shard with nothing pending.
pub(crate) struct CapturedParts<'a> {
    /// The mailbox index.
    pub(crate) index: &'a Index,
    /// Per-segment accounting.
    pub(crate) segment_stats: &'a BTreeMap<u32, SegmentStats>,
    /// The state tables.
    pub(crate) state: &'a StateTables,
    /// The dedup window.
    pub(crate) dedup: &'a Dedup,
    /// The highest message id of the shard.
    pub(crate) last_message_id: u64,
    /// The next record sequence number (everything before it is covered).
    pub(crate) next_record_seq: u64,
}

/// What a checkpoint restores: the parts of a shard as they were after `covered_seq`.
#[derive(Debug)]
pub(crate) struct RestoredParts {
    /// The mailbox index (record bytes summed lazily).
    pub(crate) index: Index,
    /// Per-segment accounting.
    pub(crate) segment_stats: BTreeMap<u32, SegmentStats>,
    /// The state tables.
    pub(crate) state: StateTables,
    /// The dedup window.
    pub(crate) dedup: Dedup,
    /// The highest message id of the shard.
    pub(crate) last_message_id: u64,
    /// Every record up to and including this one is reflected.
    pub(crate) covered_seq: u64,
    /// Mailboxes dropped as corrupt (past the sequence bound).
    pub(crate) corrupt_records: u64,
}

impl RestoredParts {
    /// What a shard without a checkpoint starts from: nothing.
    pub(crate) fn empty(config: &ShardConfig) -> RestoredParts {
        RestoredParts {
            index: Index::default(),
            segment_stats: BTreeMap::new(),
            state: StateTables::default(),
            dedup: Dedup::new(config),
            last_message_id: 0,
            covered_seq: 0,
            corrupt_records: 0,
        }
    }
}

impl Snapshot {
    /// Captures the parts of a shard with nothing pending. Every list is sorted, so the
    /// same shard always gives the same bytes.
    pub(crate) fn capture(parts: CapturedParts<'_>) -> Snapshot {
        let mut mailboxes: Vec<MailboxSnapshot> = parts
            .index
            .mailboxes()
            .map(|((user_id, device_id), head_seq, entries)| MailboxSnapshot {
                user_id,
                device_id,
                head_seq,
                entries: entries.iter().map(|l| (l.segment_id, l.offset)).collect(),
            })
            .collect();
        mailboxes.sort_by_key(|m| (m.user_id, m.device_id));
        let mut shared_refs: Vec<_> =
            parts.index.shared_refs().map(|(l, r)| (l.segment_id, l.offset, r)).collect();
        shared_refs.sort_unstable();
        let segments =
            parts.segment_stats.iter().map(|(&id, s)| SegmentSnapshot::of(id, s)).collect();
        let mut dedup: Vec<_> = parts
            .dedup
            .sends()
            .map(|((sender_user, sender_device, client_message_id), id, time_ms)| DedupSnapshot {
                sender_user,
                sender_device,
                client_message_id,
                server_message_id: id,
                time_ms,
            })
            .collect();
        dedup.sort_by_key(|d| (d.time_ms, d.sender_user, d.sender_device, d.client_message_id));
        let mut conversation_seqs: Vec<_> =
            parts.index.conversation_seqs().map(|((o, d, s), seq)| (o, d, s, seq)).collect();
        conversation_seqs.sort_unstable();
        Snapshot {
            covered_seq: parts.next_record_seq.saturating_sub(1),
            next_record_seq: parts.next_record_seq,
            last_message_id: parts.last_message_id,
            mailboxes,
            shared_refs,
            segments,
            state: StateSnapshot::of(parts.state),
            dedup,
            conversation_seqs,
        }
    }

    /// The parts of a shard again (the dedup window bounded by `config`).
    pub(crate) fn into_parts(self, config: &ShardConfig) -> RestoredParts {
        let mailboxes = self.mailboxes.into_iter().map(|m| {
            let entries: VecDeque<Loc> = m
                .entries
                .into_iter()
                .map(|(segment_id, offset)| Loc { segment_id, offset })
                .collect();
            ((m.user_id, m.device_id), m.head_seq, entries)
        });
        let shared_refs = self
            .shared_refs
            .into_iter()
            .map(|(segment_id, offset, refs)| (Loc { segment_id, offset }, refs));
        let conversation_seqs = self
            .conversation_seqs
            .into_iter()
            .map(|(owner, device, sender, seq)| ((owner, device, sender), seq));
        let (index, corrupt_records) = Index::restore(mailboxes, shared_refs, conversation_seqs);
        let sends = self.dedup.into_iter().map(|d| {
            ((d.sender_user, d.sender_device, d.client_message_id), d.server_message_id, d.time_ms)
        });
        RestoredParts {
            index,
            segment_stats: self.segments.iter().map(|s| (s.segment_id, s.stats())).collect(),
            state: self.state.into_tables(),
            dedup: Dedup::restore(config, sends.collect()),
            last_message_id: self.last_message_id,
            covered_seq: self.covered_seq,
            corrupt_records,
        }
    }
}

/// The file name of a checkpoint covering up to `covered_seq`.
pub fn file_name(covered_seq: u64) -> String {
    format!("checkpoint-{covered_seq:020}.ckpt")
}

/// The covered sequence number in a checkpoint file name.
pub fn parse_file_name(name: &str) -> Option<u64> {
    name.strip_prefix("checkpoint-")?.strip_suffix(".ckpt")?.parse().ok()
}

/// Encodes a checkpoint file.
pub(crate) fn encode(snapshot: &Snapshot, shard_id: u32) -> Vec<u8> {
    let mut archive = Vec::new();
    encode_archive(&mut archive, snapshot).expect("a snapshot always archives");
    let compressed = zstd::bulk::compress(&archive, ZSTD_LEVEL).expect("zstd compresses memory");
    let mut out = Vec::with_capacity(CHECKPOINT_HEADER_BYTES + compressed.len());
    out.extend_from_slice(&CHECKPOINT_MAGIC);
    out.extend_from_slice(&CHECKPOINT_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&shard_id.to_le_bytes());
    out.extend_from_slice(&snapshot.covered_seq.to_le_bytes());
    out.extend_from_slice(&(archive.len() as u64).to_le_bytes());
    out.extend_from_slice(&(compressed.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&compressed).to_le_bytes());
    let header_crc = crc32fast::hash(&out[..44]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&compressed);
    out
}

/// Why a checkpoint file was not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckpointFault {
    /// Header missing, wrong magic or version, or header CRC mismatch.
    BadHeader,
    /// Payload length or CRC mismatch.
    BadPayload,
    /// zstd or rkyv could not read the payload.
    Undecodable,
}

/// Decodes and validates a checkpoint file.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, CheckpointFault> {
    let header = bytes.get(..CHECKPOINT_HEADER_BYTES).ok_or(CheckpointFault::BadHeader)?;
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8"));
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4"));
    if header[0..8] != CHECKPOINT_MAGIC
        || u32_at(8) != CHECKPOINT_FORMAT_VERSION
        || crc32fast::hash(&header[..44]) != u32_at(44)
    {
        return Err(CheckpointFault::BadHeader);
    }
    let uncompressed_len = u64_at(24);
    let compressed = &bytes[CHECKPOINT_HEADER_BYTES..];
    if compressed.len() as u64 != u64_at(32) || crc32fast::hash(compressed) != u32_at(40) {
        return Err(CheckpointFault::BadPayload);
    }
    let archive = zstd::bulk::decompress(compressed, uncompressed_len as usize)
        .map_err(|_| CheckpointFault::Undecodable)?;
    let archived = rkyv::access::<ArchivedSnapshot, Failure>(&archive)
        .map_err(|_| CheckpointFault::Undecodable)?;
    rkyv::deserialize::<Snapshot, Failure>(archived).map_err(|_| CheckpointFault::Undecodable)
}
