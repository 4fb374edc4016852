//! The RabbitMQ publisher in the publisher conformance suite.

use std::net::SocketAddr;
use std::time::Duration;

use proclaim_core::Event;
use proclaim_rabbitmq::{RabbitConfig, RabbitPublisher, decode_delivery};
use proclaim_testkit::events::of_type;
use proclaim_testkit::publisher_conformance::{Delivered, PublisherCapabilities, PublisherHarness};

use crate::support::{TestQueue, broker_addr, url_via};

/// An exchange and a queue of their own (bound with `DonorSecured`, the
/// type every event of the suite has) and a publisher to them.
struct Rabbit {
    tq: TestQueue,
    config: RabbitConfig,
    publisher: RabbitPublisher,
}

impl PublisherHarness for Rabbit {
    type Publisher = RabbitPublisher;
    const CAPABILITIES: PublisherCapabilities = PublisherCapabilities {
        broker_dedup: false,
        unroutable: true,
    };

    fn broker() -> SocketAddr {
        broker_addr()
    }

    async fn setup(via: SocketAddr, timeout: Duration) -> Self {
        let tq = TestQueue::new().await;
        let config = tq
            .config()
            .with_url(url_via(via))
            .with_connect_timeout(timeout)
            .with_confirm_timeout(timeout);
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        Rabbit {
            tq,
            config,
            publisher,
        }
    }

    fn publisher(&self) -> &RabbitPublisher {
        &self.publisher
    }

    async fn connect(&self, via: SocketAddr) -> Result<RabbitPublisher, String> {
        let config = self.config.clone().with_url(url_via(via));
        RabbitPublisher::connect(config)
            .await
            .map_err(|e| e.to_string())
    }

    async fn received(&self, n: usize, wait: Duration) -> Vec<Delivered> {
        self.tq.wait_for(u32::try_from(n).unwrap(), wait).await;
        self.tq
            .messages()
            .await
            .iter()
            .map(|m| Delivered {
                event: decode_delivery(m).unwrap(),
                dedup_id: m
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_owned()),
            })
            .collect()
    }

    fn unroutable(&self) -> Option<Event> {
        // Nothing is bound for this routing key (the event type).
        Some(of_type("NobodyListens"))
    }
}

proclaim_testkit::publisher_conformance!(Rabbit);
