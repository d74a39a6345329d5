//! The missed-analysis fallback: polls Vyora's REST API for calls whose
//! `all_processing_completed` webhook never arrived, and stores what it finds through the
//! same dedup-and-outbox path as webhooks, marked `source = "poll"`.
//!
//! The schedule lives in the store (`polls`), so a restart neither forgets a call nor
//! polls one early. Every request waits on the shared [`RateLimiter`](crate::api::RateLimiter).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::api::{ApiError, Client};
use crate::config::PollerConfig;
use crate::event::Event;
use crate::live::LiveHandle;
use crate::metrics::Metrics;
use crate::store::{self, Ingested, PollEnd, PollUpdate, Reader, Store, StoreError, TrackedCall};

/// Calls read from the store per look.
const BATCH: usize = 32;
/// Longest sleep between looks, so a call tracked meanwhile is not missed for long.
const MAX_IDLE: Duration = Duration::from_secs(1);

/// Whether the poller can work; `/readyz` reports it.
#[derive(Debug, Default)]
pub struct PollerHealth(Mutex<Option<String>>);

impl PollerHealth {
    pub fn unready(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, problem: Option<String>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = problem;
    }
}

pub struct Poller {
    client: Arc<Client>,
    store: Store,
    reader: Reader,
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
    ) -> Result<Poller, StoreError> {
        let reader = store.reader()?;
        Ok(Poller {
            client,
            store,
            reader,
            live,
            config,
            health,
            metrics,
        })
    }

    pub async fn run(self, stop: CancellationToken) {
        tracing::info!(
            wait = ?self.config.wait_for_analysis,
            interval = ?self.config.interval,
            "polling for missed analyses"
        );
        while !stop.is_cancelled() {
            let due = match self.reader.due_polls(BATCH).await {
                Ok(due) => due,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the poll schedule");
                    Vec::new()
                }
            };
            if due.is_empty() {
                let wait = match self.reader.next_poll().await {
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
        if !self.reader.has_event(&completed_key).await? {
            names.push("call_completed");
        }
        names.push("all_processing_completed");
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
