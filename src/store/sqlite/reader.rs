//! SQLite reads: a small pool of read connections (WAL lets them run beside the writer)
//! and one function per query the dispatchers, the poller and the metrics make.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};

use super::schema;
use super::{from_millis, to_millis};
use crate::event::{Delivery, DeliveryId, Source};
use crate::store::{SinkStats, Stats, StoreError, TrackedCall};

/// Idle read connections kept for reuse; more are opened when callers overlap, and the
/// extra ones closed once they are done.
const IDLE_READERS: usize = 8;

/// Read connections, each used by one query at a time on a blocking thread.
pub(super) struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    pub(super) fn new(path: PathBuf) -> Readers {
        Readers {
            path,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` on a read connection, off the async threads.
    pub(super) async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match idle {
            Some(conn) => conn,
            None => schema::open_reader(&self.path)?,
        };
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let result = f(&conn);
            (conn, result)
        })
        .await?;
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
        Ok(result?)
    }
}

/// An SQL condition: the events of `alias` belong to the call `call`. A call's events
/// are found through the dedup keys (`<call_id>:<event>`), whose index is needed anyway,
/// so no index on `call_id` has to be written at random for every event.
pub(super) fn same_call(alias: &str, call: &str) -> String {
    format!(
        "{alias}.dedup_key >= {call} || ':' AND {alias}.dedup_key < {call} || ';' AND {alias}.call_id = {call}"
    )
}

/// Pending rows of `sink` that are due, oldest first, skipping `busy` (rows already being
/// delivered) and rows whose call has an earlier row still pending on this sink: a call's
/// events reach a sink in the order they were stored, while other calls go on. A dead row
/// no longer holds its call's later rows back. Stops at `limit` rows or once `max_bytes`
/// of payload are taken, so a batch's memory is bounded whatever the payload sizes.
pub(super) fn due(
    conn: &Connection,
    sink: &str,
    limit: usize,
    max_bytes: usize,
    busy: &HashSet<i64>,
) -> rusqlite::Result<Vec<Delivery>> {
    let now = to_millis(SystemTime::now());
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT o.id, o.attempts, e.event, e.call_id, e.dedup_key, e.source, e.received_at, e.payload
         FROM outbox o JOIN events e ON e.id = o.event_id
         WHERE o.sink = ?1 AND o.status = 'pending' AND o.next_attempt_at <= ?2
           AND NOT EXISTS (
               -- CROSS JOIN keeps this order: the call's few events by key, then
               -- their rows; the other way round would scan every pending row.
               SELECT 1 FROM events pe CROSS JOIN outbox po
               WHERE po.event_id = pe.id AND e.call_id IS NOT NULL AND {same_call}
                 AND pe.id < e.id AND po.sink = o.sink AND po.status = 'pending')
         ORDER BY o.next_attempt_at, o.id LIMIT ?3",
        same_call = same_call("pe", "e.call_id"),
    ))?;
    let fetch = i64::try_from(limit + busy.len()).unwrap_or(i64::MAX);
    let mut rows = stmt.query(params![sink, now, fetch])?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        if busy.contains(&id) {
            continue;
        }
        let payload: Vec<u8> = row.get(7)?;
        bytes += payload.len();
        let source: String = row.get(5)?;
        out.push(Delivery {
            id: DeliveryId::row(id),
            attempts: row.get(1)?,
            event: row.get(2)?,
            call_id: row.get(3)?,
            dedup_key: row.get(4)?,
            source: Source::parse(&source).unwrap_or(Source::Webhook),
            received_at: from_millis(row.get(6)?),
            payload: Bytes::from(payload),
        });
        if out.len() >= limit || bytes >= max_bytes {
            break;
        }
    }
    Ok(out)
}

/// When the earliest pending row of `sink` that is not yet due becomes due.
pub(super) fn next_due(conn: &Connection, sink: &str) -> rusqlite::Result<Option<SystemTime>> {
    let now = to_millis(SystemTime::now());
    conn.prepare_cached(
        "SELECT MIN(next_attempt_at) FROM outbox
         WHERE sink = ?1 AND status = 'pending' AND next_attempt_at > ?2",
    )?
    .query_row(params![sink, now], |r| r.get::<_, Option<i64>>(0))
    .optional()
    .map(|v| v.flatten().map(from_millis))
}

/// Pending and dead counts and the oldest pending event per sink with any, the calls
/// waiting for their analysis and the quarantine's size.
pub(super) fn stats(conn: &Connection) -> rusqlite::Result<Stats> {
    let mut sinks: Vec<SinkStats> = Vec::new();
    let mut pending = conn.prepare_cached(
        "SELECT sink, COUNT(*), MIN(id) FROM outbox WHERE status = 'pending' GROUP BY sink",
    )?;
    let rows = pending.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    let mut received = conn.prepare_cached(
        "SELECT e.received_at FROM outbox o JOIN events e ON e.id = o.event_id WHERE o.id = ?1",
    )?;
    for row in rows {
        let (sink, count, oldest_id) = row?;
        let oldest = received
            .query_row(params![oldest_id], |r| r.get::<_, i64>(0))
            .optional()?
            .map(from_millis);
        sinks.push(SinkStats {
            sink,
            pending: count,
            dead: 0,
            oldest_pending: oldest,
        });
    }
    let mut dead = conn
        .prepare_cached("SELECT sink, COUNT(*) FROM outbox WHERE status = 'dead' GROUP BY sink")?;
    for row in dead.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (sink, count) = row?;
        match sinks.iter_mut().find(|s| s.sink == sink) {
            Some(s) => s.dead = count,
            None => sinks.push(SinkStats {
                sink,
                pending: 0,
                dead: count,
                oldest_pending: None,
            }),
        }
    }
    let calls_waiting = conn
        .prepare_cached("SELECT COUNT(*) FROM polls WHERE status = 'waiting'")?
        .query_row([], |r| r.get(0))?;
    let quarantine_bytes = conn
        .prepare_cached("SELECT COALESCE(SUM(length(body)), 0) FROM quarantine")?
        .query_row([], |r| r.get(0))?;
    Ok(Stats {
        sinks,
        calls_waiting,
        quarantine_bytes,
    })
}

/// The lowest event id, if any event is stored.
pub(super) fn first_event_id(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT MIN(id) FROM events")?
        .query_row([], |r| r.get(0))
}

/// Calls the poller should look at now, earliest first.
pub(super) fn due_polls(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<TrackedCall>> {
    let now = to_millis(SystemTime::now());
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare_cached(
        "SELECT call_id, first_seen_at, polls FROM polls
         WHERE status = 'waiting' AND next_poll_at <= ?1 ORDER BY next_poll_at LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![now, limit], |r| {
        Ok(TrackedCall {
            call_id: r.get(0)?,
            first_seen_at: from_millis(r.get(1)?),
            polls: r.get(2)?,
        })
    })?;
    rows.collect()
}

/// When the next call is due for a poll, if any is waiting.
pub(super) fn next_poll(conn: &Connection) -> rusqlite::Result<Option<SystemTime>> {
    conn.prepare_cached("SELECT MIN(next_poll_at) FROM polls WHERE status = 'waiting'")?
        .query_row([], |r| r.get::<_, Option<i64>>(0))
        .map(|v| v.map(from_millis))
}

/// Whether an event with this dedup key is stored.
pub(super) fn has_event(conn: &Connection, dedup_key: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM events WHERE dedup_key = ?1")?
        .query_row(params![dedup_key], |_| Ok(()))
        .optional()
        .map(|found| found.is_some())
}
