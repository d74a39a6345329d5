//! The file's schema checked into the typed [`Config`] (ripgrep's `hiargs`): one function
//! per section, every refusal naming the key and the value. A section whose limits depend
//! on another's (the admin listener on the server's, the event age on the store's dedup
//! window, the poller on the API key) is checked after it and given its checked values.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::error::{self, ConfigError, FigmentReport, InvalidAt};
use super::raw::{
    COMMON_SINK_KEYS, RawAdmin, RawConfig, RawDelivery, RawLog, RawPoller, RawServer, RawSink,
    RawStore, RawWebhook,
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
use crate::routing::{EventSelector, Filter};
use crate::signature::Secret;
use crate::sinks::amqp::AmqpOptions;
use crate::sinks::file::FileOptions;
use crate::sinks::http::HttpOptions;
use crate::sinks::{SinkConfig, SinkKind};

impl RawConfig {
    pub(super) fn validate(self) -> Result<Config, ConfigError> {
        let server = server(&self.server)?;
        let admin = admin(&self.admin, &server)?;
        let store = store(&self.store, &server)?;
        let webhook = webhook(&self.webhook, &self.store, store.dedup_window)?;
        let delivery = delivery(&self.delivery)?;
        let log = log(&self.log)?;
        let sinks = sinks(&self.sinks)?;
        let api = self.api.validate().at("api")?;
        let poller = poller(&self.poller, &api)?;
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
            redacted: Redacted::of(&self),
        })
    }
}

fn listen_address(key: &str, value: &str, example: &str) -> Result<SocketAddr, ConfigError> {
    value.parse::<SocketAddr>().map_err(|_| {
        ConfigError::invalid(
            key,
            value,
            format!("not an IP address and port such as \"{example}\""),
        )
    })
}

pub(super) fn server(s: &RawServer) -> Result<ServerConfig, ConfigError> {
    let listen = listen_address("server.listen", &s.listen, "127.0.0.1:8080")?;
    if !s.webhook_path.starts_with('/') {
        return Err(ConfigError::invalid(
            "server.webhook_path",
            &s.webhook_path,
            "must start with `/`",
        ));
    }
    if RESERVED_PATHS.contains(&s.webhook_path.as_str()) {
        return Err(ConfigError::invalid(
            "server.webhook_path",
            &s.webhook_path,
            format!(
                "is reserved: the router answers {} itself",
                RESERVED_PATHS.join(", ")
            ),
        ));
    }
    let server = ServerConfig {
        listen,
        webhook_path: s.webhook_path.clone(),
        max_body_bytes: error::count(s.max_body_bytes).at("server.max_body_bytes")?,
        header_read_timeout: error::duration(&s.header_read_timeout)
            .at("server.header_read_timeout")?,
        ack_timeout: error::duration(&s.ack_timeout).at("server.ack_timeout")?,
        max_connections: error::count(s.max_connections).at("server.max_connections")?,
        shutdown_timeout: error::duration(&s.shutdown_timeout).at("server.shutdown_timeout")?,
        max_buffered_body_bytes: error::count(s.max_buffered_body_bytes)
            .at("server.max_buffered_body_bytes")?,
    };
    if s.max_buffered_body_bytes < s.max_body_bytes
        || s.max_buffered_body_bytes > u64::from(u32::MAX)
    {
        return Err(ConfigError::invalid(
            "server.max_buffered_body_bytes",
            s.max_buffered_body_bytes,
            format!(
                "must be at least server.max_body_bytes ({}) and at most {} (4 GiB)",
                s.max_body_bytes,
                u32::MAX
            ),
        ));
    }
    Ok(server)
}

fn admin(a: &RawAdmin, server: &ServerConfig) -> Result<AdminConfig, ConfigError> {
    let listen = listen_address("admin.listen", &a.listen, "127.0.0.1:9464")?;
    if listen == server.listen && listen.port() != 0 {
        return Err(ConfigError::invalid(
            "admin.listen",
            &a.listen,
            "must differ from server.listen: operator endpoints have a listener of their own",
        ));
    }
    Ok(AdminConfig { listen })
}

/// The longest `store.commit_interval`. Every acknowledgement may wait for it, so a
/// connection that waits for each answer gets at most one per interval: past a few
/// milliseconds that costs senders far more than the bytes it saves (see README).
const MAX_COMMIT_INTERVAL: Duration = Duration::from_millis(10);

pub(super) fn store(s: &RawStore, server: &ServerConfig) -> Result<StoreConfig, ConfigError> {
    let backend = match s.backend.as_str() {
        "sqlite" => StoreBackend::Sqlite,
        "postgres" => StoreBackend::Postgres(Box::new(postgres(s)?)),
        other => {
            return Err(ConfigError::invalid(
                "store.backend",
                other,
                "must be \"sqlite\" or \"postgres\"",
            ));
        }
    };
    if backend == StoreBackend::Sqlite && s.path.is_empty() {
        return Err(ConfigError::invalid(
            "store.path",
            &s.path,
            "must name a file",
        ));
    }
    let retention = error::duration(&s.retention).at("store.retention")?;
    let dedup_window = error::duration(&s.dedup_window).at("store.dedup_window")?;
    if dedup_window < retention {
        return Err(ConfigError::invalid(
            "store.dedup_window",
            &s.dedup_window,
            format!("must not be shorter than store.retention ({})", s.retention),
        ));
    }
    if u64::try_from(server.max_body_bytes).is_ok_and(|max| s.quarantine_max_bytes < max) {
        return Err(ConfigError::invalid(
            "store.quarantine_max_bytes",
            s.quarantine_max_bytes,
            format!(
                "must be at least server.max_body_bytes ({}), so one body always fits",
                server.max_body_bytes
            ),
        ));
    }
    let synchronous = match s.synchronous.as_str() {
        "full" => Synchronous::Full,
        "normal" => Synchronous::Normal,
        other => {
            return Err(ConfigError::invalid(
                "store.synchronous",
                other,
                "must be \"full\" or \"normal\"",
            ));
        }
    };
    let commit_interval =
        error::duration_or_zero(&s.commit_interval).at("store.commit_interval")?;
    if commit_interval > MAX_COMMIT_INTERVAL {
        return Err(ConfigError::invalid(
            "store.commit_interval",
            &s.commit_interval,
            "must be at most 10ms: every acknowledgement may wait this long for its commit",
        ));
    }
    Ok(StoreConfig {
        lease: error::duration(&s.lease).at("store.lease")?,
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
    if s.url.is_empty() {
        return Err(ConfigError::invalid(
            "store.url",
            "",
            format!("is needed with backend = \"postgres\": set it, or {DATABASE_URL_ENV}"),
        ));
    }
    let mut pg = PostgresConfig::from_url(&s.url)
        .map_err(|e| ConfigError::invalid("store.url", error::REDACTED, e.to_string()))?;
    super::postgres::check_schema(&s.schema)
        .map_err(|reason| ConfigError::invalid("store.schema", &s.schema, reason))?;
    pg.schema.clone_from(&s.schema);
    pg.pool_size = error::count(s.pool_size).at("store.pool_size")?;
    Ok(pg)
}

/// The store's dedup window bounds how old an event may be: a replay must never outlive
/// its dedup record.
fn webhook(
    w: &RawWebhook,
    store: &RawStore,
    dedup_window: Duration,
) -> Result<WebhookConfig, ConfigError> {
    if w.secrets.is_empty() {
        return Err(ConfigError::MissingSecret { env: SECRET_ENV });
    }
    let secrets = w
        .secrets
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Secret::new(s.as_bytes()).map_err(|e| {
                ConfigError::invalid(format!("webhook.secrets[{i}]"), "", e.to_string())
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let max_event_age = match &w.max_event_age {
        None => dedup_window,
        Some(age) => error::duration(age).at("webhook.max_event_age")?,
    };
    if max_event_age > dedup_window {
        return Err(ConfigError::invalid(
            "webhook.max_event_age",
            w.max_event_age.as_deref().unwrap_or_default(),
            format!(
                "must not exceed store.dedup_window ({}): a replay older than its dedup record would be accepted again",
                store.dedup_window
            ),
        ));
    }
    Ok(WebhookConfig {
        secrets,
        max_event_age,
        max_clock_skew: error::duration(&w.max_clock_skew).at("webhook.max_clock_skew")?,
    })
}

fn delivery(d: &RawDelivery) -> Result<DeliveryConfig, ConfigError> {
    let max_attempts = u32::try_from(error::positive(d.max_attempts).at("delivery.max_attempts")?)
        .map_err(|_| {
            ConfigError::invalid("delivery.max_attempts", d.max_attempts, "is too large")
        })?;
    let backoff_initial = error::duration(&d.backoff_initial).at("delivery.backoff_initial")?;
    let backoff_max = error::duration(&d.backoff_max).at("delivery.backoff_max")?;
    if backoff_max < backoff_initial {
        return Err(ConfigError::invalid(
            "delivery.backoff_max",
            &d.backoff_max,
            format!(
                "must not be shorter than delivery.backoff_initial ({})",
                d.backoff_initial
            ),
        ));
    }
    Ok(DeliveryConfig {
        max_attempts,
        backoff_initial,
        backoff_max,
    })
}

fn log(l: &RawLog) -> Result<LogConfig, ConfigError> {
    let format = match l.format.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(ConfigError::invalid(
                "log.format",
                other,
                "must be \"text\" or \"json\"",
            ));
        }
    };
    if tracing_subscriber::EnvFilter::try_new(&l.level).is_err() {
        return Err(ConfigError::invalid(
            "log.level",
            &l.level,
            "not a level or filter such as \"info\" or \"vyora_router=debug\"",
        ));
    }
    Ok(LogConfig {
        level: l.level.clone(),
        format,
    })
}

/// The poller needs the API's key; the API's settings are checked first.
fn poller(p: &RawPoller, api: &ApiConfig) -> Result<PollerConfig, ConfigError> {
    if p.enabled && api.api_key.is_none() {
        return Err(ConfigError::invalid(
            "poller.enabled",
            "true",
            format!("needs an API key: set api.api_key or the {API_KEY_ENV} environment variable"),
        ));
    }
    Ok(PollerConfig {
        enabled: p.enabled,
        wait_for_analysis: error::duration(&p.wait_for_analysis).at("poller.wait_for_analysis")?,
        interval: error::duration(&p.interval).at("poller.interval")?,
        give_up_after: error::duration(&p.give_up_after).at("poller.give_up_after")?,
    })
}

fn sinks(raw: &[RawSink]) -> Result<Vec<SinkConfig>, ConfigError> {
    let mut sinks: Vec<SinkConfig> = Vec::with_capacity(raw.len());
    for (i, raw) in raw.iter().enumerate() {
        let sink = sink(raw, i)?;
        if sinks.iter().any(|other| other.name == sink.name) {
            return Err(ConfigError::invalid(
                format!("sinks[{i}].name"),
                &sink.name,
                "is used by another sink",
            ));
        }
        sinks.push(sink);
    }
    Ok(sinks)
}

/// One `[[sinks]]` table: the keys every sink has here, its type's own keys by the
/// type's options struct, which names them below `sinks[i]`.
fn sink(raw: &RawSink, i: usize) -> Result<SinkConfig, ConfigError> {
    let at = format!("sinks[{i}]");
    let kind = match raw.kind.as_str() {
        "file" => SinkKind::File(options::<FileOptions>(raw, i)?.validate().at(&at)?),
        "http" => SinkKind::Http(Box::new(
            options::<HttpOptions>(raw, i)?.validate().at(&at)?,
        )),
        "amqp" => SinkKind::Amqp(Box::new(
            options::<AmqpOptions>(raw, i)?.validate().at(&at)?,
        )),
        other => {
            return Err(ConfigError::invalid(
                format!("{at}.type"),
                other,
                "is not a sink type; use \"file\", \"http\" or \"amqp\"",
            ));
        }
    };
    Ok(SinkConfig {
        // A digest, not the text: the table holds secrets.
        fingerprint: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            toml::to_string(raw).unwrap_or_default(),
        )),
        name: sink_name(&format!("{at}.name"), &raw.name)?,
        events: EventSelector::parse(&raw.events).at(&format!("{at}.events"))?,
        filter: Filter::parse(&raw.filter).at(&format!("{at}.filter"))?,
        redact: Redaction::parse(&raw.redact).at(&format!("{at}.redact"))?,
        kind,
    })
}

/// The type's own keys, read by `T`, which refuses every key it does not know; the
/// error lists the keys a sink of this type has, `T`'s as serde knows them.
fn options<T: DeserializeOwned>(raw: &RawSink, i: usize) -> Result<T, ConfigError> {
    let value = figment::value::Value::Dict(figment::value::Tag::Default, raw.options.clone());
    value.deserialize::<T>().map_err(|e| match &e.kind {
        figment::error::Kind::UnknownField(field, own_keys) => ConfigError::invalid(
            format!("sinks[{i}].{field}"),
            field,
            format!(
                "is not a key of a {} sink; its keys are {COMMON_SINK_KEYS}, {}",
                raw.kind,
                own_keys.join(", ")
            ),
        ),
        _ => ConfigError::Sink {
            index: i,
            name: raw.name.clone(),
            report: FigmentReport(Box::new(e)),
        },
    })
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
}
