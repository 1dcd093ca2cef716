//! Tests through the simulation: the randomized runs over many seeds ([`seeds`]) and the
//! edge's protocol rules, each stated once against the simulated server ([`rules`]).

mod rules;
mod seeds;
