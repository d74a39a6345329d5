//! What a claim finds and what settling comes to: the rows and cursor moves the claims
//! ask the writer to make.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use crate::store::Attempt;

/// What a claim starts from, read under the lock.
pub(in crate::store::sqlite) struct Snapshot {
    pub(in crate::store::sqlite) position: Option<i64>,
    pub(in crate::store::sqlite) skip: BTreeSet<i64>,
    pub(in crate::store::sqlite) retries_in_hand: BTreeSet<i64>,
    pub(in crate::store::sqlite) calls_in_hand: BTreeMap<String, i64>,
}

/// A first attempt the scan held back for its call's order, and the earlier event of the
/// call it waits for.
#[derive(Debug, Clone)]
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

/// A change to `retries` that settling asks of the writer.
#[derive(Debug, Clone)]
pub(in crate::store::sqlite) enum Change {
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

impl Change {
    /// The delivery whose row in `retries` this change writes, if it writes one.
    pub(super) fn row(&self) -> Option<(&str, i64)> {
        match self {
            Change::Failed { sink, event_id, .. }
            | Change::Held { sink, event_id, .. }
            | Change::Again { sink, event_id, .. }
            | Change::Delivered { sink, event_id } => Some((sink, *event_id)),
            Change::Release { .. } => None,
        }
    }
}

/// What a batch of settlements comes to: retry rows to write, cursors to move.
#[derive(Debug, Default)]
pub(in crate::store::sqlite) struct Outcome {
    pub(in crate::store::sqlite) changes: Vec<Change>,
    pub(in crate::store::sqlite) cursors: Vec<(String, i64)>,
    /// Attempts for the deliveries' histories, each with its sink.
    pub(in crate::store::sqlite) attempts: Vec<(String, Attempt)>,
    /// Each sink whose cursor moves, and its cursor as written before, should the write
    /// fail.
    pub(in crate::store::sqlite) before: Vec<(usize, i64)>,
}
