//! `tern-bench`: benchmarks. `benches/` holds the criterion micro-benchmarks; the load
//! generators (`loadgen`, `density`) and the peer comparisons (`peerbench`) are binaries.
//! Figures and the commands that produced them are in `docs/BENCHMARKS.md`.
//!
//! [`proto`] holds what the generators share to speak Tern's protocol without the SDK
//! (no end-to-end encryption: the load carries random bytes), [`server`] how they
//! start a `ternd` and read its log, and [`pacer`] the open loop's clock.

#![forbid(unsafe_code)]

pub mod pacer;
pub mod proto;
pub mod server;
