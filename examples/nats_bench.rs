//! Publish throughput to a NATS JetStream stream in one run, interleaved over rounds:
//! (1) ceiling: a plain async-nats client publishing in windows of 256 and awaiting their
//!     acks, each message with its `Nats-Msg-Id`, no store;
//! (2) router: the SQLite outbox drained by the router's dispatcher and NATS sink.
//! Each publishes N ~1.5 KB messages into a fresh file-backed stream, deleted afterwards.
//!
//! `cargo run --release --example nats_bench -- [--messages 50000] [--rounds 3] [--url nats://...]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use bytes::Bytes;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use vyora_router::config::Config;
use vyora_router::dispatch::{Dispatcher, RetryPolicy};
use vyora_router::event::Event;
use vyora_router::metrics::Metrics;
use vyora_router::store::{Store, StoreOptions};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 50_000)]
    messages: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(
        long,
        env = "VYORA_TEST_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    url: String,
    /// Messages in flight, for the ceiling and the router alike.
    #[arg(long, default_value_t = 256)]
    window: usize,
}

fn payload(n: usize) -> String {
    let call_id = format!("bench-{n}");
    serde_json::json!({
        "event": "call_completed",
        "call_id": call_id,
        "phone_number": "+919876543210",
        "agent_name": "Home Loan Agent",
        "status": "completed",
        "transcript": [{"bot": "x".repeat(600)}, {"user": "y".repeat(600)}],
        "analysis": {"summary": "Lead expressed strong interest.", "classification": "Interested"},
    })
    .to_string()
}

/// A fresh stream capturing `<name>.*`, its name.
async fn fresh_stream(js: &jetstream::Context, tag: &str) -> anyhow::Result<String> {
    let name = format!("VYORA_BENCH_{tag}_{:x}", fastrand::u32(..));
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("{name}.*")],
        ..stream::Config::default()
    })
    .await
    .context("create the stream")?;
    Ok(name)
}

async fn ceiling(
    js: &jetstream::Context,
    bodies: &[String],
    window: usize,
) -> anyhow::Result<Duration> {
    let name = fresh_stream(js, "ceiling").await?;
    let subject = format!("{name}.call_completed");
    let started = Instant::now();
    for (i, chunk) in bodies.chunks(window).enumerate() {
        let mut acks = Vec::with_capacity(chunk.len());
        for (j, body) in chunk.iter().enumerate() {
            let message = PublishMessage::build()
                .payload(Bytes::from(body.clone()))
                .message_id(format!("bench-{}:call_completed", i * window + j));
            acks.push(js.send_publish(subject.clone(), message).await?);
        }
        for ack in acks {
            ack.await?;
        }
    }
    let elapsed = started.elapsed();
    js.delete_stream(&name).await?;
    Ok(elapsed)
}

async fn router(
    js: &jetstream::Context,
    url: &str,
    bodies: &[String],
    window: usize,
) -> anyhow::Result<Duration> {
    let name = fresh_stream(js, "router").await?;
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("bench.db");
    let config = Config::from_toml(&format!(
        r#"
[webhook]
secrets = ["bench"]
[store]
path = "{db}"
[[sinks]]
name = "nats"
type = "nats"
url = "{url}"
subject = "{name}.{{event}}"
max_in_flight = {window}
"#,
        db = db.display(),
    ))?;
    let store = Store::open(&config.store, StoreOptions::default()).await?;
    // Fill the outbox first, so the measurement is outbox -> acknowledged message only.
    let sink_name: Arc<str> = Arc::from("nats");
    let mut fills = tokio::task::JoinSet::new();
    for chunk in bodies.chunks(bodies.len().div_ceil(64)) {
        let store = store.clone();
        let chunk: Vec<String> = chunk.to_vec();
        let sink_name = Arc::clone(&sink_name);
        fills.spawn(async move {
            for body in chunk {
                let event = Event::from_webhook(None, Bytes::from(body))
                    .expect("bench payloads are events");
                store
                    .ingest(event, vec![Arc::clone(&sink_name)])
                    .await
                    .expect("store");
            }
        });
    }
    while fills.join_next().await.is_some() {}

    let sink = vyora_router::sinks::build(&config.sinks[0], config.delivery.backoff_max).await?;
    let stop = CancellationToken::new();
    let queue = store.queue(sink.name());
    let dispatcher = Dispatcher::new(
        sink,
        queue,
        RetryPolicy::from(&config.delivery),
        config.sinks[0].redact.clone(),
        Arc::new(Metrics::new()),
        vyora_router::feed::Feed::default(),
    );
    let started = Instant::now();
    let task = tokio::spawn(dispatcher.run(stop.clone(), Duration::from_secs(5)));
    let outbox = rusqlite::Connection::open(&db)?;
    loop {
        let pending: i64 = outbox.query_row(
            "SELECT COUNT(*) FROM outbox WHERE status = 'pending'",
            [],
            |r| r.get(0),
        )?;
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    stop.cancel();
    task.await?;
    store.close().await;
    let held = js.get_stream(&name).await?.info().await?.state.messages;
    js.delete_stream(&name).await?;
    anyhow::ensure!(
        held == bodies.len() as u64,
        "the stream holds {held} messages, not {}",
        bodies.len()
    );
    Ok(elapsed)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bodies: Vec<String> = (0..args.messages).map(payload).collect();
    let size = bodies.iter().map(String::len).sum::<usize>() / bodies.len().max(1);
    let client = async_nats::connect(args.url.as_str())
        .await
        .context("connect to NATS")?;
    let js = jetstream::new(client);
    let labels = ["ceiling (pipelined, no store)", "router (outbox -> stream)"];
    let mut rates = vec![Vec::new(); labels.len()];
    let mut ratios = Vec::new();
    for round in 1..=args.rounds.max(1) {
        for (run, label) in labels.iter().enumerate() {
            let elapsed = match run {
                0 => ceiling(&js, &bodies, args.window).await?,
                _ => router(&js, &args.url, &bodies, args.window).await?,
            };
            let rate = args.messages as f64 / elapsed.as_secs_f64();
            println!(
                "round {round} {label:30} {rate:>8.0} messages/s  ({} x {size} B in {elapsed:.2?})",
                args.messages
            );
            rates[run].push(rate);
        }
        ratios.push(rates[1][round - 1] / rates[0][round - 1]);
    }
    let m: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
    println!(
        "medians (messages/s): ceiling {:.0}, router {:.0}; router / ceiling = {:.0}% (median of rounds)",
        m[0],
        m[1],
        100.0 * median(&mut ratios)
    );
    Ok(())
}
