//! Messages the broker hands back (`basic.return`: a `mandatory` message that no queue
//! took): the cause a delivery records, and the sink's readiness while they keep coming.
//!
//! Only the exchange, the routing key and the broker's reply code and text are kept: never
//! the returned message's body or headers, which are the caller's personal data.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;

/// RabbitMQ's reply code for a message that no queue is bound to receive.
const NO_ROUTE: u16 = 312;
/// Routing keys remembered at most (a key made with `{call_id}` is one per call).
const KEYS: usize = 64;
/// Returned deliveries are tried again after 0.5 s, doubling up to 15 s while messages keep
/// coming back: once a queue is bound the backlog starts draining within seconds, and an
/// exchange that nobody listens to costs the broker one batch every 15 s.
const RETRY: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(15));
/// A routing key not returned again for this long is forgotten: its deliveries are no
/// longer tried (dead, or the sink was reconfigured). Several times `RETRY`'s cap, so a key
/// that is still unroutable is returned again well before.
const FORGET: Duration = Duration::from_secs(60);

/// Why the broker returned a message, for the delivery's last error and for readiness.
pub(super) fn cause(
    reply_code: u16,
    reply_text: &str,
    exchange: &str,
    routing_key: &str,
) -> String {
    if reply_code == NO_ROUTE {
        format!(
            "returned by the broker: {reply_code} {reply_text}: no queue bound to exchange {exchange:?} for routing key {routing_key:?}"
        )
    } else {
        format!(
            "returned by the broker: {reply_code} {reply_text}: exchange {exchange:?}, routing key {routing_key:?}"
        )
    }
}

/// The routing keys whose messages come back, and for how long deliveries wait.
#[derive(Default)]
pub(super) struct Returns {
    /// Routing key -> why its messages came back, and when last.
    keys: HashMap<String, Returned>,
    /// Batches in a row that had messages returned again: the retry's backoff.
    streak: u32,
}

struct Returned {
    cause: String,
    at: Instant,
}

impl Returns {
    /// Records a message returned with `routing_key`. True when that key was not known to
    /// be unroutable: the start of a problem, worth a warning.
    pub(super) fn returned(&mut self, routing_key: &str, cause: String, now: Instant) -> bool {
        self.forget_old(now);
        let new = !self.keys.contains_key(routing_key);
        if new
            && self.keys.len() >= KEYS
            && let Some(oldest) = self
                .keys
                .iter()
                .min_by_key(|(_, r)| r.at)
                .map(|(k, _)| k.clone())
        {
            self.keys.remove(&oldest);
        }
        self.keys
            .insert(routing_key.to_owned(), Returned { cause, at: now });
        new
    }

    /// A message with `routing_key` reached a queue. True when that key had been returned:
    /// the end of a problem.
    pub(super) fn routed(&mut self, routing_key: &str) -> bool {
        let known = self.keys.remove(routing_key).is_some();
        if self.keys.is_empty() {
            self.streak = 0;
        }
        known
    }

    /// How long a batch's returned deliveries wait before they are tried again; each call
    /// is one more batch in the streak.
    pub(super) fn wait(&mut self) -> Duration {
        self.streak = self.streak.saturating_add(1);
        RETRY.equal_jitter(self.streak)
    }

    /// The most recent cause, and how many other routing keys come back too; `None` once
    /// every returned key has been routed (or forgotten).
    pub(super) fn reason(&mut self, now: Instant) -> Option<String> {
        self.forget_old(now);
        let latest = self.keys.values().max_by_key(|r| r.at)?;
        Some(match self.keys.len() - 1 {
            0 => latest.cause.clone(),
            1 => format!("{}; and 1 other routing key", latest.cause),
            n => format!("{}; and {n} other routing keys", latest.cause),
        })
    }

    fn forget_old(&mut self, now: Instant) {
        self.keys
            .retain(|_, r| now.saturating_duration_since(r.at) < FORGET);
        if self.keys.is_empty() {
            self.streak = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_route(key: &str) -> String {
        cause(312, "NO_ROUTE", "vyora", key)
    }

    #[test]
    fn the_cause_names_the_exchange_and_the_routing_key() {
        assert_eq!(
            no_route("vyora.call_completed"),
            r#"returned by the broker: 312 NO_ROUTE: no queue bound to exchange "vyora" for routing key "vyora.call_completed""#
        );
        assert_eq!(
            cause(313, "NO_CONSUMERS", "x", "k"),
            r#"returned by the broker: 313 NO_CONSUMERS: exchange "x", routing key "k""#
        );
    }

    #[test]
    fn readiness_names_the_cause_until_the_routing_key_is_routed_again() {
        let mut r = Returns::default();
        let now = Instant::now();
        assert_eq!(r.reason(now), None);
        assert!(r.returned("vyora.a", no_route("vyora.a"), now));
        assert!(!r.returned("vyora.a", no_route("vyora.a"), now), "known");
        assert_eq!(r.reason(now), Some(no_route("vyora.a")));
        assert!(r.returned("vyora.b", no_route("vyora.b"), now + Duration::from_secs(1)));
        assert_eq!(
            r.reason(now + Duration::from_secs(1)),
            Some(format!("{}; and 1 other routing key", no_route("vyora.b")))
        );
        assert!(r.routed("vyora.b"));
        assert!(!r.routed("vyora.c"), "never returned");
        assert_eq!(r.reason(now), Some(no_route("vyora.a")));
        assert!(r.routed("vyora.a"));
        assert_eq!(r.reason(now), None);
    }

    #[test]
    fn the_wait_grows_while_messages_come_back_and_starts_over_once_all_are_routed() {
        let mut r = Returns::default();
        r.returned("k", no_route("k"), Instant::now());
        let waits: Vec<Duration> = (0..10).map(|_| r.wait()).collect();
        assert!(waits[0] <= RETRY.initial, "{waits:?}");
        assert!(
            waits[9] >= RETRY.max / 2 && waits[9] <= RETRY.max,
            "{waits:?}"
        );
        r.routed("k");
        assert!(r.wait() <= RETRY.initial);
    }

    #[test]
    fn a_key_not_returned_for_a_minute_is_forgotten_and_at_most_64_are_kept() {
        let mut r = Returns::default();
        let start = Instant::now();
        r.returned("old", no_route("old"), start);
        assert_eq!(r.reason(start + FORGET), None, "forgotten");

        for n in 0..100u64 {
            let key = format!("call-{n}");
            r.returned(&key, no_route(&key), start + Duration::from_millis(n));
        }
        assert_eq!(r.keys.len(), KEYS);
        assert!(r.keys.contains_key("call-99") && !r.keys.contains_key("call-0"));
        assert_eq!(
            r.reason(start + Duration::from_millis(100)),
            Some(format!(
                "{}; and 63 other routing keys",
                no_route("call-99")
            ))
        );
    }
}
