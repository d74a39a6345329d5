//! The SQLite store's behaviour through the store's own contract, and its files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::Connection;

use super::millis::{from_millis, to_millis};
use super::{schema, writer};
use crate::config::{StoreConfig, Synchronous};
use crate::event::Event;
use crate::store::{Ingested, Settlement, Store, StoreOptions, now};

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
async fn a_new_event_is_stored_with_one_outbox_row_per_sink() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let got = store
        .ingest(event("c1", "call_completed"), sinks(&["a", "b"]))
        .await;
    assert_eq!(got.expect("stored"), Ingested::Stored { deliveries: 2 });
    assert_eq!(
        store.claim("a", 10, usize::MAX).await.expect("due").len(),
        1
    );
    assert_eq!(
        store.claim("b", 10, usize::MAX).await.expect("due").len(),
        1
    );
}

#[tokio::test]
async fn concurrent_copies_of_one_event_store_exactly_one_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
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
    assert_eq!(
        store.claim("a", 100, usize::MAX).await.expect("due").len(),
        1
    );
}

#[tokio::test]
async fn settled_rows_are_no_longer_due_and_retries_wait_for_their_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with_started(dir.path(), &["c1", "c2", "c3"]).await;
    let rows = store.claim("a", 10, usize::MAX).await.expect("due");
    let later = now() + Duration::from_secs(3600);
    store
        .settle(vec![
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
        ])
        .await
        .expect("settled");
    assert!(
        store
            .claim("a", 10, usize::MAX)
            .await
            .expect("due")
            .is_empty()
    );
    let next = store
        .next_due("a")
        .await
        .expect("next due")
        .expect("one pending");
    assert_eq!(to_millis(next), to_millis(later));
}

#[tokio::test]
async fn busy_rows_are_skipped_and_batches_stop_at_the_byte_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with_started(dir.path(), &["c1", "c2", "c3", "c4"]).await;
    let first = store.claim("a", 1, usize::MAX).await.expect("due");
    let rest = store.claim("a", 10, usize::MAX).await.expect("due");
    assert_eq!(rest.len(), 3);
    assert!(rest.iter().all(|d| d.id != first[0].id));
    store.release(first.iter().chain(&rest).map(|d| d.id).collect());
    let one = store.claim("a", 10, 1).await.expect("due");
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
    writer::limit_wal(&conn, &wal, 2 * before, 4 * before);
    assert_eq!(
        std::fs::metadata(&wal).expect("wal").len(),
        before,
        "under the target: untouched"
    );
    writer::limit_wal(&conn, &wal, 500_000, 1_000_000);
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
    let due = store.claim("a", 10, usize::MAX).await.expect("due");
    let keys: Vec<_> = due.iter().map(|d| d.dedup_key.as_str()).collect();
    assert_eq!(keys, ["c1:call_completed", "c2:call_completed"]);

    // Retrying still holds the later event back...
    let first = due[0].id;
    let retry = Settlement::Retry {
        id: first,
        at: now(),
        error: "down".into(),
    };
    store.settle(vec![retry]).await.expect("settled");
    let due = store.claim("a", 10, usize::MAX).await.expect("due");
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
    store.settle(vec![dead]).await.expect("settled");
    let due = store.claim("a", 10, usize::MAX).await.expect("due");
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
    let mut due: Vec<_> = store
        .claim("a", 10, usize::MAX)
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
    let b = store.claim("b", 10, usize::MAX).await.expect("due");
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
    let dead = store.claim("a", 1, usize::MAX).await.expect("due");
    let dead = Settlement::Dead {
        id: dead[0].id,
        error: "gone".into(),
    };
    store.settle(vec![dead]).await.expect("settled");
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

/// One step of a dispatcher's life, as the property below drives the store.
#[derive(Debug, Clone)]
enum Step {
    Ingest { call: u8, event: u8, sinks: u8 },
    Claim { sink: u8, limit: usize },
    Settle { pick: usize, outcome: u8 },
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        (0u8..4, 0u8..3, 1u8..4).prop_map(|(call, event, sinks)| Step::Ingest {
            call,
            event,
            sinks
        }),
        (0u8..2, 1usize..4).prop_map(|(sink, limit)| Step::Claim { sink, limit }),
        (any::<usize>(), 0u8..6).prop_map(|(pick, outcome)| Step::Settle { pick, outcome }),
    ]
}

/// What the property remembers of one (sink, event): handed out, and how it ended.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum Fate {
    #[default]
    Open,
    Delivered,
    Dead,
}

type Fates = std::collections::HashMap<(&'static str, i64), Fate>;

/// Claims for `sink` and checks what came out against what the property knows.
async fn claim_checked(
    store: &Store,
    sink: &'static str,
    limit: usize,
    events: &[(i64, String, Vec<&'static str>)],
    fates: &Fates,
    in_hand: &mut Vec<(&'static str, crate::event::Delivery)>,
) {
    let due = store.claim(sink, limit, usize::MAX).await.expect("claim");
    for d in due {
        let row = d.id.row;
        assert!(
            !in_hand.iter().any(|(s, h)| *s == sink && h.id.row == row),
            "event {row} handed out twice on {sink}"
        );
        assert_eq!(
            fates.get(&(sink, row)),
            Some(&Fate::Open),
            "event {row} on {sink} had ended"
        );
        let call = d.call_id.clone().expect("call");
        for (id, c, routed) in events {
            if *id < row && *c == call && routed.contains(&sink) {
                assert_ne!(
                    fates[&(sink, *id)],
                    Fate::Open,
                    "event {row} went out on {sink} before {id} of its call ended"
                );
            }
        }
        in_hand.push((sink, d));
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]

    /// Whatever the interleaving of claims and outcomes: nothing is handed out twice at
    /// once, a call's event goes out only after its earlier ones ended, every event ends
    /// up delivered or dead on every sink it was routed to, and the outbox says so.
    #[test]
    fn claims_and_settlements_in_any_order_keep_call_order_and_lose_nothing(
        steps in proptest::collection::vec(step(), 1..80)
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = open(dir.path()).await;
            let names = ["a", "b"];
            let db = Connection::open(dir.path().join("router.db")).expect("open");
            // (event id, call, sinks) in ingest order; fates per (sink, event id).
            let mut events: Vec<(i64, String, Vec<&'static str>)> = Vec::new();
            let mut fates = Fates::default();
            let mut in_hand: Vec<(&'static str, crate::event::Delivery)> = Vec::new();
            for step in steps {
                match step {
                    Step::Ingest { call, event, sinks: mask } => {
                        let name = ["call_started", "call_completed", "all_processing_completed"][usize::from(event)];
                        let routed: Vec<&str> = names.iter().enumerate()
                            .filter(|(i, _)| mask & (1 << i) != 0).map(|(_, n)| *n).collect();
                        let call = format!("c{call}");
                        let stored = store.ingest(self::event(&call, name), sinks(&routed)).await.expect("stored");
                        if let Ingested::Stored { .. } = stored {
                            let event_id: i64 = db
                                .query_row("SELECT id FROM events WHERE dedup_key = ?1", [format!("{call}:{name}")], |r| r.get(0))
                                .expect("stored event");
                            for sink in &routed {
                                fates.insert((sink, event_id), Fate::Open);
                            }
                            events.push((event_id, call, routed));
                        }
                    }
                    Step::Claim { sink, limit } => {
                        let sink = names[usize::from(sink)];
                        claim_checked(&store, sink, limit, &events, &fates, &mut in_hand).await;
                    }
                    Step::Settle { pick, outcome } => {
                        if in_hand.is_empty() {
                            continue;
                        }
                        let (sink, d) = in_hand.remove(pick % in_hand.len());
                        let id = d.id;
                        let error = "no".to_owned();
                        let settlement = match outcome {
                            0 | 1 => Some(Settlement::Delivered { id }),
                            2 => Some(Settlement::Retry { id, at: now(), error }),
                            3 => Some(Settlement::Dead { id, error }),
                            // The sink is down: a pause that is already over.
                            4 => Some(Settlement::Postpone { id, at: now(), error }),
                            _ => None,
                        };
                        match settlement {
                            Some(s) => {
                                let fate = match s {
                                    Settlement::Delivered { .. } => Fate::Delivered,
                                    Settlement::Dead { .. } => Fate::Dead,
                                    _ => Fate::Open,
                                };
                                store.settle(vec![s]).await.expect("settled");
                                fates.insert((sink, id.row), fate);
                            }
                            None => store.release(vec![id]),
                        }
                    }
                }
            }
            // Drain: everything still open goes out and is delivered.
            for (_, d) in in_hand.drain(..) {
                store.release(vec![d.id]);
            }
            for _ in 0..200 {
                if fates.values().all(|f| *f != Fate::Open) {
                    break;
                }
                for sink in names {
                    claim_checked(&store, sink, 10, &events, &fates, &mut in_hand).await;
                }
                for (sink, d) in in_hand.drain(..) {
                    store.settle(vec![Settlement::Delivered { id: d.id }]).await.expect("settled");
                    fates.insert((sink, d.id.row), Fate::Delivered);
                }
            }
            let open: Vec<_> = fates.iter().filter(|(_, f)| **f == Fate::Open).collect();
            assert!(open.is_empty(), "never delivered: {open:?}");
            for ((sink, id), fate) in &fates {
                let status: String = db
                    .query_row("SELECT status FROM outbox WHERE sink = ?1 AND event_id = ?2", rusqlite::params![sink, id], |r| r.get(0))
                    .expect("outbox row");
                let expected = if *fate == Fate::Dead { "dead" } else { "delivered" };
                assert_eq!(status, expected, "event {id} on {sink}");
            }
            store.close().await;
        });
    }
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

/// Row ids of a claim's deliveries.
async fn claim_rows(store: &Store, sink: &str, limit: usize) -> Vec<i64> {
    let due = store.claim(sink, limit, usize::MAX).await.expect("claim");
    due.iter().map(|d| d.id.row).collect()
}

/// Makes every write of `table` fail until the returned trigger is dropped again, as a
/// full disk would: the writer's transaction is rolled back.
fn fail_writes_of(db: &Connection, table: &str) {
    db.execute_batch(&format!(
        "CREATE TRIGGER fail_{table} BEFORE INSERT ON {table}
         BEGIN SELECT RAISE(ABORT, 'disk full'); END;"
    ))
    .expect("trigger");
}

fn cursor_of(db: &Connection, sink: &str) -> i64 {
    db.query_row(
        "SELECT position FROM cursors WHERE sink = ?1",
        [sink],
        |r| r.get(0),
    )
    .expect("cursor")
}

#[tokio::test]
async fn a_failure_whose_retry_row_was_not_written_goes_out_again_though_a_later_write_went_through()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("router.db");
    let store = open_with_started(dir.path(), &["c1", "c2", "c3", "c4"]).await;
    let due = store.claim("a", 10, usize::MAX).await.expect("due");
    let ids: Vec<_> = due.iter().map(|d| d.id).collect();
    let db = Connection::open(&path).expect("open");
    fail_writes_of(&db, "retries");
    // Two deliveries finish together: the first failed (its retry row cannot be
    // written), the others went through (a cursor move, which can).
    let failed = store.settle(vec![Settlement::Retry {
        id: ids[0],
        at: now(),
        error: "500".into(),
    }]);
    let delivered = store.settle(
        ids[1..]
            .iter()
            .map(|id| Settlement::Delivered { id: *id })
            .collect(),
    );
    let (failed, delivered) = tokio::join!(failed, delivered);
    assert!(failed.is_err(), "the retry row was refused");
    delivered.expect("nothing of it was refused");
    assert!(
        cursor_of(&db, "a") < 1,
        "the stored cursor passed event 1, whose retry row is not written"
    );
    db.execute_batch("DROP TRIGGER fail_retries").expect("drop");
    assert_eq!(claim_rows(&store, "a", 10).await, [1], "handed out again");
    // And after a restart (a crash now would find the same), with the others again:
    // the cursor could not pass them before event 1.
    drop(store);
    let store = open(dir.path()).await;
    assert_eq!(claim_rows(&store, "a", 10).await, [1, 2, 3, 4]);
}

#[tokio::test]
async fn two_failed_writes_hand_back_every_failure_whatever_order_they_fail_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with_started(dir.path(), &["c1", "c2", "c3", "c4"]).await;
    let due = store.claim("a", 10, usize::MAX).await.expect("due");
    let ids: Vec<_> = due.iter().map(|d| d.id).collect();
    let db = Connection::open(dir.path().join("router.db")).expect("open");
    fail_writes_of(&db, "retries");
    let retry = |i: usize| Settlement::Retry {
        id: ids[i],
        at: now(),
        error: "500".into(),
    };
    let first = store.settle(vec![retry(0), Settlement::Delivered { id: ids[1] }]);
    let second = store.settle(vec![retry(2), Settlement::Delivered { id: ids[3] }]);
    let (first, second) = tokio::join!(first, second);
    assert!(first.is_err() && second.is_err());
    db.execute_batch("DROP TRIGGER fail_retries").expect("drop");
    assert_eq!(claim_rows(&store, "a", 10).await, [1, 3]);
}

#[tokio::test]
async fn a_failure_whose_caller_stopped_waiting_for_its_write_is_not_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with_started(dir.path(), &["c1", "c2"]).await;
    let due = store.claim("a", 10, usize::MAX).await.expect("due");
    // The write waits for a lock someone else holds; the delivery task is cancelled
    // meanwhile (a sink reload's drain timeout).
    let lock = Connection::open(dir.path().join("router.db")).expect("open");
    lock.execute_batch("BEGIN IMMEDIATE").expect("lock");
    let settled = tokio::time::timeout(
        Duration::from_millis(200),
        store.settle(vec![Settlement::Retry {
            id: due[0].id,
            at: now(),
            error: "500".into(),
        }]),
    )
    .await;
    assert!(settled.is_err(), "cancelled while waiting");
    lock.execute_batch("COMMIT").expect("unlock");
    store
        .settle(vec![Settlement::Delivered { id: due[1].id }])
        .await
        .expect("settled");
    // Whether the abandoned write landed or not, event 1 is delivered once more: as a
    // first attempt handed out again, or through its retry row.
    let mut again = Vec::new();
    for _ in 0..50 {
        again = claim_rows(&store, "a", 10).await;
        if !again.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(again, [1]);
}

#[tokio::test]
async fn a_damaged_payload_goes_to_the_dead_letters_and_the_rest_of_its_batch_goes_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with_started(dir.path(), &["c1", "c2", "c3"]).await;
    let db = Connection::open(dir.path().join("router.db")).expect("open");
    db.execute(
        "UPDATE events SET codec = ?1, payload = X'00010203' WHERE id = 2",
        [super::codec::CODEC_ZSTD],
    )
    .expect("damage");
    let due = store.claim("a", 10, usize::MAX).await.expect("due");
    assert_eq!(due.iter().map(|d| d.id.row).collect::<Vec<_>>(), [1, 3]);
    let (status, error): (String, String) = db
        .query_row(
            "SELECT status, last_error FROM retries WHERE sink = 'a' AND event_id = 2",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("a dead row");
    assert_eq!(status, "dead");
    assert!(error.contains("damaged"), "{error}");
    store
        .settle(
            due.iter()
                .map(|d| Settlement::Delivered { id: d.id })
                .collect(),
        )
        .await
        .expect("settled");
    assert!(claim_rows(&store, "a", 10).await.is_empty());
    assert_eq!(cursor_of(&db, "a"), 3, "the sink goes on past it");
}

#[tokio::test]
async fn the_cursor_of_a_sink_that_rarely_gets_an_event_moves_past_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    store
        .ingest(event("c0", "call_started"), sinks(&["rare"]))
        .await
        .expect("stored");
    for n in 1..=20 {
        store
            .ingest(event(&format!("c{n}"), "call_started"), sinks(&["busy"]))
            .await
            .expect("stored");
    }
    let due = store.claim("rare", 10, usize::MAX).await.expect("due");
    store
        .settle(vec![Settlement::Delivered { id: due[0].id }])
        .await
        .expect("settled");
    assert!(claim_rows(&store, "rare", 10).await.is_empty());
    let db = Connection::open(dir.path().join("router.db")).expect("open");
    assert_eq!(
        cursor_of(&db, "rare"),
        21,
        "its next claims would read the other sink's events again"
    );
}

#[tokio::test]
async fn events_held_behind_pending_retries_do_not_stop_other_calls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    // A hundred calls whose first event fails for an hour, each with a later event that
    // must wait for it: far more held events than one claim returns.
    for n in 0..100 {
        store
            .ingest(event(&format!("c{n}"), "call_started"), sinks(&["a"]))
            .await
            .expect("stored");
    }
    let failing = store.claim("a", 100, usize::MAX).await.expect("due");
    let in_an_hour = now() + Duration::from_secs(3600);
    store
        .settle(
            failing
                .iter()
                .map(|d| Settlement::Retry {
                    id: d.id,
                    at: in_an_hour,
                    error: "500".into(),
                })
                .collect(),
        )
        .await
        .expect("settled");
    for n in 0..100 {
        store
            .ingest(event(&format!("c{n}"), "call_completed"), sinks(&["a"]))
            .await
            .expect("stored");
    }
    store
        .ingest(event("other", "call_started"), sinks(&["a"]))
        .await
        .expect("stored");
    assert_eq!(claim_rows(&store, "a", 10).await, [201]);
}

#[tokio::test]
async fn an_event_held_behind_its_calls_failing_event_gets_a_waiting_row_and_the_cursor_passes_it()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    store
        .ingest(event("c1", "call_completed"), sinks(&["a"]))
        .await
        .expect("stored");
    store
        .ingest(event("c1", "all_processing_completed"), sinks(&["a"]))
        .await
        .expect("stored");
    for n in 0..50 {
        store
            .ingest(event(&format!("other{n}"), "call_completed"), sinks(&["a"]))
            .await
            .expect("stored");
    }
    let due = store.claim("a", 100, usize::MAX).await.expect("due");
    assert_eq!(due.len(), 51, "all but the held event");
    let in_an_hour = now() + Duration::from_secs(3600);
    let settled = due
        .iter()
        .map(|d| {
            if d.dedup_key == "c1:call_completed" {
                Settlement::Retry {
                    id: d.id,
                    at: in_an_hour,
                    error: "500".into(),
                }
            } else {
                Settlement::Delivered { id: d.id }
            }
        })
        .collect();
    store.settle(settled).await.expect("settled");
    let db = Connection::open(dir.path().join("router.db")).expect("open");
    assert_eq!(cursor_of(&db, "a"), 52, "the cursor passed the held event");
    let (status, at, note): (String, i64, String) = db
        .query_row(
            "SELECT status, next_attempt_at, last_error FROM retries WHERE event_id = 2",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("the held event's row");
    assert_eq!((status.as_str(), at), ("pending", writer::WAITING));
    assert!(note.contains("earlier event of its call"), "{note}");
    let shown: (String, String) = db
        .query_row(
            "SELECT status, last_error FROM outbox WHERE event_id = 2",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("the outbox view shows it");
    assert_eq!(shown.0, "pending");
    assert_eq!(
        store.next_due("a").await.expect("next due"),
        Some(in_an_hour).map(|t| from_millis(to_millis(t))),
        "a waiting row has no time of its own"
    );
    drop(store);

    // After a restart, the failing event's success lets the held one go, in order.
    let store = open(dir.path()).await;
    db.execute(
        "UPDATE retries SET next_attempt_at = 0 WHERE event_id = 1",
        [],
    )
    .expect("due now");
    let due = store.claim("a", 10, usize::MAX).await.expect("due");
    assert_eq!(due.iter().map(|d| d.id.row).collect::<Vec<_>>(), [1]);
    store
        .settle(vec![Settlement::Delivered { id: due[0].id }])
        .await
        .expect("settled");
    let due = store.claim("a", 10, usize::MAX).await.expect("due");
    assert_eq!(due.iter().map(|d| d.id.row).collect::<Vec<_>>(), [2]);
    assert_eq!(due[0].attempts, 0, "waiting used no attempt");
}

#[tokio::test]
async fn an_event_held_behind_one_in_hand_at_a_crash_goes_out_after_it_not_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    store
        .ingest(event("c1", "call_completed"), sinks(&["a"]))
        .await
        .expect("stored");
    store
        .ingest(event("c1", "all_processing_completed"), sinks(&["a"]))
        .await
        .expect("stored");
    // 1 is in hand and never settled (the process dies); 2 is held back behind it.
    assert_eq!(claim_rows(&store, "a", 10).await, [1]);
    assert!(claim_rows(&store, "a", 10).await.is_empty());
    drop(store);

    let store = open(dir.path()).await;
    let due = store.claim("a", 10, usize::MAX).await.expect("due");
    assert_eq!(due.iter().map(|d| d.id.row).collect::<Vec<_>>(), [1]);
    store
        .settle(vec![Settlement::Delivered { id: due[0].id }])
        .await
        .expect("settled");
    assert_eq!(claim_rows(&store, "a", 10).await, [2]);
}
