//! Routing: which sinks receive which event. Decided once, when the event is stored, so
//! the outbox rows record it and a later config change never rewrites history.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::config::{ConfigError, SinkConfig};
use crate::event::Event;

/// The event names a sink receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventSelector {
    All,
    Only(BTreeSet<String>),
}

impl EventSelector {
    pub const ALL: &'static str = "*";

    /// `["*"]` (or a list containing it) selects everything; otherwise the exact names.
    pub fn parse(key: &str, names: &[String]) -> Result<EventSelector, ConfigError> {
        if names.is_empty() {
            return Err(ConfigError::Invalid {
                key: key.to_owned(),
                value: "[]".into(),
                reason: "names no event; use [\"*\"] for all events".into(),
            });
        }
        if names.iter().any(|n| n == Self::ALL) {
            return Ok(EventSelector::All);
        }
        for name in names {
            let plain = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !plain {
                return Err(ConfigError::Invalid {
                    key: key.to_owned(),
                    value: name.clone(),
                    reason: "is not an event name (e.g. \"call_completed\") or \"*\"".into(),
                });
            }
        }
        Ok(EventSelector::Only(names.iter().cloned().collect()))
    }

    pub fn matches(&self, event: &str) -> bool {
        match self {
            EventSelector::All => true,
            EventSelector::Only(names) => names.contains(event),
        }
    }
}

/// The routing table built from the configured sinks.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<(Arc<str>, EventSelector)>,
}

impl Router {
    pub fn new(sinks: &[SinkConfig]) -> Router {
        Router {
            routes: sinks
                .iter()
                .map(|s| (Arc::from(s.name.as_str()), s.events.clone()))
                .collect(),
        }
    }

    /// The names of the sinks that receive `event`, in config order.
    pub fn sinks_for(&self, event: &Event) -> Vec<Arc<str>> {
        self.routes
            .iter()
            .filter(|(_, selector)| selector.matches(&event.name))
            .map(|(name, _)| Arc::clone(name))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_star_selects_every_event() {
        let s = EventSelector::parse("k", &names(&["*"])).expect("valid");
        assert!(s.matches("call_started") && s.matches("something_new"));
    }

    #[test]
    fn a_list_selects_only_the_events_it_names() {
        let s = EventSelector::parse("k", &names(&["call_completed", "all_processing_completed"]))
            .expect("valid");
        assert!(s.matches("call_completed"));
        assert!(!s.matches("call_started"));
    }

    #[test]
    fn an_empty_list_is_a_config_error() {
        assert!(EventSelector::parse("sinks[0].events", &[]).is_err());
    }
}
