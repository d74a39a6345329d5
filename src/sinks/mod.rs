//! Sinks: where events go. One [`Sink`] trait, one folder per kind; the dispatcher drives
//! them. Each kind also has a [`Probe`] (`<kind>/probe.rs`) that `check-config --connect`
//! runs to reach its destination without sending an event.
//!
//! Each kind owns its settings (`<kind>/config.rs`: its keys, defaults and checks), and
//! [`SinkConfig`] holds one configured sink: which events it gets and what it must not
//! see, besides its kind's settings. `config` reads the file into these types and
//! re-exports them; nothing here imports `config` but its leaf `config::error`.

pub mod amqp;
pub mod file;
pub mod flow;
pub mod http;
pub mod nats;
pub mod redis;
pub mod topic;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::event::Delivery;
use crate::redact::Redaction;
use crate::routing::{EventSelector, Filter, Route};

/// The futures sinks return: the ecosystem's one type, shared with the store's.
pub use futures_util::future::BoxFuture;

/// A destination for events.
///
/// The dispatcher hands a sink batches of up to [`Sink::batch_size`] deliveries and keeps
/// up to [`Sink::concurrency`] batches in flight, so each kind can pick what suits it (the
/// file sink appends a whole batch with one fsync; a network sink may prefer many small
/// batches in parallel). Memory is bounded by the product of the two.
pub trait Sink: Send + Sync + 'static {
    fn name(&self) -> &str;

    fn batch_size(&self) -> usize {
        1
    }

    fn concurrency(&self) -> usize {
        1
    }

    /// Delivers `batch` and returns one result per delivery, in the same order. `Ok` means
    /// the destination has durably taken the event: the row is then never sent again.
    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Result<(), SinkError>>>;

    /// Why the sink cannot deliver right now, if it cannot (reported by `/readyz`).
    fn unready(&self) -> Option<String> {
        None
    }

    /// Closes connections cleanly at shutdown.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// What `check-config --connect` asks of each kind of sink: reach the destination as the
/// sink would, without sending it an event, and say what was found. Each kind implements
/// it on its checked settings rather than on a built [`Sink`], because building one has
/// effects of its own (the file sink repairs its file; the AMQP sink starts reconnecting).
pub trait Probe: Send + Sync {
    /// `Ok`: what was reached; `Err`: why it could not be. Neither may hold a secret.
    fn probe(&self) -> BoxFuture<'_, Result<String, String>>;
}

/// One `[[sinks]]` table, checked.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// The sink's table as written: a reload restarts a sink only when this changed.
    pub fingerprint: String,
    pub name: String,
    pub events: EventSelector,
    pub filter: Filter,
    pub redact: Redaction,
    /// Its rate limit and circuit breaker.
    pub flow: flow::Flow,
    pub kind: SinkKind,
}

/// A sink's own settings, by its `type`.
#[derive(Debug, Clone)]
pub enum SinkKind {
    File(file::FileSinkConfig),
    Http(Box<http::HttpSinkConfig>),
    Amqp(Box<amqp::AmqpSinkConfig>),
    Redis(Box<redis::RedisSinkConfig>),
    Nats(Box<nats::NatsSinkConfig>),
}

impl SinkKind {
    /// The kind's [`Probe`], for `check-config --connect`.
    pub fn probe(&self) -> &dyn Probe {
        match self {
            SinkKind::File(file) => file,
            SinkKind::Http(http) => http.as_ref(),
            SinkKind::Amqp(amqp) => amqp.as_ref(),
            SinkKind::Redis(redis) => redis.as_ref(),
            SinkKind::Nats(nats) => nats.as_ref(),
        }
    }

    /// The kind's name, as `type` says it.
    pub fn name(&self) -> &'static str {
        match self {
            SinkKind::File(_) => "file",
            SinkKind::Http(_) => "http",
            SinkKind::Amqp(_) => "amqp",
            SinkKind::Redis(_) => "redis",
            SinkKind::Nats(_) => "nats",
        }
    }
}

/// `Router::new(&config.sinks)`: each sink's route is its name, events and filter.
impl From<&SinkConfig> for Route {
    fn from(sink: &SinkConfig) -> Route {
        Route {
            sink: Arc::from(sink.name.as_str()),
            events: sink.events.clone(),
            filter: sink.filter.clone(),
        }
    }
}

/// Why a delivery failed, and whether trying again can help.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    #[error("cannot append to {path}: {source}")]
    FileIo {
        path: PathBuf,
        source: Arc<std::io::Error>,
    },
    #[error("the payload is not JSON: {0}")]
    NotJson(Arc<serde_json::Error>),
    #[error("request failed: {0}")]
    HttpTransport(String),
    #[error("{reason}")]
    Amqp { reason: String, permanent: bool },
    #[error("{reason}")]
    Redis { reason: String, permanent: bool },
    #[error("{reason}")]
    Nats { reason: String, permanent: bool },
    #[error("the payload was emptied by store.retention; the event cannot be sent again")]
    Pruned,
    /// The sink's code panicked on this batch, or gave no result for a delivery: a bug,
    /// retried with backoff like a failure.
    #[error("{0}")]
    Panicked(String),
    /// The destination as a whole cannot be reached; rows wait without using up attempts.
    #[error("{reason}")]
    Unavailable { reason: String, retry_in: Duration },
    #[error("answered {status}: {snippet:?}")]
    HttpStatus {
        status: u16,
        snippet: String,
        permanent: bool,
        retry_after: Option<Duration>,
    },
}

impl SinkError {
    /// A permanent failure goes dead at once: retrying the same bytes cannot succeed.
    pub fn is_permanent(&self) -> bool {
        match self {
            SinkError::NotJson(_) | SinkError::Pruned => true,
            SinkError::HttpStatus { permanent, .. }
            | SinkError::Amqp { permanent, .. }
            | SinkError::Redis { permanent, .. }
            | SinkError::Nats { permanent, .. } => *permanent,
            SinkError::FileIo { .. }
            | SinkError::Panicked(_)
            | SinkError::HttpTransport(_)
            | SinkError::Unavailable { .. } => false,
        }
    }

    /// A wait the destination asked for, which the retry honours.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SinkError::HttpStatus { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Why a sink could not be set up from its config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("sink {name:?}: cannot open {path}: {source}")]
    File {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sink {name:?}: cannot set up the HTTP client: {source}")]
    Http {
        name: String,
        source: reqwest::Error,
    },
    #[error("sink {name:?}: cannot set up the Redis client: {reason}")]
    Redis { name: String, reason: String },
    #[error("sink {name:?}: {reason}")]
    Nats { name: String, reason: String },
}

/// Builds a sink. `max_wait` caps how long a destination can ask us to wait
/// (`delivery.backoff_max`). A NATS sink whose server answers is refused here when no
/// stream captures its subject.
pub async fn build(config: &SinkConfig, max_wait: Duration) -> Result<Arc<dyn Sink>, BuildError> {
    match &config.kind {
        SinkKind::File(file) => Ok(Arc::new(file::FileSink::open(&config.name, &file.path)?)),
        SinkKind::Http(http) => Ok(Arc::new(http::HttpSink::new(&config.name, http, max_wait)?)),
        SinkKind::Amqp(amqp) => Ok(amqp::AmqpSink::start(&config.name, amqp)),
        SinkKind::Redis(redis) => Ok(redis::RedisSink::start(&config.name, redis)?),
        SinkKind::Nats(nats) => Ok(nats::NatsSink::start(&config.name, nats).await?),
    }
}
