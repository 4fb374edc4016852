//! [`OutboxAdmin`]: what tools (the `proclaim` command, tests, demos) need
//! from a store beyond the relay's [`OutboxStore`](crate::OutboxStore).

use std::future::Future;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{Event, StoreError};

/// A dead-lettered event, as `proclaim status --dead-letters` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetterEntry {
    /// Position in the outbox.
    pub sequence: i64,
    /// Event id.
    pub id: Uuid,
    /// Event type.
    pub event_type: String,
    /// Subject (ordering key).
    pub subject: String,
    /// Attempts made.
    pub attempts: i32,
    /// The last error.
    pub last_error: String,
    /// When it was given up on.
    pub dead_lettered_at: Option<DateTime<Utc>>,
}

/// Schema management, stand-alone writes and dead-letter handling, the same
/// for every store. Application code writes events with the store's own
/// `enqueue(&mut tx, &event)`, inside its business transaction; this trait's
/// [`enqueue_standalone`](OutboxAdmin::enqueue_standalone) is for tools.
pub trait OutboxAdmin: Send + Sync + 'static {
    /// Creates or upgrades the outbox table. Safe to run repeatedly.
    fn migrate(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Checks that the outbox table exists at the current schema version,
    /// with an error that says to run `proclaim migrate` when it does not.
    fn verify_schema(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Writes `events` in a transaction of their own (for tools and tests).
    fn enqueue_standalone(
        &self,
        events: &[Event],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Dead-lettered events, oldest first.
    fn dead_letters(
        &self,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<DeadLetterEntry>, StoreError>> + Send;

    /// Puts dead-lettered events back in line with fresh attempts: the given
    /// ids, or all when `ids` is `None`. Returns how many.
    fn replay_dead_letters(
        &self,
        ids: Option<&[Uuid]>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// A human-readable name of the outbox, e.g. `"proclaim"."outbox"`.
    fn describe(&self) -> String;
}
