//! SQLite store for proclaim, the transactional outbox: the embedded,
//! zero-set-up default. One file (or memory) holds the business tables and
//! the outbox; no server to run.
//!
//! - [`SqliteOutbox::enqueue`] writes an event in the caller's own
//!   `sqlx::Transaction`, so the event exists if and only if the business
//!   change commits.
//! - The relay claims events by lease in one `BEGIN IMMEDIATE` transaction
//!   (`UPDATE … RETURNING`) — never by an offset cursor — and acks, retries
//!   or dead-letters them with the lease token as a fence.
//! - Events of one subject are delivered in commit order: SQLite has a
//!   single writer at a time, so sequence numbers follow commit order, and a
//!   claim never takes an event while an earlier one of its subject is
//!   leased or waiting for a retry.
//! - SQLite has no `NOTIFY`: a commit hook on the writer's connection wakes
//!   relays in the same process when a transaction that enqueued commits.
//!   Relays in other processes poll.
//!
//! Times are stored as integer microseconds since the Unix epoch, all read
//! from the application's clock — an embedded database has no clock of its
//! own, and every process sharing the file runs on the same machine — so
//! leases and retry times compare consistently.
//!
//! On the consuming side, [`SqliteInbox`] records the events each consumer
//! has handled in the handler's own transaction (an exactly-once effect) and
//! keeps the events consumers park.
//!
//! ```no_run
//! use proclaim_core::{Event, OutboxStore, LeaseToken};
//! use proclaim_sqlite::SqliteOutbox;
//! use std::time::Duration;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let outbox = SqliteOutbox::connect("sqlite://outbox.db?mode=rwc").await?;
//! outbox.migrate().await?;
//!
//! let mut tx = outbox.pool().begin().await?;
//! let event = Event::builder("DonorSecured").subject("donor-42").build()?;
//! outbox.enqueue(&mut tx, &event).await?;
//! tx.commit().await?;
//!
//! let batch = outbox.claim(LeaseToken::new(), 100, Duration::from_secs(30)).await?;
//! assert_eq!(batch.records[0].event.id(), event.id());
//! # Ok(()) }
//! ```

mod checkpoint;
mod error;
mod ident;
mod inbox;
mod migrate;
mod options;
mod outbox;
mod sql;
mod wake;

pub use checkpoint::{
    DEFAULT_CHECKPOINT_TABLE, SqliteCheckpointOptions, SqliteCheckpointTx, SqliteCheckpoints,
    projection_error,
};
pub use inbox::{DEFAULT_INBOX_TABLE, SqliteInbox, SqliteInboxOptions, SqliteInboxTx};
pub use options::{DEFAULT_TABLE, SqliteOutboxOptions};
pub use outbox::{SCHEMA_VERSION, SqliteOutbox};
pub use proclaim_core::DeadLetterEntry;
