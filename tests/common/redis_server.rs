//! The test side of Redis: the shared server's address, a private server a test may stop,
//! and a reader of what a stream holds.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::StreamRangeReply;

pub fn server_url() -> String {
    std::env::var("VYORA_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn server_addr() -> SocketAddr {
    let url = reqwest::Url::parse(&server_url()).expect("Redis URL");
    let host = match url.host_str() {
        None | Some("localhost") => "127.0.0.1".to_owned(),
        Some(host) => host.to_owned(),
    };
    format!("{host}:{}", url.port().unwrap_or(6379))
        .parse()
        .expect("Redis address")
}

/// The server URL pointed at another address (a proxy in front of the server).
pub fn url_via(addr: SocketAddr) -> String {
    let mut url = reqwest::Url::parse(&server_url()).expect("URL");
    url.set_ip_host(addr.ip()).expect("host");
    url.set_port(Some(addr.port())).expect("port");
    url.to_string()
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

pub async fn connect(url: &str) -> MultiplexedConnection {
    // Reading a stream of thousands of entries on a loaded machine can take longer than
    // the client's default response timeout; the test waits rather than fails.
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(std::time::Duration::from_secs(30)));
    redis::Client::open(url)
        .expect("Redis URL")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("the test connects to Redis")
}

/// One stream entry: its id and its fields as text.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub fields: std::collections::HashMap<String, String>,
}

impl Entry {
    pub fn field(&self, name: &str) -> &str {
        self.fields.get(name).map(String::as_str).unwrap_or("")
    }
}

/// Every entry of `stream`, oldest first.
pub async fn entries(url: &str, stream: &str) -> Vec<Entry> {
    let mut connection = connect(url).await;
    let reply: StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut connection)
        .await
        .expect("XRANGE");
    reply
        .ids
        .into_iter()
        .map(|e| Entry {
            id: e.id,
            fields: e
                .map
                .into_iter()
                .map(|(k, v)| {
                    let text: String = redis::from_redis_value(v).unwrap_or_default();
                    (k, text)
                })
                .collect(),
        })
        .collect()
}

/// Waits until `stream` holds at least `n` entries, or `within` passed; returns them.
pub async fn wait_for_entries(url: &str, stream: &str, n: usize, within: Duration) -> Vec<Entry> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let all = entries(url, stream).await;
        if all.len() >= n || tokio::time::Instant::now() > deadline {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deletes the test's keys: its streams and its idempotency keys.
pub async fn delete_matching(url: &str, pattern: &str) {
    let mut connection = connect(url).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut connection)
        .await
        .unwrap_or_default();
    for key in keys {
        let _: redis::RedisResult<()> = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut connection)
            .await;
    }
}

/// A `redis-server` of the test's own on a free port, keeping nothing on disk but the
/// dump `SHUTDOWN SAVE` writes into `dir`, which a restart in the same `dir` reads back.
pub struct PrivateServer {
    pub port: u16,
    child: Option<Child>,
}

impl PrivateServer {
    pub async fn start(dir: &Path) -> PrivateServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .expect("addr")
            .port();
        let mut server = PrivateServer { port, child: None };
        server.run(dir).await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn run(&mut self, dir: &Path) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server never answered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `SHUTDOWN SAVE`: the server writes its data to `dir` and exits.
    pub async fn stop(&mut self) {
        if let Ok(client) = redis::Client::open(self.url())
            && let Ok(mut c) = client.get_multiplexed_async_connection().await
        {
            let _: redis::RedisResult<()> =
                redis::cmd("SHUTDOWN").arg("SAVE").query_async(&mut c).await;
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Starts again on the same port, reading back what `stop` saved.
    pub async fn restart(&mut self, dir: &Path) {
        self.run(dir).await;
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
