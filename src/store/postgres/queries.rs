//! The rest of the store's contract on PostgreSQL: quarantine, the poll schedule, roles,
//! the shared API budget, pruning, backlog figures and the operator's queries.

use std::time::{Duration, SystemTime};

use super::db::Db;
use sha2::{Digest, Sha256};

use crate::store::operator::{
    AttemptRow, BackfillFrom, DeliveryRow, DeliveryStatus, EventFilter, EventPage, EventRow,
    EventSummary, ListFilter, PollRow, REPLAY_MAX, Replay, Replayed, SinkStatus, Stored,
};
use crate::store::{
    Kept, PollUpdate, Pruned, Quarantined, Role, SinkStats, Stats, StoreError, TrackedCall,
};

/// Rows examined per pruning statement, so no statement holds locks for long.
const PRUNE_BATCH: i64 = 500;
/// Serializes the API budget's check-and-record across replicas.
const API_BUDGET_LOCK: i64 = 0x7679_6f72_6130_0002;
/// How long past its window a recorded API request still counts (see [`reserve_api_call`]).
const API_BUDGET_MARGIN: Duration = Duration::from_secs(1);

pub(super) async fn quarantine(
    db: &Db,
    entry: &Quarantined,
    max_bytes: u64,
) -> Result<Kept, StoreError> {
    let hash = Sha256::digest(&entry.body).to_vec();
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let stored = tx
        .execute(
            &db.sql("INSERT INTO {schema}.quarantine (received_at, reason, event_header, body, body_hash)
             VALUES (now(), $1, $2, $3, $4) ON CONFLICT (body_hash) DO NOTHING"),
            &[&entry.reason, &entry.event_header, &&entry.body[..], &hash],
        )
        .await?
        > 0;
    let mut dropped = 0;
    if stored {
        let limit = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let mut total: i64 = tx
            .query_one(
                &db.sql(
                    "SELECT COALESCE(SUM(octet_length(body)), 0)::bigint FROM {schema}.quarantine",
                ),
                &[],
            )
            .await?
            .get(0);
        while total > limit {
            let freed = tx
                .query_opt(
                    &db.sql("DELETE FROM {schema}.quarantine WHERE id = (SELECT MIN(id) FROM {schema}.quarantine)
                     RETURNING octet_length(body)::bigint"),
                    &[],
                )
                .await?;
            match freed {
                Some(row) => {
                    total -= row.get::<_, i64>(0);
                    dropped += 1;
                }
                None => break,
            }
        }
    }
    tx.commit().await?;
    Ok(Kept { stored, dropped })
}

/// The name of `role` in the leases table.
pub(super) fn role_name(role: Role) -> &'static str {
    match role {
        Role::Pruner => "pruner",
        Role::Poller => "poller",
    }
}

/// Takes or keeps `role` for `lease`: the holder renews; anyone takes an expired one.
pub(super) async fn lead(
    db: &Db,
    owner: &str,
    role: Role,
    lease: Duration,
) -> Result<bool, StoreError> {
    let row = db
        .get()
        .await?
        .query_opt(
            &db.sql(
                "INSERT INTO {schema}.leases (role, holder, until)
             VALUES ($1, $2, now() + make_interval(secs => $3))
             ON CONFLICT (role) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until
             WHERE leases.holder = EXCLUDED.holder OR leases.until < now()
             RETURNING holder",
            ),
            &[&role_name(role), &owner, &lease.as_secs_f64()],
        )
        .await?;
    Ok(row.is_some())
}

/// Extends the leases of those of `roles` that `owner` still holds, and names them.
pub(super) async fn renew_roles(
    db: &Db,
    owner: &str,
    roles: &[&'static str],
    lease: Duration,
) -> Result<Vec<String>, StoreError> {
    Ok(db
        .get()
        .await?
        .query(
            &db.sql(
                "UPDATE {schema}.leases SET until = now() + make_interval(secs => $3)
             WHERE role = ANY($1) AND holder = $2 RETURNING role",
            ),
            &[&roles, &owner, &lease.as_secs_f64()],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Records one API request against the budget every replica shares, or says how long
/// until the budget has room: never more than `limit` requests in any `window`, as the
/// API counts them.
///
/// The API sees a request a little after it is recorded here, and not always equally late
/// (a new connection, a busy machine): had two requests `limit` apart been recorded
/// exactly `window` apart, the later one could arrive less than `window` after the earlier
/// and the API would count one request too many. So a recorded request counts for
/// [`API_BUDGET_MARGIN`] beyond the window, and is recorded at the moment it is granted
/// (once the lock is held), not when the transaction began.
pub(super) async fn reserve_api_call(
    db: &Db,
    limit: usize,
    window: Duration,
) -> Result<Option<Duration>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let window = (window + API_BUDGET_MARGIN).as_secs_f64();
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&API_BUDGET_LOCK])
        .await?;
    let now: SystemTime = tx.query_one("SELECT clock_timestamp()", &[]).await?.get(0);
    tx.execute(
        &db.sql("DELETE FROM {schema}.api_requests WHERE at <= $2::timestamptz - make_interval(secs => $1)"),
        &[&window, &now],
    )
    .await?;
    let row = tx
        .query_one(
            &db.sql("SELECT count(*),
                    EXTRACT(EPOCH FROM (MIN(at) + make_interval(secs => $1) - $2::timestamptz))::float8
             FROM {schema}.api_requests"),
            &[&window, &now],
        )
        .await?;
    let (sent, wait): (i64, Option<f64>) = (row.get(0), row.get(1));
    let verdict = if sent < limit {
        tx.execute(
            &db.sql("INSERT INTO {schema}.api_requests (at) VALUES ($1)"),
            &[&now],
        )
        .await?;
        None
    } else {
        Some(Duration::from_secs_f64(wait.unwrap_or(0.0).max(0.0)))
    };
    tx.commit().await?;
    Ok(verdict)
}

pub(super) async fn record_poll(
    db: &Db,
    call_id: &str,
    update: &PollUpdate,
) -> Result<(), StoreError> {
    let client = db.get().await?;
    match update {
        PollUpdate::Again { at, result } => {
            client
                .execute(
                    &db.sql("UPDATE {schema}.polls SET polls = polls + 1, next_poll_at = $2, last_result = $3,
                     updated_at = now() WHERE call_id = $1 AND status = 'waiting'"),
                    &[&call_id, at, result],
                )
                .await?
        }
        PollUpdate::Finished { status, result } => {
            client
                .execute(
                    &db.sql("UPDATE {schema}.polls SET polls = polls + 1, status = $2, last_result = $3,
                     updated_at = now() WHERE call_id = $1 AND status = 'waiting'"),
                    &[&call_id, &status.as_str(), result],
                )
                .await?
        }
    };
    Ok(())
}

pub(super) async fn due_polls(db: &Db, limit: usize) -> Result<Vec<TrackedCall>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = db
        .get()
        .await?
        .query(
            &db.sql(
                "SELECT call_id, first_seen_at, polls FROM {schema}.polls
             WHERE status = 'waiting' AND next_poll_at <= now() ORDER BY next_poll_at LIMIT $1",
            ),
            &[&limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TrackedCall {
            call_id: r.get(0),
            first_seen_at: r.get(1),
            polls: u32::try_from(r.get::<_, i32>(2)).unwrap_or(0),
        })
        .collect())
}

pub(super) async fn next_poll(db: &Db) -> Result<Option<SystemTime>, StoreError> {
    Ok(db
        .get()
        .await?
        .query_one(
            &db.sql("SELECT MIN(next_poll_at) FROM {schema}.polls WHERE status = 'waiting'"),
            &[],
        )
        .await?
        .get(0))
}

pub(super) async fn has_event(db: &Db, dedup_key: &str) -> Result<bool, StoreError> {
    Ok(db
        .get()
        .await?
        .query_opt(
            &db.sql("SELECT 1 FROM {schema}.events WHERE dedup_key = $1"),
            &[&dedup_key],
        )
        .await?
        .is_some())
}

pub(super) async fn next_due(db: &Db, sink: &str) -> Result<Option<SystemTime>, StoreError> {
    Ok(db
        .get()
        .await?
        .query_one(
            &db.sql(
                "SELECT MIN(next_attempt_at) FROM {schema}.deliveries
             WHERE sink = $1 AND status = 'pending' AND next_attempt_at > now()",
            ),
            &[&sink],
        )
        .await?
        .get(0))
}

/// Empties payloads received before `payloads_before` and deletes events received before
/// `keys_before` (their deliveries with them), sparing any event with a delivery pending
/// or dead; in short statements, until nothing is left to do.
pub(super) async fn prune(
    db: &Db,
    payloads_before: SystemTime,
    keys_before: SystemTime,
) -> Result<Pruned, StoreError> {
    let finished = "NOT EXISTS (SELECT 1 FROM {schema}.deliveries d WHERE d.event_id = e.id AND d.status <> 'delivered')";
    let empty = db.sql(&format!(
        "UPDATE {{schema}}.events SET payload = ''::bytea WHERE id IN (
             SELECT e.id FROM {{schema}}.events e WHERE e.received_at < $1 AND octet_length(e.payload) > 0
             AND {finished} LIMIT $2)"
    ));
    let delete = db.sql(&format!(
        "DELETE FROM {{schema}}.events WHERE id IN (
             SELECT e.id FROM {{schema}}.events e WHERE e.received_at < $1 AND {finished} LIMIT $2)"
    ));
    let client = db.get().await?;
    let mut done = Pruned::default();
    loop {
        let n = client
            .execute(&empty, &[&payloads_before, &PRUNE_BATCH])
            .await?;
        done.payloads += usize::try_from(n).unwrap_or(0);
        if n == 0 {
            break;
        }
    }
    // Attempt histories go with the payloads: an answer may quote what was sent.
    let forget = db.sql(
        "DELETE FROM {schema}.attempts WHERE id IN (
             SELECT a.id FROM {schema}.attempts a
             JOIN {schema}.deliveries d ON d.id = a.delivery_id
             JOIN {schema}.events e ON e.id = d.event_id
             WHERE e.received_at < $1 AND octet_length(e.payload) = 0 LIMIT $2)",
    );
    while client
        .execute(&forget, &[&payloads_before, &PRUNE_BATCH])
        .await?
        > 0
    {}
    loop {
        let n = client
            .execute(&delete, &[&keys_before, &PRUNE_BATCH])
            .await?;
        done.events += usize::try_from(n).unwrap_or(0);
        if n == 0 {
            break;
        }
    }
    client
        .execute(
            &db.sql("DELETE FROM {schema}.quarantine WHERE received_at < $1"),
            &[&payloads_before],
        )
        .await?;
    client
        .execute(
            &db.sql("DELETE FROM {schema}.polls WHERE status <> 'waiting' AND updated_at < $1"),
            &[&keys_before],
        )
        .await?;
    Ok(done)
}

pub(super) async fn stats(db: &Db) -> Result<Stats, StoreError> {
    let client = db.get().await?;
    let mut sinks: Vec<SinkStats> = Vec::new();
    for row in client
        .query(
            &db.sql(
                "SELECT d.sink, count(*), MIN(d.event_id) FROM {schema}.deliveries d
             WHERE d.status = 'pending' GROUP BY d.sink",
            ),
            &[],
        )
        .await?
    {
        let oldest: Option<SystemTime> = client
            .query_opt(
                &db.sql("SELECT received_at FROM {schema}.events WHERE id = $1"),
                &[&row.get::<_, i64>(2)],
            )
            .await?
            .map(|r| r.get(0));
        sinks.push(SinkStats {
            sink: row.get(0),
            pending: row.get(1),
            dead: 0,
            oldest_pending: oldest,
        });
    }
    for row in client
        .query(
            &db.sql("SELECT sink, count(*) FROM {schema}.deliveries WHERE status = 'dead' GROUP BY sink"),
            &[],
        )
        .await?
    {
        let (sink, count): (String, i64) = (row.get(0), row.get(1));
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
    let calls_waiting = client
        .query_one(
            &db.sql("SELECT count(*) FROM {schema}.polls WHERE status = 'waiting'"),
            &[],
        )
        .await?
        .get(0);
    let quarantine_bytes = client
        .query_one(
            &db.sql("SELECT COALESCE(SUM(octet_length(body)), 0)::bigint FROM {schema}.quarantine"),
            &[],
        )
        .await?
        .get(0);
    Ok(Stats {
        sinks,
        calls_waiting,
        quarantine_bytes,
    })
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

pub(super) async fn list_deliveries(
    db: &Db,
    filter: &ListFilter,
) -> Result<Vec<DeliveryRow>, StoreError> {
    let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
    let status = filter.status.map(DeliveryStatus::as_str);
    let rows = db
        .get()
        .await?
        .query(
            &db.sql(
                "SELECT d.id, e.call_id, e.event, d.sink, d.status, d.attempts, d.next_attempt_at,
                    d.last_error
             FROM {schema}.deliveries d JOIN {schema}.events e ON e.id = d.event_id
             WHERE ($1::text IS NULL OR d.sink = $1) AND ($2::text IS NULL OR d.status = $2)
               AND ($3::text IS NULL OR d.call_id = $3)
             ORDER BY d.id DESC LIMIT $4",
            ),
            &[&filter.sink, &status, &filter.call_id, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let status: String = r.get(4);
            let next: SystemTime = r.get(6);
            DeliveryRow {
                id: r.get(0),
                call_id: r.get(1),
                event: r.get(2),
                sink: r.get(3),
                next_attempt_at: (status == "pending").then(|| rfc3339(next)),
                status,
                attempts: u32::try_from(r.get::<_, i32>(5)).unwrap_or(0),
                last_error: r.get(7),
                sink_paused: None,
            }
        })
        .collect())
}

/// Puts the chosen deliveries of `sink` back to pending with their attempts reset, and
/// counts what it left as it was: pending ones, and events whose payload retention has
/// emptied (they cannot be sent again).
pub(super) async fn replay(db: &Db, sink: &str, which: &Replay) -> Result<Replayed, StoreError> {
    // One statement: the deliveries chosen, the reset of those that can be sent again
    // (rechecked under the row lock, so one claimed meanwhile stays as it is), and the
    // counts.
    let chosen = |selection: &str| {
        db.sql(&format!(
            "WITH chosen AS (
                 SELECT d.id, d.status = 'pending' AS pending,
                        octet_length(e.payload) = 0 AS emptied
                 FROM {{schema}}.deliveries d JOIN {{schema}}.events e ON e.id = d.event_id
                 WHERE d.sink = $1 AND {selection}
                 LIMIT {limit}
             ), reset AS (
                 UPDATE {{schema}}.deliveries d SET status = 'pending', attempts = 0,
                     next_attempt_at = now(), last_error = NULL, updated_at = now(),
                     lease_owner = NULL, lease_token = NULL, lease_until = NULL
                 FROM chosen c
                 WHERE d.id = c.id AND NOT c.emptied AND d.status <> 'pending'
                 RETURNING d.id
             )
             SELECT count(*), (SELECT count(*) FROM reset),
                    count(*) FILTER (WHERE emptied AND NOT pending)
             FROM chosen",
            limit = REPLAY_MAX + 1
        ))
    };
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let counts = match which {
        Replay::Status {
            status,
            since,
            until,
        } => {
            tx.query_one(
                &chosen(
                    "d.status = $2 AND ($3::timestamptz IS NULL OR e.received_at >= $3)
                     AND ($4::timestamptz IS NULL OR e.received_at < $4)",
                ),
                &[&sink, &status.as_str(), since, until],
            )
            .await?
        }
        Replay::CallId(call) => {
            tx.query_one(&chosen("d.call_id = $2"), &[&sink, call])
                .await?
        }
        Replay::Id(id) => tx.query_one(&chosen("d.id = $2"), &[&sink, id]).await?,
    };
    let count = |i: usize| usize::try_from(counts.get::<_, i64>(i)).unwrap_or(0);
    let (matched, replayed, payload_gone) = (count(0), count(1), count(2));
    if matched > REPLAY_MAX {
        tx.rollback().await?;
        return Ok(Replayed {
            too_many: true,
            ..Replayed::default()
        });
    }
    let mut out = Replayed {
        replayed,
        payload_gone,
        already_pending: matched.saturating_sub(replayed + payload_gone),
        too_many: false,
        other_sinks: None,
    };
    if replayed > 0 {
        tx.execute("SELECT pg_notify($1, $2)", &[&&*db.channel, &sink])
            .await?;
    }
    // Only when nothing matched: listing the sinks reads the whole table.
    if matched == 0
        && !tx
            .query_one(
                &db.sql("SELECT EXISTS (SELECT 1 FROM {schema}.deliveries WHERE sink = $1)"),
                &[&sink],
            )
            .await?
            .get::<_, bool>(0)
    {
        out.other_sinks = Some(
            tx.query(
                &db.sql("SELECT DISTINCT sink FROM {schema}.deliveries ORDER BY sink"),
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect(),
        );
    }
    tx.commit().await?;
    Ok(out)
}

pub(super) async fn show_events(db: &Db, call_id: &str) -> Result<Vec<EventRow>, StoreError> {
    let client = db.get().await?;
    let events = client
        .query(
            &db.sql(
                "SELECT id, dedup_key, event, source, received_at, payload FROM {schema}.events
             WHERE call_id = $1 ORDER BY id",
            ),
            &[&call_id],
        )
        .await?;
    let mut out = Vec::with_capacity(events.len());
    for e in &events {
        let event_id: i64 = e.get(0);
        let history = client
            .query(
                &db.sql(
                    "SELECT a.delivery_id, a.number, a.started_at, a.duration_ms, a.outcome,
                            a.code, a.error, a.response
                     FROM {schema}.attempts a JOIN {schema}.deliveries d ON d.id = a.delivery_id
                     WHERE d.event_id = $1 ORDER BY a.id",
                ),
                &[&event_id],
            )
            .await?;
        let deliveries = client
            .query(
                &db.sql(
                    "SELECT sink, status, attempts, last_error, id FROM {schema}.deliveries
                 WHERE event_id = $1 ORDER BY id",
                ),
                &[&event_id],
            )
            .await?
            .iter()
            .map(|d| {
                let delivery: i64 = d.get(4);
                SinkStatus {
                    sink: d.get(0),
                    status: d.get(1),
                    attempts: u32::try_from(d.get::<_, i32>(2)).unwrap_or(0),
                    last_error: d.get(3),
                    history: history
                        .iter()
                        .filter(|a| a.get::<_, i64>(0) == delivery)
                        .map(attempt_row)
                        .collect(),
                }
            })
            .collect();
        out.push(EventRow {
            id: e.get(1),
            event: e.get(2),
            source: e.get(3),
            received_at: rfc3339(e.get(4)),
            deliveries,
            payload: bytes::Bytes::from(e.get::<_, Vec<u8>>(5)),
        });
    }
    Ok(out)
}

/// `deliveries backfill`'s candidates: stored events after `from.after` that `sink` has no
/// delivery of, oldest first, with their payloads.
pub(super) async fn backfill_candidates(
    db: &Db,
    sink: &str,
    from: &BackfillFrom,
) -> Result<Vec<Stored>, StoreError> {
    let limit = i64::try_from(from.limit).unwrap_or(i64::MAX);
    Ok(db
        .get()
        .await?
        .query(
            &db.sql(
                "SELECT e.id, e.event, e.payload FROM {schema}.events e
                 WHERE e.id > $1
                   AND ($2::timestamptz IS NULL OR e.received_at >= $2)
                   AND ($3::timestamptz IS NULL OR e.received_at < $3)
                   AND ($4::text IS NULL OR e.event = $4)
                   AND NOT EXISTS (SELECT 1 FROM {schema}.deliveries d
                                   WHERE d.event_id = e.id AND d.sink = $5)
                 ORDER BY e.id LIMIT $6",
            ),
            &[
                &from.after,
                &from.since,
                &from.until,
                &from.event,
                &sink,
                &limit,
            ],
        )
        .await?
        .iter()
        .map(|r| Stored {
            id: r.get(0),
            event: r.get(1),
            payload: bytes::Bytes::from(r.get::<_, Vec<u8>>(2)),
        })
        .collect())
}

/// Gives `sink` a pending delivery of each event of `ids` it has none of (with its
/// payload still stored); returns how many were added.
pub(super) async fn backfill(db: &Db, sink: &str, ids: &[i64]) -> Result<usize, StoreError> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let added = tx
        .execute(
            &db.sql(
                "INSERT INTO {schema}.deliveries (event_id, sink, call_id, status, attempts,
                                                  next_attempt_at, updated_at)
                 SELECT e.id, $1, e.call_id, 'pending', 0, now(), now() FROM {schema}.events e
                 WHERE e.id = ANY($2) AND octet_length(e.payload) > 0
                   AND NOT EXISTS (SELECT 1 FROM {schema}.deliveries d
                                   WHERE d.event_id = e.id AND d.sink = $1)",
            ),
            &[&sink, &ids],
        )
        .await?;
    if added > 0 {
        tx.execute("SELECT pg_notify($1, $2)", &[&&*db.channel, &sink])
            .await?;
    }
    tx.commit().await?;
    Ok(usize::try_from(added).unwrap_or(0))
}

/// `events list`: newest first, by id (keyset pagination: `before`).
pub(super) async fn list_events(db: &Db, filter: &EventFilter) -> Result<EventPage, StoreError> {
    let client = db.get().await?;
    let limit = i64::try_from(filter.limit.max(1)).unwrap_or(i64::MAX);
    let events = client
        .query(
            &db.sql(
                "SELECT e.id, e.dedup_key, e.call_id, e.event, e.source, e.received_at
                 FROM {schema}.events e WHERE e.id < $1
                   AND ($2::timestamptz IS NULL OR e.received_at >= $2)
                   AND ($3::timestamptz IS NULL OR e.received_at < $3)
                   AND ($4::text IS NULL OR e.event = $4)
                   AND (($5::text IS NULL AND $6::text IS NULL) OR EXISTS (
                       SELECT 1 FROM {schema}.deliveries d WHERE d.event_id = e.id
                       AND ($5::text IS NULL OR d.sink = $5)
                       AND ($6::text IS NULL OR d.status = $6)))
                 ORDER BY e.id DESC LIMIT $7",
            ),
            &[
                &filter.before.unwrap_or(i64::MAX),
                &filter.since,
                &filter.until,
                &filter.event,
                &filter.sink,
                &filter.status.map(DeliveryStatus::as_str),
                &limit,
            ],
        )
        .await?;
    let ids: Vec<i64> = events.iter().map(|e| e.get(0)).collect();
    let deliveries = client
        .query(
            &db.sql(
                "SELECT event_id, sink, status, attempts, last_error FROM {schema}.deliveries
                 WHERE event_id = ANY($1) ORDER BY id",
            ),
            &[&ids],
        )
        .await?;
    let next_before = (ids.len() == usize::try_from(limit).unwrap_or(usize::MAX))
        .then(|| ids.last().copied())
        .flatten();
    let events = events
        .iter()
        .map(|e| {
            let id: i64 = e.get(0);
            EventSummary {
                id,
                key: e.get(1),
                call_id: e.get(2),
                event: e.get(3),
                source: e.get(4),
                received_at: rfc3339(e.get(5)),
                deliveries: deliveries
                    .iter()
                    .filter(|d| d.get::<_, i64>(0) == id)
                    .map(|d| SinkStatus {
                        sink: d.get(1),
                        status: d.get(2),
                        attempts: u32::try_from(d.get::<_, i32>(3)).unwrap_or(0),
                        last_error: d.get(4),
                        history: Vec::new(),
                    })
                    .collect(),
            }
        })
        .collect();
    Ok(EventPage {
        events,
        next_before,
    })
}

/// A row of the attempts table (after its delivery id) as `events show` shows it.
fn attempt_row(a: &tokio_postgres::Row) -> AttemptRow {
    AttemptRow {
        number: u32::try_from(a.get::<_, i32>(1)).unwrap_or(0),
        at: humantime::format_rfc3339_millis(a.get(2)).to_string(),
        duration_ms: u64::try_from(a.get::<_, i64>(3)).unwrap_or(0),
        outcome: a.get(4),
        code: a
            .get::<_, Option<i32>>(5)
            .and_then(|c| u16::try_from(c).ok()),
        error: a.get(6),
        response: a.get(7),
    }
}

pub(super) async fn poll_status(db: &Db, limit: usize) -> Result<Vec<PollRow>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = db
        .get()
        .await?
        .query(
            &db.sql("SELECT call_id, status, next_poll_at, polls, first_seen_at, last_result FROM {schema}.polls
             ORDER BY status <> 'waiting',
                      CASE WHEN status = 'waiting' THEN next_poll_at END,
                      updated_at DESC
             LIMIT $1"),
            &[&limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let status: String = r.get(1);
            let next: SystemTime = r.get(2);
            PollRow {
                call_id: r.get(0),
                next_poll_at: (status == "waiting").then(|| rfc3339(next)),
                status,
                polls: u32::try_from(r.get::<_, i32>(3)).unwrap_or(0),
                first_seen_at: rfc3339(r.get(4)),
                last_result: r.get(5),
            }
        })
        .collect())
}
