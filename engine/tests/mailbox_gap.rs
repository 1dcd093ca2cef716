//! Regression: one record claiming a huge mailbox gap made recovery fill memory.
//!
//! Found by the `recovery` fuzz target. Replay marks the entries of a gap in a
//! mailbox's sequence numbers as lost (a corrupt record held them) and filled the gap one
//! entry at a time, whatever its size: a CRC-valid envelope record whose slot named
//! mailbox sequence 2^40 allocated until the process died. A gap now stands for records
//! that must have been in the log, each at least a record header long; a record claiming
//! more than the log can hold is counted corrupt and its slot skipped.
//!
//! Method: a segment written by hand (valid header, records and CRCs) whose second
//! envelope claims mailbox sequence 2^40. The shard opens, counts one corrupt record and
//! still delivers the first envelope; a small, plausible gap is still marked lost. The
//! last test is the next bug the target found (a sequence number near `u64::MAX`).

mod common;

use common::{envelope, open, read_all, small_config};
use tern_engine::body::{AckRecord, EnvelopeRecord, MailboxSlot};
use tern_engine::record::{
    append_record, first_record_offset, segment_file_name, RecordType, SegmentHeader,
};
use tern_engine::{SimStorage, Storage};

const ALIGNMENT: u32 = 512;

/// A segment holding one batch: envelopes to device (9, 1) at these mailbox sequences.
fn segment_with(mailbox_seqs: &[u64]) -> Vec<u8> {
    segment_with_ack(mailbox_seqs, None)
}

/// Likewise, then an ack of device (9, 1) up to `ack` if given.
fn segment_with_ack(mailbox_seqs: &[u64], ack: Option<u64>) -> Vec<u8> {
    let header =
        SegmentHeader { shard_id: 3, segment_id: 1, first_record_seq: 1, commit_alignment: 512 };
    let mut out = header.to_bytes().to_vec();
    out.resize(first_record_offset(ALIGNMENT) as usize, 0);
    let mut seq = 1;
    for (i, &mailbox_seq) in mailbox_seqs.iter().enumerate() {
        let mut envelope_bytes = Vec::new();
        let body = format!("message {i}");
        let id = i as u64 + 1;
        tern_wire::encode_archive(&mut envelope_bytes, &envelope(7, id, id, body.as_bytes()))
            .unwrap();
        let slot = MailboxSlot { user_id: 9, device_id: 1, mailbox_seq };
        let record = EnvelopeRecord { slots: vec![slot], envelope: envelope_bytes };
        append_record(&mut out, RecordType::Envelope, 0, seq, 1, |o| {
            tern_wire::encode_archive(o, &record).map(|_| ())
        })
        .unwrap();
        seq += 1;
    }
    if let Some(up_to_mailbox_seq) = ack {
        let record = AckRecord { user_id: 9, device_id: 1, up_to_mailbox_seq };
        append_record(&mut out, RecordType::Ack, 0, seq, 1, |o| {
            tern_wire::encode_archive(o, &record).map(|_| ())
        })
        .unwrap();
        seq += 1;
    }
    let mut commit = 1u64.to_le_bytes().to_vec();
    commit.extend_from_slice(&(seq as u32).to_le_bytes());
    append_record::<()>(&mut out, RecordType::Commit, 0, seq, 1, |o| {
        o.extend_from_slice(&commit);
        Ok(())
    })
    .unwrap();
    out.resize(out.len().next_multiple_of(ALIGNMENT as usize), 0);
    out
}

fn disk_with(segment: &[u8]) -> SimStorage {
    let storage = SimStorage::new(ALIGNMENT);
    futures_lite::future::block_on(async {
        storage.write_file(&segment_file_name(1), segment).await.unwrap();
        storage.sync_dir().await.unwrap();
    });
    storage
}

#[test]
fn a_record_claiming_a_huge_gap_is_corrupt_not_fatal() {
    let shard = open(disk_with(&segment_with(&[0, 1 << 40])), small_config());
    assert_eq!(shard.borrow().counters().corrupt_records, 1);
    assert_eq!(read_all(&shard, (9, 1)).len(), 1);
    assert_eq!(shard.borrow().mailbox_next_seq((9, 1)), 1);
}

#[test]
fn a_plausible_gap_is_still_marked_lost() {
    let shard = open(disk_with(&segment_with(&[0, 3])), small_config());
    assert_eq!(shard.borrow().counters().corrupt_records, 0);
    assert_eq!(shard.borrow().mailbox_next_seq((9, 1)), 4);
    let read = shard.borrow().read_mailbox((9, 1), 0, usize::MAX, common::NOW_MS).corrupt.len();
    assert_eq!(read, 2, "the two lost entries are reported");
}

/// Found next by the same target: a first envelope at mailbox sequence u64::MAX - 1 set
/// the mailbox's head there, and reading it overflowed `seq + 1`. Sequence numbers at or
/// above 2^62 cannot be reached by counting envelopes: such a record is corrupt.
#[test]
fn a_mailbox_sequence_near_the_top_of_u64_is_corrupt() {
    let shard = open(disk_with(&segment_with(&[u64::MAX - 1])), small_config());
    assert_eq!(shard.borrow().counters().corrupt_records, 1);
    assert!(read_all(&shard, (9, 1)).is_empty());
    assert_eq!(shard.borrow().mailbox_next_seq((9, 1)), 0);
}

/// Found by the same target in the CI step's first run: an ack record up to `u64::MAX`
/// overflowed `up_to + 1` when it emptied the mailbox. Such an ack is corrupt too.
#[test]
fn an_ack_up_to_the_top_of_u64_is_corrupt() {
    let shard = open(disk_with(&segment_with_ack(&[0], Some(u64::MAX))), small_config());
    assert_eq!(shard.borrow().counters().corrupt_records, 1);
    assert_eq!(read_all(&shard, (9, 1)).len(), 1, "the envelope is still queued");
}
