//! Signed device lists: the primary device vouches for its companions.
//!
//! The server says which devices a user has, and a malicious server could add one of its
//! own ("a companion") and read everything sent to that user. So, as in WhatsApp's
//! multi-device design, the user's primary device (device 1) signs the list of the
//! account's devices with their keys, and a client trusts a companion device only if
//! the newest list it verified names exactly that device's keys. The server stores the
//! signed bytes and serves them with the account's key bundles, without reading them
//! (`PublishDeviceList`, `Bundles::device_list`; the byte format is in
//! `docs/PROTOCOL.md`, "Signed device list"). The primary's own keys are pinned on first
//! sight and covered by the safety number.

use crate::crypto::{verify_signature, DeviceCrypto, PeerIdentity};

/// The first 16 bytes of a signed list: the domain of the signature.
const DOMAIN: &[u8; 16] = b"tern device list";
/// Bytes before the devices: domain, user id, issue time, count.
const HEADER_BYTES: usize = 16 + 8 + 8 + 1;
/// Bytes per listed device: id, Curve25519 key, Ed25519 key.
const DEVICE_BYTES: usize = 4 + 32 + 32;
/// Bytes of the signature at the end.
const SIGNATURE_BYTES: usize = 64;
/// Devices a list names at most (the server allows 5 per account; room to grow).
pub const LISTED_DEVICES_MAX: usize = 16;

/// One device as a signed list names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListedDevice {
    /// Its id.
    pub device_id: u32,
    /// Its Curve25519 identity key.
    pub curve25519: [u8; 32],
    /// Its Ed25519 signing key.
    pub ed25519: [u8; 32],
}

impl ListedDevice {
    /// Whether `identity` is exactly this device's pair of keys.
    pub fn matches(&self, identity: &PeerIdentity) -> bool {
        identity.curve25519 == self.curve25519 && identity.ed25519 == Some(self.ed25519)
    }
}

/// A device list whose signature was checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceList {
    /// Whose devices.
    pub user_id: u64,
    /// When the primary signed it (its clock, ms since the epoch).
    pub issued_ms: u64,
    /// The devices, device 1 first.
    pub devices: Vec<ListedDevice>,
}

impl DeviceList {
    /// The listed device with this id, if any.
    pub fn device(&self, device_id: u32) -> Option<&ListedDevice> {
        self.devices.iter().find(|d| d.device_id == device_id)
    }
}

/// Why a signed device list was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceListError {
    /// Not in the format (length, domain, device count or order).
    #[error("a malformed device list")]
    Malformed,
    /// It is another user's list.
    #[error("a device list of another user")]
    OtherUser,
    /// The signature does not verify with the primary device's pinned signing key.
    #[error("a device list not signed by the primary device")]
    BadSignature,
    /// Device 1 in it is not the primary device this client pinned.
    #[error("a device list naming another primary device")]
    OtherPrimary,
}

/// Signs the list of `user_id`'s devices (`devices`: device 1, this device, first) with
/// the primary's signing key.
pub fn sign(
    primary: &DeviceCrypto,
    user_id: u64,
    issued_ms: u64,
    devices: &[ListedDevice],
) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(
        HEADER_BYTES + DEVICE_BYTES * devices.len().min(LISTED_DEVICES_MAX) + SIGNATURE_BYTES,
    );
    bytes.extend_from_slice(DOMAIN);
    bytes.extend_from_slice(&user_id.to_le_bytes());
    bytes.extend_from_slice(&issued_ms.to_le_bytes());
    let listed = &devices[..devices.len().min(LISTED_DEVICES_MAX)];
    bytes.push(listed.len() as u8);
    for device in listed {
        bytes.extend_from_slice(&device.device_id.to_le_bytes());
        bytes.extend_from_slice(&device.curve25519);
        bytes.extend_from_slice(&device.ed25519);
    }
    let signature = primary.sign(&bytes);
    bytes.extend_from_slice(&signature);
    bytes
}

/// Checks a signed list of `user_id`'s devices against the primary device's keys as
/// this client pinned them: the format, the user, the signature, and that device 1 in
/// the list is that primary.
pub fn verify(
    bytes: &[u8],
    user_id: u64,
    primary: &PeerIdentity,
) -> Result<DeviceList, DeviceListError> {
    let list = parse(bytes)?;
    if list.user_id != user_id {
        return Err(DeviceListError::OtherUser);
    }
    let Some(signing_key) = primary.ed25519 else { return Err(DeviceListError::BadSignature) };
    let (signed, signature) = bytes.split_at(bytes.len() - SIGNATURE_BYTES);
    let signature: &[u8; 64] = signature.try_into().map_err(|_| DeviceListError::Malformed)?;
    if !verify_signature(&signing_key, signed, signature) {
        return Err(DeviceListError::BadSignature);
    }
    if !list.device(1).is_some_and(|d| d.matches(primary)) {
        return Err(DeviceListError::OtherPrimary);
    }
    Ok(list)
}

/// The list's fields (nothing checked but the format).
fn parse(bytes: &[u8]) -> Result<DeviceList, DeviceListError> {
    let malformed = DeviceListError::Malformed;
    if bytes.len() < HEADER_BYTES + SIGNATURE_BYTES || &bytes[..16] != DOMAIN {
        return Err(malformed);
    }
    let user_id = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let issued_ms = u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes"));
    let count = usize::from(bytes[32]);
    if count == 0
        || count > LISTED_DEVICES_MAX
        || bytes.len() != HEADER_BYTES + DEVICE_BYTES * count + SIGNATURE_BYTES
    {
        return Err(malformed);
    }
    let devices: Vec<ListedDevice> = bytes[HEADER_BYTES..HEADER_BYTES + DEVICE_BYTES * count]
        .chunks_exact(DEVICE_BYTES)
        .map(|d| ListedDevice {
            device_id: u32::from_le_bytes(d[..4].try_into().expect("4 bytes")),
            curve25519: d[4..36].try_into().expect("32 bytes"),
            ed25519: d[36..68].try_into().expect("32 bytes"),
        })
        .collect();
    // Device 1 first, then increasing ids: one entry per device.
    let ordered = devices[0].device_id == 1
        && devices.windows(2).all(|pair| pair[0].device_id < pair[1].device_id);
    if !ordered {
        return Err(malformed);
    }
    Ok(DeviceList { user_id, issued_ms, devices })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(crypto: &DeviceCrypto, device_id: u32) -> ListedDevice {
        ListedDevice { device_id, curve25519: crypto.identity_key(), ed25519: crypto.signing_key() }
    }

    /// A list verifies only as signed, for its user, with the pinned primary's keys in
    /// it; any changed byte, another primary or a missing device 1 is refused.
    #[test]
    fn a_device_list_verifies_only_as_the_primary_signed_it() {
        let (primary, companion, stranger) =
            (DeviceCrypto::new(), DeviceCrypto::new(), DeviceCrypto::new());
        let pinned = |c: &DeviceCrypto| PeerIdentity {
            curve25519: c.identity_key(),
            ed25519: Some(c.signing_key()),
        };
        let devices = [listed(&primary, 1), listed(&companion, 2)];
        let bytes = sign(&primary, 77, 1_000, &devices);
        let list = verify(&bytes, 77, &pinned(&primary)).unwrap();
        assert_eq!((list.issued_ms, list.devices.as_slice()), (1_000, &devices[..]));
        assert_eq!(verify(&bytes, 78, &pinned(&primary)), Err(DeviceListError::OtherUser));
        let other = verify(&bytes, 77, &pinned(&stranger));
        assert_eq!(other, Err(DeviceListError::BadSignature));
        for at in [20, 40, bytes.len() - 1] {
            let mut altered = bytes.clone();
            altered[at] ^= 1;
            assert!(verify(&altered, 77, &pinned(&primary)).is_err(), "byte {at}");
        }
        // Signed by the stranger, naming the stranger as device 1: not the pinned one.
        let forged = sign(&stranger, 77, 2_000, &[listed(&stranger, 1), devices[1]]);
        assert_eq!(verify(&forged, 77, &pinned(&stranger)).map(|l| l.user_id), Ok(77));
        assert_eq!(verify(&forged, 77, &pinned(&primary)), Err(DeviceListError::BadSignature));
        let headless = sign(&primary, 77, 3_000, &[listed(&companion, 2)]);
        assert_eq!(verify(&headless, 77, &pinned(&primary)), Err(DeviceListError::Malformed));
    }
}
