//! The HTTP front: accept loop, limits, routing of requests, and the one place where
//! outcomes become status codes.
//!
//! A webhook is answered 200 only after its event and its deliveries are committed; the
//! request never waits on a sink.

mod admission;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use self::admission::{Admission, Answering};
use crate::body::{self, BodyError};
use crate::config::Config;
use crate::console::{self, Console};
use crate::event::{Event, EventError, Timestamp};
use crate::feed::{Feed, Happening, What};
use crate::live::{Live, LiveHandle};
use crate::metrics::Metrics;
use crate::poller::PollerHealth;
use crate::protocol::{EVENT_HEADER, HEALTH_PATH, METRICS_PATH, READY_PATH, SIGNATURE_HEADER};
use crate::signature::{self, SignatureError};
use crate::store::{Ingested, Quarantined, Store, StoreError};

/// Seconds a sender should wait after a 503.
const RETRY_AFTER_SECS: &str = "5";
/// What one connection may read ahead of the handler, headers included.
const MAX_CONNECTION_BUFFER: usize = 8 * 1024;
/// Connections the kernel may queue for `accept` (it caps this at `net.core.somaxconn`);
/// listeners bound by the standard library or tokio get 128.
const ACCEPT_QUEUE: i32 = 4096;
/// The OpenMetrics content type that `prometheus-client` writes.
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the request path needs, shared by every connection.
pub struct State {
    /// `server.webhook_path`: the one path that takes webhooks.
    webhook_path: String,
    /// Larger bodies get 413, by their length before a byte is read.
    max_body_bytes: usize,
    /// Bytes of request bodies buffered at once, across every connection.
    body_budget: Arc<Semaphore>,
    /// A body that has not arrived by then gets 408 (it would hold a connection).
    body_timeout: Duration,
    /// A commit that has not happened by then gets 503: Vyora sends the event again.
    ack_timeout: Duration,
    /// Where every accepted event goes before its 200.
    store: Store,
    /// Secrets, routes and sinks, replaced by reloads between requests.
    live: LiveHandle,
    /// The poller's state, for readiness (none when it does not run).
    poller: Option<Arc<PollerHealth>>,
    /// Counted per request; encoded for `/metrics`.
    metrics: Arc<Metrics>,
    /// The operator console on the admin listener, unless `admin.console = false`.
    console: Option<Console>,
    /// Stored events, for the console's live view.
    feed: Feed,
}

/// What the server works with beyond its own settings.
pub struct Components {
    pub store: Store,
    pub live: LiveHandle,
    pub poller: Option<Arc<PollerHealth>>,
    pub metrics: Arc<Metrics>,
    pub console: Option<Console>,
    pub feed: Feed,
}

impl State {
    pub fn new(config: &Config, components: Components) -> State {
        let Components {
            store,
            live,
            poller,
            metrics,
            console,
            feed,
        } = components;
        State {
            webhook_path: config.server.webhook_path.clone(),
            max_body_bytes: config.server.max_body_bytes,
            body_budget: Arc::new(Semaphore::new(config.server.max_buffered_body_bytes)),
            body_timeout: config.server.header_read_timeout,
            ack_timeout: config.server.ack_timeout,
            store,
            live,
            poller,
            metrics,
            console,
            feed,
        }
    }
}

/// Why a request was not accepted. Each variant maps to one status in [`respond`].
#[derive(Debug, thiserror::Error)]
enum Rejection {
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed { allow: &'static str },
    #[error("the body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the body could not be read: {0}")]
    BodyRead(Box<dyn std::error::Error + Send + Sync>),
    #[error("the body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    #[error("invalid signature")]
    Signature(SignatureError),
    #[error("{0}")]
    Event(EventError),
    #[error(
        "the event's timestamp is {} old, older than webhook.max_event_age allows ({}); a replay is refused",
        readable(*.age),
        readable(*.max)
    )]
    TooOld { age: Duration, max: Duration },
    #[error(
        "the event's timestamp is {} ahead of our clock, more than webhook.max_clock_skew allows ({}); it is refused like an old replay",
        readable(*.ahead),
        readable(*.max)
    )]
    FromTheFuture { ahead: Duration, max: Duration },
    #[error("the event could not be stored: {0}")]
    Store(StoreError),
    #[error("the event could not be stored within {0:?}")]
    StoreTimeout(Duration),
    #[error("not ready")]
    NotReady(serde_json::Map<String, serde_json::Value>),
    #[error("too many request bodies are being received at once; retry later")]
    Overloaded,
}

/// A duration as a person reads it: its two largest units, rounded down ("3 days 4 hours",
/// "2 hours 5 minutes", "40 seconds"), not a count of seconds.
fn readable(d: Duration) -> String {
    const UNITS: [(u64, &str); 4] = [
        (86_400, "day"),
        (3_600, "hour"),
        (60, "minute"),
        (1, "second"),
    ];
    if d.as_secs() == 0 {
        return format!("{} ms", d.as_millis());
    }
    let mut rest = d.as_secs();
    let mut parts = Vec::new();
    for (size, unit) in UNITS {
        let n = rest / size;
        rest %= size;
        if n > 0 {
            parts.push(format!("{n} {unit}{}", if n == 1 { "" } else { "s" }));
        }
        if parts.len() == 2 || (n == 0 && !parts.is_empty()) {
            break;
        }
    }
    parts.join(" ")
}

impl Rejection {
    /// The outcome label in logs and metrics.
    fn outcome(&self) -> &'static str {
        match self {
            Rejection::NotFound | Rejection::MethodNotAllowed { .. } => "not_routed",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::BodyRead(_) | Rejection::BodyTimeout(_) | Rejection::Event(_) => {
                "bad_request"
            }
            Rejection::TooOld { .. } | Rejection::FromTheFuture { .. } => "too_old",
            Rejection::Signature(_) => "invalid_signature",
            Rejection::Store(_) | Rejection::StoreTimeout(_) | Rejection::NotReady(_) => {
                "unavailable"
            }
            Rejection::Overloaded => "overloaded",
        }
    }
}

enum Accepted {
    Healthy,
    Ready,
    Metrics(String),
    Event(Ingested),
}

/// An answer: all of them whole, but for the console's live stream.
pub type Reply = Response<UnsyncBoxBody<Bytes, Infallible>>;

/// An answer of the server's own, sent whole.
type Plain = Response<Full<Bytes>>;

fn json(status: StatusCode, body: serde_json::Value) -> Plain {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Every status code the server sends is decided here.
fn respond(result: Result<Accepted, Rejection>) -> Plain {
    let rejection = match result {
        Ok(Accepted::Healthy) => return json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        Ok(Accepted::Ready) => return json(StatusCode::OK, serde_json::json!({"status": "ready"})),
        Ok(Accepted::Metrics(text)) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
            return response;
        }
        Err(Rejection::NotReady(problems)) => {
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "not ready", "problems": problems}),
            );
        }
        Ok(Accepted::Event(Ingested::Stored { .. })) => {
            return json(StatusCode::OK, serde_json::json!({"received": true}));
        }
        Ok(Accepted::Event(Ingested::Duplicate)) => {
            return json(
                StatusCode::OK,
                serde_json::json!({"received": true, "duplicate": true}),
            );
        }
        Err(r) => r,
    };
    let status = match &rejection {
        Rejection::NotFound => StatusCode::NOT_FOUND,
        Rejection::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
        Rejection::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        Rejection::BodyRead(_)
        | Rejection::Event(_)
        | Rejection::TooOld { .. }
        | Rejection::FromTheFuture { .. } => StatusCode::BAD_REQUEST,
        Rejection::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        Rejection::Signature(_) => StatusCode::UNAUTHORIZED,
        Rejection::Store(_)
        | Rejection::StoreTimeout(_)
        | Rejection::NotReady(_)
        | Rejection::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
    };
    // Store failures are detailed in our log, not to the sender.
    let message = match &rejection {
        Rejection::Store(_) | Rejection::StoreTimeout(_) => {
            "temporarily unable to store the event; retry later".to_owned()
        }
        other => other.to_string(),
    };
    let mut response = json(status, serde_json::json!({ "error": message }));
    match rejection {
        Rejection::MethodNotAllowed { allow } => {
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
        }
        Rejection::Store(_) | Rejection::StoreTimeout(_) | Rejection::Overloaded => {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        _ => {}
    }
    response
}

/// A request body as hyper (or a test, or a fuzzer) hands it over.
pub trait RequestBody:
    Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send
{
}

impl<B> RequestBody for B where
    B: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send
{
}

/// Which listener a request came in on; each serves only its own paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `server.listen`: the webhook path and `/healthz`, what Vyora and a load balancer
    /// reach.
    Public,
    /// `admin.listen`: `/metrics`, `/readyz` and `/healthz`, for operators and probes.
    /// Call volumes, sink names and error texts are not the public's business.
    Admin,
}

/// Answers one request; the whole request path, also for fuzzing without sockets.
pub async fn handle<B: RequestBody>(
    state: Arc<State>,
    surface: Surface,
    req: Request<B>,
) -> Result<Reply, Infallible> {
    let path = req.uri().path();
    if surface == Surface::Admin
        && console::is_console_path(path)
        && let Some(console) = &state.console
    {
        return Ok(console::handle(console, req).await);
    }
    let operator_path = path == READY_PATH || path == METRICS_PATH;
    let result = if surface == Surface::Public && path == state.webhook_path {
        if req.method() == Method::POST {
            return Ok(webhook(&state, req).await.map(BodyExt::boxed_unsync));
        }
        Err(Rejection::MethodNotAllowed { allow: "POST" })
    } else if path == HEALTH_PATH || (surface == Surface::Admin && operator_path) {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            Err(Rejection::MethodNotAllowed { allow: "GET, HEAD" })
        } else if path == HEALTH_PATH {
            Ok(Accepted::Healthy)
        } else if path == METRICS_PATH {
            // Read at the scrape, like /readyz, so the two never disagree.
            let live = state.live.current();
            state
                .metrics
                .set_sinks_ready(live.sinks.iter().map(|s| (s.name(), s.unready().is_none())));
            state.metrics.set_ready(readiness(&state).is_ok());
            Ok(Accepted::Metrics(state.metrics.encode()))
        } else {
            readiness(&state)
        }
    } else {
        Err(Rejection::NotFound)
    };
    Ok(respond(result).map(BodyExt::boxed_unsync))
}

/// Ready when the store accepts commits and every sink that needs a connection has one.
fn readiness(state: &State) -> Result<Accepted, Rejection> {
    let mut problems = serde_json::Map::new();
    if let Some(reason) = state.store.unready() {
        problems.insert("store".into(), reason.into());
    }
    for sink in &state.live.current().sinks {
        if let Some(reason) = sink.unready() {
            problems.insert(format!("sink:{}", sink.name()), reason.into());
        }
    }
    if let Some(reason) = state.poller.as_ref().and_then(|p| p.unready()) {
        problems.insert("poller".into(), reason.into());
    }
    if problems.is_empty() {
        Ok(Accepted::Ready)
    } else {
        Err(Rejection::NotReady(problems))
    }
}

/// Facts about one webhook for its log line.
#[derive(Default)]
struct Seen {
    event: Option<String>,
    call_id: Option<String>,
}

async fn webhook<B: RequestBody>(state: &State, req: Request<B>) -> Plain {
    let started = Instant::now();
    let mut seen = Seen::default();
    let result = receive(state, req, &mut seen).await;
    let elapsed = started.elapsed();
    state.metrics.ack_latency.observe(elapsed.as_secs_f64());
    let latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    // Only verified, documented event names become labels: no sender may create label
    // values at will.
    let label = seen
        .event
        .as_deref()
        .map_or("unknown", crate::protocol::label);
    let event = seen.event.as_deref().unwrap_or("unknown");
    let call_id = seen.call_id.as_deref().unwrap_or("-");
    let outcome = match &result {
        Ok(Accepted::Event(Ingested::Duplicate)) => "duplicate",
        Ok(_) => "accepted",
        Err(r) => r.outcome(),
    };
    state.metrics.webhook(label, outcome);
    match &result {
        Ok(Accepted::Event(Ingested::Duplicate)) => {
            tracing::info!(event, call_id, outcome = "duplicate", latency_us, "webhook");
        }
        Ok(_) => tracing::info!(event, call_id, outcome = "accepted", latency_us, "webhook"),
        Err(r @ (Rejection::Store(_) | Rejection::StoreTimeout(_))) => {
            tracing::error!(event, call_id, outcome = r.outcome(), latency_us, reason = %r, "webhook");
        }
        Err(r) => {
            tracing::warn!(event, call_id, outcome = r.outcome(), latency_us, reason = %r, "webhook")
        }
    }
    respond(result)
}

/// The webhook pipeline: size, signature, event, store. The order is the security model:
/// nothing is parsed before the signature has been checked over the raw bytes.
async fn receive<B: RequestBody>(
    state: &State,
    req: Request<B>,
    seen: &mut Seen,
) -> Result<Accepted, Rejection> {
    let limit = state.max_body_bytes;
    // An honest Content-Length over the limit is refused before reading a byte.
    if req.body().size_hint().lower() > limit as u64 {
        return Err(Rejection::TooLarge { limit });
    }
    // A request that does not even claim a signature in the right form is refused before
    // a byte of its body is read or buffered.
    let mut signatures = req.headers().get_all(SIGNATURE_HEADER).iter();
    let claimed = signature::parse(signatures.next().map(|v| v.as_bytes()));
    if signatures.next().is_some() {
        return Err(Rejection::Signature(SignatureError::Repeated));
    }
    let claimed = claimed.map_err(Rejection::Signature)?;
    let event_header = req
        .headers()
        .get(EVENT_HEADER)
        .map(|v| Bytes::copy_from_slice(v.as_bytes()));

    // Held until the answer: the body's buffer counts against the budget until then.
    let buffered = match tokio::time::timeout(
        state.body_timeout,
        body::read(req.into_body(), limit, &state.body_budget),
    )
    .await
    {
        Err(_) => return Err(Rejection::BodyTimeout(state.body_timeout)),
        Ok(Err(BodyError::TooLarge { limit })) => return Err(Rejection::TooLarge { limit }),
        Ok(Err(BodyError::OverBudget)) => return Err(Rejection::Overloaded),
        Ok(Err(BodyError::Read(e))) => return Err(Rejection::BodyRead(e)),
        Ok(Ok(buffered)) => buffered,
    };
    let body = buffered.bytes.clone();

    // One snapshot for the whole request, so a reload never mixes two configs in it.
    let live = state.live.current();
    let index =
        signature::verify_claimed(&live.secrets, &claimed, &body).map_err(Rejection::Signature)?;
    state.metrics.secret_verified(index);

    let event = match Event::from_webhook(event_header.as_deref(), body.clone()) {
        Ok(event) => event,
        // The signed body is fine; only the unsigned header is wrong. Anyone can pair a
        // captured body with such a header, so nothing is stored for it.
        Err(e) if e.caused_by_header() => return Err(Rejection::Event(e)),
        Err(e) => {
            let entry = Quarantined {
                reason: e.to_string(),
                event_header: event_header
                    .as_deref()
                    .map(|h| String::from_utf8_lossy(h).into_owned()),
                body,
            };
            // The body is genuine, so it is kept (once per distinct body, within
            // store.quarantine_max_bytes); if even that cannot be stored, 503 makes Vyora
            // send it again rather than lose it.
            let kept = store_within(state.ack_timeout, state.store.quarantine(entry)).await?;
            state.metrics.quarantine_dropped.inc_by(kept.dropped);
            return Err(Rejection::Event(e));
        }
    };
    seen.event = Some(event.name.clone());
    seen.call_id = event.call_id.clone();
    check_age(state, &live, &event)?;
    let sinks = live.router.sinks_for(&event);
    let happening = state.feed.admit().then(|| Happening {
        at: SystemTime::now(),
        call_id: event.call_id.clone(),
        event: event.name.clone(),
        what: What::Stored {
            sinks: sinks.clone(),
        },
    });
    let ingested = store_within(state.ack_timeout, state.store.ingest(event, sinks)).await?;
    if let (Some(happening), Ingested::Stored { .. }) = (happening, &ingested) {
        state.feed.publish(happening);
    }
    Ok(Accepted::Event(ingested))
}

/// The signature carries no time: the dedup record is the only replay guard, so an event
/// older than that record may not come in again, nor one dated in the future (it would
/// pass the age check until long after its record expired). An event without a readable
/// timestamp is accepted, logged and counted: a genuine event must not be lost for a field
/// Vyora might leave out, and dedup still guards it within the dedup window.
fn check_age(state: &State, live: &Live, event: &Event) -> Result<(), Rejection> {
    let at = match event.timestamp {
        Timestamp::At(at) => at,
        Timestamp::Missing | Timestamp::Unreadable => {
            let reason = if event.timestamp == Timestamp::Missing {
                "missing"
            } else {
                "unreadable"
            };
            state.metrics.webhook_without_timestamp(reason);
            tracing::warn!(
                event = %event.name,
                call_id = event.call_id.as_deref().unwrap_or("-"),
                reason,
                "the event has no readable timestamp; accepted without the age check"
            );
            return Ok(());
        }
    };
    let now = SystemTime::now();
    match now.duration_since(at) {
        Ok(age) if age > live.max_event_age => Err(Rejection::TooOld {
            age: Duration::from_secs(age.as_secs()),
            max: live.max_event_age,
        }),
        Ok(_) => Ok(()),
        Err(e) if e.duration() > live.max_clock_skew => Err(Rejection::FromTheFuture {
            ahead: Duration::from_secs(e.duration().as_secs()),
            max: live.max_clock_skew,
        }),
        Err(_) => Ok(()),
    }
}

async fn store_within<T>(
    deadline: Duration,
    op: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, Rejection> {
    match tokio::time::timeout(deadline, op).await {
        Err(_) => Err(Rejection::StoreTimeout(deadline)),
        Ok(Err(e)) => Err(Rejection::Store(e)),
        Ok(Ok(v)) => Ok(v),
    }
}

/// Accepts connections until `shutdown` completes, then lets open connections finish
/// their current request (up to a deadline) and returns. With every place taken, a new
/// connection takes the place of the one idle longest (see [`admission`]).
pub async fn serve(
    listener: TcpListener,
    surface: Surface,
    state: Arc<State>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let ConnectionLimits {
        max_connections,
        header_read_timeout,
        drain_timeout,
    } = limits;
    let mut builder = http1::Builder::new();
    // Without a timer hyper silently ignores the header timeout.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        // Bounds what one connection reads ahead of the handler (hyper's default is about
        // 400 KiB); request bodies themselves are bounded by the body budget.
        .max_buf_size(MAX_CONNECTION_BUFFER)
        .keep_alive(true);
    // A full accept queue makes the kernel drop new connections, genuine ones included,
    // whose senders retry only after a second: the queue must outlast a peer that holds
    // many more connections than we admit.
    if let Err(e) = socket2::SockRef::from(&listener).listen(ACCEPT_QUEUE) {
        tracing::warn!(error = %e, "cannot lengthen the accept queue");
    }
    let graceful = GracefulShutdown::new();
    let admission = Admission::new(max_connections);
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Past the limit we close an idle connection for this one, or wait for a place
        // instead of growing.
        let connection = tokio::select! {
            () = &mut shutdown => break,
            connection = admission.admit() => connection,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let state = Arc::clone(&state);
        let tracked = Arc::clone(&connection);
        let service = service_fn(move |req: Request<Incoming>| {
            // Taken when hyper hands over the head, before the handler first runs.
            let request = tracked.request();
            let answer = handle(Arc::clone(&state), surface, req);
            async move {
                let reply = answer.await?;
                Ok::<_, Infallible>(reply.map(|body| Answering::new(body, request)))
            }
        });
        let served = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            tokio::select! {
                ended = served => if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                },
                () = connection.evicted() => {
                    tracing::debug!("an idle connection closed to admit a new one");
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("open connections did not finish within {drain_timeout:?}; closing them");
    }
}

/// The connection-level limits of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// How long open connections get to finish once shutdown begins.
    pub drain_timeout: Duration,
}

impl ConnectionLimits {
    pub fn from_config(config: &Config) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: config.server.max_connections,
            header_read_timeout: config.server.header_read_timeout,
            drain_timeout: config.server.shutdown_timeout,
        }
    }

    /// The admin listener's: a few connections are plenty for scrapes and probes.
    pub fn admin(config: &Config) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: ADMIN_MAX_CONNECTIONS,
            ..ConnectionLimits::from_config(config)
        }
    }
}

/// Connections the admin listener serves at once.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// `GET /healthz` against a running router; the container's health check (no curl needed).
pub async fn check_health(addr: SocketAddr) -> Result<StatusCode, HealthError> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::get(HEALTH_PATH)
        .header(hyper::header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))?;
    Ok(sender.send_request(request).await?.status())
}

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("cannot connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("HTTP error: {0}")]
    Http(#[from] hyper::Error),
    #[error("cannot build the request: {0}")]
    Request(#[from] hyper::http::Error),
}
