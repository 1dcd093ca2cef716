//! Segments grow with the shard: a new shard's first segment is 1 MiB, each next one
//! twice the last up to `segment_bytes`, a record too large for the next size gets a
//! segment it fits in, and a reopened shard keeps its active segment's size. So a node
//! holding hundreds of quiet shards does not preallocate `segment_bytes` for each.

mod common;

use common::*;
use futures_lite::future::block_on;
use tern_engine::{ShardConfig, SimStorage, Storage};

const MIB: u64 = 1 << 20;

/// The sizes of the shard's segment files, in order.
fn sizes(disk: &SimStorage) -> Vec<u64> {
    let mut names = disk.list().unwrap();
    names.retain(|name| name.starts_with("seg-"));
    names.sort();
    names.iter().map(|name| disk.map(name).unwrap().len() as u64).collect()
}

fn config() -> ShardConfig {
    let mut config = ShardConfig::new(3);
    config.segment_bytes = 4 * MIB;
    config
}

fn load(shard: &tern_engine::ShardHandle<SimStorage>, ids: std::ops::Range<u64>, body: &[u8]) {
    for id in ids {
        shard.borrow_mut().append_envelope(&envelope(1, id, id, body), &[(9, 1)]).unwrap();
        if id % 10 == 0 {
            block_on(shard.commit()).unwrap();
        }
    }
    block_on(shard.commit()).unwrap();
}

#[test]
fn segments_start_small_and_double_up_to_the_configured_size() {
    let disk = SimStorage::new(512);
    let shard = open(disk.clone(), config());
    assert_eq!(sizes(&disk), vec![MIB], "a new shard preallocates 1 MiB");
    // About 9 MB of envelopes: segments of 1, 2, 4 and 4 MiB.
    let body = vec![0xAB; 30_000];
    load(&shard, 1..301, &body);
    assert_eq!(sizes(&disk), vec![MIB, 2 * MIB, 4 * MIB, 4 * MIB]);

    // Reopened, the active segment keeps its size, and everything reads back.
    drop(shard);
    let shard = open(disk.clone(), config());
    assert_eq!(read_all(&shard, (9, 1)).len(), 300);
    load(&shard, 301..451, &body);
    let after = sizes(&disk);
    assert_eq!(after.len(), 5, "{after:?}");
    assert!(after.iter().skip(2).all(|size| *size == 4 * MIB), "{after:?}");
    assert_eq!(read_all(&shard, (9, 1)).len(), 450);
}

#[test]
fn a_record_larger_than_the_next_size_gets_a_segment_it_fits_in() {
    let disk = SimStorage::new(512);
    let shard = open(disk.clone(), config());
    let body = vec![0xCD; (5 * MIB / 2) as usize];
    load(&shard, 1..2, &body);
    let grown = sizes(&disk);
    assert_eq!(grown.len(), 2, "{grown:?}");
    assert!(
        grown[1] > 5 * MIB / 2 && grown[1] < 3 * MIB && grown[1].is_multiple_of(4096),
        "{grown:?}"
    );
    drop(shard);
    let shard = open(disk, config());
    let read = read_all(&shard, (9, 1));
    assert_eq!(read.len(), 1);
    assert!(read[0].1 == body, "the large record reads back whole");
}
