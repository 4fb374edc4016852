//! SQLite store tests: the store conformance suite on a fresh database file
//! per test, and what is particular to SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod inbox;
mod projector;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use proclaim_core::{
    Event, LeaseToken, OutboxAdmin, OutboxRecord, OutboxStore, PublishError, Publisher, Relay,
    RelayConfig, StoreError,
};
use proclaim_sqlite::{SqliteOutbox, SqliteOutboxOptions};
use proclaim_testkit::conformance::{Capabilities, OpenTransaction, StoreHarness, numbers};
use proclaim_testkit::{eventually, unique_suffix};

const LEASE: Duration = Duration::from_secs(30);

/// A directory of its own under the system temp dir, removed on drop (also
/// when the test panics).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("proclaim-sqlite-{}", unique_suffix()));
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

/// A fresh database file in a temp dir, its URL, and a migrated outbox.
struct Db {
    // Fields drop in order: the pool before the directory it lives in.
    outbox: SqliteOutbox,
    url: String,
    dir: TempDir,
}

impl Db {
    async fn new() -> Self {
        let dir = TempDir::new();
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("outbox.db").display()
        );
        let outbox = SqliteOutbox::connect(&url).await.unwrap();
        outbox.migrate().await.unwrap();
        sqlx::raw_sql("CREATE TABLE campaign_donors (id INTEGER PRIMARY KEY AUTOINCREMENT)")
            .execute(outbox.pool())
            .await
            .unwrap();
        Db { outbox, url, dir }
    }

    /// A business transaction: a donor row and the events, not yet committed.
    async fn business_tx(&self, events: &[Event]) -> sqlx::Transaction<'static, sqlx::Sqlite> {
        let mut tx = self.outbox.pool().begin().await.unwrap();
        sqlx::query("INSERT INTO campaign_donors DEFAULT VALUES")
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

/// The SQLite store in the conformance suite: a database file of its own per test.
struct Sqlite(Db);

struct OpenSqliteTx(sqlx::Transaction<'static, sqlx::Sqlite>);

impl OpenTransaction for OpenSqliteTx {
    fn commit(self: Box<Self>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move { self.0.commit().await.unwrap() })
    }
}

impl StoreHarness for Sqlite {
    type Store = SqliteOutbox;
    const CAPABILITIES: Capabilities = Capabilities {
        concurrent_writers: false,
    };

    async fn setup() -> Self {
        Sqlite(Db::new().await)
    }

    fn store(&self) -> SqliteOutbox {
        self.0.outbox.clone()
    }

    async fn second_store(&self) -> SqliteOutbox {
        SqliteOutbox::connect(&self.0.url).await.unwrap()
    }

    async fn write(&self, events: &[Event], commit: bool) {
        let tx = self.0.business_tx(events).await;
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
    }

    async fn write_open(&self, events: &[Event]) -> Box<dyn OpenTransaction> {
        Box::new(OpenSqliteTx(self.0.business_tx(events).await))
    }

    fn named(&self, schema: &str, table: &str) -> Result<SqliteOutbox, StoreError> {
        // SQLite has no schemas; the name is still checked so that neither
        // argument can carry an injection.
        SqliteOutboxOptions::default()
            .with_table(schema)
            .validate()?;
        SqliteOutbox::with_options(
            self.0.outbox.pool().clone(),
            SqliteOutboxOptions::default().with_table(table),
        )
    }
}

proclaim_testkit::store_conformance!(Sqlite);

fn event(subject: &str, n: u64) -> Event {
    Event::builder("DonorSecured")
        .subject(subject)
        .data(&serde_json::json!({ "n": n }))
        .build()
        .unwrap()
}

async fn write(outbox: &SqliteOutbox, events: &[Event]) {
    let mut tx = outbox.pool().begin().await.unwrap();
    for e in events {
        outbox.enqueue(&mut tx, e).await.unwrap();
    }
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn wakeups_fire_on_commit_only() {
    let db = Db::new().await;
    let outbox = &db.outbox;
    let mut wakeups = outbox
        .wakeups()
        .await
        .unwrap()
        .expect("notify is on by default");

    let mut tx = outbox.pool().begin().await.unwrap();
    outbox.enqueue(&mut tx, &event("a", 1)).await.unwrap();
    tx.rollback().await.unwrap();
    let nothing = tokio::time::timeout(Duration::from_millis(300), wakeups.next()).await;
    assert!(
        nothing.is_err(),
        "a rolled-back write must not wake the relay"
    );

    // The rolled-back write's connection goes back to the pool with its hook
    // disarmed: an unrelated commit on it wakes nobody.
    let mut tx = outbox.pool().begin().await.unwrap();
    sqlx::query("INSERT INTO campaign_donors DEFAULT VALUES")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let nothing = tokio::time::timeout(Duration::from_millis(300), wakeups.next()).await;
    assert!(nothing.is_err(), "a commit without events must not wake");

    // A clone shares the signal.
    write(&outbox.clone(), &[event("a", 2), event("b", 3)]).await;
    let woke = tokio::time::timeout(Duration::from_secs(5), wakeups.next()).await;
    assert_eq!(woke.unwrap(), Some(()));
    let batch = outbox.claim(LeaseToken::new(), 10, LEASE).await.unwrap();
    assert_eq!(numbers(&batch), vec![2, 3]);

    let silent = SqliteOutbox::with_options(
        outbox.pool().clone(),
        SqliteOutboxOptions::default().with_notify(false),
    )
    .unwrap();
    assert!(silent.wakeups().await.unwrap().is_none());
}

#[derive(Default)]
struct Collect {
    published: std::sync::Mutex<Vec<u64>>,
    count: AtomicU64,
}

impl Publisher for Collect {
    async fn publish(&self, record: &OutboxRecord) -> Result<(), PublishError> {
        let n = record.event.data_as::<serde_json::Value>().unwrap()["n"]
            .as_u64()
            .unwrap();
        self.published.lock().unwrap().push(n);
        self.count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn an_idle_relay_is_woken_by_a_commit() {
    let db = Db::new().await;
    let publisher = Arc::new(Collect::default());
    // Polling alone would take a minute: only the wake-up can be this quick.
    let config = RelayConfig {
        poll_interval: Duration::from_secs(60),
        ..RelayConfig::default()
    };
    let relay = Relay::new(db.outbox.clone(), publisher.clone(), config)
        .unwrap()
        .spawn();
    // Let the relay make its first (empty) claim and go idle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    write(&db.outbox, &[event("k", 1), event("k", 2)]).await;
    let p = publisher.clone();
    eventually(Duration::from_secs(5), "the woken relay publishes", || {
        let p = p.clone();
        async move { p.count.load(Ordering::SeqCst) == 2 }
    })
    .await;
    assert_eq!(*publisher.published.lock().unwrap(), vec![1, 2]);
    let report = relay.shutdown().await;
    assert_eq!(report.published, 2);
    assert_eq!(db.outbox.stats().await.unwrap().pending, 0);
}

#[tokio::test]
async fn memory_database_works_end_to_end() {
    let outbox = SqliteOutbox::connect("sqlite::memory:").await.unwrap();
    let err = outbox.verify_schema().await.unwrap_err();
    assert!(err.to_string().contains("run `proclaim migrate`"), "{err}");
    outbox.migrate().await.unwrap();
    outbox.migrate().await.unwrap();
    outbox.verify_schema().await.unwrap();
    let mut wakeups = outbox.wakeups().await.unwrap().unwrap();
    write(&outbox, &[event("a", 1), event("a", 2)]).await;
    tokio::time::timeout(Duration::from_secs(5), wakeups.next())
        .await
        .unwrap();
    // Another pool connection must see the same data: the pool has one.
    let batch = outbox.claim(LeaseToken::new(), 10, LEASE).await.unwrap();
    assert_eq!(numbers(&batch), vec![1, 2]);
    let stats = outbox.stats().await.unwrap();
    assert_eq!((stats.pending, stats.in_flight), (0, 2));
    assert!(outbox.describe().contains("\"proclaim_outbox\""));
}

#[tokio::test]
async fn a_file_database_uses_wal() {
    let db = Db::new().await;
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(db.outbox.pool())
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(db.outbox.pool())
        .await
        .unwrap();
    assert_eq!(sync, 1, "synchronous = NORMAL");
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(db.outbox.pool())
        .await
        .unwrap();
    assert_eq!(fk, 1);
    let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
        .fetch_one(db.outbox.pool())
        .await
        .unwrap();
    assert!(busy >= 1000, "busy_timeout {busy}");
    assert!(db.dir.path().join("outbox.db-wal").exists());
}

#[tokio::test]
async fn malformed_rows_are_reported_not_fatal() {
    let db = Db::new().await;
    let outbox = &db.outbox;
    write(outbox, &[event("a", 1), event("b", 2), event("c", 3)]).await;
    sqlx::query(r#"UPDATE proclaim_outbox SET metadata = '{"Bad Key": 1}' WHERE subject = 'a'"#)
        .execute(outbox.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE proclaim_outbox SET id = 'not-a-uuid' WHERE subject = 'c'")
        .execute(outbox.pool())
        .await
        .unwrap();
    let token = LeaseToken::new();
    let batch = outbox.claim(token, 10, LEASE).await.unwrap();
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
    // The relay dead-letters them; they are listed even with a broken id.
    let dead = batch
        .malformed
        .iter()
        .map(|m| proclaim_core::DeadLetter {
            sequence: m.sequence,
            error: m.error.clone(),
        })
        .collect();
    let outcome = proclaim_core::BatchOutcome {
        dead,
        ..Default::default()
    };
    let report = outbox
        .complete(token, &outcome, proclaim_core::AckMode::Delete)
        .await
        .unwrap();
    assert_eq!(report.applied, 2);
    let listed = outbox.dead_letters(10).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1].id, uuid::Uuid::nil());
    assert!(listed.iter().all(|d| d.dead_lettered_at.is_some()));
}

#[tokio::test]
async fn writers_are_serialized_so_sequence_follows_commit_order() {
    let db = Db::new().await;
    let outbox = db.outbox.clone();
    let mut t1 = outbox.pool().begin().await.unwrap();
    outbox.enqueue(&mut t1, &event("same", 1)).await.unwrap();
    let o2 = outbox.clone();
    let second = tokio::spawn(async move {
        let mut t2 = o2.pool().begin().await.unwrap();
        o2.enqueue(&mut t2, &event("same", 2)).await.unwrap();
        t2.commit().await.unwrap();
    });
    // The second writer waits for the database's write lock held by the first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!second.is_finished(), "SQLite has one writer at a time");
    t1.commit().await.unwrap();
    second.await.unwrap();
    let batch = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert_eq!(numbers(&batch), vec![1, 2], "sequence follows commit order");
}

#[tokio::test]
async fn batches_keep_payload_bytes_and_times() {
    let db = Db::new().await;
    let json =
        "{ \"b\": 1,\n\t  \"a\": [1, 2.50], \"s\": \"ünïcødé \\\"q\\\" \\\\ \\u2028 😀\" }\r\n";
    let original = Event::builder("DonorSecured")
        .subject("donor-9")
        .json(json)
        .time(chrono::DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap())
        .correlation_id("drive-7")
        .build()
        .unwrap();
    let other = Event::builder("Other").subject("x").build().unwrap();
    let mut tx = db.outbox.pool().begin().await.unwrap();
    db.outbox
        .enqueue_batch(&mut tx, &[original.clone(), other.clone()])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let batch = db.outbox.claim(LeaseToken::new(), 10, LEASE).await.unwrap();
    assert_eq!(batch.records.len(), 2);
    assert_eq!(batch.records[0].event, original);
    // (The event keeps the text as serde_json's RawValue holds it: without
    // the trailing whitespace.)
    assert_eq!(batch.records[0].event.data().get(), original.data().get());
    assert_eq!(original.data().get(), json.trim_end());
    let back = &batch.records[1].event;
    assert_eq!(back.id(), other.id());
    assert_eq!(
        back.time().timestamp_micros(),
        other.time().timestamp_micros(),
        "times keep their microseconds"
    );
    assert_eq!(batch.records[1].event.dataschema(), None);
}

#[tokio::test]
async fn a_busy_database_is_a_transient_error() {
    let db = Db::new().await;
    // A second pool that will not wait for the lock at all.
    let options = SqliteOutbox::connect_options(&db.url)
        .unwrap()
        .busy_timeout(Duration::ZERO);
    let impatient = SqliteOutbox::new(sqlx::SqlitePool::connect_with(options).await.unwrap());
    let mut holder = db.outbox.pool().begin().await.unwrap();
    db.outbox
        .enqueue(&mut holder, &event("a", 1))
        .await
        .unwrap();
    let err = impatient
        .claim(LeaseToken::new(), 10, LEASE)
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    holder.rollback().await.unwrap();
    // Reads never wait for the writer in WAL mode.
    assert!(impatient.stats().await.is_ok());
}

#[tokio::test]
async fn missing_table_is_a_permanent_error() {
    let db = Db::new().await;
    let other = SqliteOutbox::with_options(
        db.outbox.pool().clone(),
        SqliteOutboxOptions::default().with_table("elsewhere"),
    )
    .unwrap();
    let err = other.stats().await.unwrap_err();
    assert!(!err.is_transient(), "{err:?}");
    let err = other.verify_schema().await.unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    assert!(err.to_string().contains("run `proclaim migrate`"), "{err}");
}

#[tokio::test]
async fn connect_refuses_bad_urls_and_names() {
    let err = SqliteOutbox::connect("postgres://nope").await.unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    let dir = TempDir::new();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("no/such/dir.db").display()
    );
    let err = SqliteOutbox::connect(&url).await.unwrap_err();
    assert!(!err.is_transient(), "{err:?}");
    let err = SqliteOutbox::connect_with(
        "sqlite::memory:",
        SqliteOutboxOptions::default().with_table("x\"; DROP TABLE y; --"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
}
