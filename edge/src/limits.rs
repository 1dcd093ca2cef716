//! Rate limits: token buckets keyed by whatever is being limited, with time passed in.
//!
//! A bucket holds up to `burst` tokens and refills at `per_second`; an operation takes
//! one token or is refused with the wait until the next token. Buckets live in the
//! home core of their key (plain owned data), and idle full buckets are dropped so the
//! table stays as small as the set of active keys.

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

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated_ms: u64,
}

/// Token buckets by key.
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate: Rate,
    buckets: HashMap<K, Bucket>,
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
        let bucket =
            self.buckets.entry(key).or_insert(Bucket { tokens: rate.burst, updated_ms: now_ms });
        let elapsed_s = now_ms.saturating_sub(bucket.updated_ms) as f64 / 1000.0;
        bucket.tokens = (bucket.tokens + elapsed_s * rate.per_second).min(rate.burst);
        bucket.updated_ms = now_ms;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait_s = (1.0 - bucket.tokens) / rate.per_second;
            Err((wait_s * 1000.0).ceil() as u64)
        }
    }

    fn sweep(&mut self, now_ms: u64) {
        if now_ms.saturating_sub(self.last_sweep_ms) < SWEEP_INTERVAL_MS {
            return;
        }
        self.last_sweep_ms = now_ms;
        let rate = self.rate;
        self.buckets.retain(|_, b| {
            let elapsed_s = now_ms.saturating_sub(b.updated_ms) as f64 / 1000.0;
            b.tokens + elapsed_s * rate.per_second < rate.burst
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
