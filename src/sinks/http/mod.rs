//! The HTTP sink: POSTs each event to a downstream service, optionally re-signed.
//!
//! Only a 2xx counts as delivered. 408, 429, 5xx, 3xx (redirects are not followed) and
//! timeouts are retried, honouring `Retry-After`; any other 4xx is permanent: retrying
//! the same request cannot succeed. A destination that cannot be connected to (refused,
//! unresolvable, connect timeout) is down, not failing this event: the sink pauses and
//! probes again with backoff, and the events wait without using up attempts, as they do
//! for a broker that is down. Its settings are in `config`.

mod config;
mod probe;

use crate::protocol::{EVENT_HEADER, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, SOURCE_HEADER};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};

pub use config::{HttpOptions, HttpSinkConfig};

use super::{BoxFuture, BuildError, Sink, SinkError};
use crate::backoff::Backoff;
use crate::event::Delivery;
use crate::signature::{self, Secret};

/// Bytes of a refusing answer kept for the delivery's last error and its attempt history
/// (which keeps 1 KiB of it).
const SNIPPET_BYTES: usize = 1024;
const USER_AGENT: &str = concat!("vyora-router/", env!("CARGO_PKG_VERSION"));
/// Pauses after connections failed in a row: the first probe soon, then no more often
/// than every 30 s (never longer than `delivery.backoff_max`), so a backlog starts to
/// drain within that of the destination coming back.
const PROBE: Backoff = Backoff::new(Duration::from_millis(400), Duration::from_secs(30));

pub struct HttpSink {
    name: String,
    url: reqwest::Url,
    secret: Option<Secret>,
    concurrency: usize,
    headers: HeaderMap,
    client: reqwest::Client,
    /// Set when the destination asked us to wait (`Retry-After`) or could not be
    /// connected to: until then nothing is sent to it, not only the request that failed.
    pause: Mutex<Pause>,
    /// The longest wait a `Retry-After` or a failed connection can impose
    /// (`delivery.backoff_max`).
    max_pause: Duration,
}

#[derive(Default)]
struct Pause {
    until: Option<Instant>,
    /// Why, for `/readyz`.
    reason: String,
    /// Connections that failed in a row, for the probes' backoff.
    connect_failures: u32,
}

impl HttpSink {
    pub fn new(
        name: &str,
        config: &HttpSinkConfig,
        max_pause: Duration,
    ) -> Result<HttpSink, BuildError> {
        crate::net::install_tls_provider();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(config.concurrency)
            .user_agent(USER_AGENT)
            .build()
            .map_err(|source| BuildError::Http {
                name: name.to_owned(),
                source,
            })?;
        Ok(HttpSink {
            name: name.to_owned(),
            url: config.url.clone(),
            secret: config.secret.clone(),
            concurrency: config.concurrency,
            headers: config.headers.clone(),
            client,
            pause: Mutex::new(Pause::default()),
            max_pause,
        })
    }

    async fn post(&self, d: &Delivery) -> Result<(), SinkError> {
        if let Some((left, reason)) = self.paused() {
            return Err(SinkError::Unavailable {
                reason,
                retry_in: left,
            });
        }
        let mut request = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(EVENT_HEADER, &d.event)
            .header(IDEMPOTENCY_HEADER, &d.dedup_key)
            .header(SOURCE_HEADER, d.source.as_str());
        if let Some(secret) = &self.secret {
            // Over the exact bytes sent, so the receiver verifies with Vyora's own recipe.
            request = request.header(SIGNATURE_HEADER, signature::sign(secret, &d.payload));
        }
        let response = match request.body(d.payload.clone()).send().await {
            Ok(response) => response,
            Err(e) => {
                let unreachable = e.is_connect();
                let reason = crate::net::describe(&e.without_url());
                return Err(if unreachable {
                    self.cannot_connect(reason)
                } else {
                    SinkError::HttpTransport(reason)
                });
            }
        };
        self.connected();
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(crate::net::parse_retry_after)
            .map(|wait| wait.min(self.max_pause));
        if let Some(wait) = retry_after {
            let mut pause = self.lock_pause();
            pause.until = Some(Instant::now() + wait);
            pause.reason = "the destination asked to wait (Retry-After)".into();
        }
        let snippet = snippet(response).await;
        let retryable = status.is_redirection()
            || status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS;
        Err(SinkError::HttpStatus {
            status: status.as_u16(),
            snippet,
            permanent: !retryable,
            retry_after,
        })
    }

    fn lock_pause(&self) -> std::sync::MutexGuard<'_, Pause> {
        self.pause.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How long the pause lasts still, and why, if the sink is paused.
    fn paused(&self) -> Option<(Duration, String)> {
        let pause = self.lock_pause();
        let left = pause.until?.checked_duration_since(Instant::now())?;
        Some((left, pause.reason.clone()))
    }

    /// The request never reached the destination: pause the sink and say so.
    fn cannot_connect(&self, reason: String) -> SinkError {
        let mut pause = self.lock_pause();
        let now = Instant::now();
        if pause.connect_failures > 0 {
            // Requests in flight together fail together: one failure, one step of backoff.
            if let Some(left) = pause
                .until
                .and_then(|until| until.checked_duration_since(now))
            {
                return SinkError::Unavailable {
                    reason: pause.reason.clone(),
                    retry_in: left,
                };
            }
        }
        pause.connect_failures = pause.connect_failures.saturating_add(1);
        let wait = PROBE
            .equal_jitter(pause.connect_failures)
            .min(self.max_pause);
        let reason = format!("cannot connect: {reason}");
        // Said at the 1st, 2nd, 4th, 8th ... failure: an outage of hours is a few lines.
        if pause.connect_failures.is_power_of_two() {
            tracing::warn!(sink = %self.name, failures = pause.connect_failures, retry_in = ?wait, reason, "the destination is down; deliveries wait");
        }
        pause.until = Some(now + wait);
        pause.reason.clone_from(&reason);
        SinkError::Unavailable {
            reason,
            retry_in: wait,
        }
    }

    /// The destination answered: the next failed connection starts the probes over.
    fn connected(&self) {
        let mut pause = self.lock_pause();
        if pause.connect_failures > 0 {
            tracing::info!(sink = %self.name, "the destination is reachable again");
            pause.connect_failures = 0;
        }
    }
}

/// The start of the answer body, read no further than [`SNIPPET_BYTES`].
async fn snippet(mut response: reqwest::Response) -> String {
    let mut kept = Vec::new();
    while kept.len() < SNIPPET_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                kept.extend_from_slice(&chunk[..chunk.len().min(SNIPPET_BYTES - kept.len())])
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

impl Sink for HttpSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn concurrency(&self) -> usize {
        self.concurrency
    }

    fn unready(&self) -> Option<String> {
        self.paused()
            .map(|(left, reason)| format!("paused for {}s more: {reason}", left.as_secs() + 1))
    }

    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(async move {
            let mut results = Vec::with_capacity(batch.len());
            for d in batch {
                results.push(self.post(d).await);
            }
            results
        })
    }
}
