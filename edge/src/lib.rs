//! `tern-edge`: `ternd`, Tern's server.
//!
//! What is built so far: one glommio executor per core serving TCP, TLS 1.3, WebSocket
//! and WebSocket-over-TLS connections (handshake, registration with a verification code,
//! token auth, durable 1:1 messaging with sent/delivered/read ticks, one-time-key
//! hand-out, rate limits, deadlines) over the engine's shards, each shard owned by one
//! core; connections move to their user's home core, and cores exchange work only as
//! [`mesh`] messages. An admin endpoint and a clean stop on signals. The protocol logic
//! lives in [`core`] (synchronous, no I/O); [`runtime`] is the thin glommio driver.

#![deny(unsafe_code)] // One exception: `runtime::socket_handoff` (moving a socket between cores).

pub mod code_sender;
pub mod core;
pub mod limits;
pub mod mesh;
pub mod metrics;
pub mod push;
pub mod runtime;
pub mod secrets;
pub mod tls;
pub mod websocket;
