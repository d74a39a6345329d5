//! The missed-analysis poller against a fake Vyora API served by the test (a real HTTP
//! server on port 0) that checks the API key, answers as each test scripts it, and records
//! every request with its time.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::downstream::{Downstream, Received, Reply};
use common::*;
use tokio::time::Instant;
use vyora_router::api::RateLimiter;

const API_KEY: &str = "vya_test_key";
const WAIT: Duration = Duration::from_secs(15);

/// A call record as `GET /v1/calls/:id` returns it; with or without the analysis.
fn record(call_id: &str, analysed: bool) -> serde_json::Value {
    let mut r = serde_json::json!({
        "call_id": call_id,
        "agent_id": "def456",
        "agent_name": "Home Loan Agent",
        "status": "completed",
        "direction": "outbound",
        "duration_seconds": 47,
        "transcript": [{"bot": "Hi"}, {"user": "Hello"}],
        "analysis": null,
        "called_at": "2026-05-24T10:30:00Z"
    });
    if analysed {
        r["analysis"] = serde_json::json!({"summary": "Interested in EMI options.", "classification": "Interested"});
    }
    r
}

fn call_of(r: &Received) -> Option<String> {
    r.path.strip_prefix("/v1/calls/").map(str::to_owned)
}

/// Answers 401 without the right key, otherwise what `script` says.
fn api(
    script: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static,
) -> impl Fn(&Received, usize) -> Reply + Send + Sync + 'static {
    move |r, i| {
        if r.header("x-api-key") != Some(API_KEY) {
            return Reply::Json(401, serde_json::json!({"error": "Invalid API key"}));
        }
        script(r, i)
    }
}

fn poller_config(dir: &std::path::Path, api: &Downstream, extra: &str) -> String {
    format!(
        "{}\n[api]\nbase_url = \"{}\"\napi_key = \"{API_KEY}\"\ntimeout = \"2s\"\n{extra}\n[poller]\nenabled = true\nwait_for_analysis = \"300ms\"\ninterval = \"200ms\"\ngive_up_after = \"5s\"\n",
        base_config(dir),
        api.url("")
    )
}

async fn router(api: &Downstream, extra: &str) -> TestRouter {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = poller_config(dir.path(), api, extra);
    TestRouter::start_with(dir, &config).await
}

/// A fake API whose calls all have their analysis.
async fn ready_api() -> Downstream {
    Downstream::start(api(|r, _| {
        Reply::Json(200, record(&call_of(r).unwrap_or_default(), true))
    }))
    .await
}

fn requests_for(api: &Downstream, call: &str) -> Vec<Received> {
    api.received()
        .into_iter()
        .filter(|r| call_of(r).as_deref() == Some(call))
        .collect()
}

#[tokio::test]
async fn a_call_without_its_analysis_webhook_is_polled_and_the_analysis_reaches_the_sinks() {
    // Not ready for the first two polls, then the analysis is there.
    let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let api = Downstream::start(api_script_counting(polls)).await;
    let router = router(&api, "").await;
    let sent = Instant::now();
    assert_eq!(
        router
            .post_signed(&payload("call-p1", "call_completed"))
            .await
            .status,
        200
    );

    let lines = wait_for_lines(&router.events_file(), 2, WAIT).await;
    let recovered = &lines[1];
    assert_eq!(recovered["id"], "call-p1:all_processing_completed");
    assert_eq!(recovered["source"], "poll");
    assert_eq!(recovered["payload"]["event"], "all_processing_completed");
    assert_eq!(
        recovered["payload"]["analysis"]["classification"],
        "Interested"
    );
    let first_poll = requests_for(&api, "call-p1")[0].at;
    assert!(
        first_poll - sent >= Duration::from_millis(300),
        "polled after {:?}",
        first_poll - sent
    );
    assert_eq!(
        requests_for(&api, "call-p1").len(),
        3,
        "polled until ready, then no more"
    );

    // The real webhook, late, is a duplicate.
    let late = router
        .post_signed(&payload("call-p1", "all_processing_completed"))
        .await;
    assert_eq!(
        late.json(),
        serde_json::json!({"received": true, "duplicate": true})
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(read_lines(&router.events_file()).len(), 2);
    assert_eq!(requests_for(&api, "call-p1").len(), 3);
}

/// Not ready on a call's first two polls, ready from the third.
fn api_script_counting(
    polls: Arc<std::sync::atomic::AtomicUsize>,
) -> impl Fn(&Received, usize) -> Reply + Send + Sync + 'static {
    api(move |r, _| {
        let call = call_of(r).unwrap_or_default();
        let n = polls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Reply::Json(200, record(&call, n >= 2))
    })
}

#[tokio::test]
async fn a_call_that_never_reported_completion_gets_call_completed_then_the_analysis() {
    let api = ready_api().await;
    let router = router(&api, "").await;
    assert_eq!(
        router
            .post_signed(&payload("call-p2", "call_started"))
            .await
            .status,
        200
    );
    let lines = wait_for_lines(&router.events_file(), 3, WAIT).await;
    let ids: Vec<_> = lines
        .iter()
        .map(|l| (l["id"].clone(), l["source"].clone()))
        .collect();
    assert_eq!(
        ids,
        [
            ("call-p2:call_started".into(), "webhook".into()),
            ("call-p2:call_completed".into(), "poll".into()),
            ("call-p2:all_processing_completed".into(), "poll".into()),
        ]
    );
}

#[tokio::test]
async fn a_call_whose_analysis_arrived_by_webhook_is_never_polled() {
    let api = ready_api().await;
    let router = router(&api, "").await;
    assert_eq!(
        router
            .post_signed(&payload("call-p3", "call_completed"))
            .await
            .status,
        200
    );
    assert_eq!(
        router
            .post_signed(&payload("call-p3", "all_processing_completed"))
            .await
            .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(requests_for(&api, "call-p3").is_empty());
}

/// The most requests in any half-open window of `window`.
fn max_in_window(times: &[Instant], window: Duration) -> usize {
    let mut best = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= window {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

#[tokio::test(start_paused = true)]
async fn the_limiter_never_lets_a_sixty_second_window_hold_more_than_the_limit() {
    let limiter = std::sync::Arc::new(RateLimiter::new(60, Duration::from_secs(60)));
    let tasks: Vec<_> = (0..500)
        .map(|_| {
            let limiter = std::sync::Arc::clone(&limiter);
            tokio::spawn(async move {
                limiter.acquire().await;
                Instant::now()
            })
        })
        .collect();
    let mut times = Vec::new();
    for t in tasks {
        times.push(t.await.expect("task"));
    }
    times.sort();
    assert_eq!(max_in_window(&times, Duration::from_secs(60)), 60);
    // And it is not slower than it must be: 500 requests in just over 8 windows, each
    // with the margin.
    let span = *times.last().expect("times") - times[0];
    let window = Duration::from_secs(60) + vyora_router::api::BUDGET_MARGIN;
    assert!(span < window * 8 + Duration::from_secs(1), "{span:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_500_calls_waiting_no_minute_holds_more_requests_than_the_limit() {
    // Never ready: without a limiter the poller would ask for every call every 200 ms.
    let api = Downstream::start(api(|r, _| {
        Reply::Json(200, record(&call_of(r).unwrap_or_default(), false))
    }))
    .await;
    let router = router(&api, "requests_per_minute = 120").await;
    let addr = router.addr;
    let senders: Vec<_> = (0..10)
        .map(|w| {
            tokio::spawn(async move {
                for n in 0..50 {
                    assert_eq!(
                        post_signed(addr, &payload(&format!("rl-{w}-{n}"), "call_completed"))
                            .await
                            .status,
                        200
                    );
                }
            })
        })
        .collect();
    for s in senders {
        s.await.expect("sender");
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let times: Vec<Instant> = api.received().iter().map(|r| r.at).collect();
    let busiest = max_in_window(&times, Duration::from_secs(60));
    eprintln!(
        "{} requests for 500 waiting calls, at most {busiest} in any 60 s window",
        times.len()
    );
    assert!(busiest <= 120, "{busiest} requests in one window");
    assert!(busiest >= 100, "the poller used its allowance: {busiest}");
}

#[tokio::test]
async fn retry_after_on_429_is_honoured() {
    let api = Downstream::start(api(|r, i| {
        if i == 0 {
            Reply::StatusWith(429, vec![("retry-after", "2".into())])
        } else {
            Reply::Json(200, record(&call_of(r).unwrap_or_default(), true))
        }
    }))
    .await;
    let router = router(&api, "").await;
    assert_eq!(
        router
            .post_signed(&payload("call-p5", "call_completed"))
            .await
            .status,
        200
    );
    wait_for_lines(&router.events_file(), 2, WAIT).await;
    let got = api.received();
    assert!(
        got[1].at - got[0].at >= Duration::from_millis(1950),
        "asked again after {:?}",
        got[1].at - got[0].at
    );
}

/// The result of the first poll of `call`, once it is recorded.
async fn first_poll_result(router: &TestRouter, call: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let result: Option<String> = router
            .db()
            .query_row(
                "SELECT last_result FROM polls WHERE call_id = ?1 AND polls > 0",
                [call],
                |r| r.get(0),
            )
            .unwrap_or(None);
        if let Some(result) = result {
            return result;
        }
        assert!(Instant::now() < deadline, "no poll of {call} recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_retry_after_of_centuries_neither_kills_the_poller_nor_shows_it_ready_when_dead() {
    // Seconds that fit a u64 but overflow any clock they are added to.
    let api = Downstream::start(api(|_, _| {
        Reply::StatusWith(429, vec![("retry-after", "10000000000000000000".into())])
    }))
    .await;
    let router = router(&api, "").await;
    assert_eq!(
        router
            .post_signed(&payload("call-ra", "call_completed"))
            .await
            .status,
        200
    );
    api.wait_for(1, WAIT).await;
    // A poller that died on the 429 would now be waiting to be restarted (1 s).
    tokio::time::sleep(Duration::from_millis(500)).await;

    let ready = router.readyz().await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    let metrics = get(router.admin, "/metrics").await.body;
    assert!(
        metrics.contains("vyora_router_poller_restarts_total 0\n"),
        "{metrics}"
    );
    assert_eq!(api.received().len(), 1, "the pause holds the next poll");
}

#[tokio::test]
async fn a_two_mebibyte_answer_fails_the_poll_with_a_clear_error() {
    let api = Downstream::start(api(|r, _| {
        let mut huge = record(&call_of(r).unwrap_or_default(), true);
        huge["transcript"] = serde_json::json!("x".repeat(2 * 1024 * 1024));
        Reply::Json(200, huge)
    }))
    .await;
    let router = router(&api, "").await;
    assert_eq!(
        router
            .post_signed(&payload("call-big", "call_completed"))
            .await
            .status,
        200
    );
    assert_eq!(
        first_poll_result(&router, "call-big").await,
        "poll failed: the answer is larger than 1048576 bytes"
    );
    assert_eq!(
        read_lines(&router.events_file()).len(),
        1,
        "nothing recovered"
    );
    assert_eq!(router.readyz().await.status, 200);
}

#[tokio::test]
async fn a_404_stops_polling_that_call() {
    let api = Downstream::start(api(|r, _| {
        if r.path.ends_with("/call-gone") {
            Reply::Json(404, serde_json::json!({"error": "Call not found"}))
        } else {
            Reply::Json(200, record(&call_of(r).unwrap_or_default(), false))
        }
    }))
    .await;
    let router = router(&api, "").await;
    assert_eq!(
        router
            .post_signed(&payload("call-gone", "call_completed"))
            .await
            .status,
        200
    );
    api.wait_for(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(requests_for(&api, "call-gone").len(), 1);
    let status: String = router
        .db()
        .query_row(
            "SELECT status FROM polls WHERE call_id = 'call-gone'",
            [],
            |r| r.get(0),
        )
        .expect("tracked");
    assert_eq!(status, "not_found");
}

#[tokio::test]
async fn a_refused_api_key_stops_all_polling_and_degrades_readiness() {
    let api =
        Downstream::start(|_, _| Reply::Json(401, serde_json::json!({"error": "Invalid API key"})))
            .await;
    let router = router(&api, "").await;
    for call in ["call-k1", "call-k2", "call-k3"] {
        assert_eq!(
            router
                .post_signed(&payload(call, "call_completed"))
                .await
                .status,
            200
        );
    }
    api.wait_for(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(api.received().len(), 1, "one refusal stops every poll");
    let ready = router.readyz().await;
    assert_eq!(ready.status, 503);
    assert!(
        ready.body.contains("poller") && ready.body.contains("API key"),
        "{}",
        ready.body
    );
}

#[tokio::test]
async fn a_restart_resumes_the_schedule_without_polling_early() {
    let api = ready_api().await;
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = poller_config(dir.path(), &api, "").replace(
        "wait_for_analysis = \"300ms\"",
        "wait_for_analysis = \"2s\"",
    );
    let router = TestRouter::start_with(Arc::clone(&dir), &config).await;
    let sent = Instant::now();
    assert_eq!(
        router
            .post_signed(&payload("call-p8", "call_completed"))
            .await
            .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    router.stop().await;
    assert!(api.received().is_empty());

    let router = TestRouter::start_with(dir, &config).await;
    wait_for_lines(&router.events_file(), 2, WAIT).await;
    let first = requests_for(&api, "call-p8")[0].at;
    assert!(
        first - sent >= Duration::from_millis(1950),
        "polled {:?} after the event",
        first - sent
    );
}

fn run_cli(config: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vyora-router"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("VYORA_API_KEY")
        .env_remove("VYORA_WEBHOOK_SECRET")
        .output()
        .expect("run");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_calls_agents_and_poller_commands_show_what_the_api_and_the_store_hold() {
    let api = Downstream::start(api(|r, _| {
        if r.path == "/v1/agents" {
            Reply::Json(
                200,
                serde_json::json!({"agents": [
                    {"id": "abc123", "name": "Home Loan Agent", "language": "hi-IN", "agent_type": "outbound"},
                    {"id": "def456", "name": "Admission Enquiry", "language": "en-IN", "agent_type": "outbound"}
                ], "total": 2, "limit": 50, "offset": 0}),
            )
        } else {
            Reply::Json(200, record(&call_of(r).unwrap_or_default(), false))
        }
    }))
    .await;
    let router = router(&api, "").await;
    assert_eq!(
        router
            .post_signed(&payload("call-c1", "call_completed"))
            .await
            .status,
        200
    );
    let config = router.path().join("cli.toml");
    std::fs::write(&config, poller_config(router.path(), &api, "")).expect("write");

    let (ok, out) = run_cli(&config, &["agents", "list", "--limit", "10"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("Home Loan Agent") && out.contains("hi-IN") && out.contains("def456"),
        "{out}"
    );
    let agents = api
        .received()
        .into_iter()
        .find(|r| r.path == "/v1/agents")
        .expect("asked");
    assert_eq!(agents.header("x-api-key"), Some(API_KEY));

    let (ok, out) = run_cli(&config, &["calls", "get", "call-c1"]);
    assert!(ok, "{out}");
    let shown: serde_json::Value = serde_json::from_str(&out).expect("pretty JSON");
    assert_eq!(shown["call_id"], "call-c1");

    let (ok, out) = run_cli(&config, &["poller", "status"]);
    assert!(ok, "{out}");
    assert!(out.contains("call-c1") && out.contains("waiting"), "{out}");
}
