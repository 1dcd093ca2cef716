//! Tests through the simulation: the randomized runs over many seeds ([`seeds`]) and the
//! edge's protocol rules, each stated once against the simulated server ([`rules`]),
//! the quotas on what one account creates, with the disk reserve ([`quotas`]), and the
//! pace of requests and refusals a connection is held to ([`pacing`]).

mod pacing;
mod quotas;
mod rules;
mod seeds;
