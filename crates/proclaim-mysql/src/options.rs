//! Where the outbox lives.

use proclaim_core::StoreError;

use crate::ident::Ident;

/// Options of a [`MySqlOutbox`](crate::MySqlOutbox). The database (a MySQL
/// "schema") is the one of the connection URL; only the table is chosen here.
///
/// ```
/// use proclaim_mysql::MySqlOutboxOptions;
///
/// let options = MySqlOutboxOptions::default().with_table("billing_outbox");
/// assert!(options.validate().is_ok());
/// assert!(MySqlOutboxOptions::default().with_table("outbox`; drop").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MySqlOutboxOptions {
    /// Name of the outbox table (default `proclaim_outbox`). Migrations also
    /// create `<table>_migrations`, `<table>_claim_lock` and
    /// `<table>_subject_locks` next to it.
    pub table: String,
}

impl Default for MySqlOutboxOptions {
    fn default() -> Self {
        MySqlOutboxOptions {
            table: "proclaim_outbox".into(),
        }
    }
}

impl MySqlOutboxOptions {
    /// Sets the table name.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Checks the table name: 1-63 characters of `a-z`, `0-9` and `_`, not
    /// starting with a digit; anything else is a [`StoreError::Config`].
    pub fn validate(&self) -> Result<(), StoreError> {
        Ident::parse("table", &self.table)?;
        Ok(())
    }
}
