//! Deliveries that keep failing, against the built binary: one call's failing event must
//! not hold the other events back, slow their delivery, grow memory or bring them back
//! after a crash; a destination failing everything must leave the router idle between
//! retries.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::downstream::{Downstream, Received, Reply};
use common::process::{rss_kb, start_router, write_config};
use common::*;

/// The downstream's key for a request: `call_id:event`.
fn key_of(r: &Received) -> String {
    let body = r.json();
    format!(
        "{}:{}",
        body["call_id"].as_str().unwrap_or_default(),
        body["event"].as_str().unwrap_or_default()
    )
}

/// A port nothing listens on yet, for a downstream that comes up later.
fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// The router's CPU time so far (user and system), from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command's closing parenthesis; utime and stime are the 12th and
    // 13th of them, in clock ticks (100 a second on Linux).
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<u64> = after
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    Duration::from_millis((fields[11] + fields[12]) * 10)
}

/// Posts `calls` from `connections` concurrent senders, each call's bodies in order by one
/// sender (so each call's events are stored in that order); every one must be
/// acknowledged.
async fn post_all(addr: SocketAddr, calls: Vec<Vec<String>>, connections: usize) {
    let bodies = calls;
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..connections)
        .map(|_| {
            let (bodies, next) = (Arc::clone(&bodies), Arc::clone(&next));
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(call) = bodies.get(i) else { break };
                    for body in call {
                        assert_eq!(post_signed(addr, body).await.status, 200);
                    }
                }
            })
        })
        .collect();
    for s in senders {
        s.await.expect("sender");
    }
}

/// Delivery rate (requests a second) in the first and the last `window` of `times`.
fn first_and_last_rates(times: &[Instant], window: Duration) -> (f64, f64) {
    let (first, last) = (times[0], times[times.len() - 1]);
    let early = times.iter().filter(|t| **t < first + window).count();
    let late = times.iter().filter(|t| **t + window > last).count();
    let secs = window.as_secs_f64();
    (early as f64 / secs, late as f64 / secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_calls_failing_event_neither_holds_back_slows_grows_memory_nor_returns_after_a_crash() {
    const OTHERS: usize = 20_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let at = free_port();
    let config = write_config(
        dir.path(),
        &format!("[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"http://{at}/in\"\n"),
    );
    // Failures are retried within 2 s and never given up: the failing event stays
    // pending throughout.
    let text = std::fs::read_to_string(&config)
        .expect("read")
        .replace("backoff_initial = \"50ms\"", "backoff_initial = \"1s\"")
        .replace(
            "backoff_max = \"200ms\"",
            "backoff_max = \"2s\"\nmax_attempts = 1000",
        );
    std::fs::write(&config, text).expect("write");
    let mut router = start_router(&config).await;

    // The destination is down while the events arrive: they wait, with no attempt made.
    let mut bodies = vec![vec![
        payload("stuck", "call_completed"),
        payload("stuck", "all_processing_completed"),
    ]];
    bodies.extend((0..OTHERS).map(|n| vec![payload(&format!("call-{n}"), "call_completed")]));
    post_all(router.addr, bodies, 32).await;

    // It comes back answering 500 to the one call's first event, 200 to the rest.
    let downstream = Downstream::start_on(at, |r, _| {
        if key_of(r) == "stuck:call_completed" {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let delivered = |d: &Downstream| {
        d.received()
            .iter()
            .filter(|r| !key_of(r).starts_with("stuck:"))
            .count()
    };
    downstream.wait_for(1_000, Duration::from_secs(60)).await;
    let rss_before = rss_kb(router.pid());

    // Killed half way through the drain, then started again.
    downstream
        .wait_for(OTHERS / 2, Duration::from_secs(120))
        .await;
    router.child.kill().await.expect("kill -9");
    let kill_at = Instant::now();
    let before_kill: Vec<String> = downstream.received().iter().map(key_of).collect();
    let mut router = start_router(&config).await;
    let deadline = Instant::now() + Duration::from_secs(180);
    while delivered(&downstream) < OTHERS + 16 {
        let distinct = downstream
            .received()
            .iter()
            .map(key_of)
            .filter(|k| !k.starts_with("stuck:"))
            .collect::<std::collections::HashSet<_>>()
            .len();
        if distinct == OTHERS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{distinct} of {OTHERS} delivered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = rss_kb(router.pid());
    let received = downstream.received();

    let mut times = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &received {
        let key = key_of(r);
        assert_ne!(
            key, "stuck:all_processing_completed",
            "the held event went out before the failing one was delivered"
        );
        if !key.starts_with("stuck:") {
            times.push(r.at.into_std());
            *seen.entry(key).or_default() += 1;
        }
    }
    let again = before_kill
        .iter()
        .filter(|k| !k.starts_with("stuck:") && seen.get(*k).copied().unwrap_or(0) > 1)
        .count();
    assert_eq!(seen.len(), OTHERS, "every other event delivered");

    // The cursor is past every delivered event: only the failing call's two wait.
    let db = rusqlite::Connection::open(dir.path().join("router.db")).expect("open");
    let pending: i64 = db
        .query_row(
            "SELECT count(*) FROM outbox WHERE sink = 'crm' AND status = 'pending'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    let cursor: i64 = db
        .query_row("SELECT position FROM cursors WHERE sink = 'crm'", [], |r| {
            r.get(0)
        })
        .expect("cursor");

    // The drain before the kill: the rate at its end against its start.
    let first_run: Vec<Instant> = times.iter().copied().filter(|t| *t < kill_at).collect();
    let span = first_run[first_run.len() - 1] - first_run[0];
    let window = (span / 2).min(Duration::from_secs(5));
    let (early, late) = first_and_last_rates(&first_run, window);
    eprintln!(
        "drain: {early:.0}/s first {window:?}, {late:.0}/s last; RSS {rss_before} -> {rss_after} kB; \
         delivered again after kill -9: {again}; pending {pending}; cursor {cursor}"
    );
    assert_eq!(pending, 2, "only the failing call's events wait");
    assert!(
        cursor >= i64::try_from(OTHERS).expect("fits"),
        "the cursor stopped at {cursor}"
    );
    assert!(
        late >= 0.8 * early,
        "delivery slowed: {early:.0}/s -> {late:.0}/s"
    );
    assert!(
        rss_after <= rss_before + 5 * 1024,
        "memory grew: {rss_before} -> {rss_after} kB"
    );
    // An HTTP sink has at most 8 requests in flight (its concurrency), each settled
    // before its slot takes the next: at most that many again, and those being written.
    assert!(again <= 16, "{again} delivered again after kill -9");
    router.child.kill().await.expect("kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_destination_failing_everything_leaves_the_router_idle_between_retries() {
    const CALLS: usize = 6_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let downstream = Downstream::start(|_, _| Reply::Status(502)).await;
    let config = write_config(
        dir.path(),
        &format!(
            // The engine's own behaviour: no circuit breaker to stop the attempts.
            "[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"{}\"\n\
             circuit_breaker = {{ failures = 0 }}\n",
            downstream.url("/in")
        ),
    );
    // Retries spread over an hour: between them there is nothing to do.
    let text = std::fs::read_to_string(&config)
        .expect("read")
        .replace("backoff_initial = \"50ms\"", "backoff_initial = \"1h\"")
        .replace("backoff_max = \"200ms\"", "backoff_max = \"1h\"");
    std::fs::write(&config, text).expect("write");
    let mut router = start_router(&config).await;
    let pid = router.pid();

    // Each call's first event fails; its second waits behind it.
    let bodies: Vec<Vec<String>> = (0..CALLS)
        .map(|n| {
            let call = format!("call-{n}");
            vec![
                payload(&call, "call_completed"),
                payload(&call, "all_processing_completed"),
            ]
        })
        .collect();
    post_all(router.addr, bodies, 32).await;
    downstream.wait_for(CALLS, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (cpu_before, rss_before) = (cpu_time(pid), rss_kb(pid));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (cpu_after, rss_after) = (cpu_time(pid), rss_kb(pid));
    let busy = cpu_after - cpu_before;
    eprintln!(
        "CPU over 5 s: {busy:?}; RSS {rss_before} -> {rss_after} kB; requests {}",
        downstream.count()
    );
    assert!(
        busy < Duration::from_millis(500),
        "the router worked {busy:?} of 5 s with nothing due"
    );
    assert!(
        rss_after <= rss_before + 5 * 1024,
        "memory grew: {rss_before} -> {rss_after} kB"
    );
    let second_events = downstream
        .received()
        .iter()
        .filter(|r| key_of(r).ends_with(":all_processing_completed"))
        .count();
    assert_eq!(second_events, 0, "a call's second event overtook its first");
    router.child.kill().await.expect("kill");
}
