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
//! - [`sinks`]: the destinations behind one trait (a JSON Lines file, for now).
//! - [`config`] and [`cli`]: the TOML file, environment overrides and commands.

pub mod admin;
pub mod cli;
pub mod config;
pub mod dispatch;
pub mod event;
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

use crate::config::Config;
use crate::dispatch::{Dispatcher, RetryPolicy};
use crate::store::{Store, StoreError};

/// How long dispatchers get to finish in-flight deliveries at shutdown.
const DISPATCH_DRAIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sink(#[from] sinks::BuildError),
}

/// Runs the router on `listener` until `shutdown` completes: serves webhooks, dispatches
/// to the sinks, then drains in order (requests first, then deliveries, then the store's
/// last commits), so everything acknowledged is on disk when this returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let (store, writer) = Store::open(&config.store)?;
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

    let state = Arc::new(server::State::new(&config, store.clone(), built.clone()));
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
