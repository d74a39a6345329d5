//! `check-config --connect` for a Redis sink: connect and log in as the sink does,
//! `PING`, read the server's version and load the script that adds entries; nothing is
//! added to any stream.

use redis::aio::MultiplexedConnection;

use super::{CONNECT_TIMEOUT, RedisSinkConfig, entry};
use crate::sinks::{BoxFuture, Probe};

impl Probe for RedisSinkConfig {
    fn probe(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            crate::net::install_tls_provider();
            // Validation parsed it; the user name is no secret, the password is not shown.
            let server = match reqwest::Url::parse(&self.url) {
                Ok(url) => {
                    let host = url.host_str().unwrap_or("127.0.0.1");
                    let port = url.port().unwrap_or(6379);
                    match url.username() {
                        "" => format!("{host}:{port}"),
                        user => format!("{host}:{port} (user {user:?})"),
                    }
                }
                Err(_) => "the server".to_owned(),
            };
            match tokio::time::timeout(CONNECT_TIMEOUT + self.timeout, reach(self)).await {
                Ok(Ok(version)) => Ok(format!(
                    "PING answered by Redis {version} at {server}; the entry script is loaded"
                )),
                Ok(Err(e)) => Err(format!("{server}: {e}")),
                Err(_) => Err(format!(
                    "{server}: no answer within {:?}",
                    CONNECT_TIMEOUT + self.timeout
                )),
            }
        })
    }
}

/// Connects, pings and loads the script; the server's version as `INFO server` gives it.
async fn reach(config: &RedisSinkConfig) -> redis::RedisResult<String> {
    let client = redis::Client::open(config.url.as_str())?;
    let mut connection: MultiplexedConnection = client.get_multiplexed_async_connection().await?;
    redis::cmd("PING")
        .query_async::<()>(&mut connection)
        .await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut connection)
        .await?;
    entry::script().load_async(&mut connection).await?;
    Ok(version(&info)
        .unwrap_or("(version not reported)")
        .to_owned())
}

/// `redis_version:7.0.15` in `INFO`'s text.
fn version(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_read_from_info() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n";
        assert_eq!(version(info), Some("7.0.15"));
        assert_eq!(version("# Server\r\n"), None);
    }
}
