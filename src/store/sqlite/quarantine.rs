//! The quarantine of signed bodies that are not routable events, kept in the writer's
//! transaction, bounded in bytes.

use rusqlite::{OptionalExtension, params};
use sha2::{Digest, Sha256};

use crate::store::{Kept, Quarantined};

/// Inserts a quarantined body unless the same bytes are kept already, then drops the
/// oldest bodies until the quarantine fits `max_bytes`.
pub(super) fn quarantine(
    tx: &rusqlite::Transaction<'_>,
    entry: &Quarantined,
    now: i64,
    max_bytes: u64,
) -> rusqlite::Result<Kept> {
    let hash = Sha256::digest(&entry.body);
    let stored =
        tx.prepare_cached(
            "INSERT INTO quarantine (received_at, reason, event_header, body, body_hash)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (body_hash) DO NOTHING",
        )?
        .execute(params![
            now,
            entry.reason,
            entry.event_header,
            &entry.body[..],
            &hash[..]
        ])? > 0;
    let mut dropped = 0;
    if stored {
        let mut total: i64 = tx
            .prepare_cached("SELECT COALESCE(SUM(length(body)), 0) FROM quarantine")?
            .query_row([], |r| r.get(0))?;
        let limit = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let mut oldest = tx.prepare_cached(
            "DELETE FROM quarantine WHERE id = (SELECT MIN(id) FROM quarantine) RETURNING length(body)",
        )?;
        while total > limit {
            match oldest.query_row([], |r| r.get::<_, i64>(0)).optional()? {
                Some(freed) => {
                    total -= freed;
                    dropped += 1;
                }
                None => break,
            }
        }
    }
    Ok(Kept { stored, dropped })
}
