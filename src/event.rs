//! The Vyora event model: what we read from a verified body, and its deduplication key.

use std::fmt;
use std::time::SystemTime;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::IgnoredAny;
use sha2::{Digest, Sha256};

/// Where an event came from: Vyora's webhook, or our own poll of its REST API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Webhook,
    Poll,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Webhook => "webhook",
            Source::Poll => "poll",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "webhook" => Some(Source::Webhook),
            "poll" => Some(Source::Poll),
            _ => None,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A verified event, ready to be stored. `payload` is the exact body Vyora signed.
#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub call_id: Option<String>,
    pub dedup_key: String,
    pub source: Source,
    pub attributes: Attributes,
    /// The payload's `timestamp`, the only time a replay guard can check.
    pub timestamp: Timestamp,
    pub payload: Bytes,
}

/// An event's own `timestamp` field, as far as it could be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timestamp {
    At(SystemTime),
    /// No `timestamp` field (or null).
    Missing,
    /// A value that is not an RFC 3339 date-time.
    Unreadable,
}

impl Timestamp {
    /// Full RFC 3339: any UTC offset (`+05:30`), `Z`, fractional seconds.
    fn parse(value: Option<serde_json::Value>) -> Timestamp {
        match value {
            None | Some(serde_json::Value::Null) => Timestamp::Missing,
            Some(serde_json::Value::String(text)) => {
                match time::OffsetDateTime::parse(
                    &text,
                    &time::format_description::well_known::Rfc3339,
                ) {
                    Ok(at) => Timestamp::At(SystemTime::from(at)),
                    Err(_) => Timestamp::Unreadable,
                }
            }
            Some(_) => Timestamp::Unreadable,
        }
    }
}

/// Which delivery a sink is handed: the event's row, and the claim the store handed it
/// out under. Only the store that made the id reads its claim; to everyone else it is
/// opaque (a store shared by several replicas refuses an outcome whose lease expired).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeliveryId {
    pub row: i64,
    pub(crate) claim: Claim,
}

/// What a store handed a delivery out under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Claim {
    /// Made up outside a store (a test's or a benchmark's delivery).
    Unclaimed,
    /// SQLite: read from the event log after the sink's cursor, or (`retry`) from a row
    /// of `retries`.
    Log { retry: bool },
    /// PostgreSQL: the lease token of the claim.
    Lease(i64),
}

impl DeliveryId {
    /// A delivery of `row` handed out by no store.
    pub fn row(row: i64) -> DeliveryId {
        DeliveryId {
            row,
            claim: Claim::Unclaimed,
        }
    }
}

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.row)
    }
}

/// One event on its way to one sink: what a sink receives (the contract between the
/// dispatcher and every sink), read from the store.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: DeliveryId,
    /// Attempts made before this one.
    pub attempts: u32,
    pub event: String,
    pub call_id: Option<String>,
    pub dedup_key: String,
    pub source: Source,
    pub received_at: SystemTime,
    pub payload: Bytes,
}

/// What routing filters can match on, read from the payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    pub agent_id: Option<String>,
    pub agent_name: Option<String>,
    pub campaign_id: Option<String>,
    pub direction: Option<String>,
    /// `analysis.classification`
    pub classification: Option<String>,
}

/// Why a verified body is not an event we can route. Each message is shown to the sender.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("the body is not valid JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("the body is not a JSON object")]
    NotObject,
    #[error("no event name: send the X-Vyora-Event header or an `event` field")]
    MissingName,
    #[error("the event name {0:?} is not 1 to {MAX_NAME_LEN} letters, digits, `_`, `-` or `.`")]
    BadName(String),
    #[error("the X-Vyora-Event header {header:?} contradicts the signed body's event {body:?}")]
    NameMismatch { header: String, body: String },
    #[error(
        "the X-Vyora-Event header {0:?} is not 1 to {MAX_NAME_LEN} letters, digits, `_`, `-` or `.`"
    )]
    BadHeaderName(String),
    #[error("`call_id` must be a number or 1 to {MAX_CALL_ID_LEN} printable ASCII characters")]
    BadCallId,
}

impl EventError {
    /// Whether the unsigned `X-Vyora-Event` header alone makes the request unroutable: the
    /// signed body is fine, so there is nothing to keep, and anyone can send such a header
    /// with a captured body.
    pub fn caused_by_header(&self) -> bool {
        matches!(
            self,
            EventError::NameMismatch { .. } | EventError::BadHeaderName(_)
        )
    }
}

const MAX_NAME_LEN: usize = 64;
/// Keeps `<call_id>:<event>` within the 255 bytes of an AMQP message id.
const MAX_CALL_ID_LEN: usize = 128;

/// The few fields routing needs; the rest of the document is still checked to be JSON.
/// A key given twice is an error (serde refuses duplicate fields), so a body cannot carry
/// one event name for us and another for a downstream parser.
#[derive(Deserialize)]
struct Head {
    event: Option<serde_json::Value>,
    call_id: Option<serde_json::Value>,
    agent_id: Option<serde_json::Value>,
    agent_name: Option<serde_json::Value>,
    campaign_id: Option<serde_json::Value>,
    direction: Option<serde_json::Value>,
    analysis: Option<serde_json::Value>,
    timestamp: Option<serde_json::Value>,
}

/// A scalar as text; anything else (null, objects, arrays) is absent.
fn text(value: Option<serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Event {
    /// Reads the event from a body whose signature has already been verified.
    ///
    /// The event name comes from the body's `event` field when present, because the body
    /// is signed and the header is not: trusting the header over the body would let anyone
    /// replay a genuine body under another event name and slip past deduplication. The
    /// header is used when the body names no event, and must agree when both do.
    pub fn from_webhook(header_event: Option<&[u8]>, payload: Bytes) -> Result<Event, EventError> {
        Event::parse(header_event, payload, Source::Webhook)
    }

    /// An event the poller recovered: Vyora's call record with `"event": <name>` added
    /// first, so sinks get the same shape as the webhook would have had.
    pub fn from_poll(
        name: &str,
        call_id: &str,
        record: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Event, EventError> {
        let mut payload = serde_json::Map::with_capacity(record.len() + 1);
        payload.insert("event".into(), name.into());
        payload.insert("call_id".into(), call_id.into());
        for (k, v) in record {
            if k != "event" && k != "call_id" {
                payload.insert(k, v);
            }
        }
        let bytes = serde_json::to_vec(&payload).map_err(EventError::NotJson)?;
        Event::parse(None, Bytes::from(bytes), Source::Poll)
    }

    fn parse(
        header_event: Option<&[u8]>,
        payload: Bytes,
        source: Source,
    ) -> Result<Event, EventError> {
        // A struct would also deserialize from a JSON array; only an object is an event.
        if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return match serde_json::from_slice::<IgnoredAny>(&payload) {
                Err(e) => Err(EventError::NotJson(e)),
                Ok(_) => Err(EventError::NotObject),
            };
        }
        let head: Head = serde_json::from_slice(&payload).map_err(EventError::NotJson)?;
        let body_name = match head.event {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s),
            Some(other) => return Err(EventError::BadName(other.to_string())),
        };
        let header_name = header_event
            .map(|h| String::from_utf8_lossy(h).trim().to_owned())
            .filter(|h| !h.is_empty());
        let named_by_body = body_name.is_some();
        let name = match (header_name, body_name) {
            (Some(header), Some(body)) if header != body => {
                return Err(EventError::NameMismatch { header, body });
            }
            (_, Some(body)) => body,
            (Some(header), None) => header,
            (None, None) => return Err(EventError::MissingName),
        };
        if !valid_name(&name) {
            return Err(if named_by_body {
                EventError::BadName(name)
            } else {
                EventError::BadHeaderName(name)
            });
        }
        let call_id = match head.call_id {
            None | Some(serde_json::Value::Null) => None,
            // One rule for both forms: a number's text travels exactly as a string would.
            Some(serde_json::Value::String(s)) => Some(s),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            Some(_) => return Err(EventError::BadCallId),
        };
        if call_id.as_deref().is_some_and(|id| !valid_call_id(id)) {
            return Err(EventError::BadCallId);
        }
        // A name from the unsigned header must not choose the identity: the same signed
        // body sent again under other headers is the same event, keyed by its bytes.
        let dedup_key = dedup_key(
            call_id.as_deref().filter(|_| named_by_body),
            &name,
            &payload,
        );
        let attributes = Attributes {
            agent_id: text(head.agent_id),
            agent_name: text(head.agent_name),
            campaign_id: text(head.campaign_id),
            direction: text(head.direction),
            classification: text(
                head.analysis
                    .and_then(|mut a| a.get_mut("classification").map(serde_json::Value::take)),
            ),
        };
        let timestamp = Timestamp::parse(head.timestamp);
        Ok(Event {
            name,
            call_id,
            dedup_key,
            source,
            attributes,
            timestamp,
            payload,
        })
    }
}

/// `<call_id>:<event>`: Vyora sends each event of a call once, so a second copy (a retry
/// after a lost answer) is the same event. Without a call id (or without an event name in
/// the signed body) the only identity left is the exact signed body, so the key is its
/// SHA-256.
pub fn dedup_key(call_id: Option<&str>, event: &str, payload: &[u8]) -> String {
    match call_id {
        Some(id) => format!("{id}:{event}"),
        None => format!("sha256:{}", hex::encode(Sha256::digest(payload))),
    }
}

/// Call ids travel in HTTP headers, AMQP properties and routing keys: printable ASCII
/// only, and short enough that `<call_id>:<event>` fits an AMQP message id.
fn valid_call_id(id: &str) -> bool {
    (1..=MAX_CALL_ID_LEN).contains(&id.len()) && id.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(header: Option<&str>, body: &str) -> Result<Event, EventError> {
        Event::from_webhook(
            header.map(str::as_bytes),
            Bytes::copy_from_slice(body.as_bytes()),
        )
    }

    #[test]
    fn the_dedup_key_is_call_id_and_event() {
        let e = parse(
            Some("call_completed"),
            r#"{"event":"call_completed","call_id":"abc123xyz","status":"completed"}"#,
        )
        .expect("valid event");
        assert_eq!(e.name, "call_completed");
        assert_eq!(e.call_id.as_deref(), Some("abc123xyz"));
        assert_eq!(e.dedup_key, "abc123xyz:call_completed");
    }

    #[test]
    fn routing_attributes_are_read_from_the_payload() {
        let e = parse(
            None,
            r#"{"event":"all_processing_completed","call_id":"c1","agent_id":"a-1","agent_name":"Home Loan Agent","campaign_id":"campaign_456","direction":"outbound","analysis":{"summary":"s","classification":"Interested"}}"#,
        )
        .expect("valid event");
        assert_eq!(
            e.attributes,
            Attributes {
                agent_id: Some("a-1".into()),
                agent_name: Some("Home Loan Agent".into()),
                campaign_id: Some("campaign_456".into()),
                direction: Some("outbound".into()),
                classification: Some("Interested".into()),
            }
        );
    }

    #[test]
    fn a_polled_record_becomes_the_event_it_stands_for() {
        let record: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
            r#"{"call_id":"c9","status":"completed","analysis":{"classification":"Interested"}}"#,
        )
        .expect("record");
        let e = Event::from_poll("all_processing_completed", "c9", record).expect("event");
        assert_eq!(e.source, Source::Poll);
        assert_eq!(e.dedup_key, "c9:all_processing_completed");
        assert_eq!(e.attributes.classification.as_deref(), Some("Interested"));
        assert!(
            e.payload
                .starts_with(br#"{"event":"all_processing_completed","call_id":"c9","status""#)
        );
    }

    #[test]
    fn the_header_names_the_event_when_the_body_does_not_but_never_its_identity() {
        let body = r#"{"call_id":"c1"}"#;
        let started = parse(Some("call_started"), body).expect("valid event");
        assert_eq!(started.name, "call_started");
        let completed = parse(Some("call_completed"), body).expect("valid event");
        assert_eq!(started.dedup_key, completed.dedup_key);
        assert_eq!(
            started.dedup_key,
            format!("sha256:{}", hex::encode(Sha256::digest(body.as_bytes())))
        );
    }

    #[test]
    fn only_the_header_can_be_blamed_for_a_contradiction_or_a_bad_header_name() {
        let mismatch = parse(Some("call_started"), r#"{"event":"call_completed"}"#);
        assert!(mismatch.is_err_and(|e| e.caused_by_header()));
        let bad_header = parse(Some("a b"), "{}");
        assert!(bad_header.is_err_and(|e| e.caused_by_header()));
        let bad_body = parse(None, r#"{"event":"a b"}"#);
        assert!(bad_body.is_err_and(|e| !e.caused_by_header()));
    }

    #[test]
    fn a_header_that_contradicts_the_signed_body_is_refused() {
        let err = parse(
            Some("call_started"),
            r#"{"event":"call_completed","call_id":"c1"}"#,
        );
        assert!(
            matches!(err, Err(EventError::NameMismatch { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn an_event_without_call_id_is_keyed_by_the_hash_of_its_body() {
        let body = r#"{"event":"call_started"}"#;
        let e = parse(None, body).expect("valid event");
        assert_eq!(e.call_id, None);
        assert_eq!(
            e.dedup_key,
            format!("sha256:{}", hex::encode(Sha256::digest(body.as_bytes())))
        );
    }

    #[test]
    fn bodies_that_are_not_routable_events_are_refused_with_a_reason() {
        assert!(matches!(
            parse(Some("x"), "not json"),
            Err(EventError::NotJson(_))
        ));
        assert!(matches!(
            parse(Some("x"), "[1,2]"),
            Err(EventError::NotObject)
        ));
        assert!(matches!(
            parse(Some("x"), "\"s\""),
            Err(EventError::NotObject)
        ));
        assert!(matches!(
            parse(Some("x"), "{\"a\":1} x"),
            Err(EventError::NotJson(_))
        ));
        assert!(matches!(
            parse(None, "{\"call_id\":\"c\"}"),
            Err(EventError::MissingName)
        ));
        assert!(matches!(
            parse(Some(""), "{}"),
            Err(EventError::MissingName)
        ));
        assert!(matches!(
            parse(None, "{\"event\":5}"),
            Err(EventError::BadName(_))
        ));
        assert!(matches!(
            parse(Some("a b"), "{}"),
            Err(EventError::BadHeaderName(_))
        ));
        assert!(matches!(
            parse(Some("x"), "{\"call_id\":{\"a\":1}}"),
            Err(EventError::BadCallId)
        ));
        assert!(matches!(
            parse(Some("x"), "{\"call_id\":\"a\\nb\"}"),
            Err(EventError::BadCallId)
        ));
        assert!(matches!(
            parse(
                Some("x"),
                &format!("{{\"call_id\":\"{}\"}}", "c".repeat(129))
            ),
            Err(EventError::BadCallId)
        ));
        assert!(matches!(
            parse(Some("x"), "{\"call_id\":\"\"}"),
            Err(EventError::BadCallId)
        ));
    }

    #[test]
    fn timestamps_are_read_as_full_rfc3339_with_any_offset() {
        let at = |t: &str| {
            parse(
                None,
                &format!(r#"{{"event":"call_started","call_id":"c","timestamp":{t}}}"#),
            )
            .expect("valid")
            .timestamp
        };
        let utc = at(r#""2026-05-24T05:01:15Z""#);
        assert!(matches!(utc, Timestamp::At(_)));
        assert_eq!(at(r#""2026-05-24T10:31:15+05:30""#), utc);
        assert_eq!(at(r#""2026-05-24T10:31:15.000+05:30""#), utc);
        assert!(matches!(
            at(r#""2026-05-24T10:31:15.5-03:00""#),
            Timestamp::At(_)
        ));
        assert_eq!(at("null"), Timestamp::Missing);
        assert_eq!(at(r#""yesterday""#), Timestamp::Unreadable);
        assert_eq!(at("1779598875"), Timestamp::Unreadable);
        let without = parse(None, r#"{"event":"call_started","call_id":"c"}"#).expect("valid");
        assert_eq!(without.timestamp, Timestamp::Missing);
    }

    #[test]
    fn a_numeric_call_id_obeys_the_same_length_limit_as_a_string() {
        let long = "9".repeat(300);
        let err = parse(
            None,
            &format!("{{\"event\":\"call_completed\",\"call_id\":{long}}}"),
        );
        assert!(matches!(err, Err(EventError::BadCallId)), "{err:?}");
        let e = parse(None, r#"{"event":"call_completed","call_id":12345}"#).expect("valid");
        assert_eq!(e.dedup_key, "12345:call_completed");
    }
}
