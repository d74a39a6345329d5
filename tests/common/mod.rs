//! Test harness: a real router on port 0 over a temp dir, a small HTTP client, and
//! readers for what the router wrote.
#![allow(dead_code)] // each test binary uses its own subset of these helpers

pub mod amqp;
pub mod downstream;
pub mod nats;
pub mod pg;
pub mod process;
pub mod proxy;
pub mod redis_server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vyora_router::config::Config;
use vyora_router::signature::{self, Secret};

pub const SECRET: &str = "whsec_test_secret";

pub fn secret() -> Secret {
    Secret::new(SECRET.as_bytes()).expect("non-empty secret")
}

pub fn sign(body: &[u8]) -> String {
    signature::sign(&secret(), body)
}

/// A realistic payload (about 1.5 KB once the call has ended), as `trigger` sends.
pub fn payload(call_id: &str, event: &str) -> String {
    vyora_router::trigger::payload(event, call_id)
}

/// A router running in this process on 127.0.0.1:0 with its own temp dir.
pub struct TestRouter {
    /// The public listener: the webhook path and `/healthz`.
    pub addr: SocketAddr,
    /// The operator's listener: `/metrics`, `/readyz`, `/healthz`.
    pub admin: SocketAddr,
    /// Shared so a restarted router can reuse it; removed when the last holder drops it.
    pub dir: Arc<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    reload: tokio::sync::mpsc::Sender<Config>,
    task: Option<JoinHandle<()>>,
}

/// The config every test starts from: one file sink `archive` receiving everything.
pub fn base_config(dir: &Path) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
header_read_timeout = "1s"

[admin]
listen = "127.0.0.1:0"

[webhook]
secrets = ["{SECRET}"]

[store]
path = "{db}"

[delivery]
backoff_initial = "50ms"
backoff_max = "200ms"

[[sinks]]
name = "archive"
type = "file"
path = "{file}"
"#,
        db = dir.join("router.db").display(),
        file = dir.join("events.jsonl").display(),
    )
}

impl TestRouter {
    pub async fn start() -> TestRouter {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let config = base_config(dir.path());
        TestRouter::start_with(dir, &config).await
    }

    /// Starts on `dir` with the given config text (which should point into `dir`).
    pub async fn start_with(dir: Arc<tempfile::TempDir>, config: &str) -> TestRouter {
        let config = Config::from_toml(config).expect("test config is valid");
        let bind = || async {
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind")
        };
        let listeners = vyora_router::Listeners {
            webhook: bind().await,
            admin: bind().await,
        };
        let addr = listeners.webhook.local_addr().expect("local addr");
        let admin = listeners.admin.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let (reload, reloads) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            vyora_router::run(config, listeners, shutdown, reloads)
                .await
                .expect("router runs");
        });
        let router = TestRouter {
            addr,
            admin,
            dir,
            stop: Some(stop),
            reload,
            task: Some(task),
        };
        // The listener queues connections from the start; the answer comes once the store
        // and sinks are open and the accept loop runs.
        let health = Request::get("/healthz")
            .header("host", "router")
            .body(Full::new(Bytes::new()))
            .expect("request");
        assert_eq!(send(addr, health).await.status, 200);
        router
    }

    /// Applies a new config as SIGHUP would.
    pub async fn reload(&self, config: &str) {
        let config = Config::from_toml(config).expect("test config is valid");
        self.reload
            .send(config)
            .await
            .expect("the router takes reloads");
    }

    /// Stops gracefully and waits until everything is closed.
    pub async fn stop(mut self) -> Arc<tempfile::TempDir> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("router task");
        }
        Arc::clone(&self.dir)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn events_file(&self) -> PathBuf {
        self.path().join("events.jsonl")
    }

    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.path().join("router.db")).expect("open db")
    }

    /// The payload stored for `dedup_key`, as it was signed (stored payloads
    /// may be zstd-compressed, codec 1).
    pub fn stored_payload(&self, dedup_key: &str) -> Vec<u8> {
        let (codec, stored): (i64, Vec<u8>) = self
            .db()
            .query_row(
                "SELECT codec, payload FROM events WHERE dedup_key = ?1",
                [dedup_key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("stored");
        match codec {
            1 => zstd::decode_all(&stored[..]).expect("zstd payload"),
            _ => stored,
        }
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.db()
            .query_row(sql, [], |r| r.get(0))
            .expect("count query")
    }

    pub async fn post_signed(&self, body: &str) -> Answer {
        post_signed(self.addr, body).await
    }

    /// The metrics exposition, parsed.
    pub async fn scrape(&self) -> Vec<prometheus_parse::Sample> {
        scrape(self.admin).await
    }

    /// A store handle of its own on the router's database, as an operator command opens
    /// one beside the running server.
    pub async fn operator_store(&self) -> vyora_router::store::Store {
        let config = Config::from_toml(&base_config(self.path())).expect("config");
        vyora_router::store::Store::open_existing(&config.store)
            .await
            .expect("the store opens")
    }

    /// `GET /readyz` on the admin listener.
    pub async fn readyz(&self) -> Answer {
        get(self.admin, "/readyz").await
    }
}

/// `GET path` on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str) -> Answer {
    let request = Request::get(path)
        .header("host", "router")
        .body(Full::new(Bytes::new()))
        .expect("request");
    send(addr, request).await
}

/// The parsed `/metrics` of the router whose admin listener is at `addr`.
pub async fn scrape(addr: SocketAddr) -> Vec<prometheus_parse::Sample> {
    let answer = get(addr, "/metrics").await;
    assert_eq!(answer.status, 200);
    let lines = answer.body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines)
        .expect("the exposition parses")
        .samples
}

/// The sum of the samples of `name` whose labels include `labels`.
pub fn metric(samples: &[prometheus_parse::Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("answer is JSON")
    }
}

/// Sends one request on a fresh connection.
pub async fn send(addr: SocketAddr, request: Request<Full<Bytes>>) -> Answer {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let response = sender.send_request(request).await.expect("response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub fn webhook_request(body: &str, signature: Option<&str>) -> Request<Full<Bytes>> {
    let mut builder = Request::post("/webhook")
        .header("host", "router")
        .header("content-type", "application/json")
        .header("user-agent", "Vyora-Webhooks/1.0");
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body)
        && let Some(event) = v.get("event").and_then(|e| e.as_str())
    {
        builder = builder.header("x-vyora-event", event);
    }
    if let Some(sig) = signature {
        builder = builder.header("x-vyora-signature", sig);
    }
    builder
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .expect("request")
}

pub async fn post_signed(addr: SocketAddr, body: &str) -> Answer {
    send(addr, webhook_request(body, Some(&sign(body.as_bytes())))).await
}

/// The parsed lines of a JSON Lines file (empty if it does not exist yet).
pub fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line is not JSON ({e}): {l}")))
        .collect()
}

/// Waits until the file holds at least `n` lines, or panics after `within`.
pub async fn wait_for_lines(path: &Path, n: usize, within: Duration) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let lines = read_lines(path);
        if lines.len() >= n {
            return lines;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "expected {n} lines in {}, found {}",
                path.display(),
                lines.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
