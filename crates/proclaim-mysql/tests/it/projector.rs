//! Projector checkpoints: the projector conformance suite on a database of
//! its own per test, and what is particular to MySQL / MariaDB.

use std::time::Duration;

use proclaim_core::StoreError;
use proclaim_core::projector::{CheckpointStore, CheckpointTx, ProjectionError};
use proclaim_mysql::{
    MySqlCheckpointOptions, MySqlCheckpointTx, MySqlCheckpoints, projection_error,
};
use proclaim_testkit::conformance::Capabilities;
use proclaim_testkit::mysql::TestMySqlDatabase;
use proclaim_testkit::projector_conformance::CheckpointHarness;
use uuid::Uuid;

/// MySQL checkpoints in the conformance suite: a database of its own per
/// test, holding the checkpoint table and the projection's donations table.
struct MySqlCheckpointHarness {
    db: TestMySqlDatabase,
    store: MySqlCheckpoints,
}

impl CheckpointHarness for MySqlCheckpointHarness {
    type Store = MySqlCheckpoints;
    const CAPABILITIES: Capabilities = Capabilities {
        concurrent_writers: true,
    };

    async fn setup() -> Self {
        let db = TestMySqlDatabase::new().await;
        let store = MySqlCheckpoints::new(db.pool.clone());
        store.migrate().await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE donations (id BIGINT AUTO_INCREMENT PRIMARY KEY, \
             projection VARCHAR(255) NOT NULL, event_id CHAR(36) NOT NULL, \
             donor VARCHAR(255) NOT NULL, cents BIGINT NOT NULL) ENGINE = InnoDB",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        MySqlCheckpointHarness { db, store }
    }

    fn store(&self) -> MySqlCheckpoints {
        self.store.clone()
    }

    async fn second_store(&self) -> MySqlCheckpoints {
        MySqlCheckpoints::new(self.db.another_pool().await)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        self.store.migrate().await
    }

    fn named(&self, schema: &str, table: &str) -> Result<MySqlCheckpoints, StoreError> {
        // No schemas: the schema name is checked like a table name.
        MySqlCheckpointOptions::default()
            .with_table(schema)
            .validate()?;
        MySqlCheckpoints::with_options(
            self.db.pool.clone(),
            MySqlCheckpointOptions::default().with_table(table),
        )
    }

    async fn insert(
        &self,
        tx: &mut MySqlCheckpointTx,
        projection: &str,
        event_id: Uuid,
        donor: &str,
        cents: i64,
    ) -> Result<(), ProjectionError> {
        sqlx::query(
            "INSERT INTO donations (projection, event_id, donor, cents) VALUES (?, ?, ?, ?)",
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
        tx: &mut MySqlCheckpointTx,
        projection: &str,
    ) -> Result<(), ProjectionError> {
        sqlx::query("DELETE FROM donations WHERE projection = ?")
            .bind(projection)
            .execute(&mut **tx)
            .await
            .map_err(projection_error)?;
        Ok(())
    }

    async fn rows(&self, projection: &str) -> Vec<(Uuid, String, i64)> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT event_id, donor, cents FROM donations WHERE projection = ? ORDER BY id",
        )
        .bind(projection)
        .fetch_all(&self.db.pool)
        .await
        .unwrap();
        rows.into_iter()
            .map(|(id, donor, cents)| (Uuid::parse_str(&id).unwrap(), donor, cents))
            .collect()
    }
}

proclaim_testkit::projector_conformance!(MySqlCheckpointHarness);

#[tokio::test]
async fn the_default_table_and_a_named_one() {
    let db = TestMySqlDatabase::new().await;
    assert_eq!(
        MySqlCheckpoints::new(db.pool.clone()).table_name(),
        "`proclaim_projector_checkpoints`"
    );
    let named = MySqlCheckpoints::with_options(
        db.pool.clone(),
        MySqlCheckpointOptions::default().with_table("read_model_positions"),
    )
    .unwrap();
    named.migrate().await.unwrap();
    let mut tx = named.begin("p").await.unwrap();
    tx.set_position(4).await.unwrap();
    tx.commit().await.unwrap();
    let n: i64 =
        sqlx::query_scalar("SELECT position FROM read_model_positions WHERE projection = 'p'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(n, 4);
}

#[tokio::test]
async fn long_projection_names_are_refused() {
    let db = TestMySqlDatabase::new().await;
    let store = MySqlCheckpoints::new(db.pool.clone());
    store.migrate().await.unwrap();
    let fits = "é".repeat(255);
    store.begin(&fits).await.unwrap().rollback().await.unwrap();
    let err = store.begin(&"p".repeat(256)).await.unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
}

/// InnoDB rolls a deadlocked transaction back by itself and the connection
/// goes on in autocommit mode. A batch whose transaction went that way
/// cannot advance the checkpoint, even if the projection ignored the
/// deadlock: the advance fails instead of committing as applied.
#[tokio::test]
async fn a_transaction_rolled_back_by_a_deadlock_cannot_advance_the_checkpoint() {
    let h = <MySqlCheckpointHarness as CheckpointHarness>::setup().await;
    sqlx::raw_sql(
        "CREATE TABLE hot (id INT PRIMARY KEY, n INT NOT NULL) ENGINE = InnoDB; \
         INSERT INTO hot VALUES (1, 0), (2, 0); \
         CREATE TABLE bulk (id INT PRIMARY KEY, n INT NOT NULL) ENGINE = InnoDB; \
         INSERT INTO bulk WITH RECURSIVE s (i) AS \
           (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 200) SELECT i, 0 FROM s",
    )
    .execute(&h.db.pool)
    .await
    .unwrap();
    let mut batch = h.store.begin("p").await.unwrap();
    let mut other = h.db.pool.begin().await.unwrap();
    sqlx::query("UPDATE hot SET n = n + 1 WHERE id = 1")
        .execute(&mut *batch)
        .await
        .unwrap();
    // The other transaction has done much more: InnoDB rolls back the
    // lighter one, the batch.
    sqlx::query("UPDATE bulk SET n = n + 1")
        .execute(&mut *other)
        .await
        .unwrap();
    sqlx::query("UPDATE hot SET n = n + 1 WHERE id = 2")
        .execute(&mut *other)
        .await
        .unwrap();
    // Each now wants the other's row: InnoDB picks a victim.
    let blocked = tokio::spawn(async move {
        let r = sqlx::query("UPDATE hot SET n = n + 1 WHERE id = 1")
            .execute(&mut *other)
            .await;
        (r.is_ok(), other)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mine = sqlx::query("UPDATE hot SET n = n + 1 WHERE id = 2")
        .execute(&mut *batch)
        .await;
    let (theirs_ok, other) = blocked.await.unwrap();
    assert!(theirs_ok, "the heavier transaction survives the deadlock");
    let err = projection_error(mine.expect_err("the batch is the deadlock's victim"));
    assert!(err.is_transient(), "a deadlock is transient: {err}");
    other.commit().await.unwrap();
    // The projection "ignores" the error and goes on: the advance refuses.
    let err = batch.set_position(1).await.unwrap_err();
    assert!(
        err.to_string().contains("no longer held by its batch"),
        "{err}"
    );
    drop(batch);
    assert_eq!(h.store.position("p").await.unwrap(), 0);
}
