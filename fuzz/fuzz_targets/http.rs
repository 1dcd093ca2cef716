//! Fuzz target: the HTTP/1.1 text `ternd` parses and writes (`tern_edge::http`).
//!
//! The first input byte picks how the rest is used: odd, the rest is repeated past
//! `RESPONSE_BYTES_MAX` (so the limits are reached without long inputs); even, as it is.
//! Those bytes go to the admin head parser and to the status-line parser; the rest split
//! at `0xff` bytes (never in UTF-8) is a host, a path, a content type and a body to
//! format a POST from. Properties, beyond "no panic":
//! - neither parser looks past its limit: the answer is the same on the bytes cut there;
//! - a decision never changes with more bytes (the runtime stops reading once decided),
//!   and "read more" is only said under the limit;
//! - a parsed status code is 100..=999, and it reads back from a formatted status line;
//! - a routed head's request line is visible ASCII and single spaces only;
//! - a formatted POST either is refused, naming a field that does hold a forbidden byte,
//!   or has exactly one `\r\n\r\n`, right before the body, and routes as a well-formed
//!   request (`MethodNotAllowed`) through the admin parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_edge::http::{
    self, check_field, RequestError, RequestField, Route, REQUEST_HEAD_BYTES_MAX,
    RESPONSE_BYTES_MAX,
};

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else { return };
    let bytes = if mode % 2 == 1 && !rest.is_empty() {
        rest.iter().copied().cycle().take(RESPONSE_BYTES_MAX + 1 + rest.len()).collect()
    } else {
        rest.to_vec()
    };
    check_head(&bytes);
    check_status(&bytes);
    check_post(rest);
});

fn check_head(bytes: &[u8]) {
    let route = http::route_of_head(bytes);
    assert_eq!(route, http::route_of_head(&bytes[..bytes.len().min(REQUEST_HEAD_BYTES_MAX)]));
    match route {
        None => assert!(bytes.len() < REQUEST_HEAD_BYTES_MAX, "undecided at the limit"),
        Some(decided) => {
            let mut longer = bytes.to_vec();
            longer.extend_from_slice(b"\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n");
            assert_eq!(http::route_of_head(&longer), Some(decided), "changed with more");
        }
    }
    if let Some(Ok(route)) = route {
        let line_end = bytes.windows(2).position(|w| w == b"\r\n").unwrap();
        let line = &bytes[..line_end];
        assert!(line.iter().all(|b| b.is_ascii_graphic() || *b == b' '));
        assert_eq!(line.iter().filter(|b| **b == b' ').count(), 2);
        if route == Route::Health {
            assert!(line.starts_with(b"GET /healthz HTTP/1."));
        }
    }
}

fn check_status(bytes: &[u8]) {
    let status = http::status_from_prefix(bytes);
    let cut = &bytes[..bytes.len().min(RESPONSE_BYTES_MAX)];
    assert_eq!(status, http::status_from_prefix(cut));
    let at_close = http::status_at_close(bytes);
    match status {
        None => assert!(bytes.len() < RESPONSE_BYTES_MAX, "undecided at the limit"),
        Some(decided) => {
            assert_eq!(at_close, decided, "closing changed a decided status");
            let mut longer = bytes.to_vec();
            longer.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            assert_eq!(http::status_from_prefix(&longer), Some(decided), "changed with more");
        }
    }
    if let Ok(code) = at_close {
        assert!((100..=999).contains(&code), "status {code}");
        let line = format!("HTTP/1.1 {code} Reason\r\n");
        assert_eq!(http::status_from_prefix(line.as_bytes()), Some(Ok(code)));
    }
}

fn check_post(rest: &[u8]) {
    let mut fields = rest.splitn(4, |b| *b == 0xff).map(String::from_utf8_lossy);
    let mut next = || fields.next().unwrap_or_default();
    let (host, path, content_type, body) = (next(), next(), next(), next());
    match http::format_post(&host, &path, &content_type, &body) {
        Err(error) => check_refusal(error, &host, &path, &content_type),
        Ok(request) => {
            let head_end = request.len() - body.len() - 4;
            assert!(request.ends_with(&*body));
            assert_eq!(request.find("\r\n\r\n"), Some(head_end), "one empty line, then the body");
            let head = &request[..head_end];
            assert_eq!(head.split("\r\n").count(), 6, "six lines: {head:?}");
            assert!(head.bytes().all(|b| b.is_ascii_graphic() || b" \r\n".contains(&b)));
            assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
            if head_end + 4 <= REQUEST_HEAD_BYTES_MAX {
                let route = http::route_of_head(request.as_bytes());
                assert_eq!(route, Some(Ok(Route::MethodNotAllowed)));
            }
        }
    }
}

/// A refusal names a field whose text really breaks that rule.
fn check_refusal(error: RequestError, host: &str, path: &str, content_type: &str) {
    let text = |field| match field {
        RequestField::Host => host,
        RequestField::Path => path,
        RequestField::ContentType => content_type,
    };
    match error {
        RequestError::Empty(field) => assert!(text(field).is_empty()),
        RequestError::PathNotAbsolute => assert!(!path.starts_with('/')),
        RequestError::ForbiddenByte(field, byte) => {
            assert!(text(field).as_bytes().contains(&byte));
            assert!(!byte.is_ascii_graphic());
        }
    }
    let fields = [(RequestField::Host, host), (RequestField::Path, path)];
    let all = fields.into_iter().chain([(RequestField::ContentType, content_type)]);
    assert!(all.map(|(field, text)| check_field(field, text)).any(|r| r == Err(error)));
}
