//! Serializing migrations: MySQL commits every DDL statement at once, so a
//! migration cannot run in a transaction; concurrent runs take a named lock
//! (`GET_LOCK`) instead.

use proclaim_core::StoreError;
use sqlx::mysql::MySqlPool;
use sqlx::{AssertSqlSafe, MySqlConnection};

use crate::error::classify;
use crate::ident::{Ident, fnv1a};

/// How long `migrate` waits for another process's migration to finish.
const MIGRATE_LOCK_WAIT_SECS: i64 = 60;

/// Runs `work` on one connection while holding the named lock
/// `<prefix>-<hash of database and table>`, and returns the database of the
/// connection URL. `what` names the migrated tables in the error of a lock
/// that stayed taken for too long. The lock is released whether `work`
/// succeeds or not; the error of `work` comes first.
pub(crate) async fn with_migrate_lock(
    pool: &MySqlPool,
    prefix: &str,
    table: &Ident,
    what: String,
    work: impl AsyncFnOnce(&mut MySqlConnection) -> Result<(), StoreError>,
) -> Result<String, StoreError> {
    let mut conn = pool.acquire().await.map_err(classify)?;
    // GET_LOCK belongs to the session: should this future be dropped half
    // way, closing the connection (not pooling it) releases the lock.
    conn.close_on_drop();
    let database: Option<String> = sqlx::query_scalar("SELECT DATABASE()")
        .fetch_one(&mut *conn)
        .await
        .map_err(classify)?;
    let database = database.ok_or_else(|| {
        StoreError::Config(
            "the MySQL connection URL names no database (mysql://host/<database>)".into(),
        )
    })?;
    let lock = format!(
        "{prefix}-{:08x}",
        fnv1a(&[&database, table.as_str()]) as u32
    );
    let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
        .bind(&lock)
        .bind(MIGRATE_LOCK_WAIT_SECS)
        .fetch_one(&mut *conn)
        .await
        .map_err(classify)?;
    if got != Some(1) {
        return Err(StoreError::Unavailable(
            format!(
                "another migration of {what} held the lock {lock:?} for more than {MIGRATE_LOCK_WAIT_SECS}s"
            )
            .into(),
        ));
    }
    let result = work(&mut conn).await;
    let released = sqlx::query("SELECT RELEASE_LOCK(?)")
        .bind(&lock)
        .execute(&mut *conn)
        .await;
    result?;
    released.map_err(classify)?;
    Ok(database)
}

/// Runs idempotent DDL statements one after the other, stopping at the
/// first that fails.
pub(crate) async fn execute_all(
    conn: &mut MySqlConnection,
    statements: &[String],
) -> Result<(), StoreError> {
    for statement in statements {
        sqlx::raw_sql(AssertSqlSafe(statement.clone()))
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
    }
    Ok(())
}
