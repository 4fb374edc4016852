//! The consumer inbox: the inbox conformance suite on a database of its own
//! per test, and what is particular to MySQL / MariaDB.

use std::time::Duration;

use proclaim_core::StoreError;
use proclaim_core::inbox::{Inbox, InboxTx, ParkedEvent, ParkedEvents};
use proclaim_mysql::{MAX_CONSUMER_LEN, MySqlInbox, MySqlInboxOptions, MySqlInboxTx};
use proclaim_testkit::conformance::Capabilities;
use proclaim_testkit::inbox_conformance::{InboxHarness, event, handle};
use proclaim_testkit::mysql::TestMySqlDatabase;
use uuid::Uuid;

/// The MySQL inbox in the conformance suite: a database of its own per
/// test, holding the inbox tables and the handlers' effects table.
struct MySqlInboxHarness {
    db: TestMySqlDatabase,
    inbox: MySqlInbox,
}

impl InboxHarness for MySqlInboxHarness {
    type Inbox = MySqlInbox;
    const CAPABILITIES: Capabilities = Capabilities {
        concurrent_writers: true,
    };

    async fn setup() -> Self {
        let db = TestMySqlDatabase::new().await;
        let inbox = MySqlInbox::new(db.pool.clone());
        inbox.migrate().await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE effects (id BIGINT AUTO_INCREMENT PRIMARY KEY, \
             consumer VARCHAR(255) NOT NULL, event_id CHAR(36) NOT NULL) ENGINE = InnoDB",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        MySqlInboxHarness { db, inbox }
    }

    fn inbox(&self) -> MySqlInbox {
        self.inbox.clone()
    }

    async fn second_inbox(&self) -> MySqlInbox {
        MySqlInbox::new(self.db.another_pool().await)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        self.inbox.migrate().await
    }

    async fn apply_effect(&self, tx: &mut MySqlInboxTx, consumer: &str, event_id: Uuid) {
        sqlx::query("INSERT INTO effects (consumer, event_id) VALUES (?, ?)")
            .bind(consumer)
            .bind(event_id.hyphenated().to_string())
            .execute(&mut **tx)
            .await
            .unwrap();
    }

    async fn effects(&self, consumer: &str, event_id: Uuid) -> u64 {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM effects WHERE consumer = ? AND event_id = ?")
                .bind(consumer)
                .bind(event_id.hyphenated().to_string())
                .fetch_one(&self.db.pool)
                .await
                .unwrap();
        n as u64
    }

    async fn backdate(&self, consumer: &str, event_id: Uuid, by: Duration) {
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET handled_at = handled_at - INTERVAL ? MICROSECOND \
             WHERE consumer = ? AND event_id = ?",
            self.inbox.table_name()
        )))
        .bind(by.as_micros() as i64)
        .bind(consumer)
        .bind(event_id.hyphenated().to_string())
        .execute(&self.db.pool)
        .await
        .unwrap();
        assert_eq!(done.rows_affected(), 1);
    }

    /// MySQL has no schemas inside a database: `schema` is checked like a
    /// table name (so it cannot inject SQL either) and otherwise unused.
    fn named(&self, schema: &str, table: &str) -> Result<MySqlInbox, StoreError> {
        MySqlInboxOptions::default().with_table(schema).validate()?;
        MySqlInbox::with_options(
            self.db.pool.clone(),
            MySqlInboxOptions::default().with_table(table),
        )
    }
}

proclaim_testkit::inbox_conformance!(MySqlInboxHarness);

/// The default names, the tables' columns and keys.
#[tokio::test]
async fn migrate_creates_the_documented_tables() {
    let h = MySqlInboxHarness::setup().await;
    assert_eq!(h.inbox.table_name(), "`proclaim_inbox`");
    assert_eq!(h.inbox.parked_table_name(), "`proclaim_inbox_parked`");
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT CAST(table_name AS CHAR), CAST(column_name AS CHAR) \
         FROM information_schema.columns WHERE table_schema = ? \
         ORDER BY table_name, ordinal_position",
    )
    .bind(&h.db.name)
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    let of = |t: &str| -> Vec<&str> {
        columns
            .iter()
            .filter(|(table, _)| table == t)
            .map(|(_, c)| c.as_str())
            .collect()
    };
    assert_eq!(of("proclaim_inbox"), ["consumer", "event_id", "handled_at"]);
    assert_eq!(
        of("proclaim_inbox_parked"),
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
    let keys: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT CAST(table_name AS CHAR), CAST(index_name AS CHAR), \
                CAST(GROUP_CONCAT(column_name ORDER BY seq_in_index) AS CHAR) \
         FROM information_schema.statistics WHERE table_schema = ? \
         GROUP BY table_name, index_name ORDER BY table_name, index_name",
    )
    .bind(&h.db.name)
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    let has = |t: &str, i: &str, c: &str| {
        keys.iter()
            .any(|(table, index, cols)| table == t && index == i && cols == c)
    };
    assert!(
        has("proclaim_inbox", "PRIMARY", "consumer,event_id"),
        "{keys:#?}"
    );
    assert!(has("proclaim_inbox", "handled_idx", "handled_at"));
    assert!(has("proclaim_inbox_parked", "consumer_idx", "consumer,id"));
    assert!(has(
        "proclaim_inbox_parked",
        "park_key_idx",
        "consumer,park_key"
    ));
}

/// A consumer name too long for the key column is refused, not cut (two
/// consumers sharing a prefix would otherwise share their pairs).
#[tokio::test]
async fn consumer_names_longer_than_the_column_are_refused() {
    let h = MySqlInboxHarness::setup().await;
    let e = event(1);
    let longest = "c".repeat(MAX_CONSUMER_LEN);
    assert!(handle(&h, &h.inbox, &longest, &e).await);
    assert!(h.inbox.contains(&longest, e.id()).await.unwrap());
    let too_long = format!("{longest}x");
    let err = h.inbox.begin(&too_long, &e).await.unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    let err = h
        .inbox
        .park(&ParkedEvent {
            id: 0,
            consumer: too_long,
            event: None,
            raw: b"x".to_vec(),
            reason: "r".into(),
            attempts: 0,
            parked_at: chrono::Utc::now(),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
}

/// A transaction InnoDB rolled back under the handler (here: by hand, as a
/// deadlock would) is reported by the commit, not acked as handled.
#[tokio::test]
async fn commit_after_the_database_rolled_back_is_an_error() {
    let h = MySqlInboxHarness::setup().await;
    let e = event(1);
    let mut tx = h.inbox.begin("mailer", &e).await.unwrap().unwrap();
    h.apply_effect(&mut tx, "mailer", e.id()).await;
    sqlx::raw_sql("ROLLBACK").execute(&mut *tx).await.unwrap();
    let err = tx.commit().await.unwrap_err();
    assert!(matches!(err, StoreError::Database(_)), "{err:?}");
    assert!(!h.inbox.contains("mailer", e.id()).await.unwrap());
    assert_eq!(h.effects("mailer", e.id()).await, 0);
    assert!(handle(&h, &h.inbox, "mailer", &e).await);
}

/// Taking many parked events at once (more ids than one statement lists).
#[tokio::test]
async fn take_handles_long_id_lists() {
    let h = MySqlInboxHarness::setup().await;
    for n in 0..3 {
        h.inbox
            .park(&ParkedEvent {
                id: 0,
                consumer: "mailer".into(),
                event: Some(event(n)),
                raw: Vec::new(),
                reason: "failed".into(),
                attempts: 1,
                parked_at: chrono::Utc::now(),
            })
            .await
            .unwrap();
    }
    let listed = h.inbox.parked(None, 10).await.unwrap();
    let mut ids: Vec<i64> = (-2_500..0).collect();
    ids.extend(listed.iter().rev().map(|p| p.id));
    let taken = h.inbox.take(&ids).await.unwrap();
    assert_eq!(taken, listed);
}

/// A parked table made before parkings had keys gets `park_key` and its
/// unique key from `migrate`, keeping its rows.
#[tokio::test]
async fn migrate_adds_the_park_key_to_an_older_parked_table() {
    let h = MySqlInboxHarness::setup().await;
    sqlx::raw_sql(
        "ALTER TABLE proclaim_inbox_parked DROP INDEX park_key_idx, DROP COLUMN park_key;
         INSERT INTO proclaim_inbox_parked (consumer, event, raw, reason, attempts, parked_at)
             VALUES ('mailer', NULL, x'ff', 'old', 0, UTC_TIMESTAMP(6));",
    )
    .execute(&h.db.pool)
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
