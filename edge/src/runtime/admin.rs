//! The admin endpoint: `GET /healthz` and `GET /metrics` (Prometheus text format) over a
//! deliberately tiny HTTP/1.1 responder: one request per connection, request head at most
//! 8 KiB, only GET. It is for operators and scrapers on a private address, not clients.

use std::cell::RefCell;
use std::rc::Rc;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use tern_engine::Storage;

use crate::core::Core;
use crate::metrics::render_metrics;

/// Largest request head read (a scraper's request is a few hundred bytes).
const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;

/// Serves the admin endpoint until the listener fails.
pub async fn serve<S: Storage + 'static>(listener: TcpListener, core: Rc<RefCell<Core<S>>>) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                glommio::spawn_local(answer(stream, core.clone())).detach();
            }
            Err(error) => tracing::warn!(%error, "admin accept failed"),
        }
    }
}

/// `/healthz`: 200 "ok" while every shard takes writes; 503 naming each shard that
/// refuses them since an I/O error (a failed fsync, a full disk), which only a restart
/// clears (see docs/OPERATIONS.md).
fn health(cores: &[crate::stats::CoreStats]) -> (&'static str, &'static str, String) {
    let failed: Vec<String> = cores
        .iter()
        .flat_map(|c| c.failed_shards.iter().map(move |(id, e)| (c.core, id, e)))
        .map(|(core, id, error)| format!("shard {id} (core {core}) refuses writes: {error}\n"))
        .collect();
    if failed.is_empty() {
        ("200 OK", "text/plain", "ok\n".to_string())
    } else {
        ("503 Service Unavailable", "text/plain", failed.concat())
    }
}

async fn answer<S: Storage>(mut stream: TcpStream, core: Rc<RefCell<Core<S>>>) {
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < REQUEST_HEAD_BYTES_MAX {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
    }
    let request_line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let request_line = String::from_utf8_lossy(request_line);
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path) {
        ("GET", "/healthz") => health(&core.borrow().all_stats()),
        ("GET", "/metrics") => {
            ("200 OK", "text/plain; version=0.0.4", render_metrics(&core.borrow().all_stats()))
        }
        ("GET", _) => ("404 Not Found", "text/plain", "try /healthz or /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.close().await;
}
