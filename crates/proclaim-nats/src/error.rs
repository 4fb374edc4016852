//! [`NatsError`]: why a publisher could not be built.

use proclaim_core::{BoxError, ConfigError};

/// Why [`NatsPublisher::connect`](crate::NatsPublisher::connect) or
/// [`NatsPublisher::from_client`](crate::NatsPublisher::from_client) failed.
/// Each message is one line naming the server or the stream; URLs have their
/// credentials hidden.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The server could not be reached within the connect timeout, or refused
    /// the connection (e.g. bad credentials).
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect {
        /// The server URL, credentials hidden.
        url: String,
        /// What went wrong, e.g. `connection refused`.
        reason: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },
    /// The server has no JetStream (not enabled, or not for this account).
    #[error("JetStream is not available at {url}: {reason}")]
    JetStreamUnavailable {
        /// The server URL, credentials hidden.
        url: String,
        /// What went wrong.
        reason: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },
    /// The stream does not exist and `create_stream` is off.
    #[error("JetStream stream {stream} does not exist (create it, or set create_stream)")]
    StreamMissing {
        /// The stream's name.
        stream: String,
    },
    /// The stream could not be looked up or created.
    #[error("cannot {action} JetStream stream {stream}: {reason}")]
    Stream {
        /// The stream's name.
        stream: String,
        /// `look up` or `create`.
        action: &'static str,
        /// What went wrong.
        reason: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },
}
