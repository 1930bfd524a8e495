//! Token buckets, with time passed in, for publish rate limits: one bucket, and a bounded map
//! of buckets keyed by caller (one budget per token across all its connections and requests).

use dashmap::DashMap;

/// Allows `rate` events per second on average, with bursts of up to `burst`. A rate of 0 means
/// unlimited (configuration's "no limit").
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    /// Seconds (on the caller's monotonic clock) of the last refill.
    last: f64,
}

impl TokenBucket {
    /// A full bucket at time `now` (seconds).
    pub fn new(rate: u32, burst: u32, now: f64) -> TokenBucket {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: f64::from(rate),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token at time `now`. Returns `Ok(())`, or `Err(wait)`: the seconds until a
    /// token will be available (the caller may wait that long, or refuse).
    ///
    /// # Errors
    ///
    /// The wait, in seconds, when the bucket is empty.
    pub fn take(&mut self, now: f64) -> Result<(), f64> {
        self.take_n(1, now)
    }

    /// Takes `n` tokens at once (a batch), or none.
    ///
    /// # Errors
    ///
    /// The wait, in seconds, until `n` tokens will be available; infinite when `n` exceeds
    /// the burst.
    pub fn take_n(&mut self, n: u32, now: f64) -> Result<(), f64> {
        if self.rate <= 0.0 {
            self.last = self.last.max(now);
            return Ok(());
        }
        if now > self.last {
            self.tokens = (self.tokens + (now - self.last) * self.rate).min(self.burst);
            self.last = now;
        }
        let n = f64::from(n);
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else if n > self.burst {
            Err(f64::INFINITY)
        } else {
            Err((n - self.tokens) / self.rate)
        }
    }

    /// When the bucket was last used (seconds, the caller's clock).
    pub fn last_used(&self) -> f64 {
        self.last
    }

    /// Changes the rate and burst, keeping the tokens saved so far (up to the new burst).
    pub fn set_limits(&mut self, rate: u32, burst: u32) {
        self.rate = f64::from(rate);
        self.burst = f64::from(burst.max(1));
        self.tokens = self.tokens.min(self.burst);
    }
}

/// A rate and burst for one caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Events per second; 0 is unlimited.
    pub rate: u32,
    pub burst: u32,
}

impl Limit {
    /// The limit for a caller whose token may carry its own rate: `claimed` bounded by `max`,
    /// with a burst of at least a second's worth; `default` without a claim.
    pub fn for_caller(default: Limit, claimed: Option<u32>, max: u32) -> Limit {
        match claimed {
            Some(rate) => {
                let rate = rate.min(max).max(1);
                Limit {
                    rate,
                    burst: default.burst.max(rate),
                }
            }
            None => default,
        }
    }
}

/// One bucket per key (a token's `sub`), shared by every connection or request of that key.
/// Buckets idle for `idle` seconds are dropped once there are more than `max_keys`, so memory
/// stays bounded by the callers active in the last minute.
#[derive(Debug)]
pub struct KeyedBuckets {
    buckets: DashMap<String, TokenBucket>,
    max_keys: usize,
    idle: f64,
}

impl KeyedBuckets {
    pub fn new(max_keys: usize, idle_secs: f64) -> KeyedBuckets {
        KeyedBuckets {
            buckets: DashMap::new(),
            max_keys,
            idle: idle_secs,
        }
    }

    /// Takes `n` events from `key`'s budget at time `now` (seconds, the caller's monotonic
    /// clock), under `limit`.
    ///
    /// # Errors
    ///
    /// The wait in seconds until they would be available; infinite when `n` exceeds the burst.
    pub fn take(&self, key: &str, n: u32, limit: Limit, now: f64) -> Result<(), f64> {
        if limit.rate == 0 {
            return Ok(());
        }
        if self.buckets.len() > self.max_keys {
            self.buckets.retain(|_, b| now - b.last_used() < self.idle);
        }
        // Look up before inserting: the common case allocates no key.
        if let Some(mut bucket) = self.buckets.get_mut(key) {
            bucket.set_limits(limit.rate, limit.burst);
            return bucket.take_n(n, now);
        }
        self.buckets
            .entry(key.to_owned())
            .or_insert_with(|| TokenBucket::new(limit.rate, limit.burst, now))
            .take_n(n, now)
    }

    /// Number of keys with a bucket.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refills_at_rate_and_caps_at_burst() {
        let mut b = TokenBucket::new(10, 3, 0.0);
        assert!(b.take(0.0).is_ok() && b.take(0.0).is_ok() && b.take(0.0).is_ok());
        let wait = b.take(0.0).unwrap_err();
        assert!((wait - 0.1).abs() < 1e-9);
        assert!(b.take(0.1).is_ok());
        assert!(b.take(0.1).is_err());
        // A long pause refills only up to the burst.
        for _ in 0..3 {
            assert!(b.take(100.0).is_ok());
        }
        assert!(b.take(100.0).is_err());
    }

    #[test]
    fn a_zero_rate_is_unlimited() {
        let mut b = TokenBucket::new(0, 1, 0.0);
        for _ in 0..1000 {
            assert!(b.take(0.0).is_ok());
        }
        let keyed = KeyedBuckets::new(10, 60.0);
        let unlimited = Limit { rate: 0, burst: 1 };
        assert!((0..1000).all(|_| keyed.take("a", 1, unlimited, 0.0).is_ok()));
    }

    #[test]
    fn keyed_buckets_share_a_budget_and_stay_bounded() {
        let keyed = KeyedBuckets::new(2, 60.0);
        let limit = Limit { rate: 10, burst: 2 };
        assert!(keyed.take("a", 1, limit, 0.0).is_ok());
        assert!(keyed.take("a", 1, limit, 0.0).is_ok());
        // The same key from anywhere draws on the same budget.
        assert!(keyed.take("a", 1, limit, 0.0).is_err());
        assert!(keyed.take("b", 2, limit, 0.0).is_ok());
        assert_eq!(keyed.take("c", 3, limit, 0.0), Err(f64::INFINITY));
        // Past `max_keys`, idle buckets go.
        assert!(keyed.take("d", 1, limit, 100.0).is_ok());
        assert!(keyed.len() <= 2, "{}", keyed.len());
    }

    #[test]
    fn claimed_rates_are_bounded() {
        let default = Limit {
            rate: 100,
            burst: 200,
        };
        assert_eq!(Limit::for_caller(default, None, 1000), default);
        assert_eq!(
            Limit::for_caller(default, Some(5000), 1000),
            Limit {
                rate: 1000,
                burst: 1000
            }
        );
        assert_eq!(
            Limit::for_caller(default, Some(10), 1000),
            Limit {
                rate: 10,
                burst: 200
            }
        );
        // A claim of 0 is not "unlimited".
        assert_eq!(Limit::for_caller(default, Some(0), 1000).rate, 1);
    }
}
