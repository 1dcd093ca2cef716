//! The data directory and its `MANIFEST`: the format version and the shard count, fixed
//! when the directory is created.
//!
//! The manifest is a few lines of text so an operator can read it with `cat`; its last
//! line is a CRC32 of the lines before it. It is written once (temp file, fsync, rename,
//! directory fsync) and never changed, so a crash leaves either no manifest (the
//! directory is new) or a complete one. Shard `n` lives in `shard-NNNN/`.

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The data directory format this build reads and writes.
pub const DATA_DIR_FORMAT_VERSION: u32 = 1;
/// Largest shard count a directory may be created with (shard ids are 16 bits in
/// message ids; 4096 is far beyond one machine's cores).
pub const SHARD_COUNT_MAX: u32 = 4096;
const MANIFEST: &str = "MANIFEST";

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

/// A data directory: the manifest and one sub-directory per shard.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
    manifest: Manifest,
}

impl DataDir {
    /// Opens `root`, creating it with `shard_count` shards if it has no manifest yet.
    /// An existing directory keeps its own shard count, whatever is asked now.
    pub fn open_or_create(
        root: impl Into<PathBuf>,
        shard_count: u32,
        now_ms: u64,
    ) -> Result<DataDir, ManifestError> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
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
        let created = DataDir::open_or_create(dir.path(), 8, 5).unwrap();
        assert_eq!(created.manifest().shard_count, 8);
        // Reopening with another count keeps the recorded one.
        let reopened = DataDir::open_or_create(dir.path(), 2, 9).unwrap();
        assert_eq!(reopened.manifest(), created.manifest());
        assert!(reopened.shard_dir(3).ends_with("shard-0003"));
        let text = std::fs::read_to_string(dir.path().join("MANIFEST")).unwrap();
        assert!(text.starts_with("tern-data-dir\nformat_version 1\nshard_count 8\n"));
    }

    #[test]
    fn damaged_or_foreign_manifests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        DataDir::open_or_create(dir.path(), 4, 5).unwrap();
        let path = dir.path().join("MANIFEST");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("shard_count 4", "shard_count 5")).unwrap();
        assert!(matches!(DataDir::open_existing(dir.path()), Err(ManifestError::Corrupt { .. })));

        let future = Manifest { format_version: 2, shard_count: 1, created_ms: 0 };
        std::fs::write(&path, future.to_text()).unwrap();
        assert!(matches!(
            DataDir::open_existing(dir.path()),
            Err(ManifestError::UnsupportedVersion { found: 2 })
        ));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            DataDir::open_or_create(empty.path(), 0, 0),
            Err(ManifestError::BadShardCount { requested: 0 })
        ));
    }
}
