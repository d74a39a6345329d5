//! Operations: metrics, replay protection, pruning, reload, graceful shutdown, `trigger`.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::process::{spawn_router, write_config};
use common::*;
use http_body_util::Full;
use hyper::Request;
use vyora_router::signature::Secret;

const WAIT: Duration = Duration::from_secs(15);

fn signed_request(body: &str, event: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::post("/webhook")
        .header("host", "r")
        .header("x-vyora-signature", sign(body.as_bytes()));
    if let Some(e) = event {
        b = b.header("x-vyora-event", e);
    }
    b.body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .expect("request")
}

fn old_payload(call_id: &str, age: Duration) -> String {
    let at = humantime::format_rfc3339_seconds(SystemTime::now() - age).to_string();
    let mut body: serde_json::Value =
        serde_json::from_str(&payload(call_id, "call_completed")).expect("json");
    body["timestamp"] = at.into();
    body.to_string()
}

#[tokio::test]
async fn every_outcome_moves_its_counter_and_the_exposition_parses() {
    let router = TestRouter::start().await;
    let before = router.scrape().await;
    let webhooks = "vyora_router_webhooks_received_total";
    let body = payload("call-m1", "call_completed");
    router.post_signed(&body).await;
    router.post_signed(&body).await;
    send(router.addr, webhook_request(&body, Some("sha256=00"))).await;
    send(router.addr, signed_request("[1]", Some("call_completed"))).await;
    router
        .post_signed(&format!(
            "{{\"event\":\"x\",\"pad\":\"{}\"}}",
            "x".repeat(1_100_000)
        ))
        .await;
    router
        .post_signed(&old_payload("call-m2", Duration::from_secs(200 * 86_400)))
        .await;
    wait_for_lines(&router.events_file(), 1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let after = router.scrape().await;
    let moved = |labels: &[(&str, &str)]| {
        metric(&after, webhooks, labels) - metric(&before, webhooks, labels)
    };
    assert_eq!(
        moved(&[("event", "call_completed"), ("outcome", "accepted")]),
        1.0
    );
    assert_eq!(
        moved(&[("event", "call_completed"), ("outcome", "duplicate")]),
        1.0
    );
    assert_eq!(
        moved(&[("event", "unknown"), ("outcome", "invalid_signature")]),
        1.0
    );
    assert_eq!(moved(&[("outcome", "bad_request")]), 1.0);
    assert_eq!(moved(&[("outcome", "too_large")]), 1.0);
    assert_eq!(moved(&[("outcome", "too_old")]), 1.0);
    assert_eq!(
        metric(
            &after,
            "vyora_router_webhook_secret_verified_total",
            &[("index", "0")]
        ),
        4.0
    );
    assert_eq!(
        metric(
            &after,
            "vyora_router_deliveries_total",
            &[("sink", "archive"), ("outcome", "delivered")]
        ),
        1.0
    );
    assert!(
        after
            .iter()
            .any(|s| s.metric == "vyora_router_ack_latency_seconds_count"
                || s.metric == "vyora_router_ack_latency_seconds")
    );
    assert_eq!(metric(&after, "vyora_router_build_info", &[]), 1.0);
}

#[tokio::test]
async fn readiness_sink_availability_and_first_failures_are_exposed_before_they_happen() {
    let router = TestRouter::start().await;
    let samples = router.scrape().await;
    assert_eq!(metric(&samples, "vyora_router_ready", &[]), 1.0);
    assert_eq!(
        metric(&samples, "vyora_router_sink_ready", &[("sink", "archive")]),
        1.0
    );
    assert!(metric(&samples, "vyora_router_start_time_seconds", &[]) > 1.7e9);
    // Created at 0, so the first dead delivery or 503 after a start is an increase.
    let series = |name: &str, labels: &[(&str, &str)]| {
        samples
            .iter()
            .any(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
    };
    assert!(series(
        "vyora_router_deliveries_total",
        &[("sink", "archive"), ("outcome", "dead")]
    ));
    assert!(series(
        "vyora_router_webhooks_received_total",
        &[("event", "unknown"), ("outcome", "unavailable")]
    ));
}

#[tokio::test]
async fn an_event_older_than_max_event_age_is_refused_and_not_stored() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config =
        base_config(dir.path()).replace("[webhook]\n", "[webhook]\nmax_event_age = \"1h\"\n");
    let router = TestRouter::start_with(dir, &config).await;
    let answer = router
        .post_signed(&old_payload("call-old", Duration::from_secs(7500)))
        .await;
    assert_eq!(answer.status, 400);
    // The ages in units a person reads, not seconds.
    assert!(
        answer.json()["error"].as_str().is_some_and(|e| e.contains(
            "is 2 hours 5 minutes old, older than webhook.max_event_age allows (1 hour)"
        )),
        "{answer:?}"
    );
    assert_eq!(router.count("SELECT COUNT(*) FROM events"), 0);
    let fresh = router
        .post_signed(&old_payload("call-new", Duration::from_secs(60)))
        .await;
    assert_eq!(fresh.status, 200);
}

/// The payload with `timestamp` set to `at` in the +05:30 offset (India), with
/// milliseconds, or removed when `at` is `None`.
fn payload_dated(call_id: &str, at: Option<SystemTime>) -> String {
    let mut body: serde_json::Value =
        serde_json::from_str(&payload(call_id, "call_completed")).expect("json");
    match at {
        Some(at) => {
            let local = at + Duration::from_secs(5 * 3600 + 30 * 60);
            let text = humantime::format_rfc3339_millis(local).to_string();
            body["timestamp"] = text.replace('Z', "+05:30").into();
        }
        None => {
            body.as_object_mut().map(|o| o.remove("timestamp"));
        }
    }
    body.to_string()
}

#[tokio::test]
async fn the_replay_guard_reads_any_offset_refuses_the_future_and_counts_missing_timestamps() {
    let router = TestRouter::start().await;
    let day = Duration::from_secs(86_400);
    let old = router
        .post_signed(&payload_dated(
            "call-ist-old",
            Some(SystemTime::now() - 200 * day),
        ))
        .await;
    assert_eq!(old.status, 400, "200 days old with +05:30: {old:?}");
    assert!(
        old.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("is 200 days old")),
        "{old:?}"
    );
    let future = router
        .post_signed(&payload_dated(
            "call-future",
            Some(SystemTime::now() + Duration::from_secs(3600)),
        ))
        .await;
    assert_eq!(future.status, 400, "an hour ahead: {future:?}");
    assert!(
        future.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("max_clock_skew"))
    );
    let recent = router
        .post_signed(&payload_dated(
            "call-ist-new",
            Some(SystemTime::now() - Duration::from_secs(60)),
        ))
        .await;
    assert_eq!(recent.status, 200);
    let before = router.scrape().await;
    let missing = router
        .post_signed(&payload_dated("call-undated", None))
        .await;
    assert_eq!(
        missing.status, 200,
        "a genuine event is never lost for its timestamp"
    );
    let after = router.scrape().await;
    let counted = |s: &[prometheus_parse::Sample]| {
        metric(
            s,
            "vyora_router_webhooks_without_timestamp_total",
            &[("reason", "missing")],
        )
    };
    assert_eq!(counted(&after) - counted(&before), 1.0);
    assert_eq!(router.count("SELECT COUNT(*) FROM events"), 2);
}

#[tokio::test]
async fn pruning_empties_old_payloads_and_keeps_dedup_keys_for_the_dedup_window() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    // Keys outlive payloads by seconds, and the replay below stays within max_event_age
    // (dedup_window - max_clock_skew, 5 s) however late the payload's pruning runs.
    let config = base_config(dir.path())
        .replace(
            "[store]\n",
            "[store]\nretention = \"1s\"\ndedup_window = \"6s\"\n",
        )
        .replace("[webhook]\n", "[webhook]\nmax_clock_skew = \"1s\"\n");
    let router = TestRouter::start_with(dir, &config).await;
    let body = payload("call-prune", "call_completed");
    assert_eq!(router.post_signed(&body).await.status, 200);
    wait_for_lines(&router.events_file(), 1, WAIT).await;

    let length = |router: &TestRouter| -> Option<i64> {
        router
            .db()
            .query_row(
                "SELECT length(payload) FROM events WHERE dedup_key = 'call-prune:call_completed'",
                [],
                |r| r.get(0),
            )
            .ok()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while length(&router) != Some(0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "payload never pruned: {:?}",
            length(&router)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The payload is gone, the dedup key is not: a replay is still recognised.
    let replay = router.post_signed(&body).await;
    assert_eq!(
        replay.json(),
        serde_json::json!({"received": true, "duplicate": true})
    );
    // And an operator's replay cannot send an empty payload.
    let store = router.operator_store().await;
    let call = vyora_router::store::operator::Replay::CallId("call-prune".into());
    let done = store.replay("archive", &call).await.expect("replay");
    assert_eq!((done.replayed, done.payload_gone), (0, 1), "{done:?}");
    store.close().await;

    while length(&router).is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dedup key never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_future_dated_body_is_not_accepted_again_once_its_dedup_key_is_pruned() {
    // Keys live 3 s; bodies may be dated 1 s ahead, so the default max_event_age is 2 s:
    // by the time a key is pruned, its body is too old to be accepted again.
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = base_config(dir.path())
        .replace(
            "[store]\n",
            "[store]\nretention = \"1s\"\ndedup_window = \"3s\"\n",
        )
        .replace("[webhook]\n", "[webhook]\nmax_clock_skew = \"1s\"\n");
    let router = TestRouter::start_with(dir, &config).await;
    let body = payload_dated(
        "call-ahead",
        Some(SystemTime::now() + Duration::from_millis(900)),
    );
    let first = router.post_signed(&body).await;
    assert_eq!(first.json(), serde_json::json!({"received": true}));
    let stored = |router: &TestRouter| {
        router.count("SELECT COUNT(*) FROM events WHERE dedup_key = 'call-ahead:call_completed'")
    };
    // Replays until well past the pruning of the key.
    let mut pruned_at = None;
    let deadline = tokio::time::Instant::now() + WAIT;
    while pruned_at.is_none_or(|at: tokio::time::Instant| at.elapsed() < Duration::from_secs(1)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key was never pruned"
        );
        let replay = router.post_signed(&body).await;
        assert!(
            replay.status == 400
                || replay.json() == serde_json::json!({"received": true, "duplicate": true}),
            "a replay was accepted as new: {replay:?}"
        );
        if pruned_at.is_none() && stored(&router) == 0 {
            pruned_at = Some(tokio::time::Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(read_lines(&router.events_file()).len(), 1, "forwarded once");
}

#[tokio::test]
async fn pruning_spares_events_whose_delivery_is_not_done() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = base_config(dir.path())
        .replace(
            "[store]\n",
            "[store]\nretention = \"1s\"\ndedup_window = \"2s\"\n",
        )
        .replace("[webhook]\n", "[webhook]\nmax_clock_skew = \"1s\"\n");
    let router = TestRouter::start_with(dir, &config).await;
    // The sink cannot write: its path is a directory.
    std::fs::remove_file(router.events_file()).expect("remove");
    std::fs::create_dir(router.events_file()).expect("directory in the way");
    assert_eq!(
        router
            .post_signed(&payload("call-keep", "call_completed"))
            .await
            .status,
        200
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let length: i64 = router
        .db()
        .query_row(
            "SELECT length(payload) FROM events WHERE call_id = 'call-keep'",
            [],
            |r| r.get(0),
        )
        .expect("still stored");
    assert!(length > 0, "a pending event keeps its payload");
}

#[tokio::test]
async fn a_reload_brings_in_a_new_secret_and_a_new_sink_without_a_restart() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let old = base_config(dir.path()).replace(SECRET, "old-secret");
    let router = TestRouter::start_with(Arc::clone(&dir), &old).await;
    let body = payload("call-r1", "call_completed");
    assert_eq!(
        router.post_signed(&body).await.status,
        401,
        "the test secret is not configured yet"
    );

    let new = format!(
        "{}\n[[sinks]]\nname = \"second\"\ntype = \"file\"\npath = \"{}\"\n",
        base_config(dir.path()).replace(
            &format!("[\"{SECRET}\"]"),
            &format!("[\"{SECRET}\", \"old-secret\"]")
        ),
        dir.path().join("second.jsonl").display()
    );
    router.reload(&new).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while router.post_signed(&body).await.status != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new secret never verified"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for_lines(&dir.path().join("second.jsonl"), 1, WAIT).await;
    wait_for_lines(&router.events_file(), 1, WAIT).await;
}

fn kill(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_secret_and_a_broken_config_leaves_the_old_one_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "");
    let (child, addr) = spawn_router(&config).await;
    let pid = child.id().expect("pid");
    let other = Secret::new(b"rotated-secret").expect("secret");
    let body = payload("call-h1", "call_completed");
    let with_other = || {
        webhook_request(
            &body,
            Some(&vyora_router::signature::sign(&other, body.as_bytes())),
        )
    };
    assert_eq!(send(addr, with_other()).await.status, 401);

    // Rotate: the new secret first, the old one kept.
    let text = std::fs::read_to_string(&config).expect("read");
    std::fs::write(
        &config,
        text.replace(
            &format!("[\"{SECRET}\"]"),
            &format!("[\"rotated-secret\", \"{SECRET}\"]"),
        ),
    )
    .expect("write");
    kill(pid, "-HUP");
    let deadline = tokio::time::Instant::now() + WAIT;
    while send(addr, with_other()).await.status != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotated secret never verified"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A broken config: the running one keeps serving, old secrets included.
    std::fs::write(&config, "[server]\nlisten = \"not an address\"\n").expect("write");
    kill(pid, "-HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        post_signed(addr, &payload("call-h2", "call_completed"))
            .await
            .status,
        200
    );
    assert_eq!(get(addr, "/healthz").await.status, 200);
    drop(child);
}

/// Sends events until told to stop; records what was acknowledged and any answer that is
/// neither a 200 nor a refused/closed connection.
async fn load(
    addr: SocketAddr,
    worker: usize,
    acked: Arc<Mutex<HashSet<String>>>,
    odd: Arc<Mutex<Vec<u16>>>,
) {
    for n in 0.. {
        let call_id = format!("term-{worker}-{n}");
        let body = payload(&call_id, "call_completed");
        let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
            return;
        };
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
        else {
            return;
        };
        tokio::spawn(conn);
        match sender
            .send_request(webhook_request(&body, Some(&sign(body.as_bytes()))))
            .await
        {
            Ok(r) if r.status() == 200 => {
                acked
                    .lock()
                    .expect("lock")
                    .insert(format!("{call_id}:call_completed"));
            }
            Ok(r) => odd.lock().expect("lock").push(r.status().as_u16()),
            Err(_) => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_answers_cleanly_exits_zero_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "");
    let (mut child, addr) = spawn_router(&config).await;
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let odd = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..8)
        .map(|w| tokio::spawn(load(addr, w, Arc::clone(&acked), Arc::clone(&odd))))
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    kill(child.id().expect("pid"), "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits within the shutdown timeout")
        .expect("wait");
    for w in workers {
        w.await.expect("worker");
    }
    assert!(status.success(), "exit status {status:?}");
    assert!(
        odd.lock().expect("lock").is_empty(),
        "unclean answers: {:?}",
        odd.lock().expect("lock")
    );
    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() > 50, "only {} acknowledged", acked.len());

    // Whatever was acknowledged is in the file now, or is delivered after a restart.
    let (mut child, _) = spawn_router(&config).await;
    let file = dir.path().join("events.jsonl");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let seen: HashSet<String> = read_lines(&file)
            .iter()
            .filter_map(|l| l["id"].as_str().map(str::to_owned))
            .collect();
        let missing = acked.difference(&seen).count();
        if missing == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{missing} acknowledged events lost"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().await.expect("kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_call_sends_the_whole_lifecycle_into_the_file_sink() {
    let router = TestRouter::start().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vyora-router"))
        .args(["trigger", "call", "--call-id", "trig-1", "--url"])
        .arg(format!("http://{}/webhook", router.addr))
        .env("VYORA_WEBHOOK_SECRET", SECRET)
        .output()
        .expect("run trigger");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("-> 200").count(), 3, "{text}");
    let lines = wait_for_lines(&router.events_file(), 3, WAIT).await;
    let ids: Vec<_> = lines
        .iter()
        .map(|l| l["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        ids,
        [
            "trig-1:call_started",
            "trig-1:call_completed",
            "trig-1:all_processing_completed"
        ]
    );
}

#[test]
fn sign_prints_the_signature_vyora_would_send() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vyora-router"))
        .args(["sign", "--secret", "It's a Secret to Everybody"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run sign");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), b"Hello, World!")
        .expect("write");
    let out = child.wait_with_output().expect("output");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_passes_against_the_admin_listener_and_fails_naming_the_address_once_it_is_gone()
 {
    let router = TestRouter::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("probe.toml");
    let text = base_config(dir.path()).replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"{}\"", router.admin),
    );
    assert!(text.contains(&router.admin.to_string()), "{text}");
    std::fs::write(&config, text).expect("write config");
    let probe = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_vyora-router"))
            .args(["healthcheck", "--config"])
            .arg(&config)
            .output()
            .expect("run healthcheck")
    };
    let up = tokio::task::block_in_place(probe);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let admin = router.admin;
    router.stop().await;
    let down = tokio::task::block_in_place(probe);
    assert!(!down.status.success());
    let stderr = String::from_utf8_lossy(&down.stderr);
    assert!(stderr.contains(&admin.to_string()), "{stderr}");
}
