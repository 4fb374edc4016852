//! The statements of one documents table, built once with its checked name.
//!
//! Both backends bind the same parameters in the same order — collection,
//! id, body (JSON text), the write time, the expected version — so the code
//! that runs them is shared; only the SQL text differs.

use std::sync::Arc;

use proclaim_core::StoreError;

use crate::DocStoreError;

/// Checks a table-name prefix and returns the table name `<prefix>documents`:
/// the prefix is `a-z`, `0-9` and `_`, not starting with a digit, and the
/// name at most 63 characters (PostgreSQL's identifier limit), so the name
/// can be spliced into SQL.
pub(crate) fn table_for_prefix(prefix: &str) -> Result<String, DocStoreError> {
    let name = format!("{prefix}documents");
    let valid = name.len() <= 63
        && !prefix.starts_with(|c: char| c.is_ascii_digit())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(name)
    } else {
        Err(DocStoreError::Store(StoreError::Config(format!(
            "documents table prefix {prefix:?} is not valid (a-z, 0-9 and _, not starting with a digit, at most 54 characters)"
        ))))
    }
}

pub(crate) struct Sql {
    /// The quoted (and for PostgreSQL schema-qualified) table name.
    pub(crate) table: String,
    pub(crate) create: Arc<str>,
    /// ?1 collection, ?2 id → collection, id, version, body text, updated_at.
    pub(crate) get: Arc<str>,
    /// ?1 collection → rows as `get`, by id.
    pub(crate) list: Arc<str>,
    /// ?1 collection, ?2 id → version.
    pub(crate) version: Arc<str>,
    /// ?1 collection, ?2 id, ?3 body, ?4 now → new version; no row if the
    /// document exists.
    pub(crate) insert: Arc<str>,
    /// ?1 collection, ?2 id, ?3 body, ?4 now → new version.
    pub(crate) upsert: Arc<str>,
    /// ?1 collection, ?2 id, ?3 body, ?4 now, ?5 expected → new version; no
    /// row if the stored version is not the expected one.
    pub(crate) update: Arc<str>,
    /// ?1 collection, ?2 id.
    pub(crate) delete_any: Arc<str>,
    /// ?1 collection, ?2 id, ?3 expected → the deleted version; no row if
    /// the stored version is not the expected one.
    pub(crate) delete_version: Arc<str>,
}

impl Sql {
    /// `table` is the quoted, schema-qualified name.
    pub(crate) fn postgres(table: String) -> Self {
        let t = &table;
        let a = |sql: String| -> Arc<str> { sql.into() };
        let columns = "collection, id, version, body::text, updated_at";
        Sql {
            create: a(format!(
                "CREATE TABLE IF NOT EXISTS {t} ( \
                   collection TEXT NOT NULL, \
                   id TEXT NOT NULL, \
                   version BIGINT NOT NULL CHECK (version > 0), \
                   body JSONB NOT NULL, \
                   updated_at TIMESTAMPTZ NOT NULL, \
                   PRIMARY KEY (collection, id))"
            )),
            get: a(format!(
                "SELECT {columns} FROM {t} WHERE collection = $1 AND id = $2"
            )),
            // Byte order, as SQLite sorts, whatever the database's collation.
            list: a(format!(
                "SELECT {columns} FROM {t} WHERE collection = $1 ORDER BY id COLLATE \"C\""
            )),
            version: a(format!(
                "SELECT version FROM {t} WHERE collection = $1 AND id = $2"
            )),
            insert: a(format!(
                "INSERT INTO {t} (collection, id, version, body, updated_at) \
                 VALUES ($1, $2, 1, $3::jsonb, $4) \
                 ON CONFLICT (collection, id) DO NOTHING RETURNING version"
            )),
            upsert: a(format!(
                "INSERT INTO {t} AS d (collection, id, version, body, updated_at) \
                 VALUES ($1, $2, 1, $3::jsonb, $4) \
                 ON CONFLICT (collection, id) DO UPDATE \
                 SET version = d.version + 1, body = excluded.body, updated_at = excluded.updated_at \
                 RETURNING version"
            )),
            // Under READ COMMITTED a concurrent writer of the row makes this
            // wait for it, then re-checks the version on the row it wrote.
            update: a(format!(
                "UPDATE {t} SET version = version + 1, body = $3::jsonb, updated_at = $4 \
                 WHERE collection = $1 AND id = $2 AND version = $5 RETURNING version"
            )),
            delete_any: a(format!("DELETE FROM {t} WHERE collection = $1 AND id = $2")),
            delete_version: a(format!(
                "DELETE FROM {t} WHERE collection = $1 AND id = $2 AND version = $3 \
                 RETURNING version"
            )),
            table,
        }
    }

    /// `table` is the quoted name.
    pub(crate) fn sqlite(table: String) -> Self {
        let t = &table;
        let a = |sql: String| -> Arc<str> { sql.into() };
        let columns = "collection, id, version, body, updated_at";
        Sql {
            // Times are INTEGER microseconds since the Unix epoch, as in the
            // SQLite outbox.
            create: a(format!(
                "CREATE TABLE IF NOT EXISTS {t} ( \
                   collection TEXT NOT NULL, \
                   id TEXT NOT NULL, \
                   version INTEGER NOT NULL CHECK (version > 0), \
                   body TEXT NOT NULL CHECK (json_valid(body)), \
                   updated_at INTEGER NOT NULL, \
                   PRIMARY KEY (collection, id)) STRICT, WITHOUT ROWID"
            )),
            get: a(format!(
                "SELECT {columns} FROM {t} WHERE collection = ?1 AND id = ?2"
            )),
            list: a(format!(
                "SELECT {columns} FROM {t} WHERE collection = ?1 ORDER BY id"
            )),
            version: a(format!(
                "SELECT version FROM {t} WHERE collection = ?1 AND id = ?2"
            )),
            insert: a(format!(
                "INSERT INTO {t} (collection, id, version, body, updated_at) \
                 VALUES (?1, ?2, 1, ?3, ?4) \
                 ON CONFLICT (collection, id) DO NOTHING RETURNING version"
            )),
            upsert: a(format!(
                "INSERT INTO {t} (collection, id, version, body, updated_at) \
                 VALUES (?1, ?2, 1, ?3, ?4) \
                 ON CONFLICT (collection, id) DO UPDATE \
                 SET version = version + 1, body = excluded.body, updated_at = excluded.updated_at \
                 RETURNING version"
            )),
            update: a(format!(
                "UPDATE {t} SET version = version + 1, body = ?3, updated_at = ?4 \
                 WHERE collection = ?1 AND id = ?2 AND version = ?5 RETURNING version"
            )),
            delete_any: a(format!("DELETE FROM {t} WHERE collection = ?1 AND id = ?2")),
            delete_version: a(format!(
                "DELETE FROM {t} WHERE collection = ?1 AND id = ?2 AND version = ?3 \
                 RETURNING version"
            )),
            table,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_checked() {
        assert_eq!(table_for_prefix("").unwrap(), "documents");
        assert_eq!(table_for_prefix("proclaim_").unwrap(), "proclaim_documents");
        assert!(table_for_prefix(&"a".repeat(54)).is_ok());
        for bad in ["1x_", "Docs_", "a\"; drop", "a.b_", &"a".repeat(55)] {
            assert!(table_for_prefix(bad).is_err(), "{bad}");
        }
    }
}
