//! The consumer inbox: the inbox conformance suite on a fresh database file
//! per test, and what is particular to SQLite.

use std::path::{Path, PathBuf};
use std::time::Duration;

use proclaim_core::StoreError;
use proclaim_core::inbox::{Inbox, InboxTx};
use proclaim_sqlite::{SqliteInbox, SqliteInboxOptions, SqliteInboxTx, SqliteOutbox};
use proclaim_testkit::conformance::Capabilities;
use proclaim_testkit::inbox_conformance::{InboxHarness, event, handle};
use proclaim_testkit::unique_suffix;
use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};
use uuid::Uuid;

/// A directory of its own under the system temp dir, removed on drop (also
/// when the test panics).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("proclaim-sqlite-inbox-{}", unique_suffix()));
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

/// The SQLite inbox in the conformance suite: a database file of its own per
/// test (WAL journal and a busy timeout, as `SqliteOutbox::connect_options`
/// sets them), holding the inbox tables and the handlers' effects table.
struct SqliteInboxHarness {
    // Fields drop in order: the pool before the directory it lives in.
    inbox: SqliteInbox,
    url: String,
    _dir: TempDir,
}

async fn pool(url: &str) -> SqlitePool {
    SqlitePoolOptions::new()
        .connect_with(SqliteOutbox::connect_options(url).unwrap())
        .await
        .unwrap()
}

impl InboxHarness for SqliteInboxHarness {
    type Inbox = SqliteInbox;
    const CAPABILITIES: Capabilities = Capabilities {
        concurrent_writers: false,
    };

    async fn setup() -> Self {
        let dir = TempDir::new();
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("inbox.db").display()
        );
        let inbox = SqliteInbox::new(pool(&url).await);
        inbox.migrate().await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE effects (id INTEGER PRIMARY KEY AUTOINCREMENT, \
             consumer TEXT NOT NULL, event_id TEXT NOT NULL)",
        )
        .execute(inbox.pool())
        .await
        .unwrap();
        SqliteInboxHarness {
            inbox,
            url,
            _dir: dir,
        }
    }

    fn inbox(&self) -> SqliteInbox {
        self.inbox.clone()
    }

    async fn second_inbox(&self) -> SqliteInbox {
        SqliteInbox::new(pool(&self.url).await)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        self.inbox.migrate().await
    }

    async fn apply_effect(&self, tx: &mut SqliteInboxTx, consumer: &str, event_id: Uuid) {
        sqlx::query("INSERT INTO effects (consumer, event_id) VALUES (?1, ?2)")
            .bind(consumer)
            .bind(event_id.hyphenated().to_string())
            .execute(&mut **tx)
            .await
            .unwrap();
    }

    async fn effects(&self, consumer: &str, event_id: Uuid) -> u64 {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM effects WHERE consumer = ?1 AND event_id = ?2",
        )
        .bind(consumer)
        .bind(event_id.hyphenated().to_string())
        .fetch_one(self.inbox.pool())
        .await
        .unwrap();
        n as u64
    }

    async fn backdate(&self, consumer: &str, event_id: Uuid, by: Duration) {
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET handled_at = handled_at - ?3 WHERE consumer = ?1 AND event_id = ?2",
            self.inbox.table_name()
        )))
        .bind(consumer)
        .bind(event_id.hyphenated().to_string())
        .bind(by.as_micros() as i64)
        .execute(self.inbox.pool())
        .await
        .unwrap();
        assert_eq!(done.rows_affected(), 1);
    }

    /// SQLite has no schemas: `schema` is checked like a table name (so it
    /// cannot inject SQL either) and otherwise unused.
    fn named(&self, schema: &str, table: &str) -> Result<SqliteInbox, StoreError> {
        SqliteInboxOptions::default()
            .with_table(schema)
            .validate()?;
        SqliteInbox::with_options(
            self.inbox.pool().clone(),
            SqliteInboxOptions::default().with_table(table),
        )
    }
}

proclaim_testkit::inbox_conformance!(SqliteInboxHarness);

/// The default names and the tables' columns.
#[tokio::test]
async fn migrate_creates_the_documented_tables() {
    let h = SqliteInboxHarness::setup().await;
    assert_eq!(h.inbox.table_name(), r#""proclaim_inbox""#);
    assert_eq!(h.inbox.parked_table_name(), r#""proclaim_inbox_parked""#);
    let columns = |table: &'static str| {
        let pool = h.inbox.pool().clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT name FROM pragma_table_info(?1) ORDER BY cid")
                .bind(table)
                .fetch_all(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        columns("proclaim_inbox").await,
        ["consumer", "event_id", "handled_at"]
    );
    assert_eq!(
        columns("proclaim_inbox_parked").await,
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
        "SELECT name FROM sqlite_schema WHERE type = 'index' AND sql IS NOT NULL ORDER BY name",
    )
    .fetch_all(h.inbox.pool())
    .await
    .unwrap();
    assert_eq!(
        indexes,
        [
            "proclaim_inbox_handled_idx",
            "proclaim_inbox_parked_consumer_idx",
            "proclaim_inbox_parked_key_idx"
        ]
    );
}

/// The inbox and the outbox share one database file and pool: a handler
/// emits an event in the handling's transaction, and both commit together
/// (or, dropped, neither does).
#[tokio::test]
async fn handler_writes_the_outbox_in_the_same_transaction() {
    let dir = TempDir::new();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("app.db").display());
    let outbox = SqliteOutbox::connect(&url).await.unwrap();
    outbox.migrate().await.unwrap();
    let inbox = SqliteInbox::new(outbox.pool().clone());
    inbox.migrate().await.unwrap();
    let e = event(1);
    let reply = |e: &proclaim_core::Event| {
        proclaim_core::Event::builder("ThankYouSent")
            .subject(e.subject())
            .caused_by(e)
            .build()
            .unwrap()
    };
    let pending = || async {
        proclaim_core::OutboxStore::stats(&outbox)
            .await
            .unwrap()
            .pending
    };

    let mut tx = inbox.begin("mailer", &e).await.unwrap().unwrap();
    outbox.enqueue(tx.transaction(), &reply(&e)).await.unwrap();
    drop(tx);
    assert_eq!(pending().await, 0);

    let mut tx = inbox.begin("mailer", &e).await.unwrap().unwrap();
    outbox.enqueue(tx.transaction(), &reply(&e)).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(pending().await, 1);
    assert!(inbox.begin("mailer", &e).await.unwrap().is_none());
}

/// A second delivery that waits longer than the busy timeout for the open
/// handling gets a transient error, so its message is redelivered.
#[tokio::test]
async fn waiting_past_the_busy_timeout_is_transient() {
    let h = SqliteInboxHarness::setup().await;
    let impatient = SqliteInbox::new(
        SqlitePoolOptions::new()
            .connect_with(
                SqliteOutbox::connect_options(&h.url)
                    .unwrap()
                    .busy_timeout(Duration::from_millis(100)),
            )
            .await
            .unwrap(),
    );
    let e = event(1);
    let tx = h.inbox.begin("mailer", &e).await.unwrap().unwrap();
    let err = impatient.begin("mailer", &e).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    tx.commit().await.unwrap();
    assert!(impatient.begin("mailer", &e).await.unwrap().is_none());
    assert!(!handle(&h, &impatient, "mailer", &e).await);
}

/// A parked table made before parkings had keys gets `park_key` and its
/// unique index from `migrate`, keeping its rows.
#[tokio::test]
async fn migrate_adds_the_park_key_to_an_older_parked_table() {
    use proclaim_core::inbox::{ParkedEvent, ParkedEvents};
    let h = SqliteInboxHarness::setup().await;
    let pool = h.inbox.pool();
    sqlx::raw_sql(
        "DROP INDEX proclaim_inbox_parked_key_idx;
         ALTER TABLE proclaim_inbox_parked DROP COLUMN park_key;
         INSERT INTO proclaim_inbox_parked (consumer, event, raw, reason, attempts, parked_at)
             VALUES ('mailer', NULL, x'ff', 'old', 0, 1);",
    )
    .execute(pool)
    .await
    .unwrap();
    h.inbox.migrate().await.unwrap();
    h.inbox.migrate().await.unwrap();
    let parked = ParkedEvent {
        id: 0,
        consumer: "mailer".into(),
        event: Some(event(1)),
        raw: Vec::new(),
        reason: "new".into(),
        attempts: 1,
        parked_at: chrono::Utc::now(),
    };
    h.inbox.park(&parked).await.unwrap();
    h.inbox.park(&parked).await.unwrap();
    let all = h.inbox.parked(None, 10).await.unwrap();
    let reasons: Vec<&str> = all.iter().map(|p| p.reason.as_str()).collect();
    assert_eq!(reasons, ["old", "new"]);
}
