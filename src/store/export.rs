//! What one store hands another in `store migrate`: its events (payloads as signed) with
//! each sink's delivery state and attempt history, its poll schedule and its quarantine,
//! in plain rows. The
//! engine being read writes them ([`Export`]); the one being filled reads them, so
//! neither knows the other's tables or encodings.

use std::time::SystemTime;

use super::Result;

/// An event as signed, with its deliveries.
#[derive(Debug, Clone)]
pub struct ExportedEvent {
    pub dedup_key: String,
    pub event: String,
    pub call_id: Option<String>,
    pub source: String,
    pub received_at: SystemTime,
    pub payload: Vec<u8>,
    pub deliveries: Vec<ExportedDelivery>,
}

/// One sink's delivery of an event, as it stands.
#[derive(Debug, Clone)]
pub struct ExportedDelivery {
    pub sink: String,
    /// `pending`, `delivered` or `dead`.
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: SystemTime,
    pub last_error: Option<String>,
    pub updated_at: SystemTime,
    /// The attempts kept for it, oldest first.
    pub history: Vec<ExportedAttempt>,
}

/// One kept attempt of a delivery.
#[derive(Debug, Clone)]
pub struct ExportedAttempt {
    pub number: i32,
    pub started_at: SystemTime,
    pub duration_ms: i64,
    /// `delivered`, `retried` or `dead`.
    pub outcome: String,
    pub code: Option<i32>,
    pub error: Option<String>,
    pub response: Option<String>,
}

/// A call the poller tracks.
#[derive(Debug, Clone)]
pub struct ExportedPoll {
    pub call_id: String,
    pub status: String,
    pub first_seen_at: SystemTime,
    pub last_event_at: SystemTime,
    pub next_poll_at: SystemTime,
    pub polls: i32,
    pub last_result: Option<String>,
    pub updated_at: SystemTime,
}

/// A quarantined body.
#[derive(Debug, Clone)]
pub struct ExportedQuarantined {
    pub received_at: SystemTime,
    pub reason: String,
    pub event_header: Option<String>,
    pub body: Vec<u8>,
}

/// A store read out for `store migrate`, events in the order they were stored.
pub trait Export: Send {
    /// The next `limit` events after those already returned; empty at the end.
    fn next_events(&mut self, limit: usize) -> Result<Vec<ExportedEvent>>;
    fn polls(&mut self) -> Result<Vec<ExportedPoll>>;
    fn quarantine(&mut self) -> Result<Vec<ExportedQuarantined>>;
}
