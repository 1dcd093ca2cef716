//! `tern-bench`: benchmarks. `benches/` holds the criterion micro-benchmarks; the load
//! generator and the peer comparisons come with the server. Figures and the commands
//! that produced them are in `docs/BENCHMARKS.md`.

#![forbid(unsafe_code)]
