//! SQL identifiers and lock keys: shared with the other stores.

pub(crate) use proclaim_core::store_support::{Identifier as Ident, fnv1a};
