//! `admin.console` and `admin.token`: whether the operator console is served, and the
//! token it asks for, required whenever the admin listener is reachable from elsewhere.

use std::fmt;
use std::net::SocketAddr;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::{ConfigError, REDACTED};
use super::raw::RawAdmin;

/// The shortest `admin.token` accepted: guessing it must not be a matter of minutes.
pub const MIN_TOKEN_LEN: usize = 16;

/// `admin.token`: never shown, in logs, errors or `Debug`.
#[derive(Clone)]
pub struct AdminToken(String);

impl AdminToken {
    /// Whether `offered` is the token, in time that does not depend on where they differ
    /// (both are hashed first, so their lengths do not show either).
    pub fn matches(&self, offered: &[u8]) -> bool {
        let ours = Sha256::digest(self.0.as_bytes());
        let theirs = Sha256::digest(offered);
        ours.as_slice().ct_eq(theirs.as_slice()).into()
    }

    #[cfg(test)]
    pub(crate) fn for_tests(token: &str) -> AdminToken {
        AdminToken(token.to_owned())
    }

    /// The token's bytes, to key what is derived from it (sessions, CSRF tokens).
    pub fn key(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// `admin.console` and `admin.token`, checked against where the listener binds: a
/// console on any address but loopback without a token would hand replays to anyone who
/// reaches the port.
pub(super) fn console(
    a: &RawAdmin,
    listen: SocketAddr,
) -> Result<(bool, Option<AdminToken>), ConfigError> {
    let token = if a.token.is_empty() {
        None
    } else if a.token.chars().count() < MIN_TOKEN_LEN {
        return Err(ConfigError::invalid(
            "admin.token",
            REDACTED,
            format!("must be at least {MIN_TOKEN_LEN} characters long"),
        ));
    } else {
        Some(AdminToken(a.token.clone()))
    };
    if a.console && token.is_none() && !listen.ip().is_loopback() {
        return Err(ConfigError::invalid(
            "admin.token",
            "(not set)",
            format!(
                "is required when the console is served on {listen}, an address other than \
                 loopback: set admin.token (at least {MIN_TOKEN_LEN} characters, e.g. from \
                 VYORA_ROUTER_ADMIN__TOKEN), or admin.console = false"
            ),
        ));
    }
    Ok((a.console, token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(console: bool, token: &str) -> RawAdmin {
        RawAdmin {
            listen: String::new(),
            console,
            token: token.to_owned(),
        }
    }

    #[test]
    fn a_console_off_loopback_needs_a_token() {
        let any: SocketAddr = "0.0.0.0:9464".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:9464".parse().unwrap();
        let e = console(&raw(true, ""), any).unwrap_err();
        assert_eq!(e.key().as_deref(), Some("admin.token"));
        assert!(console(&raw(false, ""), any).is_ok());
        assert!(console(&raw(true, ""), local).is_ok());
        assert!(console(&raw(true, "0123456789abcdef"), any).is_ok());
    }

    #[test]
    fn a_short_token_is_refused_without_being_shown() {
        let local: SocketAddr = "127.0.0.1:9464".parse().unwrap();
        let e = console(&raw(true, "short-tok"), local).unwrap_err();
        assert!(!e.to_string().contains("short-tok"), "{e}");
    }

    #[test]
    fn the_token_matches_only_itself_and_never_shows() {
        let t = AdminToken("0123456789abcdef".into());
        assert!(t.matches(b"0123456789abcdef"));
        assert!(!t.matches(b"0123456789abcdeF"));
        assert!(!t.matches(b""));
        assert_eq!(format!("{t:?}"), REDACTED);
    }
}
