//! Outgoing HTTP: the SMS-gateway webhook (POSTs `{"phone": ..., "code": ...}`) and the
//! UnifiedPush sender (POSTs a content-free wake-up to a device's endpoint), over HTTP or
//! HTTPS (Mozilla's root certificates), retrying with backoff, as tasks of their own so
//! the core never waits for a remote service. URLs, JSON and the push policy are plain
//! code in `code_sender.rs` and `push.rs`, the HTTP text is `crate::http` (pure,
//! fuzzed); this is the I/O. A response is read only until its status line is whole and
//! never past `http::RESPONSE_BYTES_MAX`, so a hostile or broken gateway or push service
//! cannot make `ternd` buffer without limit.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::timer::Timer;

use crate::code_sender::{json_string, CodeSender, WebhookUrl};
use crate::core::config::CoreConfig;
use crate::core::wakeups::{check_push_url, is_public};
use crate::http::{self, RESPONSE_BYTES_MAX};
use crate::push::{PushJob, PushOutcome, PushSender};
use tern_wire::messages::PushProvider;

/// A rustls client configuration trusting Mozilla's roots.
fn client_tls() -> Arc<rustls::ClientConfig> {
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// POSTs a content-free wake-up to UnifiedPush endpoints, retrying a failure with
/// backoff; an endpoint answering 404 or 410 is gone, and so is one the push policy
/// refuses now (off the operator's list, or a name resolving to no public address).
#[derive(Clone, Debug)]
pub struct HttpPushSender {
    tls: Arc<rustls::ClientConfig>,
    attempts: u32,
    first_backoff: Duration,
    /// `--push-insecure-endpoints`: inside addresses may be called (development).
    insecure: bool,
    /// `--push-allowed-hosts` (see `wakeups::check_push_url`).
    allowed_hosts: Rc<Vec<String>>,
}

impl HttpPushSender {
    /// A sender trying each push up to `attempts` times, under the push policy of
    /// `config`.
    pub fn new(attempts: u32, first_backoff: Duration, config: &CoreConfig) -> HttpPushSender {
        HttpPushSender {
            tls: client_tls(),
            attempts: attempts.max(1),
            first_backoff,
            insecure: config.push_insecure_endpoints,
            allowed_hosts: Rc::new(config.push_allowed_hosts.clone()),
        }
    }
}

/// The whole body of a push: no sender, no text, no count — only "connect".
const PUSH_BODY: &str = "{\"tern\":\"wake\"}";

impl PushSender for HttpPushSender {
    fn push(
        &self,
        job: PushJob,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = PushOutcome>>> {
        let sender = self.clone();
        Box::pin(async move {
            let (user_id, device_id) = job.device;
            if job.endpoint.provider != PushProvider::UnifiedPush {
                let provider = format!("{:?}", job.endpoint.provider);
                tracing::warn!(user_id, device_id, provider, "no sender for this push service");
                return PushOutcome::Failed;
            }
            let Ok(url) = WebhookUrl::parse(&job.endpoint.address) else {
                return PushOutcome::Gone;
            };
            // Registered before the policy changed, perhaps: checked again at each push.
            if let Err(why) = check_push_url(&url, sender.insecure, &sender.allowed_hosts) {
                tracing::warn!(user_id, device_id, why, "push endpoint refused by the policy");
                return PushOutcome::Gone;
            }
            let tls = url.tls.then_some(&sender.tls);
            let mut backoff = sender.first_backoff;
            let public_only = !sender.insecure;
            for attempt in 1..=sender.attempts {
                match post(&url, tls, public_only, PUSH_BODY).await {
                    Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
                        tracing::warn!(user_id, device_id, %error, "push endpoint inside");
                        return PushOutcome::Gone;
                    }
                    Ok(status) if (200..300).contains(&status) => return PushOutcome::Delivered,
                    Ok(404 | 410) => return PushOutcome::Gone,
                    Ok(status) => {
                        tracing::warn!(user_id, device_id, attempt, status, "push refused")
                    }
                    Err(error) => {
                        tracing::warn!(user_id, device_id, attempt, %error, "push failed")
                    }
                }
                if attempt < sender.attempts {
                    Timer::new(backoff).await;
                    backoff *= 2;
                }
            }
            tracing::error!(user_id, device_id, "gave up on a push");
            PushOutcome::Failed
        })
    }
}

/// POSTs `{"phone": ..., "code": ...}` to an SMS gateway, retrying with backoff.
#[derive(Clone, Debug)]
pub struct WebhookCodeSender {
    url: Rc<WebhookUrl>,
    tls: Option<Arc<rustls::ClientConfig>>,
    attempts: u32,
    first_backoff: Duration,
}

impl WebhookCodeSender {
    /// A sender for `url`, trying each code up to `attempts` times.
    pub fn new(url: WebhookUrl, attempts: u32, first_backoff: Duration) -> WebhookCodeSender {
        let tls = url.tls.then(client_tls);
        WebhookCodeSender { url: Rc::new(url), tls, attempts: attempts.max(1), first_backoff }
    }
}

impl CodeSender for WebhookCodeSender {
    fn send_code(&self, phone: &str, code: &str) {
        let body = format!(
            "{{\"phone\":{},\"code\":{},\"channel\":\"sms\"}}",
            json_string(phone),
            json_string(code)
        );
        let sender = self.clone();
        let phone = phone.to_string();
        // The core never waits for the gateway: delivery runs as its own task.
        glommio::spawn_local(async move {
            let mut backoff = sender.first_backoff;
            for attempt in 1..=sender.attempts {
                // The operator's own gateway may well be inside: any address goes.
                match post(&sender.url, sender.tls.as_ref(), false, &body).await {
                    Ok(status) if (200..300).contains(&status) => {
                        tracing::info!(phone, attempt, "verification code handed to the gateway");
                        return;
                    }
                    Ok(status) => tracing::warn!(phone, attempt, status, "code webhook refused"),
                    Err(error) => tracing::warn!(phone, attempt, %error, "code webhook failed"),
                }
                if attempt < sender.attempts {
                    Timer::new(backoff).await;
                    backoff *= 2;
                }
            }
            tracing::error!(phone, "gave up delivering a verification code");
        })
        .detach();
    }
}

/// One POST, from connecting to the end of the response's status line, takes at most
/// this long: a gateway or push service that accepts and then stalls (or sends a byte
/// now and then) does not hold a task for ever.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// One POST of a JSON `body`; returns the HTTP status code (a `TimedOut` error after
/// [`EXCHANGE_TIMEOUT`]; `PermissionDenied` when `public_only` and the host resolves to
/// no public address).
async fn post(
    url: &WebhookUrl,
    tls: Option<&Arc<rustls::ClientConfig>>,
    public_only: bool,
    body: &str,
) -> io::Result<u16> {
    futures_lite::future::or(exchange(url, tls, public_only, body), async {
        Timer::new(EXCHANGE_TIMEOUT).await;
        let why = format!("no status line within {} s", EXCHANGE_TIMEOUT.as_secs());
        Err(io::Error::new(io::ErrorKind::TimedOut, why))
    })
    .await
}

/// The POST itself: resolve, connect, send, read up to the status line.
async fn exchange(
    url: &WebhookUrl,
    tls: Option<&Arc<rustls::ClientConfig>>,
    public_only: bool,
    body: &str,
) -> io::Result<u16> {
    let request = http::format_post(&url.host, &url.path, "application/json", body)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let address = resolve(&url.host, url.port, public_only).await?;
    let mut stream = TcpStream::connect(address).await?;
    let status = match tls {
        None => {
            stream.write_all(request.as_bytes()).await?;
            plain_status(&mut stream).await?
        }
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let mut tls =
                rustls::ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
            io::Write::write_all(&mut tls.writer(), request.as_bytes())?;
            tls_status(&mut stream, &mut tls).await?
        }
    };
    status.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The address to call for `host`: resolved on glommio's blocking-thread pool (a name
/// lookup can take seconds, and the core's thread serves everyone), and with
/// `public_only` the first public address, `PermissionDenied` when there is none. The
/// address checked is the one connected to: no second lookup can answer otherwise.
pub(crate) async fn resolve(host: &str, port: u16, public_only: bool) -> io::Result<SocketAddr> {
    let name = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let addresses: Vec<SocketAddr> = match name.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            let lookup = move || (name.as_str(), port).to_socket_addrs().map(Vec::from_iter);
            glommio::executor().spawn_blocking(lookup).await?
        }
    };
    let usable = addresses.iter().find(|a| !public_only || is_public(a.ip()));
    usable.copied().ok_or_else(|| {
        let why = format!("{host} resolves to no public address ({addresses:?})");
        io::Error::new(io::ErrorKind::PermissionDenied, why)
    })
}

/// Reads a plain response until `http::status_from_prefix` decides or the server
/// closes, never more than [`RESPONSE_BYTES_MAX`] bytes.
async fn plain_status(stream: &mut TcpStream) -> io::Result<Result<u16, http::StatusError>> {
    let mut response = Vec::with_capacity(1024);
    let mut buffer = vec![0u8; 4096];
    loop {
        if let Some(status) = http::status_from_prefix(&response) {
            return Ok(status);
        }
        // Undecided means under the limit, so there is room.
        let room = (RESPONSE_BYTES_MAX - response.len()).min(buffer.len());
        let n = stream.read(&mut buffer[..room]).await?;
        if n == 0 {
            return Ok(http::status_at_close(&response));
        }
        response.extend_from_slice(&buffer[..n]);
    }
}

/// Drives a rustls client over a glommio stream until the plaintext it receives decides
/// `http::status_from_prefix` or the server closes; keeps at most [`RESPONSE_BYTES_MAX`]
/// bytes of plaintext.
async fn tls_status(
    stream: &mut TcpStream,
    tls: &mut rustls::ClientConnection,
) -> io::Result<Result<u16, http::StatusError>> {
    let mut response = Vec::with_capacity(1024);
    let mut out = Vec::new();
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        while tls.wants_write() {
            tls.write_tls(&mut out)?;
            stream.write_all(&out).await?;
            out.clear();
        }
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            return Ok(http::status_at_close(&response));
        }
        let mut received = &buffer[..n];
        while !received.is_empty() {
            tls.read_tls(&mut received)?;
            let state = tls
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            take_plaintext(tls, state.plaintext_bytes_to_read(), &mut response)?;
            if let Some(status) = http::status_from_prefix(&response) {
                return Ok(status);
            }
        }
    }
}

/// Moves up to `available` bytes of decrypted plaintext into `response`, never past
/// [`RESPONSE_BYTES_MAX`] (the rest stays in rustls, dropped with the connection).
fn take_plaintext(
    tls: &mut rustls::ClientConnection,
    available: usize,
    response: &mut Vec<u8>,
) -> io::Result<()> {
    let mut wanted = available.min(RESPONSE_BYTES_MAX.saturating_sub(response.len()));
    while wanted > 0 {
        let start = response.len();
        response.resize(start + wanted, 0);
        let read = io::Read::read(&mut tls.reader(), &mut response[start..])?;
        response.truncate(start + read);
        if read == 0 {
            break;
        }
        wanted -= read;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real lookup (through the system's resolver: `localhost` is in every hosts file)
    /// on glommio's blocking pool: a name resolving inside is refused for push endpoints,
    /// taken for the operator's own gateway; a public literal goes through untouched.
    #[test]
    fn a_name_resolving_inside_is_not_called() {
        let executor = glommio::LocalExecutorBuilder::default().make().expect("an executor");
        executor.run(async {
            let inside = resolve("localhost", 443, true).await.expect_err("localhost refused");
            assert_eq!(inside.kind(), io::ErrorKind::PermissionDenied, "{inside}");
            let gateway = resolve("localhost", 8080, false).await.expect("a gateway may be inside");
            assert!(gateway.ip().is_loopback(), "{gateway}");
            let literal = resolve("[::1]", 443, true).await.expect_err("::1 refused");
            assert_eq!(literal.kind(), io::ErrorKind::PermissionDenied);
            let public = resolve("8.8.8.8", 443, true).await.expect("a public literal");
            assert_eq!(public, "8.8.8.8:443".parse::<SocketAddr>().unwrap());
        });
    }
}
