//! The shipped Prometheus rules and Grafana dashboard (`deploy/`) against the router: every
//! metric, label and recording rule they use exists, the series whose first increase an
//! alert must see exist at 0 from the start, the store's figures are read once however
//! many replicas export them, every alert has its runbook, and a real
//! Prometheus scraping a real router fires and resolves the dead-letter and backlog alerts
//! when an HTTP sink's downstream goes down and comes back, and the sink-unavailable and
//! not-ready alerts when an AMQP sink's broker does.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::downstream::{Downstream, Reply};
use common::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tokio::time::Instant;
use vyora_router::store::operator::Replay;

const RULES: &str = "deploy/prometheus/alerts.yml";
const DASHBOARD: &str = "deploy/grafana/vyora-router.json";

/// Labels that the router does not expose: Prometheus adds `job` and `instance` to every
/// scraped series, `le` is a histogram's, and our recording rules add `quantile`.
const ADDED_LABELS: [&str; 4] = ["job", "instance", "le", "quantile"];

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()))
}

// ---------------------------------------------------------------------------------------
// Reading the rules file. Not a YAML parser: it reads the layout alerts.yml keeps (one
// rule per `- record:` / `- alert:` item, `key: value` lines, `expr: |` blocks); a rule
// written another way shows up as a missing field, and the tests fail on it.

/// One recording or alerting rule: its name and its `key: value` lines (labels and
/// annotations included, flattened).
#[derive(Debug, Default)]
struct Rule {
    alert: bool,
    name: String,
    fields: HashMap<String, String>,
}

fn parse_rules(text: &str) -> Vec<Rule> {
    let mut rules: Vec<Rule> = Vec::new();
    // The block scalar being read: its key and the indentation of the line that opened it.
    let mut block: Option<(String, usize)> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if let Some((key, opened_at)) = &block {
            if trimmed.is_empty() || indent > *opened_at {
                let rule = rules.last_mut().expect("a block inside a rule");
                let value = rule.fields.entry(key.clone()).or_default();
                value.push_str(trimmed);
                value.push('\n');
                continue;
            }
            block = None;
        }
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        let item = trimmed.strip_prefix("- ").unwrap_or(trimmed);
        let Some((key, value)) = item.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "record" | "alert" => rules.push(Rule {
                alert: key == "alert",
                name: value.to_owned(),
                fields: HashMap::new(),
            }),
            _ => {
                let Some(rule) = rules.last_mut() else {
                    continue;
                };
                if value == "|" {
                    block = Some((key.to_owned(), indent));
                } else {
                    let value = value
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .unwrap_or(value);
                    rule.fields.insert(key.to_owned(), value.to_owned());
                }
            }
        }
    }
    rules
}

// ---------------------------------------------------------------------------------------
// Reading PromQL: the router's names in an expression, the matchers right after them, and
// the labels of `by (...)`, `on (...)` and the like.

/// A name starting with `vyora_router` and the matchers written right after it.
#[derive(Debug)]
struct Use {
    name: String,
    /// (label, operator, value) of `{label="value", ...}`.
    matchers: Vec<(String, String, String)>,
}

impl Use {
    /// A recording rule's name (`vyora_router:what:how`) rather than an exposed metric.
    fn recorded(&self) -> bool {
        self.name.contains(':')
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn uses(expr: &str) -> Vec<Use> {
    let mut found = Vec::new();
    let mut rest = expr;
    let mut before: Option<char> = None;
    while let Some(at) = rest.find("vyora_router") {
        let preceding = rest[..at].chars().next_back().or(before);
        let tail = &rest[at..];
        let len = tail.find(|c| !is_name_char(c)).unwrap_or(tail.len());
        let name = &tail[..len];
        before = name.chars().next_back();
        rest = &tail[len..];
        if preceding.is_some_and(is_name_char) {
            continue; // inside another name
        }
        let mut matchers = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let end = inner.find('}').expect("matchers end with }");
            for m in inner[..end]
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
            {
                let op_at = m.find(['=', '!']).expect("a matcher has an operator");
                let value_at = m.find('"').expect("a matcher's value is quoted");
                matchers.push((
                    m[..op_at].trim().to_owned(),
                    m[op_at..value_at].trim().to_owned(),
                    m[value_at..].trim_matches('"').to_owned(),
                ));
            }
        }
        found.push(Use {
            name: name.to_owned(),
            matchers,
        });
    }
    found
}

/// Label names listed after `by`, `without`, `on` and `ignoring`.
fn grouping_labels(expr: &str) -> Vec<String> {
    let mut labels = Vec::new();
    for keyword in ["by", "without", "on", "ignoring"] {
        let mut rest = expr;
        while let Some(at) = rest.find(keyword) {
            let preceding = rest[..at].chars().next_back();
            let after = rest[at + keyword.len()..].trim_start();
            rest = &rest[at + keyword.len()..];
            if preceding.is_some_and(is_name_char) || !after.starts_with('(') {
                continue;
            }
            let list = &after[1..after.find(')').expect("a label list ends with )")];
            labels.extend(list.split(',').map(|l| l.trim().to_owned()));
        }
    }
    labels
}

/// Every PromQL expression in the dashboard: panel targets and template variable queries.
fn dashboard_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::String(s)) if s.contains('(') => {
                        out.push(s.clone());
                    }
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                dashboard_exprs(v, out);
            }
        }
        _ => {}
    }
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&repo_file(DASHBOARD)).expect("the dashboard is valid JSON")
}

// ---------------------------------------------------------------------------------------

/// A router with a file sink, an HTTP sink `crm`, and the poller against a fake API, made
/// to produce every outcome the rules and the dashboard select on.
#[tokio::test]
async fn every_metric_and_label_the_rules_and_the_dashboard_use_is_in_the_routers_exposition() {
    let crm = Downstream::start(|_, _| Reply::Status(200)).await;
    // Every call the poller asks about is complete with its analysis.
    let api = Downstream::start(|r, _| {
        let call_id = r.path.rsplit('/').next().unwrap_or_default().to_owned();
        Reply::Json(
            200,
            serde_json::json!({"call_id": call_id, "status": "completed", "analysis": {"summary": "ok"}}),
        )
    })
    .await;
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = format!(
        "{}\n[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"{}\"\ntimeout = \"2s\"\nrate_limit = \"1000/s\"\n\n[api]\nbase_url = \"{}\"\napi_key = \"vya_test_key\"\n\n[poller]\nenabled = true\nwait_for_analysis = \"200ms\"\ninterval = \"200ms\"\n",
        base_config(dir.path()).replace("[server]\n", "[server]\nack_timeout = \"300ms\"\n"),
        crm.url("/in"),
        api.url(""),
    );
    let router = TestRouter::start_with(dir, &config).await;

    // The traffic: accepted and delivered, a duplicate, a bad signature, a delivery
    // refused for good (dead), one failed and retried, one postponed while the sink
    // pauses for Retry-After, a 503 while another process holds the store's write lock,
    // and polls for calls whose analysis has not come.
    let body = payload("call-ok", "call_completed");
    assert_eq!(router.post_signed(&body).await.status, 200);
    assert_eq!(router.post_signed(&body).await.status, 200);
    let forged = send(
        router.addr,
        webhook_request(&body, Some(&format!("sha256={}", "0".repeat(64)))),
    );
    assert_eq!(forged.await.status, 401);
    wait_for_sample(
        &router,
        "vyora_router_deliveries_total",
        &[("outcome", "delivered")],
    )
    .await;

    crm.set_script(|_, _| Reply::Status(400));
    router
        .post_signed(&payload("call-dead", "call_completed"))
        .await;
    wait_for_sample(
        &router,
        "vyora_router_deliveries_total",
        &[("outcome", "dead")],
    )
    .await;

    crm.set_script(|_, _| Reply::Status(500));
    router
        .post_signed(&payload("call-retried", "call_completed"))
        .await;
    wait_for_sample(
        &router,
        "vyora_router_deliveries_total",
        &[("outcome", "retried")],
    )
    .await;

    // A 503 with Retry-After pauses the sink; what comes during the pause is postponed.
    crm.set_script(|_, _| Reply::StatusWith(503, vec![("retry-after", "2".into())]));
    let before = crm.received().len();
    router
        .post_signed(&payload("call-pause-1", "call_completed"))
        .await;
    crm.wait_for(before + 1, Duration::from_secs(15)).await;
    router
        .post_signed(&payload("call-pause-2", "call_completed"))
        .await;
    wait_for_sample(
        &router,
        "vyora_router_deliveries_total",
        &[("outcome", "postponed")],
    )
    .await;
    crm.set_script(|_, _| Reply::Status(200));

    let locker = router.db();
    locker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let answer = router
        .post_signed(&payload("call-locked", "call_completed"))
        .await;
    locker.execute_batch("ROLLBACK").expect("release the lock");
    assert_eq!(answer.status, 503, "{answer:?}");

    wait_for_sample(
        &router,
        "vyora_router_poller_requests_total",
        &[("status", "200")],
    )
    .await;

    let exposition = get(router.admin, "/metrics").await.body;
    let exposed: HashSet<&str> = exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let samples = router.scrape().await;

    // Each recording rule's name, with the router's metrics its expression reads.
    let rules = parse_rules(&repo_file(RULES));
    let mut sources: HashMap<String, Vec<String>> = HashMap::new();
    for rule in rules.iter().filter(|r| !r.alert) {
        let expr = rule
            .fields
            .get("expr")
            .expect("a recording rule has an expr");
        sources.entry(rule.name.clone()).or_default().extend(
            uses(expr)
                .into_iter()
                .filter(|u| !u.recorded())
                .map(|u| u.name),
        );
    }
    let mut exprs: Vec<(String, String)> = rules
        .iter()
        .map(|r| {
            (
                format!("{RULES}: {}", r.name),
                r.fields.get("expr").cloned().unwrap_or_default(),
            )
        })
        .collect();
    let mut panel_exprs = Vec::new();
    dashboard_exprs(&dashboard(), &mut panel_exprs);
    assert!(
        panel_exprs.len() > 10,
        "the dashboard's queries were not found"
    );
    exprs.extend(panel_exprs.into_iter().map(|e| (DASHBOARD.to_owned(), e)));

    let mut problems = BTreeSet::new();
    let mut checked = 0;
    for (place, expr) in &exprs {
        for u in uses(expr) {
            checked += 1;
            // The metrics whose samples the matchers select: the metric itself, or what
            // the recording rule reads. A histogram's samples are parsed under its base name.
            let metrics: Vec<String> = if u.recorded() {
                match sources.get(&u.name) {
                    Some(metrics) => metrics.clone(),
                    None => {
                        problems.insert(format!("{place}: no recording rule named {}", u.name));
                        continue;
                    }
                }
            } else {
                if !exposed.contains(u.name.as_str()) {
                    problems.insert(format!("{place}: {} is not in the exposition", u.name));
                    continue;
                }
                vec![u.name.clone()]
            };
            let base = |m: &str| -> String {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| m.strip_suffix(s))
                    .unwrap_or(m)
                    .to_owned()
            };
            let of_metrics: Vec<&prometheus_parse::Sample> = samples
                .iter()
                .filter(|s| {
                    metrics
                        .iter()
                        .any(|m| s.metric == *m || s.metric == base(m))
                })
                .collect();
            for (label, op, value) in &u.matchers {
                if ADDED_LABELS.contains(&label.as_str()) {
                    continue;
                }
                let has_label = of_metrics.iter().any(|s| s.labels.get(label).is_some());
                if !has_label {
                    problems.insert(format!("{place}: {} has no label {label}", u.name));
                } else if op == "="
                    && !of_metrics
                        .iter()
                        .any(|s| s.labels.get(label) == Some(value.as_str()))
                {
                    problems.insert(format!("{place}: {} never has {label}=\"{value}\"", u.name));
                }
            }
        }
        for label in grouping_labels(expr) {
            let known = ADDED_LABELS.contains(&label.as_str())
                || samples.iter().any(|s| s.labels.get(&label).is_some());
            if !known {
                problems.insert(format!("{place}: no router metric has the label {label}"));
            }
        }
    }
    assert!(
        checked > 30,
        "only {checked} uses of the router's names were found"
    );
    assert!(
        problems.is_empty(),
        "the rules or the dashboard use what the router does not expose:\n{}\n\nexposition:\n{exposition}",
        problems.into_iter().collect::<Vec<_>>().join("\n")
    );
}

/// The value of the sample of `name` whose labels include `labels`, if there is one.
fn sample(
    samples: &[prometheus_parse::Sample],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

/// What the rules read before anything happened: `increase()` and `changes()` see only
/// what follows a series' first sample, so VyoraRouterDeliveriesDead relies on every
/// sink's series existing at 0 before its first dead delivery, and the availability,
/// readiness, restart and quarantine alerts on their gauges existing without traffic.
#[tokio::test]
async fn a_router_that_received_nothing_exposes_what_the_rules_read_at_zero() {
    let crm = Downstream::start(|_, _| Reply::Status(200)).await;
    let api = Downstream::start(|_, _| Reply::Status(404)).await;
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = format!(
        "{}\n[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"{}\"\n\n[api]\nbase_url = \"{}\"\napi_key = \"vya_test_key\"\n\n[poller]\nenabled = true\n",
        base_config(dir.path()).replace("[store]\n", "[store]\nquarantine_max_bytes = 2097152\n"),
        crm.url("/in"),
        api.url(""),
    );
    let router = TestRouter::start_with(dir, &config).await;
    // The sink gauges come with the first backlog refresh, at start.
    let deadline = Instant::now() + Duration::from_secs(15);
    let samples = loop {
        let samples = router.scrape().await;
        if sample(&samples, "vyora_router_sink_ready", &[("sink", "crm")]).is_some() {
            break samples;
        }
        assert!(Instant::now() < deadline, "no vyora_router_sink_ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let value = |name: &str, labels: &[(&str, &str)]| {
        sample(&samples, name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} before any traffic"))
    };
    for sink in ["archive", "crm"] {
        for outcome in ["delivered", "retried", "postponed", "dead"] {
            let labels = [("sink", sink), ("outcome", outcome)];
            assert_eq!(value("vyora_router_deliveries_total", &labels), 0.0);
        }
        // A file sink and an HTTP sink need no connection: available from the start.
        assert_eq!(value("vyora_router_sink_ready", &[("sink", sink)]), 1.0);
    }
    for outcome in ["invalid_signature", "unavailable", "bad_request"] {
        let labels = [("event", "unknown"), ("outcome", outcome)];
        assert_eq!(value("vyora_router_webhooks_received_total", &labels), 0.0);
    }
    for status in ["401", "403"] {
        let labels = [("status", status)];
        assert_eq!(value("vyora_router_poller_requests_total", &labels), 0.0);
    }
    assert_eq!(value("vyora_router_ready", &[]), 1.0);
    assert_eq!(value("vyora_router_quarantine_max_bytes", &[]), 2_097_152.0);
    assert_eq!(value("vyora_router_quarantine_dropped_total", &[]), 0.0);
    assert_eq!(value("vyora_router_settlements_rejected_total", &[]), 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let started = value("vyora_router_start_time_seconds", &[]);
    assert!(
        (now - 120.0..=now).contains(&started),
        "start time {started}, now {now}"
    );
}

/// Waits until the router's exposition has a sample of `name` with `labels`.
async fn wait_for_sample(router: &TestRouter, name: &str, labels: &[(&str, &str)]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if metric(&router.scrape().await, name, labels) > 0.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {name} {labels:?} in the exposition"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The router's figures of its store. Every replica that shares the store exports the same
/// value, so the rules and the dashboard read each once: the max over the replicas, never
/// their sum (4 deliveries waiting on two replicas are not 8), and never one alert or one
/// line per replica.
const STORE_WIDE: [&str; 5] = [
    "vyora_router_outbox_pending",
    "vyora_router_outbox_dead",
    "vyora_router_outbox_oldest_pending_age_seconds",
    "vyora_router_poller_calls_tracked",
    "vyora_router_quarantine_bytes",
];

/// Which labels an aggregation keeps.
#[derive(Debug, PartialEq)]
enum Kept {
    By(Vec<String>),
    AllBut(Vec<String>),
}

impl Kept {
    fn keeps(&self, label: &str) -> bool {
        match self {
            Kept::By(labels) => labels.iter().any(|l| l == label),
            Kept::AllBut(labels) => !labels.iter().any(|l| l == label),
        }
    }
}

const AGGREGATIONS: [&str; 7] = ["sum", "max", "min", "avg", "count", "group", "stddev"];

/// The last word of `text` (letters, digits, `_`).
fn last_word(text: &str) -> &str {
    text.trim_end()
        .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .next()
        .unwrap_or("")
}

/// The innermost aggregation whose parentheses enclose the text at `at` in `expr`: its
/// operator and the labels it keeps. Functions (`delta(...)`) and plain parentheses
/// between them are looked through.
fn enclosing_aggregation(expr: &str, at: usize) -> Option<(String, Kept)> {
    let mut depth = 0;
    for (i, c) in expr[..at].char_indices().rev() {
        match c {
            ')' => depth += 1,
            '(' if depth > 0 => depth -= 1,
            '(' => {
                let before = expr[..i].trim_end();
                if let Some(clause) = before.strip_suffix(')') {
                    // `op by (labels) (...)` or `op without (labels) (...)`.
                    let open = clause.rfind('(')?;
                    let labels: Vec<String> = clause[open + 1..]
                        .split(',')
                        .map(|l| l.trim().to_owned())
                        .filter(|l| !l.is_empty())
                        .collect();
                    let keyword = last_word(&clause[..open]);
                    let op = last_word(clause[..open].trim_end().strip_suffix(keyword)?);
                    let kept = match keyword {
                        "by" => Kept::By(labels),
                        "without" => Kept::AllBut(labels),
                        _ => continue,
                    };
                    return Some((op.to_owned(), kept));
                }
                let word = last_word(before);
                if AGGREGATIONS.contains(&word) {
                    return Some((word.to_owned(), Kept::By(Vec::new())));
                }
            }
            _ => {}
        }
    }
    None
}

#[test]
fn the_enclosing_aggregation_is_found_through_functions_and_by_clauses() {
    let expr = "max by (job) (delta(vyora_router_quarantine_bytes[1h])) > 0";
    let at = expr.find("vyora_router").expect("a use");
    assert_eq!(
        enclosing_aggregation(expr, at),
        Some(("max".to_owned(), Kept::By(vec!["job".to_owned()])))
    );
    let expr = "sum(vyora_router_outbox_pending) / max without (instance, pod) (x)";
    assert_eq!(
        enclosing_aggregation(expr, 4),
        Some(("sum".to_owned(), Kept::By(Vec::new())))
    );
    let expr = "max without (instance, pod) (vyora_router_outbox_dead)";
    let (_, kept) = enclosing_aggregation(expr, 29).expect("an aggregation");
    assert!(kept.keeps("job") && !kept.keeps("instance"));
    assert_eq!(
        enclosing_aggregation("vyora_router_outbox_dead > 0", 0),
        None
    );
}

#[test]
fn the_stores_figures_are_read_once_however_many_replicas_export_them() {
    let mut exprs: Vec<(String, String)> = parse_rules(&repo_file(RULES))
        .into_iter()
        .map(|r| {
            (
                format!("{RULES}: {}", r.name),
                r.fields.get("expr").cloned().unwrap_or_default(),
            )
        })
        .collect();
    let mut panel_exprs = Vec::new();
    dashboard_exprs(&dashboard(), &mut panel_exprs);
    exprs.extend(panel_exprs.into_iter().map(|e| (DASHBOARD.to_owned(), e)));
    let mut problems = Vec::new();
    let mut checked = 0;
    for (place, expr) in &exprs {
        for name in STORE_WIDE {
            for (at, _) in expr.match_indices(name) {
                let next = expr[at + name.len()..].chars().next();
                let previous = expr[..at].chars().next_back();
                if next.is_some_and(is_name_char) || previous.is_some_and(is_name_char) {
                    continue;
                }
                checked += 1;
                match enclosing_aggregation(expr, at) {
                    None => problems.push(format!("{place}: {name} is read per replica: {expr}")),
                    Some((op, kept)) => {
                        if !["max", "min", "avg"].contains(&op.as_str()) {
                            problems
                                .push(format!("{place}: {op} over the replicas' {name}: {expr}"));
                        }
                        if kept.keeps("instance") {
                            problems.push(format!(
                                "{place}: {name} is kept per instance, once per replica: {expr}"
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(
        checked >= 8,
        "only {checked} reads of the store's figures were found"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_alert_has_a_severity_a_summary_a_description_and_a_runbook_section_in_the_readme() {
    let rules = parse_rules(&repo_file(RULES));
    let alerts: Vec<&Rule> = rules.iter().filter(|r| r.alert).collect();
    assert!(alerts.len() >= 10, "only {} alerts were read", alerts.len());
    // GitHub's anchor of a heading: lower case, spaces to dashes, punctuation dropped.
    let readme = repo_file("README.md");
    let (_, alerts_section) = readme
        .split_once("\n## Alerts\n")
        .expect("README.md has an Alerts section");
    let anchors: HashSet<String> = alerts_section
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(|h| {
            h.to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect();
    let mut problems = Vec::new();
    for alert in alerts {
        let field = |key: &str| alert.fields.get(key).map(String::as_str).unwrap_or("");
        if !["critical", "warning"].contains(&field("severity")) {
            problems.push(format!(
                "{}: severity is {:?}",
                alert.name,
                field("severity")
            ));
        }
        if field("for").is_empty() {
            problems.push(format!("{}: no for:", alert.name));
        }
        if field("summary").is_empty() || field("description").len() < 40 {
            problems.push(format!(
                "{}: no summary or a too short description",
                alert.name
            ));
        }
        let anchor = field("runbook_url")
            .rsplit_once("README.md#")
            .map(|(_, a)| a);
        if anchor != Some(alert.name.to_lowercase().as_str()) {
            problems.push(format!(
                "{}: runbook_url {:?} is not README.md#{}",
                alert.name,
                field("runbook_url"),
                alert.name.to_lowercase()
            ));
        } else if !anchors.contains(&alert.name.to_lowercase()) {
            problems.push(format!(
                "{}: README.md's Alerts section has no ### {} heading",
                alert.name, alert.name
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_dashboard_queries_prometheus_through_its_datasource_variable() {
    let dashboard = dashboard();
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("template variables");
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "no Prometheus datasource variable"
    );
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queried = 0;
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap_or("?");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {title}");
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "panel {title}"
            );
            assert!(
                target["expr"].as_str().is_some_and(|e| !e.is_empty()),
                "panel {title}"
            );
            queried += 1;
        }
    }
    // Webhooks, acks, backlog, oldest age, deliveries, dead letters, poller, rate-limit
    // waits, store commits: the list, at least one query each.
    assert!(queried >= 9, "{queried} queries");
}

// ---------------------------------------------------------------------------------------
// A real Prometheus.

/// The shipped rules with time running 60 times faster, for a test that takes a minute
/// or two: minutes become seconds in every `for:`, every range `[...]` and every
/// threshold written as `N * 60` seconds. Latency thresholds stay as they are.
fn compressed(rules: &str) -> String {
    fn scaled(duration: &str) -> String {
        let (number, unit) = duration.split_at(duration.len() - 1);
        let n: u64 = number
            .parse()
            .unwrap_or_else(|_| panic!("duration {duration}"));
        let seconds = n * match unit {
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => panic!("{duration}: write durations in whole minutes, hours or days"),
        };
        format!("{}s", seconds / 60)
    }
    let (mut fors, mut ranges, mut thresholds) = (0, 0, 0);
    let mut out = String::new();
    for line in rules.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        if trimmed.starts_with('#') {
            // Comments mention durations too; they are left alone.
            out.push_str(line);
        } else if let Some(d) = trimmed.strip_prefix("for: ") {
            out.push_str(&format!("{indent}for: {}", scaled(d.trim())));
            fors += 1;
        } else {
            thresholds += line.matches(" * 60").count();
            let line = line.replace(" * 60", " * 1");
            let mut rest = line.as_str();
            while let Some(open) = rest.find('[') {
                let close = open + rest[open..].find(']').expect("a range ends with ]");
                out.push_str(&rest[..=open]);
                out.push_str(&scaled(&rest[open + 1..close]));
                out.push(']');
                rest = &rest[close + 1..];
                ranges += 1;
            }
            out.push_str(rest);
        }
        out.push('\n');
    }
    assert!(
        fors >= 10 && ranges >= 10 && thresholds >= 1,
        "{fors} for:, {ranges} ranges, {thresholds} thresholds"
    );
    out
}

#[test]
fn compressed_rules_turn_minutes_into_seconds_but_keep_latency_thresholds() {
    let rules = compressed(&repo_file(RULES));
    assert!(rules.contains("> 15 * 1\n"), "backlog threshold");
    assert!(rules.contains("vyora_router_deliveries_total{outcome=\"dead\"}[10s]"));
    assert!(rules.contains("        for: 5s\n"));
    assert!(rules.contains("max_over_time(vyora_router_build_info[1440s])"));
    assert!(
        rules.contains("{quantile=\"0.99\"} > 2\n"),
        "latency stays in seconds"
    );
    assert!(
        !rules.contains("for: 5m\n        labels"),
        "a for: left uncompressed"
    );
}

/// A TCP gate in front of the downstream: open, it carries connections; closed, it cuts
/// the ones it carries and drops new ones at once, as a service that went away.
struct Gate {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    links: Arc<Mutex<JoinSet<()>>>,
}

impl Gate {
    async fn start(to: SocketAddr) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let open = Arc::new(AtomicBool::new(true));
        let links = Arc::new(Mutex::new(JoinSet::new()));
        let (o, l) = (Arc::clone(&open), Arc::clone(&links));
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: the connection closes before any answer
                }
                l.lock().await.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Gate { addr, open, links }
    }

    async fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.links.lock().await.abort_all();
    }

    fn reopen(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

/// A Prometheus server of its own: a free port on loopback, data in a temp dir, killed
/// at the end or on drop (a failed test).
struct Prometheus {
    addr: SocketAddr,
    child: tokio::process::Child,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `prometheus` scraping `target` every second with `rules` evaluated every
    /// second.
    async fn start(target: SocketAddr, rules: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("rules.yml"), rules).expect("write rules");
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yml]\nscrape_configs:\n  - job_name: vyora-router\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .expect("write config");
        // A free port: bound and released, then taken by Prometheus; another process
        // may take it in between, so a Prometheus that exits at once is started again.
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
            let mut child = tokio::process::Command::new(prometheus_binary())
                .arg(format!(
                    "--config.file={}",
                    dir.path().join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .stdout(Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .expect("start prometheus");
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if child.try_wait().expect("prometheus status").is_some() {
                    break;
                }
                if TcpStream::connect(addr).await.is_ok()
                    && get(addr, "/-/ready").await.status == 200
                {
                    return Prometheus { addr, child, dir };
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!(
            "prometheus did not start:\n{}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
    }

    async fn api(&self, path: &str, params: &[(&str, &str)]) -> serde_json::Value {
        let url = reqwest::Url::parse_with_params(&format!("http://{}{path}", self.addr), params)
            .expect("URL");
        let path = format!("{}?{}", url.path(), url.query().unwrap_or_default());
        let answer = get(self.addr, &path).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.body);
        answer.json()["data"].clone()
    }

    /// The value of an instant query that returns one sample, if it returns one.
    async fn value(&self, query: &str) -> Option<f64> {
        let data = self.api("/api/v1/query", &[("query", query)]).await;
        let v = data["result"].get(0)?["value"][1].as_str()?.to_owned();
        v.parse().ok()
    }

    /// Active alerts as (name, sink, state).
    async fn alerts(&self) -> Vec<(String, String, String)> {
        let data = self.api("/api/v1/alerts", &[]).await;
        data["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .map(|a| {
                let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
                (
                    s(&a["labels"]["alertname"]),
                    s(&a["labels"]["sink"]),
                    s(&a["state"]),
                )
            })
            .collect()
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

fn prometheus_binary() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("prometheus"))
            .find(|p| p.is_file())
    });
    found.expect("prometheus is not on the PATH: install it (Debian: apt-get install prometheus; .ci/run does)")
}

/// Waits until `done(alerts)` holds, or panics with the alerts seen last.
async fn wait_for_alerts(
    prometheus: &Prometheus,
    what: &str,
    within: Duration,
    done: impl Fn(&[(String, String, String)]) -> bool,
) {
    let started = Instant::now();
    loop {
        let alerts = prometheus.alerts().await;
        if done(&alerts) {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{what}: not within {within:?}; active alerts: {alerts:?}\nprometheus log:\n{}",
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until the instant query `query` returns one sample of value `want`.
async fn wait_for_value(prometheus: &Prometheus, query: &str, want: f64, within: Duration) {
    let deadline = Instant::now() + within;
    while prometheus.value(query).await != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{query} never was {want} within {within:?}:\n{}",
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn firing(alerts: &[(String, String, String)], name: &str, sink: &str) -> bool {
    alerts
        .iter()
        .any(|(n, s, state)| n == name && s == sink && state == "firing")
}

fn active(alerts: &[(String, String, String)], name: &str) -> bool {
    alerts.iter().any(|(n, _, _)| n == name)
}

#[tokio::test]
#[ignore = "needs Prometheus (prometheus and promtool on the PATH); .ci/run installs it"]
async fn a_real_prometheus_fires_the_dead_letter_and_backlog_alerts_while_a_sink_is_down_and_resolves_them_when_it_is_back()
 {
    const DEAD: &str = "VyoraRouterDeliveriesDead";
    const BACKLOG: &str = "VyoraRouterBacklogStuck";
    let downstream = Downstream::start(|_, _| Reply::Status(200)).await;
    let gate = Gate::start(downstream.addr).await;
    // Two attempts, 30 s apart at most: with the downstream gone, each delivery waits up
    // to 30 s and then goes dead, so while events keep coming, some are dying and the
    // oldest waiting one soon passes the compressed 15 s threshold.
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    // No circuit breaker: it would stop the attempts, and with them the dead letters
    // this test is about (tests/flow_control.rs covers it).
    let config = format!(
        "{}\n[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"http://{}/in\"\ntimeout = \"2s\"\ncircuit_breaker = {{ failures = 0 }}\n",
        base_config(dir.path())
            .replace(
                "backoff_initial = \"50ms\"",
                "backoff_initial = \"30s\"\nmax_attempts = 2"
            )
            .replace("backoff_max = \"200ms\"", "backoff_max = \"30s\""),
        gate.addr,
    );
    let router = TestRouter::start_with(dir, &config).await;
    let prometheus = Prometheus::start(router.admin, &compressed(&repo_file(RULES))).await;

    // Prometheus scrapes the router and sees it as a router (the recording rule).
    wait_for_value(&prometheus, "vyora_router:up", 1.0, Duration::from_secs(30)).await;
    // Every alerting rule Prometheus loaded carries what an on-call engineer needs.
    let groups = prometheus.api("/api/v1/rules", &[("type", "alert")]).await;
    let loaded: Vec<serde_json::Value> = groups["groups"]
        .as_array()
        .expect("rule groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(loaded.len() >= 10, "{} alerting rules loaded", loaded.len());
    for rule in &loaded {
        for annotation in ["summary", "description", "runbook_url"] {
            assert!(
                rule["annotations"][annotation].is_string(),
                "{} has no {annotation}",
                rule["name"]
            );
        }
        assert!(
            rule["labels"]["severity"].is_string(),
            "{} has no severity",
            rule["name"]
        );
    }

    // Webhooks keep coming, one every 250 ms, throughout.
    let sending = Arc::new(AtomicBool::new(true));
    let sender = {
        let (addr, sending) = (router.addr, Arc::clone(&sending));
        tokio::spawn(async move {
            let mut n = 0;
            while sending.load(Ordering::SeqCst) {
                n += 1;
                let answer =
                    post_signed(addr, &payload(&format!("call-{n}"), "call_completed")).await;
                assert_eq!(answer.status, 200);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    downstream.wait_for(3, Duration::from_secs(15)).await;
    let alerts = prometheus.alerts().await;
    assert!(
        !active(&alerts, DEAD) && !active(&alerts, BACKLOG),
        "{alerts:?}"
    );

    gate.close().await;
    let down = Instant::now();
    let within = Duration::from_secs(120);
    wait_for_alerts(
        &prometheus,
        "dead-letter alert firing for crm",
        within,
        |a| firing(a, DEAD, "crm"),
    )
    .await;
    let dead_fired = down.elapsed();
    wait_for_alerts(&prometheus, "backlog alert firing for crm", within, |a| {
        firing(a, BACKLOG, "crm")
    })
    .await;
    let backlog_fired = down.elapsed();
    // The file sink kept delivering: the alerts name only the sink that is down. An HTTP
    // destination that is down costs attempts, not availability: the router stays ready,
    // the sink is not "unavailable" (that is for a broker or a Retry-After pause), and
    // nothing restarted.
    let alerts = prometheus.alerts().await;
    assert!(
        alerts
            .iter()
            .all(|(_, sink, _)| sink.is_empty() || sink == "crm"),
        "{alerts:?}"
    );
    for quiet in [
        "VyoraRouterNotReady",
        "VyoraRouterSinkUnavailable",
        "VyoraRouterRestartLoop",
    ] {
        assert!(!active(&alerts, quiet), "{alerts:?}");
    }

    gate.reopen();
    let back = Instant::now();
    // Then both at once: the dead-letter alert must not come back while the backlog drains.
    wait_for_alerts(&prometheus, "dead-letter alert resolved", within, |a| {
        !active(a, DEAD)
    })
    .await;
    let dead_resolved = back.elapsed();
    wait_for_alerts(&prometheus, "both alerts resolved", within, |a| {
        !active(a, DEAD) && !active(a, BACKLOG)
    })
    .await;
    let both_resolved = back.elapsed();
    sending.store(false, Ordering::SeqCst);
    sender
        .await
        .expect("the sender posted every webhook with 200");
    eprintln!(
        "downstream down: dead-letter alert firing after {dead_fired:?}, backlog after {backlog_fired:?}; \
         back: dead-letter resolved after {dead_resolved:?}, both after {both_resolved:?}"
    );

    // The runbook's fix: replay the dead deliveries; the dead gauge returns to 0.
    let dead = prometheus
        .value("sum(vyora_router_outbox_dead{sink=\"crm\"})")
        .await;
    assert!(dead.is_some_and(|d| d > 0.0), "dead deliveries: {dead:?}");
    let store = router.operator_store().await;
    let done = store.replay("crm", &Replay::dead()).await.expect("replay");
    store.close().await;
    assert!(done.replayed > 0, "{done:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while prometheus
        .value("sum(vyora_router_outbox_dead{sink=\"crm\"})")
        .await
        != Some(0.0)
    {
        assert!(
            Instant::now() < deadline,
            "the replayed deliveries are still dead"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    prometheus.stop().await;
}

#[tokio::test]
#[ignore = "needs Prometheus and RabbitMQ (VYORA_TEST_AMQP_URL); .ci/run provides both"]
async fn a_real_prometheus_fires_sink_unavailable_and_not_ready_while_a_broker_is_unreachable_with_nothing_waiting_and_resolves_them_when_it_is_back()
 {
    const UNAVAILABLE: &str = "VyoraRouterSinkUnavailable";
    const NOT_READY: &str = "VyoraRouterNotReady";
    let gate = Gate::start(common::amqp::broker_addr()).await;
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = format!(
        "{}\n[[sinks]]\nname = \"queue\"\ntype = \"amqp\"\nurl = \"{}\"\nexchange = \"{}\"\n",
        base_config(dir.path()),
        common::amqp::url_via(gate.addr),
        common::amqp::unique("vyora-alerts-x"),
    );
    let router = TestRouter::start_with(dir, &config).await;
    let prometheus = Prometheus::start(router.admin, &compressed(&repo_file(RULES))).await;
    let within = Duration::from_secs(120);

    // Connected and ready, as Prometheus sees it, with neither alert active. (The sink's
    // gauge is 0 until its first connection and is refreshed every 10 s, which the
    // compressed `for:` of 5 s does not cover: an alert may come and go at the start.)
    wait_for_value(
        &prometheus,
        "vyora_router_sink_ready{sink=\"queue\"}",
        1.0,
        within,
    )
    .await;
    wait_for_value(&prometheus, "vyora_router_ready", 1.0, within).await;
    wait_for_alerts(&prometheus, "no alert while connected", within, |a| {
        !active(a, UNAVAILABLE) && !active(a, NOT_READY)
    })
    .await;

    // The broker goes away; no webhook comes, so nothing waits for the sink.
    gate.close().await;
    let down = Instant::now();
    wait_for_alerts(
        &prometheus,
        "sink-unavailable and not-ready alerts firing",
        within,
        |a| firing(a, UNAVAILABLE, "queue") && firing(a, NOT_READY, ""),
    )
    .await;
    let fired = down.elapsed();
    let samples = router.scrape().await;
    for outcome in ["postponed", "retried", "dead"] {
        let labels = [("sink", "queue"), ("outcome", outcome)];
        assert_eq!(
            metric(&samples, "vyora_router_deliveries_total", &labels),
            0.0
        );
    }
    assert_eq!(
        metric(
            &samples,
            "vyora_router_outbox_pending",
            &[("sink", "queue")]
        ),
        0.0
    );
    // The file sink stays available: the alerts name only the sink that is down.
    let alerts = prometheus.alerts().await;
    assert!(
        alerts
            .iter()
            .all(|(_, sink, _)| sink.is_empty() || sink == "queue"),
        "{alerts:?}"
    );
    let readyz = router.readyz().await;
    assert_eq!(readyz.status, 503);
    assert!(
        readyz.json()["problems"]["sink:queue"].is_string(),
        "/readyz names the sink: {}",
        readyz.body
    );

    gate.reopen();
    let back = Instant::now();
    wait_for_alerts(&prometheus, "both alerts resolved", within, |a| {
        !active(a, UNAVAILABLE) && !active(a, NOT_READY)
    })
    .await;
    eprintln!(
        "broker unreachable: both alerts firing after {fired:?}; back: resolved after {:?}",
        back.elapsed()
    );
    prometheus.stop().await;
}
