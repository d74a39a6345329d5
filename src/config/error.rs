//! What a refused config says: [`ConfigError`] for the whole file, [`Invalid`] for one
//! value, and how both avoid printing a secret.
//!
//! A leaf: it imports nothing of the crate, so that the components owning their settings
//! (the sinks, the API client, routing, redaction) can parse them and word a refusal the
//! same way without importing the rest of `config`, which imports them.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// What replaces a secret wherever one would be shown.
pub const REDACTED: &str = "<redacted>";

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
    /// `env`: where else secrets may come from (`config::SECRET_ENV`), given by the
    /// caller because this module imports nothing of the crate.
    #[error(
        "no webhook secret is configured: set `webhook.secrets` in the config file, or the \
         {env} environment variable (comma-separated to rotate), to the secret shown \
         in Vyora's Settings -> Integrations"
    )]
    MissingSecret { env: &'static str },
}

impl ConfigError {
    /// `key` = `value`: `reason`.
    pub fn invalid(
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
}

/// A value a parser refused, and why. The parser does not know where the value was
/// written; its caller does, and names the key with [`Invalid::at`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Where below the caller's key, when not at it: `agent` for a filter's
    /// `sinks[0].filter.agent`, `headers.X-Token` for an HTTP sink's header.
    pub key: Option<String>,
    /// As it may be shown: never a secret.
    pub value: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(value: impl fmt::Display, reason: impl Into<String>) -> Invalid {
        Invalid {
            key: None,
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// The same refusal, one key further down: `under("timeout")` of a sink's option.
    pub fn under(mut self, key: &str) -> Invalid {
        self.key = Some(match self.key {
            Some(below) => format!("{key}.{below}"),
            None => key.to_owned(),
        });
        self
    }

    /// The refusal as the config's error, at `key` (and below it, if the parser said so).
    pub fn at(self, key: &str) -> ConfigError {
        let Invalid { key, value, reason } = self.under(key);
        ConfigError::Invalid {
            key: key.unwrap_or_default(),
            value,
            reason,
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(key) = &self.key {
            write!(f, "`{key}` = ")?;
        }
        write!(f, "{:?}: {}", self.value, self.reason)
    }
}

impl std::error::Error for Invalid {}

/// [`Invalid::at`] and [`Invalid::under`] on a parse's result: `duration(v).at("log.x")?`.
pub trait InvalidAt<T> {
    fn at(self, key: &str) -> Result<T, ConfigError>;
    fn under(self, key: &str) -> Result<T, Invalid>;
}

impl<T> InvalidAt<T> for Result<T, Invalid> {
    fn at(self, key: &str) -> Result<T, ConfigError> {
        self.map_err(|e| e.at(key))
    }

    fn under(self, key: &str) -> Result<T, Invalid> {
        self.map_err(|e| e.under(key))
    }
}

// ---------------------------------------------------------------------------------------
// The value checks every component's settings share, worded once.

/// A duration such as `"30s"`, longer than zero.
pub fn duration(value: &str) -> Result<Duration, Invalid> {
    let d = duration_or_zero(value)?;
    if d.is_zero() {
        return Err(Invalid::new(value, "must be longer than zero"));
    }
    Ok(d)
}

/// A duration such as `"500ms"`, or zero (`"0s"`) where zero means "none".
pub fn duration_or_zero(value: &str) -> Result<Duration, Invalid> {
    humantime::parse_duration(value).map_err(|e| {
        Invalid::new(
            value,
            format!("not a duration ({e}); write e.g. \"500ms\", \"30s\", \"5m\", \"7d\""),
        )
    })
}

/// A number of at least 1.
pub fn positive(value: u64) -> Result<u64, Invalid> {
    if value == 0 {
        return Err(Invalid::new(value, "must be at least 1"));
    }
    Ok(value)
}

/// A count or size of at least 1 that fits this machine's `usize`.
pub fn count(value: u64) -> Result<usize, Invalid> {
    usize::try_from(positive(value)?).map_err(|_| Invalid::new(value, "is too large"))
}

/// `scheme://user:password@host` with the password replaced; other text as it is.
pub fn without_password(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Only fails for URLs that cannot have a password, which this one has.
            let _ = parsed.set_password(Some(REDACTED));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// Figment's errors, without the secrets they may quote.

/// A figment error rendered as `key: problem (source)`, without figment's profile prefix
/// and without anything that may be a secret: the value given for a key that holds one,
/// and the line a TOML syntax error is on. Errors end up in logs (a reload's, too).
#[derive(Debug)]
pub struct FigmentReport(pub Box<figment::Error>);

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
const SECRET_TABLES: &[&str] = &["webhook", "api", "sinks", "store"];

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toml_message_of_an_unknown_layout_is_cut_to_its_position() {
        let message = "TOML parse error at line 1, column 9\nsecrets = \"whsec\nreason";
        assert_eq!(
            toml_syntax(message).as_deref(),
            Some("not valid TOML at line 1, column 9")
        );
    }

    #[test]
    fn a_refusal_is_named_at_the_callers_key_and_below_it() {
        let e = Invalid::new("x", "is wrong")
            .under("agent")
            .at("sinks[0].filter");
        assert_eq!(e.to_string(), "`sinks[0].filter.agent` = \"x\": is wrong");
        let e = Invalid::new("x", "is wrong")
            .under("X-Token")
            .under("headers")
            .at("sinks[1]");
        assert_eq!(
            e.to_string(),
            "`sinks[1].headers.X-Token` = \"x\": is wrong"
        );
    }

    #[test]
    fn a_url_password_is_replaced_and_the_rest_kept() {
        let shown = without_password("amqp://u:pw-secret@mq:5672/v");
        assert!(!shown.contains("pw-secret"), "{shown}");
        assert!(shown.starts_with("amqp://u:") && shown.ends_with("redacted%3E@mq:5672/v"));
        assert_eq!(without_password("not a url"), "not a url");
    }
}
