-- proclaim outbox, version 1. {schema} and {table} are validated identifiers.
CREATE TABLE IF NOT EXISTS "{schema}"."{table}" (
    sequence         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id               UUID        NOT NULL,
    event_type       TEXT        NOT NULL,
    source           TEXT        NOT NULL,
    subject          TEXT        NOT NULL,
    event_time       TIMESTAMPTZ NOT NULL,
    datacontenttype  TEXT        NOT NULL,
    dataschema       TEXT,
    data             JSON        NOT NULL,
    metadata         JSONB       NOT NULL DEFAULT '{}'::jsonb,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    -- 0 = pending, 1 = published (kept for retention), 2 = dead-lettered
    status           SMALLINT    NOT NULL DEFAULT 0,
    attempts         INTEGER     NOT NULL DEFAULT 0,
    next_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    lease_token      UUID,
    lease_expires_at TIMESTAMPTZ,
    last_error       TEXT,
    published_at     TIMESTAMPTZ,
    dead_lettered_at TIMESTAMPTZ
);
CREATE UNIQUE INDEX IF NOT EXISTS "{table}_id_key" ON "{schema}"."{table}" (id);
CREATE INDEX IF NOT EXISTS "{table}_pending_idx" ON "{schema}"."{table}" (sequence) WHERE status = 0;
CREATE INDEX IF NOT EXISTS "{table}_pending_subject_idx" ON "{schema}"."{table}" (subject, sequence) WHERE status = 0;
CREATE INDEX IF NOT EXISTS "{table}_published_idx" ON "{schema}"."{table}" (published_at) WHERE status = 1;
CREATE INDEX IF NOT EXISTS "{table}_dead_idx" ON "{schema}"."{table}" (sequence) WHERE status = 2;
