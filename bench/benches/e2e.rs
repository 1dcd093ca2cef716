//! End-to-end encryption cost: encrypting and decrypting a 100-byte message on an
//! established Olm session (what every message pays once per recipient device), and
//! how many bytes the ciphertext adds. Run: `cargo bench -p tern-bench --bench e2e`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tern_client::crypto::{DeviceCrypto, PairSession};
use tern_wire::messages::DeviceBundle;

/// A session whose first message is still a pre-key message.
fn pair_before_reply() -> (PairSession, DeviceCrypto) {
    let alice = DeviceCrypto::new();
    let mut bob = DeviceCrypto::new();
    let keys = bob.device_keys();
    bob.mark_published();
    let bundle = DeviceBundle {
        device_id: 1,
        identity_key: keys.identity_key,
        signing_key: keys.signing_key,
        one_time_key: Some(keys.one_time_keys[0].clone()),
        fallback_key: keys.fallback_key,
    };
    (alice.outbound_session(2, &bundle).unwrap(), bob)
}

/// Two devices with a session each way, past the pre-key stage.
fn pair() -> (PairSession, PairSession) {
    let (mut to_bob, mut bob) = pair_before_reply();
    let (_, first) = to_bob.encrypt(b"hello");
    let (mut to_alice, _, _) = bob.inbound_session(&first).unwrap();
    // One reply each way ratchets both sides past the pre-key message.
    let (ty, reply) = to_alice.encrypt(b"hi");
    to_bob.decrypt(ty, &reply).unwrap();
    (to_bob, to_alice)
}

fn olm(c: &mut Criterion) {
    let message = [0x61u8; 100];
    let (mut to_bob, mut at_bob) = pair();
    let (_, ciphertext) = to_bob.encrypt(&message);
    println!(
        "olm ciphertext for a 100-byte plaintext: {} bytes (+{} bytes)",
        ciphertext.len(),
        ciphertext.len() - message.len()
    );
    at_bob.decrypt(tern_wire::messages::E2eType::OlmMessage, &ciphertext).unwrap();
    let (mut fresh, _) = pair_before_reply();
    let (_, prekey) = fresh.encrypt(&message);
    println!("olm pre-key message for a 100-byte plaintext: {} bytes", prekey.len());

    let mut group = c.benchmark_group("olm");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encrypt+decrypt 100 B", |b| {
        b.iter(|| {
            let (ty, ciphertext) = to_bob.encrypt(&message);
            at_bob.decrypt(ty, &ciphertext).unwrap()
        })
    });
    group.bench_function("encrypt 100 B", |b| b.iter(|| to_bob.encrypt(&message)));
    group.finish();
}

// criterion's macros generate undocumented functions.
#[allow(missing_docs)]
mod harness {
    use super::*;
    criterion_group!(benches, olm);
}
criterion_main!(harness::benches);
