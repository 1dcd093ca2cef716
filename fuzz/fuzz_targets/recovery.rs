//! Fuzz target: engine recovery (`ShardHandle::open`) from arbitrary shard directories.
//!
//! The input builds a simulated disk (`SimStorage`) holding a segment file, optionally a
//! second one and a checkpoint, then opens shard 0 on it. CRCs make raw bytes useless
//! past the first check, so the harness can do the framing itself and let the fuzzer
//! pick only what the CRCs protect: a valid segment header, records framed with correct
//! CRCs (and `Commit` records closing batches) around fuzzer-chosen bodies, and a
//! checkpoint with a valid header around a fuzzer-chosen (zstd-compressed) archive.
//!
//! Property: opening returns `Ok` or a typed `OpenError`, never panics or hangs; a shard
//! that opens reads every mailbox without panicking, takes a commit and a checkpoint,
//! and opens again from what it left on disk.
#![no_main]

use futures_lite::future::block_on;
use libfuzzer_sys::fuzz_target;
use tern_engine::checkpoint::{CHECKPOINT_FORMAT_VERSION, CHECKPOINT_MAGIC};
use tern_engine::record::{
    append_record, first_record_offset, segment_file_name, RecordType, SegmentHeader,
};
use tern_engine::{ShardConfig, ShardHandle, SimStorage, Storage};

/// Write alignments the simulated disk may ask for (1: none; 4096: a real DMA disk).
const ALIGNMENTS: [u32; 4] = [1, 64, 512, 4096];
/// Segment ids to name files with: the usual small ones and the edges of u32 and u64.
const SEGMENT_IDS: [u64; 8] = [1, 2, 3, 9, 0, u32::MAX as u64, u32::MAX as u64 + 2, u64::MAX];

/// A cursor over the input.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

/// A segment: `raw` after an optional valid header, or records framed by the harness.
fn segment(
    input: &mut Input<'_>,
    valid_header: bool,
    framed: bool,
    segment_id: u64,
    alignment: u32,
    first_seq: u64,
) -> Vec<u8> {
    let len = usize::from(input.u16());
    let part = input.take(len);
    let mut out = Vec::new();
    if valid_header || framed {
        let header = SegmentHeader {
            shard_id: 0,
            segment_id,
            first_record_seq: first_seq,
            commit_alignment: alignment,
        };
        out.extend_from_slice(&header.to_bytes());
        out.resize(first_record_offset(alignment) as usize, 0);
    }
    if !framed {
        out.extend_from_slice(part);
        return out;
    }
    // Records: [type][flags][body length, u16][body]..., a `Commit` after a type with the top
    // bit set (and at the end), each batch padded to the alignment as the engine does.
    let mut records = Input(part);
    let mut seq = first_seq;
    let mut batch_first = seq;
    let mut batch_records = 0u32;
    let segment_low = segment_id as u32;
    while !records.0.is_empty() {
        let kind = records.byte();
        let flags = records.byte();
        let body_len = usize::from(records.u16());
        let body = records.take(body_len);
        let record_type = RecordType::from_u8(kind & 0x07).unwrap_or(RecordType::Envelope);
        let _ = append_record::<()>(&mut out, record_type, flags, seq, segment_low, |o| {
            o.extend_from_slice(body);
            Ok(())
        });
        seq += 1;
        batch_records += 1;
        if kind & 0x80 != 0 || records.0.is_empty() {
            let mut commit = batch_first.to_le_bytes().to_vec();
            commit.extend_from_slice(&(batch_records + 1).to_le_bytes());
            let _ = append_record::<()>(&mut out, RecordType::Commit, 0, seq, segment_low, |o| {
                o.extend_from_slice(&commit);
                Ok(())
            });
            seq += 1;
            let aligned = out.len().next_multiple_of(alignment as usize);
            out.resize(aligned, 0);
            batch_first = seq;
            batch_records = 0;
        }
    }
    out
}

/// A checkpoint: raw bytes, or a valid header around a compressed fuzzer archive.
fn checkpoint(input: &mut Input<'_>, valid: bool) -> (u64, Vec<u8>) {
    let covered_seq = u64::from(input.u16());
    let len = usize::from(input.u16());
    let part = input.take(len);
    if !valid {
        return (covered_seq, part.to_vec());
    }
    let compressed = zstd::bulk::compress(part, 1).unwrap_or_default();
    let mut out = Vec::new();
    out.extend_from_slice(&CHECKPOINT_MAGIC);
    out.extend_from_slice(&CHECKPOINT_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&covered_seq.to_le_bytes());
    out.extend_from_slice(&(part.len() as u64).to_le_bytes());
    out.extend_from_slice(&(compressed.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32(&compressed).to_le_bytes());
    let header_crc = crc32(&out[..44]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&compressed);
    (covered_seq, out)
}

/// CRC-32 (IEEE), as the engine's files use (crc32fast), bit by bit: the fuzzer's
/// inputs are small.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn config() -> ShardConfig {
    let mut config = ShardConfig::new(0);
    // Small segments: opening may create one (the simulated disk allocates it whole).
    config.segment_bytes = 64 * 1024;
    config
}

/// Reads every mailbox of an open shard to the end.
fn read_everything(shard: &ShardHandle<SimStorage>) {
    let shard = shard.borrow();
    let devices: Vec<_> = shard.mailbox_backlogs().map(|(device, _)| device).collect();
    for device in devices {
        let read = shard.read_mailbox(device, 0, usize::MAX, 0);
        assert!(read.entries.len() as u64 <= shard.mailbox_len(device));
        let _ = shard.mailbox_head_seq(device);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let flags = input.byte();
    let valid_header = flags & 0x01 != 0;
    let framed = flags & 0x02 != 0;
    let with_checkpoint = flags & 0x04 != 0;
    let valid_checkpoint = flags & 0x08 != 0;
    let second_segment = flags & 0x10 != 0;
    let alignment = ALIGNMENTS[usize::from(flags >> 5) % ALIGNMENTS.len()];
    let ids = input.byte();
    let first_id = SEGMENT_IDS[usize::from(ids) % SEGMENT_IDS.len()];
    let second_id = SEGMENT_IDS[usize::from(ids >> 4) % SEGMENT_IDS.len()];

    let storage = SimStorage::new(alignment);
    let first = segment(&mut input, valid_header, framed, first_id, alignment, 1);
    let first_seq_after = 1 + first.len() as u64; // Any later number: a plausible next seq.
    let second = second_segment
        .then(|| segment(&mut input, valid_header, framed, second_id, alignment, first_seq_after));
    let checkpoint = with_checkpoint.then(|| checkpoint(&mut input, valid_checkpoint));
    block_on(async {
        let _ = storage.write_file(&segment_file_name(first_id), &first).await;
        if let Some(second) = &second {
            let _ = storage.write_file(&segment_file_name(second_id), second).await;
        }
        if let Some((covered, bytes)) = &checkpoint {
            let name = tern_engine::checkpoint::file_name(*covered);
            let _ = storage.write_file(&name, bytes).await;
        }
        let _ = storage.sync_dir().await;

        let Ok(shard) = ShardHandle::open(storage.clone(), config()).await else { return };
        read_everything(&shard);
        // What opened must stay openable after the engine's own writes.
        if shard.commit().await.is_err() || shard.checkpoint().await.is_err() {
            return;
        }
        drop(shard);
        match ShardHandle::open(storage, config()).await {
            Ok(shard) => read_everything(&shard),
            Err(error) => panic!("opened once, then not after a checkpoint: {error}"),
        }
    });
});
