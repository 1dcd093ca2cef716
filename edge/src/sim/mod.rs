//! A deterministic simulation of the server, for tests (in the spirit of FoundationDB's
//! simulator and TigerBeetle's VOPR).
//!
//! Why: the edge's rules (registration, ticks, quotas, expiry, groups, presence) and its
//! promises under failure (nothing acknowledged lost, nothing stored twice, order kept)
//! depend on interleavings that a test against the real binary meets by luck and cannot
//! repeat. Here the whole server — every `Core`, its shards on `SimStorage`, the mesh
//! between cores, the work pool, the sockets and the clock — runs in one thread under one
//! seeded generator, so a run is a function of its seed.
//!
//! - [`world`]: the simulated server and sockets, and the events it interleaves;
//! - [`peer`]: a scripted client, for tests that state one rule;
//! - [`vopr`]: the randomized run judged by `tern_testkit::ledger`.
//!
//! Built for the edge's own tests and, with the `sim` feature, for the fuzz targets.

pub mod peer;
pub mod vopr;
pub mod world;

#[cfg(test)]
mod tests;

pub use peer::{Account, Peer};
pub use world::{Event, Received, SimConfig, World};
