//! The Redis Streams sink: one `XADD` per delivery, idempotent, pipelined.
//!
//! A row counts as delivered once the server answered the script that adds its entry
//! (`entry`): that script checks the delivery's idempotency key and adds the entry in one
//! atomic step, so a delivery sent again after a lost answer (a cut connection, a
//! timeout) finds its entry and adds nothing. A batch goes out as one pipeline on one
//! connection, so its entries reach each stream in the order the dispatcher gave them.
//!
//! The connection is redis-rs's `ConnectionManager`, which reconnects by itself after a
//! failure. While Redis cannot be reached, deliveries are postponed without using up
//! attempts and readiness says why; what the server refuses (out of memory, a key of
//! another type, a missing ACL permission) fails that delivery with the server's
//! answer as its last error. Redis Cluster is not supported: the script's two keys may
//! live on different nodes.
//!
//! Nothing here logs an entry's fields, and redis-rs built with these features (no
//! cluster, sentinel or token login) logs nothing at all, so unlike the AMQP client it
//! needs no log cap.
//!
//! Its settings are in `config`; the script and the entry's fields in `entry`;
//! `check-config --connect` is in `probe`.

mod config;
mod entry;
mod probe;

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, RedisResult, Script, ServerErrorKind, Value};

pub use config::{RedisOptions, RedisSinkConfig};

use super::{BoxFuture, BuildError, Sink, SinkError};
use crate::backoff::Backoff;
use crate::event::Delivery;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// While Redis cannot be reached, deliveries wait 0.2 s, doubling up to 10 s, with
/// jitter, before they are tried again.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
/// How often the connection is checked (`PING`), so that readiness reflects the server
/// before the first event needs it and after the last one.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Whether the sink can reach Redis, shared by deliveries and the watcher.
#[derive(Default)]
struct Health {
    /// Why not, for readiness; `None` when the last command was answered.
    unready: Option<String>,
    /// Failures to reach Redis in a row, for the wait before the next try.
    failures: u32,
}

pub struct RedisSink {
    name: String,
    config: RedisSinkConfig,
    client: redis::Client,
    /// Cloned per use: clones share one multiplexed connection and its reconnection.
    /// Replaced after a failure the manager would not recover from by itself.
    connection: Mutex<ConnectionManager>,
    script: Script,
    health: Mutex<Health>,
}

impl RedisSink {
    /// Creates the sink and starts watching its connection. No connection is needed to
    /// start: a server that is down, or refuses us, is reported in logs and readiness.
    pub fn start(name: &str, config: &RedisSinkConfig) -> Result<Arc<RedisSink>, BuildError> {
        crate::net::install_tls_provider();
        let refused = |e: RedisError| BuildError::Redis {
            name: name.to_owned(),
            reason: e.to_string(),
        };
        let client = redis::Client::open(config.url.as_str()).map_err(refused)?;
        let connection = manager(&client, config).map_err(refused)?;
        let sink = Arc::new(RedisSink {
            name: name.to_owned(),
            config: config.clone(),
            client,
            connection: Mutex::new(connection),
            script: entry::script(),
            health: Mutex::new(Health {
                unready: Some("not connected yet".into()),
                failures: 0,
            }),
        });
        tokio::spawn(watch(Arc::downgrade(&sink)));
        Ok(sink)
    }

    fn connection(&self) -> ConnectionManager {
        self.connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Redis answered: ready again.
    fn answered(&self) {
        let mut health = self.health();
        if health.unready.take().is_some() {
            if health.failures > 0 {
                tracing::info!(sink = %self.name, "connected to Redis again");
            } else {
                tracing::info!(sink = %self.name, "connected to Redis");
            }
        }
        health.failures = 0;
    }

    /// Redis could not be reached: unready, and how long deliveries wait.
    fn unreachable(&self, e: &RedisError) -> SinkError {
        // The manager reconnects after an I/O error only; after any other failure to
        // connect (a refused login, a handshake the server answered with an error) it
        // would answer with that error forever, so it is replaced.
        if !e.is_io_error()
            && let Ok(fresh) = manager(&self.client, &self.config)
        {
            *self
                .connection
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = fresh;
        }
        let mut health = self.health();
        health.failures = health.failures.saturating_add(1);
        let wait = RECONNECT.equal_jitter(health.failures);
        if health.failures == 1 || health.unready.is_none() {
            tracing::warn!(sink = %self.name, error = %e, retry_in = ?wait, "cannot reach Redis");
        }
        health.unready = Some(format!("Redis unreachable: {e}"));
        SinkError::Unavailable {
            reason: format!("cannot reach Redis: {e}"),
            retry_in: wait,
        }
    }

    async fn add(&self, batch: &[Delivery]) -> Vec<Result<(), SinkError>> {
        let mut pipe = redis::pipe();
        // One answer per entry, errors included: one refused entry fails only itself.
        pipe.ignore_errors();
        let mut streams = Vec::with_capacity(batch.len());
        for d in batch {
            let (stream, cmd) = entry::command(&self.config, &self.script, d);
            streams.push(stream);
            pipe.add_command(cmd);
        }
        let mut connection = self.connection();
        let mut answers = pipe
            .query_async::<Vec<RedisResult<Value>>>(&mut connection)
            .await;
        if answers.as_ref().is_ok_and(|a| a.iter().any(no_script)) {
            // The server has lost its scripts (a restart, `SCRIPT FLUSH`): load ours and
            // send the batch again. An entry added before the loss is found by its
            // idempotency key, so nothing is added twice.
            tracing::info!(sink = %self.name, "loading the script that adds entries");
            answers = match self.script.load_async(&mut connection).await {
                Ok(_) => pipe.query_async(&mut connection).await,
                Err(e) => Err(e),
            };
        }
        let answers = match answers {
            Ok(answers) => answers,
            Err(e) => {
                let e = if reached(&e) {
                    self.answered();
                    refused(&e)
                } else {
                    self.unreachable(&e)
                };
                return batch.iter().map(|_| Err(e.clone())).collect();
            }
        };
        self.answered();
        // A server still loading its data answers each entry so: one wait for the batch.
        let mut unreachable = answers
            .iter()
            .find_map(|a| a.as_ref().err().filter(|e| !reached(e)))
            .map(|e| self.unreachable(e));
        let mut answers = answers.into_iter();
        batch
            .iter()
            .zip(streams)
            .map(|(d, stream)| match answers.next() {
                Some(Ok(answer)) => match entry::added(answer) {
                    Some((true, _)) => Ok(()),
                    Some((false, entry)) => {
                        tracing::debug!(sink = %self.name, id = d.id.row, stream, entry, "already in the stream; not added again");
                        Ok(())
                    }
                    None => Err(SinkError::Redis {
                        reason: "the script that adds entries gave an unexpected answer".into(),
                        permanent: false,
                    }),
                },
                Some(Err(e)) if reached(&e) => Err(refused(&e)),
                Some(Err(e)) => Err(unreachable
                    .get_or_insert_with(|| self.unreachable(&e))
                    .clone()),
                None => Err(SinkError::Redis {
                    reason: "Redis gave fewer answers than entries sent".into(),
                    permanent: false,
                }),
            })
            .collect()
    }
}

/// A connection that is made on first use and remade after I/O errors. Few quick retries
/// inside the client: the store keeps what is not delivered and our own backoff paces the
/// next try, so a delivery never waits long on a server that is down.
fn manager(client: &redis::Client, config: &RedisSinkConfig) -> RedisResult<ConnectionManager> {
    let settings = ConnectionManagerConfig::new()
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(config.timeout));
    ConnectionManager::new_lazy_with_config(client.clone(), settings)
}

/// Whether `e` is the server's answer (it refused a command) rather than a failure to
/// reach it. A server still loading its data is treated as unreachable: it will answer.
fn reached(e: &RedisError) -> bool {
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::BusyLoading) => false,
        ErrorKind::Server(_) | ErrorKind::Extension => true,
        _ => false,
    }
}

fn no_script(answer: &RedisResult<Value>) -> bool {
    matches!(answer, Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript))
}

/// A command the server refused: this delivery's failure, its answer the last error.
/// Retried with backoff (an operator can free memory or fix a key), never permanent.
fn refused(e: &RedisError) -> SinkError {
    SinkError::Redis {
        reason: format!("Redis refused the entry: {e}"),
        permanent: false,
    }
}

/// Checks the connection while the sink lives; failures are logged and reported by
/// `answered` and `unreachable`.
async fn watch(sink: Weak<RedisSink>) {
    loop {
        let Some(strong) = sink.upgrade() else {
            return;
        };
        let mut connection = strong.connection();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(
            CONNECT_TIMEOUT + strong.config.timeout,
            ping.query_async::<Value>(&mut connection),
        )
        .await
        {
            Ok(Ok(_)) => strong.answered(),
            Ok(Err(e)) if reached(&e) => strong.answered(),
            Ok(Err(e)) => {
                strong.unreachable(&e);
            }
            Err(_) => {
                strong.health().unready = Some("Redis unreachable: PING unanswered".into());
            }
        }
        drop(strong);
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
}

impl Sink for RedisSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn batch_size(&self) -> usize {
        self.config.max_in_flight
    }

    fn concurrency(&self) -> usize {
        self.config.concurrency
    }

    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(self.add(batch))
    }

    fn unready(&self) -> Option<String> {
        self.health().unready.clone()
    }
}
