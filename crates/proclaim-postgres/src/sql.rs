//! The statements of one outbox table, built once with its checked names.

use std::sync::Arc;

use crate::ident::{Ident, fnv1a};

const COLUMNS: &str =
    "id, event_type, source, subject, event_time, datacontenttype, dataschema, data, metadata";

/// Transaction-local planner settings of the claim and the gauges: walk the
/// partial indexes from the claim floor, as one generic plan without JIT
/// (the reasons are at `claim_setup`).
const INDEX_WALK_SETTINGS: &str = "set_config('enable_seqscan', 'off', true), \
     set_config('enable_bitmapscan', 'off', true), \
     set_config('jit', 'off', true), \
     set_config('plan_cache_mode', 'force_generic_plan', true)";

pub(crate) struct Sql {
    pub(crate) qualified: String,
    pub(crate) channel: String,
    pub(crate) insert_one: Arc<str>,
    pub(crate) lock_keys: Arc<str>,
    pub(crate) insert_many: Arc<str>,
    pub(crate) notify: Arc<str>,
    /// `insert_one` without the `NOTIFY`: for debounced writers and for
    /// outboxes with wake-ups turned off.
    pub(crate) insert_one_quiet: Arc<str>,
    /// `insert_one` that keeps an event already there (same id): a fan-out
    /// lane's write (`Stage`).
    pub(crate) stage_one: Arc<str>,
    /// `stage_one` without the `NOTIFY`.
    pub(crate) stage_one_quiet: Arc<str>,
    pub(crate) claim_setup: Arc<str>,
    /// The claim's walk in write order, within a window past the oldest
    /// pending event; returns `more` and `hi` after the record columns.
    pub(crate) claim: Arc<str>,
    /// The claim beyond the window: one head per subject.
    pub(crate) claim_heads: Arc<str>,
    /// Turns sorting back on for `claim_heads` (the claim turns it off).
    pub(crate) sort_on: Arc<str>,
    /// The identity sequence's last value; read before `floor_probe`.
    pub(crate) last_sequence: Arc<str>,
    /// The transactions holding a subject lock; read after `last_sequence`.
    pub(crate) floor_writers: Arc<str>,
    /// The lowest pending sequence at or above `$1`; read after
    /// `floor_writers` (see [`crate::floor`]).
    pub(crate) floor_probe: Arc<str>,
    pub(crate) delete_published: Arc<str>,
    pub(crate) mark_published: Arc<str>,
    pub(crate) retry: Arc<str>,
    pub(crate) dead: Arc<str>,
    pub(crate) release: Arc<str>,
    pub(crate) purge: Arc<str>,
    pub(crate) stats_setup: Arc<str>,
    pub(crate) stats: Arc<str>,
    pub(crate) dead_letters: Arc<str>,
    pub(crate) replay: Arc<str>,
    pub(crate) schema_version: Arc<str>,
}

impl Sql {
    pub(crate) fn new(schema: &Ident, table: &Ident) -> Self {
        let (s, t) = (schema.as_str(), table.as_str());
        let q = format!(r#""{s}"."{t}""#);
        let mut channel = format!("proclaim_{s}_{t}");
        if channel.len() > 63 {
            channel = format!("proclaim_{:08x}", fnv1a(&[s, t]) as u32);
        }
        let lock_class = fnv1a(&["proclaim", s, t]);
        let claim_lock = (i64::from(lock_class) << 32) | 0x636c_6169;
        // pg_locks shows an advisory lock's first key as an unsigned oid.
        let lock_oid = lock_class as u32;
        // One `INSERT` with the subject's advisory lock, with or without a
        // `NOTIFY` in the same statement. The lock is taken before the
        // identity value is drawn (see `crate::floor`).
        let insert_one = |wake_cte: &str, wake_from: &str, on_conflict: &str| -> Arc<str> {
            format!(
                "WITH key_lock AS (SELECT pg_advisory_xact_lock({lock_class}, $10)){wake_cte} \
                 INSERT INTO {q} ({COLUMNS}) \
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8::json, $9::jsonb FROM key_lock{wake_from}{on_conflict}"
            )
            .into()
        };
        let wake_cte = format!(", wake AS (SELECT pg_notify('{channel}', ''))");
        let returning = "o.sequence, o.id, o.event_type, o.source, o.subject, o.event_time, \
             o.datacontenttype, o.dataschema, o.data::text, o.metadata::text, o.attempts, o.created_at";
        let a = |sql: String| -> Arc<str> { sql.into() };
        // The relay's own writes (leases and outcomes) need not wait for the
        // WAL flush: if the database loses the last of them in a crash, the
        // events are claimed and published again — a duplicate, never a loss.
        let async_commit =
            "WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true))";
        Sql {
            insert_one: insert_one(&wake_cte, ", wake", ""),
            insert_one_quiet: insert_one("", "", ""),
            stage_one: insert_one(&wake_cte, ", wake", " ON CONFLICT (id) DO NOTHING"),
            stage_one_quiet: insert_one("", "", " ON CONFLICT (id) DO NOTHING"),
            lock_keys: a(format!(
                "SELECT count(*) FROM (SELECT pg_advisory_xact_lock({lock_class}, k) \
                 FROM unnest($1::int4[]) AS u(k)) AS locks"
            )),
            insert_many: a(format!(
                "INSERT INTO {q} ({COLUMNS}) \
                 SELECT e.id, e.event_type, e.source, e.subject, e.event_time, e.datacontenttype, \
                        e.dataschema, e.data::json, e.metadata::jsonb \
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], \
                             $6::text[], $7::text[], $8::text[], $9::text[]) \
                      AS e(id, event_type, source, subject, event_time, datacontenttype, dataschema, data, metadata)"
            )),
            notify: a(format!("SELECT pg_notify('{channel}', '')")),
            // `picked` skips rows another transaction holds locked (SKIP
            // LOCKED); `heads` then keeps only rows with no pending
            // predecessor outside the claim — a skipped, locked predecessor
            // (e.g. a stale relay recording its retry) must still block its
            // subject. Claims run one at a time per table (the advisory lock), and the
            // planner is steered to walk the pending index in sequence order:
            // with autovacuum off or behind, stale statistics would otherwise
            // pick a bitmap scan and sort the whole backlog on every claim.
            // The claim and the floor probe run as generic plans: planning a
            // custom plan for `sequence >= <constant>` makes PostgreSQL read the
            // index's actual lowest value, stepping over the dead entries at
            // its start (20 ms and 5,700 buffers per claim on a 500,000-row
            // drain without vacuum, four times the claim's execution). The
            // generic plan's estimated cost (its LIMIT is a parameter) passes
            // `jit_above_cost`, and JIT made a 49 ms claim take 181 ms: JIT off.
            claim_setup: a(format!(
                "SELECT set_config('synchronous_commit', 'off', true), \
                        set_config('enable_sort', 'off', true), \
                        {INDEX_WALK_SETTINGS}, \
                        pg_advisory_xact_lock({claim_lock})"
            )),
            // `OFFSET 0` keeps both "no blocking predecessor" checks per-row
            // probes of (subject, sequence); pulled up into anti-joins, the
            // planner scanned (or hashed) every pending row once per claim:
            // O(backlog), 1.7 s per claim on a 1,000,000-event backlog.
            // The walk in write order stops at a window of `$5` sequence
            // numbers past the oldest pending event (`bound`): when most
            // subjects have their head in flight or waiting for a retry,
            // nearly every row fails the predecessor check, and an unbounded
            // walk crossed the whole backlog (3.3 s with 997 of 1,000 subjects
            // in flight, 700,000 events). `more` tells the caller that events
            // lie beyond the window; `claim_heads` then takes subject heads
            // from there. The final LEFT JOIN returns one row (NULL sequence)
            // even when nothing was claimed, to carry `more` and `hi`.
            claim: a(format!(
                "WITH bound AS MATERIALIZED ( \
                   SELECT f.lo + $5 AS hi, \
                          EXISTS (SELECT 1 FROM {q} b \
                                  WHERE b.status = 0 AND b.sequence >= f.lo + $5) AS more \
                   FROM (SELECT coalesce(min(m.sequence), $4) AS lo FROM {q} m \
                         WHERE m.status = 0 AND m.sequence >= $4) AS f), \
                 picked AS ( \
                   SELECT c.sequence FROM {q} c \
                   WHERE c.status = 0 AND c.sequence >= $4 AND c.sequence < (SELECT hi FROM bound) \
                     AND c.next_attempt_at <= now() \
                     AND (c.lease_expires_at IS NULL OR c.lease_expires_at <= now()) \
                     AND NOT EXISTS ( \
                       SELECT 1 FROM {q} p \
                       WHERE p.status = 0 AND p.subject = c.subject \
                         AND p.sequence >= $4 AND p.sequence < c.sequence \
                         AND (p.next_attempt_at > now() OR p.lease_expires_at > now()) \
                       OFFSET 0) \
                   ORDER BY c.sequence \
                   LIMIT $2 \
                   FOR UPDATE OF c SKIP LOCKED), \
                 heads AS ( \
                   SELECT k.sequence FROM picked k JOIN {q} c ON c.sequence = k.sequence \
                   WHERE NOT EXISTS ( \
                     SELECT 1 FROM {q} p \
                     WHERE p.status = 0 AND p.subject = c.subject \
                       AND p.sequence >= $4 AND p.sequence < c.sequence \
                       AND NOT EXISTS (SELECT 1 FROM picked x WHERE x.sequence = p.sequence) \
                     OFFSET 0)), \
                 claimed AS ( \
                   UPDATE {q} o SET lease_token = $1, \
                       lease_expires_at = now() + make_interval(secs => $3::float8), \
                       attempts = o.attempts + 1 \
                   FROM heads WHERE o.sequence = heads.sequence \
                   RETURNING {returning}) \
                 SELECT c.*, b.more, b.hi FROM bound b LEFT JOIN claimed c ON true"
            )),
            // The claim past its window: the head (lowest pending event) of
            // each subject at or beyond `$5`, found by a skip scan that
            // probes the (subject, sequence) index once per subject, oldest
            // first. A head has no pending predecessor by construction (the
            // floor `$4` is at or below every pending event), so only its
            // own lease and retry time are checked. Runs after
            // `sort_on`: ordering the heads needs a sort.
            claim_heads: a(format!(
                "WITH RECURSIVE subject_heads(subject, sequence) AS ( \
                   (SELECT h.subject, h.sequence FROM {q} h \
                    WHERE h.status = 0 AND h.sequence >= $4 \
                    ORDER BY h.subject, h.sequence LIMIT 1) \
                   UNION ALL \
                   SELECT n.subject, n.sequence FROM subject_heads s CROSS JOIN LATERAL ( \
                     SELECT h.subject, h.sequence FROM {q} h \
                     WHERE h.status = 0 AND h.subject > s.subject AND h.sequence >= $4 \
                     ORDER BY h.subject, h.sequence LIMIT 1) n), \
                 picked AS ( \
                   SELECT c.sequence FROM subject_heads s JOIN {q} c ON c.sequence = s.sequence \
                   WHERE c.status = 0 AND c.sequence >= $5 AND c.next_attempt_at <= now() \
                     AND (c.lease_expires_at IS NULL OR c.lease_expires_at <= now()) \
                   ORDER BY c.sequence \
                   LIMIT $2 \
                   FOR UPDATE OF c SKIP LOCKED) \
                 UPDATE {q} o SET lease_token = $1, \
                     lease_expires_at = now() + make_interval(secs => $3::float8), \
                     attempts = o.attempts + 1 \
                 FROM picked WHERE o.sequence = picked.sequence \
                 RETURNING {returning}"
            )),
            sort_on: a("SELECT set_config('enable_sort', 'on', true)".to_owned()),
            last_sequence: a(format!(
                "SELECT coalesce(pg_sequence_last_value( \
                   pg_get_serial_sequence('{q}', 'sequence')::regclass), 0)"
            )),
            // Subject locks are (class, key) pairs: objsubid 2. The claim
            // lock is one bigint in the same class (objsubid 1).
            floor_writers: a(format!(
                "SELECT coalesce(array_agg(DISTINCT virtualtransaction::text), '{{}}') \
                 FROM pg_locks WHERE locktype = 'advisory' AND granted \
                   AND classid = {lock_oid}::oid AND objsubid = 2"
            )),
            floor_probe: a(format!(
                "SELECT min(sequence) FROM {q} WHERE status = 0 AND sequence >= $1"
            )),
            delete_published: a(format!(
                "{async_commit} DELETE FROM {q} USING async_commit \
                 WHERE sequence = ANY($1) AND lease_token = $2"
            )),
            mark_published: a(format!(
                "{async_commit} UPDATE {q} SET status = 1, published_at = now(), lease_token = NULL, \
                 lease_expires_at = NULL, last_error = NULL FROM async_commit \
                 WHERE sequence = ANY($1) AND lease_token = $2"
            )),
            retry: a(format!(
                "{async_commit} UPDATE {q} o SET next_attempt_at = now() + make_interval(secs => d.delay), \
                     last_error = d.error, lease_token = NULL, lease_expires_at = NULL \
                 FROM async_commit, unnest($1::int8[], $2::float8[], $3::text[]) AS d(seq, delay, error) \
                 WHERE o.sequence = d.seq AND o.lease_token = $4"
            )),
            dead: a(format!(
                "{async_commit} UPDATE {q} o SET status = 2, dead_lettered_at = now(), last_error = d.error, \
                     lease_token = NULL, lease_expires_at = NULL \
                 FROM async_commit, unnest($1::int8[], $2::text[]) AS d(seq, error) \
                 WHERE o.sequence = d.seq AND o.lease_token = $3"
            )),
            release: a(format!(
                "{async_commit} UPDATE {q} SET attempts = greatest(attempts - 1, 0), lease_token = NULL, \
                 lease_expires_at = NULL FROM async_commit WHERE sequence = ANY($1) AND lease_token = $2"
            )),
            purge: a(format!(
                "DELETE FROM {q} WHERE status = 1 AND published_at < now() - make_interval(secs => $1::float8)"
            )),
            // Each count walks its own partial index (pending ones from the
            // claim floor), never the whole table: without vacuum the table
            // grows by every delivered row, and a scan of it every
            // `stats_interval` evicted the claim's pages from the cache.
            stats_setup: a(format!("SELECT {INDEX_WALK_SETTINGS}")),
            stats: a(format!(
                "SELECT p.ready, p.leased, \
                   (SELECT count(*) FROM {q} WHERE status = 2), \
                   (SELECT count(*) FROM {q} WHERE status = 1), \
                   coalesce(floor(extract(epoch FROM now() - p.oldest) * 1000), 0)::int8 \
                 FROM (SELECT \
                   count(*) FILTER (WHERE lease_expires_at IS NULL OR lease_expires_at <= now()) AS ready, \
                   count(*) FILTER (WHERE lease_expires_at > now()) AS leased, \
                   min(created_at) AS oldest \
                   FROM {q} WHERE status = 0 AND sequence >= $1) AS p"
            )),
            dead_letters: a(format!(
                "SELECT sequence, id, event_type, subject, attempts, coalesce(last_error, ''), dead_lettered_at \
                 FROM {q} WHERE status = 2 ORDER BY sequence LIMIT $1"
            )),
            // Replay re-inserts each event with a new sequence (in its old
            // order) rather than reopening the row: a claim floor may already
            // have passed the old one. Like a writer, it holds a subject lock
            // (key 0, shared) while it draws sequences (see `crate::floor`).
            replay: a(format!(
                "WITH writer AS MATERIALIZED (SELECT pg_advisory_xact_lock_shared({lock_class}, 0)), \
                 moved AS ( \
                   DELETE FROM {q} WHERE status = 2 AND ($1::uuid[] IS NULL OR id = ANY($1)) \
                   RETURNING sequence, {COLUMNS}, created_at) \
                 INSERT INTO {q} ({COLUMNS}, created_at) \
                 SELECT {COLUMNS}, created_at FROM writer, moved ORDER BY moved.sequence"
            )),
            schema_version: a(format!(
                r#"SELECT max(version) FROM "{s}"."{t}_migrations""#
            )),
            qualified: q,
            channel,
        }
    }
}
