//! Helpers shared by the engine's integration tests: envelopes, a blocking executor,
//! and a way to read a mailbox back as owned values.

#![allow(dead_code)] // Each test binary uses a different subset.

use futures_lite::future::block_on;
use tern_engine::{ShardConfig, ShardHandle, Storage};
use tern_wire::messages::{Conversation, E2eType, EnvelopeKind};
use tern_wire::EnvelopeRef;

/// Far enough in the future that nothing expires unless a test says so.
pub const NOW_MS: u64 = 1_800_000_000_000;

/// A small config so tests roll segments often.
pub fn small_config() -> ShardConfig {
    let mut config = ShardConfig::new(3);
    config.segment_bytes = 64 * 1024;
    config
}

/// An envelope from `sender` with `body`, expiring in 30 days.
pub fn envelope(
    sender: u64,
    client_message_id: u64,
    server_message_id: u64,
    body: &[u8],
) -> EnvelopeRef<'_> {
    EnvelopeRef {
        server_message_id,
        client_message_id,
        server_time_ms: NOW_MS,
        expires_ms: NOW_MS + 30 * 86_400_000,
        sender_user: sender,
        sender_device: 1,
        conversation: Conversation::User(sender),
        conversation_seq: client_message_id,
        kind: EnvelopeKind::Text,
        e2e_type: E2eType::OlmMessage,
        body,
    }
}

/// Opens a shard, panicking with the error.
pub fn open<S: Storage>(storage: S, config: ShardConfig) -> ShardHandle<S> {
    block_on(ShardHandle::open(storage, config)).expect("shard opens")
}

/// The bodies of every envelope readable in a mailbox, in order, with their sequence.
pub fn read_all<S: Storage>(shard: &ShardHandle<S>, device: (u64, u32)) -> Vec<(u64, Vec<u8>)> {
    let shard = shard.borrow();
    let read = shard.read_mailbox(device, 0, usize::MAX, NOW_MS);
    assert!(read.corrupt.is_empty(), "corrupt entries: {:?}", read.corrupt);
    read.entries
        .iter()
        .map(|e| {
            let envelope = rkyv::access::<
                tern_wire::messages::ArchivedEnvelope,
                rkyv::rancor::Failure,
            >(e.envelope)
            .expect("stored envelope validates");
            (e.mailbox_seq, envelope.body.to_vec())
        })
        .collect()
}
