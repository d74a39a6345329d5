//! The RabbitMQ sink against a real broker, with a TCP proxy in between to cut the
//! connection or play a broker that is down.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::amqp::{Consumer, broker_addr, broker_url, unique, url_via};
use common::proxy::Proxy;
use common::*;
use lapin::types::AMQPValue;

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
