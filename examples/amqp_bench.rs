//! Publish throughput to RabbitMQ with confirms, three ways in one run:
//! (1) naive: a plain lapin publisher awaiting each confirm before the next publish;
//! (2) ceiling: a plain lapin publisher pipelining confirms (window of 256), no store;
//! (3) router: the SQLite outbox drained by the router's dispatcher and AMQP sink.
//! Each publishes N persistent ~1.5 KB messages to a durable queue.
//!
//! `cargo run --release --example amqp_bench -- [--messages 50000] [--url amqp://...]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
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
    #[arg(
        long,
        env = "VYORA_TEST_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    url: String,
    /// Unconfirmed publishes at once, for the ceiling and the router alike.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Only declare a durable topic exchange with a bound queue `<exchange>-q` and exit
    /// (for scripts/bench.sh).
    #[arg(long, value_name = "EXCHANGE")]
    declare: Option<String>,
    /// Only delete this queue and exit.
    #[arg(long, value_name = "QUEUE")]
    delete_queue: Option<String>,
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

/// A fresh durable exchange and queue; returns the channel (confirm mode) and names.
async fn setup(conn: &Connection, tag: &str) -> anyhow::Result<(Channel, String, String)> {
    declare(conn, &format!("vyora-bench-{tag}-{:x}", fastrand::u32(..))).await
}

/// A durable topic exchange and a durable queue `<exchange>-q` bound with `#`.
async fn declare(conn: &Connection, exchange: &str) -> anyhow::Result<(Channel, String, String)> {
    let channel = conn.create_channel().await?;
    let exchange = exchange.to_owned();
    let queue = format!("{exchange}-q");
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((channel, exchange, queue))
}

fn props() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}

async fn plain(
    conn: &Connection,
    bodies: &[String],
    window: usize,
) -> anyhow::Result<(Duration, String)> {
    let (channel, exchange, queue) =
        setup(conn, if window == 1 { "naive" } else { "ceiling" }).await?;
    let started = Instant::now();
    for chunk in bodies.chunks(window) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for body in chunk {
            confirms.push(
                channel
                    .basic_publish(
                        exchange.as_str().into(),
                        "vyora.call_completed".into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        props(),
                    )
                    .await?,
            );
        }
        for c in confirms {
            anyhow::ensure!(c.await?.is_ack(), "nack");
        }
    }
    Ok((started.elapsed(), queue))
}

async fn router(url: &str, bodies: &[String], window: usize) -> anyhow::Result<(Duration, String)> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let (_, exchange, queue) = setup(&conn, "router").await?;
    let dir = tempfile::tempdir()?;
    let config = Config::from_toml(&format!(
        r#"
[webhook]
secrets = ["bench"]
[store]
path = "{db}"
[[sinks]]
name = "queue"
type = "amqp"
url = "{url}"
exchange = "{exchange}"
declare = false
max_in_flight = {window}
"#,
        db = dir.path().join("bench.db").display()
    ))?;
    let store = Store::open(&config.store, StoreOptions::default()).await?;
    // Fill the outbox first, so the measurement is outbox -> confirmed publish only.
    let sink_name: Arc<str> = Arc::from("queue");
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
    let sink_queue = store.queue(sink.name());
    let dispatcher = Dispatcher::new(
        sink,
        sink_queue,
        RetryPolicy::from(&config.delivery),
        config.sinks[0].redact.clone(),
        Arc::new(Metrics::new()),
        vyora_router::feed::Feed::default(),
    );
    let started = Instant::now();
    let task = tokio::spawn(dispatcher.run(stop.clone(), Duration::from_secs(5)));
    let db = rusqlite::Connection::open(dir.path().join("bench.db"))?;
    loop {
        let pending: i64 = db.query_row(
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
    Ok((elapsed, queue))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(exchange) = &args.declare {
        let conn = Connection::connect(&args.url, ConnectionProperties::default()).await?;
        let (_, _, queue) = declare(&conn, exchange).await?;
        println!("{queue}");
        return Ok(());
    }
    if let Some(queue) = &args.delete_queue {
        let conn = Connection::connect(&args.url, ConnectionProperties::default()).await?;
        conn.create_channel()
            .await?
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
        return Ok(());
    }
    let bodies: Vec<String> = (0..args.messages).map(payload).collect();
    let size = bodies.iter().map(String::len).sum::<usize>() / bodies.len().max(1);
    let conn = Connection::connect(&args.url, ConnectionProperties::default())
        .await
        .context("connect to RabbitMQ")?;
    let cleanup = conn.create_channel().await?;
    let mut rates = Vec::new();
    for (label, run) in [
        ("naive (one confirm at a time)", 0),
        ("ceiling (pipelined, no store)", 1),
        ("router (outbox -> confirmed)", 2),
    ] {
        let (elapsed, queue) = match run {
            0 => plain(&conn, &bodies, 1).await?,
            1 => plain(&conn, &bodies, args.window).await?,
            _ => router(&args.url, &bodies, args.window).await?,
        };
        let rate = args.messages as f64 / elapsed.as_secs_f64();
        println!(
            "{label:32} {:>8.0} msg/s  ({} x {size} B in {elapsed:.2?})",
            rate, args.messages
        );
        rates.push(rate);
        cleanup
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    println!(
        "router / ceiling = {:.0}%, router / naive = {:.1}x",
        100.0 * rates[2] / rates[1],
        rates[2] / rates[0]
    );
    Ok(())
}
