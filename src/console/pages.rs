//! The console's pages that only read: the overview of sinks and the poller, the
//! deliveries with their filters, a call's story, and the dead letters.
//!
//! Every value goes through `maud`'s escaping; nothing here builds HTML from strings.

use std::time::SystemTime;

use hyper::StatusCode;
use maud::{DOCTYPE, Markup, html};

use super::{Console, Query, Refusal, plots};
use crate::redact::Payload;
use crate::store::operator::{DeliveryRow, DeliveryStatus, EventRow, ListFilter, SinkPause};

/// Rows a list shows at most.
const LIST_LIMIT: usize = 200;

/// One request's view of the console: what it reads, and the CSRF token its forms carry.
pub(super) struct View<'a> {
    pub(super) console: &'a Console,
    pub(super) csrf: &'a str,
}

impl View<'_> {
    /// A page with the console's navigation around `body`.
    pub(super) fn layout(&self, title: &str, body: Markup) -> Markup {
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (title) " · vyora-router" }
                    link rel="stylesheet" href="/ui/static/console.css";
                }
                body {
                    header {
                        nav {
                            a href="/ui" { "Overview" }
                            a href="/ui/events" { "Deliveries" }
                            a href="/ui/dead" { "Dead letters" }
                            a href="/ui/live" { "Live" }
                        }
                        form.search method="get" action="/ui/call" {
                            label { "Call id " input type="search" name="id" required; }
                            button type="submit" { "Find" }
                        }
                        @if self.console.auth.has_token() {
                            form method="post" action="/ui/logout" {
                                input type="hidden" name="csrf" value=(self.csrf);
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                    main {
                        h1 { (title) }
                        (body)
                    }
                }
            }
        }
    }

    pub(super) async fn overview(&self) -> Result<Markup, Refusal> {
        let store = &self.console.store;
        let stats = store.stats().await?;
        let pauses = store.pauses().await?;
        let live = self.console.live.current();
        let mut names: Vec<String> = live.sinks.iter().map(|s| s.name().to_owned()).collect();
        for s in &stats.sinks {
            if !names.contains(&s.sink) {
                names.push(s.sink.clone());
            }
        }
        let now = SystemTime::now();
        let body = html! {
            section {
                h2 { "Store" }
                @match store.unready() {
                    None => p.ok { "Taking writes." },
                    Some(reason) => p.bad { "Not taking writes: " (reason) },
                }
            }
            section {
                h2 { "Sinks" }
                table {
                    thead { tr {
                        th { "sink" } th { "state" } th { "pending" }
                        th { "oldest waiting" } th { "dead" }
                    } }
                    tbody {
                        @for name in &names {
                            @let figures = stats.sinks.iter().find(|s| &s.sink == name);
                            @let running = live.sinks.iter().find(|s| s.name() == name);
                            tr {
                                td { a href=(link("/ui/events", &[("sink", name)])) { (name) } }
                                td { (sink_state(running.map(|s| s.unready()),
                                    pauses.iter().find(|p| &p.sink == name), now)) }
                                td.num { (figures.map_or(0, |f| f.pending)) }
                                td { (figures.and_then(|f| f.oldest_pending)
                                    .map_or_else(|| "-".to_owned(), |t| ago(now, t))) }
                                td.num {
                                    @let dead = figures.map_or(0, |f| f.dead);
                                    @if dead > 0 {
                                        a.bad href=(link("/ui/dead", &[("sink", name)])) { (dead) }
                                    } @else { "0" }
                                }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Activity" }
                p.meta { "Counted by this process since it started, a minute at a time." }
                h3 { "Webhooks" }
                (plots::webhooks(&self.console.history))
                @for name in &names {
                    h3 { "Attempts to " (name) }
                    (plots::sink(&self.console.history, name))
                }
            }
            section {
                h2 { "Poller" }
                @match &self.console.poller {
                    None => p { "Not running (poller.enabled = false)." },
                    Some(health) => @match health.unready() {
                        None => p.ok { "Running; " (stats.calls_waiting) " calls waiting for their analysis." },
                        Some(reason) => p.bad { "Not ready: " (reason) },
                    },
                }
            }
        };
        Ok(self.layout("Overview", body))
    }

    pub(super) async fn events(&self, query: &Query) -> Result<Markup, Refusal> {
        let status = match query.get("status") {
            None => None,
            Some("pending") => Some(DeliveryStatus::Pending),
            Some("delivered") => Some(DeliveryStatus::Delivered),
            Some("dead") => Some(DeliveryStatus::Dead),
            Some(other) => {
                return Err(Refusal::BadRequest(format!(
                    "status {other:?} is none of pending, delivered, dead"
                )));
            }
        };
        let filter = ListFilter {
            sink: query.get("sink").map(str::to_owned),
            status,
            call_id: query.get("call_id").map(str::to_owned),
            limit: LIST_LIMIT,
        };
        let rows = self.rows(&filter).await?;
        let sinks = self.console.live.sink_names();
        let chosen = |s: &str| filter.status.is_some_and(|c| c.as_str() == s);
        let body = html! {
            form.filters method="get" action="/ui/events" {
                label { "Sink "
                    select name="sink" {
                        option value="" { "any" }
                        @for s in &sinks {
                            option value=(s) selected[filter.sink.as_deref() == Some(s.as_str())] { (s) }
                        }
                    }
                }
                label { "Status "
                    select name="status" {
                        option value="" { "any" }
                        @for s in ["pending", "delivered", "dead"] {
                            option value=(s) selected[chosen(s)] { (s) }
                        }
                    }
                }
                label { "Call id " input type="search" name="call_id" value=[filter.call_id.as_deref()]; }
                button type="submit" { "Show" }
            }
            (self.delivery_table(&rows, false))
        };
        Ok(self.layout("Deliveries", body))
    }

    pub(super) async fn call(&self, query: &Query) -> Result<Markup, Refusal> {
        let id = query
            .get("id")
            .ok_or_else(|| Refusal::BadRequest("which call? (id is missing)".into()))?;
        let events = self.console.store.show_events(id).await?;
        let revealed = query.get("reveal");
        if let Some(event) = revealed.filter(|key| events.iter().any(|e| e.id == *key)) {
            // Who looked at what is worth keeping; what they saw is not logged.
            tracing::info!(call_id = %id, event = %event, "a payload was revealed in the console");
        }
        let filter = ListFilter {
            call_id: Some(id.to_owned()),
            limit: LIST_LIMIT,
            ..ListFilter::default()
        };
        let rows = self.rows(&filter).await?;
        let body = html! {
            @if events.is_empty() {
                p.bad { "The store holds no event of this call." }
            }
            @for event in &events {
                section.event {
                    h2 { (event.event) }
                    p.meta { "received " (event.received_at) " from " (event.source) }
                    (payload(id, event, revealed == Some(event.id.as_str())))
                    table {
                        thead { tr { th { "sink" } th { "status" } th { "attempts" } th { "last error" } } }
                        tbody {
                            @for d in &event.deliveries {
                                tr {
                                    td { (d.sink) }
                                    td { span class=(d.status) { (d.status) } }
                                    td.num { (d.attempts) }
                                    td.error { (d.last_error.as_deref().unwrap_or("")) }
                                }
                            }
                        }
                    }
                    @for d in event.deliveries.iter().filter(|d| !d.history.is_empty()) {
                        h3 { "Attempts to " (d.sink) }
                        ol.timeline {
                            @for a in &d.history {
                                li class=(a.outcome) {
                                    span.when { "#" (a.number) " at " (a.at) ", " (a.duration_ms) " ms" }
                                    " "
                                    span class=(a.outcome) { (a.outcome) }
                                    @if let Some(code) = a.code { " " span.code { (code) } }
                                    @if let Some(error) = &a.error { div.error { (error) } }
                                    @if let Some(answer) = &a.response {
                                        details { summary { "answer" } pre.error { (answer) } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if !rows.is_empty() {
                h2 { "Deliveries" }
                (self.delivery_table(&rows, true))
            }
        };
        Ok(self.layout(&format!("Call {id}"), body))
    }

    pub(super) async fn dead(&self, query: &Query) -> Result<Markup, Refusal> {
        let sink = query.get("sink");
        let filter = ListFilter {
            sink: sink.map(str::to_owned),
            status: Some(DeliveryStatus::Dead),
            limit: LIST_LIMIT,
            ..ListFilter::default()
        };
        let rows = self.rows(&filter).await?;
        let stats = self.console.store.stats().await?;
        let body = html! {
            p { "Deliveries that failed for good. Replaying one puts it back to pending with its attempts reset; the sink's dispatcher sends it at once." }
            ul.sinks {
                @for s in stats.sinks.iter().filter(|s| s.dead > 0) {
                    li {
                        a href=(link("/ui/dead", &[("sink", &s.sink)])) { (s.sink) ": " (s.dead) " dead" }
                        " "
                        a.button href=(link("/ui/replay", &[("sink", &s.sink), ("all", "dead")])) { "Replay all dead of " (s.sink) }
                    }
                }
            }
            (self.delivery_table(&rows, true))
            (self.bulk_forms())
        };
        Ok(self.layout("Dead letters", body))
    }

    /// Replay of a sink's dead or delivered deliveries in a time range, and backfill: each
    /// asks for confirmation before it changes anything.
    fn bulk_forms(&self) -> Markup {
        let sinks = self.console.live.sink_names();
        let times = "RFC 3339, or a duration ago: 2h";
        html! {
            h2 { "Replay by time" }
            form.filters method="get" action="/ui/replay" {
                label { "Sink " select name="sink" { @for s in &sinks { option { (s) } } } }
                label { "Status " select name="all" { option value="dead" { "dead" } option value="delivered" { "delivered" } } }
                label { "Received since " input type="text" name="since" placeholder=(times); }
                label { "until " input type="text" name="until" placeholder=(times); }
                button type="submit" { "Replay…" }
            }
            h2 { "Backfill" }
            p.meta { "Gives a sink the stored events its route takes and it never had: a sink added after them, or a filter widened. Running it again adds nothing." }
            form.filters method="get" action="/ui/backfill" {
                label { "Sink " select name="sink" { @for s in &sinks { option { (s) } } } }
                label { "Received since " input type="text" name="since" required placeholder=(times); }
                label { "until " input type="text" name="until" placeholder=(times); }
                label { "Event " input type="text" name="event" placeholder="any"; }
                button type="submit" { "Backfill…" }
            }
        }
    }

    async fn rows(&self, filter: &ListFilter) -> Result<Vec<DeliveryRow>, Refusal> {
        let mut rows = self.console.store.list_deliveries(filter).await?;
        let pauses = self.console.store.pauses().await?;
        SinkPause::mark(&pauses, &mut rows);
        Ok(rows)
    }

    /// Deliveries as a table; `replay`: with a replay link on each dead one.
    fn delivery_table(&self, rows: &[DeliveryRow], replay: bool) -> Markup {
        html! {
            @if rows.is_empty() {
                p { "No deliveries." }
            } @else {
                table.deliveries {
                    thead { tr {
                        th { "id" } th { "call" } th { "event" } th { "sink" } th { "status" }
                        th { "attempts" } th { "next attempt" } th { "last error" }
                        @if replay { th {} }
                    } }
                    tbody {
                        @for row in rows {
                            tr {
                                td.num { (row.id) }
                                td { @if let Some(call) = &row.call_id {
                                    a href=(link("/ui/call", &[("id", call)])) { (call) }
                                } }
                                td { (row.event) }
                                td { (row.sink) }
                                td {
                                    span class=(row.status) { (row.status) }
                                    @if let Some(p) = &row.sink_paused {
                                        br; small { "sink paused until " (p.until) ": " (p.reason) }
                                    }
                                }
                                td.num { (row.attempts) }
                                td { (row.next_attempt_at.as_deref().unwrap_or("")) }
                                td.error { (row.last_error.as_deref().unwrap_or("")) }
                                @if replay {
                                    td { @if row.status == "dead" {
                                        a.button href=(link("/ui/replay", &[("sink", &row.sink), ("id", &row.id.to_string())])) { "Replay" }
                                    } }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The login page.
pub(super) fn login(problem: Option<&str>) -> Markup {
    bare(
        "Log in",
        html! {
            @if let Some(p) = problem { p.bad { (p) } }
            form method="post" action="/ui/login" {
                label { "Admin token " input type="password" name="token" autocomplete="current-password" required autofocus; }
                button type="submit" { "Log in" }
            }
        },
    )
}

/// A page saying why a request was refused.
pub(super) fn problem(status: StatusCode, why: &str) -> Markup {
    bare(
        status.canonical_reason().unwrap_or("Refused"),
        html! {
            p { (why) }
            p { a href="/ui" { "Back to the overview" } }
        },
    )
}

/// A page without navigation (nothing known of the reader yet).
fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · vyora-router" }
                link rel="stylesheet" href="/ui/static/console.css";
            }
            body { main { h1 { (title) } (body) } }
        }
    }
}

/// A sink's state: not ready, paused (until when and why), or ready.
fn sink_state(
    unready: Option<Option<String>>,
    pause: Option<&SinkPause>,
    now: SystemTime,
) -> Markup {
    html! {
        @if let Some(p) = pause.filter(|p| p.until > now) {
            span.bad { "paused" } " until " (humantime::format_rfc3339_seconds(p.until).to_string())
            " (cannot reach its destination; waiting costs no attempts): " (p.reason)
        } @else {
            @match unready {
                None => span.meta { "not configured (deliveries left in the store)" },
                Some(Some(reason)) => { span.bad { "not ready" } ": " (reason) },
                Some(None) => span.ok { "ready" },
            }
        }
    }
}

/// An event's payload on its call's page: personal data masked, unless revealed.
fn payload(call_id: &str, event: &EventRow, revealed: bool) -> Markup {
    let view = if revealed {
        Payload::Revealed
    } else {
        Payload::Masked
    };
    let pretty = serde_json::to_string_pretty(&view.json(&event.payload)).unwrap_or_default();
    html! {
        details.payload open[revealed] {
            summary {
                @if revealed { "Payload (revealed)" } @else { "Payload (personal data masked)" }
            }
            pre.payload { (pretty) }
            @if !revealed && !event.payload.is_empty() {
                a.button href=(link("/ui/call", &[("id", call_id), ("reveal", &event.id)])) {
                    "Reveal personal data"
                }
                " " span.meta { "(each reveal is logged, without the payload)" }
            }
        }
    }
}

/// `path?key=value&...`, each value percent-encoded.
pub(super) fn link(path: &str, pairs: &[(&str, &str)]) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        query.append_pair(k, v);
    }
    format!("{path}?{}", query.finish())
}

/// How long before `now` `then` was, roughly (`3m 12s`).
fn ago(now: SystemTime, then: SystemTime) -> String {
    let secs = now.duration_since(then).map_or(0, |d| d.as_secs());
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m {}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h {}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d {}h", secs / 86400, secs % 86400 / 3600),
    }
}
