//! Crash safety of the built binary, oracle style: load from many connections, `kill -9`
//! at random moments, restart; afterwards every event that got a 200 is at every sink,
//! nothing appears that was not stored, the store passes `integrity_check` and the JSON
//! Lines file parses line by line.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::downstream::{Downstream, Reply};
use common::process::{spawn_router, write_config};
use common::{amqp, nats, redis_server};
use common::{payload, read_lines, sign};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

const CONNECTIONS: usize = 16;
const KILLS: usize = 5;

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

/// What one sink received: every id, with repeats.
type Received = Vec<String>;

/// Runs the kill -9 cycles against the binary (store and file sink in `dir`, plus the
/// `extra` sinks), then waits until `collect` shows every acknowledged id at every sink,
/// and checks the oracle's conditions.
async fn oracle(
    dir: &std::path::Path,
    extra: &str,
    collect: impl AsyncFn() -> Vec<(&'static str, Received)>,
) {
    let config = write_config(dir, extra);
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let mut per_kill = Vec::new();
    for round in 0..KILLS {
        let (mut child, addr) = spawn_router(&config).await;
        let before = acked.lock().expect("lock").len();
        let workers: Vec<_> = (0..CONNECTIONS)
            .map(|w| tokio::spawn(load(addr, w, round, Arc::clone(&acked))))
            .collect();
        tokio::time::sleep(Duration::from_millis(300 + fastrand::u64(0..700))).await;
        child.kill().await.expect("kill -9");
        for w in workers {
            w.await.expect("worker");
        }
        per_kill.push(acked.lock().expect("lock").len() - before);
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(
        acked.len() > 100 * KILLS,
        "the load produced only {} acknowledged events",
        acked.len()
    );

    // After the last restart, with no more faults, everything acknowledged arrives.
    let (mut child, _) = spawn_router(&config).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let received = loop {
        let received = collect().await;
        let all_there = received.iter().all(|(_, ids)| {
            let seen: HashSet<&String> = ids.iter().collect();
            acked.iter().all(|id| seen.contains(id))
        });
        if all_there || tokio::time::Instant::now() > deadline {
            break received;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    child.kill().await.expect("kill");

    let db = rusqlite::Connection::open(dir.join("router.db")).expect("db");
    let integrity: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity check");
    assert_eq!(integrity, "ok");
    let stored: HashSet<String> = db
        .prepare("SELECT dedup_key FROM events")
        .expect("query")
        .query_map([], |r| r.get(0))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("keys");
    for (sink, ids) in &received {
        let mut copies: HashMap<&String, usize> = HashMap::new();
        for id in ids {
            *copies.entry(id).or_default() += 1;
        }
        let lost = acked.iter().filter(|id| !copies.contains_key(id)).count();
        let unknown: Vec<_> = copies
            .keys()
            .filter(|id| !stored.contains(**id))
            .take(3)
            .collect();
        let duplicates: usize = copies.values().map(|c| c - 1).sum();
        eprintln!(
            "{sink}: {} acknowledged over {KILLS} kills (per kill {per_kill:?}), lost {lost}, duplicates {duplicates}",
            acked.len()
        );
        assert_eq!(lost, 0, "{sink} lost acknowledged events");
        assert!(
            unknown.is_empty(),
            "{sink} got events that were never stored: {unknown:?}"
        );
    }
}

fn file_ids(path: &std::path::Path) -> Received {
    // read_lines parses every line, so a torn or corrupt line fails the test here.
    read_lines(path)
        .iter()
        .filter_map(|l| l["id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_event_survives_repeated_kill_9_mid_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("events.jsonl");
    oracle(dir.path(), "", async || vec![("file", file_ids(&file))]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs RabbitMQ: set VYORA_TEST_AMQP_URL, run with --include-ignored"]
async fn every_acknowledged_event_reaches_the_file_the_queue_and_the_downstream_across_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("events.jsonl");
    let downstream = Downstream::start(|_, _| Reply::Status(200)).await;
    let exchange = amqp::unique("vyora-crash-x");
    let consumer = amqp::Consumer::new().await;
    consumer.bind(&exchange).await;
    let extra = format!(
        "[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"{}\"\n[[sinks]]\nname = \"queue\"\ntype = \"amqp\"\nurl = \"{}\"\nexchange = \"{exchange}\"\n",
        downstream.url("/in"),
        amqp::broker_url()
    );
    let queued = Mutex::new(Vec::new());
    oracle(dir.path(), &extra, async || {
        let more = consumer.drain_all().await;
        let mut queued = queued.lock().expect("lock");
        queued.extend(more);
        let http = downstream
            .received()
            .iter()
            .filter_map(|r| r.header("idempotency-key").map(str::to_owned))
            .collect();
        vec![
            ("file", file_ids(&file)),
            ("http", http),
            ("amqp", queued.clone()),
        ]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Redis: set VYORA_TEST_REDIS_URL, run with --include-ignored"]
async fn every_acknowledged_event_reaches_a_redis_stream_across_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("events.jsonl");
    let url = redis_server::server_url();
    let stream = redis_server::unique("vyora-crash");
    let extra = format!(
        "[[sinks]]\nname = \"stream\"\ntype = \"redis\"\nurl = \"{url}\"\nstream = \"{stream}\"\n"
    );
    oracle(dir.path(), &extra, async || {
        let entries = redis_server::entries(&url, &stream).await;
        let ids = entries
            .iter()
            .map(|e| e.field("idempotency_key").to_owned())
            .collect();
        vec![("file", file_ids(&file)), ("redis", ids)]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a NATS server with JetStream: set VYORA_TEST_NATS_URL"]
async fn every_acknowledged_event_reaches_a_nats_stream_across_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("events.jsonl");
    let stream = nats::unique("VYORA_CRASH");
    nats::create_stream(&stream, &[format!("{stream}.*")]).await;
    let extra = format!(
        "[[sinks]]\nname = \"nats\"\ntype = \"nats\"\nurl = \"{}\"\nsubject = \"{stream}.{{event}}\"\n",
        nats::server_url()
    );
    oracle(dir.path(), &extra, async || {
        let ids = nats::messages(&stream)
            .await
            .iter()
            .map(|m| nats::header(m, "Nats-Msg-Id").to_owned())
            .collect();
        vec![("file", file_ids(&file)), ("nats", ids)]
    })
    .await;
    nats::delete_stream(&stream).await;
}
