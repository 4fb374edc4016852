//! Kafka publisher for proclaim, the transactional outbox for Rust.
//!
//! [`KafkaPublisher`] implements [`proclaim_core::Publisher`] with
//! librdkafka (through `rdkafka`, built from its bundled sources): each
//! outbox event becomes one record on the topic rendered from
//! [`KafkaConfig::topic_template`] (default `proclaim.events`), keyed by the
//! event's subject, its JSON data as the value byte for byte, and its
//! CloudEvents attributes in binary content mode as record headers, as the
//! CloudEvents Kafka protocol binding names them: `ce_specversion`, `ce_id`,
//! `ce_type`, `ce_source`, `ce_subject`, `ce_time`, `ce_dataschema`, one
//! `ce_<name>` per extension, and `content-type`. [`decode_message`] reads
//! such a record back into an [`Event`](proclaim_core::Event).
//!
//! # Delivery
//!
//! The producer is idempotent (`enable.idempotence=true`, `acks=all`), and
//! [`Publisher::publish`](proclaim_core::Publisher::publish) returns `Ok`
//! only once the delivery report says every in-sync replica has the record,
//! within [`KafkaConfig::ack_timeout`]. Order per subject: the key is the
//! subject, so a subject's events share a partition, and the relay publishes
//! a subject's next event only after the previous one was acknowledged.
//!
//! Kafka's idempotent producer drops only the duplicates of its *own*
//! retries (within one producer session); an event the relay publishes
//! again (after a crash, or a timeout whose record did arrive) is a second
//! record. Consumers deduplicate by the event id, the `ce_id` header
//! ([`dedup_id`]).
//!
//! # Errors
//!
//! A failed publish is classified for the relay:
//!
//! | kind | librdkafka / broker error | what it means |
//! |------|---------------------------|---------------|
//! | transient | `MessageTimedOut`, `RequestTimedOut`, `OperationTimedOut`, no delivery report in time | no acknowledgement within the ack timeout (broker down, partitioned, slow) |
//! | transient | `BrokerTransportFailure`, `AllBrokersDown`, `NetworkException`, `BrokerNotAvailable` | the connection failed |
//! | transient | `LeaderNotAvailable`, `NotLeaderForPartition`, `NotEnoughReplicas`, `NotEnoughReplicasAfterAppend`, `KafkaStorageError` | the cluster cannot take writes now (election, replicas down) |
//! | transient | `QueueFull` | too many events in flight in the producer |
//! | transient | `ProducerFenced`, `InvalidProducerEpoch`, `InvalidProducerIdMapping`, `UnknownProducerId`, `OutOfOrderSequenceNumber` | the broker rejects the producer's idempotence state; the producer is replaced by a new one (new producer id) |
//! | transient | `Fatal` and any other code | the producer is replaced after a fatal error; unknown codes are retried rather than dead-lettered |
//! | permanent | an attribute the topic template uses holds a character Kafka does not allow, or the topic is too long | the event can never be published under this template |
//! | permanent | `MessageSizeTooLarge`, `InvalidMessageSize`, `MessageBatchTooLarge` | larger than `message.max.bytes` or the topic's `max.message.bytes` |
//! | permanent | `UnknownTopic`, `UnknownTopicOrPartition`, `UnknownPartition` | the topic does not exist and the cluster does not create it (after [`KafkaConfig::missing_topic_timeout`]) |
//! | permanent | `InvalidTopic`, `TopicAuthorizationFailed`, `ClusterAuthorizationFailed` | the broker refuses the topic, or this client may not write to it |
//! | permanent | `InvalidRecord`, `InvalidRequiredAcks`, `UnsupportedForMessageFormat`, `PolicyViolation`, `InvalidArgument` | the broker or the client rejects the record |
//!
//! Building a publisher fails with [`KafkaError`]: a setting is invalid or
//! librdkafka rejects an extra property, or ([`KafkaPublisher::connect`]) no
//! broker answered within [`KafkaConfig::connect_timeout`].
//!
//! ```no_run
//! use std::time::Duration;
//! use proclaim_kafka::{KafkaConfig, KafkaPublisher, decode_message, dedup_id};
//! use proclaim_kafka::rdkafka::ClientConfig;
//! use proclaim_kafka::rdkafka::consumer::{Consumer, StreamConsumer};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = KafkaConfig::default()
//!     .with_bootstrap_servers("kafka://kafka-1.internal:9092,kafka-2.internal:9092")
//!     .with_topic_template("campaign.{type}") // DonorSecured → campaign.DonorSecured
//!     .with_ack_timeout(Duration::from_secs(10));
//! let publisher = KafkaPublisher::connect(config).await?;
//! // Hand `publisher` to a `proclaim_core::Relay`. Create the topics first
//! // unless the brokers create them: an event to a missing topic is an error.
//!
//! // A consumer reads events back, deduplicating by the event id:
//! let consumer: StreamConsumer = ClientConfig::new()
//!     .set("bootstrap.servers", "kafka-1.internal:9092")
//!     .set("group.id", "thank-you-notes")
//!     .create()?;
//! consumer.subscribe(&["campaign.DonorSecured"])?;
//! loop {
//!     let message = consumer.recv().await?;
//!     let event = decode_message(&message)?;
//!     tracing::info!(id = ?dedup_id(&message), kind = event.event_type(), "received");
//! }
//! # }
//! ```

mod config;
mod error;
mod message;
mod publisher;
mod topic;

pub use config::KafkaConfig;
pub use error::KafkaError;
pub use message::{
    CONTENT_TYPE_HEADER, DEDUP_HEADER, DecodeError, HEADER_PREFIX, decode_message, dedup_id,
};
pub use publisher::KafkaPublisher;
/// The Kafka client this crate is built on, for consumers' use (the same
/// version reads what [`KafkaPublisher`] writes).
pub use rdkafka;
pub use topic::{InvalidTopic, MAX_TOPIC_LEN, TopicTemplate};
