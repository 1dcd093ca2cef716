//! End-to-end encryption: the only module that touches `vodozemac`.
//!
//! vodozemac is the audited Rust implementation of Olm (a Double Ratchet per device pair,
//! with 3DH over identity, one-time and fallback keys) and Megolm; its API changes
//! between minor versions, so it is pinned to an exact version and kept behind this
//! module. What Tern adds around it:
//!
//! - **Signed prekeys.** Each one-time and fallback key is signed with the device's
//!   Ed25519 key over `key_id (u64, LE) ‖ public key`; a bundle whose signatures do not
//!   verify against its own signing key is refused ([`CryptoError::BadSignature`]).
//! - **Pinned identities.** The caller compares a peer device's identity keys with the
//!   ones seen first and surfaces a change ([`crate::Event::IdentityChanged`]).
//! - **No second session from one pre-key message.** A pre-key message whose session id
//!   is already known is decrypted with that session (and fails if it is a replay),
//!   never used to build another session: otherwise a pre-key message built on the
//!   fallback key could be replayed.
//! - **State is persisted after every operation** by the caller (the [`Store`]), since
//!   restoring an older account would resurrect used one-time keys.
//!
//! [`Store`]: crate::store::Store

use sha2::{Digest, Sha512};
use tern_wire::messages::{DeviceBundle, DeviceKeys, E2eType, SignedPrekey};
use vodozemac::megolm::{
    GroupSession, GroupSessionPickle, InboundGroupSession, InboundGroupSessionPickle,
    MegolmMessage, SessionConfig as MegolmConfig, SessionKey,
};
use vodozemac::olm::{
    Account, AccountPickle, OlmMessage, PreKeyMessage, Session, SessionConfig, SessionPickle,
};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature};

/// One-time keys a device keeps on the server (refilled up to this when told it is low).
pub const ONE_TIME_KEY_STOCK: usize = 50;

/// What can go wrong in the E2E layer.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// A key in a bundle is not signed by the device's signing key.
    #[error("the {what} of user {user_id} device {device_id} has a bad signature; not using it")]
    BadSignature {
        /// Which key.
        what: &'static str,
        /// Whose.
        user_id: u64,
        /// Which device.
        device_id: u32,
    },
    /// A key is not a valid Curve25519/Ed25519 key.
    #[error("a malformed key: {0}")]
    BadKey(String),
    /// The ciphertext could not be decrypted: tampered with, replayed, or from a
    /// session this device does not have.
    #[error("cannot decrypt: {0}")]
    Decrypt(String),
    /// Stored state could not be read with this key.
    #[error("stored E2E state is unreadable (wrong key or corrupt): {0}")]
    Pickle(String),
}

/// A device's long-term E2E state (identity keys, one-time and fallback keys).
pub struct DeviceCrypto {
    account: Account,
}

impl std::fmt::Debug for DeviceCrypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCrypto").field("identity", &self.identity_key()).finish()
    }
}

/// A pairwise Olm session with one device of a peer.
pub struct PairSession {
    session: Session,
}

impl std::fmt::Debug for PairSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairSession").field("id", &self.session.session_id()).finish()
    }
}

/// The identity keys of a peer device, as pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Curve25519 identity key.
    pub curve25519: [u8; 32],
    /// Ed25519 signing key, once known (a pre-key message carries only the Curve25519 key).
    pub ed25519: Option<[u8; 32]>,
}

/// Tern's id for a Curve25519 prekey: its first 8 bytes (vodozemac keeps its own
/// numbering private; the server only needs the ids to be distinct per device).
fn key_id_of(key: &Curve25519PublicKey) -> u64 {
    let bytes = key.to_bytes();
    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
}

impl DeviceCrypto {
    /// A new device: fresh identity keys, a fallback key and a first stock of one-time
    /// keys (not yet marked published: see [`DeviceCrypto::mark_published`]).
    pub fn new() -> DeviceCrypto {
        let mut account = Account::new();
        account.generate_one_time_keys(ONE_TIME_KEY_STOCK);
        account.generate_fallback_key();
        DeviceCrypto { account }
    }

    /// Restores a device from [`DeviceCrypto::pickle`].
    pub fn from_pickle(pickle: &str, key: &[u8; 32]) -> Result<DeviceCrypto, CryptoError> {
        let pickle = AccountPickle::from_encrypted(pickle, key)
            .map_err(|e| CryptoError::Pickle(e.to_string()))?;
        Ok(DeviceCrypto { account: Account::from_pickle(pickle) })
    }

    /// The state, encrypted with `key`.
    pub fn pickle(&self, key: &[u8; 32]) -> String {
        self.account.pickle().encrypt(key)
    }

    /// This device's Curve25519 identity key.
    pub fn identity_key(&self) -> [u8; 32] {
        self.account.curve25519_key().to_bytes()
    }

    /// This device's Ed25519 signing key.
    pub fn signing_key(&self) -> [u8; 32] {
        *self.account.ed25519_key().as_bytes()
    }

    fn signed(&self, key: &Curve25519PublicKey) -> SignedPrekey {
        let key_id = key_id_of(key);
        let public_key = key.to_bytes();
        let signature =
            self.account.sign(SignedPrekey::signed_bytes(key_id, &public_key)).to_bytes();
        SignedPrekey { key_id, public_key, signature }
    }

    /// The signed fallback key.
    pub fn fallback_key(&self) -> SignedPrekey {
        let fallback = self.account.fallback_key();
        let key = fallback.values().next().expect("a fallback key is generated at creation");
        self.signed(key)
    }

    /// The one-time keys not yet published, signed.
    pub fn unpublished_one_time_keys(&self) -> Vec<SignedPrekey> {
        let mut keys: Vec<SignedPrekey> =
            self.account.one_time_keys().values().map(|k| self.signed(k)).collect();
        keys.sort_by_key(|k| k.key_id);
        keys
    }

    /// Everything a registration or link uploads.
    pub fn device_keys(&self) -> DeviceKeys {
        DeviceKeys {
            identity_key: self.identity_key(),
            signing_key: self.signing_key(),
            fallback_key: self.fallback_key(),
            one_time_keys: self.unpublished_one_time_keys(),
        }
    }

    /// Makes one-time keys so that `remaining` on the server plus the new ones reach the
    /// stock; returns how many were made (they are unpublished until
    /// [`DeviceCrypto::mark_published`]).
    pub fn refill_one_time_keys(&mut self, remaining: usize) -> usize {
        let wanted = ONE_TIME_KEY_STOCK.saturating_sub(remaining);
        let unpublished = self.account.one_time_keys().len();
        let new = wanted.saturating_sub(unpublished);
        if new > 0 {
            self.account.generate_one_time_keys(new);
        }
        wanted
    }

    /// The server acknowledged the upload: the keys are published. Only after the ack,
    /// or a lost upload would leave keys the server never saw marked published.
    pub fn mark_published(&mut self) {
        self.account.mark_keys_as_published();
    }

    /// Starts a session with a peer device from its bundle: checks the signatures of the
    /// prekey used against the bundle's signing key, then runs 3DH with the one-time key
    /// (or the fallback key when none was left).
    pub fn outbound_session(
        &self,
        user_id: u64,
        bundle: &DeviceBundle,
    ) -> Result<PairSession, CryptoError> {
        let device_id = bundle.device_id;
        let signing = Ed25519PublicKey::from_slice(&bundle.signing_key)
            .map_err(|e| CryptoError::BadKey(e.to_string()))?;
        let verify = |key: &SignedPrekey, what: &'static str| -> Result<(), CryptoError> {
            let signature = Ed25519Signature::from_slice(&key.signature)
                .map_err(|_| CryptoError::BadSignature { what, user_id, device_id })?;
            signing
                .verify(&SignedPrekey::signed_bytes(key.key_id, &key.public_key), &signature)
                .map_err(|_| CryptoError::BadSignature { what, user_id, device_id })
        };
        verify(&bundle.fallback_key, "fallback key")?;
        let prekey = match &bundle.one_time_key {
            Some(key) => {
                verify(key, "one-time key")?;
                key
            }
            None => &bundle.fallback_key,
        };
        let identity = Curve25519PublicKey::from_bytes(bundle.identity_key);
        let one_time = Curve25519PublicKey::from_bytes(prekey.public_key);
        let session =
            self.account.create_outbound_session(SessionConfig::version_2(), identity, one_time);
        Ok(PairSession { session })
    }

    /// Decrypts the first message of a session a peer started. `known` says whether a
    /// session with this id exists already (then it must be used instead: see the module
    /// docs). Returns the new session, the plaintext and the sender's identity key.
    pub fn inbound_session(
        &mut self,
        ciphertext: &[u8],
    ) -> Result<(PairSession, Vec<u8>, [u8; 32]), CryptoError> {
        let message = PreKeyMessage::from_bytes(ciphertext)
            .map_err(|e| CryptoError::Decrypt(e.to_string()))?;
        let identity = message.identity_key();
        let created = self
            .account
            .create_inbound_session(identity, &message)
            .map_err(|e| CryptoError::Decrypt(e.to_string()))?;
        Ok((PairSession { session: created.session }, created.plaintext, identity.to_bytes()))
    }

    /// A safety number for this device's user and a peer: 60 digits both sides compute
    /// alike, from each user's id and the identity keys of their devices (Signal's
    /// scheme: 5,200 rounds of SHA-512 per side, 30 digits per side, lower user id first).
    pub fn safety_number(mine: (u64, &[[u8; 32]]), theirs: (u64, &[[u8; 32]])) -> String {
        let half = |user_id: u64, keys: &[[u8; 32]]| -> String {
            let mut keys = keys.to_vec();
            keys.sort_unstable();
            let mut input = Vec::new();
            for key in &keys {
                input.extend_from_slice(key);
            }
            let mut hash = Sha512::new()
                .chain_update([0u8, 0])
                .chain_update(&input)
                .chain_update(user_id.to_be_bytes())
                .finalize();
            for _ in 1..5200 {
                hash = Sha512::new().chain_update(hash).chain_update(&input).finalize();
            }
            (0..6)
                .map(|i| {
                    let chunk = &hash[i * 5..i * 5 + 5];
                    let value = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
                    format!("{:05}", value % 100_000)
                })
                .collect()
        };
        let (a, b) = (half(mine.0, mine.1), half(theirs.0, theirs.1));
        let digits = if mine.0 <= theirs.0 { a + &b } else { b + &a };
        digits
            .as_bytes()
            .chunks(5)
            .map(|c| std::str::from_utf8(c).expect("digits"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Default for DeviceCrypto {
    fn default() -> Self {
        DeviceCrypto::new()
    }
}

impl PairSession {
    /// Restores a session from [`PairSession::pickle`].
    pub fn from_pickle(pickle: &str, key: &[u8; 32]) -> Result<PairSession, CryptoError> {
        let pickle = SessionPickle::from_encrypted(pickle, key)
            .map_err(|e| CryptoError::Pickle(e.to_string()))?;
        Ok(PairSession { session: Session::from_pickle(pickle) })
    }

    /// The state, encrypted with `key`.
    pub fn pickle(&self, key: &[u8; 32]) -> String {
        self.session.pickle().encrypt(key)
    }

    /// The session's id (the same on both ends).
    pub fn id(&self) -> String {
        self.session.session_id()
    }

    /// Encrypts one message.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> (E2eType, Vec<u8>) {
        match self.session.encrypt(plaintext) {
            OlmMessage::PreKey(message) => (E2eType::OlmPreKey, message.to_bytes()),
            OlmMessage::Normal(message) => (E2eType::OlmMessage, message.to_bytes()),
        }
    }

    /// Decrypts one message; a replay or a tampered ciphertext is an error.
    pub fn decrypt(
        &mut self,
        e2e_type: E2eType,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let message_type = match e2e_type {
            E2eType::OlmPreKey => 0,
            E2eType::OlmMessage => 1,
            other => return Err(CryptoError::Decrypt(format!("{other:?} is not an Olm message"))),
        };
        let message = OlmMessage::from_parts(message_type, ciphertext)
            .map_err(|e| CryptoError::Decrypt(e.to_string()))?;
        self.session.decrypt(&message).map_err(|e| CryptoError::Decrypt(e.to_string()))
    }
}

/// This device's sending session for one group (Megolm: one ratchet, its key shared
/// with every member device over Olm).
pub struct GroupSender {
    session: GroupSession,
}

impl std::fmt::Debug for GroupSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupSender").field("id", &self.session.session_id()).finish()
    }
}

/// A member device's copy of another device's group session (decrypts only).
pub struct GroupReceiver {
    session: InboundGroupSession,
}

impl std::fmt::Debug for GroupReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupReceiver").field("id", &self.session.session_id()).finish()
    }
}

impl GroupSender {
    /// A fresh session (after a membership change, 100 messages or 7 days: rotate).
    pub fn new() -> GroupSender {
        GroupSender { session: GroupSession::new(MegolmConfig::version_1()) }
    }

    /// Restores a session from [`GroupSender::pickle`].
    pub fn from_pickle(pickle: &str, key: &[u8; 32]) -> Result<GroupSender, CryptoError> {
        let pickle = GroupSessionPickle::from_encrypted(pickle, key)
            .map_err(|e| CryptoError::Pickle(e.to_string()))?;
        Ok(GroupSender { session: GroupSession::from_pickle(pickle) })
    }

    /// The state, encrypted with `key`.
    pub fn pickle(&self, key: &[u8; 32]) -> String {
        self.session.pickle().encrypt(key)
    }

    /// The session's id (names it for receivers).
    pub fn id(&self) -> String {
        self.session.session_id()
    }

    /// Messages encrypted so far.
    pub fn message_index(&self) -> u32 {
        self.session.message_index()
    }

    /// The key to share (over Olm only) with member devices: it decrypts from the
    /// current index on.
    pub fn session_key(&self) -> Vec<u8> {
        self.session.session_key().to_bytes()
    }

    /// Encrypts one group message: `session id length (1) ‖ session id ‖ Megolm message`.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Vec<u8> {
        let id = self.session.session_id();
        let message = self.session.encrypt(plaintext).to_bytes();
        let mut out = Vec::with_capacity(1 + id.len() + message.len());
        out.push(id.len() as u8);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&message);
        out
    }
}

impl Default for GroupSender {
    fn default() -> Self {
        GroupSender::new()
    }
}

/// Splits a group ciphertext into (session id, Megolm message).
pub fn group_session_id(ciphertext: &[u8]) -> Result<(String, &[u8]), CryptoError> {
    let (&len, rest) = ciphertext
        .split_first()
        .ok_or_else(|| CryptoError::Decrypt("empty group message".into()))?;
    let len = usize::from(len);
    if rest.len() < len {
        return Err(CryptoError::Decrypt("truncated group message".into()));
    }
    let id = std::str::from_utf8(&rest[..len])
        .map_err(|_| CryptoError::Decrypt("bad session id".into()))?;
    Ok((id.to_string(), &rest[len..]))
}

impl GroupReceiver {
    /// A receiver from a session key that arrived over Olm.
    pub fn from_key(session_key: &[u8]) -> Result<GroupReceiver, CryptoError> {
        let key =
            SessionKey::from_bytes(session_key).map_err(|e| CryptoError::BadKey(e.to_string()))?;
        Ok(GroupReceiver { session: InboundGroupSession::new(&key, MegolmConfig::version_1()) })
    }

    /// Restores a receiver from [`GroupReceiver::pickle`].
    pub fn from_pickle(pickle: &str, key: &[u8; 32]) -> Result<GroupReceiver, CryptoError> {
        let pickle = InboundGroupSessionPickle::from_encrypted(pickle, key)
            .map_err(|e| CryptoError::Pickle(e.to_string()))?;
        Ok(GroupReceiver { session: InboundGroupSession::from_pickle(pickle) })
    }

    /// The state, encrypted with `key`.
    pub fn pickle(&self, key: &[u8; 32]) -> String {
        self.session.pickle().encrypt(key)
    }

    /// The session's id.
    pub fn id(&self) -> String {
        self.session.session_id()
    }

    /// Decrypts the Megolm part of a group message; returns the plaintext and its index
    /// (the caller refuses an index it has seen: Megolm itself would decrypt it again).
    pub fn decrypt(&mut self, message: &[u8]) -> Result<(Vec<u8>, u32), CryptoError> {
        let message =
            MegolmMessage::from_bytes(message).map_err(|e| CryptoError::Decrypt(e.to_string()))?;
        let decrypted =
            self.session.decrypt(&message).map_err(|e| CryptoError::Decrypt(e.to_string()))?;
        Ok((decrypted.plaintext, decrypted.message_index))
    }
}

/// A device's key fingerprint for people to compare: the first 10 bytes of the SHA-256
/// of its Curve25519 identity key, in five groups of four hex digits.
pub fn fingerprint(identity_key: &[u8; 32]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(identity_key);
    let hex: Vec<String> =
        digest[..10].chunks(2).map(|c| format!("{:02x}{:02x}", c[0], c[1])).collect();
    hex.join(" ")
}

/// Whether `signature` is `signing_key`'s Ed25519 signature over `message`.
pub fn verify_signature(signing_key: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> bool {
    let Ok(key) = Ed25519PublicKey::from_slice(signing_key) else { return false };
    let Ok(signature) = Ed25519Signature::from_slice(signature) else { return false };
    key.verify(message, &signature).is_ok()
}

impl DeviceCrypto {
    /// Signs `message` with this device's Ed25519 key (group changes).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.account.sign(message).to_bytes()
    }
}

/// The session id a pre-key message would create (to find an existing one first).
pub fn prekey_session_id(ciphertext: &[u8]) -> Result<String, CryptoError> {
    PreKeyMessage::from_bytes(ciphertext)
        .map(|m| m.session_id())
        .map_err(|e| CryptoError::Decrypt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_of(device: &mut DeviceCrypto, device_id: u32, with_one_time: bool) -> DeviceBundle {
        let keys = device.device_keys();
        device.mark_published();
        DeviceBundle {
            device_id,
            identity_key: keys.identity_key,
            signing_key: keys.signing_key,
            one_time_key: with_one_time.then(|| keys.one_time_keys[0].clone()),
            fallback_key: keys.fallback_key,
        }
    }

    #[test]
    fn a_session_from_a_bundle_carries_messages_both_ways() {
        let alice = DeviceCrypto::new();
        let mut bob = DeviceCrypto::new();
        let bundle = bundle_of(&mut bob, 1, true);
        let mut to_bob = alice.outbound_session(2, &bundle).unwrap();
        let (ty, ciphertext) = to_bob.encrypt(b"hello");
        assert_eq!(ty, E2eType::OlmPreKey);
        let (mut to_alice, plaintext, sender) = bob.inbound_session(&ciphertext).unwrap();
        assert_eq!(plaintext, b"hello");
        assert_eq!(sender, alice.identity_key());
        assert_eq!(to_alice.id(), to_bob.id());
        let (ty, reply) = to_alice.encrypt(b"hi");
        assert_eq!(to_bob.decrypt(ty, &reply).unwrap(), b"hi");
        // A replay of an already decrypted message fails.
        assert!(matches!(to_bob.decrypt(ty, &reply), Err(CryptoError::Decrypt(_))));
    }

    #[test]
    fn the_fallback_key_works_when_no_one_time_key_is_left() {
        let alice = DeviceCrypto::new();
        let mut bob = DeviceCrypto::new();
        let bundle = bundle_of(&mut bob, 1, false);
        let mut to_bob = alice.outbound_session(2, &bundle).unwrap();
        let (_, ciphertext) = to_bob.encrypt(b"via fallback");
        let (_, plaintext, _) = bob.inbound_session(&ciphertext).unwrap();
        assert_eq!(plaintext, b"via fallback");
    }

    #[test]
    fn a_forged_prekey_signature_is_refused() {
        let alice = DeviceCrypto::new();
        let mut bob = DeviceCrypto::new();
        let mallory = DeviceCrypto::new();
        let mut bundle = bundle_of(&mut bob, 1, true);
        // The server swaps in a key of its own choosing, signed by someone else.
        bundle.one_time_key = Some(mallory.fallback_key());
        let refused = alice.outbound_session(2, &bundle).unwrap_err();
        assert!(matches!(refused, CryptoError::BadSignature { what: "one-time key", .. }));
    }

    #[test]
    fn tampered_ciphertext_is_rejected() {
        let alice = DeviceCrypto::new();
        let mut bob = DeviceCrypto::new();
        let bundle = bundle_of(&mut bob, 1, true);
        let mut to_bob = alice.outbound_session(2, &bundle).unwrap();
        let (_, mut ciphertext) = to_bob.encrypt(b"hello");
        let last = ciphertext.len() - 1;
        ciphertext[last] ^= 1;
        assert!(bob.inbound_session(&ciphertext).is_err());
    }

    #[test]
    fn pickles_round_trip_and_need_the_key() {
        let key = [7u8; 32];
        let device = DeviceCrypto::new();
        let pickle = device.pickle(&key);
        let back = DeviceCrypto::from_pickle(&pickle, &key).unwrap();
        assert_eq!(back.identity_key(), device.identity_key());
        assert!(matches!(
            DeviceCrypto::from_pickle(&pickle, &[8u8; 32]),
            Err(CryptoError::Pickle(_))
        ));
    }

    #[test]
    fn a_group_session_decrypts_from_its_shared_key_on() {
        let mut sender = GroupSender::new();
        let early = sender.encrypt(b"before the share");
        let mut receiver = GroupReceiver::from_key(&sender.session_key()).unwrap();
        let message = sender.encrypt(b"after the share");
        let (id, megolm) = group_session_id(&message).unwrap();
        assert_eq!(id, sender.id());
        assert_eq!(receiver.decrypt(megolm).unwrap(), (b"after the share".to_vec(), 1));
        // A member who got the key later cannot read what came before.
        let (_, early) = group_session_id(&early).unwrap();
        assert!(receiver.decrypt(early).is_err());
        // Tampering is caught by the MAC and signature.
        let mut forged = megolm.to_vec();
        let middle = forged.len() / 2;
        forged[middle] ^= 1;
        assert!(receiver.decrypt(&forged).is_err());
    }

    #[test]
    fn safety_numbers_match_on_both_sides_and_change_with_a_key() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let one = DeviceCrypto::safety_number((10, &[a]), (20, &[b]));
        let other = DeviceCrypto::safety_number((20, &[b]), (10, &[a]));
        assert_eq!(one, other);
        assert_eq!(one.split(' ').count(), 12);
        assert_ne!(one, DeviceCrypto::safety_number((10, &[a]), (20, &[[3u8; 32]])));
    }
}
