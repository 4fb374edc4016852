//! Mapping sqlx errors to the core's transient / permanent split.

use proclaim_core::StoreError;

/// Classifies a sqlx error: connection trouble and conflicts that a retry can
/// resolve are [`StoreError::Unavailable`]; everything else is
/// [`StoreError::Database`].
pub(crate) fn classify(err: sqlx::Error) -> StoreError {
    let transient = match &err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 40001 serialization failure; 40P01
            // deadlock; 53: insufficient resources; 55P03 lock not available;
            // 57P01-57P03: server shutting down / cannot connect now.
            code.starts_with("08")
                || code.starts_with("53")
                || matches!(
                    &*code,
                    "40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03"
                )
        }),
        _ => false,
    };
    if transient {
        StoreError::Unavailable(Box::new(err))
    } else {
        StoreError::Database(Box::new(err))
    }
}
