//! Each sink's queue on SQLite: deliveries claimed from the log after the sink's cursor
//! and from its retry rows, what is in hand kept in this process's claims, and outcomes
//! settled through the writer, each batch's rows and cursor move in one transaction.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot};

use super::claims::{Claimed, Claims, Outcome};
use super::codec::decompress;
use super::reader::{self, Readers};
use super::writer::{Op, submit};
use crate::event::{Delivery, DeliveryId};
use crate::store::{Attempt, Settlement, StoreError};

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The sinks' queues of one store.
pub(super) struct Queues {
    /// The writer's queue.
    tx: mpsc::Sender<Op>,
    readers: Arc<Readers>,
    /// What each sink has in hand, and where its cursor is (the writer reads it too, as
    /// it writes held rows and cursor moves).
    claims: Arc<Claims>,
}

impl Queues {
    pub(super) fn new(tx: mpsc::Sender<Op>, readers: Arc<Readers>, claims: Arc<Claims>) -> Queues {
        Queues {
            tx,
            readers,
            claims,
        }
    }

    /// See [`crate::store::SinkQueue::settle`].
    pub(super) async fn settle(
        &self,
        settlements: Vec<Settlement>,
        attempts: Vec<Attempt>,
    ) -> Result<()> {
        let mut outcome = self.claims.settle(&settlements);
        outcome.attempts = attempts
            .into_iter()
            .filter_map(|a| Some((self.claims.sink_of(a.id)?, a)))
            .collect();
        if outcome.changes.is_empty() && outcome.cursors.is_empty() && outcome.attempts.is_empty() {
            return Ok(());
        }
        self.write_settled(outcome).await
    }

    /// See [`crate::store::SinkQueue::release`].
    pub(super) fn release(&self, ids: &[DeliveryId]) {
        self.claims.release(ids);
    }

    /// See [`crate::store::SinkQueue::next_due`]: a retry row's time, or the end of the
    /// sink's pause.
    pub(super) async fn next_due(&self, sink: &str) -> Result<Option<SystemTime>> {
        let name = sink.to_owned();
        let retry = self
            .readers
            .with(move |conn| reader::next_due(conn, &name))
            .await?;
        Ok([retry, self.claims.paused_until(sink)]
            .into_iter()
            .flatten()
            .min())
    }

    /// Writes what settling (or a claim) came to, with the cursor moves its rows allow,
    /// in one transaction, under [`Claims::writing`]'s guard: unless the write is
    /// confirmed (it failed, or this future was dropped while it waited), the failed
    /// first attempts are handed back to go out again.
    async fn write_settled(&self, outcome: Outcome) -> Result<()> {
        let writing = self.claims.writing(&outcome);
        let (reply, rx) = oneshot::channel();
        let written = submit(&self.tx, Op::Settle { outcome, reply }, rx).await?;
        writing.committed(&written);
        Ok(())
    }

    /// See [`crate::store::SinkQueue::claim`].
    pub(super) async fn claim(
        &self,
        sink: &str,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Delivery>> {
        let Some(mut snapshot) = self.claims.snapshot(sink) else {
            return Ok(Vec::new());
        };
        let position = match snapshot.position {
            Some(position) => position,
            None => {
                let name = sink.to_owned();
                let position = self
                    .readers
                    .with(move |conn| reader::position(conn, &name))
                    .await?;
                self.claims.set_position(sink, position);
                snapshot.position = Some(position);
                position
            }
        };
        let name = sink.to_owned();
        let skipped = snapshot.skip.clone();
        let found = self
            .readers
            .with(move |conn| reader::scan(conn, &name, position, limit, max_bytes, &snapshot))
            .await?;
        let in_hand = |rows: &[reader::Row]| -> Vec<(i64, Option<String>)> {
            rows.iter().map(|r| (r.id, r.call_id.clone())).collect()
        };
        let (fresh, retries) = (in_hand(&found.fresh), in_hand(&found.retries));
        let claimed = Claimed {
            fresh: &fresh,
            retries: &retries,
            held: found.held,
            examined_to: found.examined_to,
        };
        let (claim, moved) = self.claims.record(sink, claimed, &skipped);
        if let Some(outcome) = moved
            && let Err(e) = self.write_settled(outcome).await
        {
            // Held back events not written are handed out again by a later claim.
            tracing::warn!(sink, error = %e, "cannot record held back events or move the cursor");
        }
        let retries = found.retries.into_iter().map(|r| (r, true));
        let fresh = found.fresh.into_iter().map(|r| (r, false));
        let mut deliveries = Vec::with_capacity(fresh.len() + retries.len());
        let mut damaged = Vec::new();
        for (r, retry) in retries.chain(fresh) {
            let id = Claims::id(claim, r.id, retry);
            match decompress(r.codec, r.payload) {
                Ok(payload) => deliveries.push(Delivery {
                    id,
                    attempts: r.attempts,
                    event: r.event,
                    call_id: r.call_id,
                    dedup_key: r.dedup_key,
                    source: r.source,
                    received_at: r.received_at,
                    payload,
                }),
                // No attempt can deliver it, and failing the claim would stop the sink's
                // other events behind it: it goes to the dead letters, saying why.
                Err(e) => {
                    tracing::error!(sink, event_id = r.id, error = %e, "a stored payload is damaged; its delivery is dead");
                    damaged.push(Settlement::Dead {
                        id,
                        error: format!("the stored payload is damaged: {e}"),
                    });
                }
            }
        }
        if !damaged.is_empty()
            && let Err(e) = self.settle(damaged, Vec::new()).await
        {
            // Unwritten, the damaged events are handed out again, and tried again, later.
            tracing::warn!(sink, error = %e, "cannot record damaged payloads");
        }
        Ok(deliveries)
    }
}
