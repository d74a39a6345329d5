//! The NATS JetStream sink: one message per delivery, acknowledged by the stream,
//! pipelined.
//!
//! A row counts as delivered only once the stream acknowledged its message. A batch is
//! published whole before its acks are awaited (at most `max_in_flight` in flight), on
//! one connection, so a batch's messages reach the stream in the dispatcher's order. Each
//! message carries `Nats-Msg-Id` = the delivery's idempotency key: a delivery sent again
//! after a lost ack or a cut connection is dropped by the stream's duplicate window.
//!
//! The stream is looked up (or, with `declare`, created) at start and on every
//! reconnect: a subject that no stream captures stops the start when the server answers,
//! and is reported by readiness otherwise. A publish that no stream takes, or that a full
//! stream refuses, is the delivery's last error and readiness's reason; as with AMQP's
//! returned messages, only its first failure counts an attempt. The client reconnects by
//! itself, with our capped, jittered backoff; while it is disconnected, deliveries wait
//! without using up attempts.
//!
//! Its settings are in `config`, the stream lookup in `stream`; `check-config --connect`
//! is in `probe`.

mod config;
mod probe;
mod stream;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::{self, message::PublishMessage};
use async_nats::{ConnectOptions, Event};
use tokio::sync::watch;

pub use config::{Auth, NatsOptions, NatsSinkConfig};

use super::{BoxFuture, BuildError, Sink, SinkError};
use crate::backoff::Backoff;
use crate::event::Delivery;
use crate::protocol::{CALL_ID_HEADER, EVENT_HEADER, SIGNATURE_HEADER, SOURCE_HEADER};
use crate::signature;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnects after 0.4 s, doubling up to 30 s, with jitter, as the AMQP sink does.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(400), Duration::from_secs(30));
/// A subject that no stream takes is tried again after 0.5 s, doubling up to 15 s.
const NO_STREAM: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(15));
/// How often the connection and the stream are checked while nothing is sent.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// What the sink knows of its server, shared by deliveries, the watcher and the
/// client's event callback.
#[derive(Default)]
struct Health {
    /// The client's last word on the connection (an error, a disconnect), for readiness.
    connection: Option<String>,
    /// Why the stream does not take our messages; `None` once one was acknowledged.
    stream: Option<String>,
    /// Whether the stream was found since the last connect.
    stream_found: bool,
    /// Failures in a row: of the connection, then of the stream, for the next wait.
    failures: u32,
}

pub struct NatsSink {
    name: String,
    config: NatsSinkConfig,
    client: async_nats::Client,
    jetstream: jetstream::Context,
    health: Arc<Mutex<Health>>,
    /// Counts disconnects: publishes awaiting acks stop waiting when it moves.
    disconnects: watch::Receiver<u64>,
}

fn lock(health: &Mutex<Health>) -> MutexGuard<'_, Health> {
    health.lock().unwrap_or_else(PoisonError::into_inner)
}

impl NatsSink {
    /// Connects (in the background, so a server that is down does not stop the start)
    /// and, if the server answers within a few seconds, finds the stream: a subject no
    /// stream captures is refused here with the keys to change.
    pub async fn start(name: &str, config: &NatsSinkConfig) -> Result<Arc<NatsSink>, BuildError> {
        crate::net::install_tls_provider();
        let refused = |reason: String| BuildError::Nats {
            name: name.to_owned(),
            reason,
        };
        let health = Arc::new(Mutex::new(Health {
            connection: Some("not connected yet".into()),
            ..Health::default()
        }));
        let (disconnected, disconnects) = watch::channel(0u64);
        let options = connect_options(config, name)
            .await
            .map_err(|e| refused(e.to_string()))?
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                RECONNECT.equal_jitter(u32::try_from(attempts).unwrap_or(u32::MAX))
            })
            .event_callback({
                let health = Arc::clone(&health);
                let sink = name.to_owned();
                move |event| {
                    on_event(&sink, &health, &disconnected, event);
                    async {}
                }
            });
        let client = options
            .connect(config.url.as_str())
            .await
            .map_err(|e| refused(e.to_string()))?;
        // A batch is at most `max_in_flight` messages; the room for as many again holds
        // the acks a batch abandoned when its connection dropped, until they time out.
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            .ack_timeout(config.ack_timeout)
            .max_ack_inflight(config.max_in_flight.saturating_mul(2))
            .build(client.clone());
        let sink = Arc::new(NatsSink {
            name: name.to_owned(),
            config: config.clone(),
            client,
            jetstream,
            health,
            disconnects,
        });
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        while sink.client.connection_state() != State::Connected
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if sink.client.connection_state() == State::Connected
            && let Err(e) = sink.find_stream().await
            && e.is_answer()
        {
            return Err(refused(e.to_string()));
        }
        tokio::spawn(watch(Arc::downgrade(&sink)));
        Ok(sink)
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        lock(&self.health)
    }

    /// Looks the stream up, and records the outcome for readiness.
    async fn find_stream(&self) -> Result<(), stream::StreamError> {
        match stream::find(&self.jetstream, &self.config).await {
            Ok(found) => {
                let mut health = self.health();
                if !health.stream_found {
                    tracing::info!(sink = %self.name, stream = found, "the stream captures the subject");
                }
                health.stream_found = true;
                health.stream = None;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(sink = %self.name, error = %e, "no stream for the subject");
                let mut health = self.health();
                health.stream_found = false;
                health.stream = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// The connection is down: readiness says why, and deliveries wait.
    fn unreachable(&self, why: &str) -> SinkError {
        let mut health = self.health();
        health.failures = health.failures.saturating_add(1);
        let reason = health.connection.clone().unwrap_or_else(|| why.to_owned());
        SinkError::Unavailable {
            reason: format!("cannot connect to NATS: {reason}"),
            retry_in: RECONNECT.equal_jitter(health.failures),
        }
    }

    fn message(&self, d: &Delivery) -> PublishMessage {
        let mut message = PublishMessage::build()
            .payload(d.payload.clone())
            .message_id(&d.dedup_key)
            .header("Content-Type", "application/json")
            .header(EVENT_HEADER, d.event.as_str())
            .header(SOURCE_HEADER, d.source.as_str());
        if let Some(call_id) = &d.call_id {
            message = message.header(CALL_ID_HEADER, call_id.as_str());
        }
        if let Some(secret) = &self.config.secret {
            message = message.header(SIGNATURE_HEADER, signature::sign(secret, &d.payload));
        }
        message
    }

    async fn publish(&self, batch: &[Delivery]) -> Vec<Result<(), SinkError>> {
        if self.client.connection_state() != State::Connected {
            let e = self.unreachable("not connected");
            return batch.iter().map(|_| Err(e.clone())).collect();
        }
        let mut disconnects = self.disconnects.clone();
        disconnects.mark_unchanged();
        // Publish the whole batch, then collect the acks: one round trip for the batch.
        let mut pending = Vec::with_capacity(batch.len());
        for d in batch {
            let subject = self.config.subject.render_subject(d);
            let sent = self
                .jetstream
                .send_publish(subject.clone(), self.message(d));
            pending.push(sent.await.map(|ack| (ack, subject)));
        }
        let mut results = Vec::with_capacity(batch.len());
        // One wait for the batch, whatever number of its deliveries fail.
        let mut lost: Option<SinkError> = None;
        let mut wait = None;
        for (d, sent) in batch.iter().zip(pending) {
            let outcome = match sent {
                Ok(_) if lost.is_some() => Err(None),
                Ok((ack, subject)) => self.acked(d, ack, &subject, &mut disconnects).await,
                Err(e) => Err(Some(e)),
            };
            results.push(match outcome {
                Ok(()) => Ok(()),
                Err(None) => Err(lost
                    .get_or_insert_with(|| {
                        self.unreachable("the connection was lost before the ack")
                    })
                    .clone()),
                Err(Some(e)) => Err(self.refused(d, &e, &mut wait)),
            });
        }
        results
    }

    /// Waits for one message's ack, or for the connection to drop (`Err(None)`).
    async fn acked(
        &self,
        d: &Delivery,
        ack: PublishAckFuture,
        subject: &str,
        disconnects: &mut watch::Receiver<u64>,
    ) -> Result<(), Option<PublishError>> {
        tokio::select! {
            outcome = ack => match outcome {
                Ok(ack) => {
                    if ack.duplicate {
                        tracing::debug!(sink = %self.name, id = d.id.row, subject, stream = ack.stream, "already in the stream; dropped as a duplicate");
                    }
                    let mut health = self.health();
                    if health.stream.take().is_some() {
                        tracing::info!(sink = %self.name, subject, "the stream takes messages again");
                    }
                    health.failures = 0;
                    Ok(())
                }
                Err(e) if self.client.connection_state() != State::Connected => {
                    tracing::debug!(sink = %self.name, error = %e, "no ack: the connection is down");
                    Err(None)
                }
                Err(e) => Err(Some(e)),
            },
            _ = disconnects.changed() => Err(None),
        }
    }

    /// A publish the server refused or left unanswered: the delivery's last error and,
    /// for a stream problem, readiness's reason.
    fn refused(&self, d: &Delivery, e: &PublishError, wait: &mut Option<Duration>) -> SinkError {
        let subject = self.config.subject.render_subject(d);
        let text = e.to_string();
        let reason = match e.kind() {
            PublishErrorKind::MaxPayloadExceeded => {
                return SinkError::Nats {
                    reason: format!("the message is too large for the server: {text}"),
                    permanent: true,
                };
            }
            PublishErrorKind::StreamNotFound => {
                format!("no stream for subject {subject:?}: no stream captures it")
            }
            _ if text.contains("maximum messages exceeded")
                || text.contains("maximum bytes exceeded")
                || text.contains("insufficient resources") =>
            {
                format!("stream full: the stream refused subject {subject:?}: {text}")
            }
            PublishErrorKind::TimedOut => {
                return SinkError::Nats {
                    reason: format!(
                        "no ack from the stream within {:?}",
                        self.config.ack_timeout
                    ),
                    permanent: false,
                };
            }
            _ => format!("the stream refused the message for {subject:?}: {text}"),
        };
        let mut health = self.health();
        if health.stream.as_deref() != Some(reason.as_str()) {
            tracing::warn!(sink = %self.name, id = d.id.row, subject, reason, "the stream does not take this sink's messages; they wait and are tried again");
        }
        health.stream = Some(reason.clone());
        health.stream_found = false;
        if d.attempts == 0 {
            return SinkError::Nats {
                reason,
                permanent: false,
            };
        }
        let retry_in = *wait.get_or_insert_with(|| {
            health.failures = health.failures.saturating_add(1);
            NO_STREAM.equal_jitter(health.failures)
        });
        SinkError::Unavailable { reason, retry_in }
    }
}

/// The client's options from the sink's: its name, login and TLS.
async fn connect_options(config: &NatsSinkConfig, name: &str) -> std::io::Result<ConnectOptions> {
    let mut options = ConnectOptions::new()
        .name(format!("vyora-router/{name}"))
        .connection_timeout(CONNECT_TIMEOUT)
        .require_tls(config.tls);
    if let Some(ca_file) = &config.ca_file {
        options = options.add_root_certificates(ca_file.clone());
    }
    Ok(match &config.auth {
        Auth::None => options,
        Auth::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.clone())
        }
        Auth::Token(token) => options.token(token.clone()),
        Auth::Nkey(seed) => options.nkey(seed.clone()),
        Auth::Credentials(path) => options.credentials_file(path).await?,
    })
}

/// The client's report on its connection, kept for readiness and logged.
fn on_event(sink: &str, health: &Mutex<Health>, disconnected: &watch::Sender<u64>, event: Event) {
    let mut health = lock(health);
    match event {
        Event::Connected => {
            if health.failures > 0 || health.connection.is_some() {
                tracing::info!(sink, "connected to NATS");
            }
            health.connection = None;
            // Looked up again by the watcher: the server may have been replaced.
            health.stream_found = false;
        }
        Event::Disconnected => {
            tracing::warn!(sink, "disconnected from NATS; reconnecting");
            health.connection = Some("disconnected; reconnecting".into());
            disconnected.send_modify(|n| *n = n.wrapping_add(1));
        }
        Event::Closed => health.connection = Some("the connection was closed".into()),
        Event::ClientError(e) => {
            tracing::warn!(sink, error = %e, "NATS connection error");
            health.connection = Some(e.to_string());
        }
        Event::ServerError(e) => {
            tracing::warn!(sink, error = %e, "NATS server error");
            health.connection = Some(format!("server error: {e}"));
        }
        other => tracing::debug!(sink, event = %other, "NATS connection event"),
    }
}

/// Finds the stream again after each (re)connect, while the sink lives.
async fn watch(sink: Weak<NatsSink>) {
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let Some(sink) = sink.upgrade() else {
            return;
        };
        let connected = sink.client.connection_state() == State::Connected;
        if connected && !sink.health().stream_found {
            // The outcome is logged and kept for readiness by `find_stream`.
            let _ = sink.find_stream().await;
        }
    }
}

impl Sink for NatsSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn batch_size(&self) -> usize {
        self.config.max_in_flight
    }

    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(self.publish(batch))
    }

    fn unready(&self) -> Option<String> {
        let health = self.health();
        if self.client.connection_state() != State::Connected {
            let why = health.connection.as_deref().unwrap_or("disconnected");
            return Some(format!("NATS unreachable: {why}"));
        }
        health.stream.clone()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Err(e) = self.client.drain().await {
                tracing::debug!(sink = %self.name, error = %e, "closing the NATS connection");
            }
        })
    }
}
