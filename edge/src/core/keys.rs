//! Keys: prekey uploads, key-bundle hand-out, the device list.
//!
//! Each one-time prekey is handed out exactly once, even across a crash: it leaves the
//! stock (a durable record) before the bundle carrying it is answered. Fetches are
//! limited per (requester, target) pair: a client needs a handful per contact,
//! draining someone's keys needs many. Uploaded prekeys' signatures are checked off
//! the core's thread (a hundred Ed25519 checks take milliseconds).

use std::collections::HashMap;

use tern_engine::{DeviceRecord, Shard, StateOp, Storage, WriteError};
use tern_wire::messages::{
    ArchivedFetchBundles, ArchivedUploadKeys, Bundles, DeviceBundle, DeviceId, DeviceInfo,
    DeviceList, Done, KeysLow, KeysUploaded, NewDevice, UploadKeys, UserId,
};
use tern_wire::MessageType;

use super::conns::ConnId;
use super::shards::Waits;
use super::shared::Shared;
use crate::limits::{HourlyWindow, Rate, RateLimiter};
use crate::mesh::calls::ClaimBundles;
use crate::mesh::ReplyTo;
use crate::refusal::{retry_hint, KeysRefusal, OtherNodeRefusal, SessionRefusal, StorageRefusal};
use crate::routing::home_shard_of_user;
use crate::work::CheckPrekeys;

/// A device is told to upload more one-time prekeys below this stock.
pub const ONE_TIME_KEYS_LOW: u32 = 15;

/// One-time keys one frame (a registration, a link request, an upload) may carry.
pub const ONE_TIME_KEYS_PER_FRAME_MAX: usize = 100;
/// One-time keys the server holds for one device at most.
pub const ONE_TIME_KEYS_STOCK_MAX: usize = 500;
/// Bytes of a device's name at most.
pub const DEVICE_NAME_BYTES_MAX: usize = 64;

/// A new device (registering or linking) within the limits, checked before its keys'
/// signatures cost any work.
pub fn check_new_device(device: &NewDevice) -> Result<(), KeysRefusal> {
    let bytes = device.name.len();
    if bytes > DEVICE_NAME_BYTES_MAX {
        return Err(KeysRefusal::NameTooLong { bytes, max: DEVICE_NAME_BYTES_MAX });
    }
    check_keys_in_frame(device.keys.one_time_keys.len())
}

/// One-time keys the server holds for `device`.
fn stock_of<S: Storage>(shard: &Shard<S>, device: (UserId, DeviceId)) -> usize {
    shard.state().device(device.0, device.1).map_or(0, |d| d.one_time_keys.len())
}

fn check_keys_in_frame(count: usize) -> Result<(), KeysRefusal> {
    match count > ONE_TIME_KEYS_PER_FRAME_MAX {
        true => Err(KeysRefusal::TooManyInFrame { count, max: ONE_TIME_KEYS_PER_FRAME_MAX }),
        false => Ok(()),
    }
}

/// An upload whose signatures are being checked.
#[derive(Debug)]
struct PendingUpload {
    conn: ConnId,
    rid: u32,
    me: (UserId, DeviceId),
    upload: UploadKeys,
}

/// The key state of one core.
#[derive(Debug)]
pub struct Keys {
    fetch_limits: RateLimiter<(UserId, UserId)>,
    /// Fetches of each user homed here that took one-time keys, in the last hour: past
    /// its limit (`CoreConfig::one_time_key_fetches_per_hour`) the bundles carry only
    /// the fallback key, so many accounts together cannot drain a user's one-time keys
    /// (each pair has its own limit, so one account per target was enough before).
    one_time_fetches: HourlyWindow<UserId>,
    /// Fetches waiting for the target's core: token → (connection, request, target).
    fetches: HashMap<u64, (ConnId, u32, UserId)>,
    /// Uploads waiting for their signature check, by work token.
    uploads: HashMap<u64, PendingUpload>,
}

impl Keys {
    /// Empty, with the per-pair fetch rate and the per-user hourly budget of fetches
    /// that take one-time keys.
    pub fn new(fetch_rate: Rate, one_time_fetches_per_hour: u32) -> Keys {
        Keys {
            fetch_limits: RateLimiter::new(fetch_rate),
            one_time_fetches: HourlyWindow::new(one_time_fetches_per_hour),
            fetches: HashMap::new(),
            uploads: HashMap::new(),
        }
    }

    /// A device uploads prekeys: their signatures are checked first (off the core).
    pub fn upload<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        upload: &ArchivedUploadKeys,
    ) {
        let ty = MessageType::UploadKeys.code();
        let Ok(upload) = rkyv::deserialize::<UploadKeys, rkyv::rancor::Failure>(upload) else {
            return shared.conns.refuse(conn, rid, ty, &KeysRefusal::UnreadableKeys);
        };
        let Some(signing_key) = shared.shards.signing_key(me.0, me.1) else {
            return shared.conns.refuse(conn, rid, ty, &SessionRefusal::WrongCore);
        };
        // The stock is checked when the keys are stored (`on_prekeys_checked`): uploads
        // in flight at once would all pass a check made here.
        if let Err(refusal) = check_keys_in_frame(upload.one_time_keys.len()) {
            return shared.conns.refuse(conn, rid, ty, &refusal);
        }
        let prekeys =
            upload.one_time_keys.iter().chain(upload.fallback_key.as_ref()).cloned().collect();
        let token = shared.effects.work(CheckPrekeys { signing_key, prekeys });
        self.uploads.insert(token, PendingUpload { conn, rid, me, upload });
    }

    /// An upload's signatures were checked: store the keys, or refuse them all.
    pub fn on_prekeys_checked<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        token: u64,
        valid: bool,
    ) {
        let Some(PendingUpload { conn, rid, me, upload }) = self.uploads.remove(&token) else {
            return;
        };
        let ty = MessageType::UploadKeys.code();
        if !valid {
            return shared.conns.refuse(conn, rid, ty, &KeysRefusal::BadSignature);
        }
        let Some(handle) = shared.shards.home_of(me.0).cloned() else { return };
        let stock = stock_of(&handle.borrow(), me);
        if stock + upload.one_time_keys.len() > ONE_TIME_KEYS_STOCK_MAX {
            let refusal = KeysRefusal::StockFull { stock, max: ONE_TIME_KEYS_STOCK_MAX };
            return shared.conns.refuse(conn, rid, ty, &refusal);
        }
        let stored = (|| {
            let mut shard = handle.borrow_mut();
            let mut seq = shard.appended_seq();
            if let Some(key) = upload.fallback_key {
                seq = shard.apply_state(StateOp::SetFallbackKey {
                    user_id: me.0,
                    device_id: me.1,
                    key,
                })?;
            }
            if !upload.one_time_keys.is_empty() {
                let keys = upload.one_time_keys;
                seq = shard.apply_state(StateOp::AddOneTimeKeys {
                    user_id: me.0,
                    device_id: me.1,
                    keys,
                })?;
            }
            Ok::<_, WriteError>((seq, stock_of(&shard, me) as u32))
        })();
        match stored {
            Ok((seq, stock)) => {
                let reply = KeysUploaded { one_time_keys_stored: stock };
                shared.reply_when_durable(conn, rid, &reply, vec![(home_shard_of_user(me.0), seq)]);
            }
            Err(error) => shared.conns.refuse(conn, rid, ty, &StorageRefusal::of(&error)),
        }
    }

    /// A device fetches another user's key bundles (from that user's core).
    pub fn fetch<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        fetch: &ArchivedFetchBundles,
    ) {
        let ty = MessageType::FetchBundles.code();
        let target = fetch.user_id.to_native();
        if let Err(wait_ms) = self.fetch_limits.take((me.0, target), shared.now_ms()) {
            let refusal = KeysRefusal::RateLimited { retry_after_ms: retry_hint(wait_ms) };
            return shared.conns.refuse(conn, rid, ty, &refusal);
        }
        let shard = home_shard_of_user(target);
        if !shared.shards.exists(shard) {
            return shared.conns.refuse(conn, rid, ty, &KeysRefusal::NoSuchUser);
        }
        if !shared.homes.serves(shard) {
            return shared.conns.refuse(conn, rid, ty, &OtherNodeRefusal { shard });
        }
        let wanted = fetch.device_ids.iter().map(|d| d.to_native()).collect();
        let token =
            shared.outbox.ask(shared.shards.address_of(shard), ClaimBundles { target, wanted });
        self.fetches.insert(token, (conn, rid, target));
    }

    /// The target's core handed out the bundles.
    pub fn on_bundles<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        token: u64,
        answer: Result<Bundles, KeysRefusal>,
    ) {
        let Some((conn, rid, _)) = self.fetches.remove(&token) else { return };
        match answer {
            Ok(bundles) => shared.conns.send(conn, rid, &bundles),
            Err(refusal) => {
                shared.conns.refuse(conn, rid, MessageType::FetchBundles.code(), &refusal)
            }
        }
    }
}

/// Hands out the key bundles of `target` (homed here), answered once the claimed keys
/// have left the stock durably. Devices whose stock runs low are told.
impl Keys {
    /// On the target's core: its bundles, with one-time keys while the target's hourly
    /// budget of such fetches lasts (the fallback key alone after it).
    pub fn serve_claim<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        call: ClaimBundles,
        reply_to: Option<ReplyTo<ClaimBundles>>,
    ) {
        let now_ms = shared.now_ms();
        let with_one_time_keys = self.one_time_fetches.check(&call.target, now_ms).is_ok();
        if with_one_time_keys {
            self.one_time_fetches.record(call.target, now_ms);
        }
        match claim_bundles(shared, call.target, &call.wanted, with_one_time_keys) {
            Ok((bundles, waits)) => shared.answer_when_durable(reply_to, Ok(bundles), waits),
            Err(refusal) => shared.answer(reply_to, Err(refusal)),
        }
    }
}

/// The bundles of `target`'s devices (`wanted`, or all), each with a one-time key claimed
/// from its stock (if `with_one_time_keys`), and the account's signed device list as
/// stored.
fn claim_bundles<S: Storage>(
    shared: &mut Shared<S>,
    target: UserId,
    wanted: &[DeviceId],
    with_one_time_keys: bool,
) -> Result<(Bundles, Waits), KeysRefusal> {
    let shard_id = home_shard_of_user(target);
    let handle = shared.shards.local(shard_id).cloned().ok_or(KeysRefusal::NoSuchUser)?;
    let (devices, device_list): (Vec<DeviceRecord>, Vec<u8>) = shared
        .shards
        .with_account(target, |a| {
            let devices = a
                .devices
                .iter()
                .filter(|d| wanted.is_empty() || wanted.contains(&d.device_id))
                .cloned()
                .collect();
            (devices, a.device_list.clone())
        })
        .ok_or(KeysRefusal::NoSuchUser)?;
    let mut bundles = Vec::with_capacity(devices.len());
    let mut waits = Vec::new();
    for device in devices {
        let claimed = match with_one_time_keys {
            true => handle.borrow_mut().claim_one_time_key(target, device.device_id),
            false => Ok(None),
        };
        let one_time_key = match claimed {
            Ok(Some((key, seq))) => {
                waits.push((shard_id, seq));
                Some(key)
            }
            Ok(None) => None,
            Err(error) => {
                tracing::error!(%error, "storage refused a write");
                return Err(KeysRefusal::Storage { refusal: StorageRefusal::of(&error) });
            }
        };
        let left = device.one_time_keys.len().saturating_sub(1) as u32;
        if left < ONE_TIME_KEYS_LOW {
            if let Some(owner) = shared.conns.online((target, device.device_id)) {
                let event = KeysLow { one_time_keys_remaining: left, threshold: ONE_TIME_KEYS_LOW };
                shared.conns.send(owner, 0, &event);
            }
        }
        bundles.push(DeviceBundle {
            device_id: device.device_id,
            identity_key: device.identity_key,
            signing_key: device.signing_key,
            one_time_key,
            fallback_key: device.fallback_key,
        });
    }
    Ok((Bundles { user_id: target, devices: bundles, device_list }, waits))
}

/// The most bytes a signed device list may have: 16 devices of 68 bytes, the header
/// and the signature take 1,185; the rest is room for a later format.
pub const DEVICE_LIST_BYTES_MAX: usize = 4096;

/// The primary device publishes its signed device list: stored with the account as
/// bytes the server never reads, served with every `Bundles` of the account, answered
/// `Done` once durable.
pub fn publish_device_list<S: Storage>(
    shared: &mut Shared<S>,
    (conn, rid): (ConnId, u32),
    me: (UserId, DeviceId),
    device_list: &[u8],
) {
    let ty = MessageType::PublishDeviceList.code();
    if me.1 != 1 {
        return shared.conns.refuse(conn, rid, ty, &KeysRefusal::NotPrimary);
    }
    if device_list.len() > DEVICE_LIST_BYTES_MAX {
        let refusal = KeysRefusal::DeviceListTooLarge {
            bytes: device_list.len(),
            max: DEVICE_LIST_BYTES_MAX,
        };
        return shared.conns.refuse(conn, rid, ty, &refusal);
    }
    let op = StateOp::SetDeviceList { user_id: me.0, device_list: device_list.to_vec() };
    match shared.shards.apply_for(me.0, op) {
        Some(Ok(wait)) => shared.reply_when_durable(conn, rid, &Done {}, vec![wait]),
        Some(Err(error)) => shared.conns.refuse(conn, rid, ty, &StorageRefusal::of(&error)),
        None => shared.conns.refuse(conn, rid, ty, &KeysRefusal::NoSuchUser),
    }
}

/// A device asks for its account's devices.
pub fn device_list<S: Storage>(
    shared: &mut Shared<S>,
    conn: ConnId,
    rid: u32,
    me: (UserId, DeviceId),
) {
    let devices = shared
        .shards
        .with_account(me.0, |a| {
            a.devices
                .iter()
                .map(|d| DeviceInfo {
                    device_id: d.device_id,
                    name: d.name.clone(),
                    created_ms: d.created_ms,
                    last_seen_ms: 0,
                    primary: d.device_id == 1,
                })
                .collect()
        })
        .unwrap_or_default();
    shared.conns.send(conn, rid, &DeviceList { devices });
}
