//! The consumer inbox: the inbox conformance suite on a schema of its own
//! per test, and what is particular to PostgreSQL.

use std::time::Duration;

use proclaim_core::StoreError;
use proclaim_core::inbox::{Inbox, InboxTx};
use proclaim_postgres::{PgInbox, PgInboxOptions, PgInboxTx};
use proclaim_testkit::conformance::Capabilities;
use proclaim_testkit::inbox_conformance::{InboxHarness, event};
use proclaim_testkit::pg::TestSchema;
use uuid::Uuid;

/// The PostgreSQL inbox in the conformance suite: a schema of its own per
/// test, holding the inbox tables and the handlers' effects table.
struct PgInboxHarness {
    ts: TestSchema,
    inbox: PgInbox,
}

impl PgInboxHarness {
    fn options(&self) -> PgInboxOptions {
        PgInboxOptions::default().with_schema(&self.ts.name)
    }
}

impl InboxHarness for PgInboxHarness {
    type Inbox = PgInbox;
    const CAPABILITIES: Capabilities = Capabilities {
        concurrent_writers: true,
    };

    async fn setup() -> Self {
        let ts = TestSchema::new().await;
        let inbox = PgInbox::with_options(
            ts.pool.clone(),
            PgInboxOptions::default().with_schema(&ts.name),
        )
        .unwrap();
        inbox.migrate().await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            r#"CREATE TABLE "{}".effects (
                   id BIGSERIAL PRIMARY KEY, consumer TEXT NOT NULL, event_id UUID NOT NULL)"#,
            ts.name
        )))
        .execute(&ts.pool)
        .await
        .unwrap();
        PgInboxHarness { ts, inbox }
    }

    fn inbox(&self) -> PgInbox {
        self.inbox.clone()
    }

    async fn second_inbox(&self) -> PgInbox {
        PgInbox::with_options(self.ts.another_pool().await, self.options()).unwrap()
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        self.inbox.migrate().await
    }

    async fn apply_effect(&self, tx: &mut PgInboxTx, consumer: &str, event_id: Uuid) {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            r#"INSERT INTO "{}".effects (consumer, event_id) VALUES ($1, $2)"#,
            self.ts.name
        )))
        .bind(consumer)
        .bind(event_id)
        .execute(&mut **tx)
        .await
        .unwrap();
    }

    async fn effects(&self, consumer: &str, event_id: Uuid) -> u64 {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            r#"SELECT count(*) FROM "{}".effects WHERE consumer = $1 AND event_id = $2"#,
            self.ts.name
        )))
        .bind(consumer)
        .bind(event_id)
        .fetch_one(&self.ts.pool)
        .await
        .unwrap();
        n as u64
    }

    async fn backdate(&self, consumer: &str, event_id: Uuid, by: Duration) {
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET handled_at = handled_at - make_interval(secs => $3) \
             WHERE consumer = $1 AND event_id = $2",
            self.inbox.table_name()
        )))
        .bind(consumer)
        .bind(event_id)
        .bind(by.as_secs_f64())
        .execute(&self.ts.pool)
        .await
        .unwrap();
        assert_eq!(done.rows_affected(), 1);
    }

    fn named(&self, schema: &str, table: &str) -> Result<PgInbox, StoreError> {
        PgInbox::with_options(
            self.ts.pool.clone(),
            PgInboxOptions::default()
                .with_schema(schema)
                .with_table(table),
        )
    }
}

proclaim_testkit::inbox_conformance!(PgInboxHarness);

/// The default names, the tables' columns and the parked table's index.
#[tokio::test]
async fn migrate_creates_the_documented_tables() {
    let ts = TestSchema::new().await;
    let inbox = PgInbox::with_options(
        ts.pool.clone(),
        PgInboxOptions::default().with_schema(&ts.name),
    )
    .unwrap();
    assert_eq!(inbox.table_name(), format!(r#""{}"."inbox""#, ts.name));
    assert_eq!(
        inbox.parked_table_name(),
        format!(r#""{}"."inbox_parked""#, ts.name)
    );
    inbox.migrate().await.unwrap();
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text FROM information_schema.columns \
         WHERE table_schema = $1 ORDER BY table_name, ordinal_position",
    )
    .bind(&ts.name)
    .fetch_all(&ts.pool)
    .await
    .unwrap();
    let of = |t: &str| -> Vec<&str> {
        columns
            .iter()
            .filter(|(table, _)| table == t)
            .map(|(_, c)| c.as_str())
            .collect()
    };
    assert_eq!(of("inbox"), ["consumer", "event_id", "handled_at"]);
    assert_eq!(
        of("inbox_parked"),
        [
            "id",
            "consumer",
            "event",
            "raw",
            "reason",
            "attempts",
            "parked_at",
            "park_key"
        ]
    );
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 ORDER BY indexname",
    )
    .bind(&ts.name)
    .fetch_all(&ts.pool)
    .await
    .unwrap();
    assert!(
        indexes.iter().any(|d| d.contains("(consumer, event_id)")),
        "{indexes:#?}"
    );
    assert!(indexes.iter().any(|d| d.contains("(handled_at)")));
    assert!(indexes.iter().any(|d| d.contains("(consumer, id)")));
    assert!(
        indexes
            .iter()
            .any(|d| d.starts_with("CREATE UNIQUE INDEX") && d.contains("(consumer, park_key)")),
        "{indexes:#?}"
    );
}

/// A handler whose statement failed has an aborted transaction, whose
/// `COMMIT` PostgreSQL would turn into a silent rollback: the inbox's commit
/// reports it, so the message is not acked as handled.
#[tokio::test]
async fn commit_after_a_failed_statement_is_an_error() {
    let h = PgInboxHarness::setup().await;
    let e = event(1);
    let mut tx = h.inbox.begin("mailer", &e).await.unwrap().unwrap();
    h.apply_effect(&mut tx, "mailer", e.id()).await;
    let failed = sqlx::query("SELECT 1 / 0").execute(&mut *tx).await;
    assert!(failed.is_err());
    let err = tx.commit().await.unwrap_err();
    assert!(matches!(err, StoreError::Database(_)), "{err:?}");
    assert!(!h.inbox.contains("mailer", e.id()).await.unwrap());
    assert_eq!(h.effects("mailer", e.id()).await, 0);
    assert!(
        proclaim_testkit::inbox_conformance::handle(&h, &h.inbox, "mailer", &e).await,
        "the redelivery handles it"
    );
}

/// The handler's transaction is a plain `sqlx::Transaction`: other APIs
/// (here a savepoint, and committing it directly) work on it.
#[tokio::test]
async fn the_transaction_itself_is_available() {
    let h = PgInboxHarness::setup().await;
    let e = event(1);
    let mut tx = h.inbox.begin("mailer", &e).await.unwrap().unwrap();
    assert_eq!((tx.consumer(), tx.event_id()), ("mailer", e.id()));
    {
        use sqlx::Acquire;
        let mut savepoint = tx.transaction().begin().await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            r#"INSERT INTO "{}".effects (consumer, event_id) VALUES ('mailer', $1)"#,
            h.ts.name
        )))
        .bind(e.id())
        .execute(&mut *savepoint)
        .await
        .unwrap();
        savepoint.rollback().await.unwrap();
    }
    h.apply_effect(&mut tx, "mailer", e.id()).await;
    tx.into_transaction().commit().await.unwrap();
    assert_eq!(h.effects("mailer", e.id()).await, 1);
    assert!(h.inbox.contains("mailer", e.id()).await.unwrap());
}
