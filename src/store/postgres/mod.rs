//! The PostgreSQL store: one database that several replicas share, with the same
//! promises as SQLite across all of them. Dedup is the events table's unique key; every
//! replica dispatches, claiming deliveries under leases ([`claims`]); one replica at a
//! time prunes and polls, by a lease row; wake-ups travel by `LISTEN/NOTIFY`.

mod claims;
mod db;
mod import;
mod ingest;
mod listen;
mod pauses;
mod queries;
mod schema;
mod tls;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use crate::config::PostgresConfig;
use crate::event::{Delivery, DeliveryId, Event};
use crate::metrics::Metrics;
use crate::store::export::Export;
use crate::store::operator::{
    BackfillFrom, DeliveryRow, EventFilter, EventPage, EventRow, ListFilter, PollRow, Replay,
    Replayed, SinkPause, Stored,
};
use crate::store::wakers::Wakers;
use crate::store::{
    Attempt, BoxFuture, Ingest, Ingested, Kept, Maintenance, Operator, PollSchedule, PollUpdate,
    Pruned, Quarantined, Queues, Result, Role, Settlement, SinkQueue, Stats, StoreError,
    StoreOptions, TrackedCall,
};
use claims::Held;

/// Events waiting for a writer; callers beyond this wait for room (and time out).
const QUEUE_DEPTH: usize = 4096;
/// How long a request waits for a pooled connection before failing.
const POOL_WAIT: Duration = Duration::from_secs(5);
/// How long data sent to the database may go unacknowledged before the connection counts
/// as broken (`TCP_USER_TIMEOUT`), unless the URL says otherwise. A connection cut
/// silently (a dropped route, a failed-over address) would otherwise hold a commit, and
/// the webhooks waiting on it, for the kernel's retransmission limit: about 15 minutes.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle time before TCP keepalive probes, unless the URL says otherwise: an idle pooled
/// connection whose peer vanished is found in about a minute, not after two hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

pub(super) struct PostgresStore {
    db: Db,
    /// This process among the replicas: the holder of its claims and roles.
    owner: String,
    /// How long a claim or a role holds without renewal.
    lease: Duration,
    /// The ingest writers' queue; `None` tells a writer to stop.
    ingest: mpsc::Sender<Option<ingest::Op>>,
    /// Writers that store the queued events.
    writers: std::sync::Mutex<Vec<JoinHandle<()>>>,
    wakers: Arc<Wakers>,
    /// Whether the last commit succeeded (readiness).
    writable: Arc<AtomicBool>,
    /// The claims this replica holds, renewed by the heartbeat.
    held: Arc<Held>,
    /// The roles this replica holds, renewed by the heartbeat like its claims.
    roles: Arc<Roles>,
    quarantine_max_bytes: u64,
    metrics: Option<Arc<Metrics>>,
    /// Attempts kept in each delivery's history (`delivery.attempts_kept`).
    attempts_kept: usize,
    /// Stops the listener and the heartbeat.
    stop: CancellationToken,
}

use db::Db;
pub use import::Migrated;

/// The connection pool for `pg`, with rustls as its `sslmode` asks.
fn pool(pg: &PostgresConfig) -> Result<(Pool, tokio_postgres::Config, MakeRustlsConnect)> {
    let config = connection_config(pg);
    let tls = tls::connector(pg)?;
    let manager = Manager::from_config(
        config.clone(),
        tls.clone(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(pg.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(POOL_WAIT))
        .build()
        .map_err(|e| StoreError::Setup(e.to_string()))?;
    Ok((pool, config, tls))
}

/// `pg`'s connection settings, with timeouts that notice a vanished server where the URL
/// sets none.
fn connection_config(pg: &PostgresConfig) -> tokio_postgres::Config {
    let mut config = pg.connection.clone();
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    // Two hours is the library's default, so a URL that leaves it out.
    if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(KEEPALIVE_IDLE);
    }
    config
}

/// The database and the servers `url` names, for the log: never its user or password.
pub(super) fn location(pg: &PostgresConfig) -> String {
    let config = &pg.connection;
    let ports = config.get_ports();
    let servers: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                tokio_postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
                tokio_postgres::config::Host::Unix(dir) => format!("{}:{port}", dir.display()),
            }
        })
        .collect();
    // libpq's default database is the user's name, which is not ours to print.
    let database = config.get_dbname().unwrap_or("(the user's default)");
    format!(
        "PostgreSQL database {database}, schema {}, on {}",
        pg.schema,
        servers.join(", ")
    )
}

/// Fills the PostgreSQL database `to` names from another store's export, creating or
/// migrating its schema there.
pub(super) async fn import(from: &mut dyn Export, to: &PostgresConfig) -> Result<Migrated> {
    let (pool, _, _) = pool(to)?;
    let db = Db::new(pool, &to.schema);
    let mut client = db.get().await.map_err(|e| tls::connect_error(to, &e))?;
    schema::migrate(&mut client, &to.schema).await?;
    let migrated = import::from_export(from, &db, &mut client).await;
    db.pool.close();
    migrated
}

/// What opening does to the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Opening {
    /// `serve`: creates the schema, or brings it to this build's version.
    Migrate,
    /// Operator commands: the schema must be this build's version already; nothing is
    /// created or changed.
    Existing,
}

impl PostgresStore {
    /// Connects, migrates or checks the schema as `opening` says, and starts the writers,
    /// the listener and the heartbeat.
    pub(super) async fn open(
        pg: &PostgresConfig,
        lease: Duration,
        quarantine_max_bytes: u64,
        options: StoreOptions,
        opening: Opening,
    ) -> Result<PostgresStore> {
        let (pool, config, tls) = pool(pg)?;
        let db = Db::new(pool, &pg.schema);
        let mut client = db.get().await.map_err(|e| tls::connect_error(pg, &e))?;
        match opening {
            Opening::Migrate => {
                tls::warn_if_unchecked(pg);
                schema::migrate(&mut client, &pg.schema).await?;
            }
            Opening::Existing => schema::check(&mut client, pg).await?,
        }
        drop(client);

        let owner = format!(
            "{}-{}-{:08x}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "router".into()),
            std::process::id(),
            fastrand::u32(..)
        );
        let wakers = Arc::new(Wakers::default());
        let writable = Arc::new(AtomicBool::new(true));
        let held = Arc::new(Held::default());
        let roles = Arc::new(Roles::default());
        let stop = CancellationToken::new();
        let (ingest, queue) = mpsc::channel(QUEUE_DEPTH);
        let shared = Arc::new(ingest::Writers {
            db: db.clone(),
            queue: tokio::sync::Mutex::new(queue),
            wakers: Arc::clone(&wakers),
            writable: Arc::clone(&writable),
            track_calls: options.track_calls.map(|d| d.as_secs_f64()),
        });
        // A few transactions in flight at once keep the database busy while each waits
        // for its commit.
        let writers = (0..(pg.pool_size / 2).clamp(1, 4))
            .map(|_| tokio::spawn(ingest::run(Arc::clone(&shared))))
            .collect();
        tokio::spawn(listen::run(
            config,
            tls,
            Arc::clone(&db.channel),
            Arc::clone(&wakers),
            stop.clone(),
        ));
        tokio::spawn(heartbeat(
            db.clone(),
            Arc::clone(&held),
            Arc::clone(&roles),
            owner.clone(),
            lease,
            stop.clone(),
        ));
        Ok(PostgresStore {
            db,
            owner,
            lease,
            ingest,
            writers: std::sync::Mutex::new(writers),
            wakers,
            writable,
            held,
            roles,
            quarantine_max_bytes,
            metrics: options.metrics,
            attempts_kept: options.attempts_kept,
            stop,
        })
    }
}

/// The roles this replica last found itself holding.
#[derive(Default)]
struct Roles(std::sync::Mutex<BTreeSet<&'static str>>);

impl Roles {
    fn set(&self, role: &'static str, held: bool) {
        let mut roles = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if held {
            roles.insert(role);
        } else {
            roles.remove(role);
        }
    }

    fn all(&self) -> Vec<&'static str> {
        let roles = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        roles.iter().copied().collect()
    }
}

/// Renews this replica's claims and roles three times per lease, so only a replica that
/// stopped (or stalled past its lease) loses them.
///
/// A role is renewed here, and not only when its task next asks for it: the poller asks
/// between batches, and a batch can wait on the API budget far longer than a lease; had
/// its role lapsed meanwhile, another replica would poll the same calls at the same time.
async fn heartbeat(
    db: Db,
    held: Arc<Held>,
    roles: Arc<Roles>,
    owner: String,
    lease: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(lease / 3) => {}
        }
        if let Err(e) = claims::renew(&db, &held, lease).await {
            tracing::warn!(error = %e, "cannot renew this replica's claims");
        }
        let mine = roles.all();
        if mine.is_empty() {
            continue;
        }
        match queries::renew_roles(&db, &owner, &mine, lease).await {
            Ok(kept) => {
                // Taken over while this replica stalled past its lease: no longer ours.
                for role in mine.into_iter().filter(|r| !kept.iter().any(|k| k == r)) {
                    tracing::warn!(role, "another replica took this role over");
                    roles.set(role, false);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot renew this replica's roles"),
        }
    }
}

impl Ingest for PostgresStore {
    fn ingest(&self, event: Event, sinks: Vec<Arc<str>>) -> BoxFuture<'_, Result<Ingested>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            let op = ingest::Op {
                event,
                sinks,
                reply,
            };
            self.ingest
                .send(Some(op))
                .await
                .map_err(|_| StoreError::WriterGone)?;
            rx.await.map_err(|_| StoreError::WriterGone)?
        })
    }

    fn quarantine(&self, entry: Quarantined) -> BoxFuture<'_, Result<Kept>> {
        Box::pin(
            async move { queries::quarantine(&self.db, &entry, self.quarantine_max_bytes).await },
        )
    }

    fn unready(&self) -> Option<String> {
        if self.ingest.is_closed() {
            Some("the store's writers have stopped".into())
        } else if !self.writable.load(Ordering::Relaxed) {
            Some("the last commit failed (database unreachable?)".into())
        } else {
            None
        }
    }

    fn has_event<'a>(&'a self, dedup_key: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(queries::has_event(&self.db, dedup_key))
    }
}

impl Queues for PostgresStore {
    fn queue(self: Arc<Self>, sink: &str) -> Box<dyn SinkQueue> {
        Box::new(Queue {
            store: self,
            sink: sink.to_owned(),
        })
    }

    fn waker(&self, sink: &str) -> Arc<Notify> {
        self.wakers.get(sink)
    }
}

/// One sink's queue: leases in the shared database, so any number of them, in any
/// number of replicas, may claim from one sink at once.
struct Queue {
    store: Arc<PostgresStore>,
    sink: String,
}

impl SinkQueue for Queue {
    fn claim(&mut self, limit: usize, max_bytes: usize) -> BoxFuture<'_, Result<Vec<Delivery>>> {
        let s = &self.store;
        Box::pin(claims::claim(
            &s.db, &s.held, &s.owner, s.lease, &self.sink, limit, max_bytes,
        ))
    }

    fn settle(
        &mut self,
        settlements: Vec<Settlement>,
        attempts: Vec<Attempt>,
    ) -> BoxFuture<'_, Result<()>> {
        let s = &self.store;
        Box::pin(async move {
            let rejected =
                claims::settle(&s.db, &s.held, &settlements, &attempts, s.attempts_kept).await?;
            if rejected > 0 {
                tracing::warn!(
                    rejected,
                    "outcomes not recorded: another replica took these deliveries over after this one's claim expired"
                );
                if let Some(m) = &s.metrics {
                    m.settlements_rejected.inc_by(rejected);
                }
            }
            Ok(())
        })
    }

    fn release(&mut self, ids: Vec<DeliveryId>) {
        let (db, held) = (self.store.db.clone(), Arc::clone(&self.store.held));
        tokio::spawn(async move {
            if let Err(e) = claims::release(&db, &held, &ids).await {
                tracing::warn!(error = %e, "cannot release claims; they expire with their lease");
            }
        });
    }

    fn next_due(&mut self) -> BoxFuture<'_, Result<Option<SystemTime>>> {
        Box::pin(queries::next_due(&self.store.db, &self.sink))
    }

    fn waker(&self) -> Arc<Notify> {
        self.store.wakers.get(&self.sink)
    }

    fn record_pause<'a>(&'a mut self, pause: Option<&'a SinkPause>) -> BoxFuture<'a, Result<()>> {
        Box::pin(pauses::record(&self.store.db, &self.sink, pause))
    }
}

impl PollSchedule for PostgresStore {
    fn due_polls(&self, limit: usize) -> BoxFuture<'_, Result<Vec<TrackedCall>>> {
        Box::pin(queries::due_polls(&self.db, limit))
    }

    fn next_poll(&self) -> BoxFuture<'_, Result<Option<SystemTime>>> {
        Box::pin(queries::next_poll(&self.db))
    }

    fn record_poll<'a>(
        &'a self,
        call_id: &'a str,
        update: PollUpdate,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { queries::record_poll(&self.db, call_id, &update).await })
    }

    fn reserve_api_call(
        &self,
        limit: usize,
        window: Duration,
    ) -> BoxFuture<'_, Result<Option<Duration>>> {
        Box::pin(queries::reserve_api_call(&self.db, limit, window))
    }
}

impl Operator for PostgresStore {
    fn pauses(&self) -> BoxFuture<'_, Result<Vec<SinkPause>>> {
        Box::pin(pauses::list(&self.db))
    }

    fn list_deliveries<'a>(
        &'a self,
        filter: &'a ListFilter,
    ) -> BoxFuture<'a, Result<Vec<DeliveryRow>>> {
        Box::pin(queries::list_deliveries(&self.db, filter))
    }

    fn replay<'a>(&'a self, sink: &'a str, which: &'a Replay) -> BoxFuture<'a, Result<Replayed>> {
        Box::pin(queries::replay(&self.db, sink, which))
    }

    fn backfill_candidates<'a>(
        &'a self,
        sink: &'a str,
        from: &'a BackfillFrom,
    ) -> BoxFuture<'a, Result<Vec<Stored>>> {
        Box::pin(queries::backfill_candidates(&self.db, sink, from))
    }

    fn backfill<'a>(&'a self, sink: &'a str, ids: Vec<i64>) -> BoxFuture<'a, Result<usize>> {
        Box::pin(async move { queries::backfill(&self.db, sink, &ids).await })
    }

    fn list_events<'a>(&'a self, filter: &'a EventFilter) -> BoxFuture<'a, Result<EventPage>> {
        Box::pin(queries::list_events(&self.db, filter))
    }

    fn show_events<'a>(&'a self, call_id: &'a str) -> BoxFuture<'a, Result<Vec<EventRow>>> {
        Box::pin(queries::show_events(&self.db, call_id))
    }

    fn poll_status(&self, limit: usize) -> BoxFuture<'_, Result<Vec<PollRow>>> {
        Box::pin(queries::poll_status(&self.db, limit))
    }

    fn stats(&self) -> BoxFuture<'_, Result<Stats>> {
        Box::pin(queries::stats(&self.db))
    }
}

impl Maintenance for PostgresStore {
    fn lead(&self, role: Role) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let held = queries::lead(&self.db, &self.owner, role, self.lease).await?;
            self.roles.set(queries::role_name(role), held);
            Ok(held)
        })
    }

    fn prune(
        &self,
        payloads_before: SystemTime,
        keys_before: SystemTime,
    ) -> BoxFuture<'_, Result<Pruned>> {
        Box::pin(queries::prune(&self.db, payloads_before, keys_before))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // One stop per writer; each finishes what was queued before it.
            let writers = std::mem::take(
                &mut *self
                    .writers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            for _ in &writers {
                if self.ingest.send(None).await.is_err() {
                    break;
                }
            }
            for writer in writers {
                if writer.await.is_err() {
                    tracing::error!("a store writer failed");
                }
            }
            self.stop.cancel();
            // Whatever this replica still holds goes back now, not when its lease ends.
            if let Err(e) = claims::release_all(&self.db, &self.held).await {
                tracing::warn!(error = %e, "cannot release claims; they expire with their lease");
            }
            self.db.pool.close();
        })
    }
}

/// PostgreSQL's errors reach the rest of the crate as the store's, whole; a pool that
/// cannot hand out a connection is told apart (a write may then be retried alone).
impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> StoreError {
        StoreError::Database(Box::new(e))
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> StoreError {
        StoreError::NoConnection(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_without_timeouts_gets_ones_that_notice_a_vanished_server_and_its_own_are_kept() {
        let pg = |url: &str| PostgresConfig::from_url(url).expect("valid");
        let plain = connection_config(&pg("postgres://router@db/vyora"));
        assert_eq!(plain.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        assert_eq!(plain.get_keepalives_idle(), KEEPALIVE_IDLE);
        let own = connection_config(&pg(
            "postgres://router@db/vyora?tcp_user_timeout=3&keepalives_idle=600",
        ));
        assert_eq!(own.get_tcp_user_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(own.get_keepalives_idle(), Duration::from_secs(600));
    }

    #[test]
    fn the_location_names_the_database_and_servers_but_no_credentials() {
        let at = |url: &str| location(&PostgresConfig::from_url(url).expect("a valid URL"));
        let shown = at("postgres://router:pw-secret@db.example.com:6432/events?sslmode=require");
        assert_eq!(
            shown,
            "PostgreSQL database events, schema vyora_router, on db.example.com:6432"
        );
        let shown = at("host=a,b user=router password=pw-secret dbname=events");
        assert_eq!(
            shown,
            "PostgreSQL database events, schema vyora_router, on a:5432, b:5432"
        );
        let shown = at("postgres://alice:pw-secret@db");
        assert!(
            !shown.contains("alice") && !shown.contains("pw-secret"),
            "{shown}"
        );
    }
}
