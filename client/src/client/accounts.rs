//! Account features in the SDK: devices, contact discovery, profiles, privacy, blocking
//! and reports. Thin: the server enforces the rules; the SDK hashes phone numbers before
//! they leave the device.

pub use tern_wire::accounts::phone_hash;
use tern_wire::messages::*;
use tern_wire::Message;

use super::{server_error, Client};
use crate::ClientError;

/// A profile as this user may see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileView {
    /// Whose.
    pub user_id: u64,
    /// Display name, if shown.
    pub display_name: Option<String>,
    /// About text, if shown.
    pub about: Option<String>,
}

impl Client {
    /// This account's devices: (id, name, primary).
    pub async fn devices(&mut self) -> Result<Vec<(u32, String, bool)>, ClientError> {
        let reply = self.request(&DeviceListRequest {}).await?;
        let Message::DeviceList(list) = reply.frame().message else {
            return Err(server_error(&reply));
        };
        Ok(list
            .devices
            .iter()
            .map(|d| (d.device_id.to_native(), d.name.to_string(), d.primary))
            .collect())
    }

    /// Removes a device from this account (the primary removes any companion, and signs
    /// the device list without it).
    pub async fn unlink(&mut self, device_id: u32) -> Result<(), ClientError> {
        self.request(&Unlink { device_id }).await?;
        if self.identity.device_id == 1 {
            self.publish_device_list().await?;
        }
        Ok(())
    }

    /// Which of these phone numbers are on Tern: (number, user id). Only truncated hashes
    /// leave the device; the server limits how many a day.
    pub async fn discover(&mut self, phones: &[String]) -> Result<Vec<(String, u64)>, ClientError> {
        let hashes: Vec<PhoneHash> = phones.iter().map(|p| phone_hash(p)).collect();
        let reply = self.request(&ContactDiscover { hashes: hashes.clone() }).await?;
        let Message::ContactMatches(found) = reply.frame().message else {
            return Err(server_error(&reply));
        };
        let found: Vec<(String, u64)> = found
            .matches
            .iter()
            .filter_map(|m| {
                let index = hashes.iter().position(|h| *h == m.hash)?;
                Some((phones[index].clone(), m.user_id.to_native()))
            })
            .collect();
        // Contacts found by number are shown with it from now on.
        for (phone, user) in &found {
            self.store.remember_person(*user, None, Some(phone))?;
        }
        Ok(found)
    }

    /// What this device knows of a person, without asking the server: (display name,
    /// phone number), each if known.
    pub fn person(&self, user_id: u64) -> Result<(Option<String>, Option<String>), ClientError> {
        Ok(self.store.person(user_id)?)
    }

    /// This account's phone number, if this device registered it.
    pub fn own_phone(&self) -> Result<Option<String>, ClientError> {
        Ok(self.store.own_phone()?)
    }

    /// Whether a user exists on this server (their profile answers, hidden or not);
    /// their display name is remembered when they show it.
    pub async fn user_exists(&mut self, user_id: u64) -> Result<bool, ClientError> {
        match self.profile(user_id).await {
            Ok(_) => Ok(true),
            Err(ClientError::Server { code: tern_wire::ErrorCode::NotFound, .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The key fingerprint of one of this account's devices (fetched from the server
    /// and pinned): compare it with what the device itself shows.
    pub async fn device_fingerprint(&mut self, device_id: u32) -> Result<String, ClientError> {
        let me = self.identity.user_id;
        if self.store.pinned(me, device_id)?.is_none() {
            self.start_sessions(me, &[device_id]).await?;
        }
        let pinned = self.store.pinned(me, device_id)?;
        let key = pinned.ok_or_else(|| ClientError::Protocol(format!("no device {device_id}")))?;
        Ok(crate::crypto::fingerprint(&key.curve25519))
    }

    /// This device's own key fingerprint.
    pub fn fingerprint(&self) -> String {
        crate::crypto::fingerprint(&self.crypto.identity_key())
    }

    /// Sets this account's display name and about text (`None` leaves one unchanged).
    pub async fn set_profile(
        &mut self,
        name: Option<&str>,
        about: Option<&str>,
    ) -> Result<(), ClientError> {
        let set = ProfileSet {
            display_name: name.map(str::to_string),
            about: about.map(str::to_string),
            avatar: None,
        };
        self.request(&set).await?;
        Ok(())
    }

    /// Someone's profile, as far as their privacy settings let this user see it.
    pub async fn profile(&mut self, user_id: u64) -> Result<ProfileView, ClientError> {
        let reply = self.request(&ProfileGet { user_id }).await?;
        let Message::Profile(profile) = reply.frame().message else {
            return Err(server_error(&reply));
        };
        let view = ProfileView {
            user_id,
            display_name: profile.display_name.as_ref().map(|s| s.to_string()),
            about: profile.about.as_ref().map(|s| s.to_string()),
        };
        if let Some(name) = view.display_name.as_deref().filter(|n| !n.trim().is_empty()) {
            self.store.remember_person(user_id, Some(name), None)?;
        }
        Ok(view)
    }

    /// Replaces this account's privacy settings. The read-receipt setting is also kept
    /// on this device, first: with it off, [`Client::mark_read`] and
    /// [`Client::mark_group_read`] send nothing, whatever the server would do with it.
    pub async fn set_privacy(&mut self, privacy: PrivacySettings) -> Result<(), ClientError> {
        self.store.set_read_receipts(privacy.read_receipts)?;
        self.request(&privacy).await?;
        Ok(())
    }

    /// This account's privacy settings, as the server has them.
    pub async fn privacy(&mut self) -> Result<PrivacySettings, ClientError> {
        let reply = self.request(&PrivacyGet {}).await?;
        let Message::PrivacySettings(settings) = reply.frame().message else {
            return Err(server_error(&reply));
        };
        rkyv::deserialize::<PrivacySettings, rkyv::rancor::Failure>(settings)
            .map_err(|e| ClientError::Protocol(format!("unreadable privacy settings: {e}")))
    }

    /// Turns read receipts on or off: on this device at once (it stops sending them),
    /// then in the account's settings on the server (which stops relaying them).
    pub async fn set_read_receipts(&mut self, on: bool) -> Result<(), ClientError> {
        self.store.set_read_receipts(on)?;
        let privacy = PrivacySettings { read_receipts: on, ..self.privacy().await? };
        self.set_privacy(privacy).await
    }

    /// Whether this device sends read receipts.
    pub fn read_receipts(&self) -> Result<bool, ClientError> {
        Ok(self.store.read_receipts()?)
    }

    /// Blocks (or unblocks) a user: their messages, typing and presence stop reaching
    /// this account, and they see nothing of its profile or presence.
    pub async fn block(&mut self, user_id: u64, blocked: bool) -> Result<(), ClientError> {
        if blocked {
            self.request(&Block { user_id }).await?;
        } else {
            self.request(&Unblock { user_id }).await?;
        }
        Ok(())
    }

    /// Sets (or with `None` removes) the PIN needed to register this number on another
    /// phone. Primary device only.
    pub async fn set_registration_lock(&mut self, pin: Option<&str>) -> Result<(), ClientError> {
        self.request(&SetRegistrationLock { pin: pin.map(str::to_string) }).await?;
        Ok(())
    }

    /// Everything the server holds about this account, as JSON, written to `dir`.
    pub async fn export(
        &mut self,
        dir: &std::path::Path,
    ) -> Result<std::path::PathBuf, ClientError> {
        let reply = self.request(&ExportRequest {}).await?;
        let Message::ExportReady(ready) = reply.frame().message else {
            return Err(server_error(&reply));
        };
        let (media_id, size) = (ready.media_id, ready.size_bytes.to_native());
        // The server's number bounds the loop, never an allocation: the buffer grows
        // with the bytes that came, each answer at most what was asked.
        let mut bytes = Vec::new();
        while (bytes.len() as u64) < size {
            let length = (size - bytes.len() as u64).min(512 * 1024) as u32;
            let request = MediaDownload { media_id, offset: bytes.len() as u64, length };
            let reply = self.request(&request).await?;
            let Message::MediaData(data) = reply.frame().message else {
                return Err(server_error(&reply));
            };
            if data.data.is_empty() {
                return Err(ClientError::Protocol("the server sent no bytes".into()));
            }
            let (sent_bytes, asked_bytes) = (data.data.len() as u64, u64::from(length));
            if sent_bytes > asked_bytes {
                return Err(crate::FileError::Oversent { sent_bytes, asked_bytes }.into());
            }
            bytes.extend_from_slice(&data.data);
        }
        let path = dir.join(format!("tern-export-{}.json", self.user_id()));
        std::fs::write(&path, bytes)
            .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
        Ok(path)
    }

    /// Reports a user to the operator, sharing the given message ids (metadata only).
    pub async fn report(
        &mut self,
        user_id: u64,
        message_ids: &[u64],
        reason: ReportReason,
        comment: &str,
    ) -> Result<(), ClientError> {
        let report =
            Report { user_id, message_ids: message_ids.to_vec(), reason, comment: comment.into() };
        self.request(&report).await?;
        Ok(())
    }
}
