//! The file's schema: exactly what the TOML may say, with every default, and nothing else
//! (ripgrep's `lowargs`), and reading it section by section so that one run reports every
//! key of the wrong type or unknown. Nothing here is checked beyond its type;
//! [`super::validate`] turns it into the typed [`super::Config`].
//!
//! A sink's own keys are kept as a table here and read by its type's options struct, and
//! the `[api]` table is the API client's own (`crate::api::ApiOptions`): each component
//! owns its schema.

use std::collections::{BTreeMap, BTreeSet};

use figment::Figment;
use figment::error::Kind;
use figment::value::{Dict, Tag, Value};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::{ConfigError, DurationText, Errors, FigmentReport};
use crate::api::ApiOptions;
use crate::routing::EventSelector;
use crate::sinks::flow::Breaker;

/// The file's top-level keys, [`RawConfig`]'s fields (a test keeps them in step).
const SECTIONS: &[&str] = &[
    "server", "admin", "webhook", "store", "delivery", "api", "poller", "log", "sinks",
];

/// What reading the file gave: the schema (a key that was refused takes its default, a
/// table that could not be read at all is left out), the refusals, and the keys they
/// were about.
pub(super) struct Read {
    pub(super) raw: RawConfig,
    pub(super) errors: Errors,
    refused: BTreeSet<String>,
}

impl Read {
    /// Whether `key` (`server.listen`, `sinks[1].url`) or a table holding it was refused:
    /// its value is then a default, and a check of it would blame the wrong value.
    pub(super) fn refused(&self, key: &str) -> bool {
        self.refused.iter().any(|r| {
            key.strip_prefix(r.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
    }
}

impl RawConfig {
    /// Reads every section, each as far as it is readable: a file that is not TOML is one
    /// error; otherwise every unknown key and every value of the wrong type is reported.
    pub(super) fn read(figment: &Figment) -> Result<Read, ConfigError> {
        let top: Dict = figment
            .extract()
            .map_err(|e| ConfigError::Syntax(FigmentReport(Box::new(e))))?;
        let mut reader = Reader {
            figment,
            errors: Errors::default(),
            refused: BTreeSet::new(),
        };
        for (key, value) in &top {
            if !SECTIONS.contains(&key.as_str()) {
                let mut e = figment::Error::from(Kind::UnknownField(key.clone(), SECTIONS));
                e.path = vec![key.clone()];
                e.metadata = figment.get_metadata(value.tag()).cloned();
                reader.refuse(e);
            }
        }
        let raw = RawConfig {
            server: reader.section("server"),
            admin: reader.section("admin"),
            webhook: reader.section("webhook"),
            store: reader.section("store"),
            delivery: reader.section("delivery"),
            api: reader.section("api"),
            poller: reader.section("poller"),
            log: reader.section("log"),
            sinks: reader.sinks(),
        };
        Ok(Read {
            raw,
            errors: reader.errors,
            refused: reader.refused,
        })
    }
}

struct Reader<'a> {
    figment: &'a Figment,
    errors: Errors,
    refused: BTreeSet<String>,
}

impl Reader<'_> {
    fn refuse(&mut self, error: figment::Error) {
        self.refused.insert(error.path.join("."));
        self.errors
            .push(ConfigError::Syntax(FigmentReport(Box::new(error))));
    }

    /// A `[section]` table; absent, its defaults.
    fn section<T: DeserializeOwned + Default>(&mut self, name: &str) -> T {
        match self.figment.find_value(name) {
            Ok(value) => self.table(value, name).unwrap_or_default(),
            Err(_) => T::default(),
        }
    }

    /// The `[[sinks]]` tables; those that cannot be read at all are left out, the others
    /// keep their index for the errors that name them.
    fn sinks(&mut self) -> Vec<RawSink> {
        let value = match self.figment.find_value("sinks") {
            Ok(Value::Array(_, items)) => items,
            Ok(other) => {
                let mut e = figment::Error::from(Kind::InvalidType(
                    other.to_actual(),
                    "an array of [[sinks]] tables".into(),
                ));
                e.path = vec!["sinks".to_owned()];
                e.metadata = self.figment.get_metadata(other.tag()).cloned();
                self.refuse(e);
                return Vec::new();
            }
            Err(_) => return Vec::new(),
        };
        let mut sinks = Vec::with_capacity(value.len());
        for (index, item) in value.into_iter().enumerate() {
            if let Some(sink) = self.table::<RawSink>(item, &format!("sinks[{index}]")) {
                sinks.push(RawSink { index, ..sink });
            }
        }
        sinks
    }

    /// `value` read as `T`; every refusal is reported under `at`, with where it was
    /// written.
    fn table<T: DeserializeOwned>(&mut self, value: Value, at: &str) -> Option<T> {
        let (read, refusals) = leniently(value);
        for (mut e, tag) in refusals {
            e.path.insert(0, at.to_owned());
            e.metadata = self.figment.get_metadata(tag).cloned();
            self.refuse(e);
        }
        read
    }
}

/// `value` read as `T`, removing each key that is refused and reading again, so that
/// every refusal in the table is found, each with the tag of the value it is about. `None`
/// when the table cannot be read even without them (not a table; a required key missing).
pub(super) fn leniently<T: DeserializeOwned>(
    mut value: Value,
) -> (Option<T>, Vec<(figment::Error, Tag)>) {
    let mut refusals = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    loop {
        let errors = match value.deserialize::<T>() {
            Ok(read) => return (Some(read), refusals),
            Err(errors) => errors,
        };
        let mut again = false;
        for e in errors {
            if let Kind::MissingField(field) = &e.kind
                && removed.iter().any(|r| r == field)
            {
                // Already reported as refused: missing only because we took it out.
                continue;
            }
            let key = e.path.first().cloned();
            let tag = tag_at(&value, &e.path);
            refusals.push((e, tag));
            if let (Some(key), Value::Dict(_, table)) = (key, &mut value)
                && table.remove(&key).is_some()
            {
                removed.push(key);
                again = true;
            }
        }
        if !again {
            return (None, refusals);
        }
    }
}

/// The tag of the value at `path` below `value`, or of the deepest one on the way.
fn tag_at(value: &Value, path: &[String]) -> Tag {
    let mut at = value;
    for key in path {
        match at.as_dict().and_then(|table| table.get(key)) {
            Some(next) => at = next,
            None => break,
        }
    }
    at.tag()
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub(super) server: RawServer,
    pub(super) admin: RawAdmin,
    pub(super) webhook: RawWebhook,
    pub(super) store: RawStore,
    pub(super) delivery: RawDelivery,
    pub(super) api: ApiOptions,
    pub(super) poller: RawPoller,
    pub(super) log: RawLog,
    pub(super) sinks: Vec<RawSink>,
}

impl RawConfig {
    /// Secrets from the environment fill what the file left empty.
    pub(super) fn apply_env(&mut self, webhook_secrets: Option<String>, api_key: Option<String>) {
        if self.webhook.secrets.is_empty() {
            self.webhook.secrets = webhook_secrets
                .iter()
                .flat_map(|v| v.split(','))
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
        }
        self.api.key_from_env(api_key);
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPoller {
    pub(super) enabled: bool,
    pub(super) wait_for_analysis: DurationText,
    pub(super) interval: DurationText,
    pub(super) give_up_after: DurationText,
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
pub(super) struct RawServer {
    pub(super) listen: String,
    pub(super) webhook_path: String,
    pub(super) max_body_bytes: u64,
    pub(super) header_read_timeout: DurationText,
    pub(super) ack_timeout: DurationText,
    pub(super) max_connections: u64,
    pub(super) shutdown_timeout: DurationText,
    pub(super) max_buffered_body_bytes: u64,
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
pub(super) struct RawAdmin {
    pub(super) listen: String,
    pub(super) console: bool,
    /// Empty: no token.
    pub(super) token: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: "127.0.0.1:9464".into(),
            console: true,
            token: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawWebhook {
    pub(super) secrets: Vec<String>,
    /// Defaults to `store.dedup_window` less `max_clock_skew`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) max_event_age: Option<DurationText>,
    pub(super) max_clock_skew: DurationText,
    /// Event names beyond those Vyora documents that a sink's `events` may name.
    pub(super) extra_events: Vec<String>,
}

impl Default for RawWebhook {
    fn default() -> Self {
        RawWebhook {
            secrets: Vec::new(),
            max_event_age: None,
            max_clock_skew: "5m".into(),
            extra_events: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawStore {
    pub(super) backend: String,
    pub(super) path: String,
    pub(super) synchronous: String,
    pub(super) commit_interval: DurationText,
    pub(super) url: String,
    pub(super) schema: String,
    pub(super) pool_size: u64,
    pub(super) lease: DurationText,
    pub(super) retention: DurationText,
    pub(super) dedup_window: DurationText,
    pub(super) quarantine_max_bytes: u64,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            backend: "sqlite".into(),
            path: "data/router.db".into(),
            synchronous: "full".into(),
            commit_interval: "1ms".into(),
            url: String::new(),
            schema: super::DEFAULT_SCHEMA.into(),
            pool_size: 16,
            lease: "30s".into(),
            retention: "30d".into(),
            dedup_window: "90d".into(),
            quarantine_max_bytes: 4 * 1024 * 1024,
        }
    }
}

impl RawStore {
    /// `DATABASE_URL` fills an empty `store.url`, as most PostgreSQL tools read it.
    pub(super) fn url_from_env(&mut self, url: Option<String>) {
        if self.url.is_empty() {
            self.url = url.unwrap_or_default().trim().to_owned();
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawDelivery {
    pub(super) max_attempts: u64,
    pub(super) backoff_initial: DurationText,
    pub(super) backoff_max: DurationText,
    pub(super) attempts_kept: u64,
    pub(super) record_successes: bool,
}

impl Default for RawDelivery {
    fn default() -> Self {
        RawDelivery {
            max_attempts: 12,
            backoff_initial: "1s".into(),
            backoff_max: "5m".into(),
            attempts_kept: super::ATTEMPTS_KEPT as u64,
            record_successes: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    pub(super) level: String,
    pub(super) format: String,
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
///
/// Not `deny_unknown_fields`: serde cannot combine it with `flatten`. Unknown keys are
/// refused by the type's options struct, which sees every key but these.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub(super) struct RawSink {
    /// Its place among the `[[sinks]]`, for the errors that name it (`sinks[2]`).
    #[serde(skip)]
    pub(super) index: usize,
    pub(super) name: String,
    #[serde(rename = "type")]
    pub(super) kind: String,
    #[serde(default = "all_events")]
    pub(super) events: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(super) filter: BTreeMap<String, Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) redact: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) rate_limit: Option<String>,
    #[serde(default)]
    pub(super) circuit_breaker: RawBreaker,
    #[serde(flatten)]
    pub(super) options: Dict,
}

/// A sink's `circuit_breaker` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreaker {
    #[serde(default = "breaker_failures")]
    pub(super) failures: u32,
    #[serde(default = "breaker_cool_down")]
    pub(super) cool_down: String,
}

impl Default for RawBreaker {
    fn default() -> Self {
        RawBreaker {
            failures: breaker_failures(),
            cool_down: breaker_cool_down(),
        }
    }
}

fn breaker_failures() -> u32 {
    Breaker::DEFAULT_FAILURES
}

fn breaker_cool_down() -> String {
    Breaker::DEFAULT_COOL_DOWN.to_owned()
}

/// [`RawSink`]'s own keys, for the error on an unknown one (a test keeps them in step).
pub(super) const COMMON_SINK_KEYS: &str =
    "name, type, events, filter, redact, rate_limit, circuit_breaker";

fn all_events() -> Vec<String> {
    vec![EventSelector::ALL.to_owned()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_common_sink_keys_are_the_raw_sinks_own_fields() {
        let sink = RawSink {
            index: 0,
            name: "n".into(),
            kind: "file".into(),
            events: all_events(),
            filter: BTreeMap::from([("agent_id".to_owned(), vec!["a".to_owned()])]),
            redact: vec!["transcript".into()],
            rate_limit: Some("1/s".into()),
            circuit_breaker: RawBreaker::default(),
            options: Dict::new(),
        };
        let table: toml::Table =
            toml::from_str(&toml::to_string(&sink).expect("toml")).expect("a table");
        let mut keys: Vec<&str> = table.keys().map(String::as_str).collect();
        let mut listed: Vec<&str> = COMMON_SINK_KEYS.split(", ").collect();
        keys.sort_unstable();
        listed.sort_unstable();
        assert_eq!(keys, listed);
    }

    #[test]
    fn the_sections_are_the_raw_configs_own_fields() {
        let table: toml::Table =
            toml::from_str(&toml::to_string(&RawConfig::default()).expect("toml"))
                .expect("a table");
        let mut keys: Vec<&str> = table.keys().map(String::as_str).collect();
        let mut listed = SECTIONS.to_vec();
        keys.sort_unstable();
        listed.sort_unstable();
        assert_eq!(keys, listed);
    }
}
