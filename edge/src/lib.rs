//! `tern-edge`: `ternd`, the thread-per-core server (executors, listeners, sessions,
//! routing, presence, push, admin endpoint).
//!
//! Not built yet: the server is the subject of the edge milestone issue, after the
//! engine. `ternd` says so and exits with status 2 rather than pretend to serve.

#![forbid(unsafe_code)]

/// What `ternd` prints while the server does not exist yet.
pub const NOT_BUILT: &str = "ternd: the server is not built yet; this build contains the \
wire protocol (tern-wire) only. See README.md, section Status.";
