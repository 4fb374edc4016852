//! SQL identifiers that are safe to splice into statements.

use proclaim_core::StoreError;

/// MySQL's limit on the length of a table name.
const MAX_MYSQL_IDENT: usize = 64;

/// A checked table name: 1-63 characters of `a-z`, `0-9` and `_`, not
/// starting with a digit. Anything else (quotes, backticks, dots, spaces,
/// upper case) is rejected, so a name can never inject SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ident(String);

impl Ident {
    pub(crate) fn parse(what: &str, name: &str) -> Result<Self, StoreError> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && !name.as_bytes()[0].is_ascii_digit()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if valid {
            Ok(Ident(name.to_owned()))
        } else {
            Err(StoreError::Config(format!(
                "{what} name {name:?} is not a valid identifier (1-63 characters of a-z, 0-9 and _, not starting with a digit)"
            )))
        }
    }

    /// A name known to be valid (the defaults).
    pub(crate) fn known(name: &str) -> Self {
        debug_assert!(Ident::parse("name", name).is_ok());
        Ident(name.to_owned())
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The name of a helper table, `<name>_<suffix>`. MySQL table names are
    /// at most 64 characters: when that is too long, the name is cut and a
    /// hash of the full name keeps it unique.
    pub(crate) fn with_suffix(&self, suffix: &str) -> String {
        let full = format!("{}_{suffix}", self.0);
        if full.len() <= MAX_MYSQL_IDENT {
            return full;
        }
        let hash = format!("{:08x}", fnv1a(&[&self.0]) as u32);
        let keep = MAX_MYSQL_IDENT - hash.len() - suffix.len() - 2;
        format!("{}_{hash}_{suffix}", &self.0[..keep])
    }
}

/// 32-bit FNV-1a: a hash that never changes between versions, for lock keys
/// shared by every process writing the same outbox.
pub(crate) fn fnv1a(parts: &[&str]) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            hash ^= 0xff;
            hash = hash.wrapping_mul(0x0100_0193);
        }
        for b in part.bytes() {
            hash ^= u32::from(b);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    }
    hash as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for ok in ["outbox", "proclaim_outbox", "_x", "a1_b2", &"a".repeat(63)] {
            assert!(Ident::parse("table", ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_injection_and_odd_names() {
        for bad in [
            "",
            "1abc",
            "Outbox",
            "out box",
            "outbox`; DROP TABLE x; --",
            "outbox\"",
            "a.b",
            "a-b",
            "ünïcode",
            &"a".repeat(64),
        ] {
            let err = Ident::parse("table", bad);
            assert!(matches!(err, Err(StoreError::Config(_))), "{bad}: {err:?}");
        }
    }

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

    #[test]
    fn fnv_is_stable() {
        // Fixed values: changing the hash would let old and new writers of
        // one outbox take different subject locks.
        assert_eq!(fnv1a(&["a"]), 0xe40c292c_u32 as i32);
        assert_ne!(fnv1a(&["ab", "c"]), fnv1a(&["a", "bc"]));
    }
}
