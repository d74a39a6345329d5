//! Operator tables and answers: what the `deliveries`, `events`, `poller` and `agents`
//! commands print for a person, with every control character from the API or the store
//! escaped.

use comfy_table::Table;
use comfy_table::presets::UTF8_FULL_CONDENSED;

use crate::api::Agent;
pub use crate::redact::Payload;
use crate::store::operator::{DeliveryRow, EventPage, EventRow, PollRow, Replay, Replayed};

pub fn polls(rows: &[PollRow]) -> String {
    let mut t = table(&[
        "call_id",
        "status",
        "next poll",
        "polls",
        "first seen",
        "why",
    ]);
    for r in rows {
        t.add_row(row([
            &r.call_id,
            &r.status,
            or_dash(r.next_poll_at.as_deref()),
            &r.polls.to_string(),
            &r.first_seen_at,
            or_dash(r.last_result.as_deref()),
        ]));
    }
    t.to_string()
}

pub fn agents(agents: &[Agent]) -> String {
    let mut t = table(&["id", "name", "language", "type"]);
    for a in agents {
        t.add_row(row([
            &a.id,
            &a.name,
            or_dash(a.language.as_deref()),
            or_dash(a.agent_type.as_deref()),
        ]));
    }
    t.to_string()
}

/// `text` with every control character (C0, DEL, C1) escaped as `\u{..}`, `\n`, `\t`...:
/// cells come from the API or the store, and a raw ESC or BEL in them would be obeyed by
/// the operator's terminal (clear the screen, retitle the window, hide text).
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A table row of printable cells.
fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.into_iter().map(printable).collect()
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    t
}

fn or_dash(v: Option<&str>) -> &str {
    v.unwrap_or("-")
}

pub fn deliveries(rows: &[DeliveryRow]) -> String {
    let mut t = table(&[
        "id",
        "call_id",
        "event",
        "sink",
        "status",
        "attempts",
        "next attempt",
        "last error",
    ]);
    for r in rows {
        // A paused sink's rows use no attempt while they wait: the pause says when and why.
        let paused = r.sink_paused.as_ref();
        t.add_row(row([
            &r.id.to_string(),
            or_dash(r.call_id.as_deref()),
            &r.event,
            &r.sink,
            if paused.is_some() {
                "pending (sink paused)"
            } else {
                &r.status
            },
            &r.attempts.to_string(),
            // Both RFC 3339 in UTC, so the later one sorts last.
            or_dash(
                r.next_attempt_at
                    .as_deref()
                    .max(paused.map(|p| p.until.as_str())),
            ),
            or_dash(
                r.last_error
                    .as_deref()
                    .or(paused.map(|p| p.reason.as_str())),
            ),
        ]));
    }
    t.to_string()
}

pub fn events(rows: &[EventRow]) -> String {
    let mut t = table(&[
        "id",
        "event",
        "source",
        "received at",
        "sink",
        "status",
        "attempts",
        "last error",
    ]);
    for e in rows {
        if e.deliveries.is_empty() {
            t.add_row(row([
                &e.id,
                &e.event,
                &e.source,
                &e.received_at,
                "-",
                "no sink matched",
                "-",
                "-",
            ]));
        }
        for d in &e.deliveries {
            t.add_row(row([
                &e.id,
                &e.event,
                &e.source,
                &e.received_at,
                &d.sink,
                &d.status,
                &d.attempts.to_string(),
                or_dash(d.last_error.as_deref()),
            ]));
        }
    }
    let history = attempts(rows);
    if history.is_empty() {
        t.to_string()
    } else {
        format!("{t}\nattempts:\n{history}")
    }
}

/// A page of `events list`, and how to ask for the next.
pub fn event_page(page: &EventPage) -> String {
    let mut t = table(&[
        "id",
        "received at",
        "call_id",
        "event",
        "source",
        "deliveries",
    ]);
    for e in &page.events {
        let deliveries: Vec<String> = e
            .deliveries
            .iter()
            .map(|d| match &d.last_error {
                Some(_) if d.status != "delivered" => {
                    format!("{}: {} ({} attempts)", d.sink, d.status, d.attempts)
                }
                _ => format!("{}: {}", d.sink, d.status),
            })
            .collect();
        t.add_row(row([
            &e.id.to_string(),
            &e.received_at,
            or_dash(e.call_id.as_deref()),
            &e.event,
            &e.source,
            &deliveries.join(", "),
        ]));
    }
    let mut out = if page.events.is_empty() {
        "no stored event matches".to_owned()
    } else {
        t.to_string()
    };
    if let Some(before) = page.next_before {
        out.push_str(&format!("\nmore: add --before {before} for the next page"));
    }
    out
}

/// The line above a payload `events show --payload` prints.
pub fn payload_heading(event: &str, view: Payload) -> String {
    let what = match view {
        Payload::Masked => "payload (personal data masked; --reveal shows it)",
        _ => "payload",
    };
    format!("{} {what}:", printable(event))
}

/// A payload as `events show --payload` prints it: pretty JSON, each line's control
/// characters escaped (JSON escapes C0 but leaves DEL and C1 as they are).
pub fn payload(json: &serde_json::Value) -> String {
    let pretty = serde_json::to_string_pretty(json).unwrap_or_default();
    pretty.lines().map(printable).collect::<Vec<_>>().join("\n")
}

/// Each delivery's kept attempts, oldest first; empty when none was kept.
fn attempts(rows: &[EventRow]) -> String {
    let mut t = table(&[
        "event", "sink", "#", "at", "took", "outcome", "code", "error", "answer",
    ]);
    let mut any = false;
    for e in rows {
        for d in &e.deliveries {
            for a in &d.history {
                any = true;
                t.add_row(row([
                    &e.event,
                    &d.sink,
                    &a.number.to_string(),
                    &a.at,
                    &format!("{} ms", a.duration_ms),
                    &a.outcome,
                    &a.code.map_or_else(|| "-".to_owned(), |c| c.to_string()),
                    or_dash(a.error.as_deref()),
                    or_dash(a.response.as_deref()),
                ]));
            }
        }
    }
    if any { t.to_string() } else { String::new() }
}

/// What `deliveries backfill` did.
pub fn backfilled(sink: &str, done: &crate::backfill::Backfilled) -> String {
    let sink = printable(sink);
    let mut text = if done.added == 0 {
        format!(
            "nothing to backfill: {sink} has every stored event of the range that its route takes"
        )
    } else {
        format!(
            "{} to {sink} created; the running server delivers them",
            deliveries_count(done.added)
        )
    };
    text.push_str(&format!(
        " ({} stored events it had none of examined, {} taken by its route",
        done.examined, done.matched
    ));
    if done.payload_gone > 0 {
        text.push_str(&format!(
            ", {} left out: store.retention emptied their payloads",
            done.payload_gone
        ));
    }
    text.push(')');
    text
}

/// What `deliveries replay` did, and why it left what it left.
pub fn replayed(sink: &str, which: &Replay, done: &Replayed) -> String {
    let sink = printable(sink);
    if done.matched() == 0 {
        return match which {
            Replay::Status { .. } => format!(
                "no {} to {sink}: nothing to replay",
                printable(&which.describe())
            ),
            Replay::CallId(_) | Replay::Id(_) => {
                format!("no delivery to {sink} matched: nothing to replay")
            }
        };
    }
    let mut text = format!(
        "{} to {sink} {} pending again",
        deliveries_count(done.replayed),
        if done.replayed == 1 { "is" } else { "are" }
    );
    if done.replayed > 0 {
        text.push_str("; the running server sends them shortly");
    }
    let mut left = Vec::new();
    if done.already_pending > 0 {
        left.push(format!(
            "{} pending already (waiting for the next attempt, or being sent)",
            deliveries_count(done.already_pending)
        ));
    }
    if done.payload_gone > 0 {
        left.push(format!(
            "{} that cannot be sent again: store.retention emptied the payload",
            deliveries_count(done.payload_gone)
        ));
    }
    if !left.is_empty() {
        text.push_str("; left as they were: ");
        text.push_str(&left.join("; "));
    }
    text
}

fn deliveries_count(n: usize) -> String {
    if n == 1 {
        "1 delivery".to_owned()
    } else {
        format!("{n} deliveries")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::operator::{AttemptRow, PauseNote, SinkStatus};

    /// Whether `text` holds a byte a terminal would obey rather than show.
    fn has_control(text: &str) -> bool {
        text.chars().any(char::is_control)
    }

    #[test]
    fn control_characters_from_the_api_or_the_store_are_shown_escaped_not_sent_to_the_terminal() {
        let agents = agents(&[crate::api::Agent {
            id: "abc123".into(),
            name: "Home Loan\x1b[2J Agent".into(),
            language: Some("hi-IN\u{9b}31m".into()),
            agent_type: Some("out\x7fbound".into()),
        }]);
        assert!(!has_control(&agents.replace('\n', "")), "{agents:?}");
        assert!(agents.contains(r"Home Loan\u{1b}[2J Agent"), "{agents}");
        assert!(agents.contains(r"hi-IN\u{9b}31m"), "{agents}");

        let polls = polls(&[PollRow {
            call_id: "call-\x1b[1A".into(),
            status: "waiting".into(),
            next_poll_at: None,
            polls: 1,
            first_seen_at: "2026-05-24T10:30:00Z".into(),
            last_result: Some("not ready: \x1b]0;pwned\x07".into()),
        }]);
        assert!(!has_control(&polls.replace('\n', "")), "{polls:?}");
        assert!(polls.contains(r"\u{1b}]0;pwned\u{7}"), "{polls}");

        let deliveries = deliveries(&[DeliveryRow {
            id: 1,
            call_id: Some("call-1".into()),
            event: "call_completed".into(),
            sink: "crm".into(),
            status: "dead".into(),
            attempts: 3,
            next_attempt_at: None,
            last_error: Some("422: \x1b[31mbad\r\nnext".into()),
            sink_paused: None,
        }]);
        assert!(
            !has_control(&deliveries.replace('\n', "")),
            "{deliveries:?}"
        );
        assert!(
            deliveries.contains(r"\u{1b}[31mbad\r\nnext"),
            "{deliveries}"
        );

        let events = events(&[EventRow {
            id: "call-1:call_completed".into(),
            event: "call_completed\x1bc".into(),
            source: "webhook".into(),
            received_at: "2026-05-24T10:30:00Z".into(),
            deliveries: vec![SinkStatus {
                sink: "crm".into(),
                status: "dead".into(),
                attempts: 3,
                last_error: Some("\x07".into()),
                history: vec![AttemptRow {
                    number: 3,
                    at: "2026-05-24T10:30:00.250Z".into(),
                    duration_ms: 12,
                    outcome: "dead".into(),
                    code: Some(422),
                    error: Some("answered 422".into()),
                    response: Some("<h1>\x1b[8mhidden</h1>".into()),
                }],
            }],
            payload: bytes::Bytes::new(),
        }]);
        assert!(!has_control(&events.replace('\n', "")), "{events:?}");
        assert!(events.contains(r"call_completed\u{1b}c"), "{events}");
        assert!(events.contains(r"<h1>\u{1b}[8mhidden</h1>"), "{events}");
        assert!(events.contains("422"), "{events}");
    }

    #[test]
    fn a_pending_delivery_of_a_paused_sink_shows_the_pause_its_end_and_why() {
        let table = deliveries(&[DeliveryRow {
            id: 7,
            call_id: Some("call-7".into()),
            event: "call_completed".into(),
            sink: "crm".into(),
            status: "pending".into(),
            attempts: 0,
            next_attempt_at: Some("2026-05-24T10:30:00Z".into()),
            last_error: None,
            sink_paused: Some(PauseNote {
                until: "2026-05-24T10:31:00Z".into(),
                reason: "cannot connect to crm.internal:443".into(),
            }),
        }]);
        assert!(table.contains("pending (sink paused)"), "{table}");
        assert!(table.contains("2026-05-24T10:31:00Z"), "{table}");
        assert!(!table.contains("2026-05-24T10:30:00Z"), "{table}");
        assert!(
            table.contains("cannot connect to crm.internal:443"),
            "{table}"
        );
    }

    #[test]
    fn a_replay_that_left_deliveries_as_they_were_says_why() {
        let done = Replayed {
            replayed: 2,
            already_pending: 1,
            payload_gone: 3,
            too_many: false,
            other_sinks: None,
        };
        let text = replayed("crm", &Replay::dead(), &done);
        assert!(
            text.starts_with("2 deliveries to crm are pending again; the running server"),
            "{text}"
        );
        assert!(
            text.contains("1 delivery pending already")
                && text.contains("3 deliveries that cannot be sent again: store.retention"),
            "{text}"
        );
        let nothing = replayed("crm", &Replay::dead(), &Replayed::default());
        assert_eq!(nothing, "no dead deliveries to crm: nothing to replay");
    }
}
