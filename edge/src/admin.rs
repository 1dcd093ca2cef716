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
use crate::mesh::CoreStats;
use crate::metrics::Histogram;

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

/// A metric with one sample per core: (name, type, help, value).
type CoreFamily<'a> = (&'a str, &'a str, &'a str, &'a dyn Fn(&CoreStats) -> u64);
/// A counter with one sample per shard: (name, help, value).
type ShardFamily<'a> = (&'a str, &'a str, &'a dyn Fn(&tern_engine::ShardCounters) -> u64);
/// A histogram per core: (name, help, histogram).
type HistogramFamily<'a> = (&'a str, &'a str, &'a dyn Fn(&CoreStats) -> &Histogram);

/// The metrics of every core in Prometheus text format: `tern_` prefix, `_total`
/// counters, a `core` label (other cores' figures are their latest push, at most a
/// second old).
pub fn render_metrics(cores: &[CoreStats]) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let per_core = |f: &dyn Fn(&CoreStats) -> u64| -> Vec<(String, u64)> {
        cores.iter().map(|c| (format!("{{core=\"{}\"}}", c.core), f(c))).collect()
    };
    let families: [CoreFamily; 9] = [
        ("tern_connections", "gauge", "Open client connections.", &|c| c.connections),
        ("tern_outbound_bytes", "gauge", "Bytes queued for client sockets.", &|c| c.outbound_bytes),
        ("tern_frames_received_total", "counter", "Frames decoded from clients.", &|c| c.frames_in),
        ("tern_messages_sent_total", "counter", "Messages accepted with a sent tick.", &|c| {
            c.messages_sent
        }),
        (
            "tern_messages_delivered_total",
            "counter",
            "Envelopes written to recipient connections.",
            &|c| c.messages_delivered,
        ),
        (
            "tern_protocol_errors_total",
            "counter",
            "Connections refused or closed for bad input.",
            &|c| c.protocol_errors,
        ),
        (
            "tern_mesh_batches_sent_total",
            "counter",
            "Batches sent to other cores (one per destination per loop turn at most).",
            &|c| c.mesh_batches_out,
        ),
        (
            "tern_mesh_items_sent_total",
            "counter",
            "Items in the batches sent to other cores.",
            &|c| c.mesh_items_out,
        ),
        (
            "tern_connections_handed_over_total",
            "counter",
            "Connections handed to the core of their phone number or user.",
            &|c| c.handed_over,
        ),
    ];
    for (name, kind, help, value) in families {
        metric(name, kind, help, &per_core(value));
    }
    let per_shard = |f: &dyn Fn(&tern_engine::ShardCounters) -> u64| -> Vec<(String, u64)> {
        let mut samples: Vec<(u32, String, u64)> = cores
            .iter()
            .flat_map(|c| c.shards.iter().map(move |(id, s)| (*id, c.core, s)))
            .map(|(id, core, s)| (id, format!("{{shard=\"{id}\",core=\"{core}\"}}"), f(s)))
            .collect();
        samples.sort_by_key(|(id, _, _)| *id);
        samples.into_iter().map(|(_, labels, value)| (labels, value)).collect()
    };
    let shard_families: [ShardFamily; 4] = [
        ("tern_commits_total", "Group commits (write + fdatasync).", &|c| c.commits),
        (
            "tern_committed_records_total",
            "Records made durable; divide by commits for the batch size.",
            &|c| c.committed_records,
        ),
        ("tern_committed_bytes_total", "Bytes written by commits.", &|c| c.committed_bytes),
        ("tern_corrupt_records_total", "Records found corrupt and quarantined.", &|c| {
            c.corrupt_records
        }),
    ];
    for (name, help, value) in shard_families {
        metric(name, "counter", help, &per_shard(value));
    }
    let histograms: [HistogramFamily; 3] = [
        (
            "tern_send_to_sent_seconds",
            "Time from a send arriving to its sent tick (durable).",
            &|c| &c.send_to_sent,
        ),
        (
            "tern_send_to_deliver_seconds",
            "Time from a send being accepted to its delivery to a connected device.",
            &|c| &c.send_to_deliver,
        ),
        ("tern_commit_batch_records", "Records per group commit (write + fdatasync).", &|c| {
            &c.commit_batch_records
        }),
    ];
    for (name, help, histogram) in histograms {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for core in cores {
            histogram(core).render_samples(&mut out, name, &format!("core=\"{}\"", core.core));
        }
    }
    out
}
