//! The statements of one outbox table, built once with its checked names.
//!
//! Statements whose length depends on a count (`IN (?, …)` lists, multi-row
//! inserts) are built per call by the functions at the end.

use std::sync::Arc;

use crate::ident::{Ident, with_suffix};

/// Columns written by `enqueue`, in bind order.
const COLUMNS: &str = "id, event_type, source, subject, event_time, datacontenttype, dataschema, data, metadata, created_at";
/// One row of bind parameters for [`COLUMNS`]; `created_at` is the database clock.
const ROW: &str = "(?, ?, ?, ?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(6))";
/// Columns a claim returns, in the order `decode_row` reads them.
const RECORD: &str = "sequence, id, event_type, source, subject, event_time, datacontenttype, \
                      dataschema, data, metadata, attempts, created_at";

pub(crate) struct Sql {
    /// The backquoted table name.
    pub(crate) quoted: String,
    pub(crate) migrations: String,
    pub(crate) claim_lock: String,
    pub(crate) subject_locks: String,
    pub(crate) insert_one: Arc<str>,
    pub(crate) stage_one: Arc<str>,
    pub(crate) lock_subject: Arc<str>,
    pub(crate) lock_claims: Arc<str>,
    pub(crate) pick: Arc<str>,
    pub(crate) purge: Arc<str>,
    pub(crate) stats: Arc<str>,
    pub(crate) dead_letters: Arc<str>,
    pub(crate) replay_all: Arc<str>,
    pub(crate) schema_version: Arc<str>,
}

impl Sql {
    pub(crate) fn new(table: &Ident) -> Self {
        let t = table.as_str();
        let q = format!("`{t}`");
        let migrations = with_suffix(table, "migrations");
        let claim_lock = with_suffix(table, "claim_lock");
        let subject_locks = with_suffix(table, "subject_locks");
        let a = |sql: String| -> Arc<str> { sql.into() };
        Sql {
            insert_one: a(format!("INSERT INTO {q} ({COLUMNS}) VALUES {ROW}")),
            // A fan-out lane's write: an event already there (same id) stays.
            stage_one: a(format!(
                "INSERT INTO {q} ({COLUMNS}) VALUES {ROW} ON DUPLICATE KEY UPDATE id = id"
            )),
            lock_subject: a(lock_subjects_sql(&subject_locks, 1)),
            lock_claims: a(format!(
                "SELECT id FROM `{claim_lock}` WHERE id = 1 FOR UPDATE"
            )),
            // Candidates in sequence order: pending, due, not leased, and no
            // earlier pending event of the subject is leased or waiting for a
            // retry. The subquery is a plain (non-locking) read; rows another
            // transaction holds (uncommitted writes, outcomes being recorded)
            // are skipped rather than waited for.
            pick: a(format!(
                "SELECT c.sequence FROM {q} c \
                 WHERE c.status = 0 AND c.next_attempt_at <= UTC_TIMESTAMP(6) \
                   AND (c.lease_expires_at IS NULL OR c.lease_expires_at <= UTC_TIMESTAMP(6)) \
                   AND NOT EXISTS ( \
                     SELECT 1 FROM {q} p \
                     WHERE p.subject_crc = c.subject_crc AND p.status = 0 \
                       AND p.sequence < c.sequence AND p.subject = c.subject \
                       AND (p.next_attempt_at > UTC_TIMESTAMP(6) \
                            OR p.lease_expires_at > UTC_TIMESTAMP(6))) \
                 ORDER BY c.sequence \
                 LIMIT ? \
                 FOR UPDATE SKIP LOCKED"
            )),
            purge: a(format!(
                "DELETE FROM {q} WHERE status = 1 \
                 AND published_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND \
                 ORDER BY published_at LIMIT ?"
            )),
            stats: a(format!(
                "SELECT \
                   CAST(COALESCE(SUM(status = 0 AND (lease_expires_at IS NULL \
                        OR lease_expires_at <= UTC_TIMESTAMP(6))), 0) AS SIGNED), \
                   CAST(COALESCE(SUM(status = 0 AND lease_expires_at > UTC_TIMESTAMP(6)), 0) AS SIGNED), \
                   CAST(COALESCE(SUM(status = 2), 0) AS SIGNED), \
                   CAST(COALESCE(SUM(status = 1), 0) AS SIGNED), \
                   CAST(COALESCE(TIMESTAMPDIFF(MICROSECOND, \
                        MIN(CASE WHEN status = 0 THEN created_at END), UTC_TIMESTAMP(6)) DIV 1000, 0) AS SIGNED) \
                 FROM {q}"
            )),
            dead_letters: a(format!(
                "SELECT sequence, id, event_type, subject, attempts, COALESCE(last_error, ''), \
                        dead_lettered_at \
                 FROM {q} WHERE status = 2 ORDER BY sequence LIMIT ?"
            )),
            replay_all: a(replay_sql(&q, 0)),
            schema_version: a(format!("SELECT MAX(version) FROM `{migrations}`")),
            quoted: q,
            migrations,
            claim_lock,
            subject_locks,
        }
    }

    /// `INSERT` of `n` events.
    pub(crate) fn insert_many(&self, n: usize) -> String {
        let rows = vec![ROW; n].join(", ");
        format!("INSERT INTO {} ({COLUMNS}) VALUES {rows}", self.quoted)
    }

    /// Locks `n` subject slots, in the order bound.
    pub(crate) fn lock_subjects(&self, n: usize) -> String {
        lock_subjects_sql(&self.subject_locks, n)
    }

    /// Of `n` picked rows, those with an earlier pending event of their
    /// subject that is not among them (binds: the `n` sequences twice).
    pub(crate) fn held_back(&self, n: usize) -> String {
        let list = marks(n);
        format!(
            "SELECT c.sequence FROM {q} c \
             WHERE c.sequence IN ({list}) AND EXISTS ( \
               SELECT 1 FROM {q} p \
               WHERE p.subject_crc = c.subject_crc AND p.status = 0 \
                 AND p.sequence < c.sequence AND p.subject = c.subject \
                 AND p.sequence NOT IN ({list}))",
            q = self.quoted
        )
    }

    /// Leases `n` rows (binds: token, lease in µs, the sequences).
    pub(crate) fn lease(&self, n: usize) -> String {
        format!(
            "UPDATE {} SET lease_token = ?, \
                 lease_expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, \
                 attempts = attempts + 1 \
             WHERE sequence IN ({})",
            self.quoted,
            marks(n)
        )
    }

    /// The claimed rows (binds: the sequences).
    pub(crate) fn fetch(&self, n: usize) -> String {
        format!(
            "SELECT {RECORD} FROM {} WHERE sequence IN ({}) ORDER BY sequence",
            self.quoted,
            marks(n)
        )
    }

    /// Deletes published rows (binds: the sequences, the token).
    pub(crate) fn delete_published(&self, n: usize) -> String {
        format!(
            "DELETE FROM {} WHERE sequence IN ({}) AND lease_token = ?",
            self.quoted,
            marks(n)
        )
    }

    /// Marks rows published (binds: the sequences, the token).
    pub(crate) fn mark_published(&self, n: usize) -> String {
        format!(
            "UPDATE {} SET status = 1, published_at = UTC_TIMESTAMP(6), lease_token = NULL, \
                 lease_expires_at = NULL, last_error = NULL \
             WHERE sequence IN ({}) AND lease_token = ? AND status = 0",
            self.quoted,
            marks(n)
        )
    }

    /// Schedules retries (binds: (sequence, delay µs) × n, (sequence, error)
    /// × n, the sequences, the token).
    pub(crate) fn retry(&self, n: usize) -> String {
        format!(
            "UPDATE {} SET \
                 next_attempt_at = UTC_TIMESTAMP(6) + INTERVAL (CASE sequence {} END) MICROSECOND, \
                 last_error = CASE sequence {} END, \
                 lease_token = NULL, lease_expires_at = NULL \
             WHERE sequence IN ({}) AND lease_token = ? AND status = 0",
            self.quoted,
            cases(n),
            cases(n),
            marks(n)
        )
    }

    /// Dead-letters rows (binds: (sequence, error) × n, the sequences, the token).
    pub(crate) fn dead(&self, n: usize) -> String {
        format!(
            "UPDATE {} SET status = 2, dead_lettered_at = UTC_TIMESTAMP(6), \
                 last_error = CASE sequence {} END, \
                 lease_token = NULL, lease_expires_at = NULL \
             WHERE sequence IN ({}) AND lease_token = ? AND status = 0",
            self.quoted,
            cases(n),
            marks(n)
        )
    }

    /// Hands rows back without counting the attempt (binds: the sequences, the token).
    pub(crate) fn release(&self, n: usize) -> String {
        format!(
            "UPDATE {} SET attempts = GREATEST(attempts - 1, 0), lease_token = NULL, \
                 lease_expires_at = NULL \
             WHERE sequence IN ({}) AND lease_token = ? AND status = 0",
            self.quoted,
            marks(n)
        )
    }

    /// Replays the dead letters with `n` given ids (binds: the ids).
    pub(crate) fn replay_ids(&self, n: usize) -> String {
        replay_sql(&self.quoted, n)
    }
}

fn lock_subjects_sql(subject_locks: &str, n: usize) -> String {
    format!(
        "INSERT INTO `{subject_locks}` (subject_hash) VALUES {} \
         ON DUPLICATE KEY UPDATE subject_hash = subject_hash",
        vec!["(?)"; n].join(", ")
    )
}

/// Replays dead letters: all of them, or those with `n` given ids.
fn replay_sql(quoted: &str, n: usize) -> String {
    let filter = if n == 0 {
        String::new()
    } else {
        format!(" AND id IN ({})", marks(n))
    };
    format!(
        "UPDATE {quoted} SET status = 0, attempts = 0, \
             next_attempt_at = '1970-01-01 00:00:00', dead_lettered_at = NULL, \
             lease_token = NULL, lease_expires_at = NULL \
         WHERE status = 2{filter}"
    )
}

/// `?, ?, …` (`n` times).
fn marks(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// `WHEN ? THEN ? …` (`n` times).
fn cases(n: usize) -> String {
    vec!["WHEN ? THEN ?"; n].join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_match_binds() {
        let sql = Sql::new(&Ident::known("outbox"));
        let count = |s: &str| s.matches('?').count();
        assert_eq!(count(&sql.insert_many(3)), 27);
        assert_eq!(count(&sql.held_back(4)), 8);
        assert_eq!(count(&sql.lease(5)), 7);
        assert_eq!(count(&sql.retry(2)), 4 + 4 + 2 + 1);
        assert_eq!(count(&sql.dead(2)), 4 + 2 + 1);
        assert_eq!(count(&sql.release(3)), 4);
        assert_eq!(count(&sql.replay_ids(2)), 2);
        assert_eq!(count(&sql.replay_all), 0);
        assert_eq!(count(&sql.lock_subject), 1);
        assert_eq!(sql.lock_subjects(3).matches("(?)").count(), 3);
    }
}
