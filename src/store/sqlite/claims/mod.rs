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

use crate::event::{Claim, DeliveryId};
use crate::store::Settlement;

mod changes;
mod guard;
#[cfg(test)]
mod tests;

pub(super) use changes::{Change, Claimed, HeldBack, Outcome, Snapshot};
pub(super) use guard::Writing;

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
    /// The sink said it is unavailable: nothing is handed out before this.
    paused_until: Option<Instant>,
}

impl SinkState {
    /// The furthest the cursor may go from `position`: up to the first event still in
    /// hand, unexamined, or whose retry row is still being written. Passing that last kind
    /// early would lose the event if its write failed or never came while another write
    /// (with the cursor past it) went through.
    /// Rows in `written` are taken as written: they are in the transaction that would
    /// move the cursor.
    fn floor(&self, position: i64, written: &BTreeSet<i64>) -> i64 {
        let blocked = [
            self.fresh.keys().next().copied(),
            self.writing
                .range(position.saturating_add(1)..)
                .map(|(id, _)| *id)
                .find(|id| !written.contains(id)),
            Some(self.scanned_to.saturating_add(1)),
        ];
        blocked.into_iter().flatten().min().unwrap_or(i64::MAX) - 1
    }

    fn advance(&mut self) {
        if let Some(position) = self.position {
            let next = position.max(self.floor(position, &BTreeSet::new()));
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

    /// The cursor read from the store, the first time a sink claims.
    pub(super) fn set_position(&self, sink: &str, position: i64) {
        let mut state = self.lock();
        let (_, s) = Claims::sink(&mut state, sink);
        if s.position.is_none() {
            s.position = Some(position);
            s.persisted = position;
            s.scanned_to = position;
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
    ) -> (u32, Option<Outcome>) {
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
        (u32::try_from(index).unwrap_or(u32::MAX), moved)
    }

    /// The id of a delivery of event `event_id` handed out for the sink in slot `sink`
    /// (as [`Claims::record`] answered it), a first attempt or a retry.
    pub(super) fn id(sink: u32, event_id: i64, retry: bool) -> DeliveryId {
        DeliveryId {
            row: event_id,
            claim: Claim::Slot { sink, retry },
        }
    }

    /// The sink a delivery was handed out for, while this process knows it.
    pub(super) fn sink_of(&self, id: DeliveryId) -> Option<String> {
        let (index, _) = slot(id)?;
        Some(self.lock().sinks.get(index)?.name.clone())
    }

    /// Turns outcomes into retry rows and cursor moves, and ends their claims. A first
    /// attempt that succeeded writes nothing: the cursor passes it.
    pub(super) fn settle(&self, settlements: &[Settlement]) -> Outcome {
        let mut state = self.lock();
        let mut out = Outcome::default();
        let mut touched = BTreeSet::new();
        for settlement in settlements {
            let id = settlement.id();
            let Some((index, retry)) = slot(id) else {
                continue;
            };
            let Some(s) = state.sinks.get_mut(index) else {
                continue;
            };
            touched.insert(index);
            let sink = s.name.clone();
            let event_id = id.row;
            if !retry {
                let Some(call_id) = s.fresh.remove(&event_id) else {
                    continue;
                };
                if let (Some(call_id), true) = (&call_id, ends(settlement)) {
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
            if let Some((sink, event_id)) = change.row() {
                rows.push((sink.to_owned(), event_id));
                if matches!(change, Change::Failed { .. } | Change::Held { .. }) {
                    failed.push((sink.to_owned(), event_id));
                }
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

    /// The cursors to write with `outcome`, in its transaction: each sink it touches may
    /// move past the rows it carries (and whatever was settled before them), but not past
    /// a row another write still carries, nor an event in hand or unexamined. The writer
    /// asks it as it writes, so that settling and the move it allows are one commit.
    pub(super) fn cursors_with(&self, outcome: &Outcome) -> Vec<(String, i64)> {
        let mut rows: BTreeMap<&str, BTreeSet<i64>> = BTreeMap::new();
        for (sink, event_id) in outcome.changes.iter().filter_map(Change::row) {
            rows.entry(sink).or_default().insert(event_id);
        }
        for (sink, _) in &outcome.cursors {
            rows.entry(sink).or_default();
        }
        let state = self.lock();
        let mut out = Vec::new();
        for (sink, written) in rows {
            let Some(s) = state.index.get(sink).map(|i| &state.sinks[*i]) else {
                continue;
            };
            let Some(position) = s.position else {
                continue;
            };
            let asked = outcome
                .cursors
                .iter()
                .filter(|(name, _)| name == sink)
                .map(|(_, p)| *p)
                .max();
            let next = position.max(s.floor(position, &written));
            let next = asked.map_or(next, |p| p.max(next));
            if asked.is_some() || next > s.persisted {
                out.push((sink.to_owned(), next));
            }
        }
        out
    }

    /// Ends claims without an outcome: the events are handed out again later.
    pub(super) fn release(&self, ids: &[DeliveryId]) {
        let mut state = self.lock();
        for id in ids {
            let Some((s, retry)) =
                slot(*id).and_then(|(i, retry)| Some((state.sinks.get_mut(i)?, retry)))
            else {
                continue;
            };
            if !retry {
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

/// The slot of the sink a delivery was handed out for by this store, and whether it is a
/// retry.
fn slot(id: DeliveryId) -> Option<(usize, bool)> {
    match id.claim {
        Claim::Slot { sink, retry } => Some((usize::try_from(sink).ok()?, retry)),
        Claim::Unclaimed | Claim::Lease(_) => None,
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
