//! [`RabbitError`]: why a publisher could not be built.

use proclaim_core::{BoxError, ConfigError};

/// Why [`RabbitPublisher::connect`](crate::RabbitPublisher::connect) or
/// [`RabbitPublisher::new`](crate::RabbitPublisher::new) failed. Each message
/// is one line naming the broker or the exchange; URLs have their password
/// hidden.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RabbitError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker could not be reached within the connect timeout, or refused
    /// the connection (e.g. bad credentials, unknown virtual host).
    #[error("cannot connect to RabbitMQ at {url}: {reason}")]
    Connect {
        /// The broker URL, password hidden.
        url: String,
        /// What went wrong, e.g. `connection refused`.
        reason: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },
    /// The exchange does not exist and `declare_exchange` is off.
    #[error(
        "RabbitMQ exchange {exchange:?} does not exist at {url} (declare it, or set declare_exchange)"
    )]
    ExchangeMissing {
        /// The exchange's name.
        exchange: String,
        /// The broker URL, password hidden.
        url: String,
    },
    /// The exchange could not be checked or declared (e.g. it exists with
    /// another type, or the user may not configure it).
    #[error("cannot {action} RabbitMQ exchange {exchange:?}: {reason}")]
    Exchange {
        /// The exchange's name.
        exchange: String,
        /// `check` or `declare`.
        action: &'static str,
        /// What went wrong, as the broker said it.
        reason: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },
}
