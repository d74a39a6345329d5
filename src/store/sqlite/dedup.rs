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

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use rusqlite::Connection;

    use super::super::{SqliteStore, schema};
    use crate::config::{StoreConfig, Synchronous};
    use crate::event::Event;
    use crate::store::{Ingested, Settlement, Store, StoreOptions, now};

    /// Keys per run in these tests: a few events fill one, written in two commits.
    const SMALL_RUNS: usize = 4;
    const SMALL_CHUNKS: usize = 2;

    fn open(dir: &Path) -> Store {
        let config = StoreConfig::sqlite(dir.join("router.db"));
        let store =
            SqliteStore::open_with_runs(&config, StoreOptions::default(), SMALL_RUNS, SMALL_CHUNKS)
                .expect("store opens");
        Store(Arc::new(store))
    }

    fn event(call: &str) -> Event {
        let body = format!(r#"{{"event":"call_started","call_id":"{call}"}}"#);
        Event::from_webhook(None, Bytes::from(body)).expect("valid event")
    }

    async fn ingest(store: &Store, call: &str) -> Ingested {
        store
            .ingest(event(call), vec![Arc::from("a")])
            .await
            .expect("answered")
    }

    /// Ingests each call's event, each one new.
    async fn store_new(store: &Store, calls: impl IntoIterator<Item = String>) {
        for call in calls {
            assert!(
                matches!(ingest(store, &call).await, Ingested::Stored { .. }),
                "{call}"
            );
        }
    }

    fn count(dir: &Path, sql: &str) -> i64 {
        let conn = Connection::open(dir.join("router.db")).expect("sqlite");
        conn.query_row(sql, [], |r| r.get(0)).expect("count")
    }

    #[tokio::test]
    async fn a_duplicate_is_recognised_whether_its_key_is_in_memory_in_a_run_or_read_back_after_a_restart()
     {
        let dir = tempfile::tempdir().expect("tempdir");
        let calls: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        let store = open(dir.path());
        store_new(&store, calls.iter().cloned()).await;
        // Ten events in runs of four: two runs written, two keys only in memory.
        assert_eq!(count(dir.path(), "SELECT COUNT(*) FROM dedup_runs"), 2);
        assert_eq!(count(dir.path(), "SELECT COUNT(*) FROM dedup"), 8);
        for call in &calls {
            assert_eq!(ingest(&store, call).await, Ingested::Duplicate, "{call}");
        }
        store.close().await;
        drop(store);

        let store = open(dir.path());
        for call in &calls {
            assert_eq!(
                ingest(&store, call).await,
                Ingested::Duplicate,
                "{call} after a restart"
            );
            let key = format!("{call}:call_started");
            assert!(store.has_event(&key).await.expect("read"), "{call}");
            let shown = store.show_events(call).await.expect("read");
            assert_eq!(shown.len(), 1, "{call}");
        }
        assert!(matches!(
            ingest(&store, "c10").await,
            Ingested::Stored { .. }
        ));
        assert!(!store.has_event("c11:call_started").await.expect("read"));
    }

    #[tokio::test]
    async fn a_run_cut_short_by_a_stop_is_written_again_from_the_log_without_stray_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let calls: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
        let store = open(dir.path());
        store_new(&store, calls.iter().cloned()).await;
        // The fifth commit started the first run: half of it is written, not yet whole.
        assert_eq!(count(dir.path(), "SELECT COUNT(*) FROM dedup"), 2);
        assert_eq!(count(dir.path(), "SELECT COUNT(*) FROM dedup_runs"), 0);
        // What the writer's memory held then is what a crash at this point loses.
        store.close().await;
        drop(store);

        let store = open(dir.path());
        for call in &calls {
            assert_eq!(ingest(&store, call).await, Ingested::Duplicate, "{call}");
        }
        store_new(&store, (5..12).map(|i| format!("c{i}"))).await;
        for i in 0..12 {
            assert_eq!(
                ingest(&store, &format!("c{i}")).await,
                Ingested::Duplicate,
                "c{i}"
            );
        }
        let stray = count(
            dir.path(),
            "SELECT COUNT(*) FROM dedup d
             WHERE NOT EXISTS (SELECT 1 FROM dedup_runs r WHERE r.last = d.run)
                OR d.id NOT BETWEEN (SELECT first FROM dedup_runs r WHERE r.last = d.run) AND d.run",
        );
        assert_eq!(stray, 0, "keys outside a whole run, or in the wrong one");
        assert!(count(dir.path(), "SELECT COUNT(*) FROM dedup_runs") >= 1);
        assert_eq!(
            count(dir.path(), "SELECT COUNT(*) FROM dedup"),
            count(dir.path(), "SELECT COUNT(DISTINCT id) FROM dedup"),
        );
    }

    #[tokio::test]
    async fn pruning_deletes_a_run_with_its_last_event_and_ids_are_never_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        store_new(&store, (0..9).map(|i| format!("c{i}"))).await;
        let due = store.claim("a", 100, usize::MAX).await.expect("due");
        assert_eq!(due.len(), 9);
        let delivered = due
            .iter()
            .map(|d| Settlement::Delivered { id: d.id })
            .collect();
        store.settle(delivered).await.expect("settled");
        assert_eq!(count(dir.path(), "SELECT COUNT(*) FROM dedup_runs"), 2);
        let latest = count(dir.path(), "SELECT MAX(id) FROM events");

        let later = now() + Duration::from_secs(3600);
        let pruned = store.prune(later, later).await.expect("pruned");
        assert_eq!(pruned.events, 9);
        assert_eq!(count(dir.path(), "SELECT COUNT(*) FROM dedup_runs"), 0);
        assert_eq!(count(dir.path(), "SELECT COUNT(*) FROM dedup"), 0);
        store.close().await;
        drop(store);

        // Past the window a key is forgotten, as before; with every event gone, the next
        // one still gets a new id, after the sink's cursor, so it is delivered.
        let store = open(dir.path());
        assert!(matches!(
            ingest(&store, "c0").await,
            Ingested::Stored { .. }
        ));
        assert_eq!(count(dir.path(), "SELECT MAX(id) FROM events"), latest + 1);
        let due = store.claim("a", 100, usize::MAX).await.expect("due");
        assert_eq!(due.len(), 1, "the new event is due");
        assert_eq!(ingest(&store, "c0").await, Ingested::Duplicate);
    }

    #[tokio::test]
    async fn a_store_with_the_key_index_moves_its_keys_into_runs_and_still_knows_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("router.db");
        let total = i64::try_from(super::RUN_SIZE).expect("small") + 10;
        {
            let mut conn = schema::connect(&path, Synchronous::Normal).expect("sqlite");
            schema::migrate_to(&mut conn, &path, 5).expect("version 5");
            let tx = conn.transaction().expect("tx");
            {
                let mut insert = tx
                    .prepare(
                        "INSERT INTO events (id, key, dedup_key, event, call_id, source,
                                             received_at, sinks, codec, payload)
                         VALUES (?1, ?2, ?3, 'call_started', ?4, 'webhook', 0, '', 0, X'00')",
                    )
                    .expect("prepare");
                for id in 1..=total {
                    let call = format!("c{id}");
                    let key = format!("{call}:call_started");
                    insert
                        .execute(rusqlite::params![
                            id,
                            &super::super::keys::key(&key)[..],
                            key,
                            call
                        ])
                        .expect("insert");
                }
            }
            tx.commit().expect("commit");
        }
        let store = open(dir.path());
        assert_eq!(count(dir.path(), "SELECT COUNT(*) FROM dedup_runs"), 1);
        assert_eq!(
            count(dir.path(), "SELECT COUNT(*) FROM dedup"),
            total - 10,
            "the last, partial run stays in the log"
        );
        assert_eq!(
            count(
                dir.path(),
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'events_key'"
            ),
            0
        );
        for id in [1, total - 10, total - 9, total] {
            let call = format!("c{id}");
            assert_eq!(ingest(&store, &call).await, Ingested::Duplicate, "{call}");
        }
        assert!(matches!(
            ingest(&store, "new").await,
            Ingested::Stored { .. }
        ));
    }
}
