//! Regression: a torn batch after damaged records left an unaligned active end.
//!
//! Found by the `recovery` fuzz target. When a record in synced data is damaged, the
//! scan resumes at the next valid record, at any byte offset; if the batch after that
//! is torn, the committed end stays at that unaligned offset. Recovery then zeroed the
//! torn bytes with a write starting there, and the next batch would have started there
//! too: the simulated disk panicked on the unaligned write, and on a real DMA file the
//! write fails, so the shard could not open. Now the torn bytes are zeroed in whole
//! aligned blocks and the next batch starts at the next aligned offset.
//!
//! Method: one batch of two envelopes and its `Commit`; damage the first record's header
//! (the scan resumes at the second) and the `Commit`'s body (the batch is torn). Open,
//! append, commit, and open again: the new envelope is there.

mod common;

use common::{envelope, open, read_all, small_config};
use futures_lite::future::block_on;
use tern_engine::record::{scan_segment, segment_file_name, RECORD_HEADER_BYTES};
use tern_engine::SimStorage;

#[test]
fn a_torn_batch_after_damage_reopens_and_takes_new_batches() {
    let storage = SimStorage::new(512);
    let device = (9, 1);
    let shard = open(storage.clone(), small_config());
    shard.borrow_mut().append_envelope(&envelope(7, 1, 1, b"first"), &[device]).unwrap();
    shard.borrow_mut().append_envelope(&envelope(7, 2, 2, b"second"), &[device]).unwrap();
    block_on(shard.commit()).unwrap();
    drop(shard);

    storage.corrupt(&segment_file_name(1), |bytes| {
        let scan = scan_segment(bytes).expect("the segment scans");
        let (first, commit) = (scan.records[0].offset, scan.records[2].offset);
        assert_ne!(scan.records[1].offset % 512, 0, "the scan resumes off the alignment");
        bytes[first as usize + 2] ^= 0xff; // The record type: the header CRC fails.
        bytes[commit as usize + RECORD_HEADER_BYTES] ^= 0xff; // The body CRC fails.
    });

    let shard = open(storage.clone(), small_config());
    shard.borrow_mut().append_envelope(&envelope(7, 3, 3, b"third"), &[device]).unwrap();
    block_on(shard.commit()).unwrap();
    let before: Vec<Vec<u8>> = read_all(&shard, device).into_iter().map(|(_, b)| b).collect();
    assert!(before.contains(&b"third".to_vec()));
    drop(shard);

    let shard = open(storage, small_config());
    let after: Vec<Vec<u8>> = read_all(&shard, device).into_iter().map(|(_, b)| b).collect();
    assert_eq!(after, before, "what was readable before the restart still is");
}
