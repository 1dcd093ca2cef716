//! `tern`, the chat CLI: a person's way to try Tern without writing an app.
//!
//! Each invocation opens one device's store (`--store`, an encrypted SQLCipher file made
//! by the SDK), does one thing and exits, after handling and acknowledging whatever the
//! server had waiting for the device; `tern chat` and `tern group listen` stay, show
//! what arrives live, and take the sends of other `tern`s on the same store
//! (`handoff.rs`). The store is encrypted with a passphrase (`TERN_PASSPHRASE`, or
//! asked for). People are shown by name (`people.rs`); the chat screen is `chat.rs`.

mod chat;
mod handoff;
mod people;

use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tern_client::{
    Client, ClientError, Endpoint, Event, PendingLink, PendingRegistration, Status, StoreSecret,
    Trust,
};
use tokio::io::AsyncBufReadExt;

use crate::chat::{Chat, Target};
use crate::people::{conversation_of, label, line_of, Names};

#[derive(Debug, Parser)]
#[command(
    name = "tern",
    version = tern_tools::version::VERSION,
    about = "Tern's chat client (end-to-end encrypted)"
)]
struct Args {
    /// This device's store (created by `register` or `link`).
    #[arg(long, env = "TERN_STORE", default_value = "tern.db")]
    store: PathBuf,
    /// The server, `host:port` (default: the one the device registered with, or a local
    /// ternd).
    #[arg(long, env = "TERN_SERVER")]
    server: Option<String>,
    /// Use TLS 1.3; trust the web PKI, or exactly `--ca` (e.g. a development ternd's
    /// `tern-data/tls/dev-cert.pem`).
    #[arg(long)]
    tls: bool,
    /// The certificate to trust with `--tls` (a development ternd's is
    /// `tern-data/tls/dev-cert.pem` in the directory it runs in).
    #[arg(long, env = "TERN_CA", requires = "tls")]
    ca: Option<PathBuf>,
    /// Speak WebSocket (to ternd's WebSocket listener, e.g. 127.0.0.1:7480).
    #[arg(long)]
    websocket: bool,
    /// Connect without TLS to a server that is not on this machine: the token and every
    /// frame cross the network in clear. Refused without this flag; a device remembers
    /// the choice made at `register`/`link`.
    #[arg(long)]
    insecure_plaintext: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register this device with a phone number (the code is asked for).
    Register {
        /// E.164 phone number, like +15550001.
        #[arg(long)]
        phone: String,
        /// The number's registration-lock PIN, if it has one.
        #[arg(long)]
        pin: Option<String>,
        /// A name for this device.
        #[arg(long, default_value = "tern cli")]
        name: String,
    },
    /// Link this device to an existing account: shows a code to approve on the primary.
    Link {
        /// A name for this device.
        #[arg(long, default_value = "tern cli")]
        name: String,
    },
    /// Approve a device waiting to be linked (run on the primary device).
    Approve {
        /// The code the new device shows.
        code: String,
    },
    /// Show this device's user id (give it to the people who want to write to you).
    Whoami,
    /// Send one message, or a file (`--file`: compressed, encrypted, uploaded).
    Send {
        /// The recipient's user id.
        #[arg(long)]
        to: u64,
        /// A file to send instead of text (photos are downscaled, documents compressed).
        #[arg(long)]
        file: Option<PathBuf>,
        /// The text.
        text: Vec<String>,
    },
    /// Download the file a received message carries (its id is in `history`).
    Get {
        /// The message's server id.
        message: u64,
        /// The folder to write it into.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Chat with someone (--with) or a group (--group): incoming messages, ticks and
    /// typing appear live; type a line and Enter to send; Ctrl-D to leave.
    Chat {
        /// The other person's user id.
        #[arg(long, required_unless_present = "group", conflicts_with = "group")]
        with: Option<u64>,
        /// The group's id.
        #[arg(long)]
        group: Option<u64>,
    },
    /// Show the conversation with someone.
    History {
        /// The other person's user id.
        #[arg(long)]
        with: u64,
        /// How many messages.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Search this device's history: messages holding every word (words also match as
    /// prefixes: "hel" finds "hello").
    Search {
        /// The words.
        query: Vec<String>,
        /// How many results.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Which of these phone numbers are on Tern (only truncated hashes are sent).
    Discover {
        /// E.164 numbers, like +15550001.
        phones: Vec<String>,
    },
    /// Show someone's profile (or set yours with --name/--about).
    Profile {
        /// Whose (default: yours).
        user: Option<u64>,
        /// Your new display name.
        #[arg(long)]
        name: Option<String>,
        /// Your new about text.
        #[arg(long)]
        about: Option<String>,
    },
    /// Show this account's privacy settings, or turn read receipts on or off (off: this
    /// device stops sending them at once, whatever the server does).
    Privacy {
        /// on or off.
        #[arg(long, value_parser = ["on", "off"])]
        read_receipts: Option<String>,
    },
    /// Replace this account's contact list: who sees the name, avatar, about text and
    /// presence that privacy keeps for contacts (new accounts keep all of them so).
    Contacts {
        /// User ids.
        users: Vec<u64>,
    },
    /// Block a user (or unblock with --undo).
    Block {
        /// Whom.
        user: u64,
        /// Unblock instead.
        #[arg(long)]
        undo: bool,
    },
    /// Report a user to the server's operator.
    Report {
        /// Whom.
        user: u64,
        /// Why: spam, abuse, illegal or other.
        #[arg(long, default_value = "spam")]
        reason: String,
        /// Message ids to share (metadata only).
        #[arg(long, value_delimiter = ',')]
        messages: Vec<u64>,
        /// Free text.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// List this account's devices, unlink one (--unlink ID, from the primary), or send
    /// a newly linked one the recent history of this device (--send-history ID).
    Devices {
        /// The device to remove.
        #[arg(long, conflicts_with = "send_history")]
        unlink: Option<u32>,
        /// The device to send the history to (end-to-end encrypted).
        #[arg(long)]
        send_history: Option<u32>,
        /// Messages per conversation in the history sent.
        #[arg(long, default_value_t = 200)]
        per_conversation: usize,
    },
    /// Set (--pin) or remove (--remove) the PIN that protects this number from takeover.
    Lock {
        /// The PIN.
        #[arg(long)]
        pin: Option<String>,
        /// Remove the lock.
        #[arg(long)]
        remove: bool,
    },
    /// Save everything the server holds about this account (JSON) into a folder.
    Export {
        /// The folder.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Groups (up to 256 members): create, change, send, show.
    Group {
        #[command(subcommand)]
        action: GroupAction,
    },
    /// Show the safety number with someone, to compare in person.
    SafetyNumber {
        /// The other person's user id.
        #[arg(long)]
        with: u64,
    },
}

#[derive(Debug, Subcommand)]
enum GroupAction {
    /// Create a group (you are its admin); prints its id.
    Create {
        /// Its name.
        #[arg(long)]
        name: String,
        /// Member user ids, comma-separated.
        #[arg(long, value_delimiter = ',')]
        members: Vec<u64>,
    },
    /// Add members (admins only).
    Add {
        /// The group.
        group: u64,
        /// User ids.
        members: Vec<u64>,
    },
    /// Remove members (admins only).
    Remove {
        /// The group.
        group: u64,
        /// User ids.
        members: Vec<u64>,
    },
    /// Leave a group.
    Leave {
        /// The group.
        group: u64,
    },
    /// Rename a group (admins only).
    Rename {
        /// The group.
        group: u64,
        /// Its new name.
        name: Vec<String>,
    },
    /// Make a member admin.
    Promote {
        /// The group.
        group: u64,
        /// The member.
        member: u64,
    },
    /// Take admin rights from a member.
    Demote {
        /// The group.
        group: u64,
        /// The member.
        member: u64,
    },
    /// Send one message to a group.
    Send {
        /// The group.
        group: u64,
        /// The text.
        text: Vec<String>,
    },
    /// Show a group's members (as this device verified them) and recent messages, with
    /// how many devices received and read each of yours.
    Show {
        /// The group.
        group: u64,
    },
    /// Wait for group events and messages and print them, marking them read (Ctrl-C to
    /// stop). Other `tern send` / `tern group send` on this store are sent through it.
    Listen,
}

const DEFAULT_SERVER: &str = "127.0.0.1:7400";

/// How long a one-shot command waits for the server to take a queued message, or for
/// what was waiting for the device to arrive, before it leaves them to the next run.
const ONE_SHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tern: {error}");
            ExitCode::FAILURE
        }
    }
}

fn passphrase() -> Result<StoreSecret, ClientError> {
    if let Ok(passphrase) = std::env::var("TERN_PASSPHRASE") {
        return Ok(StoreSecret::Passphrase(passphrase));
    }
    let passphrase = rpassword::prompt_password("passphrase for the store: ")
        .map_err(|e| ClientError::Config(format!("reading the passphrase: {e}")))?;
    Ok(StoreSecret::Passphrase(passphrase))
}

fn endpoint(args: &Args, registered: Option<&str>) -> Endpoint {
    let address = args.server.clone().or(registered.map(str::to_string));
    let address = address.unwrap_or_else(|| DEFAULT_SERVER.to_string());
    let tls = args.tls.then(|| match &args.ca {
        Some(ca) => Trust::Pinned(ca.clone()),
        None => Trust::WebPki,
    });
    Endpoint { address, tls, websocket: args.websocket, allow_plaintext: args.insecure_plaintext }
}

/// The store's lock for a command that connects, or the refusal naming its holder.
fn lock_store(args: &Args) -> Result<handoff::StoreLock, ClientError> {
    handoff::lock(&args.store)?.map_err(|holder| handoff::in_use(&args.store, holder))
}

/// Opens the store and connects (holding the store's lock, given by the caller).
async fn open(args: &Args) -> Result<Client, ClientError> {
    let secret = passphrase()?;
    // Without --server: the transport and trust root the device registered with.
    let endpoint = args.server.is_some().then(|| endpoint(args, None));
    Client::open(&args.store, &secret, endpoint).await
}

/// Opens the store without connecting (whoami).
fn open_offline(args: &Args) -> Result<Client, ClientError> {
    Client::open_offline(&args.store, &passphrase()?)
}

/// Opens the store for reading the history, brought up to date first when it can be:
/// connected and caught up if no other `tern` holds the store (one that does keeps it
/// up to date itself) and the server answers; as it is otherwise.
async fn open_fresh(args: &Args) -> Result<Client, ClientError> {
    if let Ok(_lock) = handoff::lock(&args.store)? {
        match open(args).await {
            Ok(mut client) => {
                finish(&mut client).await?;
                return Ok(client);
            }
            Err(ClientError::Store(error)) => return Err(error.into()),
            Err(_) => {} // No server: the history as this device has it.
        }
    }
    open_offline(args)
}

async fn run(args: Args) -> Result<(), ClientError> {
    match &args.command {
        Command::Register { phone, name, pin } => {
            register(&args, phone, name, pin.as_deref()).await
        }
        Command::Link { name } => link(&args, name).await,
        Command::Whoami => whoami(&args),
        Command::History { with, limit } => history(&args, *with, *limit).await,
        Command::Search { query, limit } => search(&args, &query.join(" "), *limit).await,
        Command::Send { to, file: None, text } => {
            let request = handoff::Request { to: Some(*to), group: None, text: text.join(" ") };
            send_or_hand_over(&args, request).await
        }
        Command::Group { action: GroupAction::Send { group, text } } => {
            let request = handoff::Request { to: None, group: Some(*group), text: text.join(" ") };
            send_or_hand_over(&args, request).await
        }
        Command::Chat { with, group } => {
            let _lock = lock_store(&args)?;
            let mut client = open(&args).await?;
            let target = chat_target(&mut client, *with, *group).await?;
            let listener = handoff::Listener::bind(&args.store)?;
            let raw = std::io::stdin().is_terminal();
            Chat::start(client, target, raw).await?.run(Some(listener)).await
        }
        Command::Group { action: GroupAction::Listen } => {
            let _lock = lock_store(&args)?;
            let client = open(&args).await?;
            let listener = handoff::Listener::bind(&args.store)?;
            Chat::start(client, Target::Everything, false).await?.listen(listener).await
        }
        _ => {
            let _lock = lock_store(&args)?;
            let mut client = open(&args).await?;
            connected(&args, &mut client).await?;
            // Whatever the server had waiting is handled and acknowledged before leaving.
            finish(&mut client).await
        }
    }
}

/// Handles and acknowledges what the server had waiting (bounded), showing nothing.
async fn finish(client: &mut Client) -> Result<(), ClientError> {
    match tokio::time::timeout(ONE_SHOT_WAIT, client.catch_up()).await {
        Ok(events) => events.map(drop),
        Err(_) => Ok(()), // The rest waits for the next run.
    }
}

async fn register(
    args: &Args,
    phone: &str,
    name: &str,
    pin: Option<&str>,
) -> Result<(), ClientError> {
    let secret = passphrase()?;
    let mut pending = PendingRegistration::request_code(&endpoint(args, None), phone).await?;
    if let Some(pin) = pin {
        pending = pending.with_pin(pin);
    }
    println!("a code was sent to {phone} (valid {} s)", pending.expires_in_s);
    // A wrong code asks again: a new code would cost the number's hourly budget.
    for attempt in 1..=3 {
        let code = prompt_line("code: ").await?;
        match pending.verify_or_retry(code.trim(), name, &args.store, &secret).await {
            Ok(client) => {
                println!("registered: user {} device {}", client.user_id(), client.device_id());
                return Ok(());
            }
            Err((Some(again), _)) if attempt < 3 => {
                println!("that code is not right; type it again (as sent to {phone})");
                pending = again;
            }
            Err((_, error)) => return Err(error),
        }
    }
    Err(ClientError::Config("three wrong codes; run `tern register` again".into()))
}

async fn link(args: &Args, name: &str) -> Result<(), ClientError> {
    let secret = passphrase()?;
    let pending = PendingLink::request(&endpoint(args, None), name).await?;
    println!("approve this device on your primary: tern approve {}", pending.code());
    println!("this device's key fingerprint: {}", pending.fingerprint());
    let client = pending.wait(&args.store, &secret).await?;
    println!("linked: user {} device {}", client.user_id(), client.device_id());
    Ok(())
}

fn whoami(args: &Args) -> Result<(), ClientError> {
    let client = open_offline(args)?;
    let phone = client.own_phone()?.unwrap_or_else(|| "not on this device".into());
    println!("user {} device {} phone {phone}", client.user_id(), client.device_id());
    println!("key fingerprint: {}", client.fingerprint());
    Ok(())
}

async fn history(args: &Args, with: u64, limit: usize) -> Result<(), ClientError> {
    let client = open_fresh(args).await?;
    for message in client.history(with, limit)? {
        println!("{}", line_of(&client, &message, true));
    }
    Ok(())
}

async fn search(args: &Args, words: &str, limit: usize) -> Result<(), ClientError> {
    let client = open_fresh(args).await?;
    let found = client.search(words, limit)?;
    if found.is_empty() {
        println!("no matches for {words:?}");
    }
    for message in found {
        let place = conversation_of(&client, &message)?;
        println!("{place}: {}", line_of(&client, &message, true));
    }
    Ok(())
}

/// `tern send` and `tern group send`: handed to the running `tern chat` / `listen`
/// holding the store, or sent on a connection of its own.
async fn send_or_hand_over(args: &Args, request: handoff::Request) -> Result<(), ClientError> {
    let _lock = match handoff::lock(&args.store)? {
        Ok(lock) => lock,
        Err(holder) => {
            let Some(reply) = handoff::hand_over(&args.store, &request).await? else {
                return Err(handoff::in_use(&args.store, holder));
            };
            reply.lines.iter().for_each(|line| println!("{line}"));
            return match reply.error {
                Some(error) => Err(ClientError::Config(error)),
                None => Ok(()),
            };
        }
    };
    let mut client = open(args).await?;
    // Catch up first: group changes and keys that arrived while away.
    finish(&mut client).await?;
    match (request.to, request.group) {
        (Some(to), _) => send_text(&mut client, to, &request.text).await?,
        (None, Some(group)) => {
            let sent = client.send_group_text(group, &request.text).await?;
            println!("{} sent (id {}) {}", sent.status.ticks(), sent.server_id, sent.text);
        }
        (None, None) => unreachable!("clap requires a recipient"),
    }
    finish(&mut client).await
}

/// A one-shot text: sent, or queued when the server cannot take it now.
async fn send_text(client: &mut Client, to: u64, text: &str) -> Result<(), ClientError> {
    let mut sent = client.send_text(to, text).await?;
    if sent.status == Status::Sending {
        // Waiting (the server asked for later, or is away): give it a moment.
        let wait = async {
            loop {
                match client.next_event().await? {
                    Event::Sent(message) if message.client_id == sent.client_id => {
                        return Ok(message)
                    }
                    Event::SendFailed { message, reason }
                        if message.client_id == sent.client_id =>
                    {
                        let code = tern_client::ErrorCode::Internal;
                        let client_id = message.client_id;
                        return Err(ClientError::Refused { code, reason, client_id });
                    }
                    // A new or changed device is shown before the text is sent to it.
                    other => describe(client, other).await?.iter().for_each(|l| println!("{l}")),
                }
            }
        };
        match tokio::time::timeout(ONE_SHOT_WAIT, wait).await {
            Ok(result) => sent = result?,
            Err(_) => {
                println!("… queued: it is sent the next time tern connects to the server");
                return Ok(());
            }
        }
    }
    Names::default().learn(client, &[to]).await;
    let to = if to == client.user_id() {
        "yourself (your other devices)".into()
    } else {
        label(client, to)
    };
    println!("{} sent (id {}) to {to}: {}", sent.status.ticks(), sent.server_id, sent.text);
    Ok(())
}

/// The commands that need a connection (the store is locked).
async fn connected(args: &Args, client: &mut Client) -> Result<(), ClientError> {
    match &args.command {
        Command::Approve { code } => approve(client, code).await?,
        Command::Send { to, file: Some(path), .. } => {
            let sent = client.send_file(*to, path).await?;
            println!("{} sent (id {}) {}", sent.status.ticks(), sent.server_id, sent.text);
        }
        Command::Get { message, out } => {
            finish(client).await?;
            let path = client.download(*message, out).await?;
            println!("saved {}", path.display());
        }
        Command::Group { action } => group(client, action).await?,
        other => accounts(client, other).await?,
    }
    Ok(())
}

/// Whom `tern chat` talks to, checked first: a user id that exists, or a group this
/// device knows.
async fn chat_target(
    client: &mut Client,
    with: Option<u64>,
    group: Option<u64>,
) -> Result<Target, ClientError> {
    if let Some(peer) = with {
        if !client.user_exists(peer).await? {
            return Err(ClientError::Config(format!(
                "there is no user {peer} on this server; ask them for the id `tern whoami` \
                 prints"
            )));
        }
        return Ok(Target::User(peer));
    }
    let group = group.expect("clap requires --with or --group");
    finish(client).await?; // The group's latest changes and keys.
    if client.group(group)?.is_none() {
        return Err(ClientError::Config(format!("no group {group} on this device")));
    }
    Ok(Target::Group(group))
}

async fn approve(client: &mut Client, code: &str) -> Result<(), ClientError> {
    let before: Vec<u32> = client.devices().await?.into_iter().map(|d| d.0).collect();
    client.approve_link(code).await?;
    println!("approved");
    let devices = client.devices().await?;
    for (id, name, _) in devices.into_iter().filter(|d| !before.contains(&d.0)) {
        let fingerprint = client.device_fingerprint(id).await?;
        println!("linked device {id} \"{name}\", key fingerprint {fingerprint}");
        println!("  (the new device printed its fingerprint: they must be the same)");
    }
    Ok(())
}

/// The account commands: one request each.
async fn accounts(client: &mut Client, command: &Command) -> Result<(), ClientError> {
    match command {
        Command::Lock { pin, remove } => {
            let pin = if *remove { None } else { pin.as_deref() };
            client.set_registration_lock(pin).await?;
            let done = if pin.is_some() { "set" } else { "removed" };
            println!("registration lock {done}");
        }
        Command::Export { out } => {
            let path = client.export(out).await?;
            println!("saved {}", path.display());
        }
        Command::Discover { phones } => {
            let found = client.discover(phones).await?;
            for phone in phones {
                match found.iter().find(|(p, _)| p == phone) {
                    Some((_, user)) => println!("{phone}: user {user}"),
                    None => println!("{phone}: not on Tern"),
                }
            }
        }
        Command::Profile { user, name, about } => profile(client, *user, name, about).await?,
        Command::Privacy { read_receipts } => {
            if let Some(setting) = read_receipts {
                client.set_read_receipts(setting == "on").await?;
            }
            let privacy = client.privacy().await?;
            let on_off = |on: bool| if on { "on" } else { "off" };
            println!("read receipts: {}", on_off(privacy.read_receipts));
            println!("last seen: {:?}, online: {:?}", privacy.last_seen, privacy.online);
            println!("name: {:?}, about: {:?}", privacy.display_name, privacy.about);
        }
        Command::Contacts { users } => {
            client.set_contacts(users).await?;
            println!("{} contacts", users.len());
        }
        Command::Block { user, undo } => {
            client.block(*user, !undo).await?;
            println!("{} {}", if *undo { "unblocked" } else { "blocked" }, label(client, *user));
        }
        Command::Report { user, reason, messages, comment } => {
            use tern_client::messages::ReportReason;
            let reason = match reason.as_str() {
                "spam" => ReportReason::Spam,
                "abuse" => ReportReason::Abuse,
                "illegal" => ReportReason::Illegal,
                _ => ReportReason::Other,
            };
            client.report(*user, messages, reason, comment).await?;
            println!("reported {}", label(client, *user));
        }
        Command::Devices { unlink, send_history, per_conversation } => {
            devices(client, *unlink, *send_history, *per_conversation).await?
        }
        Command::SafetyNumber { with } => println!("{}", client.safety_number(*with).await?),
        _ => unreachable!("handled by run"),
    }
    Ok(())
}

async fn profile(
    client: &mut Client,
    user: Option<u64>,
    name: &Option<String>,
    about: &Option<String>,
) -> Result<(), ClientError> {
    if name.is_some() || about.is_some() {
        client.set_profile(name.as_deref(), about.as_deref()).await?;
        println!("profile updated");
    }
    let user = user.unwrap_or(client.user_id());
    let profile = client.profile(user).await?;
    println!("user {user}");
    println!("  name:  {}", profile.display_name.as_deref().unwrap_or("(hidden or unset)"));
    println!("  about: {}", profile.about.as_deref().unwrap_or("(hidden or unset)"));
    Ok(())
}

async fn devices(
    client: &mut Client,
    unlink: Option<u32>,
    send_history: Option<u32>,
    per_conversation: usize,
) -> Result<(), ClientError> {
    if let Some(device) = unlink {
        client.unlink(device).await?;
        println!("unlinked device {device}");
    }
    if let Some(device) = send_history {
        let sent = client.send_history(device, per_conversation).await?;
        println!("sent {sent} messages of history to device {device}");
    }
    for (id, name, primary) in client.devices().await? {
        println!("device {id}: {name}{}", if primary { " (primary)" } else { "" });
    }
    Ok(())
}

async fn group(client: &mut Client, action: &GroupAction) -> Result<(), ClientError> {
    use tern_client::messages::GroupChange;
    let (group_id, change) = match action {
        GroupAction::Create { name, members } => {
            let group = client.create_group(name, members).await?;
            println!("created group {group}");
            return Ok(());
        }
        GroupAction::Show { group } => return show_group(client, *group).await,
        GroupAction::Add { group, members } => {
            (*group, GroupChange::Add { members: members.clone() })
        }
        GroupAction::Remove { group, members } => {
            (*group, GroupChange::Remove { members: members.clone() })
        }
        GroupAction::Leave { group } => (*group, GroupChange::Leave),
        GroupAction::Rename { group, name } => {
            (*group, GroupChange::Rename { name: name.join(" ") })
        }
        GroupAction::Promote { group, member } => {
            (*group, GroupChange::Promote { member: *member })
        }
        GroupAction::Demote { group, member } => (*group, GroupChange::Demote { member: *member }),
        GroupAction::Send { .. } | GroupAction::Listen => unreachable!("handled by run"),
    };
    finish(client).await?; // Catch up: the group's latest epoch.
    client.change_group(group_id, change).await?;
    println!("done");
    Ok(())
}

async fn show_group(client: &mut Client, group: u64) -> Result<(), ClientError> {
    finish(client).await?;
    let Some(view) = client.group(group)? else {
        println!("no group {group} on this device");
        return Ok(());
    };
    let members: Vec<u64> = view.members.iter().map(|m| m.0).collect();
    Names::default().learn(client, &members).await;
    println!("group {} \"{}\" (epoch {})", view.group_id, view.name, view.epoch);
    for (member, admin) in &view.members {
        println!("  {}{}", label(client, *member), if *admin { " (admin)" } else { "" });
    }
    for message in client.group_history(group, 20)? {
        let mut line = line_of(client, &message, true);
        if message.outgoing {
            let (delivered, read) = client.receipts(message.server_id)?;
            line.push_str(&format!(" [{} delivered, {} read]", delivered.len(), read.len()));
        }
        println!("{line}");
    }
    Ok(())
}

async fn prompt_line(prompt: &str) -> Result<String, ClientError> {
    print!("{prompt}");
    std::io::stdout().flush()?;
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::stdin()).read_line(&mut line).await?;
    Ok(line)
}

fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| d.as_millis() as u64)
}

/// What to compare after a device change: the safety number with that user (with
/// oneself, the devices to check instead).
async fn safety_line(client: &mut Client, user_id: u64) -> Result<String, ClientError> {
    if user_id == client.user_id() {
        return Ok("    check it is yours: tern devices".into());
    }
    let number = client.safety_number(user_id).await?;
    Ok(format!("    compare the safety number in person: {number}"))
}

/// The lines for an event a chat or `listen` shows as is (not a message of its own
/// conversation, a tick, typing or the connection: those are `chat.rs`'s).
pub(crate) async fn describe(
    client: &mut Client,
    event: Event,
) -> Result<Vec<String>, ClientError> {
    let line = match event {
        Event::IdentityChanged { user_id, device_id } => {
            let who = label(client, user_id);
            let warning = format!("  ! the keys of {who}'s device {device_id} changed");
            return Ok(vec![warning, safety_line(client, user_id).await?]);
        }
        Event::DeviceAdded { user_id, device_id } => {
            let who = label(client, user_id);
            let warning =
                format!("  ! {who} has a new device {device_id} (signed by their primary device)");
            return Ok(vec![warning, safety_line(client, user_id).await?]);
        }
        Event::DeviceUnverified { user_id, device_id } => format!(
            "  ! the server lists a device {device_id} of {} that their primary device did not \
             sign: it gets nothing readable",
            label(client, user_id)
        ),
        Event::Undecryptable { sender, reason } => format!(
            "  ! a message from {} could not be decrypted: {reason}",
            label(client, sender.0)
        ),
        Event::KeysRefilled(count) => format!("(uploaded {count} new one-time keys)"),
        Event::Presence { user_id, online, last_seen_ms } => {
            let who = label(client, user_id);
            if online {
                format!("  ● {who} is online")
            } else if last_seen_ms > 0 {
                let ago = now_ms().saturating_sub(last_seen_ms) / 1000;
                format!("  ○ {who} was last seen {ago} s ago")
            } else {
                format!("  ○ {who} is offline")
            }
        }
        Event::Dropped(count) => {
            format!("  ! {count} messages to you were dropped (your mailbox was full)")
        }
        Event::SentDropped { recipient, server_ids } => format!(
            "  ! {} of your messages to {} were dropped (their mailbox was full)",
            server_ids.len(),
            label(client, recipient)
        ),
        Event::Deleted { sender, .. } => {
            format!("  (a message from {} was deleted)", label(client, sender))
        }
        Event::GroupChanged { group_id, epoch } => {
            let name = client.group(group_id)?.map_or_else(|| group_id.to_string(), |g| g.name);
            format!("  (group \"{name}\" changed; epoch {epoch})")
        }
        Event::GroupChangeRejected { group_id, reason } => {
            format!("  ! a change to group {group_id} was refused: {reason}")
        }
        _ => return Ok(Vec::new()),
    };
    Ok(vec![line])
}
