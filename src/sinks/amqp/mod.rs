//! The RabbitMQ (AMQP 0-9-1) sink: persistent messages, publisher confirms, pipelined.
//!
//! A row counts as delivered only on a broker `Ack` for a message that was not returned.
//! A `Nack`, a confirm timeout or a lost channel leaves the row pending. One connection and
//! one confirm-mode channel per sink; on any error both are dropped and rebuilt with capped,
//! jittered backoff, and the rows that were never confirmed are simply published again from
//! the store (lapin does not republish; the store is the source of truth). Duplicates after
//! a reconnect carry the same `message_id`.
//!
//! A returned message (`mandatory`, and no queue bound for its routing key) is a
//! destination not set up yet rather than a bad event: its first return counts one attempt
//! (which records the cause as the delivery's last error), later ones wait without using
//! attempts, so the backlog drains once a queue is bound. Meanwhile readiness names the
//! exchange and routing key (`returned`). The returned message itself is never logged, and
//! lapin's own dump of it is filtered out (`log_cap`).
//!
//! Its settings are in `config`; the routing key template is `super::topic`'s.

mod config;
mod log_cap;
mod probe;
mod returned;

use std::sync::{Arc, Mutex as StdMutex, PoisonError, Weak};
use std::time::{Duration, UNIX_EPOCH};

use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::Mutex;
use tokio::time::Instant;

pub use config::{AmqpOptions, AmqpSinkConfig};
pub use log_cap::log_cap;

use super::{BoxFuture, Sink, SinkError};
use crate::backoff::Backoff;
use crate::event::Delivery;
use crate::protocol::{CALL_ID_HEADER, EVENT_HEADER, SOURCE_HEADER};
use returned::Returns;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnects after 0.4 s, doubling up to 30 s, with jitter: many routers restarting
/// against one broker do not reconnect in lockstep.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(400), Duration::from_secs(30));
/// How often a sink without a connection tries to make one even when nothing is pending,
/// so that readiness reflects the broker before the first event needs it.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// An AMQP short string (at most 255 bytes) from our data; too long is a permanent failure
/// of this delivery (the same bytes would fail on every retry), named in its last error.
fn short(what: &str, value: &str) -> Result<ShortString, SinkError> {
    ShortString::try_new(value).map_err(|e| SinkError::Amqp {
        reason: format!("the {what} cannot be sent: {e}"),
        permanent: true,
    })
}

/// The open connection and its confirm-mode channel.
struct Link {
    connection: Connection,
    channel: Channel,
}

impl Link {
    fn usable(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

/// Connection state shared by deliveries and the watcher.
struct State {
    link: Option<Link>,
    failures: u32,
    next_attempt: Instant,
}

pub struct AmqpSink {
    name: String,
    config: AmqpSinkConfig,
    state: Mutex<State>,
    /// Why the sink cannot publish right now, for readiness; `None` when connected.
    unready: StdMutex<Option<String>>,
    /// The routing keys whose messages the broker returns, for readiness and the wait
    /// before they are tried again.
    returns: StdMutex<Returns>,
}

impl AmqpSink {
    /// Creates the sink and starts watching its connection. No connection is needed to
    /// start: a broker that is down, or refuses us, is reported in logs and readiness.
    pub fn start(name: &str, config: &AmqpSinkConfig) -> Arc<AmqpSink> {
        crate::net::install_tls_provider();
        let sink = Arc::new(AmqpSink {
            name: name.to_owned(),
            config: config.clone(),
            state: Mutex::new(State {
                link: None,
                failures: 0,
                next_attempt: Instant::now(),
            }),
            unready: StdMutex::new(Some("not connected yet".into())),
            returns: StdMutex::new(Returns::default()),
        });
        tokio::spawn(watch(Arc::downgrade(&sink)));
        sink
    }

    fn set_unready(&self, reason: Option<String>) {
        *self.unready.lock().unwrap_or_else(PoisonError::into_inner) = reason;
    }

    fn lock_returns(&self) -> std::sync::MutexGuard<'_, Returns> {
        self.returns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The outcome of a delivery whose message the broker returned. The first return
    /// counts an attempt, so that the store records the cause; after that the delivery
    /// waits without using attempts (`wait` is shared by the batch's returns), since
    /// binding a queue is what it waits for. Logs the sink, the delivery, the reply and
    /// where it was sent, never the message.
    fn on_returned(
        &self,
        d: &Delivery,
        message: &BasicReturnMessage,
        wait: &mut Option<Duration>,
    ) -> SinkError {
        let exchange = message.delivery.exchange.as_str();
        let routing_key = message.delivery.routing_key.as_str();
        let reply_code = message.reply_code;
        let reply_text = message.reply_text.as_str();
        let cause = returned::cause(reply_code, reply_text, exchange, routing_key);
        let mut returns = self.lock_returns();
        if returns.returned(routing_key, cause.clone(), Instant::now()) {
            tracing::warn!(sink = %self.name, id = d.id.row, reply_code, reply_text, exchange, routing_key, "the broker returns messages sent with this routing key; they wait and are tried again");
        } else {
            tracing::debug!(sink = %self.name, id = d.id.row, reply_code, reply_text, "returned by the broker again");
        }
        if d.attempts == 0 {
            SinkError::Amqp {
                reason: cause,
                permanent: false,
            }
        } else {
            SinkError::Unavailable {
                reason: cause,
                retry_in: *wait.get_or_insert_with(|| returns.wait()),
            }
        }
    }

    /// A message with `routing_key` reached a queue.
    fn on_routed(&self, routing_key: &str) {
        if self.lock_returns().routed(routing_key) {
            tracing::info!(sink = %self.name, routing_key, "messages sent with this routing key reach a queue again");
        }
    }

    /// Makes sure `state.link` is usable, connecting if it is time to try; otherwise says
    /// how long to wait.
    async fn ensure_link(&self, state: &mut State) -> Result<(), SinkError> {
        if state.link.as_ref().is_some_and(Link::usable) {
            return Ok(());
        }
        state.link = None;
        let now = Instant::now();
        if now < state.next_attempt {
            return Err(SinkError::Unavailable {
                reason: "not connected to the broker".into(),
                retry_in: state.next_attempt - now,
            });
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, self.connect()).await {
            Ok(Ok(link)) => {
                if state.failures > 0 {
                    tracing::info!(sink = %self.name, "connected to the broker again");
                } else {
                    tracing::info!(sink = %self.name, "connected to the broker");
                }
                state.failures = 0;
                self.set_unready(None);
                state.link = Some(link);
                Ok(())
            }
            outcome => {
                let reason = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {CONNECT_TIMEOUT:?}"),
                };
                state.failures = state.failures.saturating_add(1);
                let wait = RECONNECT.equal_jitter(state.failures);
                state.next_attempt = Instant::now() + wait;
                tracing::warn!(sink = %self.name, failures = state.failures, retry_in = ?wait, reason, "cannot connect to the broker");
                self.set_unready(Some(format!("broker unreachable: {reason}")));
                Err(SinkError::Unavailable {
                    reason: format!("cannot connect to the broker: {reason}"),
                    retry_in: wait,
                })
            }
        }
    }

    async fn connect(&self) -> Result<Link, lapin::Error> {
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(format!("vyora-router/{}", self.name)));
        let connection = Connection::connect(&self.config.url, properties).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        // Without `declare`, a passive declare still proves the exchange exists, so a
        // missing one shows in readiness at connect instead of failing every publish. The
        // default exchange ("") always exists and cannot be declared.
        if self.config.declare || !self.config.exchange.as_str().is_empty() {
            channel
                .exchange_declare(
                    self.config.exchange.clone(),
                    self.config.exchange_kind.clone(),
                    ExchangeDeclareOptions {
                        durable: true,
                        passive: !self.config.declare,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(Link {
            connection,
            channel,
        })
    }

    /// The message's properties. Every short string is built fallibly: a value over
    /// AMQP's 255 bytes is this delivery's permanent failure, never a panic.
    fn properties(d: &Delivery) -> Result<BasicProperties, SinkError> {
        let mut headers = FieldTable::default();
        headers.insert(
            EVENT_HEADER.into(),
            AMQPValue::LongString(d.event.as_str().into()),
        );
        if let Some(call_id) = &d.call_id {
            headers.insert(
                CALL_ID_HEADER.into(),
                AMQPValue::LongString(call_id.as_str().into()),
            );
        }
        headers.insert(
            SOURCE_HEADER.into(),
            AMQPValue::LongString(d.source.as_str().into()),
        );
        let timestamp = d
            .received_at
            .duration_since(UNIX_EPOCH)
            .map(|t| t.as_secs())
            .unwrap_or_default();
        Ok(BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(short("message_id", &d.dedup_key)?)
            .with_type(short("type", &d.event)?)
            .with_timestamp(timestamp)
            .with_app_id("vyora-router".into())
            .with_headers(headers))
    }

    async fn publish(&self, batch: &[Delivery]) -> Vec<Result<(), SinkError>> {
        let mut state = self.state.lock().await;
        if let Err(e) = self.ensure_link(&mut state).await {
            return batch.iter().map(|_| Err(e.clone())).collect();
        }
        let Some(link) = state.link.as_ref() else {
            return Vec::new();
        };
        let options = BasicPublishOptions {
            mandatory: self.config.mandatory,
            ..BasicPublishOptions::default()
        };
        let exchange = self.config.exchange.clone();

        // Publish the whole batch first, then collect the confirms: one round trip for
        // the batch, not one per message.
        let mut pending = Vec::with_capacity(batch.len());
        let mut broken = None;
        for d in batch {
            let message = short("routing key", &self.config.routing_key.render(d))
                .and_then(|key| Ok((key, Self::properties(d)?)));
            let (key, properties) = match message {
                Ok(message) => message,
                Err(e) => {
                    pending.push(Err(e));
                    continue;
                }
            };
            if broken.is_some() {
                pending.push(Err(SinkError::Amqp {
                    reason: "not published: the channel failed earlier in this batch".into(),
                    permanent: false,
                }));
                continue;
            }
            match link
                .channel
                .basic_publish(
                    exchange.clone(),
                    key.clone(),
                    options,
                    &d.payload,
                    properties,
                )
                .await
            {
                Ok(confirm) => pending.push(Ok((confirm, key))),
                Err(e) => {
                    let reason = format!("publish failed: {e}");
                    pending.push(Err(SinkError::Amqp {
                        reason: reason.clone(),
                        permanent: false,
                    }));
                    broken = Some(reason);
                }
            }
        }

        let deadline = Instant::now() + self.config.confirm_timeout;
        let mut results = Vec::with_capacity(batch.len());
        let mut wait = None;
        for (d, p) in batch.iter().zip(pending) {
            let (confirm, key) = match p {
                Ok(sent) => sent,
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            };
            let outcome = match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => {
                    self.on_routed(key.as_str());
                    Ok(())
                }
                Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                    Err(self.on_returned(d, &returned, &mut wait))
                }
                Ok(Ok(Confirmation::Nack(_))) => Err(SinkError::Amqp {
                    reason: "the broker refused the message (nack)".into(),
                    permanent: false,
                }),
                Ok(Ok(Confirmation::NotRequested)) => {
                    // Confirm mode is selected on every channel we open; this is our bug.
                    tracing::error!(sink = %self.name, "BUG: a publish was not confirmed because confirms were not enabled");
                    broken.get_or_insert_with(|| "confirms were not enabled".to_owned());
                    Err(SinkError::Amqp {
                        reason: "confirms were not enabled on the channel".into(),
                        permanent: false,
                    })
                }
                Ok(Err(e)) => {
                    let reason = format!("no confirm: {e}");
                    broken.get_or_insert_with(|| reason.clone());
                    Err(SinkError::Amqp {
                        reason,
                        permanent: false,
                    })
                }
                Err(_) => {
                    // Unconfirmed in time: the channel is suspect, start afresh.
                    broken.get_or_insert_with(|| "confirm timeout".to_owned());
                    Err(SinkError::Amqp {
                        reason: format!("no confirm within {:?}", self.config.confirm_timeout),
                        permanent: false,
                    })
                }
            };
            results.push(outcome);
        }
        if let Some(e) = broken {
            tracing::warn!(sink = %self.name, error = %e, "dropping the broker connection; unconfirmed messages will be published again");
            if let Some(link) = state.link.take() {
                // Best effort: the connection is being abandoned either way.
                let _ = link.connection.close(200, "reconnecting".into()).await;
            }
            self.set_unready(Some(format!("reconnecting after: {e}")));
        }
        results
    }
}

/// Keeps trying to connect while the sink has no connection and nothing else does.
async fn watch(sink: Weak<AmqpSink>) {
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let Some(sink) = sink.upgrade() else {
            return;
        };
        // A delivery in progress is already using (or rebuilding) the connection.
        if let Ok(mut state) = sink.state.try_lock() {
            // Failures are logged and reported by `link` itself.
            let _ = sink.ensure_link(&mut state).await;
        }
    }
}

impl Sink for AmqpSink {
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
        let connection = self
            .unready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        connection.or_else(|| self.lock_returns().reason(Instant::now()))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut state = self.state.lock().await;
            if let Some(link) = state.link.take()
                && let Err(e) = link.connection.close(200, "shutting down".into()).await
            {
                tracing::debug!(sink = %self.name, error = %e, "closing the broker connection");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::topic::tests::delivery;

    #[test]
    fn a_property_over_255_bytes_fails_the_delivery_permanently_instead_of_panicking() {
        let mut d = delivery();
        d.dedup_key = format!("{}:call_completed", "9".repeat(300));
        match AmqpSink::properties(&d) {
            Err(
                e @ SinkError::Amqp {
                    permanent: true, ..
                },
            ) => {
                assert!(e.to_string().contains("message_id"), "{e}");
            }
            other => panic!("expected a permanent failure, got {other:?}"),
        }
        assert!(AmqpSink::properties(&delivery()).is_ok());
    }
}
