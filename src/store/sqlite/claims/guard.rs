//! The guard over a write that carries settled deliveries' rows: committed, the cursor is
//! where the write put it; dropped unconfirmed, the failed first attempts go out again
//! and its releases wait for the next write.

use super::Claims;

/// See [`Claims::writing`].
pub(in crate::store::sqlite) struct Writing<'a> {
    claims: &'a mut Claims,
    /// First attempts whose rows (retrying or waiting) the write carries.
    failed: Vec<i64>,
    /// Calls whose release the write carries.
    releases: Vec<String>,
    cursor: Option<i64>,
    committed: bool,
}

impl<'a> Writing<'a> {
    pub(super) fn new(
        claims: &'a mut Claims,
        failed: Vec<i64>,
        releases: Vec<String>,
        cursor: Option<i64>,
    ) -> Self {
        Writing {
            claims,
            failed,
            releases,
            cursor,
            committed: false,
        }
    }

    /// The write is committed: the stored cursor is where it put it.
    pub(in crate::store::sqlite) fn committed(mut self) {
        self.committed = true;
        if let Some(position) = self.cursor {
            self.claims.moved(position);
        }
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // Not written, or not known to be: handed out again by the next scan, or, if the
        // write did land, found with its row.
        for event_id in &self.failed {
            self.claims.unwritten(*event_id);
        }
        self.claims
            .unreleased
            .extend(std::mem::take(&mut self.releases));
    }
}
