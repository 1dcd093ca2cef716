//! 1:1 messages: from a validated `SendMessage` to the **sent** tick.
//!
//! The sender's core checks the rules every send obeys ([`Delivery::check`]: a client
//! kind, no `Plain` copy, the device's rate), then, for a user peer, the copies against
//! the devices of the recipient and of the sender's other devices, and allocates the
//! server message id on the sender's home shard. A recipient homed on this core gets
//! its copies appended at once (the hot path, no copy of the ciphertexts); one homed
//! elsewhere gets them in a [`StoreCopies`] call, which its core checks (dedup, block,
//! devices) and answers once durable, and only then are the sender's own other devices'
//! copies appended here. The sent tick waits for every copy to be durable.
//!
//! Submodules: [`store`] appends envelopes (and serves the calls that store them),
//! [`mailbox`] feeds connections and keeps quotas, [`receipts`] routes delivered/read
//! receipts and deletions for everyone, and [`server_envelope`], below them all, archives
//! and appends server-made envelopes.

pub mod mailbox;
pub mod receipts;
pub mod server_envelope;
pub mod store;

use std::collections::HashMap;

use tern_engine::{AccountRecord, Storage};
use tern_wire::messages::{
    ArchivedConversation, ArchivedE2eType, ArchivedEnvelopeKind, ArchivedSendMessage, DeviceId,
    EnvelopeKind, MediaId, SendAck, UserId,
};

use super::conns::ConnId;
use super::media::Media;
use super::shared::Shared;
use super::wakeups::Wakeups;
use crate::limits::RateLimiter;
use crate::mesh::calls::{StoreCopies, Stored};
use crate::mesh::{EnvelopeMeta, OwnedCopy};
use crate::refusal::{SendRefusal, StorageRefusal};
use crate::routing::home_shard_of_user;

/// A send to a user homed elsewhere, waiting for the recipient's core.
#[derive(Debug)]
struct PendingSend {
    conn: ConnId,
    rid: u32,
    meta: EnvelopeMeta,
    /// The sender's own other devices' copies, stored here once the recipient's are.
    own_copies: Vec<OwnedCopy>,
    since_us: u64,
}

/// The delivery state of one core.
#[derive(Debug)]
pub struct Delivery {
    send_limits: RateLimiter<(UserId, DeviceId)>,
    /// 1:1 sends to users who never wrote to the sender's account.
    stranger_limits: RateLimiter<(UserId, DeviceId)>,
    sends: HashMap<u64, PendingSend>,
    receipts: receipts::Receipts,
}

/// The conversation a send is for.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// A user.
    User(UserId),
    /// A group.
    Group(u64),
}

impl Delivery {
    /// Empty, with the per-device send rates (to anyone, and to strangers).
    pub fn new(send_rate: crate::limits::Rate, stranger_rate: crate::limits::Rate) -> Delivery {
        Delivery {
            send_limits: RateLimiter::new(send_rate),
            stranger_limits: RateLimiter::new(stranger_rate),
            sends: HashMap::new(),
            receipts: Default::default(),
        }
    }

    /// Receipts and deletions waiting for other cores.
    pub fn receipts(&mut self) -> &mut receipts::Receipts {
        &mut self.receipts
    }

    /// The rules every send obeys; gives the envelope kind and the conversation.
    pub fn check<S: Storage>(
        &mut self,
        shared: &Shared<S>,
        me: (UserId, DeviceId),
        send: &ArchivedSendMessage,
    ) -> Result<(EnvelopeKind, Target), SendRefusal> {
        let kind = match send.kind {
            ArchivedEnvelopeKind::Text => EnvelopeKind::Text,
            ArchivedEnvelopeKind::Media => EnvelopeKind::Media,
            ArchivedEnvelopeKind::Control => EnvelopeKind::Control,
            _ => return Err(SendRefusal::NotAClientKind),
        };
        // `Plain` marks server-made envelopes (receipts, notices, group events): a client
        // may not dress its own bytes up as one.
        if send.copies.iter().any(|copy| copy.e2e_type == ArchivedE2eType::Plain) {
            return Err(SendRefusal::PlainCopy);
        }
        if let Err(wait_ms) = self.send_limits.take(me, shared.now_ms()) {
            return Err(SendRefusal::RateLimited {
                retry_after_ms: crate::refusal::retry_hint(wait_ms),
            });
        }
        Ok(match &send.to {
            ArchivedConversation::User(peer) => (kind, Target::User(peer.to_native())),
            ArchivedConversation::Group(group) => (kind, Target::Group(group.to_native())),
        })
    }

    /// A 1:1 send from `me` (homed here) to `peer`: checks, stores, answers.
    #[allow(clippy::too_many_arguments)]
    pub fn send_to_user<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        wakeups: &mut Wakeups,
        media: &mut Media,
        (conn, rid): (ConnId, u32),
        me: (UserId, DeviceId),
        send: &ArchivedSendMessage,
        (kind, peer): (EnvelopeKind, UserId),
    ) -> Result<(), SendRefusal> {
        let client_message_id = send.client_message_id.to_native();
        let peer_shard = home_shard_of_user(peer);
        if !shared.shards.exists(peer_shard) {
            return Err(SendRefusal::NoSuchUser);
        }
        if !shared.homes.serves(peer_shard) {
            return Err(SendRefusal::OtherNode { shard: peer_shard });
        }
        // An account has at most a handful of devices: sorted vectors beat hash sets here.
        let mut given: Vec<(UserId, DeviceId)> =
            send.copies.iter().map(|c| (c.user_id.to_native(), c.device_id.to_native())).collect();
        given.sort_unstable();
        if given.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(SendRefusal::DuplicateCopy);
        }
        let peer_is_local = shared.shards.local(peer_shard).is_some();
        if peer_is_local {
            if let Some((ack, wait)) = store::duplicate_of(shared, me, peer, client_message_id) {
                shared.reply_when_durable(conn, rid, &ack, vec![wait]);
                return Ok(());
            }
        }
        expect_copies(shared, me, peer, peer_is_local, given)?;
        if peer != me.0 && !wrote_to(shared, peer, me.0) {
            if let Err(wait_ms) = self.stranger_limits.take(me, shared.now_ms()) {
                let retry_after_ms = crate::refusal::retry_hint(wait_ms);
                return Err(SendRefusal::StrangerRate { retry_after_ms });
            }
        }
        if kind == EnvelopeKind::Media && peer != me.0 {
            grant_media(shared, media, me.0, peer, send);
        }
        let meta = self.meta(shared, me, peer, kind, send)?;
        if peer_is_local {
            return self.store_here(shared, wakeups, conn, rid, &meta, send);
        }
        self.store_there(shared, conn, rid, meta, send);
        Ok(())
    }

    /// The envelope fields every copy shares; allocates the id on the sender's shard.
    fn meta<S: Storage>(
        &self,
        shared: &mut Shared<S>,
        me: (UserId, DeviceId),
        peer: UserId,
        kind: EnvelopeKind,
        send: &ArchivedSendMessage,
    ) -> Result<EnvelopeMeta, SendRefusal> {
        let now_ms = shared.now_ms();
        let Some(sender_shard) = shared.shards.home_of(me.0) else {
            return Err(SendRefusal::Storage { refusal: StorageRefusal::Failed });
        };
        let server_message_id = sender_shard.borrow_mut().allocate_message_id(now_ms);
        Ok(EnvelopeMeta {
            server_message_id,
            client_message_id: send.client_message_id.to_native(),
            server_time_ms: now_ms,
            expires_ms: now_ms + ttl_ms(&shared.config, send.ttl_s.to_native()),
            sender: me,
            peer,
            kind,
        })
    }

    /// Appends every copy here (sender and recipient homed on this core).
    fn store_here<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        wakeups: &mut Wakeups,
        conn: ConnId,
        rid: u32,
        meta: &EnvelopeMeta,
        send: &ArchivedSendMessage,
    ) -> Result<(), SendRefusal> {
        let (me, peer) = (meta.sender.0, meta.peer);
        let blocked = peer != me && shared.shards.blocked_by(peer, me);
        for copy in send.copies.iter().filter(|c| !blocked && c.user_id.to_native() == peer) {
            let device = (peer, copy.device_id.to_native());
            mailbox::admit(shared, device, me, copy.ciphertext.len() as u64)?;
        }
        let copies = send
            .copies
            .iter()
            .map(|c| {
                (
                    (c.user_id.to_native(), c.device_id.to_native()),
                    store::e2e_type_of(&c.e2e_type),
                    c.ciphertext.as_slice(),
                )
            })
            .filter(|((owner, _), _, _)| !(blocked && *owner == peer));
        let waits = store::append_copies(shared, wakeups, meta, copies)
            .map_err(|error| SendRefusal::Storage { refusal: StorageRefusal::of(&error) })?;
        shared.counters.messages_sent += 1;
        let ack = sent_ack(meta, false);
        let started = Some(shared.now.mono_us);
        shared.reply_when_durable_timed(conn, rid, &ack, waits, started);
        Ok(())
    }

    /// Asks the recipient's core to store its copies first; ours follow on its answer.
    fn store_there<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        meta: EnvelopeMeta,
        send: &ArchivedSendMessage,
    ) {
        let (peer_copies, own_copies): (Vec<_>, Vec<_>) = send
            .copies
            .iter()
            .map(|c| {
                let copy = OwnedCopy {
                    device_id: c.device_id.to_native(),
                    e2e_type: store::e2e_type_of(&c.e2e_type),
                    ciphertext: c.ciphertext.to_vec(),
                };
                (c.user_id.to_native(), copy)
            })
            .partition(|(owner, _)| *owner == meta.peer);
        let call = StoreCopies { meta, copies: peer_copies.into_iter().map(|(_, c)| c).collect() };
        let to = shared.shards.address_of(home_shard_of_user(meta.peer));
        let token = shared.outbox.ask(to, call);
        let own_copies = own_copies.into_iter().map(|(_, c)| c).collect();
        let since_us = shared.now.mono_us;
        self.sends.insert(token, PendingSend { conn, rid, meta, own_copies, since_us });
    }

    /// The recipient's core answered a [`StoreCopies`]: finish the send.
    pub fn on_stored<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        wakeups: &mut Wakeups,
        token: u64,
        answer: Result<Stored, SendRefusal>,
    ) {
        let Some(pending) = self.sends.remove(&token) else { return };
        let PendingSend { conn, rid, meta, own_copies, since_us } = pending;
        let client_message_id = meta.client_message_id;
        match answer {
            Ok(Stored::New) => {
                let me = meta.sender.0;
                let copies =
                    own_copies.iter().map(|c| ((me, c.device_id), c.e2e_type, &c.ciphertext[..]));
                match store::append_copies(shared, wakeups, &meta, copies) {
                    Ok(waits) => {
                        shared.counters.messages_sent += 1;
                        let ack = sent_ack(&meta, false);
                        shared.reply_when_durable_timed(conn, rid, &ack, waits, Some(since_us));
                    }
                    Err(error) => {
                        let refusal = SendRefusal::Storage { refusal: StorageRefusal::of(&error) };
                        shared.conns.refuse_send(conn, rid, client_message_id, &refusal);
                    }
                }
            }
            Ok(Stored::Duplicate(server_message_id)) => {
                let ack = SendAck {
                    client_message_id,
                    server_message_id,
                    server_time_ms: shared.now_ms(),
                    duplicate: true,
                };
                shared.conns.send(conn, rid, &ack);
            }
            Err(refusal) => shared.conns.refuse_send(conn, rid, client_message_id, &refusal),
        }
    }
}

/// The sent tick of `meta`'s message.
fn sent_ack(meta: &EnvelopeMeta, duplicate: bool) -> SendAck {
    SendAck {
        client_message_id: meta.client_message_id,
        server_message_id: meta.server_message_id,
        server_time_ms: meta.server_time_ms,
        duplicate,
    }
}

/// An envelope's time to live: the sender's wish, at most the server's default.
pub fn ttl_ms(config: &super::config::CoreConfig, ttl_s: u32) -> u64 {
    match ttl_s {
        0 => config.default_ttl_ms,
        s => (u64::from(s) * 1000).min(config.default_ttl_ms),
    }
}

/// Whether `writer` ever sent a message to a device of `reader` (homed here): the
/// shard's per-sender numbering, kept across restarts, says so. Those who never did are
/// strangers to `reader`, and `reader`'s sends to them have a budget of their own.
fn wrote_to<S: Storage>(shared: &Shared<S>, writer: UserId, reader: UserId) -> bool {
    let Some(handle) = shared.shards.home_of(reader) else { return false };
    let shard = handle.borrow();
    let wrote = |device: DeviceId| shard.next_conversation_seq((reader, device), writer) > 1;
    let any_device = |account: &AccountRecord| account.devices.iter().any(|d| wrote(d.device_id));
    shared.shards.with_account(reader, any_device).unwrap_or(false)
}

/// The copies must match the recipient's devices and the sender's other devices; those
/// of a recipient homed on another core are checked there.
fn expect_copies<S: Storage>(
    shared: &Shared<S>,
    me: (UserId, DeviceId),
    peer: UserId,
    peer_is_local: bool,
    mut given: Vec<(UserId, DeviceId)>,
) -> Result<(), SendRefusal> {
    let mut expected = if peer_is_local {
        let mut expected = shared.shards.devices_of(peer).ok_or(SendRefusal::NoSuchUser)?;
        if peer != me.0 {
            expected.extend(shared.shards.devices_of(me.0).unwrap_or_default());
        }
        expected
    } else {
        given.retain(|d| d.0 != peer);
        shared.shards.devices_of(me.0).unwrap_or_default()
    };
    expected.retain(|d| *d != me);
    store::check_copies(&expected, &given)
}

/// A media message's copies start with the blob's id in clear (protocol convention):
/// its recipient may download the blob.
fn grant_media<S: Storage>(
    shared: &mut Shared<S>,
    media: &mut Media,
    me: UserId,
    peer: UserId,
    send: &ArchivedSendMessage,
) {
    let Some(copy) = send.copies.iter().find(|c| c.user_id.to_native() == peer) else { return };
    let Some(id) = copy.ciphertext.get(..16) else { return };
    let Ok(media_id) = <MediaId>::try_from(id) else { return };
    media.grant(shared, me, &media_id, &[peer]);
}
