//! The admin endpoint's text: every core's metrics snapshot in the Prometheus text
//! exposition format (names, help and labels in one table per kind of sample).

use std::fmt::Write as _;

use crate::histogram::Histogram;
use crate::stats::CoreStats;

/// A metric with one sample per core: (name, type, help, value).
type CoreFamily = (&'static str, &'static str, &'static str, fn(&CoreStats) -> u64);
/// A counter with one sample per shard: (name, help, value).
type ShardFamily = (&'static str, &'static str, fn(&tern_engine::ShardCounters) -> u64);
/// A histogram per core: (name, help, histogram).
type HistogramFamily = (&'static str, &'static str, fn(&CoreStats) -> &Histogram);

/// The metrics with one sample per core, in the order they are rendered.
const CORE_FAMILIES: [CoreFamily; 19] = [
    ("tern_connections", "gauge", "Open client connections.", |c| c.connections),
    (
        "tern_connections_accepted_total",
        "counter",
        "Connections accepted by this core's listeners (TCP, TLS, WebSocket).",
        |c| c.counters.connections_accepted,
    ),
    (
        "tern_connections_failed_total",
        "counter",
        "Connections that failed: TLS or WebSocket handshake error or auth deadline \
         missed before authenticating, bad token, protocol error, or refused at the \
         connection limit (each connection counted once).",
        |c| c.counters.connections_failed,
    ),
    ("tern_outbound_bytes", "gauge", "Bytes queued for client sockets.", |c| c.outbound_bytes),
    ("tern_frames_received_total", "counter", "Frames decoded from clients.", |c| {
        c.counters.frames_in
    }),
    ("tern_messages_sent_total", "counter", "Messages accepted with a sent tick.", |c| {
        c.counters.messages_sent
    }),
    (
        "tern_messages_delivered_total",
        "counter",
        "Messages (text, media, control) written to recipient connections.",
        |c| c.counters.messages_delivered,
    ),
    (
        "tern_receipts_delivered_total",
        "counter",
        "Delivered/read receipts written to their senders' connections.",
        |c| c.counters.receipts_delivered,
    ),
    (
        "tern_protocol_errors_total",
        "counter",
        "Connections refused or closed for bad input.",
        |c| c.counters.protocol_errors,
    ),
    (
        "tern_redirects_total",
        "counter",
        "Auth and registration requests answered with a Redirect to the owning node.",
        |c| c.counters.redirects,
    ),
    (
        "tern_mesh_batches_sent_total",
        "counter",
        "Batches sent to other cores (one per destination per loop turn at most).",
        |c| c.counters.mesh_batches_out,
    ),
    ("tern_mesh_items_sent_total", "counter", "Items in the batches sent to other cores.", |c| {
        c.counters.mesh_items_out
    }),
    ("tern_codes_sent_total", "counter", "Verification codes sent.", |c| c.counters.codes_sent),
    (
        "tern_codes_refused_total",
        "counter",
        "Code requests refused by a per-prefix budget (SMS-pumping defence).",
        |c| c.counters.codes_refused,
    ),
    (
        "tern_pow_challenges_total",
        "counter",
        "Proof-of-work challenges given before sending a code.",
        |c| c.counters.pow_challenges,
    ),
    (
        "tern_presence_events_total",
        "counter",
        "Presence events sent to subscribers (coalesced per subscriber per loop turn).",
        |c| c.counters.presence_events,
    ),
    (
        "tern_mailbox_dropped_total",
        "counter",
        "Envelopes dropped from full mailboxes (the device and the senders are told).",
        |c| c.counters.dropped_envelopes,
    ),
    (
        "tern_connections_handed_over_total",
        "counter",
        "Connections handed to the core of their phone number or user.",
        |c| c.counters.handed_over,
    ),
    (
        "tern_connections_paced_total",
        "counter",
        "Times a connection's reading was paused for drawing refusals faster than allowed.",
        |c| c.counters.connections_paced,
    ),
];

/// The counters with one sample per shard, in the order they are rendered.
const SHARD_COUNTERS: [ShardFamily; 4] = [
    ("tern_commits_total", "Group commits (write + fdatasync).", |c| c.commits),
    (
        "tern_committed_records_total",
        "Records made durable; divide by commits for the batch size.",
        |c| c.committed_records,
    ),
    ("tern_committed_bytes_total", "Bytes written by commits.", |c| c.committed_bytes),
    ("tern_corrupt_records_total", "Records found corrupt and quarantined.", |c| c.corrupt_records),
];

/// The histograms with one set of samples per core, in the order they are rendered.
const HISTOGRAMS: [HistogramFamily; 5] = [
    ("tern_send_to_sent_seconds", "Time from a send arriving to its sent tick (durable).", |c| {
        &c.histograms.send_to_sent
    }),
    (
        "tern_send_to_deliver_seconds",
        "Time from a send being accepted to its delivery to a connected device.",
        |c| &c.histograms.send_to_deliver,
    ),
    ("tern_commit_batch_records", "Records per group commit (write + fdatasync).", |c| {
        &c.histograms.commit_batch_records
    }),
    (
        "tern_commit_wait_seconds",
        "Time from the first record asking for a commit round to the round's start.",
        |c| &c.histograms.commit_wait,
    ),
    ("tern_commit_seconds", "One shard's commit: its write and fdatasync.", |c| {
        &c.histograms.commit
    }),
];

/// The metrics of every core in Prometheus text format: `tern_` prefix, `_total`
/// counters, a `core` label (other cores' figures are their latest push, at most a
/// second old).
pub fn render_metrics(cores: &[CoreStats]) -> String {
    let mut out = String::new();
    for (name, kind, help, value) in CORE_FAMILIES {
        write_family(&mut out, name, kind, help, &core_samples(cores, value));
    }
    for (name, help, value) in SHARD_COUNTERS {
        write_family(&mut out, name, "counter", help, &shard_samples(cores, value));
    }
    write_refusing_shards(&mut out, cores);
    write_disk_space(&mut out, cores);
    write_histograms(&mut out, cores);
    out
}

/// Writes one metric family: its help and type lines, then one line per sample
/// (labels, already in braces or empty, and value).
fn write_family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// One sample per core, labelled with the core.
fn core_samples(cores: &[CoreStats], value: fn(&CoreStats) -> u64) -> Vec<(String, u64)> {
    cores.iter().map(|c| (format!("{{core=\"{}\"}}", c.core), value(c))).collect()
}

/// One sample per shard, labelled with the shard and its core, in shard order.
fn shard_samples(
    cores: &[CoreStats],
    value: fn(&tern_engine::ShardCounters) -> u64,
) -> Vec<(String, u64)> {
    let mut samples: Vec<(u32, String, u64)> = cores
        .iter()
        .flat_map(|c| c.shards.iter().map(move |(id, s)| (*id, c.core, s)))
        .map(|(id, core, s)| (id, format!("{{shard=\"{id}\",core=\"{core}\"}}"), value(s)))
        .collect();
    samples.sort_by_key(|(id, _, _)| *id);
    samples.into_iter().map(|(_, labels, value)| (labels, value)).collect()
}

/// `tern_shard_writes_refused`: 1 per shard that refuses writes after an I/O error.
fn write_refusing_shards(out: &mut String, cores: &[CoreStats]) {
    let mut refusing: Vec<(u32, String, u64)> = cores
        .iter()
        .flat_map(|c| c.shards.iter().map(move |(id, _)| (c, *id)))
        .map(|(c, id)| {
            let failed = c.failed_shards.iter().any(|(f, _)| *f == id);
            (id, format!("{{shard=\"{id}\",core=\"{}\"}}", c.core), u64::from(failed))
        })
        .collect();
    refusing.sort_by_key(|(id, _, _)| *id);
    let samples: Vec<(String, u64)> = refusing.into_iter().map(|(_, l, v)| (l, v)).collect();
    write_family(
        out,
        "tern_shard_writes_refused",
        "gauge",
        "1 while the shard refuses writes after an I/O error (failed fsync, full disk); \
         only a restart clears it.",
        &samples,
    );
}

/// The disk: bytes allocated per shard, and the data directory's free and total bytes
/// (when a core could read them).
fn write_disk_space(out: &mut String, cores: &[CoreStats]) {
    let mut disk_used: Vec<(u32, u32, u64)> = cores
        .iter()
        .flat_map(|c| c.disk.shard_allocated_bytes.iter().map(move |(id, b)| (*id, c.core, *b)))
        .collect();
    disk_used.sort_unstable();
    let disk_used: Vec<(String, u64)> = disk_used
        .into_iter()
        .map(|(id, core, bytes)| (format!("{{shard=\"{id}\",core=\"{core}\"}}"), bytes))
        .collect();
    write_family(
        out,
        "tern_disk_used_bytes",
        "gauge",
        "Bytes allocated on disk to the shard's segment and checkpoint files (segments are \
         preallocated, so this runs ahead of the bytes written in them).",
        &disk_used,
    );
    if let Some(fs) = cores.iter().find_map(|c| c.disk.file_system) {
        write_family(
            out,
            "tern_disk_free_bytes",
            "gauge",
            "Bytes available to ternd on the data directory's file system (statvfs f_bavail).",
            &[(String::new(), fs.free_bytes)],
        );
        write_family(
            out,
            "tern_disk_size_bytes",
            "gauge",
            "Size of the data directory's file system in bytes (statvfs f_blocks).",
            &[(String::new(), fs.size_bytes)],
        );
    }
}

/// The latency and batch-size histograms, each with one set of samples per core.
fn write_histograms(out: &mut String, cores: &[CoreStats]) {
    for (name, help, histogram) in HISTOGRAMS {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for core in cores {
            histogram(core).render_samples(out, name, &format!("core=\"{}\"", core.core));
        }
    }
}
