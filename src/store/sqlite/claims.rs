//! Which events each sink has in hand, kept in memory: with the event log, a delivery has
//! no row to lock, so this process remembers what it handed out and what came back, and
//! moves each sink's cursor over what is settled.
//!
//! Per sink, every routed event after `position` is one of: claimed (in a dispatcher's
//! hands), settled (done, waiting for the cursor to pass it), or not yet examined (beyond
//! `scanned_to`). An event held back because an earlier event of its call is still
//! pending on the sink is settled too: it gets a row of its own in `retries`, which waits
//! until the earlier event is delivered or dead, so a call that keeps failing holds the
//! cursor back no more than a delivered event does. The cursor may pass only settled
//! events whose rows are written, so it stops at the first claimed, unexamined or
//! unwritten one. After a crash, everything after the persisted cursor is delivered
//! again: at least once, and no more than what was in hand or being written.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use crate::event::DeliveryId;
use crate::store::Settlement;

/// The claim's low bit: a retry (a row in `retries`) rather than a first attempt.
const RETRY: u64 = 1;

#[derive(Default)]
pub(super) struct Claims(Mutex<State>);

#[derive(Default)]
struct State {
    sinks: Vec<SinkState>,
    index: HashMap<String, usize>,
}

/// One sink's events in hand.
#[derive(Default)]
struct SinkState {
    name: String,
    /// The cursor: known once read from the store.
    position: Option<i64>,
    /// The cursor as last written, to write it only when it moved.
    persisted: i64,
    /// Every routed event in (position, scanned_to] has been examined.
    scanned_to: i64,
    /// First attempts handed out and not settled: event id -> call.
    fresh: BTreeMap<i64, Option<String>>,
    /// First attempts settled (held back ones too) but not yet behind the cursor.
    done: BTreeSet<i64>,
    /// Retries handed out and not settled: event id -> call.
    retries: BTreeMap<i64, Option<String>>,
    /// Deliveries whose retry row is being written (a first attempt that failed, or a
    /// retry's outcome): until it is, only this keeps them, and their call's later events,
    /// from being handed out on what the row said before.
    writing: BTreeMap<i64, Option<String>>,
    /// Those of `writing` whose outcome ends the delivery (delivered or dead): a held event
    /// of their call need not wait for them.
    ending: BTreeSet<i64>,
    /// First attempts that a held back event waits for: their end (delivered or dead)
    /// releases the call's waiting row. Any other first attempt's end has nothing to
    /// release, and writes nothing: the cursor passes it.
    holding: BTreeSet<i64>,
    /// Waiting rows were in the store when this process started: they may wait for any
    /// first attempt up to this event, which releases its call when it ends.
    held_before_start: i64,
    /// The sink said it is unavailable: nothing is handed out before this.
    paused_until: Option<Instant>,
}

impl SinkState {
    /// The furthest the cursor may go from `position`: up to the first event still in
    /// hand, unexamined, or whose retry row is still being written. Passing that last kind
    /// early would lose the event if its write failed or never came while another write
    /// (with the cursor past it) went through.
    fn floor(&self, position: i64) -> i64 {
        let blocked = [
            self.fresh.keys().next().copied(),
            self.writing
                .range(position.saturating_add(1)..)
                .next()
                .map(|(id, _)| *id),
            Some(self.scanned_to.saturating_add(1)),
        ];
        blocked.into_iter().flatten().min().unwrap_or(i64::MAX) - 1
    }

    fn advance(&mut self) {
        if let Some(position) = self.position {
            let next = position.max(self.floor(position));
            self.position = Some(next);
            self.done = self.done.split_off(&(next + 1));
        }
    }

    /// Advances, and adds the cursor to `out` if it passed what was last written (this
    /// sink is the `index`th).
    fn advance_into(&mut self, index: usize, out: &mut Outcome) {
        let before = self.persisted;
        self.advance();
        if let Some(position) = self.position.filter(|p| *p > self.persisted) {
            self.persisted = position;
            out.cursors.push((self.name.clone(), position));
            out.before.push((index, before));
        }
    }

    /// Each call with an event in hand or being written, and its latest such event.
    fn calls_in_hand(&self) -> BTreeMap<String, i64> {
        let mut calls = BTreeMap::new();
        for (id, call) in self.fresh.iter().chain(&self.retries).chain(&self.writing) {
            if let Some(call) = call {
                let latest = calls.entry(call.clone()).or_insert(*id);
                *latest = (*latest).max(*id);
            }
        }
        calls
    }

    /// Whether event `id` may still be delivered later than now, as far as this process
    /// knows: in hand, being written with an outcome that tries again, or after the
    /// cursor and neither settled nor being written (handed back, postponed, or not read
    /// yet). A pending row of it in the store is the writer's to check.
    fn may_come_later(&self, id: i64) -> bool {
        self.fresh.contains_key(&id)
            || self.retries.contains_key(&id)
            || (self.writing.contains_key(&id) && !self.ending.contains(&id))
            || (self.position.is_some_and(|p| id > p)
                && !self.done.contains(&id)
                && !self.writing.contains_key(&id))
    }
}

/// What a claim starts from, read under the lock.
pub(super) struct Snapshot {
    pub(super) position: Option<i64>,
    pub(super) skip: BTreeSet<i64>,
    pub(super) retries_in_hand: BTreeSet<i64>,
    pub(super) calls_in_hand: BTreeMap<String, i64>,
}

/// A first attempt the scan held back for its call's order, and the earlier event of the
/// call it waits for.
#[derive(Debug, Clone)]
pub(super) struct HeldBack {
    pub(super) id: i64,
    pub(super) call_id: String,
    pub(super) behind: i64,
}

/// What one claim found (see [`Claims::record`]).
pub(super) struct Claimed<'a> {
    /// First attempts handed out: event id -> call.
    pub(super) fresh: &'a [(i64, Option<String>)],
    /// Retries handed out.
    pub(super) retries: &'a [(i64, Option<String>)],
    /// First attempts held back to keep a call's order: each gets a waiting row.
    pub(super) held: Vec<HeldBack>,
    /// How far the scan of first attempts looked, if it looked at all.
    pub(super) examined_to: Option<i64>,
}

/// A change to `retries` that settling asks of the writer.
#[derive(Debug, Clone)]
pub(super) enum Change {
    /// A first attempt failed: the delivery gets its retry row.
    Failed {
        sink: String,
        event_id: i64,
        call_id: Option<String>,
        dead: bool,
        next: SystemTime,
        error: String,
    },
    /// A retry failed again (or was postponed, `counted` false).
    Again {
        sink: String,
        event_id: i64,
        dead: bool,
        counted: bool,
        next: SystemTime,
        error: String,
    },
    /// A retry went through: its row says so.
    Delivered { sink: String, event_id: i64 },
    /// A first attempt held back for its call's order gets a row that waits, unless what
    /// it waited for has ended by the time the row is written.
    Held {
        sink: String,
        event_id: i64,
        call_id: String,
        behind: i64,
    },
    /// A delivery of the call ended (delivered or dead): the call's next waiting row, if
    /// the earliest pending one waits, becomes due.
    Release { sink: String, call_id: String },
}

/// What a batch of settlements comes to: retry rows to write, cursors to move.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    pub(super) changes: Vec<Change>,
    pub(super) cursors: Vec<(String, i64)>,
    /// Each sink whose cursor moves, and its cursor as written before, should the write
    /// fail.
    pub(super) before: Vec<(usize, i64)>,
}

impl Claims {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sink<'a>(state: &'a mut State, name: &str) -> (usize, &'a mut SinkState) {
        let index = match state.index.get(name) {
            Some(i) => *i,
            None => {
                state.sinks.push(SinkState {
                    name: name.to_owned(),
                    ..SinkState::default()
                });
                let i = state.sinks.len() - 1;
                state.index.insert(name.to_owned(), i);
                i
            }
        };
        (index, &mut state.sinks[index])
    }

    /// Where a claim for `sink` starts, or `None` while the sink is paused.
    pub(super) fn snapshot(&self, sink: &str) -> Option<Snapshot> {
        let mut state = self.lock();
        let (_, s) = Claims::sink(&mut state, sink);
        if s.paused_until.is_some_and(|until| until > Instant::now()) {
            return None;
        }
        s.paused_until = None;
        Some(Snapshot {
            position: s.position,
            skip: s.fresh.keys().chain(&s.done).copied().collect(),
            retries_in_hand: s.retries.keys().chain(s.writing.keys()).copied().collect(),
            calls_in_hand: s.calls_in_hand(),
        })
    }

    /// The cursor read from the store, the first time a sink claims, and the last event
    /// that a waiting row already in the store may wait for (0: none waits).
    pub(super) fn set_position(&self, sink: &str, position: i64, held_before_start: i64) {
        let mut state = self.lock();
        let (_, s) = Claims::sink(&mut state, sink);
        if s.position.is_none() {
            s.position = Some(position);
            s.persisted = position;
            s.scanned_to = position;
            s.held_before_start = held_before_start;
        }
    }

    /// Records a claim: what it handed out, what it held back, how far it looked, and what
    /// it skipped as in hand (its snapshot's `skip`). Returns the claim, and the cursor to
    /// write if looking let it move (over events settled before the scan reached past
    /// them).
    pub(super) fn record(
        &self,
        sink: &str,
        claim: Claimed<'_>,
        skipped: &BTreeSet<i64>,
    ) -> (u64, Option<Outcome>) {
        let Claimed {
            fresh,
            retries,
            held,
            examined_to,
        } = claim;
        let mut state = self.lock();
        let (index, s) = Claims::sink(&mut state, sink);
        for (id, call) in fresh {
            s.fresh.insert(*id, call.clone());
        }
        for (id, call) in retries {
            s.retries.insert(*id, call.clone());
        }
        // A claim filled by retries looked at no first attempt: what the last scan held
        // back stays held.
        let mut moved = Outcome::default();
        for h in held {
            if s.fresh.contains_key(&h.behind) {
                s.holding.insert(h.behind);
            }
            // Settled once its row is written; until then, being written holds the cursor.
            s.done.insert(h.id);
            s.writing.insert(h.id, Some(h.call_id.clone()));
            moved.changes.push(Change::Held {
                sink: s.name.clone(),
                event_id: h.id,
                call_id: h.call_id,
                behind: h.behind,
            });
        }
        if let Some(to) = examined_to {
            let scanned = s.scanned_to.max(to);
            // An event the scan skipped as in hand, and handed back (released, postponed,
            // its settlement unwritten) while the scan ran, was looked at by nobody: the
            // cursor must stop before it, and the next scan hands it out.
            let after = s.position.unwrap_or(0);
            let returned = skipped
                .iter()
                .find(|id| **id > after && !s.fresh.contains_key(id) && !s.done.contains(id));
            s.scanned_to = returned.map_or(scanned, |first| scanned.min(first - 1));
        }
        s.advance_into(index, &mut moved);
        let moved = (!moved.cursors.is_empty() || !moved.changes.is_empty()).then_some(moved);
        (u64::try_from(index).unwrap_or(0) << 1, moved)
    }

    /// The claim of a delivery handed out for `sink`.
    pub(super) fn id(claim: u64, event_id: i64, retry: bool) -> DeliveryId {
        DeliveryId {
            row: event_id,
            claim: claim | if retry { RETRY } else { 0 },
        }
    }

    /// Turns outcomes into retry rows and cursor moves, and ends their claims. A first
    /// attempt that succeeded writes nothing: the cursor passes it.
    pub(super) fn settle(&self, settlements: &[Settlement]) -> Outcome {
        let mut state = self.lock();
        let mut out = Outcome::default();
        let mut touched = BTreeSet::new();
        for settlement in settlements {
            let id = settlement.id();
            let Ok(index) = usize::try_from(id.claim >> 1) else {
                continue;
            };
            let Some(s) = state.sinks.get_mut(index) else {
                continue;
            };
            touched.insert(index);
            let sink = s.name.clone();
            let event_id = id.row;
            if id.claim & RETRY == 0 {
                let Some(call_id) = s.fresh.remove(&event_id) else {
                    continue;
                };
                // A postponed event goes out again as a first attempt: what waits for it
                // still does.
                let holds = !matches!(settlement, Settlement::Postpone { .. })
                    && (s.holding.remove(&event_id) || event_id <= s.held_before_start);
                if let (Some(call_id), true) = (&call_id, holds && ends(settlement)) {
                    out.changes.push(Change::Release {
                        sink: sink.clone(),
                        call_id: call_id.clone(),
                    });
                }
                match settlement {
                    Settlement::Delivered { .. } => {
                        s.done.insert(event_id);
                    }
                    Settlement::Retry { at, error, .. } => {
                        s.done.insert(event_id);
                        s.writing.insert(event_id, call_id.clone());
                        out.changes.push(Change::Failed {
                            sink,
                            event_id,
                            call_id,
                            dead: false,
                            next: *at,
                            error: error.clone(),
                        });
                    }
                    Settlement::Dead { error, .. } => {
                        s.done.insert(event_id);
                        s.writing.insert(event_id, call_id.clone());
                        s.ending.insert(event_id);
                        out.changes.push(Change::Failed {
                            sink,
                            event_id,
                            call_id,
                            dead: true,
                            next: SystemTime::now(),
                            error: error.clone(),
                        });
                    }
                    Settlement::Postpone { at, .. } => {
                        // The sink is unavailable, not this event: it stays where it is
                        // (nothing written), and the sink waits.
                        s.scanned_to = s.scanned_to.min(event_id - 1);
                        pause(s, *at);
                    }
                }
            } else {
                let Some(call_id) = s.retries.remove(&event_id) else {
                    continue;
                };
                if ends(settlement) {
                    s.ending.insert(event_id);
                }
                s.writing.insert(event_id, call_id.clone());
                out.changes.push(match settlement {
                    Settlement::Delivered { .. } => Change::Delivered {
                        sink: sink.clone(),
                        event_id,
                    },
                    Settlement::Retry { at, error, .. } => Change::Again {
                        sink: sink.clone(),
                        event_id,
                        dead: false,
                        counted: true,
                        next: *at,
                        error: error.clone(),
                    },
                    Settlement::Postpone { at, error, .. } => {
                        pause(s, *at);
                        Change::Again {
                            sink: sink.clone(),
                            event_id,
                            dead: false,
                            counted: false,
                            next: *at,
                            error: error.clone(),
                        }
                    }
                    Settlement::Dead { error, .. } => Change::Again {
                        sink: sink.clone(),
                        event_id,
                        dead: true,
                        counted: true,
                        next: SystemTime::now(),
                        error: error.clone(),
                    },
                });
                if let (Some(call_id), true) = (call_id, ends(settlement)) {
                    out.changes.push(Change::Release { sink, call_id });
                }
            }
        }
        for index in touched {
            state.sinks[index].advance_into(index, &mut out);
        }
        out
    }

    /// Until the guard is confirmed or dropped, `outcome` is being written: its retry
    /// rows' deliveries count as in hand and the cursor stops before its failed first
    /// attempts. Dropped unconfirmed (the write failed, or the caller gave up waiting),
    /// it hands those first attempts back, to go out again rather than be skipped.
    pub(super) fn writing(&self, outcome: &Outcome) -> Writing<'_> {
        let mut rows = Vec::with_capacity(outcome.changes.len());
        let mut failed = Vec::new();
        for change in &outcome.changes {
            match change {
                Change::Failed { sink, event_id, .. } | Change::Held { sink, event_id, .. } => {
                    rows.push((sink.clone(), *event_id));
                    failed.push((sink.clone(), *event_id));
                }
                Change::Again { sink, event_id, .. } | Change::Delivered { sink, event_id } => {
                    rows.push((sink.clone(), *event_id));
                }
                Change::Release { .. } => {}
            }
        }
        Writing {
            claims: self,
            rows,
            failed,
            before: outcome.before.clone(),
            committed: false,
        }
    }

    /// Ends claims without an outcome: the events are handed out again later.
    pub(super) fn release(&self, ids: &[DeliveryId]) {
        let mut state = self.lock();
        for id in ids {
            let Some(s) = usize::try_from(id.claim >> 1)
                .ok()
                .and_then(|i| state.sinks.get_mut(i))
            else {
                continue;
            };
            if id.claim & RETRY == 0 {
                if s.fresh.remove(&id.row).is_some() {
                    s.scanned_to = s.scanned_to.min(id.row - 1);
                }
            } else {
                s.retries.remove(&id.row);
            }
        }
    }

    /// Whether event `id` of `sink` may still be delivered later (see
    /// [`SinkState::may_come_later`]); the writer asks it as it writes a held event's row.
    pub(super) fn may_come_later(&self, sink: &str, id: i64) -> bool {
        let state = self.lock();
        state
            .index
            .get(sink)
            .is_some_and(|i| state.sinks[*i].may_come_later(id))
    }

    /// When the sink's pause ends, if it is paused.
    pub(super) fn paused_until(&self, sink: &str) -> Option<SystemTime> {
        let mut state = self.lock();
        let (_, s) = Claims::sink(&mut state, sink);
        let left = s.paused_until?.checked_duration_since(Instant::now())?;
        Some(SystemTime::now() + left)
    }
}

/// See [`Claims::writing`].
pub(super) struct Writing<'a> {
    claims: &'a Claims,
    rows: Vec<(String, i64)>,
    /// First attempts whose rows (retrying or waiting) the write carries.
    failed: Vec<(String, i64)>,
    /// Each touched sink and its cursor as written before.
    before: Vec<(usize, i64)>,
    committed: bool,
}

impl Writing<'_> {
    /// The write is committed. Returns the cursor move its failed first attempts no
    /// longer stand in the way of, to write now rather than at the sink's next claim
    /// (until then the `outbox` view still shows them pending).
    pub(super) fn committed(mut self) -> Option<Outcome> {
        self.committed = true;
        let mut state = self.claims.lock();
        for (sink, event_id) in self.rows.drain(..) {
            if let Some(index) = state.index.get(&sink).copied() {
                state.sinks[index].writing.remove(&event_id);
                state.sinks[index].ending.remove(&event_id);
            }
        }
        let mut out = Outcome::default();
        for (sink, _) in &self.failed {
            if let Some(index) = state.index.get(sink).copied() {
                state.sinks[index].advance_into(index, &mut out);
            }
        }
        (!out.cursors.is_empty()).then_some(out)
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let mut state = self.claims.lock();
        for (sink, event_id) in &self.rows {
            if let Some(index) = state.index.get(sink).copied() {
                state.sinks[index].writing.remove(event_id);
                state.sinks[index].ending.remove(event_id);
            }
        }
        // Not written, or not known to be: the failed first attempts are neither settled
        // nor examined any more, so the cursor stops before them and the next scan hands
        // them out again (or, if the write did land, finds their retry rows).
        for (sink, event_id) in &self.failed {
            if let Some(index) = state.index.get(sink).copied() {
                let s = &mut state.sinks[index];
                s.done.remove(event_id);
                s.scanned_to = s.scanned_to.min(event_id - 1);
            }
        }
        // The cursor as stored may be behind what this write would have made it: the
        // next move writes it again. The lowest wins whatever order writes fail in.
        for (index, position) in &self.before {
            if let Some(s) = state.sinks.get_mut(*index) {
                s.persisted = s.persisted.min(*position);
            }
        }
    }
}

/// Whether the outcome ends the delivery, so that its call's next event may go.
fn ends(settlement: &Settlement) -> bool {
    matches!(
        settlement,
        Settlement::Delivered { .. } | Settlement::Dead { .. }
    )
}

fn pause(s: &mut SinkState, until: SystemTime) {
    let left = until.duration_since(SystemTime::now()).unwrap_or_default();
    let until = Instant::now() + left;
    s.paused_until = Some(s.paused_until.map_or(until, |p| p.max(until)));
}

#[cfg(test)]
mod tests {
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

    fn claimed(claims: &Claims, sink: &str, ids: &[i64], examined_to: i64) -> u64 {
        let fresh: Vec<_> = ids.iter().map(|id| (*id, None)).collect();
        let claim = found(&fresh, &[], Vec::new(), Some(examined_to));
        claims.record(sink, claim, &BTreeSet::new()).0
    }

    #[test]
    fn the_cursor_passes_only_what_is_settled_in_order() {
        let claims = Claims::default();
        claims.set_position("a", 0, 0);
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
        // Written this time: the next move passes it.
        let c = claimed(&claims, "a", &[3], 3);
        let out = claims.settle(&[retry(c)]);
        let moved = claims.writing(&out).committed();
        assert_eq!(moved.expect("moved").cursors, [("a".to_owned(), 3)]);
    }

    #[test]
    fn a_released_or_postponed_event_keeps_the_cursor_before_it_and_a_postponement_pauses() {
        let claims = Claims::default();
        claims.set_position("a", 10, 0);
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
        claims.set_position("a", 0, 0);
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
        assert!(
            writing.committed().is_none(),
            "1's row is still being written"
        );
        let moved = claims.writing(&out).committed().expect("moved");
        assert_eq!(moved.cursors, [("a".to_owned(), 3)], "past 1, 2 and 3");
        assert!(!claims.may_come_later("a", 3), "3 was delivered");
    }

    fn releases(out: &Outcome) -> Vec<&str> {
        out.changes
            .iter()
            .filter_map(|c| match c {
                Change::Release { call_id, .. } => Some(call_id.as_str()),
                _ => None,
            })
            .collect()
    }

    fn call(name: &str) -> Option<String> {
        Some(name.to_owned())
    }

    #[test]
    fn an_ended_delivery_releases_its_call_only_when_an_event_may_wait_for_it() {
        let claims = Claims::default();
        claims.set_position("a", 0, 0);
        let held = vec![HeldBack {
            id: 3,
            call_id: "call-1".to_owned(),
            behind: 1,
        }];
        let fresh = [(1, call("call-1")), (2, call("call-2"))];
        let retries = [(5, call("call-3"))];
        let (c, _) = claims.record(
            "a",
            found(&fresh, &retries, held, Some(3)),
            &BTreeSet::new(),
        );
        let out = claims.settle(&[
            Settlement::Delivered {
                id: Claims::id(c, 1, false),
            },
            Settlement::Delivered {
                id: Claims::id(c, 2, false),
            },
            Settlement::Dead {
                id: Claims::id(c, 5, true),
                error: "gone".into(),
            },
        ]);
        assert_eq!(
            releases(&out),
            ["call-1", "call-3"],
            "3 waits for 1 and a retry row may have waiting rows behind it; nothing waits for 2"
        );
        assert!(!claims.may_come_later("a", 5), "5 is dead, being written");
    }

    #[test]
    fn a_postponed_event_that_holds_another_releases_it_when_it_goes_out_again_and_ends() {
        let claims = Claims::default();
        claims.set_position("a", 0, 0);
        let held = vec![HeldBack {
            id: 2,
            call_id: "call-1".to_owned(),
            behind: 1,
        }];
        let (c, _) = claims.record(
            "a",
            found(&[(1, call("call-1"))], &[], held, Some(2)),
            &BTreeSet::new(),
        );
        let out = claims.settle(&[Settlement::Postpone {
            id: Claims::id(c, 1, false),
            at: SystemTime::now(),
            error: "cannot connect".into(),
        }]);
        assert!(releases(&out).is_empty(), "1 has not ended");
        let (c, _) = claims.record(
            "a",
            found(&[(1, call("call-1"))], &[], Vec::new(), Some(2)),
            &BTreeSet::new(),
        );
        let out = claims.settle(&[Settlement::Delivered {
            id: Claims::id(c, 1, false),
        }]);
        assert_eq!(releases(&out), ["call-1"]);
    }

    #[test]
    fn after_a_restart_with_waiting_rows_every_event_up_to_the_last_stored_releases_its_call() {
        let claims = Claims::default();
        claims.set_position("a", 0, 4);
        let fresh = [(2, call("call-2")), (6, call("call-6"))];
        let (c, _) = claims.record(
            "a",
            found(&fresh, &[], Vec::new(), Some(6)),
            &BTreeSet::new(),
        );
        let out = claims.settle(&[
            Settlement::Delivered {
                id: Claims::id(c, 2, false),
            },
            Settlement::Delivered {
                id: Claims::id(c, 6, false),
            },
        ]);
        assert_eq!(
            releases(&out),
            ["call-2"],
            "a row written before the restart may wait for 2, none for 6"
        );
    }

    #[test]
    fn a_failed_first_attempt_keeps_its_call_in_hand_until_its_retry_row_is_written() {
        let claims = Claims::default();
        claims.set_position("a", 0, 0);
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
        claims.set_position("a", 0, 0);
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
        claims.set_position("a", 0, 0);
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
}
