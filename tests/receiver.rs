//! The receiver against a real server on port 0: acknowledgement, refusals, deduplication,
//! limits, and delivery across a restart.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_signed_event_is_acknowledged_and_written_to_the_file_sink() {
    let router = TestRouter::start().await;
    let body = payload("call-1", "call_completed");
    let answer = router.post_signed(&body).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json(), serde_json::json!({"received": true}));

    let lines = wait_for_lines(&router.events_file(), 1, WAIT).await;
    assert_eq!(lines[0]["id"], "call-1:call_completed");
    assert_eq!(lines[0]["event"], "call_completed");
    assert_eq!(lines[0]["call_id"], "call-1");
    assert_eq!(lines[0]["source"], "webhook");
    assert!(
        lines[0]["received_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    let original: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(lines[0]["payload"], original);
}

#[tokio::test]
async fn every_bad_signature_gets_401_and_nothing_is_stored() {
    let router = TestRouter::start().await;
    let body = payload("call-401", "call_completed");
    let good = sign(body.as_bytes());
    let hex = good.trim_start_matches("sha256=");
    let forged: Vec<Option<String>> = vec![
        None,
        Some(String::new()),
        Some("sha256=".into()),
        Some(good[..good.len() - 1].into()),
        Some(format!("sha256={}", &hex[..32])),
        Some(format!("sha256={}zz", &hex[..62])),
        Some(format!("sha1={hex}")),
        Some(hex.into()),
        Some(format!("{good}00")),
        Some(sign(b"some other bytes")),
    ];
    for signature in &forged {
        let answer = send(router.addr, webhook_request(&body, signature.as_deref())).await;
        assert_eq!(answer.status, 401, "signature {signature:?}: {answer:?}");
        assert_eq!(
            answer.json(),
            serde_json::json!({"error": "invalid signature"})
        );
    }

    // Two signature headers, one of them right: which one would a downstream believe?
    let twice = Request::post("/webhook")
        .header("host", "router")
        .header("x-vyora-signature", good.as_str())
        .header("x-vyora-signature", sign(b"x"))
        .body(Full::new(Bytes::from(body.clone())))
        .expect("request");
    assert_eq!(send(router.addr, twice).await.status, 401);

    assert_eq!(router.count("SELECT COUNT(*) FROM events"), 0);
    assert_eq!(router.count("SELECT COUNT(*) FROM quarantine"), 0);
    assert_eq!(router.count("SELECT COUNT(*) FROM outbox"), 0);
}

#[tokio::test]
async fn a_signed_body_that_is_not_an_event_gets_400_and_is_quarantined() {
    let router = TestRouter::start().await;
    for body in ["[1,2,3]", "{\"call_id\":\"c\"}", "not json at all"] {
        let answer = router.post_signed(body).await;
        assert_eq!(answer.status, 400, "{body}: {answer:?}");
        assert!(
            answer.json()["error"]
                .as_str()
                .is_some_and(|e| !e.is_empty())
        );
    }
    assert_eq!(router.count("SELECT COUNT(*) FROM quarantine"), 3);
    assert_eq!(router.count("SELECT COUNT(*) FROM events"), 0);
    let kept: Vec<u8> = router
        .db()
        .query_row(
            "SELECT body FROM quarantine WHERE CAST(body AS TEXT) = 'not json at all'",
            [],
            |r| r.get(0),
        )
        .expect("the raw body is kept");
    assert_eq!(kept, b"not json at all");
}

#[tokio::test]
async fn a_header_that_contradicts_the_signed_event_name_gets_400() {
    let router = TestRouter::start().await;
    let body = payload("call-x", "call_completed");
    let request = Request::post("/webhook")
        .header("host", "router")
        .header("x-vyora-event", "call_started")
        .header("x-vyora-signature", sign(body.as_bytes()))
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    assert_eq!(send(router.addr, request).await.status, 400);
    assert_eq!(router.count("SELECT COUNT(*) FROM events"), 0);
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_by_its_content_length() {
    let router = TestRouter::start().await;
    let big = format!(
        "{{\"event\":\"call_completed\",\"pad\":\"{}\"}}",
        "x".repeat(1_100_000)
    );
    let answer = router.post_signed(&big).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(router.count("SELECT COUNT(*) FROM events"), 0);
}

#[tokio::test]
async fn a_declared_length_over_the_limit_gets_413_before_the_body_is_sent() {
    let router = TestRouter::start().await;
    let mut stream = TcpStream::connect(router.addr).await.expect("connect");
    // Only the head: the router must answer without waiting for 50 MB that never come.
    stream
        .write_all(b"POST /webhook HTTP/1.1\r\nhost: r\r\ncontent-length: 50000000\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
}

#[tokio::test]
async fn a_chunked_body_that_grows_past_the_limit_gets_413() {
    let router = TestRouter::start().await;
    let mut stream = TcpStream::connect(router.addr).await.expect("connect");
    // A well-formed signature: without one the request is refused before its body.
    let head = format!(
        "POST /webhook HTTP/1.1\r\nhost: r\r\ntransfer-encoding: chunked\r\nx-vyora-signature: sha256={}\r\n\r\n",
        "0".repeat(64)
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let chunk = vec![b'a'; 64 * 1024];
    let mut sent = 0;
    // Keep sending until the router answers; it must stop reading near the limit.
    let head = loop {
        let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
        framed.extend_from_slice(&chunk);
        framed.extend_from_slice(b"\r\n");
        if stream.write_all(&framed).await.is_err() {
            break read_head(&mut stream).await;
        }
        sent += chunk.len();
        if sent > 1_200_000 {
            break read_head(&mut stream).await;
        }
    };
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(sent <= 1_200_000 + chunk.len());
    assert_eq!(router.count("SELECT COUNT(*) FROM events"), 0);
}

#[tokio::test]
async fn unknown_paths_get_404_and_other_methods_get_405() {
    let router = TestRouter::start().await;
    let get = Request::get("/webhook")
        .header("host", "r")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let answer = send(router.addr, get).await;
    assert_eq!(answer.status, 405);
    assert_eq!(
        answer.headers.get("allow").map(|v| v.as_bytes()),
        Some(&b"POST"[..])
    );
    let put = Request::put("/webhook")
        .header("host", "r")
        .body(Full::new(Bytes::new()))
        .expect("req");
    assert_eq!(send(router.addr, put).await.status, 405);
    let other = Request::post("/hooks")
        .header("host", "r")
        .body(Full::new(Bytes::new()))
        .expect("req");
    assert_eq!(send(router.addr, other).await.status, 404);
    let health = Request::get("/healthz")
        .header("host", "r")
        .body(Full::new(Bytes::new()))
        .expect("req");
    assert_eq!(send(router.addr, health).await.status, 200);
}

#[tokio::test]
async fn a_duplicate_is_acknowledged_but_not_forwarded_again() {
    let router = TestRouter::start().await;
    let body = payload("call-dup", "call_completed");
    assert_eq!(
        router.post_signed(&body).await.json(),
        serde_json::json!({"received": true})
    );
    let again = router.post_signed(&body).await;
    assert_eq!(again.status, 200);
    assert_eq!(
        again.json(),
        serde_json::json!({"received": true, "duplicate": true})
    );
    // A different event of the same call is new.
    let next = payload("call-dup", "all_processing_completed");
    assert_eq!(
        router.post_signed(&next).await.json(),
        serde_json::json!({"received": true})
    );

    let lines = wait_for_lines(&router.events_file(), 2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(read_lines(&router.events_file()).len(), 2, "{lines:?}");
    assert_eq!(router.count("SELECT COUNT(*) FROM outbox"), 2);
}

#[tokio::test]
async fn fifty_concurrent_copies_of_one_event_give_one_file_line() {
    let router = TestRouter::start().await;
    let body = Arc::new(payload("call-race", "call_completed"));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let body = Arc::clone(&body);
            let addr = router.addr;
            tokio::spawn(async move { post_signed(addr, &body).await })
        })
        .collect();
    let mut fresh = 0;
    for task in tasks {
        let answer = task.await.expect("task");
        assert_eq!(answer.status, 200);
        if answer.json().get("duplicate").is_none() {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1, "exactly one copy is new");
    wait_for_lines(&router.events_file(), 1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(read_lines(&router.events_file()).len(), 1);
    assert_eq!(router.count("SELECT COUNT(*) FROM events"), 1);
}

#[tokio::test]
async fn a_connection_that_never_finishes_its_headers_is_closed_while_others_are_served() {
    let router = TestRouter::start().await; // header_read_timeout = 1s
    let mut slow = TcpStream::connect(router.addr).await.expect("connect");
    slow.write_all(b"POST /webhook HTTP/1.1\r\nhost: r\r\nx-slow: ")
        .await
        .expect("write");

    // Meanwhile real traffic is served.
    for i in 0..5 {
        let answer = router
            .post_signed(&payload(&format!("call-s{i}"), "call_started"))
            .await;
        assert_eq!(answer.status, 200);
    }

    // The server closes the slow connection (answering 408 or just closing) within a few
    // header timeouts, without our side closing it.
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "the slow connection was still open after 5 s"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

#[tokio::test]
async fn only_sinks_whose_events_match_get_a_delivery() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = format!(
        "{}\n[[sinks]]\nname = \"analysis\"\ntype = \"file\"\npath = \"{}\"\nevents = [\"all_processing_completed\"]\n",
        base_config(dir.path()),
        dir.path().join("analysis.jsonl").display()
    );
    let router = TestRouter::start_with(dir, &config).await;
    for event in ["call_started", "call_completed", "all_processing_completed"] {
        assert_eq!(
            router.post_signed(&payload("call-r", event)).await.status,
            200
        );
    }
    wait_for_lines(&router.events_file(), 3, WAIT).await;
    let analysis = wait_for_lines(&router.path().join("analysis.jsonl"), 1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(read_lines(&router.path().join("analysis.jsonl")).len(), 1);
    assert_eq!(analysis[0]["event"], "all_processing_completed");
}

#[tokio::test]
async fn a_store_that_cannot_commit_answers_503_with_retry_after_and_recovers() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config =
        base_config(dir.path()).replace("header_read_timeout = \"1s\"", "ack_timeout = \"300ms\"");
    let router = TestRouter::start_with(dir, &config).await;

    // Another process holds the write lock (as a long operator transaction would).
    let locker = router.db();
    locker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let body = payload("call-locked", "call_completed");
    let answer = router.post_signed(&body).await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(answer.headers.contains_key("retry-after"));
    locker.execute_batch("ROLLBACK").expect("release");

    // Vyora retries; once the lock is gone the same event is accepted.
    let mut status = 0;
    for _ in 0..100 {
        status = router.post_signed(&body).await.status;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200);
    wait_for_lines(&router.events_file(), 1, WAIT).await;
}

#[tokio::test]
async fn events_pending_at_shutdown_are_delivered_after_restart() {
    let router = TestRouter::start().await;
    let file = router.events_file();
    // Make the sink fail: its path becomes a directory.
    std::fs::remove_file(&file).expect("remove sink file");
    std::fs::create_dir(&file).expect("directory in the way");
    for i in 0..3 {
        let answer = router
            .post_signed(&payload(&format!("call-p{i}"), "call_completed"))
            .await;
        assert_eq!(answer.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = router.stop().await;
    let pending: i64 = rusqlite::Connection::open(dir.path().join("router.db"))
        .expect("db")
        .query_row(
            "SELECT COUNT(*) FROM outbox WHERE status = 'pending'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(pending, 3);

    std::fs::remove_dir(&file).expect("clear the way");
    let config = base_config(dir.path());
    let router = TestRouter::start_with(dir, &config).await;
    let lines = wait_for_lines(&router.events_file(), 3, WAIT).await;
    let mut ids: Vec<_> = lines
        .iter()
        .map(|l| l["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "call-p0:call_completed",
            "call-p1:call_completed",
            "call-p2:call_completed"
        ]
    );
}

/// Reads a response head (up to the blank line) from a raw connection.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !buf.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => buf.push(byte[0]),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    String::from_utf8_lossy(&buf).into_owned()
}
