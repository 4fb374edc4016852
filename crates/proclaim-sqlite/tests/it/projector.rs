//! Projector checkpoints: the projector conformance suite on a fresh
//! database file per test, and what is particular to SQLite.

use std::path::{Path, PathBuf};
use std::time::Duration;

use proclaim_core::StoreError;
use proclaim_core::projector::{CheckpointStore, CheckpointTx, ProjectionError};
use proclaim_sqlite::{
    SqliteCheckpointOptions, SqliteCheckpointTx, SqliteCheckpoints, SqliteOutbox, projection_error,
};
use proclaim_testkit::conformance::Capabilities;
use proclaim_testkit::projector_conformance::CheckpointHarness;
use proclaim_testkit::unique_suffix;
use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};
use uuid::Uuid;

/// A directory of its own under the system temp dir, removed on drop (also
/// when the test panics).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path =
            std::env::temp_dir().join(format!("proclaim-sqlite-projector-{}", unique_suffix()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SQLite checkpoints in the conformance suite: a database file of its own
/// per test (WAL journal and a busy timeout, as
/// `SqliteOutbox::connect_options` sets them), holding the checkpoint table
/// and the projection's donations table.
struct SqliteCheckpointHarness {
    // Fields drop in order: the pool before the directory it lives in.
    store: SqliteCheckpoints,
    url: String,
    _dir: TempDir,
}

async fn pool(url: &str) -> SqlitePool {
    SqlitePoolOptions::new()
        .connect_with(SqliteOutbox::connect_options(url).unwrap())
        .await
        .unwrap()
}

impl CheckpointHarness for SqliteCheckpointHarness {
    type Store = SqliteCheckpoints;
    const CAPABILITIES: Capabilities = Capabilities {
        concurrent_writers: false,
    };

    async fn setup() -> Self {
        let dir = TempDir::new();
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("projections.db").display()
        );
        let store = SqliteCheckpoints::new(pool(&url).await);
        store.migrate().await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE donations (id INTEGER PRIMARY KEY AUTOINCREMENT, \
             projection TEXT NOT NULL, event_id TEXT NOT NULL, donor TEXT NOT NULL, \
             cents INTEGER NOT NULL)",
        )
        .execute(store.pool())
        .await
        .unwrap();
        SqliteCheckpointHarness {
            store,
            url,
            _dir: dir,
        }
    }

    fn store(&self) -> SqliteCheckpoints {
        self.store.clone()
    }

    async fn second_store(&self) -> SqliteCheckpoints {
        SqliteCheckpoints::new(pool(&self.url).await)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        self.store.migrate().await
    }

    fn named(&self, schema: &str, table: &str) -> Result<SqliteCheckpoints, StoreError> {
        // No schemas: the schema name is checked like a table name.
        SqliteCheckpointOptions::default()
            .with_table(schema)
            .validate()?;
        SqliteCheckpoints::with_options(
            self.store.pool().clone(),
            SqliteCheckpointOptions::default().with_table(table),
        )
    }

    async fn insert(
        &self,
        tx: &mut SqliteCheckpointTx,
        projection: &str,
        event_id: Uuid,
        donor: &str,
        cents: i64,
    ) -> Result<(), ProjectionError> {
        sqlx::query(
            "INSERT INTO donations (projection, event_id, donor, cents) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(projection)
        .bind(event_id.hyphenated().to_string())
        .bind(donor)
        .bind(cents)
        .execute(&mut **tx)
        .await
        .map_err(projection_error)?;
        Ok(())
    }

    async fn clear(
        &self,
        tx: &mut SqliteCheckpointTx,
        projection: &str,
    ) -> Result<(), ProjectionError> {
        sqlx::query("DELETE FROM donations WHERE projection = ?1")
            .bind(projection)
            .execute(&mut **tx)
            .await
            .map_err(projection_error)?;
        Ok(())
    }

    async fn rows(&self, projection: &str) -> Vec<(Uuid, String, i64)> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT event_id, donor, cents FROM donations WHERE projection = ?1 ORDER BY id",
        )
        .bind(projection)
        .fetch_all(self.store.pool())
        .await
        .unwrap();
        rows.into_iter()
            .map(|(id, donor, cents)| (Uuid::parse_str(&id).unwrap(), donor, cents))
            .collect()
    }
}

proclaim_testkit::projector_conformance!(SqliteCheckpointHarness);

#[tokio::test]
async fn the_default_table_and_a_named_one() {
    let h = <SqliteCheckpointHarness as CheckpointHarness>::setup().await;
    assert_eq!(h.store.table_name(), r#""proclaim_projector_checkpoints""#);
    let named = SqliteCheckpoints::with_options(
        h.store.pool().clone(),
        SqliteCheckpointOptions::default().with_table("read_model_positions"),
    )
    .unwrap();
    named.migrate().await.unwrap();
    let mut tx = named.begin("p").await.unwrap();
    tx.set_position(4).await.unwrap();
    tx.commit().await.unwrap();
    let n: i64 =
        sqlx::query_scalar("SELECT position FROM read_model_positions WHERE projection = 'p'")
            .fetch_one(h.store.pool())
            .await
            .unwrap();
    assert_eq!(n, 4);
    assert_eq!(h.store.position("p").await.unwrap(), 0, "another table");
}

/// SQLite has one writer at a time: while a batch is open, a batch of
/// another projection waits for it too (unlike PostgreSQL and MySQL), and
/// goes on once it ends.
#[tokio::test]
async fn batches_of_all_projections_take_turns() {
    let h = <SqliteCheckpointHarness as CheckpointHarness>::setup().await;
    let other = h.second_store().await;
    let mut a = h.store.begin("a").await.unwrap();
    a.set_position(1).await.unwrap();
    let b = tokio::spawn(async move {
        let mut b = other.begin("b").await.unwrap();
        b.set_position(2).await.unwrap();
        b.commit().await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.is_finished(), "one writer at a time");
    a.commit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), b)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(h.store.position("a").await.unwrap(), 1);
    assert_eq!(h.store.position("b").await.unwrap(), 2);
}
