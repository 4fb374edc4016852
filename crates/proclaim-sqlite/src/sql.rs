//! The statements of one outbox table, built once with its checked name.
//!
//! Lists (sequences, ids, per-row delays and errors) travel as one JSON
//! array parameter read with `json_each`, so every statement has a fixed
//! text (cached by sqlx) and no limit on the number of bound variables.

use std::sync::Arc;

use crate::ident::Ident;

const COLUMNS: &str = "id, event_type, source, subject, event_time, datacontenttype, dataschema, \
     data, metadata, created_at";

pub(crate) struct Sql {
    pub(crate) quoted: String,
    pub(crate) insert_one: Arc<str>,
    pub(crate) stage_one: Arc<str>,
    pub(crate) insert_many: Arc<str>,
    pub(crate) claim: Arc<str>,
    pub(crate) delete_published: Arc<str>,
    pub(crate) mark_published: Arc<str>,
    pub(crate) retry: Arc<str>,
    pub(crate) dead: Arc<str>,
    pub(crate) release: Arc<str>,
    pub(crate) purge: Arc<str>,
    pub(crate) stats: Arc<str>,
    pub(crate) dead_letters: Arc<str>,
    pub(crate) replay: Arc<str>,
    pub(crate) create_migrations: Arc<str>,
    pub(crate) schema_version: Arc<str>,
    pub(crate) record_migration: Arc<str>,
}

impl Sql {
    pub(crate) fn new(table: &Ident) -> Self {
        let t = table.as_str();
        let q = format!(r#""{t}""#);
        let a = |sql: String| -> Arc<str> { sql.into() };
        let returning = "sequence, id, event_type, source, subject, event_time, datacontenttype, \
             dataschema, data, metadata, attempts, created_at";
        let in_list = "sequence IN (SELECT value FROM json_each(?1))";
        Sql {
            insert_one: a(format!(
                "INSERT INTO {q} ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
            )),
            // A fan-out lane's write: an event already there (same id) stays.
            stage_one: a(format!(
                "INSERT INTO {q} ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT (id) DO NOTHING"
            )),
            // One row per array element, inserted in array order.
            insert_many: a(format!(
                "INSERT INTO {q} ({COLUMNS}) \
                 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, \
                        value ->> 5, value ->> 6, value ->> 7, value ->> 8, value ->> 9 \
                 FROM json_each(?1) ORDER BY key"
            )),
            // ?1 token, ?2 now, ?3 lease expiry, ?4 limit. Runs under BEGIN
            // IMMEDIATE: one claimer at a time, each seeing the previous
            // claim's leases. A row is skipped while an earlier pending row
            // of its subject is leased or waiting for a retry (per-key order).
            claim: a(format!(
                "UPDATE {q} SET lease_token = ?1, lease_expires_at = ?3, attempts = attempts + 1 \
                 WHERE sequence IN ( \
                   SELECT c.sequence FROM {q} AS c \
                   WHERE c.status = 0 AND c.next_attempt_at <= ?2 \
                     AND (c.lease_expires_at IS NULL OR c.lease_expires_at <= ?2) \
                     AND NOT EXISTS ( \
                       SELECT 1 FROM {q} AS p \
                       WHERE p.status = 0 AND p.subject = c.subject AND p.sequence < c.sequence \
                         AND (p.next_attempt_at > ?2 OR p.lease_expires_at > ?2)) \
                   ORDER BY c.sequence \
                   LIMIT ?4) \
                 RETURNING {returning}"
            )),
            // ?1 sequences (JSON array), ?2 token.
            delete_published: a(format!(
                "DELETE FROM {q} WHERE {in_list} AND lease_token = ?2"
            )),
            // ?1 sequences, ?2 token, ?3 now.
            mark_published: a(format!(
                "UPDATE {q} SET status = 1, published_at = ?3, lease_token = NULL, \
                 lease_expires_at = NULL, last_error = NULL \
                 WHERE {in_list} AND lease_token = ?2"
            )),
            // ?1 [[sequence, next_attempt_at, error], …], ?2 token.
            retry: a(format!(
                "UPDATE {q} AS o SET next_attempt_at = d.next_at, last_error = d.error, \
                     lease_token = NULL, lease_expires_at = NULL \
                 FROM (SELECT value ->> 0 AS seq, value ->> 1 AS next_at, value ->> 2 AS error \
                       FROM json_each(?1)) AS d \
                 WHERE o.sequence = d.seq AND o.lease_token = ?2"
            )),
            // ?1 [[sequence, error], …], ?2 token, ?3 now.
            dead: a(format!(
                "UPDATE {q} AS o SET status = 2, dead_lettered_at = ?3, last_error = d.error, \
                     lease_token = NULL, lease_expires_at = NULL \
                 FROM (SELECT value ->> 0 AS seq, value ->> 1 AS error FROM json_each(?1)) AS d \
                 WHERE o.sequence = d.seq AND o.lease_token = ?2"
            )),
            // ?1 sequences, ?2 token.
            release: a(format!(
                "UPDATE {q} SET attempts = max(attempts - 1, 0), lease_token = NULL, \
                 lease_expires_at = NULL WHERE {in_list} AND lease_token = ?2"
            )),
            // ?1 cut-off time.
            purge: a(format!(
                "DELETE FROM {q} WHERE status = 1 AND published_at < ?1"
            )),
            // ?1 now.
            stats: a(format!(
                "SELECT \
                   coalesce(sum(status = 0 AND (lease_expires_at IS NULL OR lease_expires_at <= ?1)), 0), \
                   coalesce(sum(status = 0 AND lease_expires_at > ?1), 0), \
                   coalesce(sum(status = 2), 0), \
                   coalesce(sum(status = 1), 0), \
                   coalesce(?1 - min(CASE WHEN status = 0 THEN created_at END), 0) \
                 FROM {q}"
            )),
            // ?1 limit.
            dead_letters: a(format!(
                "SELECT sequence, id, event_type, subject, attempts, coalesce(last_error, ''), \
                        dead_lettered_at \
                 FROM {q} WHERE status = 2 ORDER BY sequence LIMIT ?1"
            )),
            // ?1 ids (JSON array) or NULL for all.
            replay: a(format!(
                "UPDATE {q} SET status = 0, attempts = 0, next_attempt_at = 0, \
                     dead_lettered_at = NULL \
                 WHERE status = 2 AND (?1 IS NULL OR id IN (SELECT value FROM json_each(?1)))"
            )),
            create_migrations: a(format!(
                r#"CREATE TABLE IF NOT EXISTS "{t}_migrations" (
                       version    INTEGER PRIMARY KEY,
                       applied_at INTEGER NOT NULL) STRICT"#
            )),
            schema_version: a(format!(r#"SELECT max(version) FROM "{t}_migrations""#)),
            record_migration: a(format!(
                r#"INSERT INTO "{t}_migrations" (version, applied_at) VALUES (?1, ?2)"#
            )),
            quoted: q,
        }
    }
}
