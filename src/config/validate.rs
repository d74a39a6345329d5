//! The file's schema checked into the typed [`Config`] (ripgrep's `hiargs`): one function
//! per section, every refusal naming the key and the value. Each section reports all its
//! refusals and every section is checked, so one run lists every error of the file. A
//! section whose limits depend on another's (the admin listener on the server's, the
//! event age on the store's dedup window, the poller on the API key) is checked after it
//! and given its checked values; when that one is refused, the cross-check waits until it
//! is fixed (`[webhook]` as a whole waits for `[store]`).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use figment::value::{Tag, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::{self, ConfigError, Errors, FigmentReport, InvalidAt, suggest};
use super::raw::{
    COMMON_SINK_KEYS, RawAdmin, RawConfig, RawDelivery, RawLog, RawPoller, RawServer, RawSink,
    RawStore, RawWebhook, Read, leniently,
};
use super::redacted::Redacted;
use super::{
    AdminConfig, Config, DATABASE_URL_ENV, DeliveryConfig, LogConfig, LogFormat, PollerConfig,
    PostgresConfig, SECRET_ENV, ServerConfig, StoreBackend, StoreConfig, Synchronous,
    WebhookConfig,
};
use crate::api::{API_KEY_ENV, ApiConfig};
use crate::protocol::RESERVED_PATHS;
use crate::redact::Redaction;
use crate::routing::{EventSelector, Filter, Route, is_event_name};
use crate::signature::Secret;
use crate::sinks::amqp::AmqpOptions;
use crate::sinks::file::FileOptions;
use crate::sinks::flow::{Breaker, Flow, RateLimit};
use crate::sinks::http::HttpOptions;
use crate::sinks::nats::NatsOptions;
use crate::sinks::redis::RedisOptions;
use crate::sinks::{SinkConfig, SinkKind};

impl Read {
    /// Every section checked, every refusal kept; a [`Config`] only when there is none.
    /// A check of a key that was refused when the file was read is left out: that key
    /// holds its default, and the refusal already names it.
    pub(super) fn validate(mut self) -> Result<Config, ConfigError> {
        let mut found = Errors::default();
        let raw = &self.raw;
        let server = found.check(server(&raw.server));
        let admin = found.check(admin(&raw.admin, server.as_ref()));
        let store = found.check(store(&raw.store, server.as_ref()));
        let webhook = store
            .as_ref()
            .and_then(|store| found.check(webhook(&raw.webhook, &raw.store, store)));
        let delivery = found.check(delivery(&raw.delivery));
        let log = found.check(log(&raw.log));
        let api = found.check(raw.api.validate().at("api"));
        let poller = found.check(poller(&raw.poller, api.as_ref()));
        let sinks = sinks(&mut self.raw, &mut found);
        let mut errors = std::mem::take(&mut self.errors);
        for e in found {
            if !e.key().is_some_and(|key| self.refused(&key)) {
                errors.push(e);
            }
        }
        let (
            Some(server),
            Some(admin),
            Some(webhook),
            Some(store),
            Some(delivery),
            Some(api),
            Some(poller),
            Some(log),
        ) = (server, admin, webhook, store, delivery, api, poller, log)
        else {
            return Err(errors.into());
        };
        errors.or(())?;
        // Shown as in effect, not as left out.
        self.raw.webhook.max_event_age = Some(duration_text(webhook.max_event_age).as_str().into());
        Ok(Config {
            server,
            admin,
            webhook,
            store,
            delivery,
            api,
            poller,
            log,
            sinks,
            redacted: Redacted::of(&self.raw),
        })
    }
}

/// `d` as a duration is written in the file: `89d 23h 55m`.
fn duration_text(d: Duration) -> String {
    const UNITS: [(u128, &str); 7] = [
        (86_400_000_000_000, "d"),
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
        (1, "ns"),
    ];
    let mut left = d.as_nanos();
    let mut parts = Vec::new();
    for (size, unit) in UNITS {
        if left >= size {
            parts.push(format!("{}{unit}", left / size));
            left %= size;
        }
    }
    if parts.is_empty() {
        "0s".to_owned()
    } else {
        parts.join(" ")
    }
}

/// `server.listen` or `admin.listen`: an IP address and port, or a host name and port
/// resolved now (`localhost:8080`).
fn listen_address(key: &str, value: &str, example: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let refuse = |why: String| {
        ConfigError::invalid(
            key,
            value,
            format!("{why}; expected a host or IP address and a port, such as \"{example}\""),
        )
    };
    if !value.contains(':') {
        return Err(refuse("has no port".into()));
    }
    let addrs: Vec<SocketAddr> = value
        .to_socket_addrs()
        .map_err(|e| refuse(format!("cannot be resolved ({e})")))?
        .collect();
    // `localhost` usually resolves to ::1 and 127.0.0.1; the IPv4 one is what local
    // clients and probes try (and fall back to) everywhere.
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| refuse("resolves to no address".into()))
}

pub(super) fn server(s: &RawServer) -> Result<ServerConfig, ConfigError> {
    let mut errors = Errors::default();
    let listen = errors.check(listen_address("server.listen", &s.listen, "127.0.0.1:8080"));
    if !s.webhook_path.starts_with('/') {
        errors.push(ConfigError::invalid(
            "server.webhook_path",
            &s.webhook_path,
            "must start with `/`",
        ));
    } else if RESERVED_PATHS.contains(&s.webhook_path.as_str()) {
        errors.push(ConfigError::invalid(
            "server.webhook_path",
            &s.webhook_path,
            format!(
                "is reserved: the router answers {} itself",
                RESERVED_PATHS.join(", ")
            ),
        ));
    }
    let max_body_bytes = errors.check(error::count(s.max_body_bytes).at("server.max_body_bytes"));
    let header_read_timeout =
        errors.check(error::duration(&s.header_read_timeout).at("server.header_read_timeout"));
    let ack_timeout = errors.check(error::duration(&s.ack_timeout).at("server.ack_timeout"));
    let max_connections =
        errors.check(error::count(s.max_connections).at("server.max_connections"));
    let shutdown_timeout =
        errors.check(error::duration(&s.shutdown_timeout).at("server.shutdown_timeout"));
    let max_buffered_body_bytes =
        errors.check(error::count(s.max_buffered_body_bytes).at("server.max_buffered_body_bytes"));
    if s.max_buffered_body_bytes < s.max_body_bytes
        || s.max_buffered_body_bytes > u64::from(u32::MAX)
    {
        errors.push(ConfigError::invalid(
            "server.max_buffered_body_bytes",
            s.max_buffered_body_bytes,
            format!(
                "must be at least server.max_body_bytes ({}) and at most {} (4 GiB)",
                s.max_body_bytes,
                u32::MAX
            ),
        ));
    }
    let (
        Some(listen),
        Some(max_body_bytes),
        Some(header_read_timeout),
        Some(ack_timeout),
        Some(max_connections),
        Some(shutdown_timeout),
        Some(max_buffered_body_bytes),
    ) = (
        listen,
        max_body_bytes,
        header_read_timeout,
        ack_timeout,
        max_connections,
        shutdown_timeout,
        max_buffered_body_bytes,
    )
    else {
        return Err(errors.into());
    };
    errors.or(ServerConfig {
        listen,
        webhook_path: s.webhook_path.clone(),
        max_body_bytes,
        header_read_timeout,
        ack_timeout,
        max_connections,
        shutdown_timeout,
        max_buffered_body_bytes,
    })
}

/// `server`: the webhook listener's checked settings, when they were valid.
pub(super) fn admin(
    a: &RawAdmin,
    server: Option<&ServerConfig>,
) -> Result<AdminConfig, ConfigError> {
    let listen = listen_address("admin.listen", &a.listen, "127.0.0.1:9464")?;
    if server.is_some_and(|s| listen == s.listen) && listen.port() != 0 {
        return Err(ConfigError::invalid(
            "admin.listen",
            &a.listen,
            "must differ from server.listen: operator endpoints have a listener of their own",
        ));
    }
    let (console, token) = super::admin::console(a, listen)?;
    Ok(AdminConfig {
        listen,
        console,
        token,
    })
}

/// The longest `store.commit_interval`. Every acknowledgement may wait for it, so a
/// connection that waits for each answer gets at most one per interval: past a few
/// milliseconds that costs senders far more than the bytes it saves (see README).
const MAX_COMMIT_INTERVAL: Duration = Duration::from_millis(10);

/// `server`: the server's checked settings, when they were valid (they bound the
/// quarantine).
pub(super) fn store(
    s: &RawStore,
    server: Option<&ServerConfig>,
) -> Result<StoreConfig, ConfigError> {
    let mut errors = Errors::default();
    let backend = match s.backend.as_str() {
        "sqlite" => {
            if s.path.is_empty() {
                errors.push(ConfigError::invalid(
                    "store.path",
                    &s.path,
                    "must name a file",
                ));
            }
            Some(StoreBackend::Sqlite)
        }
        "postgres" => errors
            .check(postgres(s))
            .map(|pg| StoreBackend::Postgres(Box::new(pg))),
        other => {
            errors.push(ConfigError::invalid(
                "store.backend",
                other,
                format!(
                    "must be \"sqlite\" or \"postgres\"{}",
                    near(other, ["sqlite", "postgres"])
                ),
            ));
            None
        }
    };
    let retention = errors.check(error::duration(&s.retention).at("store.retention"));
    let dedup_window = errors.check(error::duration(&s.dedup_window).at("store.dedup_window"));
    if let (Some(retention), Some(dedup_window)) = (retention, dedup_window)
        && dedup_window < retention
    {
        errors.push(ConfigError::invalid(
            "store.dedup_window",
            &s.dedup_window,
            format!(
                "must not be shorter than store.retention ({:?})",
                &*s.retention
            ),
        ));
    }
    if let Some(server) = server
        && u64::try_from(server.max_body_bytes).is_ok_and(|max| s.quarantine_max_bytes < max)
    {
        errors.push(ConfigError::invalid(
            "store.quarantine_max_bytes",
            s.quarantine_max_bytes,
            format!(
                "must be at least server.max_body_bytes ({}), so one body always fits",
                server.max_body_bytes
            ),
        ));
    }
    let synchronous = match s.synchronous.as_str() {
        "full" => Some(Synchronous::Full),
        "normal" => Some(Synchronous::Normal),
        other => {
            errors.push(ConfigError::invalid(
                "store.synchronous",
                other,
                "must be \"full\" or \"normal\"",
            ));
            None
        }
    };
    let commit_interval =
        errors.check(error::duration_or_zero(&s.commit_interval).at("store.commit_interval"));
    if commit_interval.is_some_and(|c| c > MAX_COMMIT_INTERVAL) {
        errors.push(ConfigError::invalid(
            "store.commit_interval",
            &s.commit_interval,
            "must be at most 10ms: every acknowledgement may wait this long for its commit",
        ));
    }
    let lease = errors.check(error::duration(&s.lease).at("store.lease"));
    let (
        Some(backend),
        Some(retention),
        Some(dedup_window),
        Some(synchronous),
        Some(commit_interval),
        Some(lease),
    ) = (
        backend,
        retention,
        dedup_window,
        synchronous,
        commit_interval,
        lease,
    )
    else {
        return Err(errors.into());
    };
    errors.or(StoreConfig {
        lease,
        backend,
        path: PathBuf::from(&s.path),
        synchronous,
        commit_interval,
        retention,
        dedup_window,
        quarantine_max_bytes: s.quarantine_max_bytes,
    })
}

/// `store.url`, `store.schema` and `store.pool_size`, for `backend = "postgres"`. The URL
/// may hold a password anywhere, so its refusals never show it.
pub(super) fn postgres(s: &RawStore) -> Result<PostgresConfig, ConfigError> {
    let mut errors = Errors::default();
    let pg = if s.url.is_empty() {
        errors.push(ConfigError::invalid(
            "store.url",
            "",
            format!("is needed with backend = \"postgres\": set it, or {DATABASE_URL_ENV}"),
        ));
        None
    } else {
        errors.check(
            PostgresConfig::from_url(&s.url)
                .map_err(|e| ConfigError::invalid("store.url", error::REDACTED, e.to_string())),
        )
    };
    let schema = errors.check(
        super::postgres::check_schema(&s.schema)
            .map_err(|reason| ConfigError::invalid("store.schema", &s.schema, reason)),
    );
    let pool_size = errors.check(error::count(s.pool_size).at("store.pool_size"));
    let (Some(mut pg), Some(()), Some(pool_size)) = (pg, schema, pool_size) else {
        return Err(errors.into());
    };
    pg.schema.clone_from(&s.schema);
    pg.pool_size = pool_size;
    errors.or(pg)
}

/// The replay guard and the store's dedup window, checked together: the signature has no
/// timestamp, so the dedup key is the only thing that stops a replayed body. A key stored
/// when a body arrives lives `store.dedup_window`; the guard accepts the body again while
/// its `timestamp` is at most `max_event_age` old, and a body may be dated up to
/// `max_clock_skew` ahead. So every key must outlive `max_clock_skew + max_event_age`,
/// or a body accepted once is accepted again, as new, once its key is pruned.
fn webhook(
    w: &RawWebhook,
    s: &RawStore,
    store: &StoreConfig,
) -> Result<WebhookConfig, ConfigError> {
    let mut errors = Errors::default();
    if w.secrets.is_empty() {
        errors.push(ConfigError::MissingSecret { env: SECRET_ENV });
    }
    let secrets: Vec<Secret> = w
        .secrets
        .iter()
        .enumerate()
        .filter_map(|(i, secret)| {
            errors.check(Secret::new(secret.as_bytes()).map_err(|e| {
                ConfigError::invalid(format!("webhook.secrets[{i}]"), "", e.to_string())
            }))
        })
        .collect();
    for (i, name) in w.extra_events.iter().enumerate() {
        if !is_event_name(name) {
            errors.push(ConfigError::invalid(
                format!("webhook.extra_events[{i}]"),
                name,
                "is not an event name: letters, digits, `_`, `-` and `.`",
            ));
        }
    }
    let skew = errors.check(error::duration(&w.max_clock_skew).at("webhook.max_clock_skew"));
    let explicit_age = match &w.max_event_age {
        Some(age) => errors
            .check(error::duration(age).at("webhook.max_event_age"))
            .map(Some),
        None => Some(None),
    };
    let (Some(skew), Some(explicit_age)) = (skew, explicit_age) else {
        return Err(errors.into());
    };
    let dedup_window = store.dedup_window;
    let max_event_age = match (explicit_age, &w.max_event_age) {
        (Some(age), Some(written)) => {
            if age.saturating_add(skew) > dedup_window {
                errors.push(ConfigError::invalid(
                    "webhook.max_event_age",
                    written,
                    format!(
                        "plus webhook.max_clock_skew ({:?}) exceeds store.dedup_window ({:?}): \
                         a body dated up to max_clock_skew ahead is accepted until it is \
                         max_event_age old, so its dedup key must be kept that long, or the \
                         body is accepted again as new once its key is pruned; keep \
                         max_event_age + max_clock_skew <= dedup_window",
                        &*w.max_clock_skew, &*s.dedup_window
                    ),
                ));
            }
            age
        }
        _ => match dedup_window.checked_sub(skew).filter(|age| !age.is_zero()) {
            Some(age) => age,
            None => {
                errors.push(ConfigError::invalid(
                    "store.dedup_window",
                    &s.dedup_window,
                    format!(
                        "must be longer than webhook.max_clock_skew ({:?}): a body dated up to \
                         max_clock_skew ahead is accepted until it is webhook.max_event_age \
                         old (by default dedup_window - max_clock_skew), so its dedup key must \
                         outlive both; raise store.dedup_window or lower webhook.max_clock_skew",
                        &*w.max_clock_skew
                    ),
                ));
                Duration::ZERO
            }
        },
    };
    errors.or(WebhookConfig {
        secrets,
        max_event_age,
        max_clock_skew: skew,
    })
}

/// Each kept attempt costs up to about 1.7 KB (its error and the start of the answer), so
/// a delivery's history stays under about 170 KB.
const MAX_ATTEMPTS_KEPT: usize = 100;

fn delivery(d: &RawDelivery) -> Result<DeliveryConfig, ConfigError> {
    let mut errors = Errors::default();
    let max_attempts = errors.check(
        error::positive(d.max_attempts)
            .at("delivery.max_attempts")
            .and_then(|n| {
                u32::try_from(n).map_err(|_| {
                    ConfigError::invalid("delivery.max_attempts", d.max_attempts, "is too large")
                })
            }),
    );
    let attempts_kept = errors.check(
        usize::try_from(d.attempts_kept)
            .ok()
            .filter(|n| *n <= MAX_ATTEMPTS_KEPT)
            .ok_or_else(|| {
                ConfigError::invalid(
                    "delivery.attempts_kept",
                    d.attempts_kept,
                    format!("must be at most {MAX_ATTEMPTS_KEPT}"),
                )
            }),
    );
    let backoff_initial =
        errors.check(error::duration(&d.backoff_initial).at("delivery.backoff_initial"));
    let backoff_max = errors.check(error::duration(&d.backoff_max).at("delivery.backoff_max"));
    if let (Some(initial), Some(max)) = (backoff_initial, backoff_max)
        && max < initial
    {
        errors.push(ConfigError::invalid(
            "delivery.backoff_max",
            &d.backoff_max,
            format!(
                "must not be shorter than delivery.backoff_initial ({:?})",
                &*d.backoff_initial
            ),
        ));
    }
    let (Some(max_attempts), Some(backoff_initial), Some(backoff_max), Some(attempts_kept)) =
        (max_attempts, backoff_initial, backoff_max, attempts_kept)
    else {
        return Err(errors.into());
    };
    errors.or(DeliveryConfig {
        max_attempts,
        backoff_initial,
        backoff_max,
        attempts_kept,
        record_successes: d.record_successes,
    })
}

/// The levels `log.level` may name alone (tracing's, as it parses them).
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

fn log(l: &RawLog) -> Result<LogConfig, ConfigError> {
    let mut errors = Errors::default();
    let format = match l.format.as_str() {
        "text" => Some(LogFormat::Text),
        "json" => Some(LogFormat::Json),
        other => {
            errors.push(ConfigError::invalid(
                "log.format",
                other,
                format!(
                    "must be \"text\" or \"json\"{}",
                    near(other, ["text", "json"])
                ),
            ));
            None
        }
    };
    if let Err(reason) = log_level(&l.level) {
        errors.push(ConfigError::invalid("log.level", &l.level, reason));
    }
    let Some(format) = format else {
        return Err(errors.into());
    };
    errors.or(LogConfig {
        level: l.level.clone(),
        format,
    })
}

/// A level, or a filter such as `info,vyora_router=debug`. tracing reads a word that is
/// not a level as a target to show at every level, so a misspelt level (`inf`) would
/// silence every line: a directive without `=` must be a level.
fn log_level(level: &str) -> Result<(), String> {
    let example = "such as \"info\" or \"info,vyora_router=debug\"";
    if level.trim().is_empty() {
        return Err(format!("names no level; write a level or filter {example}"));
    }
    for directive in level.split(',').map(str::trim) {
        let plain = !directive.contains(['=', '[', '{']);
        if plain
            && directive
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
        {
            return Err(format!(
                "{directive:?} is not a level{}: the levels are {}; a target's own level is \
                 written target=level, as in \"info,vyora_router=debug\"",
                near(&directive.to_ascii_lowercase(), LEVELS),
                LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map(drop)
        .map_err(|e| format!("not a level or filter {example} ({e})"))
}

/// ` (did you mean "x"?)` when `word` is close to one of `candidates`; else nothing.
fn near<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    suggest(word, candidates)
        .map(|c| format!(" (did you mean {c:?}?)"))
        .unwrap_or_default()
}

/// `api`: the API's checked settings, when they were valid (the poller needs its key).
fn poller(p: &RawPoller, api: Option<&ApiConfig>) -> Result<PollerConfig, ConfigError> {
    let mut errors = Errors::default();
    if p.enabled && api.is_some_and(|api| api.api_key.is_none()) {
        errors.push(ConfigError::invalid(
            "poller.enabled",
            "true",
            format!("needs an API key: set api.api_key or the {API_KEY_ENV} environment variable"),
        ));
    }
    let wait_for_analysis =
        errors.check(error::duration(&p.wait_for_analysis).at("poller.wait_for_analysis"));
    let interval = errors.check(error::duration(&p.interval).at("poller.interval"));
    let give_up_after = errors.check(error::duration(&p.give_up_after).at("poller.give_up_after"));
    let (Some(wait_for_analysis), Some(interval), Some(give_up_after)) =
        (wait_for_analysis, interval, give_up_after)
    else {
        return Err(errors.into());
    };
    errors.or(PollerConfig {
        enabled: p.enabled,
        wait_for_analysis,
        interval,
        give_up_after,
    })
}

/// Every sink that was read, each checked; their tables take their type's defaults, so
/// that `check-config` shows them.
fn sinks(raw: &mut RawConfig, errors: &mut Errors) -> Vec<SinkConfig> {
    let extra = &raw.webhook.extra_events;
    let mut sinks: Vec<SinkConfig> = Vec::with_capacity(raw.sinks.len());
    for raw in &mut raw.sinks {
        let Some(sink) = errors.check(sink(raw, extra)) else {
            continue;
        };
        if sinks.iter().any(|other| other.name == sink.name) {
            errors.push(ConfigError::invalid(
                format!("sinks[{}].name", raw.index),
                &sink.name,
                "is used by another sink",
            ));
        }
        sinks.push(sink);
    }
    sinks
}

/// The route of the sink named `name` (its events and filter), checked as `sink` checks
/// them; `None` when no sink has that name.
pub(super) fn route(raw: &RawConfig, name: &str) -> Result<Option<Route>, ConfigError> {
    let Some(sink) = raw.sinks.iter().find(|s| s.name == name) else {
        return Ok(None);
    };
    let at = format!("sinks[{}]", sink.index);
    Ok(Some(Route {
        sink: name.into(),
        events: EventSelector::parse(&sink.events, &raw.webhook.extra_events)
            .at(&format!("{at}.events"))?,
        filter: Filter::parse(&sink.filter).at(&format!("{at}.filter"))?,
    }))
}

/// One `[[sinks]]` table: the keys every sink has here/// One `[[sinks]]` table: the keys every sink has here, its type's own keys by the
/// type's options struct, which names them below `sinks[i]`.
fn sink(raw: &mut RawSink, extra_events: &[String]) -> Result<SinkConfig, ConfigError> {
    let at = format!("sinks[{}]", raw.index);
    let mut errors = Errors::default();
    let name = errors.check(sink_name(&format!("{at}.name"), &raw.name));
    let events =
        errors.check(EventSelector::parse(&raw.events, extra_events).at(&format!("{at}.events")));
    let filter = errors.check(Filter::parse(&raw.filter).at(&format!("{at}.filter")));
    let redact = errors.check(Redaction::parse(&raw.redact).at(&format!("{at}.redact")));
    let flow = errors.check(flow(raw, &at));
    let kind = match raw.kind.as_str() {
        "file" => errors
            .check(options::<FileOptions>(raw).and_then(|o| o.validate().at(&at)))
            .map(SinkKind::File),
        "http" => errors
            .check(options::<HttpOptions>(raw).and_then(|o| o.validate().at(&at)))
            .map(|c| SinkKind::Http(Box::new(c))),
        "amqp" => errors
            .check(options::<AmqpOptions>(raw).and_then(|o| o.validate().at(&at)))
            .map(|c| SinkKind::Amqp(Box::new(c))),
        "redis" => errors
            .check(options::<RedisOptions>(raw).and_then(|o| o.validate().at(&at)))
            .map(|c| SinkKind::Redis(Box::new(c))),
        "nats" => errors
            .check(options::<NatsOptions>(raw).and_then(|o| o.validate().at(&at)))
            .map(|c| SinkKind::Nats(Box::new(c))),
        other => {
            errors.push(ConfigError::invalid(
                format!("{at}.type"),
                other,
                format!(
                    "is not a sink type{}; use \"file\", \"http\", \"amqp\", \"redis\" or \"nats\"",
                    near(other, SINK_TYPES)
                ),
            ));
            None
        }
    };
    let (Some(name), Some(events), Some(filter), Some(redact), Some(flow), Some(kind)) =
        (name, events, filter, redact, flow, kind)
    else {
        return Err(errors.into());
    };
    errors.or(SinkConfig {
        // A digest, not the text: the table holds secrets.
        fingerprint: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            toml::to_string(raw).unwrap_or_default(),
        )),
        name,
        events,
        filter,
        redact,
        flow,
        kind,
    })
}

/// A sink's `rate_limit` and `circuit_breaker`.
fn flow(raw: &RawSink, at: &str) -> Result<Flow, ConfigError> {
    let rate_limit = match &raw.rate_limit {
        Some(limit) => Some(RateLimit::parse(limit).at(&format!("{at}.rate_limit"))?),
        None => None,
    };
    let b = &raw.circuit_breaker;
    let breaker = Breaker::parse(b.failures, &b.cool_down).at(&format!("{at}.circuit_breaker"))?;
    Ok(Flow {
        rate_limit,
        breaker,
    })
}

const SINK_TYPES: [&str; 5] = ["file", "http", "amqp", "redis", "nats"];

/// The type's own keys, read by `T`, which refuses every key it does not know; the
/// error suggests the nearest key a sink of this type has. Read, the table is replaced by
/// `T`'s rendering, so that it shows the defaults of the keys left out.
fn options<T: DeserializeOwned + Serialize>(raw: &mut RawSink) -> Result<T, ConfigError> {
    let at = format!("sinks[{}]", raw.index);
    let (read, refusals) = leniently::<T>(Value::Dict(Tag::Default, raw.options.clone()));
    let mut errors = Errors::default();
    for (mut e, _) in refusals {
        match &e.kind {
            figment::error::Kind::UnknownField(field, own_keys) => {
                let keys = || COMMON_SINK_KEYS.split(", ").chain(own_keys.iter().copied());
                errors.push(ConfigError::invalid(
                    format!("{at}.{field}"),
                    field,
                    format!(
                        "is not a key of a sink of type {:?}{}; its keys are {}",
                        raw.kind,
                        near(field, keys()),
                        keys().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            _ => {
                e.path.insert(0, at.clone());
                errors.push(ConfigError::Syntax(FigmentReport(Box::new(e))));
            }
        }
    }
    let Some(read) = read else {
        return Err(errors.into());
    };
    if let Ok(Value::Dict(_, table)) = Value::serialize(&read) {
        raw.options = table;
    }
    errors.or(read)
}

/// Sink names appear in the database, logs and metrics labels, so keep them plain.
fn sink_name(key: &str, name: &str) -> Result<String, ConfigError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if !ok {
        return Err(ConfigError::invalid(
            key,
            name,
            "must be 1 to 64 letters, digits, `_` or `-`",
        ));
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{HTTP_SINK, MINIMAL, error_of};
    use super::*;

    #[test]
    fn errors_name_the_key_and_the_value() {
        let cases = [
            (
                "[server]\nlisten = \"localhost\"\n",
                "server.listen",
                "localhost",
            ),
            (
                "[server]\nack_timeout = \"4 parsecs\"\n",
                "server.ack_timeout",
                "4 parsecs",
            ),
            (
                "[server]\nmax_body_bytes = 0\n",
                "server.max_body_bytes",
                "0",
            ),
            (
                "[server]\nwebhook_path = \"hook\"\n",
                "server.webhook_path",
                "hook",
            ),
            (
                "[server]\nwebhook_path = \"/metrics\"\n",
                "server.webhook_path",
                "/metrics",
            ),
            (
                "[server]\nwebhook_path = \"/readyz\"\n",
                "server.webhook_path",
                "/readyz",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:9000\"\n[admin]\nlisten = \"127.0.0.1:9000\"\n",
                "admin.listen",
                "127.0.0.1:9000",
            ),
            (
                "[server]\nmax_buffered_body_bytes = 1000\n",
                "server.max_buffered_body_bytes",
                "1000",
            ),
            (
                "[server]\nlisten_on = \"x\"\n",
                "server.listen_on",
                "listen_on",
            ),
            (
                "[store]\nsynchronous = \"sometimes\"\n",
                "store.synchronous",
                "sometimes",
            ),
            (
                "[store]\ncommit_interval = \"11ms\"\n",
                "store.commit_interval",
                "11ms",
            ),
            (
                "[store]\ncommit_interval = \"soon\"\n",
                "store.commit_interval",
                "soon",
            ),
            (
                "[delivery]\nmax_attempts = -3\n",
                "delivery.max_attempts",
                "-3",
            ),
            (
                "[delivery]\nbackoff_max = \"10ms\"\n",
                "delivery.backoff_max",
                "10ms",
            ),
            ("[log]\nformat = \"xml\"\n", "log.format", "xml"),
            (
                "[[sinks]]\ntype = \"kafka\"\nname = \"k\"\n",
                "sinks[0].type",
                "kafka",
            ),
            (
                "[[sinks]]\ntype = \"file\"\nname = \"f\"\npth = \"x\"\n",
                "sinks[0].pth",
                "pth",
            ),
            (
                "[[sinks]]\ntype = \"file\"\nname = \"a b\"\npath = \"x\"\n",
                "sinks[0].name",
                "a b",
            ),
            (
                "[[sinks]]\ntype = \"file\"\nname = \"f\"\npath = \"x\"\nevents = [\"call ended\"]\n",
                "sinks[0].events",
                "call ended",
            ),
            (
                "[[sinks]]\ntype = \"file\"\nname = \"f\"\npath = \"x\"\n[[sinks]]\ntype = \"file\"\nname = \"f\"\npath = \"y\"\n",
                "sinks[1].name",
                "f",
            ),
        ];
        for (text, key, value) in cases {
            let e = error_of(&format!("{MINIMAL}{text}"));
            assert!(
                e.contains(key) && e.contains(value),
                "error {e:?} should name {key} and {value}"
            );
        }
    }

    #[test]
    fn a_commit_interval_of_zero_commits_at_once_and_up_to_ten_milliseconds_is_accepted() {
        for (text, expected) in [
            ("0s", Duration::ZERO),
            ("250us", Duration::from_micros(250)),
            ("10ms", Duration::from_millis(10)),
        ] {
            let c = Config::from_toml(&format!("{MINIMAL}[store]\ncommit_interval = \"{text}\"\n"))
                .expect("valid");
            assert_eq!(c.store.commit_interval, expected, "{text}");
        }
    }

    #[test]
    fn an_http_sink_is_read_with_its_filter_and_redaction() {
        let c = Config::from_toml(&format!("{MINIMAL}{HTTP_SINK}")).expect("valid");
        let sink = &c.sinks[0];
        assert!(!sink.redact.is_empty());
        assert!(sink.events.matches("call_completed") && !sink.events.matches("call_started"));
        let SinkKind::Http(http) = &sink.kind else {
            panic!("an http sink: {sink:?}");
        };
        assert_eq!(http.timeout, Duration::from_secs(3));
        assert_eq!(http.concurrency, 4);
        assert!(http.secret.is_some());
        assert_eq!(http.headers.len(), 1);
    }

    #[test]
    fn http_sink_errors_name_the_key_and_the_value() {
        let sink =
            |extra: &str| format!("{MINIMAL}[[sinks]]\nname = \"crm\"\ntype = \"http\"\n{extra}");
        let cases = [
            ("url = \"ftp://x/y\"\n", "sinks[0].url", "ftp://x/y"),
            ("url = \"not a url\"\n", "sinks[0].url", "not a url"),
            (
                "url = \"http://x\"\nconcurrency = 0\n",
                "sinks[0].concurrency",
                "0",
            ),
            (
                "url = \"http://x\"\ntimeout = \"never\"\n",
                "sinks[0].timeout",
                "never",
            ),
            (
                "url = \"http://x\"\nheaders = { \"X-Vyora-Signature\" = \"v\" }\n",
                "sinks[0].headers.X-Vyora-Signature",
                "X-Vyora-Signature",
            ),
            (
                "url = \"http://x\"\nfilter = { agent = [\"a\"] }\n",
                "sinks[0].filter.agent",
                "agent",
            ),
            (
                "url = \"http://x\"\nredact = [\"email\"]\n",
                "sinks[0].redact",
                "email",
            ),
            (
                "url = \"http://x\"\npath = \"p\"\n",
                "sinks[0].path",
                "path",
            ),
        ];
        for (extra, key, value) in cases {
            let e = error_of(&sink(extra));
            assert!(
                e.contains(key) && e.contains(value),
                "error {e:?} should name {key} and {value}"
            );
        }
    }

    #[test]
    fn every_error_of_the_file_is_reported_in_one_run() {
        let text = format!(
            "{MINIMAL}[server]\nlisten_on = \"x\"\nack_timeout = \"soon\"\nmax_connections = 0\n\
             [store]\nsynchronous = \"sometimes\"\n[delivery]\nmax_attempts = \"many\"\n\
             [log]\nlevel = \"inf\"\n\
             [[sinks]]\nname = \"a b\"\ntype = \"file\"\npath = \"x\"\nevents = [\"call_complete\"]\n\
             [[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"http://x\"\ntimeout = 4\n"
        );
        let e = error_of(&text);
        for key in [
            "server.listen_on",
            "server.ack_timeout",
            "server.max_connections",
            "store.synchronous",
            "delivery.max_attempts",
            "log.level",
            "sinks[0].name",
            "sinks[0].events",
            "sinks[1].timeout",
        ] {
            assert!(e.contains(&format!("`{key}`")), "{key} not named in:\n{e}");
        }
        assert!(e.starts_with("9 errors in the config:"), "{e}");
        assert_eq!(e.lines().count(), 10, "one line each:\n{e}");
    }

    #[test]
    fn a_duration_of_the_wrong_type_or_form_says_what_a_duration_looks_like() {
        for text in [
            "[server]\nack_timeout = 4\n".to_owned(),
            "[server]\nack_timeout = \"4 seconds please\"\n".to_owned(),
            "[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"http://x\"\ntimeout = 4\n"
                .to_owned(),
            "[api]\ntimeout = 10\n".to_owned(),
        ] {
            let e = error_of(&format!("{MINIMAL}{text}"));
            assert!(e.contains("expected a duration like \"4s\""), "{e}");
        }
    }

    #[test]
    fn an_unknown_key_suggests_the_nearest_one_without_nested_backticks() {
        for (text, key, near) in [
            (
                "[server]\nlisten_on = \"x\"\n",
                "`server.listen_on`",
                "`listen`",
            ),
            ("[servr]\nlisten = \"x\"\n", "`servr`", "`server`"),
            ("[admin]\nlisen = \"x\"\n", "`admin.lisen`", "`listen`"),
            (
                "[[sinks]]\nname = \"f\"\ntype = \"file\"\npth = \"x\"\n",
                "`sinks[0].pth`",
                "\"path\"",
            ),
        ] {
            let e = error_of(&format!("{MINIMAL}{text}"));
            assert!(
                e.contains(key) && e.contains(&format!("did you mean {near}?")),
                "{e}"
            );
            assert!(!e.contains("``") && !e.contains("`one of"), "{e}");
        }
        let e = error_of(&format!("{MINIMAL}[server]\nzzz = 1\n"));
        assert!(
            e.contains("unknown key; the keys here are listen, webhook_path"),
            "with nothing near, the keys are listed: {e}"
        );
    }

    #[test]
    fn a_listen_address_may_name_a_host() {
        let c = Config::from_toml(&format!(
            "{MINIMAL}[server]\nlisten = \"localhost:8080\"\n[admin]\nlisten = \"localhost:9464\"\n"
        ))
        .expect("localhost resolves");
        assert!(c.server.listen.ip().is_loopback(), "{:?}", c.server.listen);
        assert_eq!(c.server.listen.port(), 8080);
        assert!(c.admin.listen.ip().is_loopback() && c.admin.listen.port() == 9464);
        let e = error_of(&format!("{MINIMAL}[server]\nlisten = \"localhost\"\n"));
        assert!(
            e.contains("server.listen") && e.contains("has no port"),
            "{e}"
        );
    }

    #[test]
    fn a_log_level_that_is_not_a_level_is_refused_with_the_one_it_resembles() {
        for level in ["inf", "vyora_router", "info,debg", ""] {
            let e = error_of(&format!("{MINIMAL}[log]\nlevel = \"{level}\"\n"));
            assert!(e.contains("log.level"), "{level:?}: {e}");
        }
        let e = error_of(&format!("{MINIMAL}[log]\nlevel = \"inf\"\n"));
        assert!(e.contains("did you mean \"info\"?"), "{e}");
        for level in [
            "info",
            "WARN",
            "off",
            "vyora_router=debug",
            "info,vyora_router=trace",
        ] {
            let c = Config::from_toml(&format!("{MINIMAL}[log]\nlevel = \"{level}\"\n"));
            assert!(c.is_ok(), "{level:?}: {:?}", c.err());
        }
    }

    #[test]
    fn a_sink_may_name_an_undocumented_event_only_once_it_is_declared() {
        let sink = "[[sinks]]\nname = \"f\"\ntype = \"file\"\npath = \"x\"\nevents = [\"call_transferred\"]\n";
        let e = error_of(&format!("{MINIMAL}{sink}"));
        assert!(
            e.contains("sinks[0].events") && e.contains("webhook.extra_events"),
            "{e}"
        );
        let text =
            format!("[webhook]\nsecrets = [\"s\"]\nextra_events = [\"call_transferred\"]\n{sink}");
        let c = Config::from_toml(&text).expect("declared");
        assert!(c.sinks[0].events.matches("call_transferred"));
        let e = error_of("[webhook]\nsecrets = [\"s\"]\nextra_events = [\"call ended\"]\n");
        assert!(
            e.contains("webhook.extra_events[0]") && e.contains("call ended"),
            "{e}"
        );
    }

    /// The relation the replay guard needs: a key stored when a body arrives lives
    /// `dedup_window`; the body may be dated `max_clock_skew` ahead and is accepted until
    /// it is `max_event_age` old.
    fn replay_outlives_its_key(c: &Config) -> bool {
        c.webhook.max_event_age + c.webhook.max_clock_skew > c.store.dedup_window
    }

    #[test]
    fn the_default_event_age_leaves_room_for_the_clock_skew() {
        let c = Config::from_toml(MINIMAL).expect("valid");
        assert!(!replay_outlives_its_key(&c));
        assert_eq!(
            c.webhook.max_event_age,
            Duration::from_secs(90 * 86_400 - 5 * 60)
        );
        let c = Config::from_toml(
            "[store]\nretention = \"1s\"\ndedup_window = \"8s\"\n\
             [webhook]\nsecrets = [\"s\"]\nmax_clock_skew = \"2s\"\n",
        )
        .expect("valid");
        assert_eq!(c.webhook.max_event_age, Duration::from_secs(6));
        assert!(!replay_outlives_its_key(&c));
    }

    #[test]
    fn a_dedup_window_shorter_than_the_event_age_and_clock_skew_is_refused_naming_all_three() {
        // As reported: an 8 s window under the default 5 min skew forwarded one body 5 times.
        let e = error_of(&format!(
            "{MINIMAL}[store]\nretention = \"8s\"\ndedup_window = \"8s\"\n"
        ));
        for named in [
            "store.dedup_window",
            "\"8s\"",
            "webhook.max_clock_skew",
            "\"5m\"",
            "webhook.max_event_age",
        ] {
            assert!(e.contains(named), "{named} not in {e}");
        }
        let e = error_of(
            "[store]\nretention = \"8s\"\ndedup_window = \"8s\"\n\
             [webhook]\nsecrets = [\"s\"]\nmax_clock_skew = \"2s\"\nmax_event_age = \"7s\"\n",
        );
        for named in [
            "webhook.max_event_age",
            "\"7s\"",
            "webhook.max_clock_skew",
            "\"2s\"",
            "store.dedup_window",
            "\"8s\"",
        ] {
            assert!(e.contains(named), "{named} not in {e}");
        }
        let c = Config::from_toml(
            "[store]\nretention = \"8s\"\ndedup_window = \"8s\"\n\
             [webhook]\nsecrets = [\"s\"]\nmax_clock_skew = \"2s\"\nmax_event_age = \"6s\"\n",
        )
        .expect("exactly enough");
        assert!(!replay_outlives_its_key(&c));
    }
}
