//! Ingest on PostgreSQL with group commit: a few writer tasks each take whatever is queued
//! (up to [`MAX_GROUP`] events), store it in one transaction, and answer every caller once
//! `COMMIT` has returned. Concurrent requests share a commit, so throughput is not one
//! fsync per event; within the transaction the statements are pipelined.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::db::Db;
use futures_util::future::join_all;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::event::Event;
use crate::protocol::ALL_PROCESSING_COMPLETED;
use crate::store::wakers::Wakers;
use crate::store::{Ingested, StoreError};

/// Events stored in one transaction at most.
const MAX_GROUP: usize = 256;

/// One event waiting to be stored.
pub(super) struct Op {
    pub(super) event: Event,
    pub(super) sinks: Vec<Arc<str>>,
    pub(super) reply: oneshot::Sender<Result<Ingested, StoreError>>,
}

/// What the writers share.
pub(super) struct Writers {
    pub(super) db: Db,
    pub(super) queue: Mutex<mpsc::Receiver<Option<Op>>>,
    pub(super) wakers: Arc<Wakers>,
    /// Whether the last commit succeeded (readiness).
    pub(super) writable: Arc<AtomicBool>,
    /// When the poller runs: seconds after a call's latest event to poll it.
    pub(super) track_calls: Option<f64>,
}

/// A group's events and the deliveries they fan out to, in one statement: each event goes
/// in only if its key is new (a key twice in the group is stored once, the first time),
/// in the order given (`ord`); returns the keys stored. One statement per group rather
/// than one per event: on a small machine the database's per-statement work, not the
/// fsync, is what limits ingest. Sink names cannot hold a comma (the config refuses it),
/// so each event's sinks travel as one comma-separated text.
const INSERT: &str = "
WITH i AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[])
        WITH ORDINALITY AS i(dedup_key, event, call_id, source, payload, sinks, ord)),
e AS (
    INSERT INTO {schema}.events (dedup_key, event, call_id, source, received_at, payload)
    SELECT dedup_key, event, call_id, source, now(), payload FROM i ORDER BY ord
    ON CONFLICT (dedup_key) DO NOTHING
    RETURNING id, dedup_key, call_id),
d AS (
    INSERT INTO {schema}.deliveries (event_id, sink, call_id, status, next_attempt_at, updated_at)
    SELECT e.id, s.sink, e.call_id, 'pending', now(), now()
    FROM e
    JOIN (SELECT DISTINCT ON (dedup_key) dedup_key, sinks FROM i ORDER BY dedup_key, ord) f
        USING (dedup_key)
    CROSS JOIN unnest(string_to_array(f.sinks, ',')) AS s(sink)
    ORDER BY e.id
    RETURNING 1)
SELECT dedup_key FROM e";

/// Any event but the analysis (re)starts the wait for it.
const TRACK_WAITING: &str = "
INSERT INTO {schema}.polls (call_id, status, first_seen_at, last_event_at, next_poll_at, last_result, updated_at)
VALUES ($1, 'waiting', now(), now(), now() + make_interval(secs => $2), 'waiting for the analysis webhook', now())
ON CONFLICT (call_id) DO UPDATE SET last_event_at = now(), updated_at = now(),
    next_poll_at = CASE WHEN polls.status = 'waiting'
        THEN GREATEST(polls.next_poll_at, EXCLUDED.next_poll_at) ELSE polls.next_poll_at END";

/// The analysis, from whatever source, ends it.
const TRACK_DONE: &str = "
INSERT INTO {schema}.polls (call_id, status, first_seen_at, last_event_at, next_poll_at, last_result, updated_at)
VALUES ($1, 'done', now(), now(), now(), $2, now())
ON CONFLICT (call_id) DO UPDATE SET status = 'done', last_event_at = now(), last_result = $2,
    updated_at = now()";

/// Takes groups off the queue until it hands out `None` (the store is closing).
pub(super) async fn run(writers: Arc<Writers>) {
    loop {
        let mut group = Vec::new();
        let mut closing = false;
        {
            let mut queue = writers.queue.lock().await;
            match queue.recv().await {
                Some(Some(op)) => group.push(op),
                Some(None) | None => return,
            }
            while group.len() < MAX_GROUP {
                match queue.try_recv() {
                    Ok(Some(op)) => group.push(op),
                    Ok(None) => {
                        closing = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        // A caller whose deadline passed got its 503: what it was refused is not stored.
        group.retain(|op| !op.reply.is_closed());
        if !group.is_empty() {
            commit_group(&writers, group).await;
        }
        if closing {
            return;
        }
    }
}

async fn commit_group(writers: &Writers, group: Vec<Op>) {
    match commit(writers, &group).await {
        Ok(outcomes) => {
            writers.writable.store(true, Ordering::Relaxed);
            answer(writers, group, outcomes);
        }
        // Without a connection every event fails alike: no point in one by one.
        Err(e) if group.len() > 1 && !matches!(e, StoreError::NoConnection(_)) => {
            // One event's failure must not fail its neighbours: retry each alone.
            tracing::warn!(error = %e, events = group.len(), "group commit failed; retrying one by one");
            let mut any = false;
            for op in group {
                if op.reply.is_closed() {
                    continue;
                }
                let single = std::slice::from_ref(&op);
                match commit(writers, single).await {
                    Ok(outcomes) => {
                        any = true;
                        answer(writers, vec![op], outcomes);
                    }
                    Err(e) => {
                        let _ = op.reply.send(Err(e));
                    }
                }
            }
            writers.writable.store(any, Ordering::Relaxed);
        }
        Err(e) => {
            tracing::warn!(error = %e, "store commit failed");
            writers.writable.store(false, Ordering::Relaxed);
            for op in group {
                let _ = op.reply.send(Err(StoreError::Unavailable(e.to_string())));
            }
        }
    }
}

/// Answers each caller and wakes the dispatchers of the sinks that got new rows; the
/// other replicas learn of them from the `NOTIFY` sent at commit.
fn answer(writers: &Writers, group: Vec<Op>, outcomes: Vec<Ingested>) {
    let mut woken = BTreeSet::new();
    for (op, outcome) in group.into_iter().zip(outcomes) {
        if outcome != Ingested::Duplicate {
            woken.extend(op.sinks.iter().cloned());
        }
        // A caller that has gone away no longer needs the answer.
        let _ = op.reply.send(Ok(outcome));
    }
    writers.wakers.wake(woken.iter());
}

/// The order in which a group's events are written: by call, and a call's events as they
/// came (the sort is stable, and their ids must follow their arrival).
///
/// An insert whose key another transaction has just inserted waits for that transaction,
/// and holds its own keys meanwhile. Replicas receive the same events at the same moment
/// (a sender's retries, several copies behind a load balancer), so two groups often hold
/// the same keys; written in arrival order, one group could wait for a key the other holds
/// while the other waits for one of its own: a deadlock, which PostgreSQL breaks only
/// after `deadlock_timeout` (1 s by default) by failing one group, whose events are then
/// written again one by one. In one order across every writer no such cycle can form
/// (short of two groups holding the same call's events in opposite orders), and the poll
/// rows, written in the same order, are locked in call order too.
fn write_order(group: &[Op]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..group.len()).collect();
    order.sort_by_key(|&i| {
        let e = &group[i].event;
        e.call_id.as_deref().unwrap_or(&e.dedup_key)
    });
    order
}

/// Stores the group in one transaction; the outcome of each event, in order.
async fn commit(writers: &Writers, group: &[Op]) -> Result<Vec<Ingested>, StoreError> {
    let order = write_order(group);
    let db = &writers.db;
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let insert = tx.prepare_cached(&db.sql(INSERT)).await?;
    let column = |f: fn(&Op) -> Option<&str>| -> Vec<Option<&str>> {
        order.iter().map(|&i| f(&group[i])).collect()
    };
    let keys = column(|op| Some(&op.event.dedup_key));
    let names = column(|op| Some(&op.event.name));
    let calls = column(|op| op.event.call_id.as_deref());
    let sources = column(|op| Some(op.event.source.as_str()));
    let payloads: Vec<&[u8]> = order.iter().map(|&i| &group[i].event.payload[..]).collect();
    let sinks: Vec<String> = order.iter().map(|&i| group[i].sinks.join(",")).collect();
    let stored: std::collections::HashSet<String> = tx
        .query(
            &insert,
            &[&keys, &names, &calls, &sources, &payloads, &sinks],
        )
        .await?
        .into_iter()
        .map(|row| row.get(0))
        .collect();
    // Each stored key to the first of its copies in the write order, the one stored.
    let mut inserted = vec![false; group.len()];
    let mut taken = BTreeSet::new();
    for &i in &order {
        let key = group[i].event.dedup_key.as_str();
        inserted[i] = stored.contains(key) && taken.insert(key);
    }

    if let Some(wait) = writers.track_calls {
        let waiting = tx.prepare_cached(&db.sql(TRACK_WAITING)).await?;
        let done = tx.prepare_cached(&db.sql(TRACK_DONE)).await?;
        let tracked = order
            .iter()
            .filter(|&&i| inserted[i])
            .map(|&i| &group[i])
            .filter_map(|op| op.event.call_id.as_ref().map(|call| (op, call)));
        join_all(tracked.map(|(op, call)| {
            let (tx, waiting, done) = (&tx, &waiting, &done);
            async move {
                if op.event.name == ALL_PROCESSING_COMPLETED {
                    let result = format!("analysis received by {}", op.event.source);
                    tx.execute(done, &[call, &result]).await
                } else {
                    tx.execute(waiting, &[call, &wait]).await
                }
            }
        }))
        .await
        .into_iter()
        .collect::<Result<Vec<u64>, _>>()?;
    }

    let sinks: BTreeSet<&str> = group
        .iter()
        .zip(&inserted)
        .filter(|(_, new)| **new)
        .flat_map(|(op, _)| op.sinks.iter().map(|s| &**s))
        .collect();
    if !sinks.is_empty() {
        // Sent by PostgreSQL at COMMIT, to every replica listening.
        let payload = sinks.into_iter().collect::<Vec<_>>().join(",");
        tx.execute("SELECT pg_notify($1, $2)", &[&&*db.channel, &payload])
            .await?;
    }
    tx.commit().await?;
    Ok(group
        .iter()
        .zip(inserted)
        .map(|(op, new)| {
            if new {
                Ingested::Stored {
                    deliveries: op.sinks.len(),
                }
            } else {
                Ingested::Duplicate
            }
        })
        .collect())
}
