//! The RabbitMQ sink against a real broker, with a TCP proxy in between to cut the
//! connection or play a broker that is down.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::amqp::{Consumer, broker_addr, broker_url, unique, url_via};
use common::proxy::Proxy;
use common::*;
use lapin::types::AMQPValue;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(30);

async fn router_with_amqp(broker: &str, exchange: &str, extra: &str) -> TestRouter {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = format!(
        "{}\n[[sinks]]\nname = \"queue\"\ntype = \"amqp\"\nurl = \"{broker}\"\nexchange = \"{exchange}\"\nrouting_key = \"vyora.{{event}}.{{source}}\"\nconfirm_timeout = \"5s\"\n{extra}\n",
        base_config(dir.path()),
    );
    TestRouter::start_with(dir, &config).await
}

async fn wait_ready(router: &TestRouter, status: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while router.readyz().await.status != status {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn header(d: &lapin::message::Delivery, name: &str) -> Option<String> {
    let headers = d.properties.headers().as_ref()?;
    match headers
        .inner()
        .get(&lapin::types::ShortString::from(name))?
    {
        AMQPValue::LongString(s) => Some(s.to_string()),
        _ => None,
    }
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set VYORA_TEST_AMQP_URL, run with --include-ignored"]
async fn messages_carry_exact_properties_routing_key_and_body() {
    let exchange = unique("vyora-test-x");
    let router = router_with_amqp(&broker_url(), &exchange, "").await;
    wait_ready(&router, 200).await; // connected, exchange declared
    let consumer = Consumer::new().await;
    consumer.bind(&exchange).await;

    let body = payload("call-q1", "call_completed");
    assert_eq!(router.post_signed(&body).await.status, 200);
    let (got, _) = consumer.drain(1, WAIT).await;
    let d = got.first().expect("a message");
    assert_eq!(d.data, body.as_bytes(), "byte-identical");
    assert_eq!(d.routing_key.as_str(), "vyora.call_completed.webhook");
    let p = &d.properties;
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    assert_eq!(
        p.message_id().as_ref().map(|s| s.as_str()),
        Some("call-q1:call_completed")
    );
    assert_eq!(
        p.kind().as_ref().map(|s| s.as_str()),
        Some("call_completed")
    );
    assert_eq!(
        p.app_id().as_ref().map(|s| s.as_str()),
        Some("vyora-router")
    );
    assert!(p.timestamp().is_some_and(|t| t > 1_700_000_000));
    assert_eq!(
        header(d, "x-vyora-event").as_deref(),
        Some("call_completed")
    );
    assert_eq!(header(d, "x-vyora-call-id").as_deref(), Some("call-q1"));
    assert_eq!(header(d, "x-vyora-source").as_deref(), Some("webhook"));
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set VYORA_TEST_AMQP_URL, run with --include-ignored"]
async fn a_poison_event_is_refused_or_goes_dead_and_never_holds_up_the_events_after_it() {
    let exchange = unique("vyora-test-x");
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    // Two copies of a 128-byte call id make a routing key over AMQP's 255 bytes.
    let config = format!(
        "{}\n[[sinks]]\nname = \"queue\"\ntype = \"amqp\"\nurl = \"{}\"\nexchange = \"{exchange}\"\nrouting_key = \"{{call_id}}.{{call_id}}\"\n",
        base_config(dir.path()),
        broker_url(),
    );
    let router = TestRouter::start_with(dir, &config).await;
    wait_ready(&router, 200).await;
    let consumer = Consumer::new().await;
    consumer.bind(&exchange).await;

    // A 300-digit numeric call id would not fit a message id: refused at the door.
    let numeric = format!(
        r#"{{"event":"call_completed","call_id":{}}}"#,
        "9".repeat(300)
    );
    assert_eq!(router.post_signed(&numeric).await.status, 400);

    // A valid call id whose routing key cannot be built: dead at once, with the reason.
    let long_id = "c".repeat(128);
    assert_eq!(
        router
            .post_signed(&payload(&long_id, "call_completed"))
            .await
            .status,
        200
    );
    assert_eq!(
        router
            .post_signed(&payload("after-poison", "call_completed"))
            .await
            .status,
        200
    );
    let (_, ids) = consumer.drain(1, WAIT).await;
    assert!(ids.contains("after-poison:call_completed"), "{ids:?}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, error): (String, Option<String>) = router
            .db()
            .query_row(
                "SELECT o.status, o.last_error FROM outbox o JOIN events e ON e.id = o.event_id
                 WHERE e.call_id = ?1 AND o.sink = 'queue'",
                [&long_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("row");
        if status == "dead" {
            assert!(error.unwrap_or_default().contains("routing key"));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the poison row is {status}, not dead"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set VYORA_TEST_AMQP_URL, run with --include-ignored"]
async fn an_unroutable_message_is_not_delivered_until_a_binding_exists() {
    let exchange = unique("vyora-test-x");
    let router = router_with_amqp(&broker_url(), &exchange, "").await;
    wait_ready(&router, 200).await;
    assert_eq!(
        router
            .post_signed(&payload("call-q2", "call_completed"))
            .await
            .status,
        200
    );

    // No queue is bound: the broker returns the message and the row stays pending.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, error): (String, Option<String>) = router
            .db()
            .query_row(
                "SELECT status, last_error FROM outbox WHERE sink = 'queue'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("row");
        assert_eq!(status, "pending");
        if error.is_some_and(|e| e.contains("NO_ROUTE")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never returned as unroutable"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let consumer = Consumer::new().await;
    consumer.bind(&exchange).await;
    let (_, ids) = consumer.drain(1, WAIT).await;
    assert!(ids.contains("call-q2:call_completed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs RabbitMQ: set VYORA_TEST_AMQP_URL, run with --include-ignored"]
async fn cutting_the_connection_mid_stream_loses_none_of_2000_events() {
    let exchange = unique("vyora-test-x");
    let proxy = Proxy::start(broker_addr(), true).await;
    let router = router_with_amqp(&url_via(proxy.addr), &exchange, "max_in_flight = 64").await;
    wait_ready(&router, 200).await;
    let consumer = Consumer::new().await;
    consumer.bind(&exchange).await;

    let addr = router.addr;
    let senders: Vec<_> = (0..8)
        .map(|w| {
            tokio::spawn(async move {
                for n in 0..250 {
                    let answer =
                        post_signed(addr, &payload(&format!("cut-{w}-{n}"), "call_completed"))
                            .await;
                    assert_eq!(answer.status, 200, "acks stay fast and positive");
                }
            })
        })
        .collect();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.cut().await;
    }
    for s in senders {
        s.await.expect("sender");
    }
    let (all, ids) = consumer.drain(2000, Duration::from_secs(60)).await;
    assert_eq!(
        ids.len(),
        2000,
        "every acknowledged event reached the queue"
    );
    let connections = proxy.carried();
    assert!(
        connections >= 2,
        "the router reconnected after the cuts ({connections} connections)"
    );
    eprintln!(
        "2000 events over {connections} connections: {} messages received ({} duplicates after reconnects)",
        all.len(),
        all.len() - 2000
    );
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set VYORA_TEST_AMQP_URL, run with --include-ignored"]
async fn a_broker_down_at_start_is_connected_to_when_it_comes_up() {
    let exchange = unique("vyora-test-x");
    let proxy = Proxy::start(broker_addr(), false).await;
    let router = router_with_amqp(&url_via(proxy.addr), &exchange, "").await;
    wait_ready(&router, 503).await;
    // Acks do not depend on the broker.
    assert_eq!(
        router
            .post_signed(&payload("call-q4", "call_completed"))
            .await
            .status,
        200
    );

    let consumer = Consumer::new().await;
    consumer.bind(&exchange).await;
    proxy.set_up(true);
    wait_ready(&router, 200).await;
    let (_, ids) = consumer.drain(1, WAIT).await;
    assert!(ids.contains("call-q4:call_completed"));
    let attempts: u32 = router
        .db()
        .query_row(
            "SELECT attempts FROM outbox WHERE sink = 'queue'",
            [],
            |r| r.get(0),
        )
        .expect("row");
    assert!(
        attempts <= 2,
        "waiting for the broker used no attempts: {attempts}"
    );
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set VYORA_TEST_AMQP_URL, run with --include-ignored"]
async fn a_refused_login_is_reported_in_readiness_not_a_crash() {
    let exchange = unique("vyora-test-x");
    let mut url = reqwest::Url::parse(&broker_url()).expect("URL");
    url.set_password(Some("wrong-password")).expect("password");
    let router = router_with_amqp(url.as_str(), &exchange, "").await;
    wait_ready(&router, 503).await;
    assert_eq!(
        router
            .post_signed(&payload("call-q5", "call_completed"))
            .await
            .status,
        200
    );
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set VYORA_TEST_AMQP_URL, run with --include-ignored"]
async fn readiness_turns_503_while_the_broker_is_unreachable_and_back_to_200() {
    let exchange = unique("vyora-test-x");
    let proxy = Proxy::start(broker_addr(), true).await;
    let router = router_with_amqp(&url_via(proxy.addr), &exchange, "").await;
    wait_ready(&router, 200).await;
    // A queue takes the message: one the broker returned would keep readiness at 503.
    let consumer = Consumer::new().await;
    consumer.bind(&exchange).await;
    proxy.set_up(false);
    proxy.cut().await;
    wait_ready(&router, 503).await;
    assert_eq!(
        router
            .post_signed(&payload("call-q6", "call_completed"))
            .await
            .status,
        200
    );
    proxy.set_up(true);
    wait_ready(&router, 200).await;
    let (_, ids) = consumer.drain(1, WAIT).await;
    assert!(ids.contains("call-q6:call_completed"), "{ids:?}");
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set VYORA_TEST_AMQP_URL, run with --include-ignored"]
async fn a_missing_exchange_without_declare_shows_in_readiness() {
    let exchange = unique("vyora-test-missing");
    let router = router_with_amqp(&broker_url(), &exchange, "declare = false").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let answer = router.readyz().await.body;
        if answer.contains("NOT_FOUND") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        router
            .post_signed(&payload("call-q7", "call_completed"))
            .await
            .status,
        200
    );
}

/// The built binary, serving, with its log (text or JSON) copied to a file.
struct Binary {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    /// Copies stdout to `log` until the process exits.
    copying: JoinHandle<()>,
}

impl Binary {
    /// Starts `vyora-router serve --config <config>` and waits until it reports both
    /// listeners, in whichever log format it was given.
    async fn start(config: &Path) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vyora-router"))
            .args(["serve", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn router");
        let log = config.with_file_name("router.log");
        let mut copy = std::fs::File::create(&log).expect("create the router's log");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let (mut addr, mut admin) = (None, None);
        tokio::time::timeout(WAIT, async {
            while addr.is_none() || admin.is_none() {
                let Ok(Some(line)) = lines.next_line().await else {
                    return;
                };
                writeln!(copy, "{line}").expect("copy the log");
                addr = addr.or_else(|| reported(&line, "listening"));
                admin = admin.or_else(|| reported(&line, "admin listening"));
            }
        })
        .await
        .expect("the router reports its listeners");
        let copying = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(copy, "{line}");
            }
        });
        Binary {
            child,
            addr: addr.expect("the public listener"),
            admin: admin.expect("the admin listener"),
            log,
            copying,
        }
    }

    /// What it logged until now (lines reach the file as it writes them).
    fn log_so_far(&self) -> String {
        std::fs::read_to_string(&self.log).expect("read the router's log")
    }

    /// Stops the process and returns everything it logged.
    async fn stop(mut self) -> String {
        self.child.kill().await.expect("kill the router");
        self.copying.await.expect("the log is copied");
        std::fs::read_to_string(&self.log).expect("read the router's log")
    }
}

/// The address of the listener a log line reports as `what`, in either format.
fn reported(line: &str, what: &str) -> Option<SocketAddr> {
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(line) {
        if json["fields"]["message"] != what {
            return None;
        }
        return json["fields"]["addr"].as_str()?.parse().ok();
    }
    let (_, rest) = line.split_once(&format!(": {what} addr="))?;
    rest.split_whitespace().next()?.parse().ok()
}

/// `vyora-router deliveries list`, as an operator runs it.
fn deliveries_list(config: &Path, json: bool) -> String {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_vyora-router"));
    command.args(["deliveries", "list", "--sink", "queue", "--config"]);
    command.arg(config);
    if json {
        command.arg("--json");
    }
    let out = command.output().expect("run deliveries list");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The one delivery to `queue`, as `deliveries list --json` shows it.
fn the_delivery(config: &Path) -> serde_json::Value {
    let rows: serde_json::Value =
        serde_json::from_str(&deliveries_list(config, true)).expect("JSON rows");
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{rows}");
    rows[0].clone()
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The caller's personal data in `payload`'s body: the phone number, the contact's name,
/// the agent's name and a line of the transcript.
const PERSONAL: [&str; 4] = [
    "9876543210",
    "Rahul Sharma",
    "Home Loan Agent",
    "your home loan inquiry",
];

/// The personal data `log` carries, as text or as the byte list a `{:?}` of the body
/// prints (`[..., 57, 56, 55, ...]`).
fn personal_data_in(log: &str) -> Vec<&'static str> {
    PERSONAL
        .into_iter()
        .filter(|data| {
            let bytes = format!("{:?}", data.as_bytes());
            log.contains(data) || log.contains(bytes.trim_matches(['[', ']']))
        })
        .collect()
}

/// The real binary, logging in `format` at `level`, sends a call to an exchange with no
/// queue bound: the broker returns the message again and again. The log never carries the
/// call's data, the delivery and `/readyz` name the cause, and the delivery keeps being
/// tried without using up attempts until a queue is bound, which delivers it and makes
/// the router ready again.
async fn a_returned_message_is_explained_but_never_logged(format: &str, level: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let exchange = unique("vyora-test-x");
    let config = dir.path().join("router.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[log]\nlevel = \"{level}\"\nformat = \"{format}\"\n\n[[sinks]]\nname = \"queue\"\ntype = \"amqp\"\nurl = \"{}\"\nexchange = \"{exchange}\"\nrouting_key = \"vyora.{{event}}\"\nconfirm_timeout = \"5s\"\n",
            base_config(dir.path()),
            broker_url(),
        ),
    )
    .expect("write the config");
    let router = Binary::start(&config).await;
    wait_until("ready (connected, exchange declared)", async || {
        get(router.admin, "/readyz").await.status == 200
    })
    .await;

    let body = payload("call-returned", "call_completed");
    for data in PERSONAL {
        assert!(body.contains(data), "the payload carries {data:?}");
    }
    assert_eq!(post_signed(router.addr, &body).await.status, 200);

    // The first return is a failed attempt, whose line follows the broker's return.
    wait_until("the first return is logged", async || {
        router.log_so_far().contains("delivery failed; will retry")
    })
    .await;
    let log = router.log_so_far();
    let leaked = personal_data_in(&log);
    assert!(leaked.is_empty(), "{leaked:?} in the {format} log:\n{log}");

    let cause = format!(
        r#"returned by the broker: 312 NO_ROUTE: no queue bound to exchange "{exchange}" for routing key "vyora.call_completed""#
    );
    // Returned, then tried again and again (postponed): with attempts counted, this
    // config's 12 attempts 50-200 ms apart would have made it dead by now.
    wait_until("the delivery is returned three times", async || {
        let samples = scrape(router.admin).await;
        metric(
            &samples,
            "vyora_router_deliveries_total",
            &[("sink", "queue"), ("outcome", "postponed")],
        ) >= 3.0
    })
    .await;
    let row = the_delivery(&config);
    assert_eq!(row["status"], "pending", "{row}");
    assert_eq!(row["attempts"], 1, "only the first return counts: {row}");
    assert_eq!(row["last_error"], cause.as_str(), "{row}");
    let table = deliveries_list(&config, false);
    assert!(table.contains(&cause), "deliveries list:\n{table}");

    let ready = get(router.admin, "/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert_eq!(
        ready.json()["problems"]["sink:queue"],
        cause.as_str(),
        "{}",
        ready.body
    );

    let consumer = Consumer::new().await;
    consumer.bind(&exchange).await;
    let (_, ids) = consumer.drain(1, WAIT).await;
    assert!(ids.contains("call-returned:call_completed"), "{ids:?}");
    wait_until("ready again once a message is routed", async || {
        get(router.admin, "/readyz").await.status == 200
    })
    .await;
    wait_until("deliveries list shows it delivered", async || {
        the_delivery(&config)["status"] == "delivered"
    })
    .await;

    let log = router.stop().await;
    let leaked = personal_data_in(&log);
    assert!(leaked.is_empty(), "{leaked:?} in the {format} log:\n{log}");
    // What the log says instead: the sink, the delivery, the broker's reply and where.
    let warning = log
        .lines()
        .find(|l| l.contains("the broker returns messages sent with this routing key"))
        .unwrap_or_else(|| panic!("no line about the returned message:\n{log}"));
    for field in [
        "queue",
        "312",
        "NO_ROUTE",
        exchange.as_str(),
        "vyora.call_completed",
    ] {
        assert!(warning.contains(field), "{field} missing: {warning}");
    }
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set VYORA_TEST_AMQP_URL, run with --include-ignored"]
async fn returned_messages_stay_out_of_the_text_log_and_their_cause_shows_until_a_queue_is_bound() {
    a_returned_message_is_explained_but_never_logged("text", "info").await;
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set VYORA_TEST_AMQP_URL, run with --include-ignored"]
async fn returned_messages_stay_out_of_the_json_log_even_at_trace_level() {
    a_returned_message_is_explained_but_never_logged("json", "trace").await;
}
