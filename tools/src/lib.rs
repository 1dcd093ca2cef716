//! `tern-tools`: `tern`, the chat CLI, and `ternctl`, the operator's tool (inspect and
//! verify a data dir offline, read live stats online).
//!
//! Not built yet: both need the engine and the server. Each binary says so and exits
//! with status 2.

#![forbid(unsafe_code)]

/// Prints why `tool` cannot run yet and returns the exit status to use.
pub fn not_built(tool: &str, needs: &str) -> std::process::ExitCode {
    eprintln!("{tool}: not built yet; it needs {needs}. See README.md, section Status.");
    std::process::ExitCode::from(2)
}
