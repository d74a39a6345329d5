//! The event parser, on bodies that passed the signature: never panics, and what it
//! accepts has a valid name and a key derived from it.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use vyora_router::event::Event;

fuzz_target!(|data: &[u8]| {
    let (header, body) = match data.split_first() {
        Some((n, rest)) if usize::from(*n) <= rest.len() => rest.split_at(usize::from(*n)),
        _ => (&[][..], data),
    };
    let header = (!header.is_empty()).then_some(header);
    if let Ok(event) = Event::from_webhook(header, Bytes::copy_from_slice(body)) {
        assert!(!event.name.is_empty() && event.name.len() <= 64);
        assert!(event.dedup_key.ends_with(&event.name) || event.dedup_key.starts_with("sha256:"));
    }
});
