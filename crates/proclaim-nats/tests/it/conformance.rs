//! The NATS JetStream publisher in the publisher conformance suite.

use std::net::SocketAddr;
use std::time::Duration;

use proclaim_nats::{NatsConfig, NatsPublisher, decode_message};
use proclaim_testkit::nats::{TestStream, nats_url};
use proclaim_testkit::publisher_conformance::{Delivered, PublisherCapabilities, PublisherHarness};

/// A stream of its own and a publisher to it.
struct Nats {
    ts: TestStream,
    config: NatsConfig,
    publisher: NatsPublisher,
}

impl PublisherHarness for Nats {
    type Publisher = NatsPublisher;
    const CAPABILITIES: PublisherCapabilities = PublisherCapabilities {
        broker_dedup: true,
        unroutable: false,
    };

    fn broker() -> SocketAddr {
        let url = nats_url();
        let host_port = url.trim_start_matches("nats://");
        host_port
            .parse()
            .unwrap_or_else(|e| panic!("{url} is not nats://<ip>:<port>: {e}"))
    }

    async fn setup(via: SocketAddr, timeout: Duration) -> Self {
        let ts = TestStream::new().await;
        let config = NatsConfig::default()
            .with_url(format!("nats://{via}"))
            .with_stream(&ts.name)
            .with_subject_prefix(&ts.prefix)
            .with_connect_timeout(timeout)
            .with_ack_timeout(timeout);
        let publisher = NatsPublisher::connect(config.clone()).await.unwrap();
        Nats {
            ts,
            config,
            publisher,
        }
    }

    fn publisher(&self) -> &NatsPublisher {
        &self.publisher
    }

    async fn connect(&self, via: SocketAddr) -> Result<NatsPublisher, String> {
        let config = self.config.clone().with_url(format!("nats://{via}"));
        NatsPublisher::connect(config)
            .await
            .map_err(|e| e.to_string())
    }

    async fn received(&self, n: usize, wait: Duration) -> Vec<Delivered> {
        let n = u64::try_from(n).unwrap();
        let deadline = tokio::time::Instant::now() + wait;
        while self.ts.count().await < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.ts
            .messages()
            .await
            .iter()
            .map(|m| Delivered {
                event: decode_message(m).unwrap(),
                dedup_id: m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Msg-Id"))
                    .map(|v| v.as_str().to_owned()),
            })
            .collect()
    }
}

proclaim_testkit::publisher_conformance!(Nats);
