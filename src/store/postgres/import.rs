//! `store migrate`: copies a SQLite store into PostgreSQL, so a team that outgrows one
//! sidecar keeps its backlog (pending deliveries stay pending), its dead letters and its
//! dedup history. Events go over in their original order, in batches, each batch with its
//! deliveries in one transaction; an event already there is skipped with its deliveries,
//! so running it again (after an interruption) copies only what is missing.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, params};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::Db;
use crate::store::StoreError;

/// Events copied per transaction.
const BATCH: i64 = 500;

/// What a migration copied; `skipped` were in PostgreSQL already.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Migrated {
    pub events: u64,
    pub skipped: u64,
    pub pending: u64,
    pub delivered: u64,
    pub dead: u64,
    pub polls: u64,
    pub quarantined: u64,
}

fn at(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// One SQLite delivery on its way over, its event id already PostgreSQL's.
struct Delivery {
    event_id: i64,
    sink: String,
    call_id: Option<String>,
    status: String,
    attempts: i32,
    next_attempt_at: SystemTime,
    last_error: Option<String>,
    updated_at: SystemTime,
}

/// One SQLite event on its way over.
struct Row {
    id: i64,
    dedup_key: String,
    event: String,
    call_id: Option<String>,
    source: String,
    received_at: SystemTime,
    payload: Vec<u8>,
}

/// Copies everything from the SQLite database at `from` into the (migrated) PostgreSQL
/// database `client` is connected to.
pub(super) async fn from_sqlite(
    from: &Path,
    db: &Db,
    client: &mut deadpool_postgres::Client,
) -> Result<Migrated, StoreError> {
    let sqlite = Connection::open_with_flags(
        from,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| StoreError::Open {
        path: from.to_owned(),
        source: Box::new(source),
    })?;
    let mut done = Migrated::default();
    let mut after = 0i64;
    loop {
        let rows = events_after(&sqlite, after)?;
        let Some(last) = rows.last().map(|r| r.id) else {
            break;
        };
        copy_batch(&sqlite, db, client, &rows, &mut done).await?;
        after = last;
    }
    copy_polls(&sqlite, db, client, &mut done).await?;
    copy_quarantine(&sqlite, db, client, &mut done).await?;
    Ok(done)
}

fn events_after(sqlite: &Connection, after: i64) -> Result<Vec<Row>, StoreError> {
    let mut stmt = sqlite.prepare_cached(
        "SELECT id, dedup_key, event, call_id, source, received_at, codec, payload FROM events
         WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after, BATCH], |r| {
        Ok((
            Row {
                id: r.get(0)?,
                dedup_key: r.get(1)?,
                event: r.get(2)?,
                call_id: r.get(3)?,
                source: r.get(4)?,
                received_at: at(r.get(5)?),
                payload: r.get(7)?,
            },
            r.get::<_, i64>(6)?,
        ))
    })?;
    // PostgreSQL keeps payloads as signed.
    let mut out = Vec::new();
    for row in rows {
        let (mut row, codec) = row?;
        if codec != 0 {
            row.payload = zstd::decode_all(&row.payload[..]).map_err(|e| {
                StoreError::Setup(format!(
                    "the stored payload of event {} is damaged: {e}",
                    row.id
                ))
            })?;
        }
        out.push(row);
    }
    Ok(out)
}

async fn copy_batch(
    sqlite: &Connection,
    db: &Db,
    client: &mut deadpool_postgres::Client,
    rows: &[Row],
    done: &mut Migrated,
) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    let inserted = tx
        .query(
            &db.sql("INSERT INTO {schema}.events (dedup_key, event, call_id, source, received_at, payload)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                                  $5::timestamptz[], $6::bytea[])
             ON CONFLICT (dedup_key) DO NOTHING
             RETURNING id, dedup_key"),
            &[
                &rows
                    .iter()
                    .map(|r| r.dedup_key.as_str())
                    .collect::<Vec<_>>(),
                &rows.iter().map(|r| r.event.as_str()).collect::<Vec<_>>(),
                &rows
                    .iter()
                    .map(|r| r.call_id.as_deref())
                    .collect::<Vec<_>>(),
                &rows.iter().map(|r| r.source.as_str()).collect::<Vec<_>>(),
                &rows.iter().map(|r| r.received_at).collect::<Vec<_>>(),
                &rows
                    .iter()
                    .map(|r| r.payload.as_slice())
                    .collect::<Vec<_>>(),
            ],
        )
        .await?;
    let new_id: HashMap<String, i64> = inserted.iter().map(|r| (r.get(1), r.get(0))).collect();
    done.events += u64::try_from(new_id.len()).unwrap_or(0);
    done.skipped += u64::try_from(rows.len() - new_id.len()).unwrap_or(0);

    // The deliveries of the events that went over, with their state as it was.
    let ids: HashMap<i64, i64> = rows
        .iter()
        .filter_map(|r| new_id.get(&r.dedup_key).map(|pg| (r.id, *pg)))
        .collect();
    let mut stmt = sqlite.prepare_cached(
        "SELECT event_id, sink, call_id, status, attempts, next_attempt_at, last_error, updated_at
         FROM outbox WHERE event_id >= ?1 AND event_id <= ?2 ORDER BY event_id, sink",
    )?;
    let (first, last) = (rows[0].id, rows[rows.len() - 1].id);
    let mut deliveries: Vec<Delivery> = Vec::new();
    for d in stmt.query_map(params![first, last], |r| {
        Ok(Delivery {
            event_id: r.get(0)?,
            sink: r.get(1)?,
            call_id: r.get(2)?,
            status: r.get(3)?,
            attempts: r.get(4)?,
            next_attempt_at: at(r.get(5)?),
            last_error: r.get(6)?,
            updated_at: at(r.get(7)?),
        })
    })? {
        let mut d = d?;
        let Some(pg_event) = ids.get(&d.event_id) else {
            continue;
        };
        d.event_id = *pg_event;
        match d.status.as_str() {
            "pending" => done.pending += 1,
            "delivered" => done.delivered += 1,
            _ => done.dead += 1,
        }
        deliveries.push(d);
    }
    if !deliveries.is_empty() {
        tx.execute(
            &db.sql("INSERT INTO {schema}.deliveries (event_id, sink, call_id, status, attempts, next_attempt_at,
                                     last_error, updated_at)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::int[],
                                  $6::timestamptz[], $7::text[], $8::timestamptz[])"),
            &[
                &deliveries.iter().map(|d| d.event_id).collect::<Vec<_>>(),
                &deliveries
                    .iter()
                    .map(|d| d.sink.as_str())
                    .collect::<Vec<_>>(),
                &deliveries
                    .iter()
                    .map(|d| d.call_id.as_deref())
                    .collect::<Vec<_>>(),
                &deliveries
                    .iter()
                    .map(|d| d.status.as_str())
                    .collect::<Vec<_>>(),
                &deliveries.iter().map(|d| d.attempts).collect::<Vec<_>>(),
                &deliveries
                    .iter()
                    .map(|d| d.next_attempt_at)
                    .collect::<Vec<_>>(),
                &deliveries
                    .iter()
                    .map(|d| d.last_error.as_deref())
                    .collect::<Vec<_>>(),
                &deliveries.iter().map(|d| d.updated_at).collect::<Vec<_>>(),
            ],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn copy_polls(
    sqlite: &Connection,
    db: &Db,
    client: &deadpool_postgres::Client,
    done: &mut Migrated,
) -> Result<(), StoreError> {
    let mut stmt = sqlite.prepare(
        "SELECT call_id, status, first_seen_at, last_event_at, next_poll_at, polls, last_result,
                updated_at FROM polls",
    )?;
    let insert = client
        .prepare(
            &db.sql("INSERT INTO {schema}.polls (call_id, status, first_seen_at, last_event_at, next_poll_at,
                                polls, last_result, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (call_id) DO NOTHING"),
        )
        .await?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            at(r.get(2)?),
            at(r.get(3)?),
            at(r.get(4)?),
            r.get::<_, i32>(5)?,
            r.get::<_, Option<String>>(6)?,
            at(r.get(7)?),
        ))
    })?;
    for row in rows {
        let (call, status, first, last, next, polls, result, updated) = row?;
        done.polls += client
            .execute(
                &insert,
                &[
                    &call, &status, &first, &last, &next, &polls, &result, &updated,
                ],
            )
            .await?;
    }
    Ok(())
}

async fn copy_quarantine(
    sqlite: &Connection,
    db: &Db,
    client: &deadpool_postgres::Client,
    done: &mut Migrated,
) -> Result<(), StoreError> {
    let mut stmt = sqlite
        .prepare("SELECT received_at, reason, event_header, body FROM quarantine ORDER BY id")?;
    let insert = client
        .prepare(&db.sql(
            "INSERT INTO {schema}.quarantine (received_at, reason, event_header, body, body_hash)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (body_hash) DO NOTHING",
        ))
        .await?;
    let rows = stmt.query_map([], |r| {
        Ok((
            at(r.get(0)?),
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, Vec<u8>>(3)?,
        ))
    })?;
    for row in rows {
        let (received, reason, header, body) = row?;
        // Bodies quarantined before hashes were kept get theirs here.
        let hash = Sha256::digest(&body).to_vec();
        done.quarantined += client
            .execute(&insert, &[&received, &reason, &header, &body, &hash])
            .await?;
    }
    Ok(())
}
