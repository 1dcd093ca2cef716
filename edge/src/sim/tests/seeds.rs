//! The randomized run over a bounded number of seeds in `cargo test`, and as many as
//! asked for with `TERN_SIM_SEEDS=N` (from `TERN_SIM_FROM`, default 0), or one seed
//! with `TERN_SIM_SEED=S` (what a failure prints). Seeds that once failed are kept as
//! regression tests below, with what they found.

use crate::sim::vopr::{run, Options};

/// Seeds `cargo test` runs (each a few thousand steps on 2 cores and 4 shards).
const SEEDS_IN_CARGO_TEST: u64 = 100;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Fails the test with what the run broke and the command that replays it.
fn fail(seed: u64, violations: &[String]) -> ! {
    panic!(
        "seed {seed}:\n{}\nreproduce: TERN_SIM_SEED={seed} cargo test -p tern-edge --lib sim",
        violations.join("\n")
    );
}

#[test]
fn random_runs_keep_every_promise() {
    let options = Options::default();
    if let Some(seed) = env_u64("TERN_SIM_SEED") {
        return match run(seed, &options) {
            Ok(report) => eprintln!("seed {seed}: {report:?}"),
            Err(violations) => fail(seed, &violations),
        };
    }
    let from = env_u64("TERN_SIM_FROM").unwrap_or(0);
    let count = env_u64("TERN_SIM_SEEDS").unwrap_or(SEEDS_IN_CARGO_TEST);
    let (mut acked, mut cuts) = (0, 0);
    for seed in from..from + count {
        match run(seed, &options) {
            Ok(report) => (acked, cuts) = (acked + report.acked, cuts + report.power_cuts),
            Err(violations) => fail(seed, &violations),
        }
    }
    eprintln!("{count} seeds from {from}: {acked} messages acknowledged, {cuts} power cuts");
    assert!(acked as u64 > count * 10, "the runs barely sent anything: {acked}");
}

#[test]
fn a_run_is_a_function_of_its_seed() {
    let options = Options { steps: 1_500, ..Options::default() };
    assert_eq!(run(7, &options), run(7, &options));
}

#[test]
fn the_judge_sees_a_lost_disk() {
    // Losing the disk that holds someone's account loses that account (and what was
    // queued there): a run that does so and passes would mean the checks are blind.
    let options = Options { lose_a_disk: true, ..Options::default() };
    let missed: Vec<u64> = (0..8).filter(|seed| run(*seed, &options).is_ok()).collect();
    assert!(missed.is_empty(), "runs that lost a disk and were judged clean: {missed:?}");
}
