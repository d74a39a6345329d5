//! The operator's queries on SQLite: list deliveries, replay them, show a call's events,
//! the poller's schedule. They work while the server runs: reads never block it (WAL),
//! and a replay is one short write through the writer, which the dispatchers pick up.
//!
//! A delivery is an event and a sink: pending after the sink's cursor, pending or dead
//! with its row in `retries`, delivered otherwise. Its id is the event's.

use std::time::{Duration, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use super::codec::decompress;
use super::keys::{call_range, keyed};
use super::millis::to_millis;
use super::sink_list::sink_names;
use crate::store::operator::{
    AttemptRow, BackfillFrom, DeliveryRow, DeliveryStatus, EventFilter, EventPage, EventRow,
    EventSummary, ListFilter, PollRow, REPLAY_MAX, Replay, Replayed, SinkPause, SinkStatus, Stored,
};

fn at_millis(ms: i64) -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_seconds(at_millis(ms)).to_string()
}

fn rfc3339_millis(ms: i64) -> String {
    humantime::format_rfc3339_millis(at_millis(ms)).to_string()
}

/// Every (event, sink) delivery, in the old one-row-per-delivery shape (the `outbox` view
/// computes it from the cursors and the retry rows).
const DELIVERIES: &str = "
SELECT o.event_id, e.call_id, e.event, o.sink, o.status, o.attempts, o.next_attempt_at,
       o.last_error
FROM outbox o JOIN events e ON e.id = o.event_id";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeliveryRow> {
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
        sink_paused: None,
    })
}

/// The sinks recorded as paused.
pub(super) fn pauses(conn: &Connection) -> rusqlite::Result<Vec<SinkPause>> {
    conn.prepare("SELECT sink, until_ms, reason FROM pauses ORDER BY sink")?
        .query_map([], |r| {
            Ok(SinkPause {
                sink: r.get(0)?,
                until: UNIX_EPOCH
                    + Duration::from_millis(u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0)),
                reason: r.get(2)?,
            })
        })?
        .collect()
}

pub(super) fn list(conn: &Connection, filter: &ListFilter) -> rusqlite::Result<Vec<DeliveryRow>> {
    let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
    let (sink, status) = (&filter.sink, filter.status.map(DeliveryStatus::as_str));
    match (&filter.call_id, filter.status) {
        // A call's few events, found by their keys' prefix.
        (Some(call), _) => {
            let (low, high) = call_range(call);
            conn.prepare(&format!(
                "{DELIVERIES} WHERE {} AND e.call_id = ?3
                 AND (?4 IS NULL OR o.sink = ?4) AND (?5 IS NULL OR o.status = ?5)
                 ORDER BY o.event_id DESC LIMIT ?6",
                keyed("?1", "?2")
            ))?
            .query_map(params![&low[..], &high[..], call, sink, status, limit], row)?
            .collect()
        }
        // Dead ones are all in `retries`, newest first along an index of dead rows (by
        // sink, or of every sink), so a page reads its own rows and no others.
        (None, Some(DeliveryStatus::Dead)) => {
            let (index, which) = match sink {
                Some(_) => ("retries_dead", "r.sink = ?1"),
                None => ("retries_dead_all", "?1 IS NULL"),
            };
            conn.prepare_cached(&format!(
                "SELECT r.event_id, e.call_id, e.event, r.sink, r.status, r.attempts,
                        r.next_attempt_at, r.last_error
                 FROM retries r INDEXED BY {index} JOIN events e ON e.id = r.event_id
                 WHERE r.status = 'dead' AND {which}
                 ORDER BY r.event_id DESC LIMIT ?2"
            ))?
            .query_map(params![sink, limit], row)?
            .collect()
        }
        (None, _) => conn
            .prepare(&format!(
                "{DELIVERIES} WHERE (?1 IS NULL OR o.sink = ?1) AND (?2 IS NULL OR o.status = ?2)
                 ORDER BY o.event_id DESC LIMIT ?3"
            ))?
            .query_map(params![sink, status, limit], row)?
            .collect(),
    }
}

/// Puts the chosen deliveries of `sink` back to pending with their attempts reset, and
/// counts what it left as it was: pending ones, and events whose payload retention has
/// emptied (they cannot be sent again). A delivered event gets a retry row, due now.
pub(super) fn replay(
    tx: &rusqlite::Transaction<'_>,
    sink: &str,
    which: &Replay,
    now: i64,
) -> rusqlite::Result<Replayed> {
    // The deliveries to `sink` (?1) among the events `which` names, each with whether it
    // is pending (after the cursor with no row of its own that ended it, or with a pending
    // row: the cursor passes an ended delivery once its row is written, not in the same
    // commit) and whether its payload is gone.
    let chosen = |events: &str| {
        format!(
            "SELECT e.id, e.call_id,
                    COALESCE(r.status = 'pending', e.id > c.position),
                    length(e.payload) = 0
             FROM events e JOIN cursors c ON c.sink = ?1
             LEFT JOIN retries r ON r.sink = ?1 AND r.event_id = e.id
             WHERE {events} AND instr(e.sinks, ',' || ?1 || ',') > 0
             LIMIT {}",
            REPLAY_MAX + 1
        )
    };
    let pick = |r: &rusqlite::Row<'_>| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?));
    let found: Vec<(i64, Option<String>, bool, bool)> = match which {
        Replay::Status {
            status,
            since,
            until,
        } => {
            let in_status = if *status == DeliveryStatus::Dead {
                "e.id IN (SELECT event_id FROM retries WHERE sink = ?1 AND status = 'dead')"
            } else {
                // Delivered: passed by the cursor with no row, or a row that says so.
                "e.id <= c.position AND COALESCE(r.status, 'delivered') = 'delivered'"
            };
            tx.prepare(&chosen(&format!(
                "{in_status} AND (?2 IS NULL OR e.received_at >= ?2)
                 AND (?3 IS NULL OR e.received_at < ?3)"
            )))?
            .query_map(
                params![sink, since.map(to_millis), until.map(to_millis)],
                pick,
            )?
            .collect::<rusqlite::Result<_>>()?
        }
        Replay::CallId(call) => {
            let (low, high) = call_range(call);
            tx.prepare(&chosen(&format!(
                "{} AND e.call_id = ?4",
                keyed("?2", "?3")
            )))?
            .query_map(params![sink, &low[..], &high[..], call], pick)?
            .collect::<rusqlite::Result<_>>()?
        }
        Replay::Id(id) => tx
            .prepare(&chosen("e.id = ?2"))?
            .query_map(params![sink, id], pick)?
            .collect::<rusqlite::Result<_>>()?,
    };
    let mut reset = tx.prepare_cached(
        "INSERT INTO retries (sink, event_id, call_id, status, attempts, next_attempt_at,
                              last_error, updated_at)
         VALUES (?1, ?2, ?3, 'pending', 0, ?4, NULL, ?4)
         ON CONFLICT (sink, event_id) DO UPDATE SET status = 'pending', attempts = 0,
             next_attempt_at = ?4, last_error = NULL, updated_at = ?4",
    )?;
    let mut out = Replayed::default();
    if found.len() > REPLAY_MAX {
        out.too_many = true;
        return Ok(out);
    }
    for (event_id, call_id, pending, emptied) in &found {
        if *pending {
            out.already_pending += 1;
        } else if *emptied {
            out.payload_gone += 1;
        } else {
            reset.execute(params![sink, event_id, call_id, now])?;
            out.replayed += 1;
        }
    }
    // A sink has a cursor from its first event on: none means the store never held a
    // delivery for it.
    if found.is_empty()
        && !tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM cursors WHERE sink = ?1)",
            params![sink],
            |r| r.get(0),
        )?
    {
        out.other_sinks = Some(
            tx.prepare("SELECT sink FROM cursors ORDER BY sink")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?,
        );
    }
    Ok(out)
}

/// `deliveries backfill`'s candidates: stored events after `from.after` that `sink` has no
/// delivery of, oldest first, with their payloads for the sink's filters to choose from.
pub(super) fn backfill_candidates(
    conn: &Connection,
    sink: &str,
    from: &BackfillFrom,
) -> rusqlite::Result<Vec<Stored>> {
    let millis = |at: Option<std::time::SystemTime>| at.map(to_millis);
    conn.prepare_cached(
        "SELECT id, event, codec, payload FROM events
         WHERE id > ?1 AND (?2 IS NULL OR received_at >= ?2) AND (?3 IS NULL OR received_at < ?3)
           AND (?4 IS NULL OR event = ?4) AND instr(sinks, ',' || ?5 || ',') = 0
         ORDER BY id LIMIT ?6",
    )?
    .query_map(
        params![
            from.after,
            millis(from.since),
            millis(from.until),
            from.event,
            sink,
            i64::try_from(from.limit).unwrap_or(i64::MAX)
        ],
        |r| {
            Ok(Stored {
                id: r.get(0)?,
                event: r.get(1)?,
                // One that cannot be read back is left out, as one emptied by retention.
                payload: decompress(r.get(2)?, r.get(3)?).unwrap_or_default(),
            })
        },
    )?
    .collect()
}

/// Gives `sink` a pending delivery of each of the events `ids` that it has none of:
/// routed to it in the log, with a row of its own, so it goes out whether the sink's
/// cursor has passed the event or not. Returns how many were added.
pub(super) fn backfill(
    tx: &rusqlite::Transaction<'_>,
    sink: &str,
    ids: &[i64],
    now: i64,
) -> rusqlite::Result<usize> {
    // A sink that never had an event starts its cursor at the log's end: what it gets
    // from before is what is backfilled.
    tx.prepare_cached(
        "INSERT INTO cursors (sink, position) SELECT ?1, COALESCE(MAX(id), 0) FROM events
         WHERE true ON CONFLICT (sink) DO NOTHING",
    )?
    .execute(params![sink])?;
    let mut route = tx.prepare_cached(
        "UPDATE events SET sinks = CASE WHEN sinks = '' THEN ',' ELSE sinks END || ?1 || ','
         WHERE id = ?2 AND instr(sinks, ',' || ?1 || ',') = 0 AND length(payload) > 0
         RETURNING call_id",
    )?;
    let mut pending = tx.prepare_cached(
        "INSERT INTO retries (sink, event_id, call_id, status, attempts, next_attempt_at,
                              last_error, updated_at)
         VALUES (?1, ?2, ?3, 'pending', 0, ?4, NULL, ?4)
         ON CONFLICT (sink, event_id) DO NOTHING",
    )?;
    let mut added = 0;
    for id in ids {
        let call_id: Option<Option<String>> = route
            .query_row(params![sink, id], |r| r.get(0))
            .optional()?;
        if let Some(call_id) = call_id {
            pending.execute(params![sink, id, call_id, now])?;
            added += 1;
        }
    }
    Ok(added)
}

/// Each delivery's status (and, when asked, its attempts), read for one event at a time.
struct Deliveries<'c> {
    status: rusqlite::CachedStatement<'c>,
    history: Option<rusqlite::CachedStatement<'c>>,
}

impl<'c> Deliveries<'c> {
    fn new(conn: &'c Connection, with_history: bool) -> rusqlite::Result<Deliveries<'c>> {
        let status = conn.prepare_cached(
            "SELECT CASE WHEN r.status IS NOT NULL THEN r.status
                         WHEN ?2 > c.position THEN 'pending' ELSE 'delivered' END,
                    COALESCE(r.attempts, CASE WHEN ?2 > c.position THEN 0 ELSE 1 END),
                    r.last_error
             FROM cursors c LEFT JOIN retries r ON r.sink = c.sink AND r.event_id = ?2
             WHERE c.sink = ?1",
        )?;
        let history = if with_history {
            Some(conn.prepare_cached(
                "SELECT number, started_at, duration_ms, outcome, code, error, response
                 FROM attempts WHERE event_id = ?1 AND sink = ?2 ORDER BY id",
            )?)
        } else {
            None
        };
        Ok(Deliveries { status, history })
    }

    /// The deliveries of event `event_id`, routed to `sinks` (the log's list).
    fn of(&mut self, event_id: i64, sinks: &str) -> rusqlite::Result<Vec<SinkStatus>> {
        let mut out = Vec::new();
        for sink in sink_names(sinks) {
            let found = self.status.query_row(params![sink, event_id], |r| {
                Ok(SinkStatus {
                    sink: sink.to_owned(),
                    status: r.get(0)?,
                    attempts: r.get(1)?,
                    last_error: r.get(2)?,
                    history: Vec::new(),
                })
            });
            let mut delivery = match found {
                Ok(d) => d,
                Err(rusqlite::Error::QueryReturnedNoRows) => continue,
                Err(e) => return Err(e),
            };
            if let Some(history) = &mut self.history {
                delivery.history = history
                    .query_map(params![event_id, sink], |r| {
                        Ok(AttemptRow {
                            number: r.get(0)?,
                            at: rfc3339_millis(r.get(1)?),
                            duration_ms: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                            outcome: r.get(3)?,
                            code: r.get(4)?,
                            error: r.get(5)?,
                            response: r.get(6)?,
                        })
                    })?
                    .collect::<Result<_, _>>()?;
            }
            out.push(delivery);
        }
        Ok(out)
    }
}

pub(super) fn show_events(conn: &Connection, call_id: &str) -> rusqlite::Result<Vec<EventRow>> {
    let (low, high) = call_range(call_id);
    let mut events = conn.prepare(&format!(
        "SELECT e.id, e.dedup_key, e.event, e.source, e.received_at, e.sinks, e.codec, e.payload
         FROM events e WHERE {} AND e.call_id = ?3 ORDER BY e.id",
        keyed("?1", "?2")
    ))?;
    let mut deliveries = Deliveries::new(conn, true)?;
    let found = events
        .query_map(params![&low[..], &high[..], call_id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                EventRow {
                    id: r.get(1)?,
                    event: r.get(2)?,
                    source: r.get(3)?,
                    received_at: rfc3339(r.get(4)?),
                    deliveries: Vec::new(),
                    // A payload that cannot be read back shows as none; its delivery
                    // says why.
                    payload: decompress(r.get(6)?, r.get(7)?).unwrap_or_default(),
                },
                r.get::<_, String>(5)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::with_capacity(found.len());
    for (event_id, mut event, sinks) in found {
        event.deliveries = deliveries.of(event_id, &sinks)?;
        out.push(event);
    }
    Ok(out)
}

/// Stored events examined at most for one page of `events list`, so a filter that matches
/// little cannot make one page read the whole log; the page then says where to go on.
const LIST_SCAN: usize = 20_000;

/// `events list`: newest first, by id (keyset pagination: `before`).
pub(super) fn list_events(conn: &Connection, filter: &EventFilter) -> rusqlite::Result<EventPage> {
    let millis = |at: Option<std::time::SystemTime>| at.map(to_millis);
    // Dead deliveries are all in `retries`: no need to walk the log for them.
    let dead_only = filter.status == Some(DeliveryStatus::Dead);
    let sql = format!(
        "SELECT e.id, e.dedup_key, e.call_id, e.event, e.source, e.received_at, e.sinks
         FROM events e WHERE e.id < ?1
           AND (?2 IS NULL OR e.received_at >= ?2) AND (?3 IS NULL OR e.received_at < ?3)
           AND (?4 IS NULL OR e.event = ?4)
           AND (?5 IS NULL OR instr(e.sinks, ',' || ?5 || ',') > 0)
           {}
         ORDER BY e.id DESC LIMIT ?6",
        if dead_only {
            "AND e.id IN (SELECT event_id FROM retries
                          WHERE status = 'dead' AND (?5 IS NULL OR sink = ?5))"
        } else {
            ""
        }
    );
    let mut events = conn.prepare(&sql)?;
    let mut deliveries = Deliveries::new(conn, false)?;
    let mut rows = events.query(params![
        filter.before.unwrap_or(i64::MAX),
        millis(filter.since),
        millis(filter.until),
        filter.event,
        filter.sink,
        i64::try_from(LIST_SCAN).unwrap_or(i64::MAX)
    ])?;
    let mut page = EventPage {
        events: Vec::new(),
        next_before: None,
    };
    let mut examined = 0;
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        examined += 1;
        let found = deliveries.of(id, &r.get::<_, String>(6)?)?;
        if filter.matches(&found) {
            page.events.push(EventSummary {
                id,
                key: r.get(1)?,
                call_id: r.get(2)?,
                event: r.get(3)?,
                source: r.get(4)?,
                received_at: rfc3339(r.get(5)?),
                deliveries: found,
            });
        }
        if page.events.len() >= filter.limit.max(1) || examined >= LIST_SCAN {
            page.next_before = Some(id);
            break;
        }
    }
    Ok(page)
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
