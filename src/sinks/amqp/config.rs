//! The AMQP sink's settings: its keys as written ([`AmqpOptions`]) with their defaults,
//! and the checked [`AmqpSinkConfig`]. A new option is added here and nowhere else.

use std::fmt;
use std::time::Duration;

use lapin::types::ShortString;
use serde::{Deserialize, Serialize};

use crate::config::error::{self, DurationText, Invalid, InvalidAt, without_password};
use crate::sinks::topic::Topic;

/// An `amqp` sink's own keys, beside those every sink has.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpOptions {
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
    confirm_timeout: DurationText,
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

fn default_confirm_timeout() -> DurationText {
    "30s".into()
}

fn default_max_in_flight() -> u64 {
    256
}

#[derive(Clone)]
pub struct AmqpSinkConfig {
    /// `amqp://` or `amqps://`, checked at start; may hold a password.
    pub url: String,
    /// Checked at start to fit AMQP's 255-byte short string.
    pub exchange: ShortString,
    pub exchange_kind: lapin::ExchangeKind,
    /// Declare the exchange (durable) on every connect.
    pub declare: bool,
    pub routing_key: Topic,
    /// Unroutable messages come back and are not counted as delivered.
    pub mandatory: bool,
    pub confirm_timeout: Duration,
    /// Messages published and not yet confirmed, at most.
    pub max_in_flight: usize,
}

impl fmt::Debug for AmqpSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSinkConfig")
            .field("url", &without_password(&self.url))
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

impl AmqpOptions {
    /// Checks every key; a refusal names the key below the sink's table, and never shows
    /// the URL's password.
    pub fn validate(self) -> Result<AmqpSinkConfig, Invalid> {
        self.url
            .parse::<lapin::uri::AMQPUri>()
            .map_err(|e| {
                Invalid::new(
                    without_password(&self.url),
                    format!("not an amqp:// or amqps:// URL ({e})"),
                )
            })
            .under("url")?;
        let exchange_kind = match self.exchange_type.as_str() {
            "direct" => lapin::ExchangeKind::Direct,
            "fanout" => lapin::ExchangeKind::Fanout,
            "topic" => lapin::ExchangeKind::Topic,
            "headers" => lapin::ExchangeKind::Headers,
            other => {
                return Err(Invalid::new(
                    other,
                    "must be \"direct\", \"fanout\", \"topic\" or \"headers\"",
                )
                .under("exchange_type"));
            }
        };
        if self.declare && self.exchange.is_empty() {
            return Err(Invalid::new(
                "",
                "the default exchange cannot be declared; name an exchange or set declare = false",
            )
            .under("exchange"));
        }
        let routing_key = Topic::parse(&self.routing_key).under("routing_key")?;
        // Fallible: lapin's `From<String>` panics beyond 255 bytes.
        let exchange = ShortString::try_new(self.exchange.as_str())
            .map_err(|e| Invalid::new(&self.exchange, e.to_string()))
            .under("exchange")?;
        Ok(AmqpSinkConfig {
            url: self.url,
            exchange,
            exchange_kind,
            declare: self.declare,
            routing_key,
            mandatory: self.mandatory,
            confirm_timeout: error::duration(&self.confirm_timeout).under("confirm_timeout")?,
            max_in_flight: error::count(self.max_in_flight).under("max_in_flight")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(toml: &str) -> AmqpOptions {
        toml::from_str(toml).expect("options")
    }

    #[test]
    fn left_out_keys_take_their_defaults() {
        let c = options("url = \"amqp://mq.internal\"\nexchange = \"vyora\"\n")
            .validate()
            .expect("valid");
        assert_eq!(c.exchange_kind, lapin::ExchangeKind::Topic);
        assert!(c.declare && c.mandatory);
        assert_eq!(c.confirm_timeout, Duration::from_secs(30));
        assert_eq!(c.max_in_flight, 256);
    }

    #[test]
    fn each_refusal_names_its_key_and_never_the_password() {
        let base = "url = \"amqp://u:amqp-password@mq\"\nexchange = \"vyora\"\n";
        let cases = [
            (
                "url = \"http://u:amqp-password@mq\"\nexchange = \"x\"\n".to_owned(),
                "url",
            ),
            (format!("{base}exchange_type = \"fan\"\n"), "exchange_type"),
            (format!("{base}routing_key = \"{{evnt}}\"\n"), "routing_key"),
            (format!("{base}max_in_flight = 0\n"), "max_in_flight"),
            (
                "url = \"amqp://mq\"\nexchange = \"\"\n".to_owned(),
                "exchange",
            ),
        ];
        for (toml, key) in cases {
            let e = options(&toml).validate().expect_err(key);
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert!(!e.to_string().contains("amqp-password"), "{e}");
        }
        let c = options(base).validate().expect("valid");
        assert!(!format!("{c:?}").contains("amqp-password"));
    }

    #[test]
    fn an_exchange_name_over_255_bytes_is_refused_not_a_panic() {
        let toml = format!("url = \"amqp://mq\"\nexchange = \"{}\"\n", "x".repeat(300));
        let e = options(&toml).validate().expect_err("too long");
        assert_eq!(e.key.as_deref(), Some("exchange"));
    }
}
