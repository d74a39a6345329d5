//! Dedup keys as the store indexes them: 16 bytes per key, a call's events sharing a
//! prefix, and the SQL that finds events by a range of them.

use sha2::{Digest, Sha256};

/// The 16 bytes that stand for a dedup key in the index: 8 of the SHA-256 of its call part
/// (before the last `:`), then 8 of its event part. A fixed, short entry instead of the
/// text; and a call's events share a prefix, so they are found without an index of their
/// own. Two keys may share the 16 bytes: the stored text decides.
pub(super) fn key(dedup_key: &str) -> [u8; 16] {
    let (call, event) = dedup_key.rsplit_once(':').unwrap_or((dedup_key, ""));
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&Sha256::digest(call.as_bytes())[..8]);
    key[8..].copy_from_slice(&Sha256::digest(event.as_bytes())[..8]);
    key
}

/// The range of keys of the events of call `call_id`.
pub(super) fn call_range(call_id: &str) -> ([u8; 16], [u8; 16]) {
    let mut low = [0u8; 16];
    low[..8].copy_from_slice(&Sha256::digest(call_id.as_bytes())[..8]);
    let mut high = low;
    high[8..].fill(0xff);
    (low, high)
}

/// SQL true for the events (`e`) whose key lies between the parameters `low` and `high`:
/// those in the dedup index's runs, and those of the log after the last run (whose keys
/// only the writer's memory holds). `CROSS JOIN` keeps SQLite reading the few runs first
/// and searching each, rather than scanning every key.
pub(super) fn keyed(low: &str, high: &str) -> String {
    format!(
        "e.id IN (SELECT d.id FROM dedup_runs r CROSS JOIN dedup d ON d.run = r.last
                      AND d.key BETWEEN {low} AND {high}
                  UNION ALL
                  SELECT t.id FROM events t
                  WHERE t.id > (SELECT COALESCE(MAX(last), 0) FROM dedup_runs)
                    AND t.key BETWEEN {low} AND {high})"
    )
}
