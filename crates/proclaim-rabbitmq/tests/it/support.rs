//! Test exchanges and queues on the real RabbitMQ: each test gets its own,
//! deleted when the [`TestQueue`] is dropped, even if the test panics.

use std::net::SocketAddr;
use std::time::Duration;

use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use proclaim_rabbitmq::RabbitConfig;

/// The broker tests use: `PROCLAIM_TEST_AMQP_ADDR` (`host:port`, guest/guest),
/// or the local one.
pub(crate) fn broker_addr() -> SocketAddr {
    let addr = std::env::var("PROCLAIM_TEST_AMQP_ADDR").unwrap_or_else(|_| "127.0.0.1:5672".into());
    addr.parse()
        .unwrap_or_else(|e| panic!("PROCLAIM_TEST_AMQP_ADDR {addr:?} is not <ip>:<port>: {e}"))
}

/// The AMQP URL of the broker at `addr`, as guest.
pub(crate) fn url_via(addr: SocketAddr) -> String {
    format!("amqp://guest:guest@{addr}/%2f")
}

/// The AMQP URL of the test broker.
pub(crate) fn amqp_url() -> String {
    url_via(broker_addr())
}

/// A connection of the test itself (not the publisher's), to set up and
/// read queues.
pub(crate) async fn connect() -> Connection {
    Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to RabbitMQ at {}: {e}", amqp_url()))
}

/// An exchange and a durable queue of their own for one test, named
/// `t_<suffix>` (the exchange) and `t_<suffix>_q` (the queue); the queue is
/// bound to the exchange with each of the given binding keys.
pub(crate) struct TestQueue {
    pub(crate) connection: Connection,
    pub(crate) channel: Channel,
    pub(crate) exchange: String,
    pub(crate) queue: String,
}

impl TestQueue {
    /// A topic exchange and a queue bound with `DonorSecured`.
    pub(crate) async fn new() -> Self {
        Self::with(
            ExchangeKind::Topic,
            &["DonorSecured"],
            FieldTable::default(),
        )
        .await
    }

    /// An exchange of `kind` and a queue (declared with `arguments`) bound
    /// with each of `keys`.
    pub(crate) async fn with(kind: ExchangeKind, keys: &[&str], arguments: FieldTable) -> Self {
        let suffix = proclaim_testkit::unique_suffix();
        let exchange = format!("t_{suffix}");
        let queue = format!("t_{suffix}_q");
        let connection = connect().await;
        let channel = connection.create_channel().await.unwrap();
        channel
            .exchange_declare(
                exchange.as_str().into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments,
            )
            .await
            .unwrap();
        for key in keys {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    (*key).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
        TestQueue {
            connection,
            channel,
            exchange,
            queue,
        }
    }

    /// A publisher configuration for this exchange on the test broker.
    pub(crate) fn config(&self) -> RabbitConfig {
        RabbitConfig::default()
            .with_url(amqp_url())
            .with_exchange(&self.exchange)
    }

    /// Number of messages the queue holds now.
    pub(crate) async fn count(&self) -> u32 {
        let channel = self.connection.create_channel().await.unwrap();
        let queue = channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        queue.message_count()
    }

    /// Waits until the queue holds at least `n` messages, or `wait` has passed.
    pub(crate) async fn wait_for(&self, n: u32, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        while self.count().await < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every message the queue holds now, in queue order. The messages stay
    /// in the queue: they are fetched unacknowledged on a channel of its
    /// own, which is then closed, so the broker puts them back in place.
    pub(crate) async fn messages(&self) -> Vec<BasicGetMessage> {
        let channel = self.connection.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(message) = channel
            .basic_get(
                self.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .unwrap()
        {
            out.push(message);
        }
        channel.close(200, "OK".into()).await.unwrap();
        out
    }
}

impl Drop for TestQueue {
    /// Deletes the queue and the exchange from a thread of its own (with its
    /// own runtime), so it works inside any runtime and while a test is
    /// panicking.
    fn drop(&mut self) {
        let exchange = self.exchange.clone();
        let queue = self.queue.clone();
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let delete = async {
                    let connection =
                        Connection::connect(&amqp_url(), ConnectionProperties::default())
                            .await
                            .map_err(|e| e.to_string())?;
                    let channel = connection
                        .create_channel()
                        .await
                        .map_err(|e| e.to_string())?;
                    channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await
                        .map_err(|e| e.to_string())?;
                    channel
                        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await
                        .map_err(|e| e.to_string())?;
                    let _ = connection.close(200, "OK".into()).await;
                    Ok::<(), String>(())
                };
                tokio::time::timeout(Duration::from_secs(10), delete)
                    .await
                    .map_err(|_| "timed out".to_owned())?
            })
        })
        .join();
        match deleted {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(exchange = %self.exchange, "cannot delete test exchange/queue: {e}");
            }
            Err(_) => {
                tracing::warn!(exchange = %self.exchange, "deleting the test exchange/queue panicked")
            }
        }
    }
}

/// Whether the exchange `name` exists.
pub(crate) async fn exchange_exists(name: &str) -> bool {
    let connection = connect().await;
    let channel = connection.create_channel().await.unwrap();
    let found = channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = connection.close(200, "OK".into()).await;
    found
}

/// Whether the queue `name` exists.
pub(crate) async fn queue_exists(name: &str) -> bool {
    let connection = connect().await;
    let channel = connection.create_channel().await.unwrap();
    let found = channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = connection.close(200, "OK".into()).await;
    found
}
