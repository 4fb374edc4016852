-- proclaim outbox for MySQL 8.0+ and MariaDB 10.6+, version 1.
-- {table}, {claim_lock} and {subject_locks} are validated identifiers.
-- Statements end with a semicolon at the end of a line (the migration runner
-- splits on that), so comments here must not end a line with one.
CREATE TABLE IF NOT EXISTS `{table}` (
    sequence         BIGINT        NOT NULL AUTO_INCREMENT,
    id               CHAR(36)      CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    event_type       VARCHAR(255)  NOT NULL,
    source           VARCHAR(1024) NOT NULL,
    subject          VARCHAR(1024) NOT NULL,
    -- The ordering key's hash, so "earlier events of this subject" is an
    -- index lookup (the subject itself is too long for an index key).
    subject_crc      INT UNSIGNED  AS (CRC32(subject)) STORED,
    event_time       DATETIME(6)   NOT NULL,
    datacontenttype  VARCHAR(255)  NOT NULL,
    dataschema       VARCHAR(1024) NULL,
    -- The payload's exact bytes (the JSON type would re-format them).
    data             LONGTEXT      NOT NULL,
    metadata         MEDIUMTEXT    NOT NULL,
    -- All times are UTC, from the database's clock (UTC_TIMESTAMP(6)).
    created_at       DATETIME(6)   NOT NULL,
    -- 0 = pending, 1 = published (kept for retention), 2 = dead-lettered
    status           TINYINT       NOT NULL DEFAULT 0,
    attempts         INT           NOT NULL DEFAULT 0,
    next_attempt_at  DATETIME(6)   NOT NULL DEFAULT '1970-01-01 00:00:00.000000',
    lease_token      CHAR(36)      CHARACTER SET ascii COLLATE ascii_bin NULL,
    lease_expires_at DATETIME(6)   NULL,
    last_error       TEXT          NULL,
    published_at     DATETIME(6)   NULL,
    dead_lettered_at DATETIME(6)   NULL,
    PRIMARY KEY (sequence),
    UNIQUE KEY id_key (id),
    KEY status_idx (status, sequence),
    KEY subject_idx (subject_crc, status, sequence),
    KEY published_idx (status, published_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- One row: claims lock it, so they run one at a time per outbox.
CREATE TABLE IF NOT EXISTS `{claim_lock}` (
    id TINYINT NOT NULL PRIMARY KEY
) ENGINE = InnoDB;

INSERT IGNORE INTO `{claim_lock}` (id) VALUES (1);

-- Writers lock the row of their subject's hash for the rest of their
-- transaction. All rows exist up front, so a lock is always a plain row lock.
CREATE TABLE IF NOT EXISTS `{subject_locks}` (
    subject_hash INT NOT NULL PRIMARY KEY
) ENGINE = InnoDB;

INSERT IGNORE INTO `{subject_locks}` (subject_hash)
SELECT a.n + 16 * b.n + 256 * c.n + 4096 * d.n
FROM (SELECT 0 AS n UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4
      UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9
      UNION ALL SELECT 10 UNION ALL SELECT 11 UNION ALL SELECT 12 UNION ALL SELECT 13
      UNION ALL SELECT 14 UNION ALL SELECT 15) AS a
CROSS JOIN (SELECT 0 AS n UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4
      UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9
      UNION ALL SELECT 10 UNION ALL SELECT 11 UNION ALL SELECT 12 UNION ALL SELECT 13
      UNION ALL SELECT 14 UNION ALL SELECT 15) AS b
CROSS JOIN (SELECT 0 AS n UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4
      UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9
      UNION ALL SELECT 10 UNION ALL SELECT 11 UNION ALL SELECT 12 UNION ALL SELECT 13
      UNION ALL SELECT 14 UNION ALL SELECT 15) AS c
CROSS JOIN (SELECT 0 AS n UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4
      UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9
      UNION ALL SELECT 10 UNION ALL SELECT 11 UNION ALL SELECT 12 UNION ALL SELECT 13
      UNION ALL SELECT 14 UNION ALL SELECT 15) AS d;
