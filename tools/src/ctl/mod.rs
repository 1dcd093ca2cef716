//! The commands of `ternctl`: `offline` reads a data directory (never writing to it),
//! `online` reads a live server's admin port, `cluster` reads a cluster's keys in etcd.

pub mod cluster;
pub mod offline;
pub mod online;

/// How a command ended when it could run: exit status 0 or 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Everything checked is in order.
    Ok,
    /// The command ran and found a problem (it said what on stdout or stderr).
    Problem,
}

impl Outcome {
    /// The process exit status.
    pub fn exit_code(self) -> std::process::ExitCode {
        match self {
            Outcome::Ok => std::process::ExitCode::SUCCESS,
            Outcome::Problem => std::process::ExitCode::from(1),
        }
    }
}

/// An error that stops a command (exit status 2), with what to do about it.
pub type CtlError = Box<dyn std::error::Error + Send + Sync>;
