//! Whose devices to trust, when the server may lie about them.
//!
//! - A user's primary device (device 1) is pinned on first sight, and the safety number
//!   covers it. Its companions are trusted only if the device list the primary signed
//!   (`crate::devices`, served with the key bundles) names exactly their keys; a device
//!   the server lists without that gets no session and no ciphertext (an empty copy,
//!   since the server wants one per device) and is reported once
//!   ([`Event::DeviceUnverified`]). A list older than one verified before is refused.
//! - Pins compare both keys, Curve25519 and Ed25519: a change of either is reported
//!   ([`Event::IdentityChanged`]), the old sessions are dropped and the new keys pinned.
//! - The server's word never erases a pin: a device it calls gone (or "extra") is
//!   retired (no copies, no sessions) with its identity kept, so that a device that comes
//!   back with other keys is reported as changed, not trusted as new.
//! - A new device (one a signed list names and the list verified before it did not:
//!   [`Event::DeviceAdded`]) or a changed one stops the send that found it
//!   ([`ClientError::DevicesChanged`]): the event reaches the app before anything is
//!   encrypted to that device (the outbox sends the text again by itself a moment later).
//! - A device left unvouched is asked about again at most every [`UNVOUCHED_RECHECK`],
//!   when a message comes from it or goes to its user (the primary signs a new device a
//!   moment after approving it).
//! - This device, when it is the primary, signs and publishes the list: at registration,
//!   after approving a link, after unlinking ([`Client::publish_device_list`]).

use std::time::{Duration, Instant};

use rkyv::rancor::Failure;
use tern_wire::messages::*;
use tern_wire::Message;

use super::{server_error, Client, Event};
use crate::devices::{self, DeviceList, ListedDevice};
use crate::{ClientError, PeerIdentity};

/// How long a device without the primary's signature is left alone before it is asked
/// about again (when a message comes from it or goes to its user).
pub(super) const UNVOUCHED_RECHECK: Duration = Duration::from_secs(30);

/// Milliseconds since the epoch, by this device's clock.
fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| d.as_millis() as u64)
}

/// A device list that verified, with the device ids of the one verified before it
/// (`None`: it is the first).
type Verified = (DeviceList, Option<Vec<u32>>);

/// The keys a bundle claims for its device.
fn identity_of(bundle: &DeviceBundle) -> PeerIdentity {
    PeerIdentity { curve25519: bundle.identity_key, ed25519: Some(bundle.signing_key) }
}

impl Client {
    /// Asks the server for a user's key bundles (all devices if `device_ids` is empty)
    /// and signed device list.
    async fn fetch_bundles(
        &mut self,
        user_id: u64,
        device_ids: Vec<u32>,
    ) -> Result<Bundles, ClientError> {
        let reply = self.request(&FetchBundles { user_id, device_ids }).await?;
        let Message::Bundles(bundles) = reply.frame().message else {
            return Err(server_error(&reply));
        };
        rkyv::deserialize::<Bundles, Failure>(bundles)
            .map_err(|e| ClientError::Protocol(format!("unreadable bundles: {e}")))
    }

    /// Fetches bundles (all devices if `devices` is empty) with the user's signed device
    /// list, and starts a session with each device it may trust: the primary (pinned on
    /// first sight, a change reported) and the companions the primary's list vouches for.
    /// Returns the devices the server listed.
    pub(super) async fn start_sessions(
        &mut self,
        user_id: u64,
        devices: &[u32],
    ) -> Result<Vec<u32>, ClientError> {
        let mut wanted = devices.to_vec();
        if !wanted.is_empty() && !wanted.contains(&1) && self.primary_keys(user_id)?.is_none() {
            wanted.push(1); // The primary's keys check the list.
        }
        let mut bundles = self.fetch_bundles(user_id, wanted).await?;
        bundles.devices.sort_by_key(|b| b.device_id);
        let me = (self.identity.user_id, self.identity.device_id);
        // The primary first: its keys check the list, which is checked (and remembered,
        // so that a device it names later counts as new) whether or not a companion is
        // in this answer.
        if let Some(primary) = bundles.devices.iter().find(|b| b.device_id == 1) {
            if (user_id, 1) != me {
                self.start_session((user_id, 1), primary)?;
            }
        }
        let list = self.verified_list(user_id, &bundles.device_list)?;
        for bundle in bundles.devices.iter().filter(|b| b.device_id != 1) {
            let device = (user_id, bundle.device_id);
            if device == me {
                continue;
            }
            let Some((list, before)) = list.as_ref() else {
                self.mark_unvouched(device)?;
                continue;
            };
            if !list.device(bundle.device_id).is_some_and(|d| d.matches(&identity_of(bundle))) {
                self.mark_unvouched(device)?;
                continue;
            }
            self.store.set_unvouched(user_id, bundle.device_id, false)?;
            // New: named by this list and not by the one verified before it.
            if before.as_ref().is_some_and(|ids| !ids.contains(&bundle.device_id)) {
                self.device_news += 1;
                let device_id = bundle.device_id;
                self.events.push_back(Event::DeviceAdded { user_id, device_id });
            }
            self.start_session(device, bundle)?;
        }
        Ok(bundles.devices.iter().map(|b| b.device_id).collect())
    }

    /// A device the server lists without its primary's signature: reported once.
    fn mark_unvouched(&mut self, (user_id, device_id): (u64, u32)) -> Result<(), ClientError> {
        if self.store.set_unvouched(user_id, device_id, true)? {
            self.events.push_back(Event::DeviceUnverified { user_id, device_id });
        }
        Ok(())
    }

    /// Pins a trusted device's identity and starts a session with it.
    fn start_session(
        &mut self,
        (user_id, device_id): (u64, u32),
        bundle: &DeviceBundle,
    ) -> Result<(), ClientError> {
        let session = self.crypto.outbound_session(user_id, bundle)?;
        self.pin((user_id, device_id), identity_of(bundle))?;
        let pickle = session.pickle(self.store.pickle_key());
        self.store.save_session((user_id, device_id), &session.id(), &pickle, None, None)?;
        Ok(())
    }

    /// The keys of a user's primary device this device relies on: its own, or as pinned
    /// (with the signing key, which checks the list).
    fn primary_keys(&self, user_id: u64) -> Result<Option<PeerIdentity>, ClientError> {
        if (user_id, 1) == (self.identity.user_id, self.identity.device_id) {
            let ed25519 = Some(self.crypto.signing_key());
            return Ok(Some(PeerIdentity { curve25519: self.crypto.identity_key(), ed25519 }));
        }
        Ok(self.store.pinned(user_id, 1)?.filter(|p| p.ed25519.is_some()))
    }

    /// The user's device list, if it verifies against their pinned primary and is not
    /// older than one verified before (a server replaying an old list gets nothing),
    /// with the device ids of the list verified before it (`None`: the first one).
    fn verified_list(
        &mut self,
        user_id: u64,
        bytes: &[u8],
    ) -> Result<Option<Verified>, ClientError> {
        let Some(primary) = self.primary_keys(user_id)? else { return Ok(None) };
        if bytes.is_empty() {
            return Ok(None);
        }
        let Ok(list) = devices::verify(bytes, user_id, &primary) else { return Ok(None) };
        let before = self.store.device_list(user_id)?;
        if before.as_ref().is_some_and(|(seen_ms, _)| list.issued_ms < *seen_ms) {
            return Ok(None);
        }
        let ids: Vec<u32> = list.devices.iter().map(|d| d.device_id).collect();
        self.store.save_device_list(user_id, list.issued_ms, &ids)?;
        Ok(Some((list, before.map(|(_, ids)| ids))))
    }

    /// Before reading the first message from a companion device this device has not
    /// seen: its user's signed device list decides whether it is trusted (pinned) or not
    /// (then nothing from it is read). A failure to ask is a drop (the envelope comes
    /// again); any other answer leaves the device unknown, read as before.
    pub(super) async fn vouch_for_sender(&mut self, sender: (u64, u32)) -> Result<(), ClientError> {
        let me = (self.identity.user_id, self.identity.device_id);
        if sender.1 == 1 || sender == me || self.store.pinned(sender.0, sender.1)?.is_some() {
            return Ok(());
        }
        if self.store.unvouched_devices(sender.0)?.contains(&sender.1) {
            return self.recheck_unvouched(sender.0).await;
        }
        match self.start_sessions(sender.0, &[sender.1]).await {
            Err(error) if error.is_disconnect() => Err(error),
            Err(ClientError::Store(error)) => Err(error.into()),
            _ => Ok(()),
        }
    }

    /// Asks again about a user's devices that lacked the primary's signature (the
    /// primary signs a new device a moment after approving it), each at most once per
    /// [`UNVOUCHED_RECHECK`]. Failures other than a drop leave them as they were.
    pub(super) async fn recheck_unvouched(&mut self, user_id: u64) -> Result<(), ClientError> {
        let now = Instant::now();
        let due: Vec<u32> = self
            .store
            .unvouched_devices(user_id)?
            .into_iter()
            .filter(|d| {
                let checked = self.unvouched_checked.get(&(user_id, *d));
                checked.is_none_or(|at| now.duration_since(*at) >= UNVOUCHED_RECHECK)
            })
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        for device in &due {
            self.unvouched_checked.insert((user_id, *device), now);
        }
        match self.start_sessions(user_id, &due).await {
            Err(error) if error.is_disconnect() => Err(error),
            Err(ClientError::Store(error)) => Err(error.into()),
            _ => Ok(()),
        }
    }

    /// Pins a device's identity on first sight; a different Curve25519 or Ed25519 key
    /// later is reported, its sessions dropped, and the new keys pinned.
    pub(super) fn pin(
        &mut self,
        (user_id, device_id): (u64, u32),
        seen: PeerIdentity,
    ) -> Result<(), ClientError> {
        if let Some(pinned) = self.store.pinned(user_id, device_id)? {
            let curve_changed = pinned.curve25519 != seen.curve25519;
            let ed_changed =
                matches!((pinned.ed25519, seen.ed25519), (Some(old), Some(new)) if old != new);
            if curve_changed || ed_changed {
                self.device_news += 1;
                self.events.push_back(Event::IdentityChanged { user_id, device_id });
                self.store.forget_sessions(user_id, device_id)?;
                self.store.replace_pin(user_id, device_id, &seen)?;
                return Ok(());
            }
        }
        self.store.pin(user_id, device_id, &seen)?;
        Ok(())
    }

    /// Asks the server for `peer`'s current devices and keys: new devices the primary
    /// vouches for get sessions, gone ones are retired (their pins kept), and a changed
    /// identity is reported ([`Event::IdentityChanged`]) and re-pinned. Use it when a
    /// contact says they reinstalled, or before comparing safety numbers. (Each call uses
    /// up one of the peer's one-time keys per device.)
    pub async fn refresh_devices(&mut self, peer: u64) -> Result<(), ClientError> {
        let known: Vec<u32> = self.store.known_devices(peer)?.into_iter().map(|d| d.0).collect();
        let current = self.start_sessions(peer, &[]).await?;
        for gone in known.into_iter().filter(|d| !current.contains(d)) {
            self.store.retire_device(peer, gone)?;
        }
        Ok(())
    }

    /// Signs this account's device list — this device and every companion the server
    /// lists, with the keys the server has for it, unless they differ from what this
    /// device pinned — and publishes it. Only the primary device (device 1) may; done by
    /// itself at registration, after [`Client::approve_link`] and [`Client::unlink`].
    pub async fn publish_device_list(&mut self) -> Result<(), ClientError> {
        let me = self.identity.user_id;
        if self.identity.device_id != 1 {
            return Err(ClientError::Config(
                "only the primary device signs the device list".into(),
            ));
        }
        let companions: Vec<u32> =
            self.devices().await?.into_iter().map(|d| d.0).filter(|d| *d != 1).collect();
        let mut listed = vec![ListedDevice {
            device_id: 1,
            curve25519: self.crypto.identity_key(),
            ed25519: self.crypto.signing_key(),
        }];
        if !companions.is_empty() {
            let mut bundles = self.fetch_bundles(me, companions).await?;
            bundles.devices.sort_by_key(|b| b.device_id);
            for bundle in bundles.devices.iter().filter(|b| b.device_id != 1) {
                let seen = identity_of(bundle);
                let pinned = self.store.pinned(me, bundle.device_id)?;
                let changed = |p: PeerIdentity| {
                    p.curve25519 != seen.curve25519
                        || p.ed25519.is_some_and(|e| Some(e) != seen.ed25519)
                };
                if pinned.is_some_and(changed) {
                    // Not signed silently: the user sees the change first.
                    let device_id = bundle.device_id;
                    self.events.push_back(Event::IdentityChanged { user_id: me, device_id });
                    continue;
                }
                self.store.pin(me, bundle.device_id, &seen)?;
                self.store.set_unvouched(me, bundle.device_id, false)?;
                let (curve25519, ed25519) = (bundle.identity_key, bundle.signing_key);
                listed.push(ListedDevice { device_id: bundle.device_id, curve25519, ed25519 });
            }
        }
        // Later than any list this device signed before, whatever the clock does.
        let last_ms = self.store.device_list(me)?.map_or(0, |(issued_ms, _)| issued_ms + 1);
        let issued_ms = now_ms().max(last_ms);
        let device_list = devices::sign(&self.crypto, me, issued_ms, &listed);
        self.request(&PublishDeviceList { device_list }).await?;
        let ids: Vec<u32> = listed.iter().map(|d| d.device_id).collect();
        self.store.save_device_list(me, issued_ms, &ids)?;
        self.store.mark_device_list_published()?;
        Ok(())
    }
}
