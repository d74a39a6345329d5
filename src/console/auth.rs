//! Who may use the console: the `admin.token` (a login cookie derived from it, or
//! `Authorization: Bearer`), the CSRF token every change carries, and the Origin check.
//!
//! Nothing is stored per session: a session is a random nonce with its issue time, signed
//! with the token, and its CSRF token is the token's MAC of that nonce. Changing the token
//! ends every session. Without a token (a console on loopback only) a key drawn at start
//! signs the CSRF tokens, and requests must name a loopback host, so that a web page
//! whose name was pointed at 127.0.0.1 (DNS rebinding) cannot use the console.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use hyper::HeaderMap;
use hyper::header::{AUTHORIZATION, COOKIE, HOST, ORIGIN};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::AdminToken;

/// The login cookie's name.
pub(super) const COOKIE_NAME: &str = "vyora_console";
/// How long a login lasts.
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);

/// Why a request may not go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum Denied {
    #[error("log in first")]
    NoCredentials,
    #[error("the token or the login is not valid")]
    Wrong,
    #[error("the request names a host other than loopback, and admin.token is not set")]
    ForeignHost,
    #[error("the request comes from another origin")]
    ForeignOrigin,
    #[error("the form's CSRF token is missing or wrong")]
    Csrf,
    /// Too many wrong tokens lately: no token is checked for this many seconds.
    #[error("too many wrong tokens: try again in {0} s")]
    Throttled(u64),
}

/// What an allowed request may do: the CSRF token its forms carry.
#[derive(Debug, Clone)]
pub(super) struct Session {
    pub(super) csrf: String,
}

/// Wrong tokens (logins, bearer tokens, forged cookies) taken in any minute, from every
/// client together; past that no token is checked until the oldest is a minute old. A
/// token of at least 16 characters cannot be guessed at this pace. Logged-in sessions
/// go on meanwhile: only new credentials wait.
const WRONG_PER_MINUTE: usize = 10;
const WINDOW: Duration = Duration::from_secs(60);

/// The keys of the console's access checks.
pub(super) struct Auth {
    token: Option<AdminToken>,
    /// Signs sessions and CSRF tokens: the token's bytes, or drawn at start without one.
    key: Vec<u8>,
    /// When the latest wrong tokens came, at most [`WRONG_PER_MINUTE`].
    wrong: Mutex<VecDeque<Instant>>,
}

/// The system's random source failed; without it no CSRF token can be unguessable.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw random bytes for the console's keys: {0}")]
pub struct NoRandom(getrandom::Error);

impl Auth {
    pub(super) fn new(token: Option<AdminToken>) -> Result<Auth, NoRandom> {
        let key = match &token {
            Some(t) => t.key().to_vec(),
            None => random_bytes::<32>()?.to_vec(),
        };
        Ok(Auth {
            token,
            key,
            wrong: Mutex::new(VecDeque::with_capacity(WRONG_PER_MINUTE)),
        })
    }

    /// Refused while [`WRONG_PER_MINUTE`] wrong tokens came in the last minute.
    fn check_pace(&self) -> Result<(), Denied> {
        let mut wrong = self.wrong.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        while wrong
            .front()
            .is_some_and(|at| now.duration_since(*at) >= WINDOW)
        {
            wrong.pop_front();
        }
        match wrong.front() {
            Some(oldest) if wrong.len() >= WRONG_PER_MINUTE => {
                let left = WINDOW.saturating_sub(now.duration_since(*oldest));
                Err(Denied::Throttled(left.as_secs() + 1))
            }
            _ => Ok(()),
        }
    }

    /// Counts a wrong token, and says it was wrong.
    fn wrong(&self) -> Denied {
        let mut wrong = self.wrong.lock().unwrap_or_else(PoisonError::into_inner);
        if wrong.len() >= WRONG_PER_MINUTE {
            wrong.pop_front();
        }
        wrong.push_back(Instant::now());
        Denied::Wrong
    }

    /// Whether a token is configured (a login page, and a way to log out).
    pub(super) fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// The session of a request, from its cookie or bearer token; any request without a
    /// token configured.
    pub(super) fn session(&self, headers: &HeaderMap) -> Result<Session, Denied> {
        let Some(token) = &self.token else {
            if !loopback_host(headers) {
                return Err(Denied::ForeignHost);
            }
            return Ok(self.session_of("open"));
        };
        if let Some(value) = headers.get(AUTHORIZATION) {
            self.check_pace()?;
            let offered = value
                .as_bytes()
                .strip_prefix(b"Bearer ")
                .ok_or(Denied::Wrong)?;
            return if token.matches(offered) {
                Ok(self.session_of("bearer"))
            } else {
                Err(self.wrong())
            };
        }
        let cookie = cookie(headers, COOKIE_NAME).ok_or(Denied::NoCredentials)?;
        let (nonce, mac) = cookie.split_once('.').ok_or(Denied::Wrong)?;
        let expected = hex::encode(self.mac("session", nonce));
        if !bool::from(expected.as_bytes().ct_eq(mac.as_bytes())) {
            // A forged cookie is a guess too; a session signed by the token is not.
            self.check_pace()?;
            return Err(self.wrong());
        }
        let issued = nonce
            .split_once('-')
            .and_then(|(secs, _)| secs.parse::<u64>().ok())
            .ok_or(Denied::Wrong)?;
        if unix_now().saturating_sub(issued) > SESSION_LIFETIME.as_secs() {
            return Err(Denied::NoCredentials);
        }
        Ok(self.session_of(nonce))
    }

    /// A login with `offered`: the cookie's value when it is the token.
    pub(super) fn login(&self, offered: &[u8]) -> Result<String, LoginError> {
        let token = self
            .token
            .as_ref()
            .ok_or(LoginError::Denied(Denied::Wrong))?;
        self.check_pace().map_err(LoginError::Denied)?;
        if !token.matches(offered) {
            return Err(LoginError::Denied(self.wrong()));
        }
        let nonce = format!(
            "{}-{}",
            unix_now(),
            hex::encode(random_bytes::<16>().map_err(LoginError::Random)?)
        );
        let mac = hex::encode(self.mac("session", &nonce));
        Ok(format!("{nonce}.{mac}"))
    }

    /// Checks a change's CSRF token against the session's.
    pub(super) fn check_csrf(
        &self,
        session: &Session,
        offered: Option<&str>,
    ) -> Result<(), Denied> {
        match offered {
            Some(o) if bool::from(o.as_bytes().ct_eq(session.csrf.as_bytes())) => Ok(()),
            _ => Err(Denied::Csrf),
        }
    }

    fn session_of(&self, nonce: &str) -> Session {
        Session {
            csrf: hex::encode(self.mac("csrf", nonce)),
        }
    }

    fn mac(&self, purpose: &str, nonce: &str) -> [u8; 32] {
        // HMAC takes keys of any length: this cannot fail.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
            return [0; 32];
        };
        mac.update(purpose.as_bytes());
        mac.update(b"\0");
        mac.update(nonce.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// Why a login did not give a session.
#[derive(Debug, thiserror::Error)]
pub(super) enum LoginError {
    #[error("{0}")]
    Denied(Denied),
    #[error(transparent)]
    Random(NoRandom),
}

/// A change must come from a page of this console: its Origin must name the host it
/// was sent to. Clients that send a bearer token (not a browser's ambient credential)
/// may leave Origin out.
pub(super) fn check_origin(headers: &HeaderMap) -> Result<(), Denied> {
    let host = headers.get(HOST).and_then(|h| h.to_str().ok());
    match headers.get(ORIGIN).map(|o| o.to_str()) {
        None if headers.contains_key(AUTHORIZATION) => Ok(()),
        Some(Ok(origin)) => {
            let named = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            match (named, host) {
                (Some(n), Some(h)) if n.eq_ignore_ascii_case(h) => Ok(()),
                _ => Err(Denied::ForeignOrigin),
            }
        }
        _ => Err(Denied::ForeignOrigin),
    }
}

/// Whether the Host header names this machine's loopback (or is absent: HTTP/1.0).
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(HOST).and_then(|h| h.to_str().ok()) else {
        return !headers.contains_key(HOST);
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The value of cookie `name`, if the request has it.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn random_bytes<const N: usize>() -> Result<[u8; N], NoRandom> {
    let mut bytes = [0; N];
    getrandom::fill(&mut bytes).map_err(NoRandom)?;
    Ok(bytes)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn token() -> AdminToken {
        crate::config::AdminToken::for_tests("0123456789abcdef")
    }

    fn headers(pairs: &[(hyper::header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_login_cookie_gives_a_session_and_a_forged_one_does_not() {
        let auth = Auth::new(Some(token())).unwrap();
        assert!(auth.login(b"wrong-token-value").is_err());
        let cookie = auth.login(b"0123456789abcdef").unwrap();
        let h = headers(&[(COOKIE, &format!("a=b; {COOKIE_NAME}={cookie}"))]);
        let session = auth.session(&h).unwrap();
        assert!(auth.check_csrf(&session, Some(&session.csrf)).is_ok());
        assert_eq!(auth.check_csrf(&session, None), Err(Denied::Csrf));
        let forged = format!("{}x", cookie);
        let h = headers(&[(COOKIE, &format!("{COOKIE_NAME}={forged}"))]);
        assert_eq!(auth.session(&h).unwrap_err(), Denied::Wrong);
        assert_eq!(
            auth.session(&HeaderMap::new()).unwrap_err(),
            Denied::NoCredentials
        );
    }

    #[test]
    fn a_bearer_token_gives_a_session() {
        let auth = Auth::new(Some(token())).unwrap();
        let h = headers(&[(AUTHORIZATION, "Bearer 0123456789abcdef")]);
        assert!(auth.session(&h).is_ok());
        let h = headers(&[(AUTHORIZATION, "Bearer 0123456789abcdeX")]);
        assert_eq!(auth.session(&h).unwrap_err(), Denied::Wrong);
    }

    #[test]
    fn without_a_token_only_loopback_hosts_are_served() {
        let auth = Auth::new(None).unwrap();
        for host in ["127.0.0.1:9464", "localhost:9464", "[::1]:9464"] {
            assert!(auth.session(&headers(&[(HOST, host)])).is_ok(), "{host}");
        }
        let h = headers(&[(HOST, "rebound.example:9464")]);
        assert_eq!(auth.session(&h).unwrap_err(), Denied::ForeignHost);
    }

    #[test]
    fn a_change_must_come_from_the_same_origin() {
        let same = headers(&[(HOST, "127.0.0.1:9464"), (ORIGIN, "http://127.0.0.1:9464")]);
        assert!(check_origin(&same).is_ok());
        let foreign = headers(&[(HOST, "127.0.0.1:9464"), (ORIGIN, "http://evil.example")]);
        assert_eq!(check_origin(&foreign), Err(Denied::ForeignOrigin));
        let null = headers(&[(HOST, "127.0.0.1:9464"), (ORIGIN, "null")]);
        assert_eq!(check_origin(&null), Err(Denied::ForeignOrigin));
        let missing = headers(&[(HOST, "127.0.0.1:9464")]);
        assert_eq!(check_origin(&missing), Err(Denied::ForeignOrigin));
    }
}
