-- proclaim outbox for SQLite, version 1. {table} is a validated identifier.
-- Times are INTEGER microseconds since the Unix epoch (UTC), all taken from
-- one clock: the writer's and the relay's, passed in as parameters.
CREATE TABLE IF NOT EXISTS "{table}" (
    sequence         INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT    NOT NULL,
    event_type       TEXT    NOT NULL,
    source           TEXT    NOT NULL,
    subject          TEXT    NOT NULL,
    event_time       INTEGER NOT NULL,
    datacontenttype  TEXT    NOT NULL,
    dataschema       TEXT,
    data             TEXT    NOT NULL,
    metadata         TEXT    NOT NULL DEFAULT '{}',
    created_at       INTEGER NOT NULL,
    -- 0 = pending, 1 = published (kept for retention), 2 = dead-lettered
    status           INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL DEFAULT 0,
    lease_token      TEXT,
    lease_expires_at INTEGER,
    last_error       TEXT,
    published_at     INTEGER,
    dead_lettered_at INTEGER
) STRICT;
CREATE UNIQUE INDEX IF NOT EXISTS "{table}_id_key" ON "{table}" (id);
CREATE INDEX IF NOT EXISTS "{table}_pending_idx" ON "{table}" (sequence) WHERE status = 0;
CREATE INDEX IF NOT EXISTS "{table}_pending_subject_idx" ON "{table}" (subject, sequence) WHERE status = 0;
CREATE INDEX IF NOT EXISTS "{table}_published_idx" ON "{table}" (published_at) WHERE status = 1;
CREATE INDEX IF NOT EXISTS "{table}_dead_idx" ON "{table}" (sequence) WHERE status = 2;
