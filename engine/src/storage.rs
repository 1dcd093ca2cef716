//! The storage seam: the few file operations the engine needs, behind a trait.
//!
//! Four implementations: [`StdStorage`] (plain `std::fs` + `memmap2`, for tests and
//! benchmarks that run without an executor), [`ReadOnlyStorage`] (the same reads, every
//! change discarded: `ternctl` beside a live server), [`crate::uring::UringStorage`]
//! (glommio DMA files through io_uring, what `ternd` uses) and [`SimStorage`] (memory,
//! with a crash image: it keeps every write since the last successful sync apart and, on
//! a simulated power cut, drops all, some or a torn part of them; it can also fail an
//! operation on a countdown). The page cache survives `kill -9`, so only the simulated
//! disk can show that durability holds.
//!
//! The engine calls these from one core; nothing here is `Send`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Read-only bytes of a whole file: an mmap for real files.
pub type Mapped = Rc<dyn Deref<Target = [u8]>>;

/// A directory of files (one shard's).
#[allow(async_fn_in_trait)] // Single-core engine: futures need not be `Send`.
pub trait Storage: Clone {
    /// An open file.
    type File: StorageFile;

    /// Names of the files in the directory.
    fn list(&self) -> io::Result<Vec<String>>;

    /// Creates `name` (which must not exist), preallocated to `len_bytes` of zeros.
    /// The directory is not synced: call [`Storage::sync_dir`].
    async fn create(&self, name: &str, len_bytes: u64) -> io::Result<Self::File>;

    /// Opens an existing file for writing.
    async fn open(&self, name: &str) -> io::Result<Self::File>;

    /// Maps a whole file read-only.
    fn map(&self, name: &str) -> io::Result<Mapped>;

    /// Writes a whole new file and syncs it (checkpoints use this, then rename).
    async fn write_file(&self, name: &str, bytes: &[u8]) -> io::Result<()>;

    /// Renames a file; the directory is not synced.
    async fn rename(&self, from: &str, to: &str) -> io::Result<()>;

    /// Removes a file; the directory is not synced.
    async fn remove(&self, name: &str) -> io::Result<()>;

    /// Makes creations, renames and removals durable.
    async fn sync_dir(&self) -> io::Result<()>;

    /// The write alignment files of this storage need (O_DIRECT block size), at least 1.
    fn write_alignment(&self) -> u32;
}

/// An open file.
#[allow(async_fn_in_trait)]
pub trait StorageFile {
    /// Writes `bytes` at `offset`. With O_DIRECT storage both are aligned.
    async fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every write so far durable (`fdatasync`).
    async fn sync_data(&self) -> io::Result<()>;

    /// Sets the file's length (truncating a torn tail at recovery).
    async fn set_len(&self, len_bytes: u64) -> io::Result<()>;
}

// ---------------------------------------------------------------------------------------
// std::fs
// ---------------------------------------------------------------------------------------

/// A directory on a real file system, through `std::fs` (blocking calls inside async
/// functions that complete at once).
#[derive(Debug, Clone)]
pub struct StdStorage {
    dir: PathBuf,
}

impl StdStorage {
    /// A storage over `dir`, created if missing.
    pub fn new(dir: impl Into<PathBuf>) -> io::Result<StdStorage> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(StdStorage { dir })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

/// A file of [`StdStorage`].
#[derive(Debug)]
pub struct StdFile {
    file: std::fs::File,
}

impl Storage for StdStorage {
    type File = StdFile;

    fn list(&self) -> io::Result<Vec<String>> {
        list_dir(&self.dir)
    }

    async fn create(&self, name: &str, len_bytes: u64) -> io::Result<StdFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.dir.join(name))?;
        file.set_len(len_bytes)?;
        Ok(StdFile { file })
    }

    async fn open(&self, name: &str) -> io::Result<StdFile> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(self.dir.join(name))?;
        Ok(StdFile { file })
    }

    fn map(&self, name: &str) -> io::Result<Mapped> {
        map_file(&self.dir.join(name))
    }

    async fn write_file(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::File::create(self.dir.join(name))?;
        file.write_all(bytes)?;
        file.sync_data()
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.dir.join(from), self.dir.join(to))
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.dir.join(name))
    }

    async fn sync_dir(&self) -> io::Result<()> {
        std::fs::File::open(&self.dir)?.sync_all()
    }

    fn write_alignment(&self) -> u32 {
        1
    }
}

impl StorageFile for StdFile {
    async fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(bytes, offset)
    }

    async fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    async fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.file.set_len(len_bytes)
    }
}

/// Lists the regular files of a directory by name.
pub(crate) fn list_dir(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// A real directory opened for reading only: files are listed and mapped, and every
/// change (a torn tail zeroed, a temp file removed, a first segment created) is
/// discarded. Recovery on it builds the same in-memory state as on the server while
/// leaving the directory byte for byte as it was, so `ternctl` can open a shard beside a
/// live `ternd`.
#[derive(Debug, Clone)]
pub struct ReadOnlyStorage {
    dir: PathBuf,
}

impl ReadOnlyStorage {
    /// Reads the shard directory `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> ReadOnlyStorage {
        ReadOnlyStorage { dir: dir.into() }
    }
}

/// A file of [`ReadOnlyStorage`]: writes go nowhere.
#[derive(Debug)]
pub struct DiscardFile;

impl Storage for ReadOnlyStorage {
    type File = DiscardFile;

    fn list(&self) -> io::Result<Vec<String>> {
        list_dir(&self.dir)
    }

    async fn create(&self, _name: &str, _len_bytes: u64) -> io::Result<DiscardFile> {
        Ok(DiscardFile)
    }

    async fn open(&self, name: &str) -> io::Result<DiscardFile> {
        std::fs::metadata(self.dir.join(name))?;
        Ok(DiscardFile)
    }

    fn map(&self, name: &str) -> io::Result<Mapped> {
        map_file(&self.dir.join(name))
    }

    async fn write_file(&self, _name: &str, _bytes: &[u8]) -> io::Result<()> {
        Ok(())
    }

    async fn rename(&self, _from: &str, _to: &str) -> io::Result<()> {
        Ok(())
    }

    async fn remove(&self, _name: &str) -> io::Result<()> {
        Ok(())
    }

    async fn sync_dir(&self) -> io::Result<()> {
        Ok(())
    }

    fn write_alignment(&self) -> u32 {
        1
    }
}

impl StorageFile for DiscardFile {
    async fn write_at(&self, _bytes: &[u8], _offset: u64) -> io::Result<()> {
        Ok(())
    }

    async fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    async fn set_len(&self, _len_bytes: u64) -> io::Result<()> {
        Ok(())
    }
}

/// Maps a file read-only (an empty file maps to an empty slice).
pub fn map_file(path: &Path) -> io::Result<Mapped> {
    let file = std::fs::File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Ok(Rc::new(Vec::new()));
    }
    // SAFETY: the engine never writes through this mapping, and never changes the bytes
    // of a mapped range afterwards: it maps sealed segments (no more writes), files at
    // recovery before any write, and checkpoints (written once, then renamed). A file
    // truncated underneath (by an operator) would fault on access; tools and the server
    // do not truncate mapped files.
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::Mmap::map(&file)? };
    Ok(Rc::new(map))
}

// ---------------------------------------------------------------------------------------
// Simulated disk
// ---------------------------------------------------------------------------------------

/// What a simulated power cut does to writes made since the last sync of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerCut {
    /// Every unsynced write is lost.
    DropAll,
    /// The first `n` unsynced writes survive, the rest are lost.
    KeepFirst(usize),
    /// The first `n` unsynced writes survive, and the next one survives only for its
    /// first `bytes` bytes (a torn write).
    Tear {
        /// Writes kept whole.
        whole: usize,
        /// Bytes kept of the next one.
        bytes: usize,
    },
}

#[derive(Debug, Default, Clone)]
struct SimFile {
    /// Contents as a reader sees them now (page cache).
    current: Vec<u8>,
    /// Contents as of the last sync.
    durable: Vec<u8>,
    /// Writes since the last sync, in order: (offset, bytes).
    unsynced: Vec<(u64, Vec<u8>)>,
}

#[derive(Debug, Default)]
struct SimState {
    /// Files as the directory sees them now.
    files: BTreeMap<String, Rc<RefCell<SimFile>>>,
    /// The directory as of the last directory sync: name → file.
    durable_dir: BTreeMap<String, Rc<RefCell<SimFile>>>,
    /// Operations left before the injected failure fires (`None`: no failure armed).
    fail_countdown: Option<u32>,
    /// The error kind the injected failure returns.
    fail_kind: Option<io::ErrorKind>,
    /// Operations performed (for tests that sweep the failure point).
    operations: u64,
    /// Whether a failing write first writes part of its bytes (a short write).
    fail_short: bool,
}

/// An in-memory disk with a crash image and fault injection. Clones share the disk.
#[derive(Debug, Clone, Default)]
pub struct SimStorage {
    state: Rc<RefCell<SimState>>,
    alignment: u32,
}

/// A file of [`SimStorage`].
#[derive(Debug, Clone)]
pub struct SimFileHandle {
    file: Rc<RefCell<SimFile>>,
    disk: SimStorage,
}

impl SimStorage {
    /// An empty disk whose files want writes aligned to `alignment` bytes.
    pub fn new(alignment: u32) -> SimStorage {
        SimStorage { state: Rc::default(), alignment: alignment.max(1) }
    }

    /// Arms a failure: the `after`-th next operation (0 = the next one) fails with
    /// `kind`, and so does every later one until [`SimStorage::clear_failure`].
    pub fn fail_after(&self, after: u32, kind: io::ErrorKind) {
        let mut state = self.state.borrow_mut();
        state.fail_countdown = Some(after);
        state.fail_kind = Some(kind);
    }

    /// Like [`SimStorage::fail_after`], but a write that fails first writes the first
    /// half of its bytes (rounded down to the alignment), as a short write does before
    /// the error (a full disk mid-write).
    pub fn fail_short_after(&self, after: u32, kind: io::ErrorKind) {
        self.fail_after(after, kind);
        self.state.borrow_mut().fail_short = true;
    }

    /// Disarms the injected failure.
    pub fn clear_failure(&self) {
        let mut state = self.state.borrow_mut();
        state.fail_countdown = None;
        state.fail_kind = None;
        state.fail_short = false;
    }

    /// Operations performed so far.
    pub fn operations(&self) -> u64 {
        self.state.borrow().operations
    }

    /// Simulates a power cut: each file keeps its synced contents plus what `cut` says of
    /// its unsynced writes (chosen per file by `choose`); unsynced directory changes are
    /// lost. Returns the disk as it comes back up (a fresh, independent disk).
    pub fn power_cut(&self, mut choose: impl FnMut(&str, usize) -> PowerCut) -> SimStorage {
        let state = self.state.borrow();
        let mut files = BTreeMap::new();
        for (name, file) in &state.durable_dir {
            let file = file.borrow();
            let mut image = file.durable.clone();
            let (whole, torn) = match choose(name, file.unsynced.len()) {
                PowerCut::DropAll => (0, None),
                PowerCut::KeepFirst(n) => (n.min(file.unsynced.len()), None),
                PowerCut::Tear { whole, bytes } => (whole.min(file.unsynced.len()), Some(bytes)),
            };
            for (offset, bytes) in &file.unsynced[..whole] {
                apply_write(&mut image, *offset, bytes);
            }
            if let (Some(keep), Some((offset, bytes))) = (torn, file.unsynced.get(whole)) {
                apply_write(&mut image, *offset, &bytes[..keep.min(bytes.len())]);
            }
            let revived = SimFile { current: image.clone(), durable: image, ..SimFile::default() };
            files.insert(name.clone(), Rc::new(RefCell::new(revived)));
        }
        let durable_dir = files.clone();
        SimStorage {
            state: Rc::new(RefCell::new(SimState { files, durable_dir, ..SimState::default() })),
            alignment: self.alignment,
        }
    }

    /// Runs `f` on the current bytes of a file (tests flip bits with it). The change is
    /// treated as already durable: it models corruption at rest.
    pub fn corrupt(&self, name: &str, f: impl FnOnce(&mut Vec<u8>)) {
        let state = self.state.borrow();
        let file = state.files.get(name).expect("no such simulated file");
        let mut file = file.borrow_mut();
        f(&mut file.current);
        file.durable = file.current.clone();
    }

    /// Total bytes of all files (space-reclaim tests).
    pub fn total_bytes(&self) -> u64 {
        self.state.borrow().files.values().map(|f| f.borrow().current.len() as u64).sum()
    }

    fn operation(&self) -> io::Result<()> {
        let mut state = self.state.borrow_mut();
        state.operations += 1;
        match state.fail_countdown {
            Some(0) => Err(io::Error::new(
                state.fail_kind.unwrap_or(io::ErrorKind::Other),
                "injected failure (simulated disk)",
            )),
            Some(ref mut n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn file(&self, name: &str) -> io::Result<Rc<RefCell<SimFile>>> {
        self.state
            .borrow()
            .files
            .get(name)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no file {name}")))
    }
}

fn apply_write(image: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let end = offset as usize + bytes.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[offset as usize..end].copy_from_slice(bytes);
}

impl Storage for SimStorage {
    type File = SimFileHandle;

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.state.borrow().files.keys().cloned().collect())
    }

    async fn create(&self, name: &str, len_bytes: u64) -> io::Result<SimFileHandle> {
        self.operation()?;
        let mut state = self.state.borrow_mut();
        if state.files.contains_key(name) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, name.to_string()));
        }
        // Preallocation is metadata: a new file's length is durable with the file.
        let zeros = vec![0; len_bytes as usize];
        let file = SimFile { current: zeros.clone(), durable: zeros, ..SimFile::default() };
        let file = Rc::new(RefCell::new(file));
        state.files.insert(name.to_string(), file.clone());
        Ok(SimFileHandle { file, disk: self.clone() })
    }

    async fn open(&self, name: &str) -> io::Result<SimFileHandle> {
        self.operation()?;
        Ok(SimFileHandle { file: self.file(name)?, disk: self.clone() })
    }

    fn map(&self, name: &str) -> io::Result<Mapped> {
        Ok(Rc::new(self.file(name)?.borrow().current.clone()))
    }

    async fn write_file(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.operation()?;
        let mut state = self.state.borrow_mut();
        let file =
            SimFile { current: bytes.to_vec(), durable: bytes.to_vec(), ..SimFile::default() };
        state.files.insert(name.to_string(), Rc::new(RefCell::new(file)));
        Ok(())
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.operation()?;
        let mut state = self.state.borrow_mut();
        let file = state
            .files
            .remove(from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, from.to_string()))?;
        state.files.insert(to.to_string(), file);
        Ok(())
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        self.operation()?;
        let mut state = self.state.borrow_mut();
        state
            .files
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_string()))
    }

    async fn sync_dir(&self) -> io::Result<()> {
        self.operation()?;
        let mut state = self.state.borrow_mut();
        state.durable_dir = state.files.clone();
        Ok(())
    }

    fn write_alignment(&self) -> u32 {
        self.alignment
    }
}

impl StorageFile for SimFileHandle {
    async fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        let alignment = u64::from(self.disk.alignment);
        if let Err(error) = self.disk.operation() {
            if self.disk.state.borrow().fail_short {
                let kept = (bytes.len() as u64 / 2 / alignment * alignment) as usize;
                let mut file = self.file.borrow_mut();
                apply_write(&mut file.current, offset, &bytes[..kept]);
                file.unsynced.push((offset, bytes[..kept].to_vec()));
            }
            return Err(error);
        }
        assert!(
            offset.is_multiple_of(alignment) && (bytes.len() as u64).is_multiple_of(alignment),
            "unaligned write: {} bytes at {offset} (alignment {alignment})",
            bytes.len()
        );
        let mut file = self.file.borrow_mut();
        apply_write(&mut file.current, offset, bytes);
        file.unsynced.push((offset, bytes.to_vec()));
        Ok(())
    }

    async fn sync_data(&self) -> io::Result<()> {
        self.disk.operation()?;
        let mut file = self.file.borrow_mut();
        file.durable = file.current.clone();
        file.unsynced.clear();
        Ok(())
    }

    async fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.disk.operation()?;
        let mut file = self.file.borrow_mut();
        // A length change is metadata: durable at the next sync, like the data.
        file.current.resize(len_bytes as usize, 0);
        file.unsynced.push((len_bytes, Vec::new()));
        Ok(())
    }
}
