//! [`Document`] and the write precondition [`Expect`].

use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::DocStoreError;

/// A stored document: its key, its version and its JSON body.
///
/// `T` is the body's type: [`serde_json::Value`] from `get` and `list`, your
/// own type from `get_as` or [`Document::into_typed`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document<T = serde_json::Value> {
    /// The collection the document belongs to, e.g. `agents`.
    pub collection: String,
    /// The document's id within its collection, e.g. `agent-1`.
    pub id: String,
    /// The optimistic version: 1 when created, one more on every write.
    /// Pass it back as [`Expect::Version`] to update only what you read.
    pub version: i64,
    /// The body.
    pub body: T,
    /// When the document was last written (the writer's clock, to the
    /// microsecond).
    pub updated_at: DateTime<Utc>,
}

impl Document<serde_json::Value> {
    /// The same document with its body deserialized into `T`.
    pub fn into_typed<T: DeserializeOwned>(self) -> Result<Document<T>, DocStoreError> {
        let body = serde_json::from_value(self.body)
            .map_err(|e| DocStoreError::json(&self.collection, &self.id, e))?;
        Ok(Document {
            collection: self.collection,
            id: self.id,
            version: self.version,
            body,
            updated_at: self.updated_at,
        })
    }

    /// A document read from a row; the body is its stored JSON text.
    pub(crate) fn from_row(
        collection: String,
        id: String,
        version: i64,
        body: &str,
        updated_at: DateTime<Utc>,
    ) -> Result<Self, DocStoreError> {
        let body =
            serde_json::from_str(body).map_err(|e| DocStoreError::json(&collection, &id, e))?;
        Ok(Document {
            collection,
            id,
            version,
            body,
            updated_at,
        })
    }

    /// The body deserialized into `T`, leaving the document as it is.
    pub fn body_as<T: DeserializeOwned>(&self) -> Result<T, DocStoreError> {
        T::deserialize(&self.body).map_err(|e| DocStoreError::json(&self.collection, &self.id, e))
    }
}

/// What a write expects to find, checked atomically with the write.
///
/// ```
/// use proclaim_docstore::Expect;
///
/// assert_eq!(Expect::Version(3).to_string(), "version 3");
/// assert_eq!(Expect::default(), Expect::Any);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Expect {
    /// Write whatever is stored: create the document or replace it
    /// (last writer wins).
    #[default]
    Any,
    /// Only create: a document with this key must not exist.
    Absent,
    /// Only change the document if its stored version is exactly this one
    /// (optimistic concurrency: the version you read).
    Version(i64),
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Any => f.write_str("any version"),
            Expect::Absent => f.write_str("no document"),
            Expect::Version(v) => write!(f, "version {v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Deserialize)]
    struct Agent {
        name: String,
    }

    fn doc(body: serde_json::Value) -> Document {
        Document {
            collection: "agents".into(),
            id: "agent-1".into(),
            version: 2,
            body,
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn bodies_convert_to_types() {
        let d = doc(serde_json::json!({ "name": "Ada" }));
        assert_eq!(d.body_as::<Agent>().unwrap().name, "Ada");
        let typed = d.into_typed::<Agent>().unwrap();
        assert_eq!(typed.version, 2);
        assert_eq!(typed.body, Agent { name: "Ada".into() });
    }

    #[test]
    fn wrong_shape_is_a_json_error() {
        let err = doc(serde_json::json!([1, 2])).into_typed::<Agent>();
        assert!(
            matches!(&err, Err(DocStoreError::Json { id, .. }) if id == "agent-1"),
            "{err:?}"
        );
    }
}
