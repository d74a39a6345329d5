//! The guard over a write that carries settled deliveries' rows: committed, it lets the
//! cursor pass them; dropped unconfirmed, it hands their events out again.

use super::Claims;

/// See [`Claims::writing`].
pub(in crate::store::sqlite) struct Writing<'a> {
    pub(super) claims: &'a Claims,
    pub(super) rows: Vec<(String, i64)>,
    /// First attempts whose rows (retrying or waiting) the write carries.
    pub(super) failed: Vec<(String, i64)>,
    /// Each touched sink and its cursor as written before.
    pub(super) before: Vec<(usize, i64)>,
    pub(super) committed: bool,
}

impl Writing<'_> {
    /// The write is committed, with the cursors `written` in its transaction (see
    /// [`Claims::cursors_with`]): its rows are no longer being written, and the cursors
    /// as stored are at least those.
    pub(in crate::store::sqlite) fn committed(mut self, written: &[(String, i64)]) {
        self.committed = true;
        let mut state = self.claims.lock();
        for (sink, event_id) in self.rows.drain(..) {
            if let Some(index) = state.index.get(&sink).copied() {
                state.sinks[index].writing.remove(&event_id);
                state.sinks[index].ending.remove(&event_id);
            }
        }
        for (sink, position) in written {
            if let Some(index) = state.index.get(sink).copied() {
                let s = &mut state.sinks[index];
                s.persisted = s.persisted.max(*position);
                s.advance();
            }
        }
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
