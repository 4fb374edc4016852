//! Which table holds the outbox and whether writers wake the relay.

use proclaim_core::StoreError;

use crate::ident::Ident;

/// The default outbox table.
pub const DEFAULT_TABLE: &str = "proclaim_outbox";

/// Options of a [`SqliteOutbox`](crate::SqliteOutbox).
///
/// SQLite has no schemas: the table lives in the database the pool opens.
///
/// ```
/// use proclaim_sqlite::SqliteOutboxOptions;
///
/// let options = SqliteOutboxOptions::default().with_table("billing_outbox");
/// assert!(options.validate().is_ok());
/// assert!(SqliteOutboxOptions::default().with_table("outbox; drop").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOutboxOptions {
    /// Name of the outbox table (default `proclaim_outbox`). Its migration
    /// bookkeeping lives in `<table>_migrations`.
    pub table: String,
    /// Wake relays in this process when a transaction that enqueued commits
    /// (default true). See [`SqliteOutbox`](crate::SqliteOutbox) for how.
    pub notify: bool,
}

impl Default for SqliteOutboxOptions {
    fn default() -> Self {
        SqliteOutboxOptions {
            table: DEFAULT_TABLE.into(),
            notify: true,
        }
    }
}

impl SqliteOutboxOptions {
    /// Sets the table name.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }
    /// Turns the in-process wake-up on or off.
    pub fn with_notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }
    /// Checks the table name: 1-63 characters of `a-z`, `0-9` and `_`, not
    /// starting with a digit; anything else is a [`StoreError::Config`].
    pub fn validate(&self) -> Result<(), StoreError> {
        Ident::parse("table", &self.table).map(|_| ())
    }
}
