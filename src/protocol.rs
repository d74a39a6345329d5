//! Vyora's wire protocol as the router speaks it: header names, the lifecycle's event
//! names, and the paths the router answers itself. Known in one place so that the server,
//! the sinks and the config cannot disagree.

/// The HMAC-SHA256 signature of the raw body: `sha256=<hex>`.
pub const SIGNATURE_HEADER: &str = "x-vyora-signature";
/// The event's name, unsigned: never trusted over the signed body.
pub const EVENT_HEADER: &str = "x-vyora-event";
/// Where a forwarded event came from: `webhook` or `poll`.
pub const SOURCE_HEADER: &str = "x-vyora-source";
/// The call a forwarded event belongs to (AMQP messages).
pub const CALL_ID_HEADER: &str = "x-vyora-call-id";
/// `<call_id>:<event>` on every HTTP delivery, for the receiver's own deduplication.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

pub const CALL_STARTED: &str = "call_started";
pub const CALL_COMPLETED: &str = "call_completed";
/// The last event of a call, with its transcript and analysis; the poller recovers it.
pub const ALL_PROCESSING_COMPLETED: &str = "all_processing_completed";
/// The events Vyora documents, in the order a call produces them: the names a sink's
/// `events` may use (besides `*` and the names a config declares in
/// `webhook.extra_events`).
pub const LIFECYCLE: [&str; 3] = [CALL_STARTED, CALL_COMPLETED, ALL_PROCESSING_COMPLETED];

/// An event name as a metric label: one of the events Vyora documents, or `other`. Other
/// names are routed like these, but no sender may create label values at will.
pub fn label(name: &str) -> &'static str {
    LIFECYCLE
        .into_iter()
        .find(|known| *known == name)
        .unwrap_or("other")
}

pub const HEALTH_PATH: &str = "/healthz";
pub const READY_PATH: &str = "/readyz";
pub const METRICS_PATH: &str = "/metrics";
/// Paths the router answers itself on one listener or the other; the webhook path may be
/// none of them.
pub const RESERVED_PATHS: [&str; 3] = [HEALTH_PATH, READY_PATH, METRICS_PATH];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_documented_event_names_become_metric_labels() {
        assert_eq!(label("call_completed"), "call_completed");
        assert_eq!(label("made_up_by_a_sender"), "other");
    }
}
