//! The missed-analysis fallback: polls Vyora's REST API for calls whose
//! `all_processing_completed` webhook never arrived, and stores what it finds through the
//! same dedup-and-store path as webhooks, marked `source = "poll"`.
//!
//! The schedule lives in the store (`polls`), so a restart neither forgets a call nor
//! polls one early. Every request waits on the shared [`RateLimiter`](crate::api::RateLimiter).

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::api::{ApiError, Client};
use crate::backoff::Backoff;
use crate::config::PollerConfig;
use crate::event::Event;
use crate::live::LiveHandle;
use crate::metrics::Metrics;
use crate::protocol;
use crate::store::{self, Ingested, PollEnd, PollUpdate, Role, Store, StoreError, TrackedCall};

/// Calls read from the store per look.
const BATCH: usize = 32;
/// Longest sleep between looks, so a call tracked meanwhile is not missed for long.
const MAX_IDLE: Duration = Duration::from_secs(1);
/// The wait before restarting a poller that stopped: 1 s, doubling while it keeps
/// stopping, up to a minute, so a crash loop does not spin. A poller that ran for the
/// longest wait starts over from the shortest when it next stops.
const RESTART: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// Whether the poller can work; `/readyz` reports it.
#[derive(Debug, Default)]
pub struct PollerHealth(Mutex<HealthState>);

#[derive(Debug, Default)]
struct HealthState {
    /// What the running poller found (a refused API key).
    problem: Option<String>,
    /// Set by the supervisor while a poller that stopped unexpectedly waits to restart.
    stopped: Option<String>,
}

impl PollerHealth {
    pub fn unready(&self) -> Option<String> {
        let state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        state.stopped.clone().or_else(|| state.problem.clone())
    }

    fn set(&self, problem: Option<String>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .problem = problem;
    }

    fn set_stopped(&self, stopped: Option<String>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stopped = stopped;
    }
}

/// Runs the task `start` makes until `stop`, and restarts it whenever it ends without
/// `stop` (a panic, or a return): the poller is a background task nobody awaits until
/// shutdown, so without this a panic would end polling silently. Each restart is counted
/// and shows in readiness until the new task runs.
async fn supervise<F, T>(
    mut start: F,
    stop: CancellationToken,
    health: Arc<PollerHealth>,
    metrics: Arc<Metrics>,
) where
    F: FnMut(CancellationToken) -> T,
    T: Future<Output = ()> + Send + 'static,
{
    let mut restarts: u64 = 0;
    let mut in_a_row: u32 = 0;
    loop {
        let started = Instant::now();
        // A task of its own, so that a panic ends it and not the supervisor.
        let ended = tokio::spawn(start(stop.clone())).await;
        if stop.is_cancelled() {
            return;
        }
        restarts += 1;
        metrics.poller_restarts.inc();
        match ended {
            Err(e) => tracing::error!(error = %e, restarts, "the poller failed; restarting it"),
            Ok(()) => tracing::error!(restarts, "the poller stopped unexpectedly; restarting it"),
        }
        health.set_stopped(Some(format!(
            "the poller stopped unexpectedly (restart {restarts})"
        )));
        in_a_row = if started.elapsed() >= RESTART.max {
            1
        } else {
            in_a_row.saturating_add(1)
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RESTART.ceiling(in_a_row)) => {}
        }
        health.set_stopped(None);
    }
}

pub struct Poller {
    client: Arc<Client>,
    store: Store,
    live: LiveHandle,
    config: PollerConfig,
    health: Arc<PollerHealth>,
    metrics: Arc<Metrics>,
}

/// What one poll of one call came to.
enum Outcome {
    Update(PollUpdate),
    /// The API key was refused: every poll would fail the same way.
    Unauthorized(String),
    /// Nothing recorded (rate limited, or the store failed): the call stays due.
    Retry,
}

impl Poller {
    pub fn new(
        client: Arc<Client>,
        store: Store,
        live: LiveHandle,
        config: PollerConfig,
        health: Arc<PollerHealth>,
        metrics: Arc<Metrics>,
    ) -> Poller {
        Poller {
            client,
            store,
            live,
            config,
            health,
            metrics,
        }
    }

    /// Runs the poller until `stop`, restarted if it ever stops before.
    pub async fn supervised(self: Arc<Self>, stop: CancellationToken) {
        let (health, metrics) = (Arc::clone(&self.health), Arc::clone(&self.metrics));
        supervise(
            move |stop| Arc::clone(&self).run(stop),
            stop,
            health,
            metrics,
        )
        .await;
    }

    async fn run(self: Arc<Self>, stop: CancellationToken) {
        tracing::info!(
            wait = ?self.config.wait_for_analysis,
            interval = ?self.config.interval,
            "polling for missed analyses"
        );
        while !stop.is_cancelled() {
            // On a store several processes share, one of them polls: the API's rate
            // limit is the account's, not the process's.
            if !self.store.lead(Role::Poller).await.unwrap_or(false) {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(MAX_IDLE) => {}
                }
                continue;
            }
            let due = match self.store.due_polls(BATCH).await {
                Ok(due) => due,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the poll schedule");
                    Vec::new()
                }
            };
            if due.is_empty() {
                let wait = match self.store.next_poll().await {
                    Ok(Some(at)) => at.duration_since(SystemTime::now()).unwrap_or_default(),
                    _ => MAX_IDLE,
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wait.min(MAX_IDLE)) => {}
                }
                continue;
            }
            for call in due {
                // A batch can wait on the API budget far longer than a lease: the role is
                // checked before each request, so a replica that lost it (paused past
                // its lease, say) stops rather than polling alongside the new holder.
                if !self.store.lead(Role::Poller).await.unwrap_or(false) {
                    break;
                }
                let outcome = tokio::select! {
                    () = stop.cancelled() => return,
                    outcome = self.poll(&call) => outcome,
                };
                match outcome {
                    Outcome::Update(update) => {
                        if let Err(e) = self.store.record_poll(&call.call_id, update).await {
                            tracing::error!(call_id = %call.call_id, error = %e, "cannot record a poll");
                        }
                    }
                    Outcome::Retry => {}
                    Outcome::Unauthorized(reason) => {
                        tracing::error!(
                            reason,
                            "the Vyora API refused the API key; polling stops until the key is fixed and the router restarted"
                        );
                        self.health.set(Some(reason));
                        stop.cancelled().await;
                        return;
                    }
                }
            }
        }
    }

    async fn poll(&self, call: &TrackedCall) -> Outcome {
        let not_ready = |result: String| {
            let tracked_for = SystemTime::now()
                .duration_since(call.first_seen_at)
                .unwrap_or_default();
            if tracked_for >= self.config.give_up_after {
                self.metrics.poller_gave_up.inc();
                tracing::warn!(call_id = %call.call_id, polls = call.polls + 1, "no analysis after {:?}; giving up", self.config.give_up_after);
                PollUpdate::Finished {
                    status: PollEnd::GaveUp,
                    result: format!("gave up after {:?}: {result}", self.config.give_up_after),
                }
            } else {
                PollUpdate::Again {
                    at: store::now() + self.config.interval,
                    result,
                }
            }
        };
        // The budget every process sharing the store spends: with several replicas, the
        // account's limit holds across all of them, not per process.
        let (limit, window) = self.client.budget();
        loop {
            match self.store.reserve_api_call(limit, window).await {
                Ok(None) => break,
                Ok(Some(wait)) => tokio::time::sleep(wait.max(Duration::from_millis(50))).await,
                Err(e) => {
                    tracing::warn!(call_id = %call.call_id, error = %e, "cannot check the shared API budget; trying later");
                    // The call stays due: pause, or the loop would spin on the error.
                    tokio::time::sleep(MAX_IDLE).await;
                    return Outcome::Retry;
                }
            }
        }
        let body = match self.client.call(&call.call_id).await {
            Ok(body) => body,
            Err(ApiError::NotFound) => {
                tracing::warn!(call_id = %call.call_id, "the API does not know this call; polling it stops");
                return Outcome::Update(PollUpdate::Finished {
                    status: PollEnd::NotFound,
                    result: "404: call not found".into(),
                });
            }
            Err(e @ ApiError::Unauthorized(_)) => return Outcome::Unauthorized(e.to_string()),
            Err(ApiError::RateLimited { retry_after }) => {
                tracing::info!(call_id = %call.call_id, ?retry_after, "rate limited by the API; waiting");
                return Outcome::Retry;
            }
            Err(e) => {
                tracing::warn!(call_id = %call.call_id, error = %e, "poll failed; will try again");
                return Outcome::Update(not_ready(format!("poll failed: {e}")));
            }
        };
        let record: serde_json::Map<String, serde_json::Value> = match serde_json::from_slice(&body)
        {
            Ok(record) => record,
            Err(e) => {
                return Outcome::Update(not_ready(format!("the answer is not a JSON object: {e}")));
            }
        };
        let completed = record.get("status").and_then(|s| s.as_str()) == Some("completed");
        let analysed = record.get("analysis").is_some_and(|a| !a.is_null());
        if !(completed && analysed) {
            let status = record
                .get("status")
                .and_then(|s| s.as_str())
                .unwrap_or("unknown");
            return Outcome::Update(not_ready(format!(
                "not ready: status {status}, analysis {}",
                if analysed { "present" } else { "missing" }
            )));
        }
        match self.emit(&call.call_id, record).await {
            Ok(()) => Outcome::Update(PollUpdate::Finished {
                status: PollEnd::Done,
                result: "analysis recovered by polling".into(),
            }),
            Err(e) => {
                tracing::error!(call_id = %call.call_id, error = %e, "cannot store the recovered events");
                Outcome::Update(not_ready(format!("cannot store the recovered events: {e}")))
            }
        }
    }

    /// Stores `call_completed` (when it never arrived) and `all_processing_completed`, in
    /// that order, as webhooks would have.
    async fn emit(
        &self,
        call_id: &str,
        record: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), EmitError> {
        let completed_key = format!("{call_id}:call_completed");
        let mut names = Vec::with_capacity(2);
        if !self.store.has_event(&completed_key).await? {
            names.push(protocol::CALL_COMPLETED);
        }
        names.push(protocol::ALL_PROCESSING_COMPLETED);
        for name in names {
            let event = Event::from_poll(name, call_id, record.clone())?;
            let sinks = self.live.current().router.sinks_for(&event);
            let outcome = self.store.ingest(event, sinks).await?;
            let recovered = outcome != Ingested::Duplicate;
            tracing::info!(
                call_id,
                event = name,
                source = "poll",
                recovered,
                "event recovered by polling"
            );
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
enum EmitError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Event(#[from] crate::event::EventError),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A supervised fake poller and what a test looks at.
    struct Supervised {
        /// When each run started.
        starts: Arc<Mutex<Vec<Instant>>>,
        health: Arc<PollerHealth>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        supervisor: tokio::task::JoinHandle<()>,
    }

    /// Supervises `script(run, stop)`, where `run` counts the starts from 0.
    fn supervised<T>(script: impl Fn(usize, CancellationToken) -> T + Send + 'static) -> Supervised
    where
        T: Future<Output = ()> + Send + 'static,
    {
        let starts = Arc::new(Mutex::new(Vec::new()));
        let health = Arc::new(PollerHealth::default());
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let start = {
            let starts = Arc::clone(&starts);
            move |stop| {
                let mut starts = starts.lock().unwrap_or_else(PoisonError::into_inner);
                starts.push(Instant::now());
                script(starts.len() - 1, stop)
            }
        };
        let supervisor = tokio::spawn(supervise(
            start,
            stop.clone(),
            Arc::clone(&health),
            Arc::clone(&metrics),
        ));
        Supervised {
            starts,
            health,
            metrics,
            stop,
            supervisor,
        }
    }

    fn count(starts: &Mutex<Vec<Instant>>) -> usize {
        starts.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    #[tokio::test(start_paused = true)]
    async fn a_poller_that_panics_or_returns_is_restarted_counted_and_shown_in_readiness() {
        let Supervised {
            starts,
            health,
            metrics,
            stop,
            supervisor,
        } = supervised(|run, stop| async move {
            match run {
                0 => panic!("a bug in the poller"),
                // Returns although nobody asked it to stop.
                1 => {}
                _ => stop.cancelled().await,
            }
        });

        // The first run panicked at once; the restart waits 1 s.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(count(&starts), 1);
        assert_eq!(
            health.unready().as_deref(),
            Some("the poller stopped unexpectedly (restart 1)")
        );
        // The second run (at 1 s) returned at once; the next restart waits 2 s more.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(count(&starts), 2);
        assert_eq!(
            health.unready().as_deref(),
            Some("the poller stopped unexpectedly (restart 2)")
        );
        // The third run (at 3 s) keeps running: ready again.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(count(&starts), 3);
        assert_eq!(health.unready(), None);
        assert!(
            metrics
                .encode()
                .contains("vyora_router_poller_restarts_total 2\n"),
            "{}",
            metrics.encode()
        );

        stop.cancel();
        supervisor.await.expect("the supervisor ends at stop");
        assert_eq!(count(&starts), 3, "a stop is no reason to restart");
    }

    #[tokio::test(start_paused = true)]
    async fn a_poller_that_keeps_failing_is_restarted_ever_more_slowly_up_to_a_minute() {
        let Supervised {
            starts,
            metrics,
            stop,
            supervisor,
            ..
        } = supervised(|_, _| async { panic!("a bug in the poller") });
        tokio::time::sleep(Duration::from_secs(600)).await;
        stop.cancel();
        supervisor.await.expect("the supervisor ends at stop");

        let starts = starts.lock().unwrap_or_else(PoisonError::into_inner);
        let gaps: Vec<u64> = starts.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect();
        assert_eq!(gaps[..7], [1, 2, 4, 8, 16, 32, 60], "{gaps:?}");
        assert!(gaps[7..].iter().all(|&g| g == 60), "{gaps:?}");
        assert!(
            metrics.encode().contains(&format!(
                "vyora_router_poller_restarts_total {}\n",
                starts.len()
            )),
            "{}",
            metrics.encode()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_poller_that_ran_a_long_while_before_failing_is_restarted_after_the_shortest_wait() {
        let Supervised {
            starts,
            stop,
            supervisor,
            ..
        } = supervised(|run, stop| async move {
            match run {
                0 | 1 => panic!("a bug in the poller"),
                2 => {
                    tokio::time::sleep(Duration::from_secs(120)).await;
                    panic!("a later bug in the poller")
                }
                _ => stop.cancelled().await,
            }
        });
        tokio::time::sleep(Duration::from_secs(200)).await;
        stop.cancel();
        supervisor.await.expect("the supervisor ends at stop");

        let starts = starts.lock().unwrap_or_else(PoisonError::into_inner);
        let at: Vec<u64> = starts.iter().map(|t| (*t - starts[0]).as_secs()).collect();
        // 1 s, then 2 s; after two minutes of work, 1 s again rather than 4 s.
        assert_eq!(at, [0, 1, 3, 124]);
    }
}
