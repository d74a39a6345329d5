//! The rate limiter every request to Vyora's API waits on: one per process, shared by the
//! poller, so that the API's per-minute limit holds however many calls are being polled.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// At most `limit` requests in any `window` (sliding, not fixed buckets): a request waits
/// until the one sent `limit` requests earlier is a full window (and [`BUDGET_MARGIN`]) old. A
/// token bucket of the same rate would allow twice the limit in the first window after an
/// idle spell.
pub struct RateLimiter {
    limit: usize,
    window: Duration,
    state: Mutex<LimiterState>,
}

/// How long past its window a request still counts. A request reaches the API a little
/// after it is granted here, and not always equally late (a new connection, a busy
/// machine): two requests granted exactly a window apart could arrive less than a window
/// apart, one too many for the API. The PostgreSQL store's shared budget keeps the same
/// margin.
pub const BUDGET_MARGIN: Duration = Duration::from_secs(1);

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

    /// The budget: at most `limit` requests in any `window`.
    pub fn budget(&self) -> (usize, Duration) {
        (self.limit, self.window)
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
                .is_some_and(|t| now.duration_since(*t) >= self.window + BUDGET_MARGIN)
            {
                state.sent.pop_front();
            }
            if state.sent.len() < self.limit {
                state.sent.push_back(now);
                return now - started;
            }
            if let Some(oldest) = state.sent.front().copied() {
                tokio::time::sleep_until(oldest + self.window + BUDGET_MARGIN).await;
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
}
