//! NATS JetStream publisher for proclaim, the transactional outbox for Rust.
//!
//! [`NatsPublisher`] implements [`proclaim_core::Publisher`]: each outbox
//! event is published to a JetStream stream as a CloudEvent in binary content
//! mode (`ce-*` headers, the JSON data as the body), with the event id as
//! `Nats-Msg-Id` so that JetStream drops redeliveries within its duplicate
//! window, and the publish succeeds only once JetStream has acknowledged it.
//! [`decode_message`] reads such a message back into an [`Event`](proclaim_core::Event).
//!
//! ```no_run
//! use proclaim_nats::{NatsConfig, NatsPublisher, decode_message};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = NatsConfig::default()
//!     .with_url("nats://127.0.0.1:4222")
//!     .with_stream("CAMPAIGN")
//!     .with_subject_prefix("campaign") // events go to campaign.<type>
//!     .with_create_stream(true);
//! let publisher = NatsPublisher::connect(config).await?;
//! // Hand `publisher` to a `proclaim_core::Relay`.
//!
//! // A consumer reads events back:
//! use futures::StreamExt;
//! let mut messages = publisher.client().subscribe("campaign.>").await?;
//! while let Some(message) = messages.next().await {
//!     let event = decode_message(&message)?;
//!     tracing::info!(id = %event.id(), kind = event.event_type(), "received");
//! }
//! # Ok(())
//! # }
//! ```

mod config;
pub mod consumer;
mod decode;
mod error;
mod headers;
mod publisher;
pub mod replay;
pub mod request;
mod subject;

pub use config::NatsConfig;
pub use consumer::{JetStreamSource, JetStreamSourceConfig, JetStreamSourceError};
pub use decode::{DecodeError, decode_message};
pub use error::NatsError;
pub use publisher::NatsPublisher;
pub use replay::{JetStreamReplay, JetStreamReplayConfig};
pub use request::{DEFAULT_REQUEST_PREFIX, NatsRequests};
pub use subject::{InvalidSubject, SubjectTemplate};
