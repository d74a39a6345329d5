//! The dispatcher against real SQLite stores and sinks that fail, panic or hang.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

use super::*;
use crate::config::{StoreConfig, Synchronous};
use crate::event::Event;
use crate::sinks::BoxFuture;
use crate::store::Store;

/// Fails the first `failures` deliveries, then records what it delivered.
struct Flaky {
    failures: usize,
    calls: AtomicUsize,
    delivered: std::sync::Mutex<Vec<String>>,
}

impl Sink for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }

    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(async move {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            batch
                .iter()
                .map(|d| {
                    if call < self.failures {
                        Err(SinkError::FileIo {
                            path: "flaky".into(),
                            source: Arc::new(std::io::Error::other("down")),
                        })
                    } else {
                        self.delivered
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(d.dedup_key.clone());
                        Ok(())
                    }
                })
                .collect()
        })
    }
}

fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(40)),
        record_successes: false,
    }
}

async fn open_store(dir: &tempfile::TempDir) -> Store {
    let config = StoreConfig {
        synchronous: Synchronous::Normal,
        ..StoreConfig::sqlite(dir.path().join("router.db"))
    };
    Store::open(&config, crate::store::StoreOptions::default())
        .await
        .expect("store")
}

async fn setup(
    failures: usize,
    max_attempts: u32,
) -> (tempfile::TempDir, Store, Arc<Flaky>, CancellationToken) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(&dir).await;
    let sink = Arc::new(Flaky {
        failures,
        calls: AtomicUsize::new(0),
        delivered: std::sync::Mutex::new(Vec::new()),
    });
    let stop = CancellationToken::new();
    let dispatcher = Dispatcher::new(
        sink.clone(),
        store.queue("flaky"),
        policy(max_attempts),
        Redaction::default(),
        Arc::new(Metrics::new()),
        Feed::default(),
    );
    tokio::spawn(dispatcher.run(stop.clone(), Duration::from_secs(1)));
    store_c1(&store, "flaky").await;
    (dir, store, sink, stop)
}

/// Stores call `c1`'s `call_completed` for `sink`.
async fn store_c1(store: &Store, sink: &str) {
    let event = Event::from_webhook(
        None,
        Bytes::from_static(br#"{"event":"call_completed","call_id":"c1"}"#),
    )
    .expect("event");
    store
        .ingest(event, vec![Arc::from(sink)])
        .await
        .expect("stored");
}

/// The delivery of call `c1`'s one event to `sink`, as the operator commands see it.
async fn delivery(store: &Store, sink: &str) -> (String, u32, Option<String>) {
    let events = store.show_events("c1").await.expect("events of c1");
    let [event] = events.as_slice() else {
        panic!("one event of c1, found {}", events.len());
    };
    let d = event
        .deliveries
        .iter()
        .find(|d| d.sink == sink)
        .unwrap_or_else(|| panic!("a delivery to {sink}"));
    (d.status.clone(), d.attempts, d.last_error.clone())
}

async fn wait_for_status(store: &Store, status: &str) -> (String, u32, Option<String>) {
    for _ in 0..500 {
        let r = delivery(store, "flaky").await;
        if r.0 == status {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "row never became {status}: {:?}",
        delivery(store, "flaky").await
    );
}

#[tokio::test]
async fn a_sink_that_fails_twice_is_retried_and_delivers_once() {
    let (_dir, store, sink, stop) = setup(2, 12).await;
    let (_, attempts, error) = wait_for_status(&store, "delivered").await;
    assert_eq!(attempts, 3);
    assert_eq!(error, None);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        *sink.delivered.lock().expect("lock"),
        vec!["c1:call_completed".to_owned()]
    );
    stop.cancel();
}

#[tokio::test]
async fn a_row_that_keeps_failing_goes_dead_after_max_attempts() {
    let (_dir, store, sink, stop) = setup(usize::MAX, 3).await;
    let (_, attempts, error) = wait_for_status(&store, "dead").await;
    assert_eq!(attempts, 3);
    assert!(
        error
            .unwrap_or_default()
            .contains("gave up after 3 attempts")
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        sink.calls.load(Ordering::SeqCst),
        3,
        "no attempt after dead"
    );
    stop.cancel();
}

/// Runs a dispatcher for `sink` that waits a minute between attempts (no retry comes
/// within a test) and drains for `drain` when stopped.
fn dispatch_with_a_minute_of_backoff(
    sink: Arc<dyn Sink>,
    store: &Store,
    drain: Duration,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let policy = RetryPolicy {
        max_attempts: 12,
        backoff: Backoff::new(Duration::from_secs(60), Duration::from_secs(60)),
        record_successes: false,
    };
    let dispatcher = Dispatcher::new(
        Arc::clone(&sink),
        store.queue(sink.name()),
        policy,
        Redaction::default(),
        Arc::new(Metrics::new()),
        Feed::default(),
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn(dispatcher.run(stop.clone(), drain));
    (stop, running)
}

/// Panics on call `c1`; holds call `c2` until released, counting its deliveries.
struct Panicky {
    release: tokio::sync::Notify,
    slow_calls: AtomicUsize,
    panics: AtomicUsize,
}

impl Sink for Panicky {
    fn name(&self) -> &str {
        "panicky"
    }

    fn concurrency(&self) -> usize {
        2
    }

    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(async move {
            if batch.iter().any(|d| d.call_id.as_deref() == Some("c1")) {
                self.panics.fetch_add(1, Ordering::SeqCst);
                panic!("poison");
            }
            self.slow_calls.fetch_add(1, Ordering::SeqCst);
            self.release.notified().await;
            batch.iter().map(|_| Ok(())).collect()
        })
    }
}

#[tokio::test]
async fn a_panicking_sink_counts_a_failed_attempt_and_frees_only_its_own_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(&dir).await;
    for call in ["c2", "c1"] {
        let body = format!(r#"{{"event":"call_completed","call_id":"{call}"}}"#);
        let event = Event::from_webhook(None, Bytes::from(body)).expect("event");
        store
            .ingest(event, vec![Arc::from("panicky")])
            .await
            .expect("stored");
    }
    let sink = Arc::new(Panicky {
        release: tokio::sync::Notify::new(),
        slow_calls: AtomicUsize::new(0),
        panics: AtomicUsize::new(0),
    });
    let (stop, running) =
        dispatch_with_a_minute_of_backoff(sink.clone(), &store, Duration::from_millis(100));

    for _ in 0..500 {
        if delivery(&store, "panicky").await.1 > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Give a busy loop time to show itself.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, attempts, error) = delivery(&store, "panicky").await;
    assert_eq!(attempts, 1, "one failed attempt, then the backoff");
    assert!(error.unwrap_or_default().contains("poison"));
    assert_eq!(sink.panics.load(Ordering::SeqCst), 1, "no busy loop");
    assert_eq!(
        sink.slow_calls.load(Ordering::SeqCst),
        1,
        "the row still in flight was not handed out a second time"
    );
    sink.release.notify_waiters();
    stop.cancel();
    running.await.expect("dispatcher ends");
}

/// Answers for none of the deliveries it is given.
struct Silent;

impl Sink for Silent {
    fn name(&self) -> &str {
        "silent"
    }

    fn deliver<'a>(&'a self, _batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(async { Vec::new() })
    }
}

#[tokio::test]
async fn a_delivery_a_sink_gives_no_result_for_counts_a_failed_attempt_instead_of_staying_in_hand()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(&dir).await;
    store_c1(&store, "silent").await;
    let (stop, running) =
        dispatch_with_a_minute_of_backoff(Arc::new(Silent), &store, Duration::from_millis(100));
    for _ in 0..500 {
        if delivery(&store, "silent").await.1 > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, attempts, error) = delivery(&store, "silent").await;
    assert_eq!((status.as_str(), attempts), ("pending", 1));
    assert!(
        error.unwrap_or_default().contains("gave 0 results for 1"),
        "the reason is recorded"
    );
    stop.cancel();
    running.await.expect("dispatcher ends");
}

/// Panics once released: the panic comes while the dispatcher drains.
struct PanicsWhenReleased {
    started: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl Sink for PanicsWhenReleased {
    fn name(&self) -> &str {
        "late"
    }

    fn deliver<'a>(&'a self, _batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(async move {
            self.started.notify_one();
            self.release.notified().await;
            panic!("late poison");
        })
    }
}

#[tokio::test]
async fn a_delivery_that_panics_while_the_dispatcher_drains_counts_a_failed_attempt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(&dir).await;
    let body = r#"{"event":"call_completed","call_id":"c1"}"#;
    let event = Event::from_webhook(None, Bytes::from(body)).expect("event");
    store
        .ingest(event, vec![Arc::from("late")])
        .await
        .expect("stored");
    let sink = Arc::new(PanicsWhenReleased {
        started: tokio::sync::Notify::new(),
        release: tokio::sync::Notify::new(),
    });
    let (stop, running) =
        dispatch_with_a_minute_of_backoff(sink.clone(), &store, Duration::from_secs(10));
    sink.started.notified().await;
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    sink.release.notify_one();
    running.await.expect("dispatcher ends");
    let (status, attempts, error) = delivery(&store, "late").await;
    assert_eq!((status.as_str(), attempts), ("pending", 1));
    assert!(error.unwrap_or_default().contains("late poison"));
}

#[test]
fn the_history_keeps_failures_and_the_success_after_them_but_not_a_first_success_or_a_wait() {
    let claim = |attempts| Claim {
        id: DeliveryId::row(1),
        attempts,
        dedup_key: "c1:call_completed".into(),
    };
    let timing = Timing::now();
    let kept = |policy: &RetryPolicy, attempts, result| {
        policy
            .settle(&claim(attempts), result, "crm", timing)
            .1
            .map(|a| (a.number, a.outcome, a.code))
    };
    let busy = || {
        Err(SinkError::HttpStatus {
            status: 503,
            snippet: "x".repeat(4000),
            permanent: false,
            retry_after: None,
        })
    };
    let down = || {
        Err(SinkError::Unavailable {
            reason: "cannot connect".into(),
            retry_in: Duration::from_secs(1),
        })
    };
    let quiet = policy(3);
    assert_eq!(kept(&quiet, 0, Ok(())), None);
    assert_eq!(kept(&quiet, 0, down()), None);
    assert_eq!(
        kept(&quiet, 0, busy()),
        Some((1, AttemptOutcome::Retried, Some(503)))
    );
    assert_eq!(
        kept(&quiet, 2, busy()),
        Some((3, AttemptOutcome::Dead, Some(503)))
    );
    assert_eq!(
        kept(&quiet, 1, Ok(())),
        Some((2, AttemptOutcome::Delivered, None))
    );
    let every = RetryPolicy {
        record_successes: true,
        ..policy(3)
    };
    assert_eq!(
        kept(&every, 0, Ok(())),
        Some((1, AttemptOutcome::Delivered, None))
    );

    // The error and the answer are capped, whatever the destination sent.
    let (_, attempt) = quiet.settle(&claim(0), busy(), "crm", timing);
    let attempt = attempt.expect("kept");
    assert_eq!(
        attempt.response.map(|r| r.len()),
        Some(Attempt::RESPONSE_BYTES)
    );
    assert!(
        attempt
            .error
            .is_some_and(|e| e.len() <= Attempt::ERROR_BYTES)
    );
}

#[test]
fn a_capped_text_ends_on_a_character_boundary() {
    assert_eq!(capped("héllo", 2), "h");
    assert_eq!(capped("héllo", 3), "hé");
    assert_eq!(capped("abc", 10), "abc");
}
