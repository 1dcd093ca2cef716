//! The durability checker every crash test shares: clients log what they sent and what
//! they received, and [`Ledger::check`] states what must hold afterwards.
//!
//! - every message whose sent tick arrived reached every recipient device;
//! - no message is stored twice (one server id per sender device and client message id,
//!   in each recipient's mailbox; a re-delivery of the same stored envelope is fine);
//! - order is kept per sender device and conversation in every mailbox (the server
//!   promises order within a conversation; a 1:1 message and a group message of the same
//!   sender take different paths and may pass each other);
//! - nothing served fails its checksum (payloads carry their own SHA-256);
//! - no one-time prekey is handed out twice.
//!
//! (That no batch whose fsync failed is acknowledged is shown by the engine's simulated
//! power cuts, where an fsync can fail; `kill -9` keeps the page cache.)

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

/// A device: (user id, device id).
pub type Device = (u64, u32);

/// A payload that checks itself: `sender index (8) ‖ sequence (8) ‖ filler ‖ SHA-256 of
/// everything before`.
pub fn payload(sender_index: u64, sequence: u64, filler: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(16 + filler + 32);
    bytes.extend_from_slice(&sender_index.to_le_bytes());
    bytes.extend_from_slice(&sequence.to_le_bytes());
    bytes.extend((0..filler).map(|i| (i as u64 ^ sequence) as u8));
    let hash = Sha256::digest(&bytes);
    bytes.extend_from_slice(&hash);
    bytes
}

/// The (sender index, sequence) of a payload made by [`payload`], if its checksum holds.
pub fn open_payload(bytes: &[u8]) -> Option<(u64, u64)> {
    let split = bytes.len().checked_sub(32).filter(|s| *s >= 16)?;
    let (body, hash) = bytes.split_at(split);
    if Sha256::digest(body).as_slice() != hash {
        return None;
    }
    let index = u64::from_le_bytes(body[..8].try_into().ok()?);
    let sequence = u64::from_le_bytes(body[8..16].try_into().ok()?);
    Some((index, sequence))
}

/// One message as its sender logged it.
#[derive(Clone, Debug)]
struct Sent {
    recipients: Vec<Device>,
    sequence: u64,
    acked: bool,
}

/// One envelope as a recipient got it.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    /// The sending device.
    pub sender: Device,
    /// The sender's id for the message.
    pub client_message_id: u64,
    /// The server's id.
    pub server_message_id: u64,
    /// Its place in the recipient's mailbox.
    pub mailbox_seq: u64,
    /// The sender's sequence number from the payload (`None`: the checksum failed).
    pub sequence: Option<u64>,
    /// The conversation the order holds in (0 for 1:1, else the group id).
    pub stream: u64,
}

/// What the clients of a run logged.
#[derive(Debug, Default)]
pub struct Ledger {
    sent: BTreeMap<(Device, u64), Sent>,
    received: BTreeMap<Device, Vec<Received>>,
    keys: Vec<(Device, u64)>,
}

impl Ledger {
    /// A message `sender` is about to send (before the first attempt).
    pub fn sending(
        &mut self,
        sender: Device,
        client_message_id: u64,
        sequence: u64,
        to: &[Device],
    ) {
        let sent = Sent { recipients: to.to_vec(), sequence, acked: false };
        self.sent.entry((sender, client_message_id)).or_insert(sent);
    }

    /// Its sent tick arrived.
    pub fn acked(&mut self, sender: Device, client_message_id: u64) {
        if let Some(sent) = self.sent.get_mut(&(sender, client_message_id)) {
            sent.acked = true;
        }
    }

    /// `recipient` was handed an envelope.
    pub fn received(&mut self, recipient: Device, envelope: Received) {
        self.received.entry(recipient).or_default().push(envelope);
    }

    /// A one-time prekey of `owner` was handed out.
    pub fn key_handed_out(&mut self, owner: Device, key_id: u64) {
        self.keys.push((owner, key_id));
    }

    /// Messages acknowledged so far.
    pub fn acked_count(&self) -> usize {
        self.sent.values().filter(|s| s.acked).count()
    }

    /// Every violation of the rules in the module doc (empty when all hold).
    pub fn check(&self) -> Vec<String> {
        let mut violations = Vec::new();
        for (recipient, envelopes) in &self.received {
            // One stored envelope per (sender, client id), one per mailbox position.
            let mut by_message: BTreeMap<(Device, u64), BTreeSet<u64>> = BTreeMap::new();
            let mut by_position: BTreeMap<u64, Received> = BTreeMap::new();
            for e in envelopes {
                if e.sequence.is_none() {
                    violations.push(format!("{recipient:?} was served a corrupt payload: {e:?}"));
                }
                by_message
                    .entry((e.sender, e.client_message_id))
                    .or_default()
                    .insert(e.server_message_id);
                if let Some(earlier) = by_position.insert(e.mailbox_seq, *e) {
                    if earlier.server_message_id != e.server_message_id {
                        violations.push(format!(
                            "{recipient:?} mailbox position {} held two envelopes",
                            e.mailbox_seq
                        ));
                    }
                }
            }
            for ((sender, client_id), ids) in &by_message {
                if ids.len() > 1 {
                    violations.push(format!(
                        "{recipient:?} got {sender:?}'s message {client_id} stored {} times",
                        ids.len()
                    ));
                }
            }
            // Order per sender device and conversation, in mailbox order.
            let mut last: BTreeMap<(Device, u64), u64> = BTreeMap::new();
            for e in by_position.values() {
                let Some(sequence) = e.sequence else { continue };
                if let Some(previous) = last.insert((e.sender, e.stream), sequence) {
                    if sequence <= previous {
                        violations.push(format!(
                            "{recipient:?} got {:?}'s #{sequence} after #{previous}",
                            e.sender
                        ));
                    }
                }
            }
        }
        // Every acknowledged message reached every recipient device.
        for ((sender, client_id), sent) in &self.sent {
            if !sent.acked {
                continue;
            }
            for recipient in &sent.recipients {
                let got = self.received.get(recipient).is_some_and(|all| {
                    all.iter().any(|e| e.sender == *sender && e.client_message_id == *client_id)
                });
                if !got {
                    violations.push(format!(
                        "{sender:?}'s acknowledged #{} ({client_id}) never reached {recipient:?}",
                        sent.sequence
                    ));
                }
            }
        }
        let mut seen = BTreeSet::new();
        for key in &self.keys {
            if !seen.insert(*key) {
                violations.push(format!("one-time key {} of {:?} handed out twice", key.1, key.0));
            }
        }
        violations
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn got(sender: Device, client: u64, server: u64, seq: u64, sequence: u64) -> Received {
        Received {
            sender,
            client_message_id: client,
            server_message_id: server,
            mailbox_seq: seq,
            sequence: Some(sequence),
            stream: 0,
        }
    }

    #[test]
    fn payloads_check_themselves() {
        let bytes = payload(3, 17, 40);
        assert_eq!(open_payload(&bytes), Some((3, 17)));
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        assert_eq!(open_payload(&bad), None);
    }

    #[test]
    fn each_rule_is_checked() {
        let (a, b) = ((1, 1), (2, 1));
        let mut ledger = Ledger::default();
        for id in 1..=3 {
            ledger.sending(a, id, id, &[b]);
            ledger.acked(a, id);
        }
        ledger.received(b, got(a, 1, 100, 1, 1));
        ledger.received(b, got(a, 1, 100, 1, 1)); // A re-delivery: fine.
        ledger.received(b, got(a, 3, 300, 2, 3));
        assert_eq!(ledger.check().len(), 1, "#2 is missing: {:?}", ledger.check());
        ledger.received(b, got(a, 2, 200, 3, 2)); // Arrives, but out of order.
        ledger.received(b, got(a, 2, 201, 4, 2)); // And stored twice.
        ledger.key_handed_out(b, 7);
        ledger.key_handed_out(b, 7);
        let violations = ledger.check();
        assert!(violations.iter().any(|v| v.contains("after")), "{violations:?}");
        assert!(violations.iter().any(|v| v.contains("stored 2 times")), "{violations:?}");
        assert!(violations.iter().any(|v| v.contains("twice")), "{violations:?}");
    }
}
