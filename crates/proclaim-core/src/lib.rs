//! Core of proclaim, the transactional outbox for Rust.
//!
//! This crate knows no database and no broker. It defines:
//! - [`Event`], the CloudEvents 1.0 envelope a service writes in its own
//!   transaction;
//! - [`OutboxStore`], what a database store offers the relay (claim by lease,
//!   complete, purge, stats, wake-ups);
//! - [`Publisher`], what a broker offers it (publish with a durable ack);
//! - [`Relay`], the engine that moves every committed event from one to the
//!   other at least once, in per-subject order, with retries and dead letters.
//!
//! Stores and publishers live in their own crates (`proclaim-postgres`,
//! `proclaim-nats`, …); most users depend on the `proclaim` facade.

mod admin;
mod backoff;
pub mod binary;
mod config;
pub mod consumer;
pub mod duration;
mod event;
pub mod fanout;
pub mod inbox;
pub mod local;
pub mod projector;
mod publisher;
mod record;
mod redact;
mod relay;
pub mod request;
mod store;
pub mod store_support;
pub mod template;

pub use admin::{DeadLetterEntry, OutboxAdmin};
pub use backoff::Backoff;
pub use config::{ConfigError, RelayConfig};
pub use duration::parse_duration;
pub use event::{
    CAUSATION_ID, CORRELATION_ID, DEFAULT_SOURCE, Event, EventBuilder, EventError, EventParts,
    JSON_CONTENT_TYPE, SPEC_VERSION, TRACEPARENT,
};
pub use publisher::{PublishError, PublishErrorKind, Publisher};
pub use record::{ClaimedBatch, LeaseToken, MalformedRecord, OutboxRecord};
pub use redact::redact_url;
pub use relay::{Relay, RelayHandle, RelayReport};
pub use store::{
    AckMode, BatchOutcome, BoxError, CompleteReport, DeadLetter, OutboxStats, OutboxStore, Retry,
    StoreError, Wakeups,
};
pub use tokio_util::sync::CancellationToken;
