//! The interactive chat, with one person (`tern chat --with`) or a group (`tern chat
//! --group`): lines typed are sent; what arrives is shown as it comes.
//!
//! On a terminal the line being typed is edited in raw mode, so that typing can be
//! announced as it starts and stops, and the screen behaves like a chat app's: a
//! message's line is rewritten in place as its ticks move (… → ✓ → ✓✓ → ✓✓ read, or ✗),
//! "is typing" sits beside the prompt and goes away, and a dropped connection is one
//! status line, rewritten when it is back. From a pipe, lines are read as they are and
//! every change is a new line. Either way the chat never ends because the server went
//! away: the SDK reconnects and re-sends, and what the user types meanwhile waits in
//! the store. While it runs it holds the store, and `tern send` / `tern group send` on
//! the same store are handed to it (`handoff.rs`).

use std::io::Write;

use crossterm::event::{Event as Key, EventStream, KeyCode, KeyEvent, KeyModifiers};
use futures_util::StreamExt;
use tern_client::{Client, ClientError, Event, StoredMessage};
use tokio::io::AsyncBufReadExt;

use crate::handoff::{self, Listener, Reply, Request};
use crate::people::{label, line_of, Names};

/// Whom the chat is with.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// One person.
    User(u64),
    /// A group.
    Group(u64),
    /// Every conversation, without input (`tern group listen`).
    Everything,
}

/// The key of the connection's status line (message lines are keyed by client id,
/// which is below 2^63).
const STATUS_KEY: u64 = u64::MAX;

/// What the person sees: the lines printed since the chat began (to rewrite one in
/// place) and the prompt under them.
#[derive(Debug, Default)]
struct Screen {
    raw: bool,
    /// The key (a message's client id) of each line printed, oldest first.
    keys: Vec<Option<u64>>,
    editing: String,
    /// "… Bob is typing" while someone is.
    typing: Option<(u64, String)>,
}

impl Screen {
    fn prompt(&self) -> String {
        match &self.typing {
            Some((_, who)) => format!("({who} is typing…) > {}", self.editing),
            None => format!("> {}", self.editing),
        }
    }

    /// Prints a line above the prompt.
    fn print(&mut self, key: Option<u64>, text: &str) {
        let mut out = std::io::stdout();
        if self.raw {
            for part in text.split('\n') {
                let _ = write!(out, "\r\x1b[2K{part}\r\n");
                self.keys.push(None);
            }
            *self.keys.last_mut().expect("one line at least") = key;
            let _ = write!(out, "{}", self.prompt());
        } else {
            let _ = writeln!(out, "{text}");
        }
        let _ = out.flush();
    }

    /// Rewrites the line of `key` in place when it is on screen and fits one row;
    /// prints it again otherwise.
    fn update(&mut self, key: u64, text: &str) {
        let Some(index) = self.keys.iter().rposition(|k| *k == Some(key)) else {
            return self.print(Some(key), text);
        };
        let up = self.keys.len() - index;
        let (columns, rows) = crossterm::terminal::size().unwrap_or((80, 24));
        let fits = text.chars().count() < usize::from(columns) && !text.contains('\n');
        if !self.raw || up >= usize::from(rows) || !fits {
            return self.print(Some(key), text);
        }
        let mut out = std::io::stdout();
        let _ = write!(out, "\r\x1b[{up}A\x1b[2K{text}\x1b[{up}B\r\x1b[2K{}", self.prompt());
        let _ = out.flush();
    }

    fn redraw(&self) {
        if self.raw {
            let mut out = std::io::stdout();
            let _ = write!(out, "\r\x1b[2K{}", self.prompt());
            let _ = out.flush();
        }
    }
}

/// A running chat.
pub struct Chat {
    client: Client,
    target: Target,
    names: Names,
    screen: Screen,
}

/// Leaves raw mode however the chat ends.
struct RawMode;

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

impl Chat {
    /// Starts a chat: the recent history, then live.
    pub async fn start(client: Client, target: Target, raw: bool) -> Result<Chat, ClientError> {
        let screen = Screen { raw, ..Screen::default() };
        let mut chat = Chat { client, target, names: Names::default(), screen };
        let history = match target {
            Target::User(peer) => {
                chat.client.follow_presence(&[peer]).await?;
                chat.names.learn(&mut chat.client, &[peer]).await;
                chat.client.history(peer, 10)?
            }
            Target::Group(group) => {
                let members = chat.members();
                chat.names.learn(&mut chat.client, &members).await;
                chat.client.group_history(group, 10)?
            }
            Target::Everything => {
                println!("listening (Ctrl-C to stop)");
                return Ok(chat);
            }
        };
        let title = chat.title();
        chat.screen.print(None, &format!("chatting {title} (Ctrl-D to leave)"));
        for message in history {
            chat.show_message(&message);
        }
        Ok(chat)
    }

    fn title(&self) -> String {
        match self.target {
            Target::User(peer) => format!("with {}", label(&self.client, peer)),
            Target::Group(group) => match self.client.group(group) {
                Ok(Some(view)) => format!("in group \"{}\"", view.name),
                _ => format!("in group {group}"),
            },
            Target::Everything => "everywhere".into(),
        }
    }

    /// The group's members (nobody for a one-to-one chat).
    fn members(&self) -> Vec<u64> {
        let Target::Group(group) = self.target else { return Vec::new() };
        let view = self.client.group(group).ok().flatten();
        view.map(|v| v.members.iter().map(|m| m.0).collect()).unwrap_or_default()
    }

    fn show_message(&mut self, message: &StoredMessage) {
        let mut line = line_of(&self.client, message, false);
        if let Target::Everything = self.target {
            let place = crate::people::conversation_of(&self.client, message).unwrap_or_default();
            line = format!("({place}) {line}");
        }
        let key = message.outgoing.then_some(message.client_id);
        self.screen.print(key, &line);
    }

    /// Runs until the person leaves (Ctrl-D, Ctrl-C, or the end of a piped input).
    pub async fn run(mut self, listener: Option<Listener>) -> Result<(), ClientError> {
        for event in self.client.catch_up().await? {
            self.on_event(event).await?;
        }
        let result = if self.screen.raw {
            crossterm::terminal::enable_raw_mode()?;
            let _raw = RawMode;
            let result = self.run_raw(listener.as_ref()).await;
            print!("\r\x1b[2K");
            result
        } else {
            self.run_piped(listener.as_ref()).await
        };
        if !self.screen.editing.is_empty() {
            self.typing(false).await?;
        }
        result
    }

    async fn run_raw(&mut self, listener: Option<&Listener>) -> Result<(), ClientError> {
        let mut keys = EventStream::new();
        self.screen.redraw();
        loop {
            tokio::select! {
                key = keys.next() => {
                    let Some(key) = key else { return Ok(()) };
                    let Key::Key(KeyEvent { code, modifiers, .. }) = key? else { continue };
                    if !self.on_key(code, modifiers).await? {
                        return Ok(());
                    }
                }
                _ = self.client.ready() => self.poll().await?,
                stream = accept(listener) => self.serve(stream).await?,
            }
        }
    }

    async fn run_piped(&mut self, listener: Option<&Listener>) -> Result<(), ClientError> {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        loop {
            tokio::select! {
                line = lines.next_line() => {
                    let Some(line) = line? else { return Ok(()) };
                    if !line.trim().is_empty() {
                        let shown = self.send(&line).await?;
                        self.show_lines(shown);
                    }
                }
                _ = self.client.ready() => self.poll().await?,
                stream = accept(listener) => self.serve(stream).await?,
            }
        }
    }

    /// `tern group listen`: shows what arrives (every conversation), marks it read, and
    /// takes hand-offs, until stopped.
    pub async fn listen(mut self, listener: Listener) -> Result<(), ClientError> {
        loop {
            tokio::select! {
                _ = self.client.ready() => self.poll().await?,
                stream = listener.accept() => self.serve(Ok(stream?)).await?,
            }
        }
    }

    /// One key; false when the person leaves.
    async fn on_key(
        &mut self,
        code: KeyCode,
        modifiers: KeyModifiers,
    ) -> Result<bool, ClientError> {
        let ctrl = modifiers.contains(KeyModifiers::CONTROL);
        match code {
            KeyCode::Char('c' | 'd') if ctrl => return Ok(false),
            KeyCode::Char(c) => {
                if self.screen.editing.is_empty() {
                    self.typing(true).await?;
                }
                self.screen.editing.push(c);
            }
            KeyCode::Backspace => {
                self.screen.editing.pop();
                if self.screen.editing.is_empty() {
                    self.typing(false).await?;
                }
            }
            KeyCode::Enter if !self.screen.editing.trim().is_empty() => {
                let text = std::mem::take(&mut self.screen.editing);
                self.typing(false).await?;
                let shown = self.send(&text).await?;
                self.show_lines(shown);
            }
            _ => {}
        }
        self.screen.redraw();
        Ok(true)
    }

    fn show_lines(&mut self, lines: Vec<(Option<u64>, String)>) {
        for (key, line) in lines {
            self.screen.print(key, &line);
        }
    }

    async fn typing(&mut self, active: bool) -> Result<(), ClientError> {
        match self.target {
            Target::User(peer) => self.client.typing(peer, active).await,
            Target::Everything => Ok(()),
            Target::Group(_) => {
                let members = self.members();
                self.client.typing_to(&members, active).await
            }
        }
    }

    /// Sends a line to the chat's target; returns the lines to show (a refusal is one
    /// of them: the chat goes on).
    async fn send(&mut self, text: &str) -> Result<Vec<(Option<u64>, String)>, ClientError> {
        let sent = match self.target {
            Target::User(peer) => self.client.send_text(peer, text).await,
            Target::Group(group) => self.client.send_group_text(group, text).await,
            Target::Everything => return Ok(Vec::new()),
        };
        match sent {
            Ok(message) => {
                let line = line_of(&self.client, &message, false);
                Ok(vec![(Some(message.client_id), line)])
            }
            Err(ClientError::Refused { client_id, reason, .. }) => {
                Ok(vec![(Some(client_id), format!("✗ not sent: {text} ({reason})"))])
            }
            Err(error @ ClientError::TooLong { .. }) => Ok(vec![(None, format!("✗ {error}"))]),
            Err(error @ ClientError::Server { .. }) => {
                Ok(vec![(None, format!("✗ not sent: {text} ({error})"))])
            }
            Err(error) if error.is_disconnect() => {
                Ok(vec![(None, format!("✗ not sent (connection lost; type it again): {text}"))])
            }
            Err(error) => Err(error),
        }
    }

    /// Handles what arrived.
    async fn poll(&mut self) -> Result<(), ClientError> {
        for event in self.client.poll().await? {
            self.on_event(event).await?;
        }
        Ok(())
    }

    /// A send handed over by another `tern` on this store.
    async fn serve(
        &mut self,
        stream: std::io::Result<tokio::net::UnixStream>,
    ) -> Result<(), ClientError> {
        let Ok(mut stream) = stream else { return Ok(()) };
        let reply = match handoff::read_request(&mut stream).await {
            Ok(request) => self.handed(request).await?,
            Err(error) => Reply { lines: Vec::new(), error: Some(error.to_string()) },
        };
        let _ = handoff::write_reply(&mut stream, &reply).await;
        Ok(())
    }

    async fn handed(&mut self, request: Request) -> Result<Reply, ClientError> {
        let sent = match (request.to, request.group) {
            (Some(to), _) => self.client.send_text(to, &request.text).await,
            (None, Some(group)) => self.client.send_group_text(group, &request.text).await,
            (None, None) => return Ok(Reply { lines: vec![], error: Some("no recipient".into()) }),
        };
        match sent {
            Ok(message) => {
                let line = line_of(&self.client, &message, false);
                let relevant = match self.target {
                    Target::User(peer) => request.to == Some(peer),
                    Target::Group(group) => request.group == Some(group),
                    Target::Everything => true,
                };
                if relevant {
                    self.screen.print(Some(message.client_id), &line);
                }
                let ticks = message.status.ticks();
                Ok(Reply {
                    lines: vec![format!(
                        "{ticks} sent (id {}) {}",
                        message.server_id, message.text
                    )],
                    error: None,
                })
            }
            Err(error) if error.is_disconnect() || matches!(error, ClientError::Store(_)) => {
                Err(error)
            }
            Err(error) => Ok(Reply { lines: Vec::new(), error: Some(error.to_string()) }),
        }
    }

    /// Whether a message belongs to this chat.
    fn is_here(&self, message: &StoredMessage) -> bool {
        let group = self.client.group_of(message).unwrap_or(0);
        match self.target {
            Target::User(peer) => group == 0 && message.peer == peer,
            Target::Group(id) => group == id,
            Target::Everything => true,
        }
    }

    async fn on_event(&mut self, event: Event) -> Result<(), ClientError> {
        match event {
            Event::Message(message) if self.is_here(&message) => self.on_message(message).await?,
            Event::Message(message) => {
                self.names.learn(&mut self.client, &[message.sender.0]).await;
                let who = label(&self.client, message.sender.0);
                let place = crate::people::conversation_of(&self.client, &message)?;
                self.screen.print(None, &format!("(a new message from {who}, {place})"));
            }
            Event::Receipt { messages, .. } => {
                let here: Vec<&StoredMessage> =
                    messages.iter().filter(|m| self.is_here(m)).collect();
                for message in here {
                    let line = line_of(&self.client, message, false);
                    self.screen.update(message.client_id, &line);
                }
            }
            Event::Sent(message) | Event::SendFailed { message, .. } => {
                let line = line_of(&self.client, &message, false);
                self.screen.update(message.client_id, &line);
            }
            Event::Typing { user_id, active } => self.on_typing(user_id, active).await,
            Event::Disconnected { reason } => {
                let line = format!("(connection lost: {reason}; reconnecting…)");
                self.screen.print(Some(STATUS_KEY), &line);
            }
            Event::Reconnected => self.screen.update(STATUS_KEY, "(connection lost, and back)"),
            Event::HistoryOffered { from_device } => {
                let added = self.client.import_history().await?;
                let line =
                    format!("(imported {added} messages of history from device {from_device})");
                self.screen.print(None, &line);
            }
            other => {
                for line in crate::describe(&mut self.client, other).await? {
                    self.screen.print(None, &line);
                }
            }
        }
        Ok(())
    }

    /// A message of this chat: shown, and read (the sender sees ✓✓ read).
    async fn on_message(&mut self, message: StoredMessage) -> Result<(), ClientError> {
        if self.screen.typing.as_ref().is_some_and(|(who, _)| *who == message.sender.0) {
            self.screen.typing = None;
        }
        self.show_message(&message);
        if message.outgoing {
            return Ok(()); // Sent from this user's other device.
        }
        let group = self.client.group_of(&message)?;
        let (id, sender) = (message.server_id, message.sender.0);
        let read = match group {
            0 => self.client.mark_read(message.peer, &[id]).await,
            group => self.client.mark_group_read(group, sender, &[id]).await,
        };
        match read {
            Err(error) if error.is_disconnect() => Ok(()), // A read tick is not worth more.
            other => other,
        }
    }

    async fn on_typing(&mut self, user_id: u64, active: bool) {
        let here = match self.target {
            Target::User(peer) => user_id == peer,
            Target::Group(_) => self.members().contains(&user_id),
            Target::Everything => false,
        };
        if !here {
            return;
        }
        self.names.learn(&mut self.client, &[user_id]).await;
        self.screen.typing = active.then(|| (user_id, label(&self.client, user_id)));
        self.screen.redraw();
    }
}

/// The next hand-off, or never when the chat does not listen.
async fn accept(listener: Option<&Listener>) -> std::io::Result<tokio::net::UnixStream> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}
