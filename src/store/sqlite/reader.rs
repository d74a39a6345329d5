//! SQLite reads: a small pool of read connections (WAL lets them run beside the writer)
//! and one function per query the dispatchers, the poller and the metrics make.

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension, params};

use super::claims::{HeldBack, Snapshot};
use super::keys::{key, keyed};
use super::millis::{from_millis, to_millis};
use super::schema;
use super::waiting::WAITING;
use crate::event::Source;
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

/// A stored event on its way to a sink, its payload as stored.
pub(super) struct Row {
    pub(super) id: i64,
    pub(super) attempts: u32,
    pub(super) event: String,
    pub(super) call_id: Option<String>,
    pub(super) dedup_key: String,
    pub(super) source: Source,
    pub(super) received_at: SystemTime,
    pub(super) codec: i64,
    pub(super) payload: Vec<u8>,
}

const COLUMNS: &str =
    "e.id, e.event, e.call_id, e.dedup_key, e.source, e.received_at, e.codec, e.payload";

fn row(r: &rusqlite::Row<'_>, attempts: u32) -> rusqlite::Result<Row> {
    let source: String = r.get(4)?;
    Ok(Row {
        id: r.get(0)?,
        attempts,
        event: r.get(1)?,
        call_id: r.get(2)?,
        dedup_key: r.get(3)?,
        source: Source::parse(&source).unwrap_or(Source::Webhook),
        received_at: from_millis(r.get(5)?),
        codec: r.get(6)?,
        payload: r.get(7)?,
    })
}

/// What one claim found.
#[derive(Default)]
pub(super) struct Scan {
    pub(super) retries: Vec<Row>,
    pub(super) fresh: Vec<Row>,
    /// First attempts held back to keep a call's order.
    pub(super) held: Vec<HeldBack>,
    /// The last event examined after the cursor.
    pub(super) examined_to: Option<i64>,
}

/// Up to `limit` deliveries of `sink` (and about `max_bytes` of payload, at least one):
/// due retries first, then first attempts after `position`, in order. Skips what is in
/// hand and keeps each call's order: an event is held back while an earlier one of its
/// call is in hand, has a pending row on this sink, or was held back itself.
pub(super) fn scan(
    conn: &Connection,
    sink: &str,
    position: i64,
    limit: usize,
    max_bytes: usize,
    snapshot: &Snapshot,
) -> rusqlite::Result<Scan> {
    let mut out = Scan::default();
    let mut blocked = snapshot.calls_in_hand.clone();
    let mut bytes = 0usize;
    let full = |out: &Scan, bytes: usize| {
        out.retries.len() + out.fresh.len() >= limit || bytes >= max_bytes
    };
    let now = to_millis(SystemTime::now());
    {
        let mut due = conn.prepare_cached(&format!(
            "SELECT {COLUMNS}, r.attempts FROM retries r JOIN events e ON e.id = r.event_id
             WHERE r.sink = ?1 AND r.status = 'pending' AND r.next_attempt_at <= ?2
               AND NOT EXISTS (
                   SELECT 1 FROM retries p WHERE p.sink = r.sink AND p.call_id = r.call_id
                   AND p.status = 'pending' AND p.event_id < r.event_id)
             ORDER BY r.next_attempt_at, r.event_id LIMIT ?3"
        ))?;
        let fetch = i64::try_from(limit + snapshot.in_hand.len()).unwrap_or(i64::MAX);
        let mut rows = due.query(params![sink, now, fetch])?;
        while let Some(r) = rows.next()? {
            let retry = row(r, r.get(8)?)?;
            if snapshot.in_hand.contains(&retry.id) {
                continue;
            }
            if let Some(call) = &retry.call_id {
                if blocked.contains_key(call) {
                    continue;
                }
                blocked.insert(call.clone(), retry.id);
            }
            bytes += retry.payload.len();
            out.retries.push(retry);
            if full(&out, bytes) {
                return Ok(out);
            }
        }
    }
    // Read first: every event up to it is committed, so the scan below sees all of them.
    let last: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(id), 0) FROM events")?
        .query_row([], |r| r.get(0))?;
    // An event with a retry row here is that row's to deliver: a failure or a held event
    // behind an event still in hand, a replay, or a backfill.
    let mut fresh = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM events e
         WHERE e.id > ?1 AND instr(e.sinks, ?2) > 0
           AND NOT EXISTS (SELECT 1 FROM retries r WHERE r.sink = ?4 AND r.event_id = e.id)
         ORDER BY e.id LIMIT ?3"
    ))?;
    let mut waiting = conn.prepare_cached(
        "SELECT MAX(event_id) FROM retries WHERE sink = ?1 AND call_id = ?2
         AND status = 'pending' AND event_id < ?3",
    )?;
    // Enough to see past what is in hand, and past held events.
    let fetch = limit + snapshot.skip.len() + HELD_LOOKAHEAD;
    let mut rows = fresh.query(params![
        position,
        tag(sink),
        i64::try_from(fetch).unwrap_or(i64::MAX),
        sink
    ])?;
    let mut read = 0;
    let mut stopped = false;
    while let Some(r) = rows.next()? {
        read += 1;
        let id: i64 = r.get(0)?;
        out.examined_to = Some(id);
        if snapshot.skip.contains(&id) {
            continue;
        }
        let call_id: Option<String> = r.get(2)?;
        if let Some(call) = call_id {
            let behind = match blocked.get(&call) {
                Some(earlier) => Some(*earlier),
                None => waiting.query_row(params![sink, call, id], |r| r.get(0))?,
            };
            blocked.insert(call.clone(), id);
            if let Some(behind) = behind {
                out.held.push(HeldBack {
                    id,
                    call_id: call,
                    behind,
                });
                continue;
            }
        }
        let event = row(r, 0)?;
        bytes += event.payload.len();
        out.fresh.push(event);
        if full(&out, bytes) {
            stopped = true;
            break;
        }
    }
    // Nothing more for this sink up to `last`: the events after its own, routed
    // elsewhere, are examined too, so the cursor of a sink that rarely gets one moves on
    // rather than stay where this scan must start again.
    if !stopped && read < fetch && last > position {
        out.examined_to = out.examined_to.max(Some(last));
    }
    Ok(out)
}

/// Rows a claim reads beyond its limit and what is in hand: events it holds back for
/// their call's order count against neither (each gets a waiting row, written before the
/// next claim, so no claim reads them twice).
const HELD_LOOKAHEAD: usize = 256;

/// How a sink's name appears in `events.sinks`.
fn tag(sink: &str) -> String {
    format!(",{sink},")
}

/// Where `sink` stands: its cursor, or just before its first event if it has none yet.
pub(super) fn position(conn: &Connection, sink: &str) -> rusqlite::Result<i64> {
    let cursor: Option<i64> = conn
        .prepare_cached("SELECT position FROM cursors WHERE sink = ?1")?
        .query_row(params![sink], |r| r.get(0))
        .optional()?;
    match cursor {
        Some(position) => Ok(position),
        None => conn
            .prepare_cached(
                "SELECT COALESCE(MIN(id), 1) - 1 FROM events WHERE instr(sinks, ?1) > 0",
            )?
            .query_row(params![tag(sink)], |r| r.get(0)),
    }
}

/// When the earliest pending retry of `sink` that is not yet due becomes due.
pub(super) fn next_due(conn: &Connection, sink: &str) -> rusqlite::Result<Option<SystemTime>> {
    let now = to_millis(SystemTime::now());
    conn.prepare_cached(
        "SELECT MIN(next_attempt_at) FROM retries
         WHERE sink = ?1 AND status = 'pending' AND next_attempt_at > ?2
           AND next_attempt_at < ?3",
    )?
    .query_row(params![sink, now, WAITING], |r| r.get::<_, Option<i64>>(0))
    .optional()
    .map(|v| v.flatten().map(from_millis))
}

/// Backlogs counted exactly up to this many events after a cursor; beyond, the events
/// after it are counted whether routed to the sink or not (an upper bound), so a scrape's
/// refresh stays cheap however deep the backlog.
const EXACT_BACKLOG: i64 = 100_000;

/// Per sink: pending deliveries (first attempts after its cursor, and retries), dead
/// ones, and when the oldest pending event was received; the calls waiting for their
/// analysis and the quarantine's size.
pub(super) fn stats(conn: &Connection) -> rusqlite::Result<Stats> {
    let last: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(id), 0) FROM events")?
        .query_row([], |r| r.get(0))?;
    let cursors: Vec<(String, i64)> = conn
        .prepare_cached("SELECT sink, position FROM cursors")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut sinks = Vec::with_capacity(cursors.len());
    for (sink, position) in cursors {
        let behind = last - position;
        let fresh: i64 = if behind <= EXACT_BACKLOG {
            conn.prepare_cached(
                "SELECT COUNT(*) FROM events WHERE id > ?1 AND instr(sinks, ?2) > 0",
            )?
            .query_row(params![position, tag(&sink)], |r| r.get(0))?
        } else {
            behind
        };
        // Each count reads one partial index, not the sink's rows: delivered ones stay in
        // `retries` until pruned. The oldest retry is the one of the lowest event id (ids
        // follow arrival), found without joining every pending row to its event.
        // The status is written out, not bound: SQLite picks a partial index only for the
        // literal its definition names.
        let count = |status: &str| -> rusqlite::Result<i64> {
            conn.prepare_cached(&format!(
                "SELECT COUNT(*) FROM retries WHERE sink = ?1 AND status = '{status}'"
            ))?
            .query_row(params![sink], |r| r.get(0))
        };
        let (retrying, dead) = (count("pending")?, count("dead")?);
        let retry_oldest: Option<i64> = conn
            .prepare_cached(
                "SELECT received_at FROM events WHERE id =
                     (SELECT MIN(event_id) FROM retries WHERE sink = ?1 AND status = 'pending')",
            )?
            .query_row(params![sink], |r| r.get(0))
            .optional()?;
        let fresh_oldest: Option<i64> = conn
            .prepare_cached(
                "SELECT received_at FROM events WHERE id > ?1 AND instr(sinks, ?2) > 0
                 ORDER BY id LIMIT 1",
            )?
            .query_row(params![position, tag(&sink)], |r| r.get(0))
            .optional()?;
        let oldest = [fresh_oldest, retry_oldest].into_iter().flatten().min();
        sinks.push(SinkStats {
            sink,
            pending: fresh + retrying,
            dead,
            oldest_pending: oldest.map(from_millis),
        });
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
    conn.prepare_cached(&format!(
        "SELECT 1 FROM events e WHERE {} AND e.dedup_key = ?2",
        keyed("?1", "?1")
    ))?
    .query_row(params![&key(dedup_key)[..], dedup_key], |_| Ok(()))
    .optional()
    .map(|found| found.is_some())
}
