//! The test side of NATS: the shared server's address, streams made and removed per test,
//! and a reader of what a stream holds.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream::{self, message::StreamMessage, stream};

pub fn server_url() -> String {
    std::env::var("VYORA_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

pub fn server_addr() -> SocketAddr {
    let url = reqwest::Url::parse(&server_url()).expect("NATS URL");
    let host = match url.host_str() {
        None | Some("localhost") => "127.0.0.1".to_owned(),
        Some(host) => host.to_owned(),
    };
    format!("{host}:{}", url.port().unwrap_or(4222))
        .parse()
        .expect("NATS address")
}

/// The server URL pointed at another address (a proxy in front of the server).
pub fn url_via(addr: SocketAddr) -> String {
    let mut url = reqwest::Url::parse(&server_url()).expect("URL");
    url.set_ip_host(addr.ip()).expect("host");
    url.set_port(Some(addr.port())).expect("port");
    url.to_string()
}

/// A name usable as a stream name and a subject token.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", fastrand::u64(..))
}

pub async fn context() -> jetstream::Context {
    let client = async_nats::connect(server_url())
        .await
        .expect("the test connects to NATS");
    jetstream::new(client)
}

/// Creates the stream `name` capturing `subjects`, with a duplicate window of 10 minutes.
pub async fn create_stream(name: &str, subjects: &[String]) {
    context()
        .await
        .create_stream(stream::Config {
            name: name.to_owned(),
            subjects: subjects.to_vec(),
            duplicate_window: Duration::from_secs(600),
            ..stream::Config::default()
        })
        .await
        .expect("create the stream");
}

pub async fn delete_stream(name: &str) {
    // Best effort: a test that failed before creating it has nothing to remove.
    let _ = context().await.delete_stream(name).await;
}

/// Every message of the stream `name`, oldest first; none if it does not exist.
pub async fn messages(name: &str) -> Vec<StreamMessage> {
    let js = context().await;
    let Ok(mut stream) = js.get_stream(name).await else {
        return Vec::new();
    };
    let last = stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    let mut all = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await {
            all.push(m);
        }
    }
    all
}

/// Waits until the stream holds at least `n` messages, then returns them all.
pub async fn wait_for_messages(name: &str, n: usize, within: Duration) -> Vec<StreamMessage> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let js = context().await;
        let count = match js.get_stream(name).await {
            Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        };
        if count >= n as u64 || tokio::time::Instant::now() >= deadline {
            return messages(name).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A header's value as text, empty when missing.
pub fn header<'a>(m: &'a StreamMessage, name: &str) -> &'a str {
    m.headers.get(name).map(|v| v.as_str()).unwrap_or("")
}

/// A `nats-server -js` of the test's own on a free port with the extra `args`, run in
/// `dir` and keeping its streams there; stopped when dropped.
pub struct PrivateServer {
    pub port: u16,
    child: std::process::Child,
}

impl PrivateServer {
    pub async fn start(dir: &std::path::Path, args: &[&str]) -> PrivateServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .expect("addr")
            .port();
        let child = std::process::Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .arg("-sd")
            .arg(dir)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server runs (apt-get install nats-server)");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server never listened"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        PrivateServer { port, child }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
