//! The SQLite store's behaviour through the store's own contract, and its files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::Connection;

use super::millis::{from_millis, to_millis};
use super::{schema, waiting, wal};
use crate::config::{StoreConfig, Synchronous};
use crate::event::Event;
use crate::store::{Ingested, Settlement, SinkQueue, Store, StoreOptions, now};

mod cursor;
mod history;
mod properties;

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        quarantine_max_bytes: 1000,
        ..StoreConfig::sqlite(dir.join("router.db"))
    }
}

async fn open(dir: &Path) -> Store {
    Store::open(&config(dir), StoreOptions::default())
        .await
        .expect("store opens")
}

/// A store holding a `call_started` event of each call, routed to sink `a`.
async fn open_with_started(dir: &Path, calls: &[&str]) -> Store {
    let store = open(dir).await;
    for call in calls {
        store
            .ingest(event(call, "call_started"), sinks(&["a"]))
            .await
            .expect("stored");
    }
    store
}

fn event(call: &str, name: &str) -> Event {
    let body = format!(r#"{{"event":"{name}","call_id":"{call}"}}"#);
    Event::from_webhook(None, Bytes::from(body)).expect("valid event")
}

fn sinks(names: &[&str]) -> Vec<Arc<str>> {
    names.iter().map(|n| Arc::from(*n)).collect()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

#[tokio::test]
async fn the_database_its_journal_files_and_new_directories_are_private_to_the_owner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir.path().join("data/store")).await;
    store
        .ingest(event("c1", "call_started"), sinks(&["a"]))
        .await
        .expect("stored");
    let db = dir.path().join("data/store/router.db");
    for file in [
        db.clone(),
        with_suffix(&db, "-wal"),
        with_suffix(&db, "-shm"),
    ] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    for created in ["data", "data/store"] {
        assert_eq!(mode(&dir.path().join(created)), 0o700, "{created}");
    }
}

#[tokio::test]
async fn an_existing_database_readable_by_others_is_restricted_and_its_directory_left_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let db = shared.join("router.db");
    // As a crash leaves them: a connection never closed keeps its -wal and -shm.
    let crashed = Connection::open(&db).expect("sqlite");
    crashed
        .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .expect("written");
    std::mem::forget(crashed);
    let files = [
        db.clone(),
        with_suffix(&db, "-wal"),
        with_suffix(&db, "-shm"),
    ];
    for file in &files {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let _store = open(&shared).await;
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    assert_eq!(mode(&shared), 0o755, "an existing directory keeps its mode");
}

/// Commits the store's writer has made, as its metrics count them.
fn commits(metrics: &crate::metrics::Metrics) -> u64 {
    let text = metrics.encode();
    text.lines()
        .find_map(|l| l.strip_prefix("vyora_router_store_commit_seconds_count "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no commit count in {text}"))
}

#[tokio::test]
async fn webhooks_arriving_within_the_commit_interval_share_one_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let config = StoreConfig {
        commit_interval: Duration::from_millis(500),
        ..config(dir.path())
    };
    let options = StoreOptions {
        metrics: Some(Arc::clone(&metrics)),
        ..StoreOptions::default()
    };
    let store = Store::open(&config, options).await.expect("store opens");
    // An idle writer commits at once.
    let first = store
        .ingest(event("c1", "call_started"), sinks(&["a"]))
        .await;
    assert_eq!(first.expect("stored"), Ingested::Stored { deliveries: 1 });
    assert_eq!(commits(&metrics), 1);
    // Without the interval the second would be committed before the third arrives.
    let (second, third) = tokio::join!(
        store.ingest(event("c2", "call_started"), sinks(&["a"])),
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            store
                .ingest(event("c3", "call_started"), sinks(&["a"]))
                .await
        }
    );
    assert_eq!(second.expect("stored"), Ingested::Stored { deliveries: 1 });
    assert_eq!(third.expect("stored"), Ingested::Stored { deliveries: 1 });
    assert_eq!(commits(&metrics), 2, "the second and third share a commit");
}

#[tokio::test]
async fn a_new_event_is_stored_once_and_due_on_each_of_its_sinks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let mut queue = store.queue("a");
    let mut queue_b = store.queue("b");
    let got = store
        .ingest(event("c1", "call_completed"), sinks(&["a", "b"]))
        .await;
    assert_eq!(got.expect("stored"), Ingested::Stored { deliveries: 2 });
    assert_eq!(queue.claim(10, usize::MAX).await.expect("due").len(), 1);
    assert_eq!(queue_b.claim(10, usize::MAX).await.expect("due").len(), 1);
}

#[tokio::test]
async fn a_second_queue_of_a_sink_claims_nothing_until_the_first_is_dropped_then_goes_on_from_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with_started(dir.path(), &["c1", "c2", "c3"]).await;
    let mut first = store.queue("a");
    let in_hand = first.claim(2, usize::MAX).await.expect("due");
    first
        .settle(
            vec![Settlement::Delivered { id: in_hand[0].id }],
            Vec::new(),
        )
        .await
        .expect("settled");
    // A reloaded dispatcher's queue, while the old one still drains.
    let mut second = store.queue("a");
    assert!(
        second.claim(10, usize::MAX).await.expect("due").is_empty(),
        "two owners of one sink's claims would hand out the same event twice"
    );
    drop(first);
    let rest = second.claim(10, usize::MAX).await.expect("due");
    let rows: Vec<_> = rest.iter().map(|d| d.id.row).collect();
    assert_eq!(
        rows,
        [in_hand[1].id.row, in_hand[1].id.row + 1],
        "the delivered event is not handed out again; the one dropped in hand is"
    );
}

#[tokio::test]
async fn concurrent_copies_of_one_event_store_exactly_one_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let mut queue = store.queue("a");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .ingest(event("c1", "call_completed"), sinks(&["a"]))
                    .await
            })
        })
        .collect();
    let mut stored = 0;
    for t in tasks {
        if t.await.expect("task").expect("ingest") != Ingested::Duplicate {
            stored += 1;
        }
    }
    assert_eq!(stored, 1);
    assert_eq!(queue.claim(100, usize::MAX).await.expect("due").len(), 1);
}

#[tokio::test]
async fn settled_rows_are_no_longer_due_and_retries_wait_for_their_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with_started(dir.path(), &["c1", "c2", "c3"]).await;
    let mut queue = store.queue("a");
    let rows = queue.claim(10, usize::MAX).await.expect("due");
    let later = now() + Duration::from_secs(3600);
    queue
        .settle(
            vec![
                Settlement::Delivered { id: rows[0].id },
                Settlement::Retry {
                    id: rows[1].id,
                    at: later,
                    error: "boom".into(),
                },
                Settlement::Dead {
                    id: rows[2].id,
                    error: "gone".into(),
                },
            ],
            Vec::new(),
        )
        .await
        .expect("settled");
    assert!(queue.claim(10, usize::MAX).await.expect("due").is_empty());
    let next = queue
        .next_due()
        .await
        .expect("next due")
        .expect("one pending");
    assert_eq!(to_millis(next), to_millis(later));
}

#[tokio::test]
async fn busy_rows_are_skipped_and_batches_stop_at_the_byte_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with_started(dir.path(), &["c1", "c2", "c3", "c4"]).await;
    let mut queue = store.queue("a");
    let first = queue.claim(1, usize::MAX).await.expect("due");
    let rest = queue.claim(10, usize::MAX).await.expect("due");
    assert_eq!(rest.len(), 3);
    assert!(rest.iter().all(|d| d.id != first[0].id));
    queue.release(first.iter().chain(&rest).map(|d| d.id).collect());
    let one = queue.claim(10, 1).await.expect("due");
    assert_eq!(one.len(), 1);
}

#[test]
fn a_wal_past_its_limit_is_truncated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("wal.db");
    let conn = schema::connect(&path, Synchronous::Normal).expect("connect");
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .expect("pragma");
    conn.execute_batch("CREATE TABLE t (b BLOB)")
        .expect("table");
    for _ in 0..100 {
        conn.execute("INSERT INTO t VALUES (zeroblob(10000))", [])
            .expect("insert");
    }
    let wal = schema::wal_path(&path);
    let before = std::fs::metadata(&wal).expect("wal").len();
    assert!(before > 1_000_000, "{before}");
    wal::limit_wal(&conn, &wal, 2 * before, 4 * before);
    assert_eq!(
        std::fs::metadata(&wal).expect("wal").len(),
        before,
        "under the target: untouched"
    );
    wal::limit_wal(&conn, &wal, 500_000, 1_000_000);
    assert_eq!(std::fs::metadata(&wal).expect("wal").len(), 0);
    let rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
        .expect("count");
    assert_eq!(rows, 100);
}

#[tokio::test]
async fn a_later_event_of_a_call_waits_until_the_earlier_one_is_settled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let mut queue = store.queue("a");
    store
        .ingest(event("c1", "call_completed"), sinks(&["a"]))
        .await
        .expect("stored");
    store
        .ingest(event("c1", "all_processing_completed"), sinks(&["a"]))
        .await
        .expect("stored");
    store
        .ingest(event("c2", "call_completed"), sinks(&["a"]))
        .await
        .expect("stored");
    let due = queue.claim(10, usize::MAX).await.expect("due");
    let keys: Vec<_> = due.iter().map(|d| d.dedup_key.as_str()).collect();
    assert_eq!(keys, ["c1:call_completed", "c2:call_completed"]);

    // Retrying still holds the later event back...
    let first = due[0].id;
    let retry = Settlement::Retry {
        id: first,
        at: now(),
        error: "down".into(),
    };
    queue
        .settle(vec![retry], Vec::new())
        .await
        .expect("settled");
    let due = queue.claim(10, usize::MAX).await.expect("due");
    assert!(
        due.iter()
            .all(|d| d.dedup_key != "c1:all_processing_completed")
    );

    // ...a dead one no longer does (settled under the claim it was retried with).
    let retried = due
        .iter()
        .find(|d| d.dedup_key == "c1:call_completed")
        .expect("the retry is due again");
    let dead = Settlement::Dead {
        id: retried.id,
        error: "gone".into(),
    };
    queue.settle(vec![dead], Vec::new()).await.expect("settled");
    let due = queue.claim(10, usize::MAX).await.expect("due");
    assert!(
        due.iter()
            .any(|d| d.dedup_key == "c1:all_processing_completed")
    );
}

#[tokio::test]
async fn reopening_keeps_the_schema_and_the_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    store
        .ingest(event("c1", "call_started"), sinks(&["a"]))
        .await
        .expect("stored");
    store.close().await;
    drop(store);
    let store = open(dir.path()).await;
    let again = store
        .ingest(event("c1", "call_started"), sinks(&["a"]))
        .await;
    assert_eq!(again.expect("answered"), Ingested::Duplicate);
}

#[tokio::test]
async fn a_database_in_the_outbox_layout_moves_to_the_event_log_with_its_deliveries_as_they_were() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("router.db");
    {
        // What a router before the event log left: version 4, one outbox row per delivery.
        let conn = Connection::open(&path).expect("open");
        for sql in schema::MIGRATIONS {
            conn.execute_batch(sql).expect("old schema");
        }
        let past = to_millis(now()) - 1000;
        for (id, call) in [(1, "c1"), (2, "c2"), (3, "c3"), (4, "c4")] {
            conn.execute(
                "INSERT INTO events (id, dedup_key, event, call_id, source, received_at, payload)
                 VALUES (?1, ?2, 'call_completed', ?3, 'webhook', ?4, ?5)",
                rusqlite::params![
                    id,
                    format!("{call}:call_completed"),
                    call,
                    past,
                    format!(r#"{{"event":"call_completed","call_id":"{call}"}}"#).into_bytes()
                ],
            )
            .expect("event");
        }
        for (event_id, sink, call, status, attempts) in [
            (1, "a", "c1", "delivered", 1),
            (2, "a", "c2", "pending", 2),
            (3, "a", "c3", "dead", 12),
            (4, "a", "c4", "pending", 0),
            (4, "b", "c4", "pending", 0),
        ] {
            conn.execute(
                "INSERT INTO outbox (event_id, sink, call_id, status, attempts, next_attempt_at,
                                     updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                rusqlite::params![event_id, sink, call, status, attempts, past],
            )
            .expect("outbox row");
        }
        conn.pragma_update(None, "user_version", 4)
            .expect("version");
    }

    let store = open(dir.path()).await;
    let mut queue = store.queue("a");
    let mut queue_b = store.queue("b");
    let mut due: Vec<_> = queue
        .claim(10, usize::MAX)
        .await
        .expect("due")
        .into_iter()
        .map(|d| (d.dedup_key, d.attempts, d.payload))
        .collect();
    due.sort();
    assert_eq!(
        due,
        [
            (
                "c2:call_completed".to_owned(),
                2,
                Bytes::from_static(br#"{"event":"call_completed","call_id":"c2"}"#)
            ),
            (
                "c4:call_completed".to_owned(),
                0,
                Bytes::from_static(br#"{"event":"call_completed","call_id":"c4"}"#)
            ),
        ],
        "pending stay pending with their attempts; delivered and dead are not handed out"
    );
    let b = queue_b.claim(10, usize::MAX).await.expect("due");
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].dedup_key, "c4:call_completed");
    let dead: String = Connection::open(&path)
        .expect("open")
        .query_row(
            "SELECT status FROM outbox WHERE sink = 'a' AND event_id = 3",
            [],
            |r| r.get(0),
        )
        .expect("the dead row");
    assert_eq!(dead, "dead");
    let again = store
        .ingest(event("c1", "call_completed"), sinks(&["a"]))
        .await;
    assert_eq!(
        again.expect("answered"),
        Ingested::Duplicate,
        "dedup history kept"
    );
}

#[tokio::test]
async fn pruning_goes_on_past_ranges_emptied_behind_a_dead_delivery() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let mut queue = store.queue("a");
    let many = |calls: std::ops::Range<usize>| {
        let tasks: Vec<_> = calls
            .map(|call| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .ingest(event(&format!("c{call}"), "call_completed"), Vec::new())
                        .await
                })
            })
            .collect();
        async move {
            for t in tasks {
                t.await.expect("task").expect("stored");
            }
        }
    };

    // The oldest event has a dead delivery, never replayed: it is kept for good.
    store
        .ingest(event("c0", "call_completed"), sinks(&["a"]))
        .await
        .expect("stored");
    let dead = queue.claim(1, usize::MAX).await.expect("due");
    let dead = Settlement::Dead {
        id: dead[0].id,
        error: "gone".into(),
    };
    queue.settle(vec![dead], Vec::new()).await.expect("settled");
    // Behind it, more than three ranges of events that pruning deletes, then one kept
    // (pending) so the deleted ids stay a hole instead of being reused.
    many(1..1601).await;
    store
        .ingest(event("c1601", "call_completed"), sinks(&["a"]))
        .await
        .expect("stored");

    let later = now() + Duration::from_secs(3600);
    let pruned = store.prune(later, later).await.expect("pruned");
    assert_eq!(pruned.events, 1600);

    // Events stored after the hole must still be pruned on the next pass.
    many(2000..2300).await;
    let later = now() + Duration::from_secs(3600);
    let pruned = store.prune(later, later).await.expect("pruned");
    assert_eq!(pruned.events, 300, "the pass stopped at an empty range");
}

#[tokio::test]
async fn a_new_database_gets_small_pages_and_an_existing_one_keeps_its_own() {
    let page_size = |path: &Path| -> i64 {
        Connection::open(path)
            .expect("open")
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .expect("page size")
    };
    let fresh = tempfile::tempdir().expect("tempdir");
    open(fresh.path()).await.close().await;
    assert_eq!(page_size(&fresh.path().join("router.db")), 1024);

    let old = tempfile::tempdir().expect("tempdir");
    Connection::open(old.path().join("router.db"))
        .expect("create")
        .execute_batch("PRAGMA page_size = 4096; PRAGMA journal_mode = WAL; CREATE TABLE t (x);")
        .expect("an older database");
    open(old.path()).await.close().await;
    assert_eq!(page_size(&old.path().join("router.db")), 4096);
}

#[test]
fn a_stored_payload_comes_back_byte_identical_and_a_damaged_frame_is_an_error() {
    let body = crate::trigger::payload("call_completed", "call-z1");
    let (stored, codec) = super::codec::compress(body.as_bytes());
    assert_eq!(codec, super::codec::CODEC_ZSTD, "JSON this size compresses");
    assert!(stored.len() < body.len());
    let back = super::codec::decompress(codec, stored.clone()).expect("decompresses");
    assert_eq!(&back[..], body.as_bytes());
    // Twice on one thread: the context is reused, not spent.
    assert_eq!(
        &super::codec::decompress(codec, stored.clone()).expect("again")[..],
        body.as_bytes()
    );

    let (raw, codec) = super::codec::compress(b"{}");
    assert_eq!(
        (raw.as_slice(), codec),
        (&b"{}"[..], super::codec::CODEC_RAW),
        "too small to gain"
    );

    let mut damaged = stored;
    damaged.truncate(damaged.len() / 2);
    assert!(super::codec::decompress(super::codec::CODEC_ZSTD, damaged).is_err());
}

#[tokio::test]
async fn dead_deliveries_are_listed_newest_first_for_a_sink_or_for_all_and_counted_per_sink() {
    use crate::store::operator::{DeliveryStatus, ListFilter};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir.path().join("s")).await;
    for n in 1..=6 {
        store
            .ingest(
                event(&format!("c{n}"), "call_completed"),
                sinks(&["a", "b"]),
            )
            .await
            .expect("stored");
    }
    // Calls 1, 2 and 4 die at `a`, call 3 at `b`; the rest are delivered.
    for (sink, dying) in [("a", ["c1", "c2", "c4"].as_slice()), ("b", &["c3"])] {
        let mut queue = store.queue(sink);
        let due = queue.claim(10, usize::MAX).await.expect("due");
        let settled = due
            .iter()
            .map(|d| match d.call_id.as_deref() {
                Some(call) if dying.contains(&call) => Settlement::Dead {
                    id: d.id,
                    error: "gone".into(),
                },
                _ => Settlement::Delivered { id: d.id },
            })
            .collect();
        queue.settle(settled, Vec::new()).await.expect("settled");
    }
    let dead = |sink: Option<&str>, limit| {
        let filter = ListFilter {
            sink: sink.map(str::to_owned),
            status: Some(DeliveryStatus::Dead),
            limit,
            ..ListFilter::default()
        };
        let store = &store;
        async move {
            store
                .list_deliveries(&filter)
                .await
                .expect("listed")
                .into_iter()
                .map(|row| (row.call_id.unwrap_or_default(), row.sink))
                .collect::<Vec<_>>()
        }
    };
    let pair = |call: &str, sink: &str| (call.to_owned(), sink.to_owned());
    assert_eq!(dead(None, 2).await, [pair("c4", "a"), pair("c3", "b")]);
    assert_eq!(
        dead(Some("a"), 10).await,
        [pair("c4", "a"), pair("c2", "a"), pair("c1", "a")]
    );
    assert_eq!(dead(Some("b"), 10).await, [pair("c3", "b")]);
    let stats = store.stats().await.expect("stats");
    let counted: Vec<(&str, i64, i64)> = stats
        .sinks
        .iter()
        .map(|s| (s.sink.as_str(), s.dead, s.pending))
        .collect();
    assert_eq!(counted, [("a", 3, 0), ("b", 1, 0)]);

    // A retry waiting for its time is pending, as old as its event.
    let received = now();
    store
        .ingest(event("c7", "call_completed"), sinks(&["a"]))
        .await
        .expect("stored");
    let mut queue = store.queue("a");
    let due = queue.claim(10, usize::MAX).await.expect("due");
    let retry = Settlement::Retry {
        id: due[0].id,
        at: now() + Duration::from_secs(3600),
        error: "boom".into(),
    };
    queue
        .settle(vec![retry], Vec::new())
        .await
        .expect("settled");
    let stats = store.stats().await.expect("stats");
    let a = &stats.sinks[0];
    assert_eq!((a.pending, a.dead), (1, 3));
    let oldest = a
        .oldest_pending
        .expect("the retry's event is the oldest pending");
    assert!(
        oldest >= received - Duration::from_secs(1) && oldest <= now(),
        "{oldest:?}"
    );
}
