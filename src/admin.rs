//! Operator commands on the store: list deliveries, replay them, show a call's events.
//!
//! They work on the same database while the server runs: reads never block it (WAL), and
//! a replay is one short write transaction that the running dispatchers pick up on their
//! next look at the outbox.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use comfy_table::Table;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use rusqlite::{Connection, OpenFlags, params};
use serde::Serialize;

use crate::store::{self, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Status {
    Pending,
    Delivered,
    Dead,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Delivered => "delivered",
            Status::Dead => "dead",
        }
    }
}

/// Which rows `deliveries list` shows.
#[derive(Debug, Default)]
pub struct ListFilter {
    pub sink: Option<String>,
    pub status: Option<Status>,
    pub call_id: Option<String>,
    pub limit: usize,
}

/// Which rows of a sink `deliveries replay` puts back to pending.
#[derive(Debug)]
pub enum Replay {
    Dead,
    CallId(String),
    Id(i64),
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
}

#[derive(Debug, Serialize)]
pub struct EventRow {
    pub id: String,
    pub event: String,
    pub source: String,
    pub received_at: String,
    pub deliveries: Vec<SinkStatus>,
}

#[derive(Debug, Serialize)]
pub struct SinkStatus {
    pub sink: String,
    pub status: String,
    pub attempts: u32,
    pub last_error: Option<String>,
}

fn rfc3339(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Opens an existing store; a wrong path is an error, not a new empty database.
pub fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

pub fn list(conn: &Connection, filter: &ListFilter) -> Result<Vec<DeliveryRow>, StoreError> {
    // With a call, its few events are found by their keys; without, the newest rows.
    let (from, call) = if filter.call_id.is_some() {
        ("events e CROSS JOIN outbox o", store::same_call("e", "?3"))
    } else {
        ("outbox o JOIN events e", "?3 IS NULL".to_owned())
    };
    let mut stmt = conn.prepare(&format!(
        "SELECT o.id, e.call_id, e.event, o.sink, o.status, o.attempts, o.next_attempt_at, o.last_error
         FROM {from} ON e.id = o.event_id
         WHERE (?1 IS NULL OR o.sink = ?1) AND (?2 IS NULL OR o.status = ?2) AND {call}
         ORDER BY o.id DESC LIMIT ?4"
    ))?;
    let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
    let rows = stmt.query_map(
        params![
            filter.sink,
            filter.status.map(Status::as_str),
            filter.call_id,
            limit
        ],
        |r| {
            let status: String = r.get(4)?;
            let next: i64 = r.get(6)?;
            Ok(DeliveryRow {
                id: r.get(0)?,
                call_id: r.get(1)?,
                event: r.get(2)?,
                sink: r.get(3)?,
                next_attempt_at: (status == "pending").then(|| rfc3339(next)),
                status,
                attempts: r.get(5)?,
                last_error: r.get(7)?,
            })
        },
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Puts the chosen rows of `sink` back to pending with their attempts reset; returns how
/// many. Rows already pending are left as they are.
pub fn replay(conn: &Connection, sink: &str, which: &Replay) -> Result<usize, StoreError> {
    let now = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(i64::MAX);
    // An event whose payload retention has emptied cannot be sent again.
    let reset = "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = ?2,
                 last_error = NULL, updated_at = ?2
                 WHERE sink = ?1 AND status != 'pending'
                   AND event_id IN (SELECT id FROM events WHERE length(payload) > 0)";
    let changed = match which {
        Replay::Dead => {
            conn.execute(&format!("{reset} AND status = 'dead'"), params![sink, now])?
        }
        Replay::CallId(call) => conn.execute(
            &format!(
                "{reset} AND event_id IN (SELECT e.id FROM events e WHERE {})",
                store::same_call("e", "?3")
            ),
            params![sink, now, call],
        )?,
        Replay::Id(id) => conn.execute(&format!("{reset} AND id = ?3"), params![sink, now, id])?,
    };
    Ok(changed)
}

pub fn show_events(conn: &Connection, call_id: &str) -> Result<Vec<EventRow>, StoreError> {
    let mut events = conn.prepare(
        &format!(
            "SELECT e.id, e.dedup_key, e.event, e.source, e.received_at FROM events e WHERE {} ORDER BY e.id",
            store::same_call("e", "?1")
        ),
    )?;
    let mut deliveries = conn.prepare(
        "SELECT sink, status, attempts, last_error FROM outbox WHERE event_id = ?1 ORDER BY id",
    )?;
    let found = events
        .query_map(params![call_id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::with_capacity(found.len());
    for (event_id, id, event, source, received_at) in found {
        let sinks = deliveries
            .query_map(params![event_id], |r| {
                Ok(SinkStatus {
                    sink: r.get(0)?,
                    status: r.get(1)?,
                    attempts: r.get(2)?,
                    last_error: r.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        out.push(EventRow {
            id,
            event,
            source,
            received_at: rfc3339(received_at),
            deliveries: sinks,
        });
    }
    Ok(out)
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

/// Tracked calls, waiting ones first (soonest first), then the most recently finished.
pub fn poll_status(conn: &Connection, limit: usize) -> Result<Vec<PollRow>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT call_id, status, next_poll_at, polls, first_seen_at, last_result FROM polls
         ORDER BY status != 'waiting', CASE WHEN status = 'waiting' THEN next_poll_at ELSE -updated_at END
         LIMIT ?1",
    )?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = stmt.query_map(params![limit], |r| {
        let status: String = r.get(1)?;
        let next: i64 = r.get(2)?;
        Ok(PollRow {
            call_id: r.get(0)?,
            next_poll_at: (status == "waiting").then(|| rfc3339(next)),
            status,
            polls: r.get(3)?,
            first_seen_at: rfc3339(r.get(4)?),
            last_result: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn render_polls(rows: &[PollRow]) -> String {
    let mut t = table(&[
        "call_id",
        "status",
        "next poll",
        "polls",
        "first seen",
        "why",
    ]);
    for r in rows {
        t.add_row(row([
            &r.call_id,
            &r.status,
            or_dash(r.next_poll_at.as_deref()),
            &r.polls.to_string(),
            &r.first_seen_at,
            or_dash(r.last_result.as_deref()),
        ]));
    }
    t.to_string()
}

pub fn render_agents(agents: &[crate::api::Agent]) -> String {
    let mut t = table(&["id", "name", "language", "type"]);
    for a in agents {
        t.add_row(row([
            &a.id,
            &a.name,
            or_dash(a.language.as_deref()),
            or_dash(a.agent_type.as_deref()),
        ]));
    }
    t.to_string()
}

/// `text` with every control character (C0, DEL, C1) escaped as `\u{..}`, `\n`, `\t`...:
/// cells come from the API or the store, and a raw ESC or BEL in them would be obeyed by
/// the operator's terminal (clear the screen, retitle the window, hide text).
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A table row of printable cells.
fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.into_iter().map(printable).collect()
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    t
}

fn or_dash(v: Option<&str>) -> &str {
    v.unwrap_or("-")
}

pub fn render_deliveries(rows: &[DeliveryRow]) -> String {
    let mut t = table(&[
        "id",
        "call_id",
        "event",
        "sink",
        "status",
        "attempts",
        "next attempt",
        "last error",
    ]);
    for r in rows {
        t.add_row(row([
            &r.id.to_string(),
            or_dash(r.call_id.as_deref()),
            &r.event,
            &r.sink,
            &r.status,
            &r.attempts.to_string(),
            or_dash(r.next_attempt_at.as_deref()),
            or_dash(r.last_error.as_deref()),
        ]));
    }
    t.to_string()
}

pub fn render_events(rows: &[EventRow]) -> String {
    let mut t = table(&[
        "id",
        "event",
        "source",
        "received at",
        "sink",
        "status",
        "attempts",
        "last error",
    ]);
    for e in rows {
        if e.deliveries.is_empty() {
            t.add_row(row([
                &e.id,
                &e.event,
                &e.source,
                &e.received_at,
                "-",
                "no sink matched",
                "-",
                "-",
            ]));
        }
        for d in &e.deliveries {
            t.add_row(row([
                &e.id,
                &e.event,
                &e.source,
                &e.received_at,
                &d.sink,
                &d.status,
                &d.attempts.to_string(),
                or_dash(d.last_error.as_deref()),
            ]));
        }
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `text` holds a byte a terminal would obey rather than show.
    fn has_control(text: &str) -> bool {
        text.chars().any(char::is_control)
    }

    #[test]
    fn control_characters_from_the_api_or_the_store_are_shown_escaped_not_sent_to_the_terminal() {
        let agents = render_agents(&[crate::api::Agent {
            id: "abc123".into(),
            name: "Home Loan\x1b[2J Agent".into(),
            language: Some("hi-IN\u{9b}31m".into()),
            agent_type: Some("out\x7fbound".into()),
        }]);
        assert!(!has_control(&agents.replace('\n', "")), "{agents:?}");
        assert!(agents.contains(r"Home Loan\u{1b}[2J Agent"), "{agents}");
        assert!(agents.contains(r"hi-IN\u{9b}31m"), "{agents}");

        let polls = render_polls(&[PollRow {
            call_id: "call-\x1b[1A".into(),
            status: "waiting".into(),
            next_poll_at: None,
            polls: 1,
            first_seen_at: "2026-05-24T10:30:00Z".into(),
            last_result: Some("not ready: \x1b]0;pwned\x07".into()),
        }]);
        assert!(!has_control(&polls.replace('\n', "")), "{polls:?}");
        assert!(polls.contains(r"\u{1b}]0;pwned\u{7}"), "{polls}");

        let deliveries = render_deliveries(&[DeliveryRow {
            id: 1,
            call_id: Some("call-1".into()),
            event: "call_completed".into(),
            sink: "crm".into(),
            status: "dead".into(),
            attempts: 3,
            next_attempt_at: None,
            last_error: Some("422: \x1b[31mbad\r\nnext".into()),
        }]);
        assert!(
            !has_control(&deliveries.replace('\n', "")),
            "{deliveries:?}"
        );
        assert!(
            deliveries.contains(r"\u{1b}[31mbad\r\nnext"),
            "{deliveries}"
        );

        let events = render_events(&[EventRow {
            id: "call-1:call_completed".into(),
            event: "call_completed\x1bc".into(),
            source: "webhook".into(),
            received_at: "2026-05-24T10:30:00Z".into(),
            deliveries: vec![SinkStatus {
                sink: "crm".into(),
                status: "dead".into(),
                attempts: 3,
                last_error: Some("\x07".into()),
            }],
        }]);
        assert!(!has_control(&events.replace('\n', "")), "{events:?}");
        assert!(events.contains(r"call_completed\u{1b}c"), "{events}");
    }
}
