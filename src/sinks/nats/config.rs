//! The NATS sink's settings: its keys as written ([`NatsOptions`]) with their defaults,
//! and the checked [`NatsSinkConfig`]. A new option is added here and nowhere else.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::error::{self, DurationText, Invalid, InvalidAt, REDACTED, without_password};
use crate::signature::Secret;
use crate::sinks::topic::Topic;

/// A `nats` sink's own keys, beside those every sink has.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsOptions {
    url: String,
    #[serde(default = "default_subject")]
    subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stream: Option<String>,
    #[serde(default)]
    declare: bool,
    #[serde(default = "default_duplicate_window")]
    duplicate_window: DurationText,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nkey: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    credentials: Option<PathBuf>,
    #[serde(default)]
    tls: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    #[serde(default = "default_ack_timeout")]
    ack_timeout: DurationText,
    #[serde(default = "default_max_in_flight")]
    max_in_flight: u64,
}

fn default_subject() -> String {
    "vyora.{event}".into()
}

/// Longer than the first retries of a delivery whose ack was lost, and what a declared
/// stream keeps message ids for; the server's own default is 2 minutes.
fn default_duplicate_window() -> DurationText {
    "1h".into()
}

fn default_ack_timeout() -> DurationText {
    "30s".into()
}

fn default_max_in_flight() -> u64 {
    256
}

/// How the sink logs in, beside a user and password in the URL.
#[derive(Clone, Default)]
pub enum Auth {
    #[default]
    None,
    UserPassword {
        user: String,
        password: String,
    },
    Token(String),
    /// An nkey seed (`SU...`).
    Nkey(String),
    /// A `.creds` file: a user JWT and its nkey seed.
    Credentials(PathBuf),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &REDACTED)
                .finish(),
            Auth::Token(_) => f.debug_tuple("Token").field(&REDACTED).finish(),
            Auth::Nkey(_) => f.debug_tuple("Nkey").field(&REDACTED).finish(),
            Auth::Credentials(path) => f.debug_tuple("Credentials").field(path).finish(),
        }
    }
}

#[derive(Clone)]
pub struct NatsSinkConfig {
    /// `nats://` or `tls://`, checked at start; may hold a user and password.
    pub url: String,
    /// The subject, by the routing key's rule: a value cannot add tokens or wildcards.
    pub subject: Topic,
    /// The subject as written, for messages that name the key's value.
    pub subject_template: String,
    /// The stream that must capture the subject; `None`: any stream that does.
    pub stream: Option<String>,
    /// Create `stream` (capturing the subject's filter) when it is missing.
    pub declare: bool,
    /// A declared stream's duplicate window: a redelivery within it is dropped.
    pub duplicate_window: Duration,
    pub auth: Auth,
    /// TLS even on a `nats://` URL.
    pub tls: bool,
    /// Roots to trust for the server's certificate, instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// Signs each message's payload (`Vyora-Signature` header), as the HTTP sink does.
    pub secret: Option<Secret>,
    /// How long a publish may wait for the stream's ack.
    pub ack_timeout: Duration,
    /// Messages published and not yet acknowledged, at most.
    pub max_in_flight: usize,
}

impl fmt::Debug for NatsSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSinkConfig")
            .field("url", &without_password(&self.url))
            .field("subject", &self.subject_template)
            .field("stream", &self.stream)
            .field("declare", &self.declare)
            .field("duplicate_window", &self.duplicate_window)
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("secret", &self.secret)
            .field("ack_timeout", &self.ack_timeout)
            .field("max_in_flight", &self.max_in_flight)
            .finish()
    }
}

impl NatsOptions {
    /// Checks every key; a refusal names the key below the sink's table, and never shows
    /// the URL's password, the token, the nkey seed or the secret.
    pub fn validate(self) -> Result<NatsSinkConfig, Invalid> {
        // A value that is not a URL at all may still hold a password: it is not shown.
        let parsed = reqwest::Url::parse(&self.url).ok().filter(|u| u.has_host());
        let shown = match &parsed {
            Some(_) => without_password(&self.url),
            None => REDACTED.to_owned(),
        };
        let Some(parsed) = parsed.filter(|u| matches!(u.scheme(), "nats" | "tls")) else {
            return Err(Invalid::new(
                &shown,
                "must be a nats:// or tls:// URL (nats://[user:password@]host[:port])",
            )
            .under("url"));
        };
        let subject = Topic::parse(&self.subject).under("subject")?;
        let filter = subject.subject_filter();
        if filter.split('.').any(|token| {
            token.is_empty()
                || token.contains(['>', ' ', '\t', '\r', '\n'])
                || (token != "*" && token.contains('*'))
        }) {
            return Err(Invalid::new(
                &self.subject,
                "is not a NATS subject: tokens separated by single dots, without whitespace or wildcards",
            )
            .under("subject"));
        }
        if let Some(stream) = &self.stream
            && (stream.is_empty()
                || stream
                    .chars()
                    .any(|c| matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace()))
        {
            return Err(Invalid::new(
                stream,
                "is not a stream name: no dots, wildcards, slashes or whitespace",
            )
            .under("stream"));
        }
        if self.declare && self.stream.is_none() {
            return Err(
                Invalid::new("true", "needs `stream`, the name of the stream to create")
                    .under("declare"),
            );
        }
        let auth = auth(&self, &parsed)?;
        if let Some(ca_file) = &self.ca_file
            && !ca_file.is_file()
        {
            return Err(Invalid::new(ca_file.display(), "is not a readable file").under("ca_file"));
        }
        let secret = match &self.secret {
            None => None,
            Some(s) => Some(
                Secret::new(s.as_bytes())
                    .map_err(|e| Invalid::new("", e.to_string()))
                    .under("secret")?,
            ),
        };
        Ok(NatsSinkConfig {
            subject,
            subject_template: self.subject,
            stream: self.stream,
            declare: self.declare,
            duplicate_window: error::duration(&self.duplicate_window).under("duplicate_window")?,
            auth,
            tls: self.tls || parsed.scheme() == "tls",
            ca_file: self.ca_file,
            secret,
            ack_timeout: error::duration(&self.ack_timeout).under("ack_timeout")?,
            max_in_flight: error::count(self.max_in_flight).under("max_in_flight")?,
            url: self.url,
        })
    }
}

/// The one way of logging in the keys name; two at once is refused rather than one
/// silently winning.
fn auth(options: &NatsOptions, url: &reqwest::Url) -> Result<Auth, Invalid> {
    let mut chosen = Vec::new();
    if !url.username().is_empty() {
        chosen.push("url");
    }
    if options.user.is_some() || options.password.is_some() {
        chosen.push("user");
    }
    if options.token.is_some() {
        chosen.push("token");
    }
    if options.nkey.is_some() {
        chosen.push("nkey");
    }
    if options.credentials.is_some() {
        chosen.push("credentials");
    }
    if let [first, second, ..] = chosen[..] {
        return Err(Invalid::new(
            REDACTED,
            format!("is given with `{first}`: use one way of logging in"),
        )
        .under(second));
    }
    let auth = match (&options.user, &options.password) {
        (Some(user), Some(password)) => Auth::UserPassword {
            user: user.clone(),
            password: password.clone(),
        },
        (Some(user), None) => {
            return Err(Invalid::new(user, "needs `password` beside it").under("user"));
        }
        (None, Some(_)) => {
            return Err(Invalid::new(REDACTED, "needs `user` beside it").under("password"));
        }
        (None, None) => match (&options.token, &options.nkey, &options.credentials) {
            (Some(token), _, _) if token.is_empty() => {
                return Err(Invalid::new("", "must not be empty").under("token"));
            }
            (Some(token), _, _) => Auth::Token(token.clone()),
            (_, Some(seed), _) => {
                if nkeys::KeyPair::from_seed(seed).is_err() {
                    return Err(Invalid::new(REDACTED, "is not an nkey seed (SU...)").under("nkey"));
                }
                Auth::Nkey(seed.clone())
            }
            (_, _, Some(path)) => {
                if !path.is_file() {
                    return Err(
                        Invalid::new(path.display(), "is not a readable file").under("credentials")
                    );
                }
                Auth::Credentials(path.clone())
            }
            _ => Auth::None,
        },
    };
    Ok(auth)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn options(toml: &str) -> NatsOptions {
        toml::from_str(toml).expect("options")
    }

    /// A checked config from a sink table's own keys.
    pub(crate) fn config(toml: &str) -> NatsSinkConfig {
        options(toml).validate().expect("valid")
    }

    #[test]
    fn left_out_keys_take_their_defaults() {
        let c = config("url = \"nats://127.0.0.1:4222\"\n");
        assert_eq!(c.subject, Topic::parse("vyora.{event}").expect("valid"));
        assert_eq!(c.stream, None);
        assert!(!c.declare);
        assert_eq!(c.duplicate_window, Duration::from_secs(3600));
        assert!(matches!(c.auth, Auth::None));
        assert!(!c.tls);
        assert!(c.secret.is_none());
        assert_eq!(c.ack_timeout, Duration::from_secs(30));
        assert_eq!(c.max_in_flight, 256);
    }

    #[test]
    fn a_tls_url_or_key_asks_for_tls_and_keys_choose_the_login() {
        assert!(config("url = \"tls://nats.internal:4222\"\n").tls);
        assert!(config("url = \"nats://nats.internal\"\ntls = true\n").tls);
        let c = config("url = \"nats://nats.internal\"\ntoken = \"t0ken\"\n");
        assert!(matches!(c.auth, Auth::Token(ref t) if t == "t0ken"));
        let c = config("url = \"nats://nats.internal\"\nuser = \"u\"\npassword = \"p\"\n");
        assert!(matches!(c.auth, Auth::UserPassword { .. }));
    }

    #[test]
    fn each_refusal_names_its_key_and_never_a_secret() {
        let base = "url = \"nats://u:nats-password@mq\"\n";
        let cases = [
            ("url = \"http://u:nats-password@mq\"\n".to_owned(), "url"),
            ("url = \"u:nats-password@mq\"\n".to_owned(), "url"),
            (format!("{base}subject = \"{{evnt}}\"\n"), "subject"),
            (format!("{base}subject = \"vyora..{{event}}\"\n"), "subject"),
            (format!("{base}subject = \"vyora.>\"\n"), "subject"),
            (format!("{base}stream = \"a.b\"\n"), "stream"),
            (format!("{base}declare = true\n"), "declare"),
            (format!("{base}token = \"nats-password\"\n"), "token"),
            (
                "url = \"nats://mq\"\nnkey = \"nats-password\"\n".to_owned(),
                "nkey",
            ),
            (
                "url = \"nats://mq\"\npassword = \"nats-password\"\n".to_owned(),
                "password",
            ),
            (
                "url = \"nats://mq\"\ncredentials = \"/no/such.creds\"\n".to_owned(),
                "credentials",
            ),
            (
                "url = \"nats://mq\"\nca_file = \"/no/such/ca.pem\"\n".to_owned(),
                "ca_file",
            ),
            (format!("{base}secret = \"\"\n"), "secret"),
            (
                format!("{base}duplicate_window = \"0s\"\n"),
                "duplicate_window",
            ),
            (format!("{base}ack_timeout = \"soon\"\n"), "ack_timeout"),
            (format!("{base}max_in_flight = 0\n"), "max_in_flight"),
        ];
        for (toml, key) in cases {
            let e = options(&toml).validate().expect_err(key);
            assert_eq!(e.key.as_deref(), Some(key), "{toml}: {e}");
            assert!(!e.to_string().contains("nats-password"), "{e}");
        }
        let c = config(
            "url = \"nats://u:nats-password@mq\"\nsecret = \"sign-secret\"\nstream = \"VYORA\"\ndeclare = true\n",
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("nats-password"), "{shown}");
        assert!(!shown.contains("sign-secret"), "{shown}");
        let c = config("url = \"nats://mq\"\ntoken = \"the-token\"\n");
        assert!(!format!("{c:?}").contains("the-token"));
    }
}
