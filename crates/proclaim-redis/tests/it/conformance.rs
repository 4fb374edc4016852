//! The Redis Streams publisher in the publisher conformance suite.

use std::net::SocketAddr;
use std::time::Duration;

use proclaim_redis::{RedisConfig, RedisPublisher};
use proclaim_testkit::publisher_conformance::{Delivered, PublisherCapabilities, PublisherHarness};

use crate::support::{TestKeys, redis_addr};

/// Keys of its own (streams `t:<suffix>:<type>`) and a publisher to them.
struct RedisHarness {
    keys: TestKeys,
    config: RedisConfig,
    publisher: RedisPublisher,
}

impl PublisherHarness for RedisHarness {
    type Publisher = RedisPublisher;
    const CAPABILITIES: PublisherCapabilities = PublisherCapabilities {
        // Redis appends every XADD; consumers deduplicate by `ce-id`.
        broker_dedup: false,
        // Any key is a valid stream name.
        unroutable: false,
    };

    fn broker() -> SocketAddr {
        redis_addr()
    }

    async fn setup(via: SocketAddr, timeout: Duration) -> Self {
        let keys = TestKeys::new();
        let config = RedisConfig::default()
            .with_url(format!("redis://{via}"))
            .with_stream(keys.key("{type}"))
            .with_connect_timeout(timeout)
            .with_response_timeout(timeout);
        let publisher = RedisPublisher::connect(config.clone()).await.unwrap();
        RedisHarness {
            keys,
            config,
            publisher,
        }
    }

    fn publisher(&self) -> &RedisPublisher {
        &self.publisher
    }

    async fn connect(&self, via: SocketAddr) -> Result<RedisPublisher, String> {
        let config = self.config.clone().with_url(format!("redis://{via}"));
        RedisPublisher::connect(config)
            .await
            .map_err(|e| e.to_string())
    }

    async fn received(&self, n: usize, wait: Duration) -> Vec<Delivered> {
        self.keys.delivered(n, wait).await
    }
}

proclaim_testkit::publisher_conformance!(RedisHarness);
