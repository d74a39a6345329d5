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
/// What replaces a password inside a URL: `amqp://guest:***@mq`. Unlike [`REDACTED`], it
/// needs no percent-encoding there, so the URL stays readable.
pub const URL_PASSWORD: &str = "***";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `error` is part of the message, not a `source`: printed with its chain, it would
    /// be said twice.
    #[error("cannot read the config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file is not TOML, or a value is not of its key's type, or a key is unknown.
    #[error("{0}")]
    Syntax(FigmentReport),
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
    /// Every error the file has, so that one run reports them all; one per line.
    #[error("{} errors in the config:{}", .0.len(), lines(.0))]
    Several(Vec<ConfigError>),
}

fn lines(errors: &[ConfigError]) -> String {
    errors.iter().map(|e| format!("\n  {e}")).collect()
}

impl ConfigError {
    /// The key the error is about (`server.listen`, `sinks[1].url`), if one.
    pub fn key(&self) -> Option<String> {
        match self {
            ConfigError::Syntax(report) => Some(report.0.path.join(".")),
            ConfigError::Invalid { key, .. } => Some(key.clone()),
            ConfigError::MissingSecret { .. } => Some("webhook.secrets".to_owned()),
            ConfigError::Read { .. } | ConfigError::Several(_) => None,
        }
    }

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

/// The errors of one config, gathered section by section instead of stopping at the
/// first, so that an operator fixes them all in one pass.
#[derive(Debug, Default)]
pub struct Errors(Vec<ConfigError>);

impl Errors {
    pub fn push(&mut self, error: ConfigError) {
        match error {
            ConfigError::Several(errors) => self.0.extend(errors),
            error => self.0.push(error),
        }
    }

    /// The value if `result` has one; else its error is kept and `None` returned.
    pub fn check<T>(&mut self, result: Result<T, ConfigError>) -> Option<T> {
        result.map_err(|e| self.push(e)).ok()
    }

    /// `Ok(value)` when nothing was refused.
    pub fn or<T>(self, value: T) -> Result<T, ConfigError> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self.into())
        }
    }
}

impl IntoIterator for Errors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl From<Errors> for ConfigError {
    /// One error as itself, several as [`ConfigError::Several`].
    fn from(mut errors: Errors) -> ConfigError {
        match errors.0.len() {
            1 => errors.0.remove(0),
            _ => ConfigError::Several(errors.0),
        }
    }
}

/// The candidate `word` was most likely meant as, if one is close enough: a typo's fix
/// for "did you mean".
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// A duration as written (`"30s"`), checked by [`duration`] where it is used. A type of
/// its own so that a value of another type (`timeout = 4`) is refused with what a
/// duration looks like, not as "expected a string".
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct DurationText(String);

impl std::ops::Deref for DurationText {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for DurationText {
    fn from(text: &str) -> DurationText {
        DurationText(text.to_owned())
    }
}

impl fmt::Display for DurationText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for DurationText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = DurationText;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(DURATION_EXAMPLE)
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<DurationText, E> {
                Ok(DurationText::from(text))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

/// What every duration refusal says a duration looks like.
const DURATION_EXAMPLE: &str = "a duration like \"4s\"";

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
            format!("expected {DURATION_EXAMPLE}, \"500ms\", \"5m\" or \"7d\" ({e})"),
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

/// `scheme://user:***@host` for `scheme://user:password@host`; other text as it is.
pub fn without_password(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Only fails for URLs that cannot have a password, which this one has.
            let _ = parsed.set_password(Some(URL_PASSWORD));
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

/// Whether the value at `path` (from the top, a sink's table named `sinks[i]`) may be a
/// secret.
fn may_hold_secret(path: &[String]) -> bool {
    match path {
        [] => true,
        [table] if SECRET_TABLES.contains(&table.as_str()) || is_sink(table) => true,
        _ => path.iter().any(|key| SECRET_KEYS.contains(&key.as_str())),
    }
}

/// `sinks[0]`: one sink's table.
fn is_sink(key: &str) -> bool {
    key.starts_with("sinks[")
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
            // A key's name is no secret; serde's own wording nests backticks.
            Kind::UnknownField(field, known) => {
                f.write_str("unknown key")?;
                match suggest(field, known.iter().copied()) {
                    Some(near) => write!(f, "; did you mean `{near}`?"),
                    None => write!(f, "; the keys here are {}", known.join(", ")),
                }
            }
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
        assert_eq!(
            shown, "amqp://u:***@mq:5672/v",
            "readable, not percent-encoded"
        );
        assert_eq!(without_password("not a url"), "not a url");
    }
}
