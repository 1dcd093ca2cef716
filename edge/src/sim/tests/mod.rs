//! Tests through the simulation: the randomized runs over many seeds ([`seeds`]) and the
//! edge's protocol rules, each stated once against the simulated server ([`rules`]),
//! and the quotas on what one account creates, with the disk reserve ([`quotas`]).

mod quotas;
mod rules;
mod seeds;
