//! PostgreSQL's schema: versioned migrations applied at start inside one transaction that
//! holds a transaction-scoped advisory lock, so replicas starting together apply each
//! version once (and the lock works through PgBouncer's transaction pooling).

use deadpool_postgres::Client;

use crate::store::StoreError;

/// Serializes migrations across replicas; any constant unlikely to collide will do.
const MIGRATION_LOCK: i64 = 0x7679_6f72_6130_0001;

/// Schema versions, applied in order; `vyora_router_schema` records how many ran.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE events (
    id          BIGSERIAL   PRIMARY KEY,
    dedup_key   TEXT        NOT NULL UNIQUE,
    event       TEXT        NOT NULL,
    call_id     TEXT,
    source      TEXT        NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    payload     BYTEA       NOT NULL   -- the exact bytes that were signed
);
-- A call's events, for ordering and the operator's `events show`.
CREATE INDEX events_by_call ON events (call_id) WHERE call_id IS NOT NULL;
-- Pruning walks the events by age; appended to in time order, so cheap to keep.
CREATE INDEX events_received ON events (received_at);

CREATE TABLE deliveries (
    id              BIGSERIAL   PRIMARY KEY,
    event_id        BIGINT      NOT NULL REFERENCES events (id) ON DELETE CASCADE,
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
CREATE INDEX deliveries_due ON deliveries (sink, next_attempt_at, id) WHERE status = 'pending';
CREATE INDEX deliveries_pending_call ON deliveries (sink, call_id, event_id) WHERE status = 'pending';
CREATE INDEX deliveries_dead ON deliveries (sink) WHERE status = 'dead';
CREATE INDEX deliveries_by_event ON deliveries (event_id);

CREATE TABLE quarantine (
    id           BIGSERIAL   PRIMARY KEY,
    received_at  TIMESTAMPTZ NOT NULL,
    reason       TEXT        NOT NULL,
    event_header TEXT,
    body         BYTEA       NOT NULL,
    body_hash    BYTEA       NOT NULL UNIQUE
);

CREATE TABLE polls (
    call_id       TEXT        PRIMARY KEY,
    status        TEXT        NOT NULL CHECK (status IN ('waiting', 'done', 'gave_up', 'not_found')),
    first_seen_at TIMESTAMPTZ NOT NULL,
    last_event_at TIMESTAMPTZ NOT NULL,
    next_poll_at  TIMESTAMPTZ NOT NULL,
    polls         INTEGER     NOT NULL DEFAULT 0,
    last_result   TEXT,
    updated_at    TIMESTAMPTZ NOT NULL
);
CREATE INDEX polls_due ON polls (next_poll_at) WHERE status = 'waiting';

-- Singletons (pruner, poller): who holds the role, until when. A row, not a session
-- advisory lock, so it survives PgBouncer's transaction pooling.
CREATE TABLE leases (
    role   TEXT        PRIMARY KEY,
    holder TEXT        NOT NULL,
    until  TIMESTAMPTZ NOT NULL
);

-- Requests made to Vyora's API, so the rate limit holds across every replica.
CREATE TABLE api_requests (
    at TIMESTAMPTZ NOT NULL
);
CREATE INDEX api_requests_at ON api_requests (at);
"#];

/// Creates or upgrades the schema; refuses a database migrated by a newer build.
pub(super) async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS vyora_router_schema (version INTEGER NOT NULL)")
        .await?;
    let found: Option<i32> = tx
        .query_opt("SELECT version FROM vyora_router_schema", &[])
        .await?
        .map(|row| row.get(0));
    let applied = usize::try_from(found.unwrap_or(0)).unwrap_or(0);
    if applied > MIGRATIONS.len() {
        return Err(StoreError::SchemaTooNew {
            found: i64::from(found.unwrap_or(0)),
            known: MIGRATIONS.len(),
        });
    }
    for sql in &MIGRATIONS[applied..] {
        tx.batch_execute(sql).await?;
    }
    let version = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
    if found.is_none() {
        tx.execute(
            "INSERT INTO vyora_router_schema (version) VALUES ($1)",
            &[&version],
        )
        .await?;
    } else {
        tx.execute("UPDATE vyora_router_schema SET version = $1", &[&version])
            .await?;
    }
    tx.commit().await?;
    Ok(())
}
