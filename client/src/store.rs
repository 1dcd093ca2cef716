//! The device's local store: one SQLCipher file (rusqlite, bundled SQLCipher with FTS5).
//!
//! It holds who this device is (server, user, device, token), its E2E state (the Olm
//! account and every pairwise session), the identities pinned for peer devices, and the
//! message history with its delivery state and a full-text index. The whole file is
//! encrypted (every page, the full-text index and the WAL: SQLCipher, AES-256 with a
//! per-page HMAC) with the store key: 32 bytes given by the app, or derived from a
//! passphrase with Argon2id; the salt is the file's first 16 bytes (SQLCipher's own
//! salt, given with the raw key), so the key never goes through SQLCipher's PBKDF2.
//! Secrets — the token and every vodozemac pickle — are sealed again inside with the
//! same key, as before SQLCipher. A store written by an older `tern` in plain SQLite is
//! encrypted in place the first time it is opened (`sqlcipher_export`).
//!
//! Every change that must survive together (a decrypted message and the ratchet state
//! that decrypted it) is one transaction.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rusqlite::{params, Connection, OptionalExtension};

use crate::StoreError;

/// What unlocks a store.
#[derive(Clone)]
pub enum StoreSecret {
    /// A passphrase, stretched with Argon2id.
    Passphrase(String),
    /// A key the app keeps (e.g. in the platform keystore).
    Key([u8; 32]),
}

impl std::fmt::Debug for StoreSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreSecret(..)")
    }
}

/// A message in the history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// The server's id (0 until the sent tick).
    pub server_id: u64,
    /// The sender's id for it.
    pub client_id: u64,
    /// The other party of the conversation.
    pub peer: u64,
    /// Who wrote it (user, device).
    pub sender: (u64, u32),
    /// Whether this device's user sent it.
    pub outgoing: bool,
    /// The text.
    pub text: String,
    /// Server time (ms since the epoch).
    pub time_ms: u64,
    /// Delivery state of an outgoing message.
    pub status: Status,
}

/// The ticks of an outgoing message (incoming ones are `Received`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// Not yet acknowledged by the server.
    Sending = 0,
    /// Durable on the server (one tick).
    Sent = 1,
    /// A recipient device has it (two ticks).
    Delivered = 2,
    /// The recipient read it.
    Read = 3,
    /// An incoming message.
    Received = 4,
    /// Refused by the server for good: never sent, never re-sent (`Store::failure`
    /// says why).
    Failed = 5,
}

impl Status {
    pub(crate) fn from_i64(value: i64) -> Status {
        match value {
            1 => Status::Sent,
            2 => Status::Delivered,
            3 => Status::Read,
            4 => Status::Received,
            5 => Status::Failed,
            _ => Status::Sending,
        }
    }

    /// The ticks as a user sees them.
    pub fn ticks(self) -> &'static str {
        match self {
            Status::Sending => "…",
            Status::Sent => "✓",
            Status::Delivered => "✓✓",
            Status::Read => "✓✓ read",
            Status::Received => "",
            Status::Failed => "✗ not sent",
        }
    }
}

/// A device: (user id, device id).
pub type DeviceRef = (u64, u32);

/// Who received and who read a message: (delivered, read), as devices.
pub type ReceiptSets = (Vec<DeviceRef>, Vec<DeviceRef>);

/// A group as this device verified it from signed changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupView {
    /// The group.
    pub group_id: u64,
    /// The epoch of the last change applied.
    pub epoch: u64,
    /// Its name.
    pub name: String,
    /// Members (in join order) and whether each is an admin.
    pub members: Vec<(u64, bool)>,
    /// A member left or was removed since this device's sending session was made.
    pub needs_rotation: bool,
}

/// Who this device is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The server, as `host:port`.
    pub server: String,
    /// The account.
    pub user_id: u64,
    /// This device.
    pub device_id: u32,
    /// The auth token.
    pub token: [u8; 32],
}

/// The open store.
pub struct Store {
    db: Connection,
    key: [u8; 32],
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    user_id INTEGER NOT NULL, device_id INTEGER NOT NULL, session_id TEXT NOT NULL,
    pickle TEXT NOT NULL, last_used INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id, session_id));
CREATE TABLE IF NOT EXISTS identities (
    user_id INTEGER NOT NULL, device_id INTEGER NOT NULL,
    curve25519 BLOB NOT NULL, ed25519 BLOB,
    PRIMARY KEY (user_id, device_id));
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY, server_id INTEGER NOT NULL, client_id INTEGER NOT NULL,
    peer INTEGER NOT NULL, sender_user INTEGER NOT NULL, sender_device INTEGER NOT NULL,
    outgoing INTEGER NOT NULL, body TEXT NOT NULL, time_ms INTEGER NOT NULL,
    status INTEGER NOT NULL, group_id INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS groups (
    group_id INTEGER PRIMARY KEY, epoch INTEGER NOT NULL, name TEXT NOT NULL,
    needs_rotation INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS group_members (
    group_id INTEGER NOT NULL, user_id INTEGER NOT NULL, admin INTEGER NOT NULL,
    PRIMARY KEY (group_id, user_id));
CREATE TABLE IF NOT EXISTS group_senders (
    group_id INTEGER PRIMARY KEY, pickle TEXT NOT NULL, created_ms INTEGER NOT NULL,
    sent INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS group_shares (
    group_id INTEGER NOT NULL, session_id TEXT NOT NULL, user_id INTEGER NOT NULL,
    device_id INTEGER NOT NULL, PRIMARY KEY (group_id, session_id, user_id, device_id));
CREATE TABLE IF NOT EXISTS group_receivers (
    group_id INTEGER NOT NULL, session_id TEXT NOT NULL, sender_user INTEGER NOT NULL,
    sender_device INTEGER NOT NULL, pickle TEXT NOT NULL, PRIMARY KEY (group_id, session_id));
CREATE TABLE IF NOT EXISTS megolm_seen (
    session_id TEXT NOT NULL, message_index INTEGER NOT NULL,
    PRIMARY KEY (session_id, message_index));
CREATE TABLE IF NOT EXISTS media (
    sender_user INTEGER NOT NULL, client_id INTEGER NOT NULL, descriptor BLOB NOT NULL,
    PRIMARY KEY (sender_user, client_id));
CREATE TABLE IF NOT EXISTS receipts (
    server_id INTEGER NOT NULL, by_user INTEGER NOT NULL, by_device INTEGER NOT NULL,
    read INTEGER NOT NULL, PRIMARY KEY (server_id, by_user, by_device, read));
CREATE TABLE IF NOT EXISTS failures (
    client_id INTEGER PRIMARY KEY, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS people (
    user_id INTEGER PRIMARY KEY, name TEXT, phone TEXT);
CREATE TABLE IF NOT EXISTS device_lists (
    user_id INTEGER PRIMARY KEY, issued_ms INTEGER NOT NULL, devices TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS unvouched (
    user_id INTEGER NOT NULL, device_id INTEGER NOT NULL, PRIMARY KEY (user_id, device_id));
CREATE TABLE IF NOT EXISTS retired (
    user_id INTEGER NOT NULL, device_id INTEGER NOT NULL, PRIMARY KEY (user_id, device_id));
CREATE INDEX IF NOT EXISTS messages_by_peer ON messages (peer, id);
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_sender
    ON messages (sender_user, sender_device, client_id);
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts
    USING fts5(body, content='messages', content_rowid='id');
CREATE TRIGGER IF NOT EXISTS messages_ai AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, body) VALUES (new.id, new.body);
END;
CREATE TRIGGER IF NOT EXISTS messages_ad AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, body) VALUES ('delete', old.id, old.body);
END;
";

/// Encrypted with the key at creation; decrypting it checks the key.
const KEY_CHECK: &[u8] = b"tern store key check v1";

/// How a plain (unencrypted) SQLite file starts: a store from before SQLCipher.
const PLAIN_SQLITE_HEADER: [u8; 16] = *b"SQLite format 3\0";

/// The first 16 bytes of the file (SQLCipher's salt), if it has them.
fn file_header(path: &Path) -> Result<Option<[u8; 16]>, StoreError> {
    use std::io::Read;
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let mut header = [0u8; 16];
    match file.read_exact(&mut header) {
        Ok(()) => Ok(Some(header)),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(error) => Err(error.into()),
    }
}

fn random_salt() -> Result<[u8; 16], StoreError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| StoreError::Random(e.to_string()))?;
    Ok(salt)
}

/// The store key: the app's, or Argon2id of the passphrase with `salt`.
fn store_key(secret: &StoreSecret, salt: &[u8]) -> Result<[u8; 32], StoreError> {
    match secret {
        StoreSecret::Key(key) => Ok(*key),
        StoreSecret::Passphrase(passphrase) => {
            let mut key = [0u8; 32];
            argon2::Argon2::default()
                .hash_password_into(passphrase.as_bytes(), salt, &mut key)
                .map_err(|e| StoreError::Kdf(e.to_string()))?;
            Ok(key)
        }
    }
}

/// SQLCipher's raw-key form: the key and the salt in hex, no key derivation.
fn sqlcipher_key(key: &[u8; 32], salt: &[u8; 16]) -> String {
    let hex: String = key.iter().chain(salt).map(|b| format!("{b:02x}")).collect();
    format!("x'{hex}'")
}

/// Encrypts a store written in plain SQLite (by a `tern` before SQLCipher) in place:
/// the passphrase is checked first, the copy keeps the old Argon2id salt as its own
/// (so the same key opens it), and it replaces the plain file only once complete.
fn encrypt_plain_store(path: &Path, secret: &StoreSecret) -> Result<(), StoreError> {
    let db = Connection::open(path)?;
    let salt_row: Option<Vec<u8>> = db
        .query_row("SELECT value FROM meta WHERE key = 'kdf_salt'", [], |row| row.get(0))
        .optional()?;
    let salt: [u8; 16] = match salt_row {
        Some(salt) => salt.try_into().map_err(|_| StoreError::Corrupt("kdf salt".into()))?,
        None => random_salt()?,
    };
    let key = store_key(secret, &salt)?;
    let old = Store::finish_open(db, key)?; // Checks the passphrase.
    let copy = path.with_extension("encrypting");
    let _ = std::fs::remove_file(&copy);
    old.db.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
    old.db.execute(
        "ATTACH DATABASE ?1 AS encrypted KEY ?2",
        params![copy.to_string_lossy(), sqlcipher_key(&key, &salt)],
    )?;
    old.db.query_row("SELECT sqlcipher_export('encrypted')", [], |_| Ok(()))?;
    old.db.execute_batch("DETACH DATABASE encrypted;")?;
    drop(old);
    std::fs::rename(&copy, path)?;
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let _ = std::fs::remove_file(side);
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path, secret: &StoreSecret) -> Result<Store, StoreError> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)?;
            }
        }
        let header = file_header(path)?;
        if header == Some(PLAIN_SQLITE_HEADER) {
            encrypt_plain_store(path, secret)?;
        }
        let salt = match file_header(path)? {
            Some(salt) => salt,
            None => random_salt()?,
        };
        let key = store_key(secret, &salt)?;
        let db = Connection::open(path)?;
        db.pragma_update(None, "key", sqlcipher_key(&key, &salt))?;
        // The first read of an encrypted page checks the key (its HMAC).
        if let Err(error) = db.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(())) {
            return Err(match error.sqlite_error_code() {
                Some(rusqlite::ErrorCode::NotADatabase) => StoreError::WrongKey,
                _ => error.into(),
            });
        }
        Store::finish_open(db, key)
    }

    /// Sets the store up once its key is in: journal, schema, key check.
    fn finish_open(db: Connection, key: [u8; 32]) -> Result<Store, StoreError> {
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(SCHEMA)?;
        let store = Store { db, key };
        match store.meta("key_check")? {
            Some(sealed) => {
                if store.open_sealed(&sealed).as_deref() != Some(KEY_CHECK) {
                    return Err(StoreError::WrongKey);
                }
            }
            None => {
                let sealed = store.seal(KEY_CHECK)?;
                store.set_meta("key_check", &sealed)?;
            }
        }
        Ok(store)
    }

    /// The key vodozemac pickles are encrypted with.
    pub(crate) fn pickle_key(&self) -> &[u8; 32] {
        &self.key
    }

    fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut nonce).map_err(|e| StoreError::Random(e.to_string()))?;
        let cipher = XChaCha20Poly1305::new((&self.key).into());
        let mut out = nonce.to_vec();
        let sealed = cipher
            .encrypt(XNonce::from_slice(&nonce), plaintext)
            .map_err(|_| StoreError::Corrupt("sealing failed".into()))?;
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn open_sealed(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < 24 {
            return None;
        }
        let cipher = XChaCha20Poly1305::new((&self.key).into());
        cipher.decrypt(XNonce::from_slice(&sealed[..24]), &sealed[24..]).ok()
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let value = self
            .db
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| row.get(0))
            .optional()?;
        Ok(value)
    }

    fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// Who this device is, once registered.
    pub fn identity(&self) -> Result<Option<Identity>, StoreError> {
        let Some(sealed) = self.meta("identity")? else { return Ok(None) };
        let plain = self.open_sealed(&sealed).ok_or(StoreError::WrongKey)?;
        if plain.len() < 44 {
            return Err(StoreError::Corrupt("identity record too short".into()));
        }
        let user_id = u64::from_le_bytes(plain[0..8].try_into().expect("8"));
        let device_id = u32::from_le_bytes(plain[8..12].try_into().expect("4"));
        let token: [u8; 32] = plain[12..44].try_into().expect("32");
        let server = String::from_utf8(plain[44..].to_vec())
            .map_err(|_| StoreError::Corrupt("server address is not UTF-8".into()))?;
        Ok(Some(Identity { server, user_id, device_id, token }))
    }

    /// How this device reaches its server, as chosen at registration (an encoded
    /// `connection::Endpoint`: transport, trust root, whether plaintext was allowed);
    /// `None` for a store from before it was kept.
    pub fn endpoint(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.meta("endpoint")
    }

    /// Records how this device reaches its server (a store that had none learns the
    /// endpoint it is first opened with).
    pub fn save_endpoint(&self, endpoint: &[u8]) -> Result<(), StoreError> {
        self.set_meta("endpoint", endpoint)
    }

    /// Records who this device is, with its E2E account and the endpoint it registered
    /// through (encoded), in one transaction.
    pub fn save_identity(
        &mut self,
        identity: &Identity,
        account: &str,
        endpoint: &[u8],
    ) -> Result<(), StoreError> {
        let mut plain = Vec::with_capacity(44 + identity.server.len());
        plain.extend_from_slice(&identity.user_id.to_le_bytes());
        plain.extend_from_slice(&identity.device_id.to_le_bytes());
        plain.extend_from_slice(&identity.token);
        plain.extend_from_slice(identity.server.as_bytes());
        let sealed = self.seal(&plain)?;
        let tx = self.db.transaction()?;
        let rows = [
            ("identity", sealed.as_slice()),
            ("account", account.as_bytes()),
            ("endpoint", endpoint),
        ];
        for (key, value) in rows {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The pickled E2E account.
    pub fn account(&self) -> Result<Option<String>, StoreError> {
        let Some(value) = self.meta("account")? else { return Ok(None) };
        String::from_utf8(value).map(Some).map_err(|_| StoreError::Corrupt("account".into()))
    }

    /// This device's E2E account, decrypted with the store key.
    pub fn device_crypto(&self) -> Result<Option<crate::crypto::DeviceCrypto>, crate::ClientError> {
        let Some(account) = self.account()? else { return Ok(None) };
        Ok(Some(crate::crypto::DeviceCrypto::from_pickle(&account, &self.key)?))
    }

    /// Saves the pickled E2E account (after every change to it).
    pub fn save_account(&self, account: &str) -> Result<(), StoreError> {
        self.set_meta("account", account.as_bytes())
    }

    /// The pickled sessions with a device, most recently used first.
    pub fn sessions(
        &self,
        user_id: u64,
        device_id: u32,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut statement = self.db.prepare(
            "SELECT session_id, pickle FROM sessions WHERE user_id = ?1 AND device_id = ?2
             ORDER BY last_used DESC",
        )?;
        let rows = statement
            .query_map(params![user_id as i64, device_id], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stores a session's new state (and, if given, the account's and an incoming
    /// message) in one transaction: the ratchet never moves without what it decrypted.
    pub fn save_session(
        &mut self,
        peer: (u64, u32),
        session_id: &str,
        pickle: &str,
        account: Option<&str>,
        message: Option<&StoredMessage>,
    ) -> Result<(), StoreError> {
        let tx = self.db.transaction()?;
        let used: i64 =
            tx.query_row("SELECT COALESCE(MAX(last_used), 0) + 1 FROM sessions", [], |row| {
                row.get(0)
            })?;
        tx.execute(
            "INSERT INTO sessions (user_id, device_id, session_id, pickle, last_used)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(user_id, device_id, session_id)
             DO UPDATE SET pickle = excluded.pickle, last_used = excluded.last_used",
            params![peer.0 as i64, peer.1, session_id, pickle, used],
        )?;
        if let Some(account) = account {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('account', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [account.as_bytes()],
            )?;
        }
        if let Some(message) = message {
            insert_message(&tx, message, 0)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Forgets a device (it left its account): its sessions and its pinned identity.
    pub fn forget_device(&self, user_id: u64, device_id: u32) -> Result<(), StoreError> {
        let key = params![user_id as i64, device_id];
        self.db.execute("DELETE FROM sessions WHERE user_id = ?1 AND device_id = ?2", key)?;
        self.db.execute("DELETE FROM identities WHERE user_id = ?1 AND device_id = ?2", key)?;
        Ok(())
    }

    /// Forgets the sessions with a device (its identity changed), keeping its pin.
    pub fn forget_sessions(&self, user_id: u64, device_id: u32) -> Result<(), StoreError> {
        let key = params![user_id as i64, device_id];
        self.db.execute("DELETE FROM sessions WHERE user_id = ?1 AND device_id = ?2", key)?;
        Ok(())
    }

    /// A device the server says is gone: no more copies and no sessions, but its pinned
    /// identity stays, so that if it comes back with other keys the change is reported
    /// (the server's word never erases what this device pinned).
    pub fn retire_device(&self, user_id: u64, device_id: u32) -> Result<(), StoreError> {
        self.forget_sessions(user_id, device_id)?;
        self.db.execute(
            "INSERT OR IGNORE INTO retired (user_id, device_id) VALUES (?1, ?2)",
            params![user_id as i64, device_id],
        )?;
        Ok(())
    }

    /// Records whether a device the server lists lacks the primary's signature (it gets
    /// an empty copy, never a ciphertext). Returns whether that changed.
    pub fn set_unvouched(
        &self,
        user_id: u64,
        device_id: u32,
        unvouched: bool,
    ) -> Result<bool, StoreError> {
        let key = params![user_id as i64, device_id];
        let changed = match unvouched {
            true => self.db.execute(
                "INSERT OR IGNORE INTO unvouched (user_id, device_id) VALUES (?1, ?2)",
                key,
            )?,
            false => self
                .db
                .execute("DELETE FROM unvouched WHERE user_id = ?1 AND device_id = ?2", key)?,
        };
        Ok(changed > 0)
    }

    /// The devices of a user the server lists but their primary did not sign.
    pub fn unvouched_devices(&self, user_id: u64) -> Result<Vec<u32>, StoreError> {
        let mut statement = self
            .db
            .prepare("SELECT device_id FROM unvouched WHERE user_id = ?1 ORDER BY device_id")?;
        let ids = statement.query_map([user_id as i64], |row| row.get(0))?;
        Ok(ids.collect::<Result<_, _>>()?)
    }

    /// The newest device list verified for a user: when it was signed, and the device
    /// ids it named.
    pub fn device_list(&self, user_id: u64) -> Result<Option<(u64, Vec<u32>)>, StoreError> {
        let row: Option<(i64, String)> = self
            .db
            .query_row(
                "SELECT issued_ms, devices FROM device_lists WHERE user_id = ?1",
                [user_id as i64],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let Some((issued_ms, devices)) = row else { return Ok(None) };
        let ids = devices.split(',').filter(|d| !d.is_empty()).map(str::parse::<u32>);
        let ids = ids.collect::<Result<_, _>>();
        let ids = ids.map_err(|_| StoreError::Corrupt("a device list's ids".into()))?;
        Ok(Some((issued_ms as u64, ids)))
    }

    /// Records the newest device list verified for a user (when signed, which devices).
    pub fn save_device_list(
        &self,
        user_id: u64,
        issued_ms: u64,
        devices: &[u32],
    ) -> Result<(), StoreError> {
        let ids: Vec<String> = devices.iter().map(u32::to_string).collect();
        self.db.execute(
            "INSERT INTO device_lists (user_id, issued_ms, devices) VALUES (?1, ?2, ?3)
             ON CONFLICT(user_id) DO UPDATE SET issued_ms = excluded.issued_ms,
             devices = excluded.devices",
            params![user_id as i64, issued_ms as i64, ids.join(",")],
        )?;
        Ok(())
    }

    /// The identity pinned for a device, if any.
    pub fn pinned(
        &self,
        user_id: u64,
        device_id: u32,
    ) -> Result<Option<crate::PeerIdentity>, StoreError> {
        let row: Option<(Vec<u8>, Option<Vec<u8>>)> = self
            .db
            .query_row(
                "SELECT curve25519, ed25519 FROM identities WHERE user_id = ?1 AND device_id = ?2",
                params![user_id as i64, device_id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let Some((curve, ed)) = row else { return Ok(None) };
        let curve25519 =
            curve.try_into().map_err(|_| StoreError::Corrupt("identity key".into()))?;
        let ed25519 = match ed {
            Some(ed) => Some(ed.try_into().map_err(|_| StoreError::Corrupt("signing key".into()))?),
            None => None,
        };
        Ok(Some(crate::PeerIdentity { curve25519, ed25519 }))
    }

    /// Pins (or re-pins, after the app was told of the change) a device's identity.
    pub fn pin(
        &self,
        user_id: u64,
        device_id: u32,
        identity: &crate::PeerIdentity,
    ) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO identities (user_id, device_id, curve25519, ed25519)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(user_id, device_id)
             DO UPDATE SET curve25519 = excluded.curve25519,
                           ed25519 = COALESCE(excluded.ed25519, identities.ed25519)",
            params![
                user_id as i64,
                device_id,
                identity.curve25519.as_slice(),
                identity.ed25519.as_ref().map(|k| k.as_slice())
            ],
        )?;
        // Seen again: no longer retired.
        self.db.execute(
            "DELETE FROM retired WHERE user_id = ?1 AND device_id = ?2",
            params![user_id as i64, device_id],
        )?;
        Ok(())
    }

    /// Replaces a device's pinned identity with exactly these keys (after the app was
    /// told of the change): unlike [`Store::pin`], an unknown signing key is not taken
    /// from the old pin.
    pub fn replace_pin(
        &self,
        user_id: u64,
        device_id: u32,
        identity: &crate::PeerIdentity,
    ) -> Result<(), StoreError> {
        let key = params![user_id as i64, device_id];
        self.db.execute("DELETE FROM identities WHERE user_id = ?1 AND device_id = ?2", key)?;
        self.pin(user_id, device_id, identity)
    }

    /// The devices of a user this device knows (pinned, and not retired), by id.
    pub fn known_devices(
        &self,
        user_id: u64,
    ) -> Result<Vec<(u32, crate::PeerIdentity)>, StoreError> {
        let mut statement = self.db.prepare(
            "SELECT device_id FROM identities WHERE user_id = ?1 AND device_id NOT IN
             (SELECT device_id FROM retired WHERE user_id = ?1) ORDER BY device_id",
        )?;
        let ids: Vec<u32> =
            statement.query_map([user_id as i64], |row| row.get(0))?.collect::<Result<_, _>>()?;
        let mut devices = Vec::with_capacity(ids.len());
        for device_id in ids {
            if let Some(identity) = self.pinned(user_id, device_id)? {
                devices.push((device_id, identity));
            }
        }
        Ok(devices)
    }

    /// Adds a message to the history (an outgoing one before it is sent).
    pub fn add_message(&self, message: &StoredMessage) -> Result<(), StoreError> {
        insert_message(&self.db, message, 0)
    }

    /// Removes a message (deleted for everyone by its sender) from the history.
    pub fn delete_message(&self, sender_user: u64, server_id: u64) -> Result<(), StoreError> {
        self.db.execute(
            "DELETE FROM messages WHERE sender_user = ?1 AND server_id = ?2",
            params![sender_user as i64, server_id as i64],
        )?;
        Ok(())
    }

    /// A group as this device verified it: (epoch, name, members with admin flags).
    pub fn group(&self, group_id: u64) -> Result<Option<GroupView>, StoreError> {
        let row: Option<(i64, String, i64)> = self
            .db
            .query_row(
                "SELECT epoch, name, needs_rotation FROM groups WHERE group_id = ?1",
                [group_id as i64],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .optional()?;
        let Some((epoch, name, needs_rotation)) = row else { return Ok(None) };
        let mut statement = self.db.prepare(
            "SELECT user_id, admin FROM group_members WHERE group_id = ?1 ORDER BY rowid",
        )?;
        let members = statement
            .query_map([group_id as i64], |row| {
                Ok((row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? != 0))
            })?
            .collect::<Result<_, _>>()?;
        Ok(Some(GroupView {
            group_id,
            epoch: epoch as u64,
            name,
            members,
            needs_rotation: needs_rotation != 0,
        }))
    }

    /// Replaces this device's view of a group.
    pub fn save_group(&mut self, group: &GroupView) -> Result<(), StoreError> {
        let tx = self.db.transaction()?;
        tx.execute(
            "INSERT INTO groups (group_id, epoch, name, needs_rotation) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(group_id) DO UPDATE SET epoch = excluded.epoch, name = excluded.name,
             needs_rotation = excluded.needs_rotation",
            params![group.group_id as i64, group.epoch as i64, group.name, group.needs_rotation],
        )?;
        tx.execute("DELETE FROM group_members WHERE group_id = ?1", [group.group_id as i64])?;
        for (user_id, admin) in &group.members {
            tx.execute(
                "INSERT INTO group_members (group_id, user_id, admin) VALUES (?1, ?2, ?3)",
                params![group.group_id as i64, *user_id as i64, *admin],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// This device's sending session for a group: (pickle, created, messages sent).
    pub fn group_sender(&self, group_id: u64) -> Result<Option<(String, u64, u64)>, StoreError> {
        Ok(self
            .db
            .query_row(
                "SELECT pickle, created_ms, sent FROM group_senders WHERE group_id = ?1",
                [group_id as i64],
                |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64, row.get::<_, i64>(2)? as u64)),
            )
            .optional()?)
    }

    /// Saves this device's sending session for a group.
    pub fn save_group_sender(
        &self,
        group_id: u64,
        pickle: &str,
        created_ms: u64,
        sent: u64,
    ) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO group_senders (group_id, pickle, created_ms, sent) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(group_id) DO UPDATE SET pickle = excluded.pickle,
             created_ms = excluded.created_ms, sent = excluded.sent",
            params![group_id as i64, pickle, created_ms as i64, sent as i64],
        )?;
        Ok(())
    }

    /// Whether a session's key went to a device.
    pub fn shared(
        &self,
        group_id: u64,
        session: &str,
        device: (u64, u32),
    ) -> Result<bool, StoreError> {
        let found: Option<i64> = self
            .db
            .query_row(
                "SELECT 1 FROM group_shares WHERE group_id = ?1 AND session_id = ?2
                 AND user_id = ?3 AND device_id = ?4",
                params![group_id as i64, session, device.0 as i64, device.1],
                |row| row.get(0),
            )
            .optional()?;
        Ok(found.is_some())
    }

    /// Records that a session's key went to a device.
    pub fn mark_shared(
        &self,
        group_id: u64,
        session: &str,
        device: (u64, u32),
    ) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT OR IGNORE INTO group_shares (group_id, session_id, user_id, device_id)
             VALUES (?1, ?2, ?3, ?4)",
            params![group_id as i64, session, device.0 as i64, device.1],
        )?;
        Ok(())
    }

    /// A receiving session (pickled) and whose it is.
    pub fn group_receiver(
        &self,
        group_id: u64,
        session: &str,
    ) -> Result<Option<(String, DeviceRef)>, StoreError> {
        Ok(self
            .db
            .query_row(
                "SELECT pickle, sender_user, sender_device FROM group_receivers
                 WHERE group_id = ?1 AND session_id = ?2",
                params![group_id as i64, session],
                |row| Ok((row.get(0)?, (row.get::<_, i64>(1)? as u64, row.get(2)?))),
            )
            .optional()?)
    }

    /// Saves a receiving session (first one wins: a second key for the same session id is
    /// ignored).
    pub fn save_group_receiver(
        &self,
        group_id: u64,
        session: &str,
        sender: (u64, u32),
        pickle: &str,
    ) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT OR IGNORE INTO group_receivers
             (group_id, session_id, sender_user, sender_device, pickle)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![group_id as i64, session, sender.0 as i64, sender.1, pickle],
        )?;
        Ok(())
    }

    /// Records a Megolm message index as seen; false if it was seen before (a replay).
    pub fn first_sight(&self, session: &str, index: u32) -> Result<bool, StoreError> {
        let inserted = self.db.execute(
            "INSERT OR IGNORE INTO megolm_seen (session_id, message_index) VALUES (?1, ?2)",
            params![session, index],
        )?;
        Ok(inserted == 1)
    }

    /// Keeps a file's descriptor (key, hash, id) for the message that carried it. The
    /// key is a secret: sealed like the others.
    pub fn save_media(
        &self,
        sender: (u64, u32),
        client_id: u64,
        descriptor: &[u8],
    ) -> Result<(), StoreError> {
        let sealed = self.seal(descriptor)?;
        self.db.execute(
            "INSERT OR REPLACE INTO media (sender_user, client_id, descriptor) VALUES (?1, ?2, ?3)",
            params![sender.0 as i64, client_id as i64, sealed],
        )?;
        Ok(())
    }

    /// The descriptor of the file carried by the message with this server id.
    pub fn media_of(&self, server_id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let sealed: Option<Vec<u8>> = self
            .db
            .query_row(
                "SELECT media.descriptor FROM media JOIN messages
                 ON media.sender_user = messages.sender_user
                 AND media.client_id = messages.client_id
                 WHERE messages.server_id = ?1",
                [server_id as i64],
                |row| row.get(0),
            )
            .optional()?;
        match sealed {
            None => Ok(None),
            Some(sealed) => self.open_sealed(&sealed).map(Some).ok_or(StoreError::WrongKey),
        }
    }

    /// Records who received (or read) an outgoing message.
    pub fn add_receipt(
        &self,
        server_id: u64,
        by: (u64, u32),
        read: bool,
    ) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT OR IGNORE INTO receipts (server_id, by_user, by_device, read)
             VALUES (?1, ?2, ?3, ?4)",
            params![server_id as i64, by.0 as i64, by.1, read],
        )?;
        Ok(())
    }

    /// Who received and who read an outgoing message (devices).
    pub fn receipts(&self, server_id: u64) -> Result<ReceiptSets, StoreError> {
        let mut statement = self.db.prepare(
            "SELECT by_user, by_device, read FROM receipts WHERE server_id = ?1
             ORDER BY by_user, by_device",
        )?;
        let rows: Vec<(u64, u32, bool)> = statement
            .query_map([server_id as i64], |row| {
                Ok((row.get::<_, i64>(0)? as u64, row.get(1)?, row.get::<_, i64>(2)? != 0))
            })?
            .collect::<Result<_, _>>()?;
        let delivered = rows.iter().filter(|r| !r.2).map(|r| (r.0, r.1)).collect();
        let read = rows.iter().filter(|r| r.2).map(|r| (r.0, r.1)).collect();
        Ok((delivered, read))
    }

    /// The last `limit` messages of a group, oldest first.
    pub fn group_history(
        &self,
        group_id: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut messages = self.query(
            "WHERE group_id = ?1 ORDER BY id DESC LIMIT ?2",
            params![group_id as i64, limit as i64],
        )?;
        messages.reverse();
        Ok(messages)
    }

    /// Adds a group message to the history.
    pub fn add_group_message(
        &self,
        group_id: u64,
        message: &StoredMessage,
    ) -> Result<(), StoreError> {
        insert_message(&self.db, message, group_id)
    }

    /// Whether an incoming message is already in the history (a redelivery).
    pub fn has_message(&self, sender: (u64, u32), client_id: u64) -> Result<bool, StoreError> {
        let found: Option<i64> = self
            .db
            .query_row(
                "SELECT id FROM messages
                 WHERE sender_user = ?1 AND sender_device = ?2 AND client_id = ?3",
                params![sender.0 as i64, sender.1, client_id as i64],
                |row| row.get(0),
            )
            .optional()?;
        Ok(found.is_some())
    }

    /// Records the sent tick of an outgoing message.
    pub fn mark_sent(
        &self,
        client_id: u64,
        server_id: u64,
        time_ms: u64,
    ) -> Result<(), StoreError> {
        self.db.execute(
            "UPDATE messages SET server_id = ?2, time_ms = ?3, status = MAX(status, 1)
             WHERE outgoing = 1 AND client_id = ?1",
            params![client_id as i64, server_id as i64, time_ms as i64],
        )?;
        Ok(())
    }

    /// Marks an outgoing message failed (the server refused it for good), with why.
    pub fn mark_failed(&mut self, client_id: u64, reason: &str) -> Result<(), StoreError> {
        let tx = self.db.transaction()?;
        tx.execute(
            "UPDATE messages SET status = ?2 WHERE outgoing = 1 AND client_id = ?1",
            params![client_id as i64, Status::Failed as i64],
        )?;
        tx.execute(
            "INSERT OR REPLACE INTO failures (client_id, reason) VALUES (?1, ?2)",
            params![client_id as i64, reason],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Why an outgoing message failed, if it did.
    pub fn failure(&self, client_id: u64) -> Result<Option<String>, StoreError> {
        Ok(self
            .db
            .query_row(
                "SELECT reason FROM failures WHERE client_id = ?1",
                [client_id as i64],
                |row| row.get(0),
            )
            .optional()?)
    }

    /// Remembers what this device knows of a person: a display name, a phone number
    /// (`None` keeps what was known).
    pub fn remember_person(
        &self,
        user_id: u64,
        name: Option<&str>,
        phone: Option<&str>,
    ) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO people (user_id, name, phone) VALUES (?1, ?2, ?3)
             ON CONFLICT(user_id) DO UPDATE SET name = COALESCE(excluded.name, people.name),
             phone = COALESCE(excluded.phone, people.phone)",
            params![user_id as i64, name, phone],
        )?;
        Ok(())
    }

    /// What this device knows of a person: (display name, phone number).
    pub fn person(&self, user_id: u64) -> Result<(Option<String>, Option<String>), StoreError> {
        let row = self
            .db
            .query_row(
                "SELECT name, phone FROM people WHERE user_id = ?1",
                [user_id as i64],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        Ok(row.unwrap_or((None, None)))
    }

    /// Whether this device sends read receipts (the user's privacy setting, kept here so
    /// that the device honours it whatever a server does; on unless turned off).
    pub fn read_receipts(&self) -> Result<bool, StoreError> {
        Ok(self.meta("read_receipts")?.is_none_or(|value| value != [0]))
    }

    /// Whether this (primary) device has published its signed device list.
    pub fn device_list_published(&self) -> Result<bool, StoreError> {
        Ok(self.meta("device_list_published")?.is_some())
    }

    /// Records that this (primary) device published its signed device list.
    pub fn mark_device_list_published(&self) -> Result<(), StoreError> {
        self.set_meta("device_list_published", &[1])
    }

    /// Records whether this device sends read receipts.
    pub fn set_read_receipts(&self, on: bool) -> Result<(), StoreError> {
        self.set_meta("read_receipts", &[u8::from(on)])
    }

    /// Records this device's own phone number (at registration).
    pub fn save_own_phone(&self, phone: &str) -> Result<(), StoreError> {
        self.set_meta("phone", phone.as_bytes())
    }

    /// This account's phone number, if this device registered it (a linked device
    /// learns it from the primary's history, or not at all).
    pub fn own_phone(&self) -> Result<Option<String>, StoreError> {
        Ok(self.meta("phone")?.and_then(|p| String::from_utf8(p).ok()))
    }

    /// Raises the status of outgoing messages by server id (ticks only go up).
    pub fn raise_status(
        &self,
        server_ids: &[u64],
        status: Status,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut changed = Vec::new();
        for id in server_ids {
            let updated = self.db.execute(
                "UPDATE messages SET status = ?2
                 WHERE outgoing = 1 AND server_id = ?1 AND status < ?2",
                params![*id as i64, status as i64],
            )?;
            if updated > 0 {
                changed.extend(
                    self.query("WHERE outgoing = 1 AND server_id = ?1", params![*id as i64])?,
                );
            }
        }
        Ok(changed)
    }

    /// Of `server_ids`, the outgoing messages `reader` may have a receipt for: a
    /// one-to-one message to `reader` (when `group` is `None`), or a message to `group`
    /// of which `reader` is a member. A receipt naming anything else (forged by a hostile
    /// server, or about someone else's conversation) is not taken.
    pub fn receiptable(
        &self,
        server_ids: &[u64],
        reader: u64,
        group: Option<u64>,
    ) -> Result<Vec<u64>, StoreError> {
        let mut statement = self.db.prepare(
            "SELECT COUNT(*) FROM messages m WHERE m.outgoing = 1 AND m.server_id = ?1 AND (
                 (?3 = 0 AND m.group_id = 0 AND m.peer = ?2)
                 OR (?3 != 0 AND m.group_id = ?3 AND EXISTS (SELECT 1 FROM group_members g
                     WHERE g.group_id = m.group_id AND g.user_id = ?2)))",
        )?;
        let mut taken = Vec::new();
        for &id in server_ids {
            let group = group.unwrap_or(0) as i64;
            let count: i64 =
                statement.query_row(params![id as i64, reader as i64, group], |row| row.get(0))?;
            if count > 0 {
                taken.push(id);
            }
        }
        Ok(taken)
    }

    /// The group a stored message belongs to (0: a one-to-one conversation).
    pub fn group_of(&self, sender: (u64, u32), client_id: u64) -> Result<u64, StoreError> {
        let found: Option<i64> = self
            .db
            .query_row(
                "SELECT group_id FROM messages
                 WHERE sender_user = ?1 AND sender_device = ?2 AND client_id = ?3",
                params![sender.0 as i64, sender.1, client_id as i64],
                |row| row.get(0),
            )
            .optional()?;
        Ok(found.unwrap_or(0) as u64)
    }

    /// This device's outgoing message with this client id.
    pub fn message(&self, client_id: u64) -> Result<Option<StoredMessage>, StoreError> {
        let found = self.query("WHERE outgoing = 1 AND client_id = ?1", params![client_id as i64]);
        Ok(found?.into_iter().next())
    }

    /// Outgoing messages not yet acknowledged (to send again after a reconnect).
    pub fn unsent(&self) -> Result<Vec<StoredMessage>, StoreError> {
        self.query("WHERE outgoing = 1 AND status = 0 ORDER BY id", [])
    }

    /// The last `limit` messages with `peer`, oldest first.
    pub fn history(&self, peer: u64, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        let mut messages = self.query(
            "WHERE peer = ?1 ORDER BY id DESC LIMIT ?2",
            params![peer as i64, limit as i64],
        )?;
        messages.reverse();
        Ok(messages)
    }

    /// Messages whose text holds every word of `words` (each also as a prefix: "hel"
    /// finds "hello"), newest first, each with its group id (0 for one-to-one). The
    /// words are the user's text, not FTS5 syntax: each is quoted, so a hyphen, a
    /// quote or `AND` is just text. No words, no matches.
    pub fn search(
        &self,
        words: &str,
        limit: usize,
    ) -> Result<Vec<(StoredMessage, u64)>, StoreError> {
        let Some(query) = fts_query(words) else { return Ok(Vec::new()) };
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS}, group_id FROM messages WHERE id IN
             (SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?1)
             ORDER BY id DESC LIMIT ?2"
        );
        let mut statement = self.db.prepare(&sql)?;
        let rows = statement.query_map(params![query, limit as i64], |row| {
            Ok((message_from_row(row)?, row.get::<_, i64>(9)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn query<P: rusqlite::Params>(
        &self,
        filter: &str,
        params: P,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages {filter}");
        let mut statement = self.db.prepare(&sql)?;
        let rows = statement.query_map(params, message_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The last `per_conversation` messages of every conversation (1:1 and group),
    /// oldest first, each with its group id (0 for 1:1): what a history bundle carries.
    pub fn recent_messages(
        &self,
        per_conversation: usize,
    ) -> Result<Vec<(StoredMessage, u64)>, StoreError> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS}, group_id FROM (SELECT *, ROW_NUMBER() OVER
             (PARTITION BY peer, group_id ORDER BY id DESC) AS recent FROM messages)
             WHERE recent <= ?1 ORDER BY id"
        );
        let mut statement = self.db.prepare(&sql)?;
        let rows = statement.query_map([per_conversation as i64], |row| {
            Ok((message_from_row(row)?, row.get::<_, i64>(9)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Adds messages from a history bundle, in one transaction; those already here are
    /// skipped. Returns how many were new.
    pub fn import_messages(
        &mut self,
        messages: &[(StoredMessage, u64)],
    ) -> Result<usize, StoreError> {
        let transaction = self.db.transaction()?;
        let mut added = 0;
        for (message, group_id) in messages {
            insert_message(&transaction, message, *group_id)?;
            added += transaction.changes() as usize; // 0 when it was already here.
        }
        transaction.commit()?;
        Ok(added)
    }

    /// Keeps the descriptor of a history bundle offered to this device (sealed: it holds
    /// the bundle's key) until it is imported.
    pub fn save_history_offer(&self, descriptor: &[u8]) -> Result<(), StoreError> {
        let sealed = self.seal(descriptor)?;
        self.set_meta("history_offer", &sealed)
    }

    /// The offered history bundle's descriptor, if any (kept until
    /// [`Store::forget_history_offer`]).
    pub fn history_offer(&self) -> Result<Option<Vec<u8>>, StoreError> {
        match self.meta("history_offer")? {
            None => Ok(None),
            Some(sealed) => self.open_sealed(&sealed).map(Some).ok_or(StoreError::WrongKey),
        }
    }

    /// Forgets the offered history bundle (imported).
    pub fn forget_history_offer(&self) -> Result<(), StoreError> {
        self.db.execute("DELETE FROM meta WHERE key = 'history_offer'", [])?;
        Ok(())
    }

    /// A new client message id (random: ids must not repeat across reinstalls either).
    pub fn new_client_id() -> Result<u64, StoreError> {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).map_err(|e| StoreError::Random(e.to_string()))?;
        Ok(u64::from_le_bytes(bytes) >> 1)
    }
}

/// A user's search words as an FTS5 query: each word a quoted string (inner quotes
/// doubled) matched as a prefix, all of them required. `None` when there is no word.
pub(crate) fn fts_query(words: &str) -> Option<String> {
    let terms: Vec<String> = words
        .split_whitespace()
        .filter(|w| w.chars().any(char::is_alphanumeric))
        .map(|w| format!("\"{}\"*", w.replace('"', "\"\"")))
        .collect();
    (!terms.is_empty()).then(|| terms.join(" "))
}

/// The columns [`message_from_row`] reads, in order.
const MESSAGE_COLUMNS: &str =
    "server_id, client_id, peer, sender_user, sender_device, outgoing, body, time_ms, status";

fn message_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        server_id: row.get::<_, i64>(0)? as u64,
        client_id: row.get::<_, i64>(1)? as u64,
        peer: row.get::<_, i64>(2)? as u64,
        sender: (row.get::<_, i64>(3)? as u64, row.get(4)?),
        outgoing: row.get::<_, i64>(5)? != 0,
        text: row.get(6)?,
        time_ms: row.get::<_, i64>(7)? as u64,
        status: Status::from_i64(row.get(8)?),
    })
}

fn insert_message(
    db: &Connection,
    message: &StoredMessage,
    group_id: u64,
) -> Result<(), StoreError> {
    db.execute(
        "INSERT OR IGNORE INTO messages (server_id, client_id, peer, sender_user,
         sender_device, outgoing, body, time_ms, status, group_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            message.server_id as i64,
            message.client_id as i64,
            message.peer as i64,
            message.sender.0 as i64,
            message.sender.1,
            message.outgoing as i64,
            message.text,
            message.time_ms as i64,
            message.status as i64,
            group_id as i64
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Receipts are taken only from whom a message went to: the peer of a one-to-one
    /// message, a member of a group message's group (issue 20 item 8: a hostile server,
    /// or a stranger, cannot move the ticks of a conversation they are not in).
    #[test]
    fn receipts_are_taken_only_from_whom_a_message_went_to() {
        let dir = tempfile::tempdir().unwrap();
        let secret = StoreSecret::Passphrase("correct horse".into());
        let mut store = Store::open(&dir.path().join("s.db"), &secret).unwrap();
        let (bob, carol, mallory, group) = (20, 30, 66, 0x5EED);
        let message = |server_id, peer| StoredMessage {
            server_id,
            client_id: server_id,
            peer,
            sender: (10, 1),
            outgoing: true,
            text: "hi".into(),
            time_ms: 1,
            status: Status::Sent,
        };
        store.add_message(&message(1, bob)).unwrap();
        store.add_group_message(group, &message(2, 0)).unwrap();
        let members = vec![(10, true), (bob, false), (carol, false)];
        let view = GroupView {
            group_id: group,
            epoch: 1,
            name: "g".into(),
            members,
            needs_rotation: false,
        };
        store.save_group(&view).unwrap();
        assert_eq!(store.receiptable(&[1, 2, 3], bob, None).unwrap(), vec![1]);
        assert_eq!(store.receiptable(&[1], mallory, None).unwrap(), Vec::<u64>::new());
        assert_eq!(store.receiptable(&[2], carol, Some(group)).unwrap(), vec![2]);
        assert_eq!(store.receiptable(&[2], mallory, Some(group)).unwrap(), Vec::<u64>::new());
        assert_eq!(store.receiptable(&[1], bob, Some(group)).unwrap(), Vec::<u64>::new());
    }

    #[test]
    fn search_words_are_quoted_and_match_as_prefixes() {
        assert_eq!(fts_query("hel"), Some("\"hel\"*".into()));
        assert_eq!(fts_query("e-mail AND"), Some("\"e-mail\"* \"AND\"*".into()));
        assert_eq!(fts_query("say \"hi\""), Some("\"say\"* \"\"\"hi\"\"\"*".into()));
        assert_eq!(fts_query("  - ! "), None);
    }
}
