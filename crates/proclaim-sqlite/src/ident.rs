//! SQL identifiers: shared with the other stores.

pub(crate) use proclaim_core::store_support::Identifier as Ident;
