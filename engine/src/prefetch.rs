//! Reading the log ahead of recovery, so that a cold start overlaps the disk with the
//! replay.
//!
//! Recovery replays each shard's segments through a memory map: after a power cut or a
//! reboot the page cache is empty, and each page fault of the scan waits for the disk
//! while the CPU that would replay sits idle, so the disk's time adds to the replay's
//! instead of overlapping it (1.2–2.2 s per GiB cold against 0.8–1.0 s warm,
//! `docs/BENCHMARKS.md`). `madvise(MADV_WILLNEED)` did not help: the readahead it starts
//! runs in the mapping call, before the scan, on the same thread. [`read_ahead`] reads
//! the segments on a thread of its own, in the order the replay will want them, so the
//! faults find their pages in the page cache or already on their way.

use std::io::Read as _;
use std::path::PathBuf;
use std::thread::JoinHandle;

use crate::record::parse_segment_file_name;

/// Bytes read at once.
const CHUNK_BYTES: usize = 1 << 20;

/// Starts a thread that reads the segment files of `shard_dirs` into the page cache, in
/// that order and each shard's by segment id (the replay's order), and returns how many
/// bytes it read. A segment is read up to its first all-zero chunk: past it lies the
/// preallocated tail, which nothing was written to. Errors end the read of a file
/// quietly: the replay reads the disk itself and reports them.
pub fn read_ahead(shard_dirs: Vec<PathBuf>) -> std::io::Result<JoinHandle<u64>> {
    std::thread::Builder::new().name("tern-read-ahead".into()).spawn(move || {
        let mut chunk = vec![0u8; CHUNK_BYTES];
        let mut read = 0u64;
        for dir in shard_dirs {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            let mut segments: Vec<(u64, PathBuf)> = entries
                .flatten()
                .filter_map(|e| {
                    let id = parse_segment_file_name(e.file_name().to_str()?)?;
                    Some((id, e.path()))
                })
                .collect();
            segments.sort_unstable();
            for (_, path) in segments {
                read += read_written_part(&path, &mut chunk);
            }
        }
        read
    })
}

/// Reads `path` chunk by chunk until its end or its first all-zero chunk.
fn read_written_part(path: &std::path::Path, chunk: &mut [u8]) -> u64 {
    let Ok(mut file) = std::fs::File::open(path) else { return 0 };
    let mut read = 0u64;
    loop {
        let n = match file.read(chunk) {
            Ok(0) | Err(_) => return read,
            Ok(n) => n,
        };
        read += n as u64;
        if chunk[..n].iter().all(|b| *b == 0) {
            return read;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::segment_file_name;

    #[test]
    fn reads_each_segment_up_to_its_zero_tail_and_skips_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut segment = vec![7u8; CHUNK_BYTES + 10];
        segment.extend(vec![0u8; 3 * CHUNK_BYTES]);
        std::fs::write(dir.path().join(segment_file_name(1)), &segment).unwrap();
        std::fs::write(dir.path().join(segment_file_name(2)), vec![1u8; 100]).unwrap();
        std::fs::write(dir.path().join("checkpoint-00000000000000000001.ckpt"), [9u8; 50]).unwrap();
        let missing = dir.path().join("no-such-shard");
        let read = read_ahead(vec![missing, dir.path().to_path_buf()]).unwrap().join().unwrap();
        // Segment 1: its first chunk (data), then the chunk holding the last 10 data
        // bytes and zeros, then one all-zero chunk, where it stops; segment 2 whole.
        assert_eq!(read, 3 * CHUNK_BYTES as u64 + 100);
    }
}
