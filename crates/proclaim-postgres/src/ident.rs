//! SQL identifiers and lock keys: shared with the other stores.

use proclaim_core::StoreError;
pub(crate) use proclaim_core::store_support::{Identifier as Ident, fnv1a};

/// PostgreSQL's longest identifier (longer ones are cut silently).
const MAX_PG_IDENT: usize = 63;

/// `<name>_<suffix>`, cut and made unique with a hash when longer than
/// PostgreSQL keeps (it would cut it silently, and two names could meet).
pub(crate) fn with_suffix(name: &Ident, suffix: &str) -> String {
    name.with_suffix(suffix, MAX_PG_IDENT)
}

/// Checks a schema and a table name, in that order (see [`Ident::parse`]).
pub(crate) fn parse_names(schema: &str, table: &str) -> Result<(Ident, Ident), StoreError> {
    Ok((
        Ident::parse("schema", schema)?,
        Ident::parse("table", table)?,
    ))
}
