//! The HTTP sink against a real downstream server: re-signing, retries, a destination
//! that is down, Retry-After, redirects, dead letters and replay, filters, redaction,
//! per-call ordering, memory.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::downstream::{Downstream, Reply};
use common::process;
use common::*;
use vyora_router::signature::{self, Secret};
use vyora_router::store::operator::Replay;

const WAIT: Duration = Duration::from_secs(15);
const SINK_SECRET: &str = "downstream-secret";

async fn router_with_http_sink(downstream: &Downstream, extra: &str) -> TestRouter {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = format!(
        "{}\n[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"{}\"\nsecret = \"{SINK_SECRET}\"\ntimeout = \"2s\"\nconcurrency = 4\nheaders = {{ \"Authorization\" = \"Bearer t0ken\" }}\n{extra}\n",
        base_config(dir.path()),
        downstream.url("/hooks/vyora"),
    );
    TestRouter::start_with(dir, &config).await
}

fn status_of(router: &TestRouter, key: &str) -> (String, u32, Option<String>) {
    router
        .db()
        .query_row(
            "SELECT o.status, o.attempts, o.last_error FROM outbox o JOIN events e ON e.id = o.event_id
             WHERE o.sink = 'crm' AND e.dedup_key = ?1",
            [key],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("an outbox row")
}

async fn wait_status(
    router: &TestRouter,
    key: &str,
    status: &str,
) -> (String, u32, Option<String>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let row = status_of(router, key);
        if row.0 == status {
            return row;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} never became {status}: {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the sink says it is paused for `why`, in /readyz and in its gauge.
async fn wait_paused(router: &TestRouter, why: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !router.readyz().await.body.contains(why) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness never showed the pause ({why})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = metric(
        &router.scrape().await,
        "vyora_router_sink_ready",
        &[("sink", "crm")],
    );
    assert_eq!(ready, 0.0);
}

/// Sends `call_completed` for calls `<prefix>-0` .. `<prefix>-<n-1>`, each acknowledged;
/// returns their dedup keys.
async fn accept_calls(router: &TestRouter, prefix: &str, n: usize) -> Vec<String> {
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let call = format!("{prefix}-{i}");
        let body = payload(&call, "call_completed");
        assert_eq!(router.post_signed(&body).await.status, 200);
        keys.push(format!("{call}:call_completed"));
    }
    keys
}

/// How many of the requests the downstream received carried `key`.
fn requests_for(received: &[common::downstream::Received], key: &str) -> usize {
    received
        .iter()
        .filter(|r| r.header("idempotency-key") == Some(key))
        .count()
}

#[tokio::test]
async fn the_forwarded_body_is_byte_identical_and_re_signed_with_the_sinks_secret() {
    let downstream = Downstream::start(|_, _| Reply::Status(200)).await;
    let router = router_with_http_sink(&downstream, "").await;
    let body = payload("call-h1", "call_completed");
    assert_eq!(router.post_signed(&body).await.status, 200);

    let got = downstream.wait_for(1, WAIT).await;
    let r = &got[0];
    assert_eq!(r.path, "/hooks/vyora");
    assert_eq!(&r.body[..], body.as_bytes(), "byte-identical");
    let sink_secret = Secret::new(SINK_SECRET.as_bytes()).expect("secret");
    let sig = r.header("x-vyora-signature").expect("signed").as_bytes();
    assert_eq!(signature::verify(&[sink_secret], Some(sig), &r.body), Ok(0));
    assert_eq!(r.header("x-vyora-event"), Some("call_completed"));
    assert_eq!(r.header("idempotency-key"), Some("call-h1:call_completed"));
    assert_eq!(r.header("x-vyora-source"), Some("webhook"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("authorization"), Some("Bearer t0ken"));
    assert!(
        r.header("user-agent")
            .is_some_and(|ua| ua.starts_with("vyora-router/"))
    );
    wait_status(&router, "call-h1:call_completed", "delivered").await;
}

#[tokio::test]
async fn a_500_twice_then_200_is_delivered_exactly_once() {
    let downstream = Downstream::start(|_, i| Reply::Status(if i < 2 { 500 } else { 200 })).await;
    let router = router_with_http_sink(&downstream, "").await;
    assert_eq!(
        router
            .post_signed(&payload("call-h2", "call_completed"))
            .await
            .status,
        200
    );
    let (_, attempts, error) = wait_status(&router, "call-h2:call_completed", "delivered").await;
    assert_eq!(attempts, 3);
    assert_eq!(error, None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(downstream.received().len(), 3, "no request after the 200");
}

#[tokio::test]
async fn each_failed_attempt_is_kept_with_its_status_and_answer_and_so_is_the_success_after_them() {
    let downstream = Downstream::start(|_, i| {
        if i < 2 {
            Reply::Json(503, serde_json::json!({ "error": format!("busy {i}") }))
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let router = router_with_http_sink(&downstream, "").await;
    // A first-time success keeps no history (delivery.record_successes is off).
    assert_eq!(
        router
            .post_signed(&payload("call-h3", "call_started"))
            .await
            .status,
        200
    );
    assert_eq!(
        router
            .post_signed(&payload("call-h3", "call_completed"))
            .await
            .status,
        200
    );
    wait_status(&router, "call-h3:call_completed", "delivered").await;

    let events = router
        .operator_store()
        .await
        .show_events("call-h3")
        .await
        .expect("shown");
    let history = |event: &str| {
        let e = events.iter().find(|e| e.event == event).expect("the event");
        let crm = e.deliveries.iter().find(|d| d.sink == "crm").expect("crm");
        crm.history
            .iter()
            .map(|a| {
                (
                    a.number,
                    a.outcome.clone(),
                    a.code,
                    a.response.clone().unwrap_or_default(),
                )
            })
            .collect::<Vec<_>>()
    };
    // The downstream's first two answers went to call_started, which then waited for its
    // retry; call_completed waited behind it and went out once, first time.
    assert_eq!(
        history("call_started"),
        [
            (
                1,
                "retried".into(),
                Some(503),
                r#"{"error":"busy 0"}"#.into()
            ),
            (
                2,
                "retried".into(),
                Some(503),
                r#"{"error":"busy 1"}"#.into()
            ),
            (3, "delivered".into(), None, String::new()),
        ]
    );
    assert_eq!(history("call_completed"), []);
    let started = events
        .iter()
        .find(|e| e.event == "call_started")
        .expect("the event");
    let crm = started.deliveries.iter().find(|d| d.sink == "crm");
    let first = &crm.expect("crm").history[0];
    assert!(
        first.error.as_deref().is_some_and(|e| e.contains("503")),
        "{first:?}"
    );
    assert!(
        first.at.ends_with('Z') && first.at.contains('.'),
        "{first:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_delivery_is_sent_once_per_attempt_until_it_goes_dead() {
    const EVENTS: usize = 40;
    const MAX_ATTEMPTS: usize = 4;
    let downstream = Downstream::start(|_, _| Reply::Status(500)).await;
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = format!(
        // No circuit breaker: 40 events failing together would open it, and this test
        // counts every attempt up to the dead letter.
        "{}\n[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"{}\"\nconcurrency = 4\n\
         circuit_breaker = {{ failures = 0 }}\n",
        base_config(dir.path()).replace(
            "[delivery]\n",
            &format!("[delivery]\nmax_attempts = {MAX_ATTEMPTS}\n")
        ),
        downstream.url("/hooks/vyora"),
    );
    let router = TestRouter::start_with(dir, &config).await;
    let keys = accept_calls(&router, "call-once", EVENTS).await;
    for key in &keys {
        let (_, attempts, _) = wait_status(&router, key, "dead").await;
        assert_eq!(attempts as usize, MAX_ATTEMPTS, "{key}");
    }
    // Anything sent twice for one attempt would have arrived by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = downstream.received();
    for key in &keys {
        assert_eq!(
            requests_for(&received, key),
            MAX_ATTEMPTS,
            "requests for {key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_refusing_connections_costs_no_attempts_and_gets_everything_once_it_listens()
{
    const EVENTS: usize = 30;
    // Bound but not listening: connections are refused, and no other listener (the
    // router's own, on port 0) can take the port before the downstream comes up on it.
    let reserved = tokio::net::TcpSocket::new_v4().expect("socket");
    reserved
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    let addr = reserved.local_addr().expect("addr");
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    // Two attempts at 50-200 ms apart: counted as failures, these events would be dead
    // within a second.
    let config = format!(
        "{}\n[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"http://{addr}/hooks/vyora\"\nconcurrency = 4\n",
        base_config(dir.path()).replace("[delivery]\n", "[delivery]\nmax_attempts = 2\n"),
    );
    let router = TestRouter::start_with(dir, &config).await;
    let keys = accept_calls(&router, "call-down", EVENTS).await;
    wait_paused(&router, "cannot connect").await;
    // Long enough for several probes, and for max_attempts to run out ten times over.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for key in &keys {
        let (status, attempts, _) = status_of(&router, key);
        assert_eq!((status.as_str(), attempts), ("pending", 0), "{key}");
    }

    drop(reserved);
    let downstream = Downstream::start_on(addr, |_, _| Reply::Status(200)).await;
    for key in &keys {
        wait_status(&router, key, "delivered").await;
    }
    let received = downstream.received();
    for key in &keys {
        assert_eq!(requests_for(&received, key), 1, "requests for {key}");
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while router.readyz().await.status != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready again after the destination came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn retry_after_from_the_downstream_is_honoured() {
    // Our own first backoff is at most 50 ms; the downstream asks for 2 s.
    let downstream = Downstream::start(|_, i| {
        if i == 0 {
            Reply::StatusWith(503, vec![("retry-after", "2".into())])
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = format!(
        "{}\n[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"{}\"\n",
        base_config(dir.path()).replace("backoff_max = \"200ms\"", "backoff_max = \"10s\""),
        downstream.url("/hooks/vyora"),
    );
    let router = TestRouter::start_with(dir, &config).await;
    assert_eq!(
        router
            .post_signed(&payload("call-h3", "call_completed"))
            .await
            .status,
        200
    );
    downstream.wait_for(1, WAIT).await;
    wait_paused(&router, "Retry-After").await;
    let got = downstream.wait_for(2, WAIT).await;
    let gap = got[1].at - got[0].at;
    assert!(gap >= Duration::from_millis(1950), "retried after {gap:?}");
    wait_status(&router, "call-h3:call_completed", "delivered").await;
    assert_eq!(
        router.readyz().await.status,
        200,
        "ready again after the pause"
    );
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_counts_as_a_failure() {
    let downstream = Downstream::start(|r, _| {
        if r.path == "/hooks/vyora" && r.headers.get("x-test-moved").is_none() {
            Reply::StatusWith(302, vec![("location", "/elsewhere".into())])
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let router = router_with_http_sink(&downstream, "").await;
    assert_eq!(
        router
            .post_signed(&payload("call-h4", "call_completed"))
            .await
            .status,
        200
    );
    let got = downstream.wait_for(2, WAIT).await;
    assert!(
        got.iter().all(|r| r.path == "/hooks/vyora"),
        "the redirect was followed"
    );
    let (status, attempts, error) = status_of(&router, "call-h4:call_completed");
    assert_eq!(status, "pending");
    assert!(attempts >= 1);
    assert!(error.unwrap_or_default().contains("302"));
}

#[tokio::test]
async fn a_400_goes_dead_at_once_and_replay_delivers_it_once_fixed() {
    let downstream = Downstream::start(|_, _| Reply::Status(400)).await;
    let router = router_with_http_sink(&downstream, "").await;
    assert_eq!(
        router
            .post_signed(&payload("call-h5", "call_completed"))
            .await
            .status,
        200
    );
    let (_, attempts, error) = wait_status(&router, "call-h5:call_completed", "dead").await;
    assert_eq!(attempts, 1, "no retry of a permanent failure");
    let error = error.unwrap_or_default();
    assert!(
        error.contains("400") && error.contains("downstream answered 400"),
        "{error}"
    );

    downstream.set_script(|_, _| Reply::Status(200));
    // As the operator's command does: its own handle on the same database.
    let store = router.operator_store().await;
    let done = store.replay("crm", &Replay::dead()).await.expect("replay");
    assert_eq!(done.replayed, 1, "{done:?}");
    store.close().await;
    wait_status(&router, "call-h5:call_completed", "delivered").await;
    assert_eq!(downstream.received().len(), 2);
}

#[tokio::test]
async fn a_timeout_is_retried() {
    let downstream = Downstream::start(|_, i| {
        if i == 0 {
            Reply::Slow(Duration::from_secs(3))
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let router = router_with_http_sink(&downstream, "").await; // timeout = "2s"
    assert_eq!(
        router
            .post_signed(&payload("call-h6", "call_completed"))
            .await
            .status,
        200
    );
    let (_, attempts, _) = wait_status(&router, "call-h6:call_completed", "delivered").await;
    assert_eq!(attempts, 2);
}

#[tokio::test]
async fn a_filter_selects_events_and_redaction_hides_fields_from_the_sink_only() {
    let downstream = Downstream::start(|_, _| Reply::Status(200)).await;
    let extra = "filter = { classification = [\"Interested\"] }\nredact = [\"transcript\", \"phone_number\"]";
    let router = router_with_http_sink(&downstream, extra).await;

    let interested = payload("call-h7", "all_processing_completed");
    let not_interested = interested
        .replace("call-h7", "call-h8")
        .replace("\"Interested\"", "\"Not Interested\"");
    assert_eq!(router.post_signed(&interested).await.status, 200);
    assert_eq!(router.post_signed(&not_interested).await.status, 200);

    let got = downstream.wait_for(1, WAIT).await;
    wait_for_lines(&router.events_file(), 2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        downstream.received().len(),
        1,
        "the filter let only one through"
    );
    let sent = got[0].json();
    assert_eq!(sent["call_id"], "call-h7");
    assert!(sent.get("transcript").is_none());
    assert_eq!(sent["phone_number"], "+********3210");
    assert_eq!(
        sent["contact_name"], "Rahul Sharma",
        "fields not listed stay"
    );
    let sink_secret = Secret::new(SINK_SECRET.as_bytes()).expect("secret");
    let sig = got[0]
        .header("x-vyora-signature")
        .expect("signed")
        .as_bytes();
    assert_eq!(
        signature::verify(&[sink_secret], Some(sig), &got[0].body),
        Ok(0),
        "signed over the redacted bytes"
    );

    let stored = router.stored_payload("call-h7:all_processing_completed");
    assert_eq!(
        stored,
        interested.as_bytes(),
        "the store keeps the original"
    );
}

#[tokio::test]
async fn a_calls_later_event_waits_for_its_earlier_one_while_other_calls_go_on() {
    // The first call's first event fails three times; everything else succeeds.
    let downstream = Downstream::start(|_, _| Reply::Status(200)).await;
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let f = Arc::clone(&failures);
    downstream.set_script(move |r, _| {
        let first_of_c1 = r.header("idempotency-key") == Some("call-o1:call_completed");
        if first_of_c1 && f.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 3 {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    });
    let router = router_with_http_sink(&downstream, "").await;
    for (call, event) in [
        ("call-o1", "call_completed"),
        ("call-o1", "all_processing_completed"),
        ("call-o2", "call_completed"),
    ] {
        assert_eq!(router.post_signed(&payload(call, event)).await.status, 200);
    }
    wait_status(&router, "call-o1:all_processing_completed", "delivered").await;
    let keys: Vec<String> = downstream
        .received()
        .iter()
        .filter_map(|r| r.header("idempotency-key").map(str::to_owned))
        .collect();
    let pos = |k: &str, nth: usize| {
        keys.iter()
            .enumerate()
            .filter(|(_, x)| *x == k)
            .nth(nth)
            .map(|(i, _)| i)
            .unwrap_or_else(|| panic!("{k} #{nth} not in {keys:?}"))
    };
    // The second call was not held up by the first one's retries.
    assert!(
        pos("call-o2:call_completed", 0) < pos("call-o1:call_completed", 3),
        "{keys:?}"
    );
    // The first call's analysis went out only after its call_completed succeeded.
    assert!(
        pos("call-o1:all_processing_completed", 0) > pos("call-o1:call_completed", 3),
        "{keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_failing_throughout_keeps_memory_flat_while_ten_thousand_events_are_accepted() {
    let downstream = Downstream::start(|_, _| Reply::Status(500)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!(
        "[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"{}\"\nconcurrency = 4\n",
        downstream.url("/hooks/vyora")
    );
    let config = process::write_config(dir.path(), &extra);
    let (child, addr) = process::spawn_router(&config).await;
    let pid = child.id().expect("pid");
    // Warm up: the same paths once, so allocator pools exist before the first reading.
    for i in 0..200 {
        post_signed(addr, &payload(&format!("warm-{i}"), "call_completed")).await;
    }
    let before = process::rss_kb(pid);
    let senders: Vec<_> = (0..16)
        .map(|w| {
            tokio::spawn(async move {
                for n in 0..625 {
                    let answer =
                        post_signed(addr, &payload(&format!("mem-{w}-{n}"), "call_completed"))
                            .await;
                    assert_eq!(answer.status, 200);
                }
            })
        })
        .collect();
    for s in senders {
        s.await.expect("sender");
    }
    let after = process::rss_kb(pid);
    // Every event is still waiting, or (the first ones, at this test's short backoff)
    // dead: none lost, none delivered.
    let waiting: i64 = rusqlite::Connection::open(dir.path().join("router.db"))
        .expect("db")
        .query_row(
            "SELECT COUNT(*) FROM outbox WHERE sink = 'crm' AND status IN ('pending', 'dead')",
            [],
            |r| r.get(0),
        )
        .expect("count");
    eprintln!(
        "router RSS before {before} kB, after 10,000 more events with the sink failing {after} kB; {waiting} pending or dead"
    );
    assert_eq!(waiting, 10_200, "the backlog is in the store");
    assert!(
        downstream.max_in_flight() <= 4,
        "concurrency bounded: {}",
        downstream.max_in_flight()
    );
    // 10,000 payloads are 15 MB; holding the backlog in memory would show.
    assert!(
        after.saturating_sub(before) < 8 * 1024,
        "RSS grew by {} kB",
        after.saturating_sub(before)
    );
}
