//! PostgreSQL store tests against the real local PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod inbox;
mod projector;

use std::time::Duration;

use proclaim_core::{Event, LeaseToken, OutboxStore, StoreError};
use proclaim_postgres::{PgOutbox, PgOutboxOptions};
use proclaim_testkit::conformance::{Capabilities, OpenTransaction, StoreHarness};
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

/// The PostgreSQL store in the conformance suite: a schema of its own per
/// test, claims walking `WINDOW` sequence numbers in write order (see
/// `PgOutboxOptions::claim_window`).
struct Pg<const WINDOW: u64> {
    ts: TestSchema,
    outbox: PgOutbox,
}

struct OpenPgTx(sqlx::Transaction<'static, sqlx::Postgres>);

impl OpenTransaction for OpenPgTx {
    fn commit(self: Box<Self>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move { self.0.commit().await.unwrap() })
    }
}

impl<const WINDOW: u64> Pg<WINDOW> {
    fn options(&self) -> PgOutboxOptions {
        PgOutboxOptions::default()
            .with_schema(&self.ts.name)
            .with_claim_window(WINDOW)
    }

    async fn business_tx(&self, events: &[Event]) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut tx = self.ts.pool.begin().await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            r#"INSERT INTO "{}".campaign_donors DEFAULT VALUES"#,
            self.ts.name
        )))
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

impl<const WINDOW: u64> StoreHarness for Pg<WINDOW> {
    type Store = PgOutbox;
    const CAPABILITIES: Capabilities = Capabilities {
        concurrent_writers: true,
    };

    async fn setup() -> Self {
        let ts = TestSchema::new().await;
        let outbox = PgOutbox::with_options(
            ts.pool.clone(),
            PgOutboxOptions::default()
                .with_schema(&ts.name)
                .with_claim_window(WINDOW),
        )
        .unwrap();
        outbox.migrate().await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            r#"CREATE TABLE "{}".campaign_donors (id BIGSERIAL PRIMARY KEY)"#,
            ts.name
        )))
        .execute(&ts.pool)
        .await
        .unwrap();
        Pg { ts, outbox }
    }

    fn store(&self) -> PgOutbox {
        self.outbox.clone()
    }

    async fn second_store(&self) -> PgOutbox {
        let pool = self.ts.another_pool().await;
        PgOutbox::with_options(pool, self.options()).unwrap()
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
        Box::new(OpenPgTx(self.business_tx(events).await))
    }

    fn named(&self, schema: &str, table: &str) -> Result<PgOutbox, StoreError> {
        PgOutbox::with_options(
            self.ts.pool.clone(),
            PgOutboxOptions::default()
                .with_schema(schema)
                .with_table(table),
        )
    }
}

proclaim_testkit::store_conformance!(Pg<4096>);
// The suite again with the narrowest window (twice the batch size), so that
// claims often go past it and take subject heads (`claim_heads`): order,
// no overlap between concurrent claimers and every outcome must still hold.
proclaim_testkit::store_conformance!(Pg<1>, narrow_window_conformance);

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

#[tokio::test]
async fn a_locked_predecessor_still_blocks_its_subject() {
    // A stale relay whose lease ran out is recording a retry for the head of
    // "k": it holds the head's row lock. A claim now must skip the head (it is
    // locked) and must not take the next event of "k" either.
    let ts = TestSchema::new().await;
    let outbox = outbox(&ts).await;
    let mut tx = ts.pool.begin().await.unwrap();
    outbox
        .enqueue_batch(&mut tx, &[event("k", 1), event("k", 2), event("j", 3)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let stale = outbox
        .claim(LeaseToken::new(), 1, Duration::from_millis(1))
        .await
        .unwrap();
    assert_eq!(numbers(&stale), vec![1]);
    let mut recording = ts.pool.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        r#"UPDATE "{}".outbox SET last_error = 'retrying' WHERE sequence = $1"#,
        ts.name
    )))
    .bind(stale.records[0].sequence)
    .execute(&mut *recording)
    .await
    .unwrap();
    let other = PgOutbox::with_options(
        ts.another_pool().await,
        PgOutboxOptions::default().with_schema(&ts.name),
    )
    .unwrap();
    let claimed = other.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert_eq!(
        numbers(&claimed),
        vec![3],
        "2 must wait behind its locked head"
    );
    recording.rollback().await.unwrap();
    let claimed = other.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert_eq!(numbers(&claimed), vec![1, 2]);
}

/// Writes one event of subject "k", claims it and deletes it as published,
/// with a pause first so the claim runs a floor probe.
async fn deliver_one(outbox: &PgOutbox, n: u64) {
    write(outbox, &[event("k", n)]).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let batch = claim_and_ack(outbox).await;
    assert_eq!(numbers(&batch), vec![n]);
}

/// Claims what is due and deletes it as published; returns the batch.
async fn claim_and_ack(outbox: &PgOutbox) -> proclaim_core::ClaimedBatch {
    let token = LeaseToken::new();
    let batch = outbox.claim(token, 100, LEASE).await.unwrap();
    let outcome = proclaim_core::BatchOutcome {
        published: batch.records.iter().map(|r| r.sequence).collect(),
        ..Default::default()
    };
    outbox
        .complete(token, &outcome, proclaim_core::AckMode::Delete)
        .await
        .unwrap();
    batch
}

/// A subject stuck on a failing event in front of a long backlog of its own
/// fills the claim's window; the other subjects behind it still go, through
/// the claim of subject heads past the window.
#[tokio::test]
async fn a_subject_stuck_in_front_of_the_window_does_not_hold_back_the_others() {
    let ts = TestSchema::new().await;
    let outbox = PgOutbox::with_options(
        ts.pool.clone(),
        PgOutboxOptions::default()
            .with_schema(&ts.name)
            .with_claim_window(1),
    )
    .unwrap();
    outbox.migrate().await.unwrap();
    let mut events: Vec<Event> = (0..10).map(|n| event("stuck", n)).collect();
    events.extend([event("a", 10), event("b", 11), event("a", 12)]);
    write(&outbox, &events).await;

    let token = LeaseToken::new();
    let head = outbox.claim(token, 1, LEASE).await.unwrap();
    assert_eq!(numbers(&head), vec![0]);
    let retry = proclaim_core::BatchOutcome {
        retry: vec![proclaim_core::Retry {
            sequence: head.records[0].sequence,
            delay: Duration::from_secs(3600),
            error: "the broker refuses it".into(),
        }],
        ..Default::default()
    };
    outbox
        .complete(token, &retry, proclaim_core::AckMode::Delete)
        .await
        .unwrap();

    // Limit 2: the window is 4 sequence numbers, all of them "stuck".
    let token = LeaseToken::new();
    let others = outbox.claim(token, 2, LEASE).await.unwrap();
    assert_eq!(numbers(&others), vec![10, 11], "one head per other subject");
    let ack = proclaim_core::BatchOutcome {
        published: others.records.iter().map(|r| r.sequence).collect(),
        ..Default::default()
    };
    outbox
        .complete(token, &ack, proclaim_core::AckMode::Delete)
        .await
        .unwrap();
    let next = outbox.claim(LeaseToken::new(), 2, LEASE).await.unwrap();
    assert_eq!(
        numbers(&next),
        vec![12],
        "a's second event, after its first"
    );
    let blocked = outbox.claim(LeaseToken::new(), 2, LEASE).await.unwrap();
    assert!(blocked.is_empty(), "stuck waits: {:?}", numbers(&blocked));
}

#[tokio::test]
async fn the_claim_floor_waits_for_a_transaction_that_commits_late() {
    let ts = TestSchema::new().await;
    let outbox = outbox(&ts).await;
    // A transaction takes the lowest sequence and stays open while later
    // events are written and delivered.
    let mut late = ts.pool.begin().await.unwrap();
    outbox.enqueue(&mut late, &event("late", 0)).await.unwrap();
    for n in 1..=5 {
        deliver_one(&outbox, n).await;
    }
    assert_eq!(
        outbox.claim_floor(),
        0,
        "the floor must not pass a sequence a running transaction holds"
    );
    late.commit().await.unwrap();
    let batch = claim_and_ack(&outbox).await;
    assert_eq!(numbers(&batch), vec![0], "the late commit is delivered");
    // Control: once nothing below is pending or running, the floor rises
    // past every delivered row.
    for n in 6..=10 {
        deliver_one(&outbox, n).await;
    }
    assert!(
        outbox.claim_floor() > batch.records[0].sequence,
        "floor {} should have passed the late row {}",
        outbox.claim_floor(),
        batch.records[0].sequence
    );
}

#[tokio::test]
async fn a_dead_letter_replayed_after_the_floor_passed_it_is_claimed() {
    let ts = TestSchema::new().await;
    let outbox = outbox(&ts).await;
    write(&outbox, &[event("d", 0)]).await;
    let token = LeaseToken::new();
    let batch = outbox.claim(token, 100, LEASE).await.unwrap();
    let dead_sequence = batch.records[0].sequence;
    let outcome = proclaim_core::BatchOutcome {
        dead: vec![proclaim_core::DeadLetter {
            sequence: dead_sequence,
            error: "poison".into(),
        }],
        ..Default::default()
    };
    outbox
        .complete(token, &outcome, proclaim_core::AckMode::Delete)
        .await
        .unwrap();
    for n in 1..=5 {
        deliver_one(&outbox, n).await;
    }
    assert!(outbox.claim_floor() > dead_sequence, "the floor moved on");
    assert_eq!(outbox.replay_dead_letters(None).await.unwrap(), 1);
    let replayed = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert_eq!(numbers(&replayed), vec![0]);
    assert!(replayed.records[0].sequence > dead_sequence, "re-sequenced");
    assert!(outbox.dead_letters(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_restarted_sequence_resets_the_claim_floor() {
    let ts = TestSchema::new().await;
    let outbox = outbox(&ts).await;
    for n in 1..=5 {
        deliver_one(&outbox, n).await;
    }
    assert!(outbox.claim_floor() > 1);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        r#"TRUNCATE "{}".outbox RESTART IDENTITY"#,
        ts.name
    )))
    .execute(&ts.pool)
    .await
    .unwrap();
    write(&outbox, &[event("k", 6)]).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let batch = outbox.claim(LeaseToken::new(), 100, LEASE).await.unwrap();
    assert_eq!(numbers(&batch), vec![6]);
}
