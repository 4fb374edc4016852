//! Mapping sqlx errors to the core's transient / permanent split.

use proclaim_core::StoreError;
use sqlx::mysql::MySqlDatabaseError;

/// Server error numbers a retry can get past: too many connections (1040),
/// server shutdown (1053), lock wait timeout (1205), deadlock (1213), query
/// interrupted (1317), lock not available with NOWAIT (3572), connection
/// killed (1927, MariaDB), client interaction timeout (4031, MySQL), and the
/// client-side "server has gone away" / "lost connection" (2006, 2013).
const TRANSIENT: &[u16] = &[1040, 1053, 1205, 1213, 1317, 1927, 2006, 2013, 3572, 4031];

/// Classifies a sqlx error: connection trouble and conflicts that a retry can
/// resolve are [`StoreError::Unavailable`]; everything else is
/// [`StoreError::Database`].
pub(crate) fn classify(err: sqlx::Error) -> StoreError {
    if is_transient(&err) {
        StoreError::Unavailable(Box::new(err))
    } else {
        StoreError::Database(Box::new(err))
    }
}

fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let number = db
                .try_downcast_ref::<MySqlDatabaseError>()
                .map(MySqlDatabaseError::number);
            // SQLSTATE class 08: connection exception; 40001: serialization
            // failure (InnoDB reports deadlocks with it).
            number.is_some_and(|n| TRANSIENT.contains(&n))
                || db
                    .code()
                    .is_some_and(|code| code.starts_with("08") || code == "40001")
        }
        _ => false,
    }
}

/// The server's error number, if `err` came from the server.
pub(crate) fn error_number(err: &sqlx::Error) -> Option<u16> {
    match err {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .map(MySqlDatabaseError::number),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_and_io_errors_are_transient() {
        assert!(classify(sqlx::Error::PoolTimedOut).is_transient());
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(classify(sqlx::Error::Io(io)).is_transient());
        assert!(!classify(sqlx::Error::RowNotFound).is_transient());
    }
}
