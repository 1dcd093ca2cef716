//! The connection's life: log in, keep it alive, notice it drop, come back.
//!
//! People leave a chat open for hours; servers restart. So the client pings whenever it
//! sent nothing for the heartbeat the server advertised in `Welcome` (a third of its
//! idle timeout), treats every drop alike (a network error, a closed socket, the
//! server's `ShuttingDown` or idle `Timeout`), and reconnects by itself with exponential
//! backoff and jitter (so a restarted server is not hit by every client at once),
//! re-sending what was not acknowledged. The app sees `Event::Disconnected` and
//! `Event::Reconnected`, nothing else.
//!
//! Waiting is split from working so that an app can race the client against its own
//! input: [`Client::ready`] only reads (cancel-safe: a frame read goes into the backlog
//! before anything else awaits), and the work (handling frames, pinging, reconnecting)
//! happens in [`Client::next_event`] / [`Client::poll`], which are not raced.

use std::time::{Duration, Instant};

use tern_wire::messages::Auth;
use tern_wire::{ErrorCode, Message};

use super::{Client, Event};
use crate::connection::{server_error, Connection};
use crate::ClientError;

/// The first wait before reconnecting.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// The longest wait between reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Timers of the connection's life.
#[derive(Debug)]
pub(super) struct Link {
    /// While disconnected: when to try again.
    retry_at: Option<Instant>,
    /// The next wait between attempts (doubles up to `BACKOFF_MAX`).
    backoff: Duration,
    /// Whether `Event::Disconnected` was given for the current outage.
    announced: bool,
    /// Outgoing messages the server asked to send later wait until then.
    pub(super) resend_at: Option<Instant>,
    /// Envelopes the server said were waiting at login and not handled yet.
    pub(super) pending: u64,
}

impl Default for Link {
    fn default() -> Link {
        Link { retry_at: None, backoff: BACKOFF_MIN, announced: false, resend_at: None, pending: 0 }
    }
}

/// `delay` scaled by a random factor in [0.5, 1.5).
pub(super) fn jittered(delay: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let factor = match getrandom::fill(&mut byte) {
        Ok(()) => 0.5 + f64::from(byte[0]) / 256.0,
        Err(_) => 1.0,
    };
    delay.mul_f64(factor)
}

impl Client {
    /// (Re)connects and authenticates once; then re-sends what the server had not
    /// acknowledged (a message refused for good is marked failed and reported as
    /// [`Event::SendFailed`], never an error here). The server redelivers unacknowledged
    /// envelopes by itself.
    pub async fn reconnect(&mut self) -> Result<(), ClientError> {
        self.connection = None;
        let auth = Auth {
            user_id: self.identity.user_id,
            device_id: self.identity.device_id,
            token: self.identity.token,
        };
        let (connection, home, reply) =
            Connection::open_at_home(&self.endpoint, &auth, &mut self.backlog).await?;
        let Message::AuthOk(ok) = reply.frame().message else { return Err(server_error(&reply)) };
        if home != self.endpoint {
            // A cluster sent this account to its home node: go there first next time.
            self.store.save_endpoint(&home.encode())?;
            self.endpoint = home;
        }
        self.link.pending = ok.mailbox_pending.to_native();
        self.connection = Some(connection);
        self.link.retry_at = None;
        self.link.backoff = BACKOFF_MIN;
        if std::mem::take(&mut self.link.announced) {
            self.events.push_back(Event::Reconnected);
        }
        self.resend_unsent().await
    }

    /// Reconnects with exponential backoff and jitter until it works or `attempts` are
    /// used up. A revoked token ends it at once.
    pub async fn reconnect_with_backoff(&mut self, attempts: u32) -> Result<(), ClientError> {
        let mut delay = BACKOFF_MIN;
        let mut last = None;
        for _ in 0..attempts.max(1) {
            match self.reconnect().await {
                Ok(()) => return Ok(()),
                Err(error @ ClientError::Server { code: ErrorCode::BadToken, .. }) => {
                    return Err(error)
                }
                Err(error) => last = Some(error),
            }
            tokio::time::sleep(jittered(delay)).await;
            delay = (delay * 2).min(BACKOFF_MAX);
        }
        Err(last.unwrap_or(ClientError::Disconnected))
    }

    /// Whether the client has a connection right now.
    pub fn is_connected(&self) -> bool {
        self.connection.is_some()
    }

    /// The connection went away: forget it and plan the next attempt.
    pub(super) fn dropped(&mut self, why: &ClientError) {
        self.connection = None;
        let floor = match why {
            ClientError::Server { retry_after_ms, .. } => {
                Duration::from_millis(u64::from(*retry_after_ms))
            }
            _ => Duration::ZERO,
        };
        let wait = jittered(self.link.backoff).max(floor);
        self.link.retry_at = Some(Instant::now() + wait);
        self.link.backoff = (self.link.backoff * 2).min(BACKOFF_MAX);
        if !std::mem::replace(&mut self.link.announced, true) {
            let reason = match why {
                ClientError::Server { message, .. } => message.clone(),
                other => other.to_string(),
            };
            self.events.push_back(Event::Disconnected { reason });
        }
    }

    /// When the next piece of work is due (a ping, a reconnection, a re-send).
    fn next_due(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let timer = match &self.connection {
            Some(connection) => connection.ping_due(),
            None => self.link.retry_at.unwrap_or(far),
        };
        self.link.resend_at.map_or(timer, |at| at.min(timer))
    }

    /// Waits until [`Client::poll`] has something to do: a frame arrived, the
    /// connection dropped, or a timer is due. Cancel-safe: race it against user input,
    /// then call `poll` outside the race.
    pub async fn ready(&mut self) {
        if !self.events.is_empty() || !self.backlog.is_empty() {
            return;
        }
        let due = tokio::time::Instant::from_std(self.next_due());
        let Some(connection) = self.connection.as_mut() else {
            return tokio::time::sleep_until(due).await;
        };
        let read = tokio::select! {
            frame = connection.next_frame() => Some(frame),
            _ = tokio::time::sleep_until(due) => None,
        };
        match read {
            Some(Ok(frame)) => self.backlog.push_back(frame),
            Some(Err(error)) => self.dropped(&error),
            None => {}
        }
    }

    /// Does the work that is due without waiting for the network: handles the frames
    /// read, pings, reconnects, re-sends. Returns the events it produced.
    pub async fn poll(&mut self) -> Result<Vec<Event>, ClientError> {
        while let Some(frame) = self.backlog.pop_front() {
            match self.handle_push(frame).await {
                Err(error) if error.is_disconnect() => self.dropped(&error),
                other => other?,
            }
        }
        let now = Instant::now();
        match self.connection.as_mut() {
            Some(connection) if connection.ping_due() <= now => {
                if let Err(error) = connection.ping().await {
                    self.dropped(&error);
                }
            }
            Some(_) => {}
            None if self.link.retry_at.is_none_or(|at| at <= now) => self.try_reconnect().await?,
            None => {}
        }
        if self.connection.is_some() && self.link.resend_at.is_some_and(|at| at <= now) {
            self.link.resend_at = None;
            self.resend_unsent().await?;
        }
        Ok(self.events.drain(..).collect())
    }

    /// One reconnection attempt; a failure plans the next one (only a revoked token or
    /// a local failure is an error).
    pub(super) async fn try_reconnect(&mut self) -> Result<(), ClientError> {
        match self.reconnect().await {
            Ok(()) => Ok(()),
            Err(error) if error.is_disconnect() => {
                self.dropped(&error);
                Ok(())
            }
            Err(error @ ClientError::Server { code: ErrorCode::BadToken, .. }) => Err(error),
            Err(
                error @ (ClientError::Store(_)
                | ClientError::Config(_)
                | ClientError::PlaintextRefused { .. }),
            ) => Err(error),
            Err(error) => {
                // The server answered oddly (a refusal while starting up, say): try later.
                self.dropped(&error);
                Ok(())
            }
        }
    }

    /// The next event, reading from the server as needed and riding out drops: the
    /// connection is kept alive and re-made by itself ([`Event::Disconnected`] and
    /// [`Event::Reconnected`] say so). Errors are only what cannot pass by waiting: a
    /// revoked token, the local store failing.
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(event);
            }
            self.ready().await;
            let events = self.poll().await?;
            self.events.extend(events);
        }
    }

    /// Handles what the server had waiting for this device when it logged in (the count
    /// its `AuthOk` gave), acknowledging each, and returns the events. A one-shot
    /// command calls it before it exits, so that nothing it was sent stays queued.
    pub async fn catch_up(&mut self) -> Result<Vec<Event>, ClientError> {
        let mut events = Vec::new();
        while self.link.pending > 0 && self.connection.is_some() {
            self.ready().await;
            events.extend(self.poll().await?);
        }
        events.extend(self.events.drain(..));
        Ok(events)
    }
}
