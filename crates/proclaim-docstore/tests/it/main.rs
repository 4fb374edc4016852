//! Document store tests against the real PostgreSQL (a fresh schema per
//! test) and SQLite (a fresh database file per test). Every case is written
//! once in `doc_store_cases!` and stamped out for both backends.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proclaim_core::{Event, LeaseToken, OutboxStore};
use proclaim_docstore::{DocStoreError, Document, Expect, PgDocStore, SqliteDocStore};
use proclaim_postgres::{PgOutbox, PgOutboxOptions};
use proclaim_sqlite::SqliteOutbox;
use proclaim_testkit::pg::TestSchema;
use proclaim_testkit::unique_suffix;
use serde::{Deserialize, Serialize};
use serde_json::json;

const LEASE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct AgentNode {
    name: String,
    parent: Option<String>,
    status: String,
}

fn scout() -> AgentNode {
    AgentNode {
        name: "scout".into(),
        parent: Some("agent-0".into()),
        status: "spawned".into(),
    }
}

fn event(event_type: &str, subject: &str, data: &serde_json::Value) -> Event {
    Event::builder(event_type)
        .subject(subject)
        .data(data)
        .build()
        .unwrap()
}

async fn pending<S: OutboxStore>(outbox: &S) -> u64 {
    outbox.stats().await.unwrap().pending
}

/// Claims every claimable event (and leaves them leased).
async fn claim_all<S: OutboxStore>(outbox: &S) -> Vec<Event> {
    let batch = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert!(batch.malformed.is_empty(), "{:?}", batch.malformed);
    batch.records.into_iter().map(|r| r.event).collect()
}

fn assert_conflict<T: std::fmt::Debug>(
    result: Result<T, DocStoreError>,
    want_expected: Expect,
    want_actual: Option<i64>,
) -> DocStoreError {
    match result {
        Err(
            err @ DocStoreError::Conflict {
                expected, actual, ..
            },
        ) if expected == want_expected && actual == want_actual => err,
        other => panic!(
            "expected a conflict (expected {want_expected}, actual {want_actual:?}), got {other:?}"
        ),
    }
}

/// PostgreSQL: an outbox and documents table in a schema of their own.
struct PgFixture {
    // Fields drop in order: the store's pool before the schema is dropped.
    store: PgDocStore,
    _schema: TestSchema,
}

async fn pg_fixture() -> PgFixture {
    let schema = TestSchema::new().await;
    let outbox = PgOutbox::with_options(
        schema.pool.clone(),
        PgOutboxOptions::default().with_schema(&schema.name),
    )
    .unwrap();
    let store = PgDocStore::new(outbox);
    store.migrate().await.unwrap();
    assert_eq!(
        store.table_name(),
        format!(r#""{}"."documents""#, schema.name)
    );
    PgFixture {
        store,
        _schema: schema,
    }
}

/// A directory of its own under the system temp dir, removed on drop (also
/// when the test panics).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SQLite: a fresh database file holding the outbox and the documents.
struct SqliteFixture {
    store: SqliteDocStore,
    _dir: TempDir,
}

async fn sqlite_fixture() -> SqliteFixture {
    let dir = std::env::temp_dir().join(format!("proclaim-docstore-{}", unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let dir = TempDir(dir);
    let url = format!("sqlite://{}?mode=rwc", dir.0.join("docs.db").display());
    let store = SqliteDocStore::new(SqliteOutbox::connect(&url).await.unwrap());
    store.migrate().await.unwrap();
    assert_eq!(store.table_name(), r#""proclaim_documents""#);
    SqliteFixture { store, _dir: dir }
}

/// The cases, written once; `$fixture()` gives a value whose `store` is a
/// migrated document store of the backend (both have the same API).
///
/// Tests run on a multi-threaded runtime: if one fails with a transaction
/// open, the dropped transaction's rollback is flushed by a pool task while
/// the test thread blocks in `TestSchema`'s drop — on a single thread that
/// task never runs, the schema drop waits for the transaction's locks, and
/// a failing test would hang instead of failing.
macro_rules! doc_store_cases {
    ($backend:ident, $fixture:path) => {
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn document_and_event_commit_together() {
                let f = $fixture().await;
                let docs = &f.store;
                let agent = scout();
                let spawned = Event::builder("AgentSpawned")
                    .subject("agent-1")
                    .data(&agent)
                    .build()
                    .unwrap();

                let mut tx = docs.begin().await.unwrap();
                let version = tx
                    .put("agents", "agent-1", &agent, Expect::Absent)
                    .await
                    .unwrap();
                assert_eq!(version, 1);
                tx.emit(&spawned).await.unwrap();
                // The transaction sees its own write; nobody else does yet.
                let own = tx.get("agents", "agent-1").await.unwrap().unwrap();
                assert_eq!(own.version, 1);
                assert_eq!(docs.get("agents", "agent-1").await.unwrap(), None);
                assert_eq!(pending(docs.outbox()).await, 0);
                tx.commit().await.unwrap();

                let doc = docs.get("agents", "agent-1").await.unwrap().unwrap();
                assert_eq!(doc.collection, "agents");
                assert_eq!(doc.id, "agent-1");
                assert_eq!(doc.version, 1);
                assert_eq!(doc.body, serde_json::to_value(&agent).unwrap());
                let age = chrono::Utc::now() - doc.updated_at;
                assert!(age.num_seconds().abs() < 60, "updated_at {}", doc.updated_at);

                let typed: Document<AgentNode> =
                    docs.get_as("agents", "agent-1").await.unwrap().unwrap();
                assert_eq!(typed.body, agent);
                assert_eq!(typed.version, 1);

                let events = claim_all(docs.outbox()).await;
                assert_eq!(events.len(), 1);
                assert_eq!(events[0].id(), spawned.id());
                assert_eq!(events[0].event_type(), "AgentSpawned");
                assert_eq!(events[0].subject(), "agent-1");
                assert_eq!(events[0].data_as::<AgentNode>().unwrap(), agent);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn versions_increment_and_list_is_ordered() {
                let f = $fixture().await;
                let docs = &f.store;
                let none: &[Event] = &[];
                let put = |id: &'static str, n: i64, expect| {
                    let docs = docs.clone();
                    async move {
                        docs.put_with_events("counters", id, &json!({ "n": n }), expect, none)
                            .await
                    }
                };
                assert_eq!(put("b", 1, Expect::Any).await.unwrap(), 1);
                let first = docs.get("counters", "b").await.unwrap().unwrap();
                assert_eq!(put("b", 2, Expect::Any).await.unwrap(), 2);
                assert_eq!(put("b", 3, Expect::Version(2)).await.unwrap(), 3);
                assert_eq!(put("a", 1, Expect::Absent).await.unwrap(), 1);

                let b = docs.get("counters", "b").await.unwrap().unwrap();
                assert_eq!(b.version, 3);
                assert_eq!(b.body, json!({ "n": 3 }));
                assert!(b.updated_at >= first.updated_at);

                docs.put_with_events("other", "a", &json!(null), Expect::Any, none)
                    .await
                    .unwrap();
                let listed = docs.list("counters").await.unwrap();
                let keys: Vec<_> = listed.iter().map(|d| (d.id.as_str(), d.version)).collect();
                assert_eq!(keys, [("a", 1), ("b", 3)]);
                assert!(docs.list("nothing-here").await.unwrap().is_empty());
                assert_eq!(pending(docs.outbox()).await, 0);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn absent_on_existing_document_is_a_conflict_and_writes_nothing() {
                let f = $fixture().await;
                let docs = &f.store;
                docs.put_with_events("agents", "agent-1", &scout(), Expect::Absent, &[])
                    .await
                    .unwrap();

                let mut tx = docs.begin().await.unwrap();
                // An event emitted before the conflict is not written either.
                let spawned = event("AgentSpawned", "agent-1", &json!({ "again": true }));
                tx.emit(&spawned).await.unwrap();
                let mut other = scout();
                other.name = "impostor".into();
                let err = assert_conflict(
                    tx.put("agents", "agent-1", &other, Expect::Absent).await,
                    Expect::Absent,
                    Some(1),
                );
                assert_eq!(
                    err.to_string(),
                    "agents/agent-1: expected no document, found version 1"
                );
                assert!(err.is_conflict());
                assert!(tx.is_poisoned());
                // Poisoned: later writes and events are refused with the same error.
                assert_conflict(tx.emit(&spawned).await, Expect::Absent, Some(1));
                assert_conflict(
                    tx.put("agents", "agent-2", &other, Expect::Any).await,
                    Expect::Absent,
                    Some(1),
                );
                assert_conflict(tx.commit().await, Expect::Absent, Some(1));

                let doc = docs.get_as::<AgentNode>("agents", "agent-1").await.unwrap().unwrap();
                assert_eq!(doc.version, 1);
                assert_eq!(doc.body, scout());
                assert_eq!(docs.get("agents", "agent-2").await.unwrap(), None);
                assert_eq!(pending(docs.outbox()).await, 0);

                // The one-shot form reports the same and writes no event.
                let again = event("AgentSpawned", "agent-1", &json!({}));
                assert_conflict(
                    docs.put_with_events("agents", "agent-1", &other, Expect::Absent, &[again])
                        .await,
                    Expect::Absent,
                    Some(1),
                );
                assert_eq!(pending(docs.outbox()).await, 0);
                assert_eq!(docs.get("agents", "agent-1").await.unwrap().unwrap().version, 1);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn stale_version_is_a_conflict_with_the_stored_version() {
                let f = $fixture().await;
                let docs = &f.store;
                docs.put_with_events("agents", "agent-1", &scout(), Expect::Any, &[])
                    .await
                    .unwrap();
                docs.put_with_events("agents", "agent-1", &scout(), Expect::Any, &[])
                    .await
                    .unwrap();
                docs.put_with_events("agents", "agent-1", &scout(), Expect::Version(2), &[])
                    .await
                    .unwrap();
                docs.put_with_events("agents", "agent-1", &scout(), Expect::Version(3), &[])
                    .await
                    .unwrap();

                let mut working = scout();
                working.status = "working".into();
                let changed = event("AgentStatusChanged", "agent-1", &json!({ "to": "working" }));
                let err = assert_conflict(
                    docs.put_with_events(
                        "agents",
                        "agent-1",
                        &working,
                        Expect::Version(3),
                        std::slice::from_ref(&changed),
                    )
                    .await,
                    Expect::Version(3),
                    Some(4),
                );
                assert_eq!(err.to_string(), "agents/agent-1: expected version 3, found 4");
                let doc = docs.get_as::<AgentNode>("agents", "agent-1").await.unwrap().unwrap();
                assert_eq!((doc.version, doc.body.status.as_str()), (4, "spawned"));
                assert_eq!(pending(docs.outbox()).await, 0);

                // A version of a document that does not exist.
                let err = assert_conflict(
                    docs.put_with_events("agents", "ghost", &working, Expect::Version(1), &[changed])
                        .await,
                    Expect::Version(1),
                    None,
                );
                assert_eq!(err.to_string(), "agents/ghost: expected version 1, found no document");
                assert_eq!(docs.get("agents", "ghost").await.unwrap(), None);
                assert_eq!(pending(docs.outbox()).await, 0);

                // The right version goes through, with its event.
                let ok = event("AgentStatusChanged", "agent-1", &json!({ "to": "working" }));
                let version = docs
                    .put_with_events("agents", "agent-1", &working, Expect::Version(4), &[ok])
                    .await
                    .unwrap();
                assert_eq!(version, 5);
                assert_eq!(claim_all(docs.outbox()).await.len(), 1);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rollback_writes_neither() {
                let f = $fixture().await;
                let docs = &f.store;

                let mut tx = docs.begin().await.unwrap();
                tx.put("agents", "agent-1", &scout(), Expect::Absent).await.unwrap();
                tx.emit(&event("AgentSpawned", "agent-1", &json!({}))).await.unwrap();
                tx.rollback().await.unwrap();
                assert_eq!(docs.get("agents", "agent-1").await.unwrap(), None);
                assert_eq!(pending(docs.outbox()).await, 0);

                // Dropping an open transaction rolls back too.
                {
                    let mut tx = docs.begin().await.unwrap();
                    tx.put("agents", "agent-1", &scout(), Expect::Absent).await.unwrap();
                    tx.emit(&event("AgentSpawned", "agent-1", &json!({}))).await.unwrap();
                }
                // The dropped transaction's connection rolls back when it is
                // next used; a new transaction must not see its writes.
                let mut tx = docs.begin().await.unwrap();
                assert_eq!(tx.get("agents", "agent-1").await.unwrap(), None);
                tx.rollback().await.unwrap();
                assert_eq!(docs.get("agents", "agent-1").await.unwrap(), None);
                assert_eq!(pending(docs.outbox()).await, 0);
                assert!(claim_all(docs.outbox()).await.is_empty());
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn delete_with_events() {
                let f = $fixture().await;
                let docs = &f.store;
                docs.put_with_events("agents", "agent-1", &scout(), Expect::Absent, &[])
                    .await
                    .unwrap();
                docs.put_with_events("agents", "agent-1", &scout(), Expect::Any, &[])
                    .await
                    .unwrap();

                // A stale version refuses the delete and its event.
                let retired = event("AgentRetired", "agent-1", &json!({ "reason": "done" }));
                assert_conflict(
                    docs.delete_with_events(
                        "agents",
                        "agent-1",
                        Expect::Version(1),
                        std::slice::from_ref(&retired),
                    )
                    .await,
                    Expect::Version(1),
                    Some(2),
                );
                // Expect::Absent on an existing document is a conflict too.
                assert_conflict(
                    docs.delete_with_events(
                        "agents",
                        "agent-1",
                        Expect::Absent,
                        std::slice::from_ref(&retired),
                    )
                    .await,
                    Expect::Absent,
                    Some(2),
                );
                assert_eq!(pending(docs.outbox()).await, 0);
                assert_eq!(docs.get("agents", "agent-1").await.unwrap().unwrap().version, 2);

                docs.delete_with_events(
                    "agents",
                    "agent-1",
                    Expect::Version(2),
                    std::slice::from_ref(&retired),
                )
                .await
                .unwrap();
                assert_eq!(docs.get("agents", "agent-1").await.unwrap(), None);
                let events = claim_all(docs.outbox()).await;
                assert_eq!(events.len(), 1);
                assert_eq!(events[0].id(), retired.id());

                // Gone: a versioned delete conflicts, an unconditional one is a no-op.
                assert_conflict(
                    docs.delete_with_events("agents", "agent-1", Expect::Version(2), &[]).await,
                    Expect::Version(2),
                    None,
                );
                docs.delete_with_events("agents", "agent-1", Expect::Any, &[])
                    .await
                    .unwrap();
                docs.delete_with_events("agents", "agent-1", Expect::Absent, &[])
                    .await
                    .unwrap();

                // Re-created after a delete, the version starts again at 1.
                let v = docs
                    .put_with_events("agents", "agent-1", &scout(), Expect::Absent, &[])
                    .await
                    .unwrap();
                assert_eq!(v, 1);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_writers_exactly_one_wins() {
                const WRITERS: usize = 6;
                let f = $fixture().await;
                let docs = f.store.clone();
                docs.put_with_events("agents", "agent-1", &json!({ "writer": null }), Expect::Absent, &[])
                    .await
                    .unwrap();

                let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
                let mut racers = tokio::task::JoinSet::new();
                for writer in 0..WRITERS {
                    let docs = docs.clone();
                    let barrier = barrier.clone();
                    racers.spawn(async move {
                        let body = json!({ "writer": writer });
                        barrier.wait().await;
                        let mut tx = docs.begin().await.unwrap();
                        let put = tx.put("agents", "agent-1", &body, Expect::Version(1)).await;
                        let emitted = tx.emit(&event("AgentClaimed", "agent-1", &body)).await;
                        // Hold the row (PostgreSQL) or the write lock (SQLite)
                        // a little, so the others really wait on the winner.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let committed = tx.commit().await;
                        (writer, put, emitted, committed)
                    });
                }

                let mut winners = Vec::new();
                while let Some(joined) = racers.join_next().await {
                    let (writer, put, emitted, committed) = joined.unwrap();
                    match put {
                        Ok(version) => {
                            assert_eq!(version, 2);
                            emitted.unwrap();
                            committed.unwrap();
                            winners.push(writer);
                        }
                        Err(_) => {
                            assert_conflict(put, Expect::Version(1), Some(2));
                            assert_conflict(emitted, Expect::Version(1), Some(2));
                            assert_conflict(committed, Expect::Version(1), Some(2));
                        }
                    }
                }
                assert_eq!(winners.len(), 1, "winners: {winners:?}");
                let winner = winners[0];

                let doc = docs.get("agents", "agent-1").await.unwrap().unwrap();
                assert_eq!(doc.version, 2);
                assert_eq!(doc.body, json!({ "writer": winner }));
                assert_eq!(pending(docs.outbox()).await, 1);
                let events = claim_all(docs.outbox()).await;
                assert_eq!(events.len(), 1);
                assert_eq!(events[0].data_as::<serde_json::Value>().unwrap(), json!({ "writer": winner }));
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn invalid_names_are_refused() {
                let f = $fixture().await;
                let docs = &f.store;
                let long = "x".repeat(256);
                let bad_keys: [(&str, &str); 5] = [
                    ("", "agent-1"),
                    ("agents", ""),
                    ("agents", &long),
                    ("age\nnts", "agent-1"),
                    ("agents", "agent\u{0}1"),
                ];
                for (collection, id) in bad_keys {
                    let invalid = |r: Result<_, DocStoreError>| {
                        matches!(r, Err(DocStoreError::InvalidName { .. }))
                    };
                    assert!(invalid(docs.get(collection, id).await.map(drop)), "{collection:?}/{id:?}");
                    assert!(invalid(
                        docs.put_with_events(collection, id, &json!({}), Expect::Any, &[]).await.map(drop)
                    ));
                    assert!(invalid(
                        docs.delete_with_events(collection, id, Expect::Any, &[]).await
                    ));
                }
                assert!(matches!(
                    docs.list("").await,
                    Err(DocStoreError::InvalidName { what: "collection", .. })
                ));
                let err = docs.get("agents", "").await.unwrap_err();
                assert_eq!(err.to_string(), r#"invalid document id "": must not be empty"#);

                // A refused name touches nothing: the transaction goes on.
                let mut tx = docs.begin().await.unwrap();
                assert!(tx.put("agents", "", &json!({}), Expect::Any).await.is_err());
                assert!(!tx.is_poisoned());
                tx.put("agents", &"y".repeat(255), &json!({}), Expect::Absent).await.unwrap();
                tx.emit(&event("AgentSpawned", "agent-y", &json!({}))).await.unwrap();
                tx.commit().await.unwrap();
                assert_eq!(docs.list("agents").await.unwrap().len(), 1);
                assert_eq!(pending(docs.outbox()).await, 1);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn migrate_again_and_other_prefixes() {
                let f = $fixture().await;
                let docs = &f.store;
                docs.put_with_events("agents", "agent-1", &scout(), Expect::Absent, &[])
                    .await
                    .unwrap();
                docs.migrate().await.unwrap();
                assert_eq!(docs.get("agents", "agent-1").await.unwrap().unwrap().version, 1);

                let tavern = docs.clone().with_prefix("tavern_").unwrap();
                assert!(tavern.table_name().ends_with(r#""tavern_documents""#));
                tavern.migrate().await.unwrap();
                assert_eq!(tavern.get("agents", "agent-1").await.unwrap(), None);
                assert!(matches!(
                    docs.clone().with_prefix("Robert'); DROP TABLE students; --"),
                    Err(DocStoreError::Store(proclaim_core::StoreError::Config(_)))
                ));
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn bodies_are_any_json_and_typed_reads_check_the_shape() {
                let f = $fixture().await;
                let docs = &f.store;
                let body = json!({ "nested": { "list": [1, 2.5, "three", null, true] }, "unicode": "héllo ✓" });
                docs.put_with_events("misc", "any", &body, Expect::Any, &[]).await.unwrap();
                docs.put_with_events("misc", "scalar", &42, Expect::Any, &[]).await.unwrap();
                assert_eq!(docs.get("misc", "any").await.unwrap().unwrap().body, body);
                assert_eq!(docs.get("misc", "scalar").await.unwrap().unwrap().body, json!(42));
                let err = docs.get_as::<AgentNode>("misc", "any").await.unwrap_err();
                assert!(matches!(err, DocStoreError::Json { .. }), "{err:?}");
                assert!(err.to_string().starts_with("misc/any: document JSON:"), "{err}");
            }
        }
    };
}

doc_store_cases!(pg, super::pg_fixture);
doc_store_cases!(sqlite, super::sqlite_fixture);

/// PostgreSQL aborts a transaction on a failed statement, and `COMMIT` then
/// quietly rolls back: a failure in the caller's own SQL must not pass for a
/// commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_failed_own_statement_is_not_committed() {
    let f = pg_fixture().await;
    let docs = &f.store;
    let mut tx = docs.begin().await.unwrap();
    tx.put("agents", "agent-1", &scout(), Expect::Absent)
        .await
        .unwrap();
    tx.emit(&event("AgentSpawned", "agent-1", &json!({})))
        .await
        .unwrap();
    let failed = sqlx::query("SELECT 1 / 0")
        .execute(&mut **tx.transaction())
        .await;
    assert!(failed.is_err());
    let err = tx.commit().await.unwrap_err();
    assert!(matches!(err, DocStoreError::Aborted(_)), "{err:?}");
    assert_eq!(docs.get("agents", "agent-1").await.unwrap(), None);
    assert_eq!(pending(docs.outbox()).await, 0);
}

/// The caller's own statements share the transaction with the documents and
/// the events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_own_statements_commit_with_documents() {
    let f = pg_fixture().await;
    let docs = &f.store;
    let audit = format!(r#""{}"."audit""#, f._schema.name);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {audit} (what TEXT NOT NULL)"
    )))
    .execute(docs.outbox().pool())
    .await
    .unwrap();
    let mut tx = docs.begin().await.unwrap();
    tx.put("agents", "agent-1", &scout(), Expect::Absent)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {audit} (what) VALUES ($1)"
    )))
    .bind("spawned agent-1")
    .execute(&mut **tx.transaction())
    .await
    .unwrap();
    tx.emit(&event("AgentSpawned", "agent-1", &json!({})))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let rows: i64 =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {audit}")))
            .fetch_one(docs.outbox().pool())
            .await
            .unwrap();
    assert_eq!(rows, 1);
    assert_eq!(pending(docs.outbox()).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_own_statements_commit_with_documents() {
    let f = sqlite_fixture().await;
    let docs = &f.store;
    sqlx::raw_sql("CREATE TABLE audit (what TEXT NOT NULL)")
        .execute(docs.outbox().pool())
        .await
        .unwrap();
    let mut tx = docs.begin().await.unwrap();
    tx.put("agents", "agent-1", &scout(), Expect::Absent)
        .await
        .unwrap();
    sqlx::query("INSERT INTO audit (what) VALUES (?1)")
        .bind("spawned agent-1")
        .execute(&mut **tx.transaction())
        .await
        .unwrap();
    tx.emit(&event("AgentSpawned", "agent-1", &json!({})))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM audit")
        .fetch_one(docs.outbox().pool())
        .await
        .unwrap();
    assert_eq!(rows, 1);
    assert_eq!(pending(docs.outbox()).await, 1);
}
