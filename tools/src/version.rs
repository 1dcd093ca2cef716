//! The version `tern` and `ternctl` report: the workspace's product version and, when
//! built from a checkout, the git commit (`build.rs` sets `TERN_VERSION`).

/// For example `0.1.0 (git 1a2b3c4d5e6f)`.
pub const VERSION: &str = env!("TERN_VERSION");
