//! PostgreSQL store tests against the real local PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashSet;
use std::time::Duration;

use proclaim_core::{
    AckMode, BatchOutcome, DeadLetter, Event, LeaseToken, OutboxStore, Retry, StoreError,
};
use proclaim_postgres::{PgOutbox, PgOutboxOptions};
use proclaim_testkit::eventually;
use proclaim_testkit::pg::TestSchema;

const LEASE: Duration = Duration::from_secs(30);

async fn outbox(ts: &TestSchema) -> PgOutbox {
    let outbox = PgOutbox::with_options(
        ts.pool.clone(),
        PgOutboxOptions::default().with_schema(&ts.name),
    )
    .unwrap();
    outbox.migrate().await.unwrap();
    outbox
}

fn event(subject: &str, n: u64) -> Event {
    Event::builder("DonorSecured")
        .subject(subject)
        .data(&serde_json::json!({ "n": n }))
        .build()
        .unwrap()
}

async fn write(outbox: &PgOutbox, events: &[Event]) {
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

#[tokio::test]
async fn committed_events_are_stored_and_rolled_back_ones_are_not() {
    let ts = TestSchema::new().await;
    let outbox = outbox(&ts).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        r#"CREATE TABLE "{}".campaign_donors (id BIGINT PRIMARY KEY)"#,
        ts.name
    )))
    .execute(&ts.pool)
    .await
    .unwrap();
    let insert_donor = format!(r#"INSERT INTO "{}".campaign_donors VALUES ($1)"#, ts.name);

    let mut tx = ts.pool.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(insert_donor.clone()))
        .bind(1_i64)
        .execute(&mut *tx)
        .await
        .unwrap();
    outbox.enqueue(&mut tx, &event("donor-1", 1)).await.unwrap();
    tx.rollback().await.unwrap();

    let mut tx = ts.pool.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(insert_donor))
        .bind(2_i64)
        .execute(&mut *tx)
        .await
        .unwrap();
    outbox.enqueue(&mut tx, &event("donor-2", 2)).await.unwrap();
    drop(tx); // dropped without commit = rollback

    write(&outbox, &[event("donor-3", 3)]).await;
    let batch = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert_eq!(numbers(&batch), vec![3]);
    let stats = outbox.stats().await.unwrap();
    assert_eq!((stats.pending, stats.in_flight), (0, 1));
}

#[tokio::test]
async fn stored_event_round_trips_exactly() {
    let ts = TestSchema::new().await;
    let outbox = outbox(&ts).await;
    let original = Event::builder("DonorSecured")
        .subject("donor-9")
        .source("campaign-finance")
        .dataschema("urn:donor-secured:v2")
        .json(r#"{ "b": 1,   "a": [1, 2.50] }"#)
        .correlation_id("drive-7")
        .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .build()
        .unwrap();
    write(&outbox, std::slice::from_ref(&original)).await;
    let batch = outbox.claim(LeaseToken::new(), 10, LEASE).await.unwrap();
    let back = &batch.records[0];
    // Microsecond precision is what PostgreSQL keeps.
    assert_eq!(
        back.event.time().timestamp_micros(),
        original.time().timestamp_micros()
    );
    assert_eq!(
        back.event.data().get(),
        original.data().get(),
        "payload bytes kept verbatim"
    );
    assert_eq!(back.event.metadata(), original.metadata());
    assert_eq!(back.event.id(), original.id());
    assert_eq!(back.event.dataschema(), original.dataschema());
    assert_eq!(back.attempts, 1);
}

#[tokio::test]
async fn late_committing_transaction_is_not_skipped() {
    let ts = TestSchema::new().await;
    let outbox = outbox(&ts).await;
    // T1 takes its sequence first but commits last.
    let mut t1 = ts.pool.begin().await.unwrap();
    outbox.enqueue(&mut t1, &event("a", 1)).await.unwrap();
    write(&outbox, &[event("b", 2)]).await;

    let first = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert_eq!(numbers(&first), vec![2]);
    t1.commit().await.unwrap();
    let second = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert_eq!(
        numbers(&second),
        vec![1],
        "the late commit must still be claimed"
    );
    assert!(second.records[0].sequence < first.records[0].sequence);
}

#[tokio::test]
async fn writers_of_one_subject_are_sequenced_in_commit_order() {
    let ts = TestSchema::new().await;
    let outbox = outbox(&ts).await;
    let mut t1 = ts.pool.begin().await.unwrap();
    outbox.enqueue(&mut t1, &event("same", 1)).await.unwrap();

    let o2 = outbox.clone();
    let (pid_tx, pid_rx) = tokio::sync::oneshot::channel::<i32>();
    let second = tokio::spawn(async move {
        let mut t2 = o2.pool().begin().await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *t2)
            .await
            .unwrap();
        pid_tx.send(pid).unwrap();
        o2.enqueue(&mut t2, &event("same", 2)).await.unwrap();
        t2.commit().await.unwrap();
    });
    let pid = pid_rx.await.unwrap();
    // T2 must be waiting on the subject's advisory lock held by T1.
    let pool = ts.pool.clone();
    eventually(Duration::from_secs(10), "second writer waits on the subject lock", || {
        let pool = pool.clone();
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE pid = $1 AND locktype = 'advisory' AND NOT granted",
            )
            .bind(pid)
            .fetch_one(&pool)
            .await
            .unwrap();
            waiting == 1
        }
    })
    .await;
    assert!(!second.is_finished());
    t1.commit().await.unwrap();
    second.await.unwrap();

    let batch = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert_eq!(numbers(&batch), vec![1, 2], "sequence follows commit order");
}

#[tokio::test]
async fn batch_enqueue_keeps_order_and_is_atomic() {
    let ts = TestSchema::new().await;
    let outbox = outbox(&ts).await;
    let events: Vec<Event> = (0..50).map(|n| event(&format!("k{}", n % 3), n)).collect();
    let mut tx = ts.pool.begin().await.unwrap();
    outbox.enqueue_batch(&mut tx, &events).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(outbox.stats().await.unwrap().pending, 0);

    let mut tx = ts.pool.begin().await.unwrap();
    outbox.enqueue_batch(&mut tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    let batch = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert_eq!(numbers(&batch), (0..50).collect::<Vec<_>>());
}

#[tokio::test]
async fn claims_respect_per_subject_order() {
    let ts = TestSchema::new().await;
    let outbox = outbox(&ts).await;
    write(
        &outbox,
        &[
            event("k", 1),
            event("k", 2),
            event("other", 3),
            event("k", 4),
        ],
    )
    .await;

    // A claim of one takes the head of k.
    let a = LeaseToken::new();
    let first = outbox.claim(a, 1, LEASE).await.unwrap();
    assert_eq!(numbers(&first), vec![1]);
    // While k's head is leased, nothing later of k may be claimed; other keys may.
    let second = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert_eq!(numbers(&second), vec![3]);

    // The head fails and waits for a retry: k stays blocked.
    let outcome = BatchOutcome {
        retry: vec![Retry {
            sequence: first.records[0].sequence,
            delay: Duration::from_millis(300),
            error: "broker said no".into(),
        }],
        ..Default::default()
    };
    outbox.complete(a, &outcome, AckMode::Delete).await.unwrap();
    let blocked = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert!(
        blocked.is_empty(),
        "k is blocked behind its failing head: {:?}",
        numbers(&blocked)
    );

    // Once the retry is due, the whole of k comes, in order, attempt 2 for its head.
    let again =
        proclaim_testkit::eventually_value(Duration::from_secs(10), "retry becomes due", || {
            let outbox = outbox.clone();
            async move {
                let b = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
                (!b.is_empty()).then_some(b)
            }
        })
        .await;
    assert_eq!(numbers(&again), vec![1, 2, 4]);
    assert_eq!(again.records[0].attempts, 2);
}

#[tokio::test]
async fn outcome_kinds_and_fencing() {
    let ts = TestSchema::new().await;
    let outbox = outbox(&ts).await;
    write(
        &outbox,
        &[event("a", 1), event("b", 2), event("c", 3), event("d", 4)],
    )
    .await;
    let token = LeaseToken::new();
    let batch = outbox.claim(token, 100, LEASE).await.unwrap();
    let seq: Vec<i64> = batch.records.iter().map(|r| r.sequence).collect();

    // A stale owner's token applies nothing.
    let stale = BatchOutcome {
        published: seq.clone(),
        ..Default::default()
    };
    let report = outbox
        .complete(LeaseToken::new(), &stale, AckMode::Delete)
        .await
        .unwrap();
    assert_eq!((report.applied, report.lost), (0, 4));

    let outcome = BatchOutcome {
        published: vec![seq[0]],
        retry: vec![Retry {
            sequence: seq[1],
            delay: Duration::from_secs(3600),
            error: "later".into(),
        }],
        dead: vec![DeadLetter {
            sequence: seq[2],
            error: "poison\0with nul".into(),
        }],
        released: vec![seq[3]],
    };
    let report = outbox
        .complete(token, &outcome, AckMode::Delete)
        .await
        .unwrap();
    assert_eq!((report.applied, report.lost), (4, 0));

    let stats = outbox.stats().await.unwrap();
    assert_eq!(stats.pending, 2, "retrying + released");
    assert_eq!(stats.in_flight, 0);
    assert_eq!(stats.dead_lettered, 1);
    assert_eq!(stats.published_retained, 0, "published rows are deleted");
    let dead = outbox.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_error, "poisonwith nul");
    assert_eq!(dead[0].subject, "c");

    // The released event comes back without an attempt counted.
    let next = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert_eq!(numbers(&next), vec![4]);
    assert_eq!(next.records[0].attempts, 1);

    // Replay puts the dead letter back in line.
    assert_eq!(outbox.replay_dead_letters(None).await.unwrap(), 1);
    let replayed = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert_eq!(numbers(&replayed), vec![3]);
    assert_eq!(outbox.stats().await.unwrap().dead_lettered, 0);
}

#[tokio::test]
async fn expired_lease_is_reclaimed() {
    let ts = TestSchema::new().await;
    let outbox = outbox(&ts).await;
    write(&outbox, &[event("a", 1), event("a", 2)]).await;
    let dead_relay = outbox
        .claim(LeaseToken::new(), 100, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(dead_relay.len(), 2);
    assert!(
        outbox
            .claim(LeaseToken::new(), 100, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    let taken_over =
        proclaim_testkit::eventually_value(Duration::from_secs(10), "lease expires", || {
            let outbox = outbox.clone();
            async move {
                let b = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
                (!b.is_empty()).then_some(b)
            }
        })
        .await;
    assert_eq!(numbers(&taken_over), vec![1, 2]);
    assert!(taken_over.records.iter().all(|r| r.attempts == 2));
}

#[tokio::test]
async fn concurrent_claimers_never_overlap_and_lose_nothing() {
    let ts = TestSchema::new().await;
    let outbox = outbox(&ts).await;
    let events: Vec<Event> = (0..2000)
        .map(|n| event(&format!("k{}", n % 97), n))
        .collect();
    for chunk in events.chunks(500) {
        let mut tx = ts.pool.begin().await.unwrap();
        outbox.enqueue_batch(&mut tx, chunk).await.unwrap();
        tx.commit().await.unwrap();
    }
    let other_pool = ts.another_pool().await;
    let other =
        PgOutbox::with_options(other_pool, PgOutboxOptions::default().with_schema(&ts.name))
            .unwrap();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let o = if i % 2 == 0 {
            outbox.clone()
        } else {
            other.clone()
        };
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let token = LeaseToken::new();
                let batch = o.claim(token, 37, LEASE).await.unwrap();
                if batch.is_empty() {
                    let s = o.stats().await.unwrap();
                    if s.pending + s.in_flight == 0 {
                        break;
                    }
                    tokio::task::yield_now().await;
                    continue;
                }
                let published: Vec<i64> = batch.records.iter().map(|r| r.sequence).collect();
                seen.extend(batch.records.iter().map(|r| r.event.id()));
                let outcome = BatchOutcome {
                    published,
                    ..Default::default()
                };
                let report = o.complete(token, &outcome, AckMode::Delete).await.unwrap();
                assert_eq!(report.lost, 0);
            }
            seen
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 2000, "every event claimed exactly once");
    assert_eq!(unique.len(), 2000);
}

#[tokio::test]
async fn retention_keeps_published_rows_until_purged() {
    let ts = TestSchema::new().await;
    let outbox = outbox(&ts).await;
    write(&outbox, &[event("a", 1), event("b", 2)]).await;
    let token = LeaseToken::new();
    let batch = outbox.claim(token, 10, LEASE).await.unwrap();
    let outcome = BatchOutcome {
        published: batch.records.iter().map(|r| r.sequence).collect(),
        ..Default::default()
    };
    outbox
        .complete(token, &outcome, AckMode::Retain)
        .await
        .unwrap();
    let stats = outbox.stats().await.unwrap();
    assert_eq!((stats.pending, stats.published_retained), (0, 2));
    assert!(
        outbox
            .claim(LeaseToken::new(), 10, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        outbox
            .purge_published(Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        outbox
            .purge_published(Duration::from_millis(1))
            .await
            .unwrap(),
        2
    );
    assert_eq!(outbox.stats().await.unwrap().published_retained, 0);
}

#[tokio::test]
async fn malformed_rows_are_reported_not_fatal() {
    let ts = TestSchema::new().await;
    let outbox = outbox(&ts).await;
    write(&outbox, &[event("a", 1), event("b", 2)]).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        r#"UPDATE "{}".outbox SET metadata = '{{"Bad Key": 1}}' WHERE subject = 'a'"#,
        ts.name
    )))
    .execute(&ts.pool)
    .await
    .unwrap();
    let batch = outbox.claim(LeaseToken::new(), 10, LEASE).await.unwrap();
    assert_eq!(numbers(&batch), vec![2]);
    assert_eq!(batch.malformed.len(), 1);
    assert!(
        batch.malformed[0].error.contains("metadata"),
        "{}",
        batch.malformed[0].error
    );
}

#[tokio::test]
async fn migrate_is_idempotent_and_verify_explains_a_missing_table() {
    let ts = TestSchema::new().await;
    let outbox = PgOutbox::with_options(
        ts.pool.clone(),
        PgOutboxOptions::default().with_schema(&ts.name),
    )
    .unwrap();
    let err = outbox.verify_schema().await.unwrap_err();
    assert!(err.to_string().contains("proclaim migrate"), "{err}");
    let (a, b) = tokio::join!(outbox.migrate(), outbox.migrate());
    a.unwrap();
    b.unwrap();
    outbox.migrate().await.unwrap();
    outbox.verify_schema().await.unwrap();
}

#[tokio::test]
async fn identifier_validation_rejects_injection() {
    let ts = TestSchema::new().await;
    for (schema, table) in [
        ("public; DROP TABLE x", "outbox"),
        ("proclaim", "outbox\" CASCADE --"),
        ("Proclaim", "outbox"),
        ("proclaim", ""),
    ] {
        let err = PgOutbox::with_options(
            ts.pool.clone(),
            PgOutboxOptions::default()
                .with_schema(schema)
                .with_table(table),
        )
        .unwrap_err();
        assert!(
            matches!(err, StoreError::Config(_)),
            "{schema}.{table}: {err}"
        );
    }
}

#[tokio::test]
async fn notify_wakes_a_listener_on_commit_only() {
    use futures::StreamExt;
    let ts = TestSchema::new().await;
    let outbox = outbox(&ts).await;
    let mut wakeups = outbox
        .wakeups()
        .await
        .unwrap()
        .expect("notify is on by default");

    let mut tx = ts.pool.begin().await.unwrap();
    outbox.enqueue(&mut tx, &event("a", 1)).await.unwrap();
    tx.rollback().await.unwrap();
    let nothing = tokio::time::timeout(Duration::from_millis(300), wakeups.next()).await;
    assert!(
        nothing.is_err(),
        "a rolled-back write must not wake the relay"
    );

    write(&outbox, &[event("a", 2), event("b", 3)]).await;
    let woke = tokio::time::timeout(Duration::from_secs(5), wakeups.next()).await;
    assert_eq!(woke.unwrap(), Some(()));
}
