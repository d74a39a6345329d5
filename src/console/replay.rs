//! Replay and backfill from the console: a confirmation page whose POST form carries the
//! CSRF token, then the store's change and a wake-up of the sink's dispatcher.

use maud::{Markup, html};

use super::pages::{View, link};
use super::{Query, Refusal};
use crate::store::operator::{BackfillFrom, DeliveryStatus, REPLAY_MAX, Replay, parse_time};

/// What a replay request chose: a sink and which of its deliveries.
struct Chosen<'a> {
    sink: &'a str,
    which: Replay,
}

impl<'a> Chosen<'a> {
    fn of(query: &'a Query) -> Result<Chosen<'a>, Refusal> {
        let sink = query
            .get("sink")
            .ok_or_else(|| Refusal::BadRequest("which sink? (sink is missing)".into()))?;
        let which = match (query.get("id"), query.get("all")) {
            (Some(id), None) => Replay::Id(
                id.parse()
                    .map_err(|_| Refusal::BadRequest(format!("id {id:?} is not a delivery id")))?,
            ),
            (None, Some(status @ ("dead" | "delivered"))) => Replay::Status {
                status: if status == "dead" {
                    DeliveryStatus::Dead
                } else {
                    DeliveryStatus::Delivered
                },
                since: time(query, "since")?,
                until: time(query, "until")?,
            },
            _ => {
                return Err(Refusal::BadRequest(
                    "choose one delivery (id), or all dead or delivered ones (all=dead, all=delivered)"
                        .into(),
                ));
            }
        };
        Ok(Chosen { sink, which })
    }

    /// The query pairs that say the same choice again, for the confirmed form.
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = vec![("sink", self.sink.to_owned())];
        match &self.which {
            Replay::Id(id) => pairs.push(("id", id.to_string())),
            Replay::Status {
                status,
                since,
                until,
            } => {
                pairs.push(("all", status.as_str().to_owned()));
                for (key, at) in [("since", since), ("until", until)] {
                    if let Some(at) = at {
                        pairs.push((key, humantime::format_rfc3339_seconds(*at).to_string()));
                    }
                }
            }
            Replay::CallId(call) => pairs.push(("call_id", call.clone())),
        }
        pairs
    }

    fn describe(&self) -> String {
        match &self.which {
            Replay::Id(id) => format!("delivery {id} of sink {}", self.sink),
            Replay::Status { .. } => format!(
                "every one of the {} of sink {}",
                self.which.describe(),
                self.sink
            ),
            Replay::CallId(call) => format!("the deliveries of call {call} to sink {}", self.sink),
        }
    }
}

/// An optional time field of a form: RFC 3339, or a duration ago.
pub(super) fn time(query: &Query, key: &str) -> Result<Option<std::time::SystemTime>, Refusal> {
    match query.get(key).map(str::trim).filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(text) => parse_time(text)
            .map(Some)
            .map_err(|e| Refusal::BadRequest(format!("{key}: {e}"))),
    }
}

impl View<'_> {
    /// Asks before replaying: the change itself is the form's POST.
    pub(super) fn confirm_replay(&self, query: &Query) -> Result<Markup, Refusal> {
        let chosen = Chosen::of(query)?;
        let body = html! {
            p { "Replay " strong { (chosen.describe()) } "? It goes back to pending with its attempts reset, and is sent again." }
            form method="post" action="/ui/replay" {
                input type="hidden" name="csrf" value=(self.csrf);
                @for (name, value) in chosen.pairs() {
                    input type="hidden" name=(name) value=(value);
                }
                button.danger type="submit" { "Replay" }
                " "
                a href=(link("/ui/dead", &[("sink", chosen.sink)])) { "Cancel" }
            }
        };
        Ok(self.layout("Confirm replay", body))
    }

    /// Replays what the confirmed form chose and wakes the sink's dispatcher.
    pub(super) async fn replay(&self, form: &Query) -> Result<Markup, Refusal> {
        let chosen = Chosen::of(form)?;
        let store = &self.console.store;
        let done = store.replay(chosen.sink, &chosen.which).await?;
        if done.replayed > 0 {
            store.waker(chosen.sink).notify_one();
        }
        tracing::info!(
            sink = chosen.sink,
            replayed = done.replayed,
            already_pending = done.already_pending,
            payload_gone = done.payload_gone,
            "replay from the console"
        );
        let body = html! {
            @if done.too_many {
                p.bad { "More than " (REPLAY_MAX) " deliveries match " (chosen.describe()) ": nothing was replayed. Choose a shorter time range." }
            } @else if let Some(known) = &done.other_sinks {
                p.bad { "The store holds no delivery for sink " (chosen.sink) ". It knows: " (known.join(", ")) }
            } @else if done.matched() == 0 {
                p.bad { "No such delivery: " (chosen.describe()) "." }
            } @else {
                p.ok { (done.replayed) " replayed" }
                @if done.already_pending > 0 { p { (done.already_pending) " pending already, left as they were" } }
                @if done.payload_gone > 0 { p.bad { (done.payload_gone) " not replayed: store.retention emptied their payload" } }
            }
            p {
                a href=(link("/ui/events", &[("sink", chosen.sink)])) { "Deliveries of " (chosen.sink) }
                " · "
                a href="/ui/dead" { "Dead letters" }
            }
        };
        Ok(self.layout("Replay", body))
    }

    /// Asks before a backfill: which sink, which received range, which event.
    pub(super) fn confirm_backfill(&self, query: &Query) -> Result<Markup, Refusal> {
        let (sink, from) = backfill_of(query)?;
        let mut pairs = vec![("sink", sink.to_owned())];
        for (key, at) in [("since", from.since), ("until", from.until)] {
            if let Some(at) = at {
                pairs.push((key, humantime::format_rfc3339_seconds(at).to_string()));
            }
        }
        if let Some(event) = &from.event {
            pairs.push(("event", event.clone()));
        }
        let body = html! {
            p { "Give sink " strong { (sink) } " every stored event "
                @if let Some(event) = &from.event { strong { (event) } " " }
                "received in the range that its route takes and that it never had? The sink's dispatcher sends them." }
            form method="post" action="/ui/backfill" {
                input type="hidden" name="csrf" value=(self.csrf);
                @for (name, value) in &pairs {
                    input type="hidden" name=(name) value=(value);
                }
                button.danger type="submit" { "Backfill" }
                " "
                a href="/ui/dead" { "Cancel" }
            }
        };
        Ok(self.layout("Confirm backfill", body))
    }

    /// Backfills what the confirmed form chose and wakes the sink's dispatcher.
    pub(super) async fn backfill(&self, form: &Query) -> Result<Markup, Refusal> {
        let (sink, from) = backfill_of(form)?;
        let live = self.console.live.current();
        let route = live
            .router
            .route(sink)
            .ok_or_else(|| Refusal::BadRequest(format!("no sink named {sink} is configured")))?;
        let store = &self.console.store;
        let done = crate::backfill::backfill(store, route, from).await?;
        if done.added > 0 {
            store.waker(sink).notify_one();
        }
        tracing::info!(
            sink,
            examined = done.examined,
            added = done.added,
            "backfill from the console"
        );
        let body = html! {
            p.ok { (done.added) " deliveries created" }
            p { (done.examined) " stored events the sink had none of examined, " (done.matched) " taken by its route" }
            @if done.payload_gone > 0 { p.bad { (done.payload_gone) " left out: store.retention emptied their payloads" } }
            p { a href=(link("/ui/events", &[("sink", sink)])) { "Deliveries of " (sink) } }
        };
        Ok(self.layout("Backfill", body))
    }
}

/// A backfill's sink and range from a form; `since` is required, as on the command line.
fn backfill_of(query: &Query) -> Result<(&str, BackfillFrom), Refusal> {
    let sink = query
        .get("sink")
        .ok_or_else(|| Refusal::BadRequest("which sink? (sink is missing)".into()))?;
    let since = time(query, "since")?
        .ok_or_else(|| Refusal::BadRequest("since is missing: from when?".into()))?;
    Ok((
        sink,
        BackfillFrom {
            since: Some(since),
            until: time(query, "until")?,
            event: query
                .get("event")
                .filter(|e| !e.is_empty())
                .map(str::to_owned),
            ..BackfillFrom::default()
        },
    ))
}
