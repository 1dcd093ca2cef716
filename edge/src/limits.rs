//! Rate limits keyed by whatever is being limited, with time passed in.
//!
//! - [`RateLimiter`]: token buckets. A bucket holds up to `burst` tokens and refills at
//!   `per_second`; an operation takes one token or is refused with the wait until the
//!   next token. Idle full buckets are dropped. [`TokenBucket`] is one such bucket, for
//!   an owner that keeps it itself (a connection's refusals).
//! - [`HourlyWindow`]: at most `limit` events per key in any sliding hour (verification
//!   codes per number, per number prefix, per network address: budgets an operator
//!   states per hour). Keys with nothing in the last hour are dropped.
//!
//! - [`DailyCount`]: at most `max` of something per key per UTC day (quotas on what
//!   an account creates: groups, exports). Kept in memory: a restart forgets them.
//!
//! All live on one core (plain owned data) and stay as small as the set of active keys.

use std::collections::HashMap;
use std::hash::Hash;

/// A bucket's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Tokens available at once.
    pub burst: f64,
    /// Tokens added per second.
    pub per_second: f64,
}

/// One token bucket; its owner passes the rate in (one rate serves many buckets).
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    tokens: f64,
    updated_ms: u64,
}

impl TokenBucket {
    /// A full bucket at `now_ms`.
    pub fn full(rate: Rate, now_ms: u64) -> TokenBucket {
        TokenBucket { tokens: rate.burst, updated_ms: now_ms }
    }

    /// Takes a token, or returns how many milliseconds until one is available.
    pub fn take(&mut self, rate: Rate, now_ms: u64) -> Result<(), u64> {
        self.refill(rate, now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait_s = (1.0 - self.tokens) / rate.per_second;
            Err((wait_s * 1000.0).ceil() as u64)
        }
    }

    /// Takes a token even if none is left, for work that is done already (a frame
    /// read and handled): the bucket goes into debt, and the answer is how many
    /// milliseconds until it is out of it. So the sustained rate is exact however the
    /// work arrives.
    pub fn take_owing(&mut self, rate: Rate, now_ms: u64) -> Result<(), u64> {
        self.refill(rate, now_ms);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            return Ok(());
        }
        Err((-self.tokens / rate.per_second * 1000.0).ceil() as u64)
    }

    fn refill(&mut self, rate: Rate, now_ms: u64) {
        let elapsed_s = now_ms.saturating_sub(self.updated_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed_s * rate.per_second).min(rate.burst);
        self.updated_ms = now_ms;
    }

    /// Whether it would be full at `now_ms` (an idle key's bucket can be dropped).
    fn full_at(&self, rate: Rate, now_ms: u64) -> bool {
        let elapsed_s = now_ms.saturating_sub(self.updated_ms) as f64 / 1000.0;
        self.tokens + elapsed_s * rate.per_second >= rate.burst
    }
}

/// Token buckets by key.
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate: Rate,
    buckets: HashMap<K, TokenBucket>,
    last_sweep_ms: u64,
}

/// Buckets are swept for idle (full) ones at most this often.
const SWEEP_INTERVAL_MS: u64 = 60_000;

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// A limiter with the same rate for every key.
    pub fn new(rate: Rate) -> RateLimiter<K> {
        RateLimiter { rate, buckets: HashMap::new(), last_sweep_ms: 0 }
    }

    /// Takes a token for `key`, or returns how many milliseconds until one is available.
    pub fn take(&mut self, key: K, now_ms: u64) -> Result<(), u64> {
        self.sweep(now_ms);
        let rate = self.rate;
        self.buckets
            .entry(key)
            .or_insert_with(|| TokenBucket::full(rate, now_ms))
            .take(rate, now_ms)
    }

    fn sweep(&mut self, now_ms: u64) {
        if now_ms.saturating_sub(self.last_sweep_ms) < SWEEP_INTERVAL_MS {
            return;
        }
        self.last_sweep_ms = now_ms;
        let rate = self.rate;
        self.buckets.retain(|_, b| !b.full_at(rate, now_ms));
    }
}

const HOUR_MS: u64 = 3_600_000;

/// At most `limit` events per key in any sliding hour.
#[derive(Debug)]
pub struct HourlyWindow<K> {
    limit: u32,
    times: HashMap<K, std::collections::VecDeque<u64>>,
    last_sweep_ms: u64,
}

impl<K: Hash + Eq> HourlyWindow<K> {
    /// A window allowing `limit` events per key per hour.
    pub fn new(limit: u32) -> HourlyWindow<K> {
        HourlyWindow { limit, times: HashMap::new(), last_sweep_ms: 0 }
    }

    /// Whether one more event for `key` fits; if not, the milliseconds until it does.
    pub fn check(&mut self, key: &K, now_ms: u64) -> Result<(), u64> {
        self.sweep(now_ms);
        let Some(times) = self.times.get_mut(key) else {
            return if self.limit > 0 { Ok(()) } else { Err(HOUR_MS) };
        };
        while times.front().is_some_and(|t| t + HOUR_MS <= now_ms) {
            times.pop_front();
        }
        if (times.len() as u32) < self.limit {
            Ok(())
        } else {
            Err(times.front().map_or(HOUR_MS, |t| (t + HOUR_MS).saturating_sub(now_ms)))
        }
    }

    /// Counts an event for `key`.
    pub fn record(&mut self, key: K, now_ms: u64) {
        self.times.entry(key).or_default().push_back(now_ms);
    }

    fn sweep(&mut self, now_ms: u64) {
        if now_ms.saturating_sub(self.last_sweep_ms) < SWEEP_INTERVAL_MS {
            return;
        }
        self.last_sweep_ms = now_ms;
        self.times.retain(|_, times| times.back().is_some_and(|t| t + HOUR_MS > now_ms));
    }
}

const DAY_MS: u64 = 24 * HOUR_MS;

/// Counts per key for the current UTC day; the day's counts are void the next day.
#[derive(Debug, Default)]
pub struct DailyCount<K> {
    day: u64,
    counts: HashMap<K, u32>,
}

impl<K: Hash + Eq> DailyCount<K> {
    /// Counts one for `key` if it has fewer than `max` today; otherwise returns the
    /// count it would reach.
    pub fn take(&mut self, key: K, now_ms: u64, max: u32) -> Result<(), u32> {
        self.turn(now_ms);
        let count = self.counts.entry(key).or_insert(0);
        if *count >= max {
            return Err(count.saturating_add(1));
        }
        *count += 1;
        Ok(())
    }

    /// Gives back one taken today for `key` (what it counted was refused after all).
    pub fn give_back(&mut self, key: &K, now_ms: u64) {
        self.turn(now_ms);
        if let Some(count) = self.counts.get_mut(key) {
            *count = count.saturating_sub(1);
        }
    }

    fn turn(&mut self, now_ms: u64) {
        let day = now_ms / DAY_MS;
        if day != self.day {
            // Yesterday's counts are void: the map holds today's keys only.
            self.day = day;
            self.counts.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_hourly_window_slides() {
        let mut window = HourlyWindow::new(2);
        for t in [1_000, 2_000] {
            assert_eq!(window.check(&"a", t), Ok(()));
            window.record("a", t);
        }
        assert_eq!(window.check(&"a", 3_000), Err(HOUR_MS - 2_000));
        assert_eq!(window.check(&"b", 3_000), Ok(()), "keys are independent");
        assert_eq!(window.check(&"a", HOUR_MS + 1_000), Ok(()), "the first event slid out");
        // Keys idle for an hour are forgotten.
        window.check(&"b", 3 * HOUR_MS).unwrap();
        assert!(window.times.is_empty());
    }

    #[test]
    fn a_daily_count_turns_with_the_day() {
        let mut count = DailyCount::default();
        assert_eq!(count.take("a", 1_000, 2), Ok(()));
        assert_eq!(count.take("a", 2_000, 2), Ok(()));
        assert_eq!(count.take("a", 3_000, 2), Err(3));
        assert_eq!(count.take("b", 3_000, 2), Ok(()), "keys are independent");
        count.give_back(&"a", 4_000);
        assert_eq!(count.take("a", 5_000, 2), Ok(()));
        assert_eq!(count.take("a", DAY_MS, 2), Ok(()), "a new day");
    }

    #[test]
    fn burst_then_refill() {
        let mut limiter = RateLimiter::new(Rate { burst: 3.0, per_second: 2.0 });
        for _ in 0..3 {
            assert_eq!(limiter.take("a", 1000), Ok(()));
        }
        assert_eq!(limiter.take("a", 1000), Err(500));
        assert_eq!(limiter.take("b", 1000), Ok(()), "keys are independent");
        assert_eq!(limiter.take("a", 1500), Ok(()));
        assert_eq!(limiter.take("a", 1500), Err(500));
        // Idle full buckets are forgotten.
        assert_eq!(limiter.take("a", 200_000), Ok(()));
        assert_eq!(limiter.buckets.len(), 1);
    }
}
