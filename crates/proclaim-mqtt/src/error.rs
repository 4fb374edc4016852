//! [`MqttError`]: why a publisher or a consumer source could not be built.

use proclaim_core::{BoxError, ConfigError};

/// Why [`MqttPublisher::connect`](crate::MqttPublisher::connect) or
/// [`MqttSource::connect`](crate::MqttSource::connect) failed.
/// Each message is one line naming the broker; URLs have their credentials
/// hidden.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MqttError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker could not be reached within the connect timeout, or
    /// refused the connection (e.g. bad credentials).
    #[error("cannot connect to MQTT broker at {url}: {reason}")]
    Connect {
        /// The broker URL, credentials hidden.
        url: String,
        /// What went wrong, e.g. `connection refused`.
        reason: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },
    /// The broker accepts a lower QoS than configured (its CONNACK's maximum
    /// QoS).
    #[error("MQTT broker at {url} accepts QoS {broker_max} at most, but qos is {configured}")]
    QosNotSupported {
        /// The broker URL, credentials hidden.
        url: String,
        /// The highest QoS the broker accepts.
        broker_max: u8,
        /// The configured QoS.
        configured: u8,
    },
}
