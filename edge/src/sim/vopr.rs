//! The randomized run (TigerBeetle's VOPR, FoundationDB's simulator): simulated people
//! register, send 1:1 and group messages, fetch keys, acknowledge, send receipts, drop
//! off and come back, while the world interleaves the server's events at random, moves
//! the clock and cuts the power. Every run is judged by `tern_testkit::ledger`: nothing
//! acknowledged lost, nothing stored twice, order per sender and conversation, payloads
//! intact, one-time keys handed out once; and a registered account never disappears.
//!
//! A run is a pure function of its seed: [`run`] with the same seed and options takes
//! the same steps and reaches the same verdict, so a failing seed is a regression test.

use std::collections::BTreeMap;

use tern_testkit::ledger::{open_payload, payload, Ledger, Received as Got};
use tern_wire::messages::{
    ArchivedConversation, ArchivedEnvelopeKind, Bundles, CodeSent, Conversation, DeliveryAck,
    FetchBundles, GroupChange, GroupId, Hello, ReceiptKind, Registered, SendMessage, SendReceipt,
    Welcome,
};
use tern_wire::{MessageType, Payload, WireSerializer, DEFAULT_MAX_FRAME_BYTES, HELLO_MAGIC};

use super::peer::{self, Account};
use super::world::{LinkId, Received, SimConfig, World};
use crate::core::config::CoreConfig;
use crate::limits::Rate;
use crate::routing::home_shard_of_user;

/// What a run does.
#[derive(Clone, Debug)]
pub struct Options {
    /// People.
    pub people: usize,
    /// Steps (each one server event or one person's action).
    pub steps: usize,
    /// Power cuts, each at a step drawn at random over the run.
    pub power_cuts: u32,
    /// The server.
    pub server: SimConfig,
    /// A fault no server survives, to show the judge is not blind: at each power cut one
    /// shard's disk is lost whole (synced records included).
    pub lose_a_disk: bool,
}

impl Default for Options {
    fn default() -> Self {
        let mut core = CoreConfig::default();
        // The run is about durability and order, not about the rate limits.
        let unlimited = Rate { burst: 1e9, per_second: 1e9 };
        (core.send_rate, core.fetch_rate) = (unlimited, unlimited);
        core.stranger_send_rate = unlimited;
        core.code_requests_per_hour = 1_000;
        core.code_requests_per_prefix_per_hour = 100_000;
        core.code_requests_per_address_per_hour = 100_000;
        let server = SimConfig { core, ..SimConfig::default() };
        Options { people: 6, steps: 4_000, power_cuts: 2, server, lose_a_disk: false }
    }
}

/// What a clean run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Messages whose sent tick arrived.
    pub acked: usize,
    /// Envelopes handed to recipients (re-deliveries included).
    pub delivered: usize,
    /// Sends refused (and not retried).
    pub refused: usize,
    /// Groups created.
    pub groups: usize,
    /// Power cuts.
    pub power_cuts: u64,
}

/// Messages a person has in flight at most (the SDK's outbox window).
const WINDOW: usize = 4;
/// One-time keys each device uploads.
const ONE_TIME_KEYS: u64 = 6;

/// What a request was, to know what its response means.
#[derive(Clone, Debug)]
enum Asked {
    Hello,
    Code,
    Verify,
    Auth,
    Send(u64),
    Group(GroupId, Vec<usize>),
    Fetch(u64),
    Other,
}

/// One person's open connection.
#[derive(Debug)]
struct Connection {
    link: LinkId,
    next_request_id: u32,
    asked: BTreeMap<u32, Asked>,
    ready: bool,
}

/// A message in the outbox, re-sent on every new connection until acknowledged.
#[derive(Clone, Debug)]
struct Outgoing {
    message: SendMessage,
}

/// One simulated person with one device; what the device stores survives power cuts
/// of the server (it is the client's own disk).
#[derive(Debug)]
struct Person {
    phone: String,
    account: Option<Account>,
    connection: Option<Connection>,
    outbox: BTreeMap<u64, Outgoing>,
    next_client_id: u64,
    groups: Vec<(GroupId, Vec<usize>)>,
    /// Highest mailbox position received, and acknowledged.
    received_up_to: u64,
    acked_up_to: u64,
    /// Server ids of texts received from each sender, for receipts.
    unreceipted: Vec<(u64, u64)>,
}

impl Person {
    fn new(index: usize) -> Person {
        Person {
            phone: format!("+1555{:07}", 3_000_000 + index),
            account: None,
            connection: None,
            outbox: BTreeMap::new(),
            next_client_id: 1,
            groups: Vec::new(),
            received_up_to: 0,
            acked_up_to: 0,
            unreceipted: Vec::new(),
        }
    }

    fn device(&self) -> Option<(u64, u32)> {
        self.account.map(|a| a.device())
    }
}

/// The run's state: the world, the people, the ledger, and violations found so far.
struct Run {
    world: World,
    people: Vec<Person>,
    ledger: Ledger,
    report: Report,
    violations: Vec<String>,
    options: Options,
}

/// Runs seed `seed`: a clean report, or every violation found (with the seed).
pub fn run(seed: u64, options: &Options) -> Result<Report, Vec<String>> {
    let mut world = World::new(options.server.clone(), seed);
    // The cuts fall anywhere in the run, not mostly before the first registration.
    let steps = options.steps.max(1) as u64;
    let mut cut_at: Vec<usize> =
        (0..options.power_cuts).map(|_| world.below(steps) as usize).collect();
    cut_at.sort_unstable();
    let mut run = Run {
        world,
        people: (0..options.people).map(Person::new).collect(),
        ledger: Ledger::default(),
        report: Report::default(),
        violations: Vec::new(),
        options: options.clone(),
    };
    for step in 0..options.steps {
        run.step();
        for _ in cut_at.iter().filter(|at| **at == step) {
            run.power_cut();
        }
        if !run.violations.is_empty() {
            break;
        }
    }
    run.finish();
    let mut violations = run.violations;
    violations.extend(run.ledger.check());
    if violations.is_empty() {
        run.report.acked = run.ledger.acked_count();
        run.report.power_cuts = run.world.boots();
        Ok(run.report)
    } else {
        violations.insert(0, format!("seed {seed}: {} violations", violations.len()));
        Err(violations)
    }
}

impl Run {
    /// One step: mostly a server event, else one person acts, the clock moves or the
    /// maintenance pass runs. (Power cuts fall at steps drawn when the run starts.)
    fn step(&mut self) {
        let roll = self.world.below(1_000);
        match roll {
            0..=599 => {
                self.world.step();
            }
            600..=939 => {
                let who = self.world.below(self.people.len() as u64) as usize;
                self.act(who);
            }
            940..=989 => {
                let ms = 1 + self.world.below(2_000);
                self.world.advance(ms);
            }
            _ => self.world.maintain(),
        }
        self.read_all();
    }

    /// The power goes. With [`Options::lose_a_disk`], the disk of a shard that holds
    /// someone's account goes with it (a random one while nobody has registered).
    fn power_cut(&mut self) {
        if self.options.lose_a_disk {
            let homes: Vec<u32> = self
                .people
                .iter()
                .filter_map(|p| p.account.map(|a| home_shard_of_user(a.user_id)))
                .collect();
            let shard = match homes.len() {
                0 => self.world.below(u64::from(self.options.server.shards)) as u32,
                n => homes[self.world.below(n as u64) as usize],
            };
            self.world.lose_disk(shard);
        }
        self.world.power_cut();
    }

    /// After the steps: everyone comes online and the world settles, so that every
    /// acknowledged message has had its chance to arrive.
    fn finish(&mut self) {
        for _ in 0..50 {
            for who in 0..self.people.len() {
                if self.people[who].connection.is_none() {
                    self.connect(who);
                }
                self.ack_deliveries(who);
            }
            self.world.settle();
            self.read_all();
            if self.people.iter().all(|p| p.connection.as_ref().is_some_and(|c| c.ready)) {
                let quiet = self.world.events().is_empty();
                if quiet && self.people.iter().all(|p| p.outbox.is_empty()) {
                    return;
                }
            }
        }
    }

    // -- acting ------------------------------------------------------------------------

    fn act(&mut self, who: usize) {
        let Some(connection) = &self.people[who].connection else {
            return self.connect(who);
        };
        if !connection.ready {
            return;
        }
        match self.world.below(100) {
            0..=49 => self.send_text(who),
            50..=59 => self.send_group_text(who),
            60..=63 => self.create_group(who),
            64..=69 => self.fetch_keys(who),
            70..=84 => self.ack_deliveries(who),
            85..=93 => self.send_receipt(who),
            _ => self.disconnect(who),
        }
    }

    fn connect(&mut self, who: usize) {
        let link = self.world.connect();
        let connection =
            Connection { link, next_request_id: 1, asked: BTreeMap::new(), ready: false };
        self.people[who].connection = Some(connection);
        let hello = Hello {
            magic: HELLO_MAGIC,
            version_min: 1,
            version_max: 1,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            client: "tern-vopr".into(),
        };
        self.ask(who, &hello, Asked::Hello);
    }

    fn disconnect(&mut self, who: usize) {
        if let Some(connection) = self.people[who].connection.take() {
            self.world.close(connection.link);
        }
    }

    /// Sends `value` on `who`'s connection, remembering what it asked.
    fn ask<T>(&mut self, who: usize, value: &T, asked: Asked)
    where
        T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
    {
        let Some(connection) = &mut self.people[who].connection else { return };
        let id = connection.next_request_id;
        connection.next_request_id += 1;
        connection.asked.insert(id, asked);
        let link = connection.link;
        self.world.write(link, &peer::frame(id, value));
    }

    /// Someone with an account, other than `who`, at random.
    fn someone_else(&mut self, who: usize) -> Option<usize> {
        let others: Vec<usize> = (0..self.people.len())
            .filter(|i| *i != who && self.people[*i].account.is_some())
            .collect();
        let pick = self.world.below(others.len() as u64) as usize;
        others.get(pick).copied()
    }

    fn send_text(&mut self, who: usize) {
        if self.people[who].outbox.len() >= WINDOW {
            return;
        }
        let Some(to) = self.someone_else(who) else { return };
        let recipient = self.people[to].account.expect("chosen among accounts");
        let filler = self.world.below(200) as usize;
        let message = |id, body: &[u8]| peer::text(&recipient, id, body);
        self.queue(who, vec![recipient.device()], filler, message);
    }

    fn send_group_text(&mut self, who: usize) {
        if self.people[who].outbox.len() >= WINDOW || self.people[who].groups.is_empty() {
            return;
        }
        let pick = self.world.below(self.people[who].groups.len() as u64) as usize;
        let (group_id, members) = self.people[who].groups[pick].clone();
        let recipients = members
            .iter()
            .filter(|m| **m != who)
            .filter_map(|m| self.people[*m].device())
            .collect();
        let filler = self.world.below(200) as usize;
        self.queue(who, recipients, filler, |id, body| peer::group_text(group_id, id, body));
    }

    /// Logs a new message in the ledger and the outbox, then sends it.
    fn queue(
        &mut self,
        who: usize,
        recipients: Vec<(u64, u32)>,
        filler: usize,
        message: impl Fn(u64, &[u8]) -> SendMessage,
    ) {
        let person = &mut self.people[who];
        let Some(me) = person.device() else { return };
        let client_id = person.next_client_id;
        person.next_client_id += 1;
        let body = payload(who as u64, client_id, filler);
        self.ledger.sending(me, client_id, client_id, &recipients);
        let message = message(client_id, &body);
        person.outbox.insert(client_id, Outgoing { message: message.clone() });
        self.ask(who, &message, Asked::Send(client_id));
    }

    fn create_group(&mut self, who: usize) {
        let Some(me) = self.people[who].account else { return };
        let mut members = vec![who];
        for _ in 0..1 + self.world.below(3) {
            if let Some(other) = self.someone_else(who) {
                if !members.contains(&other) {
                    members.push(other);
                }
            }
        }
        let group_id = (who as u64) << 32 | self.people[who].next_client_id;
        self.people[who].next_client_id += 1;
        let others = members[1..].iter().filter_map(|m| self.people[*m].account);
        let change = GroupChange::Create {
            name: "sim".into(),
            members: others.map(|a| a.user_id).collect(),
        };
        let update = peer::signed_update(&me, group_id, 0, change);
        self.ask(who, &update, Asked::Group(group_id, members));
    }

    fn fetch_keys(&mut self, who: usize) {
        let Some(other) = self.someone_else(who) else { return };
        let user_id = self.people[other].account.expect("an account").user_id;
        self.ask(who, &FetchBundles { user_id, device_ids: Vec::new() }, Asked::Fetch(user_id));
    }

    fn ack_deliveries(&mut self, who: usize) {
        let person = &mut self.people[who];
        if person.connection.as_ref().is_some_and(|c| c.ready)
            && person.received_up_to > person.acked_up_to
        {
            person.acked_up_to = person.received_up_to;
            let ack = DeliveryAck { up_to_mailbox_seq: person.received_up_to };
            self.ask(who, &ack, Asked::Other);
        }
    }

    fn send_receipt(&mut self, who: usize) {
        let Some((to_user, message_id)) = self.people[who].unreceipted.pop() else { return };
        let kind = if self.world.chance(50) { ReceiptKind::Delivered } else { ReceiptKind::Read };
        let receipt = SendReceipt {
            kind,
            to_user,
            conversation: Conversation::User(to_user),
            message_ids: vec![message_id],
        };
        self.ask(who, &receipt, Asked::Other);
    }

    // -- what came back ----------------------------------------------------------------

    fn read_all(&mut self) {
        for who in 0..self.people.len() {
            let Some(connection) = &self.people[who].connection else { continue };
            let link = connection.link;
            for frame in self.world.take_frames(link) {
                self.handle(who, frame);
            }
            if !self.world.is_open(link) {
                // The server closed it, or the power went: reconnect on a later step.
                self.people[who].connection = None;
            }
        }
    }

    fn handle(&mut self, who: usize, frame: Received) {
        if frame.header.message_type == MessageType::Deliver {
            return self.delivered(who, &frame);
        }
        let asked = self.people[who]
            .connection
            .as_mut()
            .and_then(|c| c.asked.remove(&frame.header.request_id));
        match asked {
            Some(Asked::Hello) => self.welcomed(who, &frame),
            Some(Asked::Code) => self.code_sent(who, &frame),
            Some(Asked::Verify) => self.registered(who, &frame),
            Some(Asked::Auth) => self.authenticated(who, &frame),
            Some(Asked::Send(client_id)) => self.send_answered(who, client_id, &frame),
            Some(Asked::Group(group_id, members)) => {
                if frame.header.message_type == MessageType::GroupUpdated {
                    self.report.groups += 1;
                    self.people[who].groups.push((group_id, members));
                }
            }
            Some(Asked::Fetch(user_id)) => self.bundles(user_id, &frame),
            Some(Asked::Other) | None => {}
        }
    }

    fn welcomed(&mut self, who: usize, frame: &Received) {
        frame.access::<Welcome>();
        match self.people[who].account {
            Some(account) => self.ask(who, &peer::auth(&account), Asked::Auth),
            None => {
                let request = peer::request_code(&self.people[who].phone);
                self.ask(who, &request, Asked::Code);
            }
        }
    }

    fn code_sent(&mut self, who: usize, frame: &Received) {
        if frame.header.message_type != MessageType::CodeSent {
            return self.disconnect(who); // Refused (a budget): try again later.
        }
        frame.access::<CodeSent>();
        let phone = self.people[who].phone.clone();
        let code = self.world.code_for(&phone).expect("the core sent a code");
        self.ask(who, &peer::verify(&phone, code, ONE_TIME_KEYS), Asked::Verify);
    }

    fn registered(&mut self, who: usize, frame: &Received) {
        if frame.header.message_type != MessageType::Registered {
            return self.disconnect(who);
        }
        let registered = frame.access::<Registered>();
        let account = Account {
            user_id: registered.user_id.to_native(),
            device_id: registered.device_id.to_native(),
            token: registered.token,
            signing_seed: peer::seed_of(&self.people[who].phone),
        };
        self.people[who].account = Some(account);
        self.ask(who, &peer::auth(&account), Asked::Auth);
    }

    /// `AuthOk`: the outbox goes again, in order. A refusal of a registered account is
    /// a lost account.
    fn authenticated(&mut self, who: usize, frame: &Received) {
        if frame.header.message_type != MessageType::AuthOk {
            let phone = &self.people[who].phone;
            let why = frame.describe();
            self.violations.push(format!("{phone}'s registered account was refused: {why}"));
            return;
        }
        if let Some(connection) = &mut self.people[who].connection {
            connection.ready = true;
        }
        let person = &mut self.people[who];
        // What was received but not acknowledged comes again from the server.
        person.received_up_to = person.acked_up_to;
        let outbox: Vec<(u64, SendMessage)> =
            person.outbox.iter().map(|(id, o)| (*id, o.message.clone())).collect();
        for (client_id, message) in outbox {
            self.ask(who, &message, Asked::Send(client_id));
        }
    }

    fn send_answered(&mut self, who: usize, client_id: u64, frame: &Received) {
        let Some(me) = self.people[who].device() else { return };
        match frame.header.message_type {
            MessageType::SendAck => self.ledger.acked(me, client_id),
            _ => self.report.refused += 1,
        }
        self.people[who].outbox.remove(&client_id);
    }

    fn bundles(&mut self, user_id: u64, frame: &Received) {
        if frame.header.message_type != MessageType::Bundles {
            return;
        }
        for device in frame.access::<Bundles>().devices.iter() {
            if let Some(key) = device.one_time_key.as_ref() {
                let owner = (user_id, device.device_id.to_native());
                self.ledger.key_handed_out(owner, key.key_id.to_native());
            }
        }
    }

    fn delivered(&mut self, who: usize, frame: &Received) {
        let deliver = frame.deliver();
        let Some(me) = self.people[who].device() else { return };
        let person = &mut self.people[who];
        person.received_up_to = person.received_up_to.max(deliver.mailbox_seq);
        let envelope = deliver.envelope;
        if envelope.kind != ArchivedEnvelopeKind::Text {
            return;
        }
        self.report.delivered += 1;
        let sender = (envelope.sender_user.to_native(), envelope.sender_device.to_native());
        let stream = match envelope.conversation {
            ArchivedConversation::Group(group) => group.to_native(),
            _ => {
                person.unreceipted.push((sender.0, envelope.server_message_id.to_native()));
                0
            }
        };
        let got = Got {
            sender,
            client_message_id: envelope.client_message_id.to_native(),
            server_message_id: envelope.server_message_id.to_native(),
            mailbox_seq: deliver.mailbox_seq,
            sequence: open_payload(&envelope.body).map(|(_, sequence)| sequence),
            stream,
        };
        self.ledger.received(me, got);
    }
}
