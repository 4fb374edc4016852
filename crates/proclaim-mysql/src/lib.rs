//! MySQL and MariaDB store for proclaim, the transactional outbox.
//!
//! - [`MySqlOutbox::enqueue`] writes an event in the caller's own
//!   `sqlx::Transaction`, so the event exists if and only if the business
//!   change commits.
//! - The relay claims events by lease with `FOR UPDATE SKIP LOCKED` — never
//!   by an offset cursor, so a transaction that commits late is not skipped —
//!   and acks, retries or dead-letters them with the lease token as a fence.
//! - Events of one subject are delivered in commit order, also with several
//!   relays: writers of a subject are serialized by a row lock held to the
//!   end of their transaction, and a claim never takes an event while an
//!   earlier one of its subject is leased or waiting for a retry.
//! - MySQL has no `LISTEN`/`NOTIFY`: the relay finds new events by polling
//!   (its `poll_interval`).
//!
//! Needs MySQL 8.0+ or MariaDB 10.6+ (InnoDB, `SKIP LOCKED`). The outbox
//! table lives in the database of the connection URL; its name is
//! configurable ([`MySqlOutboxOptions`]) and validated as a plain identifier.
//!
//! On the consuming side, [`MySqlInbox`] records the events each consumer
//! has handled in the handler's own transaction (an exactly-once effect) and
//! keeps the events consumers park.
//!
//! ```no_run
//! use proclaim_core::{Event, OutboxStore};
//! use proclaim_mysql::{MySqlOutbox, MySqlOutboxOptions};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = sqlx::MySqlPool::connect("mysql://app@127.0.0.1:3306/campaign").await?;
//! let outbox = MySqlOutbox::with_options(
//!     pool.clone(),
//!     MySqlOutboxOptions::default().with_table("donor_outbox"),
//! )?;
//! outbox.migrate().await?;
//!
//! let mut tx = pool.begin().await?;
//! let event = Event::builder("DonorSecured")
//!     .subject("donor-42")
//!     .data(&serde_json::json!({ "donor_id": 42 }))
//!     .build()?;
//! outbox.enqueue(&mut tx, &event).await?;
//! tx.commit().await?;
//!
//! println!("{} events pending", outbox.stats().await?.pending);
//! # Ok(()) }
//! ```

mod checkpoint;
mod error;
mod ident;
mod inbox;
mod migrate_lock;
mod options;
mod outbox;
mod sql;

pub use checkpoint::{
    MySqlCheckpointOptions, MySqlCheckpointTx, MySqlCheckpoints, projection_error,
};
pub use inbox::{MAX_CONSUMER_LEN, MySqlInbox, MySqlInboxOptions, MySqlInboxTx};
pub use options::MySqlOutboxOptions;
pub use outbox::{MAX_CLAIM, MySqlOutbox, SCHEMA_VERSION, SUBJECT_LOCK_SLOTS};
pub use proclaim_core::DeadLetterEntry;
