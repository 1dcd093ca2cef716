//! `tern-edge`: `ternd`, Tern's server.
//!
//! One glommio executor per core serves TCP, TLS 1.3, WebSocket and WebSocket-over-TLS
//! connections over the engine's shards, each shard owned by one core; connections move
//! to their user's home core, and cores exchange work only as [`mesh`] messages. The
//! protocol logic is [`core`]: a deterministic state machine with no I/O, driven by
//! [`runtime`] (the thin glommio driver) in production and by [`sim`] in tests.
//!
//! Layers, bottom up (no module uses one above it): [`routing`], [`histogram`], [`http`],
//! [`limits`], [`proxy`], [`secrets`], [`stats`], [`refusal`], [`push`], [`work`] →
//! [`mesh`] → [`core`] → [`metrics`], [`tls`], [`websocket`], [`code_sender`] →
//! [`runtime`], [`sim`].

#![deny(unsafe_code)] // One exception: `runtime::socket_handoff` (moving a socket between cores).

pub mod code_sender;
pub mod core;
pub mod histogram;
pub mod http;
pub mod limits;
pub mod mesh;
pub mod metrics;
pub mod proxy;
pub mod push;
pub mod refusal;
pub mod routing;
pub mod runtime;
pub mod secrets;
#[cfg(any(test, feature = "sim"))]
pub mod sim;

pub mod stats;
pub mod tls;
pub mod websocket;
pub mod work;
