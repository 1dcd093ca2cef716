//! The HTTP/1.1 that `ternd` speaks, as plain functions over bytes: no socket, no clock.
//!
//! Two small exchanges need HTTP, and neither justifies an HTTP library: the admin
//! endpoint answers `GET /healthz` and `GET /metrics` (`runtime/admin.rs`), and the
//! SMS-gateway webhook and the UnifiedPush sender POST one small JSON body and read
//! back only a status code (`runtime/webhook.rs`). Issue 18 allowed hand-written HTTP
//! only if it stays tiny and fuzzed: this module is all of it (`fuzz/fuzz_targets/http.rs`
//! drives every parser here), and the runtime only moves bytes.
//!
//! What is accepted:
//! - A request head (admin): at most [`REQUEST_HEAD_BYTES_MAX`] bytes ending with an empty
//!   line (`\r\n\r\n`), whose first line is `METHOD SP TARGET SP HTTP/1.x`; the header
//!   lines are read past but not interpreted. The route depends on the method and the
//!   exact target only.
//! - A response (webhook, push): only its status line counts, `HTTP/d.d SP ddd` followed
//!   by a space and a reason or by the line's end; at most [`RESPONSE_BYTES_MAX`] bytes are
//!   read, and reading stops as soon as the status line is whole.
//! - A request to format (webhook, push): host, path and content type come from an
//!   operator's URL or a device's push endpoint, so each is checked for bytes that would
//!   end a line or a field (CR, LF, any control character, a space where one cannot be)
//!   before it is written; the result is one head and then the body.
//!
//! Parsers that need more bytes say so (`None`) instead of failing, and they never look
//! past their limit, so a caller can read into a buffer capped at the limit and ask again
//! after every read.

use std::fmt;

/// Largest admin request head read. A scraper's request is a few hundred bytes; 8 KiB is
/// what common servers allow for a whole head, so any real client fits.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;

/// Most bytes of a webhook or push response read. Only the status line matters (a few
/// dozen bytes); 16 KiB leaves room for a verbose gateway and bounds what a hostile or
/// broken one can make `ternd` buffer.
pub const RESPONSE_BYTES_MAX: usize = 16 * 1024;

/// Where an admin request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /healthz`.
    Health,
    /// `GET /metrics`.
    Metrics,
    /// A `GET` of any other target.
    NotFound,
    /// Any method but `GET`.
    MethodNotAllowed,
}

/// Why an admin request head is not one this endpoint answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadError {
    /// No empty line within [`REQUEST_HEAD_BYTES_MAX`] bytes.
    TooLarge,
    /// The first line is not three fields separated by single spaces.
    BadRequestLine,
    /// The method is empty or holds a byte a method token cannot.
    BadMethod,
    /// The target holds a control character or a byte outside ASCII.
    BadTarget,
    /// The version is not `HTTP/1.0` or `HTTP/1.1`.
    NotHttp,
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HeadError::TooLarge => "request head over 8 KiB",
            HeadError::BadRequestLine => "request line is not `METHOD TARGET VERSION`",
            HeadError::BadMethod => "method is not a token",
            HeadError::BadTarget => "target holds a control character or non-ASCII byte",
            HeadError::NotHttp => "version is not HTTP/1.0 or HTTP/1.1",
        })
    }
}

/// Routes the admin request whose first bytes are `received`: `None` while the head is
/// not whole and under [`REQUEST_HEAD_BYTES_MAX`] (read more), else the route or why
/// the head is refused. Bytes past the limit are never looked at.
pub fn route_of_head(received: &[u8]) -> Option<Result<Route, HeadError>> {
    let received = &received[..received.len().min(REQUEST_HEAD_BYTES_MAX)];
    if find(received, b"\r\n\r\n").is_none() {
        return (received.len() == REQUEST_HEAD_BYTES_MAX).then_some(Err(HeadError::TooLarge));
    }
    let line_end = find(received, b"\r\n").expect("the head holds an empty line");
    Some(route_of_request_line(&received[..line_end]))
}

fn route_of_request_line(line: &[u8]) -> Result<Route, HeadError> {
    let mut fields = line.split(|b| *b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(HeadError::BadRequestLine);
    };
    if method.is_empty() || !method.iter().all(|b| is_token_byte(*b)) {
        return Err(HeadError::BadMethod);
    }
    if target.is_empty() || !target.iter().all(|b| b.is_ascii_graphic()) {
        return Err(HeadError::BadTarget);
    }
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return Err(HeadError::NotHttp);
    }
    Ok(match (method, target) {
        (b"GET", b"/healthz") => Route::Health,
        (b"GET", b"/metrics") => Route::Metrics,
        (b"GET", _) => Route::NotFound,
        _ => Route::MethodNotAllowed,
    })
}

/// A byte of an RFC 9110 token (a method name).
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// The statuses the admin endpoint answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// 200.
    Ok,
    /// 400: the head is not HTTP this endpoint reads ([`HeadError`]).
    BadRequest,
    /// 404.
    NotFound,
    /// 405.
    MethodNotAllowed,
    /// 503: a shard refuses writes.
    ServiceUnavailable,
}

impl Status {
    /// The status code and reason, as on a status line.
    pub fn text(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::ServiceUnavailable => "503 Service Unavailable",
        }
    }
}

/// The whole admin response: status line, three headers (the connection closes after
/// it), the body. `content_type` is one of the endpoint's constants, never input.
pub fn format_response(status: Status, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        status.text(),
        body.len()
    )
}

/// Which field of a request to format broke a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestField {
    /// The `Host` header (from a URL's authority).
    Host,
    /// The request target (a URL's path and query).
    Path,
    /// The `Content-Type` header.
    ContentType,
}

/// Why a request was not formatted: the text would have broken out of its field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// The field is empty.
    Empty(RequestField),
    /// The path does not start with `/`.
    PathNotAbsolute,
    /// The field holds this byte, which it cannot: a control character (CR, LF, ...)
    /// anywhere, a byte outside ASCII, or a space in the host or the path.
    ForbiddenByte(RequestField, u8),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Empty(field) => write!(f, "{field:?} is empty"),
            RequestError::PathNotAbsolute => f.write_str("path does not start with '/'"),
            RequestError::ForbiddenByte(field, byte) => {
                write!(f, "{field:?} holds byte {byte:#04x}, which it cannot")
            }
        }
    }
}

impl std::error::Error for RequestError {}

/// Checks that `text` can stand as `field` of a request head: not empty, ASCII, no
/// control character, and no space except in the content type (`text/plain; a=b`).
pub fn check_field(field: RequestField, text: &str) -> Result<(), RequestError> {
    if text.is_empty() {
        return Err(RequestError::Empty(field));
    }
    let space_allowed = field == RequestField::ContentType;
    let forbidden = text.bytes().find(|b| !(b.is_ascii_graphic() || (space_allowed && *b == b' ')));
    match forbidden {
        Some(byte) => Err(RequestError::ForbiddenByte(field, byte)),
        None if field == RequestField::Path && !text.starts_with('/') => {
            Err(RequestError::PathNotAbsolute)
        }
        None => Ok(()),
    }
}

/// A whole `POST` request: the head (the connection closes after the response) and
/// `body`, or which field broke a rule.
pub fn format_post(
    host: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> Result<String, RequestError> {
    check_field(RequestField::Host, host)?;
    check_field(RequestField::Path, path)?;
    check_field(RequestField::ContentType, content_type)?;
    Ok(format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\nUser-Agent: ternd\r\n\r\n{body}",
        body.len()
    ))
}

/// Why a response gave no status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusError {
    /// The connection closed before any byte, or [`RESPONSE_BYTES_MAX`] bytes held no
    /// line end.
    NoStatusLine,
    /// The status line does not start with `HTTP/d.d `.
    NotHttp,
    /// The status code is not three digits from 100 to 999 ended by a space or the line.
    BadStatus,
}

impl fmt::Display for StatusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StatusError::NoStatusLine => "no status line (closed, or none in the first 16 KiB)",
            StatusError::NotHttp => "status line does not start with HTTP/d.d",
            StatusError::BadStatus => "status code is not three digits from 100 to 999",
        })
    }
}

impl std::error::Error for StatusError {}

/// The status code of the response whose first bytes are `received`: `None` while the
/// status line is not whole and under [`RESPONSE_BYTES_MAX`] (read more), else the code
/// or why there is none. Bytes past the limit are never looked at.
pub fn status_from_prefix(received: &[u8]) -> Option<Result<u16, StatusError>> {
    let received = &received[..received.len().min(RESPONSE_BYTES_MAX)];
    match received.iter().position(|b| *b == b'\n') {
        Some(end) => Some(status_of_line(&received[..end])),
        None if received.len() == RESPONSE_BYTES_MAX => Some(Err(StatusError::NoStatusLine)),
        None => None,
    }
}

/// The status code once the connection has closed after `received`: a last line without
/// its line end still counts (as it always has); nothing at all is no status line.
pub fn status_at_close(received: &[u8]) -> Result<u16, StatusError> {
    match status_from_prefix(received) {
        Some(status) => status,
        None if received.is_empty() => Err(StatusError::NoStatusLine),
        None => status_of_line(received),
    }
}

fn status_of_line(line: &[u8]) -> Result<u16, StatusError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let [b'H', b'T', b'T', b'P', b'/', major, b'.', minor, b' ', rest @ ..] = line else {
        return Err(StatusError::NotHttp);
    };
    if !major.is_ascii_digit() || !minor.is_ascii_digit() {
        return Err(StatusError::NotHttp);
    }
    let (code, after) = rest.split_at(rest.len().min(3));
    let ended = after.first().is_none_or(|b| *b == b' ');
    match code {
        [a @ b'1'..=b'9', b @ b'0'..=b'9', c @ b'0'..=b'9'] if ended => {
            Ok(u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0'))
        }
        _ => Err(StatusError::BadStatus),
    }
}

/// Where `needle` first starts in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_heads_route_by_method_and_exact_target() {
        let route = |head: &str| route_of_head(head.as_bytes());
        let with_headers = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n";
        assert_eq!(route(with_headers), Some(Ok(Route::Metrics)));
        assert_eq!(route("GET /healthz HTTP/1.0\r\n\r\n"), Some(Ok(Route::Health)));
        assert_eq!(route("GET /metrics?x=1 HTTP/1.1\r\n\r\n"), Some(Ok(Route::NotFound)));
        assert_eq!(route("GET / HTTP/1.1\r\n\r\n"), Some(Ok(Route::NotFound)));
        assert_eq!(route("POST /metrics HTTP/1.1\r\n\r\n"), Some(Ok(Route::MethodNotAllowed)));
        assert_eq!(route("HEAD /healthz HTTP/1.1\r\n\r\n"), Some(Ok(Route::MethodNotAllowed)));
    }

    #[test]
    fn each_head_error_names_its_rule() {
        let route = |head: &str| route_of_head(head.as_bytes());
        assert_eq!(route("GET /healthz\r\n\r\n"), Some(Err(HeadError::BadRequestLine)));
        assert_eq!(route("GET  /healthz HTTP/1.1\r\n\r\n"), Some(Err(HeadError::BadRequestLine)));
        assert_eq!(route("GET / HTTP/1.1 x\r\n\r\n"), Some(Err(HeadError::BadRequestLine)));
        assert_eq!(route("\r\n\r\n"), Some(Err(HeadError::BadRequestLine)));
        assert_eq!(route("G(T / HTTP/1.1\r\n\r\n"), Some(Err(HeadError::BadMethod)));
        assert_eq!(route("GET /\u{7f} HTTP/1.1\r\n\r\n"), Some(Err(HeadError::BadTarget)));
        assert_eq!(route("GET /é HTTP/1.1\r\n\r\n"), Some(Err(HeadError::BadTarget)));
        assert_eq!(route("GET / HTTP/2\r\n\r\n"), Some(Err(HeadError::NotHttp)));
        assert_eq!(route("SSH-2.0-x y z\r\n\r\n"), Some(Err(HeadError::NotHttp)));
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.resize(REQUEST_HEAD_BYTES_MAX, b'a');
        assert_eq!(route_of_head(&huge), Some(Err(HeadError::TooLarge)));
        assert_eq!(route_of_head(&huge[..REQUEST_HEAD_BYTES_MAX - 1]), None);
    }

    /// Goal: a head that arrives in pieces routes the same as in one read, and a decision
    /// taken on a prefix never changes with more bytes (the runtime stops reading there).
    #[test]
    fn split_heads_wait_for_the_empty_line() {
        let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nbody bytes";
        let end = find(head, b"\r\n\r\n").unwrap() + 4;
        for cut in 0..end {
            assert_eq!(route_of_head(&head[..cut]), None, "cut at {cut}");
        }
        for cut in end..=head.len() {
            assert_eq!(route_of_head(&head[..cut]), Some(Ok(Route::Health)), "cut at {cut}");
        }
        // Past the limit nothing counts, not even a late empty line.
        let mut late = vec![b'a'; REQUEST_HEAD_BYTES_MAX];
        late.extend_from_slice(b"\r\n\r\n");
        assert_eq!(route_of_head(&late), Some(Err(HeadError::TooLarge)));
    }

    #[test]
    fn admin_responses_are_whole() {
        let response = format_response(Status::ServiceUnavailable, "text/plain", "shard 1\n");
        assert_eq!(
            response,
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
             Content-Length: 8\r\nConnection: close\r\n\r\nshard 1\n"
        );
        assert!(format_response(Status::Ok, "text/plain", "ok\n").starts_with("HTTP/1.1 200 OK"));
    }

    #[test]
    fn posts_are_formatted_or_refused_by_field() {
        let request = format_post("sms.example.com", "/v1/send?x=1", "application/json", "{}");
        assert_eq!(
            request.unwrap(),
            "POST /v1/send?x=1 HTTP/1.1\r\nHost: sms.example.com\r\n\
             Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\
             User-Agent: ternd\r\n\r\n{}"
        );
        let post = |host, path, content_type| format_post(host, path, content_type, "");
        use RequestError::*;
        use RequestField::*;
        assert_eq!(post("h\r\nX: y", "/", "a/b"), Err(ForbiddenByte(Host, b'\r')));
        assert_eq!(post("h", "/a\nb", "a/b"), Err(ForbiddenByte(Path, b'\n')));
        assert_eq!(post("h", "/a b", "a/b"), Err(ForbiddenByte(Path, b' ')));
        assert_eq!(post("h h", "/", "a/b"), Err(ForbiddenByte(Host, b' ')));
        assert_eq!(post("h", "/é", "a/b"), Err(ForbiddenByte(Path, 0xc3)));
        assert_eq!(post("h", "/", "a/b\0"), Err(ForbiddenByte(ContentType, 0)));
        assert_eq!(post("h", "/", "a/b\t"), Err(ForbiddenByte(ContentType, b'\t')));
        assert_eq!(post("", "/", "a/b"), Err(Empty(Host)));
        assert_eq!(post("h", "", "a/b"), Err(Empty(Path)));
        assert_eq!(post("h", "/", ""), Err(Empty(ContentType)));
        assert_eq!(post("h", "v1", "a/b"), Err(PathNotAbsolute));
        assert!(post("h", "/", "text/plain; version=0.0.4").is_ok());
    }

    #[test]
    fn status_lines_parse_with_or_without_a_reason() {
        let status = |text: &str| status_from_prefix(text.as_bytes());
        assert_eq!(status("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), Some(Ok(200)));
        assert_eq!(status("HTTP/1.1 500\r\n"), Some(Ok(500)));
        assert_eq!(status("HTTP/1.0 404 Not Found\n"), Some(Ok(404)));
        assert_eq!(status("HTTP/1.1 999 \r\n"), Some(Ok(999)));
        assert_eq!(status("HTTP/1.1 200 OK"), None);
        assert_eq!(status_at_close(b"HTTP/1.1 410 Gone"), Ok(410));
        assert_eq!(status_at_close(b"HTTP/1.1 201\r\n"), Ok(201));
    }

    #[test]
    fn each_status_error_names_its_rule() {
        let status = |text: &str| status_from_prefix(text.as_bytes());
        assert_eq!(status_at_close(b""), Err(StatusError::NoStatusLine));
        assert_eq!(status("SSH-2.0-OpenSSH\r\n"), Some(Err(StatusError::NotHttp)));
        assert_eq!(status("HTTP/1.1200 OK\r\n"), Some(Err(StatusError::NotHttp)));
        assert_eq!(status("HTTP/x.1 200 OK\r\n"), Some(Err(StatusError::NotHttp)));
        assert_eq!(status("\r\n"), Some(Err(StatusError::NotHttp)));
        assert_eq!(status("HTTP/1.1 099 Low\r\n"), Some(Err(StatusError::BadStatus)));
        assert_eq!(status("HTTP/1.1 20 OK\r\n"), Some(Err(StatusError::BadStatus)));
        assert_eq!(status("HTTP/1.1 2000 OK\r\n"), Some(Err(StatusError::BadStatus)));
        assert_eq!(status("HTTP/1.1 2x0 OK\r\n"), Some(Err(StatusError::BadStatus)));
        assert_eq!(status("HTTP/1.1  200 OK\r\n"), Some(Err(StatusError::BadStatus)));
        assert_eq!(status_at_close(b"HTTP/1.1 20"), Err(StatusError::BadStatus));
    }

    /// Goal: a response with no line end stops being read at the limit: up to it the
    /// caller is told to read more, at it the answer is final, and bytes beyond it (even
    /// a status line's end) change nothing.
    #[test]
    fn an_endless_status_line_stops_at_the_limit() {
        let mut endless = b"HTTP/1.1 200 ".to_vec();
        endless.resize(RESPONSE_BYTES_MAX - 1, b'k');
        assert_eq!(status_from_prefix(&endless), None);
        endless.push(b'k');
        assert_eq!(status_from_prefix(&endless), Some(Err(StatusError::NoStatusLine)));
        endless.extend_from_slice(b"\r\n");
        assert_eq!(status_from_prefix(&endless), Some(Err(StatusError::NoStatusLine)));
        assert_eq!(status_at_close(&endless), Err(StatusError::NoStatusLine));
        // A status line ending exactly at the limit still counts.
        let mut long_reason = b"HTTP/1.1 204 ".to_vec();
        long_reason.resize(RESPONSE_BYTES_MAX - 1, b'r');
        long_reason.push(b'\n');
        assert_eq!(status_from_prefix(&long_reason), Some(Ok(204)));
    }

    /// Goal: a status line split anywhere waits for its end, then gives the same code.
    #[test]
    fn split_status_lines_wait_for_the_line_end() {
        let response = b"HTTP/1.1 410 Gone\r\nContent-Length: 0\r\n\r\n";
        let end = response.iter().position(|b| *b == b'\n').unwrap();
        for cut in 0..=end {
            assert_eq!(status_from_prefix(&response[..cut]), None, "cut at {cut}");
        }
        for cut in end + 1..=response.len() {
            assert_eq!(status_from_prefix(&response[..cut]), Some(Ok(410)), "cut at {cut}");
        }
    }
}
