//! The PostgreSQL store against a real server (each test in a database of its own):
//! dedup across processes, claims under leases, roles, the shared API budget, migrations,
//! and a router on it end to end.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::pg::TestDb;
use common::*;
use vyora_router::config::{StoreBackend, StoreConfig};
use vyora_router::event::Event;
use vyora_router::metrics::Metrics;
use vyora_router::store::operator::{DeliveryStatus, EventFilter, ListFilter, Replay, SinkPause};
use vyora_router::store::{
    Attempt, AttemptOutcome, Ingested, Role, Settlement, Store, StoreError, StoreOptions,
};

const WAIT: Duration = Duration::from_secs(15);

fn config(db: &TestDb, lease: Duration) -> StoreConfig {
    StoreConfig {
        backend: StoreBackend::Postgres(Box::new(db.postgres(4))),
        lease,
        ..StoreConfig::sqlite("unused".into())
    }
}

async fn open(db: &TestDb, lease: Duration) -> Store {
    open_with(db, lease, StoreOptions::default()).await
}

async fn open_with(db: &TestDb, lease: Duration, options: StoreOptions) -> Store {
    Store::open(&config(db, lease), options)
        .await
        .expect("the store opens")
}

fn event(call: &str, name: &str) -> Event {
    let body = format!(r#"{{"event":"{name}","call_id":"{call}"}}"#);
    Event::from_webhook(None, Bytes::from(body)).expect("event")
}

fn sinks(names: &[&str]) -> Vec<Arc<str>> {
    names.iter().map(|n| Arc::from(*n)).collect()
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn fifty_concurrent_copies_through_three_processes_store_one_event_and_one_fan_out() {
    let db = TestDb::create().await;
    let lease = Duration::from_secs(30);
    let stores = [
        open(&db, lease).await,
        open(&db, lease).await,
        open(&db, lease).await,
    ];
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = stores[i % 3].clone();
            tokio::spawn(async move {
                store
                    .ingest(event("c1", "call_completed"), sinks(&["a", "b"]))
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
    assert_eq!(db.count("SELECT count(*) FROM events").await, 1);
    assert_eq!(db.count("SELECT count(*) FROM deliveries").await, 2);
    for store in stores {
        store.close().await;
    }
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn a_claim_is_exclusive_and_a_later_event_of_the_call_waits_across_replicas() {
    let db = TestDb::create().await;
    let lease = Duration::from_secs(30);
    let (a, b) = (open(&db, lease).await, open(&db, lease).await);
    a.ingest(event("c1", "call_completed"), sinks(&["s"]))
        .await
        .expect("stored");
    a.ingest(event("c1", "all_processing_completed"), sinks(&["s"]))
        .await
        .expect("stored");
    a.ingest(event("c2", "call_completed"), sinks(&["s"]))
        .await
        .expect("stored");
    let first = a.queue("s").claim(1, usize::MAX).await.expect("claim");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].dedup_key, "c1:call_completed");
    // The other replica gets neither the claimed row nor the call's later event.
    let other = b.queue("s").claim(10, usize::MAX).await.expect("claim");
    let keys: Vec<_> = other.iter().map(|d| d.dedup_key.as_str()).collect();
    assert_eq!(keys, ["c2:call_completed"]);
    a.queue("s")
        .settle(vec![Settlement::Delivered { id: first[0].id }], Vec::new())
        .await
        .expect("settled");
    let next = b.queue("s").claim(10, usize::MAX).await.expect("claim");
    let keys: Vec<_> = next.iter().map(|d| d.dedup_key.as_str()).collect();
    assert_eq!(keys, ["c1:all_processing_completed"]);
    a.close().await;
    b.close().await;
}

/// The history of `call`'s only event's only delivery, as (number, outcome).
async fn history(store: &Store, call: &str) -> Vec<(u32, String)> {
    let events = store.show_events(call).await.expect("shown");
    events[0].deliveries[0]
        .history
        .iter()
        .map(|a| (a.number, a.outcome.clone()))
        .collect()
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn a_delivery_keeps_its_latest_attempts_up_to_the_limit_and_loses_them_with_its_payload() {
    let db = TestDb::create().await;
    let options = StoreOptions {
        attempts_kept: 3,
        ..StoreOptions::default()
    };
    let store = open_with(&db, Duration::from_secs(30), options).await;
    store
        .ingest(event("c1", "call_completed"), sinks(&["s"]))
        .await
        .expect("stored");
    let attempt = |id, number, outcome| Attempt {
        id,
        number,
        started_at: std::time::SystemTime::now(),
        duration: Duration::from_millis(7),
        outcome,
        code: Some(503),
        error: Some(format!("answered 503 ({number})")),
        response: Some(format!("busy {number}")),
    };
    for number in 1..=4 {
        let due = store.queue("s").claim(10, usize::MAX).await.expect("claim");
        let id = due[0].id;
        let retry = Settlement::Retry {
            id,
            at: std::time::SystemTime::now(),
            error: "answered 503".into(),
        };
        let kept = attempt(id, number, AttemptOutcome::Retried);
        store
            .queue("s")
            .settle(vec![retry], vec![kept])
            .await
            .expect("settled");
    }
    let due = store.queue("s").claim(10, usize::MAX).await.expect("claim");
    let id = due[0].id;
    let delivered = attempt(id, 5, AttemptOutcome::Delivered);
    store
        .queue("s")
        .settle(vec![Settlement::Delivered { id }], vec![delivered])
        .await
        .expect("settled");
    assert_eq!(
        history(&store, "c1").await,
        [
            (3, "retried".into()),
            (4, "retried".into()),
            (5, "delivered".into())
        ]
    );
    let events = store.show_events("c1").await.expect("shown");
    let third = &events[0].deliveries[0].history[0];
    assert_eq!(
        (third.code, third.duration_ms, third.response.as_deref()),
        (Some(503), 7, Some("busy 3"))
    );

    let later = std::time::SystemTime::now() + Duration::from_secs(60);
    let pruned = store
        .prune(later, std::time::SystemTime::UNIX_EPOCH)
        .await
        .expect("pruned");
    assert_eq!(pruned.payloads, 1);
    assert_eq!(history(&store, "c1").await, []);
    store.close().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn events_are_listed_newest_first_by_page_and_by_event_sink_status_and_time() {
    let db = TestDb::create().await;
    let store = open(&db, Duration::from_secs(30)).await;
    for call in ["c1", "c2", "c3"] {
        for name in ["call_started", "call_completed"] {
            store
                .ingest(event(call, name), sinks(&["a", "b"]))
                .await
                .expect("stored");
        }
    }
    let due = store.queue("a").claim(1, usize::MAX).await.expect("claim");
    store
        .queue("a")
        .settle(
            vec![Settlement::Dead {
                id: due[0].id,
                error: "refused".into(),
            }],
            Vec::new(),
        )
        .await
        .expect("settled");
    let list = |filter: EventFilter| {
        let store = store.clone();
        async move {
            let page = store.list_events(&filter).await.expect("listed");
            let keys: Vec<String> = page.events.iter().map(|e| e.key.clone()).collect();
            (keys, page.next_before)
        }
    };
    let all = EventFilter {
        limit: 50,
        ..EventFilter::default()
    };
    let (keys, next) = list(all.clone()).await;
    assert_eq!(keys.len(), 6);
    assert_eq!(keys[0], "c3:call_completed");
    assert_eq!(next, None);

    let (first, next) = list(EventFilter {
        limit: 4,
        ..all.clone()
    })
    .await;
    assert_eq!(first, keys[..4]);
    let (rest, next) = list(EventFilter {
        before: next,
        ..all.clone()
    })
    .await;
    assert_eq!(rest, keys[4..]);
    assert_eq!(next, None);

    let (dead, _) = list(EventFilter {
        sink: Some("a".into()),
        status: Some(DeliveryStatus::Dead),
        ..all.clone()
    })
    .await;
    assert_eq!(dead, ["c1:call_started"]);
    let (started, _) = list(EventFilter {
        event: Some("call_started".into()),
        ..all.clone()
    })
    .await;
    assert_eq!(started.len(), 3);
    let (later, _) = list(EventFilter {
        since: Some(std::time::SystemTime::now() + Duration::from_secs(60)),
        ..all.clone()
    })
    .await;
    assert_eq!(later, Vec::<String>::new());

    // Replay by status and time range.
    let delivered = |since, until| Replay::Status {
        status: DeliveryStatus::Delivered,
        since,
        until,
    };
    let due = store.queue("b").claim(10, usize::MAX).await.expect("claim");
    let settled = due
        .iter()
        .map(|d| Settlement::Delivered { id: d.id })
        .collect();
    store
        .queue("b")
        .settle(settled, Vec::new())
        .await
        .expect("settled");
    let now = std::time::SystemTime::now();
    let hour = Duration::from_secs(3600);
    let none = store
        .replay("b", &delivered(None, Some(now - hour)))
        .await
        .expect("replay");
    assert_eq!(none.matched(), 0);
    let again = store
        .replay("b", &delivered(Some(now - hour), None))
        .await
        .expect("replay");
    assert_eq!(again.replayed, due.len());
    let dead = store
        .replay(
            "a",
            &Replay::Status {
                status: DeliveryStatus::Dead,
                since: Some(now - hour),
                until: Some(now + hour),
            },
        )
        .await
        .expect("replay");
    assert_eq!(dead.replayed, 1);
    store.close().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn backfill_gives_a_sink_the_stored_events_its_route_takes_once() {
    let db = TestDb::create().await;
    let store = open(&db, Duration::from_secs(30)).await;
    for call in ["c1", "c2"] {
        for name in ["call_started", "call_completed"] {
            store
                .ingest(event(call, name), sinks(&["a"]))
                .await
                .expect("stored");
        }
    }
    let route = vyora_router::routing::Route {
        sink: "late".into(),
        events: vyora_router::routing::EventSelector::parse(&["call_completed".into()], &[])
            .expect("events"),
        filter: vyora_router::routing::Filter::default(),
    };
    let from = || vyora_router::store::operator::BackfillFrom {
        since: Some(std::time::SystemTime::now() - Duration::from_secs(3600)),
        ..Default::default()
    };
    let first = vyora_router::backfill::backfill(&store, &route, from())
        .await
        .expect("backfill");
    assert_eq!((first.examined, first.matched, first.added), (4, 2, 2));
    let again = vyora_router::backfill::backfill(&store, &route, from())
        .await
        .expect("backfill");
    assert_eq!((again.examined, again.added), (2, 0));
    let due = store
        .queue("late")
        .claim(10, usize::MAX)
        .await
        .expect("claim");
    let keys: Vec<_> = due.iter().map(|d| d.dedup_key.as_str()).collect();
    assert_eq!(keys, ["c1:call_completed", "c2:call_completed"]);
    store.close().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn a_claim_whose_rows_cannot_be_read_gives_them_back_at_once() {
    let db = TestDb::create().await;
    // A lease far longer than the test: only a release frees the row in time.
    let lease = Duration::from_secs(300);
    let (a, b) = (open(&db, lease).await, open(&db, lease).await);
    a.ingest(event("c1", "call_completed"), sinks(&["s"]))
        .await
        .expect("stored");
    let admin = db.client().await;
    // Taking the rows does not read `source`; reading them does.
    admin
        .batch_execute("ALTER TABLE events RENAME COLUMN source TO source_away")
        .await
        .expect("rename");
    assert!(a.queue("s").claim(10, usize::MAX).await.is_err());
    admin
        .batch_execute("ALTER TABLE events RENAME COLUMN source_away TO source")
        .await
        .expect("rename back");
    let got = b.queue("s").claim(10, usize::MAX).await.expect("claim");
    assert_eq!(
        got.len(),
        1,
        "the row is still leased to a claim nobody holds"
    );
    a.close().await;
    b.close().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn an_earlier_event_committed_after_a_later_one_waits_while_the_later_is_in_hand() {
    let db = TestDb::create().await;
    let lease = Duration::from_secs(30);
    let (a, b) = (open(&db, lease).await, open(&db, lease).await);
    // One writer has inserted the call's first event, with its delivery, and not yet
    // committed; another stores the call's later event and commits first.
    let mut slow = db.client().await;
    let first = slow.transaction().await.expect("begin");
    first
        .batch_execute(
            "WITH e AS (
                 INSERT INTO events (dedup_key, event, call_id, source, received_at, payload)
                 VALUES ('c1:call_completed', 'call_completed', 'c1', 'webhook', now(),
                         '{}'::bytea)
                 RETURNING id)
             INSERT INTO deliveries (event_id, sink, call_id, status, next_attempt_at,
                                     updated_at)
             SELECT id, 's', 'c1', 'pending', now(), now() FROM e",
        )
        .await
        .expect("insert");
    a.ingest(event("c1", "all_processing_completed"), sinks(&["s"]))
        .await
        .expect("stored");
    let later = a.queue("s").claim(10, usize::MAX).await.expect("claim");
    assert_eq!(later.len(), 1);
    first.commit().await.expect("commit");
    let earlier = b.queue("s").claim(10, usize::MAX).await.expect("claim");
    assert!(earlier.is_empty(), "two events of the call in hand at once");
    a.queue("s")
        .settle(vec![Settlement::Delivered { id: later[0].id }], Vec::new())
        .await
        .expect("settled");
    let earlier = b.queue("s").claim(10, usize::MAX).await.expect("claim");
    let keys: Vec<_> = earlier.iter().map(|d| d.dedup_key.as_str()).collect();
    assert_eq!(keys, ["c1:call_completed"]);
    a.close().await;
    b.close().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn a_replica_paused_past_its_lease_cannot_overwrite_the_new_owners_result() {
    let db = TestDb::create().await;
    let metrics = Arc::new(Metrics::new());
    let options = StoreOptions {
        metrics: Some(Arc::clone(&metrics)),
        ..StoreOptions::default()
    };
    let lease = Duration::from_secs(30);
    let paused = open_with(&db, lease, options).await;
    let other = open(&db, lease).await;
    paused
        .ingest(event("c1", "call_completed"), sinks(&["s"]))
        .await
        .expect("stored");
    let late = paused
        .queue("s")
        .claim(10, usize::MAX)
        .await
        .expect("claim");
    assert_eq!(late.len(), 1);
    assert!(
        other
            .queue("s")
            .claim(10, usize::MAX)
            .await
            .expect("claim")
            .is_empty(),
        "held by its lease"
    );
    // Its lease runs out while it is paused (as the database's clock sees it).
    db.client()
        .await
        .execute(
            "UPDATE deliveries SET lease_until = now() - interval '1 second'",
            &[],
        )
        .await
        .expect("expire");
    let taken = other.queue("s").claim(10, usize::MAX).await.expect("claim");
    assert_eq!(
        taken.len(),
        1,
        "an expired lease returns the row to pending"
    );
    assert_ne!(taken[0].id, late[0].id, "a new claim, a new token");
    other
        .queue("s")
        .settle(vec![Settlement::Delivered { id: taken[0].id }], Vec::new())
        .await
        .expect("settled");
    // The paused replica wakes up and reports its (stale) failure.
    paused
        .queue("s")
        .settle(
            vec![Settlement::Dead {
                id: late[0].id,
                error: "stale".into(),
            }],
            Vec::new(),
        )
        .await
        .expect("answered");
    let (status, error): (String, Option<String>) = {
        let row = db
            .client()
            .await
            .query_one("SELECT status, last_error FROM deliveries", &[])
            .await
            .expect("row");
        (row.get(0), row.get(1))
    };
    assert_eq!(status, "delivered");
    assert_eq!(error, None);
    let samples = {
        let text = metrics.encode();
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("parses")
            .samples
    };
    assert_eq!(
        metric(&samples, "vyora_router_settlements_rejected_total", &[]),
        1.0
    );
    paused.close().await;
    other.close().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn one_replica_holds_a_role_until_its_lease_runs_out() {
    let db = TestDb::create().await;
    let lease = Duration::from_secs(30);
    let (a, b) = (open(&db, lease).await, open(&db, lease).await);
    assert!(a.lead(Role::Poller).await.expect("lead"));
    assert!(!b.lead(Role::Poller).await.expect("lead"));
    assert!(
        a.lead(Role::Poller).await.expect("renew"),
        "the holder renews"
    );
    assert!(
        b.lead(Role::Pruner).await.expect("lead"),
        "roles are separate"
    );
    db.client()
        .await
        .execute(
            "UPDATE leases SET until = now() - interval '1 second' WHERE role = 'poller'",
            &[],
        )
        .await
        .expect("expire");
    assert!(b.lead(Role::Poller).await.expect("take over"));
    assert!(!a.lead(Role::Poller).await.expect("lead"));
    a.close().await;
    b.close().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn the_api_budget_holds_across_every_replica() {
    let db = TestDb::create().await;
    let lease = Duration::from_secs(30);
    let stores = [
        open(&db, lease).await,
        open(&db, lease).await,
        open(&db, lease).await,
    ];
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let store = stores[i % 3].clone();
            tokio::spawn(async move {
                store
                    .reserve_api_call(5, Duration::from_secs(60))
                    .await
                    .expect("budget")
            })
        })
        .collect();
    let mut granted = 0;
    for t in tasks {
        match t.await.expect("task") {
            None => granted += 1,
            Some(wait) => assert!(wait > Duration::from_secs(50), "{wait:?}"),
        }
    }
    assert_eq!(granted, 5);
    for store in stores {
        store.close().await;
    }
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn replicas_starting_together_migrate_once_and_a_newer_schema_is_refused() {
    let db = TestDb::create().await;
    let lease = Duration::from_secs(30);
    let (a, b, c) = tokio::join!(open(&db, lease), open(&db, lease), open(&db, lease));
    assert_eq!(
        db.count("SELECT count(*) FROM vyora_router_schema").await,
        1
    );
    for store in [a, b, c] {
        store.close().await;
    }
    db.client()
        .await
        .execute("UPDATE vyora_router_schema SET version = 99", &[])
        .await
        .expect("bump");
    match Store::open(&config(&db, lease), StoreOptions::default()).await {
        Err(e @ StoreError::SchemaTooNew { .. }) => {
            assert!(e.to_string().contains("99"), "{e}");
        }
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("a newer schema was accepted"),
    }
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn a_router_on_postgres_acknowledges_delivers_and_answers_operator_commands() {
    let db = TestDb::create().await;
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = base_config(dir.path()).replace("[store]\n", &db.store_toml(""));
    let router = TestRouter::start_with(dir, &config).await;
    let body = payload("call-pg", "call_completed");
    assert_eq!(
        router.post_signed(&body).await.json(),
        serde_json::json!({"received": true})
    );
    assert_eq!(
        router.post_signed(&body).await.json(),
        serde_json::json!({"received": true, "duplicate": true})
    );
    let lines = wait_for_lines(&router.events_file(), 1, WAIT).await;
    assert_eq!(lines[0]["id"], "call-pg:call_completed");

    let store = Store::open_existing(&StoreConfig {
        backend: StoreBackend::Postgres(Box::new(db.postgres(2))),
        ..StoreConfig::sqlite("unused".into())
    })
    .await
    .expect("operator's store");
    let rows = store
        .list_deliveries(&ListFilter {
            limit: 10,
            ..ListFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "delivered");
    let events = store.show_events("call-pg").await.expect("show");
    assert_eq!(events.len(), 1);
    let done = store
        .replay("archive", &Replay::CallId("call-pg".into()))
        .await
        .expect("replay");
    assert_eq!(done.replayed, 1, "{done:?}");
    // Replayed: the router's dispatcher is woken by the notification and writes it again.
    wait_for_lines(&router.events_file(), 2, WAIT).await;
    // A delivery the sink does not have matches nothing; a sink the store never held a
    // delivery for is told apart, with the sinks it does know.
    let missing = store
        .replay("archive", &Replay::Id(i64::MAX))
        .await
        .expect("replay");
    assert_eq!((missing.matched(), missing.other_sinks), (0, None));
    let unknown = store
        .replay("nosuch", &Replay::dead())
        .await
        .expect("replay");
    assert_eq!(unknown.other_sinks, Some(vec!["archive".to_owned()]));
    store.close().await;
    router.stop().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn store_migrate_carries_a_sidecars_backlog_dead_letters_and_dedup_history_over() {
    let db = TestDb::create().await;
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let sqlite = dir.path().join("router.db");
    // A sidecar's store: one delivery pending, one delivered, one dead; a tracked call; a
    // quarantined body.
    {
        let store = Store::open(
            &StoreConfig::sqlite(sqlite.clone()),
            StoreOptions {
                track_calls: Some(Duration::from_secs(300)),
                ..StoreOptions::default()
            },
        )
        .await
        .expect("sqlite store");
        for call in ["m1", "m2", "m3"] {
            let body = payload(call, "call_completed");
            let e = Event::from_webhook(None, Bytes::from(body)).expect("event");
            store.ingest(e, sinks(&["archive"])).await.expect("stored");
        }
        let mut queue = store.queue("archive");
        let rows = queue.claim(10, usize::MAX).await.expect("claim");
        let (delivered, dead) = (rows[0].id, rows[1].id);
        queue
            .settle(
                vec![
                    Settlement::Delivered { id: delivered },
                    Settlement::Dead {
                        id: dead,
                        error: "gone".into(),
                    },
                ],
                vec![vyora_router::store::Attempt {
                    id: dead,
                    number: 1,
                    started_at: SystemTime::now(),
                    duration: Duration::from_millis(12),
                    outcome: vyora_router::store::AttemptOutcome::Dead,
                    code: Some(410),
                    error: Some("answered 410".into()),
                    response: Some("gone for good".into()),
                }],
            )
            .await
            .expect("settled");
        queue.release(vec![rows[2].id]);
        drop(queue);
        store
            .quarantine(vyora_router::store::Quarantined {
                reason: "not json".into(),
                event_header: None,
                body: Bytes::from_static(b"not json"),
            })
            .await
            .expect("quarantined");
        store.close().await;
    }
    let migrate = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vyora-router"));
        cmd.args(["store", "migrate", "--from"])
            .arg(&sqlite)
            .args(extra)
            .env("DATABASE_URL", &db.url);
        cmd.output().expect("run store migrate")
    };
    let out = migrate(&["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["events"], 3);
    assert_eq!(
        (&report["pending"], &report["delivered"], &report["dead"]),
        (&1.into(), &1.into(), &1.into())
    );
    assert_eq!(report["polls"], 3);
    assert_eq!(report["quarantined"], 1);
    assert_eq!(report["attempts"], 1);
    assert_eq!(
        db.count(
            "SELECT count(*) FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
             WHERE d.status = 'dead' AND a.number = 1 AND a.outcome = 'dead' AND a.code = 410
               AND a.duration_ms = 12 AND a.error = 'answered 410'
               AND a.response = 'gone for good'"
        )
        .await,
        1,
        "the dead letter's attempt came over with it"
    );
    let again = migrate(&["--json"]);
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).expect("json");
    assert_eq!(
        (&report["events"], &report["skipped"]),
        (&0.into(), &3.into())
    );
    assert_eq!(db.count("SELECT count(*) FROM deliveries").await, 3);

    // Replicas on PostgreSQL deliver the backlog and know the history.
    let config = base_config(dir.path()).replace("[store]\n", &db.store_toml(""));
    let router = TestRouter::start_with(Arc::clone(&dir), &config).await;
    let lines = wait_for_lines(&router.events_file(), 1, WAIT).await;
    assert_eq!(lines.len(), 1, "only the pending delivery is sent");
    assert_eq!(
        router
            .post_signed(&payload("m1", "call_completed"))
            .await
            .json(),
        serde_json::json!({"received": true, "duplicate": true})
    );
    assert_eq!(
        db.count("SELECT count(*) FROM deliveries WHERE status = 'dead'")
            .await,
        1,
        "the dead letter is still there to replay"
    );
    router.stop().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn a_claim_takes_what_fits_in_its_byte_budget_and_always_at_least_one() {
    let db = TestDb::create().await;
    let store = open(&db, Duration::from_secs(30)).await;
    let mut size = 0;
    for n in 0..5 {
        let e = event(&format!("c{n}"), "call_completed");
        size = e.payload.len();
        store.ingest(e, sinks(&["s"])).await.expect("stored");
    }
    // Rows are taken while what was taken before them is under the budget.
    let batch = store
        .queue("s")
        .claim(10, 2 * size + 1)
        .await
        .expect("claim");
    let keys: Vec<_> = batch.iter().map(|d| d.dedup_key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "c0:call_completed",
            "c1:call_completed",
            "c2:call_completed"
        ]
    );
    let one = store.queue("s").claim(10, 1).await.expect("claim");
    assert_eq!(
        one.len(),
        1,
        "a payload larger than the budget still goes alone"
    );
    assert_eq!(one[0].dedup_key, "c3:call_completed");
    let rest = store.queue("s").claim(10, usize::MAX).await.expect("claim");
    assert_eq!(rest.len(), 1);
    store.close().await;
}

/// Runs an operator command of the built binary on a config whose `[store]` is `store`;
/// whether it succeeded, and what it printed.
fn operator(
    dir: &std::path::Path,
    store: &str,
    args: &[&str],
    env: &[(&str, &std::path::Path)],
) -> (bool, String) {
    let config = dir.join("operator.toml");
    std::fs::write(&config, store).expect("write the config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vyora-router"))
        .args(args)
        .arg("--config")
        .arg(&config)
        .env_remove("DATABASE_URL")
        .envs(env.iter().copied())
        .output()
        .expect("run the binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// This test database's URL without `sslmode`, on `host`, with `query` appended.
fn url_on(db: &TestDb, host: &str, query: &str) -> String {
    let mut url = reqwest::Url::parse(&db.url).expect("URL");
    url.set_query(None);
    url.set_host(Some(host)).expect("host");
    format!("{url}{query}")
}

/// The server's certificate file, which the TLS tests use as the root to trust: the
/// server here runs with ssl on and a self-signed certificate for `localhost` (Debian's
/// "snakeoil"), as a stock PostgreSQL does.
async fn server_certificate(db: &TestDb) -> String {
    let client = db.client().await;
    let ssl: String = client
        .query_one("SHOW ssl", &[])
        .await
        .expect("show ssl")
        .get(0);
    assert_eq!(ssl, "on", "these tests need the server's ssl on");
    let file: String = client
        .query_one("SHOW ssl_cert_file", &[])
        .await
        .expect("show ssl_cert_file")
        .get(0);
    assert!(
        std::fs::read(&file).is_ok(),
        "the server's certificate {file} is not readable here"
    );
    file
}

#[tokio::test]
#[ignore = "needs PostgreSQL with ssl on: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn the_url_that_works_with_psql_works_and_each_sslmode_checks_what_libpq_checks() {
    let db = TestDb::create().await;
    open(&db, Duration::from_secs(30)).await.close().await;
    let root = server_certificate(&db).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let list_with = |url: String, env: &[(&str, &std::path::Path)]| {
        operator(
            dir.path(),
            &format!("[store]\nbackend = \"postgres\"\nurl = \"{url}\"\n"),
            &["deliveries", "list"],
            env,
        )
    };
    let list = |url: String| list_with(url, &[]);

    // libpq's default (prefer): encrypted, whatever the certificate says.
    for query in ["", "?sslmode=prefer", "?sslmode=require"] {
        let (ok, text) = list(url_on(&db, "127.0.0.1", query));
        assert!(ok, "{query}: {text}");
    }
    // The chain against the server's own certificate as root; the name by the host.
    for (host, query) in [
        (
            "127.0.0.1",
            format!("?sslmode=verify-ca&sslrootcert={root}"),
        ),
        (
            "localhost",
            format!("?sslmode=verify-full&sslrootcert={root}"),
        ),
    ] {
        let (ok, text) = list(url_on(&db, host, &query));
        assert!(ok, "{host}{query}: {text}");
    }

    // By address, the name on the certificate does not match: one line saying so.
    let (ok, text) = list(url_on(
        &db,
        "127.0.0.1",
        &format!("?sslmode=verify-full&sslrootcert={root}"),
    ));
    assert!(!ok, "{text}");
    let line = text.trim();
    assert_eq!(line.lines().count(), 1, "{text}");
    for needed in ["127.0.0.1", "sslmode=verify-full", "localhost", "verify-ca"] {
        assert!(line.contains(needed), "{needed} missing: {line}");
    }
    assert_eq!(line.matches("certificate is for").count(), 1, "{line}");
    assert!(!line.contains("error performing TLS handshake"), "{line}");

    // No root given, and no CA the system trusts signed the certificate (the system's
    // roots here hold the server's own certificate through SSL_CERT_DIR, so that is
    // emptied): the fix is sslrootcert, or require.
    let no_dir = tempfile::tempdir().expect("tempdir");
    let (ok, text) = list_with(
        url_on(&db, "localhost", "?sslmode=verify-full"),
        &[("SSL_CERT_DIR", no_dir.path())],
    );
    assert!(!ok, "{text}");
    for needed in [
        "localhost",
        "sslmode=verify-full",
        "sslrootcert",
        "sslmode=require",
    ] {
        assert!(text.contains(needed), "{needed} missing: {text}");
    }
    assert_eq!(text.trim().lines().count(), 1, "{text}");
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn a_router_warns_of_an_unchecked_server_and_logs_no_notice_when_its_tables_exist() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut logs = Vec::new();
    for query in ["?sslmode=disable", "?sslmode=disable", ""] {
        let store = format!(
            "[store]\nbackend = \"postgres\"\nurl = \"{}\"\n",
            url_on(&db, "127.0.0.1", query)
        );
        let config = dir.path().join("router.toml");
        std::fs::write(
            &config,
            format!(
                "{}\n[log]\nlevel = \"info\"\nformat = \"json\"\n",
                base_config(dir.path()).replace("[store]\n", &store)
            ),
        )
        .expect("write the config");
        let mut router = common::process::start_router(&config).await;
        router.child.kill().await.expect("stop the router");
        logs.push(std::fs::read_to_string(&router.log).expect("the router's log"));
        std::fs::remove_file(&router.log).expect("remove the log");
    }
    assert!(logs[0].contains("not encrypted"), "{}", logs[0]);
    assert!(
        !logs[1].contains("already exists"),
        "a notice at the second start: {}",
        logs[1]
    );
    assert!(logs[2].contains("identity is not checked"), "{}", logs[2]);
}

/// The router's tables in each schema of the test database, as `schema.table`.
async fn tables(db: &TestDb) -> Vec<String> {
    db.client()
        .await
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_tables
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
            &[],
        )
        .await
        .expect("list tables")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn an_operator_command_creates_nothing_in_a_database_without_the_routers_tables() {
    let db = TestDb::create().await;
    // Another application's table, where the router's used to be.
    db.client()
        .await
        .batch_execute("CREATE TABLE public.events (id int PRIMARY KEY, name text)")
        .await
        .expect("another table");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = db.store_toml("");
    for command in [&["deliveries", "list"][..], &["events", "show", "c1"]] {
        let (ok, text) = operator(dir.path(), &store, command, &[]);
        assert!(!ok, "{text}");
        assert!(
            text.contains("no router tables") && text.contains("vyora-router serve"),
            "{text}"
        );
        assert!(!text.contains("already exists"), "{text}");
    }
    assert_eq!(tables(&db).await, ["public.events"]);

    // `serve` creates its tables in their own schema, beside the other application's.
    open(&db, Duration::from_secs(30)).await.close().await;
    let all = tables(&db).await;
    assert!(all.contains(&"public.events".to_owned()), "{all:?}");
    assert!(
        all.contains(&"vyora_router.events".to_owned())
            && all.contains(&"vyora_router.vyora_router_schema".to_owned()),
        "{all:?}"
    );
    assert_eq!(
        all.iter().filter(|t| t.starts_with("public.")).count(),
        1,
        "{all:?}"
    );
    let (ok, text) = operator(dir.path(), &store, &["deliveries", "list"], &[]);
    assert!(ok, "{text}");
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn a_database_of_the_layout_in_public_moves_into_its_own_schema_at_start_only() {
    let db = TestDb::create().await;
    let lease = Duration::from_secs(30);
    let store = open(&db, lease).await;
    store
        .ingest(event("c1", "call_completed"), sinks(&["s"]))
        .await
        .expect("stored");
    store.close().await;
    // The previous version's layout: the same tables, in `public`, at version 1.
    let admin = db.client().await;
    for table in [
        "events",
        "deliveries",
        "quarantine",
        "polls",
        "leases",
        "api_requests",
        "vyora_router_schema",
    ] {
        admin
            .batch_execute(&format!(
                "ALTER TABLE vyora_router.{table} SET SCHEMA public"
            ))
            .await
            .expect("move back");
    }
    admin
        .batch_execute(
            "UPDATE public.vyora_router_schema SET version = 1;
             DROP TABLE vyora_router.attempts; DROP TABLE vyora_router.pauses;
             DROP SCHEMA vyora_router",
        )
        .await
        .expect("version 1");
    let before = tables(&db).await;

    // An operator command of this build changes nothing and says what to run.
    match Store::open_existing(&config(&db, lease)).await {
        Err(e @ StoreError::SchemaMismatch { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("schema version 1")
                    && text.contains("this build uses version 4")
                    && text.contains("vyora-router serve"),
                "{text}"
            );
        }
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("an operator command opened a database of another version"),
    }
    assert_eq!(tables(&db).await, before);

    // `serve` moves the tables with their rows, and leaves in `public` only the version
    // that makes a router of the previous build refuse to start there.
    let store = open(&db, lease).await;
    assert_eq!(
        store
            .ingest(event("c1", "call_completed"), sinks(&["s"]))
            .await
            .expect("ingest"),
        Ingested::Duplicate
    );
    store.close().await;
    let after = tables(&db).await;
    assert_eq!(
        after
            .iter()
            .filter(|t| t.starts_with("public."))
            .collect::<Vec<_>>(),
        ["public.vyora_router_schema"]
    );
    assert_eq!(
        after
            .iter()
            .filter(|t| t.starts_with("vyora_router."))
            .count(),
        9,
        "{after:?}"
    );
    let left: i32 = admin
        .query_one("SELECT version FROM public.vyora_router_schema", &[])
        .await
        .expect("the marker")
        .get(0);
    assert!(
        left > 1,
        "a build of version 1 would not refuse version {left}"
    );
    // Started again, nothing moves twice; operators are at home.
    open(&db, lease).await.close().await;
    Store::open_existing(&config(&db, lease))
        .await
        .expect("the operator's store")
        .close()
        .await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn routers_on_two_schemas_of_one_database_keep_their_events_apart() {
    let db = TestDb::create().await;
    let lease = Duration::from_secs(30);
    let mut second = config(&db, lease);
    if let StoreBackend::Postgres(pg) = &mut second.backend {
        pg.schema = "second_router".into();
    }
    let a = open(&db, lease).await;
    let b = Store::open(&second, StoreOptions::default())
        .await
        .expect("the second store");
    for store in [&a, &b] {
        assert_eq!(
            store
                .ingest(event("c1", "call_completed"), sinks(&["s"]))
                .await
                .expect("ingest"),
            Ingested::Stored { deliveries: 1 }
        );
    }
    assert_eq!(
        db.count("SELECT count(*) FROM second_router.events").await,
        1
    );
    a.close().await;
    b.close().await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn store_migrate_copies_into_the_database_and_schema_its_config_names() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = dir.path().join("router.db");
    let store = Store::open(
        &StoreConfig::sqlite(sqlite.clone()),
        StoreOptions::default(),
    )
    .await
    .expect("sqlite store");
    store
        .ingest(event("m1", "call_completed"), sinks(&["archive"]))
        .await
        .expect("stored");
    store.close().await;
    let from = sqlite.to_str().expect("a UTF-8 path");

    let (ok, text) = operator(
        dir.path(),
        &db.store_toml("schema = \"copied\"\n"),
        &["store", "migrate", "--json", "--from", from],
        &[],
    );
    assert!(ok, "{text}");
    assert_eq!(db.count("SELECT count(*) FROM copied.events").await, 1);

    // Nothing names a database: the error says where one may be given.
    let (ok, text) = operator(
        dir.path(),
        "[store]\npath = \"elsewhere.db\"\n",
        &["store", "migrate", "--from", from],
        &[],
    );
    assert!(!ok, "{text}");
    for needed in ["--to", "store.url", "DATABASE_URL"] {
        assert!(text.contains(needed), "{needed} missing: {text}");
    }
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn a_sinks_pause_recorded_by_one_replica_is_seen_by_every_other_until_it_delivers() {
    let db = TestDb::create().await;
    let lease = Duration::from_secs(30);
    let (one, other) = (open(&db, lease).await, open(&db, lease).await);
    let pause = SinkPause {
        sink: "crm".to_owned(),
        until: std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        reason: "cannot connect".to_owned(),
    };
    one.queue("crm")
        .record_pause(Some(&pause))
        .await
        .expect("recorded");
    assert_eq!(
        other.pauses().await.expect("read"),
        std::slice::from_ref(&pause)
    );

    let later = SinkPause {
        until: pause.until + Duration::from_secs(60),
        ..pause
    };
    other
        .queue("crm")
        .record_pause(Some(&later))
        .await
        .expect("recorded");
    assert_eq!(one.pauses().await.expect("read"), [later]);

    one.queue("crm").record_pause(None).await.expect("cleared");
    assert_eq!(other.pauses().await.expect("read"), []);
    one.close().await;
    other.close().await;
}
