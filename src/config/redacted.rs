//! The effective config as `check-config` prints it: every default filled in, every
//! secret replaced, and (unless `--show-urls`) the parts of URLs that often are one.

use figment::value::{Tag, Value};

use super::Config;
use super::error::{REDACTED, without_password};
use super::raw::{RawConfig, RawSink};

/// The two renderings `check-config` may print; a hook URL's path or query is often its key.
#[derive(Debug, Clone)]
pub(super) struct Redacted {
    urls_redacted: String,
    urls_shown: String,
}

/// Whether the redacted rendering shows URL paths and queries; passwords it never shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Urls {
    Redacted,
    Shown,
}

impl Config {
    /// The effective configuration as TOML, every default filled in and only the chosen
    /// store backend's keys; secrets replaced by `<redacted>` (a URL's password by `***`),
    /// and so are URL queries and the paths of HTTP sink URLs (Slack's `/services/...` is
    /// the key).
    pub fn redacted_toml(&self) -> &str {
        &self.redacted.urls_redacted
    }

    /// As [`Config::redacted_toml`], URLs in full but for their passwords (`--show-urls`).
    pub fn redacted_toml_with_urls(&self) -> &str {
        &self.redacted.urls_shown
    }
}

impl Redacted {
    /// Rendered once, from the raw config (defaults filled in), when the config is checked.
    pub(super) fn of(raw: &RawConfig) -> Redacted {
        Redacted {
            urls_redacted: rendering(raw, Urls::Redacted),
            urls_shown: rendering(raw, Urls::Shown),
        }
    }
}

fn rendering(raw: &RawConfig, urls: Urls) -> String {
    let mut shown = raw.clone();
    for secret in &mut shown.webhook.secrets {
        *secret = REDACTED.to_owned();
    }
    if !shown.admin.token.is_empty() {
        shown.admin.token = REDACTED.to_owned();
    }
    if !shown.api.api_key.is_empty() {
        shown.api.api_key = REDACTED.to_owned();
    }
    shown.api.base_url = shown_url(&shown.api.base_url, urls, false);
    if !shown.store.url.is_empty() {
        // Rebuilt from what was read: a password may be in any part of it.
        shown.store.url = super::postgres::shown(&shown.store.url, urls == Urls::Shown);
    }
    for sink in &mut shown.sinks {
        redact_sink(sink, urls);
    }
    // Serializing plain strings, numbers and tables cannot fail; an empty rendering
    // would only make `check-config` print less.
    let Ok(mut table) = toml::Table::try_from(&shown) else {
        return String::new();
    };
    // Only the chosen backend's keys: the others are not in effect.
    if let Some(toml::Value::Table(store)) = table.get_mut("store") {
        let unused = if shown.store.backend == "postgres" {
            SQLITE_ONLY
        } else {
            POSTGRES_ONLY
        };
        store.retain(|key, _| !unused.contains(&key));
    }
    if shown.sinks.is_empty() {
        table.remove("sinks");
    }
    toml::to_string_pretty(&table).unwrap_or_default()
}

/// `[store]` keys that only SQLite reads.
const SQLITE_ONLY: &[&str] = &["path", "synchronous", "commit_interval"];
/// `[store]` keys that only PostgreSQL reads.
const POSTGRES_ONLY: &[&str] = &["url", "pool_size", "lease"];

/// Replaces what must never be shown: secrets, header values, URL passwords; and with
/// [`Urls::Redacted`] URL queries and an HTTP sink's path. By key, whatever the sink's
/// type, so that a new sink's `url` or `secret` is hidden without a change here.
fn redact_sink(sink: &mut RawSink, urls: Urls) {
    let path_too = sink.kind == "http";
    for (key, value) in &mut sink.options {
        match (key.as_str(), value) {
            ("secret" | "password" | "token" | "nkey", v) => {
                *v = Value::String(Tag::Default, REDACTED.to_owned())
            }
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

/// `url` as `check-config` shows it: never its password, and with [`Urls::Redacted`]
/// neither its query nor, when `path_too`, its path (each replaced by `<redacted>`).
fn shown_url(url: &str, urls: Urls, path_too: bool) -> String {
    let shown = without_password(url);
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

#[cfg(test)]
mod tests {
    use super::super::tests::{HTTP_SINK, MINIMAL};
    use super::*;

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
    fn the_rendering_shows_every_default_and_only_the_chosen_backends_keys() {
        let text = format!(
            "{MINIMAL}[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"https://crm.example/\"\n\
             [[sinks]]\nname = \"queue\"\ntype = \"amqp\"\nurl = \"amqp://guest:guest@mq:5672/%2f\"\nexchange = \"vyora\"\n"
        );
        let c = Config::from_toml(&text).expect("valid");
        let shown = c.redacted_toml();
        for default in [
            "timeout = \"10s\"",
            "concurrency = 8",
            "exchange_type = \"topic\"",
            "confirm_timeout = \"30s\"",
            "max_in_flight = 256",
            "max_event_age = \"89d 23h 55m\"",
            "path = \"data/router.db\"",
            "synchronous = \"full\"",
        ] {
            assert!(shown.contains(default), "{default} not in {shown}");
        }
        for unused in ["pool_size", "lease", "url = \"\""] {
            assert!(
                !shown.contains(unused),
                "{unused} shown for SQLite: {shown}"
            );
        }
        assert!(shown.contains("amqp://guest:***@mq:5672/"), "{shown}");
        assert!(
            !shown.contains("%3C") && !shown.contains("guest:guest"),
            "{shown}"
        );

        let c = Config::from_toml(&format!(
            "{MINIMAL}[store]\nbackend = \"postgres\"\nurl = \"postgres://u:pg-password@db/vyora\"\n"
        ))
        .expect("valid");
        let shown = c.redacted_toml();
        for key in [
            "pool_size = 16",
            "lease = \"30s\"",
            "url = \"postgres://u:***@db:5432/vyora?<redacted>\"",
        ] {
            assert!(shown.contains(key), "{key} not in {shown}");
        }
        for unused in ["\npath =", "synchronous", "commit_interval"] {
            assert!(
                !shown.contains(unused),
                "{unused} shown for PostgreSQL: {shown}"
            );
        }
    }
}
