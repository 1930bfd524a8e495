//! A token bucket, with time passed in, for publish rate limits.

/// Allows `rate` events per second on average, with bursts of up to `burst`.
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
        if now > self.last {
            self.tokens = (self.tokens + (now - self.last) * self.rate).min(self.burst);
            self.last = now;
        }
        let n = f64::from(n);
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else if self.rate <= 0.0 || n > self.burst {
            Err(f64::INFINITY)
        } else {
            Err((n - self.tokens) / self.rate)
        }
    }

    /// When the bucket was last used (seconds, the caller's clock).
    pub fn last_used(&self) -> f64 {
        self.last
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
}
