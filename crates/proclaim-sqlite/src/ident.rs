//! SQL identifiers that are safe to splice into statements.

use proclaim_core::StoreError;

/// A checked table name: 1-63 characters of `a-z`, `0-9` and `_`, not
/// starting with a digit. Anything else (quotes, dots, spaces, upper case)
/// is rejected, so a name can never inject SQL.
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
            "outbox\"; DROP TABLE x; --",
            "outbox`; DROP TABLE x; --",
            "a.b",
            "a-b",
            "ünïcode",
            &"a".repeat(64),
        ] {
            let err = Ident::parse("table", bad);
            assert!(matches!(err, Err(StoreError::Config(_))), "{bad}: {err:?}");
        }
    }
}
