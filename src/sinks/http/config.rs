//! The HTTP sink's settings: its keys as written ([`HttpOptions`]) with their defaults,
//! the checked [`HttpSinkConfig`], and the headers the sink keeps for itself.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::config::error::{self, DurationText, Invalid, InvalidAt, REDACTED, without_password};
use crate::protocol::{EVENT_HEADER, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, SOURCE_HEADER};
use crate::signature::Secret;

/// Headers the HTTP sink sets itself; a static header may not replace them.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "transfer-encoding",
    "host",
    "user-agent",
    IDEMPOTENCY_HEADER,
    EVENT_HEADER,
    SOURCE_HEADER,
    SIGNATURE_HEADER,
];

/// An `http` sink's own keys, beside those every sink has.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpOptions {
    url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    #[serde(default = "default_timeout")]
    timeout: DurationText,
    #[serde(default = "default_concurrency")]
    concurrency: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, String>,
}

fn default_timeout() -> DurationText {
    "10s".into()
}

fn default_concurrency() -> u64 {
    8
}

#[derive(Clone)]
pub struct HttpSinkConfig {
    pub url: reqwest::Url,
    /// Re-signs what is forwarded, so the receiver can verify it as Vyora's.
    pub secret: Option<Secret>,
    pub timeout: Duration,
    pub concurrency: usize,
    /// Static headers; every value is marked sensitive, so `Debug` never shows it.
    pub headers: HeaderMap,
}

impl fmt::Debug for HttpSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSinkConfig")
            .field("url", &without_password(self.url.as_str()))
            .field("secret", &self.secret)
            .field("timeout", &self.timeout)
            .field("concurrency", &self.concurrency)
            .field("headers", &self.headers)
            .finish()
    }
}

impl HttpOptions {
    /// Checks every key; a refusal names the key below the sink's table, and shows
    /// neither a URL's password nor a secret or header value.
    pub fn validate(self) -> Result<HttpSinkConfig, Invalid> {
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| Invalid::new(without_password(&self.url), format!("not a URL ({e})")))
            .under("url")?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(Invalid::new(
                without_password(&self.url),
                "must be an http:// or https:// URL with a host",
            )
            .under("url"));
        }
        let secret = match &self.secret {
            None => None,
            Some(s) => Some(
                Secret::new(s.as_bytes())
                    .map_err(|e| Invalid::new("", e.to_string()))
                    .under("secret")?,
            ),
        };
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            let (name, value) = header(name, value).under(name).under("headers")?;
            headers.insert(name, value);
        }
        Ok(HttpSinkConfig {
            url,
            secret,
            timeout: error::duration(&self.timeout).under("timeout")?,
            concurrency: error::count(self.concurrency).under("concurrency")?,
            headers,
        })
    }
}

/// One static header, its value marked sensitive.
fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), Invalid> {
    let header = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| Invalid::new(name, "is not a valid header name"))?;
    if RESERVED_HEADERS.contains(&header.as_str()) {
        return Err(Invalid::new(name, "is set by the router itself"));
    }
    let mut value = HeaderValue::from_str(value)
        .map_err(|_| Invalid::new(REDACTED, "is not a valid header value"))?;
    value.set_sensitive(true);
    Ok((header, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(toml: &str) -> HttpOptions {
        toml::from_str(toml).expect("options")
    }

    #[test]
    fn left_out_keys_take_their_defaults() {
        let c = options("url = \"https://x.example/hook\"\n")
            .validate()
            .expect("valid");
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!(c.concurrency, 8);
        assert!(c.secret.is_none() && c.headers.is_empty());
    }

    #[test]
    fn a_header_the_sink_sets_itself_is_refused_by_its_key() {
        for name in ["Content-Type", "X-Vyora-Signature", "Idempotency-Key"] {
            let e = options(&format!(
                "url = \"https://x.example/\"\nheaders = {{ \"{name}\" = \"v\" }}\n"
            ))
            .validate()
            .expect_err("reserved");
            assert_eq!(e.key, Some(format!("headers.{name}")));
            assert_eq!(e.value, name);
        }
    }

    #[test]
    fn neither_debug_nor_a_refusal_shows_a_password_or_a_header_value() {
        let c = options(
            "url = \"https://u:url-password@x.example/\"\nheaders = { \"X-Token\" = \"tok-value\" }\n",
        )
        .validate()
        .expect("valid");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("url-password") && !shown.contains("tok-value"),
            "{shown}"
        );

        let e = options("url = \"ftp://u:url-password@x.example/\"\n")
            .validate()
            .expect_err("not http");
        assert!(!e.to_string().contains("url-password"), "{e}");
        let e =
            options("url = \"https://x.example/\"\nheaders = { \"X-Token\" = \"bad\\ntoken\" }\n")
                .validate()
                .expect_err("not a header value");
        assert!(
            !e.to_string().contains("token") && e.value == REDACTED,
            "{e}"
        );
    }
}
