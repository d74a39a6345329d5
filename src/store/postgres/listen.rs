//! Wake-ups across replicas: a connection of its own (a pooled one would hide its
//! notifications) `LISTEN`s on the channel every ingest and replay `NOTIFY`s with the
//! sinks that got new deliveries. The dispatchers' own periodic look stays the fallback.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::store::wakers::Wakers;

/// Reconnects after 0.5 s, doubling up to 30 s.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
/// Notifications waiting to be turned into wake-ups; more are dropped (the fallback look
/// finds their rows).
const PENDING_NOTIFICATIONS: usize = 256;

/// Listens until `stop`, reconnecting whenever the connection fails.
pub(super) async fn run(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    channel: Arc<str>,
    wakers: Arc<Wakers>,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = mpsc::channel::<String>(PENDING_NOTIFICATIONS);
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(AsyncMessage::Notification(n)) => {
                                let _ = tx.try_send(n.payload().to_owned());
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "the notification connection failed");
                                return;
                            }
                        }
                    }
                });
                match client
                    .batch_execute(&format!("LISTEN {}", super::schema::quote(&channel)))
                    .await
                {
                    Ok(()) => {
                        failures = 0;
                        // Whatever was stored while nobody listened.
                        wakers.wake_all();
                        loop {
                            tokio::select! {
                                () = stop.cancelled() => {
                                    driver.abort();
                                    return;
                                }
                                payload = rx.recv() => match payload {
                                    Some(sinks) => wakers.wake(sinks.split(',')),
                                    None => break,
                                },
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot listen for new deliveries"),
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(error = %e, "cannot open the notification connection"),
        }
        failures = failures.saturating_add(1);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RECONNECT.equal_jitter(failures)) => {}
        }
    }
}
