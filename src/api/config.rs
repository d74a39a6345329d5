//! The API client's settings: the `[api]` table as written ([`ApiOptions`]), its defaults,
//! and the checked [`ApiConfig`] with its secret [`ApiKey`].

use std::fmt;
use std::time::Duration;

use reqwest::header::HeaderValue;
use serde::{Deserialize, Serialize};

use crate::config::error::{self, DurationText, Invalid, InvalidAt, REDACTED};

/// The REST API key from the environment, used when the file has none.
pub const API_KEY_ENV: &str = "VYORA_API_KEY";

/// The `[api]` table: exactly what the file may say, with defaults.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiOptions {
    pub base_url: String,
    pub api_key: String,
    pub requests_per_minute: u64,
    pub timeout: DurationText,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            base_url: "https://api.vyora.ai".into(),
            api_key: String::new(),
            requests_per_minute: 60,
            timeout: "10s".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    pub base_url: reqwest::Url,
    /// `None` when neither `api.api_key` nor `VYORA_API_KEY` gives one.
    pub api_key: Option<ApiKey>,
    pub requests_per_minute: usize,
    pub timeout: Duration,
}

/// The API key. Its `Debug` never shows it.
#[derive(Clone)]
pub struct ApiKey(pub(super) HeaderValue);

impl ApiKey {
    pub fn new(key: &str) -> Option<ApiKey> {
        let mut value = HeaderValue::from_str(key).ok()?;
        value.set_sensitive(true);
        Some(ApiKey(value))
    }
}

/// Compared in constant time: a reload compares keys, and a key is a secret.
impl PartialEq for ApiKey {
    fn eq(&self, other: &ApiKey) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for ApiKey {}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl ApiOptions {
    /// The key from the environment (`VYORA_API_KEY`) fills what the file left empty.
    pub fn key_from_env(&mut self, key: Option<String>) {
        if self.api_key.is_empty() {
            self.api_key = key.unwrap_or_default().trim().to_owned();
        }
    }

    /// Checks every key; a refusal names the key below `[api]`.
    pub fn validate(&self) -> Result<ApiConfig, Invalid> {
        let base_url = reqwest::Url::parse(&self.base_url)
            .map_err(|e| Invalid::new(&self.base_url, format!("not a URL ({e})")))
            .under("base_url")?;
        if !matches!(base_url.scheme(), "http" | "https") || base_url.host_str().is_none() {
            return Err(
                Invalid::new(&self.base_url, "must be an http:// or https:// URL")
                    .under("base_url"),
            );
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
            return Err(Invalid::new(
                &self.base_url,
                "must be https:// (http:// is allowed only for 127.0.0.0/8, ::1 and \
                 localhost): over http:// the API key would travel in clear text",
            )
            .under("base_url"));
        }
        let api_key = if self.api_key.is_empty() {
            None
        } else {
            Some(
                ApiKey::new(&self.api_key)
                    .ok_or_else(|| Invalid::new(REDACTED, "is not a valid header value"))
                    .under("api_key")?,
            )
        };
        Ok(ApiConfig {
            base_url,
            api_key,
            requests_per_minute: error::count(self.requests_per_minute)
                .under("requests_per_minute")?,
            timeout: error::duration(&self.timeout).under("timeout")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(base_url: &str) -> ApiOptions {
        ApiOptions {
            base_url: base_url.into(),
            ..ApiOptions::default()
        }
    }

    #[test]
    fn api_keys_compare_by_value() {
        let key = ApiKey::new("vya_live_a").expect("valid");
        assert_eq!(key, ApiKey::new("vya_live_a").expect("valid"));
        assert_ne!(key, ApiKey::new("vya_live_b").expect("valid"));
        assert_ne!(key, ApiKey::new("vya_live_a2").expect("valid"));
    }

    #[test]
    fn the_api_key_never_shows_in_debug_output() {
        let key = ApiKey::new("vya_live_secret").expect("valid");
        assert!(!format!("{key:?}").contains("vya_live_secret"));
    }

    #[test]
    fn http_is_refused_unless_the_api_is_on_a_loopback_address() {
        for local in ["http://127.0.0.1:8080", "http://[::1]/", "http://LocalHost"] {
            assert!(options(local).validate().is_ok(), "{local}");
        }
        let e = options("http://api.vyora.ai")
            .validate()
            .expect_err("clear text");
        assert_eq!(e.key.as_deref(), Some("base_url"));
        assert!(e.reason.contains("clear text"), "{e}");
    }

    #[test]
    fn a_key_from_the_environment_fills_only_an_empty_one() {
        let mut from_file = ApiOptions {
            api_key: "file-key".into(),
            ..ApiOptions::default()
        };
        from_file.key_from_env(Some("env-key".into()));
        assert_eq!(from_file.api_key, "file-key");
        let mut empty = ApiOptions::default();
        empty.key_from_env(Some(" env-key \n".into()));
        assert_eq!(empty.api_key, "env-key");
    }

    #[test]
    fn an_invalid_key_is_named_but_never_shown() {
        let options = ApiOptions {
            api_key: "vya\nsecret".into(),
            ..ApiOptions::default()
        };
        let e = options.validate().expect_err("not a header value");
        assert_eq!(e.key.as_deref(), Some("api_key"));
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}
