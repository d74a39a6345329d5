//! Per-sink flow control against a real downstream server: a rate limit that makes
//! deliveries wait without failing, and a circuit breaker that stops trying a destination
//! failing everything, uses no attempts while open, and closes on a delivered probe.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::downstream::{Downstream, Reply};
use common::*;

async fn router_with(downstream: &Downstream, sink_keys: &str) -> TestRouter {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = format!(
        "{}\n[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"{}\"\n{sink_keys}\n",
        base_config(dir.path()),
        downstream.url("/in"),
    );
    TestRouter::start_with(dir, &config).await
}

/// Posts `n` events of distinct calls from 16 concurrent senders.
async fn post_calls(router: &TestRouter, n: usize) {
    let senders: Vec<_> = (0..16)
        .map(|s| {
            let addr = router.addr;
            tokio::spawn(async move {
                for i in (s..n).step_by(16) {
                    let body = payload(&format!("call-{i}"), "call_completed");
                    assert_eq!(post_signed(addr, &body).await.status, 200);
                }
            })
        })
        .collect();
    for s in senders {
        s.await.expect("sender");
    }
}

fn crm(samples: &[prometheus_parse::Sample], name: &str) -> f64 {
    metric(samples, name, &[("sink", "crm")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_events_to_a_sink_limited_to_100_a_second_take_ten_seconds_and_none_fails() {
    let downstream = Downstream::start(|_, _| Reply::Status(200)).await;
    let router = router_with(&downstream, "rate_limit = \"100/s\"").await;
    post_calls(&router, 1_000).await;
    let received = downstream.wait_for(1_000, Duration::from_secs(30)).await;
    let took = received[999].at - received[0].at;
    eprintln!("1,000 deliveries at 100/s took {took:?}");
    assert!(
        took >= Duration::from_secs(9) && took <= Duration::from_secs(11),
        "{took:?}"
    );
    let samples = router.scrape().await;
    assert_eq!(
        metric(
            &samples,
            "vyora_router_deliveries_total",
            &[("sink", "crm"), ("outcome", "retried")]
        ),
        0.0,
        "waiting for the limit is not a failure"
    );
    assert!(crm(&samples, "vyora_router_sink_rate_limit_wait_seconds_total") > 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_destination_failing_everything_opens_the_breaker_which_uses_no_attempts_until_a_probe_closes_it()
 {
    let up = Arc::new(AtomicBool::new(false));
    let answer = Arc::clone(&up);
    let downstream = Downstream::start(move |_, _| {
        if answer.load(Ordering::SeqCst) {
            Reply::Status(200)
        } else {
            Reply::Status(503)
        }
    })
    .await;
    let router = router_with(
        &downstream,
        "concurrency = 1\ncircuit_breaker = { failures = 5, cool_down = \"1s\" }",
    )
    .await;
    post_calls(&router, 20).await;

    // Opened after 5 failures in a row: /readyz and the gauge say so.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ready = router.readyz().await;
        if ready.status == 503 && ready.body.contains("circuit open") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", ready.body);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        crm(&router.scrape().await, "vyora_router_sink_circuit_open"),
        1.0
    );
    let opened_at = downstream.count();
    assert!(opened_at >= 5, "opened after {opened_at} attempts");

    // Open for 3 s: one probe a cool-down, nothing more, and no delivery used an attempt
    // beyond them (a default max_attempts would have killed them all by now).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let while_open = downstream.count() - opened_at;
    assert!(while_open <= 4, "{while_open} requests while open");
    let attempts: i64 =
        router.count("SELECT COALESCE(SUM(attempts), 0) FROM outbox WHERE sink = 'crm'");
    assert!(
        attempts <= i64::try_from(opened_at + while_open).expect("fits"),
        "{attempts} attempts used"
    );
    assert_eq!(
        router.count("SELECT count(*) FROM outbox WHERE sink = 'crm' AND status = 'dead'"),
        0
    );

    // The destination recovers: the next probe closes the breaker and all 20 arrive.
    up.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while router.count("SELECT count(*) FROM outbox WHERE sink = 'crm' AND status = 'delivered'")
        < 20
    {
        assert!(tokio::time::Instant::now() < deadline, "not all delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(router.readyz().await.status, 200);
    assert_eq!(
        crm(&router.scrape().await, "vyora_router_sink_circuit_open"),
        0.0
    );
}
