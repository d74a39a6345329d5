//! The dedup index: every stored event's 16-byte key, written in the order events arrive.
//!
//! A B-tree keyed by a hash takes each new key into a random page, and a commit writes
//! every page it touched whole (to the WAL, then again at the checkpoint): on a store
//! holding weeks of keys that was most of the bytes written per event. Here the keys of
//! the latest events live in memory (the log's own `key` column rebuilds them after a
//! restart); every [`RUN_SIZE`] events they are written sorted, as one run of `dedup`,
//! which fills new pages instead of rewriting old ones. Each run has a Bloom
//! filter in memory, so a lookup reads only the runs that may hold the key; pruning
//! deletes a run whole once none of its events is left.
//!
//! PartialRun or deleting a run takes [`CHUNK`] keys per commit of the writer, never all at
//! once: 65,536 keys in one transaction held every request waiting on it for about
//! 100 ms.

use std::collections::BTreeSet;

use fastbloom::BloomFilter;
use rusqlite::{Connection, OptionalExtension, params};

#[cfg(test)]
mod tests;

/// Keys held in memory before they are written as a run: about 3 MB of memory, and one
/// write of about 1.7 MB every that many events.
pub(super) const RUN_SIZE: usize = 65_536;
/// The share of lookups that read a run not holding the key: 1% costs 1.2 bytes of
/// memory per stored key.
const FALSE_POSITIVES: f64 = 0.01;
/// Keys of a run written (or deleted) per commit: a 32nd of the stall a whole run was.
pub(super) const CHUNK: usize = 2048;

pub(super) type Key = [u8; 16];

/// One run: the keys of the events with ids in `first..=last`.
struct Run {
    last: i64,
    first: i64,
    bloom: BloomFilter,
}

/// A run being written, a chunk per commit; its keys are looked up here until it is whole.
struct PartialRun {
    first: i64,
    last: i64,
    /// In key order.
    keys: Vec<(Key, i64)>,
    /// Keys committed so far.
    written: usize,
    /// Keys the open transaction writes, counted once it commits.
    staged: usize,
}

pub(super) struct Dedup {
    run_size: usize,
    chunk: usize,
    /// Keys of the events after the last run (and the run being written), with their ids.
    recent: BTreeSet<(Key, i64)>,
    writing: Option<PartialRun>,
    /// Oldest first.
    runs: Vec<Run>,
    /// The id the next event gets: ids only grow, even once pruning has deleted the
    /// latest events, so the log after the last run is exactly what `recent` holds.
    next_id: i64,
    /// What the open transaction changed, undone if it fails.
    staged: Vec<(Key, i64)>,
    dropped: Vec<i64>,
    next_id_before: i64,
}

/// The Bloom filters' hash of a key: its call part is already a uniform hash, and the
/// event part tells a call's events apart.
fn bloom_hash(key: &Key) -> u64 {
    let (call, event) = key.split_at(8);
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
    word(call) ^ word(event).rotate_left(29)
}

fn bloom<'a>(keys: impl ExactSizeIterator<Item = &'a Key>) -> BloomFilter {
    let mut bloom = BloomFilter::with_false_pos(FALSE_POSITIVES).expected_items(keys.len().max(1));
    for key in keys {
        bloom.insert_hash(bloom_hash(key));
    }
    bloom
}

/// Writes keys of the run of the events with ids in `first..=last`, in key order.
pub(super) fn write_keys<'a>(
    conn: &Connection,
    last: i64,
    sorted: impl Iterator<Item = &'a (Key, i64)>,
) -> rusqlite::Result<()> {
    // A run cut short by a crash left nothing (see `load`); ignoring a key already there
    // keeps one bad row from failing every commit that carries a chunk.
    let mut insert =
        conn.prepare_cached("INSERT OR IGNORE INTO dedup (run, key, id) VALUES (?1, ?2, ?3)")?;
    for (key, id) in sorted {
        insert.execute(params![last, &key[..], id])?;
    }
    Ok(())
}

/// Records the run of the events with ids in `first..=last` as whole.
pub(super) fn finish_run(conn: &Connection, first: i64, last: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT INTO dedup_runs (last, first) VALUES (?1, ?2)")?
        .execute(params![last, first])?;
    Ok(())
}

impl Dedup {
    /// Reads the runs (for their Bloom filters) and the keys of the log after them, and
    /// deletes what a run cut short by a crash had written.
    pub(super) fn load(
        conn: &Connection,
        run_size: usize,
        chunk: usize,
    ) -> rusqlite::Result<Dedup> {
        conn.execute(
            "DELETE FROM dedup WHERE run > (SELECT COALESCE(MAX(last), 0) FROM dedup_runs)",
            [],
        )?;
        let spans: Vec<(i64, i64)> = conn
            .prepare("SELECT last, first FROM dedup_runs ORDER BY last")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut keys = conn.prepare("SELECT key FROM dedup WHERE run = ?1")?;
        let mut runs = Vec::with_capacity(spans.len());
        for (last, first) in spans {
            let found: Vec<Key> = keys
                .query_map(params![last], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            runs.push(Run {
                last,
                first,
                bloom: bloom(found.iter()),
            });
        }
        let watermark = runs.last().map_or(0, |r| r.last);
        let recent = conn
            .prepare("SELECT key, id FROM events WHERE id > ?1")?
            .query_map(params![watermark], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        // Past every sink's cursor too: once pruning has deleted every event, an id at or
        // before a cursor would count as delivered to that sink without being sent.
        let latest: i64 = conn.query_row(
            "SELECT MAX((SELECT COALESCE(MAX(id), 0) FROM events),
                        (SELECT COALESCE(MAX(position), 0) FROM cursors))",
            [],
            |r| r.get(0),
        )?;
        let next_id = latest.max(watermark) + 1;
        Ok(Dedup {
            run_size,
            chunk,
            recent,
            writing: None,
            runs,
            next_id,
            staged: Vec::new(),
            dropped: Vec::new(),
            next_id_before: next_id,
        })
    }

    /// Whether an event with this key and text is stored (or staged in `tx`).
    pub(super) fn seen(
        &self,
        tx: &rusqlite::Transaction<'_>,
        key: &Key,
        text: &str,
    ) -> rusqlite::Result<bool> {
        // Two texts may share the 16 bytes: the stored text decides.
        let mut same =
            tx.prepare_cached("SELECT 1 FROM events WHERE id = ?1 AND dedup_key = ?2")?;
        let mut matches = |id: i64| -> rusqlite::Result<bool> {
            Ok(same
                .query_row(params![id, text], |_| Ok(()))
                .optional()?
                .is_some())
        };
        for (_, id) in self.recent.range((*key, i64::MIN)..=(*key, i64::MAX)) {
            if matches(*id)? {
                return Ok(true);
            }
        }
        if let Some(w) = &self.writing {
            let from = w.keys.partition_point(|(k, _)| k < key);
            for (_, id) in w.keys[from..].iter().take_while(|(k, _)| k == key) {
                if matches(*id)? {
                    return Ok(true);
                }
            }
        }
        let hash = bloom_hash(key);
        let mut in_run = tx.prepare_cached("SELECT id FROM dedup WHERE run = ?1 AND key = ?2")?;
        // Newest first: a duplicate is usually a redelivery of a recent event.
        for run in self.runs.iter().rev() {
            if !run.bloom.contains_hash(hash) {
                continue;
            }
            let ids: Vec<i64> = in_run
                .query_map(params![run.last, &key[..]], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for id in ids {
                if matches(id)? {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Takes an id for a new event with this key.
    pub(super) fn insert(&mut self, key: Key) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        self.recent.insert((key, id));
        self.staged.push((key, id));
        id
    }

    /// Deletes a chunk of the oldest run, among those starting before `before`, whose
    /// events are all gone; the run's last chunk takes its row and its Bloom filter.
    /// Whether there was one.
    pub(super) fn prune(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        before: i64,
    ) -> rusqlite::Result<bool> {
        let mut any =
            tx.prepare_cached("SELECT EXISTS (SELECT 1 FROM events WHERE id >= ?1 AND id <= ?2)")?;
        for run in self.runs.iter().take_while(|r| r.first < before) {
            if any.query_row(params![run.first, run.last], |r| r.get::<_, bool>(0))? {
                continue;
            }
            let limit = i64::try_from(self.chunk).unwrap_or(i64::MAX);
            let deleted = tx
                .prepare_cached(
                    "DELETE FROM dedup WHERE run = ?1
                     AND key IN (SELECT key FROM dedup WHERE run = ?1 ORDER BY key LIMIT ?2)",
                )?
                .execute(params![run.last, limit])?;
            if deleted == 0 {
                tx.prepare_cached("DELETE FROM dedup_runs WHERE last = ?1")?
                    .execute(params![run.last])?;
                self.dropped.push(run.last);
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// Carries the run being written one chunk further in `tx`, first starting one if
    /// memory holds a run's worth of keys. A failure leaves the chunk to a later commit.
    pub(super) fn write_chunk(&mut self, tx: &mut rusqlite::Transaction<'_>) {
        if self.writing.is_none() && self.recent.len() >= self.run_size {
            // `begin` came before: nothing of the open transaction is in `recent` yet.
            let keys: Vec<(Key, i64)> = std::mem::take(&mut self.recent).into_iter().collect();
            self.writing = Some(PartialRun {
                first: self.runs.last().map_or(1, |r| r.last + 1),
                last: self.next_id - 1,
                keys,
                written: 0,
                staged: 0,
            });
        }
        let Some(w) = &mut self.writing else {
            return;
        };
        let end = (w.written + self.chunk).min(w.keys.len());
        let chunk = w.keys.get(w.written..end).unwrap_or_default();
        let written = tx.savepoint().and_then(|sp| {
            write_keys(&sp, w.last, chunk.iter())?;
            if end == w.keys.len() {
                finish_run(&sp, w.first, w.last)?;
            }
            sp.commit()
        });
        match written {
            Ok(()) => w.staged = end - w.written,
            Err(e) => {
                tracing::warn!(error = %e, run = w.last, "cannot write the dedup index's next chunk; its keys stay in memory");
            }
        }
    }

    /// A transaction starts: what it changes can still be undone.
    pub(super) fn begin(&mut self) {
        self.staged.clear();
        self.dropped.clear();
        self.next_id_before = self.next_id;
        if let Some(w) = &mut self.writing {
            w.staged = 0;
        }
    }

    /// The transaction committed.
    pub(super) fn committed(&mut self) {
        self.staged.clear();
        let dropped = std::mem::take(&mut self.dropped);
        self.runs.retain(|r| !dropped.contains(&r.last));
        if let Some(w) = &mut self.writing {
            w.written += std::mem::take(&mut w.staged);
        }
        if let Some(w) = self.writing.take_if(|w| w.written == w.keys.len()) {
            self.runs.push(Run {
                last: w.last,
                first: w.first,
                bloom: bloom(w.keys.iter().map(|(key, _)| key)),
            });
        }
    }

    /// The transaction failed: its keys and ids were never stored.
    pub(super) fn rolled_back(&mut self) {
        for entry in self.staged.drain(..) {
            self.recent.remove(&entry);
        }
        self.dropped.clear();
        self.next_id = self.next_id_before;
        if let Some(w) = &mut self.writing {
            w.staged = 0;
        }
    }
}
