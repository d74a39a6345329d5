//! The Redis Streams sink against a real server, the shared one, through a TCP proxy to
//! cut the connection or play a server that is down (a server stopped for 30 s is in
//! `redis_outage.rs`, TLS in `redis_tls.rs`).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::proxy::Proxy;
use common::redis_server::{
    Entry, PrivateServer, connect, delete_matching, entries, server_addr, server_url, unique,
    url_via, wait_for_entries,
};
use common::*;
use tokio::time::Instant;
use vyora_router::event::{Delivery, DeliveryId, Source};
use vyora_router::sinks::redis::{RedisOptions, RedisSink};
use vyora_router::sinks::{Sink, SinkError};

const WAIT: Duration = Duration::from_secs(30);

/// A `redis` sink table writing every event to `stream`.
fn sink_table(url: &str, stream: &str) -> String {
    format!(
        "[[sinks]]\nname = \"stream\"\ntype = \"redis\"\nurl = \"{url}\"\nstream = \"{stream}\"\nidempotency_ttl = \"10m\"\nsecret = \"downstream-secret\"\n"
    )
}

async fn router_with_redis(url: &str, stream: &str) -> TestRouter {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = format!("{}\n{}", base_config(dir.path()), sink_table(url, stream));
    TestRouter::start_with(dir, &config).await
}

async fn wait_ready(router: &TestRouter, status: u16) {
    let deadline = Instant::now() + WAIT;
    while router.readyz().await.status != status {
        assert!(Instant::now() < deadline, "/readyz never answered {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A sink built directly, as the router builds it, from a table's own keys.
fn sink(url: &str, stream: &str) -> Arc<RedisSink> {
    let options: RedisOptions = toml::from_str(&format!(
        "url = \"{url}\"\nstream = \"{stream}\"\nidempotency_ttl = \"10m\"\n"
    ))
    .expect("options");
    RedisSink::start("stream", &options.validate().expect("valid")).expect("sink")
}

fn delivery(call_id: &str) -> Delivery {
    Delivery {
        id: DeliveryId::row(7),
        attempts: 0,
        event: "call_completed".into(),
        call_id: Some(call_id.into()),
        dedup_key: format!("{call_id}:call_completed"),
        source: Source::Webhook,
        received_at: SystemTime::now(),
        payload: Bytes::from(payload(call_id, "call_completed")),
    }
}

/// Each call's events in the order its stream entries have them.
fn order_per_call(all: &[Entry]) -> HashMap<String, Vec<String>> {
    let mut calls: HashMap<String, Vec<String>> = HashMap::new();
    for e in all {
        calls
            .entry(e.field("call_id").to_owned())
            .or_default()
            .push(e.field("event").to_owned());
    }
    calls
}

#[tokio::test]
#[ignore = "needs Redis: set VYORA_TEST_REDIS_URL, run with --include-ignored"]
async fn an_entry_carries_the_event_call_id_payload_idempotency_key_and_signature() {
    let stream = unique("vyora-test-s");
    let router = router_with_redis(&server_url(), &format!("{stream}.{{event}}")).await;
    wait_ready(&router, 200).await;
    let body = payload("call-r1", "call_completed");
    assert_eq!(router.post_signed(&body).await.status, 200);
    let key = format!("{stream}.call_completed");
    let all = wait_for_entries(&server_url(), &key, 1, WAIT).await;
    delete_matching(&server_url(), &format!("*{stream}*")).await;
    let e = all.first().expect("an entry");
    assert_eq!(e.field("payload"), body, "byte-identical");
    assert_eq!(e.field("event"), "call_completed");
    assert_eq!(e.field("call_id"), "call-r1");
    assert_eq!(e.field("source"), "webhook");
    assert_eq!(e.field("idempotency_key"), "call-r1:call_completed");
    let downstream = vyora_router::signature::Secret::new(b"downstream-secret").expect("secret");
    assert_eq!(
        e.field("signature"),
        vyora_router::signature::sign(&downstream, body.as_bytes())
    );
    assert!(
        e.field("received_at")
            .parse::<u64>()
            .is_ok_and(|ms| ms > 1_700_000_000_000)
    );
}

#[tokio::test]
#[ignore = "needs Redis: set VYORA_TEST_REDIS_URL, run with --include-ignored"]
async fn delivering_the_same_delivery_twice_adds_one_entry() {
    let stream = unique("vyora-test-s");
    let sink = sink(&server_url(), &stream);
    let d = delivery("call-twice");
    assert!(sink.deliver(std::slice::from_ref(&d)).await[0].is_ok());
    // Again alone (a redelivery after a lost answer), then twice in one pipeline.
    assert!(sink.deliver(std::slice::from_ref(&d)).await[0].is_ok());
    let both = sink.deliver(&[d.clone(), d.clone()]).await;
    assert!(both.iter().all(Result::is_ok), "{both:?}");
    let other = delivery("call-other");
    assert!(sink.deliver(&[other]).await[0].is_ok());
    let all = entries(&server_url(), &stream).await;
    delete_matching(&server_url(), &format!("*{stream}*")).await;
    let calls: Vec<&str> = all.iter().map(|e| e.field("call_id")).collect();
    assert_eq!(calls, ["call-twice", "call-other"]);
}

#[tokio::test]
#[ignore = "needs Redis: set VYORA_TEST_REDIS_URL, run with --include-ignored"]
async fn a_maxlen_trims_the_stream_approximately() {
    let stream = unique("vyora-test-s");
    let options: RedisOptions = toml::from_str(&format!(
        "url = \"{}\"\nstream = \"{stream}\"\nidempotency_ttl = \"10m\"\nmaxlen = 10\n",
        server_url()
    ))
    .expect("options");
    let sink = RedisSink::start("stream", &options.validate().expect("valid")).expect("sink");
    let batch: Vec<Delivery> = (0..500).map(|n| delivery(&format!("trim-{n}"))).collect();
    assert!(sink.deliver(&batch).await.iter().all(Result::is_ok));
    let mut c = connect(&server_url()).await;
    let length: usize = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut c)
        .await
        .expect("XLEN");
    delete_matching(&server_url(), &format!("*{stream}*")).await;
    // `~` trims whole radix-tree nodes (100 entries each by default), never below 10.
    assert!((10..=200).contains(&length), "XLEN {length}");
}

#[tokio::test]
#[ignore = "needs Redis: set VYORA_TEST_REDIS_URL, run with --include-ignored"]
async fn a_key_of_another_type_fails_the_delivery_with_the_servers_answer() {
    let stream = unique("vyora-test-s");
    let mut c = connect(&server_url()).await;
    let _: () = redis::cmd("SET")
        .arg(&stream)
        .arg("not a stream")
        .query_async(&mut c)
        .await
        .expect("SET");
    let sink = sink(&server_url(), &stream);
    let results = sink.deliver(&[delivery("call-wrongtype")]).await;
    delete_matching(&server_url(), &format!("*{stream}*")).await;
    match &results[0] {
        Err(
            e @ SinkError::Redis {
                permanent: false, ..
            },
        ) => {
            assert!(e.to_string().contains("WRONGTYPE"), "{e}");
        }
        other => panic!("expected the server's refusal, got {other:?}"),
    }
}

#[tokio::test]
#[ignore = "needs redis-server on the PATH and VYORA_TEST_REDIS_URL set, run with --include-ignored"]
async fn a_server_out_of_memory_shows_as_the_deliverys_last_error_and_it_is_delivered_once_memory_is_freed()
 {
    let data = tempfile::tempdir().expect("tempdir");
    let server = PrivateServer::start(data.path()).await;
    let mut admin = connect(&server.url()).await;
    let config = |key: &str, value: &str| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("SET").arg(key).arg(value);
        cmd
    };
    let _: () = config("maxmemory-policy", "noeviction")
        .query_async(&mut admin)
        .await
        .expect("CONFIG SET");
    let _: () = config("maxmemory", "1")
        .query_async(&mut admin)
        .await
        .expect("CONFIG SET");
    let stream = unique("vyora-test-s");
    let router = router_with_redis(&server.url(), &stream).await;
    assert_eq!(
        router
            .post_signed(&payload("call-oom", "call_completed"))
            .await
            .status,
        200
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let error: Option<String> = router
            .db()
            .query_row(
                "SELECT last_error FROM outbox WHERE sink = 'stream'",
                [],
                |r| r.get(0),
            )
            .unwrap_or(None);
        if error.as_deref().is_some_and(|e| e.contains("OOM")) {
            break;
        }
        assert!(Instant::now() < deadline, "last error: {error:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _: () = config("maxmemory", "0")
        .query_async(&mut admin)
        .await
        .expect("CONFIG SET");
    let all = wait_for_entries(&server.url(), &stream, 1, WAIT).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].field("call_id"), "call-oom");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Redis: set VYORA_TEST_REDIS_URL, run with --include-ignored"]
async fn cutting_the_connection_three_times_loses_none_of_2000_events_and_keeps_each_calls_order() {
    let stream = unique("vyora-test-s");
    let proxy = Proxy::start(server_addr(), true).await;
    let router = router_with_redis(&url_via(proxy.addr), &stream).await;
    wait_ready(&router, 200).await;

    // 8 senders, 125 calls each, every call's two events in their order.
    let addr = router.addr;
    let senders: Vec<_> = (0..8)
        .map(|w| {
            tokio::spawn(async move {
                for n in 0..125 {
                    let call = format!("cut-{w}-{n}");
                    for event in ["call_started", "call_completed"] {
                        let answer = post_signed(addr, &payload(&call, event)).await;
                        assert_eq!(answer.status, 200, "acks stay fast and positive");
                    }
                }
            })
        })
        .collect();
    // Each cut waits for the connection the previous one broke to be made again, so that
    // every cut breaks one.
    let mut carried = proxy.carried();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.cut().await;
        let deadline = Instant::now() + WAIT;
        while proxy.carried() == carried {
            assert!(Instant::now() < deadline, "never reconnected after a cut");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        carried = proxy.carried();
    }
    for s in senders {
        s.await.expect("sender");
    }
    let all = wait_for_entries(&server_url(), &stream, 2000, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all_after = entries(&server_url(), &stream).await;
    delete_matching(&server_url(), &format!("*{stream}*")).await;
    let keys: HashSet<&str> = all_after
        .iter()
        .map(|e| e.field("idempotency_key"))
        .collect();
    let connections = proxy.carried();
    let samples = router.scrape().await;
    let outcome = |o| {
        metric(
            &samples,
            "vyora_router_deliveries_total",
            &[("sink", "stream"), ("outcome", o)],
        )
    };
    eprintln!(
        "2000 events over {connections} connections: {} entries, {} distinct; deliveries postponed {} times after a cut, retried {} times",
        all_after.len(),
        keys.len(),
        outcome("postponed"),
        outcome("retried"),
    );
    assert!(all.len() >= 2000, "only {} entries", all.len());
    assert_eq!(
        keys.len(),
        2000,
        "every acknowledged event is in the stream"
    );
    assert_eq!(all_after.len(), 2000, "and each exactly once");
    assert!(
        connections >= 4,
        "reconnected after each cut ({connections} connections)"
    );
    let out_of_order: Vec<_> = order_per_call(&all_after)
        .into_iter()
        .filter(|(_, events)| events != &["call_started", "call_completed"])
        .collect();
    assert!(out_of_order.is_empty(), "{out_of_order:?}");
}

#[tokio::test]
#[ignore = "needs Redis: set VYORA_TEST_REDIS_URL, run with --include-ignored"]
async fn readiness_turns_503_while_redis_is_unreachable_and_back_to_200() {
    let stream = unique("vyora-test-s");
    let proxy = Proxy::start(server_addr(), false).await;
    let router = router_with_redis(&url_via(proxy.addr), &stream).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = router.readyz().await;
        if answer.status == 503 && answer.body.contains("Redis unreachable") {
            break;
        }
        assert!(Instant::now() < deadline, "{}", answer.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        router
            .post_signed(&payload("call-r6", "call_completed"))
            .await
            .status,
        200
    );
    proxy.set_up(true);
    wait_ready(&router, 200).await;
    let all = wait_for_entries(&server_url(), &stream, 1, WAIT).await;
    assert_eq!(all.len(), 1);
    proxy.set_up(false);
    proxy.cut().await;
    wait_ready(&router, 503).await;
    proxy.set_up(true);
    wait_ready(&router, 200).await;
    let attempts: u32 = router
        .db()
        .query_row(
            "SELECT attempts FROM outbox WHERE sink = 'stream'",
            [],
            |r| r.get(0),
        )
        .expect("row");
    delete_matching(&server_url(), &format!("*{stream}*")).await;
    assert!(
        attempts <= 1,
        "waiting for Redis used no attempts: {attempts}"
    );
}

#[tokio::test]
#[ignore = "needs Redis: set VYORA_TEST_REDIS_URL, run with --include-ignored"]
async fn a_refused_login_shows_in_readiness_and_the_sink_recovers_once_the_acl_lets_it_in() {
    let user = unique("vyora-test-u");
    let mut admin = connect(&server_url()).await;
    let acl = |args: &[&str]| {
        let mut cmd = redis::cmd("ACL");
        cmd.arg(args);
        cmd
    };
    let _: () = acl(&[
        "SETUSER",
        &user,
        "on",
        ">right-password",
        "~*",
        "&*",
        "+@all",
    ])
    .query_async(&mut admin)
    .await
    .expect("ACL SETUSER");
    let mut url = reqwest::Url::parse(&server_url()).expect("URL");
    url.set_username(&user).expect("user");
    url.set_password(Some("wrong-password")).expect("password");
    let stream = unique("vyora-test-s");
    let router = router_with_redis(url.as_str(), &stream).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = router.readyz().await;
        assert!(!answer.body.contains("wrong-password"), "{}", answer.body);
        if answer.status == 503 && answer.body.contains("Redis unreachable") {
            break;
        }
        assert!(Instant::now() < deadline, "{}", answer.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = payload("call-r7", "call_completed");
    assert_eq!(router.post_signed(&body).await.status, 200);

    // The operator fixes the ACL: the same sink logs in and delivers, no restart.
    let _: () = acl(&["SETUSER", &user, ">wrong-password"])
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER");
    wait_ready(&router, 200).await;
    let all = wait_for_entries(&server_url(), &stream, 1, WAIT).await;
    let _: redis::RedisResult<()> = acl(&["DELUSER", &user]).query_async(&mut admin).await;
    delete_matching(&server_url(), &format!("*{stream}*")).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].field("payload"), body);
}
