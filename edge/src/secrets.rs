//! Bearer tokens and verification codes: random generation, hashing, constant-time checks.
//!
//! Randomness comes from the core's [`Random`], a ChaCha20 generator: seeded from the OS
//! in `ternd` (so tokens and codes are unpredictable), from a test's seed in the
//! simulation (so a run replays exactly).
//!
//! Tokens are 256 random bits. The server stores only their SHA-256 and
//! compares hashes in constant time, so a stolen data directory does not yield working
//! tokens and timing does not leak how much of a guess was right.

use rand_core::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tern_wire::messages::SignedPrekey;
use tern_wire::messages::Token;

/// The core's random generator.
pub type Random = rand_chacha::ChaCha20Rng;

/// A generator seeded from the operating system's random source.
pub fn random_from_os() -> Random {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).expect("the OS random source works");
    Random::from_seed(seed)
}

/// A generator for a simulation or test seed.
pub fn random_from_seed(seed: u64) -> Random {
    Random::seed_from_u64(seed)
}

/// A fresh random token.
pub fn new_token(random: &mut Random) -> Token {
    let mut token = [0u8; 32];
    random.fill_bytes(&mut token);
    token
}

/// What the server stores for a token.
pub fn token_hash(token: &Token) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Whether `token` matches a stored hash, in constant time.
pub fn token_matches(token: &Token, stored_hash: &[u8; 32]) -> bool {
    token_hash(token).ct_eq(stored_hash).into()
}

/// A random numeric verification code of `digits` digits (leading zeros kept).
pub fn new_code(random: &mut Random, digits: u32) -> String {
    let modulus = 10u64.pow(digits);
    // The bias of u64 % 10^6 is below 2^-44: irrelevant for a rate-limited code.
    format!("{:0width$}", random.next_u64() % modulus, width = digits as usize)
}

/// Whether a submitted code equals the issued one, in constant time.
pub fn code_matches(submitted: &str, issued: &str) -> bool {
    submitted.len() == issued.len() && bool::from(submitted.as_bytes().ct_eq(issued.as_bytes()))
}

/// Checks a device's prekeys as hygiene: each must be signed by the device's own
/// Ed25519 key over `key_id (u64, LE) ‖ public key`. (Clients verify again and pin
/// identities themselves: the server is not trusted to vouch for keys.)
pub fn check_device_keys(keys: &tern_wire::messages::DeviceKeys) -> Result<(), &'static str> {
    check_prekeys(&keys.signing_key, std::iter::once(&keys.fallback_key))
        .map_err(|_| "the fallback key's signature does not verify")?;
    check_prekeys(&keys.signing_key, &keys.one_time_keys)
        .map_err(|_| "a one-time key's signature does not verify")
}

/// A prekey whose signature does not verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadSignature {
    /// The key's id.
    pub key_id: u64,
}

/// Checks the signatures of `prekeys` against `signing_key`.
pub fn check_prekeys<'a>(
    signing_key: &[u8; 32],
    prekeys: impl IntoIterator<Item = &'a SignedPrekey>,
) -> Result<(), BadSignature> {
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, signing_key);
    for prekey in prekeys {
        let signed = SignedPrekey::signed_bytes(prekey.key_id, &prekey.public_key);
        key.verify(&signed, &prekey.signature)
            .map_err(|_| BadSignature { key_id: prekey.key_id })?;
    }
    Ok(())
}

/// A registration-lock PIN's slow hash (Argon2id with a random `salt`; PHC string
/// bytes). Slow on purpose: run it off the core's thread (`work`).
pub fn hash_pin(pin: &str, salt: &[u8; 16]) -> Vec<u8> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(salt).expect("16 bytes encode");
    let hash = argon2::Argon2::default()
        .hash_password(pin.as_bytes(), &salt)
        .expect("argon2 hashes any PIN");
    hash.to_string().into_bytes()
}

/// Whether `pin` matches a hash made by [`hash_pin`] (in constant time).
pub fn pin_matches(pin: &str, hash: &[u8]) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    let Ok(text) = std::str::from_utf8(hash) else { return false };
    let Ok(parsed) = PasswordHash::new(text) else { return false };
    argon2::Argon2::default().verify_password(pin.as_bytes(), &parsed).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_checked_by_hash() {
        let mut random = random_from_seed(1);
        let a = new_token(&mut random);
        let b = new_token(&mut random);
        assert_ne!(a, b);
        let stored = token_hash(&a);
        assert!(token_matches(&a, &stored));
        assert!(!token_matches(&b, &stored));
    }

    #[test]
    fn codes_have_the_asked_length() {
        let mut random = random_from_os();
        for _ in 0..100 {
            let code = new_code(&mut random, 6);
            assert_eq!(code.len(), 6);
            assert!(code.bytes().all(|b| b.is_ascii_digit()));
        }
        assert!(code_matches("012345", "012345"));
        assert!(!code_matches("012346", "012345"));
        assert!(!code_matches("01234", "012345"));
    }
}
