//! MQTT publisher for proclaim, the transactional outbox for Rust.
//!
//! [`MqttPublisher`] implements [`proclaim_core::Publisher`] over MQTT 5
//! (tested against Mosquitto): each outbox event is published with QoS 1 or
//! 2 to a topic rendered from the event ([`TopicTemplate`], default
//! `proclaim/{type}`), and [`Publisher::publish`](proclaim_core::Publisher::publish)
//! returns `Ok` only once the broker has acknowledged it (PUBACK for QoS 1,
//! PUBCOMP for QoS 2).
//!
//! Events travel as CloudEvents, in one of two content modes
//! ([`ContentMode`]):
//!
//! - **binary** (the default): the attributes as MQTT 5 user properties
//!   without prefix (`specversion`, `id`, `type`, `source`, `subject`, `time`,
//!   `dataschema`, extensions), `datacontenttype` as the content type
//!   property, and the JSON data, byte for byte, as the payload;
//! - **structured**: the whole event as a CloudEvents JSON document
//!   (content type `application/cloudevents+json; charset=utf-8`), which
//!   MQTT 3.1.1 subscribers can read, as they never see user properties.
//!
//! MQTT has no broker-side deduplication: a redelivered event arrives twice,
//! and the event id (the `id` user property, or `id` in the JSON) is what
//! consumers deduplicate by. [`decode_publish`] reads a received message back
//! into an [`Event`](proclaim_core::Event), and [`dedup_id`] gives its id.
//!
//! # Delivery
//!
//! rumqttc 0.25 reports acknowledgements only as packet ids on its event
//! loop, so a background task drives that loop and matches each PUBACK or
//! PUBCOMP to its publish (rumqttc takes requests in order, so the n-th
//! packet id it assigns belongs to the n-th submitted publish). Sessions are
//! clean: when the connection drops, every publish not yet acknowledged
//! fails at once with a transient error (the relay retries it, which may
//! duplicate a message the broker did receive), and the task reconnects with
//! backoff. Every step is bounded: [`MqttConfig::connect_timeout`] for a
//! connection, [`MqttConfig::ack_timeout`] for an acknowledgement (after
//! which the connection is replaced), and [`MqttConfig::keep_alive`] detects
//! a silent broker while idle. QoS 2 gives exactly-once between client and
//! broker within one connection only; across a reconnection it is
//! at-least-once like QoS 1.
//!
//! Plain TCP only (`mqtt://`): the crate is built without a TLS backend.
//!
//! # Consuming
//!
//! [`MqttSource`] is the [`Source`](proclaim_core::consumer::Source) of
//! proclaim's consumer runtime for these events: one MQTT 5 shared
//! subscription (`$share/<group>/<filter>`) per consumer group, a persistent
//! session per instance, and manual acks sent only after the handler
//! committed; see its docs for the delivery, order and broker caveats.
//!
//! ```no_run
//! use proclaim_mqtt::{ContentMode, MqttConfig, MqttPublisher, decode_publish};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = MqttConfig::default()
//!     .with_url("mqtt://relay:s3cret@mqtt.internal:1883")
//!     .with_topic_template("campaign/{type}/{subject}")
//!     .with_qos(1)
//!     .with_mode(ContentMode::Binary);
//! let publisher = MqttPublisher::connect(config).await?;
//! // Hand `publisher` to a `proclaim_core::Relay`.
//!
//! // A consumer (any MQTT 5 client) reads events back:
//! use proclaim_mqtt::rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};
//! use proclaim_mqtt::rumqttc::v5::mqttbytes::QoS;
//! let (client, mut eventloop) = AsyncClient::new(MqttOptions::new("consumer", "mqtt.internal", 1883), 10);
//! client.subscribe("campaign/#", QoS::AtLeastOnce).await?;
//! loop {
//!     if let Event::Incoming(Incoming::Publish(message)) = eventloop.poll().await? {
//!         let event = decode_publish(&message)?;
//!         tracing::info!(id = %event.id(), kind = event.event_type(), "received");
//!     }
//! }
//! # }
//! ```

mod config;
mod connection;
mod consumer;
mod decode;
mod encode;
mod error;
mod publisher;
mod topic;
mod url;

pub use config::{ContentMode, MqttConfig};
pub use consumer::{MqttSource, MqttSourceConfig};
pub use decode::{DecodeError, decode_publish, dedup_id};
pub use error::MqttError;
pub use publisher::MqttPublisher;
pub use topic::{InvalidTopic, TopicTemplate};

/// The MQTT client crate this publisher is built on, for consumers that want
/// the same version (`rumqttc::v5` reads what [`MqttPublisher`] writes).
pub use rumqttc;
