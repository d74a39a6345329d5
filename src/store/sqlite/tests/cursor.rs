//! The cursor of each sink: failed writes, held events, damaged payloads and crashes never let it pass an undelivered event.

use super::*;

/// Row ids of a claim's deliveries.
async fn claim_rows(queue: &mut Box<dyn SinkQueue>, limit: usize) -> Vec<i64> {
    let due = queue.claim(limit, usize::MAX).await.expect("claim");
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
    let mut queue = store.queue("a");
    let due = queue.claim(10, usize::MAX).await.expect("due");
    let ids: Vec<_> = due.iter().map(|d| d.id).collect();
    let db = Connection::open(&path).expect("open");
    fail_writes_of(&db, "retries");
    // Two batches finish one after the other: the first failed (its retry row cannot be
    // written), the others went through (a cursor move, which can).
    let failed = queue
        .settle(
            vec![Settlement::Retry {
                id: ids[0],
                at: now(),
                error: "500".into(),
            }],
            Vec::new(),
        )
        .await;
    let delivered = queue
        .settle(
            ids[1..]
                .iter()
                .map(|id| Settlement::Delivered { id: *id })
                .collect(),
            Vec::new(),
        )
        .await;
    assert!(failed.is_err(), "the retry row was refused");
    delivered.expect("nothing of it was refused");
    assert!(
        cursor_of(&db, "a") < 1,
        "the stored cursor passed event 1, whose retry row is not written"
    );
    db.execute_batch("DROP TRIGGER fail_retries").expect("drop");
    assert_eq!(claim_rows(&mut queue, 10).await, [1], "handed out again");
    // And after a restart (a crash now would find the same), with the others again:
    // the cursor could not pass them before event 1.
    drop(queue);
    drop(store);
    let store = open(dir.path()).await;
    let mut queue = store.queue("a");
    assert_eq!(claim_rows(&mut queue, 10).await, [1, 2, 3, 4]);
}

#[tokio::test]
async fn a_failures_retry_row_and_the_cursor_move_past_it_commit_together_or_not_at_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with_started(dir.path(), &["c1", "c2"]).await;
    let mut queue = store.queue("a");
    let due = queue.claim(10, usize::MAX).await.expect("due");
    let db = Connection::open(dir.path().join("router.db")).expect("open");
    fail_writes_of(&db, "cursors");
    let settled = queue
        .settle(
            vec![
                Settlement::Retry {
                    id: due[0].id,
                    at: now(),
                    error: "500".into(),
                },
                Settlement::Delivered { id: due[1].id },
            ],
            Vec::new(),
        )
        .await;
    assert!(settled.is_err(), "the cursor's write was refused");
    let rows: i64 = db
        .query_row("SELECT COUNT(*) FROM retries", [], |r| r.get(0))
        .expect("count");
    assert_eq!(rows, 0, "the retry row went in without the cursor move");
    db.execute_batch("DROP TRIGGER fail_cursors").expect("drop");
    let again = queue.claim(10, usize::MAX).await.expect("due");
    let again: Vec<_> = again.iter().map(|d| (d.id.row, d.attempts)).collect();
    assert_eq!(again, [(1, 0)], "event 1 goes out again as a first attempt");
}

#[tokio::test]
async fn two_failed_writes_hand_back_every_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with_started(dir.path(), &["c1", "c2", "c3", "c4"]).await;
    let mut queue = store.queue("a");
    let due = queue.claim(10, usize::MAX).await.expect("due");
    let ids: Vec<_> = due.iter().map(|d| d.id).collect();
    let db = Connection::open(dir.path().join("router.db")).expect("open");
    fail_writes_of(&db, "retries");
    let retry = |i: usize| Settlement::Retry {
        id: ids[i],
        at: now(),
        error: "500".into(),
    };
    let first = queue
        .settle(
            vec![retry(0), Settlement::Delivered { id: ids[1] }],
            Vec::new(),
        )
        .await;
    let second = queue
        .settle(
            vec![retry(2), Settlement::Delivered { id: ids[3] }],
            Vec::new(),
        )
        .await;
    assert!(first.is_err() && second.is_err());
    db.execute_batch("DROP TRIGGER fail_retries").expect("drop");
    assert_eq!(claim_rows(&mut queue, 10).await, [1, 3]);
}

#[tokio::test]
async fn a_failure_whose_caller_stopped_waiting_for_its_write_is_not_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with_started(dir.path(), &["c1", "c2"]).await;
    let mut queue = store.queue("a");
    let due = queue.claim(10, usize::MAX).await.expect("due");
    // The write waits for a lock someone else holds; the delivery task is cancelled
    // meanwhile (a sink reload's drain timeout).
    let lock = Connection::open(dir.path().join("router.db")).expect("open");
    lock.execute_batch("BEGIN IMMEDIATE").expect("lock");
    let settled = tokio::time::timeout(
        Duration::from_millis(200),
        queue.settle(
            vec![Settlement::Retry {
                id: due[0].id,
                at: now(),
                error: "500".into(),
            }],
            Vec::new(),
        ),
    )
    .await;
    assert!(settled.is_err(), "cancelled while waiting");
    lock.execute_batch("COMMIT").expect("unlock");
    queue
        .settle(vec![Settlement::Delivered { id: due[1].id }], Vec::new())
        .await
        .expect("settled");
    // Whether the abandoned write landed or not, event 1 is delivered once more: as a
    // first attempt handed out again, or through its retry row.
    let mut again = Vec::new();
    for _ in 0..50 {
        again = claim_rows(&mut queue, 10).await;
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
    let mut queue = store.queue("a");
    let db = Connection::open(dir.path().join("router.db")).expect("open");
    db.execute(
        "UPDATE events SET codec = ?1, payload = X'00010203' WHERE id = 2",
        [super::super::codec::CODEC_ZSTD],
    )
    .expect("damage");
    let due = queue.claim(10, usize::MAX).await.expect("due");
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
    queue
        .settle(
            due.iter()
                .map(|d| Settlement::Delivered { id: d.id })
                .collect(),
            Vec::new(),
        )
        .await
        .expect("settled");
    assert!(claim_rows(&mut queue, 10).await.is_empty());
    assert_eq!(cursor_of(&db, "a"), 3, "the sink goes on past it");
}

#[tokio::test]
async fn the_cursor_of_a_sink_that_rarely_gets_an_event_moves_past_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let mut rare = store.queue("rare");
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
    let due = rare.claim(10, usize::MAX).await.expect("due");
    rare.settle(vec![Settlement::Delivered { id: due[0].id }], Vec::new())
        .await
        .expect("settled");
    assert!(claim_rows(&mut rare, 10).await.is_empty());
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
    let mut queue = store.queue("a");
    // A hundred calls whose first event fails for an hour, each with a later event that
    // must wait for it: far more held events than one claim returns.
    for n in 0..100 {
        store
            .ingest(event(&format!("c{n}"), "call_started"), sinks(&["a"]))
            .await
            .expect("stored");
    }
    let failing = queue.claim(100, usize::MAX).await.expect("due");
    let in_an_hour = now() + Duration::from_secs(3600);
    queue
        .settle(
            failing
                .iter()
                .map(|d| Settlement::Retry {
                    id: d.id,
                    at: in_an_hour,
                    error: "500".into(),
                })
                .collect(),
            Vec::new(),
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
    assert_eq!(claim_rows(&mut queue, 10).await, [201]);
}

#[tokio::test]
async fn an_event_held_behind_its_calls_failing_event_gets_a_waiting_row_and_the_cursor_passes_it()
{
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
    for n in 0..50 {
        store
            .ingest(event(&format!("other{n}"), "call_completed"), sinks(&["a"]))
            .await
            .expect("stored");
    }
    let due = queue.claim(100, usize::MAX).await.expect("due");
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
    queue.settle(settled, Vec::new()).await.expect("settled");
    let db = Connection::open(dir.path().join("router.db")).expect("open");
    assert_eq!(cursor_of(&db, "a"), 52, "the cursor passed the held event");
    let (status, at, note): (String, i64, String) = db
        .query_row(
            "SELECT status, next_attempt_at, last_error FROM retries WHERE event_id = 2",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("the held event's row");
    assert_eq!((status.as_str(), at), ("pending", waiting::WAITING));
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
        queue.next_due().await.expect("next due"),
        Some(in_an_hour).map(|t| from_millis(to_millis(t))),
        "a waiting row has no time of its own"
    );
    drop(queue);
    drop(store);

    // After a restart, the failing event's success lets the held one go, in order.
    let store = open(dir.path()).await;
    let mut queue = store.queue("a");
    db.execute(
        "UPDATE retries SET next_attempt_at = 0 WHERE event_id = 1",
        [],
    )
    .expect("due now");
    let due = queue.claim(10, usize::MAX).await.expect("due");
    assert_eq!(due.iter().map(|d| d.id.row).collect::<Vec<_>>(), [1]);
    queue
        .settle(vec![Settlement::Delivered { id: due[0].id }], Vec::new())
        .await
        .expect("settled");
    let due = queue.claim(10, usize::MAX).await.expect("due");
    assert_eq!(due.iter().map(|d| d.id.row).collect::<Vec<_>>(), [2]);
    assert_eq!(due[0].attempts, 0, "waiting used no attempt");
}

#[tokio::test]
async fn an_event_held_behind_one_in_hand_at_a_crash_goes_out_after_it_not_before() {
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
    // 1 is in hand and never settled (the process dies); 2 is held back behind it.
    assert_eq!(claim_rows(&mut queue, 10).await, [1]);
    assert!(claim_rows(&mut queue, 10).await.is_empty());
    drop(queue);
    drop(store);

    let store = open(dir.path()).await;
    let mut queue = store.queue("a");
    let due = queue.claim(10, usize::MAX).await.expect("due");
    assert_eq!(due.iter().map(|d| d.id.row).collect::<Vec<_>>(), [1]);
    queue
        .settle(vec![Settlement::Delivered { id: due[0].id }], Vec::new())
        .await
        .expect("settled");
    assert_eq!(claim_rows(&mut queue, 10).await, [2]);
}

#[tokio::test]
async fn a_release_whose_write_failed_goes_with_the_next_write_and_the_call_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let mut queue = store.queue("a");
    for name in ["call_completed", "all_processing_completed"] {
        store
            .ingest(event("c1", name), sinks(&["a"]))
            .await
            .expect("stored");
    }
    // 2 is held behind 1, with a waiting row, while 1 is in hand.
    let due = queue.claim(10, usize::MAX).await.expect("due");
    assert_eq!(due.iter().map(|d| d.id.row).collect::<Vec<_>>(), [1]);
    let db = Connection::open(dir.path().join("router.db")).expect("open");
    fail_writes_of(&db, "cursors");
    let settled = queue
        .settle(vec![Settlement::Delivered { id: due[0].id }], Vec::new())
        .await;
    assert!(settled.is_err(), "the write with 1's release was refused");
    db.execute_batch("DROP TRIGGER fail_cursors").expect("drop");
    // The next claim's write carries the release (and the cursor past 1): without it, 2
    // would wait for good once the cursor passed 1.
    assert!(claim_rows(&mut queue, 10).await.is_empty());
    assert_eq!(claim_rows(&mut queue, 10).await, [2]);
    assert!(cursor_of(&db, "a") >= 1);
}

#[tokio::test]
async fn a_retry_row_of_an_event_in_hand_is_not_handed_out_beside_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let mut queue = store.queue("a");
    let no_call = Event::from_webhook(None, Bytes::from_static(br#"{"event":"call_started"}"#))
        .expect("an event without a call");
    store.ingest(no_call, sinks(&["a"])).await.expect("stored");
    assert_eq!(claim_rows(&mut queue, 10).await, [1]);
    // The row of a write given up on that landed after all, due at once.
    let db = Connection::open(dir.path().join("router.db")).expect("open");
    db.execute(
        "INSERT INTO retries (sink, event_id, call_id, status, attempts, next_attempt_at,
                              last_error, updated_at)
         VALUES ('a', 1, NULL, 'pending', 1, 0, '500', 0)",
        [],
    )
    .expect("a retry row");
    assert!(
        claim_rows(&mut queue, 10).await.is_empty(),
        "event 1 would be out twice at once"
    );
}
