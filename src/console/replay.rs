//! Replay from the console: a confirmation page whose POST form carries the CSRF token,
//! then the store's replay and a wake-up of the sink's dispatcher.

use maud::{Markup, html};

use super::pages::{View, link};
use super::{Query, Refusal};
use crate::store::operator::Replay;

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
            (None, Some("dead")) => Replay::dead(),
            _ => {
                return Err(Refusal::BadRequest(
                    "choose one delivery (id) or all dead ones (all=dead)".into(),
                ));
            }
        };
        Ok(Chosen { sink, which })
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

impl View<'_> {
    /// Asks before replaying: the change itself is the form's POST.
    pub(super) fn confirm_replay(&self, query: &Query) -> Result<Markup, Refusal> {
        let chosen = Chosen::of(query)?;
        let body = html! {
            p { "Replay " strong { (chosen.describe()) } "? It goes back to pending with its attempts reset, and is sent again." }
            form method="post" action="/ui/replay" {
                input type="hidden" name="csrf" value=(self.csrf);
                input type="hidden" name="sink" value=(chosen.sink);
                @match &chosen.which {
                    Replay::Id(id) => input type="hidden" name="id" value=(id);,
                    _ => input type="hidden" name="all" value="dead";,
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
            @if let Some(known) = &done.other_sinks {
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
}
