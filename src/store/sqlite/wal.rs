//! Keeping the write-ahead log small: a background checkpointer, and a bound the writer
//! enforces between groups of commits.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

/// How often the background checkpointer copies committed WAL frames into the database.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(10);
/// WAL size the writer keeps the log near (see [`checkpoint_loop`]); SQLite also cuts the
/// file back to it whenever the log restarts.
pub(super) const WAL_TARGET_BYTES: u64 = 4 * 1024 * 1024;
/// Past this the writer truncates the log whatever it costs: disk use stays bounded even
/// if checkpoints cannot keep up.
pub(super) const WAL_LIMIT_BYTES: u64 = 256 * 1024 * 1024;
/// Copies committed WAL frames into the database file, at most every
/// [`CHECKPOINT_INTERVAL`] and only after commits, concurrently with the writer, until
/// the writer thread ends.
///
/// Checkpointing inside a commit (SQLite's default) stalls every request waiting on that
/// commit for as long as the random page writes and the database fsync take: tens of
/// milliseconds on a large store. Here the writer only finishes the job: a checkpoint on
/// another connection cannot restart the log while commits keep arriving, so once the WAL
/// passes [`WAL_TARGET_BYTES`] the writer checkpoints between two groups, which copies only
/// the frames written since this thread's last pass, and the next transaction restarts
/// the log.
pub(super) fn checkpoint_loop(conn: &Connection, commits: &std::sync::mpsc::Receiver<()>) {
    // Ends when the writer, the only sender, has ended.
    while commits.recv().is_ok() {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "background checkpoint failed");
        }
        std::thread::sleep(CHECKPOINT_INTERVAL);
    }
}

/// Keeps the WAL near `target` bytes: past it, a checkpoint lets the log restart; past
/// `limit`, the log is truncated outright.
pub(super) fn limit_wal(conn: &Connection, wal: &Path, target: u64, limit: u64) {
    let size = std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0);
    if size <= target {
        return;
    }
    let mode = if size > limit { "TRUNCATE" } else { "PASSIVE" };
    match conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        r.get::<_, i64>(0)
    }) {
        Ok(0) => tracing::debug!(mode, size, "WAL checkpointed by the writer"),
        Ok(_) => tracing::debug!(mode, "WAL checkpoint postponed: readers are still using it"),
        Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
    }
}
