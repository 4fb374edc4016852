//! RabbitMQ (AMQP 0-9-1) publisher for proclaim, the transactional outbox
//! for Rust.
//!
//! [`RabbitPublisher`] implements [`proclaim_core::Publisher`]: each outbox
//! event is published to an exchange as a CloudEvent in binary content mode
//! (`cloudEvents:*` headers, the content type in the `content_type`
//! property, the JSON data as the body), persistent, `mandatory`, with the
//! event id as `message_id` for consumers to deduplicate by. A publish
//! succeeds only once the broker has confirmed the message (publisher
//! confirms); a message no queue is bound to receive is an error.
//! [`decode_delivery`] reads such a message back into an
//! [`Event`](proclaim_core::Event).
//!
//! ```no_run
//! use futures::StreamExt;
//! use lapin::options::{BasicAckOptions, BasicConsumeOptions};
//! use lapin::types::FieldTable;
//! use proclaim_rabbitmq::{RabbitConfig, RabbitPublisher, decode_delivery};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = RabbitConfig::default()
//!     .with_url("amqp://guest:guest@127.0.0.1:5672/%2f")
//!     .with_exchange("campaign")
//!     .with_declare_exchange(true)
//!     .with_routing_key_template("{type}"); // DonorSecured → routing key DonorSecured
//! let publisher = RabbitPublisher::connect(config).await?;
//! // Hand `publisher` to a `proclaim_core::Relay`. Bind a queue to the
//! // exchange first: an event no queue receives is an error, not lost.
//!
//! // A consumer reads events back, deduplicating by the message id:
//! let connection = lapin::Connection::connect(
//!     "amqp://guest:guest@127.0.0.1:5672/%2f",
//!     lapin::ConnectionProperties::default(),
//! )
//! .await?;
//! let channel = connection.create_channel().await?;
//! let mut deliveries = channel
//!     .basic_consume(
//!         "thank-you".into(),
//!         "volunteers".into(),
//!         BasicConsumeOptions::default(),
//!         FieldTable::default(),
//!     )
//!     .await?;
//! while let Some(delivery) = deliveries.next().await {
//!     let delivery = delivery?;
//!     let event = decode_delivery(&delivery)?;
//!     tracing::info!(id = %event.id(), kind = event.event_type(), "received");
//!     delivery.ack(BasicAckOptions::default()).await?;
//! }
//! # Ok(())
//! # }
//! ```

mod config;
mod connection;
mod consumer;
mod error;
mod message;
mod publisher;
mod routing;

pub use config::RabbitConfig;
pub use consumer::{RabbitQueueSource, RabbitSourceConfig};
pub use error::RabbitError;
/// The AMQP client this crate is built on, for consumers' use.
pub use lapin;
pub use message::{DecodeError, HEADER_PREFIX, decode_delivery, decode_message};
pub use publisher::RabbitPublisher;
pub use routing::{InvalidRoutingKey, MAX_ROUTING_KEY_LEN, RoutingKeyTemplate};
