//! Mapping sqlx errors to the core's transient / permanent split.

use proclaim_core::StoreError;

// Primary SQLite result codes (https://www.sqlite.org/rescode.html); sqlx
// reports the extended code, whose low byte is the primary one.
const SQLITE_NOMEM: i64 = 7;
const SQLITE_BUSY: i64 = 5;
const SQLITE_LOCKED: i64 = 6;
const SQLITE_IOERR: i64 = 10;
const SQLITE_FULL: i64 = 13;
const SQLITE_PROTOCOL: i64 = 15;

/// True when `err` is a database error whose primary SQLite result code is
/// one of `codes`.
fn has_code(err: &sqlx::Error, codes: &[i64]) -> bool {
    match err {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|code| code.parse::<i64>().ok())
            .is_some_and(|code| codes.contains(&(code & 0xff))),
        _ => false,
    }
}

/// Classifies a sqlx error: a busy or locked database (another writer held
/// the lock past `busy_timeout`), I/O trouble, a full disk and a broken
/// connection worker are [`StoreError::Unavailable`] — a retry can succeed;
/// everything else is [`StoreError::Database`], including a database file
/// that cannot be opened (a wrong path or missing permissions).
pub(crate) fn classify(err: sqlx::Error) -> StoreError {
    let transient = match &err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(_) => has_code(
            &err,
            &[
                SQLITE_BUSY,
                SQLITE_LOCKED,
                SQLITE_NOMEM,
                SQLITE_IOERR,
                SQLITE_FULL,
                SQLITE_PROTOCOL,
            ],
        ),
        _ => false,
    };
    if transient {
        StoreError::Unavailable(Box::new(err))
    } else {
        StoreError::Database(Box::new(err))
    }
}
