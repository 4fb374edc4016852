//! MySQL store tests against the real local MySQL / MariaDB.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod inbox;
mod projector;

use std::time::Duration;

use proclaim_core::{
    AckMode, BatchOutcome, Event, LeaseToken, OutboxAdmin, OutboxStore, Retry, StoreError,
};
use proclaim_mysql::{MySqlOutbox, MySqlOutboxOptions};
use proclaim_testkit::conformance::{Capabilities, OpenTransaction, StoreHarness};
use proclaim_testkit::eventually;
use proclaim_testkit::mysql::TestMySqlDatabase;

const LEASE: Duration = Duration::from_secs(30);

async fn outbox(db: &TestMySqlDatabase) -> MySqlOutbox {
    let outbox = MySqlOutbox::new(db.pool.clone());
    outbox.migrate().await.unwrap();
    outbox
}

/// The MySQL store in the conformance suite: a database of its own per test.
struct MySql {
    db: TestMySqlDatabase,
    outbox: MySqlOutbox,
}

struct OpenMySqlTx(sqlx::Transaction<'static, sqlx::MySql>);

impl OpenTransaction for OpenMySqlTx {
    fn commit(self: Box<Self>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move { self.0.commit().await.unwrap() })
    }
}

impl MySql {
    async fn business_tx(&self, events: &[Event]) -> sqlx::Transaction<'static, sqlx::MySql> {
        let mut tx = self.db.pool.begin().await.unwrap();
        sqlx::query("INSERT INTO campaign_donors () VALUES ()")
            .execute(&mut *tx)
            .await
            .unwrap();
        if let [one] = events {
            self.outbox.enqueue(&mut tx, one).await.unwrap();
        } else {
            self.outbox.enqueue_batch(&mut tx, events).await.unwrap();
        }
        tx
    }
}

impl StoreHarness for MySql {
    type Store = MySqlOutbox;
    const CAPABILITIES: Capabilities = Capabilities {
        concurrent_writers: true,
    };

    async fn setup() -> Self {
        let db = TestMySqlDatabase::new().await;
        let outbox = outbox(&db).await;
        sqlx::raw_sql(
            "CREATE TABLE campaign_donors (id BIGINT AUTO_INCREMENT PRIMARY KEY) ENGINE = InnoDB",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        MySql { db, outbox }
    }

    fn store(&self) -> MySqlOutbox {
        self.outbox.clone()
    }

    async fn second_store(&self) -> MySqlOutbox {
        MySqlOutbox::new(self.db.another_pool().await)
    }

    async fn write(&self, events: &[Event], commit: bool) {
        let tx = self.business_tx(events).await;
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
    }

    async fn write_open(&self, events: &[Event]) -> Box<dyn OpenTransaction> {
        Box::new(OpenMySqlTx(self.business_tx(events).await))
    }

    /// MySQL has no schemas inside a database: `schema` is checked like a
    /// table name (so it cannot inject SQL either) and otherwise unused.
    fn named(&self, schema: &str, table: &str) -> Result<MySqlOutbox, StoreError> {
        MySqlOutboxOptions::default()
            .with_table(schema)
            .validate()?;
        MySqlOutbox::with_options(
            self.db.pool.clone(),
            MySqlOutboxOptions::default().with_table(table),
        )
    }
}

proclaim_testkit::store_conformance!(MySql);

fn event(subject: &str, n: u64) -> Event {
    Event::builder("DonorSecured")
        .subject(subject)
        .data(&serde_json::json!({ "n": n }))
        .build()
        .unwrap()
}

async fn write(outbox: &MySqlOutbox, events: &[Event]) {
    let mut tx = outbox.pool().begin().await.unwrap();
    for e in events {
        outbox.enqueue(&mut tx, e).await.unwrap();
    }
    tx.commit().await.unwrap();
}

fn numbers(batch: &proclaim_core::ClaimedBatch) -> Vec<u64> {
    batch
        .records
        .iter()
        .map(|r| {
            r.event.data_as::<serde_json::Value>().unwrap()["n"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// Waits until the transaction of connection `id` waits for a row lock.
///
/// InnoDB serves `information_schema.innodb_trx` from a snapshot that it
/// refreshes only when the previous read is more than 0.1 s old, so polling
/// faster than that could see the same stale snapshot forever.
async fn wait_for_lock_wait(pool: &sqlx::MySqlPool, id: u64, what: &str) {
    eventually(Duration::from_secs(20), what, || {
        let pool = pool.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let waiting: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.innodb_trx \
                 WHERE trx_mysql_thread_id = ? AND trx_state = 'LOCK WAIT'",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
            waiting == 1
        }
    })
    .await;
}

async fn connection_id(conn: &mut sqlx::MySqlConnection) -> u64 {
    sqlx::query_scalar("SELECT CAST(CONNECTION_ID() AS UNSIGNED)")
        .fetch_one(conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn writers_of_one_subject_are_sequenced_in_commit_order() {
    let db = TestMySqlDatabase::new().await;
    let outbox = outbox(&db).await;
    let mut t1 = db.pool.begin().await.unwrap();
    outbox.enqueue(&mut t1, &event("same", 1)).await.unwrap();

    let o2 = outbox.clone();
    let (id_tx, id_rx) = tokio::sync::oneshot::channel::<u64>();
    let second = tokio::spawn(async move {
        let mut t2 = o2.pool().begin().await.unwrap();
        id_tx.send(connection_id(&mut t2).await).unwrap();
        o2.enqueue(&mut t2, &event("same", 2)).await.unwrap();
        t2.commit().await.unwrap();
    });
    let id = id_rx.await.unwrap();
    // T2 must be waiting on the subject's lock row held by T1.
    wait_for_lock_wait(&db.pool, id, "second writer waits on the subject lock").await;
    assert!(!second.is_finished());
    t1.commit().await.unwrap();
    second.await.unwrap();

    let batch = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert_eq!(numbers(&batch), vec![1, 2], "sequence follows commit order");
    assert!(batch.records[0].sequence < batch.records[1].sequence);
}

#[tokio::test]
async fn writers_of_different_subjects_do_not_wait() {
    let db = TestMySqlDatabase::new().await;
    let outbox = outbox(&db).await;
    let mut t1 = db.pool.begin().await.unwrap();
    outbox.enqueue(&mut t1, &event("one", 1)).await.unwrap();
    let mut t2 = db.pool.begin().await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        outbox.enqueue(&mut t2, &event("two", 2)),
    )
    .await
    .expect("an unrelated subject must not wait")
    .unwrap();
    t2.commit().await.unwrap();
    t1.commit().await.unwrap();
    let batch = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert_eq!(numbers(&batch), vec![1, 2]);
}

#[tokio::test]
async fn malformed_rows_are_reported_not_fatal() {
    let db = TestMySqlDatabase::new().await;
    let outbox = outbox(&db).await;
    write(&outbox, &[event("a", 1), event("b", 2), event("c", 3)]).await;
    sqlx::query(r#"UPDATE proclaim_outbox SET metadata = '{"Bad Key": 1}' WHERE subject = 'a'"#)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE proclaim_outbox SET id = 'not-a-uuid' WHERE subject = 'c'")
        .execute(&db.pool)
        .await
        .unwrap();
    let batch = outbox.claim(LeaseToken::new(), 10, LEASE).await.unwrap();
    assert_eq!(numbers(&batch), vec![2]);
    assert_eq!(batch.malformed.len(), 2);
    assert!(
        batch.malformed[0].error.contains("metadata"),
        "{}",
        batch.malformed[0].error
    );
    assert!(
        batch.malformed[1].error.contains("id"),
        "{}",
        batch.malformed[1].error
    );
    assert!(batch.malformed[0].sequence < batch.malformed[1].sequence);
}

/// A relay whose lease ran out may still be recording an outcome for the
/// head of a subject (its row is locked); a claim must not hand out the
/// subject's later events past it.
#[tokio::test]
async fn a_head_held_by_a_late_outcome_holds_back_its_subject() {
    let db = TestMySqlDatabase::new().await;
    let outbox = outbox(&db).await;
    write(&outbox, &[event("k", 1), event("k", 2), event("j", 3)]).await;
    let old = LeaseToken::new();
    let first = outbox
        .claim(old, 1, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(numbers(&first), vec![1]);
    let head = first.records[0].sequence;
    let pool = db.pool.clone();
    eventually(Duration::from_secs(10), "the lease expires", || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM proclaim_outbox \
                 WHERE sequence = ? AND lease_expires_at <= UTC_TIMESTAMP(6)",
            )
            .bind(head)
            .fetch_one(&pool)
            .await
            .unwrap()
                == 1
        }
    })
    .await;

    // The old relay records a retry for the head, and has not committed yet.
    let mut late = db.pool.begin().await.unwrap();
    let updated = sqlx::query(
        "UPDATE proclaim_outbox SET next_attempt_at = UTC_TIMESTAMP(6) + INTERVAL 1 HOUR, \
         lease_token = NULL, lease_expires_at = NULL WHERE sequence = ? AND lease_token = ?",
    )
    .bind(head)
    .bind(old.0.to_string())
    .execute(&mut *late)
    .await
    .unwrap();
    assert_eq!(updated.rows_affected(), 1);

    let during = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert_eq!(
        numbers(&during),
        vec![3],
        "2 must not overtake its locked head"
    );
    late.commit().await.unwrap();
    let after = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert!(
        after.is_empty(),
        "the head waits an hour, and 2 behind it: {:?}",
        numbers(&after)
    );
}

#[tokio::test]
async fn concurrent_migrations_of_a_fresh_table_from_two_pools() {
    let db = TestMySqlDatabase::new().await;
    let options = MySqlOutboxOptions::default().with_table("fresh_outbox");
    let a = MySqlOutbox::with_options(db.pool.clone(), options.clone()).unwrap();
    let b = MySqlOutbox::with_options(db.another_pool().await, options).unwrap();
    let err = a.verify_schema().await.unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    assert!(err.to_string().contains("run `proclaim migrate`"), "{err}");
    let (x, y) = tokio::join!(a.migrate(), b.migrate());
    x.unwrap();
    y.unwrap();
    a.verify_schema().await.unwrap();
    b.migrate().await.unwrap();
    let versions: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM fresh_outbox_migrations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(versions, 1);
    let slots: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM fresh_outbox_subject_locks")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(slots, i64::from(proclaim_mysql::SUBJECT_LOCK_SLOTS));
    assert_eq!(
        a.describe(),
        format!("`{}`.`fresh_outbox`", db.name),
        "describe names database and table"
    );
}

#[tokio::test]
async fn a_long_table_name_gets_short_helper_tables() {
    let db = TestMySqlDatabase::new().await;
    let table = "o".repeat(63);
    let outbox = MySqlOutbox::with_options(
        db.pool.clone(),
        MySqlOutboxOptions::default().with_table(&table),
    )
    .unwrap();
    outbox.migrate().await.unwrap();
    outbox.verify_schema().await.unwrap();
    outbox.enqueue_standalone(&[event("a", 1)]).await.unwrap();
    let batch = outbox.claim(LeaseToken::new(), 10, LEASE).await.unwrap();
    assert_eq!(numbers(&batch), vec![1]);
}

#[tokio::test]
async fn times_round_trip_in_utc_with_microseconds() {
    let db = TestMySqlDatabase::new().await;
    let outbox = outbox(&db).await;
    // A session in another time zone writes; nothing may shift.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SET time_zone = '+05:30'")
        .execute(&mut *tx)
        .await
        .unwrap();
    let time = chrono::DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
    let original = Event::builder("DonorSecured")
        .subject("tz")
        .time(time)
        .build()
        .unwrap();
    outbox.enqueue(&mut tx, &original).await.unwrap();
    tx.commit().await.unwrap();
    let batch = outbox.claim(LeaseToken::new(), 10, LEASE).await.unwrap();
    assert_eq!(batch.records[0].event.time(), time);
    let age = chrono::Utc::now() - batch.records[0].created_at;
    assert!(
        age.num_seconds().abs() < 60,
        "created_at is UTC: {}",
        batch.records[0].created_at
    );
}

#[tokio::test]
async fn retry_delays_and_errors_apply_per_row() {
    let db = TestMySqlDatabase::new().await;
    let outbox = outbox(&db).await;
    write(&outbox, &[event("a", 1), event("b", 2)]).await;
    let token = LeaseToken::new();
    let batch = outbox.claim(token, 10, LEASE).await.unwrap();
    let outcome = BatchOutcome {
        retry: vec![
            Retry {
                sequence: batch.records[0].sequence,
                delay: Duration::from_millis(1),
                error: "soon".into(),
            },
            Retry {
                sequence: batch.records[1].sequence,
                delay: Duration::from_secs(3600),
                error: "later".into(),
            },
        ],
        ..Default::default()
    };
    let report = outbox
        .complete(token, &outcome, AckMode::Delete)
        .await
        .unwrap();
    assert_eq!((report.applied, report.lost), (2, 0));
    let errors: Vec<(i64, String)> =
        sqlx::query_as("SELECT sequence, last_error FROM proclaim_outbox ORDER BY sequence")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(errors[0].1, "soon");
    assert_eq!(errors[1].1, "later");
    let again = proclaim_testkit::eventually_value(Duration::from_secs(10), "a is due", || {
        let outbox = outbox.clone();
        async move {
            let b = outbox.claim(LeaseToken::new(), 10, LEASE).await.unwrap();
            (!b.is_empty()).then_some(b)
        }
    })
    .await;
    assert_eq!(numbers(&again), vec![1], "b waits an hour");
}

#[tokio::test]
async fn verify_schema_and_options_reject_bad_setups() {
    let db = TestMySqlDatabase::new().await;
    let outbox = MySqlOutbox::new(db.pool.clone());
    let err = outbox.verify_schema().await.unwrap_err();
    assert!(err.to_string().contains("run `proclaim migrate`"), "{err}");
    for bad in ["", "Outbox", "a`b", "x; DROP TABLE y", &"a".repeat(64)] {
        let err = MySqlOutbox::with_options(
            db.pool.clone(),
            MySqlOutboxOptions::default().with_table(bad),
        )
        .err();
        assert!(matches!(err, Some(StoreError::Config(_))), "{bad}: {err:?}");
    }
    assert_eq!(outbox.table_name(), "`proclaim_outbox`");
}
