//! Load generator: sends realistic, uniquely keyed, correctly signed (or deliberately
//! mis-signed) Vyora webhooks at a fixed concurrency, optionally at a fixed rate, and
//! prints throughput and acknowledgement latency as one JSON line.
//!
//! `cargo run --release --example loadgen -- --url http://127.0.0.1:8080/webhook --secret S`

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use vyora_router::signature::{self, Secret};

#[derive(Parser)]
struct Args {
    /// The router's webhook URL (http only).
    #[arg(long, default_value = "http://127.0.0.1:8080/webhook")]
    url: hyper::Uri,
    /// The webhook secret to sign with.
    #[arg(long, env = "VYORA_WEBHOOK_SECRET")]
    secret: String,
    /// Connections, each sending one request at a time.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// How long to send for.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Total requests per second across all connections; as fast as possible if absent.
    /// Latency is measured from each request's scheduled time, so a stalled server
    /// cannot hide its stalls (no coordinated omission).
    #[arg(long)]
    rate: Option<f64>,
    /// Sign with the wrong secret: the baseline of requests refused before the store.
    #[arg(long)]
    bad_signature: bool,
    /// Distinguishes this run's call ids from earlier runs against the same store.
    #[arg(long, default_value_t = fastrand::u64(..))]
    run_id: u64,
    /// A label copied into the output line.
    #[arg(long, default_value = "")]
    label: String,
    /// Stop after this many requests in all (else after --duration).
    #[arg(long)]
    count: Option<u64>,
    /// After the run, wait until every acknowledged event is in this JSON Lines file (the
    /// file sink) and report how many are missing.
    #[arg(long)]
    check_file: Option<std::path::PathBuf>,
    /// Print the mean size in bytes of the payloads it sends (of the first thousand), and
    /// exit.
    #[arg(long)]
    print_payload_size: bool,
    /// Lengthen each transcript by this many turns of generated speech (about 90 bytes
    /// each), as a longer call's: the payload's size, and how well it compresses, are what
    /// the store's bytes per event depend on.
    #[arg(long, default_value_t = 0)]
    extra_turns: usize,
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    /// Event ids answered 200 (kept only with --check-file).
    acked: Vec<String>,
}

fn call_id(run: u64, worker: usize, n: u64) -> String {
    format!("load-{run:x}-{worker}-{n}")
}

fn body(run: u64, worker: usize, n: u64, extra_turns: usize) -> String {
    let call_id = call_id(run, worker, n);
    let payload = vyora_router::trigger::payload("call_completed", &call_id);
    if extra_turns == 0 {
        return payload;
    }
    let mut body: serde_json::Value =
        serde_json::from_str(&payload).expect("the trigger's payload is JSON");
    let mut rng = fastrand::Rng::with_seed(run ^ (worker as u64) << 40 ^ n);
    if let Some(turns) = body["transcript"].as_array_mut() {
        for turn in 0..extra_turns {
            let speaker = if turn % 2 == 0 { "bot" } else { "user" };
            turns.push(serde_json::json!({ speaker: utterance(&mut rng) }));
        }
    }
    body.to_string()
}

/// Words of a loan conversation. Random sentences of them compress about as well as
/// speech does (zstd: two to three times), unlike repeated sentences, which compress to
/// almost nothing and would flatter the store.
const WORDS: &str = "a about account after again agent all also amount and any application \
    are as ask at available back bank be because before branch but by call can charges \
    check close could customer date day details did discuss do document does EMI family \
    fee fifty file first for from get give go good have help here home how I if in income \
    interest is it just know later lakhs let like loan look me month monthly more morning \
    much my need next no not now number of offer okay on one option or other our over \
    pay payment per percent period please process property rate really right salary same \
    say send share should so some sorry still sure talk tenure than thank that the then \
    there they think this time to today tomorrow twenty understand up us verify wait want \
    we week well what when which will with would yes you your";

fn utterance(rng: &mut fastrand::Rng) -> String {
    let words: Vec<&str> = WORDS.split_whitespace().collect();
    let mut text = String::new();
    for i in 0..rng.usize(8..24) {
        if i > 0 {
            text.push(' ');
        }
        text.push_str(words[rng.usize(..words.len())]);
    }
    text.push('.');
    text
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn worker(args: &Args, addr: SocketAddr, secret: Secret, id: usize, until: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut sender: Option<Sender> = None;
    let interval = args
        .rate
        .map(|r| Duration::from_secs_f64(args.connections as f64 / r));
    // Spread the workers' schedules over one interval so they do not fire in lockstep.
    let mut scheduled = Instant::now()
        + interval
            .map(|i| i.mul_f64(id as f64 / args.connections as f64))
            .unwrap_or_default();
    let path = args.url.path().to_owned();
    let quota = args.count.map(|c| {
        c / args.connections as u64 + u64::from((id as u64) < c % args.connections as u64)
    });
    for n in 0.. {
        if quota.is_some_and(|q| n >= q) {
            break;
        }
        let due = match interval {
            Some(every) => {
                tokio::time::sleep_until(scheduled).await;
                let due = scheduled;
                scheduled += every;
                due
            }
            None => Instant::now(),
        };
        if args.count.is_none() && due >= until {
            break;
        }
        let body = body(args.run_id, id, n, args.extra_turns);
        let sig = if args.bad_signature {
            signature::sign(&secret, b"not this body")
        } else {
            signature::sign(&secret, body.as_bytes())
        };
        let request = Request::post(path.as_str())
            .header("host", "router")
            .header("content-type", "application/json")
            .header("x-vyora-event", "call_completed")
            .header("x-vyora-signature", sig)
            .body(Full::new(Bytes::from(body)))
            .expect("a request built from fixed parts is valid");
        let conn = match sender.as_mut() {
            Some(s) => s,
            None => match connect(addr).await {
                Ok(s) => sender.insert(s),
                Err(_) => {
                    tally.errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        match conn.send_request(request).await {
            Ok(response) => {
                let status = response.status().as_u16();
                if response.into_body().collect().await.is_err() {
                    tally.errors += 1;
                    sender = None;
                    continue;
                }
                tally
                    .latencies_us
                    .push(u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX));
                *tally.statuses.entry(status).or_default() += 1;
                if status == 200 && args.check_file.is_some() {
                    tally
                        .acked
                        .push(format!("{}:call_completed", call_id(args.run_id, id, n)));
                }
            }
            Err(_) => {
                tally.errors += 1;
                sender = None;
            }
        }
    }
    tally
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_payload_size {
        let total: usize = (0..1000)
            .map(|n| body(args.run_id, 0, n, args.extra_turns).len())
            .sum();
        println!("{}", total / 1000);
        return Ok(());
    }
    if args.url.scheme_str() != Some("http") {
        bail!("--url must be an http:// URL");
    }
    let authority = args
        .url
        .authority()
        .context("--url needs a host and port")?;
    let addr: SocketAddr = tokio::net::lookup_host(authority.as_str())
        .await?
        .next()
        .context("--url host does not resolve")?;
    let secret = Secret::new(args.secret.as_bytes())?;
    let args = std::sync::Arc::new(args);
    let started = Instant::now();
    let until = started + args.duration;
    let tasks: Vec<_> = (0..args.connections)
        .map(|id| {
            let args = std::sync::Arc::clone(&args);
            let secret = secret.clone();
            tokio::spawn(async move { worker(&args, addr, secret, id, until).await })
        })
        .collect();
    let mut total = Tally::default();
    for t in tasks {
        let t = t.await?;
        total.latencies_us.extend(t.latencies_us);
        total.acked.extend(t.acked);
        total.errors += t.errors;
        for (s, c) in t.statuses {
            *total.statuses.entry(s).or_default() += c;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    total.latencies_us.sort_unstable();
    let answered = total.latencies_us.len();
    let line = serde_json::json!({
        "label": args.label,
        "mode": if args.bad_signature { "bad_signature" } else { "valid" },
        "connections": args.connections,
        "target_rps": args.rate,
        "seconds": (seconds * 100.0).round() / 100.0,
        "answered": answered,
        "statuses": total.statuses,
        "errors": total.errors,
        "rps": (answered as f64 / seconds).round(),
        "p50_ms": percentile(&total.latencies_us, 50.0),
        "p99_ms": percentile(&total.latencies_us, 99.0),
        "max_ms": percentile(&total.latencies_us, 100.0),
    });
    println!("{line}");
    if let Some(path) = &args.check_file {
        let missing = wait_for_file(path, &total.acked).await;
        println!(
            "{}",
            serde_json::json!({"label": args.label, "acknowledged": total.acked.len(), "missing_from_file": missing})
        );
        anyhow::ensure!(
            missing == 0,
            "{missing} acknowledged events never reached {}",
            path.display()
        );
    }
    Ok(())
}

/// Waits (up to a minute) until every id is in the JSON Lines file; returns how many never
/// arrived.
async fn wait_for_file(path: &std::path::Path, ids: &[String]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let seen: std::collections::HashSet<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["id"].as_str().map(str::to_owned))
            .collect();
        let missing = ids.iter().filter(|id| !seen.contains(*id)).count();
        if missing == 0 || Instant::now() > deadline {
            return missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
