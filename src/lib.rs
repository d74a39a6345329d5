//! vyora-router receives Vyora's call webhooks, proves each one genuine, stores it
//! durably, acknowledges it, and delivers it to the configured sinks in the background.
//!
//! The data flows one way:
//!
//! - [`server`]: HTTP accept loop, body limits, status codes. Verifies with [`signature`],
//!   reads the [`event`], asks [`routing`] which sinks want it, and hands both to the store.
//! - [`store`]: SQLite (WAL) with a single writer thread and group commit. An event and one
//!   outbox row per matching sink are committed together before the 200 goes out.
//! - [`dispatch`]: one dispatcher per sink claims due outbox rows, delivers them, and
//!   records delivered / retry-later / dead.
//! - [`sinks`]: the destinations behind one trait: a JSON Lines file, HTTP, RabbitMQ.
//! - [`poller`]: recovers analyses whose webhook never came, through [`api`] (Vyora's
//!   REST API, rate-limited), storing them like webhooks.
//! - [`config`] and [`cli`]: the TOML file, environment overrides and commands.

pub mod admin;
pub mod api;
pub mod cli;
pub mod config;
pub mod dispatch;
pub mod event;
pub mod net;
pub mod poller;
pub mod redact;
pub mod routing;
pub mod server;
pub mod signature;
pub mod sinks;
pub mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::RateLimiter;
use crate::config::Config;
use crate::dispatch::{Dispatcher, RetryPolicy};
use crate::poller::{Poller, PollerHealth};
use crate::routing::Router;
use crate::store::{Store, StoreError};

/// How long dispatchers get to finish in-flight deliveries at shutdown.
const DISPATCH_DRAIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sink(#[from] sinks::BuildError),
    #[error("the poller cannot start: {0}")]
    Api(#[from] api::ApiError),
}

/// Runs the router on `listener` until `shutdown` completes: serves webhooks, dispatches
/// to the sinks, then drains in order (requests first, then deliveries, then the store's
/// last commits), so everything acknowledged is on disk when this returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let track = config
        .poller
        .enabled
        .then_some(config.poller.wait_for_analysis);
    let (store, writer) = Store::open(&config.store, track)?;
    let policy = RetryPolicy::from(&config.delivery);
    let stop_dispatch = CancellationToken::new();
    let mut dispatchers = JoinSet::new();
    let mut built = Vec::with_capacity(config.sinks.len());
    for sink_config in &config.sinks {
        let sink = sinks::build(sink_config)?;
        built.push(Arc::clone(&sink));
        let dispatcher = Dispatcher::new(
            sink,
            store.clone(),
            policy.clone(),
            sink_config.redact.clone(),
        )?;
        dispatchers.spawn(dispatcher.run(stop_dispatch.clone(), DISPATCH_DRAIN));
    }

    let router = Arc::new(Router::new(&config.sinks));
    let stop_poller = CancellationToken::new();
    let mut poller_task = None;
    let mut poller_health = None;
    if config.poller.enabled {
        let limiter = Arc::new(RateLimiter::new(
            config.api.requests_per_minute,
            Duration::from_secs(60),
        ));
        let client = Arc::new(api::Client::new(&config.api, limiter)?);
        let health = Arc::new(PollerHealth::default());
        let poller = Poller::new(
            client,
            store.clone(),
            Arc::clone(&router),
            config.poller.clone(),
            Arc::clone(&health),
        )?;
        poller_task = Some(tokio::spawn(poller.run(stop_poller.clone())));
        poller_health = Some(health);
    }

    let components = server::Components {
        router,
        store: store.clone(),
        sinks: built.clone(),
        poller: poller_health,
    };
    let state = Arc::new(server::State::new(&config, components));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, path = %config.server.webhook_path, sinks = config.sinks.len(), "listening");
    }
    server::serve(
        listener,
        state,
        config.server.max_connections,
        config.server.header_read_timeout,
        shutdown,
    )
    .await;

    stop_poller.cancel();
    if let Some(task) = poller_task
        && task.await.is_err()
    {
        tracing::error!("the poller task failed");
    }
    stop_dispatch.cancel();
    while dispatchers.join_next().await.is_some() {}
    for sink in &built {
        sink.close().await;
    }
    drop(store);
    // The writer finishes the operations still queued, then closes the database.
    if tokio::task::spawn_blocking(move || writer.join())
        .await
        .is_err()
    {
        tracing::error!("the store writer could not be joined");
    }
    tracing::info!("stopped");
    Ok(())
}
