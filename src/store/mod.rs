//! The durable store's contract: what the server, the dispatchers, the poller, the pruner
//! and the operator commands may ask of a store, whatever engine is behind it.
//!
//! [`Backend`] is the seam. SQLite (`store::sqlite`) is the embedded default for one sidecar;
//! each engine lives in a folder of its own and is chosen once, in [`Store::open`]. The
//! callers hold a [`Store`] and never see which engine answers: like a sink, a backend
//! returns boxed futures, so one allocation per call buys a handle without generics
//! spreading through the server, the dispatchers and the poller.
//!
//! The promises every backend keeps: `ingest` answers only once the event and its
//! deliveries are durable, and stores a dedup key at most once; a claimed delivery is
//! handed to one dispatcher at a time until it is settled or released; a call's later
//! event is not claimed for a sink while an earlier one is pending there.

mod export;
pub mod operator;
mod postgres;
mod sqlite;
mod wakers;

use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::config::{StoreBackend, StoreConfig};
use crate::event::{Delivery, DeliveryId, Event};
use crate::metrics::Metrics;
use operator::{
    BackfillFrom, DeliveryRow, EventFilter, EventPage, EventRow, ListFilter, PollRow, Replay,
    Replayed, SinkPause, Stored,
};

/// The futures engines return: the ecosystem's one type, shared with the sinks'.
pub use futures_util::future::BoxFuture;
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Taking events in: the webhook and poller path.
pub trait Ingest: Send + Sync + 'static {
    /// Stores `event` with one delivery per sink in `sinks`, unless its dedup key is
    /// already stored; answers once that is durable. A caller that stops waiting (its
    /// deadline passed) before the store reaches the write withdraws it, so what was
    /// answered 503 is not stored either.
    fn ingest(&self, event: Event, sinks: Vec<Arc<str>>) -> BoxFuture<'_, Result<Ingested>>;

    /// Keeps a signed body that is not a routable event: once per distinct body, and the
    /// oldest dropped first beyond `store.quarantine_max_bytes`, so replaying one captured
    /// request cannot fill the disk.
    fn quarantine(&self, entry: Quarantined) -> BoxFuture<'_, Result<Kept>>;

    /// Why the store cannot take writes right now, if it cannot (reported by `/readyz`).
    fn unready(&self) -> Option<String>;

    /// Whether an event with this dedup key is stored.
    fn has_event<'a>(&'a self, dedup_key: &'a str) -> BoxFuture<'a, Result<bool>>;
}

/// Hands out each sink's queue.
pub trait Queues: Send + Sync + 'static {
    /// The queue of `sink`, for its dispatcher to own. On SQLite, where what is in hand is
    /// kept in this process's memory, a sink has one queue at a time: a second one claims
    /// nothing until the first is dropped, and then goes on from where it left off (what
    /// the first still had in hand going out again).
    fn queue(self: Arc<Self>, sink: &str) -> Box<dyn SinkQueue>;

    /// Signalled when deliveries for `sink` were stored (or may have been): what wakes
    /// its dispatcher after an operator's replay.
    fn waker(&self, sink: &str) -> Arc<Notify>;
}

/// One sink's deliveries, as its dispatcher takes and settles them. The dispatcher owns
/// it: every call takes it whole (`&mut`), so no two of them overlap.
pub trait SinkQueue: Send + 'static {
    /// Up to `limit` due deliveries (and at most about `max_bytes` of payload, at least
    /// one), oldest first, none already claimed and none whose call has an earlier
    /// delivery pending on this sink. They stay claimed until settled or released.
    fn claim(&mut self, limit: usize, max_bytes: usize) -> BoxFuture<'_, Result<Vec<Delivery>>>;

    /// Records the outcome of delivery attempts and ends their claims, and keeps
    /// `attempts` in each delivery's history (in the same transaction), at most
    /// [`StoreOptions::attempts_kept`] per delivery, the oldest dropped first.
    fn settle(
        &mut self,
        settlements: Vec<Settlement>,
        attempts: Vec<Attempt>,
    ) -> BoxFuture<'_, Result<()>>;

    /// Ends claims without an outcome (a dispatcher stopped with deliveries in flight):
    /// the rows are claimed again later, as if never handed out.
    fn release(&mut self, ids: Vec<DeliveryId>);

    /// When the earliest pending delivery that is not due yet becomes due.
    fn next_due(&mut self) -> BoxFuture<'_, Result<Option<SystemTime>>>;

    /// Signalled when deliveries for the sink were stored (or may have been).
    fn waker(&self) -> Arc<Notify>;

    /// Records that the sink waits until `pause.until` because its destination cannot be
    /// reached (`Some`), or that it delivers again (`None`), for `deliveries list`.
    fn record_pause<'a>(&'a mut self, pause: Option<&'a SinkPause>) -> BoxFuture<'a, Result<()>>;
}

/// The poller's schedule of calls whose analysis has not arrived, and its API budget.
pub trait PollSchedule: Send + Sync + 'static {
    /// Calls the poller should look at now, earliest first.
    fn due_polls(&self, limit: usize) -> BoxFuture<'_, Result<Vec<TrackedCall>>>;

    /// When the next tracked call is due for a poll, if any is waiting.
    fn next_poll(&self) -> BoxFuture<'_, Result<Option<SystemTime>>>;

    /// Records what polling a call found.
    fn record_poll<'a>(&'a self, call_id: &'a str, update: PollUpdate)
    -> BoxFuture<'a, Result<()>>;

    /// Records one request to Vyora's API against the budget that every process sharing
    /// this store spends (`limit` in any `window`), or says how long until it has room.
    fn reserve_api_call(
        &self,
        limit: usize,
        window: Duration,
    ) -> BoxFuture<'_, Result<Option<Duration>>>;
}

/// What operators see and change: the commands, metrics and console.
pub trait Operator: Send + Sync + 'static {
    /// The sinks recorded as paused.
    fn pauses(&self) -> BoxFuture<'_, Result<Vec<SinkPause>>>;

    /// Deliveries for `deliveries list`, newest first.
    fn list_deliveries<'a>(
        &'a self,
        filter: &'a ListFilter,
    ) -> BoxFuture<'a, Result<Vec<DeliveryRow>>>;

    /// Puts the chosen deliveries of `sink` back to pending with their attempts reset.
    /// Rows already pending, and events whose payload retention emptied, are left as they
    /// are; the answer counts each kind, and names the sinks the store knows when it
    /// holds no delivery for `sink` at all.
    fn replay<'a>(&'a self, sink: &'a str, which: &'a Replay) -> BoxFuture<'a, Result<Replayed>>;

    /// Stored events that `sink` has no delivery of, oldest first: `deliveries backfill`
    /// routes them through the sink's filters.
    fn backfill_candidates<'a>(
        &'a self,
        sink: &'a str,
        from: &'a BackfillFrom,
    ) -> BoxFuture<'a, Result<Vec<Stored>>>;

    /// Gives `sink` a pending delivery of each event of `ids` that it has none of yet
    /// (and whose payload is still stored); returns how many it added.
    fn backfill<'a>(&'a self, sink: &'a str, ids: Vec<i64>) -> BoxFuture<'a, Result<usize>>;

    /// The stored events of a call with their payloads, and their deliveries with status
    /// and attempts per sink.
    fn show_events<'a>(&'a self, call_id: &'a str) -> BoxFuture<'a, Result<Vec<EventRow>>>;

    /// Stored events, newest first, with their delivery status per sink.
    fn list_events<'a>(&'a self, filter: &'a EventFilter) -> BoxFuture<'a, Result<EventPage>>;

    /// Tracked calls, waiting ones first (soonest first), then the most recently finished.
    fn poll_status(&self, limit: usize) -> BoxFuture<'_, Result<Vec<PollRow>>>;

    /// Backlog figures for the metrics.
    fn stats(&self) -> BoxFuture<'_, Result<Stats>>;
}

/// Keeping the store: who leads, retention, closing.
pub trait Maintenance: Send + Sync + 'static {
    /// Whether this process holds `role` now: a store shared by several processes lets
    /// one of them at a time prune or poll.
    fn lead(&self, role: Role) -> BoxFuture<'_, Result<bool>>;

    /// Empties the payloads of events received before `payloads_before` and deletes the
    /// events (dedup keys) received before `keys_before`, sparing every event with a
    /// delivery pending or dead; in short steps, so requests are never held up for long.
    fn prune(
        &self,
        payloads_before: SystemTime,
        keys_before: SystemTime,
    ) -> BoxFuture<'_, Result<Pruned>>;

    /// Finishes every write already queued, then stops taking new ones.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// What a store does, whatever the engine, in one role per part of the router that uses
/// it. See the module documentation for the promises every implementation keeps.
pub trait Backend: Ingest + Queues + PollSchedule + Operator + Maintenance {}

impl<T: Ingest + Queues + PollSchedule + Operator + Maintenance> Backend for T {}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store(Arc<dyn Backend>);

impl Deref for Store {
    type Target = dyn Backend;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl Store {
    /// The store as a sink's dispatcher sees it: that sink's queue, and nothing else.
    pub fn queue(&self, sink: &str) -> Box<dyn SinkQueue> {
        Arc::clone(&self.0).queue(sink)
    }

    /// Opens the store `config` names, creating and migrating it as needed, and starts
    /// what it needs in the background (SQLite: its writer and checkpointer threads;
    /// PostgreSQL: its writers, its listener and the heartbeat of its claims).
    pub async fn open(config: &StoreConfig, options: StoreOptions) -> Result<Store> {
        Ok(match &config.backend {
            StoreBackend::Sqlite => Store(Arc::new(sqlite::SqliteStore::open(config, options)?)),
            StoreBackend::Postgres(pg) => Store(Arc::new(
                postgres::PostgresStore::open(
                    pg,
                    config.lease,
                    config.quarantine_max_bytes,
                    options,
                    postgres::Opening::Migrate,
                )
                .await?,
            )),
        })
    }

    /// Where the store `config` names is, for the log: SQLite's file, or PostgreSQL's
    /// database and servers (never a user or a password).
    pub fn location(config: &StoreConfig) -> String {
        match &config.backend {
            StoreBackend::Sqlite => format!("SQLite at {}", config.path.display()),
            StoreBackend::Postgres(pg) => postgres::location(pg),
        }
    }

    /// Opens an existing store for an operator command, which never changes its schema:
    /// a replica of another build may be using it. A wrong SQLite path is an error, not a
    /// new empty database; a store of another schema version is refused, with what to run.
    pub async fn open_existing(config: &StoreConfig) -> Result<Store> {
        Ok(match &config.backend {
            StoreBackend::Sqlite => {
                sqlite::schema::check_version(&config.path)?;
                // Of this build's version, so opening migrates nothing.
                Store(Arc::new(sqlite::SqliteStore::open(
                    config,
                    StoreOptions::default(),
                )?))
            }
            StoreBackend::Postgres(pg) => Store(Arc::new(
                postgres::PostgresStore::open(
                    pg,
                    config.lease,
                    config.quarantine_max_bytes,
                    StoreOptions::default(),
                    postgres::Opening::Existing,
                )
                .await?,
            )),
        })
    }
}

pub use postgres::Migrated;

/// `store migrate`: copies the SQLite store at `from` into PostgreSQL (creating or
/// migrating the schema there); pending deliveries stay pending, and the dedup history
/// comes along. The router that writes `from` must be stopped. `from` is only read, so it
/// must be of this build's schema version.
pub async fn migrate_sqlite_to_postgres(
    from: &std::path::Path,
    to: &crate::config::PostgresConfig,
) -> Result<Migrated> {
    let mut export = sqlite::export::SqliteExport::open(from)?;
    postgres::import(&mut export, to).await
}

/// What the store is opened with beyond its config.
#[derive(Clone)]
pub struct StoreOptions {
    /// When the poller runs: how long after a call's latest event to poll it.
    pub track_calls: Option<Duration>,
    pub metrics: Option<Arc<Metrics>>,
    /// Attempts kept in each delivery's history (`delivery.attempts_kept`).
    pub attempts_kept: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            track_calls: None,
            metrics: None,
            attempts_kept: crate::config::ATTEMPTS_KEPT,
        }
    }
}

/// A task that one process at a time performs on a shared store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Pruner,
    Poller,
}

/// What storing an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// New: stored with one delivery per matching sink.
    Stored { deliveries: usize },
    /// Its dedup key was already stored; nothing new was written.
    Duplicate,
}

/// A signed body that is not a routable event, kept so nothing the provider sent is lost.
#[derive(Debug)]
pub struct Quarantined {
    pub reason: String,
    pub event_header: Option<String>,
    pub body: Bytes,
}

/// What quarantining a body did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kept {
    /// False when the same body was already kept.
    pub stored: bool,
    /// Older bodies removed to stay within `store.quarantine_max_bytes`.
    pub dropped: u64,
}

/// The result of one delivery attempt, as the dispatcher records it.
#[derive(Debug, Clone)]
pub enum Settlement {
    Delivered {
        id: DeliveryId,
    },
    Retry {
        id: DeliveryId,
        at: SystemTime,
        error: String,
    },
    /// Try again at `at` without counting an attempt (the sink was unavailable).
    Postpone {
        id: DeliveryId,
        at: SystemTime,
        error: String,
    },
    Dead {
        id: DeliveryId,
        error: String,
    },
}

impl Settlement {
    pub fn id(&self) -> DeliveryId {
        match self {
            Settlement::Delivered { id }
            | Settlement::Retry { id, .. }
            | Settlement::Postpone { id, .. }
            | Settlement::Dead { id, .. } => *id,
        }
    }
}

/// One delivery attempt, as its delivery's history keeps it: failures, the success that
/// follows one, and every success with `delivery.record_successes`.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub id: DeliveryId,
    /// Attempts made before this one, plus one (a replay starts the count again).
    pub number: u32,
    pub started_at: SystemTime,
    /// From handing the batch to the sink to its answer.
    pub duration: Duration,
    pub outcome: AttemptOutcome,
    /// The HTTP status the destination answered, if it answered one.
    pub code: Option<u16>,
    /// Why it failed, at most [`Attempt::ERROR_BYTES`].
    pub error: Option<String>,
    /// The start of the destination's answer (HTTP sinks), at most
    /// [`Attempt::RESPONSE_BYTES`].
    pub response: Option<String>,
}

impl Attempt {
    pub const ERROR_BYTES: usize = 512;
    pub const RESPONSE_BYTES: usize = 1024;
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered,
    /// Failed; tried again later.
    Retried,
    /// Failed for good: the delivery went to the dead letters.
    Dead,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Delivered => "delivered",
            AttemptOutcome::Retried => "retried",
            AttemptOutcome::Dead => "dead",
        }
    }

    /// The stored name read back; `None` for one this build does not know.
    pub fn parse(s: &str) -> Option<AttemptOutcome> {
        [Self::Delivered, Self::Retried, Self::Dead]
            .into_iter()
            .find(|o| o.as_str() == s)
    }
}

/// What a pruning pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub payloads: usize,
    pub events: usize,
}

/// Backlog figures for the metrics.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub sinks: Vec<SinkStats>,
    /// Calls waiting for their analysis.
    pub calls_waiting: i64,
    /// Bytes of quarantined bodies.
    pub quarantine_bytes: i64,
}

/// Per-sink delivery figures.
#[derive(Debug, Clone)]
pub struct SinkStats {
    pub sink: String,
    pub pending: i64,
    pub dead: i64,
    /// When the oldest waiting delivery's event was received.
    pub oldest_pending: Option<SystemTime>,
}

/// What a poll of one call found.
#[derive(Debug, Clone)]
pub enum PollUpdate {
    /// Not ready (or the API failed): poll again at `at`.
    Again { at: SystemTime, result: String },
    /// Polling of this call is over.
    Finished { status: PollEnd, result: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollEnd {
    /// The analysis is stored (by webhook or by this poll).
    Done,
    GaveUp,
    NotFound,
}

impl PollEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            PollEnd::Done => "done",
            PollEnd::GaveUp => "gave_up",
            PollEnd::NotFound => "not_found",
        }
    }
}

/// A call the poller should look at now.
#[derive(Debug, Clone)]
pub struct TrackedCall {
    pub call_id: String,
    pub first_seen_at: SystemTime,
    pub polls: u32,
}

/// An engine's own error (SQLite's, PostgreSQL's), kept whole: each engine's module
/// converts its errors, so nothing here names an engine's types.
pub type EngineError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store {path} does not exist; check store.path (the router creates it)")]
    Missing { path: PathBuf },
    #[error("cannot create the directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the store file {path} or restrict it to its owner: {source}")]
    Permissions {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the store {path}: {source}")]
    Open { path: PathBuf, source: EngineError },
    #[error("cannot migrate the store {path} to schema version {version}: {source}")]
    Migrate {
        path: PathBuf,
        version: usize,
        source: EngineError,
    },
    #[error("the store {path} has schema version {found}, newer than this build knows ({known})")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
    // The engines' errors show their causes in their own text, so they are not given as
    // sources too: `{:#}` would print each cause again.
    #[error("database error: {0}")]
    Database(EngineError),
    #[error("no database connection: {0}")]
    NoConnection(EngineError),
    #[error("cannot connect to PostgreSQL at {host} (sslmode={mode}): {problem}")]
    Connect {
        host: String,
        mode: &'static str,
        problem: String,
    },
    #[error("cannot set up the database connections: {0}")]
    Setup(String),
    #[error(
        "the database has schema version {found}, newer than this build knows ({known}); run the newer build"
    )]
    SchemaTooNew { found: i64, known: usize },
    #[error("{store} has schema version {found}; this build uses version {current}: {}", advice(*found, *current))]
    SchemaMismatch {
        store: String,
        found: i64,
        current: usize,
    },
    #[error(
        "{store} holds no router tables yet: `vyora-router serve` creates them when it starts (check {check})"
    )]
    NoSchema { store: String, check: &'static str },
    #[error("the store cannot take writes: {0}")]
    Unavailable(String),
    #[error("cannot start the store's writer thread: {0}")]
    Thread(std::io::Error),
    #[error("the store's writer has stopped")]
    WriterGone,
    #[error("a store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What to run when a store's schema version is not this build's.
fn advice(found: i64, current: usize) -> &'static str {
    if usize::try_from(found).is_ok_and(|found| found > current) {
        "use the build that wrote it (or a newer one)"
    } else {
        "run `vyora-router serve` of this build once (it migrates the store when it starts), or use the build that matches the store"
    }
}

/// The time stores record; one function so tests and stores agree.
pub fn now() -> SystemTime {
    SystemTime::now()
}
