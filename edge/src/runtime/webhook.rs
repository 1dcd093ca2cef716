//! Outgoing HTTP: the SMS-gateway webhook (POSTs `{"phone": ..., "code": ...}`) and the
//! UnifiedPush sender (POSTs a content-free wake-up to a device's endpoint), over HTTP or
//! HTTPS (Mozilla's root certificates), retrying with backoff, as tasks of their own so
//! the core never waits for a remote service. URLs, JSON and the push policy are plain
//! code in `code_sender.rs` and `push.rs`; this is the I/O.

use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::timer::Timer;

use crate::code_sender::{json_string, CodeSender, WebhookUrl};
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
/// backoff; an endpoint answering 404 or 410 is gone.
#[derive(Clone, Debug)]
pub struct HttpPushSender {
    tls: Arc<rustls::ClientConfig>,
    attempts: u32,
    first_backoff: Duration,
}

impl HttpPushSender {
    /// A sender trying each push up to `attempts` times.
    pub fn new(attempts: u32, first_backoff: Duration) -> HttpPushSender {
        HttpPushSender { tls: client_tls(), attempts: attempts.max(1), first_backoff }
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
            let tls = url.tls.then_some(&sender.tls);
            let mut backoff = sender.first_backoff;
            for attempt in 1..=sender.attempts {
                match post(&url, tls, "application/json", PUSH_BODY).await {
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
                match post(&sender.url, sender.tls.as_ref(), "application/json", &body).await {
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

/// One POST; returns the HTTP status code.
async fn post(
    url: &WebhookUrl,
    tls: Option<&Arc<rustls::ClientConfig>>,
    content_type: &str,
    body: &str,
) -> io::Result<u16> {
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\nUser-Agent: ternd\r\n\r\n{body}",
        url.path,
        url.host,
        body.len()
    );
    let connect = TcpStream::connect((url.host.as_str(), url.port));
    let mut stream = futures_lite::future::or(async { Some(connect.await) }, async {
        Timer::new(Duration::from_secs(10)).await;
        None
    })
    .await
    .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
    .map_err(io::Error::from)?;
    let response = match tls {
        None => {
            stream.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await?;
            response
        }
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let mut tls =
                rustls::ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
            io::Write::write_all(&mut tls.writer(), request.as_bytes())?;
            tls_exchange(&mut stream, &mut tls).await?
        }
    };
    let status_line = response.split(|b| *b == b'\n').next().unwrap_or_default();
    let status = String::from_utf8_lossy(status_line)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP status line"))?;
    Ok(status)
}

/// Drives a rustls client over a glommio stream until the server closes; returns the
/// plaintext it sent.
async fn tls_exchange(
    stream: &mut TcpStream,
    tls: &mut rustls::ClientConnection,
) -> io::Result<Vec<u8>> {
    let mut response = Vec::new();
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
            return Ok(response);
        }
        let mut received = &buffer[..n];
        while !received.is_empty() {
            tls.read_tls(&mut received)?;
            let state = tls
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let mut available = state.plaintext_bytes_to_read();
            while available > 0 {
                let start = response.len();
                response.resize(start + available, 0);
                let read = io::Read::read(&mut tls.reader(), &mut response[start..])?;
                response.truncate(start + read);
                available = available.saturating_sub(read);
                if read == 0 {
                    break;
                }
            }
        }
    }
}
