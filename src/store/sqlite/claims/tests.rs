//! The claims' cursor rules, on their own: what is settled, held, written, released.

use std::time::Duration;

use super::*;

fn found<'a>(
    fresh: &'a [(i64, Option<String>)],
    retries: &'a [(i64, Option<String>)],
    held: Vec<HeldBack>,
    examined_to: Option<i64>,
) -> Claimed<'a> {
    Claimed {
        fresh,
        retries,
        held,
        examined_to,
    }
}

/// Claims starting at cursor `position`, with `ids` claimed and the log examined to
/// `examined_to`.
fn claimed(position: i64, ids: &[i64], examined_to: i64) -> Claims {
    let mut claims = Claims::default();
    claims.set_position(position);
    let fresh: Vec<_> = ids.iter().map(|id| (*id, None)).collect();
    let out = claims.record("a", found(&fresh, &[], Vec::new(), Some(examined_to)));
    assert!(out.is_empty(), "nothing to write: {out:?}");
    claims
}

fn first(row: i64) -> DeliveryId {
    Claims::id(row, false)
}

#[test]
fn the_cursor_passes_only_what_is_settled_in_order() {
    let mut claims = claimed(0, &[1, 2, 3], 3);
    let out = claims.settle("a", &[Settlement::Delivered { id: first(2) }]);
    assert!(out.cursor.is_none(), "1 is still in hand");
    let out = claims.settle("a", &[Settlement::Delivered { id: first(1) }]);
    assert_eq!(out.cursor, Some(2));
    claims.writing(&out).committed();
    let snapshot = claims.snapshot().expect("not paused");
    assert_eq!(snapshot.position, Some(2));
    assert!(snapshot.skip.contains(&3) && !snapshot.skip.contains(&2));
    let retry = Settlement::Retry {
        id: first(3),
        at: SystemTime::now(),
        error: "down".into(),
    };
    let out = claims.settle("a", std::slice::from_ref(&retry));
    assert!(matches!(
        out.changes[..],
        [Change::Failed {
            event_id: 3,
            first: true,
            dead: false,
            ..
        }]
    ));
    assert_eq!(out.cursor, Some(3), "its retry row is in the same write");
    // The write failed: 3 is handed out again, and the cursor stays before it.
    drop(claims.writing(&out));
    let snapshot = claims.snapshot().expect("not paused");
    assert!(!snapshot.skip.contains(&3));
    assert_eq!(snapshot.position, Some(2));
    assert!(
        claims
            .record("a", found(&[], &[], Vec::new(), None))
            .is_empty()
    );
    // Written this time: the cursor is past it.
    let out = claims.record("a", found(&[(3, None)], &[], Vec::new(), Some(3)));
    assert!(out.is_empty());
    let out = claims.settle("a", &[retry]);
    claims.writing(&out).committed();
    assert_eq!(claims.snapshot().expect("not paused").position, Some(3));
}

#[test]
fn a_released_or_postponed_event_keeps_the_cursor_before_it_and_a_postponement_pauses() {
    let mut claims = claimed(10, &[11, 12], 12);
    claims.release(&[first(11)]);
    let out = claims.settle("a", &[Settlement::Delivered { id: first(12) }]);
    assert!(out.cursor.is_none(), "11 was handed back, not settled");
    let out = claims.record("a", found(&[(11, None)], &[], Vec::new(), Some(12)));
    assert!(out.is_empty());
    let out = claims.settle(
        "a",
        &[Settlement::Postpone {
            id: first(11),
            at: SystemTime::now() + Duration::from_secs(60),
            error: "broker down".into(),
        }],
    );
    assert!(out.is_empty(), "{out:?}");
    assert!(claims.snapshot().is_none(), "paused");
    assert!(claims.paused_until().is_some());
}

#[test]
fn a_held_back_event_gets_a_waiting_row_that_the_cursor_passes_in_the_same_write() {
    let mut claims = Claims::default();
    claims.set_position(0);
    let call = || Some("call-1".to_owned());
    let held = |id, behind| HeldBack {
        id,
        call_id: "call-1".to_owned(),
        behind,
    };
    let fresh = [(1, call()), (3, None)];
    let out = claims.record("a", found(&fresh, &[], vec![held(2, 1)], Some(3)));
    assert!(
        matches!(
            out.changes[..],
            [Change::Held {
                event_id: 2,
                waits: true,
                ..
            }]
        ),
        "1 is in hand: {:?}",
        out.changes
    );
    assert!(out.cursor.is_none(), "1 is in hand");
    claims.writing(&out).committed();
    let out = claims.settle(
        "a",
        &[
            Settlement::Delivered { id: first(1) },
            Settlement::Delivered { id: first(3) },
        ],
    );
    assert!(matches!(out.changes[..], [Change::Release { .. }]));
    assert_eq!(out.cursor, Some(3), "past 1, 2 and 3");
    claims.writing(&out).committed();
    // A held event whose earlier one has ended does not wait for it.
    let out = claims.record("a", found(&[], &[], vec![held(4, 1)], Some(4)));
    assert!(matches!(
        out.changes[..],
        [Change::Held { waits: false, .. }]
    ));
    // Unwritten, it is handed out again: the cursor stays before it.
    drop(claims.writing(&out));
    assert!(!claims.snapshot().expect("not paused").skip.contains(&4));
}

#[test]
fn an_event_that_ends_its_call_releases_the_calls_next_waiting_row() {
    let mut claims = Claims::default();
    claims.set_position(0);
    let call = Some("call-1".to_owned());
    let out = claims.record(
        "a",
        found(&[(1, call.clone())], &[(5, call)], Vec::new(), Some(1)),
    );
    assert!(out.is_empty());
    let out = claims.settle(
        "a",
        &[
            Settlement::Delivered { id: first(1) },
            Settlement::Dead {
                id: Claims::id(5, true),
                error: "gone".into(),
            },
        ],
    );
    let released = out
        .changes
        .iter()
        .filter(|c| matches!(c, Change::Release { call_id } if call_id == "call-1"))
        .count();
    assert_eq!(released, 2, "{:?}", out.changes);
    assert!(
        matches!(
            out.changes[..],
            [
                Change::Release { .. },
                Change::Failed {
                    event_id: 5,
                    first: false,
                    dead: true,
                    ..
                },
                Change::Release { .. }
            ]
        ),
        "{:?}",
        out.changes
    );
}

#[test]
fn a_failed_first_attempt_leaves_its_call_to_its_retry_row() {
    let mut claims = Claims::default();
    claims.set_position(0);
    let call = Some("call-1".to_owned());
    let out = claims.record("a", found(&[(1, call)], &[], Vec::new(), Some(1)));
    assert!(out.is_empty());
    let in_hand = |claims: &mut Claims| claims.snapshot().expect("not paused").calls_in_hand;
    assert!(in_hand(&mut claims).contains_key("call-1"));
    let out = claims.settle(
        "a",
        &[Settlement::Retry {
            id: first(1),
            at: SystemTime::now(),
            error: "500".into(),
        }],
    );
    claims.writing(&out).committed();
    assert!(in_hand(&mut claims).is_empty(), "the row holds it back now");
}
