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
        if now > self.last {
            self.tokens = (self.tokens + (now - self.last) * self.rate).min(self.burst);
            self.last = now;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if self.rate <= 0.0 {
            Err(f64::INFINITY)
        } else {
            Err((1.0 - self.tokens) / self.rate)
        }
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
