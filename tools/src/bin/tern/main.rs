//! `tern`, the chat CLI: a person's way to try Tern without writing an app.
//!
//! Each invocation opens one device's store (`--store`, a SQLite file made by the SDK),
//! does one thing and exits; `tern chat` stays and shows incoming messages live with
//! their ticks and who is typing. The store's secrets are encrypted with a passphrase
//! (`TERN_PASSPHRASE`, or asked for).

use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tern_client::{
    Client, ClientError, Endpoint, Event, PendingLink, PendingRegistration, Status, StoreSecret,
    StoredMessage, Trust,
};
use tokio::io::AsyncBufReadExt;

#[derive(Debug, Parser)]
#[command(name = "tern", version, about = "Tern's chat client (end-to-end encrypted)")]
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
    /// The certificate to trust with `--tls`.
    #[arg(long, requires = "tls")]
    ca: Option<PathBuf>,
    /// Speak WebSocket (to ternd's WebSocket listener, e.g. 127.0.0.1:7480).
    #[arg(long)]
    websocket: bool,
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
    /// Chat with someone: incoming messages, ticks and typing appear live; type a line
    /// and Enter to send; Ctrl-D to leave.
    Chat {
        /// The other person's user id.
        #[arg(long)]
        with: u64,
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
    /// Full-text search over this device's history (SQLite FTS5 syntax).
    Search {
        /// What to look for.
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
    /// Wait for group events and messages and print them (Ctrl-C to stop).
    Listen,
}

const DEFAULT_SERVER: &str = "127.0.0.1:7400";

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
    Endpoint { address, tls, websocket: args.websocket }
}

async fn open(args: &Args) -> Result<Client, ClientError> {
    let secret = passphrase()?;
    let endpoint = args.server.is_some().then(|| endpoint(args, None));
    Client::open(&args.store, &secret, endpoint).await
}

async fn run(args: Args) -> Result<(), ClientError> {
    match &args.command {
        Command::Register { phone, name, pin } => {
            let secret = passphrase()?;
            let mut pending =
                PendingRegistration::request_code(&endpoint(&args, None), phone).await?;
            if let Some(pin) = pin {
                pending = pending.with_pin(pin);
            }
            println!("a code was sent to {phone} (valid {} s)", pending.expires_in_s);
            let code = prompt_line("code: ").await?;
            let client = pending.verify(code.trim(), name, &args.store, &secret).await?;
            println!("registered: user {} device {}", client.user_id(), client.device_id());
        }
        Command::Link { name } => {
            let secret = passphrase()?;
            let pending = PendingLink::request(&endpoint(&args, None), name).await?;
            println!("approve this device on your primary: tern approve {}", pending.code());
            let client = pending.wait(&args.store, &secret).await?;
            println!("linked: user {} device {}", client.user_id(), client.device_id());
        }
        Command::Approve { code } => {
            let mut client = open(&args).await?;
            client.approve_link(code).await?;
            println!("approved");
        }
        Command::Whoami => {
            let client = open(&args).await?;
            println!("user {} device {}", client.user_id(), client.device_id());
        }
        Command::Send { to, file, text } => {
            let mut client = open(&args).await?;
            let sent = match file {
                Some(path) => client.send_file(*to, path).await?,
                None => client.send_text(*to, &text.join(" ")).await?,
            };
            println!("{} sent (id {}) {}", sent.status.ticks(), sent.server_id, sent.text);
        }
        Command::Get { message, out } => {
            let mut client = open(&args).await?;
            drain(&mut client).await?;
            let path = client.download(*message, out).await?;
            println!("saved {}", path.display());
        }
        Command::Chat { with } => chat(open(&args).await?, *with).await?,
        Command::History { with, limit } => {
            let client = open(&args).await?;
            for message in client.history(*with, *limit)? {
                println!("{}", line_of(&message));
            }
        }
        Command::Search { query, limit } => {
            let client = open(&args).await?;
            for message in client.search(&query.join(" "), *limit)? {
                println!("{}", line_of(&message));
            }
        }
        Command::Group { action } => group(open(&args).await?, action).await?,
        Command::Lock { pin, remove } => {
            let mut client = open(&args).await?;
            let pin = if *remove { None } else { pin.as_deref() };
            client.set_registration_lock(pin).await?;
            println!(
                "{}",
                if pin.is_some() { "registration lock set" } else { "registration lock removed" }
            );
        }
        Command::Export { out } => {
            let mut client = open(&args).await?;
            let path = client.export(out).await?;
            println!("saved {}", path.display());
        }
        Command::Discover { phones } => {
            let mut client = open(&args).await?;
            let found = client.discover(phones).await?;
            for phone in phones {
                match found.iter().find(|(p, _)| p == phone) {
                    Some((_, user)) => println!("{phone}: user {user}"),
                    None => println!("{phone}: not on Tern"),
                }
            }
        }
        Command::Profile { user, name, about } => {
            let mut client = open(&args).await?;
            if name.is_some() || about.is_some() {
                client.set_profile(name.as_deref(), about.as_deref()).await?;
                println!("profile updated");
            }
            let user = user.unwrap_or(client.user_id());
            let profile = client.profile(user).await?;
            println!("user {user}");
            println!("  name:  {}", profile.display_name.as_deref().unwrap_or("(hidden or unset)"));
            println!("  about: {}", profile.about.as_deref().unwrap_or("(hidden or unset)"));
        }
        Command::Block { user, undo } => {
            let mut client = open(&args).await?;
            client.block(*user, !undo).await?;
            println!("{} {user}", if *undo { "unblocked" } else { "blocked" });
        }
        Command::Report { user, reason, messages, comment } => {
            use tern_client::messages::ReportReason;
            let reason = match reason.as_str() {
                "spam" => ReportReason::Spam,
                "abuse" => ReportReason::Abuse,
                "illegal" => ReportReason::Illegal,
                _ => ReportReason::Other,
            };
            let mut client = open(&args).await?;
            client.report(*user, messages, reason, comment).await?;
            println!("reported {user}");
        }
        Command::Devices { unlink, send_history, per_conversation } => {
            let mut client = open(&args).await?;
            if let Some(device) = unlink {
                client.unlink(*device).await?;
                println!("unlinked device {device}");
            }
            if let Some(device) = send_history {
                let sent = client.send_history(*device, *per_conversation).await?;
                println!("sent {sent} messages of history to device {device}");
            }
            for (id, name, primary) in client.devices().await? {
                println!("device {id}: {name}{}", if primary { " (primary)" } else { "" });
            }
        }
        Command::SafetyNumber { with } => {
            let mut client = open(&args).await?;
            println!("{}", client.safety_number(*with).await?);
        }
    }
    Ok(())
}

async fn group(mut client: Client, action: &GroupAction) -> Result<(), ClientError> {
    use tern_client::messages::GroupChange;
    let change = |group: u64, change: GroupChange| (group, change);
    let (group_id, change) = match action {
        GroupAction::Create { name, members } => {
            let group = client.create_group(name, members).await?;
            println!("created group {group}");
            return Ok(());
        }
        GroupAction::Add { group, members } => {
            change(*group, GroupChange::Add { members: members.clone() })
        }
        GroupAction::Remove { group, members } => {
            change(*group, GroupChange::Remove { members: members.clone() })
        }
        GroupAction::Leave { group } => change(*group, GroupChange::Leave),
        GroupAction::Promote { group, member } => {
            change(*group, GroupChange::Promote { member: *member })
        }
        GroupAction::Demote { group, member } => {
            change(*group, GroupChange::Demote { member: *member })
        }
        GroupAction::Send { group, text } => {
            // Catch up first: changes and keys that arrived while away.
            drain(&mut client).await?;
            let sent = client.send_group_text(*group, &text.join(" ")).await?;
            println!("{} sent (id {})", sent.status.ticks(), sent.server_id);
            return Ok(());
        }
        GroupAction::Show { group } => {
            drain(&mut client).await?;
            let Some(view) = client.group(*group)? else {
                println!("no group {group} on this device");
                return Ok(());
            };
            println!("group {} \"{}\" (epoch {})", view.group_id, view.name, view.epoch);
            for (member, admin) in &view.members {
                println!("  {member}{}", if *admin { " (admin)" } else { "" });
            }
            for message in client.group_history(*group, 20)? {
                let mut line = line_of(&message);
                if message.outgoing {
                    let (delivered, read) = client.receipts(message.server_id)?;
                    line.push_str(&format!(
                        " [{} delivered, {} read]",
                        delivered.len(),
                        read.len()
                    ));
                }
                println!("{line}");
            }
            return Ok(());
        }
        GroupAction::Listen => loop {
            let event = client.next_event().await;
            for line in on_event(&mut client, 0, event).await? {
                println!("{line}");
            }
        },
    };
    drain(&mut client).await?;
    client.change_group(group_id, change).await?;
    println!("done");
    Ok(())
}

/// Handles what arrived while this device was away (a short quiet period ends it).
async fn drain(client: &mut Client) -> Result<(), ClientError> {
    loop {
        let next = tokio::time::timeout(std::time::Duration::from_millis(300), client.next_event());
        match next.await {
            Ok(Ok(event)) => {
                for line in show(client, 0, event).await? {
                    println!("{line}");
                }
            }
            Ok(Err(error)) => return Err(error),
            Err(_) => return Ok(()),
        }
    }
}

async fn prompt_line(prompt: &str) -> Result<String, ClientError> {
    print!("{prompt}");
    std::io::stdout().flush()?;
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::stdin()).read_line(&mut line).await?;
    Ok(line)
}

/// One history line: `[hh:mm:ss] who: text ticks`.
fn line_of(message: &StoredMessage) -> String {
    let seconds = message.time_ms / 1000;
    let (h, m, s) = ((seconds / 3600) % 24, (seconds / 60) % 60, seconds % 60);
    let who = if message.outgoing { "me".to_string() } else { message.sender.0.to_string() };
    let ticks =
        if message.outgoing { format!(" {}", message.status.ticks()) } else { String::new() };
    format!("[{h:02}:{m:02}:{s:02} UTC] #{} {who}: {}{ticks}", message.server_id, message.text)
}

fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| d.as_millis() as u64)
}

/// The interactive chat: lines typed are sent; events are printed as they come. On a
/// terminal the line is edited in raw mode, so that typing can be announced as it
/// starts and stops; from a pipe, lines are read as they are.
async fn chat(mut client: Client, peer: u64) -> Result<(), ClientError> {
    println!("chatting with {peer} as {} (Ctrl-D to leave)", client.user_id());
    for message in client.history(peer, 10)? {
        println!("{}", line_of(&message));
    }
    client.follow_presence(&[peer]).await?;
    if std::io::stdin().is_terminal() {
        return raw_chat::run(client, peer).await;
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                if !line.trim().is_empty() {
                    let sent = client.send_text(peer, &line).await?;
                    println!("{}", line_of(&sent));
                }
            }
            event = client.next_event() => {
                for text in on_event(&mut client, peer, event).await? {
                    println!("{text}");
                }
            }
        }
    }
    Ok(())
}

/// Handles one event of the chat (reconnecting after a disconnect); returns what to show.
async fn on_event(
    client: &mut Client,
    peer: u64,
    event: Result<Event, ClientError>,
) -> Result<Vec<String>, ClientError> {
    match event {
        Ok(event) => show(client, peer, event).await,
        Err(ClientError::Disconnected | ClientError::Io(_)) => {
            client.reconnect_with_backoff(20).await?;
            Ok(vec!["(reconnected)".to_string()])
        }
        Err(error) => Err(error),
    }
}

/// The chat on a terminal: a one-line editor in raw mode.
mod raw_chat {
    use std::io::Write;

    use crossterm::event::{Event as Key, EventStream, KeyCode, KeyEvent, KeyModifiers};
    use futures_util::StreamExt;
    use tern_client::{Client, ClientError};

    use super::{line_of, on_event};

    /// Leaves raw mode however the chat ends.
    struct RawMode;

    impl Drop for RawMode {
        fn drop(&mut self) {
            let _ = crossterm::terminal::disable_raw_mode();
        }
    }

    /// Prints `text` above the line being edited, then the line again.
    fn print_above(text: &str, editing: &str) {
        let mut out = std::io::stdout();
        let _ = write!(out, "\r\x1b[2K{}\r\n> {editing}", text.replace('\n', "\r\n"));
        let _ = out.flush();
    }

    /// Rewrites the line being edited.
    fn redraw(editing: &str) {
        let mut out = std::io::stdout();
        let _ = write!(out, "\r\x1b[2K> {editing}");
        let _ = out.flush();
    }

    pub async fn run(mut client: Client, peer: u64) -> Result<(), ClientError> {
        crossterm::terminal::enable_raw_mode()?;
        let _raw = RawMode;
        let mut keys = EventStream::new();
        let mut editing = String::new();
        redraw(&editing);
        loop {
            tokio::select! {
                key = keys.next() => {
                    let Some(key) = key else { break };
                    let Key::Key(KeyEvent { code, modifiers, .. }) = key? else { continue };
                    let ctrl = modifiers.contains(KeyModifiers::CONTROL);
                    match code {
                        KeyCode::Char('c' | 'd') if ctrl => break,
                        KeyCode::Char(c) => {
                            if editing.is_empty() {
                                client.typing(peer, true).await?;
                            }
                            editing.push(c);
                        }
                        KeyCode::Backspace => {
                            editing.pop();
                            if editing.is_empty() {
                                client.typing(peer, false).await?;
                            }
                        }
                        KeyCode::Enter if !editing.trim().is_empty() => {
                            let text = std::mem::take(&mut editing);
                            client.typing(peer, false).await?;
                            let sent = client.send_text(peer, &text).await?;
                            print_above(&line_of(&sent), &editing);
                            continue;
                        }
                        _ => continue,
                    }
                    redraw(&editing);
                }
                event = client.next_event() => {
                    for text in on_event(&mut client, peer, event).await? {
                        print_above(&text, &editing);
                    }
                }
            }
        }
        if !editing.is_empty() {
            client.typing(peer, false).await?;
        }
        print!("\r\x1b[2K");
        Ok(())
    }
}

async fn show(client: &mut Client, peer: u64, event: Event) -> Result<Vec<String>, ClientError> {
    let mut out = Vec::new();
    match event {
        Event::Message(message) if message.peer == 0 => {
            out.push(format!("[group] {}", line_of(&message)))
        }
        Event::Message(message) if message.peer == peer => {
            out.push(line_of(&message));
            if !message.outgoing {
                client.mark_read(peer, &[message.server_id]).await?;
            }
        }
        Event::Message(message) => out.push(format!("(new message from {})", message.sender.0)),
        Event::Receipt { status, messages, .. } => {
            for message in messages.iter().filter(|m| m.peer == peer) {
                let what = if status == Status::Read { "✓✓ read" } else { "✓✓ delivered" };
                out.push(format!("  {what}: {}", message.text));
            }
        }
        Event::Typing { user_id, active } if user_id == peer => {
            out.push(if active { format!("  … {user_id} is typing") } else { String::new() });
            out.retain(|line| !line.is_empty());
        }
        Event::Typing { .. } => {}
        Event::IdentityChanged { user_id, device_id } => out.push(format!(
            "  ! the identity key of {user_id} device {device_id} changed: compare safety numbers"
        )),
        Event::Undecryptable { sender, reason } => {
            out.push(format!("  ! a message from {} could not be decrypted: {reason}", sender.0))
        }
        Event::KeysRefilled(count) => out.push(format!("(uploaded {count} new one-time keys)")),
        Event::Presence { user_id, online, last_seen_ms } if user_id == peer => {
            out.push(if online {
                format!("  ● {user_id} is online")
            } else if last_seen_ms > 0 {
                let ago = now_ms().saturating_sub(last_seen_ms) / 1000;
                format!("  ○ {user_id} was last seen {ago} s ago")
            } else {
                format!("  ○ {user_id} is offline")
            })
        }
        Event::Presence { .. } => {}
        Event::Dropped(count) => {
            out.push(format!("  ! {count} messages to you were dropped (your mailbox was full)"))
        }
        Event::SentDropped { recipient, server_ids } => out.push(format!(
            "  ! {} of your messages to {recipient} were dropped (their mailbox was full)",
            server_ids.len()
        )),
        Event::Deleted { sender, .. } => {
            out.push(format!("  (a message from {sender} was deleted)"))
        }
        Event::GroupChanged { group_id, epoch } => {
            out.push(format!("  (group {group_id} changed; epoch {epoch})"))
        }
        Event::GroupChangeRejected { group_id, reason } => {
            out.push(format!("  ! a change to group {group_id} was refused: {reason}"))
        }
        Event::HistoryOffered { from_device } => {
            let added = client.import_history().await?;
            out.push(format!("  (imported {added} messages of history from device {from_device})"))
        }
    }
    Ok(out)
}
