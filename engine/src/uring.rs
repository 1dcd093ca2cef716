//! [`UringStorage`]: the server's storage, glommio DMA files through io_uring.
//!
//! Segment writes are O_DIRECT: the engine pads every batch to [`URING_ALIGNMENT`] and
//! starts the next batch on a fresh block, so a write never rewrites a block that holds
//! synced data (see `docs/STORAGE.md`, "Assumptions about the media"). Reads of sealed
//! segments go through `memmap2`, like the tools. Must run inside a glommio executor.

use std::io;
use std::path::{Path, PathBuf};

use glommio::io::{BufferedFile, Directory, DmaFile, OpenOptions};

use crate::storage::{list_dir, map_file, Mapped, Storage, StorageFile};

/// Write alignment for O_DIRECT segment writes: 4096 bytes suits every block device
/// (512-byte devices accept it too).
pub const URING_ALIGNMENT: u32 = 4096;

fn io_error(error: glommio::GlommioError<()>) -> io::Error {
    error.into()
}

/// A shard directory accessed through glommio.
#[derive(Debug, Clone)]
pub struct UringStorage {
    dir: PathBuf,
}

impl UringStorage {
    /// A storage over `dir`, created if missing.
    pub fn new(dir: impl Into<PathBuf>) -> io::Result<UringStorage> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        // glommio opens paths relative to no directory fd: a relative path fails with
        // EBADF, so keep the absolute one.
        let dir = std::fs::canonicalize(&dir)?;
        Ok(UringStorage { dir })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

/// A segment file opened for DMA writes.
#[derive(Debug)]
pub struct UringFile {
    file: DmaFile,
}

impl Storage for UringStorage {
    type File = UringFile;

    fn list(&self) -> io::Result<Vec<String>> {
        list_dir(&self.dir)
    }

    async fn create(&self, name: &str, len_bytes: u64) -> io::Result<UringFile> {
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .dma_open(self.dir.join(name))
            .await
            .map_err(io_error)?;
        // Allocate the extent now (zeros), so later fdatasyncs do not change the size
        // and a full disk shows here, at rotation, not in the middle of a batch.
        file.pre_allocate(len_bytes, false).await.map_err(io_error)?;
        Ok(UringFile { file })
    }

    async fn open(&self, name: &str) -> io::Result<UringFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(self.dir.join(name))
            .await
            .map_err(io_error)?;
        Ok(UringFile { file })
    }

    fn map(&self, name: &str) -> io::Result<Mapped> {
        map_file(&self.dir.join(name))
    }

    async fn write_file(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let file = BufferedFile::create(self.dir.join(name)).await.map_err(io_error)?;
        let written = file.write_at(bytes.to_vec(), 0).await.map_err(io_error)?;
        if written != bytes.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short checkpoint write"));
        }
        file.fdatasync().await.map_err(io_error)?;
        file.close().await.map_err(io_error)
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        glommio::io::rename(self.dir.join(from), self.dir.join(to)).await.map_err(io_error)
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        glommio::io::remove(self.dir.join(name)).await.map_err(io_error)
    }

    async fn sync_dir(&self) -> io::Result<()> {
        let dir = Directory::open(&self.dir).await.map_err(io_error)?;
        dir.sync().await.map_err(io_error)?;
        dir.close().await.map_err(io_error)
    }

    fn write_alignment(&self) -> u32 {
        URING_ALIGNMENT
    }
}

impl StorageFile for UringFile {
    async fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        debug_assert_eq!(offset % u64::from(URING_ALIGNMENT), 0, "unaligned DMA offset");
        debug_assert_eq!(bytes.len() % URING_ALIGNMENT as usize, 0, "unaligned DMA length");
        let mut buffer = self.file.alloc_dma_buffer(bytes.len());
        buffer.as_bytes_mut().copy_from_slice(bytes);
        let written = self.file.write_at(buffer, offset).await.map_err(io_error)?;
        if written != bytes.len() {
            // A short write leaves the batch incomplete: report it; the engine poisons
            // the shard rather than retrying on a device in an unknown state.
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short DMA write"));
        }
        Ok(())
    }

    async fn sync_data(&self) -> io::Result<()> {
        self.file.fdatasync().await.map_err(io_error)
    }

    async fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.file.truncate(len_bytes).await.map_err(io_error)
    }
}
