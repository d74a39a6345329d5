//! The simplest durable webhook receiver, as a yardstick for the router's ingest: verify
//! the signature, parse the event for its dedup key, append it to SQLite (`synchronous =
//! FULL`, WAL, a unique index on the text key, commits of up to 64 events) and answer 200
//! after the commit. No routing, no deliveries, no sinks, no metrics. Prints the address
//! it listens on.
//!
//! `cargo run --release --example minimal_ingest -- --db /tmp/min.db --secret S`

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, oneshot};
use vyora_router::event::Event;
use vyora_router::signature::{self, Secret};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// The database file (created).
    #[arg(long)]
    db: PathBuf,
    #[arg(long, env = "VYORA_WEBHOOK_SECRET")]
    secret: String,
}

/// Events per commit, at most.
const GROUP: usize = 64;

type Append = (String, Bytes, oneshot::Sender<bool>);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let conn = rusqlite::Connection::open(&args.db)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE IF NOT EXISTS events (
             id INTEGER PRIMARY KEY, dedup_key TEXT NOT NULL UNIQUE, payload BLOB NOT NULL);",
    )?;
    let (tx, rx) = mpsc::channel::<Append>(4096);
    std::thread::spawn(move || writer(conn, rx));

    let secret = Arc::new(Secret::new(args.secret.as_bytes())?);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let (tx, secret) = (tx.clone(), Arc::clone(&secret));
        let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let (tx, secret) = (tx.clone(), Arc::clone(&secret));
            async move {
                let status = receive(req, &secret, &tx).await;
                let mut answer = Response::new(Full::new(Bytes::new()));
                *answer.status_mut() = status;
                Ok::<_, Infallible>(answer)
            }
        });
        tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
    }
}

async fn receive(
    req: hyper::Request<hyper::body::Incoming>,
    secret: &Secret,
    tx: &mpsc::Sender<Append>,
) -> StatusCode {
    let claimed = req.headers().get("x-vyora-signature").cloned();
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return StatusCode::BAD_REQUEST;
    };
    let verified = signature::verify(
        std::slice::from_ref(secret),
        claimed.as_ref().map(|v| v.as_bytes()),
        &body,
    );
    if verified.is_err() {
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(event) = Event::from_webhook(None, body.clone()) else {
        return StatusCode::BAD_REQUEST;
    };
    let (done, committed) = oneshot::channel();
    if tx.send((event.dedup_key, body, done)).await.is_err() {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    match committed.await {
        Ok(true) => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Commits whatever is queued, up to [`GROUP`] events at a time, then answers them all.
fn writer(mut conn: rusqlite::Connection, mut rx: mpsc::Receiver<Append>) {
    let mut batch = Vec::with_capacity(GROUP);
    while rx.blocking_recv().map(|first| batch.push(first)).is_some() {
        while batch.len() < GROUP {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let committed = append(&mut conn, &batch).is_ok();
        for (_, _, done) in batch.drain(..) {
            let _ = done.send(committed);
        }
    }
}

fn append(conn: &mut rusqlite::Connection, batch: &[Append]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert =
            tx.prepare_cached("INSERT OR IGNORE INTO events (dedup_key, payload) VALUES (?1, ?2)")?;
        for (key, payload, _) in batch {
            insert.execute(rusqlite::params![key, &payload[..]])?;
        }
    }
    tx.commit()
}
