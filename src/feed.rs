//! What happens, as it happens, for the console's live view: events as they are stored and
//! deliveries as they settle. Names and outcomes only, never a payload or a header.
//!
//! Publishing never waits and costs nothing while nobody watches: the channel is bounded,
//! and a viewer that falls behind skips what it missed instead of holding anyone up.
//! Under load the feed is a sample: at most [`PER_WINDOW`] happenings per [`WINDOW`] are
//! built and sent (as `vector tap` samples), the rest only counted, so watching costs the
//! webhook path and the dispatchers a clock read and two atomics per event, not a copy of
//! its names and a JSON line. Nobody reads thousands of lines a second anyway.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::broadcast;

/// Happenings kept for a viewer that has not read them yet; older ones are skipped.
const CAPACITY: usize = 256;
/// The sampling: at most this many happenings published per window (500 a second).
pub const PER_WINDOW: u32 = 50;
pub const WINDOW: Duration = Duration::from_millis(100);

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
pub struct Feed {
    sender: broadcast::Sender<Happening>,
    budget: Arc<Budget>,
}

/// The current window's count, and what the sampling left out since the start.
struct Budget {
    started: Instant,
    window: AtomicU64,
    used: AtomicU32,
    skipped: AtomicU64,
}

impl Default for Feed {
    fn default() -> Feed {
        Feed {
            sender: broadcast::channel(CAPACITY).0,
            budget: Arc::new(Budget {
                started: Instant::now(),
                window: AtomicU64::new(0),
                used: AtomicU32::new(0),
                skipped: AtomicU64::new(0),
            }),
        }
    }
}

impl Feed {
    /// Whether a happening should be built and published now: somebody watches and this
    /// window's sample is not full. One that is not taken while somebody watches is
    /// counted as skipped.
    pub fn admit(&self) -> bool {
        if !self.watched() {
            return false;
        }
        let window = self.budget.started.elapsed().as_millis() / WINDOW.as_millis();
        self.take(u64::try_from(window).unwrap_or(u64::MAX))
    }

    /// Takes a place in window number `window`'s sample, or counts a skip.
    fn take(&self, window: u64) -> bool {
        let budget = &*self.budget;
        let seen = budget.window.load(Ordering::Relaxed);
        // The first to see a new window starts its count; a publisher racing it counts into
        // the new one, so a window takes its share give or take the racers.
        if window > seen
            && budget
                .window
                .compare_exchange(seen, window, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            budget.used.store(0, Ordering::Relaxed);
        }
        if budget.used.fetch_add(1, Ordering::Relaxed) < PER_WINDOW {
            true
        } else {
            budget.skipped.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Whether anybody watches: when nobody does, callers skip the sampling too.
    pub fn watched(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    /// Publishes without waiting; with nobody watching it is dropped.
    pub fn publish(&self, happening: Happening) {
        // An error only says that nobody watches.
        let _ = self.sender.send(happening);
    }

    /// A new viewer, seeing what happens from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Happening> {
        self.sender.subscribe()
    }

    /// How many happenings the sampling has left out since the feed began: a viewer
    /// reports the growth since it last looked.
    pub fn skipped(&self) -> u64 {
        self.budget.skipped.load(Ordering::Relaxed)
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

    #[test]
    fn nothing_is_admitted_while_nobody_watches_and_a_window_takes_its_share() {
        let feed = Feed::default();
        assert!(!feed.admit());
        assert_eq!(feed.skipped(), 0, "nobody watching is not skipping");
        let _viewer = feed.subscribe();
        let admitted = (0..PER_WINDOW + 30).filter(|_| feed.take(7)).count();
        assert_eq!(admitted, PER_WINDOW as usize);
        assert_eq!(feed.skipped(), 30);
        assert!(feed.take(8), "the next window takes happenings again");
        let late = (0..PER_WINDOW).filter(|_| feed.take(7)).count();
        assert_eq!(
            late,
            PER_WINDOW as usize - 1,
            "a late publisher counts into the new window"
        );
    }

    #[tokio::test]
    async fn a_slow_viewer_skips_what_it_missed_and_publishing_never_waits() {
        let feed = Feed::default();
        feed.publish(stored(0));
        let mut viewer = feed.subscribe();
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
