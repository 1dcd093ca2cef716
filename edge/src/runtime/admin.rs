//! The admin endpoint: `GET /healthz` and `GET /metrics` (Prometheus text format) over a
//! deliberately tiny HTTP/1.1 responder: one request per connection, request head at most
//! 8 KiB, only GET. It is for operators and scrapers on a private address, not clients.
//! The HTTP text is parsed and written by `crate::http` (pure, fuzzed); this is the I/O.

use std::cell::RefCell;
use std::rc::Rc;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use tern_engine::Storage;

use crate::core::Core;
use crate::http::{self, HeadError, Route, Status, REQUEST_HEAD_BYTES_MAX};
use crate::metrics::render_metrics;

/// The admin endpoint's answers are plain text, the metrics in Prometheus' format 0.0.4.
const TEXT: &str = "text/plain";
const METRICS_TEXT: &str = "text/plain; version=0.0.4";

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
/// refuses them: since an I/O error (a failed fsync), which only a restart clears, or
/// while its disk is full, which clears by itself once space is back (see
/// docs/OPERATIONS.md).
fn health(cores: &[crate::stats::CoreStats]) -> (Status, &'static str, String) {
    let failed: Vec<String> = cores
        .iter()
        .flat_map(|c| c.failed_shards.iter().map(move |(id, e)| (c.core, id, e)))
        .map(|(core, id, error)| format!("shard {id} (core {core}) refuses writes: {error}\n"))
        .collect();
    if failed.is_empty() {
        (Status::Ok, TEXT, "ok\n".to_string())
    } else {
        (Status::ServiceUnavailable, TEXT, failed.concat())
    }
}

/// Reads one request head, routes it and answers; a client that closes or fails before
/// its head is whole gets no answer.
async fn answer<S: Storage>(mut stream: TcpStream, core: Rc<RefCell<Core<S>>>) {
    let Some(route) = read_head(&mut stream).await else { return };
    let (status, content_type, body) = match route {
        Ok(Route::Health) => health(&core.borrow().all_stats()),
        Ok(Route::Metrics) => {
            (Status::Ok, METRICS_TEXT, render_metrics(&core.borrow().all_stats()))
        }
        Ok(Route::NotFound) => (Status::NotFound, TEXT, "try /healthz or /metrics\n".to_string()),
        Ok(Route::MethodNotAllowed) => (Status::MethodNotAllowed, TEXT, "GET only\n".to_string()),
        Err(error) => (Status::BadRequest, TEXT, format!("{error}\n")),
    };
    let response = http::format_response(status, content_type, &body);
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.close().await;
}

/// Reads until `http::route_of_head` decides, never more than
/// [`REQUEST_HEAD_BYTES_MAX`] bytes; `None` if the client closed or failed first.
async fn read_head(stream: &mut TcpStream) -> Option<Result<Route, HeadError>> {
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0u8; 1024];
    loop {
        if let Some(route) = http::route_of_head(&head) {
            return Some(route);
        }
        // Undecided means under the limit, so there is room.
        let room = (REQUEST_HEAD_BYTES_MAX - head.len()).min(buffer.len());
        match stream.read(&mut buffer[..room]).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
    }
}
