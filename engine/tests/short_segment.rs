//! Regression: recovery panicked on a last segment shorter than its committed end.
//!
//! Found by the `recovery` fuzz target. A batch ends with its `Commit` record and is
//! padded with zeros to the write alignment; the scan reports the committed end as that
//! aligned offset. A segment whose trailing zeros were cut off (a copy that trims them,
//! a file truncated inside the padding) therefore ends before its committed end, and
//! recovery sliced `file[..committed_end]` out of range. Now the missing bytes read as
//! the zeros they were, the shard opens with every envelope, and appends after them.
//!
//! Method: write a batch, cut the segment right after its `Commit` record, reopen,
//! read, append and reopen again.

mod common;

use common::{envelope, open, read_all, small_config};
use futures_lite::future::block_on;
use tern_engine::record::{scan_segment, segment_file_name};
use tern_engine::SimStorage;

#[test]
fn a_segment_cut_inside_its_padding_opens_with_everything() {
    let storage = SimStorage::new(512);
    let device = (9, 1);
    let shard = open(storage.clone(), small_config());
    shard.borrow_mut().append_envelope(&envelope(7, 1, 1, b"first"), &[device]).unwrap();
    block_on(shard.commit()).unwrap();
    drop(shard);

    storage.corrupt(&segment_file_name(1), |bytes| {
        let scan = scan_segment(bytes).expect("the segment scans");
        let last = scan.records.last().expect("a batch was written");
        let end = last.offset as usize + last.header.record_bytes();
        assert!(end < scan.end.committed_end() as usize, "the cut falls inside the padding");
        bytes.truncate(end);
    });

    let shard = open(storage.clone(), small_config());
    assert_eq!(read_all(&shard, device).len(), 1);
    shard.borrow_mut().append_envelope(&envelope(7, 2, 2, b"second"), &[device]).unwrap();
    block_on(shard.commit()).unwrap();
    drop(shard);

    let shard = open(storage, small_config());
    let bodies: Vec<Vec<u8>> = read_all(&shard, device).into_iter().map(|(_, b)| b).collect();
    assert_eq!(bodies, vec![b"first".to_vec(), b"second".to_vec()]);
}
