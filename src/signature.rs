//! Webhook signatures: HMAC-SHA256 over the raw request body, the scheme Vyora signs with.
//!
//! Pure and synchronous: raw bytes in, a typed reason out. Nothing here parses the body,
//! so a forged request is turned away before any of its content is looked at.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// What precedes the hex digest in `X-Vyora-Signature`.
pub const PREFIX: &str = "sha256=";
const MAC_LEN: usize = 32;

/// A shared secret. Its `Debug` output never shows the key, so it can sit in any struct
/// that gets logged.
#[derive(Clone)]
pub struct Secret {
    /// Keyed once here; cloning the keyed state is cheaper than re-deriving the HMAC pads
    /// for every request.
    mac: HmacSha256,
}

/// The secret was empty; an empty HMAC key would let anyone who guesses it forge events.
#[derive(Debug, thiserror::Error)]
#[error("a secret must not be empty")]
pub struct EmptySecret;

impl Secret {
    pub fn new(key: &[u8]) -> Result<Self, EmptySecret> {
        if key.is_empty() {
            return Err(EmptySecret);
        }
        // HMAC takes keys of any length, so this cannot fail once the key is non-empty.
        HmacSha256::new_from_slice(key)
            .map(|mac| Secret { mac })
            .map_err(|_| EmptySecret)
    }

    fn digest(&self, body: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = self.mac.clone();
        mac.update(body);
        mac.finalize().into_bytes().into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Why a signature was refused. Deliberately coarse towards the client (every variant
/// answers the same 401), detailed for our own logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the X-Vyora-Signature header is missing")]
    Missing,
    #[error("more than one X-Vyora-Signature header was sent")]
    Repeated,
    #[error("the signature does not start with `sha256=`")]
    BadPrefix,
    #[error("the signature is not 64 hexadecimal digits")]
    Malformed,
    #[error("the signature does not match the body for any configured secret")]
    Mismatch,
}

/// `sha256=<lower-case hex HMAC-SHA256(secret, body)>`, exactly as Vyora sends it.
pub fn sign(secret: &Secret, body: &[u8]) -> String {
    format!("{PREFIX}{}", hex::encode(secret.digest(body)))
}

/// The MAC a request claims, decoded from its header: a request that does not even
/// claim one in the right form is refused before its body is read.
#[derive(Clone, Copy)]
pub struct Claimed([u8; MAC_LEN]);

/// Decodes a header value into the 32 MAC bytes it claims. Upper-case hex is accepted:
/// it is the same MAC.
pub fn parse(header: Option<&[u8]>) -> Result<Claimed, SignatureError> {
    let digits = header
        .ok_or(SignatureError::Missing)?
        .strip_prefix(PREFIX.as_bytes())
        .ok_or(SignatureError::BadPrefix)?;
    let mut claimed = [0u8; MAC_LEN];
    hex::decode_to_slice(digits, &mut claimed).map_err(|_| SignatureError::Malformed)?;
    Ok(Claimed(claimed))
}

/// Checks `header` against every secret and returns the index of the one that verified
/// (rotation: an operator watches which index still gets used before removing an old one).
///
/// The comparison is constant-time over the decoded bytes, and every secret is tried even
/// after a match, so timing reveals neither how much of a guess was right nor which
/// secret matched.
pub fn verify(
    secrets: &[Secret],
    header: Option<&[u8]>,
    body: &[u8],
) -> Result<usize, SignatureError> {
    verify_claimed(secrets, &parse(header)?, body)
}

/// [`verify`] for a header already [`parse`]d.
pub fn verify_claimed(
    secrets: &[Secret],
    claimed: &Claimed,
    body: &[u8],
) -> Result<usize, SignatureError> {
    let mut matched = None;
    for (index, secret) in secrets.iter().enumerate() {
        if bool::from(secret.digest(body).ct_eq(&claimed.0)) && matched.is_none() {
            matched = Some(index);
        }
    }
    matched.ok_or(SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(key: &str) -> Secret {
        Secret::new(key.as_bytes()).expect("test secrets are not empty")
    }

    #[test]
    fn github_published_vector_is_reproduced() {
        // The same scheme as GitHub's X-Hub-Signature-256; their documented example.
        let s = secret("It's a Secret to Everybody");
        assert_eq!(
            sign(&s, b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[test]
    fn a_signed_body_verifies() {
        let s = secret("whsec_test");
        let body = br#"{"event":"call_completed","call_id":"abc"}"#;
        let header = sign(&s, body);
        assert_eq!(verify(&[s], Some(header.as_bytes()), body), Ok(0));
    }

    #[test]
    fn upper_case_hex_of_the_right_mac_is_accepted() {
        let s = secret("whsec_test");
        let header = sign(&s, b"body");
        let upper = format!("{PREFIX}{}", header[PREFIX.len()..].to_uppercase());
        assert_eq!(verify(&[s], Some(upper.as_bytes()), b"body"), Ok(0));
    }

    #[test]
    fn every_malformed_or_wrong_signature_is_refused() {
        let s = secret("whsec_test");
        let body = b"{\"event\":\"call_started\"}";
        let good = sign(&s, body);
        let hexpart = &good[PREFIX.len()..];
        let cases: Vec<(Option<String>, SignatureError)> = vec![
            (None, SignatureError::Missing),
            (Some(String::new()), SignatureError::BadPrefix),
            (Some("sha256=".into()), SignatureError::Malformed),
            (
                Some(good[..good.len() - 1].into()),
                SignatureError::Malformed,
            ),
            (
                Some(good[..good.len() - 2].into()),
                SignatureError::Malformed,
            ),
            (Some(format!("{good}0")), SignatureError::Malformed),
            (Some(format!("{good}00")), SignatureError::Malformed),
            (Some(format!("{good} ")), SignatureError::Malformed),
            (
                Some(format!("sha256={}zz", &hexpart[..62])),
                SignatureError::Malformed,
            ),
            (Some(format!("sha1={hexpart}")), SignatureError::BadPrefix),
            (Some(format!("SHA256={hexpart}")), SignatureError::BadPrefix),
            (Some(format!(" {good}")), SignatureError::BadPrefix),
            (Some(hexpart.into()), SignatureError::BadPrefix),
            (Some(sign(&s, b"other bytes")), SignatureError::Mismatch),
            (
                Some(sign(&secret("another secret"), body)),
                SignatureError::Mismatch,
            ),
        ];
        for (header, expected) in cases {
            let got = verify(
                std::slice::from_ref(&s),
                header.as_deref().map(str::as_bytes),
                body,
            );
            assert_eq!(got, Err(expected), "header {header:?}");
        }
    }

    #[test]
    fn a_change_to_any_byte_of_the_body_is_refused() {
        let s = secret("whsec_test");
        let body = b"{\"event\":\"call_completed\",\"call_id\":\"x\"}".to_vec();
        let header = sign(&s, &body);
        for i in 0..body.len() {
            let mut tampered = body.clone();
            tampered[i] ^= 0x01;
            assert_eq!(
                verify(std::slice::from_ref(&s), Some(header.as_bytes()), &tampered),
                Err(SignatureError::Mismatch)
            );
        }
    }

    #[test]
    fn during_rotation_the_old_and_the_new_secret_both_verify() {
        let old = secret("old");
        let new = secret("new");
        let secrets = [new.clone(), old.clone()];
        let body = b"{}";
        assert_eq!(
            verify(&secrets, Some(sign(&new, body).as_bytes()), body),
            Ok(0)
        );
        assert_eq!(
            verify(&secrets, Some(sign(&old, body).as_bytes()), body),
            Ok(1)
        );
    }

    #[test]
    fn an_empty_secret_is_refused() {
        assert!(Secret::new(b"").is_err());
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let s = secret("super-secret-value");
        assert!(!format!("{s:?}").contains("super-secret-value"));
    }
}
