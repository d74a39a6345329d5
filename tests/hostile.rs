//! Hostile senders: replays of one captured, genuinely signed request under other headers
//! must not mint identities, deliveries, metric labels or disk use, and connections held
//! open must neither fill memory nor starve genuine webhooks.

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

/// Lifts this process's soft limit on open files to `wanted` (within the hard limit): the
/// attack below holds thousands of sockets, at both of their ends.
fn raise_open_file_limit(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= wanted {
            return;
        }
        limit.rlim_cur = wanted.min(limit.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// One peer (127.0.0.1) holding connections that never send a byte, opening a new one as
/// soon as the server closes one.
struct IdleFlood {
    /// Connections opened so far, first ones and reopened ones.
    opened: Arc<std::sync::atomic::AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
    holders: tokio::task::JoinSet<()>,
}

impl IdleFlood {
    fn start(addr: std::net::SocketAddr, sockets: usize) -> IdleFlood {
        use std::sync::atomic::Ordering;
        use tokio::io::AsyncReadExt;
        let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let mut holders = tokio::task::JoinSet::new();
        for i in 0..sockets {
            let (stop, opened) = (stop.clone(), Arc::clone(&opened));
            // Paced, so the first ones are not refused by a full accept queue.
            let start = Duration::from_micros(200) * u32::try_from(i).unwrap_or(u32::MAX);
            holders.spawn(async move {
                tokio::time::sleep(start).await;
                loop {
                    // A connection the full accept queue refused is retried by the kernel
                    // for minutes.
                    let connected = tokio::select! {
                        () = stop.cancelled() => break,
                        connected = tokio::net::TcpStream::connect(addr) => connected,
                    };
                    let Ok(mut stream) = connected else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    opened.fetch_add(1, Ordering::Relaxed);
                    let mut byte = [0u8; 1];
                    tokio::select! {
                        () = stop.cancelled() => {}
                        _ = stream.read(&mut byte) => {}
                    }
                }
            });
        }
        IdleFlood {
            opened,
            stop,
            holders,
        }
    }

    fn opened(&self) -> usize {
        self.opened.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Closes every connection; returns how many were opened in all.
    async fn stop(mut self) -> usize {
        self.stop.cancel();
        while self.holders.join_next().await.is_some() {}
        self.opened()
    }
}

/// Sends `request` on a fresh connection from `source`: the status, or why none came
/// within Vyora's 5 s.
async fn send_from(
    source: std::net::IpAddr,
    addr: std::net::SocketAddr,
    request: Request<Full<Bytes>>,
) -> Result<u16, String> {
    let exchange = async {
        let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        socket
            .bind(std::net::SocketAddr::new(source, 0))
            .map_err(|e| e.to_string())?;
        let stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        Ok(response.status().as_u16())
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .unwrap_or_else(|_| Err("no answer within 5 s".to_owned()))
}

/// Signed webhooks from 127.0.0.2, four at a time, for `period`: each one's latency, or
/// why it was not answered 200.
async fn genuine_webhooks(
    addr: std::net::SocketAddr,
    period: Duration,
    tag: &str,
) -> Vec<Result<Duration, String>> {
    let source = std::net::IpAddr::from([127, 0, 0, 2]);
    let until = tokio::time::Instant::now() + period;
    let mut senders = tokio::task::JoinSet::new();
    for sender in 0..4 {
        let tag = tag.to_owned();
        senders.spawn(async move {
            let mut outcomes = Vec::new();
            while tokio::time::Instant::now() < until {
                let body = payload(
                    &format!("{tag}-{sender}-{}", outcomes.len()),
                    "call_started",
                );
                let started = tokio::time::Instant::now();
                let outcome =
                    match send_from(source, addr, with_header(&body, "call_started")).await {
                        Ok(200) => Ok(started.elapsed()),
                        Ok(status) => Err(format!("status {status}")),
                        Err(e) => Err(e),
                    };
                outcomes.push(outcome);
            }
            outcomes
        });
    }
    let mut outcomes = Vec::new();
    while let Some(sent) = senders.join_next().await {
        outcomes.extend(sent.expect("sender"));
    }
    outcomes
}

/// `answered of sent, p50 / p99` of a run of [`genuine_webhooks`].
fn summary(outcomes: &[Result<Duration, String>]) -> String {
    let mut answered: Vec<Duration> = outcomes.iter().filter_map(|o| o.clone().ok()).collect();
    answered.sort();
    let at = |q: f64| {
        let last = answered.len().saturating_sub(1);
        answered.get((last as f64 * q).round() as usize).copied()
    };
    format!(
        "{} of {} answered, p50 {:?}, p99 {:?}",
        answered.len(),
        outcomes.len(),
        at(0.5),
        at(0.99)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_peer_holding_and_reopening_idle_connections_does_not_starve_genuine_webhooks() {
    raise_open_file_limit(8192);
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    // The default header timeout and connection limit: 2,000 idle sockets are twice
    // what the server admits at once.
    let config = base_config(dir.path()).replace(
        "header_read_timeout = \"1s\"",
        "header_read_timeout = \"10s\"\nmax_connections = 1024",
    );
    let router = TestRouter::start_with(dir, &config).await;
    let quiet = genuine_webhooks(router.addr, Duration::from_secs(2), "quiet").await;

    let flood = IdleFlood::start(router.addr, 2_000);
    // Every socket connected, and time for the server to take all it admits: the rest
    // wait in its accept queue.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while flood.opened() < 2_000 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let attacked = genuine_webhooks(router.addr, Duration::from_secs(5), "attacked").await;
    let opened = flood.stop().await;

    eprintln!(
        "genuine webhooks from 127.0.0.2: quiet {}; while 127.0.0.1 holds 2,000 idle sockets \
         (opened {opened}) {}",
        summary(&quiet),
        summary(&attacked)
    );
    let failed: Vec<&String> = attacked.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} genuine webhooks were not answered: {:?}",
        failed.len(),
        attacked.len(),
        failed.first()
    );
    assert!(attacked.len() >= 10, "only {} sent", attacked.len());
    assert!(
        opened > 2_000,
        "no idle connection was ever closed: the flood never filled the server"
    );
}

#[tokio::test]
async fn newcomers_to_a_full_server_wait_in_the_accept_queue_instead_of_being_dropped() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = base_config(dir.path()).replace(
        "header_read_timeout = \"1s\"",
        "header_read_timeout = \"10s\"\nmax_connections = 1",
    );
    let router = TestRouter::start_with(dir, &config).await;
    // The one place, held by a request whose body stalls: nothing may be closed for a
    // newcomer.
    let _stalled = stalled_upload(router.addr, 1000, 10).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Past a full accept queue the kernel drops a connection's SYN, and the sender tries
    // again only a second later.
    let mut waiting = Vec::new();
    for i in 0..300 {
        let connect = tokio::net::TcpStream::connect(router.addr);
        let connected = tokio::time::timeout(Duration::from_millis(800), connect)
            .await
            .unwrap_or_else(|_| {
                panic!("newcomer {i} was dropped (the kernel caps the queue at net.core.somaxconn)")
            });
        waiting.push(connected.expect("connect"));
    }
}
