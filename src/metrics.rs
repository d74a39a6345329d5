//! Prometheus metrics, served at `GET /metrics` in the OpenMetrics text format.
//!
//! Counters and histograms are updated where things happen; the backlog gauges are set by
//! a background task that reads the store (the app's), so a scrape never runs a query and
//! a large backlog never slows the request path. A leaf: it knows nothing of the crate.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

type Labels1 = [(&'static str, String); 1];
type Labels2 = [(&'static str, String); 2];

/// Every metric the router exposes; registered once, updated where things happen.
pub struct Metrics {
    /// What `encode` writes out; every family below is registered in it.
    registry: Registry,
    /// Webhooks by (documented) event name and outcome.
    webhooks: Family<Labels2, Counter>,
    /// Which configured secret verified: an old one that stops counting can go.
    secret_verified: Family<Labels1, Counter>,
    /// Accepted without the age check (no readable timestamp).
    without_timestamp: Family<Labels1, Counter>,
    /// Request start to answer, for webhooks.
    pub ack_latency: Histogram,
    /// One group commit of the store.
    pub commit_latency: Histogram,
    /// Delivery attempts by sink and outcome.
    deliveries: Family<Labels2, Counter>,
    /// The backlog per sink, set from the store every few seconds.
    pending: Family<Labels1, Gauge>,
    dead: Family<Labels1, Gauge>,
    oldest_pending_age: Family<Labels1, Gauge<f64, AtomicU64>>,
    /// Whether each sink can deliver now (connected, not paused).
    sink_ready: Family<Labels1, Gauge>,
    /// Whether each sink's circuit breaker is open.
    circuit_open: Family<Labels1, Gauge>,
    /// Time deliveries waited for their sink's rate limit.
    rate_limited: Family<Labels1, Counter<f64, AtomicU64>>,
    /// Whether `/readyz` would answer 200, as of the last scrape or refresh.
    ready: Gauge,
    /// Requests to Vyora's API by status.
    poller_requests: Family<Labels1, Counter>,
    pub rate_limit_waits: Counter,
    pub calls_tracked: Gauge,
    pub poller_gave_up: Counter,
    pub poller_restarts: Counter,
    pub quarantine_dropped: Counter,
    quarantine_bytes: Gauge,
    /// `store.quarantine_max_bytes`, so an alert can use a ratio.
    pub quarantine_max_bytes: Gauge,
    /// Settlements refused because another replica holds the delivery's claim now.
    pub settlements_rejected: Counter,
    /// The sinks whose readiness, and whose backlog, are shown: a sink dropped by a
    /// reload is removed from both, not left frozen at its last value.
    ready_sinks: Mutex<BTreeSet<String>>,
    backlog_sinks: Mutex<BTreeSet<String>>,
    /// Webhooks by outcome alone (in [`WEBHOOK_OUTCOMES`]' order), for the console's plot.
    webhook_outcomes: [AtomicU64; WEBHOOK_OUTCOMES.len()],
}

/// Every outcome a webhook can have; each is created at 0, so the first of its kind
/// after a start already shows as an increase.
const WEBHOOK_OUTCOMES: [&str; 9] = [
    "accepted",
    "duplicate",
    "invalid_signature",
    "bad_request",
    "too_old",
    "too_large",
    "unavailable",
    "overloaded",
    "not_routed",
];
/// Every outcome of a delivery attempt.
const DELIVERY_OUTCOMES: [&str; 4] = ["delivered", "retried", "postponed", "dead"];

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vyora_router");
        let webhooks = Family::<Labels2, Counter>::default();
        registry.register(
            "webhooks_received",
            "Webhooks received, by event and outcome",
            webhooks.clone(),
        );
        let secret_verified = Family::<Labels1, Counter>::default();
        registry.register(
            "webhook_secret_verified",
            "Webhooks verified, by the index of the configured secret that verified them",
            secret_verified.clone(),
        );
        let without_timestamp = Family::<Labels1, Counter>::default();
        registry.register(
            "webhooks_without_timestamp",
            "Verified webhooks accepted without the age check, by reason (missing, unreadable)",
            without_timestamp.clone(),
        );
        // 0.25 ms to ~4 s: acks live well inside Vyora's 5 s.
        let ack_latency = Histogram::new(exponential_buckets(0.000_25, 2.0, 15));
        registry.register_with_unit(
            "ack_latency",
            "Time from a webhook request's start to its answer",
            Unit::Seconds,
            ack_latency.clone(),
        );
        let commit_latency = Histogram::new(exponential_buckets(0.000_1, 2.0, 16));
        registry.register_with_unit(
            "store_commit",
            "Time of one group commit of the store",
            Unit::Seconds,
            commit_latency.clone(),
        );
        let deliveries = Family::<Labels2, Counter>::default();
        registry.register(
            "deliveries",
            "Delivery attempts, by sink and outcome (delivered, retried, postponed, dead)",
            deliveries.clone(),
        );
        let pending = Family::<Labels1, Gauge>::default();
        registry.register(
            "outbox_pending",
            "Deliveries waiting, by sink",
            pending.clone(),
        );
        let dead = Family::<Labels1, Gauge>::default();
        registry.register(
            "outbox_dead",
            "Dead deliveries kept for replay, by sink",
            dead.clone(),
        );
        let oldest_pending_age = Family::<Labels1, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "outbox_oldest_pending_age",
            "Age of the oldest waiting delivery's event, by sink",
            Unit::Seconds,
            oldest_pending_age.clone(),
        );
        let poller_requests = Family::<Labels1, Counter>::default();
        registry.register(
            "poller_requests",
            "Requests to Vyora's API, by HTTP status (or error)",
            poller_requests.clone(),
        );
        let rate_limit_waits = Counter::default();
        registry.register(
            "rate_limit_waits",
            "API requests that had to wait for the rate limit",
            rate_limit_waits.clone(),
        );
        let calls_tracked = Gauge::default();
        registry.register(
            "poller_calls_tracked",
            "Calls waiting for their analysis",
            calls_tracked.clone(),
        );
        let poller_gave_up = Counter::default();
        registry.register(
            "poller_gave_up",
            "Calls whose analysis never came within poller.give_up_after",
            poller_gave_up.clone(),
        );
        let quarantine_dropped = Counter::default();
        registry.register(
            "quarantine_dropped",
            "Quarantined bodies removed to stay within store.quarantine_max_bytes",
            quarantine_dropped.clone(),
        );
        let quarantine_bytes = Gauge::default();
        registry.register_with_unit(
            "quarantine",
            "Bytes of quarantined bodies kept",
            Unit::Bytes,
            quarantine_bytes.clone(),
        );
        let poller_restarts = Counter::default();
        registry.register(
            "poller_restarts",
            "Times the poller stopped unexpectedly and was restarted",
            poller_restarts.clone(),
        );
        let sink_ready = Family::<Labels1, Gauge>::default();
        registry.register(
            "sink_ready",
            "Whether a sink can deliver now: 1 connected and not paused, 0 not",
            sink_ready.clone(),
        );
        let circuit_open = Family::<Labels1, Gauge>::default();
        registry.register(
            "sink_circuit_open",
            "Whether a sink's circuit breaker is open: 1 its deliveries wait without being tried, 0 not",
            circuit_open.clone(),
        );
        let rate_limited = Family::<Labels1, Counter<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "sink_rate_limit_wait",
            "Time deliveries waited for their sink's rate limit",
            Unit::Seconds,
            rate_limited.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "Whether /readyz answers 200: 1 ready, 0 not",
            ready.clone(),
        );
        let quarantine_max_bytes = Gauge::default();
        registry.register_with_unit(
            "quarantine_max",
            "store.quarantine_max_bytes: the most quarantined bodies kept",
            Unit::Bytes,
            quarantine_max_bytes.clone(),
        );
        let settlements_rejected = Counter::default();
        registry.register(
            "settlements_rejected",
            "Delivery outcomes not recorded because the claim had passed to another replica",
            settlements_rejected.clone(),
        );
        let start_time = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "start_time",
            "When this process started, in seconds since the Unix epoch",
            Unit::Seconds,
            start_time.clone(),
        );
        start_time.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        for outcome in WEBHOOK_OUTCOMES {
            webhooks
                .get_or_create(&[
                    ("event", "unknown".to_owned()),
                    ("outcome", outcome.to_owned()),
                ])
                .inc_by(0);
        }
        registry.register(
            "build",
            "The running build",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Metrics {
            registry,
            webhooks,
            secret_verified,
            without_timestamp,
            ack_latency,
            commit_latency,
            deliveries,
            pending,
            dead,
            oldest_pending_age,
            poller_requests,
            rate_limit_waits,
            calls_tracked,
            poller_gave_up,
            quarantine_dropped,
            quarantine_bytes,
            sink_ready,
            circuit_open,
            rate_limited,
            ready,
            quarantine_max_bytes,
            settlements_rejected,
            ready_sinks: Mutex::new(BTreeSet::new()),
            backlog_sinks: Mutex::new(BTreeSet::new()),
            webhook_outcomes: Default::default(),
            poller_restarts,
        }
    }

    pub fn webhook(&self, event: &str, outcome: &'static str) {
        self.webhooks
            .get_or_create(&[("event", event.to_owned()), ("outcome", outcome.to_owned())])
            .inc();
        if let Some(i) = WEBHOOK_OUTCOMES.iter().position(|o| *o == outcome)
            && let Some(count) = self.webhook_outcomes.get(i)
        {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Webhooks so far by outcome, every outcome named.
    pub fn webhook_totals(&self) -> Vec<(&'static str, u64)> {
        WEBHOOK_OUTCOMES
            .iter()
            .zip(&self.webhook_outcomes)
            .map(|(outcome, count)| (*outcome, count.load(Ordering::Relaxed)))
            .collect()
    }

    /// Delivery attempts to `sink` so far with `outcome`.
    pub fn delivery_total(&self, sink: &str, outcome: &str) -> u64 {
        self.deliveries
            .get_or_create(&[("sink", sink.to_owned()), ("outcome", outcome.to_owned())])
            .get()
    }

    pub fn secret_verified(&self, index: usize) {
        self.secret_verified
            .get_or_create(&[("index", index.to_string())])
            .inc();
    }

    pub fn webhook_without_timestamp(&self, reason: &'static str) {
        self.without_timestamp
            .get_or_create(&[("reason", reason.to_owned())])
            .inc();
    }

    /// Creates a sink's delivery series at 0, so its first dead delivery after a start
    /// shows as an increase.
    pub fn sink_added(&self, sink: &str) {
        for outcome in DELIVERY_OUTCOMES {
            self.deliveries
                .get_or_create(&[("sink", sink.to_owned()), ("outcome", outcome.to_owned())])
                .inc_by(0);
        }
    }

    /// A sink's circuit breaker opened (`true`) or closed.
    pub fn circuit(&self, sink: &str, open: bool) {
        self.circuit_open
            .get_or_create(&[("sink", sink.to_owned())])
            .set(i64::from(open));
    }

    /// Deliveries of `sink` waited `waited` for its rate limit.
    pub fn rate_limited(&self, sink: &str, waited: Duration) {
        self.rate_limited
            .get_or_create(&[("sink", sink.to_owned())])
            .inc_by(waited.as_secs_f64());
    }

    /// Whether each running sink can deliver now. A sink no longer running disappears
    /// (after the others are set, so a scrape never sees a running sink missing).
    pub fn set_sinks_ready<'a>(&self, sinks: impl IntoIterator<Item = (&'a str, bool)>) {
        let mut current = BTreeSet::new();
        for (sink, ready) in sinks {
            self.sink_ready
                .get_or_create(&[("sink", sink.to_owned())])
                .set(i64::from(ready));
            current.insert(sink.to_owned());
        }
        let mut shown = self
            .ready_sinks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for gone in shown.difference(&current) {
            let label = [("sink", gone.clone())];
            self.sink_ready.remove(&label);
            self.circuit_open.remove(&label);
            self.rate_limited.remove(&label);
        }
        *shown = current;
    }

    /// The backlog of every running sink: (name, pending, dead, age of the oldest
    /// pending). A sink no longer running disappears, as in [`Metrics::set_sinks_ready`].
    pub fn set_backlogs(&self, backlogs: impl IntoIterator<Item = (String, i64, i64, Duration)>) {
        let mut current = BTreeSet::new();
        for (sink, pending, dead, oldest_age) in backlogs {
            self.set_backlog(&sink, pending, dead, oldest_age);
            current.insert(sink);
        }
        let mut shown = self
            .backlog_sinks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for gone in shown.difference(&current) {
            let label = [("sink", gone.clone())];
            self.pending.remove(&label);
            self.dead.remove(&label);
            self.oldest_pending_age.remove(&label);
        }
        *shown = current;
    }

    /// Whether the router as a whole is ready (what `/readyz` answers).
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Creates the poller's refusal series at 0 (an API key refused is the first of its
    /// kind by nature).
    pub fn poller_started(&self) {
        for status in ["401", "403"] {
            self.poller_requests
                .get_or_create(&[("status", status.to_owned())])
                .inc_by(0);
        }
    }

    pub fn delivery(&self, sink: &str, outcome: &'static str) {
        self.deliveries
            .get_or_create(&[("sink", sink.to_owned()), ("outcome", outcome.to_owned())])
            .inc();
    }

    pub fn poller_request(&self, status: &str) {
        self.poller_requests
            .get_or_create(&[("status", status.to_owned())])
            .inc();
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }

    /// One sink's backlog, as the store last reported it.
    fn set_backlog(&self, sink: &str, pending: i64, dead: i64, oldest_age: Duration) {
        let label = [("sink", sink.to_owned())];
        self.pending.get_or_create(&label).set(pending);
        self.dead.get_or_create(&label).set(dead);
        self.oldest_pending_age
            .get_or_create(&label)
            .set(oldest_age.as_secs_f64());
    }

    pub fn set_quarantine_bytes(&self, bytes: i64) {
        self.quarantine_bytes.set(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_parses_and_names_follow_prometheus_conventions() {
        let m = Metrics::new();
        m.webhook("call_completed", "accepted");
        m.secret_verified(1);
        m.ack_latency.observe(0.002);
        m.delivery("archive", "delivered");
        m.poller_request("200");
        let text = m.encode();
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("parses as Prometheus text");
        let names: Vec<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
        for expected in [
            "vyora_router_webhooks_received_total",
            "vyora_router_webhook_secret_verified_total",
            "vyora_router_ack_latency_seconds",
            "vyora_router_deliveries_total",
            "vyora_router_poller_requests_total",
            "vyora_router_build_info",
            "vyora_router_ready",
            "vyora_router_start_time_seconds",
            "vyora_router_quarantine_max_bytes",
            "vyora_router_settlements_rejected_total",
        ] {
            assert!(
                names.contains(&expected),
                "{expected} missing from:\n{text}"
            );
        }
    }
}
