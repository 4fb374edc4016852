//! [`DocStoreError`], and the checks on collection names and document ids.

use proclaim_core::StoreError;

use crate::Expect;

/// The longest collection name or document id, in characters.
pub const MAX_NAME_LEN: usize = 255;

/// Why a document-store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DocStoreError {
    /// The stored version of the document is not the one the write expected
    /// (another writer got there first). The transaction it happened in is
    /// poisoned: its [`commit`](crate::PgDocTransaction::commit) rolls back
    /// and returns this error again, so neither the document change nor any
    /// event of that transaction is written.
    #[error("{collection}/{id}: expected {expected}, found {}", found(*.expected, *.actual))]
    Conflict {
        /// The document's collection.
        collection: String,
        /// The document's id.
        id: String,
        /// What the write expected.
        expected: Expect,
        /// The stored version when the write was refused (`None`: there was
        /// no document).
        actual: Option<i64>,
    },
    /// A collection name or document id is empty, longer than
    /// [`MAX_NAME_LEN`] characters, or holds a control character.
    #[error("invalid document {what} {name:?}: {reason}")]
    InvalidName {
        /// `"collection"` or `"id"`.
        what: &'static str,
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A document body could not be serialized to JSON, or a stored body
    /// could not be read as the requested type.
    #[error("{collection}/{id}: document JSON: {source}")]
    Json {
        /// The document's collection.
        collection: String,
        /// The document's id.
        id: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The outbox refused an event, or its migration failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The database failed a statement of the document store.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The transaction was refused because an earlier statement in it failed
    /// (the message says which); it can only be rolled back, and
    /// `commit` does so.
    #[error("transaction aborted by an earlier error ({0}); nothing was written")]
    Aborted(String),
}

impl DocStoreError {
    /// True for [`DocStoreError::Conflict`]: another writer changed the
    /// document; read it again and retry if that still makes sense.
    pub fn is_conflict(&self) -> bool {
        matches!(self, DocStoreError::Conflict { .. })
    }

    /// True for errors after which the transaction's database state is
    /// unknown or refused, so the transaction must not commit.
    pub(crate) fn poisons(&self) -> bool {
        matches!(
            self,
            DocStoreError::Conflict { .. }
                | DocStoreError::Store(_)
                | DocStoreError::Database(_)
                | DocStoreError::Aborted(_)
        )
    }

    /// An equal error for [`Conflict`](DocStoreError::Conflict) and
    /// [`Aborted`](DocStoreError::Aborted); for the others (which hold
    /// non-cloneable sources) an `Aborted` with their message.
    pub(crate) fn replay(&self) -> DocStoreError {
        match self {
            DocStoreError::Conflict {
                collection,
                id,
                expected,
                actual,
            } => DocStoreError::Conflict {
                collection: collection.clone(),
                id: id.clone(),
                expected: *expected,
                actual: *actual,
            },
            DocStoreError::Aborted(reason) => DocStoreError::Aborted(reason.clone()),
            other => DocStoreError::Aborted(other.to_string()),
        }
    }

    pub(crate) fn json(collection: &str, id: &str, source: serde_json::Error) -> Self {
        DocStoreError::Json {
            collection: collection.to_owned(),
            id: id.to_owned(),
            source,
        }
    }
}

fn found(expected: Expect, actual: Option<i64>) -> String {
    match (expected, actual) {
        (_, None) => "no document".to_owned(),
        // "expected version 3, found 4"
        (Expect::Version(_), Some(v)) => v.to_string(),
        (_, Some(v)) => format!("version {v}"),
    }
}

/// The error of a write whose precondition did not hold.
pub(crate) fn conflict(
    collection: &str,
    id: &str,
    expected: Expect,
    actual: Option<i64>,
) -> DocStoreError {
    tracing::debug!(collection, id, %expected, ?actual, "document write conflict");
    DocStoreError::Conflict {
        collection: collection.to_owned(),
        id: id.to_owned(),
        expected,
        actual,
    }
}

/// Checks a collection name or document id: non-empty, at most
/// [`MAX_NAME_LEN`] characters, no control characters.
pub(crate) fn check_name(what: &'static str, name: &str) -> Result<(), DocStoreError> {
    let reason = if name.is_empty() {
        Some("must not be empty")
    } else if name.chars().count() > MAX_NAME_LEN {
        Some("must be at most 255 characters")
    } else if name.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(DocStoreError::InvalidName {
            what,
            name: name.to_owned(),
            reason,
        }),
    }
}

/// Checks both parts of a document's key.
pub(crate) fn check_key(collection: &str, id: &str) -> Result<(), DocStoreError> {
    check_name("collection", collection)?;
    check_name("id", id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conflict(expected: Expect, actual: Option<i64>) -> String {
        DocStoreError::Conflict {
            collection: "agents".into(),
            id: "agent-1".into(),
            expected,
            actual,
        }
        .to_string()
    }

    #[test]
    fn conflict_messages_read_well() {
        assert_eq!(
            conflict(Expect::Version(3), Some(4)),
            "agents/agent-1: expected version 3, found 4"
        );
        assert_eq!(
            conflict(Expect::Version(3), None),
            "agents/agent-1: expected version 3, found no document"
        );
        assert_eq!(
            conflict(Expect::Absent, Some(2)),
            "agents/agent-1: expected no document, found version 2"
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(check_key("agents", "agent-1").is_ok());
        assert!(check_key("agents", &"é".repeat(255)).is_ok());
        for (collection, id) in [
            ("", "a"),
            ("agents", ""),
            ("agents", &"x".repeat(256)),
            ("age\nnts", "a"),
            ("agents", "a\0b"),
            ("agents", "a\u{7f}"),
        ] {
            let err = check_key(collection, id);
            assert!(
                matches!(err, Err(DocStoreError::InvalidName { .. })),
                "{collection:?}/{id:?}: {err:?}"
            );
        }
    }

    #[test]
    fn replayed_errors_keep_conflicts() {
        let original = DocStoreError::Conflict {
            collection: "c".into(),
            id: "i".into(),
            expected: Expect::Absent,
            actual: Some(1),
        };
        assert_eq!(original.replay().to_string(), original.to_string());
        let db = DocStoreError::Database(sqlx::Error::PoolClosed);
        assert!(matches!(db.replay(), DocStoreError::Aborted(m) if m.contains("pool")));
    }
}
