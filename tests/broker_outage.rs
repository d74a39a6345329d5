//! RabbitMQ stopped for 30 s under load (`rabbitmqctl stop_app`): acks stay 200 and fast,
//! the backlog waits in SQLite, memory stays bounded, and everything drains afterwards.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::amqp::{self, Consumer};
use common::process::{rss_kb, spawn_router, write_config};
use common::*;
use tokio::time::Instant;

const OUTAGE: Duration = Duration::from_secs(30);

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

/// Starts the broker's application again however the test ends.
struct StartAgain;

impl Drop for StartAgain {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs RabbitMQ: set VYORA_TEST_AMQP_URL, run with --include-ignored (stops and starts the local broker)"]
async fn a_broker_stopped_for_30_s_under_load_costs_nothing_acknowledged() {
    let exchange = amqp::unique("vyora-outage-x");
    let queue = amqp::unique("vyora-outage-q");
    let consumer = Consumer::durable(&queue).await;
    consumer.bind(&exchange).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!(
        "[[sinks]]\nname = \"queue\"\ntype = \"amqp\"\nurl = \"{}\"\nexchange = \"{exchange}\"\n",
        amqp::broker_url()
    );
    let (child, addr) = spawn_router(&write_config(dir.path(), &extra)).await;
    let pid = child.id().expect("pid");

    // About 200 events a second from 4 connections, for the whole test.
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let senders: Vec<_> = (0..4)
        .map(|w| {
            let (acked, latencies, running) = (
                Arc::clone(&acked),
                Arc::clone(&latencies),
                Arc::clone(&running),
            );
            tokio::spawn(async move {
                let mut n = 0;
                while running.load(std::sync::atomic::Ordering::SeqCst) {
                    let id = format!("out-{w}-{n}");
                    let started = Instant::now();
                    let answer = post_signed(addr, &payload(&id, "call_completed")).await;
                    latencies.lock().expect("lock").push((
                        started,
                        started.elapsed(),
                        answer.status,
                    ));
                    if answer.status == 200 {
                        acked
                            .lock()
                            .expect("lock")
                            .insert(format!("{id}:call_completed"));
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_before = rss_kb(pid);
    let guard = StartAgain;
    let outage_started = Instant::now();
    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(OUTAGE).await;
    let rss_during = rss_kb(pid);
    let backlog: i64 = rusqlite::Connection::open(dir.path().join("router.db"))
        .expect("db")
        .query_row(
            "SELECT COUNT(*) FROM outbox WHERE sink = 'queue' AND status = 'pending'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    rabbitmqctl(&["start_app"]);
    let outage_ended = Instant::now();
    drop(guard);
    tokio::time::sleep(Duration::from_secs(3)).await;
    running.store(false, std::sync::atomic::Ordering::SeqCst);
    for s in senders {
        s.await.expect("sender");
    }

    let acked = acked.lock().expect("lock").clone();
    let consumer = Consumer::durable(&queue).await;
    let (_, ids) = consumer.drain(acked.len(), Duration::from_secs(60)).await;
    let lost = acked.iter().filter(|id| !ids.contains(*id)).count();
    let rss_after = rss_kb(pid);

    let latencies = latencies.lock().expect("lock").clone();
    let mut during: Vec<Duration> = latencies
        .iter()
        .filter(|(at, _, _)| *at >= outage_started && *at <= outage_ended)
        .map(|(_, d, _)| *d)
        .collect();
    during.sort();
    let not_ok = latencies
        .iter()
        .filter(|(_, _, status)| *status != 200)
        .count();
    eprintln!(
        "broker outage {:?}: {} acknowledged, {not_ok} not 200, {} answered during the outage (p50 {:?}, p99 {:?}, max {:?}), backlog {backlog} in SQLite, lost {lost}, RSS {rss_before} -> {rss_during} (outage) -> {rss_after} kB",
        outage_ended - outage_started,
        acked.len(),
        during.len(),
        during[during.len() / 2],
        during[during.len() * 99 / 100],
        during[during.len() - 1],
    );
    consumer.delete().await;
    assert_eq!(
        not_ok, 0,
        "every webhook is acknowledged while the broker is down"
    );
    assert!(backlog > 1000, "the backlog waited in the store: {backlog}");
    assert_eq!(lost, 0);
    assert!(
        during[during.len() - 1] < Duration::from_secs(1),
        "acks stay fast: max {:?}",
        during[during.len() - 1]
    );
    assert!(
        rss_during.saturating_sub(rss_before) < 16 * 1024,
        "RSS {rss_before} -> {rss_during} kB"
    );
    drop(child);
}
