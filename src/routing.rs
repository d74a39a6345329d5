//! Routing: which sinks receive which event. Decided once, when the event is stored, so
//! the stored deliveries record it and a later config change never rewrites history.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::config::error::{Invalid, suggest};
use crate::event::{Attributes, Event};
use crate::protocol::LIFECYCLE;

/// The event names a sink receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventSelector {
    All,
    Only(BTreeSet<String>),
}

impl EventSelector {
    pub const ALL: &'static str = "*";

    /// `["*"]` (or a list containing it) selects everything; otherwise the exact names,
    /// each one Vyora documents or one of `extra` (names the operator declared, for events
    /// Vyora added since): a name nothing sends would route nothing, silently.
    pub fn parse(names: &[String], extra: &[String]) -> Result<EventSelector, Invalid> {
        if names.is_empty() {
            return Err(Invalid::new(
                "[]",
                "names no event; use [\"*\"] for all events",
            ));
        }
        if names.iter().any(|n| n == Self::ALL) {
            return Ok(EventSelector::All);
        }
        for name in names {
            if !is_event_name(name) {
                return Err(Invalid::new(
                    name,
                    "is not an event name (e.g. \"call_completed\") or \"*\"",
                ));
            }
            let known = || {
                LIFECYCLE
                    .into_iter()
                    .chain(extra.iter().map(String::as_str))
            };
            if !known().any(|k| k == name) {
                let near = suggest(name, known().chain([Self::ALL]))
                    .map(|near| format!(" (did you mean {near:?}?)"))
                    .unwrap_or_default();
                return Err(Invalid::new(
                    name,
                    format!(
                        "is not an event Vyora sends{near}; the events are {}, or \"*\" for all; \
                         to receive an event Vyora added since, list its name in \
                         webhook.extra_events",
                        LIFECYCLE.join(", ")
                    ),
                ));
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

/// Whether `name` can be an event's name: letters, digits, `_`, `-` and `.`.
pub fn is_event_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// A payload attribute a filter can test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attribute {
    AgentId,
    AgentName,
    CampaignId,
    Direction,
    Classification,
}

impl Attribute {
    const KEYS: [(&'static str, Attribute); 5] = [
        ("agent_id", Attribute::AgentId),
        ("agent_name", Attribute::AgentName),
        ("campaign_id", Attribute::CampaignId),
        ("direction", Attribute::Direction),
        ("classification", Attribute::Classification),
    ];

    fn of(self, a: &Attributes) -> Option<&str> {
        match self {
            Attribute::AgentId => a.agent_id.as_deref(),
            Attribute::AgentName => a.agent_name.as_deref(),
            Attribute::CampaignId => a.campaign_id.as_deref(),
            Attribute::Direction => a.direction.as_deref(),
            Attribute::Classification => a.classification.as_deref(),
        }
    }
}

/// Conditions on what an event says: every key must match, any of a key's values will do.
/// An event that lacks a filtered attribute does not match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter(Vec<(Attribute, BTreeSet<String>)>);

impl Filter {
    /// A refusal names the filter's key that is wrong, below the filter's own.
    pub fn parse(raw: &BTreeMap<String, Vec<String>>) -> Result<Filter, Invalid> {
        let mut conditions = Vec::with_capacity(raw.len());
        for (name, values) in raw {
            let attribute = Attribute::KEYS
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, a)| *a)
                .ok_or_else(|| {
                    Invalid::new(
                        name,
                        format!(
                            "is not a filterable field; use {}",
                            Attribute::KEYS.map(|(k, _)| k).join(", ")
                        ),
                    )
                    .under(name)
                })?;
            if values.is_empty() {
                return Err(
                    Invalid::new("[]", "lists no value, so nothing could match").under(name)
                );
            }
            conditions.push((attribute, values.iter().cloned().collect()));
        }
        Ok(Filter(conditions))
    }

    pub fn matches(&self, attributes: &Attributes) -> bool {
        self.0
            .iter()
            .all(|(attribute, values)| attribute.of(attributes).is_some_and(|v| values.contains(v)))
    }
}

/// What sends an event to one sink: its name, and the events and conditions it takes.
#[derive(Debug, Clone)]
pub struct Route {
    pub sink: Arc<str>,
    pub events: EventSelector,
    pub filter: Filter,
}

impl Route {
    /// Whether this route sends `event` to its sink.
    pub fn takes(&self, event: &Event) -> bool {
        self.events.matches(&event.name) && self.filter.matches(&event.attributes)
    }
}

/// The routing table built from the configured sinks.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// The table from each sink's route, in config order: `Router::new(&config.sinks)`.
    pub fn new<R: Into<Route>>(routes: impl IntoIterator<Item = R>) -> Router {
        Router {
            routes: routes.into_iter().map(Into::into).collect(),
        }
    }

    /// The route of the sink named `sink`, if it is configured.
    pub fn route(&self, sink: &str) -> Option<&Route> {
        self.routes.iter().find(|r| &*r.sink == sink)
    }

    /// The names of the sinks that receive `event`, in config order.
    pub fn sinks_for(&self, event: &Event) -> Vec<Arc<str>> {
        self.routes
            .iter()
            .filter(|r| r.takes(event))
            .map(|r| Arc::clone(&r.sink))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::error::{ConfigError, InvalidAt};

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_star_selects_every_event() {
        let s = EventSelector::parse(&names(&["*"]), &[]).expect("valid");
        assert!(s.matches("call_started") && s.matches("something_new"));
    }

    #[test]
    fn a_list_selects_only_the_events_it_names() {
        let s = EventSelector::parse(&names(&["call_completed", "all_processing_completed"]), &[])
            .expect("valid");
        assert!(s.matches("call_completed"));
        assert!(!s.matches("call_started"));
    }

    #[test]
    fn a_misspelt_event_is_refused_with_the_name_it_resembles() {
        let e = EventSelector::parse(&names(&["call_started", "call_complete"]), &[])
            .expect_err("not an event Vyora sends");
        assert_eq!(e.value, "call_complete");
        assert!(
            e.reason.contains("did you mean \"call_completed\"?")
                && e.reason.contains("webhook.extra_events"),
            "{e}"
        );
        let e = EventSelector::parse(&names(&["transfer"]), &[]).expect_err("unknown");
        assert!(!e.reason.contains("did you mean"), "nothing near: {e}");
    }

    #[test]
    fn an_event_name_declared_as_extra_is_accepted_and_suggested() {
        let extra = names(&["call_transferred"]);
        let s = EventSelector::parse(&names(&["call_transferred"]), &extra).expect("declared");
        assert!(s.matches("call_transferred") && !s.matches("call_started"));
        let e = EventSelector::parse(&names(&["call_transfered"]), &extra).expect_err("typo");
        assert!(e.reason.contains("\"call_transferred\""), "{e}");
    }

    /// Named as config validation names it.
    fn filter(pairs: &[(&str, &[&str])]) -> Result<Filter, ConfigError> {
        let raw = pairs
            .iter()
            .map(|(k, vs)| ((*k).to_owned(), names(vs)))
            .collect();
        Filter::parse(&raw).at("sinks[0].filter")
    }

    #[test]
    fn a_filter_needs_every_key_to_match_and_any_of_its_values() {
        let f = filter(&[
            ("agent_name", &["Home Loan Agent", "Admission Enquiry"]),
            ("classification", &["Interested"]),
        ])
        .expect("valid");
        let mut a = Attributes {
            agent_name: Some("Admission Enquiry".into()),
            classification: Some("Interested".into()),
            ..Attributes::default()
        };
        assert!(f.matches(&a));
        a.classification = Some("Not Interested".into());
        assert!(!f.matches(&a));
        a.classification = None;
        assert!(!f.matches(&a), "a missing attribute does not match");
        assert!(
            Filter::default().matches(&a),
            "no filter matches everything"
        );
    }

    #[test]
    fn a_filter_on_an_unknown_key_is_a_config_error_naming_it() {
        let err = filter(&[("agent", &["x"])]).expect_err("invalid");
        assert!(err.to_string().contains("sinks[0].filter.agent"), "{err}");
    }

    #[test]
    fn an_empty_list_is_a_config_error() {
        assert!(EventSelector::parse(&[], &[]).is_err());
    }
}
