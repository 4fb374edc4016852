//! Where the outbox lives and how writers signal the relay.

use proclaim_core::StoreError;

use crate::ident::parse_names;

/// Options of a [`PgOutbox`](crate::PgOutbox).
///
/// ```
/// use proclaim_postgres::PgOutboxOptions;
///
/// let options = PgOutboxOptions::default().with_schema("billing").with_table("outbox");
/// assert!(options.validate().is_ok());
/// assert!(PgOutboxOptions::default().with_table("outbox; drop").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOutboxOptions {
    /// Schema of the outbox table (default `proclaim`).
    pub schema: String,
    /// Name of the outbox table (default `outbox`).
    pub table: String,
    /// Send `NOTIFY` from the writer's transaction so an idle relay wakes at
    /// once (default true). PostgreSQL delivers it only on commit and folds
    /// repeats within one transaction into one.
    pub notify: bool,
    /// Writers sharing this `PgOutbox` (and its clones) send at most one `NOTIFY` per this window
    /// (default 1 ms; 0: every transaction notifies). PostgreSQL serializes the
    /// commits of notifying transactions (a database-wide lock held through
    /// the commit), so under many concurrent writers a window of a
    /// millisecond or two restores commit concurrency; the relay claims again
    /// shortly after every wake-up to pick up the transactions that did not
    /// notify, and its poll interval bounds the rest.
    pub notify_debounce: std::time::Duration,
    /// How far a claim walks in write order: sequence numbers past the
    /// oldest pending event (default 4,096; at least twice the claim's batch
    /// size is used). A claim that comes back short while events wait beyond
    /// the window then takes the head event of each further subject, one per
    /// subject. The window bounds a claim's cost when most subjects have
    /// their oldest event in flight or waiting for a retry (several relays
    /// on a long backlog over few subjects, or one subject stuck on a failing
    /// event in front of the others).
    pub claim_window: u64,
}

impl Default for PgOutboxOptions {
    fn default() -> Self {
        PgOutboxOptions {
            schema: "proclaim".into(),
            table: "outbox".into(),
            notify: true,
            notify_debounce: std::time::Duration::from_millis(1),
            claim_window: 4096,
        }
    }
}

impl PgOutboxOptions {
    /// Sets the schema.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }
    /// Sets the table name.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }
    /// Turns the `NOTIFY` wake-up on or off.
    pub fn with_notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }
    /// Sets [`PgOutboxOptions::notify_debounce`].
    pub fn with_notify_debounce(mut self, window: std::time::Duration) -> Self {
        self.notify_debounce = window;
        self
    }
    /// Sets [`PgOutboxOptions::claim_window`].
    pub fn with_claim_window(mut self, window: u64) -> Self {
        self.claim_window = window;
        self
    }
    /// Checks schema and table names (see the identifier rules on
    /// [`PgOutbox::with_options`](crate::PgOutbox::with_options)).
    pub fn validate(&self) -> Result<(), StoreError> {
        parse_names(&self.schema, &self.table).map(|_| ())
    }
}
