//! PostgreSQL's schema: the router's tables live in a schema of their own (`store.schema`,
//! `vyora_router` by default), never among another application's in `public`.
//!
//! `serve` applies versioned migrations at start inside one transaction that holds a
//! transaction-scoped advisory lock, so replicas starting together apply each version
//! once (and the lock works through PgBouncer's transaction pooling). Operator commands
//! only [`check`] the version: a command of a newer build must not change the tables
//! under the older replicas still writing them.

use deadpool_postgres::{Client, Transaction};

use crate::config::PostgresConfig;
use crate::store::StoreError;

/// Serializes migrations across replicas; any constant unlikely to collide will do.
const MIGRATION_LOCK: i64 = 0x7679_6f72_6130_0001;

/// Records the schema's version, in one row.
const VERSION_TABLE: &str = "vyora_router_schema";

/// The tables of version 1, which kept them in `public`.
const TABLES: &[&str] = &[
    "events",
    "deliveries",
    "quarantine",
    "polls",
    "leases",
    "api_requests",
    VERSION_TABLE,
];

/// Schema versions, applied in order; `{schema}` stands for the schema's quoted name.
/// Version 2 has no SQL of its own: it is [`move_from_public`], the same tables in a
/// schema of their own.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE {schema}.events (
    id          BIGSERIAL   PRIMARY KEY,
    dedup_key   TEXT        NOT NULL UNIQUE,
    event       TEXT        NOT NULL,
    call_id     TEXT,
    source      TEXT        NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    payload     BYTEA       NOT NULL   -- the exact bytes that were signed
);
-- A call's events, for ordering and the operator's `events show`.
CREATE INDEX events_by_call ON {schema}.events (call_id) WHERE call_id IS NOT NULL;
-- Pruning walks the events by age; appended to in time order, so cheap to keep.
CREATE INDEX events_received ON {schema}.events (received_at);

CREATE TABLE {schema}.deliveries (
    id              BIGSERIAL   PRIMARY KEY,
    event_id        BIGINT      NOT NULL REFERENCES {schema}.events (id) ON DELETE CASCADE,
    sink            TEXT        NOT NULL,
    call_id         TEXT,       -- copied from the event: per-call ordering is decided here
    status          TEXT        NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        INTEGER     NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    last_error      TEXT,
    updated_at      TIMESTAMPTZ NOT NULL,
    -- The claim: which replica holds the row, under which token, until when (the
    -- database's clock). An expired claim is free to take.
    lease_owner     TEXT,
    lease_token     BIGINT,
    lease_until     TIMESTAMPTZ
);
CREATE INDEX deliveries_due ON {schema}.deliveries (sink, next_attempt_at, id) WHERE status = 'pending';
CREATE INDEX deliveries_pending_call ON {schema}.deliveries (sink, call_id, event_id) WHERE status = 'pending';
CREATE INDEX deliveries_dead ON {schema}.deliveries (sink) WHERE status = 'dead';
CREATE INDEX deliveries_by_event ON {schema}.deliveries (event_id);

CREATE TABLE {schema}.quarantine (
    id           BIGSERIAL   PRIMARY KEY,
    received_at  TIMESTAMPTZ NOT NULL,
    reason       TEXT        NOT NULL,
    event_header TEXT,
    body         BYTEA       NOT NULL,
    body_hash    BYTEA       NOT NULL UNIQUE
);

CREATE TABLE {schema}.polls (
    call_id       TEXT        PRIMARY KEY,
    status        TEXT        NOT NULL CHECK (status IN ('waiting', 'done', 'gave_up', 'not_found')),
    first_seen_at TIMESTAMPTZ NOT NULL,
    last_event_at TIMESTAMPTZ NOT NULL,
    next_poll_at  TIMESTAMPTZ NOT NULL,
    polls         INTEGER     NOT NULL DEFAULT 0,
    last_result   TEXT,
    updated_at    TIMESTAMPTZ NOT NULL
);
CREATE INDEX polls_due ON {schema}.polls (next_poll_at) WHERE status = 'waiting';

-- Singletons (pruner, poller): who holds the role, until when. A row, not a session
-- advisory lock, so it survives PgBouncer's transaction pooling.
CREATE TABLE {schema}.leases (
    role   TEXT        PRIMARY KEY,
    holder TEXT        NOT NULL,
    until  TIMESTAMPTZ NOT NULL
);

-- Requests made to Vyora's API, so the rate limit holds across every replica.
CREATE TABLE {schema}.api_requests (
    at TIMESTAMPTZ NOT NULL
);
CREATE INDEX api_requests_at ON {schema}.api_requests (at);
"#,
    "",
    r#"
-- Sinks waiting for their destination, with why, for `deliveries list` (the deliveries
-- themselves use no attempt while they wait, so their rows show nothing).
CREATE TABLE {schema}.pauses (
    sink   TEXT        PRIMARY KEY,
    until  TIMESTAMPTZ NOT NULL,
    reason TEXT        NOT NULL
);
"#,
    r#"
-- Each delivery's attempts, for `events show` and the console: failures (and the success
-- that ends them, or every success with `delivery.record_successes`), at most
-- `delivery.attempts_kept` per delivery, deleted with the event's payload.
CREATE TABLE {schema}.attempts (
    id          BIGSERIAL   PRIMARY KEY,
    delivery_id BIGINT      NOT NULL REFERENCES {schema}.deliveries (id) ON DELETE CASCADE,
    number      INTEGER     NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL,
    duration_ms BIGINT      NOT NULL,
    outcome     TEXT        NOT NULL,
    code        INTEGER,
    error       TEXT,
    response    TEXT
);
CREATE INDEX attempts_by_delivery ON {schema}.attempts (delivery_id, id);
"#,
];

/// The schema version this build reads and writes.
pub(super) const VERSION: usize = MIGRATIONS.len();

/// `name` as an SQL identifier. `store.schema` was checked to be a plain lowercase
/// identifier, so quoting only keeps a reserved word (`user`, `order`) usable.
pub(super) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The version recorded in `schema`, if the router's tables are there.
async fn version_in(tx: &Transaction<'_>, schema: &str) -> Result<Option<i64>, StoreError> {
    let exists = tx
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = $1 AND tablename = $2",
            &[&schema, &VERSION_TABLE],
        )
        .await?
        .is_some();
    if !exists {
        return Ok(None);
    }
    let found: Option<i32> = tx
        .query_opt(
            &format!("SELECT version FROM {}.{VERSION_TABLE}", quote(schema)),
            &[],
        )
        .await?
        .map(|row| row.get(0));
    Ok(Some(i64::from(found.unwrap_or(0))))
}

/// The version of a database of the layout before this one, whose tables are in
/// `public`, if `schema` is not `public` itself and such tables are there. A version
/// from this layout on in `public` is the marker [`move_from_public`] leaves.
async fn version_in_public(tx: &Transaction<'_>, schema: &str) -> Result<Option<i64>, StoreError> {
    if schema == "public" {
        return Ok(None);
    }
    Ok(version_in(tx, "public").await?.filter(|v| *v < 2))
}

/// Creates or upgrades the schema; refuses a database migrated by a newer build.
pub(super) async fn migrate(client: &mut Client, schema: &str) -> Result<(), StoreError> {
    let quoted = quote(schema);
    let tx = client.transaction().await?;
    // Nothing here is worth a notice; tokio-postgres would log each at INFO.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let schema_exists = tx
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1",
            &[&schema],
        )
        .await?
        .is_some();
    // Checked first: a schema made by the database's owner needs no CREATE right here.
    if !schema_exists {
        tx.batch_execute(&format!("CREATE SCHEMA {quoted}")).await?;
    }
    let mut found = version_in(&tx, schema).await?;
    let mut moved = false;
    if found.is_none()
        && let Some(old) = version_in_public(&tx, schema).await?
    {
        move_from_public(&tx, schema).await?;
        found = Some(old);
        moved = true;
    }
    let applied = usize::try_from(found.unwrap_or(0)).unwrap_or(0);
    if applied > VERSION {
        return Err(StoreError::SchemaTooNew {
            found: found.unwrap_or(0),
            known: VERSION,
        });
    }
    if found.is_none() {
        tx.batch_execute(&format!(
            "CREATE TABLE {quoted}.{VERSION_TABLE} (version INTEGER NOT NULL);
             INSERT INTO {quoted}.{VERSION_TABLE} (version) VALUES (0)"
        ))
        .await?;
    }
    for sql in MIGRATIONS
        .iter()
        .skip(applied)
        .filter(|sql| !sql.is_empty())
    {
        tx.batch_execute(&sql.replace("{schema}", &quoted)).await?;
    }
    let version = i32::try_from(VERSION).unwrap_or(i32::MAX);
    tx.execute(
        &format!("UPDATE {quoted}.{VERSION_TABLE} SET version = $1"),
        &[&version],
    )
    .await?;
    tx.commit().await?;
    if moved {
        tracing::info!(
            schema,
            "moved the router's tables from the schema public into their own (once)"
        );
    }
    Ok(())
}

/// Version 2: moves the tables a version-1 database kept in `public` into `schema`, with
/// their rows, indexes and sequences. A router of the older build started afterwards
/// would find no tables in `public` and create an empty store there, deduplicating
/// against nothing: the version table left in `public` makes it refuse to start instead,
/// as it refuses any database newer than it knows.
async fn move_from_public(tx: &Transaction<'_>, schema: &str) -> Result<(), StoreError> {
    let quoted = quote(schema);
    for table in TABLES {
        let there = tx
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = 'public' AND tablename = $1",
                &[table],
            )
            .await?
            .is_some();
        if there {
            tx.batch_execute(&format!("ALTER TABLE public.{table} SET SCHEMA {quoted}"))
                .await?;
        }
    }
    let version = i32::try_from(VERSION).unwrap_or(i32::MAX);
    tx.batch_execute(&format!(
        "CREATE TABLE public.{VERSION_TABLE} (version INTEGER NOT NULL);
         INSERT INTO public.{VERSION_TABLE} (version) VALUES ({version})"
    ))
    .await?;
    Ok(())
}

/// For operator commands: the schema must be this build's version; nothing is created
/// or changed, so a command of another build never alters what running replicas use.
pub(super) async fn check(client: &mut Client, pg: &PostgresConfig) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    let found = match version_in(&tx, &pg.schema).await? {
        Some(found) => Some(found),
        None => version_in_public(&tx, &pg.schema).await?,
    };
    tx.rollback().await?;
    let store = format!(
        "the PostgreSQL database {} at {} (schema {})",
        pg.connection.get_dbname().unwrap_or("(default)"),
        pg.hosts(),
        pg.schema
    );
    match found {
        Some(found) if usize::try_from(found).ok() == Some(VERSION) => Ok(()),
        Some(found) => Err(StoreError::SchemaMismatch {
            store,
            found,
            current: VERSION,
        }),
        None => Err(StoreError::NoSchema {
            store,
            check: "store.url and store.schema",
        }),
    }
}
