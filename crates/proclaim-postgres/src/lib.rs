//! PostgreSQL store for proclaim, the transactional outbox.
//!
//! - [`PgOutbox::enqueue`] writes an event in the caller's own
//!   `sqlx::Transaction`, so the event exists if and only if the business
//!   change commits (no event can be written outside a transaction).
//! - The relay claims events by lease with `FOR UPDATE SKIP LOCKED` — never
//!   by an offset cursor, so a transaction that commits late is not skipped —
//!   and acks, retries or dead-letters them with the lease token as a fence.
//! - Writers send `NOTIFY` in their transaction, so an idle relay wakes within
//!   milliseconds of a commit; polling remains the fallback.
//! - Events of one subject are delivered in commit order, also with several
//!   relays: writers of a subject are serialized by an advisory lock, and a
//!   claim never takes an event while an earlier one of its subject is leased
//!   or waiting for a retry.
//! - A claim's cost does not grow with the dead rows a drain leaves behind
//!   when vacuum does not run: claims start at a *claim floor*, below which
//!   nothing is or can become pending ([`PgOutbox::claim_floor`]; the
//!   argument is in the `floor` module's source). Rows written into the
//!   table by hand must take [`PgOutbox::lock_subject`] first.
//!
//! Schema and table are configurable ([`PgOutboxOptions`]) and validated as
//! plain SQL identifiers.
//!
//! On the consuming side, [`PgInbox`] records the events each consumer has
//! handled in the handler's own transaction (an exactly-once effect) and
//! keeps the events consumers park.

mod checkpoint;
mod error;
mod floor;
mod ident;
mod inbox;
mod migrate;
mod options;
mod outbox;
mod sql;

pub use checkpoint::{PgCheckpointOptions, PgCheckpointTx, PgCheckpoints, projection_error};
pub use inbox::{PgInbox, PgInboxOptions, PgInboxTx};
pub use options::PgOutboxOptions;
pub use outbox::{PgOutbox, SCHEMA_VERSION};
pub use proclaim_core::DeadLetterEntry;
