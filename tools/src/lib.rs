//! `tern-tools`: `tern`, the chat CLI, and `ternctl`, the operator's tool (inspect and
//! verify a data dir offline, read live stats online). The binaries are thin: `ternctl`'s
//! commands live in [`ctl`] so tests can call them.

#![forbid(unsafe_code)]

pub mod ctl;
pub mod time;
pub mod version;
