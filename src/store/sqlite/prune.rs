//! One step of pruning: old payloads emptied and expired events deleted in one id range,
//! sparing every event a sink still needs.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use rusqlite::params;

use super::dedup::Dedup;
use super::millis::to_millis;
use super::sink_list::sink_names;

/// One pruning step: the events with ids in `[from, to)`.
#[derive(Debug, Clone, Copy)]
pub(super) struct PruneRange {
    pub from: i64,
    pub to: i64,
    /// Payloads of events received before this, delivered to every sink, are emptied.
    pub payloads_before: SystemTime,
    /// Events (dedup keys) received before this, delivered to every sink, are deleted.
    pub keys_before: SystemTime,
    /// Runs of the dedup index starting before this id may be deleted, a chunk a step.
    pub runs_before: i64,
}

/// What a pruning step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct PruneStep {
    pub payloads: usize,
    pub events: usize,
    /// The range's oldest event is too recent to prune: later ids are newer still.
    pub reached_recent: bool,
    /// The first event id at or after the range's end: where the next step starts, so a
    /// run of deleted ids (behind an event kept for its dead delivery) is skipped.
    pub next: Option<i64>,
    /// A chunk of a run of the dedup index was deleted: there may be more.
    pub runs_left: bool,
}

/// Empties old payloads and deletes expired dedup keys in one id range, sparing every
/// event not yet done for one of its sinks: after that sink's cursor, or with a retry row
/// (pending or dead: its payload is needed to deliver or replay it). Quarantined bodies
/// go with the payloads, finished poll records with the keys, and runs of the dedup index
/// with their last event.
pub(super) fn prune(
    tx: &rusqlite::Transaction<'_>,
    range: &PruneRange,
    dedup: &mut Dedup,
) -> rusqlite::Result<PruneStep> {
    let payloads_before = to_millis(range.payloads_before);
    let keys_before = to_millis(range.keys_before);
    let cursors: HashMap<String, i64> = tx
        .prepare_cached("SELECT sink, position FROM cursors")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let kept: HashSet<i64> = tx
        .prepare_cached(
            "SELECT event_id FROM retries WHERE event_id >= ?1 AND event_id < ?2
             AND status != 'delivered'",
        )?
        .query_map(params![range.from, range.to], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut oldest: Option<i64> = None;
    let (mut emptied, mut deleted) = (Vec::new(), Vec::new());
    {
        let mut rows = tx.prepare_cached(
            "SELECT id, sinks, received_at, length(payload) > 0 FROM events
             WHERE id >= ?1 AND id < ?2",
        )?;
        let mut rows = rows.query(params![range.from, range.to])?;
        while let Some(r) = rows.next()? {
            let (id, sinks, received_at, has_payload): (i64, String, i64, bool) =
                (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
            oldest = Some(oldest.map_or(received_at, |o| o.min(received_at)));
            let done = !kept.contains(&id)
                && sink_names(&sinks)
                    .all(|sink| cursors.get(sink).is_some_and(|position| *position >= id));
            if !done {
                continue;
            }
            if received_at < keys_before {
                deleted.push(id);
            } else if received_at < payloads_before && has_payload {
                emptied.push(id);
            }
        }
    }
    let mut empty =
        tx.prepare_cached("UPDATE events SET payload = X'', codec = 0 WHERE id = ?1")?;
    // Attempt histories go with the payloads: an answer may quote what was sent.
    let mut history = tx.prepare_cached("DELETE FROM attempts WHERE event_id = ?1")?;
    for id in &emptied {
        empty.execute(params![id])?;
        history.execute(params![id])?;
    }
    let mut delete = tx.prepare_cached("DELETE FROM events WHERE id = ?1")?;
    let mut forget = tx.prepare_cached("DELETE FROM retries WHERE event_id = ?1")?;
    for id in &deleted {
        delete.execute(params![id])?;
        forget.execute(params![id])?;
        history.execute(params![id])?;
    }
    tx.prepare_cached(
        "DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine WHERE received_at < ?1 ORDER BY id LIMIT 100)",
    )?
    .execute(params![payloads_before])?;
    tx.prepare_cached(
        "DELETE FROM polls WHERE call_id IN (
             SELECT call_id FROM polls WHERE status != 'waiting' AND updated_at < ?1 LIMIT 100)",
    )?
    .execute(params![keys_before])?;
    let runs_left = dedup.prune(tx, range.runs_before)?;
    let next = tx
        .prepare_cached("SELECT MIN(id) FROM events WHERE id >= ?1")?
        .query_row(params![range.to], |r| r.get(0))?;
    Ok(PruneStep {
        payloads: emptied.len(),
        events: deleted.len(),
        reached_recent: oldest.is_some_and(|t| t >= payloads_before),
        next,
        runs_left,
    })
}
