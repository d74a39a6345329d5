//! Claims on PostgreSQL: every replica dispatches, so a delivery is taken with
//! `FOR UPDATE SKIP LOCKED` and leased to one replica under a random token until a time
//! of the database's clock. A heartbeat renews the leases this replica still holds; an
//! outcome is recorded only under the token it was claimed with, so a replica that was
//! paused past its lease cannot overwrite the result of the replica that took over; an
//! expired lease makes the delivery free to claim again.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use super::db::Db;
use bytes::Bytes;

use crate::event::{Claim, Delivery, DeliveryId, Source};
use crate::store::{Attempt, Settlement, StoreError};

/// Claims, in one statement: due deliveries of a sink that nobody holds, none whose call
/// has an earlier delivery pending on the sink or another one in hand (an earlier event
/// whose commit became visible after a later one's: ids are taken at insert, in commit
/// order only per writer), oldest first, skipping the rows other
/// claims are taking (`SKIP LOCKED`); as many as fit in the byte budget, and at least one.
///
/// One statement commits as soon as it has run, so the lease starts when the rows are
/// taken. In a transaction of several statements, a process that stalled before its
/// `COMMIT` (paused, starved of CPU) would commit leases that had already run out: another
/// replica would take the rows over at once, and both would deliver them.
const CLAIM: &str = "
WITH candidates AS (
    SELECT d.id, d.next_attempt_at, octet_length(e.payload)::bigint AS bytes
    FROM {schema}.deliveries d JOIN {schema}.events e ON e.id = d.event_id
    WHERE d.sink = $1 AND d.status = 'pending' AND d.next_attempt_at <= now()
      AND (d.lease_until IS NULL OR d.lease_until < now())
      AND NOT EXISTS (
          SELECT 1 FROM {schema}.deliveries p
          WHERE p.sink = d.sink AND p.call_id = d.call_id AND p.status = 'pending'
            AND (p.event_id < d.event_id OR (p.id <> d.id AND p.lease_until >= now())))
    ORDER BY d.next_attempt_at, d.id
    LIMIT $2
    FOR UPDATE OF d SKIP LOCKED),
taken AS (
    SELECT id, (sum(bytes) OVER (ORDER BY next_attempt_at, id) - bytes)::bigint AS before
    FROM candidates)
UPDATE {schema}.deliveries d SET lease_owner = $3, lease_token = $4,
    lease_until = clock_timestamp() + make_interval(secs => $5)
FROM taken t
WHERE d.id = t.id AND (t.before = 0 OR t.before < $6)
RETURNING d.id";

const FETCH: &str = "
SELECT d.id, d.attempts, e.event, e.call_id, e.dedup_key, e.source, e.received_at, e.payload
FROM {schema}.deliveries d JOIN {schema}.events e ON e.id = d.event_id
WHERE d.id = ANY($1)
ORDER BY d.next_attempt_at, d.id";

/// Outcomes recorded only where the claim still holds; the rows it returns were recorded.
/// Records the outcomes of the deliveries still leased under their tokens, and the
/// attempts of those in their histories: the oldest dropped to leave room for the new
/// one within `$15` per delivery.
const SETTLE: &str = "
WITH settled AS (
    UPDATE {schema}.deliveries d SET
        status = u.status,
        attempts = d.attempts + u.counted,
        next_attempt_at = COALESCE(u.at, d.next_attempt_at),
        last_error = u.error,
        updated_at = now(),
        lease_owner = NULL, lease_token = NULL, lease_until = NULL
    FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::int[], $5::timestamptz[], $6::text[])
        AS u(id, token, status, counted, at, error)
    WHERE d.id = u.id AND d.lease_token = u.token AND d.status = 'pending'
    RETURNING d.id
), history AS (
    SELECT * FROM unnest($7::bigint[], $8::int[], $9::timestamptz[], $10::bigint[],
                         $11::text[], $12::int[], $13::text[], $14::text[])
        AS h(id, number, started_at, duration_ms, outcome, code, error, response)
    WHERE h.id IN (SELECT id FROM settled)
), trimmed AS (
    DELETE FROM {schema}.attempts t WHERE t.id IN (
        SELECT r.id FROM (
            SELECT a.id, row_number() OVER (PARTITION BY a.delivery_id ORDER BY a.id DESC) AS n
            FROM {schema}.attempts a WHERE a.delivery_id IN (SELECT id FROM history)) r
        WHERE r.n >= $15)
), recorded AS (
    INSERT INTO {schema}.attempts (delivery_id, number, started_at, duration_ms, outcome,
                                   code, error, response)
    SELECT id, number, started_at, duration_ms, outcome, code, error, response FROM history
)
SELECT id FROM settled";

const RENEW: &str = "
UPDATE {schema}.deliveries d SET lease_until = now() + make_interval(secs => $3)
FROM unnest($1::bigint[], $2::bigint[]) AS u(id, token)
WHERE d.id = u.id AND d.lease_token = u.token AND d.status = 'pending'";

const RELEASE: &str = "
UPDATE {schema}.deliveries d SET lease_owner = NULL, lease_token = NULL, lease_until = NULL
FROM unnest($1::bigint[], $2::bigint[]) AS u(id, token)
WHERE d.id = u.id AND d.lease_token = u.token";

/// The claims this replica holds: row -> token, for the heartbeat and for release.
#[derive(Default)]
pub(super) struct Held(Mutex<HashMap<i64, i64>>);

impl Held {
    fn insert(&self, rows: &[i64], token: i64) {
        let mut held = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for row in rows {
            held.insert(*row, token);
        }
    }

    fn remove(&self, ids: &[DeliveryId]) {
        let mut held = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for id in ids {
            held.remove(&id.row);
        }
    }

    /// Every claim held, as (rows, tokens).
    pub(super) fn all(&self) -> (Vec<i64>, Vec<i64>) {
        let held = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        held.iter().map(|(row, token)| (*row, *token)).unzip()
    }
}

/// The lease a delivery was claimed under; one handed out by no lease matches none.
fn token_of(id: DeliveryId) -> i64 {
    match id.claim {
        Claim::Lease(token) => token,
        Claim::Unclaimed | Claim::Log { .. } => 0,
    }
}

/// Claims up to `limit` due deliveries of `sink`, about `max_bytes` of payload at most
/// (at least one), for `lease`.
pub(super) async fn claim(
    db: &Db,
    held: &Held,
    owner: &str,
    lease: Duration,
    sink: &str,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<Delivery>, StoreError> {
    let token = fastrand::i64(1..);
    let client = db.get().await?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
    let rows: Vec<i64> = client
        .query(
            &db.sql(CLAIM),
            &[
                &sink,
                &limit,
                &owner,
                &token,
                &lease.as_secs_f64(),
                &max_bytes,
            ],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let claimed = match client.query(&db.sql(FETCH), &[&rows]).await {
        Ok(claimed) => claimed,
        Err(e) => {
            // The dispatcher never learns of these claims, so nothing would settle or
            // release them: give them back now. If that fails too, they are not held, so
            // the heartbeat leaves their lease to run out.
            let tokens = vec![token; rows.len()];
            let released: Result<(), StoreError> = match db.get().await {
                Ok(c) => c
                    .execute(&db.sql(RELEASE), &[&rows, &tokens])
                    .await
                    .map(drop)
                    .map_err(Into::into),
                Err(e) => Err(e.into()),
            };
            if let Err(release) = released {
                tracing::warn!(sink, error = %release, "cannot give back claims whose rows could not be read");
            }
            return Err(e.into());
        }
    };
    held.insert(&rows, token);
    claimed
        .iter()
        .map(|row| {
            let attempts: i32 = row.get(1);
            let source: String = row.get(5);
            let received_at: SystemTime = row.get(6);
            let payload: Vec<u8> = row.get(7);
            Ok(Delivery {
                id: DeliveryId {
                    row: row.get(0),
                    claim: Claim::Lease(token),
                },
                attempts: u32::try_from(attempts).unwrap_or(0),
                event: row.get(2),
                call_id: row.get(3),
                dedup_key: row.get(4),
                source: Source::parse(&source).unwrap_or(Source::Webhook),
                received_at,
                payload: Bytes::from(payload),
            })
        })
        .collect()
}

/// Records outcomes under their claims; returns how many were refused because the claim
/// had passed to another replica.
pub(super) async fn settle(
    db: &Db,
    held: &Held,
    settlements: &[Settlement],
    attempts: &[Attempt],
    keep: usize,
) -> Result<u64, StoreError> {
    let mut ids = Vec::with_capacity(settlements.len());
    let mut tokens = Vec::with_capacity(settlements.len());
    let mut statuses = Vec::with_capacity(settlements.len());
    let mut counted = Vec::with_capacity(settlements.len());
    let mut ats: Vec<Option<SystemTime>> = Vec::with_capacity(settlements.len());
    let mut errors: Vec<Option<&str>> = Vec::with_capacity(settlements.len());
    for s in settlements {
        let id = s.id();
        ids.push(id.row);
        tokens.push(token_of(id));
        let (status, count, at, error) = match s {
            Settlement::Delivered { .. } => ("delivered", 1i32, None, None),
            Settlement::Retry { at, error, .. } => ("pending", 1, Some(*at), Some(error.as_str())),
            Settlement::Postpone { at, error, .. } => {
                ("pending", 0, Some(*at), Some(error.as_str()))
            }
            Settlement::Dead { error, .. } => ("dead", 1, None, Some(error.as_str())),
        };
        statuses.push(status);
        counted.push(count);
        ats.push(at);
        errors.push(error);
    }
    let history = History::of(if keep > 0 { attempts } else { &[] });
    let keep = i64::try_from(keep).unwrap_or(i64::MAX);
    let recorded = db
        .get()
        .await?
        .query(
            &db.sql(SETTLE),
            &[
                &ids,
                &tokens,
                &statuses,
                &counted,
                &ats,
                &errors,
                &history.ids,
                &history.numbers,
                &history.started,
                &history.durations,
                &history.outcomes,
                &history.codes,
                &history.errors,
                &history.responses,
                &keep,
            ],
        )
        .await;
    // Recorded or not, the claim ends here: an unrecorded outcome leaves the delivery
    // pending, and its lease runs out.
    let settled: Vec<DeliveryId> = settlements.iter().map(Settlement::id).collect();
    held.remove(&settled);
    let recorded = recorded?;
    Ok(u64::try_from(settlements.len().saturating_sub(recorded.len())).unwrap_or(0))
}

/// Attempts as the columns [`SETTLE`] takes them.
struct History<'a> {
    ids: Vec<i64>,
    numbers: Vec<i32>,
    started: Vec<SystemTime>,
    durations: Vec<i64>,
    outcomes: Vec<&'static str>,
    codes: Vec<Option<i32>>,
    errors: Vec<Option<&'a str>>,
    responses: Vec<Option<&'a str>>,
}

impl<'a> History<'a> {
    fn of(attempts: &'a [Attempt]) -> History<'a> {
        History {
            ids: attempts.iter().map(|a| a.id.row).collect(),
            numbers: attempts
                .iter()
                .map(|a| i32::try_from(a.number).unwrap_or(i32::MAX))
                .collect(),
            started: attempts.iter().map(|a| a.started_at).collect(),
            durations: attempts
                .iter()
                .map(|a| i64::try_from(a.duration.as_millis()).unwrap_or(i64::MAX))
                .collect(),
            outcomes: attempts.iter().map(|a| a.outcome.as_str()).collect(),
            codes: attempts.iter().map(|a| a.code.map(i32::from)).collect(),
            errors: attempts.iter().map(|a| a.error.as_deref()).collect(),
            responses: attempts.iter().map(|a| a.response.as_deref()).collect(),
        }
    }
}

/// Ends claims without an outcome, so another dispatcher may take the rows at once.
pub(super) async fn release(db: &Db, held: &Held, ids: &[DeliveryId]) -> Result<(), StoreError> {
    held.remove(ids);
    let rows: Vec<i64> = ids.iter().map(|id| id.row).collect();
    let tokens: Vec<i64> = ids.iter().map(|id| token_of(*id)).collect();
    db.get()
        .await?
        .execute(&db.sql(RELEASE), &[&rows, &tokens])
        .await?;
    Ok(())
}

/// Extends every lease this replica holds.
pub(super) async fn renew(db: &Db, held: &Held, lease: Duration) -> Result<(), StoreError> {
    let (rows, tokens) = held.all();
    if rows.is_empty() {
        return Ok(());
    }
    db.get()
        .await?
        .execute(&db.sql(RENEW), &[&rows, &tokens, &lease.as_secs_f64()])
        .await?;
    Ok(())
}

/// Gives up every lease this replica holds (it is shutting down).
pub(super) async fn release_all(db: &Db, held: &Held) -> Result<(), StoreError> {
    let (rows, tokens) = held.all();
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<DeliveryId> = rows
        .iter()
        .zip(&tokens)
        .map(|(row, token)| DeliveryId {
            row: *row,
            claim: Claim::Lease(*token),
        })
        .collect();
    release(db, held, &ids).await
}
