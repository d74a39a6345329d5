//! Which sinks may hold a row waiting for an earlier event of its call, as the writer
//! knows it: a delivery that ends releases its call's next waiting row, and on a sink
//! with none that would be a statement per delivered event for nothing.
//!
//! The writer owns this, so it changes in the writer's order: a sink is marked as soon
//! as a waiting row of it is written (a write rolled back leaves the mark, which costs
//! only a release that finds nothing), and unmarked only once a transaction that found
//! none left has committed, unless a waiting row was written after that look.

use std::collections::HashSet;

use rusqlite::{Connection, params};

/// `next_attempt_at` of a row waiting for an earlier event of its call: never due by
/// itself; a release (`settle.rs`) makes it due once that event is delivered or dead.
pub(super) const WAITING: i64 = i64::MAX;

/// See the module's doc.
pub(super) struct Waiting {
    /// Sinks that may hold a waiting row.
    marked: HashSet<String>,
    /// Marked sinks a look in this transaction found without one.
    none_left: HashSet<String>,
    /// Marked sinks looked at in this transaction.
    looked: HashSet<String>,
}

impl Waiting {
    /// The sinks with waiting rows in the store as it is opened.
    pub(super) fn load(conn: &Connection) -> rusqlite::Result<Waiting> {
        let marked = conn
            .prepare(
                "SELECT DISTINCT sink FROM retries WHERE status = 'pending'
                 AND next_attempt_at = ?1",
            )?
            .query_map(params![WAITING], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(Waiting {
            marked,
            none_left: HashSet::new(),
            looked: HashSet::new(),
        })
    }

    /// Whether `sink` may hold a waiting row at this point of the transaction.
    pub(super) fn may_hold(&self, sink: &str) -> bool {
        self.marked.contains(sink) && !self.none_left.contains(sink)
    }

    /// A waiting row of `sink` is being written.
    pub(super) fn mark(&mut self, sink: &str) {
        self.none_left.remove(sink);
        if !self.marked.contains(sink) {
            self.marked.insert(sink.to_owned());
        }
    }

    /// After a release on `sink`: looks, once a transaction, whether any waiting row of
    /// it is left.
    pub(super) fn look(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        sink: &str,
    ) -> rusqlite::Result<()> {
        if self.looked.contains(sink) {
            return Ok(());
        }
        self.looked.insert(sink.to_owned());
        let left = tx
            .prepare_cached(
                "SELECT 1 FROM retries WHERE sink = ?1 AND status = 'pending'
                 AND next_attempt_at = ?2 LIMIT 1",
            )?
            .exists(params![sink, WAITING])?;
        if !left {
            self.none_left.insert(sink.to_owned());
        }
        Ok(())
    }

    /// The transaction committed: what it found without waiting rows is unmarked.
    pub(super) fn committed(&mut self) {
        for sink in self.none_left.drain() {
            self.marked.remove(&sink);
        }
        self.looked.clear();
    }

    /// The transaction rolled back: what it found counts for nothing.
    pub(super) fn rolled_back(&mut self) {
        self.none_left.clear();
        self.looked.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(rows: &[(&str, i64)]) -> Connection {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(
            "CREATE TABLE retries (sink TEXT, event_id INTEGER, status TEXT,
                                   next_attempt_at INTEGER)",
        )
        .expect("table");
        for (n, (sink, next)) in (0_i64..).zip(rows) {
            conn.execute(
                "INSERT INTO retries VALUES (?1, ?2, 'pending', ?3)",
                params![sink, n, next],
            )
            .expect("row");
        }
        conn
    }

    #[test]
    fn a_sink_is_marked_while_it_may_hold_a_waiting_row_and_unmarked_only_by_a_commit() {
        let mut conn = store(&[("crm", WAITING), ("archive", 5)]);
        let mut waiting = Waiting::load(&conn).expect("load");
        assert!(waiting.may_hold("crm"));
        assert!(
            !waiting.may_hold("archive"),
            "its only row is due, not waiting"
        );

        // The last waiting row goes; a look finds none, but a rollback undoes it all.
        let tx = conn.transaction().expect("tx");
        tx.execute("UPDATE retries SET next_attempt_at = 1", [])
            .expect("release");
        waiting.look(&tx, "crm").expect("look");
        assert!(!waiting.may_hold("crm"), "none left in this transaction");
        drop(tx);
        waiting.rolled_back();
        assert!(
            waiting.may_hold("crm"),
            "the rolled back release left its row"
        );

        // A waiting row written after the look keeps the sink marked through the commit.
        let tx = conn.transaction().expect("tx");
        tx.execute("UPDATE retries SET next_attempt_at = 1", [])
            .expect("release");
        waiting.look(&tx, "crm").expect("look");
        waiting.mark("crm");
        tx.commit().expect("commit");
        waiting.committed();
        assert!(waiting.may_hold("crm"));

        // Found without one in a committed transaction: unmarked.
        let tx = conn.transaction().expect("tx");
        waiting.look(&tx, "crm").expect("look");
        tx.commit().expect("commit");
        waiting.committed();
        assert!(!waiting.may_hold("crm"));
        waiting.mark("archive");
        assert!(waiting.may_hold("archive"));
    }
}
