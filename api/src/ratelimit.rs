//! Per-token publish rate limits for the HTTP API.

use crate::error::ApiError;
use dashmap::DashMap;
use protocol::rate::TokenBucket;
use std::time::Instant;

/// Buckets keyed by the caller's `sub`. Entries idle for a minute are pruned once the map
/// grows past `MAX_KEYS`, so memory stays bounded by active callers.
#[derive(Debug)]
pub(crate) struct KeyedLimiter {
    rate: u32,
    burst: u32,
    started: Instant,
    buckets: DashMap<String, TokenBucket>,
}

const MAX_KEYS: usize = 10_000;
const IDLE_SECS: f64 = 60.0;

impl KeyedLimiter {
    pub(crate) fn new(rate: u32, burst: u32) -> KeyedLimiter {
        KeyedLimiter {
            rate,
            burst,
            started: Instant::now(),
            buckets: DashMap::new(),
        }
    }

    /// Takes `n` events from `key`'s budget.
    pub(crate) fn check(&self, key: &str, n: u32) -> Result<(), ApiError> {
        if self.rate == 0 {
            return Ok(());
        }
        let now = self.started.elapsed().as_secs_f64();
        if self.buckets.len() > MAX_KEYS {
            self.buckets.retain(|_, b| now - b.last_used() < IDLE_SECS);
        }
        let result = self
            .buckets
            .entry(key.to_owned())
            .or_insert_with(|| TokenBucket::new(self.rate, self.burst, now))
            .take_n(n, now);
        result.map_err(|wait| {
            if wait.is_infinite() {
                ApiError::TooLarge {
                    code: "batch_too_large",
                    message: format!(
                        "a batch of {n} events exceeds the burst of {} per token",
                        self.burst
                    ),
                }
            } else {
                // Truncation is fine: the wait is a small positive number of seconds.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let secs = wait.ceil() as u64;
                ApiError::RateLimited {
                    retry_after_secs: secs.max(1),
                }
            }
        })
    }
}
