//! The Redis sink's settings: its keys as written ([`RedisOptions`]) with their defaults,
//! and the checked [`RedisSinkConfig`]. A new option is added here and nowhere else.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::error::{self, DurationText, Invalid, InvalidAt, REDACTED, without_password};
use crate::signature::Secret;
use crate::sinks::topic::Topic;

/// A `redis` sink's own keys, beside those every sink has.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisOptions {
    url: String,
    #[serde(default = "default_stream")]
    stream: String,
    /// 0: the stream is never trimmed.
    #[serde(default)]
    maxlen: u64,
    #[serde(default = "default_idempotency_ttl")]
    idempotency_ttl: DurationText,
    #[serde(default = "default_idempotency_prefix")]
    idempotency_prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    #[serde(default = "default_timeout")]
    timeout: DurationText,
    #[serde(default = "default_max_in_flight")]
    max_in_flight: u64,
    #[serde(default = "default_concurrency")]
    concurrency: u64,
}

fn default_stream() -> String {
    "vyora.{event}".into()
}

/// Longer than any retry horizon the delivery settings allow by default (12 attempts
/// backing off to 5 minutes is about an hour), with room for an outage held in the store.
fn default_idempotency_ttl() -> DurationText {
    "7d".into()
}

fn default_idempotency_prefix() -> String {
    "vyora:idempotency:".into()
}

fn default_timeout() -> DurationText {
    "10s".into()
}

fn default_max_in_flight() -> u64 {
    256
}

fn default_concurrency() -> u64 {
    4
}

#[derive(Clone)]
pub struct RedisSinkConfig {
    /// `redis://` or `rediss://`, checked at start; may hold an ACL user and password.
    pub url: String,
    /// The stream key, by the routing key's rule: a value cannot add `.`-separated words.
    pub stream: Topic,
    /// `XADD ... MAXLEN ~ n`; `None`: never trimmed.
    pub maxlen: Option<u64>,
    /// How long a delivery's idempotency key is kept, so a redelivery adds nothing.
    pub idempotency_ttl: Duration,
    /// Where idempotency keys live: `<prefix><stream>:<idempotency key>`.
    pub idempotency_prefix: String,
    /// Signs each entry's payload (`signature` field), as the HTTP sink signs its body.
    pub secret: Option<Secret>,
    /// How long a command may go unanswered before the connection is given up.
    pub timeout: Duration,
    /// Entries sent in one pipeline, at most.
    pub max_in_flight: usize,
    /// Pipelines in flight at once, on the one connection. A call's later event is not
    /// handed out while an earlier one is in flight, so this does not reorder a call.
    pub concurrency: usize,
}

impl fmt::Debug for RedisSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSinkConfig")
            .field("url", &without_password(&self.url))
            .field("stream", &self.stream)
            .field("maxlen", &self.maxlen)
            .field("idempotency_ttl", &self.idempotency_ttl)
            .field("idempotency_prefix", &self.idempotency_prefix)
            .field("secret", &self.secret)
            .field("timeout", &self.timeout)
            .field("max_in_flight", &self.max_in_flight)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl RedisOptions {
    /// Checks every key; a refusal names the key below the sink's table, and never shows
    /// the URL's password or the secret.
    pub fn validate(self) -> Result<RedisSinkConfig, Invalid> {
        // A value that is not a URL at all may still hold a password: it is not shown.
        let shown = match reqwest::Url::parse(&self.url) {
            Ok(url) if url.has_host() => without_password(&self.url),
            _ => REDACTED.to_owned(),
        };
        let refused = |reason: &str| Invalid::new(&shown, reason).under("url");
        let scheme = self.url.split_once("://").map(|(scheme, _)| scheme);
        if !matches!(scheme, Some("redis" | "rediss")) {
            return Err(refused("must be a redis:// or rediss:// URL"));
        }
        // The client's own parser decides what it can connect to; its error may quote
        // the URL, so it is not shown.
        if redis::Client::open(self.url.as_str()).is_err() {
            return Err(refused(
                "is not a URL the Redis client accepts (redis[s]://[user:password@]host[:port][/db])",
            ));
        }
        let stream = Topic::parse(&self.stream).under("stream")?;
        let idempotency_ttl = error::duration(&self.idempotency_ttl).under("idempotency_ttl")?;
        if idempotency_ttl < Duration::from_secs(1) {
            return Err(
                Invalid::new(&self.idempotency_ttl, "must be at least 1s").under("idempotency_ttl")
            );
        }
        let secret = match &self.secret {
            None => None,
            Some(s) => Some(
                Secret::new(s.as_bytes())
                    .map_err(|e| Invalid::new("", e.to_string()))
                    .under("secret")?,
            ),
        };
        Ok(RedisSinkConfig {
            url: self.url,
            stream,
            maxlen: (self.maxlen > 0).then_some(self.maxlen),
            idempotency_ttl,
            idempotency_prefix: self.idempotency_prefix,
            secret,
            timeout: error::duration(&self.timeout).under("timeout")?,
            max_in_flight: error::count(self.max_in_flight).under("max_in_flight")?,
            concurrency: error::count(self.concurrency).under("concurrency")?,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn options(toml: &str) -> RedisOptions {
        toml::from_str(toml).expect("options")
    }

    /// A checked config from a sink table's own keys.
    pub(crate) fn config(toml: &str) -> RedisSinkConfig {
        options(toml).validate().expect("valid")
    }

    #[test]
    fn left_out_keys_take_their_defaults() {
        let c = options("url = \"redis://127.0.0.1:6379\"\n")
            .validate()
            .expect("valid");
        assert_eq!(c.maxlen, None);
        assert_eq!(c.idempotency_ttl, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.idempotency_prefix, "vyora:idempotency:");
        assert!(c.secret.is_none());
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!(c.max_in_flight, 256);
        assert_eq!(c.concurrency, 4);
        assert_eq!(c.stream, Topic::parse("vyora.{event}").expect("valid"));
    }

    #[test]
    fn a_maxlen_trims_and_tls_urls_with_acl_users_are_accepted() {
        let c = options("url = \"rediss://vyora:pw@redis.internal:6380/2\"\nmaxlen = 100000\n")
            .validate()
            .expect("valid");
        assert_eq!(c.maxlen, Some(100_000));
    }

    #[test]
    fn each_refusal_names_its_key_and_never_the_password() {
        let base = "url = \"redis://u:redis-password@cache\"\n";
        let cases = [
            (
                "url = \"http://u:redis-password@cache\"\n".to_owned(),
                "url",
            ),
            ("url = \"u:redis-password@cache\"\n".to_owned(), "url"),
            (format!("{base}stream = \"{{evnt}}\"\n"), "stream"),
            (
                format!("{base}idempotency_ttl = \"soon\"\n"),
                "idempotency_ttl",
            ),
            (
                format!("{base}idempotency_ttl = \"10ms\"\n"),
                "idempotency_ttl",
            ),
            (format!("{base}secret = \"\"\n"), "secret"),
            (format!("{base}timeout = \"0s\"\n"), "timeout"),
            (format!("{base}max_in_flight = 0\n"), "max_in_flight"),
            (format!("{base}concurrency = 0\n"), "concurrency"),
        ];
        for (toml, key) in cases {
            let e = options(&toml).validate().expect_err(key);
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert!(!e.to_string().contains("redis-password"), "{e}");
        }
        let c = options(&format!("{base}secret = \"sign-secret\"\n"))
            .validate()
            .expect("valid");
        let shown = format!("{c:?}");
        assert!(!shown.contains("redis-password"), "{shown}");
        assert!(!shown.contains("sign-secret"), "{shown}");
    }
}
