//! Delivering verification codes: the `CodeSender` seam.
//!
//! `LogCodeSender` writes the code to the server log, for development and tests (a test
//! reads it from `ternd`'s output). The webhook sender (`runtime::webhook`, the I/O)
//! POSTs JSON to an SMS gateway (`http://` or `https://`), retrying with backoff; the
//! core only sees the trait and never waits for the gateway.

use crate::http::{check_field, RequestField};

/// Sends a verification code to a phone number.
pub trait CodeSender {
    /// Sends `code` to `phone` (best effort; failures are logged by the sender).
    fn send_code(&self, phone: &str, code: &str);
}

/// Writes codes to the log (development only: anyone who reads the log can register).
#[derive(Debug, Default)]
pub struct LogCodeSender;

impl CodeSender for LogCodeSender {
    fn send_code(&self, phone: &str, code: &str) {
        tracing::info!(target: "tern::codes", phone, code, "verification code (log sender)");
    }
}

/// A parsed webhook URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookUrl {
    /// `https` or not.
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl WebhookUrl {
    /// Parses `http://host[:port]/path` or `https://...`. The host and the path go into
    /// a request head as they are, so either is refused if it holds a byte that could end
    /// its field there (a control character such as CR or LF, a space, non-ASCII): see
    /// `http::check_field`.
    pub fn parse(url: &str) -> Result<WebhookUrl, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(format!("{url}: must be an http:// or https:// URL"));
        };
        let (authority, path) =
            rest.split_once('/').map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().map_err(|_| format!("{url}: bad port"))?),
            None => (authority, if tls { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err(format!("{url}: no host"));
        }
        for (field, text) in [(RequestField::Host, host), (RequestField::Path, path.as_str())] {
            check_field(field, text).map_err(|error| format!("{url:?}: {error}"))?;
        }
        Ok(WebhookUrl { tls, host: host.to_string(), port, path })
    }
}

/// A JSON string literal (phone numbers and codes are checked ASCII, but escape anyway).
pub(crate) fn json_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls_parse() {
        let url = WebhookUrl::parse("https://sms.example.com/v1/send?x=1").unwrap();
        assert_eq!(
            url,
            WebhookUrl {
                tls: true,
                host: "sms.example.com".into(),
                port: 443,
                path: "/v1/send?x=1".into()
            }
        );
        let url = WebhookUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!((url.port, url.path.as_str(), url.tls), (8080, "/", false));
        assert!(WebhookUrl::parse("ftp://x").is_err());
        assert!(WebhookUrl::parse("http://:80/").is_err());
    }

    /// Goal: nothing from an operator's URL or a device's push endpoint can end a line
    /// or a field of the request head it goes into.
    #[test]
    fn webhook_urls_with_breaking_bytes_are_refused() {
        for url in [
            "http://gw.example/send\r\nX-Injected: 1",
            "http://gw.example/a b",
            "http://gw.example\n/send",
            "http://gw example/send",
            "https://gw.example/\u{7f}",
            "https://gw.example/é",
        ] {
            let error = WebhookUrl::parse(url).unwrap_err();
            assert!(error.contains("which it cannot"), "{url:?}: {error}");
        }
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("+1555"), "\"+1555\"");
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
