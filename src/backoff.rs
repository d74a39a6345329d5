//! Capped exponential backoff, the one schedule every retry loop uses: deliveries, broker
//! reconnects, the API after a 429, and poller restarts.

use std::time::Duration;

/// Waits of `initial * 2^(n-1)` after the `n`-th failure in a row, never above `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { initial, max }
    }

    /// The wait after the `failures`-th failure in a row (the first failure waits
    /// `initial`), without jitter.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// Uniform in `[0, ceiling]` ("full jitter"): many rows failing together (a sink that
    /// went down) do not all come back at the same instant.
    pub fn full_jitter(&self, failures: u32) -> Duration {
        self.ceiling(failures).mul_f64(fastrand::f64())
    }

    /// Uniform in `[ceiling / 2, ceiling]`: spread out, yet never much sooner than the
    /// schedule (reconnecting to one broker from many routers).
    pub fn equal_jitter(&self, failures: u32) -> Duration {
        self.ceiling(failures).mul_f64(0.5 + fastrand::f64() / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_doubles_up_to_its_cap_and_jitter_stays_below_the_ceiling() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        assert_eq!(b.ceiling(0), Duration::from_secs(1));
        assert_eq!(b.ceiling(1), Duration::from_secs(1));
        assert_eq!(b.ceiling(4), Duration::from_secs(8));
        assert_eq!(b.ceiling(40), Duration::from_secs(300));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(300));
        for failures in 1..20 {
            assert!(b.full_jitter(failures) <= b.ceiling(failures));
            let equal = b.equal_jitter(failures);
            assert!(equal <= b.ceiling(failures) && equal >= b.ceiling(failures) / 2);
        }
    }
}
