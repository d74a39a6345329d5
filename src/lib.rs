//! vyora-router receives Vyora's call webhooks, proves each one genuine, stores it
//! durably, acknowledges it, and delivers it to the configured sinks in the background.
//!
//! # Layout
//!
//! The data flows one way: server -> store -> dispatch -> sinks.
//!
//! - [`server`]: the two listeners (webhooks; operators), limits, and the one place
//!   outcomes become status codes. Verifies with [`signature`], reads the [`event`]
//!   (bodies read within a memory budget by `body`), asks [`routing`] which sinks want
//!   it, and hands both to the store.
//! - [`store`]: the seam every engine implements ([`store::Backend`]): ingest with
//!   dedup, claims and settlements of deliveries, the poll schedule, pruning, the
//!   operator's queries. SQLite (an event log with a cursor per sink) lives in
//!   `store/sqlite/`, PostgreSQL (delivery rows under leases, for replicas) in
//!   `store/postgres/`.
//! - [`console`]: the operator console at `/ui` on the admin listener (pages rendered by
//!   the server, a login derived from `admin.token`, replay, and a live view over the
//!   [`feed`] that the webhook path and the dispatchers publish to).
//! - [`dispatch`]: one dispatcher per sink claims due deliveries, hands them to the sink,
//!   and settles delivered / retry later / dead, with the one `backoff` schedule.
//! - [`sinks`]: the destinations behind one trait; each kind in its folder with its own
//!   settings (`sinks/<kind>/config.rs`).
//! - `poller`: recovers analyses whose webhook never came, through [`api`] (Vyora's
//!   REST API, rate-limited), storing them like webhooks.
//! - `app`: starts all of the above, applies reloads ([`live`]), prunes, refreshes the
//!   backlog gauges of [`metrics`], and shuts down in order.
//! - [`config`]: the file and its overrides, checked section by section; [`cli`],
//!   [`render`], [`trigger`], [`backfill`] and [`tail`] serve the commands in `main.rs`.
//!
//! # The dependency rule
//!
//! Imports point down this list and never back (`tests/layout.rs` enforces it):
//!
//! 1. Leaves, which import nothing of the crate: `protocol` (header names, event names,
//!    reserved paths), [`event`], [`signature`], `backoff`, [`metrics`], [`net`], `body`,
//!    [`feed`], [`history`] and `config::error`.
//! 2. Rules and destinations: [`routing`], `redact`, [`api`], [`sinks`] (which never
//!    import the store).
//! 3. [`config`], which knows every component's settings.
//! 4. [`store`] and [`live`].
//! 5. The moving parts: [`server`] (which serves [`console`]), [`dispatch`], `poller`,
//!    [`backfill`] (for the console and the command).
//! 6. `app`, the commands' helpers ([`cli`], [`render`], [`trigger`], [`tail`]) and
//!    `main.rs`; only `app` and `main.rs` import [`server`].

pub mod api;
mod app;
pub mod backfill;
mod backoff;
mod body;
pub mod cli;
pub mod config;
pub mod console;
pub mod dispatch;
pub mod event;
pub mod feed;
pub mod history;
pub mod live;
pub mod metrics;
pub mod net;
mod poller;
mod protocol;
mod redact;
pub mod render;
pub mod routing;
pub mod server;
pub mod signature;
pub mod sinks;
pub mod store;
pub mod tail;
pub mod trigger;

pub use app::{BindError, Listeners, RunError, run};
pub use poller::PollerHealth;
pub use redact::Redaction;
