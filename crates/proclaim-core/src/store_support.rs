//! Helpers shared by the store crates (PostgreSQL, SQLite, MySQL): checked
//! SQL identifiers, a stable hash for lock keys, and the text stored with a
//! failed event. Application code does not need this module.

use crate::{Event, StoreError};

/// Longest error text kept with an event (bytes, before `…`).
pub const MAX_ERROR_LEN: usize = 4000;

/// A checked schema or table name: 1-63 characters of `a-z`, `0-9` and `_`,
/// not starting with a digit. Anything else (quotes, dots, spaces, upper
/// case) is rejected, so a name can never inject SQL into a statement it is
/// spliced into.
///
/// ```
/// use proclaim_core::store_support::Identifier;
///
/// assert!(Identifier::parse("table", "outbox").is_ok());
/// assert!(Identifier::parse("table", "outbox\"; DROP TABLE x; --").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identifier(String);

impl Identifier {
    /// Checks `name`; `what` ("schema", "table") names it in the error.
    pub fn parse(what: &str, name: &str) -> Result<Self, StoreError> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && !name.as_bytes()[0].is_ascii_digit()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if valid {
            Ok(Identifier(name.to_owned()))
        } else {
            Err(StoreError::Config(format!(
                "{what} name {name:?} is not a valid identifier (1-63 characters of a-z, 0-9 and _, not starting with a digit)"
            )))
        }
    }

    /// A name known to be valid (a store's default).
    pub fn known(name: &str) -> Self {
        debug_assert!(Identifier::parse("name", name).is_ok());
        Identifier(name.to_owned())
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// 32-bit FNV-1a over `parts` (separated, so `["ab","c"]` ≠ `["a","bc"]`):
/// a hash that never changes between versions, for lock keys shared by
/// every process writing the same outbox.
pub fn fnv1a(parts: &[&str]) -> i32 {
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

/// The error text stored with an event: NUL characters removed (databases
/// refuse them) and cut to [`MAX_ERROR_LEN`] bytes at a character boundary.
pub fn clip_error(error: &str) -> String {
    let mut out: String = error.chars().filter(|c| *c != '\0').collect();
    if out.len() > MAX_ERROR_LEN {
        let mut cut = MAX_ERROR_LEN;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// The event's extension attributes as a JSON object, as stores keep them.
pub fn metadata_json(event: &Event) -> String {
    // A map of strings always serializes.
    serde_json::to_string(event.metadata()).unwrap_or_else(|_| "{}".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names_and_rejects_the_rest() {
        for ok in ["outbox", "proclaim", "_x", "a1_b2", &"a".repeat(63)] {
            assert!(Identifier::parse("table", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "Outbox",
            "out box",
            "outbox\"; DROP TABLE x; --",
            "a.b",
            "a-b",
            "a`b",
            "ünïcode",
            &"a".repeat(64),
        ] {
            let err = Identifier::parse("table", bad);
            assert!(matches!(err, Err(StoreError::Config(_))), "{bad}: {err:?}");
        }
    }

    #[test]
    fn fnv_is_stable() {
        // Fixed values: changing the hash would let old and new writers of
        // one outbox take different locks.
        assert_eq!(fnv1a(&["a"]), 0xe40c292c_u32 as i32);
        assert_ne!(fnv1a(&["ab", "c"]), fnv1a(&["a", "bc"]));
    }

    #[test]
    fn clips_errors_at_a_char_boundary_without_nul() {
        assert_eq!(clip_error("a\0b"), "ab");
        let long = "é".repeat(MAX_ERROR_LEN);
        let clipped = clip_error(&long);
        assert!(clipped.len() <= MAX_ERROR_LEN + '…'.len_utf8());
        assert!(clipped.ends_with('…'));
    }
}
