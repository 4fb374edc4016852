//! A PostgreSQL schema of its own for each test.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

/// The test database: `PROCLAIM_TEST_DATABASE_URL`, or the local `test` database.
pub fn database_url() -> String {
    std::env::var("PROCLAIM_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh schema named `t_<unique>`, dropped with everything in it when the
/// value is dropped (also when the test panics).
pub struct TestSchema {
    pub pool: PgPool,
    pub name: String,
}

/// Connections of one test carry its schema name as `application_name`, so
/// clean-up can end them even when the failing test left a transaction open.
fn tagged(name: &str) -> PgConnectOptions {
    PgConnectOptions::from_str(&database_url())
        .unwrap()
        .application_name(name)
}

impl TestSchema {
    pub async fn new() -> Self {
        let name = format!("t_{}", crate::unique_suffix());
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(tagged(&name))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {}: {e}", database_url()));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(r#"CREATE SCHEMA "{name}""#)))
            .execute(&pool)
            .await
            .unwrap();
        TestSchema { pool, name }
    }

    /// A second, independent pool on the same database (another "process").
    pub async fn another_pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(8)
            .connect_with(tagged(&self.name))
            .await
            .unwrap()
    }

    /// The URL a `proclaim` process should use.
    pub fn url(&self) -> String {
        database_url()
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // A test that failed may have left a transaction open on a runtime
        // that no longer runs; end its connections so the drop cannot hang.
        drop_on_own_runtime(format!(
            r#"SELECT pg_terminate_backend(pid) FROM pg_stat_activity
               WHERE application_name = '{name}' AND pid <> pg_backend_pid();
               DROP SCHEMA IF EXISTS "{name}" CASCADE"#,
            name = self.name
        ));
    }
}

/// Runs a clean-up statement from `Drop`, which may run inside a test's
/// runtime or while it unwinds: on a thread and runtime of its own.
fn drop_on_own_runtime(sql: String) {
    let cleanup = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            if let Ok(pool) = PgPoolOptions::new()
                .max_connections(1)
                .connect(&database_url())
                .await
            {
                if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                    .execute(&pool)
                    .await
                {
                    tracing::warn!(error = %e, %sql, "test clean-up failed");
                }
                pool.close().await;
            }
        });
    });
    let _ = cleanup.join();
}

/// A fresh database named `t_<unique>`, for a program whose schema names are
/// fixed; dropped (connections and all) when the value is dropped.
pub struct TestDatabase {
    pub name: String,
}

impl TestDatabase {
    pub async fn new() -> Self {
        let name = format!("t_{}", crate::unique_suffix());
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(&database_url())
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        TestDatabase { name }
    }

    /// The URL of this database (the test database's URL, other name).
    pub fn url(&self) -> String {
        let base = database_url();
        match base.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{}", self.name),
            None => base,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        drop_on_own_runtime(format!(
            r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#,
            self.name
        ));
    }
}
