//! What happens, as it happens, for the console's live view: events as they are stored and
//! deliveries as they settle. Names and outcomes only, never a payload or a header.
//!
//! Publishing never waits and costs nothing while nobody watches: the channel is bounded,
//! and a viewer that falls behind skips what it missed instead of holding anyone up.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::broadcast;

/// Happenings kept for a viewer that has not read them yet; older ones are skipped.
const CAPACITY: usize = 256;

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Happening {
    pub at: SystemTime,
    pub call_id: Option<String>,
    pub event: String,
    pub what: What,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    /// The event was stored, for these sinks.
    Stored { sinks: Vec<Arc<str>> },
    /// A delivery to `sink` settled: `delivered`, `retried`, `postponed` or `dead`.
    Settled { sink: String, outcome: &'static str },
}

/// The sending side, cloned into the webhook path and every dispatcher.
#[derive(Clone)]
pub struct Feed(broadcast::Sender<Happening>);

impl Default for Feed {
    fn default() -> Feed {
        Feed(broadcast::channel(CAPACITY).0)
    }
}

impl Feed {
    /// Whether anybody watches: when nobody does, callers skip building happenings.
    pub fn watched(&self) -> bool {
        self.0.receiver_count() > 0
    }

    /// Publishes without waiting; with nobody watching it is dropped.
    pub fn publish(&self, happening: Happening) {
        // An error only says that nobody watches.
        let _ = self.0.send(happening);
    }

    /// A new viewer, seeing what happens from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Happening> {
        self.0.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(n: usize) -> Happening {
        Happening {
            at: SystemTime::UNIX_EPOCH,
            call_id: Some(format!("c{n}")),
            event: "call_completed".into(),
            what: What::Stored {
                sinks: vec![Arc::from("archive")],
            },
        }
    }

    #[tokio::test]
    async fn a_slow_viewer_skips_what_it_missed_and_publishing_never_waits() {
        let feed = Feed::default();
        assert!(!feed.watched());
        feed.publish(stored(0));
        let mut viewer = feed.subscribe();
        assert!(feed.watched());
        for n in 0..CAPACITY + 10 {
            feed.publish(stored(n));
        }
        assert!(matches!(
            viewer.recv().await,
            Err(broadcast::error::RecvError::Lagged(10))
        ));
        assert_eq!(viewer.recv().await.ok(), Some(stored(10)));
    }
}
