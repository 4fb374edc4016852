//! Helpers shared by the store crates (PostgreSQL, SQLite, MySQL): checked
//! SQL identifiers, a stable hash for lock keys, the text stored with a
//! failed event, the inbox's parked rows and commit check, and the
//! transaction wrappers' access to their connection. Application
//! code does not need this module.

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

    /// `<name>_<suffix>`, the name of a helper table or index, cut and made
    /// unique with a hash when longer than `max_len`, the longest name the
    /// database keeps (it would cut a longer one silently, and two names
    /// could meet).
    pub fn with_suffix(&self, suffix: &str, max_len: usize) -> String {
        let name = self.as_str();
        let full = format!("{name}_{suffix}");
        if full.len() <= max_len {
            return full;
        }
        let hash = format!("{:08x}", fnv1a(&[name]) as u32);
        let keep = max_len.saturating_sub(hash.len() + suffix.len() + 2);
        format!("{}_{hash}_{suffix}", &name[..keep])
    }
}

/// Gives a store's transaction wrapper (a struct whose field `tx` is the
/// open `sqlx::Transaction`) `Deref`/`DerefMut` to the connection, so
/// statements run as `query.execute(&mut *tx)`, and a `transaction()`
/// accessor for APIs that take the `sqlx::Transaction` itself:
/// `tx_wrapper!(PgInboxTx: Transaction<'static, Postgres> => PgConnection);`
#[doc(inline)]
pub use crate::__store_tx_wrapper as tx_wrapper;

#[doc(hidden)]
#[macro_export]
macro_rules! __store_tx_wrapper {
    ($wrapper:ident : $tx:ty => $conn:ty) => {
        impl $wrapper {
            /// The open transaction, for APIs that take a `sqlx::Transaction`.
            pub fn transaction(&mut self) -> &mut $tx {
                &mut self.tx
            }
        }

        impl ::std::ops::Deref for $wrapper {
            type Target = $conn;

            fn deref(&self) -> &$conn {
                &self.tx
            }
        }

        impl ::std::ops::DerefMut for $wrapper {
            fn deref_mut(&mut self) -> &mut $conn {
                &mut self.tx
            }
        }
    };
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

/// A projection's checkpoint position as read from its `BIGINT` column; a
/// negative one is a [`StoreError::Database`].
pub fn position_from_stored(projection: &str, position: i64) -> Result<u64, StoreError> {
    u64::try_from(position).map_err(|_| {
        StoreError::Database(
            format!("projection {projection:?} has a negative checkpoint ({position})").into(),
        )
    })
}

/// A checkpoint position as its `BIGINT` column stores it; one above
/// `i64::MAX` is a [`StoreError::Config`].
pub fn position_to_stored(position: u64) -> Result<i64, StoreError> {
    i64::try_from(position).map_err(|_| {
        StoreError::Config(format!(
            "checkpoint position {position} is above the largest one stored ({})",
            i64::MAX
        ))
    })
}

/// The event's extension attributes as a JSON object, as stores keep them.
pub fn metadata_json(event: &Event) -> String {
    // A map of strings always serializes.
    serde_json::to_string(event.metadata()).unwrap_or_else(|_| "{}".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(event_json: Option<&str>, raw: &[u8], attempts: i64) -> ParkedRow {
        ParkedRow {
            id: 7,
            consumer: "c".into(),
            event_json: event_json.map(str::to_owned),
            raw: raw.to_vec(),
            reason: "r".into(),
            attempts,
            parked_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn a_parking_keeps_its_key_and_other_parkings_differ() {
        let event = Event::builder("T").subject("s").build().unwrap();
        let at = chrono::Utc::now();
        let parked = |event: Option<Event>, raw: &[u8], at| crate::inbox::ParkedEvent {
            id: 0,
            consumer: "c".into(),
            event,
            raw: raw.to_vec(),
            reason: "r".into(),
            attempts: 1,
            parked_at: at,
        };
        let once = parked(Some(event.clone()), b"", at);
        assert_eq!(park_key(&once), park_key(&once.clone()));
        assert!(park_key(&once).starts_with(&format!("e:{}:", event.id())));
        let later = at + chrono::Duration::microseconds(1);
        assert_ne!(park_key(&once), park_key(&parked(Some(event), b"", later)));
        let raw = park_key(&parked(None, b"garbage", at));
        assert_eq!(raw, park_key(&parked(None, b"garbage", at)));
        assert_ne!(raw, park_key(&parked(None, b"garbagf", at)));
        assert!(raw.len() <= 80, "{raw}");
    }

    #[test]
    fn a_parked_row_decodes_its_event_and_json_that_no_longer_decodes_is_listed_as_bytes() {
        let event = Event::builder("T").subject("s").build().unwrap();
        let p = row(Some(&event.to_cloudevent_json()), b"", 3).into_parked_event();
        assert_eq!(p.event.as_ref().map(Event::id), Some(event.id()));
        assert_eq!((p.id, p.attempts), (7, 3));

        let p = row(Some("{\"not\": \"an event\"}"), b"", -1).into_parked_event();
        assert!(p.event.is_none());
        assert_eq!(p.raw, b"{\"not\": \"an event\"}");
        assert_eq!(p.attempts, 0);

        let p = row(None, b"\xff bytes", 0).into_parked_event();
        assert!(p.event.is_none());
        assert_eq!(p.raw, b"\xff bytes");
    }

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
    fn helper_names_fit_and_stay_distinct() {
        let short = Identifier::known("outbox");
        assert_eq!(short.with_suffix("migrations", 64), "outbox_migrations");
        let long_a = Identifier::known(&"a".repeat(63));
        let long_b = Identifier::known(&format!("{}b", "a".repeat(62)));
        // MySQL keeps 64 characters, PostgreSQL 63.
        for max_len in [63, 64] {
            for suffix in [
                "migrations",
                "claim_lock",
                "subject_locks",
                "parked",
                "handled_idx",
                "parked_consumer_idx",
            ] {
                let a = long_a.with_suffix(suffix, max_len);
                let b = long_b.with_suffix(suffix, max_len);
                assert!(a.len() <= max_len && b.len() <= max_len, "{a} / {b}");
                assert!(a.ends_with(suffix));
                assert_ne!(a, b);
                assert_ne!(a, long_a.as_str());
            }
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

/// A parked event as a store keeps it: the event as CloudEvents JSON (or
/// `None` for a message that did not decode, whose bytes are in `raw`).
#[derive(Debug, Clone)]
pub struct ParkedRow {
    /// The row's id.
    pub id: i64,
    /// The consumer that parked it.
    pub consumer: String,
    /// The event as CloudEvents JSON.
    pub event_json: Option<String>,
    /// The message's bytes, when it did not decode.
    pub raw: Vec<u8>,
    /// Why it was parked.
    pub reason: String,
    /// Handler attempts, as stored (negative values read as 0).
    pub attempts: i64,
    /// When it was parked.
    pub parked_at: chrono::DateTime<chrono::Utc>,
}

impl ParkedRow {
    /// The parked event. An event whose JSON no longer decodes (a row
    /// edited by hand) is listed as undecodable, with that JSON as its
    /// bytes, rather than failing the whole listing.
    pub fn into_parked_event(self) -> crate::inbox::ParkedEvent {
        let id = self.id;
        let (event, raw) = match self.event_json {
            None => (None, self.raw),
            Some(json) => match Event::from_cloudevent_json(&json) {
                Ok(event) => (Some(event), self.raw),
                Err(e) => {
                    tracing::warn!(id, error = %e, "a parked event no longer decodes; listing its JSON as raw bytes");
                    let raw = if self.raw.is_empty() {
                        json.into_bytes()
                    } else {
                        self.raw
                    };
                    (None, raw)
                }
            },
        };
        crate::inbox::ParkedEvent {
            id,
            consumer: self.consumer,
            event,
            raw,
            reason: self.reason,
            attempts: u32::try_from(self.attempts.max(0)).unwrap_or(u32::MAX),
            parked_at: self.parked_at,
        }
    }
}

/// The identity of one parking, stored with the parked event under a unique
/// key (with the consumer): a park that is retried after its insert
/// committed (the reply was lost, or it timed out) stores nothing twice.
/// It is the event's id — or a 64-bit hash and the length of an undecodable
/// message's bytes — and `parked_at` to the microsecond, which the consumer
/// sets once per parking and keeps across retries; the same event parked
/// again later (after a replay) is a new parking.
pub fn park_key(parked: &crate::inbox::ParkedEvent) -> String {
    let at = parked.parked_at.timestamp_micros();
    match &parked.event {
        Some(event) => format!("e:{}:{at}", event.id()),
        None => {
            let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
            for byte in &parked.raw {
                hash ^= u64::from(*byte);
                hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
            format!("r:{hash:016x}:{}:{at}", parked.raw.len())
        }
    }
}

/// The error of an inbox commit that found its own (consumer, event id)
/// pair gone from the transaction: the database rolled the transaction
/// back (PostgreSQL after a failed statement, an InnoDB deadlock, SQLite
/// `ROLLBACK` on a busy error), so committing would store nothing of the
/// handling and its message must not be acked.
pub fn inbox_pair_gone(consumer: &str, event_id: uuid::Uuid) -> StoreError {
    StoreError::Database(
        format!(
            "the inbox pair ({consumer}, {event_id}) is gone from its transaction (rolled back by the database); \
             nothing of the handling is committed with it"
        )
        .into(),
    )
}
