//! People, not numbers: how `tern` names someone and writes a message line.
//!
//! A person is shown by their profile name and, for contacts found by number, their
//! phone number ("Bob (+15550002)"); only someone this device knows nothing about is
//! "user 4503599627370497". Names are asked of the server once per run (profiles are
//! cheap but not free) and remembered in the store.

use std::collections::HashSet;

use tern_client::{Client, ClientError, Status, StoredMessage};
use tern_tools::time::utc_datetime;

/// Who has been looked up in this run already.
#[derive(Debug, Default)]
pub struct Names {
    asked: HashSet<u64>,
}

impl Names {
    /// Makes sure the server was asked for these people's names (once per run); a
    /// failure to ask leaves the id as the fallback.
    pub async fn learn(&mut self, client: &mut Client, users: &[u64]) {
        for &user in users {
            if user == client.user_id() || !self.asked.insert(user) {
                continue;
            }
            if client.person(user).is_ok_and(|(name, _)| name.is_some()) {
                continue;
            }
            let _ = client.profile(user).await; // Remembers the name when shown.
        }
    }
}

/// How a person is shown: name and phone, name, phone, or "user ID".
pub fn label(client: &Client, user: u64) -> String {
    if user == client.user_id() {
        return "me".to_string();
    }
    match client.person(user) {
        Ok((Some(name), Some(phone))) => format!("{name} ({phone})"),
        Ok((Some(name), None)) => name,
        Ok((None, Some(phone))) => phone,
        _ => format!("user {user}"),
    }
}

/// A message line: `[time] who: text ticks`. `full` shows the date and the message id
/// (for `tern get` and reports), as history does; a chat shows the time only.
pub fn line_of(client: &Client, message: &StoredMessage, full: bool) -> String {
    let who = label(client, message.sender.0);
    let mut ticks = String::new();
    if message.outgoing {
        ticks = format!(" {}", message.status.ticks());
        if message.status == Status::Failed {
            if let Ok(Some(reason)) = client.failure(message.client_id) {
                ticks.push_str(&format!(": {reason}"));
            }
        }
    }
    let time = if message.time_ms == 0 {
        "  …  ".to_string() // Not on the server yet: no server time.
    } else if full {
        utc_datetime(message.time_ms)
    } else {
        utc_datetime(message.time_ms)[11..16].to_string()
    };
    let id = if full && message.server_id > 0 {
        format!(" #{}", message.server_id)
    } else {
        String::new()
    };
    format!("[{time}]{id} {who}: {}{ticks}", message.text)
}

/// Where a message was said: "with Bob" or "in group \"club\"".
pub fn conversation_of(client: &Client, message: &StoredMessage) -> Result<String, ClientError> {
    let group = client.group_of(message)?;
    if group != 0 {
        let name = client.group(group)?.map_or_else(|| group.to_string(), |g| g.name);
        return Ok(format!("in group \"{name}\""));
    }
    Ok(format!("with {}", label(client, message.peer)))
}
