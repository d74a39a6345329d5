//! Each delivery's attempt history: kept with the outcome, capped, pruned with the payload.

use std::time::{Duration, SystemTime};

use super::{config, event, sinks};
use crate::event::DeliveryId;
use crate::store::{Attempt, AttemptOutcome, Settlement, Store, StoreOptions, now};

fn attempt(id: DeliveryId, number: u32, outcome: AttemptOutcome) -> Attempt {
    Attempt {
        id,
        number,
        started_at: now(),
        duration: Duration::from_millis(7),
        outcome,
        code: (outcome != AttemptOutcome::Delivered).then_some(503),
        error: (outcome != AttemptOutcome::Delivered).then(|| format!("answered 503 ({number})")),
        response: Some(format!("busy {number}")),
    }
}

/// The history of the only delivery of `call`'s only event, as (number, outcome).
async fn history(store: &Store, call: &str) -> Vec<(u32, String)> {
    let events = store.show_events(call).await.expect("shown");
    events[0].deliveries[0]
        .history
        .iter()
        .map(|a| (a.number, a.outcome.clone()))
        .collect()
}

/// A store keeping `attempts_kept` attempts per delivery, holding one event of call
/// `c1` for sink `a`.
async fn with_one_event(dir: &std::path::Path, attempts_kept: usize) -> Store {
    let options = StoreOptions {
        attempts_kept,
        ..StoreOptions::default()
    };
    let store = Store::open(&config(dir), options)
        .await
        .expect("store opens");
    store
        .ingest(event("c1", "call_completed"), sinks(&["a"]))
        .await
        .expect("stored");
    store
}

#[tokio::test]
async fn a_delivery_keeps_its_latest_attempts_up_to_the_limit_and_the_success_that_ended_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = with_one_event(dir.path(), 3).await;
    let mut queue = store.queue("a");
    for number in 1..=4 {
        let due = queue.claim(10, usize::MAX).await.expect("due");
        let id = due[0].id;
        let retry = Settlement::Retry {
            id,
            at: now(),
            error: "answered 503".into(),
        };
        let kept = attempt(id, number, AttemptOutcome::Retried);
        queue
            .settle(vec![retry], vec![kept])
            .await
            .expect("settled");
    }
    let due = queue.claim(10, usize::MAX).await.expect("due");
    let id = due[0].id;
    let delivered = attempt(id, 5, AttemptOutcome::Delivered);
    queue
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
    assert_eq!(third.code, Some(503));
    assert_eq!(third.duration_ms, 7);
    assert_eq!(third.error.as_deref(), Some("answered 503 (3)"));
    assert_eq!(third.response.as_deref(), Some("busy 3"));

    // Kept across a restart, and gone with the payload once the event is past retention.
    store.close().await;
    drop(queue);
    drop(store);
    let store = super::open(dir.path()).await;
    assert_eq!(history(&store, "c1").await.len(), 3);
    let later = SystemTime::now() + Duration::from_secs(60);
    let pruned = store
        .prune(later, SystemTime::UNIX_EPOCH)
        .await
        .expect("pruned");
    assert_eq!(pruned.payloads, 1);
    assert_eq!(history(&store, "c1").await, []);
}

#[tokio::test]
async fn with_no_attempts_kept_nothing_is_written_to_the_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = with_one_event(dir.path(), 0).await;
    let mut queue = store.queue("a");
    let due = queue.claim(10, usize::MAX).await.expect("due");
    let id = due[0].id;
    let dead = Settlement::Dead {
        id,
        error: "answered 400".into(),
    };
    let kept = attempt(id, 1, AttemptOutcome::Dead);
    queue.settle(vec![dead], vec![kept]).await.expect("settled");
    let events = store.show_events("c1").await.expect("shown");
    assert_eq!(events[0].deliveries[0].status, "dead");
    assert_eq!(history(&store, "c1").await, []);
}
