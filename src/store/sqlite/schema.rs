//! SQLite's schema and connections: versioned migrations, the pragmas every connection
//! gets, and the file modes that keep the database private to its owner.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};

use crate::config::Synchronous;
use crate::store::StoreError;

/// How long a statement waits for a lock held by another process (an operator command)
/// before failing; the caller's own deadline is usually shorter.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

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

pub(super) fn connect(path: &Path, synchronous: Synchronous) -> Result<Connection, StoreError> {
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

pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
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

pub(super) fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// A connection for reads (and an operator's writes), waiting on locks like the writer.
pub(super) fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}
