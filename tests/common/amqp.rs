//! The test side of RabbitMQ: the broker's address and a consumer on a fresh queue.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

pub fn broker_url() -> String {
    std::env::var("VYORA_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn broker_addr() -> SocketAddr {
    let url: lapin::uri::AMQPUri = broker_url().parse().expect("broker URL");
    let host = if url.authority.host == "localhost" {
        "127.0.0.1".to_owned()
    } else {
        url.authority.host.clone()
    };
    format!("{host}:{}", url.authority.port)
        .parse()
        .expect("broker address")
}

/// The broker URL pointed at another address (a proxy in front of the broker).
pub fn url_via(addr: SocketAddr) -> String {
    let mut url = reqwest::Url::parse(&broker_url()).expect("URL");
    url.set_ip_host(addr.ip()).expect("host");
    url.set_port(Some(addr.port())).expect("port");
    url.to_string()
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

/// A consumer on its own auto-deleted queue.
pub struct Consumer {
    _connection: Connection,
    channel: Channel,
    queue: String,
}

impl Consumer {
    pub async fn new() -> Consumer {
        Consumer::open(
            &unique("vyora-test-q"),
            QueueDeclareOptions {
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
        )
        .await
    }

    /// A durable queue that survives a broker restart (delete it with [`Consumer::delete`]).
    pub async fn durable(queue: &str) -> Consumer {
        Consumer::open(
            queue,
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
        )
        .await
    }

    async fn open(queue: &str, options: QueueDeclareOptions) -> Consumer {
        let connection = Connection::connect(&broker_url(), ConnectionProperties::default())
            .await
            .expect("the test consumer connects to RabbitMQ");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .queue_declare(queue.into(), options, FieldTable::default())
            .await
            .expect("queue");
        Consumer {
            _connection: connection,
            channel,
            queue: queue.to_owned(),
        }
    }

    pub async fn delete(self) {
        let _ = self
            .channel
            .queue_delete(
                self.queue.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }

    /// Binds the queue with `#`, declaring the exchange as the router does if it is not
    /// there yet.
    pub async fn bind(&self, exchange: &str) {
        self.channel
            .exchange_declare(
                exchange.into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("exchange");
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    }

    pub async fn get(&self) -> Option<lapin::message::BasicGetMessage> {
        self.try_get().await.expect("basic.get")
    }

    /// The next message, if any, or the broker's error (its connection was closed).
    pub async fn try_get(&self) -> lapin::Result<Option<lapin::message::BasicGetMessage>> {
        self.channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
    }

    /// Messages until `n` distinct message ids were seen or `within` passed.
    pub async fn drain(
        &self,
        n: usize,
        within: Duration,
    ) -> (Vec<lapin::message::Delivery>, HashSet<String>) {
        let deadline = tokio::time::Instant::now() + within;
        let mut all = Vec::new();
        let mut ids = HashSet::new();
        while ids.len() < n && tokio::time::Instant::now() < deadline {
            match self.get().await {
                Some(m) => {
                    if let Some(id) = m.delivery.properties.message_id() {
                        ids.insert(id.to_string());
                    }
                    all.push(m.delivery);
                }
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        (all, ids)
    }

    /// The message ids of everything queued right now, repeats included.
    pub async fn drain_all(&self) -> Vec<String> {
        let mut ids = Vec::new();
        while let Some(m) = self.get().await {
            ids.push(
                m.delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
            );
        }
        ids
    }
}
