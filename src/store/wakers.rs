//! Per-sink wake-ups: a store signals a sink's dispatcher once deliveries for it are
//! committed, so the dispatcher sleeps until there is work instead of polling.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

#[derive(Default)]
pub(super) struct Wakers(Mutex<HashMap<String, Arc<Notify>>>);

impl Wakers {
    /// The notification `sink`'s dispatcher waits on.
    pub(super) fn get(&self, sink: &str) -> Arc<Notify> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(map.entry(sink.to_owned()).or_default())
    }

    /// Wakes the dispatchers of `sinks`.
    pub(super) fn wake<S: AsRef<str>>(&self, sinks: impl IntoIterator<Item = S>) {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for sink in sinks {
            if let Some(n) = map.get(sink.as_ref()) {
                n.notify_one();
            }
        }
    }

    /// Wakes every dispatcher (what was committed is not known: a lost notification).
    pub(super) fn wake_all(&self) {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for n in map.values() {
            n.notify_one();
        }
    }
}
