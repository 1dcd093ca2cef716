//! Registration: verification codes, their budgets, proofs of work, the registration
//! lock, and the account a verified number gets.
//!
//! A code request passes the SMS-pumping defences first (budgets per client address and
//! per number prefix, per hour; optionally a proof of work), then the per-number hourly
//! limit; the code leaves as an effect (`Effect::SendCode`). A `Verify` is checked
//! against the pending code (a few wrong tries burn it), then the new device's prekey
//! signatures and, for a locked number, the PIN are checked off the core's thread
//! (Argon2id is slow by design). Only then is the code used up — checked again, since
//! another `Verify` may have used it meanwhile — and the account created (or moved to
//! the new primary device, revoking every old device and token).

use std::collections::HashMap;
use std::net::IpAddr;

use rand_core::RngCore;
use tern_engine::{DeviceRecord, RegistrationFailures, Shard, StateOp, Storage, WriteError};
use tern_wire::accounts::pow_solves;
use tern_wire::messages::{
    ArchivedRequestCode, ArchivedSetRegistrationLock, ArchivedVerify, CodeSent, DeviceId, Done,
    NewDevice, PowChallenge, Registered, Token, UserId,
};
use tern_wire::MessageType;

use super::addresses::{budget_key, budget_key_of};
use super::conns::ConnId;
use super::effects::Effect;
use super::keys::check_new_device;
use super::shards::Waits;
use super::shared::Shared;
use crate::limits::HourlyWindow;
use crate::refusal::{retry_hint, RegistrationRefusal, StorageRefusal};
use crate::routing::home_shard_of_phone;
use crate::secrets::{self, Random};
use crate::work::{CheckDeviceKeys, CheckPin, HashPin};

/// Wrong registration-lock PINs accepted per number and day.
const PIN_ATTEMPTS_PER_DAY: u32 = 5;
/// Wrong verification codes accepted per number and day (each code burns after a few;
/// this bounds the guesses across codes, restarts included).
const WRONG_CODES_PER_DAY: u32 = 15;
/// A registration-lock PIN's length, in bytes: at least 4 (digits), at most 64 (Argon2
/// takes the same time whatever the length, but nothing needs more).
const PIN_BYTES_MIN: usize = 4;
const PIN_BYTES_MAX: usize = 64;
/// How long a proof-of-work challenge stays valid.
const POW_TTL_MS: u64 = 10 * 60 * 1000;
/// Expired codes, challenges and PIN counts are swept at most this often.
const SWEEP_INTERVAL_MS: u64 = 60_000;
const DAY_MS: u64 = 24 * 3600 * 1000;
/// Digits of a verification code.
const CODE_DIGITS: u32 = 6;

/// A proof-of-work challenge given out.
#[derive(Clone, Debug)]
struct Challenge {
    bytes: Vec<u8>,
    expires_ms: u64,
}

/// Challenges outstanding per core, at most (each expires in [`POW_TTL_MS`]); past it a
/// request is refused (`RateLimited`) until some expire.
const CHALLENGES_MAX: usize = 100_000;

#[derive(Clone, Debug)]
struct PendingCode {
    code: String,
    expires_ms: u64,
    attempts_left: u32,
}

/// A verification waiting for its checks off the core's thread.
#[derive(Debug)]
struct PendingVerify {
    conn: ConnId,
    rid: u32,
    phone: String,
    code: String,
    device: NewDevice,
    pin: Option<String>,
}

/// A newly registered device, for the caller to index and to end the old sessions of.
#[derive(Debug)]
pub struct NewAccount {
    /// The account.
    pub user_id: UserId,
    /// Its phone number.
    pub phone: String,
    /// Whether it existed before (then its old devices were revoked).
    pub moved: bool,
    /// An account the number had, replaced by this new one (the number was registered
    /// without the registration-lock PIN): its id and devices, whose state record is
    /// deleted already and whose mailboxes, sessions, media, group memberships and
    /// followers the caller erases (`deletion::erase_all_but_the_record`).
    pub replaced: Option<(UserId, Vec<DeviceId>)>,
}

/// What a verified number takes over from an account it already has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inherit {
    /// Nothing: the registration-lock PIN was not given (there is no lock), so this may
    /// be a new owner of a recycled number. A fresh account, a new user id.
    Nothing,
    /// The account, moved to the new primary device: the PIN proved the owner.
    Account,
}

/// What `create_account` did.
struct Created {
    user_id: UserId,
    /// The account existed and moved to a new primary device.
    moved: bool,
    /// An account replaced by a fresh one: its id and devices.
    replaced: Option<(UserId, Vec<DeviceId>)>,
    /// The last record's sequence number (the reply waits for it).
    seq: u64,
}

/// Registration state of one core (the numbers homed on its shards).
#[derive(Debug)]
pub struct Registration {
    codes: HashMap<String, PendingCode>,
    per_number: HourlyWindow<String>,
    per_prefix: HourlyWindow<String>,
    per_address: HourlyWindow<IpAddr>,
    /// Outstanding proof-of-work challenges per (phone number, requester's address
    /// key): a challenge is solved only by who was given it, and a stranger asking for
    /// the same number does not void it.
    challenges: HashMap<(String, Option<IpAddr>), Challenge>,
    /// Verifications whose device keys are being checked, by work token.
    key_checks: HashMap<u64, PendingVerify>,
    /// Verifications whose PIN is being checked, by work token.
    pin_checks: HashMap<u64, PendingVerify>,
    /// Registration-lock changes whose PIN is being hashed: token → (conn, rid, user).
    pin_hashes: HashMap<u64, (ConnId, u32, UserId)>,
    last_sweep_ms: u64,
}

/// Why a code request was answered without a code.
enum Held {
    Refused(RegistrationRefusal),
    Challenged(PowChallenge),
}

/// What a code sent is counted under.
struct BudgetKeys {
    prefix: String,
    address: Option<IpAddr>,
}

impl Registration {
    /// Empty, with the budgets of `config`.
    pub fn new(config: &super::config::CoreConfig) -> Registration {
        Registration {
            codes: HashMap::new(),
            per_number: HourlyWindow::new(config.code_requests_per_hour),
            per_prefix: HourlyWindow::new(config.code_requests_per_prefix_per_hour),
            per_address: HourlyWindow::new(config.code_requests_per_address_per_hour),
            challenges: HashMap::new(),
            key_checks: HashMap::new(),
            pin_checks: HashMap::new(),
            pin_hashes: HashMap::new(),
            last_sweep_ms: 0,
        }
    }

    /// A client asks for a verification code for a number homed here.
    pub fn request_code<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        request: &ArchivedRequestCode,
    ) {
        let now_ms = shared.now_ms();
        self.sweep(now_ms);
        let ty = MessageType::RequestCode.code();
        let phone = request.phone.as_str();
        if let Err(refusal) = disk_reserve_allows(shared, phone) {
            return shared.conns.refuse(conn, rid, ty, &refusal);
        }
        let held = match self.admit(shared, conn, request) {
            Ok(keys) => match self.per_number.check(&phone.to_string(), now_ms) {
                Ok(()) => Ok(keys),
                Err(wait) => Err(Held::Refused(RegistrationRefusal::NumberBudget {
                    retry_after_ms: retry_hint(wait),
                })),
            },
            Err(held) => Err(held),
        };
        let keys = match held {
            Ok(keys) => keys,
            Err(Held::Refused(refusal)) => return shared.conns.refuse(conn, rid, ty, &refusal),
            Err(Held::Challenged(challenge)) => return shared.conns.send(conn, rid, &challenge),
        };
        self.per_number.record(phone.to_string(), now_ms);
        self.per_prefix.record(keys.prefix, now_ms);
        if let Some(address) = keys.address {
            self.per_address.record(address, now_ms);
        }
        // A pending code is sent again, never replaced: a stranger asking for this
        // number must not void the code its owner holds.
        let pending = self.codes.get(phone).filter(|p| p.expires_ms > now_ms).cloned();
        let pending = pending.unwrap_or_else(|| PendingCode {
            code: secrets::new_code(&mut shared.random, CODE_DIGITS),
            expires_ms: now_ms + shared.config.code_ttl_ms,
            attempts_left: shared.config.code_attempts_max,
        });
        shared.counters.codes_sent += 1;
        let code = pending.code.clone();
        shared.effects.push(Effect::SendCode { phone: phone.to_string(), code });
        let expires_in_s = (pending.expires_ms - now_ms).div_ceil(1000) as u32;
        self.codes.insert(phone.to_string(), pending);
        let sent = CodeSent { expires_in_s, retry_after_s: 0, code_length: CODE_DIGITS as u8 };
        shared.conns.send(conn, rid, &sent);
    }

    /// The defences before a code is sent: a valid number, the address and prefix
    /// budgets, and (if configured) a solved proof of work.
    fn admit<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        request: &ArchivedRequestCode,
    ) -> Result<BudgetKeys, Held> {
        let phone = request.phone.as_str();
        if !valid_phone(phone) {
            return Err(Held::Refused(RegistrationRefusal::BadPhone));
        }
        let now_ms = shared.now_ms();
        let prefix: String = phone.chars().take(6).collect();
        let peer_ip = shared.conns.get(conn).and_then(|c| c.peer_ip);
        let address = budget_key_of(peer_ip, shared.config.code_budget_loopback);
        let refused =
            match address.map(|a| self.per_address.check(&a, now_ms)) {
                Some(Err(wait)) => {
                    Some(RegistrationRefusal::AddressBudget { retry_after_ms: retry_hint(wait) })
                }
                _ => self.per_prefix.check(&prefix, now_ms).err().map(|wait| {
                    RegistrationRefusal::PrefixBudget { retry_after_ms: retry_hint(wait) }
                }),
            };
        if let Some(refusal) = refused {
            shared.counters.codes_refused += 1;
            return Err(Held::Refused(refusal));
        }
        self.proof_of_work(shared, conn, request)?;
        Ok(BudgetKeys { prefix, address })
    }

    /// With proofs of work on: a request without a solution to the challenge this
    /// requester (its address key) got for this number gets a new challenge instead of a
    /// code.
    fn proof_of_work<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        request: &ArchivedRequestCode,
    ) -> Result<(), Held> {
        let bits = shared.config.code_pow_bits;
        if bits == 0 {
            return Ok(());
        }
        let requester = shared.conns.get(conn).and_then(|c| c.peer_ip).map(budget_key);
        let key = (request.phone.as_str().to_string(), requester);
        let now_ms = shared.now_ms();
        let solved = match (request.proof_of_work.as_ref(), self.challenges.get(&key)) {
            (Some(pow), Some(challenge)) => {
                challenge.expires_ms > now_ms
                    && pow.challenge.as_slice() == challenge.bytes.as_slice()
                    && pow_solves(&challenge.bytes, pow.nonce.to_native(), bits)
            }
            _ => false,
        };
        if solved {
            self.challenges.remove(&key);
            return Ok(());
        }
        if self.challenges.len() >= CHALLENGES_MAX && !self.challenges.contains_key(&key) {
            let refusal = RegistrationRefusal::Challenges { retry_after_ms: POW_TTL_MS as u32 };
            return Err(Held::Refused(refusal));
        }
        let mut bytes = vec![0u8; 16];
        shared.random.fill_bytes(&mut bytes);
        let challenge = Challenge { bytes: bytes.clone(), expires_ms: now_ms + POW_TTL_MS };
        self.challenges.insert(key, challenge);
        shared.counters.pow_challenges += 1;
        Err(Held::Challenged(PowChallenge { challenge: bytes, difficulty_bits: bits }))
    }

    /// Checks a submitted code against the pending one (a wrong one costs a try).
    fn check_code(
        &mut self,
        phone: &str,
        submitted: &str,
        now_ms: u64,
    ) -> Result<(), RegistrationRefusal> {
        let Some(pending) = self.codes.get_mut(phone) else {
            return Err(RegistrationRefusal::NoCode);
        };
        if pending.expires_ms <= now_ms {
            return Err(RegistrationRefusal::CodeExpired);
        }
        if secrets::code_matches(submitted, &pending.code) {
            return Ok(());
        }
        pending.attempts_left = pending.attempts_left.saturating_sub(1);
        if pending.attempts_left == 0 {
            self.codes.remove(phone);
            return Err(RegistrationRefusal::WrongCodeBurnt);
        }
        Err(RegistrationRefusal::WrongCode)
    }

    /// A client verifies its number with the code and the new device's keys.
    pub fn verify<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        verify: &ArchivedVerify,
    ) {
        let ty = MessageType::Verify.code();
        let phone = verify.phone.as_str();
        if let Err(refusal) = disk_reserve_allows(shared, phone) {
            return shared.conns.refuse(conn, rid, ty, &refusal);
        }
        if failures_today(shared, phone).wrong_codes >= WRONG_CODES_PER_DAY {
            let retry_after_ms = retry_hint(until_tomorrow(shared.now_ms()));
            let refusal = RegistrationRefusal::CodeTries { retry_after_ms };
            return shared.conns.refuse(conn, rid, ty, &refusal);
        }
        if let Err(refusal) = self.check_code(phone, verify.code.as_str(), shared.now_ms()) {
            let wrong = matches!(
                refusal,
                RegistrationRefusal::WrongCode | RegistrationRefusal::WrongCodeBurnt
            );
            let waits = if wrong { count_failure(shared, phone, Failure::Code) } else { vec![] };
            return shared.refuse_when_durable((conn, rid), ty, &refusal, waits);
        }
        let Ok(device) = rkyv::deserialize::<NewDevice, rkyv::rancor::Failure>(&verify.device)
        else {
            return shared.conns.refuse(conn, rid, ty, &RegistrationRefusal::UnreadableKeys);
        };
        if let Err(refusal) = check_new_device(&device) {
            return shared.conns.refuse(conn, rid, ty, &refusal);
        }
        // Checked before the code is used up: a client bug does not cost a new code.
        let token = shared.effects.work(CheckDeviceKeys(device.keys.clone()));
        let pending = PendingVerify {
            conn,
            rid,
            phone: phone.to_string(),
            code: verify.code.as_str().to_string(),
            device,
            pin: verify.registration_lock_pin.as_ref().map(|p| p.as_str().to_string()),
        };
        self.key_checks.insert(token, pending);
    }

    /// The new device's keys were checked: on to the registration lock.
    pub fn on_device_keys_checked<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        token: u64,
        checked: Result<(), &'static str>,
    ) -> Option<NewAccount> {
        let pending = self.key_checks.remove(&token)?;
        let ty = MessageType::Verify.code();
        if let Err(why) = checked {
            shared.conns.refuse(
                pending.conn,
                pending.rid,
                ty,
                &RegistrationRefusal::BadKeys { why },
            );
            return None;
        }
        let Some(lock) = registration_lock(shared, &pending.phone) else {
            return self.register(shared, pending, Inherit::Nothing);
        };
        // A locked number moves only with its PIN; wrong PINs are limited per number and
        // day (the code stays valid meanwhile).
        if let Err(refusal) = self.pin_budget(shared, &pending.phone) {
            shared.conns.refuse(pending.conn, pending.rid, ty, &refusal);
            return None;
        }
        let Some(pin) = pending.pin.clone() else {
            self.wrong_pin(shared, pending);
            return None;
        };
        let token = shared.effects.work(CheckPin { pin, hash: lock });
        self.pin_checks.insert(token, pending);
        None
    }

    /// A registration-lock PIN was checked.
    pub fn on_pin_checked<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        token: u64,
        matches: bool,
    ) -> Option<NewAccount> {
        let pending = self.pin_checks.remove(&token)?;
        if matches {
            return self.register(shared, pending, Inherit::Account);
        }
        self.wrong_pin(shared, pending);
        None
    }

    fn pin_budget<S: Storage>(
        &mut self,
        shared: &Shared<S>,
        phone: &str,
    ) -> Result<(), RegistrationRefusal> {
        if failures_today(shared, phone).wrong_pins < PIN_ATTEMPTS_PER_DAY {
            return Ok(());
        }
        let retry_after_ms = retry_hint(until_tomorrow(shared.now_ms()));
        Err(RegistrationRefusal::PinTries { retry_after_ms })
    }

    fn wrong_pin<S: Storage>(&mut self, shared: &mut Shared<S>, pending: PendingVerify) {
        let waits = count_failure(shared, &pending.phone, Failure::Pin);
        let (ty, refusal) = (MessageType::Verify.code(), RegistrationRefusal::Locked);
        shared.refuse_when_durable((pending.conn, pending.rid), ty, &refusal, waits);
    }

    /// Uses the code up (if no other verification did meanwhile) and registers.
    fn register<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        pending: PendingVerify,
        inherit: Inherit,
    ) -> Option<NewAccount> {
        let PendingVerify { conn, rid, phone, code, device, .. } = pending;
        let ty = MessageType::Verify.code();
        let still_valid = self.codes.get(&phone).is_some_and(|p| {
            p.expires_ms > shared.now_ms() && secrets::code_matches(&code, &p.code)
        });
        if !still_valid {
            shared.conns.refuse(conn, rid, ty, &RegistrationRefusal::CodeUsed);
            return None;
        }
        self.codes.remove(&phone);
        let shard_id = home_shard_of_phone(&phone, shared.shards.count());
        let Some(handle) = shared.shards.local(shard_id).cloned() else {
            shared.conns.refuse(conn, rid, ty, &RegistrationRefusal::WrongCore);
            return None;
        };
        let token = secrets::new_token(&mut shared.random);
        let now_ms = shared.now_ms();
        let new_id = |shard: &Shard<_>| new_user_id(shard, shard_id, &mut shared.random);
        let mut shard = handle.borrow_mut();
        let created = create_account(&mut shard, &phone, new_id, inherit, (device, &token), now_ms);
        drop(shard);
        match created {
            Ok(Created { user_id, moved, replaced, seq }) => {
                let new_account = !moved;
                let registered = Registered { user_id, device_id: 1, token, new_account };
                shared.reply_when_durable(conn, rid, &registered, vec![(shard_id, seq)]);
                Some(NewAccount { user_id, phone, moved, replaced })
            }
            Err(error) => {
                let refusal = RegistrationRefusal::Storage { refusal: StorageRefusal::of(&error) };
                shared.conns.refuse(conn, rid, ty, &refusal);
                None
            }
        }
    }

    /// The primary device sets (or removes) the registration lock; a PIN is hashed off
    /// the core's thread first.
    pub fn set_lock<S: Storage>(
        &mut self,
        shared: &mut Shared<S>,
        conn: ConnId,
        rid: u32,
        me: (UserId, DeviceId),
        lock: &ArchivedSetRegistrationLock,
    ) {
        if me.1 != 1 {
            let ty = MessageType::SetRegistrationLock.code();
            return shared.conns.refuse(conn, rid, ty, &RegistrationRefusal::NotPrimary);
        }
        match lock.pin.as_ref() {
            Some(pin) if !(PIN_BYTES_MIN..=PIN_BYTES_MAX).contains(&pin.len()) => {
                let ty = MessageType::SetRegistrationLock.code();
                let (bytes, min, max) = (pin.len(), PIN_BYTES_MIN, PIN_BYTES_MAX);
                shared.conns.refuse(
                    conn,
                    rid,
                    ty,
                    &RegistrationRefusal::PinLength { bytes, min, max },
                )
            }
            Some(pin) => {
                let mut salt = [0u8; 16];
                shared.random.fill_bytes(&mut salt);
                let token = shared.effects.work(HashPin { pin: pin.as_str().to_string(), salt });
                self.pin_hashes.insert(token, (conn, rid, me.0));
            }
            None => store_lock(shared, conn, rid, me.0, None),
        }
    }

    /// A new registration-lock PIN was hashed.
    pub fn on_pin_hashed<S: Storage>(&mut self, shared: &mut Shared<S>, token: u64, hash: Vec<u8>) {
        if let Some((conn, rid, user_id)) = self.pin_hashes.remove(&token) {
            store_lock(shared, conn, rid, user_id, Some(hash));
        }
    }

    /// Drops expired codes and challenges and yesterday's PIN counts: this state stays
    /// as small as the numbers active now.
    fn sweep(&mut self, now_ms: u64) {
        if now_ms.saturating_sub(self.last_sweep_ms) < SWEEP_INTERVAL_MS {
            return;
        }
        self.last_sweep_ms = now_ms;
        self.codes.retain(|_, c| c.expires_ms > now_ms);
        self.challenges.retain(|_, challenge| challenge.expires_ms > now_ms);
    }
}

/// A failed registration attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    Code,
    Pin,
}

/// `phone`'s failed attempts today (zero if none, or only on an earlier day), from its
/// home shard's tables: they survive a restart.
fn failures_today<S: Storage>(shared: &Shared<S>, phone: &str) -> RegistrationFailures {
    let today = shared.now_ms() / DAY_MS;
    let zero = RegistrationFailures {
        phone: phone.to_string(),
        day: today,
        wrong_codes: 0,
        wrong_pins: 0,
    };
    let Some(shard) = shared.shards.local(home_shard_of_phone(phone, shared.shards.count())) else {
        return zero;
    };
    let shard = shard.borrow();
    let stored = shard.state().registration_failures.get(phone).filter(|f| f.day == today);
    stored.cloned().unwrap_or(zero)
}

/// Counts a failed attempt for `phone` in its home shard; returns what the refusal
/// waits for (the count holds in memory at once, and on disk before the client learns
/// of the failure).
fn count_failure<S: Storage>(shared: &mut Shared<S>, phone: &str, failure: Failure) -> Waits {
    let mut failures = failures_today(shared, phone);
    match failure {
        Failure::Code => failures.wrong_codes += 1,
        Failure::Pin => failures.wrong_pins += 1,
    }
    let shard_id = home_shard_of_phone(phone, shared.shards.count());
    let Some(shard) = shared.shards.local(shard_id) else { return Vec::new() };
    let counted = shard.borrow_mut().apply_state(StateOp::SetRegistrationFailures { failures });
    match counted {
        Ok(seq) => vec![(shard_id, seq)],
        Err(error) => {
            tracing::warn!(%error, phone, "could not count a failed registration attempt");
            Vec::new()
        }
    }
}

/// Milliseconds to the next UTC day.
fn until_tomorrow(now_ms: u64) -> u64 {
    (now_ms / DAY_MS + 1) * DAY_MS - now_ms
}

fn store_lock<S: Storage>(
    shared: &mut Shared<S>,
    conn: ConnId,
    rid: u32,
    user_id: UserId,
    pin_hash: Option<Vec<u8>>,
) {
    let op = StateOp::SetRegistrationLock { user_id, pin_hash };
    match shared.shards.apply_for(user_id, op) {
        Some(Ok(wait)) => shared.reply_when_durable(conn, rid, &Done {}, vec![wait]),
        Some(Err(error)) => {
            let ty = MessageType::SetRegistrationLock.code();
            shared.conns.refuse(conn, rid, ty, &StorageRefusal::of(&error));
        }
        None => {}
    }
}

/// The PIN hash of `phone`'s account, if it is locked (homed here).
fn registration_lock<S: Storage>(shared: &Shared<S>, phone: &str) -> Option<Vec<u8>> {
    let shard = shared.shards.local(home_shard_of_phone(phone, shared.shards.count()))?;
    let shard = shard.borrow();
    let user = shard.state().user_by_phone(phone)?;
    shard.state().account(user)?.registration_lock.clone()
}

/// E.164: '+' and 8 to 15 digits.
fn valid_phone(phone: &str) -> bool {
    let digits = phone.strip_prefix('+').unwrap_or("");
    (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
}

/// A user id for a new account of `shard`: the shard in the top 16 bits, then 48 random
/// bits (never 0, never an existing account's), so that ids say nothing of when or in
/// which order accounts were made and cannot be enumerated by counting.
fn new_user_id<S: Storage>(shard: &Shard<S>, shard_id: u32, random: &mut Random) -> UserId {
    let shard_bits = u64::from(shard_id) << 48;
    loop {
        let candidate = shard_bits | (random.next_u64() & ((1 << 48) - 1));
        if candidate != shard_bits && shard.state().account(candidate).is_none() {
            return candidate;
        }
    }
}

/// Below the disk reserve a number with no account gets none (the space left is kept
/// for messages); a registered number may still move to a new phone (that adds no
/// account). Checked before a code is sent, and again at verification.
fn disk_reserve_allows<S: Storage>(
    shared: &Shared<S>,
    phone: &str,
) -> Result<(), RegistrationRefusal> {
    if !shared.disk_low() {
        return Ok(());
    }
    let shard_id = home_shard_of_phone(phone, shared.shards.count());
    let registered = shared
        .shards
        .local(shard_id)
        .is_some_and(|shard| shard.borrow().state().user_by_phone(phone).is_some());
    match registered {
        true => Ok(()),
        false => Err(RegistrationRefusal::Storage { refusal: StorageRefusal::Reserve }),
    }
}

/// Creates the account for `phone` with an id from `new_id`. A number with an account
/// moves it to the new primary device (revoking every old device and token) when it
/// `inherit`s it; otherwise the old account's state record is deleted and a fresh one
/// made, with a new id (so no device id, group, contact or profile carries over).
fn create_account<S: Storage>(
    shard: &mut Shard<S>,
    phone: &str,
    new_id: impl FnOnce(&Shard<S>) -> UserId,
    inherit: Inherit,
    (device, token): (NewDevice, &Token),
    now_ms: u64,
) -> Result<Created, WriteError> {
    let existing = shard.state().user_by_phone(phone);
    let old_devices = |shard: &Shard<S>, user_id| -> Vec<DeviceId> {
        let account = shard.state().account(user_id);
        account.map(|a| a.devices.iter().map(|d| d.device_id).collect()).unwrap_or_default()
    };
    let (user_id, moved, replaced) = match (existing, inherit) {
        (Some(user_id), Inherit::Account) => {
            for device_id in old_devices(shard, user_id).into_iter().filter(|d| *d != 1) {
                shard.apply_state(StateOp::RemoveDevice { user_id, device_id })?;
            }
            (user_id, true, None)
        }
        (existing, _) => {
            let replaced = existing.map(|old| (old, old_devices(shard, old)));
            if let Some((old, _)) = &replaced {
                shard.apply_state(StateOp::DeleteAccount { user_id: *old })?;
            }
            let user_id = new_id(shard);
            let put = StateOp::PutAccount { user_id, phone: phone.to_string(), created_ms: now_ms };
            shard.apply_state(put)?;
            (user_id, false, replaced)
        }
    };
    let record = device_record(1, device, token, now_ms);
    let seq = shard.apply_state(StateOp::PutDevice { user_id, device: record })?;
    Ok(Created { user_id, moved, replaced, seq })
}

/// The stored form of a new device with `token`.
pub fn device_record(
    device_id: DeviceId,
    device: NewDevice,
    token: &Token,
    now_ms: u64,
) -> DeviceRecord {
    DeviceRecord {
        device_id,
        name: device.name,
        token_hash: secrets::token_hash(token),
        identity_key: device.keys.identity_key,
        signing_key: device.keys.signing_key,
        fallback_key: device.keys.fallback_key,
        one_time_keys: device.keys.one_time_keys,
        push: None,
        created_ms: now_ms,
    }
}
