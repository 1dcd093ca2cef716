//! Waking offline devices: the `PushSender` seam.
//!
//! When an envelope is queued for a device that has no connection and registered a push
//! endpoint (`PushRegister`), the core asks for one push — and no more for that device
//! until it connects again, however many messages follow (a burst of 100 messages is one
//! wake-up). A push carries no content, only "connect": the messages stay on the server,
//! end-to-end encrypted, until the device fetches them. The runtime runs the sender and
//! reports an endpoint the push service says is gone (HTTP 404/410), which the core then
//! removes.
//!
//! `LogPushSender` writes to the log (development). The HTTP sender for UnifiedPush
//! endpoints (POST, retries with backoff) is I/O and lives in `runtime::webhook`; APNs
//! and FCM senders would be two more implementations of the same trait.

use std::future::Future;
use std::pin::Pin;

use tern_wire::messages::{DeviceId, PushEndpoint, UserId};

/// What became of one push.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// The push service accepted it.
    Delivered,
    /// The endpoint no longer exists: forget it.
    Gone,
    /// It failed after retries (logged); the endpoint is kept.
    Failed,
}

/// One wake-up to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushJob {
    /// The device to wake.
    pub device: (UserId, DeviceId),
    /// Where.
    pub endpoint: PushEndpoint,
}

/// Sends wake-ups to a push service.
pub trait PushSender {
    /// Sends one push; the future resolves once it was delivered, refused or given up.
    fn push(&self, job: PushJob) -> Pin<Box<dyn Future<Output = PushOutcome>>>;
}

/// Writes pushes to the log instead of sending them (development).
#[derive(Clone, Copy, Debug, Default)]
pub struct LogPushSender;

impl PushSender for LogPushSender {
    fn push(&self, job: PushJob) -> Pin<Box<dyn Future<Output = PushOutcome>>> {
        let (user_id, device_id) = job.device;
        let address = job.endpoint.address;
        tracing::info!(user_id, device_id, %address, "push (log sender): wake up");
        Box::pin(std::future::ready(PushOutcome::Delivered))
    }
}
