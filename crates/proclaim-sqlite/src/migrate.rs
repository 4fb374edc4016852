//! Running a migration script: one `BEGIN IMMEDIATE` transaction, so
//! concurrent runs take turns.

use proclaim_core::StoreError;
use sqlx::AssertSqlSafe;
use sqlx::sqlite::SqlitePool;

use crate::error::classify;

/// Takes the database's write lock up front: a transaction that begins so
/// never fails half-way when upgrading a read to a write, and those of
/// other connections wait for it (up to the pool's busy timeout).
pub(crate) const BEGIN_IMMEDIATE: &str = "BEGIN IMMEDIATE";

/// Runs `script` (idempotent DDL) in one `BEGIN IMMEDIATE` transaction.
pub(crate) async fn migrate_immediate(pool: &SqlitePool, script: &str) -> Result<(), StoreError> {
    let mut tx = pool.begin_with(BEGIN_IMMEDIATE).await.map_err(classify)?;
    sqlx::raw_sql(AssertSqlSafe(script.to_owned()))
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
    tx.commit().await.map_err(classify)
}
