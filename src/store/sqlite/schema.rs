//! SQLite's schema and connections: versioned migrations, the pragmas every connection
//! gets, and the file modes that keep the database private to its owner.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::dedup;
use crate::config::Synchronous;
use crate::store::StoreError;

/// How long a statement waits for a lock held by another process (an operator command)
/// before failing; the caller's own deadline is usually shorter.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema versions 1 to 4, applied in order; `PRAGMA user_version` records how many ran.
/// Version 5 is [`to_event_log`], version 6 [`to_runs`], version 7 [`V7`], version 8 [`V8`],
/// version 9 [`V9`].
pub(super) const MIGRATIONS: &[&str] = &[
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

/// The page size of a new database. A commit writes each page it touched whole, to the
/// WAL and again at the checkpoint: smaller pages write less per event. Measured with the
/// dedup index as a B-tree in the log (schema version 5, which put each key in a random
/// page), `scripts/bytes-per-event.sh`, one file sink: 10,176 bytes written per event
/// with 4096-byte pages, 8,684 with 2048, 8,631 with 1024.
const PAGE_SIZE: i64 = 1024;

pub(super) fn connect(path: &Path, synchronous: Synchronous) -> Result<Connection, StoreError> {
    let open_err = |source: rusqlite::Error| StoreError::Open {
        path: path.to_owned(),
        source: Box::new(source),
    };
    let conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    // Only a new database takes it (before its first table, and before WAL mode); an
    // existing one keeps the size it was created with.
    conn.pragma_update(None, "page_size", PAGE_SIZE)
        .map_err(open_err)?;
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
pub(super) fn restrict_to_owner(db: &Path) -> Result<(), StoreError> {
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

/// Version 7: sinks waiting for their destination, with why, for `deliveries list` (the
/// deliveries themselves use no attempt while they wait, so their rows show nothing);
/// and `outbox` shows a row waiting for an earlier event of its call (its
/// `next_attempt_at` is `waiting::WAITING`, no time) as due when it was received.
const V7: &str = "
CREATE TABLE pauses (
    sink     TEXT    PRIMARY KEY,
    until_ms INTEGER NOT NULL,
    reason   TEXT    NOT NULL
) WITHOUT ROWID;

DROP VIEW outbox;
CREATE VIEW outbox AS
SELECT e.id AS event_id, c.sink AS sink, e.call_id AS call_id,
       CASE WHEN r.status IS NOT NULL THEN r.status
            WHEN e.id > c.position THEN 'pending' ELSE 'delivered' END AS status,
       COALESCE(r.attempts, CASE WHEN e.id > c.position THEN 0 ELSE 1 END) AS attempts,
       CASE WHEN r.next_attempt_at IS NULL OR r.next_attempt_at = 9223372036854775807
            THEN e.received_at ELSE r.next_attempt_at END AS next_attempt_at,
       r.last_error AS last_error,
       COALESCE(r.updated_at, e.received_at) AS updated_at
FROM events e
JOIN cursors c ON instr(e.sinks, ',' || c.sink || ',') > 0
LEFT JOIN retries r ON r.sink = c.sink AND r.event_id = e.id;";
// The view above spells `waiting::WAITING` out.
const _: () = assert!(super::waiting::WAITING == 9_223_372_036_854_775_807);

/// Version 8: each delivery's attempts, for `events show` and the console: failures
/// (and the success that ends them, or every success with `delivery.record_successes`),
/// at most `delivery.attempts_kept` per delivery, deleted with the event's payload.
const V8: &str = "
CREATE TABLE attempts (
    id          INTEGER PRIMARY KEY,
    event_id    INTEGER NOT NULL,
    sink        TEXT    NOT NULL,
    number      INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    outcome     TEXT    NOT NULL,
    code        INTEGER,
    error       TEXT,
    response    TEXT
);
CREATE INDEX attempts_by_delivery ON attempts (event_id, sink, id);";

/// Version 9: dead rows indexed by event id, per sink and for every sink, so the dead
/// letters are listed newest first a page at a time, without reading and sorting them all.
const V9: &str = "
DROP INDEX retries_dead;
CREATE INDEX retries_dead ON retries (sink, event_id) WHERE status = 'dead';
CREATE INDEX retries_dead_all ON retries (event_id) WHERE status = 'dead';";

/// The versions after the event log and the dedup runs, in order.
const LATER: [&str; 3] = [V7, V8, V9];

/// The schema versions this build knows.
const VERSIONS: usize = MIGRATIONS.len() + 2 + LATER.len();

pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    migrate_to(conn, path, VERSIONS)
}

/// For commands that must not change the store (operator commands, `store migrate`'s
/// source): it exists and is of this build's schema version. It is only read here: a
/// router of another build may be writing it, and migrating under it (version 6 drops the
/// index version 5 looks duplicates up with) would break it.
pub(in crate::store) fn check_version(path: &Path) -> Result<(), StoreError> {
    if !path.exists() {
        return Err(StoreError::Missing {
            path: path.to_owned(),
        });
    }
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|source| {
            StoreError::Open {
                path: path.to_owned(),
                source: Box::new(source),
            }
        })?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let store = format!("the store at {}", path.display());
    match usize::try_from(found) {
        Ok(VERSIONS) => Ok(()),
        Ok(0) => Err(StoreError::NoSchema {
            store,
            check: "store.path",
        }),
        _ => Err(StoreError::SchemaMismatch {
            store,
            found,
            current: VERSIONS,
        }),
    }
}

/// Applies the migrations up to schema version `target` (tests build old layouts with it).
pub(super) fn migrate_to(
    conn: &mut Connection,
    path: &Path,
    target: usize,
) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let applied = usize::try_from(version).unwrap_or(0);
    if applied > VERSIONS {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: version,
            known: VERSIONS,
        });
    }
    for next in applied..target.min(VERSIONS) {
        let migrate_err = |source: rusqlite::Error| StoreError::Migrate {
            path: path.to_owned(),
            version: next + 1,
            source: Box::new(source),
        };
        // A new store passes through the old layout empty: nothing to say.
        if next == MIGRATIONS.len() && applied > 0 {
            tracing::info!(path = %path.display(), "moving the store to the event log layout (once)");
        }
        if next == MIGRATIONS.len() + 1 && applied > 0 {
            tracing::info!(path = %path.display(), "moving the dedup index into runs (once)");
        }
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(migrate_err)?;
        match MIGRATIONS.get(next) {
            Some(sql) => tx.execute_batch(sql),
            None if next == MIGRATIONS.len() => to_event_log(&tx),
            None if next == MIGRATIONS.len() + 1 => to_runs(&tx),
            None => tx.execute_batch(LATER[next - MIGRATIONS.len() - 2]),
        }
        .map_err(migrate_err)?;
        let version = i64::try_from(next + 1).unwrap_or(i64::MAX);
        tx.pragma_update(None, "user_version", version)
            .map_err(migrate_err)?;
        tx.commit().map_err(migrate_err)?;
    }
    Ok(())
}

/// The event log layout (version 5). Events are appended to `events` once, with the sinks
/// routing chose for them; each sink keeps a cursor in `cursors` (every event up to it is
/// done for the sink: delivered, or recorded in `retries`); only deliveries that failed
/// (or were replayed) get a row of their own, in `retries`. Delivering an event therefore
/// writes nothing per event: the cursor moves once per batch. The dedup index holds a
/// 16-byte hash, not the text key. `outbox` is a view in the old shape, for people (and
/// tools) reading the database with SQL.
///
/// Existing data moves over: events keep their ids and payloads (codec 0, as signed);
/// each sink's cursor starts after the last event, and its pending and dead deliveries
/// become `retries` rows with their attempts, times and errors.
fn to_event_log(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(EVENT_LOG)?;
    {
        let mut read = tx.prepare(
            "SELECT e.id, e.dedup_key, e.event, e.call_id, e.source, e.received_at, e.payload,
                    COALESCE((SELECT ',' || group_concat(o.sink, ',') || ',' FROM outbox o
                              WHERE o.event_id = e.id), '')
             FROM events e ORDER BY e.id",
        )?;
        let mut write = tx.prepare(
            "INSERT INTO events_log (id, key, dedup_key, event, call_id, source, received_at,
                                     sinks, codec, payload)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, ?9)",
        )?;
        let mut rows = read.query([])?;
        while let Some(r) = rows.next()? {
            let dedup_key: String = r.get(1)?;
            write.execute(rusqlite::params![
                r.get::<_, i64>(0)?,
                &super::keys::key(&dedup_key)[..],
                dedup_key,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, String>(7)?,
                r.get::<_, Vec<u8>>(6)?,
            ])?;
        }
    }
    tx.execute_batch(
        "INSERT INTO cursors (sink, position)
             SELECT sink, (SELECT COALESCE(MAX(id), 0) FROM events) FROM outbox GROUP BY sink;
         INSERT INTO retries (sink, event_id, call_id, status, attempts, next_attempt_at,
                              last_error, updated_at)
             SELECT sink, event_id, call_id, status, attempts, next_attempt_at, last_error,
                    updated_at
             FROM outbox WHERE status IN ('pending', 'dead');
         DROP TABLE outbox;
         DROP TABLE events;
         ALTER TABLE events_log RENAME TO events;",
    )?;
    tx.execute_batch(EVENT_LOG_INDEXES)
}

const EVENT_LOG: &str = r#"
CREATE TABLE events_log (
    id          INTEGER PRIMARY KEY,  -- appended: ids only grow
    key         BLOB    NOT NULL,     -- 16 bytes: see `key`; not unique, the text decides
    dedup_key   TEXT    NOT NULL,
    event       TEXT    NOT NULL,
    call_id     TEXT,
    source      TEXT    NOT NULL,
    received_at INTEGER NOT NULL,     -- milliseconds since the Unix epoch
    sinks       TEXT    NOT NULL,     -- ',a,b,': where routing sent it when it was stored
    codec       INTEGER NOT NULL,     -- 0: the bytes as signed; 1: zstd of them
    payload     BLOB    NOT NULL
);

-- Every event up to `position` is done for the sink: delivered, or in `retries`.
CREATE TABLE cursors (
    sink     TEXT    PRIMARY KEY,
    position INTEGER NOT NULL
) WITHOUT ROWID;

-- Deliveries that failed at least once (or were replayed): their retry state, kept
-- once delivered too (with the attempts it took) until the event is pruned.
CREATE TABLE retries (
    sink            TEXT    NOT NULL,
    event_id        INTEGER NOT NULL,
    call_id         TEXT,
    status          TEXT    NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (sink, event_id)
) WITHOUT ROWID;
CREATE INDEX retries_due ON retries (sink, next_attempt_at) WHERE status = 'pending';
CREATE INDEX retries_call ON retries (sink, call_id, event_id) WHERE status = 'pending';
CREATE INDEX retries_dead ON retries (sink) WHERE status = 'dead';
"#;

const EVENT_LOG_INDEXES: &str = r#"
CREATE INDEX events_key ON events (key);

-- The old shape, computed: one row per event and sink.
CREATE VIEW outbox AS
SELECT e.id AS event_id, c.sink AS sink, e.call_id AS call_id,
       CASE WHEN r.status IS NOT NULL THEN r.status
            WHEN e.id > c.position THEN 'pending' ELSE 'delivered' END AS status,
       COALESCE(r.attempts, CASE WHEN e.id > c.position THEN 0 ELSE 1 END) AS attempts,
       COALESCE(r.next_attempt_at, e.received_at) AS next_attempt_at,
       r.last_error AS last_error,
       COALESCE(r.updated_at, e.received_at) AS updated_at
FROM events e
JOIN cursors c ON instr(e.sinks, ',' || c.sink || ',') > 0
LEFT JOIN retries r ON r.sink = c.sink AND r.event_id = e.id;
"#;

/// The dedup index in runs (version 6, see `dedup`): the keys of existing events move
/// from the `events_key` B-tree into runs of [`dedup::RUN_SIZE`] events each; the keys of
/// a last, partial run stay in the log, from which the writer reads them into memory.
fn to_runs(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        r#"
-- One row per run: the keys of the events with ids in first..=last are in `dedup`.
CREATE TABLE dedup_runs (
    last  INTEGER PRIMARY KEY,
    first INTEGER NOT NULL
);
CREATE TABLE dedup (
    run INTEGER NOT NULL,   -- dedup_runs.last
    key BLOB    NOT NULL,   -- events.key
    id  INTEGER NOT NULL,   -- events.id
    PRIMARY KEY (run, key, id)
) WITHOUT ROWID;
DROP INDEX events_key;
"#,
    )?;
    let mut read = tx.prepare("SELECT key, id FROM events ORDER BY id")?;
    let mut rows = read.query([])?;
    let mut run = std::collections::BTreeSet::new();
    let mut first = 1;
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(1)?;
        run.insert((r.get::<_, dedup::Key>(0)?, id));
        if run.len() == dedup::RUN_SIZE {
            dedup::write_keys(tx, id, run.iter())?;
            dedup::finish_run(tx, first, id)?;
            run.clear();
            first = id + 1;
        }
    }
    Ok(())
}

pub(super) fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// A connection for reads (and an operator's writes), waiting on locks like the writer.
pub(super) fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_of_version_5_is_refused_unread_and_stays_at_version_5() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("router.db");
        let mut conn = connect(&path, Synchronous::Normal).expect("connect");
        migrate_to(&mut conn, &path, 5).expect("version 5");
        drop(conn);

        let e = check_version(&path).expect_err("version 5 is refused");
        assert!(
            matches!(
                e,
                StoreError::SchemaMismatch {
                    found: 5,
                    current: 9,
                    ..
                }
            ),
            "{e}"
        );
        let conn = open_reader(&path).expect("open");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, 5);
        // The index the writer of version 5 looks duplicates up with is still there.
        let index: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'events_key'",
                [],
                |r| r.get(0),
            )
            .expect("index");
        assert_eq!(index, 1);

        migrate(
            &mut connect(&path, Synchronous::Normal).expect("connect"),
            &path,
        )
        .expect("migrated");
        check_version(&path).expect("this build's version");
    }

    #[test]
    fn a_missing_or_empty_store_is_named_with_what_creates_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("router.db");
        assert!(matches!(
            check_version(&path),
            Err(StoreError::Missing { .. })
        ));
        std::fs::write(&path, b"").expect("an empty file");
        let e = check_version(&path).expect_err("no tables");
        assert!(e.to_string().contains("vyora-router serve"), "{e}");
    }
}
