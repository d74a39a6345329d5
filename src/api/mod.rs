//! Vyora's REST API: the client the poller and the `calls` / `agents` commands share.
//!
//! - `config`: the `[api]` table, its checks and the secret [`ApiKey`].
//! - `limiter`: the [`RateLimiter`] every request passes through.

mod config;
mod limiter;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::StatusCode;
use reqwest::header::RETRY_AFTER;
use serde::Deserialize;
use tokio::time::Instant;

pub use config::{API_KEY_ENV, ApiConfig, ApiKey, ApiOptions};
pub use limiter::{BUDGET_MARGIN, RateLimiter};

use crate::backoff::Backoff;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the API key was refused ({0}); check api.api_key or VYORA_API_KEY")]
    Unauthorized(u16),
    #[error("not found")]
    NotFound,
    /// `retry_after`: the server's `Retry-After`, capped at [`MAX_API_WAIT`].
    #[error("rate limited (429)")]
    RateLimited { retry_after: Option<Duration> },
    #[error("the API answered {status}")]
    Status { status: u16 },
    #[error("request failed: {0}")]
    Transport(String),
    #[error("the answer is not the JSON expected: {0}")]
    Decode(serde_json::Error),
    #[error("cannot set up the HTTP client: {0}")]
    Client(reqwest::Error),
    #[error("no API key: set api.api_key in the config or the VYORA_API_KEY environment variable")]
    NoKey,
    #[error("the answer is larger than {limit} bytes")]
    TooLarge { limit: usize },
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct Agent {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub language: Option<String>,
    #[serde(default)]
    pub agent_type: Option<String>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
pub struct AgentList {
    pub agents: Vec<Agent>,
    #[serde(default)]
    pub total: Option<u64>,
    #[serde(default)]
    pub limit: Option<u64>,
    #[serde(default)]
    pub offset: Option<u64>,
}

/// Backoff after a 429 without `Retry-After`: 1 s, 2 s, 4 s ... as Vyora advises, capped.
const THROTTLED: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
/// The longest the API may make us wait: a `Retry-After` of years (or one that would
/// overflow the clock) pauses polling for this long, not forever.
pub const MAX_API_WAIT: Duration = Duration::from_secs(600);
/// The largest answer read: a call record is a few KiB, and the poller must not be made
/// to buffer whatever a broken or hostile server sends.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How long to pause everyone after a 429: the server's `Retry-After` if it gave one,
/// else the backoff for the `throttled`-th 429 in a row; never more than [`MAX_API_WAIT`].
fn wait_after_429(retry_after: Option<Duration>, throttled: u32) -> Duration {
    retry_after
        .unwrap_or_else(|| THROTTLED.ceiling(throttled.saturating_add(1)))
        .min(MAX_API_WAIT)
}

/// `now + wait` for a wait the server chose, capped, and without the panic that
/// `Instant + Duration` has on overflow (a clock that cannot hold even the cap gets no
/// pause rather than a dead poller).
fn deadline(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait.min(MAX_API_WAIT)).unwrap_or(now)
}

/// Reads a body of at most `limit` bytes, refusing a larger one by its `Content-Length`
/// before reading and otherwise as soon as the chunks read pass the limit.
async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = ApiError::TooLarge { limit };
    if response
        .content_length()
        .is_some_and(|n| u64::try_from(limit).is_ok_and(|limit| n > limit))
    {
        return Err(too_large);
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| ApiError::Transport(crate::net::describe(&e.without_url())))?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

pub struct Client {
    http: reqwest::Client,
    base: reqwest::Url,
    key: ApiKey,
    limiter: Arc<RateLimiter>,
    /// Consecutive 429s, for the backoff when no `Retry-After` is given.
    throttled: std::sync::atomic::AtomicU32,
    metrics: Option<Arc<Metrics>>,
}

impl Client {
    pub fn new(config: &ApiConfig, limiter: Arc<RateLimiter>) -> Result<Client, ApiError> {
        let key = config.api_key.clone().ok_or(ApiError::NoKey)?;
        crate::net::install_tls_provider();
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("vyora-router/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ApiError::Client)?;
        Ok(Client {
            http,
            base: config.base_url.clone(),
            key,
            limiter,
            throttled: std::sync::atomic::AtomicU32::new(0),
            metrics: None,
        })
    }

    /// Counts requests by status and rate-limit waits.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Client {
        self.metrics = Some(metrics);
        self
    }

    fn count(&self, status: &str) {
        if let Some(m) = &self.metrics {
            m.poller_request(status);
        }
    }

    fn url(&self, path: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().extend(path);
        }
        url
    }

    /// One rate-limited GET; maps statuses to errors and 429s to a pause for everyone.
    async fn get(&self, url: reqwest::Url) -> Result<Bytes, ApiError> {
        let waited = self.limiter.acquire().await;
        if let Some(m) = &self.metrics
            && !waited.is_zero()
        {
            m.rate_limit_waits.inc();
        }
        let response = match self
            .http
            .get(url)
            .header("x-api-key", self.key.0.clone())
            .send()
            .await
        {
            Ok(response) => response,
            Err(e) => {
                self.count("error");
                return Err(ApiError::Transport(crate::net::describe(&e.without_url())));
            }
        };
        let status = response.status();
        self.count(status.as_str());
        if status == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(crate::net::parse_retry_after);
            let n = self
                .throttled
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let wait = wait_after_429(retry_after, n);
            self.limiter
                .pause_until(deadline(Instant::now(), wait))
                .await;
            return Err(ApiError::RateLimited {
                retry_after: retry_after.map(|_| wait),
            });
        }
        self.throttled
            .store(0, std::sync::atomic::Ordering::Relaxed);
        match status {
            s if s.is_success() => read_limited(response, MAX_BODY_BYTES).await,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(ApiError::Unauthorized(status.as_u16()))
            }
            StatusCode::NOT_FOUND => Err(ApiError::NotFound),
            other => Err(ApiError::Status {
                status: other.as_u16(),
            }),
        }
    }

    /// The rate limit every request of this client keeps: `limit` in any `window`.
    pub fn budget(&self) -> (usize, Duration) {
        self.limiter.budget()
    }

    /// `GET /v1/calls/{call_id}`: the raw call record.
    pub async fn call(&self, call_id: &str) -> Result<Bytes, ApiError> {
        self.get(self.url(&["v1", "calls", call_id])).await
    }

    /// `GET /v1/agents`.
    pub async fn agents(
        &self,
        limit: Option<u64>,
        offset: Option<u64>,
    ) -> Result<AgentList, ApiError> {
        let mut url = self.url(&["v1", "agents"]);
        {
            let mut query = url.query_pairs_mut();
            if let Some(limit) = limit {
                query.append_pair("limit", &limit.to_string());
            }
            if let Some(offset) = offset {
                query.append_pair("offset", &offset.to_string());
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        let body = self.get(url).await?;
        serde_json::from_slice(&body).map_err(ApiError::Decode)
    }
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_huge_retry_after_is_capped_and_never_panics() {
        // Fits a u64 of seconds, but no clock can add it to now.
        let huge = crate::net::parse_retry_after(&HeaderValue::from_static("10000000000000000000"));
        assert_eq!(huge, Some(Duration::from_secs(10_000_000_000_000_000_000)));
        let wait = wait_after_429(huge, 0);
        assert_eq!(wait, MAX_API_WAIT);
        let limiter = RateLimiter::new(60, Duration::from_secs(60));
        let start = Instant::now();
        limiter.pause_until(deadline(start, wait)).await;
        limiter.acquire().await;
        assert_eq!(Instant::now() - start, MAX_API_WAIT);
        // The deadline itself caps what it is given, so no caller can overflow it.
        assert_eq!(deadline(start, Duration::MAX), start + MAX_API_WAIT);
    }

    #[test]
    fn without_retry_after_the_wait_doubles_up_to_a_minute() {
        let waits: Vec<u64> = (0..8).map(|n| wait_after_429(None, n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(wait_after_429(None, u32::MAX), THROTTLED.max);
    }

    /// A one-request HTTP server answering `head` and then `body_len` bytes, then closing.
    async fn answer_once(head: &'static str, body_len: usize) -> ApiConfig {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let _ = stream.write_all(head.as_bytes()).await;
                // The client may hang up early: that is what is tested.
                let _ = stream.write_all(&vec![b'x'; body_len]).await;
            }
        });
        ApiConfig {
            base_url: reqwest::Url::parse(&format!("http://{addr}/")).expect("url"),
            api_key: ApiKey::new("vya_test"),
            requests_per_minute: 60,
            timeout: Duration::from_secs(10),
        }
    }

    async fn get_call(config: &ApiConfig) -> Result<Bytes, ApiError> {
        let limiter = Arc::new(RateLimiter::new(60, Duration::from_secs(60)));
        Client::new(config, limiter)?.call("call-1").await
    }

    #[tokio::test]
    async fn an_answer_over_a_mebibyte_is_refused_whether_or_not_its_length_is_announced() {
        const TWO_MIB: usize = 2 * 1024 * 1024;
        // Only the head is sent: refused by its length, before any body is read (reading
        // would fail on the missing body instead).
        let announced = answer_once(
            "HTTP/1.1 200 OK\r\ncontent-length: 2097152\r\nconnection: close\r\n\r\n",
            0,
        )
        .await;
        let result = get_call(&announced).await;
        assert!(
            matches!(
                result,
                Err(ApiError::TooLarge {
                    limit: MAX_BODY_BYTES
                })
            ),
            "{result:?}"
        );

        // No length: read until the server closes, so only counting stops it.
        let unannounced =
            answer_once("HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n", TWO_MIB).await;
        let result = get_call(&unannounced).await;
        assert!(
            matches!(
                result,
                Err(ApiError::TooLarge {
                    limit: MAX_BODY_BYTES
                })
            ),
            "{result:?}"
        );

        // And a body of exactly the limit is read whole.
        let at_limit = answer_once(
            "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n",
            MAX_BODY_BYTES,
        )
        .await;
        let body = get_call(&at_limit).await.expect("a body at the limit");
        assert_eq!(body.len(), MAX_BODY_BYTES);
    }
}
