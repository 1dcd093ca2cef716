//! The admin endpoint: `GET /healthz` and `GET /metrics` (Prometheus text format) over a
//! deliberately tiny HTTP/1.1 responder: one request per connection, request head at most
//! 8 KiB, only GET. It is for operators and scrapers on a private address, not clients.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::rc::Rc;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use tern_engine::Storage;

use crate::core::Core;

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
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/metrics") => {
            ("200 OK", "text/plain; version=0.0.4", render_metrics(&core.borrow()))
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

/// The metrics in Prometheus text format: `tern_` prefix, `_total` counters.
pub fn render_metrics<S: Storage>(core: &Core<S>) -> String {
    let mut out = String::new();
    let counters = core.counters();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let core_label = |v: u64| vec![("{core=\"0\"}".to_string(), v)];
    metric(
        "tern_connections",
        "gauge",
        "Open client connections.",
        &core_label(core.connection_count() as u64),
    );
    metric(
        "tern_frames_received_total",
        "counter",
        "Frames decoded from clients.",
        &core_label(counters.frames_in),
    );
    metric(
        "tern_messages_sent_total",
        "counter",
        "Messages accepted with a sent tick.",
        &core_label(counters.messages_sent),
    );
    metric(
        "tern_messages_delivered_total",
        "counter",
        "Envelopes written to recipient connections.",
        &core_label(counters.messages_delivered),
    );
    metric(
        "tern_protocol_errors_total",
        "counter",
        "Connections refused or closed for bad input.",
        &core_label(counters.protocol_errors),
    );
    let shard_samples = |f: &dyn Fn(&tern_engine::ShardCounters) -> u64| -> Vec<(String, u64)> {
        core.shards()
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("{{shard=\"{i}\"}}"), f(s.borrow().counters())))
            .collect()
    };
    metric(
        "tern_commits_total",
        "counter",
        "Group commits (write + fdatasync).",
        &shard_samples(&|c| c.commits),
    );
    metric(
        "tern_committed_records_total",
        "counter",
        "Records made durable; divide by commits for the batch size.",
        &shard_samples(&|c| c.committed_records),
    );
    metric(
        "tern_committed_bytes_total",
        "counter",
        "Bytes written by commits.",
        &shard_samples(&|c| c.committed_bytes),
    );
    metric(
        "tern_corrupt_records_total",
        "counter",
        "Records found corrupt and quarantined.",
        &shard_samples(&|c| c.corrupt_records),
    );
    let outbound = core.outbound_bytes() as u64;
    let _ = writeln!(out, "# HELP tern_outbound_bytes Bytes queued for client sockets.");
    let _ = writeln!(out, "# TYPE tern_outbound_bytes gauge");
    let _ = writeln!(out, "tern_outbound_bytes{{core=\"0\"}} {outbound}");
    let labels = "core=\"0\"";
    let help = "Time from a send arriving to its sent tick (durable).";
    core.send_to_sent.render(&mut out, "tern_send_to_sent_seconds", help, labels);
    let help = "Time from a send being accepted to its delivery to a connected device.";
    core.send_to_deliver.render(&mut out, "tern_send_to_deliver_seconds", help, labels);
    let help = "Records per group commit (write + fdatasync).";
    core.commit_batch_records.render(&mut out, "tern_commit_batch_records", help, labels);
    out
}
