//! Per-token event budgets for the HTTP API: every endpoint that publishes events (publish,
//! locks, commit) draws on the caller's budget, so no endpoint is a way around it.

use crate::error::ApiError;
use protocol::Principal;
use protocol::rate::{KeyedBuckets, Limit};
use std::time::Instant;

/// Budgets keyed by the caller's `sub`, shared by all its requests on this node.
#[derive(Debug)]
pub(crate) struct KeyedLimiter {
    default: Limit,
    /// The highest rate a token's `publish_rate` claim may ask for.
    max_claimed: u32,
    started: Instant,
    buckets: KeyedBuckets,
}

/// Callers remembered at most (idle ones are pruned past it), and how long one stays idle.
const MAX_KEYS: usize = 10_000;
const IDLE_SECS: f64 = 60.0;

impl KeyedLimiter {
    pub(crate) fn new(rate: u32, burst: u32, max_claimed: u32) -> KeyedLimiter {
        KeyedLimiter {
            default: Limit { rate, burst },
            max_claimed,
            started: Instant::now(),
            buckets: KeyedBuckets::new(MAX_KEYS, IDLE_SECS),
        }
    }

    /// Takes `n` events from the caller's budget; a 429 with `Retry-After` when it is spent.
    pub(crate) fn check(&self, caller: &Principal, n: u32) -> Result<(), ApiError> {
        if self.default.rate == 0 {
            return Ok(());
        }
        let limit = Limit::for_caller(self.default, caller.publish_rate, self.max_claimed);
        let now = self.started.elapsed().as_secs_f64();
        let result = self.buckets.take(&caller.sub, n, limit, now);
        result.map_err(|wait| {
            crate::metrics::rate_limited();
            if wait.is_infinite() {
                ApiError::TooLarge {
                    code: "batch_too_large",
                    message: format!(
                        "a batch of {n} events exceeds the burst of {} per token",
                        limit.burst
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
