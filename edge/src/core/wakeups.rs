//! Waking offline devices: one push per absence.
//!
//! When an envelope is queued for a device homed here that has no connection and
//! registered a push endpoint, the core asks the runtime for one wake-up
//! ([`Effect::Push`]) — and no more for that device until it connects again, however
//! many messages follow. A push carries no content. The runtime reports an endpoint the
//! push service says is gone; it is removed unless the device registered another.

use std::collections::HashSet;

use tern_engine::{StateOp, Storage};
use tern_wire::messages::{
    ArchivedPushRegister, DeviceId, Done, PushProvider, PushRegister, UserId,
};
use tern_wire::MessageType;

use super::conns::ConnId;
use super::effects::Effect;
use super::shared::Shared;
use crate::push::PushJob;
use crate::refusal::{AccountRefusal, SessionRefusal, StorageRefusal};

/// Push endpoint addresses are at most this long (a URL or a provider token).
const PUSH_ADDRESS_BYTES_MAX: usize = 4096;

/// The devices already woken since they were last connected.
#[derive(Debug, Default)]
pub struct Wakeups {
    woken: HashSet<(UserId, DeviceId)>,
}

impl Wakeups {
    /// `device` connected: its next absence gets a wake-up again.
    pub fn connected(&mut self, device: (UserId, DeviceId)) {
        self.woken.remove(&device);
    }

    /// `device` is gone (unlinked, deleted).
    pub fn forget(&mut self, device: (UserId, DeviceId)) {
        self.woken.remove(&device);
    }

    /// Asks for one wake-up of `device` (homed here) if it is offline, has a push
    /// endpoint and was not woken since it last connected.
    pub fn wake_if_offline<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        device: (UserId, DeviceId),
    ) {
        if shared.conns.online(device).is_some() || self.woken.contains(&device) {
            return;
        }
        let Some(shard) = shared.shards.home_of(device.0) else { return };
        let endpoint =
            shard.borrow().state().device(device.0, device.1).and_then(|d| d.push.clone());
        if let Some(endpoint) = endpoint {
            self.woken.insert(device);
            shared.effects.push(Effect::Push(PushJob { device, endpoint }));
        }
    }

    /// A device registers (or removes) its push endpoint.
    pub fn register<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        register: &ArchivedPushRegister,
    ) {
        let ty = MessageType::PushRegister.code();
        let Ok(register) = rkyv::deserialize::<PushRegister, rkyv::rancor::Failure>(register)
        else {
            return shared.conns.refuse(conn, rid, ty, &SessionRefusal::Unreadable);
        };
        if let Some(endpoint) = &register.endpoint {
            let valid = endpoint.address.len() <= PUSH_ADDRESS_BYTES_MAX
                && match endpoint.provider {
                    PushProvider::UnifiedPush => {
                        crate::code_sender::WebhookUrl::parse(&endpoint.address).is_ok()
                    }
                    PushProvider::Apns | PushProvider::Fcm => !endpoint.address.is_empty(),
                };
            if !valid {
                return shared.conns.refuse(conn, rid, ty, &AccountRefusal::BadEndpoint);
            }
        }
        let op = StateOp::SetPush { user_id: me.0, device_id: me.1, endpoint: register.endpoint };
        match shared.shards.apply_for(me.0, op) {
            Some(Ok(wait)) => {
                self.woken.remove(&me);
                shared.reply_when_durable(conn, rid, &Done {}, vec![wait]);
            }
            Some(Err(error)) => shared.conns.refuse(conn, rid, ty, &StorageRefusal::of(&error)),
            None => shared.conns.refuse(conn, rid, ty, &SessionRefusal::WrongCore),
        }
    }

    /// The push service said `job`'s endpoint is gone: forget it (unless the device
    /// registered another meanwhile).
    pub fn gone<S: Storage>(&mut self, shared: &mut Shared<S>, job: &PushJob) {
        let (user_id, device_id) = job.device;
        let Some(shard) = shared.shards.home_of(user_id) else { return };
        let current =
            shard.borrow().state().device(user_id, device_id).and_then(|d| d.push.clone());
        if current.as_ref() != Some(&job.endpoint) {
            return;
        }
        tracing::info!(user_id, device_id, "push endpoint gone; removed");
        let op = StateOp::SetPush { user_id, device_id, endpoint: None };
        if let Some(Err(error)) = shared.shards.apply_for(user_id, op) {
            tracing::warn!(%error, "could not remove a gone push endpoint");
        }
    }
}
