//! HTTP webhook publisher for proclaim, the transactional outbox for Rust.
//!
//! [`WebhookPublisher`] implements [`proclaim_core::Publisher`]: each outbox
//! event is `POST`ed to an HTTP endpoint as a CloudEvent (binary content mode
//! by default: `ce-*` headers and the JSON data as the body; or structured
//! mode: `application/cloudevents+json`), signed with the
//! [Standard Webhooks](https://www.standardwebhooks.com/) scheme
//! (`webhook-id`, `webhook-timestamp`, `webhook-signature`). A publish
//! succeeds only on a `2xx` answer. `408`, `429`, `5xx`, connection failures
//! and timeouts are transient (with the server's `Retry-After` passed on to
//! the relay); any other answer is permanent, so the relay dead-letters the
//! event at once.
//!
//! Receivers check a request and read the event back with
//! [`verify_and_decode`] (or [`Verifier`] for other settings), or with
//! [`decode_request`] when the webhook is not signed.
//!
//! ```no_run
//! use std::time::Duration;
//! use proclaim_webhook::{ContentMode, WebhookConfig, WebhookPublisher, WebhookSecret};
//!
//! # fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let secret = WebhookSecret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")?;
//! let config = WebhookConfig::new("https://hooks.example.com/proclaim/{type}")
//!     .with_secret(secret.clone())
//!     .with_mode(ContentMode::Binary)
//!     .with_header("Authorization", "Bearer 0123456789")
//!     .with_timeout(Duration::from_secs(5));
//! let publisher = WebhookPublisher::new(config)?;
//! // Hand `publisher` to a `proclaim_core::Relay`.
//!
//! // The receiving service, given the request's headers and body bytes:
//! # let (headers, body) = (http::HeaderMap::new(), Vec::<u8>::new());
//! let event = proclaim_webhook::verify_and_decode(&secret, &headers, &body)?;
//! tracing::info!(id = %event.id(), kind = event.event_type(), "received");
//! # Ok(())
//! # }
//! ```
//!
//! Security note: the Standard Webhooks signature covers the `webhook-id`,
//! the timestamp and the body. In binary mode the CloudEvents attributes
//! other than the id travel in `ce-*` headers that the signature does not
//! cover; use [`ContentMode::Structured`] when every attribute must be
//! authenticated.

mod config;
mod decode;
mod error;
mod headers;
mod publisher;
mod signature;
mod template;

pub use config::{ContentMode, WebhookConfig, WebhookSecret};
pub use decode::{DecodeError, decode_request};
pub use error::WebhookError;
pub use publisher::WebhookPublisher;
pub use signature::{DEFAULT_TOLERANCE, Verifier, VerifyError, verify_and_decode};
pub use template::{InvalidUrlValue, UrlTemplate};

/// Header carrying the message id (the event id), signed.
pub const WEBHOOK_ID: &str = "webhook-id";
/// Header carrying the send time in Unix seconds, signed.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// Header carrying the signatures: `v1,<base64 HMAC-SHA256>`, space separated.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";
/// Content type of a request in CloudEvents structured content mode.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";
