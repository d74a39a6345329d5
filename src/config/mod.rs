//! Configuration: one TOML file plus `VYORA_ROUTER_<SECTION>__<KEY>` overrides, read into
//! raw serde structs and then validated into typed settings, all before a port is bound.
//!
//! Every error names the key and the value it refused, so an operator can fix a config
//! without reading our source.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};

use crate::api::ApiKey;
use crate::protocol;
use crate::redact::Redaction;
use crate::routing::{EventSelector, Filter};
use crate::signature::Secret;
use crate::sinks::amqp::RoutingKey;

/// Where `serve` and `check-config` look when no `--config` is given.
pub const DEFAULT_PATH: &str = "config/router.toml";
/// The commented example config, built into the binary so that a bare `serve` runs.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/router.toml");
/// Prefix of environment overrides: `VYORA_ROUTER_SERVER__LISTEN` sets `server.listen`.
pub const ENV_PREFIX: &str = "VYORA_ROUTER_";
/// Webhook secrets from the environment (comma-separated), used when the file has none.
pub const SECRET_ENV: &str = "VYORA_WEBHOOK_SECRET";
/// The REST API key from the environment, used when the file has none.
pub const API_KEY_ENV: &str = "VYORA_API_KEY";
const REDACTED: &str = "<redacted>";

/// Where the config text comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    /// The built-in default, used when the default path does not exist.
    Embedded,
}

impl ConfigSource {
    /// `--config PATH` if given; else the default path if it exists; else the built-in copy.
    pub fn resolve(explicit: Option<PathBuf>) -> ConfigSource {
        match explicit {
            Some(path) => ConfigSource::File(path),
            None if Path::new(DEFAULT_PATH).exists() => ConfigSource::File(DEFAULT_PATH.into()),
            None => ConfigSource::Embedded,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Syntax(FigmentReport),
    #[error("`sinks[{index}]` ({name}): {report}")]
    Sink {
        index: usize,
        name: String,
        report: FigmentReport,
    },
    #[error("`{key}` = {value:?}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
    #[error(
        "no webhook secret is configured: set `webhook.secrets` in the config file, or the \
         {SECRET_ENV} environment variable (comma-separated to rotate), to the secret shown \
         in Vyora's Settings -> Integrations"
    )]
    MissingSecret,
}

/// A figment error rendered as `key: problem (source)`, without figment's profile prefix
/// and without anything that may be a secret: the value given for a key that holds one,
/// and the line a TOML syntax error is on. Errors end up in logs (a reload's, too).
#[derive(Debug)]
pub struct FigmentReport(Box<figment::Error>);

impl fmt::Display for FigmentReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.clone().into_iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            let kind = ShownKind {
                kind: &e.kind,
                secret: may_hold_secret(&e.path),
            };
            if e.path.is_empty() {
                write!(f, "{kind}")?;
            } else {
                write!(f, "`{}`: {kind}", e.path.join("."))?;
            }
            if let Some(meta) = &e.metadata {
                match &meta.source {
                    Some(source) => write!(f, " (in {} {source})", meta.name)?,
                    None => write!(f, " (in {})", meta.name)?,
                }
            }
        }
        Ok(())
    }
}

/// Keys whose value is, or may carry, a credential: a hook URL's path or query often is one.
const SECRET_KEYS: &[&str] = &["secrets", "secret", "api_key", "headers", "url", "base_url"];
/// Tables holding such keys: a value given in place of the whole table may be one of them.
const SECRET_TABLES: &[&str] = &["webhook", "api", "sinks"];

/// Whether the value at `path` (absolute, or relative to a sink's table) may be a secret.
fn may_hold_secret(path: &[String]) -> bool {
    match path {
        [] => true,
        [table] if SECRET_TABLES.contains(&table.as_str()) => true,
        [sinks, _] if sinks == "sinks" => true,
        _ => path.iter().any(|key| SECRET_KEYS.contains(&key.as_str())),
    }
}

/// A figment error kind, its value left out where that may be a secret.
struct ShownKind<'a> {
    kind: &'a figment::error::Kind,
    secret: bool,
}

impl fmt::Display for ShownKind<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use figment::error::Kind;
        match self.kind {
            Kind::Message(message) => match toml_syntax(message) {
                Some(syntax) => f.write_str(&syntax),
                None if self.secret => f.write_str("invalid value"),
                None => f.write_str(message),
            },
            _ if !self.secret => write!(f, "{}", self.kind),
            Kind::InvalidType(actual, expected) => {
                write!(
                    f,
                    "invalid type: found {}, expected {expected}",
                    kind_of(actual)
                )
            }
            Kind::InvalidValue(actual, expected) => {
                write!(
                    f,
                    "invalid value: found {}, expected {expected}",
                    kind_of(actual)
                )
            }
            Kind::ISizeOutOfRange(_) | Kind::USizeOutOfRange(_) => {
                f.write_str("integer out of range")
            }
            Kind::Unsupported(actual) | Kind::UnsupportedKey(actual, _) => {
                write!(f, "unsupported type: found {}", kind_of(actual))
            }
            other => write!(f, "{other}"),
        }
    }
}

/// What kind of value was found, without the value.
fn kind_of(actual: &figment::error::Actual) -> &'static str {
    use figment::error::Actual;
    match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a float",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Seq => "a sequence",
        Actual::Map => "a table",
        _ => "a value of another type",
    }
}

/// The TOML parser's message quotes the line it stopped on, which may hold a secret (an
/// unclosed quote after `secrets = ["`): keep the position and the reason, drop the quote.
/// `None` when `message` is not a positioned TOML error.
fn toml_syntax(message: &str) -> Option<String> {
    let mut lines = message.lines();
    let at = lines.next()?.strip_prefix("TOML parse error at ")?;
    let position = format!("not valid TOML at {at}");
    // A gutter, the quoted line and a caret line, each with a `|`; should that layout
    // ever change, say less rather than risk printing the line.
    if !lines.by_ref().take(3).all(|l| l.contains('|')) {
        return Some(position);
    }
    let reason: Vec<&str> = lines.map(str::trim).filter(|l| !l.is_empty()).collect();
    Some(if reason.is_empty() {
        position
    } else {
        format!("{position}: {}", reason.join("; "))
    })
}

fn invalid(
    key: impl Into<String>,
    value: impl fmt::Display,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------
// Raw structs: exactly what the file may say, with defaults, and nothing else.

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    server: RawServer,
    admin: RawAdmin,
    webhook: RawWebhook,
    store: RawStore,
    delivery: RawDelivery,
    api: RawApi,
    poller: RawPoller,
    log: RawLog,
    sinks: Vec<RawSink>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawApi {
    base_url: String,
    api_key: String,
    requests_per_minute: u64,
    timeout: String,
}

impl Default for RawApi {
    fn default() -> Self {
        RawApi {
            base_url: "https://api.vyora.ai".into(),
            api_key: String::new(),
            requests_per_minute: 60,
            timeout: "10s".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawPoller {
    enabled: bool,
    wait_for_analysis: String,
    interval: String,
    give_up_after: String,
}

impl Default for RawPoller {
    fn default() -> Self {
        RawPoller {
            enabled: false,
            wait_for_analysis: "5m".into(),
            interval: "30s".into(),
            give_up_after: "24h".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: String,
    webhook_path: String,
    max_body_bytes: u64,
    header_read_timeout: String,
    ack_timeout: String,
    max_connections: u64,
    shutdown_timeout: String,
    max_buffered_body_bytes: u64,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:8080".into(),
            webhook_path: "/webhook".into(),
            max_body_bytes: 1024 * 1024,
            header_read_timeout: "10s".into(),
            ack_timeout: "4s".into(),
            max_connections: 1024,
            shutdown_timeout: "20s".into(),
            max_buffered_body_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawWebhook {
    secrets: Vec<String>,
    /// Defaults to `store.dedup_window`.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_event_age: Option<String>,
    max_clock_skew: String,
}

impl Default for RawWebhook {
    fn default() -> Self {
        RawWebhook {
            secrets: Vec::new(),
            max_event_age: None,
            max_clock_skew: "5m".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    path: String,
    synchronous: String,
    retention: String,
    dedup_window: String,
    quarantine_max_bytes: u64,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            path: "data/router.db".into(),
            synchronous: "full".into(),
            retention: "30d".into(),
            dedup_window: "90d".into(),
            quarantine_max_bytes: 4 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawDelivery {
    max_attempts: u64,
    backoff_initial: String,
    backoff_max: String,
}

impl Default for RawDelivery {
    fn default() -> Self {
        RawDelivery {
            max_attempts: 12,
            backoff_initial: "1s".into(),
            backoff_max: "5m".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: String,
    format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// A `[[sinks]]` table: the keys every sink has, and the rest for its type to check.
#[derive(Debug, Clone, Deserialize, Serialize)]
struct RawSink {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default = "all_events")]
    events: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    filter: BTreeMap<String, Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    redact: Vec<String>,
    #[serde(flatten)]
    options: figment::value::Dict,
}

const COMMON_SINK_KEYS: &str = "name, type, events, filter, redact";

fn all_events() -> Vec<String> {
    vec![EventSelector::ALL.to_owned()]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOptions {
    path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpOptions {
    url: String,
    secret: Option<String>,
    #[serde(default = "default_http_timeout")]
    timeout: String,
    #[serde(default = "default_http_concurrency")]
    concurrency: u64,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AmqpOptions {
    url: String,
    exchange: String,
    #[serde(default = "default_exchange_type")]
    exchange_type: String,
    #[serde(default = "yes")]
    declare: bool,
    #[serde(default = "default_routing_key")]
    routing_key: String,
    #[serde(default = "yes")]
    mandatory: bool,
    #[serde(default = "default_confirm_timeout")]
    confirm_timeout: String,
    #[serde(default = "default_max_in_flight")]
    max_in_flight: u64,
}

fn default_exchange_type() -> String {
    "topic".into()
}

fn yes() -> bool {
    true
}

fn default_routing_key() -> String {
    "vyora.{event}".into()
}

fn default_confirm_timeout() -> String {
    "30s".into()
}

fn default_max_in_flight() -> u64 {
    256
}

fn default_http_timeout() -> String {
    "10s".into()
}

fn default_http_concurrency() -> u64 {
    8
}

/// Headers the HTTP sink sets itself; a static header may not replace them.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "transfer-encoding",
    "host",
    "user-agent",
    protocol::IDEMPOTENCY_HEADER,
    protocol::EVENT_HEADER,
    protocol::SOURCE_HEADER,
    protocol::SIGNATURE_HEADER,
];

// ---------------------------------------------------------------------------------------
// Validated settings: what the rest of the program uses.

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub webhook: WebhookConfig,
    pub store: StoreConfig,
    pub delivery: DeliveryConfig,
    pub api: ApiConfig,
    pub poller: PollerConfig,
    pub log: LogConfig,
    pub sinks: Vec<SinkConfig>,
    /// The effective settings as TOML with every secret replaced, for `check-config`.
    redacted: Redacted,
}

/// The two renderings `check-config` may print; a hook URL's path or query is often its key.
#[derive(Debug, Clone)]
struct Redacted {
    urls_redacted: String,
    urls_shown: String,
}

/// Whether the redacted rendering shows URL paths and queries; passwords it never shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Urls {
    Redacted,
    Shown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    pub base_url: reqwest::Url,
    /// `None` when neither `api.api_key` nor `VYORA_API_KEY` gives one.
    pub api_key: Option<ApiKey>,
    pub requests_per_minute: usize,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollerConfig {
    pub enabled: bool,
    pub wait_for_analysis: Duration,
    pub interval: Duration,
    pub give_up_after: Duration,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub webhook_path: String,
    pub max_body_bytes: usize,
    pub header_read_timeout: Duration,
    pub ack_timeout: Duration,
    pub max_connections: usize,
    /// How long connections and deliveries get to finish at shutdown.
    pub shutdown_timeout: Duration,
    /// Request body bytes buffered at once across all connections; beyond, 503.
    pub max_buffered_body_bytes: usize,
}

/// The operator listener: `/metrics`, `/readyz`, `/healthz`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub secrets: Vec<Secret>,
    /// Events whose payload `timestamp` is older are refused: a replay must never
    /// outlive its dedup record.
    pub max_event_age: Duration,
    /// Events whose `timestamp` is further ahead of our clock are refused like old ones:
    /// otherwise a far-future date would pass the age check for as long as it likes.
    pub max_clock_skew: Duration,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub synchronous: Synchronous,
    /// Payloads of events delivered to every sink are emptied after this.
    pub retention: Duration,
    /// Dedup keys of such events are kept this long (the only replay guard).
    pub dedup_window: Duration,
    /// Quarantined bodies kept at most, in bytes; the oldest go first.
    pub quarantine_max_bytes: u64,
}

/// SQLite's `synchronous` pragma: `Full` fsyncs every commit, so a power loss keeps every
/// acknowledged event; `Normal` may lose the last commits on power loss (not on a crash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    Full,
    Normal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryConfig {
    pub max_attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// The sink's table as written: a reload restarts a sink only when this changed.
    pub fingerprint: String,
    pub name: String,
    pub events: EventSelector,
    pub filter: Filter,
    pub redact: Redaction,
    pub kind: SinkKind,
}

#[derive(Debug, Clone)]
pub enum SinkKind {
    File { path: PathBuf },
    Http(Box<HttpSinkConfig>),
    Amqp(Box<AmqpSinkConfig>),
}

#[derive(Clone)]
pub struct AmqpSinkConfig {
    /// `amqp://` or `amqps://`, checked at start; may hold a password.
    pub url: String,
    /// Checked at start to fit AMQP's 255-byte short string.
    pub exchange: lapin::types::ShortString,
    pub exchange_kind: lapin::ExchangeKind,
    /// Declare the exchange (durable) on every connect.
    pub declare: bool,
    pub routing_key: RoutingKey,
    /// Unroutable messages come back and are not counted as delivered.
    pub mandatory: bool,
    pub confirm_timeout: Duration,
    /// Messages published and not yet confirmed, at most.
    pub max_in_flight: usize,
}

impl fmt::Debug for AmqpSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSinkConfig")
            .field("url", &redact_url_password(&self.url))
            .field("exchange", &self.exchange)
            .field("exchange_kind", &self.exchange_kind)
            .field("declare", &self.declare)
            .field("routing_key", &self.routing_key)
            .field("mandatory", &self.mandatory)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("max_in_flight", &self.max_in_flight)
            .finish()
    }
}

#[derive(Clone)]
pub struct HttpSinkConfig {
    pub url: reqwest::Url,
    /// Re-signs what is forwarded, so the receiver can verify it as Vyora's.
    pub secret: Option<Secret>,
    pub timeout: Duration,
    pub concurrency: usize,
    /// Static headers; every value is marked sensitive, so `Debug` never shows it.
    pub headers: reqwest::header::HeaderMap,
}

impl Config {
    /// Reads, merges the environment, and validates.
    pub fn load(source: &ConfigSource) -> Result<Config, ConfigError> {
        let mut raw = Config::raw(source)?;
        raw.apply_env(
            std::env::var(SECRET_ENV).ok(),
            std::env::var(API_KEY_ENV).ok(),
        );
        raw.validate()
    }

    /// Only `store.path`, for operator commands: the file must still parse, but no secret
    /// is needed to look at the store.
    pub fn store_path(source: &ConfigSource) -> Result<PathBuf, ConfigError> {
        Ok(PathBuf::from(Config::raw(source)?.store.path))
    }

    /// Only `[api]`, for the `calls` and `agents` commands.
    pub fn api(source: &ConfigSource) -> Result<ApiConfig, ConfigError> {
        let mut raw = Config::raw(source)?;
        raw.apply_env(None, std::env::var(API_KEY_ENV).ok());
        raw.api_config()
    }

    fn raw(source: &ConfigSource) -> Result<RawConfig, ConfigError> {
        Config::figment(source)?
            .extract()
            .map_err(|e| ConfigError::Syntax(FigmentReport(Box::new(e))))
    }

    fn figment(source: &ConfigSource) -> Result<Figment, ConfigError> {
        let toml = match source {
            ConfigSource::File(path) => {
                // figment treats a missing file as empty; a missing config is an error.
                std::fs::metadata(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Toml::file_exact(path)
            }
            ConfigSource::Embedded => Toml::string(EMBEDDED_DEFAULT),
        };
        Ok(Figment::new()
            .merge(toml)
            .merge(Env::prefixed(ENV_PREFIX).split("__")))
    }

    /// Parses a TOML string alone, without the environment (tests and tools).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_figment(Figment::new().merge(Toml::string(text)), None)
    }

    fn from_figment(figment: Figment, env_secrets: Option<String>) -> Result<Config, ConfigError> {
        let mut raw: RawConfig = figment
            .extract()
            .map_err(|e| ConfigError::Syntax(FigmentReport(Box::new(e))))?;
        raw.apply_env(env_secrets, None);
        raw.validate()
    }

    /// The effective configuration as TOML, secrets replaced by `<redacted>`, and so are
    /// URL queries and the paths of HTTP sink URLs (Slack's `/services/...` is the key).
    pub fn redacted_toml(&self) -> &str {
        &self.redacted.urls_redacted
    }

    /// As [`Config::redacted_toml`], URLs in full but for their passwords.
    pub fn redacted_toml_with_urls(&self) -> &str {
        &self.redacted.urls_shown
    }
}

fn duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(value).map_err(|e| {
        invalid(
            key,
            value,
            format!("not a duration ({e}); write e.g. \"500ms\", \"30s\", \"5m\", \"7d\""),
        )
    })?;
    if d.is_zero() {
        return Err(invalid(key, value, "must be longer than zero"));
    }
    Ok(d)
}

fn positive(key: &str, value: u64) -> Result<u64, ConfigError> {
    if value == 0 {
        return Err(invalid(key, value, "must be at least 1"));
    }
    Ok(value)
}

fn to_usize(key: &str, value: u64) -> Result<usize, ConfigError> {
    usize::try_from(positive(key, value)?).map_err(|_| invalid(key, value, "is too large"))
}

/// Sink names appear in the database, logs and metrics labels, so keep them plain.
fn sink_name(key: &str, name: &str) -> Result<String, ConfigError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if !ok {
        return Err(invalid(
            key,
            name,
            "must be 1 to 64 letters, digits, `_` or `-`",
        ));
    }
    Ok(name.to_owned())
}

impl RawConfig {
    /// Secrets from the environment fill what the file left empty.
    fn apply_env(&mut self, webhook_secrets: Option<String>, api_key: Option<String>) {
        if self.webhook.secrets.is_empty() {
            self.webhook.secrets = webhook_secrets
                .iter()
                .flat_map(|v| v.split(','))
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if self.api.api_key.is_empty() {
            self.api.api_key = api_key.unwrap_or_default().trim().to_owned();
        }
    }

    fn api_config(&self) -> Result<ApiConfig, ConfigError> {
        let a = &self.api;
        let base_url = reqwest::Url::parse(&a.base_url)
            .map_err(|e| invalid("api.base_url", &a.base_url, format!("not a URL ({e})")))?;
        if !matches!(base_url.scheme(), "http" | "https") || base_url.host_str().is_none() {
            return Err(invalid(
                "api.base_url",
                &a.base_url,
                "must be an http:// or https:// URL",
            ));
        }
        // Every request carries the API key; only a loopback address keeps it off the wire.
        let loopback = base_url.host_str().is_some_and(|host| {
            host.eq_ignore_ascii_case("localhost")
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        if base_url.scheme() == "http" && !loopback {
            return Err(invalid(
                "api.base_url",
                &a.base_url,
                "must be https:// (http:// is allowed only for 127.0.0.0/8, ::1 and \
                 localhost): over http:// the API key would travel in clear text",
            ));
        }
        let api_key =
            if a.api_key.is_empty() {
                None
            } else {
                Some(ApiKey::new(&a.api_key).ok_or_else(|| {
                    invalid("api.api_key", REDACTED, "is not a valid header value")
                })?)
            };
        Ok(ApiConfig {
            base_url,
            api_key,
            requests_per_minute: to_usize("api.requests_per_minute", a.requests_per_minute)?,
            timeout: duration("api.timeout", &a.timeout)?,
        })
    }

    fn poller_config(&self, api: &ApiConfig) -> Result<PollerConfig, ConfigError> {
        let p = &self.poller;
        if p.enabled && api.api_key.is_none() {
            return Err(invalid(
                "poller.enabled",
                "true",
                format!(
                    "needs an API key: set api.api_key or the {API_KEY_ENV} environment variable"
                ),
            ));
        }
        Ok(PollerConfig {
            enabled: p.enabled,
            wait_for_analysis: duration("poller.wait_for_analysis", &p.wait_for_analysis)?,
            interval: duration("poller.interval", &p.interval)?,
            give_up_after: duration("poller.give_up_after", &p.give_up_after)?,
        })
    }

    fn validate(self) -> Result<Config, ConfigError> {
        let s = &self.server;
        let listen = s.listen.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "server.listen",
                &s.listen,
                "not an IP address and port such as \"127.0.0.1:8080\"",
            )
        })?;
        if !s.webhook_path.starts_with('/') {
            return Err(invalid(
                "server.webhook_path",
                &s.webhook_path,
                "must start with `/`",
            ));
        }
        if protocol::RESERVED_PATHS.contains(&s.webhook_path.as_str()) {
            return Err(invalid(
                "server.webhook_path",
                &s.webhook_path,
                format!(
                    "is reserved: the router answers {} itself",
                    protocol::RESERVED_PATHS.join(", ")
                ),
            ));
        }
        let admin = AdminConfig {
            listen: self.admin.listen.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "admin.listen",
                    &self.admin.listen,
                    "not an IP address and port such as \"127.0.0.1:9464\"",
                )
            })?,
        };
        if admin.listen == listen && listen.port() != 0 {
            return Err(invalid(
                "admin.listen",
                &self.admin.listen,
                "must differ from server.listen: operator endpoints have a listener of their own",
            ));
        }
        let server = ServerConfig {
            listen,
            webhook_path: s.webhook_path.clone(),
            max_body_bytes: to_usize("server.max_body_bytes", s.max_body_bytes)?,
            header_read_timeout: duration("server.header_read_timeout", &s.header_read_timeout)?,
            ack_timeout: duration("server.ack_timeout", &s.ack_timeout)?,
            max_connections: to_usize("server.max_connections", s.max_connections)?,
            shutdown_timeout: duration("server.shutdown_timeout", &s.shutdown_timeout)?,
            max_buffered_body_bytes: to_usize(
                "server.max_buffered_body_bytes",
                s.max_buffered_body_bytes,
            )?,
        };
        if s.max_buffered_body_bytes < s.max_body_bytes
            || s.max_buffered_body_bytes > u64::from(u32::MAX)
        {
            return Err(invalid(
                "server.max_buffered_body_bytes",
                s.max_buffered_body_bytes,
                format!(
                    "must be at least server.max_body_bytes ({}) and at most {} (4 GiB)",
                    s.max_body_bytes,
                    u32::MAX
                ),
            ));
        }

        if self.webhook.secrets.is_empty() {
            return Err(ConfigError::MissingSecret);
        }
        let secrets = self
            .webhook
            .secrets
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Secret::new(s.as_bytes())
                    .map_err(|e| invalid(format!("webhook.secrets[{i}]"), "", e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;

        if self.store.path.is_empty() {
            return Err(invalid("store.path", &self.store.path, "must name a file"));
        }
        let retention = duration("store.retention", &self.store.retention)?;
        let dedup_window = duration("store.dedup_window", &self.store.dedup_window)?;
        if dedup_window < retention {
            return Err(invalid(
                "store.dedup_window",
                &self.store.dedup_window,
                format!(
                    "must not be shorter than store.retention ({})",
                    self.store.retention
                ),
            ));
        }
        let max_event_age = match &self.webhook.max_event_age {
            None => dedup_window,
            Some(age) => duration("webhook.max_event_age", age)?,
        };
        if max_event_age > dedup_window {
            return Err(invalid(
                "webhook.max_event_age",
                self.webhook.max_event_age.as_deref().unwrap_or_default(),
                format!(
                    "must not exceed store.dedup_window ({}): a replay older than its dedup record would be accepted again",
                    self.store.dedup_window
                ),
            ));
        }
        if self.store.quarantine_max_bytes < s.max_body_bytes {
            return Err(invalid(
                "store.quarantine_max_bytes",
                self.store.quarantine_max_bytes,
                format!(
                    "must be at least server.max_body_bytes ({}), so one body always fits",
                    s.max_body_bytes
                ),
            ));
        }
        let synchronous = match self.store.synchronous.as_str() {
            "full" => Synchronous::Full,
            "normal" => Synchronous::Normal,
            other => {
                return Err(invalid(
                    "store.synchronous",
                    other,
                    "must be \"full\" or \"normal\"",
                ));
            }
        };

        let d = &self.delivery;
        let max_attempts = u32::try_from(positive("delivery.max_attempts", d.max_attempts)?)
            .map_err(|_| invalid("delivery.max_attempts", d.max_attempts, "is too large"))?;
        let backoff_initial = duration("delivery.backoff_initial", &d.backoff_initial)?;
        let backoff_max = duration("delivery.backoff_max", &d.backoff_max)?;
        if backoff_max < backoff_initial {
            return Err(invalid(
                "delivery.backoff_max",
                &d.backoff_max,
                format!(
                    "must not be shorter than delivery.backoff_initial ({})",
                    d.backoff_initial
                ),
            ));
        }

        let format = match self.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(invalid("log.format", other, "must be \"text\" or \"json\"")),
        };
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                &self.log.level,
                "not a level or filter such as \"info\" or \"vyora_router=debug\"",
            ));
        }

        let mut sinks: Vec<SinkConfig> = Vec::with_capacity(self.sinks.len());
        for (i, raw) in self.sinks.iter().enumerate() {
            let sink = raw.validate(i)?;
            if sinks.iter().any(|other| other.name == sink.name) {
                return Err(invalid(
                    format!("sinks[{i}].name"),
                    &sink.name,
                    "is used by another sink",
                ));
            }
            sinks.push(sink);
        }

        let api = self.api_config()?;
        let poller = self.poller_config(&api)?;
        let redacted = self.redacted_toml();
        Ok(Config {
            api,
            poller,
            server,
            admin,
            webhook: WebhookConfig {
                secrets,
                max_event_age,
                max_clock_skew: duration("webhook.max_clock_skew", &self.webhook.max_clock_skew)?,
            },
            store: StoreConfig {
                path: PathBuf::from(&self.store.path),
                synchronous,
                retention,
                dedup_window,
                quarantine_max_bytes: self.store.quarantine_max_bytes,
            },
            delivery: DeliveryConfig {
                max_attempts,
                backoff_initial,
                backoff_max,
            },
            log: LogConfig {
                level: self.log.level.clone(),
                format,
            },
            sinks,
            redacted,
        })
    }

    fn redacted_toml(&self) -> Redacted {
        Redacted {
            urls_redacted: self.redacted_rendering(Urls::Redacted),
            urls_shown: self.redacted_rendering(Urls::Shown),
        }
    }

    fn redacted_rendering(&self, urls: Urls) -> String {
        let mut shown = self.clone();
        for secret in &mut shown.webhook.secrets {
            *secret = REDACTED.to_owned();
        }
        if !shown.api.api_key.is_empty() {
            shown.api.api_key = REDACTED.to_owned();
        }
        shown.api.base_url = shown_url(&shown.api.base_url, urls, false);
        for sink in &mut shown.sinks {
            sink.redact_secrets(urls);
        }
        // Serializing plain strings, numbers and tables cannot fail; an empty rendering
        // would only make `check-config` print less.
        toml::to_string_pretty(&shown).unwrap_or_default()
    }
}

impl fmt::Debug for HttpSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSinkConfig")
            .field("url", &redact_url_password(self.url.as_str()))
            .field("secret", &self.secret)
            .field("timeout", &self.timeout)
            .field("concurrency", &self.concurrency)
            .field("headers", &self.headers)
            .finish()
    }
}

/// `url` as `check-config` shows it: never its password, and with [`Urls::Redacted`]
/// neither its query nor, when `path_too`, its path (each replaced by `<redacted>`).
fn shown_url(url: &str, urls: Urls, path_too: bool) -> String {
    let shown = redact_url_password(url);
    if urls == Urls::Shown {
        return shown;
    }
    // Every URL shown here passed validation; one that does not parse is hidden whole.
    let Ok(mut parsed) = reqwest::Url::parse(&shown) else {
        return REDACTED.to_owned();
    };
    let hide_path = path_too && !matches!(parsed.path(), "" | "/");
    let hide_query = parsed.query().is_some() || parsed.fragment().is_some();
    if !hide_path && !hide_query {
        return shown;
    }
    parsed.set_query(None);
    parsed.set_fragment(None);
    if path_too {
        parsed.set_path("/");
        format!("{parsed}{REDACTED}")
    } else {
        format!("{parsed}?{REDACTED}")
    }
}

/// `scheme://user:password@host` with the password replaced; other text as it is.
fn redact_url_password(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Only fails for URLs that cannot have a password, which this one has.
            let _ = parsed.set_password(Some(REDACTED));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

impl RawSink {
    fn key(&self, i: usize, field: &str) -> String {
        format!("sinks[{i}].{field}")
    }

    /// The type's own keys, checked by `T` with every unknown key an error.
    fn options<T: serde::de::DeserializeOwned>(
        &self,
        i: usize,
        own_keys: &str,
    ) -> Result<T, ConfigError> {
        let value = figment::value::Value::Dict(figment::value::Tag::Default, self.options.clone());
        value.deserialize::<T>().map_err(|e| match &e.kind {
            figment::error::Kind::UnknownField(field, _) => invalid(
                self.key(i, field),
                field,
                format!(
                    "is not a key of a {} sink; its keys are {COMMON_SINK_KEYS}, {own_keys}",
                    self.kind
                ),
            ),
            _ => ConfigError::Sink {
                index: i,
                name: self.name.clone(),
                report: FigmentReport(Box::new(e)),
            },
        })
    }

    fn validate(&self, i: usize) -> Result<SinkConfig, ConfigError> {
        let kind = match self.kind.as_str() {
            "file" => {
                let o: FileOptions = self.options(i, "path")?;
                if o.path.is_empty() {
                    return Err(invalid(self.key(i, "path"), &o.path, "must name a file"));
                }
                SinkKind::File {
                    path: PathBuf::from(&o.path),
                }
            }
            "http" => {
                let options = self.options(i, "url, secret, timeout, concurrency, headers")?;
                SinkKind::Http(Box::new(self.http(i, options)?))
            }
            "amqp" => {
                let options = self.options(
                    i,
                    "url, exchange, exchange_type, declare, routing_key, mandatory, confirm_timeout, max_in_flight",
                )?;
                SinkKind::Amqp(Box::new(self.amqp(i, options)?))
            }
            other => {
                return Err(invalid(
                    self.key(i, "type"),
                    other,
                    "is not a sink type; use \"file\", \"http\" or \"amqp\"",
                ));
            }
        };
        Ok(SinkConfig {
            // A digest, not the text: the table holds secrets.
            fingerprint: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                toml::to_string(self).unwrap_or_default(),
            )),
            name: sink_name(&self.key(i, "name"), &self.name)?,
            events: EventSelector::parse(&self.key(i, "events"), &self.events)?,
            filter: Filter::parse(&self.key(i, "filter"), &self.filter)?,
            redact: Redaction::parse(&self.key(i, "redact"), &self.redact)?,
            kind,
        })
    }

    fn http(&self, i: usize, o: HttpOptions) -> Result<HttpSinkConfig, ConfigError> {
        let url = reqwest::Url::parse(&o.url).map_err(|e| {
            invalid(
                self.key(i, "url"),
                redact_url_password(&o.url),
                format!("not a URL ({e})"),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(invalid(
                self.key(i, "url"),
                redact_url_password(&o.url),
                "must be an http:// or https:// URL with a host",
            ));
        }
        let secret = match &o.secret {
            None => None,
            Some(s) => Some(
                Secret::new(s.as_bytes())
                    .map_err(|e| invalid(self.key(i, "secret"), "", e.to_string()))?,
            ),
        };
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &o.headers {
            let key = self.key(i, &format!("headers.{name}"));
            let header = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(&key, name, "is not a valid header name"))?;
            if RESERVED_HEADERS.contains(&header.as_str()) {
                return Err(invalid(&key, name, "is set by the router itself"));
            }
            let mut value = reqwest::header::HeaderValue::from_str(value)
                .map_err(|_| invalid(&key, REDACTED, "is not a valid header value"))?;
            value.set_sensitive(true);
            headers.insert(header, value);
        }
        Ok(HttpSinkConfig {
            url,
            secret,
            timeout: duration(&self.key(i, "timeout"), &o.timeout)?,
            concurrency: to_usize(&self.key(i, "concurrency"), o.concurrency)?,
            headers,
        })
    }

    fn amqp(&self, i: usize, o: AmqpOptions) -> Result<AmqpSinkConfig, ConfigError> {
        let shown_url = redact_url_password(&o.url);
        o.url.parse::<lapin::uri::AMQPUri>().map_err(|e| {
            invalid(
                self.key(i, "url"),
                &shown_url,
                format!("not an amqp:// or amqps:// URL ({e})"),
            )
        })?;
        let exchange_kind = match o.exchange_type.as_str() {
            "direct" => lapin::ExchangeKind::Direct,
            "fanout" => lapin::ExchangeKind::Fanout,
            "topic" => lapin::ExchangeKind::Topic,
            "headers" => lapin::ExchangeKind::Headers,
            other => {
                return Err(invalid(
                    self.key(i, "exchange_type"),
                    other,
                    "must be \"direct\", \"fanout\", \"topic\" or \"headers\"",
                ));
            }
        };
        if o.declare && o.exchange.is_empty() {
            return Err(invalid(
                self.key(i, "exchange"),
                "",
                "the default exchange cannot be declared; name an exchange or set declare = false",
            ));
        }
        let routing_key = RoutingKey::parse(&o.routing_key)
            .map_err(|reason| invalid(self.key(i, "routing_key"), &o.routing_key, reason))?;
        let exchange = lapin::types::ShortString::try_new(o.exchange.as_str())
            .map_err(|e| invalid(self.key(i, "exchange"), &o.exchange, e.to_string()))?;
        Ok(AmqpSinkConfig {
            url: o.url,
            exchange,
            exchange_kind,
            declare: o.declare,
            routing_key,
            mandatory: o.mandatory,
            confirm_timeout: duration(&self.key(i, "confirm_timeout"), &o.confirm_timeout)?,
            max_in_flight: to_usize(&self.key(i, "max_in_flight"), o.max_in_flight)?,
        })
    }

    /// Replaces what must never be shown: secrets, header values, URL passwords; and with
    /// [`Urls::Redacted`] URL queries and an HTTP sink's path.
    fn redact_secrets(&mut self, urls: Urls) {
        use figment::value::{Tag, Value};
        let path_too = self.kind == "http";
        for (key, value) in &mut self.options {
            match (key.as_str(), value) {
                ("secret", v) => *v = Value::String(Tag::Default, REDACTED.to_owned()),
                ("headers", Value::Dict(_, headers)) => {
                    for v in headers.values_mut() {
                        *v = Value::String(Tag::Default, REDACTED.to_owned());
                    }
                }
                ("url", Value::String(_, url)) => *url = shown_url(url, urls, path_too),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[webhook]\nsecrets = [\"s3cret-value\"]\n";

    fn error_of(text: &str) -> String {
        match Config::from_toml(text) {
            Ok(_) => panic!("config unexpectedly valid:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_embedded_default_is_valid_once_a_secret_is_given() {
        let figment = Figment::new().merge(Toml::string(EMBEDDED_DEFAULT));
        let config = Config::from_figment(figment, Some("a, b".into())).expect("valid default");
        assert_eq!(config.webhook.secrets.len(), 2);
        assert_eq!(
            config.server.listen,
            "127.0.0.1:8080".parse().expect("address")
        );
        assert_eq!(config.sinks.len(), 1);
    }

    #[test]
    fn defaults_fill_every_key_left_out() {
        let c = Config::from_toml(MINIMAL).expect("valid");
        assert_eq!(c.server.webhook_path, "/webhook");
        assert_eq!(c.server.max_body_bytes, 1_048_576);
        assert_eq!(c.server.ack_timeout, Duration::from_secs(4));
        assert_eq!(c.store.synchronous, Synchronous::Full);
        assert_eq!(c.delivery.max_attempts, 12);
        assert_eq!(c.delivery.backoff_max, Duration::from_secs(300));
    }

    #[test]
    fn a_missing_secret_says_how_to_set_one() {
        let e = error_of("");
        assert!(
            e.contains("webhook.secrets") && e.contains(SECRET_ENV),
            "{e}"
        );
    }

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

    const HTTP_SINK: &str = r#"
[[sinks]]
name = "crm"
type = "http"
url = "https://user:url-password@crm.internal/hooks/vyora"
secret = "sink-secret-value"
timeout = "3s"
concurrency = 4
headers = { "Authorization" = "Bearer header-secret-value" }
events = ["call_completed"]
filter = { agent_name = ["Home Loan Agent"], classification = ["Interested"] }
redact = ["transcript", "phone_number"]
"#;

    #[test]
    fn the_redacted_rendering_never_shows_a_secret() {
        let c = Config::from_toml(&format!("{MINIMAL}{HTTP_SINK}")).expect("valid");
        let shown = c.redacted_toml();
        for secret in [
            "s3cret-value",
            "sink-secret-value",
            "header-secret-value",
            "url-password",
        ] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
            assert!(
                !format!("{c:?}").contains(secret),
                "{secret} in Debug output"
            );
        }
        assert!(shown.contains(REDACTED), "{shown}");
        assert!(!shown.contains("hooks/vyora"), "{shown}");
        assert!(
            c.redacted_toml_with_urls()
                .contains("crm.internal/hooks/vyora"),
            "{shown}"
        );
    }

    const HOOK_URLS: &str = r#"
[api]
base_url = "https://api.vyora.ai/v1?key=BASEKEY"

[[sinks]]
name = "slack"
type = "http"
url = "https://hooks.slack.com/services/T000/B000/XXXXSECRET"

[[sinks]]
name = "coded"
type = "http"
url = "https://user:url-password@x.example:8443/hook?code=KEY123"

[[sinks]]
name = "plain"
type = "http"
url = "https://plain.example/"

[[sinks]]
name = "queue"
type = "amqp"
url = "amqp://u:amqp-password@mq.internal:5672/prod?heartbeat=30&token=QTOKEN"
exchange = "vyora"
"#;

    #[test]
    fn url_paths_and_queries_are_redacted_unless_asked_for_and_passwords_always() {
        let c = Config::from_toml(&format!("{MINIMAL}{HOOK_URLS}")).expect("valid");
        let shown = c.redacted_toml();
        for hidden in [
            "services",
            "XXXXSECRET",
            "/hook?",
            "KEY123",
            "BASEKEY",
            "QTOKEN",
            "url-password",
            "amqp-password",
        ] {
            assert!(!shown.contains(hidden), "{hidden} shown in {shown}");
        }
        for kept in [
            "\"https://hooks.slack.com/<redacted>\"",
            "@x.example:8443/<redacted>\"",
            "\"https://plain.example/\"",
            "@mq.internal:5672/prod?<redacted>\"",
            "\"https://api.vyora.ai/v1?<redacted>\"",
        ] {
            assert!(shown.contains(kept), "{kept} not in {shown}");
        }

        let full = c.redacted_toml_with_urls();
        for url in [
            "https://hooks.slack.com/services/T000/B000/XXXXSECRET",
            "@x.example:8443/hook?code=KEY123",
            "@mq.internal:5672/prod?heartbeat=30&token=QTOKEN",
            "https://api.vyora.ai/v1?key=BASEKEY",
        ] {
            assert!(full.contains(url), "{url} not in {full}");
        }
        for secret in ["url-password", "amqp-password", "s3cret-value"] {
            assert!(!full.contains(secret), "{secret} shown in {full}");
        }
    }

    #[test]
    fn a_secret_of_the_wrong_type_is_named_but_never_printed() {
        // As `VYORA_ROUTER_WEBHOOK__SECRETS=whsec_x` gives it: a string, not a list.
        let figment = Figment::new()
            .merge(Toml::string(""))
            .merge(("webhook.secrets", "whsec_x"));
        let e = Config::from_figment(figment, None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("webhook.secrets") && e.contains("found a string, expected a sequence"),
            "{e}"
        );
        assert!(!e.contains("whsec_x"), "{e}");

        let http = "[[sinks]]\nname = \"crm\"\ntype = \"http\"\n";
        let cases = [
            (
                "[webhook]\nsecrets = \"whsec_in_file\"\n".to_owned(),
                "whsec_in_file",
            ),
            ("[webhook]\nsecrets = [424242424]\n".to_owned(), "424242424"),
            (
                format!("{MINIMAL}[api]\napi_key = 1234567890\n"),
                "1234567890",
            ),
            (
                format!("{MINIMAL}{http}url = \"http://x\"\nsecret = 987654321\n"),
                "987654321",
            ),
            (
                format!("{MINIMAL}{http}url = \"http://x\"\nheaders = \"Bearer tok-in-header\"\n"),
                "tok-in-header",
            ),
            (format!("{MINIMAL}{http}url = 135792468\n"), "135792468"),
        ];
        for (text, secret) in cases {
            let e = error_of(&text);
            assert!(!e.contains(secret), "{secret} printed in {e:?}");
            assert!(e.contains("invalid type: found"), "{e}");
        }
    }

    #[test]
    fn a_value_of_the_wrong_type_is_printed_for_keys_that_are_not_secret() {
        let e = error_of(&format!("{MINIMAL}[server]\nmax_connections = \"many\"\n"));
        assert!(
            e.contains("server.max_connections") && e.contains("many"),
            "{e}"
        );
    }

    #[test]
    fn a_toml_syntax_error_gives_line_column_and_reason_but_not_the_line() {
        let e = error_of("[webhook]\nsecrets = [\"whsec_unterminated\n");
        assert!(e.contains("line 2, column"), "{e}");
        assert!(e.contains("string"), "the parser's reason: {e}");
        assert!(!e.contains("whsec_unterminated"), "{e}");
    }

    #[test]
    fn a_toml_message_of_an_unknown_layout_is_cut_to_its_position() {
        let message = "TOML parse error at line 1, column 9\nsecrets = \"whsec\nreason";
        assert_eq!(
            toml_syntax(message).as_deref(),
            Some("not valid TOML at line 1, column 9")
        );
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
