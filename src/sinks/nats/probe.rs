//! `check-config --connect` for a NATS sink: connect and log in as the sink does, then
//! find (with `declare`, create) the stream that captures its subject; nothing is
//! published.

use std::time::Duration;

use super::{CONNECT_TIMEOUT, NatsSinkConfig, connect_options, stream};
use crate::sinks::{BoxFuture, Probe};

impl Probe for NatsSinkConfig {
    fn probe(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            crate::net::install_tls_provider();
            // Validation parsed it; the user name is no secret, the password is not shown.
            let server = match reqwest::Url::parse(&self.url) {
                Ok(url) => {
                    let host = url.host_str().unwrap_or("127.0.0.1");
                    let port = url.port().unwrap_or(4222);
                    match url.username() {
                        "" => format!("{host}:{port}"),
                        user => format!("{host}:{port} (user {user:?})"),
                    }
                }
                Err(_) => "the server".to_owned(),
            };
            let limit = CONNECT_TIMEOUT + Duration::from_secs(5);
            match tokio::time::timeout(limit, reach(self)).await {
                Ok(Ok((version, found))) => Ok(format!(
                    "connected to NATS {version} at {server}; stream {found:?} captures {:?}",
                    self.subject.subject_filter()
                )),
                Ok(Err(e)) => Err(format!("{server}: {e}")),
                Err(_) => Err(format!("{server}: no answer within {limit:?}")),
            }
        })
    }
}

/// Connects and finds the stream; the server's version and the stream's name.
async fn reach(config: &NatsSinkConfig) -> Result<(String, String), String> {
    let client = connect_options(config, "check-config")
        .await
        .map_err(|e| e.to_string())?
        .connect(config.url.as_str())
        .await
        .map_err(|e| e.to_string())?;
    let version = client.server_info().version;
    let js = async_nats::jetstream::new(client.clone());
    let found = stream::find(&js, config).await.map_err(|e| e.to_string());
    // Best effort: the probe is over either way.
    let _ = client.drain().await;
    Ok((version, found?))
}
