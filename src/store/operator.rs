//! What the operator commands (`deliveries`, `events`, `poller status`) ask of a store and
//! get back: plain rows, rendered as tables or JSON by the commands.

use std::time::SystemTime;

use serde::Serialize;

/// A time an operator gives (the commands' `--since`, the console's forms): RFC 3339
/// (`2026-05-24T10:30:00Z`, or without the zone as UTC), or a duration before now (`2h`,
/// `1d 6h`).
pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    if let Ok(at) = humantime::parse_rfc3339_weak(text) {
        return Ok(at);
    }
    humantime::parse_duration(text)
        .ok()
        .and_then(|ago| SystemTime::now().checked_sub(ago))
        .ok_or_else(|| {
            format!("{text:?} is neither an RFC 3339 time (2026-05-24T10:30:00Z) nor a duration ago (2h, 30m)")
        })
}

/// The most rows one page of a list command shows: a page is read whole into memory,
/// on either backend, so `--limit` cannot ask for the whole store at once.
pub const PAGE_MAX: usize = 10_000;

/// A list command's `--limit`: from 1 to [`PAGE_MAX`].
pub fn parse_page_size(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=PAGE_MAX).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} is not a page size from 1 to {PAGE_MAX}")),
    }
}

/// A delivery's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    Dead,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Dead => "dead",
        }
    }
}

/// Which rows `deliveries list` shows.
#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub sink: Option<String>,
    pub status: Option<DeliveryStatus>,
    pub call_id: Option<String>,
    pub limit: usize,
}

/// Which events `events list` shows, newest first.
#[derive(Debug, Default, Clone)]
pub struct EventFilter {
    /// Only events stored before this id: the next page of an earlier list.
    pub before: Option<i64>,
    /// Only events received at or after this.
    pub since: Option<SystemTime>,
    /// Only events received before this.
    pub until: Option<SystemTime>,
    pub event: Option<String>,
    /// Only events routed to this sink (with a delivery in `status` there, if given).
    pub sink: Option<String>,
    /// Only events with a delivery in this status (to `sink`, if given).
    pub status: Option<DeliveryStatus>,
    pub limit: usize,
}

/// A page of `events list`.
#[derive(Debug, Serialize)]
pub struct EventPage {
    pub events: Vec<EventSummary>,
    /// Where the next page starts (`--before`), when there may be more: the list stops
    /// at `limit` events, or after examining a bounded number of stored ones.
    pub next_before: Option<i64>,
}

/// An event as `events list` shows it.
#[derive(Debug, Serialize)]
pub struct EventSummary {
    /// The store's id of the event, which `--before` takes.
    pub id: i64,
    pub key: String,
    pub call_id: Option<String>,
    pub event: String,
    pub source: String,
    pub received_at: String,
    pub deliveries: Vec<SinkStatus>,
}

impl EventFilter {
    /// Whether an event with these deliveries is listed (its own fields already matched).
    pub fn matches(&self, deliveries: &[SinkStatus]) -> bool {
        match (&self.sink, self.status) {
            (None, None) => true,
            (sink, status) => deliveries.iter().any(|d| {
                sink.as_ref().is_none_or(|s| *s == d.sink)
                    && status.is_none_or(|s| s.as_str() == d.status)
            }),
        }
    }
}

/// Which stored events `deliveries backfill` looks at next.
#[derive(Debug, Default, Clone)]
pub struct BackfillFrom {
    /// Events after this id: 0 at first, then the last id of the batch before.
    pub after: i64,
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    pub event: Option<String>,
    /// Events in one batch at most.
    pub limit: usize,
}

/// A stored event as `deliveries backfill` routes it.
#[derive(Debug)]
pub struct Stored {
    pub id: i64,
    pub event: String,
    /// Empty when `store.retention` emptied it: nothing to send.
    pub payload: bytes::Bytes,
}

/// Which rows of a sink `deliveries replay` puts back to pending.
#[derive(Debug, Clone)]
pub enum Replay {
    /// Every delivery in `status` (dead, or delivered to send again) whose event was
    /// received in the range.
    Status {
        status: DeliveryStatus,
        since: Option<SystemTime>,
        until: Option<SystemTime>,
    },
    CallId(String),
    Id(i64),
}

impl Replay {
    /// Every dead delivery.
    pub fn dead() -> Replay {
        Replay::Status {
            status: DeliveryStatus::Dead,
            since: None,
            until: None,
        }
    }

    /// The deliveries chosen, in words: "dead deliveries received since ...".
    pub fn describe(&self) -> String {
        let at = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        match self {
            Replay::Status {
                status,
                since,
                until,
            } => {
                let mut text = format!("{} deliveries", status.as_str());
                match (since, until) {
                    (Some(s), Some(u)) => {
                        text.push_str(&format!(
                            " of events received from {} to {}",
                            at(*s),
                            at(*u)
                        ));
                    }
                    (Some(s), None) => {
                        text.push_str(&format!(" of events received since {}", at(*s)))
                    }
                    (None, Some(u)) => {
                        text.push_str(&format!(" of events received before {}", at(*u)))
                    }
                    (None, None) => {}
                }
                text
            }
            Replay::CallId(call) => format!("deliveries of call {call}"),
            Replay::Id(id) => format!("delivery {id}"),
        }
    }
}

/// Deliveries one replay puts back to pending at most: a larger range is refused, so one
/// command cannot hold the store's writer for long or flood a sink by mistake.
pub const REPLAY_MAX: usize = 100_000;

/// What `deliveries replay` did with the deliveries of the sink that it chose.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Replayed {
    /// Put back to pending, attempts reset.
    pub replayed: usize,
    /// Left as they were: pending already (waiting for their next attempt, or being sent).
    pub already_pending: usize,
    /// Left as they were: `store.retention` emptied the event's payload, so there is
    /// nothing to send again.
    pub payload_gone: usize,
    /// More than [`REPLAY_MAX`] deliveries matched: none was changed.
    #[serde(skip)]
    pub too_many: bool,
    /// `Some` when the store holds no delivery at all for the sink: the sinks it does hold
    /// deliveries for, so that a misspelt name is told from a sink with nothing to replay.
    #[serde(skip)]
    pub other_sinks: Option<Vec<String>>,
}

impl Replayed {
    /// The deliveries of the sink that the selection matched, replayable or not.
    pub fn matched(&self) -> usize {
        self.replayed + self.already_pending + self.payload_gone
    }
}

#[derive(Debug, Serialize)]
pub struct DeliveryRow {
    pub id: i64,
    pub call_id: Option<String>,
    pub event: String,
    pub sink: String,
    pub status: String,
    pub attempts: u32,
    /// RFC 3339, for pending rows only.
    pub next_attempt_at: Option<String>,
    pub last_error: Option<String>,
    /// For pending rows of a sink paused because its destination cannot be reached: until
    /// when (RFC 3339), and why. The row's own attempts and error are left as they are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink_paused: Option<PauseNote>,
}

/// A sink's pause, as `deliveries list` shows it on each of its pending rows.
#[derive(Debug, Clone, Serialize)]
pub struct PauseNote {
    pub until: String,
    pub reason: String,
}

/// A sink that waits because its destination as a whole cannot be reached (a broker
/// down, a host that refuses connections): its deliveries wait without using attempts,
/// so the rows alone would show nothing wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkPause {
    pub sink: String,
    pub until: SystemTime,
    pub reason: String,
}

impl SinkPause {
    /// Notes the pause on each pending row of its sink.
    pub fn mark(pauses: &[SinkPause], rows: &mut [DeliveryRow]) {
        for row in rows.iter_mut().filter(|r| r.status == "pending") {
            if let Some(p) = pauses.iter().find(|p| p.sink == row.sink) {
                row.sink_paused = Some(PauseNote {
                    until: humantime::format_rfc3339_seconds(p.until).to_string(),
                    reason: p.reason.clone(),
                });
            }
        }
    }
}

#[derive(Debug, Serialize)]
pub struct EventRow {
    pub id: String,
    pub event: String,
    pub source: String,
    pub received_at: String,
    pub deliveries: Vec<SinkStatus>,
    /// The payload as signed (empty once `store.retention` emptied it); shown only when
    /// asked for, masked unless revealed.
    #[serde(skip)]
    pub payload: bytes::Bytes,
}

#[derive(Debug, Serialize)]
pub struct SinkStatus {
    pub sink: String,
    pub status: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// The attempts kept in the delivery's history, oldest first (`events show` only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<AttemptRow>,
}

/// One attempt of a delivery's history.
#[derive(Debug, Serialize)]
pub struct AttemptRow {
    /// The attempt's number (a replay starts the count again).
    pub number: u32,
    /// RFC 3339 with milliseconds.
    pub at: String,
    pub duration_ms: u64,
    /// `delivered`, `retried` or `dead`.
    pub outcome: String,
    /// The HTTP status the destination answered.
    pub code: Option<u16>,
    pub error: Option<String>,
    /// The start of the destination's answer.
    pub response: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct PollRow {
    pub call_id: String,
    pub status: String,
    /// RFC 3339, for calls still waiting.
    pub next_poll_at: Option<String>,
    pub polls: u32,
    pub first_seen_at: String,
    pub last_result: Option<String>,
}
