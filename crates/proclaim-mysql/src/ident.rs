//! SQL identifiers (shared with the other stores) and MySQL's 64-character
//! limit on the helper tables' names.

use proclaim_core::StoreError;
pub(crate) use proclaim_core::store_support::{Identifier as Ident, fnv1a};

const MAX_MYSQL_IDENT: usize = 64;

/// `<table>_<suffix>`, the name of one of the outbox's or the inbox's helper
/// tables, cut and made unique with a hash when longer than MySQL allows.
pub(crate) fn with_suffix(table: &Ident, suffix: &str) -> String {
    table.with_suffix(suffix, MAX_MYSQL_IDENT)
}

/// Refuses a `what` ("consumer", "projection") name longer than its key
/// column keeps (`max` characters): MySQL would cut it silently.
pub(crate) fn check_name_len(what: &str, name: &str, max: usize) -> Result<(), StoreError> {
    if name.chars().count() > max {
        return Err(StoreError::Config(format!(
            "{what} name {:?}… is longer than {max} characters",
            name.chars().take(40).collect::<String>()
        )));
    }
    Ok(())
}
