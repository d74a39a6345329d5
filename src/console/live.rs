//! The live view: a page, and a stream of server-sent events from the feed (events as
//! they are stored, deliveries as they settle), names and outcomes only.
//!
//! Each viewer has a task that forwards the feed into a small bounded channel that the
//! response body reads; a viewer that falls behind, or whose feed was sampled under load,
//! is told how many it missed, and the task ends when the viewer leaves or the listener
//! shuts down.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame};
use maud::{Markup, html};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::pages::View;
use crate::feed::{Feed, Happening, What};

/// Frames buffered for one viewer; the feed itself absorbs longer stalls.
const BUFFERED: usize = 16;
/// A comment line this often keeps proxies from closing a quiet stream.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// How often a viewer is told how many happenings the feed's sample left out.
const SAMPLED: Duration = Duration::from_secs(1);

impl View<'_> {
    pub(super) fn live(&self) -> Markup {
        let body = html! {
            p.meta id="status" { "Events as they are stored and deliveries as they settle. This page needs JavaScript; every other page works without." }
            noscript { p.bad { "JavaScript is off: see the Deliveries page instead." } }
            ul.feed id="feed" {}
            script src="/ui/static/live.js" {}
        };
        self.layout("Live", body)
    }
}

/// The body of `/ui/live/events`: server-sent events, one per happening.
pub(super) struct Stream(mpsc::Receiver<Bytes>);

impl Body for Stream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|frame| frame.map(|bytes| Ok(Frame::data(bytes))))
    }
}

/// Starts forwarding `feed` to a new viewer until it leaves or `closing` is cancelled.
pub(super) fn stream(feed: &Feed, closing: CancellationToken) -> Stream {
    let (tx, rx) = mpsc::channel(BUFFERED);
    let (feed, mut happenings) = (feed.clone(), feed.subscribe());
    tokio::spawn(async move {
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        let mut sampled = tokio::time::interval(SAMPLED);
        let mut skipped = feed.skipped();
        // Sent at once, so the browser knows the stream is open.
        let mut frame = Some(Bytes::from_static(b": connected\n\n"));
        loop {
            if let Some(bytes) = frame.take()
                && tx.send(bytes).await.is_err()
            {
                return;
            }
            frame = tokio::select! {
                () = closing.cancelled() => return,
                () = tx.closed() => return,
                _ = keepalive.tick() => Some(Bytes::from_static(b": keepalive\n\n")),
                _ = sampled.tick() => {
                    let now = feed.skipped();
                    let left_out = now.saturating_sub(skipped);
                    skipped = now;
                    (left_out > 0).then(|| missed(left_out))
                }
                received = happenings.recv() => match received {
                    Ok(happening) => Some(event(&happening)),
                    Err(broadcast::error::RecvError::Lagged(lost)) => Some(missed(lost)),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
        }
    });
    Stream(rx)
}

/// A count of happenings this viewer did not get: it fell behind, or the feed's sample
/// left them out under load.
fn missed(count: u64) -> Bytes {
    Bytes::from(format!("event: missed\ndata: {count}\n\n"))
}

/// One happening as a server-sent event: JSON on one `data:` line (JSON escapes line
/// breaks, so a call id cannot end the event early).
fn event(h: &Happening) -> Bytes {
    let at = humantime::format_rfc3339_millis(h.at).to_string();
    let json = match &h.what {
        What::Stored { sinks } => serde_json::json!({
            "at": at, "kind": "stored", "call_id": h.call_id, "event": h.event,
            "sinks": sinks.iter().map(|s| &**s).collect::<Vec<&str>>(),
        }),
        What::Settled { sink, outcome } => serde_json::json!({
            "at": at, "kind": "settled", "call_id": h.call_id, "event": h.event,
            "sink": sink, "outcome": outcome,
        }),
    };
    Bytes::from(format!("data: {json}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn a_hostile_call_id_stays_inside_one_event() {
        let h = Happening {
            at: SystemTime::UNIX_EPOCH,
            call_id: Some("a\n\ndata: forged\r\n".into()),
            event: "call_completed".into(),
            what: What::Settled {
                sink: "crm".into(),
                outcome: "dead",
            },
        };
        let text = String::from_utf8(event(&h).to_vec()).unwrap();
        assert_eq!(text.matches('\n').count(), 2, "{text}");
        assert!(text.ends_with("\n\n") && text.starts_with("data: {"));
    }
}
