//! A SQLite store read out for `store migrate` (see `store::export`): events with their
//! payloads decompressed and each sink's delivery as the `outbox` view shows it, with its
//! kept attempts.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, params};

use super::codec::decompress;
use super::millis::from_millis;
use crate::store::export::{
    Export, ExportedAttempt, ExportedDelivery, ExportedEvent, ExportedPoll, ExportedQuarantined,
};
use crate::store::{Result, StoreError};

pub(in crate::store) struct SqliteExport {
    conn: Connection,
    /// The last event returned.
    after: i64,
}

impl SqliteExport {
    /// Opens the store at `path` read-only; it must be of this build's schema version.
    pub(in crate::store) fn open(path: &Path) -> Result<SqliteExport> {
        super::schema::check_version(path)?;
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        Ok(SqliteExport { conn, after: 0 })
    }

    fn deliveries(&self, event_id: i64) -> Result<Vec<ExportedDelivery>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT sink, status, attempts, next_attempt_at, last_error, updated_at
             FROM outbox WHERE event_id = ?1 ORDER BY sink",
        )?;
        let rows = stmt.query_map(params![event_id], |r| {
            Ok(ExportedDelivery {
                sink: r.get(0)?,
                status: r.get(1)?,
                attempts: r.get(2)?,
                next_attempt_at: from_millis(r.get(3)?),
                last_error: r.get(4)?,
                updated_at: from_millis(r.get(5)?),
                history: Vec::new(),
            })
        })?;
        let mut deliveries = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        for delivery in &mut deliveries {
            delivery.history = self.history(event_id, &delivery.sink)?;
        }
        Ok(deliveries)
    }

    fn history(&self, event_id: i64, sink: &str) -> Result<Vec<ExportedAttempt>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT number, started_at, duration_ms, outcome, code, error, response
             FROM attempts WHERE event_id = ?1 AND sink = ?2 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![event_id, sink], |r| {
            Ok(ExportedAttempt {
                number: r.get(0)?,
                started_at: from_millis(r.get(1)?),
                duration_ms: r.get(2)?,
                outcome: r.get(3)?,
                code: r.get(4)?,
                error: r.get(5)?,
                response: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

impl Export for SqliteExport {
    fn next_events(&mut self, limit: usize) -> Result<Vec<ExportedEvent>> {
        let rows: Vec<(i64, ExportedEvent, i64)> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, dedup_key, event, call_id, source, received_at, codec, payload
                 FROM events WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            stmt.query_map(params![self.after, limit], |r| {
                Ok((
                    r.get(0)?,
                    ExportedEvent {
                        dedup_key: r.get(1)?,
                        event: r.get(2)?,
                        call_id: r.get(3)?,
                        source: r.get(4)?,
                        received_at: from_millis(r.get(5)?),
                        payload: r.get(7)?,
                        deliveries: Vec::new(),
                    },
                    r.get(6)?,
                ))
            })?
            .collect::<rusqlite::Result<_>>()?
        };
        let mut out = Vec::with_capacity(rows.len());
        for (id, mut event, codec) in rows {
            // Handed over as signed, whatever this store compressed.
            event.payload = decompress(codec, event.payload)
                .map_err(|e| {
                    StoreError::Setup(format!("the stored payload of event {id} is damaged: {e}"))
                })?
                .to_vec();
            event.deliveries = self.deliveries(id)?;
            self.after = id;
            out.push(event);
        }
        Ok(out)
    }

    fn polls(&mut self) -> Result<Vec<ExportedPoll>> {
        let mut stmt = self.conn.prepare(
            "SELECT call_id, status, first_seen_at, last_event_at, next_poll_at, polls,
                    last_result, updated_at FROM polls",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ExportedPoll {
                call_id: r.get(0)?,
                status: r.get(1)?,
                first_seen_at: from_millis(r.get(2)?),
                last_event_at: from_millis(r.get(3)?),
                next_poll_at: from_millis(r.get(4)?),
                polls: r.get(5)?,
                last_result: r.get(6)?,
                updated_at: from_millis(r.get(7)?),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn quarantine(&mut self) -> Result<Vec<ExportedQuarantined>> {
        let mut stmt = self.conn.prepare(
            "SELECT received_at, reason, event_header, body FROM quarantine ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ExportedQuarantined {
                received_at: from_millis(r.get(0)?),
                reason: r.get(1)?,
                event_header: r.get(2)?,
                body: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
