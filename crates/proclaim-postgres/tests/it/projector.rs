//! Projector checkpoints: the projector conformance suite on a schema of its
//! own per test, and what is particular to PostgreSQL.

use proclaim_core::StoreError;
use proclaim_core::projector::{CheckpointStore, CheckpointTx, ProjectionError};
use proclaim_postgres::{PgCheckpointOptions, PgCheckpointTx, PgCheckpoints, projection_error};
use proclaim_testkit::conformance::Capabilities;
use proclaim_testkit::pg::TestSchema;
use proclaim_testkit::projector_conformance::CheckpointHarness;
use uuid::Uuid;

/// PostgreSQL checkpoints in the conformance suite: a schema of its own per
/// test, holding the checkpoint table and the projection's donations table.
struct PgCheckpointHarness {
    ts: TestSchema,
    store: PgCheckpoints,
}

impl PgCheckpointHarness {
    fn options(&self) -> PgCheckpointOptions {
        PgCheckpointOptions::default().with_schema(&self.ts.name)
    }

    fn donations(&self) -> String {
        format!(r#""{}".donations"#, self.ts.name)
    }
}

impl CheckpointHarness for PgCheckpointHarness {
    type Store = PgCheckpoints;
    const CAPABILITIES: Capabilities = Capabilities {
        concurrent_writers: true,
    };

    async fn setup() -> Self {
        let ts = TestSchema::new().await;
        let store = PgCheckpoints::with_options(
            ts.pool.clone(),
            PgCheckpointOptions::default().with_schema(&ts.name),
        )
        .unwrap();
        store.migrate().await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            r#"CREATE TABLE "{}".donations (
                   id BIGSERIAL PRIMARY KEY, projection TEXT NOT NULL,
                   event_id UUID NOT NULL, donor TEXT NOT NULL, cents BIGINT NOT NULL)"#,
            ts.name
        )))
        .execute(&ts.pool)
        .await
        .unwrap();
        PgCheckpointHarness { ts, store }
    }

    fn store(&self) -> PgCheckpoints {
        self.store.clone()
    }

    async fn second_store(&self) -> PgCheckpoints {
        PgCheckpoints::with_options(self.ts.another_pool().await, self.options()).unwrap()
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        self.store.migrate().await
    }

    fn named(&self, schema: &str, table: &str) -> Result<PgCheckpoints, StoreError> {
        PgCheckpoints::with_options(
            self.ts.pool.clone(),
            PgCheckpointOptions::default()
                .with_schema(schema)
                .with_table(table),
        )
    }

    async fn insert(
        &self,
        tx: &mut PgCheckpointTx,
        projection: &str,
        event_id: Uuid,
        donor: &str,
        cents: i64,
    ) -> Result<(), ProjectionError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {} (projection, event_id, donor, cents) VALUES ($1, $2, $3, $4)",
            self.donations()
        )))
        .bind(projection)
        .bind(event_id)
        .bind(donor)
        .bind(cents)
        .execute(&mut **tx)
        .await
        .map_err(projection_error)?;
        Ok(())
    }

    async fn clear(
        &self,
        tx: &mut PgCheckpointTx,
        projection: &str,
    ) -> Result<(), ProjectionError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {} WHERE projection = $1",
            self.donations()
        )))
        .bind(projection)
        .execute(&mut **tx)
        .await
        .map_err(projection_error)?;
        Ok(())
    }

    async fn rows(&self, projection: &str) -> Vec<(Uuid, String, i64)> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT event_id, donor, cents FROM {} WHERE projection = $1 ORDER BY id",
            self.donations()
        )))
        .bind(projection)
        .fetch_all(&self.ts.pool)
        .await
        .unwrap()
    }
}

proclaim_testkit::projector_conformance!(PgCheckpointHarness);

#[tokio::test]
async fn the_default_table_is_proclaim_projector_checkpoints() {
    let ts = TestSchema::new().await;
    let store = PgCheckpoints::new(ts.pool.clone());
    assert_eq!(store.table_name(), r#""proclaim"."projector_checkpoints""#);
    let named = PgCheckpoints::with_options(
        ts.pool.clone(),
        PgCheckpointOptions::default()
            .with_schema(&ts.name)
            .with_table("read_model_positions"),
    )
    .unwrap();
    named.migrate().await.unwrap();
    assert_eq!(
        named.table_name(),
        format!(r#""{}"."read_model_positions""#, ts.name)
    );
    let mut tx = named.begin("p").await.unwrap();
    tx.set_position(4).await.unwrap();
    tx.commit().await.unwrap();
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        r#"SELECT position FROM "{}".read_model_positions WHERE projection = 'p'"#,
        ts.name
    )))
    .fetch_one(&ts.pool)
    .await
    .unwrap();
    assert_eq!(n, 4);
}

/// A statement that fails inside the batch aborts PostgreSQL's transaction:
/// the checkpoint cannot be advanced over it, so the batch is never
/// committed as applied even if a projection ignored the error.
#[tokio::test]
async fn a_failed_statement_keeps_the_batch_from_committing() {
    let h = <PgCheckpointHarness as CheckpointHarness>::setup().await;
    let mut tx = h.store.begin("p").await.unwrap();
    h.insert(&mut tx, "p", Uuid::now_v7(), "ada", 1)
        .await
        .unwrap();
    let failed = sqlx::query("SELECT * FROM no_such_table")
        .execute(&mut *tx)
        .await;
    let err = projection_error(failed.unwrap_err());
    assert!(!err.is_transient(), "a missing table is permanent");
    let err = tx.set_position(1).await.unwrap_err();
    assert!(matches!(err, StoreError::Database(_)), "{err:?}");
    drop(tx);
    assert_eq!(h.store.position("p").await.unwrap(), 0);
    assert!(h.rows("p").await.is_empty());
}

/// A projection can emit events into the outbox from its batch (a process
/// manager): they commit with the read model and the checkpoint.
#[tokio::test]
async fn a_batch_can_enqueue_outbox_events_in_its_transaction() {
    let h = <PgCheckpointHarness as CheckpointHarness>::setup().await;
    let outbox = proclaim_postgres::PgOutbox::with_options(
        h.ts.pool.clone(),
        proclaim_postgres::PgOutboxOptions::default().with_schema(&h.ts.name),
    )
    .unwrap();
    outbox.migrate().await.unwrap();
    let event = proclaim_core::Event::builder("ThankYouDue")
        .subject("donor-1")
        .build()
        .unwrap();
    let mut tx = h.store.begin("p").await.unwrap();
    outbox.enqueue(tx.transaction(), &event).await.unwrap();
    tx.set_position(1).await.unwrap();
    tx.rollback().await.unwrap();
    use proclaim_core::OutboxStore;
    assert_eq!(outbox.stats().await.unwrap().pending, 0);
    let mut tx = h.store.begin("p").await.unwrap();
    outbox.enqueue(tx.transaction(), &event).await.unwrap();
    tx.set_position(1).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(outbox.stats().await.unwrap().pending, 1);
}
