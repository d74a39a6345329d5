//! Properties: the signature scheme over arbitrary bytes, and deduplication against a
//! plain in-memory model across random deliveries, duplicates and restarts.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use vyora_router::config::{StoreConfig, Synchronous};
use vyora_router::event::Event;
use vyora_router::signature::{PREFIX, Secret, SignatureError, sign, verify};
use vyora_router::store::{Ingested, Store, StoreOptions};

fn secret(key: &[u8]) -> Secret {
    Secret::new(key).expect("non-empty")
}

proptest! {
    #[test]
    fn a_signature_of_the_bytes_always_verifies(key in prop::collection::vec(any::<u8>(), 1..64), body in prop::collection::vec(any::<u8>(), 0..2048)) {
        let s = secret(&key);
        let header = sign(&s, &body);
        prop_assert_eq!(verify(&[s], Some(header.as_bytes()), &body), Ok(0));
    }

    #[test]
    fn any_change_to_the_body_fails(body in prop::collection::vec(any::<u8>(), 1..512), at in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let s = secret(b"k");
        let header = sign(&s, &body);
        let mut changed = body.clone();
        let i = at.index(changed.len());
        changed[i] ^= flip;
        prop_assert_eq!(verify(&[s], Some(header.as_bytes()), &changed), Err(SignatureError::Mismatch));
    }

    #[test]
    fn a_truncated_or_extended_body_fails(body in prop::collection::vec(any::<u8>(), 1..512), extra in prop::collection::vec(any::<u8>(), 1..16), cut in any::<prop::sample::Index>()) {
        let s = secret(b"k");
        let header = sign(&s, &body);
        let shorter = &body[..cut.index(body.len())];
        prop_assert!(verify(std::slice::from_ref(&s), Some(header.as_bytes()), shorter).is_err());
        let mut longer = body.clone();
        longer.extend_from_slice(&extra);
        prop_assert!(verify(&[s], Some(header.as_bytes()), &longer).is_err());
    }

    #[test]
    fn any_change_to_the_signature_fails(body in prop::collection::vec(any::<u8>(), 0..256), at in any::<prop::sample::Index>(), with in any::<u8>(), cut in any::<prop::sample::Index>(), extra in "[0-9a-f]{1,4}") {
        let s = secret(b"k");
        let header = sign(&s, &body).into_bytes();
        let mut changed = header.clone();
        let i = at.index(changed.len());
        prop_assume!(!changed[i].eq_ignore_ascii_case(&with));
        changed[i] = with;
        prop_assert!(verify(std::slice::from_ref(&s), Some(&changed), &body).is_err());
        let truncated = &header[..cut.index(header.len())];
        prop_assert!(verify(std::slice::from_ref(&s), Some(truncated), &body).is_err());
        let mut extended = header.clone();
        extended.extend_from_slice(extra.as_bytes());
        prop_assert!(verify(std::slice::from_ref(&s), Some(&extended), &body).is_err());
        let other_prefix = [b"sha1=".as_slice(), &header[PREFIX.len()..]].concat();
        prop_assert!(verify(&[s], Some(&other_prefix), &body).is_err());
    }
}

/// One step of the dedup model.
#[derive(Debug, Clone)]
enum Step {
    /// Deliver event `event` of call `call`, possibly several copies at once.
    Deliver { call: u8, event: u8, copies: u8 },
    /// Close the store and open it again.
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0u8..6, 0u8..3, 1u8..4).prop_map(|(call, event, copies)| Step::Deliver { call, event, copies }),
        1 => Just(Step::Restart),
    ]
}

const EVENTS: [&str; 3] = ["call_started", "call_completed", "all_processing_completed"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn deduplication_matches_a_set_across_duplicates_and_restarts(steps in prop::collection::vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = StoreConfig {
            synchronous: Synchronous::Normal,
            ..StoreConfig::sqlite(dir.path().join("router.db"))
        };
        let mut model: HashSet<String> = HashSet::new();
        let mut store = Some(rt.block_on(Store::open(&config, StoreOptions::default())).expect("store"));
        for step in steps {
            match step {
                Step::Restart => {
                    if let Some(s) = store.take() {
                        rt.block_on(s.close());
                    }
                    store = Some(rt.block_on(Store::open(&config, StoreOptions::default())).expect("store"));
                }
                Step::Deliver { call, event, copies } => {
                    let Some(s) = store.as_ref() else { continue };
                    let name = EVENTS[usize::from(event)];
                    let body = format!(r#"{{"event":"{name}","call_id":"c{call}"}}"#);
                    let results = rt.block_on(async {
                        let tasks: Vec<_> = (0..copies)
                            .map(|_| {
                                let s = s.clone();
                                let body = body.clone();
                                tokio::spawn(async move {
                                    let e = Event::from_webhook(None, Bytes::from(body)).expect("event");
                                    s.ingest(e, vec![Arc::from("sink")]).await.expect("ingest")
                                })
                            })
                            .collect();
                        let mut out = Vec::new();
                        for t in tasks {
                            out.push(t.await.expect("task"));
                        }
                        out
                    });
                    let fresh = results.iter().filter(|r| **r != Ingested::Duplicate).count();
                    let key = format!("c{call}:{name}");
                    let expected = usize::from(model.insert(key));
                    prop_assert_eq!(fresh, expected, "exactly one copy is new, and only the first time");
                }
            }
        }
        if let Some(s) = store.take() {
            rt.block_on(s.close());
        }
        let db = rusqlite::Connection::open(dir.path().join("router.db")).expect("db");
        let events: i64 = db.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0)).expect("count");
        let outbox: i64 = db.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0)).expect("count");
        prop_assert_eq!(events as usize, model.len());
        prop_assert_eq!(outbox as usize, model.len(), "one delivery per stored event");
    }
}
