//! [`RedisError`]: why a publisher could not be built.

use proclaim_core::{BoxError, ConfigError};

/// Why [`RedisPublisher::connect`](crate::RedisPublisher::connect) failed.
/// Each message is one line naming the server; URLs have their credentials
/// hidden, and no message contains a password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The server could not be reached within the connect timeout, refused
    /// the connection, or did not answer a `PING` within the response
    /// timeout.
    #[error("cannot connect to Redis at {url}: {reason}")]
    Connect {
        /// The server URL, credentials hidden.
        url: String,
        /// What went wrong, e.g. `connection refused`.
        reason: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },
    /// The server refused the user name or password of the URL (`WRONGPASS`,
    /// or a password given to a server that has none), or requires one that
    /// the URL lacks (`NOAUTH`).
    #[error("cannot connect to Redis at {url}: {reason}")]
    Auth {
        /// The server URL, credentials hidden.
        url: String,
        /// What the server said, without any credential.
        reason: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },
}
