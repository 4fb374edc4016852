//! [`KafkaError`]: why a publisher could not be built.

use proclaim_core::{BoxError, ConfigError};

/// Why [`KafkaPublisher::connect`](crate::KafkaPublisher::connect) or
/// [`KafkaPublisher::new`](crate::KafkaPublisher::new) failed. Each message
/// is one line naming the bootstrap servers.
///
/// Not to be confused with `rdkafka::error::KafkaError`, the client's own
/// error type, which is this error's source where there is one.
///
/// ```
/// use proclaim_kafka::{KafkaConfig, KafkaError, KafkaPublisher};
///
/// let config = KafkaConfig::default().with_topic_template("events/{type}");
/// let err = KafkaPublisher::new(config).unwrap_err();
/// assert!(matches!(err, KafkaError::Config(_)));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaError {
    /// A setting is invalid, or librdkafka rejected the producer settings
    /// (e.g. an unknown property in
    /// [`KafkaConfig::properties`](crate::KafkaConfig::properties)).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No broker answered within the connect timeout, or every broker
    /// refused the connection.
    #[error("cannot connect to Kafka at {servers}: {reason}")]
    Connect {
        /// The bootstrap servers, as librdkafka takes them.
        servers: String,
        /// What went wrong, e.g. `Connect to ipv4#127.0.0.1:1 failed:
        /// Connection refused`.
        reason: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },
}
