//! One store, one connection: a running `tern chat` or `tern group listen` holds its
//! store, and other `tern` commands on the same store hand it their sends.
//!
//! Two processes on one device would be two connections of one device (the server
//! keeps one) and two copies of its ratchet state in memory. So a connecting command
//! takes an exclusive lock on `STORE.lock` (`flock`, released when the process ends,
//! however it ends) for its whole run. A long-running one also listens on the Unix
//! socket `STORE.sock` (mode 0600, in the store's directory): while it runs, `tern
//! send` and `tern group send` on the same store connect there and the running process
//! sends for them, on its connection; every other connecting command is refused with a
//! message saying which process holds the store. Commands that only read the local
//! history (`whoami`, `history`, `search`) need no lock.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tern_client::ClientError;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// A send handed to the process holding the store.
#[derive(Debug, Deserialize, Serialize)]
pub struct Request {
    /// A user (a one-to-one message), or none.
    pub to: Option<u64>,
    /// A group, or none.
    pub group: Option<u64>,
    /// The text.
    pub text: String,
}

/// What the holding process answers: the lines to print, or why it failed.
#[derive(Debug, Deserialize, Serialize)]
pub struct Reply {
    /// Printed by the asking command.
    pub lines: Vec<String>,
    /// Set when the send failed.
    pub error: Option<String>,
}

fn beside(store: &Path, suffix: &str) -> PathBuf {
    let mut path = store.as_os_str().to_owned();
    path.push(suffix);
    PathBuf::from(path)
}

/// The store's lock, held for this process's life.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// Takes the store's lock, or says who holds it (`Err(Some(pid))`; `Err(None)` when
/// the holder wrote no pid).
pub fn lock(store: &Path) -> Result<Result<StoreLock, Option<u32>>, ClientError> {
    let path = beside(store, ".lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0)?;
            file.rewind()?;
            write!(file, "{}", std::process::id())?;
            Ok(Ok(StoreLock { _file: file }))
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            Ok(Err(pid.trim().parse().ok()))
        }
        Err(std::fs::TryLockError::Error(error)) => Err(error.into()),
    }
}

/// The refusal for a command that needs the store while another process holds it.
pub fn in_use(store: &Path, holder: Option<u32>) -> ClientError {
    let who = holder.map_or("another tern".to_string(), |pid| format!("tern (pid {pid})"));
    ClientError::Config(format!(
        "{} is in use by {who}, running `chat` or `group listen`; `send` and `group send` \
         are handed to it, anything else waits until it ends",
        store.display()
    ))
}

/// The listening side, kept by a long-running command.
#[derive(Debug)]
pub struct Listener {
    socket: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Listens beside the store (a stale socket file from a crashed run is replaced:
    /// the lock says no one else is there).
    pub fn bind(store: &Path) -> Result<Listener, ClientError> {
        let path = beside(store, ".sock");
        let _ = std::fs::remove_file(&path);
        let socket = UnixListener::bind(&path)
            .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Listener { socket, path })
    }

    /// The next hand-off (cancel-safe).
    pub async fn accept(&self) -> std::io::Result<UnixStream> {
        self.socket.accept().await.map(|(stream, _)| stream)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads one request from a hand-off connection (one JSON line).
pub async fn read_request(stream: &mut UnixStream) -> Result<Request, ClientError> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream);
    let read = reader.read_line(&mut line);
    tokio::time::timeout(std::time::Duration::from_secs(5), read)
        .await
        .map_err(|_| ClientError::Config("a hand-off sent no request".into()))??;
    serde_json::from_str(&line).map_err(|e| ClientError::Config(format!("a hand-off: {e}")))
}

/// Answers a hand-off connection.
pub async fn write_reply(stream: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    stream.write_all(&bytes).await
}

/// Hands a send to the process holding `store`; `None` when no process listens.
pub async fn hand_over(store: &Path, request: &Request) -> Result<Option<Reply>, ClientError> {
    let Ok(mut stream) = UnixStream::connect(beside(store, ".sock")).await else {
        return Ok(None);
    };
    let mut bytes = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    stream.write_all(&bytes).await?;
    let mut line = String::new();
    let mut reader = BufReader::new(&mut stream);
    let read = reader.read_line(&mut line);
    tokio::time::timeout(std::time::Duration::from_secs(30), read)
        .await
        .map_err(|_| ClientError::Config("the running tern did not answer".into()))??;
    let reply = serde_json::from_str(&line)
        .map_err(|e| ClientError::Config(format!("the running tern answered oddly: {e}")))?;
    Ok(Some(reply))
}
