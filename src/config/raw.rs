//! The file's schema: exactly what the TOML may say, with every default, and nothing else
//! (ripgrep's `lowargs`). Nothing here is checked beyond its type; [`super::validate`]
//! turns it into the typed [`super::Config`].
//!
//! A sink's own keys are kept as a table here and read by its type's options struct, and
//! the `[api]` table is the API client's own (`crate::api::ApiOptions`): each component
//! owns its schema.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::ApiOptions;
use crate::routing::EventSelector;

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
    pub(super) wait_for_analysis: String,
    pub(super) interval: String,
    pub(super) give_up_after: String,
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
    pub(super) header_read_timeout: String,
    pub(super) ack_timeout: String,
    pub(super) max_connections: u64,
    pub(super) shutdown_timeout: String,
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
pub(super) struct RawWebhook {
    pub(super) secrets: Vec<String>,
    /// Defaults to `store.dedup_window`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) max_event_age: Option<String>,
    pub(super) max_clock_skew: String,
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
pub(super) struct RawStore {
    pub(super) backend: String,
    pub(super) path: String,
    pub(super) synchronous: String,
    pub(super) commit_interval: String,
    pub(super) url: String,
    pub(super) schema: String,
    pub(super) pool_size: u64,
    pub(super) lease: String,
    pub(super) retention: String,
    pub(super) dedup_window: String,
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
    pub(super) backoff_initial: String,
    pub(super) backoff_max: String,
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
    pub(super) name: String,
    #[serde(rename = "type")]
    pub(super) kind: String,
    #[serde(default = "all_events")]
    pub(super) events: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(super) filter: BTreeMap<String, Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) redact: Vec<String>,
    #[serde(flatten)]
    pub(super) options: figment::value::Dict,
}

/// [`RawSink`]'s own keys, for the error on an unknown one (a test keeps them in step).
pub(super) const COMMON_SINK_KEYS: &str = "name, type, events, filter, redact";

fn all_events() -> Vec<String> {
    vec![EventSelector::ALL.to_owned()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_common_sink_keys_are_the_raw_sinks_own_fields() {
        let sink = RawSink {
            name: "n".into(),
            kind: "file".into(),
            events: all_events(),
            filter: BTreeMap::from([("agent_id".to_owned(), vec!["a".to_owned()])]),
            redact: vec!["transcript".into()],
            options: figment::value::Dict::new(),
        };
        let table: toml::Table =
            toml::from_str(&toml::to_string(&sink).expect("toml")).expect("a table");
        let mut keys: Vec<&str> = table.keys().map(String::as_str).collect();
        let mut listed: Vec<&str> = COMMON_SINK_KEYS.split(", ").collect();
        keys.sort_unstable();
        listed.sort_unstable();
        assert_eq!(keys, listed);
    }
}
