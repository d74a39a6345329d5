//! The signature header parser and verifier: arbitrary headers and bodies never panic,
//! and only the exact MAC verifies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vyora_router::signature::{Secret, sign, verify};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len().saturating_sub(1));
    let (header, body) = data.get(1..).unwrap_or_default().split_at(split.min(data.len().saturating_sub(1)));
    let Ok(secret) = Secret::new(b"fuzz-secret") else { return };
    let secrets = [secret.clone(), Secret::new(b"second").expect("non-empty")];
    let verified = verify(&secrets, Some(header), body);
    let genuine = sign(&secret, body);
    if verified == Ok(0) {
        assert!(header.eq_ignore_ascii_case(genuine.as_bytes()), "a forged header verified");
    }
    assert_eq!(verify(&secrets, Some(genuine.as_bytes()), body), Ok(0));
});
