//! The running router: starts the store, sinks, dispatchers, poller and server; applies
//! reloads; and shuts down in order so that everything acknowledged is on disk.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{self, RateLimiter};
use crate::config::{Config, SinkConfig};
use crate::console::{self, Console};
use crate::dispatch::flow::Guarded;
use crate::dispatch::{Dispatcher, RetryPolicy};
use crate::feed::Feed;
use crate::history::{self, History};
use crate::live::{Live, LiveHandle};
use crate::metrics::Metrics;
use crate::poller::{Poller, PollerHealth};
use crate::routing::Router;
use crate::server::{self, ConnectionLimits, Surface};
use crate::sinks::{self, Sink};
use crate::store::{self, Role, Store, StoreError, StoreOptions};

/// The longest pause between pruning passes.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// How often the backlog gauges are read from the store.
const STATS_EVERY: Duration = Duration::from_secs(10);
/// The console's plots move a minute at a time.
const HISTORY_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sink(#[from] sinks::BuildError),
    #[error("the poller cannot start: {0}")]
    Api(#[from] api::ApiError),
    #[error(transparent)]
    Console(#[from] console::NoRandom),
}

/// A sink with its dispatcher running.
struct Running {
    fingerprint: String,
    sink: Arc<dyn Sink>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// The running sinks, by name. A reload restarts only the sinks whose table changed.
struct SinkSet {
    running: BTreeMap<String, Running>,
    store: Store,
    policy: RetryPolicy,
    metrics: Arc<Metrics>,
    /// Handed to every dispatcher: settlements for the console's live view.
    feed: Feed,
    drain: Duration,
}

impl SinkSet {
    /// Makes the running sinks match `configs`. Every new or changed sink is built first,
    /// so a sink that cannot be built changes nothing.
    async fn apply(&mut self, configs: &[SinkConfig]) -> Result<(), RunError> {
        let mut fresh = Vec::new();
        for config in configs {
            let unchanged = self
                .running
                .get(&config.name)
                .is_some_and(|r| r.fingerprint == config.fingerprint);
            if !unchanged {
                let sink = sinks::build(config, self.policy.backoff.max).await?;
                let sink = Guarded::wrap(sink, &config.flow, Arc::clone(&self.metrics));
                fresh.push((config, sink));
            }
        }
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(name, r)| {
                configs
                    .iter()
                    .find(|c| &c.name == *name)
                    .is_none_or(|c| c.fingerprint != r.fingerprint)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(old) = self.running.remove(&name) {
                tracing::info!(sink = %name, "stopping sink");
                Self::stop(old).await;
            }
        }
        for (config, sink) in fresh {
            let dispatcher = Dispatcher::new(
                Arc::clone(&sink),
                self.store.queue(&config.name),
                self.policy.clone(),
                config.redact.clone(),
                Arc::clone(&self.metrics),
                self.feed.clone(),
            );
            let stop = CancellationToken::new();
            self.metrics.sink_added(&config.name);
            let task = tokio::spawn(dispatcher.run(stop.clone(), self.drain));
            tracing::info!(sink = %config.name, "sink running");
            self.running.insert(
                config.name.clone(),
                Running {
                    fingerprint: config.fingerprint.clone(),
                    sink,
                    stop,
                    task,
                },
            );
        }
        Ok(())
    }

    fn sinks(&self) -> Vec<Arc<dyn Sink>> {
        self.running.values().map(|r| Arc::clone(&r.sink)).collect()
    }

    /// Lets the dispatcher finish its in-flight deliveries (up to its drain time), then
    /// closes the sink's connections.
    async fn stop(running: Running) {
        running.stop.cancel();
        if running.task.await.is_err() {
            tracing::error!(sink = running.sink.name(), "a dispatcher task failed");
        }
        running.sink.close().await;
    }

    async fn stop_all(&mut self) {
        let all = std::mem::take(&mut self.running);
        let stopping: Vec<_> = all
            .into_values()
            .map(|r| tokio::spawn(Self::stop(r)))
            .collect();
        for s in stopping {
            if s.await.is_err() {
                tracing::error!("a sink did not stop cleanly");
            }
        }
    }
}

fn live(config: &Config, sinks: &SinkSet) -> Live {
    Live {
        secrets: config.webhook.secrets.clone(),
        router: Router::new(&config.sinks),
        sinks: sinks.sinks(),
        max_event_age: config.webhook.max_event_age,
        max_clock_skew: config.webhook.max_clock_skew,
    }
}

/// Settings a reload cannot change in a running process.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let s = (&old.server, &new.server);
    if s.0.listen != s.1.listen {
        keys.push("server.listen");
    }
    if s.0.webhook_path != s.1.webhook_path {
        keys.push("server.webhook_path");
    }
    if s.0.max_body_bytes != s.1.max_body_bytes {
        keys.push("server.max_body_bytes");
    }
    if s.0.header_read_timeout != s.1.header_read_timeout || s.0.ack_timeout != s.1.ack_timeout {
        keys.push("server timeouts");
    }
    if s.0.max_connections != s.1.max_connections || s.0.shutdown_timeout != s.1.shutdown_timeout {
        keys.push("server limits");
    }
    // The store takes every one of its keys when it opens.
    if old.store != new.store {
        keys.push("[store]");
    }
    if old.api != new.api || old.poller != new.poller {
        keys.push("[api] / [poller]");
    }
    if old.delivery != new.delivery {
        keys.push("[delivery]");
    }
    if old.log != new.log {
        keys.push("[log]");
    }
    keys
}

/// The two sockets the router serves: the public one for webhooks, and the operator's.
pub struct Listeners {
    /// `server.listen`: the webhook path and `/healthz`.
    pub webhook: TcpListener,
    /// `admin.listen`: `/metrics`, `/readyz` and `/healthz`.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds both addresses of `config`.
    pub async fn bind(config: &Config) -> Result<Listeners, BindError> {
        let bind = |key: &'static str, addr: std::net::SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|error| BindError { key, addr, error })
        };
        Ok(Listeners {
            webhook: bind("server.listen", config.server.listen).await?,
            admin: bind("admin.listen", config.admin.listen).await?,
        })
    }
}

/// `error` is part of the message, not a `source`: printed with its chain (`{:#}`), the
/// reason would be said twice.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({key}): {error}")]
pub struct BindError {
    key: &'static str,
    addr: std::net::SocketAddr,
    error: std::io::Error,
}

/// Runs the router on `listeners` until `shutdown` completes. Each config received on
/// `reloads` replaces the secrets, sinks and filters for new events without dropping a
/// request. At shutdown: stop accepting and answer the requests in progress, stop the
/// poller, let dispatchers finish in-flight deliveries (what does not finish stays
/// pending), close sink connections, and let the store commit its last writes.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    mut reloads: mpsc::Receiver<Config>,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    metrics
        .quarantine_max_bytes
        .set(i64::try_from(config.store.quarantine_max_bytes).unwrap_or(i64::MAX));
    let options = StoreOptions {
        track_calls: config
            .poller
            .enabled
            .then_some(config.poller.wait_for_analysis),
        metrics: Some(Arc::clone(&metrics)),
        attempts_kept: config.delivery.attempts_kept,
    };
    let store = Store::open(&config.store, options).await?;
    let mut sinks = SinkSet {
        running: BTreeMap::new(),
        store: store.clone(),
        policy: RetryPolicy::from(&config.delivery),
        metrics: Arc::clone(&metrics),
        feed: Feed::default(),
        drain: config.server.shutdown_timeout,
    };
    sinks.apply(&config.sinks).await?;
    let live = LiveHandle::new(live(&config, &sinks));

    let stop = CancellationToken::new();
    let mut background = Vec::new();
    let mut poller_health = None;
    if config.poller.enabled {
        let limiter = Arc::new(RateLimiter::new(
            config.api.requests_per_minute,
            Duration::from_secs(60),
        ));
        let client =
            Arc::new(api::Client::new(&config.api, limiter)?.with_metrics(Arc::clone(&metrics)));
        let health = Arc::new(PollerHealth::default());
        metrics.poller_started();
        let poller = Poller::new(
            client,
            store.clone(),
            live.clone(),
            config.poller.clone(),
            Arc::clone(&health),
            Arc::clone(&metrics),
        );
        background.push(tokio::spawn(Arc::new(poller).supervised(stop.clone())));
        poller_health = Some(health);
    }
    background.push(tokio::spawn(refresh_backlog(
        Arc::clone(&metrics),
        store.clone(),
        live.clone(),
        stop.clone(),
    )));
    background.push(tokio::spawn(prune(
        store.clone(),
        config.store.retention,
        config.store.dedup_window,
        stop.clone(),
    )));
    let history = Arc::new(History::default());
    background.push(tokio::spawn(keep_history(
        Arc::clone(&metrics),
        Arc::clone(&history),
        live.clone(),
        stop.clone(),
    )));

    // One signal stops both listeners (and the console's live streams).
    let stop_serving = CancellationToken::new();
    let console = if config.admin.console {
        let parts = console::Parts {
            store: store.clone(),
            live: live.clone(),
            poller: poller_health.clone(),
            feed: sinks.feed.clone(),
            history,
            closing: stop_serving.clone(),
        };
        Some(Console::new(config.admin.token.clone(), parts)?)
    } else {
        None
    };
    let components = server::Components {
        store: store.clone(),
        live: live.clone(),
        poller: poller_health,
        metrics,
        console,
        feed: sinks.feed.clone(),
    };
    let state = Arc::new(server::State::new(&config, components));
    let Listeners { webhook, admin } = listeners;
    if let Ok(addr) = webhook.local_addr() {
        tracing::info!(%addr, path = %config.server.webhook_path, sinks = config.sinks.len(), "listening");
    }
    if let Ok(addr) = admin.local_addr() {
        tracing::info!(%addr, "admin listening");
    }
    let stopper = stop_serving.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.cancel();
    });
    let mut serving = tokio::spawn(server::serve(
        webhook,
        Surface::Public,
        Arc::clone(&state),
        ConnectionLimits::from_config(&config),
        stop_serving.clone().cancelled_owned(),
    ));
    let admin_serving = tokio::spawn(server::serve(
        admin,
        Surface::Admin,
        state,
        ConnectionLimits::admin(&config),
        stop_serving.cancelled_owned(),
    ));

    // Reloads are applied while the server keeps serving on its own task.
    let mut current = config;
    loop {
        tokio::select! {
            served = &mut serving => {
                if served.is_err() {
                    tracing::error!("the server task failed");
                }
                break;
            }
            Some(new) = reloads.recv() => {
                for key in needs_restart(&current, &new) {
                    tracing::warn!(key, "changed in the config, but takes effect only after a restart");
                }
                match sinks.apply(&new.sinks).await {
                    Ok(()) => {
                        live.replace(live_for_reload(&current, &new, &sinks));
                        tracing::info!(sinks = new.sinks.len(), "config reloaded");
                        current = new;
                    }
                    Err(e) => tracing::error!(error = %e, "reload failed; the running config stays"),
                }
            }
        }
    }

    if admin_serving.await.is_err() {
        tracing::error!("the admin server task failed");
    }
    tracing::debug!("stopped serving; stopping background tasks");
    stop.cancel();
    for task in background {
        if task.await.is_err() {
            tracing::error!("a background task failed");
        }
    }
    tracing::debug!("stopping sinks");
    sinks.stop_all().await;
    tracing::debug!("closing the store");
    // Commits the writes still queued, then closes the database.
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// The live settings after a reload: the new secrets, routes and sinks; the webhook
/// limits that need a restart keep their running values.
fn live_for_reload(current: &Config, new: &Config, sinks: &SinkSet) -> Live {
    let live = live(new, sinks);
    if current.store.dedup_window == new.store.dedup_window {
        return live;
    }
    // The running pruner keeps the old dedup window, which the running age and skew were
    // checked against: new ones could let a replay outlive its dedup key.
    Live {
        max_event_age: current.webhook.max_event_age,
        max_clock_skew: current.webhook.max_clock_skew,
        ..live
    }
}

/// Empties old payloads and expires old dedup keys, one pass at a time, on the process
/// that leads pruning.
async fn prune(store: Store, retention: Duration, dedup_window: Duration, stop: CancellationToken) {
    // Short retentions (tests, small disks) are honoured closely; long ones every 10 min.
    let every = (retention / 4).min(PRUNE_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match store.lead(Role::Pruner).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell who prunes; trying again later");
                continue;
            }
        }
        let now = store::now();
        let pass = tokio::select! {
            () = stop.cancelled() => return,
            pass = store.prune(now - retention, now - dedup_window) => pass,
        };
        match pass {
            Ok(p) if p.payloads + p.events > 0 => {
                tracing::info!(
                    payloads = p.payloads,
                    events = p.events,
                    "pruned old events"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning failed; trying again later"),
        }
    }
}

/// Samples the running totals into `history` once a minute until `stop`.
async fn keep_history(
    metrics: Arc<Metrics>,
    history: Arc<History>,
    live: LiveHandle,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(HISTORY_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        // Accepted, duplicates, and every refusal together.
        let mut kinds = [0u64; 3];
        for (outcome, total) in metrics.webhook_totals() {
            let kind = match outcome {
                "accepted" => 0,
                "duplicate" => 1,
                _ => 2,
            };
            kinds[kind] += total;
        }
        let mut totals: Vec<(String, u64)> = history::WEBHOOK_KINDS
            .iter()
            .zip(kinds)
            .map(|(kind, total)| (history::webhooks(kind), total))
            .collect();
        for sink in live.sink_names() {
            for outcome in history::SINK_OUTCOMES {
                let total = metrics.delivery_total(&sink, outcome);
                totals.push((history::sink(&sink, outcome), total));
            }
        }
        history.sample(totals);
    }
}

/// Keeps the backlog gauges fresh until `stop`: read from the store every
/// [`STATS_EVERY`], so a scrape never runs a query.
async fn refresh_backlog(
    metrics: Arc<Metrics>,
    store: Store,
    live: LiveHandle,
    stop: CancellationToken,
) {
    loop {
        match store.stats().await {
            Ok(stats) => {
                let now = std::time::SystemTime::now();
                metrics.set_backlogs(live.sink_names().into_iter().map(|sink| {
                    let s = stats.sinks.iter().find(|s| s.sink == sink);
                    let age = s
                        .and_then(|s| s.oldest_pending)
                        .and_then(|at| now.duration_since(at).ok())
                        .unwrap_or_default();
                    let (pending, dead) = s.map_or((0, 0), |s| (s.pending, s.dead));
                    (sink, pending, dead, age)
                }));
                metrics.calls_tracked.set(stats.calls_waiting);
                metrics.set_quarantine_bytes(stats.quarantine_bytes);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the backlog figures"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(STATS_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with_api_key(key: &str) -> Config {
        Config::from_toml(&format!(
            "[webhook]\nsecrets = [\"s\"]\n[api]\napi_key = \"{key}\"\n"
        ))
        .expect("valid config")
    }

    #[test]
    fn a_config_differing_only_in_the_api_key_needs_a_restart() {
        let old = config_with_api_key("vya_live_old");
        let new = config_with_api_key("vya_live_new");
        assert_eq!(needs_restart(&old, &new), ["[api] / [poller]"]);
    }

    #[test]
    fn any_store_key_changed_by_a_reload_needs_a_restart() {
        let with_store = |lines: &str| {
            Config::from_toml(&format!("[webhook]\nsecrets = [\"s\"]\n[store]\n{lines}\n"))
                .expect("valid config")
        };
        let old = with_store("");
        for changed in [
            "commit_interval = \"5ms\"",
            "quarantine_max_bytes = 2000000",
            "retention = \"1d\"",
        ] {
            assert_eq!(
                needs_restart(&old, &with_store(changed)),
                ["[store]"],
                "{changed}"
            );
        }
    }

    #[test]
    fn an_identical_config_needs_no_restart() {
        let old = config_with_api_key("vya_live_old");
        let new = config_with_api_key("vya_live_old");
        assert_eq!(needs_restart(&old, &new), Vec::<&str>::new());
    }
}
