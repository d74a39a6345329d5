//! Each sink's queue on SQLite: deliveries claimed from the log after the sink's cursor
//! and from its retry rows, what is in hand kept in the queue's own claims, and outcomes
//! written through the writer, each batch's rows and cursor move in one transaction.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tokio::sync::{Notify, mpsc, oneshot};

use super::claims::{Claimed, Claims, Outcome};
use super::codec::decompress;
use super::millis::to_millis;
use super::reader::{self, Readers};
use super::writer::{Op, submit};
use crate::event::{Delivery, DeliveryId};
use crate::store::operator::SinkPause;
use crate::store::wakers::Wakers;
use crate::store::{Attempt, BoxFuture, Result, Settlement, SinkQueue};

/// What the sinks' queues of one store share.
pub(super) struct Shared {
    /// The writer's queue.
    pub(super) tx: mpsc::Sender<Op>,
    pub(super) readers: Arc<Readers>,
    pub(super) wakers: Arc<Wakers>,
    /// Each sink's claims while no queue has them: `None` while one does. A queue takes
    /// its sink's when it first needs them and puts them back when dropped, so the next
    /// queue of the sink (after a reload) goes on from there.
    parked: Mutex<HashMap<String, Option<Claims>>>,
}

impl Shared {
    pub(super) fn new(tx: mpsc::Sender<Op>, readers: Arc<Readers>, wakers: Arc<Wakers>) -> Shared {
        Shared {
            tx,
            readers,
            wakers,
            parked: Mutex::default(),
        }
    }
}

/// One sink's queue; see [`SinkQueue`].
pub(super) struct Queue {
    shared: Arc<Shared>,
    sink: String,
    /// This sink's claims, once taken from [`Shared::parked`].
    claims: Option<Claims>,
}

impl Queue {
    pub(super) fn new(shared: Arc<Shared>, sink: &str) -> Queue {
        Queue {
            shared,
            sink: sink.to_owned(),
            claims: None,
        }
    }

    /// The sink's claims, unless another queue of the sink still has them.
    fn claims(&mut self) -> Option<&mut Claims> {
        if self.claims.is_none() {
            let mut parked = self
                .shared
                .parked
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.claims = match parked.get_mut(&self.sink) {
                Some(slot) => slot.take(),
                None => {
                    parked.insert(self.sink.clone(), None);
                    Some(Claims::default())
                }
            };
        }
        self.claims.as_mut()
    }

    /// Writes what settling (or a claim) came to, with the cursor move its rows allow, in
    /// one transaction, under [`Claims::writing`]'s guard: unless the write is confirmed
    /// (it failed, or this future was dropped while it waited), the failed first attempts
    /// are handed back to go out again.
    async fn write(&mut self, outcome: Outcome) -> Result<()> {
        let Some(claims) = self.claims.as_mut() else {
            return Ok(());
        };
        let writing = claims.writing(&outcome);
        let (reply, rx) = oneshot::channel();
        submit(&self.shared.tx, Op::Settle { outcome, reply }, rx).await?;
        writing.committed();
        Ok(())
    }

    async fn claim_batch(&mut self, limit: usize, max_bytes: usize) -> Result<Vec<Delivery>> {
        let Some(mut snapshot) = self.claims().and_then(Claims::snapshot) else {
            return Ok(Vec::new());
        };
        let sink = self.sink.clone();
        let position = match snapshot.position {
            Some(position) => position,
            None => {
                let name = sink.clone();
                let position = self
                    .shared
                    .readers
                    .with(move |conn| reader::position(conn, &name))
                    .await?;
                if let Some(claims) = self.claims() {
                    claims.set_position(position);
                }
                snapshot.position = Some(position);
                position
            }
        };
        let name = sink.clone();
        let found = self
            .shared
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
        let Some(claims) = self.claims() else {
            return Ok(Vec::new());
        };
        let moved = claims.record(&sink, claimed);
        if !moved.is_empty()
            && let Err(e) = self.write(moved).await
        {
            // Held back events not written are handed out again by a later claim.
            tracing::warn!(sink, error = %e, "cannot record held back events or move the cursor");
        }
        let retries = found.retries.into_iter().map(|r| (r, true));
        let fresh = found.fresh.into_iter().map(|r| (r, false));
        let mut deliveries = Vec::with_capacity(fresh.len() + retries.len());
        let mut damaged = Vec::new();
        for (r, retry) in retries.chain(fresh) {
            let id = Claims::id(r.id, retry);
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
            && let Err(e) = self.settle_all(damaged, Vec::new()).await
        {
            // Unwritten, the damaged events are handed out again, and tried again, later.
            tracing::warn!(sink, error = %e, "cannot record damaged payloads");
        }
        Ok(deliveries)
    }

    async fn settle_all(
        &mut self,
        settlements: Vec<Settlement>,
        attempts: Vec<Attempt>,
    ) -> Result<()> {
        let sink = self.sink.clone();
        let Some(claims) = self.claims() else {
            return Ok(());
        };
        let mut outcome = claims.settle(&sink, &settlements);
        outcome.attempts = attempts;
        if outcome.is_empty() {
            return Ok(());
        }
        self.write(outcome).await
    }
}

impl Drop for Queue {
    /// Parks the claims for the sink's next queue. What is still in hand goes out again:
    /// a dispatcher releases what it abandons, but one that failed may not have.
    fn drop(&mut self) {
        if let Some(mut claims) = self.claims.take() {
            claims.release_all();
            let mut parked = self
                .shared
                .parked
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            parked.insert(self.sink.clone(), Some(claims));
        }
    }
}

impl SinkQueue for Queue {
    fn claim(&mut self, limit: usize, max_bytes: usize) -> BoxFuture<'_, Result<Vec<Delivery>>> {
        Box::pin(self.claim_batch(limit, max_bytes))
    }

    fn settle(
        &mut self,
        settlements: Vec<Settlement>,
        attempts: Vec<Attempt>,
    ) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.settle_all(settlements, attempts))
    }

    fn release(&mut self, ids: Vec<DeliveryId>) {
        if let Some(claims) = self.claims() {
            claims.release(&ids);
        }
    }

    /// A retry row's time, or the end of the sink's pause.
    fn next_due(&mut self) -> BoxFuture<'_, Result<Option<SystemTime>>> {
        Box::pin(async move {
            let name = self.sink.clone();
            let retry = self
                .shared
                .readers
                .with(move |conn| reader::next_due(conn, &name))
                .await?;
            let paused = self.claims().and_then(|c| c.paused_until());
            Ok([retry, paused].into_iter().flatten().min())
        })
    }

    fn waker(&self) -> Arc<Notify> {
        self.shared.wakers.get(&self.sink)
    }

    fn record_pause<'a>(&'a mut self, pause: Option<&'a SinkPause>) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            let op = Op::Pause {
                sink: self.sink.clone(),
                pause: pause.map(|p| (to_millis(p.until), p.reason.clone())),
                reply,
            };
            submit(&self.shared.tx, op, rx).await
        })
    }
}
