//! The SQLite writer: one thread owns the write connection and commits in groups.
//!
//! It takes whatever is queued (up to [`MAX_GROUP`] operations), applies it in one
//! transaction, commits with a single fsync, and only then answers each waiting caller.
//! Under load many requests share one fsync, which is what lets `synchronous = FULL` keep
//! up. Checkpoints run on a thread of their own (see [`super::wal::checkpoint_loop`]).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use super::admin;
use super::claims::Outcome;
use super::dedup::Dedup;
use super::keys::key;
use super::millis::to_millis;
use super::prune::{PruneRange, PruneStep, prune};
use super::quarantine::quarantine;
use super::settle::settle;
use super::sink_list::sinks_text;
use super::waiting::Waiting;
use super::wal::{WAL_LIMIT_BYTES, WAL_TARGET_BYTES, limit_wal};
use crate::event::{Event, Source};
use crate::metrics::Metrics;
use crate::store::operator::{Replay, Replayed};
use crate::store::wakers::Wakers;
use crate::store::{Ingested, Kept, PollUpdate, Quarantined, StoreError, now};

/// Most operations committed in one transaction.
pub(super) const MAX_GROUP: usize = 512;
/// Operations waiting for the writer; callers beyond this wait for room (and time out).
pub(super) const QUEUE_DEPTH: usize = 1024;
/// How often at most the writer finishes a checkpoint itself.
const WRITER_CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

pub(super) enum Op {
    Ingest {
        event: Box<Event>,
        /// The payload as stored (`codec` says how).
        stored: Vec<u8>,
        codec: i64,
        sinks: Vec<Arc<str>>,
        /// Track the call for the poller: first poll this long after its latest event.
        track: Option<Duration>,
        /// Set by `apply`; answered only once the transaction that set it has committed.
        outcome: Ingested,
        reply: oneshot::Sender<Result<Ingested, StoreError>>,
    },
    Quarantine {
        entry: Quarantined,
        /// Set by `apply`, answered after commit.
        outcome: Kept,
        reply: oneshot::Sender<Result<Kept, StoreError>>,
    },
    Settle {
        outcome: Outcome,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Poll {
        call_id: String,
        update: PollUpdate,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// A sink's pause (until, in milliseconds, and why), or its end.
    Pause {
        sink: String,
        pause: Option<(i64, String)>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Prune {
        range: PruneRange,
        /// Set by `apply`, answered after commit.
        outcome: PruneStep,
        reply: oneshot::Sender<Result<PruneStep, StoreError>>,
    },
    Replay {
        sink: String,
        which: Replay,
        /// Set by `apply`, answered after commit.
        outcome: Replayed,
        reply: oneshot::Sender<Result<Replayed, StoreError>>,
    },
    Backfill {
        sink: String,
        ids: Vec<i64>,
        /// Set by `apply`, answered after commit.
        outcome: usize,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
    /// Commit what came before, then stop: the store is closing.
    Close,
}

impl Op {
    /// The caller has stopped waiting for the answer.
    fn withdrawn(&self) -> bool {
        match self {
            Op::Ingest { reply, .. } => reply.is_closed(),
            Op::Quarantine { reply, .. } => reply.is_closed(),
            Op::Settle { reply, .. } => reply.is_closed(),
            Op::Poll { reply, .. } | Op::Pause { reply, .. } => reply.is_closed(),
            Op::Prune { reply, .. } => reply.is_closed(),
            Op::Replay { reply, .. } => reply.is_closed(),
            Op::Backfill { reply, .. } => reply.is_closed(),
            Op::Close => false,
        }
    }

    fn apply(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        now: i64,
        limits: &Limits,
        memory: &mut Memory,
    ) -> rusqlite::Result<()> {
        match self {
            Op::Ingest {
                event,
                stored,
                codec,
                sinks,
                track,
                outcome,
                ..
            } => {
                let key = key(&event.dedup_key);
                let dedup = memory.get(tx)?;
                if dedup.seen(tx, &key, &event.dedup_key)? {
                    *outcome = Ingested::Duplicate;
                    return Ok(());
                }
                let event_id = dedup.insert(key);
                tx.prepare_cached(
                    "INSERT INTO events (id, key, dedup_key, event, call_id, source, received_at,
                                         sinks, codec, payload)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )?
                .execute(params![
                    event_id,
                    &key[..],
                    event.dedup_key,
                    event.name,
                    event.call_id,
                    event.source.as_str(),
                    now,
                    sinks_text(sinks),
                    *codec,
                    &stored[..]
                ])?;
                // A sink's cursor starts before its first event; later ones leave it be.
                let mut cursor = tx.prepare_cached(
                    "INSERT INTO cursors (sink, position) VALUES (?1, ?2) ON CONFLICT (sink) DO NOTHING",
                )?;
                for sink in sinks.iter() {
                    cursor.execute(params![&**sink, event_id - 1])?;
                }
                if let (Some(wait), Some(call_id)) = (track, &event.call_id) {
                    track_call(tx, call_id, &event.name, event.source, now, *wait)?;
                }
                *outcome = Ingested::Stored {
                    deliveries: sinks.len(),
                };
                Ok(())
            }
            Op::Prune { range, outcome, .. } => {
                *outcome = prune(tx, range, memory.get(tx)?)?;
                Ok(())
            }
            Op::Replay {
                sink,
                which,
                outcome,
                ..
            } => {
                *outcome = admin::replay(tx, sink, which, now)?;
                Ok(())
            }
            Op::Backfill {
                sink, ids, outcome, ..
            } => {
                *outcome = admin::backfill(tx, sink, ids, now)?;
                Ok(())
            }
            Op::Close => Ok(()),
            Op::Poll {
                call_id, update, ..
            } => {
                match update {
                    PollUpdate::Again { at, result } => tx
                        .prepare_cached(
                            "UPDATE polls SET polls = polls + 1, next_poll_at = ?2, last_result = ?3, updated_at = ?4
                             WHERE call_id = ?1 AND status = 'waiting'",
                        )?
                        .execute(params![&*call_id, to_millis(*at), &*result, now])?,
                    PollUpdate::Finished { status, result } => tx
                        .prepare_cached(
                            "UPDATE polls SET polls = polls + 1, status = ?2, last_result = ?3, updated_at = ?4
                             WHERE call_id = ?1 AND status = 'waiting'",
                        )?
                        .execute(params![&*call_id, status.as_str(), &*result, now])?,
                };
                Ok(())
            }
            Op::Pause { sink, pause, .. } => {
                match pause {
                    Some((until, reason)) => tx
                        .prepare_cached(
                            "INSERT INTO pauses (sink, until_ms, reason) VALUES (?1, ?2, ?3)
                             ON CONFLICT (sink) DO UPDATE SET until_ms = ?2, reason = ?3",
                        )?
                        .execute(params![&*sink, *until, &*reason])?,
                    None => tx
                        .prepare_cached("DELETE FROM pauses WHERE sink = ?1")?
                        .execute(params![&*sink])?,
                };
                Ok(())
            }
            Op::Quarantine { entry, outcome, .. } => {
                *outcome = quarantine(tx, entry, now, limits.quarantine_max_bytes)?;
                Ok(())
            }
            Op::Settle { outcome, .. } => {
                settle(tx, outcome, now, &mut memory.waiting, limits.attempts_kept)
            }
        }
    }

    /// Answers the caller after the commit (or its failure). A caller that has gone away no
    /// longer needs the answer, so a failed send is ignored.
    fn answer(self, result: Result<(), StoreError>, woken: &mut HashSet<Arc<str>>) {
        match self {
            Op::Ingest {
                sinks,
                outcome,
                reply,
                ..
            } => {
                if result.is_ok() && outcome != Ingested::Duplicate {
                    woken.extend(sinks);
                }
                let _ = reply.send(result.map(|()| outcome));
            }
            Op::Quarantine { outcome, reply, .. } => {
                let _ = reply.send(result.map(|()| outcome));
            }
            Op::Settle { reply, .. } | Op::Poll { reply, .. } | Op::Pause { reply, .. } => {
                let _ = reply.send(result);
            }
            Op::Prune { outcome, reply, .. } => {
                let _ = reply.send(result.map(|()| outcome));
            }
            Op::Replay { outcome, reply, .. } => {
                let _ = reply.send(result.map(|()| outcome));
            }
            Op::Backfill { outcome, reply, .. } => {
                let _ = reply.send(result.map(|()| outcome));
            }
            Op::Close => {}
        }
    }
}

/// Keeps a call's poll schedule in step with its events: `all_processing_completed` ends
/// it (whatever its source), any other event (re)starts the wait for the analysis.
fn track_call(
    tx: &rusqlite::Transaction<'_>,
    call_id: &str,
    event: &str,
    source: Source,
    now: i64,
    wait: Duration,
) -> rusqlite::Result<usize> {
    if event == crate::protocol::ALL_PROCESSING_COMPLETED {
        tx.prepare_cached(
            "INSERT INTO polls (call_id, status, first_seen_at, last_event_at, next_poll_at, last_result, updated_at)
             VALUES (?1, 'done', ?2, ?2, ?2, ?3, ?2)
             ON CONFLICT (call_id) DO UPDATE SET status = 'done', last_event_at = ?2, last_result = ?3, updated_at = ?2",
        )?
        .execute(params![call_id, now, format!("analysis received by {source}")])
    } else {
        let due = now.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
        tx.prepare_cached(
            "INSERT INTO polls (call_id, status, first_seen_at, last_event_at, next_poll_at, last_result, updated_at)
             VALUES (?1, 'waiting', ?2, ?2, ?3, 'waiting for the analysis webhook', ?2)
             ON CONFLICT (call_id) DO UPDATE SET last_event_at = ?2, updated_at = ?2,
                 next_poll_at = CASE WHEN status = 'waiting' THEN MAX(next_poll_at, ?3) ELSE next_poll_at END",
        )?
        .execute(params![call_id, now, due])
    }
}

/// The writer's bounds that come from the config.
pub(super) struct Limits {
    pub(super) quarantine_max_bytes: u64,
    /// Keys per run of the dedup index, and per chunk of one written in a commit
    /// ([`super::dedup::RUN_SIZE`] and [`super::dedup::CHUNK`] but in tests).
    pub(super) run_size: usize,
    pub(super) run_chunk: usize,
    /// Least time from one commit's start to the next (`store.commit_interval`).
    pub(super) commit_interval: Duration,
    /// Attempts kept in each delivery's history (`delivery.attempts_kept`).
    pub(super) attempts_kept: usize,
}

/// What the writer keeps in memory across transactions: the dedup index, read on first
/// use (operator commands that never ingest or prune, a replay, do not wait for its Bloom
/// filters), and which sinks may hold a waiting row.
struct Memory {
    run_size: usize,
    run_chunk: usize,
    loaded: Option<Dedup>,
    waiting: Waiting,
}

impl Memory {
    fn get(&mut self, conn: &Connection) -> rusqlite::Result<&mut Dedup> {
        let dedup = match self.loaded.take() {
            Some(dedup) => dedup,
            None => Dedup::load(conn, self.run_size, self.run_chunk)?,
        };
        Ok(self.loaded.insert(dedup))
    }
}

fn commit(
    conn: &mut Connection,
    ops: &mut [Op],
    limits: &Limits,
    memory: &mut Memory,
) -> rusqlite::Result<()> {
    if let Some(dedup) = &mut memory.loaded {
        dedup.begin();
    }
    let result = apply_all(conn, ops, limits, memory);
    if let Some(dedup) = &mut memory.loaded {
        match result {
            Ok(()) => dedup.committed(),
            Err(_) => dedup.rolled_back(),
        }
    }
    match result {
        Ok(()) => memory.waiting.committed(),
        Err(_) => memory.waiting.rolled_back(),
    }
    result
}

fn apply_all(
    conn: &mut Connection,
    ops: &mut [Op],
    limits: &Limits,
    memory: &mut Memory,
) -> rusqlite::Result<()> {
    let now = to_millis(now());
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let Some(dedup) = &mut memory.loaded {
        dedup.write_chunk(&mut tx);
    }
    // Checked once the write lock is ours, which can take a while when another process
    // holds it: a caller that has since answered 503 must not see its event stored.
    for op in ops.iter_mut().filter(|op| !op.withdrawn()) {
        op.apply(&tx, now, limits, memory)?;
    }
    tx.commit()
}

/// Queues `op` for the writer and waits for its answer, given after the commit.
pub(super) async fn submit<T>(
    tx: &mpsc::Sender<Op>,
    op: Op,
    rx: oneshot::Receiver<Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tx.send(op).await.map_err(|_| StoreError::WriterGone)?;
    rx.await.map_err(|_| StoreError::WriterGone)?
}

/// What the writer thread shares with the rest of the store.
pub(super) struct WriterContext {
    pub(super) wakers: Arc<Wakers>,
    pub(super) wal: PathBuf,
    /// Whether the last commit succeeded (readiness).
    pub(super) writable: Arc<AtomicBool>,
    pub(super) metrics: Option<Arc<Metrics>>,
    /// Tells the checkpointer there is something to copy.
    pub(super) commit_signal: std::sync::mpsc::SyncSender<()>,
    pub(super) limits: Limits,
}

pub(super) fn write_loop(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Op>,
    ctx: &WriterContext,
    waiting: Waiting,
) {
    let WriterContext {
        wakers,
        wal,
        writable,
        metrics,
        commit_signal,
        limits,
    } = ctx;
    let mut memory = Memory {
        run_size: limits.run_size,
        run_chunk: limits.run_chunk,
        loaded: None,
        waiting,
    };
    let mut group: Vec<Op> = Vec::with_capacity(MAX_GROUP);
    let mut woken = HashSet::new();
    let mut last_checkpoint = std::time::Instant::now();
    let mut closing = false;
    let mut last_commit: Option<std::time::Instant> = None;
    while let Some(first) = rx.blocking_recv() {
        // Under load, what arrives within the interval joins this commit: one fsync and
        // one rewrite of the log's last pages for the whole group instead of one each
        // (`commit_interval` in README). A writer idle for longer commits at once.
        if let Some(due) = last_commit.map(|at| at + limits.commit_interval) {
            let wait = due.saturating_duration_since(std::time::Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        // What was queued before a close is committed; nothing after it is taken.
        if let Some(at) = group.iter().position(|op| matches!(op, Op::Close)) {
            closing = true;
            group.truncate(at);
        }
        group.retain(|op| !op.withdrawn());
        if group.is_empty() {
            if closing {
                break;
            }
            continue;
        }
        let started = std::time::Instant::now();
        last_commit = Some(started);
        let committed = commit(&mut conn, &mut group, limits, &mut memory);
        if let Some(m) = metrics {
            m.commit_latency.observe(started.elapsed().as_secs_f64());
        }
        match committed {
            Ok(()) => {
                writable.store(true, Ordering::Relaxed);
                for op in group.drain(..) {
                    op.answer(Ok(()), &mut woken);
                }
            }
            Err(e) if group.len() > 1 => {
                // One operation's failure must not fail its neighbours: retry each alone.
                tracing::warn!(error = %e, ops = group.len(), "group commit failed; retrying one by one");
                let mut any = false;
                for mut op in group.drain(..) {
                    let result = commit(
                        &mut conn,
                        std::slice::from_mut(&mut op),
                        limits,
                        &mut memory,
                    );
                    any |= result.is_ok();
                    op.answer(result.map_err(StoreError::from), &mut woken);
                }
                writable.store(any, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "store commit failed");
                writable.store(false, Ordering::Relaxed);
                if let Some(op) = group.pop() {
                    op.answer(Err(e.into()), &mut woken);
                }
            }
        }
        wakers.wake(woken.iter());
        woken.clear();
        // Full means a signal is already waiting: the checkpointer will come anyway.
        let _ = commit_signal.try_send(());
        if closing {
            break;
        }
        if last_checkpoint.elapsed() >= WRITER_CHECKPOINT_EVERY {
            limit_wal(&conn, wal, WAL_TARGET_BYTES, WAL_LIMIT_BYTES);
            last_checkpoint = std::time::Instant::now();
        }
    }
}
