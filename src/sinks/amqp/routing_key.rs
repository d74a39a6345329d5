//! The AMQP sink's routing key: a template checked when the config is read, filled in
//! for each delivery so that a value can never change the key's shape.

use crate::config::error::Invalid;
use crate::event::Delivery;

/// A routing key template: text with `{event}`, `{call_id}`, `{agent_id}`, `{source}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingKey(Vec<Part>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Event,
    CallId,
    AgentId,
    Source,
}

impl RoutingKey {
    /// Parses a template; the error names what is wrong with it.
    pub fn parse(template: &str) -> Result<RoutingKey, Invalid> {
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
        Ok(RoutingKey(parts))
    }

    /// The key for one delivery. A placeholder's value is confined to its own words: `.`
    /// (the topic word separator) and the wildcards `*` and `#` in a value become `_`, so
    /// a call id like `a.b` or `#` can neither shift a binding's words nor match as a
    /// wildcard.
    pub fn render(&self, d: &Delivery) -> String {
        let mut key = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => key.push_str(t),
                Part::Event => push_value(&mut key, &d.event),
                Part::CallId => push_value(&mut key, d.call_id.as_deref().unwrap_or("none")),
                Part::AgentId => push_value(
                    &mut key,
                    &agent_id(&d.payload).unwrap_or_else(|| "none".into()),
                ),
                Part::Source => push_value(&mut key, d.source.as_str()),
            }
        }
        key
    }
}

fn push_value(key: &mut String, value: &str) {
    key.extend(value.chars().map(|c| match c {
        '.' | '*' | '#' => '_',
        c => c,
    }));
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
        let key = RoutingKey::parse("vyora.{event}.{source}.{agent_id}.{call_id}").expect("valid");
        assert_eq!(
            key.render(&delivery()),
            "vyora.call_completed.poll.agent-7.abc"
        );
        assert_eq!(
            RoutingKey::parse("plain")
                .expect("valid")
                .render(&delivery()),
            "plain"
        );
    }

    #[test]
    fn a_placeholder_value_cannot_add_topic_words_or_wildcards() {
        let mut d = delivery();
        d.call_id = Some("a.b.#.*".into());
        let key = RoutingKey::parse("vyora.{call_id}.x").expect("valid");
        assert_eq!(key.render(&d), "vyora.a_b____.x");
    }

    #[test]
    fn an_unknown_or_unbalanced_placeholder_is_refused() {
        assert!(
            RoutingKey::parse("vyora.{evnt}")
                .expect_err("unknown")
                .reason
                .contains("{evnt}")
        );
        assert!(RoutingKey::parse("vyora.{event").is_err());
        assert!(RoutingKey::parse("vyora.event}").is_err());
    }
}
