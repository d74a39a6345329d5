//! Vyora's REST API: the client the poller and the `calls` / `agents` commands share, and
//! the rate limiter every request passes through.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{HeaderValue, RETRY_AFTER};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::ApiConfig;
use crate::metrics::Metrics;

/// The API key. Its `Debug` never shows it.
#[derive(Clone)]
pub struct ApiKey(HeaderValue);

impl ApiKey {
    pub fn new(key: &str) -> Option<ApiKey> {
        let mut value = HeaderValue::from_str(key).ok()?;
        value.set_sensitive(true);
        Some(ApiKey(value))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// At most `limit` requests in any `window` (sliding, not fixed buckets): a request waits
/// until the one sent `limit` requests earlier is a full window old. A token bucket of the
/// same rate would allow twice the limit in the first window after an idle spell.
pub struct RateLimiter {
    limit: usize,
    window: Duration,
    state: Mutex<LimiterState>,
}

struct LimiterState {
    sent: VecDeque<Instant>,
    /// Set after a 429: nobody sends before this.
    paused_until: Option<Instant>,
}

impl RateLimiter {
    pub fn new(limit: usize, window: Duration) -> RateLimiter {
        RateLimiter {
            limit: limit.max(1),
            window,
            state: Mutex::new(LimiterState {
                sent: VecDeque::with_capacity(limit),
                paused_until: None,
            }),
        }
    }

    /// Waits for a slot and records the request as sent now. Returns how long it waited.
    pub async fn acquire(&self) -> Duration {
        let started = Instant::now();
        // Holding the lock while waiting keeps callers in arrival order.
        let mut state = self.state.lock().await;
        loop {
            let now = Instant::now();
            if let Some(until) = state.paused_until {
                if now < until {
                    tokio::time::sleep_until(until).await;
                    continue;
                }
                state.paused_until = None;
            }
            while state
                .sent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= self.window)
            {
                state.sent.pop_front();
            }
            if state.sent.len() < self.limit {
                state.sent.push_back(now);
                return now - started;
            }
            if let Some(oldest) = state.sent.front().copied() {
                tokio::time::sleep_until(oldest + self.window).await;
            }
        }
    }

    /// Stops every request until `until` (after the API answered 429).
    pub async fn pause_until(&self, until: Instant) {
        let mut state = self.state.lock().await;
        if state.paused_until.is_none_or(|p| p < until) {
            state.paused_until = Some(until);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the API key was refused ({0}); check api.api_key or VYORA_API_KEY")]
    Unauthorized(u16),
    #[error("not found")]
    NotFound,
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
const BACKOFF_CAP: Duration = Duration::from_secs(60);

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
            let wait = retry_after.unwrap_or_else(|| {
                Duration::from_secs(1)
                    .saturating_mul(2u32.saturating_pow(n.min(16)))
                    .min(BACKOFF_CAP)
            });
            self.limiter.pause_until(Instant::now() + wait).await;
            return Err(ApiError::RateLimited { retry_after });
        }
        self.throttled
            .store(0, std::sync::atomic::Ordering::Relaxed);
        match status {
            s if s.is_success() => response
                .bytes()
                .await
                .map_err(|e| ApiError::Transport(crate::net::describe(&e.without_url()))),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(ApiError::Unauthorized(status.as_u16()))
            }
            StatusCode::NOT_FOUND => Err(ApiError::NotFound),
            other => Err(ApiError::Status {
                status: other.as_u16(),
            }),
        }
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
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_pause_after_429_holds_every_request() {
        let limiter = RateLimiter::new(60, Duration::from_secs(60));
        let start = Instant::now();
        limiter.pause_until(start + Duration::from_secs(4)).await;
        limiter.acquire().await;
        assert!(Instant::now() - start >= Duration::from_secs(4));
    }

    #[test]
    fn the_api_key_never_shows_in_debug_output() {
        let key = ApiKey::new("vya_live_secret").expect("valid");
        assert!(!format!("{key:?}").contains("vya_live_secret"));
    }
}
