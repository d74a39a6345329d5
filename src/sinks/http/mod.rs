//! The HTTP sink: POSTs each event to a downstream service, optionally re-signed.
//!
//! Only a 2xx counts as delivered. 408, 429, 5xx, 3xx (redirects are not followed),
//! timeouts and connection errors are retried, honouring `Retry-After`; any other 4xx
//! is permanent: retrying the same request cannot succeed. Its settings are in `config`.

mod config;

use crate::protocol::{EVENT_HEADER, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, SOURCE_HEADER};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};

pub use config::{HttpOptions, HttpSinkConfig};

use super::{BoxFuture, BuildError, Sink, SinkError};
use crate::event::Delivery;
use crate::signature::{self, Secret};

/// Bytes of a refusing answer kept for the dead row's last error.
const SNIPPET_BYTES: usize = 512;
const USER_AGENT: &str = concat!("vyora-router/", env!("CARGO_PKG_VERSION"));

pub struct HttpSink {
    name: String,
    url: reqwest::Url,
    secret: Option<Secret>,
    concurrency: usize,
    headers: HeaderMap,
    client: reqwest::Client,
    /// Set when the destination asked us to wait (`Retry-After`): until then nothing is
    /// sent to it, not only the request that got the answer.
    paused_until: Mutex<Option<Instant>>,
    /// The longest wait a `Retry-After` can impose (`delivery.backoff_max`).
    max_pause: Duration,
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
            paused_until: Mutex::new(None),
            max_pause,
        })
    }

    async fn post(&self, d: &Delivery) -> Result<(), SinkError> {
        let paused = *self
            .paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(until) = paused.filter(|u| *u > Instant::now()) {
            return Err(SinkError::Unavailable {
                reason: "the destination asked to wait (Retry-After)".into(),
                retry_in: until - Instant::now(),
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
        let response = request
            .body(d.payload.clone())
            .send()
            .await
            .map_err(|e| SinkError::HttpTransport(crate::net::describe(&e.without_url())))?;
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
            *self
                .paused_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + wait);
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
        let paused = *self
            .paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        paused
            .and_then(|until| until.checked_duration_since(Instant::now()))
            .map(|left| {
                format!(
                    "paused for {}s more: the destination asked to wait (Retry-After)",
                    left.as_secs() + 1
                )
            })
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
