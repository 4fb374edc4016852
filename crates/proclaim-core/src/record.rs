//! What a store hands the relay: claimed outbox records under a lease.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::Event;

/// One claimed row of the outbox: the event and its delivery bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    /// Position in the outbox. Events with the same subject are published in
    /// ascending sequence order.
    pub sequence: i64,
    /// The event to publish.
    pub event: Event,
    /// Delivery attempts so far, counting the current one.
    pub attempts: u32,
    /// When the row was written.
    pub created_at: DateTime<Utc>,
}

/// A row that was claimed but cannot be turned into an [`Event`] (for example
/// edited by hand into an invalid state). The relay dead-letters it at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedRecord {
    /// Position in the outbox.
    pub sequence: i64,
    /// Why it could not be decoded.
    pub error: String,
}

/// The token that fences one claim: a store only accepts outcomes for rows
/// still held under the token they were claimed with, so a relay whose lease
/// expired cannot ack or dead-letter rows another relay now owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseToken(pub Uuid);

impl LeaseToken {
    /// A fresh, unique token.
    pub fn new() -> Self {
        LeaseToken(Uuid::new_v4())
    }
}

impl Default for LeaseToken {
    fn default() -> Self {
        Self::new()
    }
}

/// What one claim returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimedBatch {
    /// Events to publish, in ascending sequence order.
    pub records: Vec<OutboxRecord>,
    /// Claimed rows that could not be decoded.
    pub malformed: Vec<MalformedRecord>,
}

impl ClaimedBatch {
    /// Number of rows claimed, decodable or not.
    pub fn len(&self) -> usize {
        self.records.len() + self.malformed.len()
    }
    /// True when nothing was claimed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Collects decoded rows into a batch in sequence order (stores' claim
/// statements may return rows in any order).
impl FromIterator<Result<OutboxRecord, MalformedRecord>> for ClaimedBatch {
    fn from_iter<I: IntoIterator<Item = Result<OutboxRecord, MalformedRecord>>>(rows: I) -> Self {
        let mut batch = ClaimedBatch::default();
        for row in rows {
            match row {
                Ok(record) => batch.records.push(record),
                Err(bad) => batch.malformed.push(bad),
            }
        }
        batch.records.sort_by_key(|r| r.sequence);
        batch.malformed.sort_by_key(|m| m.sequence);
        batch
    }
}
