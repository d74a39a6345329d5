//! The durable store: SQLite in WAL mode holding events, their outbox rows (one per event
//! and sink) and the quarantine of signed bodies we could not route.
//!
//! Every write goes through one writer thread that commits in groups: it takes whatever
//! is queued (up to [`MAX_GROUP`] operations), applies it in one transaction, commits with a
//! single fsync, and only then answers each waiting caller. Under load many requests share
//! one fsync, which is what lets `synchronous = FULL` keep up. Reads (the dispatchers'
//! queries) use their own connections and never wait for the writer, thanks to WAL.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::config::{StoreConfig, Synchronous};
use crate::event::{Delivery, Event, Source};
use crate::metrics::Metrics;

/// Most operations committed in one transaction.
const MAX_GROUP: usize = 512;
/// Operations waiting for the writer; callers beyond this wait for room (and time out).
const QUEUE_DEPTH: usize = 1024;
/// How long a statement waits for a lock held by another process (an operator command)
/// before failing; the caller's own deadline is usually shorter.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the background checkpointer copies committed WAL frames into the database.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(10);
/// WAL size the writer keeps the log near (see [`checkpoint_loop`]); SQLite also cuts the
/// file back to it whenever the log restarts.
const WAL_TARGET_BYTES: u64 = 4 * 1024 * 1024;
/// Past this the writer truncates the log whatever it costs: disk use stays bounded even
/// if checkpoints cannot keep up.
const WAL_LIMIT_BYTES: u64 = 256 * 1024 * 1024;
/// How often at most the writer finishes a checkpoint itself.
const WRITER_CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Schema versions, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE events (
    id          INTEGER PRIMARY KEY,
    dedup_key   TEXT    NOT NULL UNIQUE,
    event       TEXT    NOT NULL,
    call_id     TEXT,
    source      TEXT    NOT NULL,
    received_at INTEGER NOT NULL,   -- milliseconds since the Unix epoch
    payload     BLOB    NOT NULL    -- the exact bytes that were signed
);

CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    event_id        INTEGER NOT NULL REFERENCES events (id),
    sink            TEXT    NOT NULL,
    call_id         TEXT,   -- copied from the event: per-call ordering is decided here
    status          TEXT    NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    updated_at      INTEGER NOT NULL
);
-- Only pending rows are ever searched by due time; delivered ones stay out of the index.
CREATE INDEX outbox_due ON outbox (sink, next_attempt_at) WHERE status = 'pending';

CREATE TABLE quarantine (
    id           INTEGER PRIMARY KEY,
    received_at  INTEGER NOT NULL,
    reason       TEXT    NOT NULL,
    event_header TEXT,
    body         BLOB    NOT NULL
);
"#,
    r#"
-- Calls whose analysis we may have to fetch ourselves (the poller).
CREATE TABLE polls (
    call_id       TEXT    PRIMARY KEY,
    status        TEXT    NOT NULL CHECK (status IN ('waiting', 'done', 'gave_up', 'not_found')),
    first_seen_at INTEGER NOT NULL,
    last_event_at INTEGER NOT NULL,
    next_poll_at  INTEGER NOT NULL,
    polls         INTEGER NOT NULL DEFAULT 0,
    last_result   TEXT,
    updated_at    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX polls_due ON polls (next_poll_at) WHERE status = 'waiting';
"#,
    r#"
-- Pruning and `events show` look up deliveries by event; event ids only grow, so this
-- index is appended to, not written at random.
CREATE INDEX outbox_by_event ON outbox (event_id);
-- Dead rows are few; the metrics count them without scanning delivered ones.
CREATE INDEX outbox_dead ON outbox (sink) WHERE status = 'dead';
"#,
    r#"
-- A quarantined body is kept once: the same bytes sent again store nothing new.
ALTER TABLE quarantine ADD COLUMN body_hash BLOB;
CREATE UNIQUE INDEX quarantine_by_hash ON quarantine (body_hash);
"#,
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
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
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot migrate the store {path} to schema version {version}: {source}")]
    Migrate {
        path: PathBuf,
        version: usize,
        source: rusqlite::Error,
    },
    #[error("the store {path} has schema version {found}, newer than this build knows ({known})")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot start the store's writer thread: {0}")]
    Thread(std::io::Error),
    #[error("the store's writer has stopped")]
    WriterGone,
    #[error("a store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What storing an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// New: stored with one outbox row per matching sink.
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
        id: i64,
    },
    Retry {
        id: i64,
        at: SystemTime,
        error: String,
    },
    /// Try again at `at` without counting an attempt (the sink was unavailable).
    Postpone {
        id: i64,
        at: SystemTime,
        error: String,
    },
    Dead {
        id: i64,
        error: String,
    },
}

enum Op {
    Ingest {
        event: Box<Event>,
        sinks: Vec<Arc<str>>,
        /// Track the call for the poller: first poll this long after its latest event.
        track: Option<Duration>,
        /// Set by `apply`; answered only once the transaction that set it has committed.
        outcome: Ingested,
        reply: oneshot::Sender<Result<Ingested, StoreError>>,
    },
    Quarantine {
        entry: Quarantined,
        /// Set by `apply`, answered after commit.
        outcome: Kept,
        reply: oneshot::Sender<Result<Kept, StoreError>>,
    },
    Settle {
        settlements: Vec<Settlement>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Poll {
        call_id: String,
        update: PollUpdate,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Prune {
        range: PruneRange,
        /// Set by `apply`, answered after commit.
        outcome: Pruned,
        reply: oneshot::Sender<Result<Pruned, StoreError>>,
    },
}

/// One pruning step: the events with ids in `[from, to)`.
#[derive(Debug, Clone, Copy)]
pub struct PruneRange {
    pub from: i64,
    pub to: i64,
    /// Payloads of events received before this, delivered to every sink, are emptied.
    pub payloads_before: SystemTime,
    /// Events (dedup keys) received before this, delivered to every sink, are deleted.
    pub keys_before: SystemTime,
}

/// What a pruning step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub payloads: usize,
    pub events: usize,
    /// The range's oldest event is too recent to prune: later ids are newer still.
    pub reached_recent: bool,
    /// The first event id at or after the range's end: where the next step starts, so a
    /// run of deleted ids (behind an event kept for its dead delivery) is skipped.
    pub next: Option<i64>,
}

/// Per-sink outbox figures for the metrics.
#[derive(Debug, Clone)]
pub struct SinkStats {
    pub sink: String,
    pub pending: i64,
    pub dead: i64,
    /// When the oldest waiting delivery's event was received.
    pub oldest_pending: Option<SystemTime>,
}

/// What the store is opened with beyond its config.
#[derive(Default, Clone)]
pub struct StoreOptions {
    /// When the poller runs: how long after a call's latest event to poll it.
    pub track_calls: Option<Duration>,
    pub metrics: Option<Arc<Metrics>>,
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
    fn as_str(self) -> &'static str {
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

/// Per-sink wake-ups: the writer signals a sink's dispatcher after committing rows for it.
#[derive(Default)]
struct Wakers(Mutex<HashMap<String, Arc<Notify>>>);

impl Wakers {
    fn get(&self, sink: &str) -> Arc<Notify> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(map.entry(sink.to_owned()).or_default())
    }

    fn wake(&self, sinks: &HashSet<Arc<str>>) {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for sink in sinks {
            if let Some(n) = map.get(&**sink) {
                n.notify_one();
            }
        }
    }
}

/// A handle to the store; cheap to clone. The writer thread stops when every handle is gone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    path: PathBuf,
    wakers: Arc<Wakers>,
    /// Whether the writer's last commit succeeded (readiness).
    writable: Arc<AtomicBool>,
    /// Set when the poller runs: how long after a call's latest event to poll it.
    track_calls: Option<Duration>,
}

/// The writer thread; [`Writer::join`] waits until it has committed everything queued.
pub struct Writer(JoinHandle<()>);

impl Writer {
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("the store writer thread panicked");
        }
    }
}

pub fn now() -> SystemTime {
    SystemTime::now()
}

fn to_millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn connect(path: &Path, synchronous: Synchronous) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), mode, "the store could not switch to WAL mode");
    }
    let sync = match synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync)
        .map_err(open_err)?;
    Ok(conn)
}

/// Creates the database file 0600 if it is missing, and narrows an existing one (and the
/// `-wal`/`-shm` a crash left) to its owner: the store holds transcripts and phone numbers.
/// SQLite creates `-wal` and `-shm` with the mode of the database file, so they follow.
fn restrict_to_owner(db: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Permissions { path, source }
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(db)
        .map_err(err(db))?;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let path = PathBuf::from(name);
        let mode = match std::fs::metadata(&path) {
            Ok(meta) => meta.permissions().mode(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(err(&path)(e)),
        };
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o700))
                .map_err(err(&path))?;
            tracing::info!(
                path = %path.display(),
                was = format!("{:o}", mode & 0o777),
                "restricted the store file to its owner"
            );
        }
    }
    Ok(())
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let applied = usize::try_from(version).unwrap_or(0);
    if applied > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let migrate_err = |source| StoreError::Migrate {
            path: path.to_owned(),
            version: i + 1,
            source,
        };
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(migrate_err)?;
        tx.execute_batch(sql).map_err(migrate_err)?;
        let version = i64::try_from(i + 1).unwrap_or(i64::MAX);
        tx.pragma_update(None, "user_version", version)
            .map_err(migrate_err)?;
        tx.commit().map_err(migrate_err)?;
    }
    Ok(())
}

impl Store {
    /// Opens (creating and migrating as needed) the database and starts its writer.
    /// `track_calls`: when the poller runs, how long after a call's latest event it polls.
    pub fn open(
        config: &StoreConfig,
        options: StoreOptions,
    ) -> Result<(Store, Writer), StoreError> {
        let StoreOptions {
            track_calls,
            metrics,
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
        restrict_to_owner(&path)?;
        let mut conn = connect(&path, config.synchronous)?;
        migrate(&mut conn, &path)?;
        // Checkpoints run on their own thread, not inside a commit that requests wait for.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.pragma_update(None, "journal_size_limit", WAL_TARGET_BYTES as i64)?;
        let checkpointer = connect(&path, config.synchronous)?;
        // The writer signals each commit; the checkpointer sleeps while nothing is written.
        let (commit_signal, commits) = std::sync::mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpointer, &commits))
            .map_err(StoreError::Thread)?;

        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let wakers = Arc::new(Wakers::default());
        let writable = Arc::new(AtomicBool::new(true));
        let context = WriterContext {
            wakers: Arc::clone(&wakers),
            wal: wal_path(&path),
            writable: Arc::clone(&writable),
            metrics,
            commit_signal,
            limits: Limits {
                quarantine_max_bytes: config.quarantine_max_bytes,
            },
        };
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(conn, rx, &context))
            .map_err(StoreError::Thread)?;
        Ok((
            Store {
                tx,
                path,
                wakers,
                writable,
                track_calls,
            },
            Writer(handle),
        ))
    }

    /// Whether the last commit succeeded; a full disk shows here before a restart would.
    pub fn writable(&self) -> bool {
        // A writer that has stopped (it never should) cannot commit anything either.
        self.writable.load(Ordering::Relaxed) && !self.tx.is_closed()
    }

    /// The notification a sink's dispatcher waits on for new rows.
    pub fn waker(&self, sink: &str) -> Arc<Notify> {
        self.wakers.get(sink)
    }

    async fn submit<T>(
        &self,
        op: Op,
        rx: oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.tx.send(op).await.map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Stores `event` with one outbox row per sink in `sinks`, unless its dedup key is
    /// already stored. Returns after the commit is durable.
    ///
    /// A caller that stops waiting (its deadline passed) before the writer reaches this
    /// operation withdraws it: what we answered 503 for is then not stored either.
    pub async fn ingest(&self, event: Event, sinks: Vec<Arc<str>>) -> Result<Ingested, StoreError> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Ingest {
            track: self.track_calls,
            event: Box::new(event),
            sinks,
            outcome: Ingested::Duplicate,
            reply,
        };
        self.submit(op, rx).await
    }

    /// Keeps a signed body that is not a routable event: once per distinct body, and the
    /// oldest dropped first beyond `store.quarantine_max_bytes`, so replaying one captured
    /// request cannot fill the disk.
    pub async fn quarantine(&self, entry: Quarantined) -> Result<Kept, StoreError> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Quarantine {
            entry,
            outcome: Kept::default(),
            reply,
        };
        self.submit(op, rx).await
    }

    /// Prunes one id range (see [`PruneRange`]).
    pub async fn prune(&self, range: PruneRange) -> Result<Pruned, StoreError> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Prune {
            range,
            outcome: Pruned::default(),
            reply,
        };
        self.submit(op, rx).await
    }

    /// Records what polling a call found.
    pub async fn record_poll(&self, call_id: &str, update: PollUpdate) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Poll {
            call_id: call_id.to_owned(),
            update,
            reply,
        };
        self.submit(op, rx).await
    }

    /// Records the outcome of delivery attempts.
    pub async fn settle(&self, settlements: Vec<Settlement>) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Op::Settle { settlements, reply }, rx).await
    }

    /// A read connection of its own, for a dispatcher or a command.
    pub fn reader(&self) -> Result<Reader, StoreError> {
        let conn = Connection::open(&self.path).map_err(|source| StoreError::Open {
            path: self.path.clone(),
            source,
        })?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(Reader(Arc::new(Mutex::new(conn))))
    }
}

impl Op {
    /// The caller has stopped waiting for the answer.
    fn withdrawn(&self) -> bool {
        match self {
            Op::Ingest { reply, .. } => reply.is_closed(),
            Op::Quarantine { reply, .. } => reply.is_closed(),
            Op::Settle { reply, .. } | Op::Poll { reply, .. } => reply.is_closed(),
            Op::Prune { reply, .. } => reply.is_closed(),
        }
    }

    fn apply(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        now: i64,
        limits: &Limits,
    ) -> rusqlite::Result<()> {
        match self {
            Op::Ingest {
                event,
                sinks,
                track,
                outcome,
                ..
            } => {
                let inserted = tx
                    .prepare_cached(
                        "INSERT INTO events (dedup_key, event, call_id, source, received_at, payload)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (dedup_key) DO NOTHING",
                    )?
                    .execute(params![
                        event.dedup_key,
                        event.name,
                        event.call_id,
                        event.source.as_str(),
                        now,
                        &event.payload[..]
                    ])?;
                if inserted == 0 {
                    *outcome = Ingested::Duplicate;
                    return Ok(());
                }
                let event_id = tx.last_insert_rowid();
                let mut row = tx.prepare_cached(
                    "INSERT INTO outbox (event_id, sink, call_id, status, next_attempt_at, updated_at)
                     VALUES (?1, ?2, ?3, 'pending', ?4, ?4)",
                )?;
                for sink in sinks.iter() {
                    row.execute(params![event_id, &**sink, event.call_id, now])?;
                }
                if let (Some(wait), Some(call_id)) = (track, &event.call_id) {
                    track_call(tx, call_id, &event.name, event.source, now, *wait)?;
                }
                *outcome = Ingested::Stored {
                    deliveries: sinks.len(),
                };
                Ok(())
            }
            Op::Prune { range, outcome, .. } => {
                *outcome = prune(tx, range)?;
                Ok(())
            }
            Op::Poll {
                call_id, update, ..
            } => {
                match update {
                    PollUpdate::Again { at, result } => tx
                        .prepare_cached(
                            "UPDATE polls SET polls = polls + 1, next_poll_at = ?2, last_result = ?3, updated_at = ?4
                             WHERE call_id = ?1 AND status = 'waiting'",
                        )?
                        .execute(params![&*call_id, to_millis(*at), &*result, now])?,
                    PollUpdate::Finished { status, result } => tx
                        .prepare_cached(
                            "UPDATE polls SET polls = polls + 1, status = ?2, last_result = ?3, updated_at = ?4
                             WHERE call_id = ?1 AND status = 'waiting'",
                        )?
                        .execute(params![&*call_id, status.as_str(), &*result, now])?,
                };
                Ok(())
            }
            Op::Quarantine { entry, outcome, .. } => {
                *outcome = quarantine(tx, entry, now, limits.quarantine_max_bytes)?;
                Ok(())
            }
            Op::Settle { settlements, .. } => {
                for s in settlements.iter() {
                    match s {
                        Settlement::Delivered { id } => tx
                            .prepare_cached(
                                "UPDATE outbox SET status = 'delivered', attempts = attempts + 1,
                                 last_error = NULL, updated_at = ?2 WHERE id = ?1 AND status = 'pending'",
                            )?
                            .execute(params![id, now])?,
                        Settlement::Retry { id, at, error } => tx
                            .prepare_cached(
                                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?2,
                                 last_error = ?3, updated_at = ?4 WHERE id = ?1 AND status = 'pending'",
                            )?
                            .execute(params![id, to_millis(*at), error, now])?,
                        Settlement::Postpone { id, at, error } => tx
                            .prepare_cached(
                                "UPDATE outbox SET next_attempt_at = ?2, last_error = ?3, updated_at = ?4
                                 WHERE id = ?1 AND status = 'pending'",
                            )?
                            .execute(params![id, to_millis(*at), error, now])?,
                        Settlement::Dead { id, error } => tx
                            .prepare_cached(
                                "UPDATE outbox SET status = 'dead', attempts = attempts + 1,
                                 last_error = ?2, updated_at = ?3 WHERE id = ?1 AND status = 'pending'",
                            )?
                            .execute(params![id, error, now])?,
                    };
                }
                Ok(())
            }
        }
    }

    /// Answers the caller after the commit (or its failure). A caller that has gone away no
    /// longer needs the answer, so a failed send is ignored.
    fn answer(self, result: Result<(), StoreError>, woken: &mut HashSet<Arc<str>>) {
        match self {
            Op::Ingest {
                sinks,
                outcome,
                reply,
                ..
            } => {
                if result.is_ok() && outcome != Ingested::Duplicate {
                    woken.extend(sinks);
                }
                let _ = reply.send(result.map(|()| outcome));
            }
            Op::Quarantine { outcome, reply, .. } => {
                let _ = reply.send(result.map(|()| outcome));
            }
            Op::Settle { reply, .. } | Op::Poll { reply, .. } => {
                let _ = reply.send(result);
            }
            Op::Prune { outcome, reply, .. } => {
                let _ = reply.send(result.map(|()| outcome));
            }
        }
    }
}

/// Inserts a quarantined body unless the same bytes are kept already, then drops the
/// oldest bodies until the quarantine fits `max_bytes`.
fn quarantine(
    tx: &rusqlite::Transaction<'_>,
    entry: &Quarantined,
    now: i64,
    max_bytes: u64,
) -> rusqlite::Result<Kept> {
    let hash = Sha256::digest(&entry.body);
    let stored =
        tx.prepare_cached(
            "INSERT INTO quarantine (received_at, reason, event_header, body, body_hash)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (body_hash) DO NOTHING",
        )?
        .execute(params![
            now,
            entry.reason,
            entry.event_header,
            &entry.body[..],
            &hash[..]
        ])? > 0;
    let mut dropped = 0;
    if stored {
        let mut total: i64 = tx
            .prepare_cached("SELECT COALESCE(SUM(length(body)), 0) FROM quarantine")?
            .query_row([], |r| r.get(0))?;
        let limit = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let mut oldest = tx.prepare_cached(
            "DELETE FROM quarantine WHERE id = (SELECT MIN(id) FROM quarantine) RETURNING length(body)",
        )?;
        while total > limit {
            match oldest.query_row([], |r| r.get::<_, i64>(0)).optional()? {
                Some(freed) => {
                    total -= freed;
                    dropped += 1;
                }
                None => break,
            }
        }
    }
    Ok(Kept { stored, dropped })
}

/// Keeps a call's poll schedule in step with its events: `all_processing_completed` ends
/// it (whatever its source), any other event (re)starts the wait for the analysis.
fn track_call(
    tx: &rusqlite::Transaction<'_>,
    call_id: &str,
    event: &str,
    source: Source,
    now: i64,
    wait: Duration,
) -> rusqlite::Result<usize> {
    if event == crate::protocol::ALL_PROCESSING_COMPLETED {
        tx.prepare_cached(
            "INSERT INTO polls (call_id, status, first_seen_at, last_event_at, next_poll_at, last_result, updated_at)
             VALUES (?1, 'done', ?2, ?2, ?2, ?3, ?2)
             ON CONFLICT (call_id) DO UPDATE SET status = 'done', last_event_at = ?2, last_result = ?3, updated_at = ?2",
        )?
        .execute(params![call_id, now, format!("analysis received by {source}")])
    } else {
        let due = now.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
        tx.prepare_cached(
            "INSERT INTO polls (call_id, status, first_seen_at, last_event_at, next_poll_at, last_result, updated_at)
             VALUES (?1, 'waiting', ?2, ?2, ?3, 'waiting for the analysis webhook', ?2)
             ON CONFLICT (call_id) DO UPDATE SET last_event_at = ?2, updated_at = ?2,
                 next_poll_at = CASE WHEN status = 'waiting' THEN MAX(next_poll_at, ?3) ELSE next_poll_at END",
        )?
        .execute(params![call_id, now, due])
    }
}

/// Empties old payloads and deletes expired dedup keys in one id range, sparing every
/// event that still has a delivery pending or dead (its payload is needed to deliver or
/// replay it). Quarantined bodies go with the payloads, finished poll records with the keys.
fn prune(tx: &rusqlite::Transaction<'_>, range: &PruneRange) -> rusqlite::Result<Pruned> {
    let payloads_before = to_millis(range.payloads_before);
    let keys_before = to_millis(range.keys_before);
    let oldest: Option<i64> = tx
        .prepare_cached("SELECT MIN(received_at) FROM events WHERE id >= ?1 AND id < ?2")?
        .query_row(params![range.from, range.to], |r| r.get(0))?;
    let finished = "NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = events.id AND o.status != 'delivered')";
    let payloads = tx
        .prepare_cached(&format!(
            "UPDATE events SET payload = X'' WHERE id >= ?1 AND id < ?2 AND received_at < ?3
             AND length(payload) > 0 AND {finished}"
        ))?
        .execute(params![range.from, range.to, payloads_before])?;
    tx.prepare_cached(&format!(
        "DELETE FROM outbox WHERE event_id IN (
             SELECT id FROM events WHERE id >= ?1 AND id < ?2 AND received_at < ?3 AND {finished})"
    ))?
    .execute(params![range.from, range.to, keys_before])?;
    let events = tx
        .prepare_cached(
            "DELETE FROM events WHERE id >= ?1 AND id < ?2 AND received_at < ?3
             AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = events.id)",
        )?
        .execute(params![range.from, range.to, keys_before])?;
    tx.prepare_cached(
        "DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine WHERE received_at < ?1 ORDER BY id LIMIT 100)",
    )?
    .execute(params![payloads_before])?;
    tx.prepare_cached(
        "DELETE FROM polls WHERE call_id IN (
             SELECT call_id FROM polls WHERE status != 'waiting' AND updated_at < ?1 LIMIT 100)",
    )?
    .execute(params![keys_before])?;
    let next = tx
        .prepare_cached("SELECT MIN(id) FROM events WHERE id >= ?1")?
        .query_row(params![range.to], |r| r.get(0))?;
    Ok(Pruned {
        payloads,
        events,
        reached_recent: oldest.is_some_and(|t| t >= payloads_before),
        next,
    })
}

/// The writer's bounds that come from the config.
struct Limits {
    quarantine_max_bytes: u64,
}

fn commit(conn: &mut Connection, ops: &mut [Op], limits: &Limits) -> rusqlite::Result<()> {
    let now = to_millis(now());
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Checked once the write lock is ours, which can take a while when another process
    // holds it: a caller that has since answered 503 must not see its event stored.
    for op in ops.iter_mut().filter(|op| !op.withdrawn()) {
        op.apply(&tx, now, limits)?;
    }
    tx.commit()
}

fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// Copies committed WAL frames into the database file, at most every
/// [`CHECKPOINT_INTERVAL`] and only after commits, concurrently with the writer, until
/// the writer thread ends.
///
/// Checkpointing inside a commit (SQLite's default) stalls every request waiting on that
/// commit for as long as the random page writes and the database fsync take: tens of
/// milliseconds on a large store. Here the writer only finishes the job: a checkpoint on
/// another connection cannot restart the log while commits keep arriving, so once the WAL
/// passes [`WAL_TARGET_BYTES`] the writer checkpoints between two groups, which copies only
/// the frames written since this thread's last pass, and the next transaction restarts
/// the log.
fn checkpoint_loop(conn: &Connection, commits: &std::sync::mpsc::Receiver<()>) {
    // Ends when the writer, the only sender, has ended.
    while commits.recv().is_ok() {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "background checkpoint failed");
        }
        std::thread::sleep(CHECKPOINT_INTERVAL);
    }
}

/// Keeps the WAL near `target` bytes: past it, a checkpoint lets the log restart; past
/// `limit`, the log is truncated outright.
fn limit_wal(conn: &Connection, wal: &Path, target: u64, limit: u64) {
    let size = std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0);
    if size <= target {
        return;
    }
    let mode = if size > limit { "TRUNCATE" } else { "PASSIVE" };
    match conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        r.get::<_, i64>(0)
    }) {
        Ok(0) => tracing::debug!(mode, size, "WAL checkpointed by the writer"),
        Ok(_) => tracing::debug!(mode, "WAL checkpoint postponed: readers are still using it"),
        Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
    }
}

/// What the writer thread shares with the rest of the store.
struct WriterContext {
    wakers: Arc<Wakers>,
    wal: PathBuf,
    /// Whether the last commit succeeded (readiness).
    writable: Arc<AtomicBool>,
    metrics: Option<Arc<Metrics>>,
    /// Tells the checkpointer there is something to copy.
    commit_signal: std::sync::mpsc::SyncSender<()>,
    limits: Limits,
}

fn write_loop(mut conn: Connection, mut rx: mpsc::Receiver<Op>, ctx: &WriterContext) {
    let WriterContext {
        wakers,
        wal,
        writable,
        metrics,
        commit_signal,
        limits,
    } = ctx;
    let mut group: Vec<Op> = Vec::with_capacity(MAX_GROUP);
    let mut woken = HashSet::new();
    let mut last_checkpoint = std::time::Instant::now();
    while let Some(first) = rx.blocking_recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        group.retain(|op| !op.withdrawn());
        if group.is_empty() {
            continue;
        }
        let started = std::time::Instant::now();
        let committed = commit(&mut conn, &mut group, limits);
        if let Some(m) = metrics {
            m.commit_latency.observe(started.elapsed().as_secs_f64());
        }
        match committed {
            Ok(()) => {
                writable.store(true, Ordering::Relaxed);
                for op in group.drain(..) {
                    op.answer(Ok(()), &mut woken);
                }
            }
            Err(e) if group.len() > 1 => {
                // One operation's failure must not fail its neighbours: retry each alone.
                tracing::warn!(error = %e, ops = group.len(), "group commit failed; retrying one by one");
                let mut any = false;
                for mut op in group.drain(..) {
                    let result = commit(&mut conn, std::slice::from_mut(&mut op), limits);
                    any |= result.is_ok();
                    op.answer(result.map_err(StoreError::from), &mut woken);
                }
                writable.store(any, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "store commit failed");
                writable.store(false, Ordering::Relaxed);
                if let Some(op) = group.pop() {
                    op.answer(Err(e.into()), &mut woken);
                }
            }
        }
        wakers.wake(&woken);
        woken.clear();
        // Full means a signal is already waiting: the checkpointer will come anyway.
        let _ = commit_signal.try_send(());
        if last_checkpoint.elapsed() >= WRITER_CHECKPOINT_EVERY {
            limit_wal(&conn, wal, WAL_TARGET_BYTES, WAL_LIMIT_BYTES);
            last_checkpoint = std::time::Instant::now();
        }
    }
}

/// An SQL condition: the events of `alias` belong to the call `call`. A call's events
/// are found through the dedup keys (`<call_id>:<event>`), whose index is needed anyway,
/// so no index on `call_id` has to be written at random for every event.
pub fn same_call(alias: &str, call: &str) -> String {
    format!(
        "{alias}.dedup_key >= {call} || ':' AND {alias}.dedup_key < {call} || ';' AND {alias}.call_id = {call}"
    )
}

/// A read-only view for queries, with a connection of its own.
#[derive(Clone)]
pub struct Reader(Arc<Mutex<Connection>>);

impl Reader {
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = Arc::clone(&self.0);
        Ok(tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&conn)
        })
        .await??)
    }

    /// Pending rows of `sink` that are due, oldest first, skipping `busy` (rows already
    /// being delivered) and rows whose call has an earlier row still pending on this sink:
    /// a call's events reach a sink in the order they were stored, while other calls go
    /// on. A dead row no longer holds its call's later rows back. Stops at `limit` rows or once `max_bytes` of payload are taken,
    /// so a batch's memory is bounded whatever the payload sizes.
    pub async fn due(
        &self,
        sink: &str,
        limit: usize,
        max_bytes: usize,
        busy: Vec<i64>,
    ) -> Result<Vec<Delivery>, StoreError> {
        let sink = sink.to_owned();
        let now = to_millis(now());
        self.with(move |conn| {
            let busy: HashSet<i64> = busy.into_iter().collect();
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT o.id, o.attempts, e.event, e.call_id, e.dedup_key, e.source, e.received_at, e.payload
                 FROM outbox o JOIN events e ON e.id = o.event_id
                 WHERE o.sink = ?1 AND o.status = 'pending' AND o.next_attempt_at <= ?2
                   AND NOT EXISTS (
                       -- CROSS JOIN keeps this order: the call's few events by key, then
                       -- their rows; the other way round would scan every pending row.
                       SELECT 1 FROM events pe CROSS JOIN outbox po
                       WHERE po.event_id = pe.id AND e.call_id IS NOT NULL AND {same_call}
                         AND pe.id < e.id AND po.sink = o.sink AND po.status = 'pending')
                 ORDER BY o.next_attempt_at, o.id LIMIT ?3",
                same_call = same_call("pe", "e.call_id"),
            ))?;
            let fetch = i64::try_from(limit + busy.len()).unwrap_or(i64::MAX);
            let mut rows = stmt.query(params![sink, now, fetch])?;
            let mut out = Vec::new();
            let mut bytes = 0usize;
            while let Some(row) = rows.next()? {
                let id: i64 = row.get(0)?;
                if busy.contains(&id) {
                    continue;
                }
                let payload: Vec<u8> = row.get(7)?;
                bytes += payload.len();
                let source: String = row.get(5)?;
                out.push(Delivery {
                    id,
                    attempts: row.get(1)?,
                    event: row.get(2)?,
                    call_id: row.get(3)?,
                    dedup_key: row.get(4)?,
                    source: Source::parse(&source).unwrap_or(Source::Webhook),
                    received_at: from_millis(row.get(6)?),
                    payload: Bytes::from(payload),
                });
                if out.len() >= limit || bytes >= max_bytes {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    /// Pending and dead counts and the oldest pending event, per sink with any.
    pub async fn outbox_stats(&self) -> Result<Vec<SinkStats>, StoreError> {
        self.with(|conn| {
            let mut out: Vec<SinkStats> = Vec::new();
            let mut pending = conn.prepare_cached(
                "SELECT sink, COUNT(*), MIN(id) FROM outbox WHERE status = 'pending' GROUP BY sink",
            )?;
            let rows = pending.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))?;
            let mut received = conn.prepare_cached(
                "SELECT e.received_at FROM outbox o JOIN events e ON e.id = o.event_id WHERE o.id = ?1",
            )?;
            for row in rows {
                let (sink, count, oldest_id) = row?;
                let oldest = received
                    .query_row(params![oldest_id], |r| r.get::<_, i64>(0))
                    .optional()?
                    .map(from_millis);
                out.push(SinkStats {
                    sink,
                    pending: count,
                    dead: 0,
                    oldest_pending: oldest,
                });
            }
            let mut dead = conn.prepare_cached("SELECT sink, COUNT(*) FROM outbox WHERE status = 'dead' GROUP BY sink")?;
            for row in dead.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
                let (sink, count) = row?;
                match out.iter_mut().find(|s| s.sink == sink) {
                    Some(s) => s.dead = count,
                    None => out.push(SinkStats {
                        sink,
                        pending: 0,
                        dead: count,
                        oldest_pending: None,
                    }),
                }
            }
            Ok(out)
        })
        .await
    }

    /// Bytes of quarantined bodies.
    pub async fn quarantine_bytes(&self) -> Result<i64, StoreError> {
        self.with(|conn| {
            conn.prepare_cached("SELECT COALESCE(SUM(length(body)), 0) FROM quarantine")?
                .query_row([], |r| r.get(0))
        })
        .await
    }

    /// Calls waiting for their analysis.
    pub async fn calls_waiting(&self) -> Result<i64, StoreError> {
        self.with(|conn| {
            conn.prepare_cached("SELECT COUNT(*) FROM polls WHERE status = 'waiting'")?
                .query_row([], |r| r.get(0))
        })
        .await
    }

    /// The lowest and highest event ids, if any event is stored.
    pub async fn event_id_range(&self) -> Result<Option<(i64, i64)>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached("SELECT MIN(id), MAX(id) FROM events")?
                .query_row([], |r| {
                    Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, Option<i64>>(1)?))
                })
                .map(|(lo, hi)| lo.zip(hi))
        })
        .await
    }

    /// Calls the poller should look at now, earliest first.
    pub async fn due_polls(&self, limit: usize) -> Result<Vec<TrackedCall>, StoreError> {
        let now = to_millis(now());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT call_id, first_seen_at, polls FROM polls
                 WHERE status = 'waiting' AND next_poll_at <= ?1 ORDER BY next_poll_at LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![now, limit], |r| {
                Ok(TrackedCall {
                    call_id: r.get(0)?,
                    first_seen_at: from_millis(r.get(1)?),
                    polls: r.get(2)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// When the next call is due for a poll, if any is waiting.
    pub async fn next_poll(&self) -> Result<Option<SystemTime>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached("SELECT MIN(next_poll_at) FROM polls WHERE status = 'waiting'")?
                .query_row([], |r| r.get::<_, Option<i64>>(0))
                .map(|v| v.map(from_millis))
        })
        .await
    }

    /// Whether an event with this dedup key is stored.
    pub async fn has_event(&self, dedup_key: &str) -> Result<bool, StoreError> {
        let key = dedup_key.to_owned();
        self.with(move |conn| {
            conn.prepare_cached("SELECT 1 FROM events WHERE dedup_key = ?1")?
                .query_row(params![key], |_| Ok(()))
                .optional()
                .map(|found| found.is_some())
        })
        .await
    }

    /// When the earliest pending row of `sink` that is not yet due at `after` becomes due.
    pub async fn next_due_after(
        &self,
        sink: &str,
        after: SystemTime,
    ) -> Result<Option<SystemTime>, StoreError> {
        let sink = sink.to_owned();
        let after = to_millis(after);
        self.with(move |conn| {
            conn.prepare_cached(
                "SELECT MIN(next_attempt_at) FROM outbox
                 WHERE sink = ?1 AND status = 'pending' AND next_attempt_at > ?2",
            )?
            .query_row(params![sink, after], |r| r.get::<_, Option<i64>>(0))
            .optional()
            .map(|v| v.flatten().map(from_millis))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;

    fn open(dir: &Path) -> (Store, Writer) {
        Store::open(
            &StoreConfig {
                path: dir.join("router.db"),
                synchronous: Synchronous::Full,
                retention: Duration::from_secs(3600),
                dedup_window: Duration::from_secs(7200),
                quarantine_max_bytes: 1000,
            },
            StoreOptions::default(),
        )
        .expect("store opens")
    }

    fn event(call: &str, name: &str) -> Event {
        let body = format!(r#"{{"event":"{name}","call_id":"{call}"}}"#);
        Event::from_webhook(None, Bytes::from(body)).expect("valid event")
    }

    fn sinks(names: &[&str]) -> Vec<Arc<str>> {
        names.iter().map(|n| Arc::from(*n)).collect()
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    }

    #[tokio::test]
    async fn the_database_its_journal_files_and_new_directories_are_private_to_the_owner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _writer) = open(&dir.path().join("data/store"));
        store
            .ingest(event("c1", "call_started"), sinks(&["a"]))
            .await
            .expect("stored");
        let db = dir.path().join("data/store/router.db");
        for file in [
            db.clone(),
            with_suffix(&db, "-wal"),
            with_suffix(&db, "-shm"),
        ] {
            assert_eq!(mode(&file), 0o600, "{}", file.display());
        }
        for created in ["data", "data/store"] {
            assert_eq!(mode(&dir.path().join(created)), 0o700, "{created}");
        }
    }

    #[test]
    fn an_existing_database_readable_by_others_is_restricted_and_its_directory_left_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).expect("mkdir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let db = shared.join("router.db");
        // As a crash leaves them: a connection never closed keeps its -wal and -shm.
        let crashed = Connection::open(&db).expect("sqlite");
        crashed
            .execute_batch(
                "PRAGMA journal_mode = WAL; CREATE TABLE t (x); INSERT INTO t VALUES (1);",
            )
            .expect("written");
        std::mem::forget(crashed);
        let files = [
            db.clone(),
            with_suffix(&db, "-wal"),
            with_suffix(&db, "-shm"),
        ];
        for file in &files {
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        let (_store, _writer) = open(&shared);
        for file in &files {
            assert_eq!(mode(file), 0o600, "{}", file.display());
        }
        assert_eq!(mode(&shared), 0o755, "an existing directory keeps its mode");
    }

    #[tokio::test]
    async fn a_new_event_is_stored_with_one_outbox_row_per_sink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _writer) = open(dir.path());
        let got = store
            .ingest(event("c1", "call_completed"), sinks(&["a", "b"]))
            .await;
        assert_eq!(got.expect("stored"), Ingested::Stored { deliveries: 2 });
        let reader = store.reader().expect("reader");
        assert_eq!(
            reader
                .due("a", 10, usize::MAX, vec![])
                .await
                .expect("due")
                .len(),
            1
        );
        assert_eq!(
            reader
                .due("b", 10, usize::MAX, vec![])
                .await
                .expect("due")
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn concurrent_copies_of_one_event_store_exactly_one_row() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _writer) = open(dir.path());
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .ingest(event("c1", "call_completed"), sinks(&["a"]))
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
        let reader = store.reader().expect("reader");
        assert_eq!(
            reader
                .due("a", 100, usize::MAX, vec![])
                .await
                .expect("due")
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn settled_rows_are_no_longer_due_and_retries_wait_for_their_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _writer) = open(dir.path());
        for call in ["c1", "c2", "c3"] {
            store
                .ingest(event(call, "call_started"), sinks(&["a"]))
                .await
                .expect("stored");
        }
        let reader = store.reader().expect("reader");
        let rows = reader.due("a", 10, usize::MAX, vec![]).await.expect("due");
        let later = now() + Duration::from_secs(3600);
        store
            .settle(vec![
                Settlement::Delivered { id: rows[0].id },
                Settlement::Retry {
                    id: rows[1].id,
                    at: later,
                    error: "boom".into(),
                },
                Settlement::Dead {
                    id: rows[2].id,
                    error: "gone".into(),
                },
            ])
            .await
            .expect("settled");
        assert!(
            reader
                .due("a", 10, usize::MAX, vec![])
                .await
                .expect("due")
                .is_empty()
        );
        let next = reader
            .next_due_after("a", now())
            .await
            .expect("next due")
            .expect("one pending");
        assert_eq!(to_millis(next), to_millis(later));
    }

    #[tokio::test]
    async fn busy_rows_are_skipped_and_batches_stop_at_the_byte_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _writer) = open(dir.path());
        for call in ["c1", "c2", "c3", "c4"] {
            store
                .ingest(event(call, "call_started"), sinks(&["a"]))
                .await
                .expect("stored");
        }
        let reader = store.reader().expect("reader");
        let all = reader.due("a", 10, usize::MAX, vec![]).await.expect("due");
        let rest = reader
            .due("a", 10, usize::MAX, vec![all[0].id])
            .await
            .expect("due");
        assert_eq!(rest.len(), 3);
        assert!(rest.iter().all(|d| d.id != all[0].id));
        let one = reader.due("a", 10, 1, vec![]).await.expect("due");
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn a_wal_past_its_limit_is_truncated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal.db");
        let conn = connect(&path, Synchronous::Normal).expect("connect");
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .expect("pragma");
        conn.execute_batch("CREATE TABLE t (b BLOB)")
            .expect("table");
        for _ in 0..100 {
            conn.execute("INSERT INTO t VALUES (zeroblob(10000))", [])
                .expect("insert");
        }
        let wal = wal_path(&path);
        let before = std::fs::metadata(&wal).expect("wal").len();
        assert!(before > 1_000_000, "{before}");
        limit_wal(&conn, &wal, 2 * before, 4 * before);
        assert_eq!(
            std::fs::metadata(&wal).expect("wal").len(),
            before,
            "under the target: untouched"
        );
        limit_wal(&conn, &wal, 500_000, 1_000_000);
        assert_eq!(std::fs::metadata(&wal).expect("wal").len(), 0);
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .expect("count");
        assert_eq!(rows, 100);
    }

    #[tokio::test]
    async fn a_later_event_of_a_call_waits_until_the_earlier_one_is_settled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _writer) = open(dir.path());
        store
            .ingest(event("c1", "call_completed"), sinks(&["a"]))
            .await
            .expect("stored");
        store
            .ingest(event("c1", "all_processing_completed"), sinks(&["a"]))
            .await
            .expect("stored");
        store
            .ingest(event("c2", "call_completed"), sinks(&["a"]))
            .await
            .expect("stored");
        let reader = store.reader().expect("reader");
        let due = reader.due("a", 10, usize::MAX, vec![]).await.expect("due");
        let keys: Vec<_> = due.iter().map(|d| d.dedup_key.as_str()).collect();
        assert_eq!(keys, ["c1:call_completed", "c2:call_completed"]);

        // Retrying still holds the later event back...
        let first = due[0].id;
        let retry = Settlement::Retry {
            id: first,
            at: now(),
            error: "down".into(),
        };
        store.settle(vec![retry]).await.expect("settled");
        let due = reader
            .due("a", 10, usize::MAX, vec![first])
            .await
            .expect("due");
        assert!(
            due.iter()
                .all(|d| d.dedup_key != "c1:all_processing_completed")
        );

        // ...a dead one no longer does.
        let dead = Settlement::Dead {
            id: first,
            error: "gone".into(),
        };
        store.settle(vec![dead]).await.expect("settled");
        let due = reader.due("a", 10, usize::MAX, vec![]).await.expect("due");
        assert!(
            due.iter()
                .any(|d| d.dedup_key == "c1:all_processing_completed")
        );
    }

    #[test]
    fn reopening_keeps_the_schema_and_the_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        {
            let (store, writer) = open(dir.path());
            rt.block_on(store.ingest(event("c1", "call_started"), sinks(&["a"])))
                .expect("stored");
            drop(store);
            writer.join();
        }
        let (store, _writer) = open(dir.path());
        let again = rt.block_on(store.ingest(event("c1", "call_started"), sinks(&["a"])));
        assert_eq!(again.expect("answered"), Ingested::Duplicate);
    }
}
