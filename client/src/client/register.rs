//! A new device: registration with a phone number and a verification code, or linking
//! to an existing account with a code the primary device approves. Both end with the
//! server's `Registered`, the identity saved and a connected [`Client`].

use std::collections::VecDeque;
use std::path::Path;

use tern_wire::messages::*;
use tern_wire::{ErrorCode, Message};

use super::Client;
use crate::connection::{server_error, Connection, Endpoint};
use crate::crypto::DeviceCrypto;
use crate::store::{Identity, Store, StoreSecret};
use crate::ClientError;

/// A registration in progress: the code was requested.
#[derive(Debug)]
pub struct PendingRegistration {
    connection: Connection,
    endpoint: Endpoint,
    phone: String,
    /// How long the code stays valid.
    pub expires_in_s: u32,
    /// The registration-lock PIN, if the number has one.
    pin: Option<String>,
}

impl PendingRegistration {
    /// Asks the server to send a verification code to `phone`.
    pub async fn request_code(endpoint: &Endpoint, phone: &str) -> Result<Self, ClientError> {
        let request = |proof_of_work| RequestCode {
            phone: phone.into(),
            channel: CodeChannel::Sms,
            locale: "en".into(),
            proof_of_work,
        };
        // On a cluster, the node that owns the number's shard answers (and verifies).
        let (mut connection, endpoint, mut reply) =
            Connection::open_at_home(endpoint, &request(None), &mut VecDeque::new()).await?;
        // A server defending against SMS pumping may ask for a proof of work first.
        for _ in 0..3 {
            let proof_of_work = match reply.frame().message {
                Message::CodeSent(sent) => {
                    return Ok(PendingRegistration {
                        connection,
                        endpoint,
                        phone: phone.into(),
                        expires_in_s: sent.expires_in_s.to_native(),
                        pin: None,
                    })
                }
                Message::PowChallenge(challenge) => {
                    let bytes = challenge.challenge.to_vec();
                    let nonce = tern_wire::accounts::solve_pow(&bytes, challenge.difficulty_bits);
                    ProofOfWork { challenge: bytes, nonce }
                }
                _ => return Err(server_error(&reply)),
            };
            let id = connection.send(&request(Some(proof_of_work))).await?;
            reply = connection.answer(id, &mut VecDeque::new()).await?;
        }
        Err(ClientError::Protocol("the server kept asking for proofs of work".into()))
    }

    /// Where the registration goes on: the endpoint given, or on a cluster the node
    /// that owns the number (where the code was sent from and the device will live).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Gives the number's registration-lock PIN (needed when it has one).
    pub fn with_pin(mut self, pin: &str) -> Self {
        self.pin = Some(pin.into());
        self
    }

    /// Verifies the code and creates this device: a new E2E account whose public keys
    /// go to the server, and the store at `store_path` (which must not hold another
    /// device).
    pub async fn verify(
        self,
        code: &str,
        device_name: &str,
        store_path: &Path,
        secret: &StoreSecret,
    ) -> Result<Client, ClientError> {
        self.verify_or_retry(code, device_name, store_path, secret).await.map_err(|e| e.1)
    }

    /// Like [`PendingRegistration::verify`], but a wrong code (`InvalidCode`) gives the
    /// registration back, still connected, so the app can ask for the code again
    /// instead of requesting (and spending) a new one.
    pub async fn verify_or_retry(
        mut self,
        code: &str,
        device_name: &str,
        store_path: &Path,
        secret: &StoreSecret,
    ) -> Result<Client, (Option<PendingRegistration>, ClientError)> {
        let store = open_unused_store(store_path, secret).map_err(|e| (None, e))?;
        let crypto = DeviceCrypto::new();
        let verify = Verify {
            phone: self.phone.clone(),
            code: code.into(),
            device: NewDevice { name: device_name.into(), keys: crypto.device_keys() },
            registration_lock_pin: self.pin.clone(),
        };
        let id = self.connection.send(&verify).await.map_err(|e| (None, e))?;
        let reply = self.connection.answer(id, &mut VecDeque::new()).await;
        let reply = reply.map_err(|e| (None, e))?;
        if let Message::ErrorFrame(error) = reply.frame().message {
            let wrong = error.code.to_native() == ErrorCode::InvalidCode as u16;
            return Err((wrong.then_some(self), server_error(&reply)));
        }
        let phone = self.phone.clone();
        let client = registered(reply, self.endpoint, store, crypto).await;
        let client = client.map_err(|e| (None, e))?;
        client.store.save_own_phone(&phone).map_err(|e| (None, e.into()))?;
        Ok(client)
    }
}

/// A new device waiting to be linked to an account: show [`PendingLink::code`] to the
/// user, who approves it on the primary device ([`Client::approve_link`]).
pub struct PendingLink {
    connection: Connection,
    endpoint: Endpoint,
    crypto: DeviceCrypto,
    request_id: u32,
    code: String,
}

impl std::fmt::Debug for PendingLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingLink").field("code", &self.code).finish_non_exhaustive()
    }
}

impl PendingLink {
    /// Creates this device's keys and asks the server for a linking code.
    pub async fn request(endpoint: &Endpoint, device_name: &str) -> Result<Self, ClientError> {
        let mut connection = Connection::open(endpoint).await?;
        let crypto = DeviceCrypto::new();
        let request = LinkRequest {
            device: NewDevice { name: device_name.into(), keys: crypto.device_keys() },
        };
        let request_id = connection.send(&request).await?;
        let code = loop {
            let frame = connection.next_frame().await?;
            match frame.frame().message {
                Message::LinkCode(code) => break code.code.to_string(),
                Message::ErrorFrame(_) => return Err(server_error(&frame)),
                _ => {}
            }
        };
        Ok(PendingLink { connection, endpoint: endpoint.clone(), crypto, request_id, code })
    }

    /// The code to approve on the primary device.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// This new device's key fingerprint, to compare with what the primary shows once
    /// it approved ([`Client::device_fingerprint`]).
    pub fn fingerprint(&self) -> String {
        crate::crypto::fingerprint(&self.crypto.identity_key())
    }

    /// Waits for the approval (up to the code's lifetime) and creates the store.
    pub async fn wait(
        self,
        store_path: &Path,
        secret: &StoreSecret,
    ) -> Result<Client, ClientError> {
        let store = open_unused_store(store_path, secret)?;
        start_new_device(self.connection, self.request_id, self.endpoint, store, self.crypto).await
    }
}

/// Opens the store a new device will live in, refusing one that already holds a device.
fn open_unused_store(store_path: &Path, secret: &StoreSecret) -> Result<Store, ClientError> {
    let store = Store::open(store_path, secret)?;
    if store.identity()?.is_some() {
        return Err(ClientError::Config(format!(
            "{} already holds a registered device; use another file",
            store_path.display()
        )));
    }
    Ok(store)
}

/// Waits for the `Registered` answer to request `request_id` (a verification or a
/// link), saves the new device's identity and keys, and starts its client.
async fn start_new_device(
    mut connection: Connection,
    request_id: u32,
    endpoint: Endpoint,
    store: Store,
    crypto: DeviceCrypto,
) -> Result<Client, ClientError> {
    let reply = connection.answer(request_id, &mut VecDeque::new()).await?;
    registered(reply, endpoint, store, crypto).await
}

/// The server's answer to a verification or a link: `Registered` saves the new device's
/// identity and keys and starts its client.
async fn registered(
    reply: crate::connection::OwnedFrame,
    endpoint: Endpoint,
    mut store: Store,
    mut crypto: DeviceCrypto,
) -> Result<Client, ClientError> {
    let identity = match reply.frame().message {
        Message::Registered(registered) => Identity {
            server: endpoint.address.clone(),
            user_id: registered.user_id.to_native(),
            device_id: registered.device_id.to_native(),
            token: registered.token,
        },
        _ => return Err(server_error(&reply)),
    };
    // The server has the keys (the reply came after they were durable). The endpoint is
    // kept with the identity, a pinned certificate as its bytes: every later connection
    // of this device uses this transport and trust root.
    crypto.mark_published();
    let endpoint = endpoint.resolved()?;
    store.save_identity(&identity, &crypto.pickle(store.pickle_key()), &endpoint.encode())?;
    Client::start(endpoint, store, crypto, identity).await
}
