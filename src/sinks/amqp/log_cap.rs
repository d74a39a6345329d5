//! The AMQP client's log lines that can carry a message's body or headers, or the broker
//! URL's password, kept out of the logs whatever filter the operator sets.
//!
//! lapin prints every message the broker returns whole, at WARN, the moment it arrives:
//! before any caller can take it, so only a filter stops it. `log.level` and `RUST_LOG`
//! choose what else is logged; this cap applies on top of them and cannot be lifted.

use tracing_subscriber::filter::{LevelFilter, Targets};

/// Installed beside the operator's filter (an event is logged only if both allow it).
/// Targets match by prefix, the longest one deciding.
pub fn log_cap() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        // `warn!(?message, "Server returned us a message")`: body and headers, every time.
        .with_target("lapin::returned_messages", LevelFilter::OFF)
        // Its one error line prints a delivery nobody took, body included.
        .with_target("lapin::consumer", LevelFilter::OFF)
        // At TRACE: every frame received or discarded (bodies and headers) and internal
        // commands (a refreshed secret).
        .with_target("lapin", LevelFilter::DEBUG)
        // At TRACE: the connection URI, password included.
        .with_target("amq_protocol_tcp", LevelFilter::DEBUG)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex, PoisonError};

    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lapins_message_dumps_are_dropped_even_when_the_operator_asks_for_lapin_at_trace() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new("trace,lapin::returned_messages=trace"))
            .with_writer(move || writer.clone())
            .finish()
            .with(log_cap());
        tracing::subscriber::with_default(subscriber, || {
            let message = "BasicReturnMessage { data: \"+919876543210\" }";
            tracing::warn!(target: "lapin::returned_messages", ?message, "Server returned us a message");
            tracing::error!(target: "lapin::consumer", err = "Rahul Sharma", "failed to send delivery to consumer");
            tracing::trace!(target: "lapin::channels", frame = "a transcript", "will handle frame");
            tracing::trace!(target: "amq_protocol_tcp", uri = "amqp://u:hunter2@host", "Connecting.");
            tracing::info!(target: "lapin::channel", "Connection closed");
            tracing::debug!(target: "lapin::channels", "create channel");
            tracing::trace!(target: "vyora_router::sinks::amqp", "our own trace");
        });
        let log =
            String::from_utf8_lossy(&captured.0.lock().unwrap_or_else(PoisonError::into_inner))
                .into_owned();
        for secret in ["+919876543210", "Rahul Sharma", "a transcript", "hunter2"] {
            assert!(!log.contains(secret), "{secret} logged: {log}");
        }
        for kept in ["Connection closed", "create channel", "our own trace"] {
            assert!(log.contains(kept), "{kept} missing: {log}");
        }
    }
}
