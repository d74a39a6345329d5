//! Settling in the writer's transaction: retry rows for failed first attempts, waiting
//! rows for events held behind an earlier one of their call, releases, cursor moves, and
//! the deliveries' attempt histories.

use rusqlite::params;

use super::claims::{Change, Outcome};
use super::millis::to_millis;
use super::waiting::{WAITING, Waiting};
use crate::store::Attempt;

/// What a waiting row shows as its last error, to say why nothing happens to it.
const WAITING_NOTE: &str = "waiting for an earlier event of its call";

/// Writes what settling (or a claim) of one sink came to: retry rows for failed first
/// attempts, updated ones for retries, waiting rows for held events, releases, the
/// attempts (at most `keep` per delivery), and the cursor move these rows allow.
pub(super) fn settle(
    tx: &rusqlite::Transaction<'_>,
    outcome: &Outcome,
    now: i64,
    waiting: &mut Waiting,
    keep: usize,
) -> rusqlite::Result<()> {
    let sink = outcome.sink.as_str();
    if keep > 0 {
        for attempt in &outcome.attempts {
            record_attempt(tx, sink, attempt, keep)?;
        }
    }
    for change in &outcome.changes {
        match change {
            Change::Failed {
                event_id,
                call_id,
                first: true,
                dead,
                next,
                error,
                ..
            } => tx
                .prepare_cached(
                    "INSERT INTO retries (sink, event_id, call_id, status, attempts,
                                          next_attempt_at, last_error, updated_at)
                     VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?7)
                     ON CONFLICT (sink, event_id) DO UPDATE SET status = excluded.status,
                         attempts = retries.attempts + 1,
                         next_attempt_at = excluded.next_attempt_at,
                         last_error = excluded.last_error, updated_at = excluded.updated_at",
                )?
                .execute(params![
                    sink,
                    event_id,
                    call_id,
                    status(*dead),
                    to_millis(*next),
                    error,
                    now
                ])?,
            Change::Failed {
                event_id,
                dead,
                counted,
                next,
                error,
                ..
            } => tx
                .prepare_cached(
                    "UPDATE retries SET status = ?3, attempts = attempts + ?4,
                         next_attempt_at = ?5, last_error = ?6, updated_at = ?7
                     WHERE sink = ?1 AND event_id = ?2 AND status = 'pending'",
                )?
                .execute(params![
                    sink,
                    event_id,
                    status(*dead),
                    i64::from(*counted),
                    to_millis(*next),
                    error,
                    now
                ])?,
            Change::Delivered { event_id } => tx
                .prepare_cached(
                    "UPDATE retries SET status = 'delivered', attempts = attempts + 1,
                         last_error = NULL, updated_at = ?3
                     WHERE sink = ?1 AND event_id = ?2 AND status = 'pending'",
                )?
                .execute(params![sink, event_id, now])?,
            Change::Held {
                event_id,
                call_id,
                waits,
            } => {
                // An earlier event of the call with a pending row (a failure, a replay, or
                // another held event) is waited for too, as this transaction sees it.
                let waits = *waits
                    || tx
                        .prepare_cached(
                            "SELECT 1 FROM retries WHERE sink = ?1 AND call_id = ?2
                             AND status = 'pending' AND event_id < ?3",
                        )?
                        .exists(params![sink, call_id, event_id])?;
                let (next, note) = if waits {
                    waiting.mark(sink);
                    (WAITING, Some(WAITING_NOTE))
                } else {
                    (now, None)
                };
                tx.prepare_cached(
                    "INSERT INTO retries (sink, event_id, call_id, status, attempts,
                                          next_attempt_at, last_error, updated_at)
                     VALUES (?1, ?2, ?3, 'pending', 0, ?4, ?5, ?6)
                     ON CONFLICT (sink, event_id) DO NOTHING",
                )?
                .execute(params![sink, event_id, call_id, next, note, now])?
            }
            // Most sinks hold no waiting row at all: nothing to release, no statement.
            Change::Release { .. } if !waiting.may_hold(sink) => 0,
            Change::Release { call_id } => {
                let released = tx
                    .prepare_cached(
                        "UPDATE retries SET next_attempt_at = ?3, last_error = NULL, updated_at = ?3
                         WHERE sink = ?1 AND next_attempt_at = ?4 AND event_id = (
                             SELECT MIN(event_id) FROM retries
                             WHERE sink = ?1 AND call_id = ?2 AND status = 'pending')",
                    )?
                    .execute(params![sink, call_id, now, WAITING])?;
                waiting.look(tx, sink)?;
                released
            }
        };
    }
    if let Some(position) = outcome.cursor {
        tx.prepare_cached(
            "INSERT INTO cursors (sink, position) VALUES (?1, ?2)
             ON CONFLICT (sink) DO UPDATE SET position = MAX(position, excluded.position)",
        )?
        .execute(params![sink, position])?;
    }
    Ok(())
}

/// Adds `attempt` to its delivery's history, dropping the oldest beyond `keep`.
fn record_attempt(
    tx: &rusqlite::Transaction<'_>,
    sink: &str,
    a: &Attempt,
    keep: usize,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO attempts (event_id, sink, number, started_at, duration_ms, outcome,
                               code, error, response)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        a.id.row,
        sink,
        a.number,
        to_millis(a.started_at),
        i64::try_from(a.duration.as_millis()).unwrap_or(i64::MAX),
        a.outcome.as_str(),
        a.code,
        a.error,
        a.response
    ])?;
    tx.prepare_cached(
        "DELETE FROM attempts WHERE event_id = ?1 AND sink = ?2 AND id <= (
             SELECT id FROM attempts WHERE event_id = ?1 AND sink = ?2
             ORDER BY id DESC LIMIT 1 OFFSET ?3)",
    )?
    .execute(params![
        a.id.row,
        sink,
        i64::try_from(keep).unwrap_or(i64::MAX)
    ])?;
    Ok(())
}

fn status(dead: bool) -> &'static str {
    if dead { "dead" } else { "pending" }
}
