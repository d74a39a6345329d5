//! `check-config --connect` for an AMQP sink: log in to the broker and find (or declare)
//! the exchange, as the sink does each time it connects; nothing is published.

use lapin::options::ExchangeDeclareOptions;
use lapin::types::{FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use super::{AmqpSinkConfig, CONNECT_TIMEOUT};
use crate::sinks::{BoxFuture, Probe};

impl Probe for AmqpSinkConfig {
    fn probe(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            crate::net::install_tls_provider();
            // Validation parsed it; the user name is no secret, the password is not shown.
            let broker = match self.url.parse::<AMQPUri>() {
                Ok(uri) => format!(
                    "{}:{} (vhost {:?}, user {:?})",
                    uri.authority.host,
                    uri.authority.port,
                    uri.vhost,
                    uri.authority.userinfo.username
                ),
                Err(_) => "the broker".to_owned(),
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, exchange(self)).await {
                Ok(Ok(found)) => Ok(format!("logged in to {broker}; {found}")),
                Ok(Err(e)) => Err(format!("{broker}: {e}")),
                Err(_) => Err(format!("{broker}: no answer within {CONNECT_TIMEOUT:?}")),
            }
        })
    }
}

/// Connects, then declares the exchange (with `declare = false`, passively: it must
/// exist) exactly as the sink does, and closes the connection.
async fn exchange(config: &AmqpSinkConfig) -> Result<String, lapin::Error> {
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from("vyora-router/check-config"));
    let connection = Connection::connect(&config.url, properties).await?;
    let name = config.exchange.as_str();
    let declared = async {
        let channel = connection.create_channel().await?;
        if config.declare || !name.is_empty() {
            channel
                .exchange_declare(
                    config.exchange.clone(),
                    config.exchange_kind.clone(),
                    ExchangeDeclareOptions {
                        durable: true,
                        passive: !config.declare,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
        }
        Ok::<_, lapin::Error>(())
    }
    .await;
    // Closing is a courtesy to the broker; the outcome is the declaration's.
    let _ = connection
        .close(200, ShortString::from("check-config done"))
        .await;
    declared?;
    Ok(match (config.declare, name.is_empty()) {
        (true, _) => format!(
            "exchange {name:?} is declared ({}, durable)",
            format!("{:?}", config.exchange_kind).to_lowercase()
        ),
        (false, false) => format!("exchange {name:?} exists"),
        (false, true) => "publishing to the default exchange".to_owned(),
    })
}
