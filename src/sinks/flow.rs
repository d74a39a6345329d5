//! A sink's flow settings, whatever its kind: how fast it may be sent to
//! (`rate_limit`) and when to stop trying a destination that keeps failing
//! (`circuit_breaker`). The dispatcher applies them (`dispatch::flow`).

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use crate::config::error::{self, Invalid, InvalidAt as _};

/// At most `count` deliveries per `per`, evenly spaced (no burst): a quota of "600/min"
/// sends one every 100 ms, as a downstream's quota expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: NonZeroU32,
    pub per: Duration,
}

impl RateLimit {
    /// `"100/s"`, `"600/min"`, `"3600/h"`.
    pub fn parse(value: &str) -> Result<RateLimit, Invalid> {
        let refuse = || {
            Invalid::new(
                value,
                "expected a number of deliveries per second, minute or hour, like \"100/s\" or \"600/min\"",
            )
        };
        let (count, unit) = value.split_once('/').ok_or_else(refuse)?;
        let count: NonZeroU32 = count.trim().parse().map_err(|_| refuse())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(refuse()),
        };
        Ok(RateLimit { count, per })
    }

    /// The time between two deliveries.
    pub fn interval(&self) -> Duration {
        self.per / self.count.get()
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// After `failures` failed attempts in a row (none delivered between), the sink stops
/// trying for `cool_down`, then sends one delivery as a probe: delivered, it closes
/// again; failed, it stays open another `cool_down`. `failures = 0` turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breaker {
    pub failures: u32,
    pub cool_down: Duration,
}

impl Breaker {
    pub const DEFAULT_FAILURES: u32 = 20;
    pub const DEFAULT_COOL_DOWN: &str = "30s";

    pub fn parse(failures: u32, cool_down: &str) -> Result<Breaker, Invalid> {
        Ok(Breaker {
            failures,
            cool_down: error::duration(cool_down).under("cool_down")?,
        })
    }

    pub fn is_on(&self) -> bool {
        self.failures > 0
    }
}

/// Both, as one sink's table sets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub rate_limit: Option<RateLimit>,
    pub breaker: Breaker,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limit_is_a_count_per_second_minute_or_hour() {
        let limit = RateLimit::parse("600/min").expect("valid");
        assert_eq!(limit.interval(), Duration::from_millis(100));
        assert_eq!(limit.to_string(), "600/min");
        assert_eq!(
            RateLimit::parse("100/s").expect("valid").interval(),
            Duration::from_millis(10)
        );
        for bad in ["100", "0/s", "-1/s", "100/day", "fast"] {
            let e = RateLimit::parse(bad).expect_err(bad);
            assert!(e.reason.contains("\"100/s\""), "{bad}: {e}");
        }
    }

    #[test]
    fn a_breaker_needs_a_cool_down_longer_than_zero_and_zero_failures_turn_it_off() {
        assert!(!Breaker::parse(0, "30s").expect("valid").is_on());
        let e = Breaker::parse(5, "0s").expect_err("zero cool-down");
        assert_eq!(e.key.as_deref(), Some("cool_down"));
    }
}
