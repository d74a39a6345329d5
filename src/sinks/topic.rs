//! Topic templates shared by the sinks that address a destination by words: the AMQP
//! routing key, the Redis stream key and the NATS subject. A template is checked when the
//! config is read and filled in for each delivery so that a value can never change its
//! shape: a value cannot add words, nor match as a wildcard.

use crate::config::error::Invalid;
use crate::event::Delivery;

/// A topic template: text with `{event}`, `{call_id}`, `{agent_id}`, `{source}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic(Vec<Part>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Event,
    CallId,
    AgentId,
    Source,
}

impl Topic {
    /// Parses a template; the error names what is wrong with it.
    pub fn parse(template: &str) -> Result<Topic, Invalid> {
        let refused = |reason: String| Invalid::new(template, reason);
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| refused("has a `{` without its `}`".into()))?;
            let part = match &rest[open + 1..open + close] {
                "event" => Part::Event,
                "call_id" => Part::CallId,
                "agent_id" => Part::AgentId,
                "source" => Part::Source,
                other => {
                    return Err(refused(format!(
                        "has an unknown placeholder {{{other}}}; use {{event}}, {{call_id}}, {{agent_id}} or {{source}}"
                    )));
                }
            };
            parts.push(part);
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(refused("has a `}` without its `{`".into()));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Topic(parts))
    }

    /// The AMQP routing key (or Redis stream key) for one delivery. A placeholder's value
    /// is confined to its own words: `.` (the topic word separator) and the wildcards `*`
    /// and `#` in a value become `_`, so a call id like `a.b` or `#` can neither shift a
    /// binding's words nor match as a wildcard.
    pub fn render(&self, d: &Delivery) -> String {
        self.fill(d, |c| matches!(c, '.' | '*' | '#'), "")
    }

    /// The NATS subject for one delivery, by the same rule with NATS's separator and
    /// wildcards: `.`, `*`, `>` and whitespace in a value become `_`, and an empty value
    /// is `_` (a subject may not have an empty token).
    pub fn render_subject(&self, d: &Delivery) -> String {
        self.fill(
            d,
            |c| matches!(c, '.' | '*' | '>') || c.is_whitespace(),
            "_",
        )
    }

    /// The NATS subject filter that captures every subject [`Topic::render_subject`] can
    /// give: each `.`-separated token holding a placeholder becomes `*`.
    pub fn subject_filter(&self) -> String {
        let mut filter = String::new();
        let mut token_has_value = false;
        let mut token = String::new();
        let finish = |filter: &mut String, token: &mut String, has_value: bool| {
            filter.push_str(if has_value { "*" } else { token });
            token.clear();
        };
        for part in &self.0 {
            match part {
                Part::Text(t) => {
                    let mut words = t.split('.');
                    if let Some(first) = words.next() {
                        token.push_str(first);
                    }
                    for word in words {
                        finish(&mut filter, &mut token, token_has_value);
                        filter.push('.');
                        token_has_value = false;
                        token.push_str(word);
                    }
                }
                _ => token_has_value = true,
            }
        }
        finish(&mut filter, &mut token, token_has_value);
        filter
    }

    fn fill(&self, d: &Delivery, replaced: impl Fn(char) -> bool, empty: &str) -> String {
        let push = |key: &mut String, value: &str| {
            if value.is_empty() {
                key.push_str(empty);
            }
            key.extend(value.chars().map(|c| if replaced(c) { '_' } else { c }));
        };
        let mut key = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => key.push_str(t),
                Part::Event => push(&mut key, &d.event),
                Part::CallId => push(&mut key, d.call_id.as_deref().unwrap_or("none")),
                Part::AgentId => push(
                    &mut key,
                    &agent_id(&d.payload).unwrap_or_else(|| "none".into()),
                ),
                Part::Source => push(&mut key, d.source.as_str()),
            }
        }
        key
    }
}

/// The payload's `agent_id`, read only when a routing key asks for it.
fn agent_id(payload: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Agent {
        agent_id: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Agent>(payload).ok()?.agent_id? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::UNIX_EPOCH;

    use bytes::Bytes;

    use super::*;
    use crate::event::Source;

    /// A delivery with every value a routing key can use.
    pub(crate) fn delivery() -> Delivery {
        Delivery {
            id: crate::event::DeliveryId::row(1),
            attempts: 0,
            event: "call_completed".into(),
            call_id: Some("abc".into()),
            dedup_key: "abc:call_completed".into(),
            source: Source::Poll,
            received_at: UNIX_EPOCH,
            payload: Bytes::from_static(br#"{"agent_id":"agent-7"}"#),
        }
    }

    #[test]
    fn a_routing_key_template_fills_every_placeholder() {
        let key = Topic::parse("vyora.{event}.{source}.{agent_id}.{call_id}").expect("valid");
        assert_eq!(
            key.render(&delivery()),
            "vyora.call_completed.poll.agent-7.abc"
        );
        assert_eq!(
            Topic::parse("plain").expect("valid").render(&delivery()),
            "plain"
        );
    }

    #[test]
    fn a_placeholder_value_cannot_add_topic_words_or_wildcards() {
        let mut d = delivery();
        d.call_id = Some("a.b.#.*".into());
        let key = Topic::parse("vyora.{call_id}.x").expect("valid");
        assert_eq!(key.render(&d), "vyora.a_b____.x");
    }

    #[test]
    fn a_subject_value_cannot_add_nats_tokens_or_wildcards() {
        let mut d = delivery();
        d.call_id = Some("a.b *>\tc".into());
        let subject = Topic::parse("vyora.{call_id}.{event}").expect("valid");
        assert_eq!(subject.render_subject(&d), "vyora.a_b____c.call_completed");
        d.call_id = Some(String::new());
        assert_eq!(subject.render_subject(&d), "vyora._.call_completed");
    }

    #[test]
    fn a_subject_filter_has_a_wildcard_token_for_each_token_with_a_placeholder() {
        let filter = |t: &str| Topic::parse(t).expect("valid").subject_filter();
        assert_eq!(filter("vyora.{event}"), "vyora.*");
        assert_eq!(filter("vyora.{agent_id}.{event}"), "vyora.*.*");
        assert_eq!(filter("calls.x{call_id}y.done"), "calls.*.done");
        assert_eq!(filter("{event}"), "*");
        assert_eq!(filter("plain.subject"), "plain.subject");
    }

    #[test]
    fn an_unknown_or_unbalanced_placeholder_is_refused() {
        assert!(
            Topic::parse("vyora.{evnt}")
                .expect_err("unknown")
                .reason
                .contains("{evnt}")
        );
        assert!(Topic::parse("vyora.{event").is_err());
        assert!(Topic::parse("vyora.event}").is_err());
    }
}
