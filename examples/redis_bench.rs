//! Add throughput to Redis Streams in one run, interleaved over rounds:
//! (1) naive: a plain redis-rs client awaiting each `XADD` before the next;
//! (2) ceiling: a plain client pipelining `XADD`s (window of 256), no store, no script;
//! (3) sink alone: the router's Redis sink fed from memory, `concurrency` batches at once
//!     (the idempotent script per entry, the idempotency key kept beside the stream);
//! (4) store alone: the SQLite outbox drained by the dispatcher into a sink that discards;
//! (5) router: the SQLite outbox drained by the router's dispatcher and Redis sink.
//! Each adds N ~1.5 KB entries to a fresh stream, deleted afterwards; (4) adds none.
//!
//! `cargo run --release --example redis_bench -- [--messages 50000] [--rounds 3] [--url redis://...]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use redis::aio::MultiplexedConnection;
use tokio_util::sync::CancellationToken;
use vyora_router::config::{Config, SinkKind};
use vyora_router::dispatch::{Dispatcher, RetryPolicy};
use vyora_router::event::{Delivery, DeliveryId, Event, Source};
use vyora_router::metrics::Metrics;
use vyora_router::sinks::{BoxFuture, Sink, SinkError};
use vyora_router::store::{Store, StoreOptions};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 50_000)]
    messages: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(
        long,
        env = "VYORA_TEST_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    url: String,
    /// Entries in one pipeline, for the ceiling and the router alike.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// The sink's `concurrency`: pipelines in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Run only these of the five (1-based), e.g. `--only 2,5`.
    #[arg(long, value_delimiter = ',')]
    only: Vec<usize>,
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

fn stream(tag: &str) -> String {
    format!("vyora-bench-{tag}-{:x}", fastrand::u32(..))
}

/// Deletes the stream and, for the router's, its idempotency keys.
async fn clean(connection: &mut MultiplexedConnection, stream: &str) -> anyhow::Result<()> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{stream}*"))
        .query_async(connection)
        .await?;
    for chunk in keys.chunks(1000) {
        redis::cmd("DEL")
            .arg(chunk)
            .query_async::<()>(connection)
            .await?;
    }
    Ok(())
}

async fn plain(
    connection: &mut MultiplexedConnection,
    bodies: &[String],
    window: usize,
) -> anyhow::Result<(Duration, String)> {
    let stream = stream(if window == 1 { "naive" } else { "ceiling" });
    let started = Instant::now();
    for (i, chunk) in bodies.chunks(window).enumerate() {
        let mut pipe = redis::pipe();
        for (j, body) in chunk.iter().enumerate() {
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("event")
                .arg("call_completed")
                .arg("call_id")
                .arg(format!("bench-{}", i * window + j))
                .arg("payload")
                .arg(body.as_bytes());
        }
        let ids: Vec<String> = pipe.query_async(connection).await?;
        anyhow::ensure!(ids.len() == chunk.len(), "fewer answers than entries");
    }
    Ok((started.elapsed(), stream))
}

/// Takes every batch at once and sends nothing: what the store and dispatcher cost alone.
struct Discard {
    window: usize,
    concurrency: usize,
}

impl Sink for Discard {
    fn name(&self) -> &str {
        "stream"
    }

    fn batch_size(&self) -> usize {
        self.window
    }

    fn concurrency(&self) -> usize {
        self.concurrency
    }

    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(async move { batch.iter().map(|_| Ok(())).collect() })
    }
}

/// The sink's `concurrency`, set once from the command line.
static CONCURRENCY: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

fn config(url: &str, stream: &str, window: usize, db: &std::path::Path) -> anyhow::Result<Config> {
    Ok(Config::from_toml(&format!(
        r#"
[webhook]
secrets = ["bench"]
[store]
path = "{db}"
[[sinks]]
name = "stream"
type = "redis"
url = "{url}"
stream = "{stream}"
idempotency_ttl = "10m"
max_in_flight = {window}
concurrency = {concurrency}
"#,
        db = db.display(),
        concurrency = CONCURRENCY.get().copied().unwrap_or(4),
    ))?)
}

/// The router's sink fed from memory: `concurrency` batches in flight, as the dispatcher
/// keeps them, with no store.
async fn sink_alone(
    url: &str,
    bodies: &[String],
    window: usize,
) -> anyhow::Result<(Duration, String)> {
    let stream = stream("sink");
    let config = config(url, &stream, window, std::path::Path::new("unused.db"))?;
    let SinkKind::Redis(redis) = &config.sinks[0].kind else {
        anyhow::bail!("not a redis sink");
    };
    let concurrency = redis.concurrency;
    let sink = vyora_router::sinks::build(&config.sinks[0], config.delivery.backoff_max).await?;
    let batches: Vec<Vec<Delivery>> = bodies
        .chunks(window)
        .enumerate()
        .map(|(i, chunk)| {
            chunk
                .iter()
                .enumerate()
                .map(|(j, body)| {
                    let n = i * window + j;
                    Delivery {
                        id: DeliveryId::row(n as i64),
                        attempts: 0,
                        event: "call_completed".into(),
                        call_id: Some(format!("bench-{n}")),
                        dedup_key: format!("bench-{n}:call_completed"),
                        source: Source::Webhook,
                        received_at: std::time::SystemTime::now(),
                        payload: Bytes::from(body.clone()),
                    }
                })
                .collect()
        })
        .collect();
    let batches = Arc::new(batches);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers: tokio::task::JoinSet<anyhow::Result<()>> = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (sink, batches, next) = (Arc::clone(&sink), Arc::clone(&batches), Arc::clone(&next));
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(batch) = batches.get(i) else {
                    return Ok(());
                };
                for result in sink.deliver(batch).await {
                    result.map_err(|e| anyhow::anyhow!("{e}"))?;
                }
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    Ok((started.elapsed(), stream))
}

async fn router(
    url: &str,
    bodies: &[String],
    window: usize,
    discard: bool,
) -> anyhow::Result<(Duration, String)> {
    let stream = stream("router");
    let dir = tempfile::tempdir()?;
    let config = config(url, &stream, window, &dir.path().join("bench.db"))?;
    let store = Store::open(&config.store, StoreOptions::default()).await?;
    // Fill the outbox first, so the measurement is outbox -> added entry only.
    let sink_name: Arc<str> = Arc::from("stream");
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

    let sink: Arc<dyn Sink> = match &config.sinks[0].kind {
        SinkKind::Redis(redis) if discard => Arc::new(Discard {
            window,
            concurrency: redis.concurrency,
        }),
        _ => vyora_router::sinks::build(&config.sinks[0], config.delivery.backoff_max).await?,
    };
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
    Ok((elapsed, stream))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    CONCURRENCY.get_or_init(|| args.concurrency);
    let bodies: Vec<String> = (0..args.messages).map(payload).collect();
    let size = bodies.iter().map(String::len).sum::<usize>() / bodies.len().max(1);
    let mut connection = redis::Client::open(args.url.as_str())?
        .get_multiplexed_async_connection()
        .await
        .context("connect to Redis")?;
    let labels = [
        "naive (one XADD at a time)",
        "ceiling (pipelined, no store)",
        "sink alone (idempotent, no store)",
        "store alone (outbox -> discard)",
        "router (outbox -> idempotent)",
    ];
    let mut rates = vec![Vec::new(); labels.len()];
    let mut ratios = Vec::new();
    for round in 1..=args.rounds.max(1) {
        for (run, label) in labels.iter().enumerate() {
            if !args.only.is_empty() && !args.only.contains(&(run + 1)) {
                rates[run].push(f64::NAN);
                continue;
            }
            let (elapsed, stream) = match run {
                0 => plain(&mut connection, &bodies, 1).await?,
                1 => plain(&mut connection, &bodies, args.window).await?,
                2 => sink_alone(&args.url, &bodies, args.window).await?,
                3 => router(&args.url, &bodies, args.window, true).await?,
                _ => router(&args.url, &bodies, args.window, false).await?,
            };
            clean(&mut connection, &stream).await?;
            let rate = args.messages as f64 / elapsed.as_secs_f64();
            println!(
                "round {round} {label:32} {rate:>8.0} entries/s  ({} x {size} B in {elapsed:.2?})",
                args.messages
            );
            rates[run].push(rate);
        }
        ratios.push(rates[4][round - 1] / rates[1][round - 1]);
    }
    let m: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
    println!(
        "medians (entries/s): naive {:.0}, ceiling {:.0}, sink alone {:.0}, store alone {:.0}, router {:.0}",
        m[0], m[1], m[2], m[3], m[4]
    );
    println!(
        "router / ceiling = {:.0}% (median of rounds); router / sink alone = {:.0}%, router / store alone = {:.0}%, router / naive = {:.1}x",
        100.0 * median(&mut ratios),
        100.0 * m[4] / m[2],
        100.0 * m[4] / m[3],
        m[4] / m[0]
    );
    Ok(())
}
