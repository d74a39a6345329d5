//! Flow control around a sink: its rate limit, and a circuit breaker that stops trying a
//! destination that keeps failing. Both wrap the sink the dispatcher drives, so they apply
//! to every kind, on either store.
//!
//! Neither fails a delivery. A delivery waits for the rate limit in its task; while the
//! breaker is open, deliveries are answered "unavailable", which the dispatcher records
//! as a postponement: no attempt is used, and the sink pauses until the cool-down ends
//! (the same path as a destination that refuses connections).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::event::Delivery;
use crate::metrics::Metrics;
use crate::sinks::flow::{Breaker, Flow};
use crate::sinks::{BoxFuture, Sink, SinkError};

/// How soon a delivery that found a probe already under way is tried again.
const WHILE_PROBING: Duration = Duration::from_secs(1);

/// A sink with its flow settings applied.
pub struct Guarded {
    inner: Arc<dyn Sink>,
    limiter: Option<DefaultDirectRateLimiter>,
    breaker: Breaker,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

/// The breaker's state.
#[derive(Debug)]
enum State {
    /// Delivering; failed attempts in a row so far.
    Closed { failures: u32 },
    /// Not trying until `until`, after `reason`.
    Open { until: Instant, reason: String },
    /// One delivery is out as a probe; the rest wait for its answer.
    Probing { reason: String },
}

/// What the breaker lets through of one batch.
enum Admit {
    All,
    /// Only the first delivery, as the probe.
    Probe,
    None {
        reason: String,
        retry_in: Duration,
    },
}

impl Guarded {
    /// `inner` with `flow` applied; the sink as it was when there is nothing to apply.
    pub fn wrap(inner: Arc<dyn Sink>, flow: &Flow, metrics: Arc<Metrics>) -> Arc<dyn Sink> {
        if flow.rate_limit.is_none() && !flow.breaker.is_on() {
            return inner;
        }
        Arc::new(Guarded::new(inner, flow, metrics))
    }

    fn new(inner: Arc<dyn Sink>, flow: &Flow, metrics: Arc<Metrics>) -> Guarded {
        // One delivery per interval, no burst: a quota is a pace, not an allowance to
        // spend at once.
        let limiter = flow
            .rate_limit
            .and_then(|limit| Quota::with_period(limit.interval()))
            .map(RateLimiter::direct);
        metrics.circuit(inner.name(), false);
        Guarded {
            inner,
            limiter,
            breaker: flow.breaker,
            state: Mutex::new(State::Closed { failures: 0 }),
            metrics,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn admit(&self) -> Admit {
        let mut state = self.state();
        match &*state {
            State::Closed { .. } => Admit::All,
            State::Open { until, reason } => match until.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Admit::None {
                    reason: format!("circuit open: {reason}; next probe in {}s", left.as_secs()),
                    retry_in: left,
                },
                _ => {
                    *state = State::Probing {
                        reason: reason.clone(),
                    };
                    Admit::Probe
                }
            },
            State::Probing { reason } => Admit::None {
                reason: format!("circuit open: {reason}; a probe is under way"),
                retry_in: WHILE_PROBING,
            },
        }
    }

    /// Counts what came back: a delivery closes the breaker; failures of the destination
    /// (not of one event: a permanent refusal says nothing of its health) count towards
    /// opening it.
    fn record(&self, results: &[Result<(), SinkError>]) {
        let delivered = results.iter().any(Result::is_ok);
        let failed: Vec<&SinkError> = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .filter(|e| !e.is_permanent() && !matches!(e, SinkError::Unavailable { .. }))
            .collect();
        let mut state = self.state();
        let name = self.inner.name();
        match (&*state, delivered, failed.last()) {
            (State::Closed { .. }, true, _) => *state = State::Closed { failures: 0 },
            (State::Closed { failures }, false, Some(last)) => {
                let failures =
                    failures.saturating_add(u32::try_from(failed.len()).unwrap_or(u32::MAX));
                if failures >= self.breaker.failures {
                    let reason = format!("{failures} failed attempts in a row, the last: {last}");
                    tracing::warn!(sink = name, failures, cool_down = ?self.breaker.cool_down, "circuit opened: deliveries wait without using attempts");
                    self.metrics.circuit(name, true);
                    *state = State::Open {
                        until: Instant::now() + self.breaker.cool_down,
                        reason,
                    };
                } else {
                    *state = State::Closed { failures };
                }
            }
            (State::Probing { .. }, true, _) => {
                tracing::info!(sink = name, "circuit closed: the probe was delivered");
                self.metrics.circuit(name, false);
                *state = State::Closed { failures: 0 };
            }
            (State::Probing { reason }, false, last) => {
                let reason =
                    last.map_or_else(|| reason.clone(), |e| format!("the probe failed: {e}"));
                tracing::warn!(sink = name, cool_down = ?self.breaker.cool_down, "circuit stays open: the probe failed");
                *state = State::Open {
                    until: Instant::now() + self.breaker.cool_down,
                    reason,
                };
            }
            _ => {}
        }
    }

    async fn deliver_guarded(&self, batch: &[Delivery]) -> Vec<Result<(), SinkError>> {
        let admitted = match self.admit() {
            Admit::All => batch,
            Admit::Probe => &batch[..batch.len().min(1)],
            Admit::None { reason, retry_in } => {
                return batch
                    .iter()
                    .map(|_| {
                        Err(SinkError::Unavailable {
                            reason: reason.clone(),
                            retry_in,
                        })
                    })
                    .collect();
            }
        };
        if let Some(limiter) = &self.limiter {
            let start = Instant::now();
            for _ in admitted {
                limiter.until_ready().await;
            }
            self.metrics
                .rate_limited(self.inner.name(), start.elapsed());
        }
        let mut results = self.inner.deliver(admitted).await;
        if self.breaker.is_on() {
            self.record(&results);
        }
        // The rest of a probe's batch waits for the probe's answer.
        results.extend(batch[admitted.len()..].iter().map(|_| {
            Err(SinkError::Unavailable {
                reason: "circuit open: waiting for the probe's answer".to_owned(),
                retry_in: WHILE_PROBING,
            })
        }));
        results
    }
}

impl Sink for Guarded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn batch_size(&self) -> usize {
        self.inner.batch_size()
    }

    fn concurrency(&self) -> usize {
        self.inner.concurrency()
    }

    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(self.deliver_guarded(batch))
    }

    fn unready(&self) -> Option<String> {
        match &*self.state() {
            State::Open { reason, .. } | State::Probing { reason } => {
                Some(format!("circuit open: {reason}"))
            }
            State::Closed { .. } => self.inner.unready(),
        }
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        self.inner.close()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::event::{DeliveryId, Source};
    use crate::sinks::flow::RateLimit;

    /// A destination answering from a script, counting what reached it.
    struct Scripted {
        fail: std::sync::atomic::AtomicBool,
        reached: AtomicUsize,
    }

    impl Sink for Scripted {
        fn name(&self) -> &str {
            "crm"
        }

        fn deliver<'a>(
            &'a self,
            batch: &'a [Delivery],
        ) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
            self.reached.fetch_add(batch.len(), Ordering::SeqCst);
            let fail = self.fail.load(Ordering::SeqCst);
            Box::pin(async move {
                batch
                    .iter()
                    .map(|_| {
                        if fail {
                            Err(SinkError::HttpTransport("reset".into()))
                        } else {
                            Ok(())
                        }
                    })
                    .collect()
            })
        }
    }

    fn delivery(n: i64) -> Delivery {
        Delivery {
            id: DeliveryId::row(n),
            attempts: 0,
            event: "call_completed".into(),
            call_id: Some(format!("c{n}")),
            dedup_key: format!("c{n}:call_completed"),
            source: Source::Webhook,
            received_at: std::time::SystemTime::now(),
            payload: bytes::Bytes::from_static(b"{}"),
        }
    }

    fn guarded(flow: Flow) -> (Arc<Scripted>, Guarded) {
        let inner = Arc::new(Scripted {
            fail: std::sync::atomic::AtomicBool::new(true),
            reached: AtomicUsize::new(0),
        });
        let sink = Guarded::new(inner.clone(), &flow, Arc::new(Metrics::new()));
        (inner, sink)
    }

    fn postponed(results: &[Result<(), SinkError>]) -> usize {
        results
            .iter()
            .filter(|r| matches!(r, Err(SinkError::Unavailable { .. })))
            .count()
    }

    #[tokio::test]
    async fn the_breaker_opens_after_its_failures_postpones_while_open_and_a_probe_closes_it() {
        let breaker = Breaker {
            failures: 3,
            cool_down: Duration::from_millis(200),
        };
        let (inner, sink) = guarded(Flow {
            rate_limit: None,
            breaker,
        });
        let batch: Vec<Delivery> = (1..=2).map(delivery).collect();
        sink.deliver(&batch).await;
        assert!(sink.unready().is_none(), "2 failures of 3");
        sink.deliver(&batch).await;
        let reason = sink.unready().expect("open after 4 failures");
        assert!(reason.contains("4 failed attempts in a row"), "{reason}");

        // Open: nothing reaches the destination, and nothing uses an attempt.
        let results = sink.deliver(&batch).await;
        assert_eq!(postponed(&results), 2);
        assert_eq!(inner.reached.load(Ordering::SeqCst), 4);

        // After the cool-down one delivery goes as a probe; failed, it stays open.
        tokio::time::sleep(breaker.cool_down).await;
        let results = sink.deliver(&batch).await;
        assert_eq!(inner.reached.load(Ordering::SeqCst), 5, "one probe");
        assert_eq!(postponed(&results), 1, "the rest waits for the probe");
        assert!(
            sink.unready()
                .expect("still open")
                .contains("the probe failed")
        );

        // The destination recovers: the next probe closes it, and all goes through.
        inner.fail.store(false, Ordering::SeqCst);
        tokio::time::sleep(breaker.cool_down).await;
        sink.deliver(&batch).await;
        assert!(sink.unready().is_none(), "closed by the probe");
        let results = sink.deliver(&batch).await;
        assert!(results.iter().all(Result::is_ok));
    }

    #[tokio::test]
    async fn a_permanent_refusal_does_not_count_towards_opening_the_breaker() {
        let (_, sink) = guarded(Flow {
            rate_limit: None,
            breaker: Breaker {
                failures: 1,
                cool_down: Duration::from_secs(60),
            },
        });
        sink.record(&[Err(SinkError::NotJson(Arc::new(
            serde_json::from_str::<serde_json::Value>("{").expect_err("not JSON"),
        )))]);
        assert!(sink.unready().is_none());
    }

    #[tokio::test]
    async fn a_rate_limit_spaces_deliveries_evenly_and_fails_none() {
        let (inner, sink) = guarded(Flow {
            rate_limit: Some(RateLimit::parse("5/s").expect("valid")),
            breaker: Breaker {
                failures: 0,
                cool_down: Duration::from_secs(1),
            },
        });
        inner.fail.store(false, Ordering::SeqCst);
        let batch: Vec<Delivery> = (1..=6).map(delivery).collect();
        let start = Instant::now();
        let results = sink.deliver(&batch).await;
        assert!(results.iter().all(Result::is_ok));
        // The first at once, then one every 200 ms: never sooner.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(990), "{took:?}");
    }
}
