//! A minimal downstream for benchmarks: answers every request 200 at once (or, with
//! `--refuse-every N`, 422 to every Nth, a permanent failure), and prints the address it
//! listens on.
//!
//! `cargo run --release --example sink_server -- [--listen 127.0.0.1:0] [--refuse-every N]`

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Refuse every Nth request with 422 (a delivery the router marks dead at once).
    #[arg(long)]
    refuse_every: Option<u64>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("{}", listener.local_addr()?);
    let seen = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        let seen = Arc::clone(&seen);
        let refuse_every = args.refuse_every;
        tokio::spawn(http1::Builder::new().serve_connection(
            TokioIo::new(stream),
            service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let n = seen.fetch_add(1, Ordering::Relaxed) + 1;
                async move {
                    // Read the body, as a real receiver would, then answer.
                    let _ = req.into_body().collect().await;
                    let mut answer = Response::new(Full::new(Bytes::from_static(b"ok")));
                    if refuse_every.is_some_and(|every| every > 0 && n.is_multiple_of(every)) {
                        *answer.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
                    }
                    Ok::<_, Infallible>(answer)
                }
            }),
        ));
    }
}
