//! A hostile sender with one captured, genuinely signed request: replays under other
//! headers must not mint identities, deliveries, metric labels or disk use.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::Request;

const WAIT: Duration = Duration::from_secs(10);

/// A signed request for `body` with the given `X-Vyora-Event` header.
fn with_header(body: &str, event: &str) -> Request<Full<Bytes>> {
    Request::post("/webhook")
        .header("host", "router")
        .header("x-vyora-event", event)
        .header("x-vyora-signature", sign(body.as_bytes()))
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .expect("request")
}

/// Bytes the database and its WAL take on disk.
fn store_bytes(router: &TestRouter) -> u64 {
    ["router.db", "router.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(router.path().join(f)).ok())
        .map(|m| m.len())
        .sum()
}

#[tokio::test]
async fn replaying_a_captured_body_under_a_contradicting_header_stores_nothing() {
    let router = TestRouter::start().await;
    let mut body: serde_json::Value =
        serde_json::from_str(&payload("call-big", "call_completed")).expect("json");
    body["padding"] = "x".repeat(100_000).into();
    let body = body.to_string();
    let before = store_bytes(&router);
    for _ in 0..300 {
        let answer = send(router.addr, with_header(&body, "call_started")).await;
        assert_eq!(answer.status, 400, "{answer:?}");
    }
    assert_eq!(router.count("SELECT COUNT(*) FROM quarantine"), 0);
    assert_eq!(router.count("SELECT COUNT(*) FROM events"), 0);
    let grown = store_bytes(&router).saturating_sub(before);
    assert!(grown < 1_000_000, "the store grew by {grown} bytes");
}

#[tokio::test]
async fn a_body_without_an_event_field_keeps_one_identity_whatever_the_header_says() {
    let router = TestRouter::start().await;
    let body = r#"{"call_id":"call-nameless","status":"completed"}"#;
    let first = send(router.addr, with_header(body, "call_completed")).await;
    assert_eq!(first.json(), serde_json::json!({"received": true}));
    for i in 0..50 {
        let answer = send(router.addr, with_header(body, &format!("made_up_{i}"))).await;
        assert_eq!(
            answer.json(),
            serde_json::json!({"received": true, "duplicate": true}),
            "replay {i}"
        );
    }
    assert_eq!(router.count("SELECT COUNT(*) FROM events"), 1);
    assert_eq!(router.count("SELECT COUNT(*) FROM outbox"), 1);
    let labels: std::collections::BTreeSet<String> = router
        .scrape()
        .await
        .into_iter()
        .filter(|s| s.metric == "vyora_router_webhooks_received_total")
        .filter_map(|s| s.labels.get("event").map(str::to_owned))
        .collect();
    assert!(
        labels.iter().all(|l| !l.starts_with("made_up")),
        "a header minted metric labels: {labels:?}"
    );
    assert_eq!(
        wait_for_lines(&router.events_file(), 1, WAIT).await.len(),
        1
    );
}

#[tokio::test]
async fn a_quarantined_body_is_kept_once_and_the_quarantine_stays_within_its_cap() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = base_config(dir.path())
        .replace("[server]\n", "[server]\nmax_body_bytes = 65536\n")
        .replace("[store]\n", "[store]\nquarantine_max_bytes = 204800\n");
    let router = TestRouter::start_with(dir, &config).await;
    let unroutable = |i: usize| format!("not json {i} {}", "x".repeat(50_000));

    for _ in 0..20 {
        assert_eq!(router.post_signed(&unroutable(0)).await.status, 400);
    }
    assert_eq!(router.count("SELECT COUNT(*) FROM quarantine"), 1);

    for i in 1..=10 {
        assert_eq!(router.post_signed(&unroutable(i)).await.status, 400);
    }
    let kept = router.count("SELECT COALESCE(SUM(length(body)), 0) FROM quarantine");
    assert!(kept <= 204_800, "{kept} bytes kept");
    assert_eq!(router.count("SELECT COUNT(*) FROM quarantine"), 4);
    let newest: Vec<u8> = router
        .db()
        .query_row(
            "SELECT body FROM quarantine ORDER BY id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .expect("a body");
    assert_eq!(newest, unroutable(10).as_bytes(), "the oldest go first");
    let dropped = metric(
        &router.scrape().await,
        "vyora_router_quarantine_dropped_total",
        &[],
    );
    assert_eq!(dropped, 7.0);
}

#[tokio::test]
async fn operator_endpoints_answer_only_on_the_admin_listener() {
    let router = TestRouter::start().await;
    for path in ["/metrics", "/readyz"] {
        assert_eq!(get(router.addr, path).await.status, 404, "public {path}");
        assert_eq!(get(router.admin, path).await.status, 200, "admin {path}");
    }
    assert_eq!(get(router.addr, "/healthz").await.status, 200);
    assert_eq!(get(router.admin, "/healthz").await.status, 200);
    let body = payload("call-admin", "call_completed");
    assert_eq!(
        send(
            router.admin,
            webhook_request(&body, Some(&sign(body.as_bytes())))
        )
        .await
        .status,
        404,
        "no webhooks on the admin listener"
    );
    assert_eq!(router.post_signed(&body).await.status, 200);
}

/// Sends a request's head announcing a `length`-byte body and returns the status line
/// that comes back before any body byte is sent.
async fn status_before_body(addr: std::net::SocketAddr, signature: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let signature = signature
        .map(|s| format!("X-Vyora-Signature: {s}\r\n"))
        .unwrap_or_default();
    let head =
        format!("POST /webhook HTTP/1.1\r\nHost: r\r\nContent-Length: 1000000\r\n{signature}\r\n");
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_millis(800), stream.read(&mut answer))
        .await
        .expect("an answer before the body timeout")
        .expect("read");
    String::from_utf8_lossy(&answer[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_request_without_a_well_formed_signature_is_refused_before_its_body_is_read() {
    let router = TestRouter::start().await;
    for signature in [None, Some("sha256=zz"), Some("md5=00")] {
        let status = status_before_body(router.addr, signature).await;
        assert!(status.contains(" 401 "), "{signature:?}: {status}");
    }
}

/// Opens a connection that announces `length` body bytes, sends `sent` of them with a
/// well-formed (wrong) signature, and keeps the connection open.
async fn stalled_upload(
    addr: std::net::SocketAddr,
    length: usize,
    sent: usize,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /webhook HTTP/1.1\r\nHost: r\r\nContent-Length: {length}\r\nX-Vyora-Signature: sha256={}\r\n\r\n",
        "0".repeat(64)
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(&vec![b' '; sent]).await.expect("write");
    stream
}

#[tokio::test]
async fn bodies_past_the_buffer_budget_get_503_and_the_budget_comes_back() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = base_config(dir.path())
        .replace(
            "header_read_timeout = \"1s\"",
            "header_read_timeout = \"10s\"",
        )
        .replace(
            "[server]\n",
            "[server]\nmax_body_bytes = 262144\nmax_buffered_body_bytes = 524288\n",
        );
    let router = TestRouter::start_with(dir, &config).await;
    // Each holds a 128 KiB buffer: four fill the budget.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(stalled_upload(router.addr, 262_144, 131_072).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut over = stalled_upload(router.addr, 262_144, 131_072).await;
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut over, &mut answer),
    )
    .await
    .expect("answered at once")
    .expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]).to_lowercase();
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after"), "{answer}");

    drop(stalled);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = payload("call-after-budget", "call_completed");
    assert_eq!(router.post_signed(&body).await.status, 200);
}
