//! Server-made envelopes at their lowest level: archiving a body, and appending one
//! envelope for a set of devices, with no quota check.
//!
//! Both sides of a mailbox use it: `store.rs` appends server envelopes after making room,
//! and `mailbox.rs` writes its `Dropped` notices while making room. It names nothing
//! else of `delivery/`, so neither of those depends on the other through it.

use tern_engine::{Storage, WriteError};
use tern_wire::messages::{Conversation, DeviceId, E2eType, EnvelopeKind, UserId};
use tern_wire::EnvelopeRef;

use crate::core::shards::Waits;
use crate::core::shared::Shared;
use crate::routing::home_shard_of_user;

/// Appends one server-made envelope for `devices` (all homed on one shard here).
pub fn append_envelope_to<S: Storage>(
    shared: &mut Shared<S>,
    devices: Vec<(UserId, DeviceId)>,
    from: (UserId, DeviceId),
    kind: EnvelopeKind,
    body: &[u8],
) -> Result<Waits, WriteError> {
    let Some(first) = devices.first() else { return Ok(Vec::new()) };
    let shard_id = home_shard_of_user(first.0);
    let Some(handle) = shared.shards.local(shard_id).cloned() else { return Ok(Vec::new()) };
    let now_ms = shared.now_ms();
    let mut shard = handle.borrow_mut();
    let envelope = EnvelopeRef {
        server_message_id: shard.allocate_message_id(now_ms),
        client_message_id: 0,
        server_time_ms: now_ms,
        expires_ms: now_ms + shared.config.default_ttl_ms,
        sender_user: from.0,
        sender_device: from.1,
        conversation: Conversation::User(from.0),
        conversation_seq: 0,
        kind,
        e2e_type: E2eType::Plain,
        body,
    };
    let appended = shard.append_envelope(&envelope, &devices)?;
    drop(shard);
    for device in devices {
        shared.durable.mark_dirty(device, shard_id, appended.record_seq);
    }
    Ok(vec![(shard_id, appended.record_seq)])
}

/// Archives a server-made body (receipts, notices, group events: plain data that
/// always archives; a failure is logged and nothing is sent).
pub fn archive<T>(body: &T) -> Option<Vec<u8>>
where
    T: for<'a, 'b> rkyv::Serialize<tern_wire::WireSerializer<'a, 'b>>,
{
    let mut bytes = Vec::new();
    match tern_wire::encode_archive(&mut bytes, body) {
        Ok(_) => Some(bytes),
        Err(error) => {
            tracing::error!(%error, "a server-made body did not archive");
            None
        }
    }
}
