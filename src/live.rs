//! The settings a reload (SIGHUP) replaces while requests keep flowing: secrets, routes,
//! the running sinks. Each request takes one snapshot, so it sees one config throughout.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use crate::routing::Router;
use crate::signature::Secret;
use crate::sinks::Sink;

/// One generation of the reloadable settings.
pub struct Live {
    /// Every secret that verifies a signature; several while one is being rotated.
    pub secrets: Vec<Secret>,
    /// Which sinks an event is stored for, decided when it is stored.
    pub router: Router,
    /// The running sinks, for readiness and the backlog gauges.
    pub sinks: Vec<Arc<dyn Sink>>,
    /// The replay guard: how old an event's `timestamp` may be.
    pub max_event_age: Duration,
    /// The replay guard: how far ahead of our clock an event's `timestamp` may be.
    pub max_clock_skew: Duration,
}

/// The current [`Live`], swapped whole by a reload: a request clones the `Arc` once and
/// keeps that snapshot, so the lock is held only for the clone.
#[derive(Clone)]
pub struct LiveHandle(Arc<RwLock<Arc<Live>>>);

impl LiveHandle {
    pub fn new(live: Live) -> LiveHandle {
        LiveHandle(Arc::new(RwLock::new(Arc::new(live))))
    }

    pub fn current(&self) -> Arc<Live> {
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn replace(&self, live: Live) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(live);
    }

    pub fn sink_names(&self) -> Vec<String> {
        self.current()
            .sinks
            .iter()
            .map(|s| s.name().to_owned())
            .collect()
    }
}
