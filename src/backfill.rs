//! `deliveries backfill`: gives a sink the stored events its route takes and it never had
//! (a sink added after them, or a filter widened), a batch at a time; run twice, the
//! second run adds nothing.

use serde::Serialize;

use crate::event::Event;
use crate::routing::Route;
use crate::store::operator::BackfillFrom;
use crate::store::{Store, StoreError};

/// Stored events read and routed per batch, and given to the store's writer at once.
const BATCH: usize = 500;

/// What a backfill did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Backfilled {
    /// Stored events in the range that the sink had no delivery of.
    pub examined: usize,
    /// Of those, the ones its route takes.
    pub matched: usize,
    /// Deliveries created (fewer than matched only if another backfill ran meanwhile).
    pub added: usize,
    /// Events whose payload `store.retention` emptied: their route cannot be judged, and
    /// there is nothing to send.
    pub payload_gone: usize,
}

/// Creates a pending delivery to `route`'s sink for each stored event in `from`'s range
/// that the route takes and the sink has none of.
pub async fn backfill(
    store: &Store,
    route: &Route,
    mut from: BackfillFrom,
) -> Result<Backfilled, StoreError> {
    let mut done = Backfilled::default();
    from.limit = BATCH;
    loop {
        let batch = store.backfill_candidates(&route.sink, &from).await?;
        let Some(last) = batch.last() else {
            return Ok(done);
        };
        from.after = last.id;
        let mut ids = Vec::new();
        for stored in batch {
            done.examined += 1;
            if stored.payload.is_empty() {
                done.payload_gone += 1;
                continue;
            }
            // Parsed as at ingest, with the stored name standing for the header's.
            let taken = Event::from_webhook(Some(stored.event.as_bytes()), stored.payload)
                .is_ok_and(|event| route.takes(&event));
            if taken {
                ids.push(stored.id);
            }
        }
        done.matched += ids.len();
        if !ids.is_empty() {
            done.added += store.backfill(&route.sink, ids).await?;
        }
    }
}
