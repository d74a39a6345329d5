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

fn claimed(claims: &Claims, sink: &str, ids: &[i64], examined_to: i64) -> u32 {
    let fresh: Vec<_> = ids.iter().map(|id| (*id, None)).collect();
    let claim = found(&fresh, &[], Vec::new(), Some(examined_to));
    claims.record(sink, claim, &BTreeSet::new()).0
}

/// Writes `out` as the writer does: its rows and the cursors they allow, one commit.
fn write(claims: &Claims, out: &Outcome) -> Vec<(String, i64)> {
    let writing = claims.writing(out);
    let cursors = claims.cursors_with(out);
    writing.committed(&cursors);
    cursors
}

#[test]
fn the_cursor_passes_only_what_is_settled_in_order() {
    let claims = Claims::default();
    claims.set_position("a", 0);
    let c = claimed(&claims, "a", &[1, 2, 3], 3);
    let id = |row| Claims::id(c, row, false);
    let out = claims.settle(&[Settlement::Delivered { id: id(2) }]);
    assert!(out.cursors.is_empty(), "1 is still in hand");
    let out = claims.settle(&[Settlement::Delivered { id: id(1) }]);
    assert_eq!(out.cursors, [("a".to_owned(), 2)]);
    let snapshot = claims.snapshot("a").expect("not paused");
    assert!(snapshot.skip.contains(&3) && !snapshot.skip.contains(&2));
    let retry = |c| Settlement::Retry {
        id: Claims::id(c, 3, false),
        at: SystemTime::now(),
        error: "down".into(),
    };
    let out = claims.settle(&[retry(c)]);
    assert!(matches!(
        out.changes[..],
        [Change::Failed {
            event_id: 3,
            dead: false,
            ..
        }]
    ));
    assert!(out.cursors.is_empty(), "not before its retry row is in");
    // The write failed: 3 is handed out again, and the cursor stays before it.
    drop(claims.writing(&out));
    let snapshot = claims.snapshot("a").expect("not paused");
    assert!(!snapshot.skip.contains(&3));
    let nothing_new = || found(&[], &[], Vec::new(), None);
    assert!(
        claims
            .record("a", nothing_new(), &BTreeSet::new())
            .1
            .is_none()
    );
    // Written this time: the same commit moves the cursor past it.
    let c = claimed(&claims, "a", &[3], 3);
    let out = claims.settle(&[retry(c)]);
    assert_eq!(write(&claims, &out), [("a".to_owned(), 3)]);
    assert_eq!(claims.snapshot("a").expect("not paused").position, Some(3));
}

#[test]
fn a_released_or_postponed_event_keeps_the_cursor_before_it_and_a_postponement_pauses() {
    let claims = Claims::default();
    claims.set_position("a", 10);
    let c = claimed(&claims, "a", &[11, 12], 12);
    claims.release(&[Claims::id(c, 11, false)]);
    let out = claims.settle(&[Settlement::Delivered {
        id: Claims::id(c, 12, false),
    }]);
    assert!(out.cursors.is_empty(), "11 was handed back, not settled");
    let c = claimed(&claims, "a", &[11], 12);
    let out = claims.settle(&[Settlement::Postpone {
        id: Claims::id(c, 11, false),
        at: SystemTime::now() + Duration::from_secs(60),
        error: "broker down".into(),
    }]);
    assert!(out.changes.is_empty() && out.cursors.is_empty());
    assert!(claims.snapshot("a").is_none(), "paused");
    assert!(claims.paused_until("a").is_some());
}

#[test]
fn a_held_back_event_holds_the_cursor_only_until_its_waiting_row_is_written() {
    let claims = Claims::default();
    claims.set_position("a", 0);
    let call = || Some("call-1".to_owned());
    let held = vec![HeldBack {
        id: 2,
        call_id: "call-1".to_owned(),
        behind: 1,
    }];
    let fresh = [(1, call()), (3, None)];
    let claim = found(&fresh, &[], held, Some(3));
    let (c, moved) = claims.record("a", claim, &BTreeSet::new());
    let moved = moved.expect("the held event's row to write");
    assert!(matches!(
        moved.changes[..],
        [Change::Held {
            event_id: 2,
            behind: 1,
            ..
        }]
    ));
    assert!(claims.may_come_later("a", 1), "1 is in hand");
    let writing = claims.writing(&moved);
    let out = claims.settle(&[
        Settlement::Retry {
            id: Claims::id(c, 1, false),
            at: SystemTime::now(),
            error: "500".into(),
        },
        Settlement::Delivered {
            id: Claims::id(c, 3, false),
        },
    ]);
    assert!(claims.may_come_later("a", 1), "1 is tried again");
    assert!(out.cursors.is_empty(), "rows of 1 and 2 are being written");
    let cursors = claims.cursors_with(&moved);
    assert!(cursors.is_empty(), "1's row is still being written");
    writing.committed(&cursors);
    assert_eq!(
        write(&claims, &out),
        [("a".to_owned(), 3)],
        "past 1, 2 and 3"
    );
    assert!(!claims.may_come_later("a", 3), "3 was delivered");
}

#[test]
fn an_event_that_ends_its_call_releases_the_calls_next_waiting_row() {
    let claims = Claims::default();
    claims.set_position("a", 0);
    let call = Some("call-1".to_owned());
    let (c, _) = claims.record(
        "a",
        found(&[(1, call.clone())], &[(5, call)], Vec::new(), Some(1)),
        &BTreeSet::new(),
    );
    let out = claims.settle(&[
        Settlement::Delivered {
            id: Claims::id(c, 1, false),
        },
        Settlement::Dead {
            id: Claims::id(c, 5, true),
            error: "gone".into(),
        },
    ]);
    let released = out
        .changes
        .iter()
        .filter(|c| matches!(c, Change::Release { call_id, .. } if call_id == "call-1"))
        .count();
    assert_eq!(released, 2, "{:?}", out.changes);
    assert!(!claims.may_come_later("a", 5), "5 is dead, being written");
}

#[test]
fn a_failed_first_attempt_keeps_its_call_in_hand_until_its_retry_row_is_written() {
    let claims = Claims::default();
    claims.set_position("a", 0);
    let call = Some("call-1".to_owned());
    let fresh = [(1, call.clone())];
    let (c, _) = claims.record(
        "a",
        found(&fresh, &[], Vec::new(), Some(1)),
        &BTreeSet::new(),
    );
    let out = claims.settle(&[Settlement::Retry {
        id: Claims::id(c, 1, false),
        at: SystemTime::now(),
        error: "500".into(),
    }]);
    let writing = claims.writing(&out);
    let in_hand = |claims: &Claims| claims.snapshot("a").expect("not paused").calls_in_hand;
    assert!(in_hand(&claims).contains_key("call-1"));
    drop(writing);
    assert!(in_hand(&claims).is_empty(), "the row holds it back now");
}

#[test]
fn a_settled_retry_is_not_handed_out_again_until_its_row_is_written() {
    let claims = Claims::default();
    claims.set_position("a", 0);
    let call = Some("call-1".to_owned());
    let retries = [(4, call.clone())];
    let (c, _) = claims.record(
        "a",
        found(&[], &retries, Vec::new(), None),
        &BTreeSet::new(),
    );
    let out = claims.settle(&[Settlement::Retry {
        id: Claims::id(c, 4, true),
        at: SystemTime::now(),
        error: "500".into(),
    }]);
    let writing = claims.writing(&out);
    let snapshot = claims.snapshot("a").expect("not paused");
    assert!(
        snapshot.retries_in_hand.contains(&4),
        "its row still says it is due"
    );
    assert!(snapshot.calls_in_hand.contains_key("call-1"));
    drop(writing);
    let snapshot = claims.snapshot("a").expect("not paused");
    assert!(snapshot.retries_in_hand.is_empty() && snapshot.calls_in_hand.is_empty());
}

#[test]
fn an_event_handed_back_while_another_claim_scans_is_not_passed_by_the_cursor() {
    let claims = Claims::default();
    claims.set_position("a", 0);
    let first = claimed(&claims, "a", &[1, 2], 2);
    // A second claim starts: it skips 1 and 2, in hand.
    let snapshot = claims.snapshot("a").expect("not paused");
    // Meanwhile the sink turns out to be down: 1 is postponed, 2 released.
    claims.settle(&[Settlement::Postpone {
        id: Claims::id(first, 1, false),
        at: SystemTime::now(),
        error: "down".into(),
    }]);
    claims.release(&[Claims::id(first, 2, false)]);
    // The second claim found 3 and 4, and delivers them.
    let fresh = [(3, None), (4, None)];
    let claim = found(&fresh, &[], Vec::new(), Some(4));
    let (second, _) = claims.record("a", claim, &snapshot.skip);
    let out = claims.settle(&[
        Settlement::Delivered {
            id: Claims::id(second, 3, false),
        },
        Settlement::Delivered {
            id: Claims::id(second, 4, false),
        },
    ]);
    assert!(
        out.cursors.is_empty(),
        "the cursor passed events nobody delivered: {:?}",
        out.cursors
    );
    let next = claims.snapshot("a").expect("not paused");
    assert!(!next.skip.contains(&1) && !next.skip.contains(&2));
    assert_eq!(next.position, Some(0));
}
