//! The consuming side's store: the [`Inbox`] that turns at-least-once
//! delivery into an exactly-once *effect*, and the [`ParkedEvents`] where a
//! consumer parks what it cannot handle.
//!
//! A consumer handles an event inside a database transaction that also
//! records the pair (consumer, event id) in the inbox table. The pair is the
//! table's primary key, so a redelivered duplicate finds it and is skipped:
//! [`Inbox::begin`] returns `None`, and the consumer acks the message
//! without running the handler. A handler that fails, or a process that dies
//! mid-transaction, rolls the pair back with the handler's work, so the
//! redelivery runs the handler again. Two deliveries of the same event at the
//! same moment serialize on the key: the second waits for the first's
//! transaction and then sees a duplicate (or, if the first rolled back,
//! takes over).
//!
//! ```ignore
//! // With a store's inbox (e.g. `proclaim_postgres::PgInbox`):
//! match inbox.begin("volunteer-thank-you", &event).await? {
//!     None => {} // handled before: nothing to do
//!     Some(mut tx) => {
//!         sqlx::query("INSERT INTO thank_you_notes (donor) VALUES ($1)")
//!             .bind(donor_id)
//!             .execute(&mut *tx)
//!             .await?;
//!         tx.commit().await?; // the note and the inbox row, together
//!     }
//! }
//! // …then ack the broker's message.
//! ```

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{Event, StoreError};

/// Records which events each consumer has handled, in the consumer's own
/// database transaction. Implemented by each store for a table of its own.
pub trait Inbox: Send + Sync + 'static {
    /// The open transaction of one handling: the handler's work goes
    /// through it (each store's type gives access to its database
    /// connection), then [`InboxTx::commit`]. Dropping it rolls back.
    type Tx: InboxTx;

    /// Begins handling `event` for `consumer`: opens a transaction and
    /// records the pair in it. `Ok(None)` when the pair is already recorded
    /// (a duplicate: the effect has happened, skip it). Waits while another
    /// transaction holds the same pair.
    fn begin(
        &self,
        consumer: &str,
        event: &Event,
    ) -> impl Future<Output = Result<Option<Self::Tx>, StoreError>> + Send;

    /// Whether `consumer` has handled `event_id` (a committed pair).
    fn contains(
        &self,
        consumer: &str,
        event_id: Uuid,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes the pairs recorded more than `older_than` ago; returns how
    /// many. A duplicate that arrives after its pair was purged is handled
    /// again, so keep pairs longer than the broker can redeliver (its
    /// retention, the relay's lease and retries).
    fn purge(&self, older_than: Duration) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// The transaction of one handling ([`Inbox::begin`]).
pub trait InboxTx: Send + 'static {
    /// Commits the handler's work and the inbox pair together.
    fn commit(self) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Rolls both back (dropping the transaction does too).
    fn rollback(self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// An event a consumer gave up on: its handler kept failing, or the message
/// could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct ParkedEvent {
    /// The store's id of this entry (0 before it is stored).
    pub id: i64,
    /// The consumer that parked it.
    pub consumer: String,
    /// The event, when the message decoded.
    pub event: Option<Event>,
    /// The message's bytes, when it did not decode (otherwise empty).
    pub raw: Vec<u8>,
    /// Why: the handler's last error, or the decode error.
    pub reason: String,
    /// How many times the handler ran (0 for a message that did not decode).
    pub attempts: u32,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
}

/// Where consumers park events (the consumer-side dead letters), listed by
/// `proclaim status` and replayable. Implemented by each store next to its
/// inbox.
pub trait ParkedEvents: Send + Sync + 'static {
    /// Stores a parked event (its `id` is ignored; the store assigns one).
    /// Idempotent per parking: storing the same value again (a retry whose
    /// first insert committed) stores nothing more; the same event with
    /// another `parked_at` is another parking
    /// ([`park_key`](crate::store_support::park_key)).
    fn park(&self, parked: &ParkedEvent) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Up to `limit` parked events, oldest first, of `consumer` (or of
    /// every consumer).
    fn parked(
        &self,
        consumer: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<ParkedEvent>, StoreError>> + Send;

    /// Removes the parked events with these ids and returns them (to replay
    /// them). Ids that are not there are ignored.
    fn take(
        &self,
        ids: &[i64],
    ) -> impl Future<Output = Result<Vec<ParkedEvent>, StoreError>> + Send;
}

impl<P: ParkedEvents> ParkedEvents for std::sync::Arc<P> {
    fn park(&self, parked: &ParkedEvent) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).park(parked)
    }

    fn parked(
        &self,
        consumer: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<ParkedEvent>, StoreError>> + Send {
        (**self).parked(consumer, limit)
    }

    fn take(
        &self,
        ids: &[i64],
    ) -> impl Future<Output = Result<Vec<ParkedEvent>, StoreError>> + Send {
        (**self).take(ids)
    }
}

/// Purges an [`Inbox`] on a schedule: every `interval`, the pairs recorded
/// more than `retention` ago are deleted ([`Inbox::purge`]). Run one per
/// inbox table, next to the consumers (several instances may run at once:
/// each purge is one `DELETE`).
///
/// A failed purge is logged and counted
/// (`proclaim_inbox_purge_failures_total`) and tried again at the next
/// tick; purged pairs are counted in `proclaim_inbox_purged_total`.
///
/// ```no_run
/// use std::time::Duration;
/// use proclaim_core::CancellationToken;
/// use proclaim_core::inbox::{Inbox, InboxPurger};
///
/// # async fn demo(inbox: impl Inbox) -> Result<(), proclaim_core::ConfigError> {
/// let shutdown = CancellationToken::new();
/// // Keep pairs 7 days: longer than the broker keeps and redelivers messages.
/// let purger = InboxPurger::new(inbox, Duration::from_secs(7 * 24 * 3600))
///     .every(Duration::from_secs(600));
/// purger.validate()?;
/// let task = tokio::spawn(purger.run(shutdown.clone()));
/// // … on SIGTERM:
/// shutdown.cancel();
/// let purged = task.await.unwrap_or_default();
/// # let _ = purged;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct InboxPurger<I> {
    inbox: I,
    retention: Duration,
    interval: Duration,
}

impl<I: Inbox> InboxPurger<I> {
    /// A purger keeping pairs for `retention`, purging every 10 minutes.
    pub fn new(inbox: I, retention: Duration) -> Self {
        InboxPurger {
            inbox,
            retention,
            interval: Duration::from_secs(600),
        }
    }

    /// How often to purge (default 10 minutes).
    pub fn every(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Checks the settings: both durations above zero.
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        if self.retention.is_zero() {
            return Err(crate::ConfigError(
                "inbox retention must be above zero: a pair purged at once lets every redelivery through".into(),
            ));
        }
        if self.interval.is_zero() {
            return Err(crate::ConfigError(
                "inbox purge interval must be above zero".into(),
            ));
        }
        Ok(())
    }

    /// Purges at once, then every interval, until `shutdown` is cancelled;
    /// returns how many pairs it purged in all. Invalid settings
    /// ([`validate`](Self::validate)) are logged and nothing is purged.
    pub async fn run(self, shutdown: crate::CancellationToken) -> u64 {
        if let Err(e) = self.validate() {
            tracing::error!(error = %e, "inbox purger not started");
            return 0;
        }
        let mut total = 0;
        loop {
            match self.inbox.purge(self.retention).await {
                Ok(purged) => {
                    total += purged;
                    metrics::counter!("proclaim_inbox_purged_total").increment(purged);
                    if purged > 0 {
                        tracing::info!(purged, retention = ?self.retention, "purged old inbox pairs");
                    }
                }
                Err(e) => {
                    metrics::counter!("proclaim_inbox_purge_failures_total").increment(1);
                    tracing::warn!(error = %e, "inbox purge failed; trying again at the next tick");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return total,
                () = tokio::time::sleep(self.interval) => {}
            }
        }
    }
}
