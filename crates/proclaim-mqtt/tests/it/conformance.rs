//! The MQTT publisher in the publisher conformance suite, against Mosquitto.

use std::net::SocketAddr;
use std::time::Duration;

use proclaim_mqtt::rumqttc::v5::mqttbytes::QoS;
use proclaim_mqtt::{MqttConfig, MqttPublisher, decode_publish, dedup_id};
use proclaim_testkit::publisher_conformance::{Delivered, PublisherCapabilities, PublisherHarness};

use crate::{Subscriber, broker_addr, unique_prefix};

/// Topics of its own (`proclaim-test/<suffix>/<type>`), a subscriber to them
/// connected straight to the broker, and a publisher that may go through a
/// fault proxy.
struct Mosquitto {
    subscriber: Subscriber,
    config: MqttConfig,
    publisher: MqttPublisher,
}

impl PublisherHarness for Mosquitto {
    type Publisher = MqttPublisher;
    const CAPABILITIES: PublisherCapabilities = PublisherCapabilities {
        // MQTT has no broker-side deduplication: consumers deduplicate by id.
        broker_dedup: false,
        unroutable: false,
    };

    fn broker() -> SocketAddr {
        broker_addr()
    }

    async fn setup(via: SocketAddr, timeout: Duration) -> Self {
        let prefix = unique_prefix();
        // Subscribed before anything is published.
        let subscriber = Subscriber::start(&format!("{prefix}/#"), QoS::AtLeastOnce).await;
        let config = MqttConfig::default()
            .with_url(format!("mqtt://{via}"))
            .with_topic_template(format!("{prefix}/{{type}}"))
            .with_connect_timeout(timeout)
            .with_ack_timeout(timeout);
        let publisher = MqttPublisher::connect(config.clone()).await.unwrap();
        Mosquitto {
            subscriber,
            config,
            publisher,
        }
    }

    fn publisher(&self) -> &MqttPublisher {
        &self.publisher
    }

    async fn connect(&self, via: SocketAddr) -> Result<MqttPublisher, String> {
        let config = self.config.clone().with_url(format!("mqtt://{via}"));
        MqttPublisher::connect(config)
            .await
            .map_err(|e| e.to_string())
    }

    async fn received(&self, n: usize, wait: Duration) -> Vec<Delivered> {
        self.subscriber
            .wait_for(n, wait)
            .await
            .iter()
            .map(|m| Delivered {
                event: decode_publish(m).unwrap(),
                dedup_id: dedup_id(m),
            })
            .collect()
    }
}

proclaim_testkit::publisher_conformance!(Mosquitto);
