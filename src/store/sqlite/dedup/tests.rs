//! The dedup index: runs, Bloom filters and chunked writes against a real database.

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
    let mut queue = store.queue("a");
    store_new(&store, (0..9).map(|i| format!("c{i}"))).await;
    let due = queue.claim(100, usize::MAX).await.expect("due");
    assert_eq!(due.len(), 9);
    let delivered = due
        .iter()
        .map(|d| Settlement::Delivered { id: d.id })
        .collect();
    queue.settle(delivered, Vec::new()).await.expect("settled");
    assert_eq!(count(dir.path(), "SELECT COUNT(*) FROM dedup_runs"), 2);
    let latest = count(dir.path(), "SELECT MAX(id) FROM events");

    let later = now() + Duration::from_secs(3600);
    let pruned = store.prune(later, later).await.expect("pruned");
    assert_eq!(pruned.events, 9);
    assert_eq!(count(dir.path(), "SELECT COUNT(*) FROM dedup_runs"), 0);
    assert_eq!(count(dir.path(), "SELECT COUNT(*) FROM dedup"), 0);
    store.close().await;
    drop(queue);
    drop(store);

    // Past the window a key is forgotten, as before; with every event gone, the next
    // one still gets a new id, after the sink's cursor, so it is delivered.
    let store = open(dir.path());
    let mut queue = store.queue("a");
    assert!(matches!(
        ingest(&store, "c0").await,
        Ingested::Stored { .. }
    ));
    assert_eq!(count(dir.path(), "SELECT MAX(id) FROM events"), latest + 1);
    let due = queue.claim(100, usize::MAX).await.expect("due");
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
