//! One sink's events in hand, kept in memory by the sink's queue ([`super::queue`]), which
//! the sink's dispatcher owns alone: with the event log, a delivery has no row to lock, so
//! the queue remembers what it handed out and what came back, and moves the sink's cursor
//! over what is settled.
//!
//! Every routed event after `position` is one of: claimed (in the dispatcher's hands),
//! settled (done, waiting for the cursor to pass it), or not yet examined (beyond
//! `scanned_to`). An event held back because an earlier event of its call is still
//! pending on the sink is settled too: it gets a row of its own in `retries`, which waits
//! until the earlier event is delivered or dead, so a call that keeps failing holds the
//! cursor back no more than a delivered event does. The cursor moves in the transaction
//! that writes the rows it passes, and stops at the first claimed or unexamined event.
//! After a crash, everything after the stored cursor is delivered again: at least once,
//! and no more than what was in hand and what settled after the first of it.
//!
//! Nothing here is shared: the owner's calls take it whole, one at a time, so a write in
//! flight is the only one, and what a claim or a settlement decides holds until it is
//! written.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Instant, SystemTime};

use crate::event::{Claim, DeliveryId};
use crate::store::Settlement;

mod changes;
mod guard;
#[cfg(test)]
mod tests;

pub(super) use changes::{Change, Claimed, HeldBack, Outcome, Snapshot};
pub(super) use guard::Writing;

/// One sink's events in hand.
#[derive(Default)]
pub(super) struct Claims {
    /// The cursor as stored: known once read.
    position: Option<i64>,
    /// Every routed event in (position, scanned_to] has been examined.
    scanned_to: i64,
    /// First attempts handed out and not settled: event id -> call.
    fresh: BTreeMap<i64, Option<String>>,
    /// First attempts settled (held back ones too) but not yet behind the cursor.
    done: BTreeSet<i64>,
    /// Retries handed out and not settled: event id -> call.
    retries: BTreeMap<i64, Option<String>>,
    /// The sink said it is unavailable: nothing is handed out before this.
    paused_until: Option<Instant>,
    /// Calls whose release a write that did not land carried: the next write carries
    /// them, since the cursor may pass the ended event without it.
    unreleased: BTreeSet<String>,
}

impl Claims {
    /// Where a claim starts, or `None` while the sink is paused.
    pub(super) fn snapshot(&mut self) -> Option<Snapshot> {
        if self
            .paused_until
            .is_some_and(|until| until > Instant::now())
        {
            return None;
        }
        self.paused_until = None;
        Some(Snapshot {
            position: self.position,
            skip: self.fresh.keys().chain(&self.done).copied().collect(),
            in_hand: self
                .fresh
                .keys()
                .chain(self.retries.keys())
                .copied()
                .collect(),
            calls_in_hand: self.calls_in_hand(),
        })
    }

    /// The cursor read from the store, the first time the sink claims.
    pub(super) fn set_position(&mut self, position: i64) {
        if self.position.is_none() {
            self.position = Some(position);
            self.scanned_to = position;
        }
    }

    /// Records a claim of `sink`: what it handed out, what it held back, how far it
    /// looked. Returns what to write: the held events' rows and the cursor move that
    /// looking allowed (over events settled before the scan reached past them).
    pub(super) fn record(&mut self, sink: &str, claim: Claimed<'_>) -> Outcome {
        let Claimed {
            fresh,
            retries,
            held,
            examined_to,
        } = claim;
        self.fresh.extend(fresh.iter().cloned());
        self.retries.extend(retries.iter().cloned());
        if let Some(to) = examined_to {
            self.scanned_to = self.scanned_to.max(to);
        }
        let mut out = self.outcome(sink);
        // A claim filled by retries looked at no first attempt: what the last scan held
        // back stays held.
        for h in held {
            out.changes.push(Change::Held {
                event_id: h.id,
                waits: self.may_come_later(h.behind),
                call_id: h.call_id,
            });
            self.done.insert(h.id);
        }
        out.cursor = self.next_cursor();
        out
    }

    /// The id of a delivery of event `event_id`, a first attempt or a retry.
    pub(super) fn id(event_id: i64, retry: bool) -> DeliveryId {
        DeliveryId {
            row: event_id,
            claim: Claim::Log { retry },
        }
    }

    /// Turns outcomes into the rows and cursor move to write, and ends their claims. A
    /// first attempt that succeeded writes no row: the cursor passes it.
    pub(super) fn settle(&mut self, sink: &str, settlements: &[Settlement]) -> Outcome {
        let mut out = self.outcome(sink);
        for settlement in settlements {
            let id = settlement.id();
            let event_id = id.row;
            let Claim::Log { retry } = id.claim else {
                continue;
            };
            let ends = matches!(
                settlement,
                Settlement::Delivered { .. } | Settlement::Dead { .. }
            );
            let in_hand = if retry {
                &mut self.retries
            } else {
                &mut self.fresh
            };
            let Some(call_id) = in_hand.remove(&event_id) else {
                continue;
            };
            let change = match settlement {
                Settlement::Postpone { at, .. } if !retry => {
                    // The sink is unavailable, not this event: it stays where it is
                    // (nothing written), and the sink waits.
                    self.scanned_to = self.scanned_to.min(event_id - 1);
                    self.pause(*at);
                    None
                }
                Settlement::Delivered { .. } if !retry => None,
                Settlement::Delivered { .. } => Some(Change::Delivered { event_id }),
                Settlement::Retry { at, error, .. } | Settlement::Postpone { at, error, .. } => {
                    let counted = matches!(settlement, Settlement::Retry { .. });
                    if !counted {
                        self.pause(*at);
                    }
                    Some(Change::Failed {
                        event_id,
                        call_id: call_id.clone(),
                        first: !retry,
                        dead: false,
                        counted,
                        next: *at,
                        error: error.clone(),
                    })
                }
                Settlement::Dead { error, .. } => Some(Change::Failed {
                    event_id,
                    call_id: call_id.clone(),
                    first: !retry,
                    dead: true,
                    counted: true,
                    next: SystemTime::now(),
                    error: error.clone(),
                }),
            };
            if !retry && !matches!(settlement, Settlement::Postpone { .. }) {
                self.done.insert(event_id);
            }
            out.changes.extend(change);
            if let (Some(call_id), true) = (call_id, ends) {
                out.changes.push(Change::Release { call_id });
            }
        }
        out.cursor = self.next_cursor();
        out
    }

    /// Ends claims without an outcome: the events are handed out again later.
    pub(super) fn release(&mut self, ids: &[DeliveryId]) {
        for id in ids {
            match id.claim {
                Claim::Log { retry: false } => {
                    if self.fresh.remove(&id.row).is_some() {
                        self.scanned_to = self.scanned_to.min(id.row - 1);
                    }
                }
                Claim::Log { retry: true } => {
                    self.retries.remove(&id.row);
                }
                Claim::Unclaimed | Claim::Lease(_) => {}
            }
        }
    }

    /// Ends every claim without an outcome, as [`Claims::release`] does: their owner is
    /// gone, and nobody else could settle them.
    pub(super) fn release_all(&mut self) {
        if let Some(first) = self.fresh.keys().next() {
            self.scanned_to = self.scanned_to.min(first - 1);
        }
        self.fresh.clear();
        self.retries.clear();
    }

    /// When the sink's pause ends, if it is paused.
    pub(super) fn paused_until(&self) -> Option<SystemTime> {
        let left = self.paused_until?.checked_duration_since(Instant::now())?;
        Some(SystemTime::now() + left)
    }

    /// Until the guard is confirmed or dropped, `outcome` is being written. Dropped
    /// unconfirmed (the write failed, or the caller gave up waiting), it hands the
    /// outcome's failed and held first attempts back, to go out again rather than be
    /// skipped, and keeps its releases for the next write; confirmed, the cursor is where
    /// the write put it.
    pub(super) fn writing(&mut self, outcome: &Outcome) -> Writing<'_> {
        let mut failed = Vec::new();
        let mut releases = Vec::new();
        for change in &outcome.changes {
            match change {
                Change::Failed {
                    event_id,
                    first: true,
                    ..
                }
                | Change::Held { event_id, .. } => failed.push(*event_id),
                Change::Release { call_id } => releases.push(call_id.clone()),
                Change::Failed { .. } | Change::Delivered { .. } => {}
            }
        }
        Writing::new(self, failed, releases, outcome.cursor)
    }

    /// An outcome to fill, with the releases earlier writes did not land.
    fn outcome(&mut self, sink: &str) -> Outcome {
        let mut out = Outcome::new(sink);
        let unreleased = std::mem::take(&mut self.unreleased);
        out.changes.extend(
            unreleased
                .into_iter()
                .map(|call_id| Change::Release { call_id }),
        );
        out
    }

    /// The cursor to write with what was just settled or claimed, if it moves: up to the
    /// first event still in hand or unexamined. The rows this write carries count as
    /// written, since the cursor is written in their transaction.
    fn next_cursor(&self) -> Option<i64> {
        let position = self.position?;
        let first_blocked = [
            self.fresh.keys().next().copied(),
            Some(self.scanned_to.saturating_add(1)),
        ];
        let floor = first_blocked
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(i64::MAX)
            - 1;
        (floor > position).then_some(floor)
    }

    /// The cursor as stored now is `position`.
    fn moved(&mut self, position: i64) {
        if self.position.is_some_and(|p| p < position) {
            self.position = Some(position);
            self.done = self.done.split_off(&(position + 1));
        }
    }

    /// The failed or held first attempt `event_id` has no row: it is neither settled
    /// nor examined any more, so the cursor stops before it and the next scan hands it
    /// out again (or, if the write did land, finds its row).
    fn unwritten(&mut self, event_id: i64) {
        self.done.remove(&event_id);
        self.scanned_to = self.scanned_to.min(event_id - 1);
    }

    /// Each call with an event in hand, and its latest such event.
    fn calls_in_hand(&self) -> BTreeMap<String, i64> {
        let mut calls = BTreeMap::new();
        for (id, call) in self.fresh.iter().chain(&self.retries) {
            if let Some(call) = call {
                let latest = calls.entry(call.clone()).or_insert(*id);
                *latest = (*latest).max(*id);
            }
        }
        calls
    }

    /// Whether event `id` may still be delivered later than now, as far as this process
    /// knows: in hand, or after the cursor and not settled (handed back, postponed, or
    /// not read yet). A pending row of it in the store is the writer's to check.
    fn may_come_later(&self, id: i64) -> bool {
        self.fresh.contains_key(&id)
            || self.retries.contains_key(&id)
            || (self.position.is_some_and(|p| id > p) && !self.done.contains(&id))
    }

    fn pause(&mut self, until: SystemTime) {
        let left = until.duration_since(SystemTime::now()).unwrap_or_default();
        let until = Instant::now() + left;
        self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
    }
}
