//! The data directory and its `MANIFEST`: the format version and the shard count, fixed
//! when the directory is created.
//!
//! The manifest is a few lines of text so an operator can read it with `cat`; its last
//! line is a CRC32 of the lines before it. It is written once (temp file, fsync, rename,
//! directory fsync) and never changed, so a crash leaves either no manifest (the
//! directory is new) or a complete one. Shard `n` lives in `shard-NNNN/`.
//!
//! One process writes a data directory at a time: a writer first takes [`DataDirLock`],
//! an exclusive `flock` on `LOCK` held for the process's life (the kernel drops it when
//! the process ends, however it ends, so a crash never leaves a stale lock). Two servers
//! on one directory would each append to the same segments and each believe its own
//! index: acknowledged messages would vanish. Readers (`ternctl`) take no lock.

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The data directory format this build reads and writes.
pub const DATA_DIR_FORMAT_VERSION: u32 = 2;
/// Largest shard count a directory may be created with (shard ids are 16 bits in
/// message ids; 4096 is far beyond one machine's cores).
pub const SHARD_COUNT_MAX: u32 = 4096;
const MANIFEST: &str = "MANIFEST";
/// The lock file a writing process holds (`flock`), with its PID as text.
pub const LOCK_FILE: &str = "LOCK";

/// What the manifest records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Format version of the directory.
    pub format_version: u32,
    /// Number of shards (fixed for the life of the directory).
    pub shard_count: u32,
    /// When the directory was created.
    pub created_ms: u64,
}

/// Why a data directory could not be opened.
#[derive(Debug)]
#[non_exhaustive]
pub enum ManifestError {
    /// Reading or writing failed.
    Io(io::Error),
    /// The manifest is damaged (CRC mismatch or unparsable).
    Corrupt {
        /// What was wrong.
        detail: String,
    },
    /// The directory was written by a newer (or unknown) format.
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// A shard count of 0 or above [`SHARD_COUNT_MAX`] was asked for.
    BadShardCount {
        /// The count asked for.
        requested: u32,
    },
    /// Another process holds the directory's lock (a server is running on it).
    Locked {
        /// The directory.
        root: PathBuf,
        /// The holder's process id, as it wrote it in the lock file (if readable).
        holder_pid: Option<u32>,
    },
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestError::Io(e) => write!(f, "data directory I/O error: {e}"),
            ManifestError::Corrupt { detail } => write!(
                f,
                "MANIFEST is damaged ({detail}); restore it from a backup: it only records the \
                 format version and shard count"
            ),
            ManifestError::UnsupportedVersion { found } => write!(
                f,
                "data directory format {found} is not supported by this build (it reads \
                 {DATA_DIR_FORMAT_VERSION}); run a matching ternd"
            ),
            ManifestError::BadShardCount { requested } => {
                write!(f, "shard count {requested} must be between 1 and {SHARD_COUNT_MAX}")
            }
            ManifestError::Locked { root, holder_pid } => {
                write!(f, "data directory {} is in use by ", root.display())?;
                match holder_pid {
                    Some(pid) => write!(f, "another process (pid {pid})")?,
                    None => write!(f, "another process")?,
                }
                write!(f, "; stop it first, or give this server its own --data-dir")
            }
        }
    }
}

impl std::error::Error for ManifestError {}

impl From<io::Error> for ManifestError {
    fn from(error: io::Error) -> Self {
        ManifestError::Io(error)
    }
}

impl Manifest {
    fn to_text(self) -> String {
        let body = format!(
            "tern-data-dir\nformat_version {}\nshard_count {}\ncreated_ms {}\n",
            self.format_version, self.shard_count, self.created_ms
        );
        format!("{body}crc32 {:08x}\n", crc32fast::hash(body.as_bytes()))
    }

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let corrupt = |detail: &str| ManifestError::Corrupt { detail: detail.to_string() };
        let crc_at = text.rfind("crc32 ").ok_or_else(|| corrupt("no crc32 line"))?;
        let (body, crc_line) = text.split_at(crc_at);
        let crc = u32::from_str_radix(crc_line["crc32 ".len()..].trim(), 16)
            .map_err(|_| corrupt("unreadable crc32"))?;
        if crc32fast::hash(body.as_bytes()) != crc {
            return Err(corrupt("crc32 mismatch"));
        }
        let mut lines = body.lines();
        if lines.next() != Some("tern-data-dir") {
            return Err(corrupt("not a Tern manifest"));
        }
        let mut field = |name: &str| -> Result<u64, ManifestError> {
            let line = lines.next().ok_or_else(|| corrupt("missing line"))?;
            let value = line.strip_prefix(name).ok_or_else(|| corrupt("unexpected line"))?;
            value.trim().parse().map_err(|_| corrupt("unreadable number"))
        };
        let format_version = field("format_version")? as u32;
        let shard_count = field("shard_count")? as u32;
        let created_ms = field("created_ms")?;
        if format_version != DATA_DIR_FORMAT_VERSION {
            return Err(ManifestError::UnsupportedVersion { found: format_version });
        }
        Ok(Manifest { format_version, shard_count, created_ms })
    }
}

/// The exclusive right to write a data directory, for as long as it is held (dropping it
/// releases the `flock`; so does the process ending).
#[derive(Debug)]
pub struct DataDirLock {
    root: PathBuf,
    /// The open lock file: the `flock` belongs to this open file description.
    _file: std::fs::File,
}

impl DataDirLock {
    /// Takes the lock of `root` (creating the directory if needed), before anything in
    /// it is read or written; refuses with [`ManifestError::Locked`] naming the holder.
    pub fn acquire(root: impl Into<PathBuf>) -> Result<DataDirLock, ManifestError> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(root.join(LOCK_FILE))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder_pid = read_pid(&root);
                return Err(ManifestError::Locked { root, holder_pid });
            }
            Err(std::fs::TryLockError::Error(error)) => return Err(error.into()),
        }
        // The PID is for people and `ternctl`; the lock itself is the flock.
        file.set_len(0)?;
        writeln!(file, "{}", std::process::id())?;
        Ok(DataDirLock { root, _file: file })
    }

    /// The process holding `root`'s lock, if one does (`Some(None)`: held, PID unreadable).
    /// Takes nothing: a probe that finds the lock free releases it at once.
    pub fn holder(root: &Path) -> io::Result<Option<Option<u32>>> {
        let file = match std::fs::File::open(root.join(LOCK_FILE)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match file.try_lock_shared() {
            Ok(()) => Ok(None),
            Err(std::fs::TryLockError::WouldBlock) => Ok(Some(read_pid(root))),
            Err(std::fs::TryLockError::Error(error)) => Err(error),
        }
    }

    /// The directory this lock holds.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

fn read_pid(root: &Path) -> Option<u32> {
    std::fs::read_to_string(root.join(LOCK_FILE)).ok()?.trim().parse().ok()
}

/// A data directory: the manifest and one sub-directory per shard.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
    manifest: Manifest,
}

impl DataDir {
    /// Opens the directory `lock` holds for writing, creating it with `shard_count`
    /// shards if it has no manifest yet. An existing directory keeps its own shard
    /// count, whatever is asked now.
    pub fn open_or_create(
        lock: &DataDirLock,
        shard_count: u32,
        now_ms: u64,
    ) -> Result<DataDir, ManifestError> {
        let root = lock.root().to_path_buf();
        let path = root.join(MANIFEST);
        let manifest = match std::fs::read_to_string(&path) {
            Ok(text) => Manifest::parse(&text)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if shard_count == 0 || shard_count > SHARD_COUNT_MAX {
                    return Err(ManifestError::BadShardCount { requested: shard_count });
                }
                let manifest = Manifest {
                    format_version: DATA_DIR_FORMAT_VERSION,
                    shard_count,
                    created_ms: now_ms,
                };
                write_durably(&root, MANIFEST, manifest.to_text().as_bytes())?;
                manifest
            }
            Err(e) => return Err(e.into()),
        };
        Ok(DataDir { root, manifest })
    }

    /// Opens an existing data directory without creating anything (tools).
    pub fn open_existing(root: impl Into<PathBuf>) -> Result<DataDir, ManifestError> {
        let root = root.into();
        let text = std::fs::read_to_string(root.join(MANIFEST))?;
        Ok(DataDir { manifest: Manifest::parse(&text)?, root })
    }

    /// The manifest.
    pub fn manifest(&self) -> Manifest {
        self.manifest
    }

    /// The directory of shard `shard_id`.
    pub fn shard_dir(&self, shard_id: u32) -> PathBuf {
        self.root.join(format!("shard-{shard_id:04}"))
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// Writes a new file atomically: temp file, fsync, rename, directory fsync.
fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let temp = dir.join(format!("{name}.tmp"));
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_is_created_once_and_fixes_the_shard_count() {
        let dir = tempfile::tempdir().unwrap();
        let lock = DataDirLock::acquire(dir.path()).unwrap();
        let created = DataDir::open_or_create(&lock, 8, 5).unwrap();
        assert_eq!(created.manifest().shard_count, 8);
        // Reopening with another count keeps the recorded one.
        let reopened = DataDir::open_or_create(&lock, 2, 9).unwrap();
        assert_eq!(reopened.manifest(), created.manifest());
        assert!(reopened.shard_dir(3).ends_with("shard-0003"));
        let text = std::fs::read_to_string(dir.path().join("MANIFEST")).unwrap();
        assert!(text.starts_with("tern-data-dir\nformat_version 2\nshard_count 8\n"));
    }

    #[test]
    fn damaged_or_foreign_manifests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        DataDir::open_or_create(&DataDirLock::acquire(dir.path()).unwrap(), 4, 5).unwrap();
        let path = dir.path().join("MANIFEST");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("shard_count 4", "shard_count 5")).unwrap();
        assert!(matches!(DataDir::open_existing(dir.path()), Err(ManifestError::Corrupt { .. })));

        for other in [1, 3] {
            // Version 1 (before the state layout changed) and a future one: refused.
            let manifest = Manifest { format_version: other, shard_count: 1, created_ms: 0 };
            std::fs::write(&path, manifest.to_text()).unwrap();
            assert!(matches!(
                DataDir::open_existing(dir.path()),
                Err(ManifestError::UnsupportedVersion { found }) if found == other
            ));
        }
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            DataDir::open_or_create(&DataDirLock::acquire(empty.path()).unwrap(), 0, 0),
            Err(ManifestError::BadShardCount { requested: 0 })
        ));
    }

    /// A second writer is refused while the first holds the lock, with the holder's PID;
    /// once the first lets go, the directory can be taken again. (`flock` locks belong
    /// to open file descriptions, so two opens in one process conflict like two
    /// processes do.)
    #[test]
    fn a_second_writer_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(DataDirLock::holder(dir.path()).unwrap(), None);
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let pid = std::process::id();
        match DataDirLock::acquire(dir.path()) {
            Err(ManifestError::Locked { holder_pid, .. }) => assert_eq!(holder_pid, Some(pid)),
            other => panic!("a second lock was not refused: {other:?}"),
        }
        let refused = DataDirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(refused.contains(&format!("in use by another process (pid {pid})")), "{refused}");
        assert_eq!(DataDirLock::holder(dir.path()).unwrap(), Some(Some(pid)));
        drop(first);
        assert_eq!(DataDirLock::holder(dir.path()).unwrap(), None);
        DataDirLock::acquire(dir.path()).unwrap();
    }
}
