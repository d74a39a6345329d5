//! The settings a reload (SIGHUP) replaces while requests keep flowing: secrets, routes,
//! the running sinks. Each request takes one snapshot, so it sees one config throughout.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use crate::routing::Router;
use crate::signature::Secret;
use crate::sinks::Sink;

pub struct Live {
    pub secrets: Vec<Secret>,
    pub router: Router,
    pub sinks: Vec<Arc<dyn Sink>>,
    pub max_event_age: Duration,
    pub max_clock_skew: Duration,
}

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
