//! A `ternd` for a load generator: started with a temporary data directory, its log read
//! for the listening addresses and the verification codes, measured through `/proc`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::channel;
use std::time::Duration;

use crate::proto::Codes;

/// A running server: the process, its TCP and TLS addresses, the codes it sent.
pub struct Ternd {
    /// The process (killed by the caller when done).
    pub child: Child,
    /// The plain TCP listener.
    pub addr: SocketAddr,
    /// The TLS listener (development certificate in `DATA_DIR/tls/`).
    pub tls_addr: SocketAddr,
    /// Verification codes by phone number.
    pub codes: Codes,
}

/// Starts `binary` on `data_dir` with loopback listeners (TCP, TLS) and `extra` flags,
/// on the CPUs `cpus` names if given (`taskset -c`, which execs it: the pid is ternd's).
pub fn start(binary: &Path, data_dir: &Path, extra: &[String], cpus: Option<&str>) -> Ternd {
    start_logged(binary, data_dir, extra, None, cpus)
}

/// Those of `flags` that `binary`'s `--help` lists, from one run of it (a binary built
/// before a flag existed is still measurable without it).
pub fn known_flags(binary: &Path, flags: &[&'static str]) -> Vec<&'static str> {
    let help = Command::new(binary).arg("--help").output();
    let help = help.map(|out| String::from_utf8_lossy(&out.stdout).into_owned());
    let help = help.unwrap_or_default();
    flags.iter().copied().filter(|flag| help.contains(flag)).collect()
}

/// The per-device and per-connection budgets a load generator must not meet (it
/// messages whoever it likes, as fast as it can), lifted, for the flags `binary` has.
pub const LIFTED_BUDGETS: [&str; 2] = ["--stranger-sends-per-second", "--requests-per-second"];

fn unlimited_budgets(binary: &Path) -> Vec<&'static str> {
    let known = known_flags(binary, &LIFTED_BUDGETS);
    known.into_iter().flat_map(|flag| [flag, "1000000"]).collect()
}

/// Starts `binary` as [`start`] does, and also copies every line of its log to `log`.
pub fn start_logged(
    binary: &Path,
    data_dir: &Path,
    extra: &[String],
    log: Option<&Path>,
    cpus: Option<&str>,
) -> Ternd {
    let mut command = match cpus {
        Some(cpus) => {
            let mut taskset = Command::new("taskset");
            taskset.args(["-c", cpus]).arg(binary);
            taskset
        }
        None => Command::new(binary),
    };
    let mut child = command
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", "127.0.0.1:0", "--tls-listen", "127.0.0.1:0", "--admin", "off"])
        .args(["--ws-listen", "off", "--wss-listen", "off", "--sends-per-second", "1000000"])
        .args(["--code-requests-per-hour", "1000000"])
        .args(["--code-requests-per-prefix-per-hour", "100000000"])
        .args(unlimited_budgets(binary))
        .args(extra)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .expect("ternd starts (build it: cargo build --release --bin ternd)");
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let codes = Codes::default();
    let (addr_tx, addr_rx) = channel();
    let log_codes = codes.clone();
    let mut copy = log.map(|path| {
        std::io::BufWriter::new(std::fs::File::create(path).expect("the log file is writable"))
    });
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Some(copy) = &mut copy {
                use std::io::Write as _;
                let _ = writeln!(copy, "{line}").and_then(|()| copy.flush());
            }
            if line.contains("listening (tcp)") || line.contains("listening (tls)") {
                if let Some(rest) = line.split("local=").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap().to_string();
                    let _ = addr_tx.send((line.contains("(tls)"), addr));
                }
            }
            if line.contains("connection limit") {
                eprintln!("ternd: {line}");
            }
            if let (Some(phone), Some(code)) =
                (line.split("phone=\"").nth(1), line.split("code=\"").nth(1))
            {
                let phone = phone.split('"').next().unwrap().to_string();
                let code = code.split('"').next().unwrap().to_string();
                log_codes.lock().unwrap().insert(phone, code);
            }
        }
    });
    let (mut addr, mut tls_addr) = (None, None);
    while addr.is_none() || tls_addr.is_none() {
        let (tls, text) = addr_rx.recv_timeout(Duration::from_secs(30)).expect("ternd listens");
        let parsed: SocketAddr = text.parse().expect("a socket address");
        if tls {
            tls_addr = Some(parsed);
        } else {
            addr = Some(parsed);
        }
    }
    Ternd { child, addr: addr.unwrap(), tls_addr: tls_addr.unwrap(), codes }
}

/// A process's resident memory in KiB (`/proc/PID/status`).
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A process's anonymous resident memory in KiB (`RssAnon`: its heap and stacks, without
/// the mapped files that `VmRSS` also counts, such as the log segments a restarted
/// `ternd` replayed through a memory map).
pub fn rss_anon_kib(pid: u32) -> u64 {
    status_kib(pid, "RssAnon:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) a process used so far, in seconds (Linux `/proc`).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th, stime 15th.
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0 // USER_HZ is 100 on Linux.
}

/// The kernel's slab memory in KiB (`/proc/meminfo`): what sockets cost the kernel.
pub fn slab_kib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What a data directory's log holds (`log_bytes`).
#[derive(Debug, Default, Clone, Copy)]
pub struct LogBytes {
    /// Bytes of the segments up to their last committed record (not their preallocation).
    pub segments: u64,
    /// Segment files.
    pub segment_files: u64,
    /// Bytes of the checkpoint files.
    pub checkpoints: u64,
    /// Checkpoint files.
    pub checkpoint_files: u64,
}

/// Measures the log under `data_dir` (every shard's segments, scanned, and checkpoints):
/// what recovery reads back.
pub fn log_bytes(data_dir: &Path) -> LogBytes {
    let mut total = LogBytes::default();
    let Ok(entries) = std::fs::read_dir(data_dir) else { return total };
    for entry in entries.flatten() {
        let (path, name) = (entry.path(), entry.file_name().to_string_lossy().into_owned());
        if path.is_dir() {
            let inner = log_bytes(&path);
            total.segments += inner.segments;
            total.segment_files += inner.segment_files;
            total.checkpoints += inner.checkpoints;
            total.checkpoint_files += inner.checkpoint_files;
        } else if tern_engine::checkpoint::parse_file_name(&name).is_some() {
            total.checkpoints += entry.metadata().map_or(0, |m| m.len());
            total.checkpoint_files += 1;
        } else if tern_engine::record::parse_segment_file_name(&name).is_some() {
            let mapped = tern_engine::storage::map_file(&path).expect("a segment maps");
            let scan = tern_engine::record::scan_segment(&mapped);
            total.segments += scan.map_or(0, |scan| scan.end.committed_end());
            total.segment_files += 1;
        }
    }
    total
}

/// The bytes a restarted `ternd` on `data_dir` keeps of its active segments in memory:
/// the engine holds each shard's active segment, up to its last written byte rounded up to
/// a 4 KiB block, in a buffer of its own (anonymous memory, bounded per shard by the
/// segment size), so a measure of memory per account must leave it out.
pub fn active_segment_bytes(data_dir: &Path) -> u64 {
    let Ok(shards) = std::fs::read_dir(data_dir) else { return 0 };
    let mut total = 0;
    for shard in shards.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("shard-"))
    {
        let Ok(files) = std::fs::read_dir(shard.path()) else { continue };
        let active = files
            .flatten()
            .filter_map(|e| {
                let id = tern_engine::record::parse_segment_file_name(e.file_name().to_str()?)?;
                Some((id, e.path()))
            })
            .max();
        if let Some((_, path)) = active {
            let bytes = std::fs::read(path).unwrap_or_default();
            let written = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i as u64 + 1);
            total += written.div_ceil(4096) * 4096;
        }
    }
    total
}
