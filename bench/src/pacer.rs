//! The open loop's clock, shared by `loadgen` and `peerbench`: message `i` of the run is
//! due at `epoch + i / rate`, from user `i % users`, and its intended time goes to that
//! user's task, which sends it as soon as its window allows and counts its latencies from
//! that time (coordinated-omission-safe).
//!
//! One thread sleeping to the microsecond keeps the schedule for every user. Per-user
//! tokio intervals, the first design, rounded every deadline up to tokio's millisecond
//! timer wheel and woke late under load: 1.3 ms at p50 and 4.9 ms at p99 of the
//! generator's own lateness went into every latency measured (docs/BENCHMARKS.md,
//! issue 21).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Starts the clock for `users` users at `rate` messages a second in total, until
/// `running` turns false; returns each user's stream of intended send times (µs since
/// `epoch`).
pub fn start(
    rate: u64,
    users: usize,
    epoch: Instant,
    running: Arc<AtomicBool>,
) -> Vec<UnboundedReceiver<u64>> {
    let (senders, receivers) = (0..users).map(|_| unbounded_channel()).unzip();
    std::thread::Builder::new()
        .name("pacer".into())
        .spawn(move || pace(rate.max(1), senders, epoch, running))
        .expect("the pacer thread starts");
    receivers
}

fn pace(rate: u64, users: Vec<UnboundedSender<u64>>, epoch: Instant, running: Arc<AtomicBool>) {
    let now_us = || epoch.elapsed().as_micros() as u64;
    let start = now_us();
    let mut next = 0u64;
    while running.load(Ordering::Relaxed) {
        let due_us = start + next * 1_000_000 / rate;
        let now = now_us();
        if due_us > now {
            std::thread::sleep(Duration::from_micros(due_us - now));
            continue;
        }
        // Everything due by now goes at once (a sleep overran, or the rate is high).
        let user = (next % users.len() as u64) as usize;
        let _ = users[user].send(due_us);
        next += 1;
    }
}

/// Takes every intended time that is waiting on `schedule` into `due`, without waiting.
pub fn drain(schedule: &mut UnboundedReceiver<u64>, due: &mut std::collections::VecDeque<u64>) {
    while let Ok(intended) = schedule.try_recv() {
        due.push_back(intended);
    }
}
