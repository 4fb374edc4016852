//! A MySQL / MariaDB database of its own for each test.

use std::str::FromStr;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};

/// The test server: `PROCLAIM_TEST_MYSQL_URL`, or the local `test` database.
pub fn mysql_url() -> String {
    std::env::var("PROCLAIM_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

/// A fresh database named `t_<unique>`, dropped with everything in it when
/// the value is dropped (also when the test panics). In MySQL a database is
/// what PostgreSQL calls a schema.
pub struct TestMySqlDatabase {
    pub pool: MySqlPool,
    pub name: String,
}

impl TestMySqlDatabase {
    pub async fn new() -> Self {
        let name = format!("t_{}", crate::unique_suffix());
        let admin = MySqlPoolOptions::new()
            .max_connections(1)
            .connect(&mysql_url())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to MySQL at {}: {e}", mysql_url()));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        )))
        .execute(&admin)
        .await
        .unwrap();
        admin.close().await;
        let db = TestMySqlDatabase {
            pool: MySqlPoolOptions::new()
                .max_connections(8)
                .connect_lazy_with(options(&name)),
            name,
        };
        // Connect now, so a bad URL fails here (and the database is dropped).
        db.pool.acquire().await.unwrap();
        db
    }

    /// A second, independent pool on the same database (another "process").
    pub async fn another_pool(&self) -> MySqlPool {
        MySqlPoolOptions::new()
            .max_connections(8)
            .connect_with(options(&self.name))
            .await
            .unwrap()
    }

    /// The URL a `proclaim` process should use: the test server's URL with
    /// this database.
    pub fn url(&self) -> String {
        with_database(&mysql_url(), &self.name)
    }
}

impl Drop for TestMySqlDatabase {
    fn drop(&mut self) {
        drop_database_on_own_runtime(self.name.clone());
    }
}

fn options(database: &str) -> MySqlConnectOptions {
    MySqlConnectOptions::from_str(&mysql_url())
        .unwrap_or_else(|e| panic!("bad PROCLAIM_TEST_MYSQL_URL {}: {e}", mysql_url()))
        .database(database)
}

/// `url` with its database (the path) replaced by `database`; a query string
/// is kept.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let (scheme, rest) = base.split_once("://").unwrap_or(("mysql", base));
    let authority = rest
        .split_once('/')
        .map_or(rest, |(authority, _)| authority);
    match query {
        Some(query) => format!("{scheme}://{authority}/{database}?{query}"),
        None => format!("{scheme}://{authority}/{database}"),
    }
}

/// Drops the database from `Drop`, which may run inside a test's runtime or
/// while it unwinds: on a thread and runtime of its own. Connections still
/// using the database (a test that panicked inside a transaction holds
/// metadata locks that would make `DROP DATABASE` wait) are killed first,
/// as PostgreSQL's `DROP DATABASE … WITH (FORCE)` does.
fn drop_database_on_own_runtime(name: String) {
    let cleanup = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let Ok(pool) = MySqlPoolOptions::new()
                .max_connections(1)
                .connect(&mysql_url())
                .await
            else {
                tracing::warn!(database = %name, "test clean-up could not connect");
                return;
            };
            let others: Vec<u64> = sqlx::query_scalar(
                "SELECT CAST(id AS UNSIGNED) FROM information_schema.processlist \
                 WHERE db = ? AND id <> CONNECTION_ID()",
            )
            .bind(&name)
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
            for id in others {
                // The connection may have closed in the meantime.
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("KILL {id}")))
                    .execute(&pool)
                    .await;
            }
            let sql = format!("DROP DATABASE IF EXISTS `{name}`");
            if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                .execute(&pool)
                .await
            {
                tracing::warn!(error = %e, %sql, "test clean-up failed");
            }
            pool.close().await;
        });
    });
    let _ = cleanup.join();
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            with_database("mysql://root@127.0.0.1:3306/test", "t_1"),
            "mysql://root@127.0.0.1:3306/t_1"
        );
        assert_eq!(
            with_database("mysql://u:p@h:3306/test?ssl-mode=disabled", "t_1"),
            "mysql://u:p@h:3306/t_1?ssl-mode=disabled"
        );
        assert_eq!(with_database("mysql://h", "t_1"), "mysql://h/t_1");
    }
}
