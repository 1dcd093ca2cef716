//! `tern-edge`: `ternd`, Tern's server.
//!
//! What is built so far: one glommio executor serving TCP connections (handshake,
//! registration with a logged verification code, token auth, durable 1:1 messaging with
//! sent/delivered/read ticks, one-time-key hand-out) over the engine's shards. The
//! protocol logic lives in [`core`] (synchronous, no I/O); [`runtime`] is the thin glommio
//! driver. Not built yet: several executors with the channel mesh and fd hand-off, TLS,
//! WebSocket, the admin endpoint, the webhook code sender, rate limits beyond code
//! requests (see README.md, Status).

#![forbid(unsafe_code)]

pub mod admin;
pub mod code_sender;
pub mod core;
pub mod limits;
pub mod runtime;
pub mod secrets;
