//! Media blobs: client-encrypted files, uploaded in chunks, hashed as they arrive.
//!
//! The server keeps a blob's bytes as one file under the data directory's `media/`
//! (`<id>.part` while uploading, `<id>` once sealed) and its metadata as a
//! `MediaRecord` in a shard's state. This module is the file side only, as operations
//! ([`BlobOp`]) run by a [`BlobStore`]: [`FsBlobs`] (`std::fs`, run by `ternd` in a
//! blocking thread pool, never on a core's thread: a 100 MiB commit must not stall the
//! other users of the core) and [`SimBlobs`] (memory with a crash image, for the
//! server's deterministic simulation).
//!
//! Hashing is incremental: each append carries the upload's running SHA-256 out and
//! back, so sealing a blob hashes nothing again. After a restart the running hash is
//! gone; the next append or the seal re-hashes what the file already holds (once).
//! Operations on one upload are issued one at a time by the server, in order.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use sha2::{Digest, Sha256};

/// A blob's id (the first two bytes are its home shard).
pub type BlobId = [u8; 16];

/// What to do with a blob's file.
#[derive(Debug)]
pub enum BlobOp {
    /// Starts an upload: an empty part file.
    Begin {
        /// The blob.
        id: BlobId,
    },
    /// Appends `data` at `offset`, which must be the part's length, and hashes it.
    Append {
        /// The blob.
        id: BlobId,
        /// Where the bytes go (the bytes received so far).
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
        /// The SHA-256 of the part so far (`None`: recompute it from the file).
        hasher: Option<Box<Sha256>>,
    },
    /// The part's (or the sealed blob's) length after an `fdatasync`: a resumed upload
    /// never skips bytes that a crash lost.
    Status {
        /// The blob.
        id: BlobId,
        /// Whether it is sealed.
        sealed: bool,
    },
    /// Makes the part the blob if it has `size_bytes` with hash `sha256`: sync, rename,
    /// directory sync.
    Seal {
        /// The blob.
        id: BlobId,
        /// The declared size.
        size_bytes: u64,
        /// The hash the uploader committed to.
        sha256: [u8; 32],
        /// The running hash of the part (`None`: recompute it from the file).
        hasher: Option<Box<Sha256>>,
    },
    /// Reads part of a sealed blob.
    Read {
        /// The blob.
        id: BlobId,
        /// First byte.
        offset: u64,
        /// Bytes wanted (fewer at the end).
        length: u64,
    },
    /// Writes a whole sealed blob at once (server-made: an export), synced.
    Write {
        /// The blob.
        id: BlobId,
        /// Its bytes.
        bytes: Vec<u8>,
    },
    /// Deletes the blob in either form.
    Remove {
        /// The blob.
        id: BlobId,
    },
}

/// What an operation did.
#[derive(Debug)]
pub enum BlobDone {
    /// `Begin`, `Write` or `Remove` done.
    Done,
    /// `Append` done: the new length and the running hash.
    Appended {
        /// Bytes in the part now.
        length: u64,
        /// Its SHA-256 so far.
        hasher: Box<Sha256>,
    },
    /// `Status`: the durable length.
    Length(u64),
    /// `Seal` done: the blob's hash.
    Sealed([u8; 32]),
    /// `Read`'s bytes.
    Bytes(Vec<u8>),
}

/// Why an operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobError {
    /// No such part or blob (expired, deleted, or never begun).
    NotFound,
    /// `Append` at another offset than the part's length.
    OutOfOrder {
        /// The part's length.
        length: u64,
    },
    /// `Seal` of a part shorter or longer than declared.
    WrongSize {
        /// The part's length.
        length: u64,
    },
    /// `Seal` of a part whose hash is not the committed one.
    HashMismatch,
    /// The disk is full.
    Full,
    /// Another I/O error.
    Io,
}

impl std::fmt::Display for BlobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlobError::NotFound => write!(f, "no such blob"),
            BlobError::OutOfOrder { length } => write!(f, "append out of order (have {length})"),
            BlobError::WrongSize { length } => write!(f, "wrong size (have {length})"),
            BlobError::HashMismatch => write!(f, "the bytes do not have the committed hash"),
            BlobError::Full => write!(f, "the disk is full"),
            BlobError::Io => write!(f, "an I/O error"),
        }
    }
}

impl std::error::Error for BlobError {}

/// Runs blob operations.
pub trait BlobStore {
    /// Runs one operation to completion.
    fn run(&mut self, op: BlobOp) -> Result<BlobDone, BlobError>;
}

fn hex(id: &BlobId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn name(id: &BlobId, part: bool) -> String {
    if part {
        format!("{}.part", hex(id))
    } else {
        hex(id)
    }
}

/// Bytes hashed or copied per read when a file is streamed (memory stays one buffer).
const STREAM_BUFFER_BYTES: usize = 256 * 1024;

fn io_error(error: io::Error) -> BlobError {
    match error.kind() {
        io::ErrorKind::NotFound => BlobError::NotFound,
        io::ErrorKind::StorageFull => BlobError::Full,
        _ if error.raw_os_error() == Some(28) => BlobError::Full, // ENOSPC
        _ => BlobError::Io,
    }
}

/// Blobs as files in one directory (`std::fs`; blocking: run off the core's thread).
#[derive(Clone, Debug)]
pub struct FsBlobs {
    dir: PathBuf,
}

impl FsBlobs {
    /// The blobs of `dir` (created if missing).
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<FsBlobs> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(FsBlobs { dir })
    }

    fn path(&self, id: &BlobId, part: bool) -> PathBuf {
        self.dir.join(name(id, part))
    }

    /// The SHA-256 of the first `length` bytes of `file`, streamed.
    fn hash_file(file: &mut std::fs::File, length: u64) -> io::Result<Box<Sha256>> {
        let mut hasher = Box::new(Sha256::new());
        file.seek(SeekFrom::Start(0))?;
        let mut buffer = vec![0u8; STREAM_BUFFER_BYTES];
        let mut left = length;
        while left > 0 {
            let want = buffer.len().min(left as usize);
            let n = file.read(&mut buffer[..want])?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            left -= n as u64;
        }
        Ok(hasher)
    }

    fn append(
        &self,
        id: &BlobId,
        offset: u64,
        data: &[u8],
        hasher: Option<Box<Sha256>>,
    ) -> io::Result<Result<BlobDone, BlobError>> {
        let mut file =
            std::fs::OpenOptions::new().read(true).write(true).open(self.path(id, true))?;
        let length = file.metadata()?.len();
        if offset != length {
            return Ok(Err(BlobError::OutOfOrder { length }));
        }
        let mut hasher = match hasher {
            Some(hasher) => hasher,
            None => Self::hash_file(&mut file, length)?,
        };
        file.seek(SeekFrom::Start(length))?;
        file.write_all(data)?;
        hasher.update(data);
        Ok(Ok(BlobDone::Appended { length: length + data.len() as u64, hasher }))
    }

    fn seal(
        &self,
        id: &BlobId,
        size_bytes: u64,
        sha256: [u8; 32],
        hasher: Option<Box<Sha256>>,
    ) -> io::Result<Result<BlobDone, BlobError>> {
        let part = self.path(id, true);
        let mut file = std::fs::File::open(&part)?;
        let length = file.metadata()?.len();
        if length != size_bytes {
            return Ok(Err(BlobError::WrongSize { length }));
        }
        let hasher = match hasher {
            Some(hasher) => hasher,
            None => Self::hash_file(&mut file, length)?,
        };
        let hash: [u8; 32] = hasher.finalize().into();
        if hash != sha256 {
            return Ok(Err(BlobError::HashMismatch));
        }
        file.sync_all()?;
        std::fs::rename(&part, self.path(id, false))?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(Ok(BlobDone::Sealed(hash)))
    }

    fn read(&self, id: &BlobId, offset: u64, length: u64) -> io::Result<BlobDone> {
        let mut file = std::fs::File::open(self.path(id, false))?;
        let size = file.metadata()?.len();
        let end = offset.saturating_add(length).min(size);
        let mut data = vec![0u8; end.saturating_sub(offset) as usize];
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut data)?;
        Ok(BlobDone::Bytes(data))
    }

    fn write(&self, id: &BlobId, bytes: &[u8]) -> io::Result<BlobDone> {
        let mut file = std::fs::File::create(self.path(id, false))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(BlobDone::Done)
    }
}

impl BlobStore for FsBlobs {
    fn run(&mut self, op: BlobOp) -> Result<BlobDone, BlobError> {
        let done = match op {
            BlobOp::Begin { id } => {
                std::fs::File::create(self.path(&id, true)).map(|_| Ok(BlobDone::Done))
            }
            BlobOp::Append { id, offset, data, hasher } => self.append(&id, offset, &data, hasher),
            BlobOp::Status { id, sealed } => {
                std::fs::File::open(self.path(&id, !sealed)).and_then(|file| {
                    file.sync_data()?;
                    Ok(Ok(BlobDone::Length(file.metadata()?.len())))
                })
            }
            BlobOp::Seal { id, size_bytes, sha256, hasher } => {
                self.seal(&id, size_bytes, sha256, hasher)
            }
            BlobOp::Read { id, offset, length } => self.read(&id, offset, length).map(Ok),
            BlobOp::Write { id, bytes } => self.write(&id, &bytes).map(Ok),
            BlobOp::Remove { id } => {
                for part in [true, false] {
                    let _ = std::fs::remove_file(self.path(&id, part));
                }
                Ok(Ok(BlobDone::Done))
            }
        };
        done.unwrap_or_else(|error| Err(io_error(error)))
    }
}

/// A file of [`SimBlobs`]: what a sync made durable, and what only the page cache holds.
#[derive(Clone, Debug, Default)]
struct SimBlobFile {
    bytes: Vec<u8>,
    synced_len: usize,
    /// Whether its name is durable (created or renamed before a directory sync).
    named: bool,
}

/// Blobs in memory, for the simulation: a power cut drops what no sync covered.
#[derive(Clone, Debug, Default)]
pub struct SimBlobs {
    files: BTreeMap<String, SimBlobFile>,
}

impl SimBlobs {
    /// No blobs.
    pub fn new() -> SimBlobs {
        SimBlobs::default()
    }

    /// A power cut: unsynced bytes and names not made durable are gone.
    pub fn power_cut(&mut self) {
        self.files.retain(|_, f| f.named);
        for file in self.files.values_mut() {
            file.bytes.truncate(file.synced_len);
        }
    }

    /// How many files exist (tests).
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    fn file(&mut self, id: &BlobId, part: bool) -> Result<&mut SimBlobFile, BlobError> {
        self.files.get_mut(&name(id, part)).ok_or(BlobError::NotFound)
    }

    fn sim_append(
        &mut self,
        id: &BlobId,
        offset: u64,
        data: &[u8],
        hasher: Option<Box<Sha256>>,
    ) -> Result<BlobDone, BlobError> {
        let file = self.file(id, true)?;
        let length = file.bytes.len() as u64;
        if offset != length {
            return Err(BlobError::OutOfOrder { length });
        }
        let mut hasher =
            hasher.unwrap_or_else(|| Box::new(Sha256::new().chain_update(&file.bytes)));
        file.bytes.extend_from_slice(data);
        hasher.update(data);
        Ok(BlobDone::Appended { length: file.bytes.len() as u64, hasher })
    }

    fn sim_seal(
        &mut self,
        id: &BlobId,
        size_bytes: u64,
        sha256: [u8; 32],
        hasher: Option<Box<Sha256>>,
    ) -> Result<BlobDone, BlobError> {
        let file = self.file(id, true)?;
        let length = file.bytes.len() as u64;
        if length != size_bytes {
            return Err(BlobError::WrongSize { length });
        }
        let hasher = hasher.unwrap_or_else(|| Box::new(Sha256::new().chain_update(&file.bytes)));
        let hash: [u8; 32] = hasher.finalize().into();
        if hash != sha256 {
            return Err(BlobError::HashMismatch);
        }
        let mut file = self.files.remove(&name(id, true)).ok_or(BlobError::NotFound)?;
        file.synced_len = file.bytes.len();
        file.named = true; // Renamed, then the directory synced.
        self.files.insert(name(id, false), file);
        Ok(BlobDone::Sealed(hash))
    }
}

impl BlobStore for SimBlobs {
    fn run(&mut self, op: BlobOp) -> Result<BlobDone, BlobError> {
        match op {
            BlobOp::Begin { id } => {
                // Not durable by name until a sync: a power cut may lose the upload.
                self.files.insert(name(&id, true), SimBlobFile::default());
                Ok(BlobDone::Done)
            }
            BlobOp::Append { id, offset, data, hasher } => {
                self.sim_append(&id, offset, &data, hasher)
            }
            BlobOp::Status { id, sealed } => {
                let file = self.file(&id, !sealed)?;
                file.synced_len = file.bytes.len();
                file.named = true;
                Ok(BlobDone::Length(file.bytes.len() as u64))
            }
            BlobOp::Seal { id, size_bytes, sha256, hasher } => {
                self.sim_seal(&id, size_bytes, sha256, hasher)
            }
            BlobOp::Read { id, offset, length } => {
                let file = self.file(&id, false)?;
                let start = (offset as usize).min(file.bytes.len());
                let end = (offset.saturating_add(length) as usize).min(file.bytes.len());
                Ok(BlobDone::Bytes(file.bytes[start..end].to_vec()))
            }
            BlobOp::Write { id, bytes } => {
                let synced_len = bytes.len();
                self.files.insert(name(&id, false), SimBlobFile { bytes, synced_len, named: true });
                Ok(BlobDone::Done)
            }
            BlobOp::Remove { id } => {
                self.files.remove(&name(&id, true));
                self.files.remove(&name(&id, false));
                Ok(BlobDone::Done)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same upload through both stores: appends in order are hashed as they come,
    /// out-of-order ones are refused, a wrong hash or size does not seal, the right ones
    /// do, and reads see the sealed bytes. After the running hash is lost (a restart),
    /// the store re-hashes the part and the result is the same.
    fn upload_and_read(store: &mut dyn BlobStore) {
        let id = [7u8; 16];
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sha256: [u8; 32] = Sha256::digest(&data).into();
        assert!(matches!(store.run(BlobOp::Begin { id }), Ok(BlobDone::Done)));
        let first =
            store.run(BlobOp::Append { id, offset: 0, data: data[..1000].to_vec(), hasher: None });
        let Ok(BlobDone::Appended { length: 1000, hasher }) = first else { panic!("{first:?}") };
        let wrong = BlobOp::Append { id, offset: 5, data: vec![1], hasher: None };
        assert_eq!(store.run(wrong).unwrap_err(), BlobError::OutOfOrder { length: 1000 });
        let rest = data[1000..].to_vec();
        let second =
            store.run(BlobOp::Append { id, offset: 1000, data: rest, hasher: Some(hasher) });
        let Ok(BlobDone::Appended { hasher, .. }) = second else { panic!("{second:?}") };
        let short = BlobOp::Seal { id, size_bytes: 1, sha256, hasher: None };
        assert_eq!(store.run(short).unwrap_err(), BlobError::WrongSize { length: 300_000 });
        let size_bytes = data.len() as u64;
        let bad = BlobOp::Seal { id, size_bytes, sha256: [0; 32], hasher: Some(hasher.clone()) };
        assert_eq!(store.run(bad).unwrap_err(), BlobError::HashMismatch);
        // The running hash and a re-hash from the file agree.
        let rehashed = BlobOp::Seal { id, size_bytes, sha256, hasher: None };
        assert!(matches!(store.run(rehashed), Ok(BlobDone::Sealed(h)) if h == sha256));
        let read = store.run(BlobOp::Read { id, offset: 299_990, length: 100 });
        assert!(matches!(read, Ok(BlobDone::Bytes(b)) if b == data[299_990..]));
        assert!(matches!(
            store.run(BlobOp::Status { id, sealed: true }),
            Ok(BlobDone::Length(300_000))
        ));
        store.run(BlobOp::Remove { id }).unwrap();
        assert_eq!(
            store.run(BlobOp::Read { id, offset: 0, length: 1 }).unwrap_err(),
            BlobError::NotFound
        );
    }

    #[test]
    fn files_and_the_simulation_agree() {
        let dir = tempfile::tempdir().unwrap();
        upload_and_read(&mut FsBlobs::open(dir.path()).unwrap());
        upload_and_read(&mut SimBlobs::new());
    }

    /// A power cut keeps what a status sync or a seal made durable, nothing after it.
    #[test]
    fn a_power_cut_keeps_only_synced_bytes() {
        let mut blobs = SimBlobs::new();
        let id = [1u8; 16];
        blobs.run(BlobOp::Begin { id }).unwrap();
        blobs.run(BlobOp::Append { id, offset: 0, data: vec![1; 10], hasher: None }).unwrap();
        assert!(matches!(
            blobs.run(BlobOp::Status { id, sealed: false }),
            Ok(BlobDone::Length(10))
        ));
        blobs.run(BlobOp::Append { id, offset: 10, data: vec![2; 10], hasher: None }).unwrap();
        blobs.power_cut();
        assert!(matches!(
            blobs.run(BlobOp::Status { id, sealed: false }),
            Ok(BlobDone::Length(10))
        ));
        let other = [2u8; 16];
        blobs.run(BlobOp::Begin { id: other }).unwrap();
        blobs.power_cut();
        assert_eq!(blobs.len(), 1, "an upload never synced is gone");
    }
}
