//! `store migrate`: fills PostgreSQL from another store's export (`store::export`), so a
//! team that outgrows one sidecar keeps its backlog (pending deliveries stay pending), its
//! dead letters with their attempt histories, and its dedup history. Events go over in their original order, in
//! batches, each batch with its deliveries in one transaction; an event already there is
//! skipped with its deliveries, so running it again (after an interruption) copies only
//! what is missing.

use std::collections::HashMap;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::db::Db;
use crate::store::StoreError;
use crate::store::export::{Export, ExportedAttempt, ExportedDelivery, ExportedEvent};

/// Events copied per transaction.
const BATCH: usize = 500;

/// What a migration copied; `skipped` were in PostgreSQL already.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Migrated {
    pub events: u64,
    pub skipped: u64,
    pub pending: u64,
    pub delivered: u64,
    pub dead: u64,
    /// Kept attempts of the deliveries copied.
    pub attempts: u64,
    pub polls: u64,
    pub quarantined: u64,
}

/// Copies everything `from` exports into the (migrated) PostgreSQL database `client` is
/// connected to.
pub(super) async fn from_export(
    from: &mut dyn Export,
    db: &Db,
    client: &mut deadpool_postgres::Client,
) -> Result<Migrated, StoreError> {
    let mut done = Migrated::default();
    loop {
        let events = from.next_events(BATCH)?;
        if events.is_empty() {
            break;
        }
        copy_batch(db, client, &events, &mut done).await?;
    }
    copy_polls(from, db, client, &mut done).await?;
    copy_quarantine(from, db, client, &mut done).await?;
    Ok(done)
}

async fn copy_batch(
    db: &Db,
    client: &mut deadpool_postgres::Client,
    events: &[ExportedEvent],
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
                &events.iter().map(|e| e.dedup_key.as_str()).collect::<Vec<_>>(),
                &events.iter().map(|e| e.event.as_str()).collect::<Vec<_>>(),
                &events.iter().map(|e| e.call_id.as_deref()).collect::<Vec<_>>(),
                &events.iter().map(|e| e.source.as_str()).collect::<Vec<_>>(),
                &events.iter().map(|e| e.received_at).collect::<Vec<_>>(),
                &events.iter().map(|e| e.payload.as_slice()).collect::<Vec<_>>(),
            ],
        )
        .await?;
    let new_id: HashMap<String, i64> = inserted.iter().map(|r| (r.get(1), r.get(0))).collect();
    done.events += u64::try_from(new_id.len()).unwrap_or(0);
    done.skipped += u64::try_from(events.len() - new_id.len()).unwrap_or(0);

    // The deliveries of the events that went over, with their state as it was.
    let mut deliveries: Vec<(i64, Option<&str>, &ExportedDelivery)> = Vec::new();
    for e in events {
        let Some(id) = new_id.get(&e.dedup_key) else {
            continue;
        };
        for d in &e.deliveries {
            match d.status.as_str() {
                "pending" => done.pending += 1,
                "delivered" => done.delivered += 1,
                _ => done.dead += 1,
            }
            deliveries.push((*id, e.call_id.as_deref(), d));
        }
    }
    if !deliveries.is_empty() {
        let inserted = tx.query(
            &db.sql("INSERT INTO {schema}.deliveries (event_id, sink, call_id, status, attempts, next_attempt_at,
                                     last_error, updated_at)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::int[],
                                  $6::timestamptz[], $7::text[], $8::timestamptz[])
             RETURNING id, event_id, sink"),
            &[
                &deliveries.iter().map(|(id, _, _)| *id).collect::<Vec<_>>(),
                &deliveries.iter().map(|(_, _, d)| d.sink.as_str()).collect::<Vec<_>>(),
                &deliveries.iter().map(|(_, call, _)| *call).collect::<Vec<_>>(),
                &deliveries.iter().map(|(_, _, d)| d.status.as_str()).collect::<Vec<_>>(),
                &deliveries.iter().map(|(_, _, d)| d.attempts).collect::<Vec<_>>(),
                &deliveries.iter().map(|(_, _, d)| d.next_attempt_at).collect::<Vec<_>>(),
                &deliveries.iter().map(|(_, _, d)| d.last_error.as_deref()).collect::<Vec<_>>(),
                &deliveries.iter().map(|(_, _, d)| d.updated_at).collect::<Vec<_>>(),
            ],
        )
        .await?;
        let delivery_id: HashMap<(i64, &str), i64> = inserted
            .iter()
            .map(|r| ((r.get(1), r.get(2)), r.get(0)))
            .collect();
        let history: Vec<(i64, &ExportedAttempt)> = deliveries
            .iter()
            .filter_map(|(event, _, d)| Some((*delivery_id.get(&(*event, d.sink.as_str()))?, d)))
            .flat_map(|(id, d)| d.history.iter().map(move |a| (id, a)))
            .collect();
        done.attempts += u64::try_from(history.len()).unwrap_or(0);
        copy_history(db, &tx, &history).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Each delivery's kept attempts, in the order they were made.
async fn copy_history(
    db: &Db,
    tx: &deadpool_postgres::Transaction<'_>,
    history: &[(i64, &ExportedAttempt)],
) -> Result<(), StoreError> {
    if history.is_empty() {
        return Ok(());
    }
    tx.execute(
        &db.sql(
            "INSERT INTO {schema}.attempts (delivery_id, number, started_at, duration_ms, outcome,
                                code, error, response)
         SELECT delivery_id, number, started_at, duration_ms, outcome, code, error, response
         FROM unnest($1::bigint[], $2::int[], $3::timestamptz[], $4::bigint[],
                     $5::text[], $6::int[], $7::text[], $8::text[])
              WITH ORDINALITY
              AS a(delivery_id, number, started_at, duration_ms, outcome, code, error, response, n)
         ORDER BY n",
        ),
        &[
            &history.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            &history.iter().map(|(_, a)| a.number).collect::<Vec<_>>(),
            &history
                .iter()
                .map(|(_, a)| a.started_at)
                .collect::<Vec<_>>(),
            &history
                .iter()
                .map(|(_, a)| a.duration_ms)
                .collect::<Vec<_>>(),
            &history
                .iter()
                .map(|(_, a)| a.outcome.as_str())
                .collect::<Vec<_>>(),
            &history.iter().map(|(_, a)| a.code).collect::<Vec<_>>(),
            &history
                .iter()
                .map(|(_, a)| a.error.as_deref())
                .collect::<Vec<_>>(),
            &history
                .iter()
                .map(|(_, a)| a.response.as_deref())
                .collect::<Vec<_>>(),
        ],
    )
    .await?;
    Ok(())
}

async fn copy_polls(
    from: &mut dyn Export,
    db: &Db,
    client: &deadpool_postgres::Client,
    done: &mut Migrated,
) -> Result<(), StoreError> {
    let insert = client
        .prepare(
            &db.sql("INSERT INTO {schema}.polls (call_id, status, first_seen_at, last_event_at, next_poll_at,
                                polls, last_result, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (call_id) DO NOTHING"),
        )
        .await?;
    for p in from.polls()? {
        done.polls += client
            .execute(
                &insert,
                &[
                    &p.call_id,
                    &p.status,
                    &p.first_seen_at,
                    &p.last_event_at,
                    &p.next_poll_at,
                    &p.polls,
                    &p.last_result,
                    &p.updated_at,
                ],
            )
            .await?;
    }
    Ok(())
}

async fn copy_quarantine(
    from: &mut dyn Export,
    db: &Db,
    client: &deadpool_postgres::Client,
    done: &mut Migrated,
) -> Result<(), StoreError> {
    let insert = client
        .prepare(&db.sql(
            "INSERT INTO {schema}.quarantine (received_at, reason, event_header, body, body_hash)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (body_hash) DO NOTHING",
        ))
        .await?;
    for q in from.quarantine()? {
        // Bodies quarantined before hashes were kept get theirs here.
        let hash = Sha256::digest(&q.body).to_vec();
        done.quarantined += client
            .execute(
                &insert,
                &[&q.received_at, &q.reason, &q.event_header, &q.body, &hash],
            )
            .await?;
    }
    Ok(())
}
