//! The last day, minute by minute, of a few counts (each sink's delivered, retried and
//! dead; webhooks by outcome), kept in memory for the console's plots. Fed once a minute
//! with running totals; each series holds at most a day of minutes, and a series no
//! longer fed (a sink removed) is dropped. A leaf: it knows nothing of the crate.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, PoisonError};

/// Minutes kept: a day.
pub const MINUTES: usize = 24 * 60;
/// The outcomes of a sink's attempts that are kept.
pub const SINK_OUTCOMES: [&str; 3] = ["delivered", "retried", "dead"];

/// The series of a sink's attempts with `outcome`.
pub fn sink(sink: &str, outcome: &str) -> String {
    format!("sink/{sink}/{outcome}")
}

/// What the webhooks kept are counted by: `refused` is every other outcome together.
pub const WEBHOOK_KINDS: [&str; 3] = ["accepted", "duplicate", "refused"];

/// The series of webhooks of a kind of [`WEBHOOK_KINDS`].
pub fn webhooks(outcome: &str) -> String {
    format!("webhooks/{outcome}")
}

/// Per-minute counts by series name.
#[derive(Default)]
pub struct History(Mutex<BTreeMap<String, Series>>);

#[derive(Default)]
struct Series {
    /// The total at the last sample: the next minute's count is the growth from it.
    total: u64,
    /// The newest minute last.
    minutes: VecDeque<u64>,
}

impl History {
    /// Records one minute: each series' running total now. A series first seen starts
    /// from its total (its past is unknown, not a spike); a series not named is dropped.
    pub fn sample(&self, totals: impl IntoIterator<Item = (String, u64)>) {
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut kept = BTreeMap::new();
        for (name, total) in totals {
            let mut series = all.remove(&name).unwrap_or(Series {
                total,
                minutes: VecDeque::with_capacity(MINUTES),
            });
            if series.minutes.len() == MINUTES {
                series.minutes.pop_front();
            }
            // A counter that went back (a process restart behind a shared total) counts 0.
            series.minutes.push_back(total.saturating_sub(series.total));
            series.total = total;
            kept.insert(name, series);
        }
        *all = kept;
    }

    /// The last `minutes` counts of `name`, oldest first, padded with zeros in front when
    /// the history is younger.
    pub fn last(&self, name: &str, minutes: usize) -> Vec<u64> {
        let all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = vec![0; minutes];
        if let Some(series) = all.get(name) {
            for (slot, count) in out.iter_mut().rev().zip(series.minutes.iter().rev()) {
                *slot = *count;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_minute_counts_the_growth_of_its_total_and_a_day_is_kept() {
        let h = History::default();
        h.sample([("a".to_owned(), 100)]);
        h.sample([("a".to_owned(), 103)]);
        h.sample([("a".to_owned(), 103)]);
        h.sample([("a".to_owned(), 110)]);
        assert_eq!(h.last("a", 5), [0, 0, 3, 0, 7]);
        assert_eq!(h.last("nothing", 2), [0, 0]);
        for total in 0..(MINUTES as u64 + 10) {
            h.sample([("a".to_owned(), 110 + total)]);
        }
        assert_eq!(h.last("a", MINUTES).len(), MINUTES);
        assert!(h.last("a", MINUTES).iter().all(|c| *c == 1));
    }

    #[test]
    fn a_series_no_longer_sampled_is_dropped() {
        let h = History::default();
        h.sample([("a".to_owned(), 1), ("b".to_owned(), 1)]);
        h.sample([("a".to_owned(), 5), ("b".to_owned(), 2)]);
        h.sample([("a".to_owned(), 6)]);
        assert_eq!(h.last("b", 2), [0, 0]);
        assert_eq!(h.last("a", 2), [4, 1]);
    }
}
