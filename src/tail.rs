//! `vyora-router tail`: a running router's live stream (events as they are stored,
//! deliveries as they settle), read from the console's stream on its admin listener and
//! filtered here, until interrupted. Names and outcomes only: the stream carries no
//! payload or header value.

use serde::{Deserialize, Serialize};

use crate::config::AdminConfig;
use crate::render::printable;

/// The console's stream of happenings (`/ui/live/events`).
const STREAM_PATH: &str = "/ui/live/events";
/// A frame (one happening) longer than this is not ours: the stream is refused rather
/// than buffered without end.
const MAX_FRAME: usize = 64 * 1024;

/// Which happenings `tail` prints.
#[derive(Debug, Default, Clone)]
pub struct TailFilter {
    /// Events stored for this sink, and deliveries to it.
    pub sink: Option<String>,
    pub event: Option<String>,
}

/// One happening as the stream sends it.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Happened {
    pub at: String,
    /// `stored` or `settled`.
    pub kind: String,
    pub call_id: Option<String>,
    pub event: String,
    /// For `stored`: the sinks the event was routed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sinks: Option<Vec<String>>,
    /// For `settled`: the sink, and `delivered`, `retried`, `postponed` or `dead`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

impl TailFilter {
    fn shows(&self, h: &Happened) -> bool {
        let sink_ok = self.sink.as_deref().is_none_or(|want| {
            h.sink.as_deref() == Some(want) || h.sinks.iter().flatten().any(|s| s.as_str() == want)
        });
        sink_ok && self.event.as_deref().is_none_or(|want| h.event == want)
    }
}

impl Happened {
    /// One line for a person, every value's control characters escaped.
    pub fn line(&self) -> String {
        let call = self.call_id.as_deref().unwrap_or("-");
        let (what, to) = match (&self.outcome, &self.sink, &self.sinks) {
            (Some(outcome), Some(sink), _) => (outcome.as_str(), sink.clone()),
            (_, _, Some(sinks)) if !sinks.is_empty() => ("stored", sinks.join(", ")),
            _ => ("stored", "no sink".to_owned()),
        };
        printable(&format!(
            "{}  {what:<9}  {}  call {call}  -> {to}",
            self.at, self.event
        ))
    }
}

/// What `tail` reads: a happening, or a count of those the router did not send: this
/// reader fell behind, or the feed's sample left them out under load.
#[derive(Debug)]
pub enum Tailed {
    Happened(Happened),
    Missed(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error(
        "cannot reach the router's admin listener at {addr}: {reason} (is it running, with this admin.listen?)"
    )]
    Unreachable { addr: String, reason: String },
    #[error(
        "the router at {addr} serves no console (admin.console = false): tail reads the console's live stream"
    )]
    NoConsole { addr: String },
    #[error(
        "the router at {addr} refused the stream ({status}): set admin.token in the config to the router's"
    )]
    Refused { addr: String, status: u16 },
    #[error("admin.token holds a character that no HTTP header can carry")]
    Token,
    #[error("the router at {addr} answered {status}")]
    Status { addr: String, status: u16 },
    #[error("the stream from {addr} ended: {reason}")]
    Ended { addr: String, reason: String },
}

/// Reads the live stream of the router that `admin` describes and hands each happening
/// `filter` lets through to `out`, until the stream ends (the router stopped), which is
/// an error: `tail` runs until interrupted.
pub async fn tail(
    admin: &AdminConfig,
    filter: &TailFilter,
    mut out: impl FnMut(Tailed),
) -> Result<(), TailError> {
    let addr = crate::net::loopback_for(admin.listen).to_string();
    crate::net::install_tls_provider();
    // A refused login is answered with a redirect to the login page: not followed.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| TailError::Unreachable {
            addr: addr.clone(),
            reason: crate::net::describe(&e),
        })?;
    let mut request = client.get(format!("http://{addr}{STREAM_PATH}"));
    if let Some(token) = &admin.token {
        let mut value = b"Bearer ".to_vec();
        value.extend_from_slice(token.key());
        let mut value =
            reqwest::header::HeaderValue::from_bytes(&value).map_err(|_| TailError::Token)?;
        value.set_sensitive(true);
        request = request.header(reqwest::header::AUTHORIZATION, value);
    }
    let mut response = request.send().await.map_err(|e| TailError::Unreachable {
        addr: addr.clone(),
        reason: crate::net::describe(&e.without_url()),
    })?;
    match response.status().as_u16() {
        200 => {}
        404 => return Err(TailError::NoConsole { addr }),
        status @ (300..=399 | 401 | 403) => return Err(TailError::Refused { addr, status }),
        status => return Err(TailError::Status { addr, status }),
    }
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => {
                return Err(TailError::Ended {
                    addr,
                    reason: "the router closed it".into(),
                });
            }
            Err(e) => {
                return Err(TailError::Ended {
                    addr,
                    reason: crate::net::describe(&e.without_url()),
                });
            }
        };
        pending.extend_from_slice(&chunk);
        while let Some(end) = find_frame_end(&pending) {
            let frame: Vec<u8> = pending.drain(..end + 2).collect();
            if let Some(tailed) = parse_frame(&frame)
                && match &tailed {
                    Tailed::Happened(h) => filter.shows(h),
                    Tailed::Missed(_) => true,
                }
            {
                out(tailed);
            }
        }
        if pending.len() > MAX_FRAME {
            return Err(TailError::Ended {
                addr,
                reason: format!("a frame longer than {MAX_FRAME} bytes"),
            });
        }
    }
}

/// Where the first server-sent event in `buffer` ends (its blank line), if it has.
fn find_frame_end(buffer: &[u8]) -> Option<usize> {
    buffer.windows(2).position(|w| w == b"\n\n")
}

/// One server-sent event: a happening (`data:` JSON), a count of missed ones
/// (`event: missed`), or nothing to show (a comment, a keepalive, what is not ours).
fn parse_frame(frame: &[u8]) -> Option<Tailed> {
    let text = std::str::from_utf8(frame).ok()?;
    let mut missed = false;
    let mut data = None;
    for line in text.lines() {
        if line == "event: missed" {
            missed = true;
        } else if let Some(value) = line.strip_prefix("data: ") {
            data = Some(value);
        }
    }
    let data = data?;
    if missed {
        return data.trim().parse().ok().map(Tailed::Missed);
    }
    serde_json::from_str(data).ok().map(Tailed::Happened)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_read_as_happenings_counts_of_missed_ones_or_nothing() {
        let stored = br#"data: {"at":"2026-12-05T10:00:00.000Z","kind":"stored","call_id":"c1","event":"call_completed","sinks":["archive","crm"]}"#;
        let Some(Tailed::Happened(h)) = parse_frame(stored) else {
            panic!("a happening");
        };
        assert_eq!(
            h.sinks.as_deref(),
            Some(&["archive".into(), "crm".into()][..])
        );
        assert_eq!(
            h.line(),
            "2026-12-05T10:00:00.000Z  stored     call_completed  call c1  -> archive, crm"
        );
        assert!(matches!(
            parse_frame(b"event: missed\ndata: 7"),
            Some(Tailed::Missed(7))
        ));
        assert!(parse_frame(b": keepalive").is_none());
        assert!(parse_frame(b"data: not json").is_none());
    }

    #[test]
    fn the_filter_keeps_a_sinks_events_and_settlements_and_the_chosen_event() {
        let stored = Happened {
            at: String::new(),
            kind: "stored".into(),
            call_id: None,
            event: "call_started".into(),
            sinks: Some(vec!["crm".into()]),
            sink: None,
            outcome: None,
        };
        let settled = Happened {
            kind: "settled".into(),
            event: "call_completed".into(),
            sinks: None,
            sink: Some("archive".into()),
            outcome: Some("delivered".into()),
            ..stored.clone()
        };
        let crm = TailFilter {
            sink: Some("crm".into()),
            event: None,
        };
        assert!(crm.shows(&stored) && !crm.shows(&settled));
        let completed = TailFilter {
            sink: None,
            event: Some("call_completed".into()),
        };
        assert!(!completed.shows(&stored) && completed.shows(&settled));
        assert!(TailFilter::default().shows(&stored));
    }

    #[test]
    fn a_hostile_call_id_is_shown_escaped() {
        let h = Happened {
            at: "t".into(),
            kind: "settled".into(),
            call_id: Some("c\u{1b}]0;x\u{7}".into()),
            event: "call_completed".into(),
            sinks: None,
            sink: Some("crm".into()),
            outcome: Some("dead".into()),
        };
        assert!(!h.line().chars().any(char::is_control), "{}", h.line());
    }
}
