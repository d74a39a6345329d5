//! Configuration: one TOML file plus `VYORA_ROUTER_<SECTION>__<KEY>` overrides, read into
//! raw serde structs and then validated into typed settings, all before a port is bound.
//!
//! Every error names the key and the value it refused, so an operator can fix a config
//! without reading our source.
//!
//! - this file: the typed [`Config`] and its sections, and loading (file, environment).
//! - `raw`: the file's schema and its defaults, read section by section so that every
//!   unknown key and every value of the wrong type is reported, not only the first.
//! - `validate`: schema to [`Config`], one function per section, every refusal kept.
//! - [`error`]: [`ConfigError`], the [`Invalid`] that other modules' parsers return, the
//!   gathered [`error::Errors`], "did you mean", and secret-free figment errors. A leaf, so
//!   that sinks, routing, redaction and the API client can use it without importing the
//!   rest of this module.
//! - `redacted`: the effective config as `check-config` prints it.
//! - `postgres`: `store.url` read as libpq reads it, and `store.schema`.
//!
//! The components own their settings: each sink's keys and checks are in
//! `sinks/<kind>/config.rs`, the `[api]` table's in `api/config.rs`; this module puts
//! them together and names the keys.

mod admin;
pub mod error;
mod postgres;
mod raw;
mod redacted;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};

pub use crate::api::API_KEY_ENV;
use crate::api::ApiConfig;
use crate::routing::Route;
use crate::signature::Secret;
pub use crate::sinks::{SinkConfig, SinkKind};
pub use admin::AdminToken;
use error::InvalidAt;
pub use error::{ConfigError, FigmentReport, Invalid};
pub use postgres::{DEFAULT_SCHEMA, PostgresConfig, SslMode, UrlError};
use raw::{RawConfig, Read};
use redacted::Redacted;

/// Where `serve` and `check-config` look when no `--config` is given.
pub const DEFAULT_PATH: &str = "config/router.toml";
/// The commented example config, built into the binary so that a bare `serve` runs.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/router.toml");
/// Prefix of environment overrides: `VYORA_ROUTER_SERVER__LISTEN` sets `server.listen`.
pub const ENV_PREFIX: &str = "VYORA_ROUTER_";
/// Webhook secrets from the environment (comma-separated), used when the file has none.
pub const SECRET_ENV: &str = "VYORA_WEBHOOK_SECRET";
/// The PostgreSQL URL from the environment, used when `store.url` is empty.
pub const DATABASE_URL_ENV: &str = "DATABASE_URL";
/// `delivery.attempts_kept`'s default.
pub const ATTEMPTS_KEPT: usize = 20;

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

/// `router.toml`, or `the built-in default config`.
impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::File(path) => write!(f, "{}", path.display()),
            ConfigSource::Embedded => f.write_str("the built-in default config"),
        }
    }
}

/// The settings the rest of the program uses: every value checked and typed (durations,
/// addresses, URLs, secrets), so no other module parses a config string or meets a
/// default.
///
/// Why two layers (ripgrep's `lowargs` and `hiargs`): the raw structs say exactly what
/// the file may say, so serde refuses an unknown key and fills defaults, and nothing
/// else; the checks that need more than a type (a key naming a file, one duration not
/// exceeding another, a URL that must be https) run once, over the whole file, before a
/// port is bound, and each names its key. Code using a `Config` cannot meet a value
/// that was not checked.
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
    /// Whether `/ui` is served.
    pub console: bool,
    /// What the console asks of a browser or a client; required off loopback.
    pub token: Option<AdminToken>,
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

#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    /// Which engine holds the events; the keys below it say how to reach it.
    pub backend: StoreBackend,
    /// SQLite's database file.
    pub path: PathBuf,
    /// SQLite's `synchronous` pragma.
    pub synchronous: Synchronous,
    /// SQLite: least time between the starts of two commits; under load, what arrives
    /// meanwhile shares the later one. Zero commits as soon as anything waits.
    pub commit_interval: Duration,
    /// Payloads of events delivered to every sink are emptied after this.
    pub retention: Duration,
    /// Dedup keys of such events are kept this long (the only replay guard).
    pub dedup_window: Duration,
    /// Quarantined bodies kept at most, in bytes; the oldest go first.
    pub quarantine_max_bytes: u64,
    /// With a shared store: how long a replica's claim on a delivery, or its role
    /// (pruner, poller), holds without renewal; a replica that dies loses them after it.
    pub lease: Duration,
}

impl StoreConfig {
    /// A SQLite store at `path` with the defaults of every other key (operator tools,
    /// the migration's source, tests).
    pub fn sqlite(path: PathBuf) -> StoreConfig {
        StoreConfig {
            backend: StoreBackend::Sqlite,
            path,
            synchronous: Synchronous::Full,
            commit_interval: Duration::from_millis(1),
            retention: Duration::from_secs(30 * 86_400),
            dedup_window: Duration::from_secs(90 * 86_400),
            quarantine_max_bytes: 4 * 1024 * 1024,
            lease: Duration::from_secs(30),
        }
    }
}

/// The engine behind the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    /// One file beside one router: the embedded default for a sidecar.
    Sqlite,
    /// A database several replicas share.
    Postgres(Box<PostgresConfig>),
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
    /// Attempts kept in each delivery's history, the oldest dropped first; 0 keeps none.
    pub attempts_kept: usize,
    /// Whether the history keeps every success too, not only failures and the success
    /// that ends them.
    pub record_successes: bool,
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

impl Config {
    /// Reads, merges the environment, and validates.
    pub fn load(source: &ConfigSource) -> Result<Config, ConfigError> {
        let mut read = Config::read(source)?;
        read.raw.apply_env(
            std::env::var(SECRET_ENV).ok(),
            std::env::var(API_KEY_ENV).ok(),
        );
        read.raw
            .store
            .url_from_env(std::env::var(DATABASE_URL_ENV).ok());
        read.validate()
    }

    /// Only `[store]` (and `[server]`, which bounds it), for operator commands: the file
    /// must still be valid there, but no secret is needed to look at the store.
    pub fn store(source: &ConfigSource) -> Result<StoreConfig, ConfigError> {
        let mut raw = Config::raw(source)?;
        raw.store.url_from_env(std::env::var(DATABASE_URL_ENV).ok());
        validate::store(&raw.store, Some(&validate::server(&raw.server)?))
    }

    /// `[store]`'s PostgreSQL settings for `store migrate`, whatever `store.backend` says
    /// (a sidecar's config names SQLite): the URL is `to` if given, else `store.url`,
    /// else `DATABASE_URL`; `None` when none of them is set.
    pub fn postgres_target(
        source: &ConfigSource,
        to: Option<&str>,
    ) -> Result<Option<PostgresConfig>, ConfigError> {
        let mut raw = Config::raw(source)?;
        if let Some(to) = to {
            raw.store.url = to.trim().to_owned();
        }
        raw.store.url_from_env(std::env::var(DATABASE_URL_ENV).ok());
        if raw.store.url.is_empty() {
            return Ok(None);
        }
        validate::postgres(&raw.store).map(Some)
    }

    /// The `[[sinks]]`' names, for operator commands that take one: like [`Config::store`],
    /// no secret is needed.
    pub fn sink_names(source: &ConfigSource) -> Result<Vec<String>, ConfigError> {
        Ok(Config::raw(source)?
            .sinks
            .into_iter()
            .map(|sink| sink.name)
            .collect())
    }

    /// One sink's route (its events and filter), for `deliveries backfill`; `None` when
    /// the config has no sink of that name. Needs no secret.
    pub fn route(source: &ConfigSource, sink: &str) -> Result<Option<Route>, ConfigError> {
        validate::route(&Config::raw(source)?, sink)
    }

    /// Only `[admin]` (and `server.listen`, which it must differ from), for `tail`.
    pub fn admin(source: &ConfigSource) -> Result<AdminConfig, ConfigError> {
        let raw = Config::raw(source)?;
        validate::admin(&raw.admin, Some(&validate::server(&raw.server)?))
    }

    /// Only `[api]`, for the `calls` and `agents` commands.
    pub fn api(source: &ConfigSource) -> Result<ApiConfig, ConfigError> {
        let mut raw = Config::raw(source)?;
        raw.apply_env(None, std::env::var(API_KEY_ENV).ok());
        raw.api.validate().at("api")
    }

    /// The file read, every key of the wrong type or unknown refused.
    fn raw(source: &ConfigSource) -> Result<RawConfig, ConfigError> {
        let read = Config::read(source)?;
        read.errors.or(read.raw)
    }

    fn read(source: &ConfigSource) -> Result<Read, ConfigError> {
        RawConfig::read(&Config::figment(source)?)
    }

    fn figment(source: &ConfigSource) -> Result<Figment, ConfigError> {
        let toml = match source {
            ConfigSource::File(path) => {
                // figment treats a missing file as empty; a missing config is an error.
                std::fs::metadata(path).map_err(|error| ConfigError::Read {
                    path: path.clone(),
                    error,
                })?;
                Toml::file_exact(path)
            }
            ConfigSource::Embedded => Toml::string(EMBEDDED_DEFAULT),
        };
        Ok(Figment::new()
            .merge(toml)
            // Only `<SECTION>__<KEY>`: Kubernetes' service links and Docker's legacy links
            // put variables such as VYORA_ROUTER_PORT_8080_TCP into the environment of a
            // pod whose Service is named after us, and they are not settings.
            .merge(
                Env::prefixed(ENV_PREFIX)
                    .filter(|key| key.as_str().contains("__"))
                    .split("__"),
            ))
    }

    /// Parses a TOML string alone, without the environment (tests and tools).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_figment(Figment::new().merge(Toml::string(text)), None)
    }

    fn from_figment(figment: Figment, env_secrets: Option<String>) -> Result<Config, ConfigError> {
        let mut read = RawConfig::read(&figment)?;
        read.raw.apply_env(env_secrets, None);
        read.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const MINIMAL: &str = "[webhook]\nsecrets = [\"s3cret-value\"]\n";

    pub(super) fn error_of(text: &str) -> String {
        match Config::from_toml(text) {
            Ok(_) => panic!("config unexpectedly valid:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    pub(super) const HTTP_SINK: &str = r#"
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
        assert_eq!(c.store.commit_interval, Duration::from_millis(1));
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
}
