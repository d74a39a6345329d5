//! What a claim finds and what settling comes to: the rows and cursor move the claims
//! ask the writer to make.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use crate::store::Attempt;

/// What a claim starts from.
pub(in crate::store::sqlite) struct Snapshot {
    pub(in crate::store::sqlite) position: Option<i64>,
    pub(in crate::store::sqlite) skip: BTreeSet<i64>,
    /// Events in hand, as first attempts or retries: their retry rows are not handed out
    /// (a row a write that was given up on still committed may meet its first attempt).
    pub(in crate::store::sqlite) in_hand: BTreeSet<i64>,
    pub(in crate::store::sqlite) calls_in_hand: BTreeMap<String, i64>,
}

/// A first attempt the scan held back for its call's order, and the earlier event of the
/// call it waits for.
#[derive(Debug)]
pub(in crate::store::sqlite) struct HeldBack {
    pub(in crate::store::sqlite) id: i64,
    pub(in crate::store::sqlite) call_id: String,
    pub(in crate::store::sqlite) behind: i64,
}

/// What one claim found (see [`Claims::record`]).
pub(in crate::store::sqlite) struct Claimed<'a> {
    /// First attempts handed out: event id -> call.
    pub(in crate::store::sqlite) fresh: &'a [(i64, Option<String>)],
    /// Retries handed out.
    pub(in crate::store::sqlite) retries: &'a [(i64, Option<String>)],
    /// First attempts held back to keep a call's order: each gets a waiting row.
    pub(in crate::store::sqlite) held: Vec<HeldBack>,
    /// How far the scan of first attempts looked, if it looked at all.
    pub(in crate::store::sqlite) examined_to: Option<i64>,
}

/// A change to `retries` that settling or a claim asks of the writer.
#[derive(Debug)]
pub(in crate::store::sqlite) enum Change {
    /// An attempt failed (or was postponed, `counted` false): a first attempt gets its
    /// retry row, a retry's row is updated.
    Failed {
        event_id: i64,
        call_id: Option<String>,
        first: bool,
        dead: bool,
        counted: bool,
        next: SystemTime,
        error: String,
    },
    /// A retry went through: its row says so.
    Delivered { event_id: i64 },
    /// A first attempt held back for its call's order gets a row that waits if what it
    /// waits for may still come later (`waits`: as far as the claims know; the writer
    /// also looks for an earlier pending row of the call), or is due at once.
    Held {
        event_id: i64,
        call_id: String,
        waits: bool,
    },
    /// A delivery of the call ended (delivered or dead): the call's next waiting row, if
    /// the earliest pending one waits, becomes due.
    Release { call_id: String },
}

/// What a claim or a batch of settlements of one sink comes to: rows to write, the
/// cursor move they allow, and attempts for the deliveries' histories, in one
/// transaction.
#[derive(Debug)]
pub(in crate::store::sqlite) struct Outcome {
    pub(in crate::store::sqlite) sink: String,
    pub(in crate::store::sqlite) changes: Vec<Change>,
    pub(in crate::store::sqlite) cursor: Option<i64>,
    pub(in crate::store::sqlite) attempts: Vec<Attempt>,
}

impl Outcome {
    pub(super) fn new(sink: &str) -> Outcome {
        Outcome {
            sink: sink.to_owned(),
            changes: Vec::new(),
            cursor: None,
            attempts: Vec::new(),
        }
    }

    /// Whether there is nothing to write.
    pub(in crate::store::sqlite) fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.cursor.is_none() && self.attempts.is_empty()
    }
}
