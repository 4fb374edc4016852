//! [`WebhookError`]: why a publisher could not be built.

use proclaim_core::{BoxError, ConfigError};

/// Why [`WebhookPublisher::new`](crate::WebhookPublisher::new) failed. No
/// message contains the secret or the values of extra headers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HTTP client could not be set up (e.g. TLS).
    #[error("cannot set up the HTTP client: {reason}")]
    Client {
        /// What went wrong.
        reason: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
}
