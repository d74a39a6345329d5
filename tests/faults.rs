//! Faults: hostile HTTP, a downstream that fails in every way, a full disk.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::downstream::{Downstream, Reply};
use common::process::{rss_kb, spawn_router, write_config};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(20);

/// Sends raw bytes and returns the status code of the answer (0 if the connection closed
/// without one).
async fn raw_status(addr: std::net::SocketAddr, request: &[u8]) -> u16 {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&buf);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_shapes_and_bad_bytes_get_a_4xx_and_nothing_is_stored() {
    let router = TestRouter::start().await;
    let body = payload("call-x1", "call_completed");
    let sig = sign(body.as_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "conflicting Content-Length",
            format!("POST /webhook HTTP/1.1\r\nhost: r\r\nx-vyora-signature: {sig}\r\ncontent-length: {}\r\ncontent-length: 3\r\n\r\n{body}", body.len()).into_bytes(),
        ),
        (
            // Signed over the first 3 bytes, the Content-Length reading of the body.
            "Content-Length with chunked, signed for the Content-Length reading",
            format!(
                "POST /webhook HTTP/1.1\r\nhost: r\r\nx-vyora-signature: {}\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                sign(&format!("{:x}\r\n", body.len()).as_bytes()[..3]),
                body.len()
            )
            .into_bytes(),
        ),
        ("invalid UTF-8 in the signature", {
            let mut r = b"POST /webhook HTTP/1.1\r\nhost: r\r\nx-vyora-signature: sha256=\xff\xfe\r\ncontent-length: ".to_vec();
            r.extend_from_slice(format!("{}\r\n\r\n{body}", body.len()).as_bytes());
            r
        }),
        (
            "two signature headers",
            format!(
                "POST /webhook HTTP/1.1\r\nhost: r\r\nx-vyora-signature: {sig}\r\nx-vyora-signature: {sig}\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        ),
    ];
    for (name, request) in cases {
        let status = raw_status(router.addr, &request).await;
        assert!((400..500).contains(&status), "{name}: answered {status}");
    }
    // A body that is not UTF-8 but correctly signed: refused and quarantined, never an event.
    let bad: &[u8] = b"{\"event\":\"call_completed\",\"call_id\":\"\xff\xfe\"}";
    let mut r = format!(
        "POST /webhook HTTP/1.1\r\nhost: r\r\nx-vyora-signature: {}\r\ncontent-length: {}\r\n\r\n",
        vyora_router::signature::sign(&secret(), bad),
        bad.len()
    )
    .into_bytes();
    r.extend_from_slice(bad);
    assert_eq!(raw_status(router.addr, &r).await, 400);
    assert_eq!(router.count("SELECT COUNT(*) FROM events"), 0);

    // With both framings, Transfer-Encoding decides (RFC 9112 section 6.3) and the
    // signature is checked over exactly the bytes that framing yields: there is one
    // reading of the request, and the signature pins it.
    let both = format!(
        "POST /webhook HTTP/1.1\r\nhost: r\r\nx-vyora-signature: {sig}\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    assert_eq!(raw_status(router.addr, both.as_bytes()).await, 200);
    assert_eq!(router.count("SELECT COUNT(*) FROM events"), 1);
    assert_eq!(
        router.stored_payload("call-x1:call_completed"),
        body.as_bytes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_slowloris_connections_do_not_hold_up_real_traffic() {
    let router = TestRouter::start().await; // header_read_timeout = 1s
    let mut quiet = Vec::new();
    for i in 0..20 {
        let started = Instant::now();
        assert_eq!(
            router
                .post_signed(&payload(&format!("q-{i}"), "call_started"))
                .await
                .status,
            200
        );
        quiet.push(started.elapsed());
    }
    // 300 connections that send a header byte by byte and never finish.
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(router.addr).await.expect("connect");
        s.write_all(b"POST /webhook HTTP/1.1\r\nhost: r\r\nx-slow: a")
            .await
            .expect("write");
        slow.push(s);
    }
    let drip = tokio::spawn(async move {
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            for s in &mut slow {
                let _ = s.write_all(b"a").await;
            }
        }
        slow
    });
    let mut attacked = Vec::new();
    for i in 0..20 {
        let started = Instant::now();
        assert_eq!(
            router
                .post_signed(&payload(&format!("a-{i}"), "call_started"))
                .await
                .status,
            200
        );
        attacked.push(started.elapsed());
    }
    let slow = drip.await.expect("drip");
    quiet.sort();
    attacked.sort();
    eprintln!(
        "ack latency median/max: quiet {:?}/{:?}, during 300 slowloris connections {:?}/{:?}",
        quiet[10], quiet[19], attacked[10], attacked[19]
    );
    // Far inside Vyora's 5 s, whatever the machine's noise.
    assert!(attacked[19] < Duration::from_secs(2), "{:?}", attacked[19]);
    drop(slow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_downstream_that_fails_then_hangs_then_throttles_loses_nothing() {
    // Phase by wall time: 500s, then answers slower than the sink's timeout, then 429
    // with Retry-After: 1, then healthy.
    let started = Instant::now();
    let phase = move || {
        let t = started.elapsed();
        if t < Duration::from_secs(2) {
            0
        } else if t < Duration::from_secs(4) {
            1
        } else if t < Duration::from_secs(6) {
            2
        } else {
            3
        }
    };
    let last_429: Arc<std::sync::Mutex<Option<Instant>>> = Arc::new(std::sync::Mutex::new(None));
    let early: Arc<AtomicUsize> = Arc::new(AtomicUsize::new(0));
    let (l, e) = (Arc::clone(&last_429), Arc::clone(&early));
    let downstream = Downstream::start(move |_, _| {
        let now = Instant::now();
        // Requests already on their way when the 429 went out may land just after it;
        // anything later inside the second it asked for is a retry too early.
        if let Some(at) = *l.lock().expect("lock")
            && now - at > Duration::from_millis(100)
            && now - at < Duration::from_millis(950)
        {
            e.fetch_add(1, Ordering::SeqCst);
        }
        match phase() {
            0 => Reply::Status(500),
            1 => Reply::Slow(Duration::from_millis(1500)),
            2 => {
                *l.lock().expect("lock") = Some(now);
                Reply::StatusWith(429, vec![("retry-after", "1".into())])
            }
            _ => Reply::Status(200),
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!(
        "[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"{}\"\ntimeout = \"500ms\"\nconcurrency = 4\n",
        downstream.url("/in")
    );
    let config = write_config(dir.path(), &extra).to_owned();
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .expect("read")
            .replace("backoff_max = \"200ms\"", "backoff_max = \"2s\""),
    )
    .expect("write");
    let (child, addr) = spawn_router(&config).await;
    let pid = child.id().expect("pid");
    let rss_before = rss_kb(pid);
    let mut sent = Vec::new();
    for i in 0..300 {
        let id = format!("ds-{i}");
        assert_eq!(
            post_signed(addr, &payload(&id, "call_completed"))
                .await
                .status,
            200
        );
        sent.push(format!("{id}:call_completed"));
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let delivered: std::collections::HashSet<String> = downstream
            .received()
            .iter()
            .filter_map(|r| r.header("idempotency-key").map(str::to_owned))
            .collect();
        let missing = sent.iter().filter(|k| !delivered.contains(*k)).count();
        let done: i64 = rusqlite::Connection::open(dir.path().join("router.db"))
            .expect("db")
            .query_row(
                "SELECT COUNT(*) FROM outbox WHERE sink = 'crm' AND status = 'delivered'",
                [],
                |r| r.get(0),
            )
            .expect("count");
        if missing == 0 && done == 300 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} never reached the downstream, {done} delivered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss_after = rss_kb(pid);
    eprintln!(
        "downstream outage: {} requests for 300 events, max in flight {}, RSS {rss_before} -> {rss_after} kB",
        downstream.received().len(),
        downstream.max_in_flight()
    );
    assert!(
        downstream.max_in_flight() <= 4,
        "in flight {}",
        downstream.max_in_flight()
    );
    assert_eq!(
        early.load(Ordering::SeqCst),
        0,
        "a request came before Retry-After"
    );
    assert!(
        rss_after.saturating_sub(rss_before) < 8 * 1024,
        "RSS {rss_before} -> {rss_after} kB"
    );
    drop(child);
}

struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root to mount a small tmpfs: run as root with --include-ignored (.ci/run does)"]
async fn a_full_disk_gets_503_never_200_and_recovers_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mount = dir.path().join("small");
    std::fs::create_dir(&mount).expect("mkdir");
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&mount)
        .status()
        .expect("run mount");
    assert!(status.success(), "cannot mount a tmpfs (not root?)");
    let _guard = Tmpfs(mount.clone());
    let config = base_config(&mount).replace("[server]\n", "[server]\nack_timeout = \"1s\"\n");
    let router =
        TestRouter::start_with(Arc::new(tempfile::tempdir().expect("tempdir")), &config).await;

    // Fill the disk with events until the router refuses.
    let mut accepted = 0;
    let mut refused = 0;
    for i in 0..5000 {
        let answer = router
            .post_signed(&payload(&format!("full-{i}"), "call_completed"))
            .await;
        match answer.status {
            200 => accepted += 1,
            503 => {
                assert!(answer.headers.contains_key("retry-after"));
                refused += 1;
                if refused >= 20 {
                    break;
                }
            }
            other => panic!("answered {other} on a full disk"),
        }
    }
    assert!(refused >= 20, "the disk never filled ({accepted} accepted)");
    // Every 200 is on disk: count them in the store.
    let stored: i64 = rusqlite::Connection::open(mount.join("router.db"))
        .expect("db")
        .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
        .expect("count");
    assert!(
        stored >= accepted,
        "{accepted} acknowledged, {stored} stored"
    );

    // Free space (the JSON Lines copy), and the router accepts again by itself.
    std::fs::remove_file(mount.join("events.jsonl")).expect("free space");
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    while router
        .post_signed(&payload(&format!("after-{n}"), "call_completed"))
        .await
        .status
        != 200
    {
        assert!(Instant::now() < deadline, "never accepted again");
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let integrity: String = rusqlite::Connection::open(mount.join("router.db"))
        .expect("db")
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("check");
    assert_eq!(integrity, "ok");
    eprintln!("full disk: {accepted} accepted, then 503s; accepted again after freeing space");
    router.stop().await;
}

/// One attacker: announces a 1 MiB body with a well-formed (wrong) signature, waits for
/// `start`, then trickles it; answered or cut off, it starts over, until `until`.
async fn slow_uploader(addr: std::net::SocketAddr, start: Instant, until: Instant) {
    let head = format!(
        "POST /webhook HTTP/1.1\r\nhost: r\r\ncontent-length: 1048576\r\nx-vyora-signature: sha256={}\r\n\r\n",
        "0".repeat(64)
    );
    let chunk = vec![b' '; 8 * 1024];
    while Instant::now() < until {
        let Ok(mut stream) = TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if stream.write_all(head.as_bytes()).await.is_err() {
            continue;
        }
        tokio::time::sleep_until(start).await;
        // Until the router answers (503 past the budget) or closes the connection.
        while Instant::now() < until && stream.write_all(&chunk).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Resident memory of `pid` at its highest while `until` has not passed, sampled while
/// genuine webhooks are sent; returns (peak kB, webhooks sent, answered, accepted).
async fn webhooks_while(
    addr: std::net::SocketAddr,
    pid: u32,
    until: Instant,
) -> (u64, usize, usize, usize) {
    let (mut peak, mut sent, mut answered, mut accepted) = (0, 0, 0, 0);
    while Instant::now() < until {
        let body = payload(&format!("genuine-{sent}"), "call_completed");
        sent += 1;
        let answer = tokio::time::timeout(Duration::from_secs(2), post_signed(addr, &body)).await;
        if let Ok(answer) = answer {
            answered += 1;
            match answer.status {
                200 => accepted += 1,
                503 => assert!(answer.headers.contains_key("retry-after")),
                other => panic!("a genuine webhook got {other}"),
            }
        }
        peak = peak.max(rss_kb(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (peak, sent, answered, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slow_uploads_stay_within_the_body_budget_while_webhooks_are_answered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "");
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .expect("read")
            .replace(
                "header_read_timeout = \"1s\"",
                "header_read_timeout = \"10s\"",
            )
            .replace(
                "[server]\n",
                "[server]\nmax_connections = 1100\nmax_buffered_body_bytes = 33554432\n",
            ),
    )
    .expect("write");
    let (child, addr) = spawn_router(&config).await;
    let pid = child.id().expect("pid");
    let quiet = rss_kb(pid);

    // The connections open, their bodies not begun: what the connections themselves cost
    // (bounded by server.max_connections) is the idle figure the budget adds to.
    let start = Instant::now() + Duration::from_secs(2);
    let until = start + Duration::from_secs(5);
    let attackers: Vec<_> = (0..1024)
        .map(|_| tokio::spawn(slow_uploader(addr, start, until)))
        .collect();
    let (idle, ..) = webhooks_while(addr, pid, start).await;
    let (peak, sent, answered, accepted) = webhooks_while(addr, pid, until).await;
    for a in attackers {
        a.await.expect("attacker");
    }
    let budget_kb = 32 * 1024;
    eprintln!(
        "1,024 slow 1 MiB uploads: RSS {quiet} kB without connections, {idle} kB with them \
         idle, peak {peak} kB while they upload (budget {budget_kb} kB); genuine webhooks: \
         {answered} of {sent} answered, {accepted} accepted"
    );
    // The budget bounds the bodies' buffers; the allocator's own slack under a thousand
    // connections churning (answered 503, reconnecting) comes on top: peaks measured at
    // 1.31-1.36 times the budget above idle when this test runs alone, 1.53 times while
    // the rest of the suite loaded the machine. Without the budget the bodies alone would
    // take 1 GiB (32 times it).
    assert!(
        peak < idle + budget_kb * 2,
        "peak RSS {peak} kB exceeds the idle {idle} kB + 2 x the {budget_kb} kB budget"
    );
    assert_eq!(answered, sent, "every genuine webhook got an answer");
    assert!(accepted > 0, "genuine webhooks were still accepted");
}
