//! Several routers sharing one PostgreSQL database, as replicas behind a load balancer:
//! the built binary killed with SIGKILL and paused past its lease in the middle of a load
//! that sends each event to several replicas at once; the database cut from under a router
//! under load; the poller's role passing on when its holder dies, with the API budget
//! shared; and how long a dead replica's claims wait for a survivor.
//!
//! Each test has a database of its own (`TestDb`) and prints what it measured.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::amqp::{self, Consumer};
use common::downstream::{Downstream, Received, Reply};
use common::pg::{TestDb, server_addr};
use common::process::{Spawned, start_router};
use common::proxy::Proxy;
use common::*;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

/// The lifecycle events sent for each call, in order.
const EVENTS: [&str; 3] = ["call_started", "call_completed", "all_processing_completed"];

/// How long the replicas' claims and roles hold without renewal.
const LEASE: Duration = Duration::from_secs(3);
const LEASE_TOML: &str = "3s";

/// The config of one replica in `dir`: both listeners on port 0, the store on the database
/// at `db_url` with the short lease, JSON logs (the harness reads the addresses from them),
/// and `rest` (sinks and any other table).
fn replica_config(dir: &Path, db_url: &str, rest: &str) -> PathBuf {
    let path = dir.join("router.toml");
    let text = format!(
        r#"[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[webhook]
secrets = ["{SECRET}"]

[store]
backend = "postgres"
url = "{db_url}"
pool_size = 6
lease = "{LEASE_TOML}"

[delivery]
backoff_initial = "50ms"
backoff_max = "500ms"

[log]
level = "vyora_router=info"
format = "json"

{rest}
"#
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// One router process with a directory of its own.
struct Replica {
    router: Spawned,
    _dir: tempfile::TempDir,
}

impl Replica {
    async fn start(db: &TestDb, rest: &str) -> Replica {
        let dir = tempfile::tempdir().expect("tempdir");
        let rest = rest.replace("{dir}", &dir.path().display().to_string());
        let config = replica_config(dir.path(), &db.url, &rest);
        Replica {
            router: start_router(&config).await,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.router.pid()
    }
}

/// Sends `signal` to the process `pid` (a router this test started).
fn signal(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

/// Matches the claim owner and role holder of the process `pid`:
/// `<hostname>-<pid>-<8 hex digits>` (see the PostgreSQL store).
fn owner_pattern(pid: u32) -> String {
    format!("-{pid}-[0-9a-f]{{8}}$")
}

/// The pid in a claim owner or role holder.
fn pid_of(holder: &str) -> Option<u32> {
    holder.rsplit('-').nth(1)?.parse().ok()
}

/// Pending deliveries that the process `pid` still has claimed, per sink.
async fn held_by(db: &TestDb, pid: u32) -> BTreeMap<String, i64> {
    db.client()
        .await
        .query(
            "SELECT sink, count(*) FROM deliveries
             WHERE status = 'pending' AND lease_owner ~ $1 GROUP BY sink",
            &[&owner_pattern(pid)],
        )
        .await
        .expect("held claims")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// One signed webhook on a fresh connection, given up after `within`: the status and any
/// `Retry-After`, or why no answer came (refused, reset, timed out).
async fn try_post(
    addr: SocketAddr,
    body: &str,
    within: Duration,
) -> Result<(u16, Option<String>), String> {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let response = sender
            .send_request(webhook_request(body, Some(&sign(body.as_bytes()))))
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        Ok((status, retry_after))
    };
    tokio::time::timeout(within, attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// What the load generator saw.
#[derive(Default)]
struct Tally {
    /// Requests sent (every copy of every event).
    requests: usize,
    /// Answers by status.
    statuses: BTreeMap<u16, usize>,
    /// Requests that got no answer: refused, reset, or no answer within the client's wait.
    failed: usize,
    /// Events whose first copies all went unacknowledged, so they were sent again.
    resent: usize,
}

/// Sends one event to `copies` different replicas at once, and again to another replica
/// while no copy is acknowledged (a load balancer's retry). Returns once one copy got a
/// 200; copies still in flight carry on in the background.
async fn send_event(
    addrs: &[SocketAddr],
    body: Arc<str>,
    copies: usize,
    tally: &Arc<Mutex<Tally>>,
) {
    let mut tried: Vec<usize> = Vec::new();
    for round in 0..200 {
        let targets: Vec<usize> = if round == 0 {
            let mut all: Vec<usize> = (0..addrs.len()).collect();
            fastrand::shuffle(&mut all);
            all.truncate(copies);
            all
        } else {
            let others: Vec<usize> = (0..addrs.len()).filter(|i| !tried.contains(i)).collect();
            let pick = if others.is_empty() {
                fastrand::usize(..addrs.len())
            } else {
                others[fastrand::usize(..others.len())]
            };
            vec![pick]
        };
        if round == 1 {
            tally.lock().expect("lock").resent += 1;
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel(targets.len());
        for &target in &targets {
            let (addr, body, tally, tx) = (
                addrs[target],
                Arc::clone(&body),
                Arc::clone(tally),
                tx.clone(),
            );
            tokio::spawn(async move {
                let answer = try_post(addr, &body, Duration::from_secs(2)).await;
                {
                    let mut tally = tally.lock().expect("lock");
                    tally.requests += 1;
                    match &answer {
                        Ok((status, _)) => *tally.statuses.entry(*status).or_default() += 1,
                        Err(_) => tally.failed += 1,
                    }
                }
                let _ = tx.send(matches!(answer, Ok((200, _)))).await;
            });
        }
        drop(tx);
        while let Some(acked) = rx.recv().await {
            if acked {
                return;
            }
        }
        tried = targets;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no replica acknowledged an event in 200 tries");
}

/// What one sink received, in arrival order: (key, body).
type Arrivals = Vec<(String, Bytes)>;

/// What the test reads off one sink's arrivals.
struct SinkReport {
    received: usize,
    distinct: usize,
    lost: usize,
    duplicates: usize,
}

/// Checks one sink's arrivals against what was acknowledged: nothing acknowledged missing,
/// nothing unknown, every copy of a key with that key's exact body (and the key the body's
/// call and event make), and each call's events first arriving in the order they were
/// stored.
fn check_sink(
    sink: &str,
    arrivals: &Arrivals,
    acked: &HashSet<String>,
    calls: usize,
) -> SinkReport {
    let mut first: HashMap<&str, (usize, &Bytes)> = HashMap::new();
    for (i, (key, body)) in arrivals.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_slice(body).expect("a JSON body");
        let made = format!(
            "{}:{}",
            v["call_id"].as_str().unwrap_or_default(),
            v["event"].as_str().unwrap_or_default()
        );
        assert_eq!(key, &made, "{sink}: the key is the call's and the event's");
        assert!(acked.contains(key), "{sink}: {key} was never acknowledged");
        match first.get(key.as_str()) {
            None => {
                first.insert(key, (i, body));
            }
            Some((_, original)) => assert_eq!(
                *original, body,
                "{sink}: a duplicate of {key} carries another body"
            ),
        }
    }
    for call in 0..calls {
        let at: Vec<Option<usize>> = EVENTS
            .iter()
            .map(|e| {
                first
                    .get(format!("rep-{call}:{e}").as_str())
                    .map(|(i, _)| *i)
            })
            .collect();
        if let [Some(a), Some(b), Some(c)] = at[..] {
            assert!(
                a < b && b < c,
                "{sink}: call rep-{call}'s events first arrived out of order ({a}, {b}, {c})"
            );
        }
    }
    let lost = acked
        .iter()
        .filter(|k| !first.contains_key(k.as_str()))
        .count();
    SinkReport {
        received: arrivals.len(),
        distinct: first.len(),
        lost,
        duplicates: arrivals.len() - first.len(),
    }
}

/// Reads the consumer's queue in the background until told to stop; ends with the
/// broker's error if the consumer lost its connection (the broker was stopped: the queue,
/// auto-deleted, went with it).
fn collect_queue(
    consumer: Arc<Consumer>,
    into: Arc<Mutex<Arrivals>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<(), String>> {
    tokio::spawn(async move {
        while !stop.load(Ordering::SeqCst) {
            match consumer.try_get().await.map_err(|e| e.to_string())? {
                Some(m) => {
                    let id = m
                        .delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    into.lock()
                        .expect("lock")
                        .push((id, Bytes::from(m.delivery.data)));
                }
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        Ok(())
    })
}

/// The warnings and errors in a replica's log, counted by message (and sink).
fn log_warnings(log: &Path) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if matches!(v["level"].as_str(), Some("WARN" | "ERROR")) {
            let what = format!(
                "{} {} {} {} {}",
                v["level"].as_str().unwrap_or_default(),
                v["fields"]["sink"].as_str().unwrap_or("-"),
                v["fields"]["message"].as_str().unwrap_or_default(),
                v["fields"]["error"].as_str().unwrap_or_default(),
                v["fields"]["reason"].as_str().unwrap_or_default()
            );
            *seen.entry(what).or_default() += 1;
        }
    }
    seen
}

/// Waits until no delivery is left pending (all delivered, none dead), or panics (also
/// as soon as `broken` says the test cannot tell any more).
async fn wait_drained(db: &TestDb, within: Duration, broken: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        assert!(
            !broken(),
            "the test's queue consumer lost the broker: was RabbitMQ stopped meanwhile?"
        );
        let left = db
            .count("SELECT count(*) FROM deliveries WHERE status <> 'delivered'")
            .await;
        if left == 0 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{left} deliveries still not delivered after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL and RabbitMQ: set VYORA_TEST_PG_URL and VYORA_TEST_AMQP_URL, run with --include-ignored"]
async fn three_replicas_killed_and_paused_mid_load_store_each_event_once_lose_nothing_acknowledged_keep_call_order_and_reject_late_settlements()
 {
    const CALLS: usize = 1667;
    const WORKERS: usize = 24;
    /// The downstream's answer time, and while the replica is paused.
    const FAST: u64 = 20;
    const SLOW: u64 = 300;
    const PAUSE: Duration = Duration::from_secs(6);

    let db = TestDb::create().await;
    let delay = Arc::new(AtomicU64::new(FAST));
    let downstream = {
        let delay = Arc::clone(&delay);
        Downstream::start(move |_, _| {
            Reply::Slow(Duration::from_millis(delay.load(Ordering::SeqCst)))
        })
        .await
    };
    let exchange = amqp::unique("vyora-replicas-x");
    let consumer = Arc::new(Consumer::new().await);
    consumer.bind(&exchange).await;
    let queued = Arc::new(Mutex::new(Arrivals::new()));
    let stop_queue = Arc::new(AtomicBool::new(false));
    let queue_reader = collect_queue(
        Arc::clone(&consumer),
        Arc::clone(&queued),
        Arc::clone(&stop_queue),
    );
    let sinks = format!(
        "[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"{}\"\n\n[[sinks]]\nname = \"queue\"\ntype = \"amqp\"\nurl = \"{}\"\nexchange = \"{exchange}\"\n",
        downstream.url("/in"),
        amqp::broker_url()
    );
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Replica::start(&db, &sinks).await);
    }
    let addrs: Arc<Vec<SocketAddr>> = Arc::new(replicas.iter().map(|r| r.router.addr).collect());
    let total = CALLS * EVENTS.len();

    // The load: each call's events in order, each event to two or three replicas at once.
    let tally = Arc::new(Mutex::new(Tally::default()));
    let acked = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (addrs, tally, acked) =
                (Arc::clone(&addrs), Arc::clone(&tally), Arc::clone(&acked));
            tokio::spawn(async move {
                for call in (w..CALLS).step_by(WORKERS) {
                    for event in EVENTS {
                        let body: Arc<str> = payload(&format!("rep-{call}"), event).into();
                        send_event(&addrs, body, 2 + fastrand::usize(..2), &tally).await;
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();

    let wait_for = |fraction: usize| {
        let acked = Arc::clone(&acked);
        async move {
            while acked.load(Ordering::SeqCst) < total * fraction / 100 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };

    // At 40 %: kill -9 the first replica.
    wait_for(40).await;
    let killed_pid = replicas[0].pid();
    replicas[0].router.child.kill().await.expect("kill -9");
    let killed_at = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held_by_killed = held_by(&db, killed_pid).await;

    // At 60 %: the second replica is stopped for twice its lease while the load goes on.
    // It must have deliveries in flight when it stops, or it has nothing to settle late:
    // with a downstream answering in 20 ms that depends on the moment (and on how far
    // behind the machine is); answering in 300 ms for a second first fills every one of
    // its HTTP slots.
    wait_for(60).await;
    delay.store(SLOW, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let paused_pid = replicas[1].pid();
    signal(paused_pid, libc::SIGSTOP);
    let paused_at = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held_by_paused = held_by(&db, paused_pid).await;
    tokio::time::sleep(PAUSE - Duration::from_millis(300)).await;
    signal(paused_pid, libc::SIGCONT);
    delay.store(FAST, Ordering::SeqCst);

    for w in workers {
        w.await.expect("load worker");
    }
    let load_took = started.elapsed();
    let drained_after =
        wait_drained(&db, Duration::from_secs(180), || queue_reader.is_finished()).await;
    // Late copies (the paused replica's) arrive within its outstanding requests' time.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_queue.store(true, Ordering::SeqCst);
    if let Err(e) = queue_reader.await.expect("queue reader") {
        panic!("the test's queue consumer lost the broker ({e}): was RabbitMQ stopped meanwhile?");
    }
    let mut queued = std::mem::take(&mut *queued.lock().expect("lock"));
    while let Some(m) = consumer.get().await {
        let id = m
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        queued.push((id, Bytes::from(m.delivery.data)));
    }

    // Every event sent was acknowledged (the load retries until one replica says 200).
    let sent: HashSet<String> = (0..CALLS)
        .flat_map(|c| EVENTS.iter().map(move |e| format!("rep-{c}:{e}")))
        .collect();
    assert_eq!(sent.len(), total);

    // Exactly one event row per key, and one delivery per sink.
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT dedup_key) FROM events",
            &[],
        )
        .await
        .expect("count");
    let (rows, distinct): (i64, i64) = (row.get(0), row.get(1));
    let stored: HashSet<String> = client
        .query("SELECT dedup_key FROM events", &[])
        .await
        .expect("keys")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, distinct, "one row per key");
    assert_eq!(stored, sent, "exactly the keys sent are stored");
    assert_eq!(
        db.count("SELECT count(*) FROM deliveries").await,
        i64::try_from(2 * total).expect("fits"),
        "one delivery per event and sink"
    );

    let http: Arrivals = downstream
        .received()
        .into_iter()
        .map(|r: Received| {
            (
                r.header("idempotency-key").unwrap_or_default().to_owned(),
                r.body,
            )
        })
        .collect();
    let crm = check_sink("crm", &http, &sent, CALLS);
    let queue = check_sink("queue", &queued, &sent, CALLS);

    let mut rejected = Vec::new();
    for replica in &replicas[1..] {
        let samples = scrape(replica.router.admin).await;
        rejected.push(metric(
            &samples,
            "vyora_router_settlements_rejected_total",
            &[],
        ));
    }
    let deadlocked = deadlocks(&db).await;
    let tally = tally.lock().expect("lock");
    let held = |m: &BTreeMap<String, i64>, sink: &str| m.get(sink).copied().unwrap_or(0);
    eprintln!(
        "replicas: {total} events ({CALLS} calls x 3) in {load_took:?}; {} requests, answers {:?}, {} without an answer, {} events sent again; \
         kill -9 at {killed_at:?} holding {held_by_killed:?}; pause of {PAUSE:?} at {paused_at:?} holding {held_by_paused:?}; drained {drained_after:?} after the load",
        tally.requests, tally.statuses, tally.failed, tally.resent,
    );
    eprintln!(
        "replicas: event rows {rows} (distinct keys {distinct}, keys sent {}); deadlocks detected {}",
        sent.len(),
        deadlocked
    );
    for (sink, report) in [("crm", &crm), ("queue", &queue)] {
        eprintln!(
            "replicas: {sink}: received {}, distinct {}, lost {}, duplicates {} (claims held by the killed replica {}, by the paused one {})",
            report.received,
            report.distinct,
            report.lost,
            report.duplicates,
            held(&held_by_killed, sink),
            held(&held_by_paused, sink),
        );
    }
    eprintln!(
        "replicas: settlements rejected: paused replica {}, untouched replica {}",
        rejected[0], rejected[1]
    );
    for (name, replica) in ["paused", "untouched"].iter().zip(&replicas[1..]) {
        eprintln!(
            "replicas: the {name} replica's warnings: {:?}",
            log_warnings(&replica.router.log)
        );
    }

    for (sink, report) in [("crm", &crm), ("queue", &queue)] {
        assert_eq!(report.lost, 0, "{sink} lost acknowledged events");
        let bound = held(&held_by_killed, sink) + held(&held_by_paused, sink);
        assert!(
            i64::try_from(report.duplicates).expect("fits") <= bound,
            "{sink}: {} duplicates, more than the {bound} claims the killed and the paused replica held",
            report.duplicates
        );
    }
    let paused_held: i64 = held_by_paused.values().sum();
    assert!(
        paused_held > 0,
        "the paused replica held no claims when it was stopped"
    );
    assert!(
        rejected[0] >= 1.0,
        "the paused replica's late settlements were not rejected"
    );
    assert!(
        rejected[0] <= paused_held as f64,
        "more settlements rejected ({}) than claims held at the pause ({paused_held})",
        rejected[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn a_database_outage_under_load_answers_503_with_retry_after_never_200_without_a_commit_and_delivers_everything_acknowledged_after()
 {
    const RATE: u64 = 100;
    const BEFORE: Duration = Duration::from_secs(10);
    const OUTAGE: Duration = Duration::from_secs(20);
    const AFTER: Duration = Duration::from_secs(10);

    let db = TestDb::create().await;
    let proxy = Proxy::start(server_addr(), true).await;
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = base_config(dir.path()).replace(
        "[store]\n",
        &format!(
            "[store]\nbackend = \"postgres\"\nurl = \"{}\"\npool_size = 4\nlease = \"{LEASE_TOML}\"\n",
            db.url_via(proxy.addr)
        ),
    );
    let router = TestRouter::start_with(dir, &config).await;
    let addr = router.addr;

    // Lines in the file sink over time, to see when deliveries resume.
    let lines: Arc<Mutex<Vec<(Duration, usize)>>> = Arc::new(Mutex::new(Vec::new()));
    let watching = Arc::new(AtomicBool::new(true));

    /// One request: its key, when it was sent and answered, and the answer.
    struct Sent {
        key: String,
        sent: Duration,
        answered: Duration,
        answer: Result<(u16, Option<String>), String>,
    }
    let started = Instant::now();
    let total = RATE * (BEFORE + OUTAGE + AFTER).as_secs();
    let requests: Vec<_> = (0..total)
        .map(|n| {
            tokio::spawn(async move {
                tokio::time::sleep_until(started + Duration::from_millis(n * 1000 / RATE)).await;
                let call = format!("outage-{n}");
                let sent = started.elapsed();
                let answer = try_post(
                    addr,
                    &payload(&call, "call_completed"),
                    Duration::from_secs(15),
                )
                .await;
                Sent {
                    key: format!("{call}:call_completed"),
                    sent,
                    answered: started.elapsed(),
                    answer,
                }
            })
        })
        .collect();

    let watcher = {
        let (lines, watching, file) = (
            Arc::clone(&lines),
            Arc::clone(&watching),
            router.events_file(),
        );
        tokio::spawn(async move {
            while watching.load(Ordering::SeqCst) {
                let n = std::fs::read(&file)
                    .map(|b| b.iter().filter(|c| **c == b'\n').count())
                    .unwrap_or(0);
                lines.lock().expect("lock").push((started.elapsed(), n));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    tokio::time::sleep_until(started + BEFORE).await;
    proxy.set_up(false);
    proxy.cut().await;
    let cut_at = started.elapsed();
    tokio::time::sleep(OUTAGE / 2).await;
    let readiness_during = router.readyz().await.status;
    tokio::time::sleep_until(started + BEFORE + OUTAGE).await;
    proxy.set_up(true);
    let restored_at = started.elapsed();

    let mut results = Vec::new();
    for r in requests {
        results.push(r.await.expect("request task"));
    }
    let acked: HashSet<String> = results
        .iter()
        .filter(|r| matches!(r.answer, Ok((200, _))))
        .map(|r| r.key.clone())
        .collect();
    let refused: Vec<&Sent> = results
        .iter()
        .filter(|r| matches!(r.answer, Ok((503, _))))
        .collect();
    let first_ok_after = results
        .iter()
        .filter(|r| matches!(r.answer, Ok((200, _))) && r.sent >= restored_at)
        .map(|r| r.answered)
        .min()
        .map(|at| at - restored_at);
    let last_ok_before = results
        .iter()
        .filter(|r| matches!(r.answer, Ok((200, _))) && r.answered <= restored_at)
        .map(|r| r.answered)
        .max();

    // Everything acknowledged reaches the file sink once the database is back.
    let deadline = Instant::now() + Duration::from_secs(90);
    let delivered = loop {
        let ids: HashSet<String> = read_lines(&router.events_file())
            .iter()
            .filter_map(|l| l["id"].as_str().map(str::to_owned))
            .collect();
        if acked.iter().all(|k| ids.contains(k)) || Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let delivered_after = started.elapsed() - restored_at;
    watching.store(false, Ordering::SeqCst);
    watcher.await.expect("watcher");
    let lines = lines.lock().expect("lock").clone();
    let at_return = lines
        .iter()
        .rev()
        .find(|(at, _)| *at <= restored_at)
        .map_or(0, |(_, n)| *n);
    let resumed_after = lines
        .iter()
        .find(|(at, n)| *at > restored_at && *n > at_return)
        .map(|(at, _)| *at - restored_at);
    let stored: HashSet<String> = db
        .client()
        .await
        .query("SELECT dedup_key FROM events", &[])
        .await
        .expect("keys")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost = acked.iter().filter(|k| !delivered.contains(*k)).count();
    let acked_not_stored: Vec<&String> = acked.iter().filter(|k| !stored.contains(*k)).collect();
    let refused_but_stored = refused.iter().filter(|r| stored.contains(&r.key)).count();
    let no_answer: Vec<&String> = results
        .iter()
        .filter_map(|r| r.answer.as_ref().err())
        .take(3)
        .collect();
    let other: Vec<u16> = results
        .iter()
        .filter_map(|r| r.answer.as_ref().ok().map(|(s, _)| *s))
        .filter(|s| *s != 200 && *s != 503)
        .collect();
    let readiness_after = router.readyz().await.status;
    eprintln!(
        "outage: {total} requests at {RATE}/s; database cut at {cut_at:?} for {OUTAGE:?}; {} answered 200, {} answered 503 ({refused_but_stored} of them stored anyway), {} otherwise; \
         last 200 before the return at {last_ok_before:?}; first 200 {first_ok_after:?} after the return; deliveries resumed {resumed_after:?} after the return; \
         everything acknowledged delivered {delivered_after:?} after the return (the load ran until {:?} after it), lost {lost}; \
         readiness {readiness_during} during, {readiness_after} after",
        acked.len(),
        refused.len(),
        other.len() + no_answer.len(),
        AFTER,
    );

    assert!(
        no_answer.is_empty(),
        "requests without an answer: {no_answer:?}"
    );
    assert!(
        other.is_empty(),
        "answers other than 200 and 503: {other:?}"
    );
    assert!(
        refused.len() as u64 >= RATE * OUTAGE.as_secs() / 2,
        "only {} answers 503 during a {OUTAGE:?} outage",
        refused.len()
    );
    for r in &refused {
        assert_eq!(
            r.answer
                .as_ref()
                .ok()
                .and_then(|(_, after)| after.as_deref()),
            Some("5"),
            "a 503 without Retry-After ({})",
            r.key
        );
    }
    for r in &results {
        if r.sent >= cut_at && r.answered < restored_at {
            assert!(
                matches!(r.answer, Ok((503, _))),
                "{} was answered {:?} while the database was unreachable",
                r.key,
                r.answer
            );
        }
    }
    assert!(
        acked_not_stored.is_empty(),
        "acknowledged but not stored: {:?}",
        &acked_not_stored[..acked_not_stored.len().min(5)]
    );
    assert_eq!(lost, 0, "acknowledged events missing from the file sink");
    assert!(
        first_ok_after.is_some_and(|d| d < Duration::from_secs(10)),
        "no 200 within 10 s of the database's return ({first_ok_after:?})"
    );
    router.stop().await;
}

/// A call record as `GET /v1/calls/:id` answers it, with its analysis.
fn call_record(call_id: &str) -> serde_json::Value {
    serde_json::json!({
        "call_id": call_id,
        "agent_id": "def456",
        "agent_name": "Home Loan Agent",
        "status": "completed",
        "direction": "outbound",
        "duration_seconds": 47,
        "transcript": [{"bot": "Hi"}, {"user": "Hello"}],
        "analysis": {"summary": "Interested in EMI options.", "classification": "Interested"},
        "called_at": "2026-05-24T10:30:00Z"
    })
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn the_poller_role_passes_on_within_the_lease_when_its_holder_is_killed_and_the_api_budget_holds_across_replicas()
 {
    const API_KEY: &str = "vya_test_key";
    const PER_MINUTE: usize = 30;
    /// One new call a second for this long: more than the budget allows.
    const CALLS: u64 = 75;

    let db = TestDb::create().await;
    let api = Downstream::start(|r, _| {
        if r.header("x-api-key") != Some(API_KEY) {
            return Reply::Json(401, serde_json::json!({"error": "Invalid API key"}));
        }
        let call = r.path.strip_prefix("/v1/calls/").unwrap_or_default();
        Reply::Json(200, call_record(call))
    })
    .await;
    let rest = format!(
        "[api]\nbase_url = \"{}\"\napi_key = \"{API_KEY}\"\nrequests_per_minute = {PER_MINUTE}\ntimeout = \"2s\"\n\n\
         [poller]\nenabled = true\nwait_for_analysis = \"1s\"\ninterval = \"5s\"\ngive_up_after = \"10m\"\n\n\
         [[sinks]]\nname = \"archive\"\ntype = \"file\"\npath = \"{{dir}}/events.jsonl\"\n",
        api.url("")
    );
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Replica::start(&db, &rest).await);
    }
    let pids: Vec<u32> = replicas.iter().map(Replica::pid).collect();
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.router.addr).collect();
    let started = Instant::now();

    // Who holds the role, watched every 100 ms: (when it changed, holder).
    let holders: Arc<Mutex<Vec<(Duration, String)>>> = Arc::new(Mutex::new(Vec::new()));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (holders, watching, client) = (
            Arc::clone(&holders),
            Arc::clone(&watching),
            db.client().await,
        );
        tokio::spawn(async move {
            while watching.load(Ordering::SeqCst) {
                if let Ok(Some(row)) = client
                    .query_opt("SELECT holder FROM leases WHERE role = 'poller'", &[])
                    .await
                {
                    let holder: String = row.get(0);
                    let mut holders = holders.lock().expect("lock");
                    if holders.last().is_none_or(|(_, h)| *h != holder) {
                        holders.push((started.elapsed(), holder));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // One call a second, each with call_completed only: due for a poll a second later.
    let dead: Arc<Mutex<HashSet<usize>>> = Arc::new(Mutex::new(HashSet::new()));
    let load = {
        let dead = Arc::clone(&dead);
        tokio::spawn(async move {
            for n in 0..CALLS {
                tokio::time::sleep_until(started + Duration::from_secs(n)).await;
                let body = payload(&format!("poll-{n}"), "call_completed");
                let alive: Vec<usize> = (0..addrs.len())
                    .filter(|i| !dead.lock().expect("lock").contains(i))
                    .collect();
                let target = alive[usize::try_from(n).expect("fits") % alive.len()];
                let answer = try_post(addrs[target], &body, Duration::from_secs(5)).await;
                assert!(
                    matches!(answer, Ok((200, _))),
                    "poll-{n} answered {answer:?}"
                );
            }
        })
    };

    // Kill the holder once polling is under way.
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.received().len() < 10 {
        assert!(Instant::now() < deadline, "the poller never polled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let holder: String = db
        .client()
        .await
        .query_one("SELECT holder FROM leases WHERE role = 'poller'", &[])
        .await
        .expect("a poller holds the role")
        .get(0);
    let victim = pids
        .iter()
        .position(|p| Some(*p) == pid_of(&holder))
        .unwrap_or_else(|| panic!("the holder {holder} is none of the replicas {pids:?}"));
    dead.lock().expect("lock").insert(victim);
    replicas[victim].router.child.kill().await.expect("kill -9");
    let killed_at = started.elapsed();
    let killed = Instant::now();

    // Another replica takes the role over, and polling resumes: the holder's lease runs
    // out at most a lease after its last renewal, and the others ask for the role every
    // second.
    let takeover_deadline = killed + LEASE + Duration::from_secs(5);
    let (taken_after, new_holder) = loop {
        let now_holding: String = db
            .client()
            .await
            .query_one("SELECT holder FROM leases WHERE role = 'poller'", &[])
            .await
            .expect("the role's row")
            .get(0);
        if now_holding != holder {
            break (killed.elapsed(), now_holding);
        }
        assert!(
            Instant::now() < takeover_deadline,
            "nobody took the role over from the killed replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let resumed_after = loop {
        if let Some(r) = api.received().iter().find(|r| r.at > killed) {
            break r.at - killed;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no poll after the holder was killed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    load.await.expect("load");
    // Past the first window's end, so the budget's sliding edge is crossed.
    tokio::time::sleep_until(started + Duration::from_secs(CALLS + 5)).await;
    watching.store(false, Ordering::SeqCst);
    watcher.await.expect("watcher");

    let received = api.received();
    let mut times: Vec<Instant> = received.iter().map(|r| r.at).collect();
    times.sort();
    let busiest = max_in_window(&times, Duration::from_secs(60));
    let mut per_call: BTreeMap<String, usize> = BTreeMap::new();
    for r in &received {
        *per_call.entry(r.path.clone()).or_default() += 1;
    }
    let repeated: Vec<(&String, &usize)> = per_call.iter().filter(|(_, n)| **n > 1).collect();
    let finished = db
        .count("SELECT count(*) FROM polls WHERE status = 'done'")
        .await;
    let holders = holders.lock().expect("lock").clone();
    let changes: Vec<(Duration, Option<u32>)> =
        holders.iter().map(|(at, h)| (*at, pid_of(h))).collect();
    eprintln!(
        "poller: replicas {pids:?}; {CALLS} calls at 1/s; holder {holder} killed at {killed_at:?}; taken over by {new_holder} {taken_after:?} later; first poll after the kill {resumed_after:?} later; \
         {} API requests, at most {busiest} in any 60 s (limit {PER_MINUTE}); {finished} calls finished; calls polled more than once {repeated:?}; holders over time (since start, pid) {changes:?}",
        received.len()
    );

    assert_ne!(pid_of(&new_holder), Some(pids[victim]));
    assert!(
        taken_after <= LEASE + Duration::from_secs(2),
        "the role passed on {taken_after:?} after the kill (lease {LEASE:?})"
    );
    assert!(busiest <= PER_MINUTE, "{busiest} requests in one minute");
    assert!(
        received.len() > PER_MINUTE,
        "the budget was never exhausted ({} requests)",
        received.len()
    );
    assert_eq!(
        changes.len(),
        2,
        "the role changed hands other than at the kill: {changes:?}"
    );
    assert!(
        repeated.len() <= 1,
        "calls polled more than once (two pollers at a time?): {repeated:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn a_dead_replicas_claims_wait_out_its_lease_and_a_survivor_delivers_them_soon_after() {
    const EVENTS_SENT: usize = 24;
    const DELAY: Duration = Duration::from_millis(500);

    let db = TestDb::create().await;
    let downstream = Downstream::start(|_, _| Reply::Slow(DELAY)).await;
    let sinks = format!(
        "[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"{}\"\n",
        downstream.url("/in")
    );
    let mut doomed = Replica::start(&db, &sinks).await;
    let survivor = Replica::start(&db, &sinks).await;
    let pid = doomed.pid();

    for n in 0..EVENTS_SENT {
        let body = payload(&format!("claimed-{n}"), "call_completed");
        let target = if n % 2 == 0 {
            doomed.router.addr
        } else {
            survivor.router.addr
        };
        assert_eq!(post_signed(target, &body).await.status, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while held_by(&db, pid).await.is_empty() {
        assert!(Instant::now() < deadline, "the replica never claimed a row");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.router.child.kill().await.expect("kill -9");
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // What it held when it died, and how long its leases had left (the database's clock).
    let rows = db
        .client()
        .await
        .query(
            "SELECT d.id, e.dedup_key,
                    EXTRACT(EPOCH FROM (d.lease_until - now()))::float8
             FROM deliveries d JOIN events e ON e.id = d.event_id
             WHERE d.status = 'pending' AND d.lease_owner ~ $1",
            &[&owner_pattern(pid)],
        )
        .await
        .expect("held rows");
    assert!(!rows.is_empty(), "the killed replica held no claims");
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let keys: HashSet<String> = rows.iter().map(|r| r.get(1)).collect();
    let left = rows
        .iter()
        .map(|r| r.get::<_, f64>(2))
        .fold(0.0f64, f64::max);
    let expires = killed + Duration::from_millis(100) + Duration::from_secs_f64(left.max(0.0));

    let within = LEASE + Duration::from_secs(2) + DELAY + Duration::from_secs(3);
    let delivered_after = loop {
        let done = db
            .client()
            .await
            .query_one(
                "SELECT count(*) FROM deliveries WHERE id = ANY($1) AND status = 'delivered'",
                &[&ids],
            )
            .await
            .expect("count")
            .get::<_, i64>(0);
        if usize::try_from(done).expect("fits") == ids.len() {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < within,
            "{done} of the dead replica's {} rows delivered after {within:?}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The survivor's copies: what reached the downstream after the kill.
    let again: Vec<Received> = downstream
        .received()
        .into_iter()
        .filter(|r| r.at > killed)
        .filter(|r| {
            r.header("idempotency-key")
                .is_some_and(|k| keys.contains(k))
        })
        .collect();
    let first_copy = again.iter().map(|r| r.at).min();
    let early: Vec<&Received> = again
        .iter()
        .filter(|r| r.at + Duration::from_millis(100) < expires)
        .collect();
    eprintln!(
        "dead claims: the killed replica held {} rows with at most {left:.2} s of lease left; the survivor's first copy came {:?} after the kill, all {} delivered {delivered_after:?} after it (lease {LEASE:?}, downstream answers in {DELAY:?})",
        ids.len(),
        first_copy.map(|at| at - killed),
        ids.len(),
    );
    assert!(
        early.is_empty(),
        "{} rows were taken over before the dead replica's lease ran out",
        early.len()
    );
    let redelivered: HashSet<&str> = again
        .iter()
        .filter_map(|r| r.header("idempotency-key"))
        .collect();
    assert_eq!(
        redelivered.len(),
        keys.len(),
        "the survivor delivered every row the dead replica held"
    );
    drop(survivor);
}

/// Deadlocks the server has detected in this test's database.
async fn deadlocks(db: &TestDb) -> i64 {
    let client = db.client().await;
    // Statistics reach the view when a backend flushes them: ask for fresh ones.
    let _ = client
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await;
    client
        .query_one(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .expect("database statistics")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn two_replicas_ingesting_the_same_events_in_opposite_orders_never_deadlock() {
    use vyora_router::config::{StoreBackend, StoreConfig};
    use vyora_router::event::Event;
    use vyora_router::store::{Ingested, Store, StoreOptions};

    const KEYS: usize = 400;
    const ROUNDS: usize = 20;
    let db = TestDb::create().await;
    let config = StoreConfig {
        backend: StoreBackend::Postgres(Box::new(db.postgres(8))),
        lease: LEASE,
        ..StoreConfig::sqlite("unused".into())
    };
    let stores = [
        Store::open(&config, StoreOptions::default())
            .await
            .expect("store"),
        Store::open(&config, StoreOptions::default())
            .await
            .expect("store"),
    ];
    let before = deadlocks(&db).await;
    let started = Instant::now();
    let mut stored = 0;
    for round in 0..ROUNDS {
        // Every event to both replicas at once, one in order and the other in reverse:
        // each replica's writers commit them in groups.
        let mut tasks = Vec::new();
        for n in 0..KEYS {
            for (i, store) in stores.iter().enumerate() {
                let n = if i == 0 { n } else { KEYS - 1 - n };
                let store = store.clone();
                let body = payload(&format!("order-{round}-{n}"), "call_completed");
                let event = Event::from_webhook(None, Bytes::from(body)).expect("an event");
                tasks.push(tokio::spawn(async move {
                    store.ingest(event, vec![Arc::from("s")]).await
                }));
            }
        }
        for t in tasks {
            if matches!(
                t.await.expect("task").expect("stored"),
                Ingested::Stored { .. }
            ) {
                stored += 1;
            }
        }
    }
    let took = started.elapsed();
    // Give the backends a moment to publish their statistics.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let detected = deadlocks(&db).await - before;
    eprintln!(
        "opposite orders: {} events to two replicas each, {stored} stored, in {took:?}; deadlocks detected {detected}",
        KEYS * ROUNDS
    );
    assert_eq!(stored, KEYS * ROUNDS, "each event stored once");
    assert_eq!(detected, 0, "group commits deadlocked");
    for store in stores {
        store.close().await;
    }
}
