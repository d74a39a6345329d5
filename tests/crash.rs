//! Crash safety of the built binary: kill -9 in the middle of a load, restart, and check
//! that every event that got a 200 reaches the file sink, which stays valid JSON Lines.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::process::{spawn_router, write_config};
use common::{payload, read_lines, sign};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

const CONNECTIONS: usize = 16;
const KILLS: usize = 3;

/// Sends unique events on one keep-alive connection until the connection fails; records
/// the ids that were acknowledged with 200.
async fn load(addr: SocketAddr, worker: usize, round: usize, acked: Arc<Mutex<HashSet<String>>>) {
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return;
    };
    tokio::spawn(conn);
    for n in 0.. {
        let call_id = format!("r{round}-w{worker}-n{n}");
        let body = payload(&call_id, "call_completed");
        let request = Request::post("/webhook")
            .header("host", "router")
            .header("x-vyora-event", "call_completed")
            .header("x-vyora-signature", sign(body.as_bytes()))
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let Ok(response) = sender.send_request(request).await else {
            return;
        };
        let ok = response.status() == 200;
        if response.into_body().collect().await.is_err() {
            return;
        }
        if ok {
            acked
                .lock()
                .expect("lock")
                .insert(format!("{call_id}:call_completed"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_event_survives_kill_9_mid_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "");
    let acked = Arc::new(Mutex::new(HashSet::new()));

    for round in 0..KILLS {
        let (mut child, addr) = spawn_router(&config).await;
        let workers: Vec<_> = (0..CONNECTIONS)
            .map(|w| tokio::spawn(load(addr, w, round, Arc::clone(&acked))))
            .collect();
        tokio::time::sleep(Duration::from_millis(300 + fastrand::u64(0..500))).await;
        child.kill().await.expect("kill -9");
        for w in workers {
            w.await.expect("worker");
        }
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(
        acked.len() > 100,
        "the load produced only {} acknowledged events",
        acked.len()
    );

    // After the last restart, everything acknowledged must arrive.
    let (mut child, _addr) = spawn_router(&config).await;
    let file = dir.path().join("events.jsonl");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let missing = loop {
        let seen: HashSet<String> = read_lines(&file)
            .iter()
            .filter_map(|l| l["id"].as_str().map(str::to_owned))
            .collect();
        let missing: Vec<_> = acked.difference(&seen).cloned().collect();
        if missing.is_empty() || tokio::time::Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    child.kill().await.expect("kill");
    assert!(
        missing.is_empty(),
        "{} acknowledged events lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );

    // read_lines has parsed every line; count the re-deliveries at-least-once allowed.
    let mut copies: HashMap<String, usize> = HashMap::new();
    for line in read_lines(&file) {
        *copies
            .entry(line["id"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    let duplicates: usize = copies.values().map(|c| c - 1).sum();
    eprintln!(
        "acknowledged {}, lines {}, duplicates {duplicates} over {KILLS} kills",
        acked.len(),
        copies.values().sum::<usize>()
    );
    let integrity: String = rusqlite::Connection::open(dir.path().join("router.db"))
        .expect("db")
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity check");
    assert_eq!(integrity, "ok");
}
