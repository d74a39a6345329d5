//! The SQLite store: one database file in WAL mode holding an append-only event log (each
//! event with the sinks routing chose, its payload compressed), a cursor per sink, retry
//! rows for the deliveries that failed, the poll schedule and the quarantine (layout and
//! reasons: `schema::to_event_log`), and the dedup index in runs written in insertion
//! order ([`dedup`]).
//!
//! Every write goes through one writer thread that commits in groups ([`writer`]); reads
//! use a pool of their own connections ([`reader`]) and never wait for the writer.
//! What each sink has in hand lives in its queue ([`queue`], [`claims`]), owned by the
//! sink's dispatcher: one process owns the file.

mod admin;
mod claims;
mod codec;
mod dedup;
pub(super) mod export;
mod keys;
mod millis;
mod prune;
mod quarantine;
mod queue;
mod reader;
pub(super) mod schema;
mod settle;
mod sink_list;
#[cfg(test)]
mod tests;
mod waiting;
mod wal;
mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc, oneshot};

use crate::config::StoreConfig;
use crate::event::Event;
use crate::store::operator::{
    BackfillFrom, DeliveryRow, EventFilter, EventPage, EventRow, ListFilter, PollRow, Replay,
    Replayed, SinkPause, Stored,
};
use crate::store::wakers::Wakers;
use crate::store::{
    BoxFuture, Ingest, Ingested, Kept, Maintenance, Operator, PollSchedule, PollUpdate, Pruned,
    Quarantined, Queues, Result, Role, SinkQueue, Stats, StoreError, StoreOptions, TrackedCall,
};
use codec::compress;
use prune::{PruneRange, PruneStep};
use queue::{Queue, Shared};
use reader::Readers;
use writer::{Op, WriterContext};

/// Events examined per pruning step (one short write transaction each).
const PRUNE_BATCH: i64 = 500;
/// The pause between pruning steps, which leaves the writer to the requests.
const PRUNE_PAUSE: Duration = Duration::from_millis(10);

/// SQLite's errors reach the rest of the crate as the store's, whole.
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Database(Box::new(e))
    }
}

pub(super) struct SqliteStore {
    /// The writer's queue; every write is an [`Op`] on it.
    tx: mpsc::Sender<Op>,
    /// Signalled per sink after a commit stored deliveries for it.
    wakers: Arc<Wakers>,
    /// Whether the writer's last commit succeeded (readiness).
    writable: Arc<AtomicBool>,
    /// Set when the poller runs: how long after a call's latest event to poll it.
    track_calls: Option<Duration>,
    readers: Arc<Readers>,
    /// The sinks' queues.
    queues: Arc<Shared>,
    /// The writer thread, joined by `close`.
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl SqliteStore {
    /// Opens (creating and migrating as needed) the database and starts its writer and
    /// checkpointer threads.
    pub(super) fn open(config: &StoreConfig, options: StoreOptions) -> Result<SqliteStore> {
        Self::open_with_runs(config, options, dedup::RUN_SIZE, dedup::CHUNK)
    }

    /// [`Self::open`] with `run_size` keys per run of the dedup index, written `run_chunk`
    /// keys a commit (small in tests).
    fn open_with_runs(
        config: &StoreConfig,
        options: StoreOptions,
        run_size: usize,
        run_chunk: usize,
    ) -> Result<SqliteStore> {
        let StoreOptions {
            track_calls,
            metrics,
            attempts_kept,
        } = options;
        let path = config.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            // Only the directories created here get 0700; an existing parent (/tmp, /var/lib)
            // is not ours to change.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| StoreError::CreateDir {
                    path: dir.to_owned(),
                    source,
                })?;
        }
        schema::restrict_to_owner(&path)?;
        let mut conn = schema::connect(&path, config.synchronous)?;
        schema::migrate(&mut conn, &path)?;
        // Checkpoints run on their own thread, not inside a commit that requests wait for.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.pragma_update(None, "journal_size_limit", wal::WAL_TARGET_BYTES as i64)?;
        let checkpointer = schema::connect(&path, config.synchronous)?;
        // The writer signals each commit; the checkpointer sleeps while nothing is written.
        let (commit_signal, commits) = std::sync::mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || wal::checkpoint_loop(&checkpointer, &commits))
            .map_err(StoreError::Thread)?;

        let waiting = waiting::Waiting::load(&conn)?;
        let (tx, rx) = mpsc::channel(writer::QUEUE_DEPTH);
        let wakers = Arc::new(Wakers::default());
        let writable = Arc::new(AtomicBool::new(true));
        let context = WriterContext {
            wakers: Arc::clone(&wakers),
            wal: schema::wal_path(&path),
            writable: Arc::clone(&writable),
            metrics,
            commit_signal,
            limits: writer::Limits {
                quarantine_max_bytes: config.quarantine_max_bytes,
                run_size,
                run_chunk,
                commit_interval: config.commit_interval,
                attempts_kept,
            },
        };
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer::write_loop(conn, rx, &context, waiting))
            .map_err(StoreError::Thread)?;
        let readers = Arc::new(Readers::new(path));
        Ok(SqliteStore {
            queues: Arc::new(Shared::new(
                tx.clone(),
                Arc::clone(&readers),
                Arc::clone(&wakers),
            )),
            tx,
            wakers,
            writable,
            track_calls,
            readers,
            writer: Mutex::new(Some(handle)),
        })
    }

    async fn submit<T>(
        &self,
        op: Op,
        rx: oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        writer::submit(&self.tx, op, rx).await
    }

    /// One pruning step through the writer.
    async fn prune_step(&self, range: PruneRange) -> Result<PruneStep> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Prune {
            range,
            outcome: PruneStep::default(),
            reply,
        };
        self.submit(op, rx).await
    }

    /// Walks the events by id (ids grow with time) in steps of [`PRUNE_BATCH`], stopping
    /// at the first range too recent to touch. Ranges without events (ids already
    /// deleted) are skipped, not taken for the recent end: one event kept for its dead
    /// delivery must not stop pruning for good.
    async fn prune_pass(
        &self,
        payloads_before: SystemTime,
        keys_before: SystemTime,
    ) -> Result<Pruned> {
        let mut done = Pruned::default();
        let mut from = self.readers.with(reader::first_event_id).await?;
        while let Some(start) = from {
            let step = self
                .prune_step(PruneRange {
                    from: start,
                    to: start.saturating_add(PRUNE_BATCH),
                    payloads_before,
                    keys_before,
                    runs_before: start.saturating_add(PRUNE_BATCH),
                })
                .await?;
            done.payloads += step.payloads;
            done.events += step.events;
            from = if step.reached_recent { None } else { step.next };
            tokio::time::sleep(PRUNE_PAUSE).await;
        }
        // Then the runs of the dedup index left without events, a chunk a step (no
        // events in the empty range 0..0).
        loop {
            let step = self
                .prune_step(PruneRange {
                    from: 0,
                    to: 0,
                    payloads_before,
                    keys_before,
                    runs_before: i64::MAX,
                })
                .await?;
            if !step.runs_left {
                break;
            }
            tokio::time::sleep(PRUNE_PAUSE).await;
        }
        Ok(done)
    }
}

impl Ingest for SqliteStore {
    fn ingest(&self, event: Event, sinks: Vec<Arc<str>>) -> BoxFuture<'_, Result<Ingested>> {
        Box::pin(async move {
            // On the request's task: the writer thread only writes.
            let (stored, codec) = compress(&event.payload);
            let (reply, rx) = oneshot::channel();
            let op = Op::Ingest {
                track: self.track_calls,
                event: Box::new(event),
                stored,
                codec,
                sinks,
                outcome: Ingested::Duplicate,
                reply,
            };
            self.submit(op, rx).await
        })
    }

    fn quarantine(&self, entry: Quarantined) -> BoxFuture<'_, Result<Kept>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            let op = Op::Quarantine {
                entry,
                outcome: Kept::default(),
                reply,
            };
            self.submit(op, rx).await
        })
    }

    fn unready(&self) -> Option<String> {
        // A writer that has stopped (it never should) cannot commit anything either.
        if self.tx.is_closed() {
            Some("the store's writer has stopped".into())
        } else if !self.writable.load(Ordering::Relaxed) {
            Some("the last commit failed (disk full or locked?)".into())
        } else {
            None
        }
    }

    fn has_event<'a>(&'a self, dedup_key: &'a str) -> BoxFuture<'a, Result<bool>> {
        let key = dedup_key.to_owned();
        Box::pin(self.readers.with(move |conn| reader::has_event(conn, &key)))
    }
}

impl Queues for SqliteStore {
    fn queue(self: Arc<Self>, sink: &str) -> Box<dyn SinkQueue> {
        Box::new(Queue::new(Arc::clone(&self.queues), sink))
    }

    fn waker(&self, sink: &str) -> Arc<Notify> {
        self.wakers.get(sink)
    }
}

impl PollSchedule for SqliteStore {
    fn due_polls(&self, limit: usize) -> BoxFuture<'_, Result<Vec<TrackedCall>>> {
        Box::pin(
            self.readers
                .with(move |conn| reader::due_polls(conn, limit)),
        )
    }

    fn next_poll(&self) -> BoxFuture<'_, Result<Option<SystemTime>>> {
        Box::pin(self.readers.with(reader::next_poll))
    }

    fn record_poll<'a>(
        &'a self,
        call_id: &'a str,
        update: PollUpdate,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            let op = Op::Poll {
                call_id: call_id.to_owned(),
                update,
                reply,
            };
            self.submit(op, rx).await
        })
    }

    fn reserve_api_call(
        &self,
        _limit: usize,
        _window: Duration,
    ) -> BoxFuture<'_, Result<Option<Duration>>> {
        // One process spends the budget; its own rate limiter keeps it.
        Box::pin(async { Ok(None) })
    }
}

impl Operator for SqliteStore {
    fn pauses(&self) -> BoxFuture<'_, Result<Vec<SinkPause>>> {
        Box::pin(self.readers.with(admin::pauses))
    }

    fn list_deliveries<'a>(
        &'a self,
        filter: &'a ListFilter,
    ) -> BoxFuture<'a, Result<Vec<DeliveryRow>>> {
        let filter = filter.clone();
        Box::pin(self.readers.with(move |conn| admin::list(conn, &filter)))
    }

    fn replay<'a>(&'a self, sink: &'a str, which: &'a Replay) -> BoxFuture<'a, Result<Replayed>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            let op = Op::Replay {
                sink: sink.to_owned(),
                which: which.clone(),
                outcome: Replayed::default(),
                reply,
            };
            self.submit(op, rx).await
        })
    }

    fn backfill_candidates<'a>(
        &'a self,
        sink: &'a str,
        from: &'a BackfillFrom,
    ) -> BoxFuture<'a, Result<Vec<Stored>>> {
        let (sink, from) = (sink.to_owned(), from.clone());
        Box::pin(
            self.readers
                .with(move |conn| admin::backfill_candidates(conn, &sink, &from)),
        )
    }

    fn backfill<'a>(&'a self, sink: &'a str, ids: Vec<i64>) -> BoxFuture<'a, Result<usize>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            let op = Op::Backfill {
                sink: sink.to_owned(),
                ids,
                outcome: 0,
                reply,
            };
            self.submit(op, rx).await
        })
    }

    fn list_events<'a>(&'a self, filter: &'a EventFilter) -> BoxFuture<'a, Result<EventPage>> {
        let filter = filter.clone();
        Box::pin(
            self.readers
                .with(move |conn| admin::list_events(conn, &filter)),
        )
    }

    fn show_events<'a>(&'a self, call_id: &'a str) -> BoxFuture<'a, Result<Vec<EventRow>>> {
        let call = call_id.to_owned();
        Box::pin(
            self.readers
                .with(move |conn| admin::show_events(conn, &call)),
        )
    }

    fn poll_status(&self, limit: usize) -> BoxFuture<'_, Result<Vec<PollRow>>> {
        Box::pin(
            self.readers
                .with(move |conn| admin::poll_status(conn, limit)),
        )
    }

    fn stats(&self) -> BoxFuture<'_, Result<Stats>> {
        Box::pin(self.readers.with(reader::stats))
    }
}

impl Maintenance for SqliteStore {
    fn lead(&self, _role: Role) -> BoxFuture<'_, Result<bool>> {
        // One process owns the file: it leads everything.
        Box::pin(async { Ok(true) })
    }

    fn prune(
        &self,
        payloads_before: SystemTime,
        keys_before: SystemTime,
    ) -> BoxFuture<'_, Result<Pruned>> {
        Box::pin(self.prune_pass(payloads_before, keys_before))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.tx.send(Op::Close).await.is_err() {
                tracing::error!("the store writer had already stopped");
            }
            let handle = self
                .writer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(handle) = handle {
                let joined = tokio::task::spawn_blocking(move || handle.join()).await;
                if !matches!(joined, Ok(Ok(()))) {
                    tracing::error!("the store writer thread panicked");
                }
            }
        })
    }
}
