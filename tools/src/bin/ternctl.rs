//! `ternctl`, the operator's tool. Offline commands read a data directory without
//! writing to it (safe beside a live `ternd`); online commands read the admin port.
//! Exit status: 0 when all is well, 1 when the command found a problem (a corrupt
//! record, an unknown user), 2 when it could not run (bad arguments, unreadable dir).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tern_tools::ctl::{cluster, offline, online};

#[derive(Debug, Parser)]
#[command(
    name = "ternctl",
    version = tern_tools::version::VERSION,
    about = "Inspect and verify Tern data, watch a live ternd"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manifest, shards, segments (sizes, record counts by type, live and garbage bytes)
    /// and checkpoints of a data directory.
    Inspect {
        /// The data directory (ternd's --data-dir), read only.
        dir: PathBuf,
        /// One JSON object instead of the tables.
        #[arg(long)]
        json: bool,
    },
    /// Checks every CRC and archive of every segment and checkpoint; exits 0 only when
    /// everything is intact, and lists each corrupt record (shard, segment, offset).
    Verify {
        /// The data directory (ternd's --data-dir), read only.
        dir: PathBuf,
        /// No progress bar (it is drawn on stderr when stderr is a terminal).
        #[arg(long)]
        quiet: bool,
    },
    /// Records as JSON lines (ciphertext as its length and SHA-256, never its bytes).
    Dump {
        /// The data directory (ternd's --data-dir), read only.
        dir: PathBuf,
        /// Every record of one segment (with --shard).
        #[arg(long, conflicts_with = "mailbox", requires = "shard")]
        segment: Option<u64>,
        /// The shard of --segment.
        #[arg(long)]
        shard: Option<u32>,
        /// The queued envelopes of USER or USER:DEVICE.
        #[arg(long, required_unless_present = "segment")]
        mailbox: Option<String>,
    },
    /// The largest backlogs: devices with the most queued envelopes.
    Mailboxes {
        /// The data directory (ternd's --data-dir), read only.
        dir: PathBuf,
        /// How many devices to list.
        #[arg(long, default_value_t = 20)]
        top: usize,
    },
    /// One account: devices, key stock, groups, mailboxes.
    User {
        /// The data directory (ternd's --data-dir), read only.
        dir: PathBuf,
        /// The account's phone number (E.164, like +15550001).
        #[arg(long, conflicts_with = "id", required_unless_present = "id")]
        phone: Option<String>,
        /// The account's user id.
        #[arg(long)]
        id: Option<u64>,
    },
    /// Abuse reports, oldest first, as JSON lines.
    Reports {
        /// The data directory (ternd's --data-dir), read only.
        dir: PathBuf,
    },
    /// A consistent copy of a data directory, safe while ternd runs (newest checkpoint,
    /// then the segments, MANIFEST and committed media). Restore: start ternd on it.
    Backup {
        /// The data directory to copy (ternd's --data-dir), read only.
        dir: PathBuf,
        /// Where the copy goes: a new or empty directory.
        dest: PathBuf,
    },
    /// Per-core figures of a live server, read from its admin port.
    Stats {
        /// ternd's admin address (its --admin).
        #[arg(long, default_value = "127.0.0.1:7401")]
        admin: String,
    },
    /// A live view of the same figures, refreshed every second (q to quit).
    Top {
        /// ternd's admin address (its --admin).
        #[arg(long, default_value = "127.0.0.1:7401")]
        admin: String,
    },
    /// A cluster's control plane, read from etcd.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Makes a development CA and a certificate per node for the node mesh (mutual TLS
    /// 1.3) in a directory; never overwrites a file.
    Init {
        /// Where the files go (created if missing).
        #[arg(long)]
        out: std::path::PathBuf,
        /// The node ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// Host names or addresses every node certificate also names, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        hosts: Vec<String>,
    },
    /// Nodes, their shards, the controller, and shards without a live owner (exit 1).
    Status {
        /// etcd client endpoints, comma-separated.
        #[arg(long, default_value = "127.0.0.1:2379")]
        etcd: String,
        /// The cluster's name.
        #[arg(long)]
        cluster: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect { dir, json } => offline::inspect(&dir, json),
        Command::Verify { dir, quiet } => offline::verify(&dir, quiet),
        Command::Dump { dir, segment, shard, mailbox } => {
            offline::dump(&dir, segment.zip(shard), mailbox.as_deref())
        }
        Command::Mailboxes { dir, top } => offline::mailboxes(&dir, top),
        Command::User { dir, phone, id } => offline::user(&dir, phone.as_deref(), id),
        Command::Reports { dir } => offline::reports(&dir),
        Command::Backup { dir, dest } => offline::backup(&dir, &dest),
        Command::Stats { admin } => online::stats(&admin),
        Command::Top { admin } => online::top(&admin),
        Command::Cluster(ClusterCommand::Status { etcd, cluster: name }) => {
            cluster::status(&etcd, &name)
        }
        Command::Cluster(ClusterCommand::Init { out, nodes, hosts }) => {
            cluster::init(&out, &nodes, &hosts)
        }
    };
    match result {
        Ok(outcome) => outcome.exit_code(),
        Err(error) if is_broken_pipe(&*error) => ExitCode::SUCCESS, // `| head`
        Err(error) => {
            eprintln!("ternctl: {error}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(error: &(dyn std::error::Error + 'static)) -> bool {
    error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}
