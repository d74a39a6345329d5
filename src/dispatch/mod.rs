//! Dispatchers: one per sink, claiming due deliveries, delivering them, and recording the
//! outcome; failures retry with exponential backoff and full jitter until the row goes dead.
//!
//! The dispatcher holds at most `batch_size * concurrency` rows in memory, whatever the
//! backlog: a sink that is down for hours leaves its rows in SQLite, not here.

pub mod flow;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::{self, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::DeliveryConfig;
use crate::event::{Delivery, DeliveryId};
use crate::feed::{Feed, Happening, What};
use crate::metrics::Metrics;
use crate::redact::Redaction;
use crate::sinks::{Sink, SinkError};
use crate::store::operator::SinkPause;
use crate::store::{self, Attempt, AttemptOutcome, Settlement, SinkQueue};

/// Payload bytes fetched for one batch at most (at least one row is always taken).
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// A dispatcher re-checks its sink's queue at least this often, in case a wake-up was missed
/// (rows written by another process, such as an operator's replay).
const POLL_FALLBACK: Duration = Duration::from_secs(2);
/// Under load, a dispatcher fetches at most once per this interval (unless it is draining
/// a backlog of full batches): a sink then gets fewer, larger batches, which saves an
/// fsync, a query and a store write per batch. An event arriving at a quiet time is
/// fetched at once.
const LINGER: Duration = Duration::from_millis(25);
/// Pause after the store itself failed, so a broken disk is not hammered in a loop.
const STORE_RETRY: Duration = Duration::from_secs(1);
const SETTLE_TRIES: u32 = 3;

/// When to try again after a failure, and when to stop trying.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// Whether a delivery's history keeps every success, not only failures and the
    /// success that ends them.
    pub record_successes: bool,
}

impl From<&DeliveryConfig> for RetryPolicy {
    fn from(c: &DeliveryConfig) -> Self {
        RetryPolicy {
            max_attempts: c.max_attempts,
            backoff: Backoff::new(c.backoff_initial, c.backoff_max),
            record_successes: c.record_successes,
        }
    }
}

/// When a batch was handed to its sink, and how long the sink took to answer.
#[derive(Debug, Clone, Copy)]
struct Timing {
    started_at: SystemTime,
    duration: Duration,
}

impl Timing {
    /// For outcomes decided without asking the sink.
    fn now() -> Timing {
        Timing {
            started_at: SystemTime::now(),
            duration: Duration::ZERO,
        }
    }
}

impl RetryPolicy {
    /// What to record for a delivery that was attempted for the `attempts + 1`-th time:
    /// its outcome, and the attempt for its history unless the history skips it (a
    /// postponement, which is the sink's pause and no attempt; a first-time success,
    /// unless `record_successes`).
    fn settle(
        &self,
        d: &Claim,
        result: Result<(), SinkError>,
        sink: &str,
        timing: Timing,
    ) -> (Settlement, Option<Attempt>) {
        let (code, response) = match &result {
            Err(SinkError::HttpStatus {
                status, snippet, ..
            }) => (
                Some(*status),
                Some(capped(snippet, Attempt::RESPONSE_BYTES)),
            ),
            _ => (None, None),
        };
        let settlement = self.outcome(d, result, sink);
        let (outcome, error) = match &settlement {
            Settlement::Delivered { .. } if d.attempts > 0 || self.record_successes => {
                (AttemptOutcome::Delivered, None)
            }
            Settlement::Retry { error, .. } => (AttemptOutcome::Retried, Some(error)),
            Settlement::Dead { error, .. } => (AttemptOutcome::Dead, Some(error)),
            Settlement::Delivered { .. } | Settlement::Postpone { .. } => {
                return (settlement, None);
            }
        };
        let attempt = Attempt {
            id: d.id,
            number: d.attempts.saturating_add(1),
            started_at: timing.started_at,
            duration: timing.duration,
            outcome,
            code,
            error: error.map(|e| capped(e, Attempt::ERROR_BYTES)),
            response,
        };
        (settlement, Some(attempt))
    }

    /// [`Self::settle`]'s outcome.
    fn outcome(&self, d: &Claim, result: Result<(), SinkError>, sink: &str) -> Settlement {
        let failures = d.attempts.saturating_add(1);
        match result {
            Ok(()) => Settlement::Delivered { id: d.id },
            Err(SinkError::Unavailable { reason, retry_in }) => {
                // The destination is down, not this event: waiting costs no attempt, so
                // an outage of any length drains once it ends instead of killing rows.
                Settlement::Postpone {
                    id: d.id,
                    at: store::now() + retry_in,
                    error: reason,
                }
            }
            Err(e) if e.is_permanent() => {
                tracing::warn!(sink, id = d.id.row, key = %d.dedup_key, attempt = failures, reason = %e, "delivery failed permanently; dead");
                Settlement::Dead {
                    id: d.id,
                    error: e.to_string(),
                }
            }
            Err(e) if failures >= self.max_attempts => {
                tracing::warn!(sink, id = d.id.row, key = %d.dedup_key, attempt = failures, reason = %e, "delivery failed; attempts exhausted, dead");
                Settlement::Dead {
                    id: d.id,
                    error: format!("gave up after {failures} attempts: {e}"),
                }
            }
            Err(e) => {
                let asked = e
                    .retry_after()
                    .map(|d| d.min(self.backoff.max))
                    .unwrap_or_default();
                let wait = self.backoff.full_jitter(failures).max(asked);
                tracing::warn!(sink, id = d.id.row, key = %d.dedup_key, attempt = failures, retry_in = ?wait, reason = %e, "delivery failed; will retry");
                Settlement::Retry {
                    id: d.id,
                    at: store::now() + wait,
                    error: e.to_string(),
                }
            }
        }
    }
}

/// `text` cut to at most `max` bytes, at a character's boundary.
fn capped(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// A row handed to a delivery task: what settling it takes, should the task die.
#[derive(Debug, Clone)]
struct Claim {
    id: DeliveryId,
    /// Attempts made before this one.
    attempts: u32,
    dedup_key: String,
}

impl Claim {
    fn of(d: &Delivery) -> Claim {
        Claim {
            id: d.id,
            attempts: d.attempts,
            dedup_key: d.dedup_key.clone(),
        }
    }
}

/// One sink's dispatcher: its loop is the only part of it that talks to the store. It
/// claims batches, hands each to a delivery task, and records what the tasks hand back
/// (the shape of Vector's stream driver), so the sink's claims and outcomes have one
/// owner and no task settles behind another's back.
pub struct Dispatcher {
    deliverer: Arc<Deliverer>,
    /// Where deliveries are claimed from and their outcomes recorded: the store's
    /// queue of this sink, and nothing else of it, owned by this dispatcher alone.
    queue: Box<dyn SinkQueue>,
    /// Outcomes counted per sink.
    metrics: Arc<Metrics>,
    /// Whether the store may hold a pause of this sink that a delivery should clear. True
    /// at start, so that a pause left by an earlier run is cleared by the first delivery.
    paused: bool,
}

/// What every delivery task of one sink needs; the store is not among it.
struct Deliverer {
    /// The destination; it knows its batch size and concurrency.
    sink: Arc<dyn Sink>,
    /// When a failure is retried and when it goes dead.
    policy: RetryPolicy,
    /// This sink's redaction, applied to each payload before it is handed over.
    redaction: Redaction,
    /// Outcomes as they settle, for the console's live view.
    feed: Feed,
}

/// What a delivery task hands back: each delivery's outcome, the attempts for the
/// history, and the deliveries the live view's sample took.
#[derive(Default)]
struct Outcomes {
    settlements: Vec<Settlement>,
    attempts: Vec<Attempt>,
    names: Vec<Named>,
}

impl Outcomes {
    fn add(&mut self, settled: impl IntoIterator<Item = (Settlement, Option<Attempt>)>) {
        for (settlement, attempt) in settled {
            self.settlements.push(settlement);
            self.attempts.extend(attempt);
        }
    }

    fn append(&mut self, other: Outcomes) {
        self.settlements.extend(other.settlements);
        self.attempts.extend(other.attempts);
        self.names.extend(other.names);
    }
}

impl Dispatcher {
    pub fn new(
        sink: Arc<dyn Sink>,
        queue: Box<dyn SinkQueue>,
        policy: RetryPolicy,
        redaction: Redaction,
        metrics: Arc<Metrics>,
        feed: Feed,
    ) -> Dispatcher {
        Dispatcher {
            deliverer: Arc::new(Deliverer {
                sink,
                policy,
                redaction,
                feed,
            }),
            queue,
            metrics,
            paused: true,
        }
    }

    /// Runs until `stop` is cancelled, then gives in-flight deliveries up to `drain` to
    /// finish. Whatever is still unfinished is released: it stays pending and is
    /// delivered by the next dispatcher of this sink (after a reload or a restart).
    pub async fn run(mut self, stop: CancellationToken, drain: Duration) {
        let sink = Arc::clone(&self.deliverer.sink);
        let name = sink.name();
        let waker = self.queue.waker();
        let slots = sink.concurrency().max(1);
        let mut in_flight: JoinSet<Outcomes> = JoinSet::new();
        // The rows each task holds: a task that dies frees its own rows, never another's.
        let mut claims: HashMap<task::Id, Vec<Claim>> = HashMap::new();
        let batch_size = sink.batch_size().max(1);
        let mut last_fetch: Option<Instant> = None;
        let mut backlog = false;
        loop {
            // Armed before looking, so a row committed while we look still wakes us.
            let notified = waker.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            // Under load, wait out the linger before fetching again (see LINGER).
            let lingering = last_fetch
                .map(|at| at + LINGER)
                .filter(|until| !backlog && *until > Instant::now());
            let mut store_failed = false;
            while lingering.is_none() && in_flight.len() < slots {
                last_fetch = Some(Instant::now());
                match self.queue.claim(batch_size, MAX_BATCH_BYTES).await {
                    Ok(batch) if batch.is_empty() => {
                        backlog = false;
                        break;
                    }
                    Ok(batch) => {
                        backlog = batch.len() == batch_size;
                        let claimed: Vec<Claim> = batch.iter().map(Claim::of).collect();
                        let task = in_flight.spawn(attempt(Arc::clone(&self.deliverer), batch));
                        claims.insert(task.id(), claimed);
                    }
                    Err(e) => {
                        tracing::error!(sink = %name, error = %e, "cannot read the sink's queue");
                        store_failed = true;
                        break;
                    }
                }
            }
            let wait = if let Some(until) = lingering {
                until - Instant::now()
            } else if store_failed {
                STORE_RETRY
            } else {
                self.until_next_due(name).await
            };

            tokio::select! {
                () = stop.cancelled() => break,
                Some(done) = in_flight.join_next_with_id() => {
                    // Every task finished by now is recorded in one write.
                    let mut outcomes = Outcomes::default();
                    let mut tasks = vec![self.take(done, &claims, &mut outcomes)];
                    while let Some(done) = in_flight.try_join_next_with_id() {
                        tasks.push(self.take(done, &claims, &mut outcomes));
                    }
                    self.record(outcomes).await;
                    for task in tasks {
                        claims.remove(&task);
                    }
                },
                () = &mut notified => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        let drained = tokio::time::timeout(drain, async {
            while let Some(done) = in_flight.join_next_with_id().await {
                // A task's claims stay listed until its outcomes are recorded, so that a
                // drain timeout meanwhile releases them below rather than leave them held
                // by nobody.
                let mut outcomes = Outcomes::default();
                let task = self.take(done, &claims, &mut outcomes);
                self.record(outcomes).await;
                claims.remove(&task);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(sink = %name, unfinished = in_flight.len(), "deliveries still running at shutdown were abandoned; they stay pending");
            in_flight.abort_all();
            while in_flight.join_next().await.is_some() {}
        }
        // Claims of tasks whose outcomes were not recorded (abandoned above).
        let abandoned: Vec<DeliveryId> = claims.into_values().flatten().map(|c| c.id).collect();
        if !abandoned.is_empty() {
            self.queue.release(abandoned);
        }
    }

    /// Adds what a finished task handed back to `outcomes`, and returns the task.
    fn take(
        &self,
        done: Result<(task::Id, Outcomes), task::JoinError>,
        claims: &HashMap<task::Id, Vec<Claim>>,
        outcomes: &mut Outcomes,
    ) -> task::Id {
        match done {
            Ok((task, handed)) => {
                outcomes.append(handed);
                task
            }
            Err(e) => {
                let task = e.id();
                let claimed = claims.get(&task).map(Vec::as_slice).unwrap_or_default();
                outcomes.add(self.failed_task(claimed, e));
                task
            }
        }
    }

    /// A delivery task that panicked handed nothing back: its rows count a failed attempt
    /// and wait for their backoff like any failure, so a sink that panics on some input
    /// goes neither into a busy loop nor past `max_attempts`.
    fn failed_task(
        &self,
        claimed: &[Claim],
        e: task::JoinError,
    ) -> Vec<(Settlement, Option<Attempt>)> {
        let Deliverer { sink, policy, .. } = &*self.deliverer;
        let name = sink.name();
        let reason = if e.is_panic() {
            panic_message(e.into_panic())
        } else {
            "the delivery task was cancelled".to_owned()
        };
        tracing::error!(sink = %name, rows = claimed.len(), reason, "a delivery task failed");
        let timing = Timing::now();
        claimed
            .iter()
            .map(|c| policy.settle(c, Err(SinkError::Panicked(reason.clone())), name, timing))
            .collect()
    }

    /// How long until a pending row that is not due yet becomes due (rows due now are either
    /// being delivered or wait for a free slot, and a finishing task wakes us for those).
    async fn until_next_due(&mut self, name: &str) -> Duration {
        match self.queue.next_due().await {
            Ok(Some(at)) => at
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .min(POLL_FALLBACK),
            Ok(None) => POLL_FALLBACK,
            Err(e) => {
                tracing::error!(sink = %name, error = %e, "cannot read the sink's queue");
                STORE_RETRY
            }
        }
    }

    /// Counts the outcomes, writes them (and the attempts for the history) to the store,
    /// and publishes those the live view's sample took to the feed.
    async fn record(&mut self, outcomes: Outcomes) {
        let Outcomes {
            settlements,
            attempts,
            names,
        } = outcomes;
        if settlements.is_empty() {
            return;
        }
        let deliverer = Arc::clone(&self.deliverer);
        let sink = deliverer.sink.name();
        for s in &settlements {
            self.metrics.delivery(sink, outcome_of(s));
        }
        self.record_pause(&settlements).await;
        let mut published: Vec<Happening> = settlements
            .iter()
            .filter_map(|s| {
                let (_, call_id, event) = names.iter().find(|(id, ..)| *id == s.id())?;
                Some(Happening {
                    at: SystemTime::now(),
                    call_id: call_id.clone(),
                    event: event.clone(),
                    what: What::Settled {
                        sink: sink.to_owned(),
                        outcome: outcome_of(s),
                    },
                })
            })
            .collect();
        for tries in 1..=SETTLE_TRIES {
            match self
                .queue
                .settle(settlements.clone(), attempts.clone())
                .await
            {
                Ok(()) => {
                    for happening in std::mem::take(&mut published) {
                        deliverer.feed.publish(happening);
                    }
                    break;
                }
                Err(e) => {
                    // Nothing is lost: on SQLite the queue hands failures back to go out
                    // again and a later write records what was delivered; on PostgreSQL
                    // the rows stay leased, a later try may still record them, and once
                    // the lease ends they are sent again (at-least-once allows it, and
                    // the sinks' ids make it harmless).
                    tracing::error!(sink, error = %e, tries, "cannot record delivery outcomes");
                    tokio::time::sleep(STORE_RETRY).await;
                }
            }
        }
    }

    /// Keeps the store's record of the sink's pause in step, for `deliveries list`: set
    /// while the destination cannot be reached, cleared by the first delivery after. A
    /// failure to record is logged only: the pause itself does not depend on it.
    async fn record_pause(&mut self, settlements: &[Settlement]) {
        let name = self.deliverer.sink.name();
        let postponed = settlements.iter().rev().find_map(|s| match s {
            Settlement::Postpone { at, error, .. } => Some(SinkPause {
                sink: name.to_owned(),
                until: *at,
                reason: error.clone(),
            }),
            _ => None,
        });
        let result = if let Some(pause) = &postponed {
            self.paused = true;
            self.queue.record_pause(Some(pause)).await
        } else if self.paused
            && settlements
                .iter()
                .any(|s| matches!(s, Settlement::Delivered { .. }))
        {
            self.paused = false;
            self.queue.record_pause(None).await
        } else {
            return;
        };
        if let Err(e) = result {
            tracing::error!(sink = name, error = %e, "cannot record the sink's pause");
        }
    }
}

/// The text a panic carried, when it is text.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned());
    format!("the sink panicked: {text}")
}

/// Delivers one batch and hands back its outcomes; the dispatcher's loop records them.
async fn attempt(deliverer: Arc<Deliverer>, batch: Vec<Delivery>) -> Outcomes {
    let Deliverer {
        sink,
        policy,
        redaction,
        feed,
    } = &*deliverer;
    let mut out = Outcomes {
        // What the live view shows of the deliveries its sample takes (none while nobody
        // watches).
        names: if feed.watched() {
            batch
                .iter()
                .filter(|_| feed.admit())
                .map(|d| (d.id, d.call_id.clone(), d.event.clone()))
                .collect()
        } else {
            Vec::new()
        },
        ..Outcomes::default()
    };
    let mut ready = Vec::with_capacity(batch.len());
    for mut d in batch {
        if d.payload.is_empty() {
            // Only a replay of an event older than store.retention gets here.
            out.add([policy.settle(
                &Claim::of(&d),
                Err(SinkError::Pruned),
                sink.name(),
                Timing::now(),
            )]);
            continue;
        }
        // Redacted per sink at delivery time: the stored original stays whole, and what
        // this sink gets (and any signature over it) is the redacted form.
        if !redaction.is_empty() {
            match redaction.apply(&d.payload) {
                Ok(redacted) => d.payload = redacted,
                Err(e) => {
                    out.add([policy.settle(
                        &Claim::of(&d),
                        Err(SinkError::NotJson(Arc::new(e))),
                        sink.name(),
                        Timing::now(),
                    )]);
                    continue;
                }
            }
        }
        ready.push(d);
    }
    let (started_at, clock) = (SystemTime::now(), Instant::now());
    let mut results = sink.deliver(&ready).await;
    let timing = Timing {
        started_at,
        duration: clock.elapsed(),
    };
    if results.len() < ready.len() {
        // A sink's bug: left unsettled, the rest would stay in hand for good and hold
        // the sink's cursor. They fail like a panicking batch, and are tried again.
        let reason = format!(
            "the sink gave {} results for {} deliveries",
            results.len(),
            ready.len()
        );
        tracing::error!(sink = %sink.name(), reason, "a sink did not answer for every delivery");
        results.resize_with(ready.len(), || Err(SinkError::Panicked(reason.clone())));
    }
    out.add(
        ready
            .iter()
            .zip(results)
            .map(|(d, result)| policy.settle(&Claim::of(d), result, sink.name(), timing)),
    );
    out
}

/// A delivery as the live view names it: its call and event.
type Named = (DeliveryId, Option<String>, String);

/// The outcome label of metrics and the live view.
fn outcome_of(settlement: &Settlement) -> &'static str {
    match settlement {
        Settlement::Delivered { .. } => "delivered",
        Settlement::Retry { .. } => "retried",
        Settlement::Postpone { .. } => "postponed",
        Settlement::Dead { .. } => "dead",
    }
}

#[cfg(test)]
mod tests;
