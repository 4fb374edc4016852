//! The Kafka publisher in the publisher conformance suite.

use std::net::SocketAddr;
use std::time::Duration;

use proclaim_core::Event;
use proclaim_kafka::{KafkaConfig, KafkaPublisher, decode_message, dedup_id};
use proclaim_testkit::events::of_type;
use proclaim_testkit::publisher_conformance::{Delivered, PublisherCapabilities, PublisherHarness};

use crate::support::{PrivateBroker, Route, TestTopic, broker_addr, route, router};

/// A topic of its own (`t_<suffix>.DonorSecured`, the type every event of
/// the suite has) and a publisher to it. Reached through a fault proxy, the
/// topic lives on a private tansu that advertises the proxy's address, so
/// that every connection goes through the proxy (see `support`).
struct Kafka {
    topic: TestTopic,
    config: KafkaConfig,
    publisher: KafkaPublisher,
    /// Dropped last: the route to the private broker, and the broker.
    _private: Option<(Route, PrivateBroker)>,
}

impl PublisherHarness for Kafka {
    type Publisher = KafkaPublisher;
    /// Kafka's idempotent producer drops only duplicates of its own retries:
    /// an event published twice (the relay's redelivery) is two records,
    /// both with `ce_id` for consumers to deduplicate by. tansu creates no
    /// topic on its own, so an event whose topic does not exist is refused
    /// (a permanent error once `missing_topic_timeout` has passed).
    const CAPABILITIES: PublisherCapabilities = PublisherCapabilities {
        broker_dedup: false,
        unroutable: true,
    };

    /// The router in front of the private brokers: fault proxies forward
    /// to it. Setting up with this address itself means "no proxy": the
    /// shared broker is used directly.
    fn broker() -> SocketAddr {
        router()
    }

    async fn setup(via: SocketAddr, timeout: Duration) -> Self {
        let client_id = format!("proclaim-test-{}", proclaim_testkit::unique_suffix());
        let (topic, private) = if via == Self::broker() {
            (
                TestTopic::on(broker_addr().to_string(), client_id, true).await,
                None,
            )
        } else {
            let broker = PrivateBroker::start(via).await;
            let route = route(&client_id, broker.addr());
            // The private broker and its topics die with it.
            let topic = TestTopic::on(via.to_string(), client_id, false).await;
            (topic, Some((route, broker)))
        };
        let config = topic
            .config()
            .with_ack_timeout(timeout)
            .with_connect_timeout(timeout)
            .with_missing_topic_timeout(timeout / 4);
        let publisher = KafkaPublisher::connect(config.clone()).await.unwrap();
        Kafka {
            topic,
            config,
            publisher,
            _private: private,
        }
    }

    fn publisher(&self) -> &KafkaPublisher {
        &self.publisher
    }

    async fn connect(&self, via: SocketAddr) -> Result<KafkaPublisher, String> {
        let config = self.config.clone().with_bootstrap_servers(via.to_string());
        KafkaPublisher::connect(config)
            .await
            .map_err(|e| e.to_string())
    }

    async fn received(&self, n: usize, wait: Duration) -> Vec<Delivered> {
        self.topic
            .messages(n, wait)
            .await
            .iter()
            .map(|m| Delivered {
                event: decode_message(m).unwrap(),
                dedup_id: dedup_id(m),
            })
            .collect()
    }

    fn unroutable(&self) -> Option<Event> {
        // Its topic, `<prefix>.NobodyListens`, does not exist.
        Some(of_type("NobodyListens"))
    }
}

proclaim_testkit::publisher_conformance!(Kafka);
