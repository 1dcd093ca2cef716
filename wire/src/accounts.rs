//! Derivations the protocol defines for accounts, computed the same way by the server
//! and every client: the truncated phone hash contact discovery sends, and the
//! proof of work a code request may have to carry (see `docs/PROTOCOL.md`).

use sha2::{Digest, Sha256};

use crate::messages::PhoneHash;

/// The truncated hash contact discovery sends for a phone number (E.164): the first
/// 8 bytes of its SHA-256.
pub fn phone_hash(phone: &str) -> PhoneHash {
    Sha256::digest(phone.as_bytes())[..8].try_into().expect("8 bytes")
}

/// Whether SHA-256(challenge ‖ nonce LE) starts with `bits` zero bits.
pub fn pow_solves(challenge: &[u8], nonce: u64, bits: u8) -> bool {
    let digest = Sha256::new().chain_update(challenge).chain_update(nonce.to_le_bytes()).finalize();
    let mut left = u32::from(bits);
    for byte in digest {
        if left == 0 {
            return true;
        }
        let zeros = byte.leading_zeros().min(8);
        if left <= zeros {
            return true;
        }
        if zeros < 8 {
            return false;
        }
        left -= 8;
    }
    left == 0
}

/// The first nonce that solves a challenge of `bits` bits (expected work: 2^bits hashes).
pub fn solve_pow(challenge: &[u8], bits: u8) -> u64 {
    (0u64..).find(|nonce| pow_solves(challenge, *nonce, bits)).expect("a nonce exists")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_solution_solves_and_its_neighbours_mostly_do_not() {
        let challenge = b"tern pow test";
        for bits in [0u8, 1, 7, 8, 9, 12] {
            let nonce = solve_pow(challenge, bits);
            assert!(pow_solves(challenge, nonce, bits), "{bits} bits");
            // The first solution: no smaller nonce solves it.
            assert!((0..nonce).all(|n| !pow_solves(challenge, n, bits)), "{bits} bits");
        }
        let hard = solve_pow(challenge, 12);
        assert!(!pow_solves(challenge, hard, 200), "no SHA-256 output has 200 zero bits");
    }

    #[test]
    fn phone_hash_is_the_truncated_sha256() {
        // SHA-256("+15550001111") begins 7a8e1bad42416f9a (computed independently).
        let expected = [0x7a, 0x8e, 0x1b, 0xad, 0x42, 0x41, 0x6f, 0x9a];
        assert_eq!(phone_hash("+15550001111"), expected);
        assert_ne!(phone_hash("+15550001111"), phone_hash("+15550001112"));
    }
}
