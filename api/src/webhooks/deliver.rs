//! The delivery worker: one per endpoint on every node; the one holding the endpoint's lease
//! sends its queue, oldest first, one delivery at a time.

use super::{Endpoint, WebhookConfig, queue, sign};
use crate::locks::store::LockStore;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Most bytes of a receiver's answer read (to reuse the connection); the rest is dropped.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// How often the lease holder reports its queue's depth.
const DEPTH_EVERY: Duration = Duration::from_secs(5);

/// The HTTP client deliveries go out on: no redirects (a signed POST is for its URL only),
/// the configured timeout per attempt.
pub(crate) fn client(config: &WebhookConfig) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(config.timeout)
        .user_agent(concat!("lockstep-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_else(|err| {
            warn!(%err, "webhook client with default settings");
            reqwest::Client::new()
        })
}

/// An endpoint as logs, metrics and `config check` name it: scheme, host and port only. The
/// rest may carry a secret (Slack- and Discord-style hooks put their token in the path,
/// others in the query or the user info).
pub fn label(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(url) => match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{}://{host}:{port}", url.scheme()),
            (Some(host), None) => format!("{}://{host}", url.scheme()),
            _ => format!("{}://", url.scheme()),
        },
        Err(_) => "(not a URL)".to_owned(),
    }
}

#[derive(Debug)]
pub(crate) struct Worker {
    pub(crate) store: LockStore,
    pub(crate) endpoint: Endpoint,
    pub(crate) config: Arc<WebhookConfig>,
    pub(crate) node: String,
    pub(crate) client: reqwest::Client,
    /// Notified when this node queued deliveries.
    pub(crate) wake: Arc<Notify>,
    /// The endpoint in logs and metrics: its position in `webhooks.urls` and its host.
    pub(crate) label: String,
}

/// How an attempt ended.
enum Outcome {
    Delivered,
    Failed(String),
    /// The lease went to another node while the receiver took its time: the attempt was
    /// dropped (the new holder sends it again) and nothing is recorded.
    LeaseLost,
}

impl Worker {
    fn lease_ms(&self) -> i64 {
        crate::locks::millis(self.config.lease)
    }

    /// Renewed a third of the way through, so one slow renewal does not lose it.
    fn renew_every(&self) -> Duration {
        self.config.lease / 3
    }

    /// Delivers while it holds the lease, waits for it otherwise, until `shutdown`; then gives
    /// the lease up so another node takes over at once.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let url = self.endpoint.url.clone();
        let label = self.label.clone();
        let mut leased_at: Option<Instant> = None;
        let mut depth_at: Option<Instant> = None;
        while !shutdown.is_cancelled() {
            if leased_at.is_none_or(|t| t.elapsed() >= self.renew_every()) {
                match queue::lease(&self.store, &url, &self.node, self.lease_ms()).await {
                    Ok(true) => {
                        if leased_at.is_none() {
                            info!("this node delivers the endpoint's webhooks");
                        }
                        leased_at = Some(Instant::now());
                    }
                    Ok(false) => {
                        if leased_at.take().is_some() {
                            info!("another node took over the endpoint's webhooks");
                        }
                        self.pause(self.renew_every(), &shutdown).await;
                        continue;
                    }
                    Err(err) => {
                        leased_at = None;
                        debug!(%err, "webhook lease not renewed; retrying");
                        self.pause(self.config.poll_interval, &shutdown).await;
                        continue;
                    }
                }
            }
            if depth_at.is_none_or(|t| t.elapsed() >= DEPTH_EVERY) {
                depth_at = Some(Instant::now());
                if let Ok(n) = queue::depth(&self.store, &url).await {
                    metrics::gauge!(crate::metrics::WEBHOOK_QUEUE_DEPTH, "endpoint" => label.clone())
                        .set(n as f64);
                }
            }
            // Armed before the read, so a delivery queued right after it wakes this one.
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let head = match queue::head(&self.store, &url).await {
                Ok(head) => head,
                Err(err) => {
                    debug!(%err, "webhook queue unreadable; retrying");
                    self.pause(self.config.poll_interval, &shutdown).await;
                    continue;
                }
            };
            let Some(head) = head else {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = &mut notified => {}
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                }
                continue;
            };
            if head.next_attempt_at > head.now {
                let wait = Duration::from_millis(
                    u64::try_from(head.next_attempt_at - head.now).unwrap_or(0),
                );
                self.pause(wait.min(self.renew_every()), &shutdown).await;
                continue;
            }
            let read_at = Instant::now();
            let outcome = self.attempt(&head, &mut leased_at).await;
            let age_ms = head.now - head.ts + crate::locks::millis(read_at.elapsed());
            if !self.record(&head, outcome, age_ms, &label).await {
                // The database did not take the outcome: do not hammer the receiver meanwhile.
                self.pause(self.config.poll_interval, &shutdown).await;
            }
        }
        queue::release(&self.store, &url, &self.node).await;
    }

    async fn pause(&self, wait: Duration, shutdown: &CancellationToken) {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }

    /// Sends the delivery once, renewing the lease while the receiver takes its time.
    async fn attempt(&self, head: &queue::Head, leased_at: &mut Option<Instant>) -> Outcome {
        let body = format!(
            r#"{{"id":{},"ts":{},"events":{}}}"#,
            head.id, head.ts, head.events
        );
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let signature = sign::sign(&self.endpoint.secret, t, body.as_bytes());
        let started = Instant::now();
        let send = self
            .client
            .post(&self.endpoint.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(sign::HEADER, signature)
            .header("lockstep-webhook-id", head.id.to_string())
            .header("lockstep-webhook-attempt", (head.attempts + 1).to_string())
            .body(body)
            .send();
        tokio::pin!(send);
        let result = loop {
            tokio::select! {
                result = &mut send => break result,
                () = tokio::time::sleep(self.renew_every()) => {
                    match queue::lease(&self.store, &self.endpoint.url, &self.node, self.lease_ms()).await {
                        Ok(true) => *leased_at = Some(Instant::now()),
                        Ok(false) => {
                            *leased_at = None;
                            return Outcome::LeaseLost;
                        }
                        // The database did not answer: keep trying while the lease may hold.
                        Err(_) => {}
                    }
                }
            }
        };
        let outcome = match result {
            Ok(mut answer) => {
                let status = answer.status();
                let mut read = 0;
                while read < MAX_ANSWER_BYTES {
                    match answer.chunk().await {
                        Ok(Some(chunk)) => read += chunk.len(),
                        _ => break,
                    }
                }
                if status.is_success() {
                    Outcome::Delivered
                } else {
                    Outcome::Failed(format!("the receiver answered HTTP {}", status.as_u16()))
                }
            }
            // Without the URL: its query may carry a secret.
            Err(err) => Outcome::Failed(err.without_url().to_string()),
        };
        metrics::histogram!(crate::metrics::WEBHOOK_ATTEMPT_SECONDS)
            .record(started.elapsed().as_secs_f64());
        outcome
    }

    /// Records an attempt's outcome: delivered (deleted), retried later, or dead. False when
    /// the database failed.
    async fn record(&self, head: &queue::Head, outcome: Outcome, age_ms: i64, label: &str) -> bool {
        let holder = queue::Holder {
            endpoint: &self.endpoint.url,
            node: &self.node,
        };
        match outcome {
            Outcome::LeaseLost => {
                info!(
                    id = head.id,
                    "lost the endpoint's lease during an attempt; the new holder sends it"
                );
                true
            }
            Outcome::Delivered => {
                metrics::counter!(crate::metrics::WEBHOOK_DELIVERIES, "outcome" => "delivered")
                    .increment(1);
                #[allow(clippy::cast_precision_loss)]
                metrics::histogram!(crate::metrics::WEBHOOK_LAG)
                    .record(age_ms.max(0) as f64 / 1000.0);
                // Deleted even if the lease was lost meanwhile: it did go out.
                match queue::delivered(&self.store, head.id).await {
                    Ok(()) => true,
                    Err(err) => {
                        // It goes out again: the receiver dedupes by id.
                        warn!(%err, id = head.id, "delivered webhook not recorded; it will be sent again");
                        false
                    }
                }
            }
            Outcome::Failed(error) => {
                metrics::counter!(crate::metrics::WEBHOOK_DELIVERIES, "outcome" => "failed")
                    .increment(1);
                let attempts = head.attempts + 1;
                let spent = age_ms >= crate::locks::millis(self.config.retry_for);
                let result = if spent {
                    queue::dead(&self.store, holder, head.id, attempts, &error).await
                } else {
                    let delay = backoff(&self.config, attempts);
                    debug!(id = head.id, attempts, %error, ?delay, "webhook delivery failed; retrying");
                    queue::failed(
                        &self.store,
                        holder,
                        head.id,
                        attempts,
                        crate::locks::millis(delay),
                        &error,
                    )
                    .await
                };
                match result {
                    Ok(true) if spent => {
                        metrics::counter!(crate::metrics::WEBHOOK_DEAD_LETTERS, "endpoint" => label.to_owned())
                            .increment(1);
                        warn!(id = head.id, attempts, %error, "webhook delivery given up: moved to the dead letters");
                        true
                    }
                    Ok(true) => true,
                    Ok(false) => {
                        info!(
                            id = head.id,
                            "lost the endpoint's lease; the new holder records this delivery"
                        );
                        true
                    }
                    Err(err) => {
                        debug!(%err, id = head.id, "webhook failure not recorded; retrying");
                        false
                    }
                }
            }
        }
    }
}

/// The delay before attempt `attempts + 1`: `retry_min` doubled per failed attempt, at most
/// `retry_max`.
fn backoff(config: &WebhookConfig, attempts: i64) -> Duration {
    let doublings = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(0)
        .min(30);
    config
        .retry_min
        .saturating_mul(1 << doublings)
        .min(config.retry_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = WebhookConfig {
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            ..WebhookConfig::default()
        };
        let delays: Vec<u128> = (1..=6).map(|a| backoff(&config, a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff(&config, 1000), Duration::from_secs(1));
    }

    #[test]
    fn labels_keep_scheme_host_and_port_only() {
        assert_eq!(
            label("https://user:pw@hooks.example/in?token=s3cret"),
            "https://hooks.example"
        );
        assert_eq!(
            label("https://hooks.slack.com/services/T000/B000/XXXXsecret"),
            "https://hooks.slack.com"
        );
        assert_eq!(label("http://127.0.0.1:9/a@b/hook"), "http://127.0.0.1:9");
        assert_eq!(label("nonsense"), "(not a URL)");
    }
}
