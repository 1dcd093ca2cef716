//! `tern-edge`: `ternd`, Tern's server.
//!
//! What is built so far: one glommio executor serving TCP, TLS 1.3, WebSocket and
//! WebSocket-over-TLS connections
//! (handshake, registration with a logged verification code, token auth, durable 1:1
//! messaging with sent/delivered/read ticks, one-time-key hand-out, rate limits,
//! deadlines) over the engine's shards, an admin endpoint and a clean stop on signals.
//! The protocol logic lives in [`core`] (synchronous, no I/O); [`runtime`] is the thin
//! glommio driver. Not built yet: several executors with the channel mesh and fd
//! hand-off (see README.md, Status).

#![forbid(unsafe_code)]

pub mod admin;
pub mod code_sender;
pub mod core;
pub mod limits;
pub mod metrics;
pub mod runtime;
pub mod secrets;
pub mod tls;
pub mod websocket;
