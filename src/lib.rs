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
//! - [`app`]: starts all of the above, applies reloads ([`live`]), prunes old events,
//!   and shuts down in order; [`metrics`] counts what happens.
//! - [`config`], [`cli`] and [`admin`]: the TOML file, environment overrides, commands
//!   and the operator's view of the store. [`redact`] and [`net`] serve the sinks.
//!
//! Settings live with the component they configure: each sink's keys and checks in
//! `sinks/<kind>/config.rs`, the REST client's in `api/config.rs`. [`config`] reads the
//! file, checks it section by section and names the key in every error.

pub mod api;
pub mod app;
pub mod backoff;
pub mod body;
pub mod cli;
pub mod config;
pub mod dispatch;
pub mod event;
pub mod live;
pub mod metrics;
pub mod net;
pub mod poller;
pub mod protocol;
pub mod redact;
pub mod render;
pub mod routing;
pub mod server;
pub mod signature;
pub mod sinks;
pub mod store;
pub mod trigger;

pub use app::{Listeners, RunError, run};
