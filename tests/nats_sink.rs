//! The NATS JetStream sink against a real server with JetStream, the shared one, through
//! a TCP proxy to cut the connection. Each test uses a stream and subject prefix of its own.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::message::StreamMessage;
use bytes::Bytes;
use common::nats::{
    context, create_stream, delete_stream, header, messages, server_addr, server_url, unique,
    url_via, wait_for_messages,
};
use common::proxy::Proxy;
use common::*;
use tokio::time::Instant;
use vyora_router::config::Config;
use vyora_router::event::{Delivery, DeliveryId, Source};
use vyora_router::sinks::Sink;
use vyora_router::sinks::nats::{NatsOptions, NatsSink};

const WAIT: Duration = Duration::from_secs(30);

/// A `nats` sink table publishing to `subject`, with the extra keys `more`.
fn sink_table(url: &str, subject: &str, more: &str) -> String {
    format!(
        "[[sinks]]\nname = \"nats\"\ntype = \"nats\"\nurl = \"{url}\"\nsubject = \"{subject}\"\nack_timeout = \"5s\"\nsecret = \"downstream-secret\"\n{more}"
    )
}

fn config_with(dir: &std::path::Path, table: &str) -> String {
    format!("{}\n{table}", base_config(dir))
}

async fn router_with_nats(url: &str, subject: &str, more: &str) -> TestRouter {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = config_with(dir.path(), &sink_table(url, subject, more));
    TestRouter::start_with(dir, &config).await
}

async fn wait_ready(router: &TestRouter, status: u16) {
    let deadline = Instant::now() + WAIT;
    while router.readyz().await.status != status {
        assert!(Instant::now() < deadline, "/readyz never answered {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

/// Each call's events in the order the stream holds them.
fn order_per_call(all: &[StreamMessage]) -> HashMap<String, Vec<String>> {
    let mut calls: HashMap<String, Vec<String>> = HashMap::new();
    for m in all {
        calls
            .entry(header(m, "x-vyora-call-id").to_owned())
            .or_default()
            .push(header(m, "x-vyora-event").to_owned());
    }
    calls
}

/// What `run` answers for a config whose sink cannot start.
async fn start_refusal(table: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::from_toml(&config_with(dir.path(), table)).expect("valid config");
    let bind = || async {
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
    };
    let listeners = vyora_router::Listeners {
        webhook: bind().await,
        admin: bind().await,
    };
    let (_reload, reloads) = tokio::sync::mpsc::channel(1);
    let outcome = tokio::time::timeout(
        WAIT,
        vyora_router::run(config, listeners, std::future::pending(), reloads),
    )
    .await
    .expect("the start is refused, not left running");
    outcome.expect_err("the start is refused").to_string()
}

#[tokio::test]
#[ignore = "needs a NATS server with JetStream: set VYORA_TEST_NATS_URL"]
async fn a_message_goes_to_its_subject_with_the_payload_msg_id_and_headers() {
    let stream = unique("VYORA_T");
    create_stream(&stream, &[format!("{stream}.>")]).await;
    let router = router_with_nats(
        &server_url(),
        &format!("{stream}.{{agent_id}}.{{event}}"),
        "",
    )
    .await;
    wait_ready(&router, 200).await;
    let body = payload("call-n1", "call_completed");
    assert_eq!(router.post_signed(&body).await.status, 200);
    let all = wait_for_messages(&stream, 1, WAIT).await;
    delete_stream(&stream).await;
    let m = all.first().expect("a message");
    assert_eq!(
        m.subject.as_str(),
        format!("{stream}.def456-7890-agent.call_completed")
    );
    assert_eq!(m.payload, body.as_bytes(), "byte-identical");
    assert_eq!(header(m, "Nats-Msg-Id"), "call-n1:call_completed");
    assert_eq!(header(m, "x-vyora-event"), "call_completed");
    assert_eq!(header(m, "x-vyora-call-id"), "call-n1");
    assert_eq!(header(m, "x-vyora-source"), "webhook");
    let downstream = vyora_router::signature::Secret::new(b"downstream-secret").expect("secret");
    assert_eq!(
        header(m, "x-vyora-signature"),
        vyora_router::signature::sign(&downstream, body.as_bytes())
    );
}

#[tokio::test]
#[ignore = "needs a NATS server with JetStream: set VYORA_TEST_NATS_URL"]
async fn each_calls_events_reach_the_consumer_in_the_order_they_were_stored() {
    let stream = unique("VYORA_T");
    create_stream(&stream, &[format!("{stream}.*")]).await;
    let router = router_with_nats(&server_url(), &format!("{stream}.{{event}}"), "").await;
    wait_ready(&router, 200).await;
    let events = ["call_started", "call_completed", "all_processing_completed"];
    for n in 0..20 {
        for event in events {
            let body = payload(&format!("order-{n}"), event);
            assert_eq!(router.post_signed(&body).await.status, 200);
        }
    }
    let all = wait_for_messages(&stream, 60, WAIT).await;
    delete_stream(&stream).await;
    assert_eq!(all.len(), 60);
    let out_of_order: Vec<_> = order_per_call(&all)
        .into_iter()
        .filter(|(_, seen)| seen != &events)
        .collect();
    assert!(out_of_order.is_empty(), "{out_of_order:?}");
}

#[tokio::test]
#[ignore = "needs a NATS server with JetStream: set VYORA_TEST_NATS_URL"]
async fn a_redelivery_with_the_same_msg_id_is_dropped_by_the_stream() {
    let stream = unique("VYORA_T");
    create_stream(&stream, &[format!("{stream}.*")]).await;
    let options: NatsOptions = toml::from_str(&format!(
        "url = \"{}\"\nsubject = \"{stream}.{{event}}\"\n",
        server_url()
    ))
    .expect("options");
    let sink = NatsSink::start("nats", &options.validate().expect("valid"))
        .await
        .expect("sink");
    let d = delivery("call-twice");
    assert!(sink.deliver(std::slice::from_ref(&d)).await[0].is_ok());
    // Again alone (a redelivery after a lost ack), then twice in one batch.
    assert!(sink.deliver(std::slice::from_ref(&d)).await[0].is_ok());
    let both = sink.deliver(&[d.clone(), d.clone()]).await;
    assert!(both.iter().all(Result::is_ok), "{both:?}");
    assert!(sink.deliver(&[delivery("call-other")]).await[0].is_ok());
    let all = messages(&stream).await;
    delete_stream(&stream).await;
    let calls: Vec<&str> = all.iter().map(|m| header(m, "x-vyora-call-id")).collect();
    assert_eq!(calls, ["call-twice", "call-other"]);
}

#[tokio::test]
#[ignore = "needs a NATS server with JetStream: set VYORA_TEST_NATS_URL"]
async fn a_subject_no_stream_captures_refuses_the_start_naming_the_key_and_value() {
    let prefix = unique("VYORA_T");
    let subject = format!("{prefix}.{{event}}");
    let refusal = start_refusal(&sink_table(&server_url(), &subject, "")).await;
    assert!(
        refusal.contains(&format!("subject = {subject:?}")),
        "{refusal}"
    );
    assert!(refusal.contains("no stream captures"), "{refusal}");

    let named = start_refusal(&sink_table(
        &server_url(),
        &subject,
        &format!("stream = \"{prefix}\"\n"),
    ))
    .await;
    assert!(named.contains(&format!("stream = {prefix:?}")), "{named}");
    assert!(named.contains("declare = true"), "{named}");
    assert!(
        context().await.get_stream(&prefix).await.is_err(),
        "nothing was created"
    );
}

#[tokio::test]
#[ignore = "needs a NATS server with JetStream: set VYORA_TEST_NATS_URL"]
async fn declare_creates_the_stream_capturing_the_subject_and_delivers_into_it() {
    let stream = unique("VYORA_T");
    let router = router_with_nats(
        &server_url(),
        &format!("{stream}.{{agent_id}}.{{event}}"),
        &format!("stream = \"{stream}\"\ndeclare = true\nduplicate_window = \"5m\"\n"),
    )
    .await;
    wait_ready(&router, 200).await;
    assert_eq!(
        router
            .post_signed(&payload("call-declared", "call_completed"))
            .await
            .status,
        200
    );
    let all = wait_for_messages(&stream, 1, WAIT).await;
    let info = context()
        .await
        .get_stream(&stream)
        .await
        .expect("the stream was created")
        .cached_info()
        .clone();
    delete_stream(&stream).await;
    assert_eq!(info.config.subjects, [format!("{stream}.*.*")]);
    assert_eq!(info.config.duplicate_window, Duration::from_secs(300));
    assert_eq!(all.len(), 1);
    assert_eq!(header(&all[0], "x-vyora-call-id"), "call-declared");
}

#[tokio::test]
#[ignore = "needs a NATS server with JetStream: set VYORA_TEST_NATS_URL"]
async fn readiness_turns_503_while_nats_is_unreachable_and_back_to_200() {
    let stream = unique("VYORA_T");
    create_stream(&stream, &[format!("{stream}.*")]).await;
    let proxy = Proxy::start(server_addr(), false).await;
    let router = router_with_nats(&url_via(proxy.addr), &format!("{stream}.{{event}}"), "").await;
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = router.readyz().await;
        if answer.status == 503 && answer.body.contains("NATS unreachable") {
            break;
        }
        assert!(Instant::now() < deadline, "{}", answer.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = payload("call-n6", "call_completed");
    assert_eq!(router.post_signed(&body).await.status, 200);
    proxy.set_up(true);
    wait_ready(&router, 200).await;
    let all = wait_for_messages(&stream, 1, WAIT).await;
    let attempts: u32 = router
        .db()
        .query_row("SELECT attempts FROM outbox WHERE sink = 'nats'", [], |r| {
            r.get(0)
        })
        .expect("row");
    delete_stream(&stream).await;
    assert_eq!(all.len(), 1);
    assert!(
        attempts <= 1,
        "waiting for NATS used no attempts: {attempts}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a NATS server with JetStream: set VYORA_TEST_NATS_URL"]
async fn cutting_the_connection_three_times_loses_none_of_2000_events_and_the_stream_holds_each_once()
 {
    let stream = unique("VYORA_T");
    create_stream(&stream, &[format!("{stream}.*")]).await;
    let proxy = Proxy::start(server_addr(), true).await;
    let router = router_with_nats(&url_via(proxy.addr), &format!("{stream}.{{event}}"), "").await;
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
    let all = wait_for_messages(&stream, 2000, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all_after = messages(&stream).await;
    delete_stream(&stream).await;
    let ids: HashSet<&str> = all_after.iter().map(|m| header(m, "Nats-Msg-Id")).collect();
    let connections = proxy.carried();
    let samples = router.scrape().await;
    let outcome = |o| {
        metric(
            &samples,
            "vyora_router_deliveries_total",
            &[("sink", "nats"), ("outcome", o)],
        )
    };
    eprintln!(
        "2000 events over {connections} connections: {} messages, {} distinct; deliveries postponed {} times after a cut, retried {} times",
        all_after.len(),
        ids.len(),
        outcome("postponed"),
        outcome("retried"),
    );
    assert!(all.len() >= 2000, "only {} messages", all.len());
    assert_eq!(ids.len(), 2000, "every acknowledged event is in the stream");
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
#[ignore = "needs a NATS server with JetStream: set VYORA_TEST_NATS_URL"]
async fn a_full_stream_or_a_missing_one_is_the_deliverys_error_and_the_sinks_readiness() {
    use async_nats::jetstream::stream;
    let name = unique("VYORA_T");
    context()
        .await
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.*")],
            max_messages: 1,
            discard: stream::DiscardPolicy::New,
            ..stream::Config::default()
        })
        .await
        .expect("create the stream");
    let options: NatsOptions = toml::from_str(&format!(
        "url = \"{}\"\nsubject = \"{name}.{{event}}\"\n",
        server_url()
    ))
    .expect("options");
    let sink = NatsSink::start("nats", &options.validate().expect("valid"))
        .await
        .expect("sink");
    assert!(sink.deliver(&[delivery("call-fits")]).await[0].is_ok());
    let full = sink.deliver(&[delivery("call-too-many")]).await;
    let readiness = sink.unready();
    delete_stream(&name).await;
    let missing = sink.deliver(&[delivery("call-no-stream")]).await;
    let readiness_missing = sink.unready();
    match &full[0] {
        Err(e) => assert!(e.to_string().contains("stream full"), "{e}"),
        Ok(()) => panic!("a full stream took the message"),
    }
    assert!(
        readiness
            .as_deref()
            .is_some_and(|r| r.contains("stream full")),
        "{readiness:?}"
    );
    match &missing[0] {
        Err(e) => assert!(e.to_string().contains("no stream for subject"), "{e}"),
        Ok(()) => panic!("a missing stream took the message"),
    }
    assert!(
        readiness_missing
            .as_deref()
            .is_some_and(|r| r.contains("no stream for subject")),
        "{readiness_missing:?}"
    );
}

#[tokio::test]
#[ignore = "needs nats-server on the PATH and VYORA_TEST_NATS_URL set, run with --include-ignored"]
async fn a_refused_token_shows_in_readiness_without_the_token_and_the_right_one_delivers() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = common::nats::PrivateServer::start(data.path(), &["--auth", "right-token"]).await;
    let subject = "tok.{event}";
    let declare = "stream = \"TOK\"\ndeclare = true\n";

    let wrong = router_with_nats(
        &server.url(),
        subject,
        &format!("{declare}token = \"wrong-token\"\n"),
    )
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = wrong.readyz().await;
        assert!(!answer.body.contains("wrong-token"), "{}", answer.body);
        if answer.status == 503 && answer.body.contains("NATS unreachable") {
            break;
        }
        assert!(Instant::now() < deadline, "{}", answer.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(wrong);

    let right = router_with_nats(
        &server.url(),
        subject,
        &format!("{declare}token = \"right-token\"\n"),
    )
    .await;
    wait_ready(&right, 200).await;
    let body = payload("call-token", "call_completed");
    assert_eq!(right.post_signed(&body).await.status, 200);
    let client = async_nats::ConnectOptions::with_token("right-token".into())
        .connect(server.url())
        .await
        .expect("the test logs in");
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut stream = js.get_stream("TOK").await.expect("declared");
        let held = stream.info().await.expect("info").state.messages;
        if held == 1 {
            let m = stream.get_raw_message(1).await.expect("the message");
            assert_eq!(m.payload, body.as_bytes());
            break;
        }
        assert!(Instant::now() < deadline, "the stream holds {held}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
