//! Running a migration script: one transaction under an advisory lock, so
//! concurrent runs take turns.

use proclaim_core::StoreError;
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPool;

use crate::error::classify;

/// Runs `script` (idempotent DDL) in one transaction that first takes the
/// transaction-scoped advisory lock `lock`.
pub(crate) async fn migrate_locked(
    pool: &PgPool,
    lock: i64,
    script: &str,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.map_err(classify)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(lock)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
    sqlx::raw_sql(AssertSqlSafe(script.to_owned()))
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
    tx.commit().await.map_err(classify)
}
