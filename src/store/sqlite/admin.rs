//! The operator's queries on SQLite: list deliveries, replay them, show a call's events,
//! the poller's schedule. They work while the server runs: reads never block it (WAL),
//! and a replay is one short write through the writer, which the dispatchers pick up.

use std::time::{Duration, UNIX_EPOCH};

use rusqlite::{Connection, params};

use super::reader::same_call;
use crate::store::operator::{
    DeliveryRow, DeliveryStatus, EventRow, ListFilter, PollRow, Replay, SinkStatus,
};

fn rfc3339(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

pub(super) fn list(conn: &Connection, filter: &ListFilter) -> rusqlite::Result<Vec<DeliveryRow>> {
    // With a call, its few events are found by their keys; without, the newest rows.
    let (from, call) = if filter.call_id.is_some() {
        ("events e CROSS JOIN outbox o", same_call("e", "?3"))
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
            filter.status.map(DeliveryStatus::as_str),
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
    rows.collect()
}

/// Puts the chosen rows of `sink` back to pending with their attempts reset; returns how
/// many. Rows already pending are left as they are, and so are events whose payload
/// retention has emptied: they cannot be sent again.
pub(super) fn replay(
    tx: &rusqlite::Transaction<'_>,
    sink: &str,
    which: &Replay,
    now: i64,
) -> rusqlite::Result<usize> {
    let reset = "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = ?2,
                 last_error = NULL, updated_at = ?2
                 WHERE sink = ?1 AND status != 'pending'
                   AND event_id IN (SELECT id FROM events WHERE length(payload) > 0)";
    match which {
        Replay::Dead => tx.execute(&format!("{reset} AND status = 'dead'"), params![sink, now]),
        Replay::CallId(call) => tx.execute(
            &format!(
                "{reset} AND event_id IN (SELECT e.id FROM events e WHERE {})",
                same_call("e", "?3")
            ),
            params![sink, now, call],
        ),
        Replay::Id(id) => tx.execute(&format!("{reset} AND id = ?3"), params![sink, now, id]),
    }
}

pub(super) fn show_events(conn: &Connection, call_id: &str) -> rusqlite::Result<Vec<EventRow>> {
    let mut events = conn.prepare(
        &format!(
            "SELECT e.id, e.dedup_key, e.event, e.source, e.received_at FROM events e WHERE {} ORDER BY e.id",
            same_call("e", "?1")
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

/// Tracked calls, waiting ones first (soonest first), then the most recently finished.
pub(super) fn poll_status(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<PollRow>> {
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
    rows.collect()
}
