//! SQL identifiers (shared with the other stores) and MySQL's 64-character
//! limit on the helper tables' names.

pub(crate) use proclaim_core::store_support::{Identifier as Ident, fnv1a};

const MAX_MYSQL_IDENT: usize = 64;

/// Names of the outbox's helper tables (`<table>_<suffix>`).
pub(crate) trait WithSuffix {
    /// `<name>_<suffix>`, cut and made unique with a hash when longer than
    /// MySQL allows.
    fn with_suffix(&self, suffix: &str) -> String;
}

impl WithSuffix for Ident {
    fn with_suffix(&self, suffix: &str) -> String {
        let name = self.as_str();
        let full = format!("{name}_{suffix}");
        if full.len() <= MAX_MYSQL_IDENT {
            return full;
        }
        let hash = format!("{:08x}", fnv1a(&[name]) as u32);
        let keep = MAX_MYSQL_IDENT - hash.len() - suffix.len() - 2;
        format!("{}_{hash}_{suffix}", &name[..keep])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_table_names_fit_and_stay_distinct() {
        let short = Ident::known("outbox");
        assert_eq!(short.with_suffix("migrations"), "outbox_migrations");
        let long_a = Ident::known(&"a".repeat(63));
        let long_b = Ident::known(&format!("{}b", "a".repeat(62)));
        for suffix in ["migrations", "claim_lock", "subject_locks"] {
            let (a, b) = (long_a.with_suffix(suffix), long_b.with_suffix(suffix));
            assert!(a.len() <= 64 && b.len() <= 64, "{a} / {b}");
            assert!(a.ends_with(suffix));
            assert_ne!(a, b);
        }
    }
}
