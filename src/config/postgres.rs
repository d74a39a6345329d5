//! PostgreSQL's settings: `store.url` read the way libpq reads it (a `postgres://` URL or
//! `key=value` pairs, with libpq's five `sslmode`s and `sslrootcert`), and `store.schema`.
//!
//! A connection string can hold a password in three places (the URL's user part,
//! `?password=`, `password=`) and a mistyped one anywhere, so no refusal here quotes any
//! part of it: each names the parameter (from a fixed list) and the problem.

use std::path::PathBuf;

use super::error::REDACTED;

/// Where the router's tables live unless `store.schema` says otherwise: a schema of their
/// own, so they never meet another application's tables in `public`.
pub const DEFAULT_SCHEMA: &str = "vyora_router";

/// How the connection is encrypted and the server's identity checked: libpq's `sslmode`,
/// with libpq's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it, plain otherwise (libpq's default).
    Prefer,
    /// TLS or no connection.
    Require,
    /// TLS, and the server's certificate must lead to a trusted root.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    const ALL: [SslMode; 5] = [
        SslMode::Disable,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Option<SslMode> {
        SslMode::ALL.into_iter().find(|m| m.as_str() == value)
    }
}

/// How to reach PostgreSQL, read from `store.url` and `store.schema`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// Where and as whom to connect, the password included (its `Debug` hides it), without
    /// the TLS settings below: tokio-postgres knows only three of libpq's modes.
    pub connection: tokio_postgres::Config,
    pub ssl_mode: SslMode,
    /// `sslrootcert`: the PEM file of the certificates the server's chain must lead to,
    /// instead of the system's roots (libpq's meaning). With `prefer` or `require` it makes
    /// the chain checked, as libpq does.
    pub root_cert: Option<PathBuf>,
    /// The schema holding the router's tables (`store.schema`).
    pub schema: String,
    /// Connections each replica keeps open at most.
    pub pool_size: usize,
}

impl PostgresConfig {
    /// `url` with the defaults of the other keys (the schema `vyora_router`, 16
    /// connections): for tools and tests.
    pub fn from_url(url: &str) -> Result<PostgresConfig, UrlError> {
        let parsed = parse(url)?;
        Ok(PostgresConfig {
            connection: parsed.connection,
            ssl_mode: parsed.ssl_mode,
            root_cert: parsed.root_cert,
            schema: DEFAULT_SCHEMA.to_owned(),
            pool_size: 16,
        })
    }

    /// The hosts and ports connected to, as `host:port` (for messages: never a secret).
    pub fn hosts(&self) -> String {
        let ports = self.connection.get_ports();
        let hosts: Vec<String> = self
            .connection
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let port = ports
                    .get(i)
                    .or_else(|| ports.first())
                    .copied()
                    .unwrap_or(5432);
                match host {
                    tokio_postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
                    tokio_postgres::config::Host::Unix(dir) => {
                        format!("{}/.s.PGSQL.{port}", dir.display())
                    }
                }
            })
            .collect();
        if hosts.is_empty() {
            "localhost:5432".to_owned()
        } else {
            hosts.join(",")
        }
    }
}

/// Why `store.url` was refused; never quotes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("is neither a postgres:// URL nor key=value pairs such as \"host=db user=router\"")]
    Form,
    #[error(
        "cannot be read: a `=` is missing, a value is empty, or a quote is not closed (not shown: it may hold a password)"
    )]
    Syntax,
    #[error(
        "the user, host, port or database of the URL is not valid (not shown: it may hold a password)"
    )]
    Address,
    #[error("the value of `{0}` is not valid")]
    Value(&'static str),
    #[error(
        "has a parameter this router does not know (its name is not shown: a mistyped one may be part of a password); the known ones are {KNOWN_LIST}"
    )]
    Unknown,
    #[error("`sslmode` must be disable, prefer, require, verify-ca or verify-full")]
    SslMode,
}

/// The parameters libpq and tokio-postgres share, and the two read here.
const KNOWN: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "sslmode",
    "sslrootcert",
    "sslnegotiation",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];
const KNOWN_LIST: &str = "host, hostaddr, port, user, password, dbname, options, application_name, sslmode, sslrootcert, sslnegotiation, connect_timeout, tcp_user_timeout, keepalives, keepalives_idle, keepalives_interval, keepalives_retries, target_session_attrs, channel_binding, load_balance_hosts";

fn known(key: &str) -> Result<&'static str, UrlError> {
    KNOWN
        .iter()
        .find(|k| **k == key)
        .copied()
        .ok_or(UrlError::Unknown)
}

/// What `store.url` says.
struct Parsed {
    connection: tokio_postgres::Config,
    ssl_mode: SslMode,
    root_cert: Option<PathBuf>,
    /// The parameters given by name, for `check-config`; no password among them.
    params: Vec<(&'static str, String)>,
}

/// The two parameters tokio-postgres does not read as libpq does, taken out of the
/// parameters as they pass.
#[derive(Default)]
struct Tls {
    mode: Option<SslMode>,
    root_cert: Option<PathBuf>,
}

impl Tls {
    /// Takes `key` if it is one of the two; whether it was.
    fn take(&mut self, key: &str, value: &str) -> Result<bool, UrlError> {
        match key {
            "sslmode" => {
                self.mode = Some(SslMode::parse(value).ok_or(UrlError::SslMode)?);
                Ok(true)
            }
            // libpq 16's `system`: the system's roots, as when it is left out.
            "sslrootcert" => {
                self.root_cert = (value != "system").then(|| PathBuf::from(value));
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// Reads `url` as libpq would: a URL (`postgres://` or `postgresql://`) or key=value pairs.
fn parse(url: &str) -> Result<Parsed, UrlError> {
    let url = url.trim();
    let mut tls = Tls::default();
    let mut params = Vec::new();
    let mut connection = match ["postgres://", "postgresql://"]
        .iter()
        .find_map(|scheme| url.strip_prefix(scheme))
    {
        Some(rest) => parse_url(rest, &mut tls, &mut params)?,
        None if url.contains("://") => return Err(UrlError::Form),
        None => parse_pairs(url, &mut tls, &mut params)?,
    };
    let ssl_mode = tls.mode.unwrap_or(SslMode::Prefer);
    connection.ssl_mode(match ssl_mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    });
    params.retain(|(key, _)| !["password", "host", "port", "user", "dbname"].contains(key));
    Ok(Parsed {
        connection,
        ssl_mode,
        root_cert: tls.root_cert,
        params,
    })
}

/// The URL form, after its scheme: the query's TLS parameters are taken out and the rest
/// handed to tokio-postgres as it was written.
fn parse_url(
    rest: &str,
    tls: &mut Tls,
    params: &mut Vec<(&'static str, String)>,
) -> Result<tokio_postgres::Config, UrlError> {
    let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or(UrlError::Syntax)?;
        let (key, value) = (decode(key)?, decode(value)?);
        if !tls.take(&key, &value)? {
            params.push((known(&key)?, value));
            kept.push(pair);
        }
    }
    let mut text = format!("postgres://{base}");
    if !kept.is_empty() {
        text.push('?');
        text.push_str(&kept.join("&"));
    }
    text.parse().map_err(|_| {
        // Which part: the address, or the first parameter refused on its own.
        if format!("postgres://{base}")
            .parse::<tokio_postgres::Config>()
            .is_err()
        {
            return UrlError::Address;
        }
        kept.iter()
            .find(|pair| {
                format!("postgres://?{pair}")
                    .parse::<tokio_postgres::Config>()
                    .is_err()
            })
            .and_then(|pair| pair.split_once('='))
            .and_then(|(key, _)| decode(key).ok())
            .and_then(|key| known(&key).ok())
            .map_or(UrlError::Syntax, UrlError::Value)
    })
}

fn decode(text: &str) -> Result<String, UrlError> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| UrlError::Syntax)
}

/// The key=value form: read here with libpq's quoting, the TLS parameters taken out, the
/// rest handed to tokio-postgres quoted anew.
fn parse_pairs(
    text: &str,
    tls: &mut Tls,
    params: &mut Vec<(&'static str, String)>,
) -> Result<tokio_postgres::Config, UrlError> {
    let mut kept = Vec::new();
    for (key, value) in pairs(text).ok_or(UrlError::Syntax)? {
        if !tls.take(&key, &value)? {
            kept.push((known(&key)?, value));
        }
    }
    let quoted = |(key, value): &(&str, String)| {
        format!(
            "{key}='{}'",
            value.replace('\\', "\\\\").replace('\'', "\\'")
        )
    };
    let text: Vec<String> = kept.iter().map(quoted).collect();
    let connection = text.join(" ").parse().map_err(|_| {
        kept.iter()
            .find(|pair| quoted(pair).parse::<tokio_postgres::Config>().is_err())
            .map_or(UrlError::Syntax, |(key, _)| UrlError::Value(key))
    })?;
    params.extend(kept);
    Ok(connection)
}

/// `key = value` pairs separated by whitespace; a value is quoted with `'` or runs to the
/// next whitespace, and `\` escapes the character after it (libpq's rules).
fn pairs(text: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            return chars.peek().is_none().then_some(out);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        chars.next_if_eq(&'=')?;
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\'' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next()?);
                } else {
                    value.push(c);
                }
            }
            if value.is_empty() {
                return None;
            }
        }
        out.push((key, value));
    }
}

/// `store.schema`: an identifier PostgreSQL takes unquoted, so the name written is the
/// name in the database, and not one of PostgreSQL's own (`pg_...`).
pub(super) fn check_schema(name: &str) -> Result<(), &'static str> {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    if !first_ok
        || name.len() > 63
        || !bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(
            "must be 1 to 63 lowercase letters, digits or `_`, starting with a letter or `_`",
        );
    }
    if name.starts_with("pg_") {
        return Err("names starting with `pg_` are PostgreSQL's own");
    }
    Ok(())
}

/// `store.url` as `check-config` shows it: rebuilt from what was read, so nothing of it
/// that could be a password is ever shown (`:***@`, whichever way it was given); the
/// parameters only with `params`, else `?<redacted>`. A URL that does not read is hidden
/// whole.
pub(super) fn shown(url: &str, params: bool) -> String {
    let Ok(parsed) = parse(url) else {
        return REDACTED.to_owned();
    };
    let c = &parsed.connection;
    let mut out = String::from("postgres://");
    if let Some(user) = c.get_user() {
        out.push_str(&encode(user));
        if c.get_password().is_some() {
            out.push(':');
            out.push_str(super::error::URL_PASSWORD);
        }
        out.push('@');
    }
    let pg = PostgresConfig {
        connection: c.clone(),
        ssl_mode: parsed.ssl_mode,
        root_cert: parsed.root_cert.clone(),
        schema: String::new(),
        pool_size: 1,
    };
    if !c.get_hosts().is_empty() {
        out.push_str(&pg.hosts());
    }
    if let Some(db) = c.get_dbname() {
        out.push('/');
        out.push_str(&encode(db));
    }
    if !params {
        out.push('?');
        out.push_str(REDACTED);
        return out;
    }
    out.push_str("?sslmode=");
    out.push_str(parsed.ssl_mode.as_str());
    if let Some(root) = &parsed.root_cert {
        out.push_str("&sslrootcert=");
        out.push_str(&encode(&root.to_string_lossy()));
    }
    for (key, value) in &parsed.params {
        out.push('&');
        out.push_str(key);
        out.push('=');
        out.push_str(&encode(value));
    }
    out
}

fn encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(url: &str) -> UrlError {
        match parse(url) {
            Ok(_) => panic!("accepted: {url}"),
            Err(e) => e,
        }
    }

    #[test]
    fn every_libpq_sslmode_is_read_in_both_forms_and_prefer_is_the_default() {
        for mode in SslMode::ALL {
            let name = mode.as_str();
            for url in [
                format!("postgres://router@db/vyora?sslmode={name}"),
                format!("host=db user=router sslmode={name}"),
            ] {
                assert_eq!(parse(&url).expect(&url).ssl_mode, mode, "{url}");
            }
        }
        let plain = parse("postgres://router@db/vyora").expect("valid");
        assert_eq!(plain.ssl_mode, SslMode::Prefer);
        assert_eq!(
            plain.connection.get_ssl_mode(),
            tokio_postgres::config::SslMode::Prefer
        );
        let full = parse("postgres://router@db/vyora?sslmode=verify-full").expect("valid");
        assert_eq!(
            full.connection.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require,
            "the verifying modes encrypt or fail"
        );
    }

    #[test]
    fn sslrootcert_is_taken_out_and_the_rest_is_read_as_written() {
        let url = "postgres://router:pa%40ss@db:6432/vyora?sslrootcert=%2Fetc%2Fca.pem&application_name=r&sslmode=verify-ca&connect_timeout=3";
        let p = parse(url).expect("valid");
        assert_eq!(p.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(p.ssl_mode, SslMode::VerifyCa);
        assert_eq!(p.connection.get_password(), Some(&b"pa@ss"[..]));
        assert_eq!(p.connection.get_ports(), [6432]);
        assert_eq!(p.connection.get_application_name(), Some("r"));
        assert_eq!(
            p.connection.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(3))
        );

        let p = parse(
            "host=db port=6432 user=router password='it\\'s q' dbname=vyora sslrootcert='/etc/my ca.pem' sslmode=verify-full",
        )
        .expect("valid");
        assert_eq!(p.connection.get_password(), Some(&b"it's q"[..]));
        assert_eq!(p.root_cert, Some(PathBuf::from("/etc/my ca.pem")));
        assert_eq!(p.connection.get_dbname(), Some("vyora"));
        assert_eq!(
            parse("host=db sslrootcert=system")
                .expect("valid")
                .root_cert,
            None
        );
    }

    #[test]
    fn no_refusal_quotes_any_part_of_the_url() {
        let cases = [
            (
                "postgres://u@db/v?password=hunter2&sslmode=bogus",
                UrlError::SslMode,
            ),
            ("host=x password=hunter2 sslmode=bogus", UrlError::SslMode),
            ("host=x password='hunter2", UrlError::Syntax),
            ("host=x password hunter2", UrlError::Syntax),
            ("host=x password=", UrlError::Syntax),
            ("host=x hunter2=1", UrlError::Unknown),
            ("postgres://db/v?password=hunt&er2", UrlError::Syntax),
            ("postgres://db/v?password=a&hunter2=b", UrlError::Unknown),
            ("postgres://u:hunter2@db:port/v", UrlError::Address),
            ("postgres://u:hunter2@db/v?port=x", UrlError::Value("port")),
            ("host=db password=hunter2 port=x", UrlError::Value("port")),
            ("mysql://u:hunter2@db/v", UrlError::Form),
        ];
        for (url, expected) in cases {
            let e = refused(url);
            assert_eq!(e, expected, "{url}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn the_shown_url_never_holds_a_password() {
        for url in [
            "postgres://router:hunter2@db:5432/vyora?sslmode=verify-full",
            "postgres://router@db/vyora?password=hunter2&sslmode=verify-full",
            "host=db user=router password=hunter2 dbname=vyora sslmode=verify-full",
            "postgres://router:hunter2@db1,db2/vyora?sslmode=verify-full",
        ] {
            let with = shown(url, true);
            assert!(!with.contains("hunter2"), "{with}");
            assert!(with.contains("sslmode=verify-full"), "{with}");
            assert!(with.contains("router") && with.contains("db"), "{with}");
            assert!(with.contains(":***@"), "a password is set: {with}");
            let without = shown(url, false);
            assert!(!without.contains("hunter2"), "{without}");
            assert!(without.ends_with("?<redacted>"), "{without}");
        }
        assert_eq!(
            shown("host=x password=hunter2 sslmode=bogus", true),
            REDACTED
        );
    }

    #[test]
    fn a_schema_must_be_a_plain_lowercase_identifier() {
        for ok in ["vyora_router", "_r", "router2", "public"] {
            assert_eq!(check_schema(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "Router",
            "2r",
            "a-b",
            "a b",
            "x\"; DROP TABLE events; --",
            "pg_catalog",
            &"a".repeat(64),
        ] {
            assert!(check_schema(bad).is_err(), "{bad}");
        }
    }
}
