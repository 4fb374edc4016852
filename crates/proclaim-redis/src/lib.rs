//! Redis Streams publisher for proclaim, the transactional outbox for Rust.
//!
//! [`RedisPublisher`] implements [`proclaim_core::Publisher`]: each outbox
//! event is appended to a Redis stream with `XADD <stream> [MAXLEN ~ n] * …`
//! as a CloudEvent in binary content mode, and the publish succeeds only once
//! Redis has answered with the new entry's id. [`decode_entry`] reads such an
//! entry back into an [`Event`](proclaim_core::Event) and its dedup id.
//!
//! # The entry
//!
//! | field | value |
//! |-------|-------|
//! | `ce-specversion`, `ce-id`, `ce-type`, `ce-source`, `ce-subject`, `ce-time` | the CloudEvents attributes |
//! | `ce-dataschema` | when the event has one |
//! | `ce-<name>` | every extension (`ce-correlationid`, `ce-traceparent`, …) |
//! | `content-type` | the event's `datacontenttype` |
//! | `data` | the JSON data, byte for byte as the event holds it |
//!
//! The stream key comes from [`RedisConfig::stream`], a template that may use
//! the event's `{type}`, `{subject}` and `{source}` (default
//! `proclaim:events`, one stream for everything; see [`StreamTemplate`]).
//!
//! # What "acknowledged" means
//!
//! [`Publisher::publish`](proclaim_core::Publisher::publish) returns `Ok`
//! once `XADD` has returned an entry id: the entry is in the server's memory
//! and visible to readers. Whether it survives a crash of the Redis server
//! then depends on the server's persistence settings — with
//! `appendonly yes` and `appendfsync always` it is on disk; with
//! `appendfsync everysec` up to a second of entries can be lost; with
//! `appendonly no` (as on this project's test machine) everything since the
//! last snapshot is lost on a restart. The publisher does not issue `WAIT`
//! (or `WAITAOF`), so an acknowledged entry may also not have reached any
//! replica yet when the primary fails over. Choose the server's settings
//! for the durability you need; the outbox keeps an event until it is acked,
//! never after.
//!
//! # Duplicates
//!
//! Redis does not deduplicate: an event the relay publishes twice (after a
//! failure between `XADD` and the relay's ack, or after a timed-out `XADD`
//! that was in fact applied) is stored twice. Both copies carry the same
//! `ce-id`, the event id: consumers deduplicate by it (the dedup id
//! [`decode_entry`] returns), e.g. in an inbox table.
//!
//! # Order
//!
//! The relay publishes the events of one subject one at a time, in outbox
//! order, and Redis appends each `XADD` at the end of its stream, so within
//! one stream the events of a subject are in order. Events of one subject
//! that go to different streams (a template with `{type}`, say) are each in
//! order within their stream, but a consumer reading several streams sees no
//! order between them: keep one stream per destination when consumers need
//! the order of a subject's events across types.
//!
//! # Failures
//!
//! Connection problems (refused, reset, timed out) and a server that is
//! loading, busy running a script, out of memory or a read-only replica are
//! transient: the relay retries. An event Redis can never take — its key
//! holds another type (`WRONGTYPE`), it is larger than
//! [`RedisConfig::max_entry_bytes`] — is permanent: the relay dead-letters
//! it. Every call is bounded by [`RedisConfig::connect_timeout`] plus
//! [`RedisConfig::response_timeout`]; the connection is re-established by
//! itself after the server restarts.
//!
//! ```no_run
//! use proclaim_redis::{RedisConfig, RedisPublisher, decode_entry};
//! use redis::streams::StreamRangeReply;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = RedisConfig::default()
//!     .with_url("redis://127.0.0.1:6379")
//!     .with_stream("campaign:events")
//!     .with_max_len(Some(1_000_000)); // MAXLEN ~ 1000000
//! let publisher = RedisPublisher::connect(config).await?;
//! // Hand `publisher` to a `proclaim_core::Relay`.
//!
//! // A consumer reads entries back (here with XRANGE; XREADGROUP works the same):
//! let mut connection = publisher.connection();
//! let reply: StreamRangeReply = redis::cmd("XRANGE")
//!     .arg("campaign:events")
//!     .arg("-")
//!     .arg("+")
//!     .query_async(&mut connection)
//!     .await?;
//! for entry in &reply.ids {
//!     let decoded = decode_entry(entry)?;
//!     // Skip `decoded.dedup_id` if this consumer has already handled it.
//!     tracing::info!(id = %decoded.dedup_id, kind = decoded.event.event_type(), "received");
//! }
//! # Ok(())
//! # }
//! ```

mod config;
mod consumer;
mod decode;
mod error;
mod publisher;
mod stream;

pub use config::RedisConfig;
pub use consumer::{GroupStart, RedisSourceConfig, RedisStreamSource};
pub use decode::{DATA_FIELD, DecodeError, DecodedEntry, decode_entry, decode_fields};
pub use error::RedisError;
pub use publisher::{CE_PREFIX, CONTENT_TYPE_FIELD, RedisPublisher};
pub use stream::StreamTemplate;

/// The `redis` crate this publisher is built on, for
/// [`RedisPublisher::connection`] and [`decode_entry`]'s input.
pub use redis;
