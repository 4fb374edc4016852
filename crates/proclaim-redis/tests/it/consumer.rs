//! The consumer runtime over [`RedisStreamSource`], with the real inbox
//! (`PgInbox` in a schema of the test's own) and streams of the test's own:
//! duplicates, failures mid-transaction, a crash between commit and ack,
//! per-subject order, several groups, undecodable entries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proclaim_core::consumer::{Consumer, Context, HandlerError};
use proclaim_core::inbox::{Inbox, InboxTx, ParkedEvents};
use proclaim_core::{Backoff, CancellationToken, Event, Publisher};
use proclaim_postgres::{PgInbox, PgInboxOptions};
use proclaim_redis::redis::streams::StreamPendingReply;
use proclaim_redis::redis::{self, aio::MultiplexedConnection};
use proclaim_redis::{
    GroupStart, RedisConfig, RedisPublisher, RedisSourceConfig, RedisStreamSource,
};
use proclaim_testkit::events::{keyed, n_of, record};
use proclaim_testkit::pg::TestSchema;
use proclaim_testkit::{eventually, eventually_value};
use sqlx::AssertSqlSafe;

use crate::support::{TestKeys, redis_url};

/// Upper bound of every wait in these tests.
const WAIT: Duration = Duration::from_secs(20);

/// The real inbox and an effects table, in a schema of the test's own.
struct World {
    schema: TestSchema,
    inbox: PgInbox,
}

impl World {
    async fn new() -> Self {
        let schema = TestSchema::new().await;
        let inbox = PgInbox::with_options(
            schema.pool.clone(),
            PgInboxOptions::default().with_schema(&schema.name),
        )
        .unwrap();
        inbox.migrate().await.unwrap();
        // No unique key on the event: a second effect would show.
        sqlx::raw_sql(AssertSqlSafe(format!(
            r#"CREATE TABLE "{}".effects (
                   seq      bigserial PRIMARY KEY,
                   consumer text   NOT NULL,
                   event_id text   NOT NULL,
                   subject  text   NOT NULL,
                   n        bigint NOT NULL
               )"#,
            schema.name
        )))
        .execute(&schema.pool)
        .await
        .unwrap();
        World { schema, inbox }
    }

    fn handler(&self) -> Effects {
        Effects {
            inbox: self.inbox.clone(),
            table: format!(r#""{}".effects"#, self.schema.name),
        }
    }

    /// (event id, subject, n) of `consumer`'s effects, in commit order.
    async fn effects(&self, consumer: &str) -> Vec<(String, String, i64)> {
        sqlx::query_as(AssertSqlSafe(format!(
            r#"SELECT event_id, subject, n FROM "{}".effects WHERE consumer = $1 ORDER BY seq"#,
            self.schema.name
        )))
        .bind(consumer)
        .fetch_all(&self.schema.pool)
        .await
        .unwrap()
    }

    /// Effects per event id of `consumer`.
    async fn effect_counts(&self, consumer: &str) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for (id, _, _) in self.effects(consumer).await {
            *counts.entry(id).or_default() += 1;
        }
        counts
    }
}

/// Writes an effect row through the inbox transaction.
#[derive(Clone)]
struct Effects {
    inbox: PgInbox,
    table: String,
}

/// What an effect's handling did.
#[derive(Debug, PartialEq)]
enum Outcome {
    Applied,
    Duplicate,
}

impl Effects {
    /// Begins the inbox transaction and writes the effect in it; `None` for
    /// a duplicate.
    async fn begin(
        &self,
        cx: &Context<()>,
    ) -> Result<Option<proclaim_postgres::PgInboxTx>, HandlerError> {
        let Some(mut tx) = self.inbox.begin(cx.consumer(), &cx.event).await? else {
            return Ok(None);
        };
        let n = i64::try_from(n_of(&cx.event)).unwrap();
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (consumer, event_id, subject, n) VALUES ($1, $2, $3, $4)",
            self.table
        )))
        .bind(cx.consumer())
        .bind(cx.event.id().to_string())
        .bind(cx.event.subject())
        .bind(n)
        .execute(&mut *tx)
        .await
        .map_err(|e| HandlerError::transient("insert failed").with_source(e))?;
        Ok(Some(tx))
    }

    async fn apply(&self, cx: &Context<()>) -> Result<Outcome, HandlerError> {
        match self.begin(cx).await? {
            None => Ok(Outcome::Duplicate),
            Some(tx) => {
                tx.commit().await?;
                Ok(Outcome::Applied)
            }
        }
    }
}

fn publisher_config(keys: &TestKeys) -> RedisConfig {
    RedisConfig::default()
        .with_url(redis_url())
        .with_stream(keys.key("events"))
}

fn source_config(keys: &TestKeys, group: &str, consumer: &str) -> RedisSourceConfig {
    RedisSourceConfig::new(keys.key("events"), group, consumer)
        .with_url(redis_url())
        .with_block(Duration::from_millis(200))
}

/// Pending entries of `group` on `stream` (XPENDING summary).
async fn pending(conn: &mut MultiplexedConnection, stream: &str, group: &str) -> usize {
    redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async::<StreamPendingReply>(conn)
        .await
        .unwrap()
        .count()
}

fn quick_retries() -> Backoff {
    Backoff::new(Duration::from_millis(20), Duration::from_millis(100))
}

#[tokio::test]
async fn duplicates_have_one_effect_and_every_entry_is_acked() {
    proclaim_testkit::init_tracing();
    let keys = TestKeys::new();
    let world = World::new().await;
    let publisher = RedisPublisher::connect(publisher_config(&keys))
        .await
        .unwrap();
    let events: Vec<Event> = (0..5).map(|n| keyed(&format!("donor-{n}"), n)).collect();
    for event in &events {
        // The same event twice, as a relay may publish it after a failure.
        publisher.publish(&record(event.clone())).await.unwrap();
        publisher.publish(&record(event.clone())).await.unwrap();
    }

    let name = "dedup";
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let effects = world.handler();
    let seen = outcomes.clone();
    let source = RedisStreamSource::connect(source_config(&keys, name, "c1"))
        .await
        .unwrap();
    let handle = Consumer::new(name)
        .on_event("DonorSecured", move |cx: Context<()>| {
            let effects = effects.clone();
            let seen = seen.clone();
            async move {
                let outcome = effects.apply(&cx).await?;
                seen.lock().unwrap().push((cx.event.id(), outcome));
                Ok(())
            }
        })
        .park_into(world.inbox.clone())
        .spawn(source)
        .unwrap();

    let conn = keys.connection().await;
    let stream = keys.key("events");
    eventually(WAIT, "all ten entries handled and acked", || {
        let handled = handle.report().handled;
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move { handled == 10 && pending(&mut conn, &stream, name).await == 0 }
    })
    .await;
    let report = handle.shutdown().await;
    assert_eq!(report.handled, 10, "{report:?}");
    assert_eq!(report.ack_failures, 0, "{report:?}");
    assert_eq!(report.parked, 0, "{report:?}");

    let counts = world.effect_counts(name).await;
    assert_eq!(counts.len(), 5, "{counts:?}");
    for event in &events {
        assert_eq!(counts.get(&event.id().to_string()), Some(&1), "{counts:?}");
        assert!(world.inbox.contains(name, event.id()).await.unwrap());
    }
    let outcomes = outcomes.lock().unwrap();
    let duplicates = outcomes
        .iter()
        .filter(|(_, o)| *o == Outcome::Duplicate)
        .count();
    assert_eq!(duplicates, 5, "{outcomes:?}");
}

#[tokio::test]
async fn a_failure_before_commit_is_retried_and_takes_effect_once() {
    proclaim_testkit::init_tracing();
    let keys = TestKeys::new();
    let world = World::new().await;
    let publisher = RedisPublisher::connect(publisher_config(&keys))
        .await
        .unwrap();
    let event = keyed("donor-7", 7);
    publisher.publish(&record(event.clone())).await.unwrap();

    let name = "flaky";
    let calls = Arc::new(AtomicU32::new(0));
    let effects = world.handler();
    let counter = calls.clone();
    let source = RedisStreamSource::connect(source_config(&keys, name, "c1"))
        .await
        .unwrap();
    let handle = Consumer::new(name)
        .on_event("DonorSecured", move |cx: Context<()>| {
            let effects = effects.clone();
            let counter = counter.clone();
            async move {
                let tx = effects.begin(&cx).await?;
                if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                    // The effect is written, then the handler fails before
                    // the commit: the transaction is dropped, rolled back.
                    drop(tx);
                    return Err(HandlerError::transient("the CRM timed out"));
                }
                if let Some(tx) = tx {
                    tx.commit().await?;
                }
                Ok(())
            }
        })
        .retry(quick_retries(), 5)
        .park_into(world.inbox.clone())
        .spawn(source)
        .unwrap();

    let conn = keys.connection().await;
    let stream = keys.key("events");
    eventually(WAIT, "the entry handled and acked", || {
        let handled = handle.report().handled;
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move { handled == 1 && pending(&mut conn, &stream, name).await == 0 }
    })
    .await;
    let report = handle.shutdown().await;
    assert_eq!((report.handled, report.retried), (1, 1), "{report:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        world.effects(name).await,
        vec![(event.id().to_string(), "donor-7".to_owned(), 7)]
    );
}

/// A consumer whose handler commits, reports it, then never returns: the
/// entry is handled but not acked when the consumer is killed.
fn hanging_consumer(
    name: &str,
    effects: Effects,
    inbox: PgInbox,
    committed: tokio::sync::mpsc::UnboundedSender<String>,
) -> Consumer {
    Consumer::new(name)
        .on_event("DonorSecured", move |cx: Context<()>| {
            let effects = effects.clone();
            let committed = committed.clone();
            async move {
                effects.apply(&cx).await?;
                let _ = committed.send(cx.event.id().to_string());
                std::future::pending::<()>().await;
                Ok(())
            }
        })
        .park_into(inbox)
}

#[tokio::test]
async fn a_crash_between_commit_and_ack_is_redelivered_by_xautoclaim_and_skipped() {
    proclaim_testkit::init_tracing();
    let keys = TestKeys::new();
    let world = World::new().await;
    let publisher = RedisPublisher::connect(publisher_config(&keys))
        .await
        .unwrap();
    let event = keyed("donor-9", 9);
    publisher.publish(&record(event.clone())).await.unwrap();
    let name = "crashy";
    let stream = keys.key("events");
    let mut conn = keys.connection().await;

    // The first process: commits, then dies before the ack.
    let (tx, mut committed) = tokio::sync::mpsc::unbounded_channel();
    let source = RedisStreamSource::connect(source_config(&keys, name, "pod-a"))
        .await
        .unwrap();
    let first = hanging_consumer(name, world.handler(), world.inbox.clone(), tx);
    let crashed = tokio::spawn(first.run(source, CancellationToken::new()));
    let id = tokio::time::timeout(WAIT, committed.recv())
        .await
        .unwrap()
        .unwrap();
    crashed.abort();
    assert!(crashed.await.unwrap_err().is_cancelled());
    assert_eq!(id, event.id().to_string());
    assert!(world.inbox.contains(name, event.id()).await.unwrap());
    assert_eq!(pending(&mut conn, &stream, name).await, 1, "left unacked");

    // Its replacement, under another name, takes the idle entry over.
    let redelivered = Arc::new(Mutex::new(Vec::new()));
    let seen = redelivered.clone();
    let effects = world.handler();
    let config = source_config(&keys, name, "pod-b").with_claim_idle(Duration::from_millis(300));
    let source = RedisStreamSource::connect(config).await.unwrap();
    let handle = Consumer::new(name)
        .on_event("DonorSecured", move |cx: Context<()>| {
            let effects = effects.clone();
            let seen = seen.clone();
            async move {
                let outcome = effects.apply(&cx).await?;
                seen.lock()
                    .unwrap()
                    .push((cx.event.id(), cx.delivery_attempt, outcome));
                Ok(())
            }
        })
        .park_into(world.inbox.clone())
        .spawn(source)
        .unwrap();
    eventually(WAIT, "the entry redelivered and acked", || {
        let handled = handle.report().handled;
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move { handled == 1 && pending(&mut conn, &stream, name).await == 0 }
    })
    .await;
    let report = handle.shutdown().await;
    assert_eq!(report.handled, 1, "{report:?}");
    assert_eq!(
        *redelivered.lock().unwrap(),
        vec![(event.id(), Some(2), Outcome::Duplicate)],
        "delivered a second time, and skipped by the inbox"
    );
    assert_eq!(world.effect_counts(name).await.len(), 1);
    assert_eq!(world.effects(name).await.len(), 1);
}

#[tokio::test]
async fn a_restart_under_the_same_name_gets_its_pending_entries_at_once() {
    proclaim_testkit::init_tracing();
    let keys = TestKeys::new();
    let world = World::new().await;
    let publisher = RedisPublisher::connect(publisher_config(&keys))
        .await
        .unwrap();
    let event = keyed("donor-3", 3);
    publisher.publish(&record(event.clone())).await.unwrap();
    let name = "restarts";
    let stream = keys.key("events");
    let conn = keys.connection().await;

    let (tx, mut committed) = tokio::sync::mpsc::unbounded_channel();
    let source = RedisStreamSource::connect(source_config(&keys, name, "pod-a"))
        .await
        .unwrap();
    let first = hanging_consumer(name, world.handler(), world.inbox.clone(), tx);
    let crashed = tokio::spawn(first.run(source, CancellationToken::new()));
    tokio::time::timeout(WAIT, committed.recv())
        .await
        .unwrap()
        .unwrap();
    crashed.abort();
    let _ = crashed.await;

    // Same name, and a claim_idle far beyond the test: only the read of its
    // own pending entries can bring the entry back.
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = attempts.clone();
    let effects = world.handler();
    let config = source_config(&keys, name, "pod-a").with_claim_idle(Duration::from_secs(600));
    let source = RedisStreamSource::connect(config).await.unwrap();
    let handle = Consumer::new(name)
        .on_event("DonorSecured", move |cx: Context<()>| {
            let effects = effects.clone();
            let seen = seen.clone();
            async move {
                let outcome = effects.apply(&cx).await?;
                seen.lock().unwrap().push(outcome);
                Ok(())
            }
        })
        .park_into(world.inbox.clone())
        .spawn(source)
        .unwrap();
    eventually(WAIT, "the pending entry handled and acked", || {
        let handled = handle.report().handled;
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move { handled == 1 && pending(&mut conn, &stream, name).await == 0 }
    })
    .await;
    handle.shutdown().await;
    assert_eq!(*attempts.lock().unwrap(), vec![Outcome::Duplicate]);
    assert_eq!(world.effects(name).await.len(), 1);
}

#[tokio::test]
async fn each_subject_keeps_its_order_under_concurrency() {
    proclaim_testkit::init_tracing();
    let keys = TestKeys::new();
    let world = World::new().await;
    let publisher = RedisPublisher::connect(publisher_config(&keys))
        .await
        .unwrap();
    const SUBJECTS: u64 = 5;
    const PER_SUBJECT: u64 = 12;
    for n in 0..PER_SUBJECT {
        for s in 0..SUBJECTS {
            publisher
                .publish(&record(keyed(&format!("donor-{s}"), n)))
                .await
                .unwrap();
        }
    }

    let name = "ordered";
    let effects = world.handler();
    let running = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let (now, peak) = (running.clone(), most.clone());
    let source = RedisStreamSource::connect(source_config(&keys, name, "c1").with_count(16))
        .await
        .unwrap();
    let handle = Consumer::new(name)
        .on_event("DonorSecured", move |cx: Context<()>| {
            let effects = effects.clone();
            let (now, peak) = (now.clone(), peak.clone());
            async move {
                let at_once = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(at_once, Ordering::SeqCst);
                // Uneven handling times, so that subjects overtake each other.
                let n = n_of(&cx.event);
                tokio::time::sleep(Duration::from_millis((n * 7 + 3) % 11)).await;
                let result = effects.apply(&cx).await;
                now.fetch_sub(1, Ordering::SeqCst);
                result.map(|_| ())
            }
        })
        .concurrency(8)
        .park_into(world.inbox.clone())
        .spawn(source)
        .unwrap();

    let total = usize::try_from(SUBJECTS * PER_SUBJECT).unwrap();
    eventually(WAIT, "every event handled", || {
        let world = &world;
        async move { world.effects(name).await.len() == total }
    })
    .await;
    let report = handle.shutdown().await;
    assert_eq!(report.parked, 0, "{report:?}");
    let mut by_subject: HashMap<String, Vec<i64>> = HashMap::new();
    for (_, subject, n) in world.effects(name).await {
        by_subject.entry(subject).or_default().push(n);
    }
    assert_eq!(by_subject.len(), usize::try_from(SUBJECTS).unwrap());
    let expected: Vec<i64> = (0..i64::try_from(PER_SUBJECT).unwrap()).collect();
    for (subject, ns) in &by_subject {
        assert_eq!(ns, &expected, "order of {subject}");
    }
    assert!(
        most.load(Ordering::SeqCst) > 1,
        "subjects were handled concurrently"
    );
    assert!(most.load(Ordering::SeqCst) <= 8, "at most 8 at once");
}

#[tokio::test]
async fn two_groups_each_get_every_event() {
    proclaim_testkit::init_tracing();
    let keys = TestKeys::new();
    let world = World::new().await;
    let publisher = RedisPublisher::connect(publisher_config(&keys))
        .await
        .unwrap();
    // Published before either group exists: the groups start at the
    // beginning of the stream by default.
    let events: Vec<Event> = (0..6).map(|n| keyed(&format!("donor-{n}"), n)).collect();
    for event in &events {
        publisher.publish(&record(event.clone())).await.unwrap();
    }

    let mut handles = Vec::new();
    for name in ["receipts", "thank-you"] {
        let effects = world.handler();
        let source = RedisStreamSource::connect(
            source_config(&keys, name, "c1").with_start(GroupStart::Beginning),
        )
        .await
        .unwrap();
        let handle = Consumer::new(name)
            .on_event("DonorSecured", move |cx: Context<()>| {
                let effects = effects.clone();
                async move { effects.apply(&cx).await.map(|_| ()) }
            })
            .park_into(world.inbox.clone())
            .spawn(source)
            .unwrap();
        handles.push(handle);
    }
    let conn = keys.connection().await;
    let stream = keys.key("events");
    for name in ["receipts", "thank-you"] {
        eventually(WAIT, &format!("{name} handled every event"), || {
            let world = &world;
            let mut conn = conn.clone();
            let stream = stream.clone();
            let expected = events.len();
            async move {
                world.effects(name).await.len() == expected
                    && pending(&mut conn, &stream, name).await == 0
            }
        })
        .await;
    }
    for handle in handles {
        let report = handle.shutdown().await;
        assert_eq!(report.handled, 6, "{report:?}");
    }
    for name in ["receipts", "thank-you"] {
        let counts = world.effect_counts(name).await;
        for event in &events {
            assert_eq!(counts.get(&event.id().to_string()), Some(&1), "{name}");
        }
    }
}

#[tokio::test]
async fn an_undecodable_entry_is_parked_with_its_fields_and_acked() {
    proclaim_testkit::init_tracing();
    let keys = TestKeys::new();
    let world = World::new().await;
    let stream = keys.key("events");
    let mut conn = keys.connection().await;
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("ce-id")
        .arg("not-a-uuid")
        .arg("data")
        .arg("{oops")
        .query_async(&mut conn)
        .await
        .unwrap();
    // A good event after it still goes through.
    let publisher = RedisPublisher::connect(publisher_config(&keys))
        .await
        .unwrap();
    let good = keyed("donor-1", 1);
    publisher.publish(&record(good.clone())).await.unwrap();

    let name = "strict";
    let effects = world.handler();
    let source = RedisStreamSource::connect(source_config(&keys, name, "c1"))
        .await
        .unwrap();
    let handle = Consumer::new(name)
        .on_event("DonorSecured", move |cx: Context<()>| {
            let effects = effects.clone();
            async move { effects.apply(&cx).await.map(|_| ()) }
        })
        .park_into(world.inbox.clone())
        .spawn(source)
        .unwrap();

    let parked = eventually_value(WAIT, "the entry parked", || {
        let inbox = world.inbox.clone();
        async move {
            let parked = inbox.parked(Some(name), 10).await.unwrap();
            (!parked.is_empty()).then_some(parked)
        }
    })
    .await;
    eventually(WAIT, "both entries acked", || {
        let handled = handle.report().handled;
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move { handled == 1 && pending(&mut conn, &stream, name).await == 0 }
    })
    .await;
    let report = handle.shutdown().await;
    assert_eq!((report.parked, report.handled), (1, 1), "{report:?}");

    assert_eq!(parked.len(), 1);
    let entry = &parked[0];
    assert_eq!(entry.event, None);
    assert_eq!(entry.attempts, 0);
    assert!(entry.reason.contains("undecodable"), "{}", entry.reason);
    let raw: serde_json::Value = serde_json::from_slice(&entry.raw).unwrap();
    assert_eq!(raw["stream"], stream.as_str());
    assert_eq!(raw["fields"]["ce-id"], "not-a-uuid");
    assert_eq!(raw["fields"]["data"], "{oops");
    assert_eq!(world.effects(name).await.len(), 1);
}

#[tokio::test]
async fn a_server_restart_is_a_receive_error_and_the_source_recovers() {
    proclaim_testkit::init_tracing();
    let mut server = crate::support::PrivateRedis::start(&[]).await;
    let world = World::new().await;
    let stream = "t:restart:events";
    let name = "survivor";
    let publisher = RedisPublisher::connect(
        RedisConfig::default()
            .with_url(server.url())
            .with_stream(stream),
    )
    .await
    .unwrap();
    let first = keyed("donor-1", 1);
    publisher.publish(&record(first.clone())).await.unwrap();

    let effects = world.handler();
    let config = RedisSourceConfig::new(stream, name, "c1")
        .with_url(server.url())
        .with_block(Duration::from_millis(200))
        .with_connect_timeout(Duration::from_millis(500))
        .with_response_timeout(Duration::from_secs(2));
    let source = RedisStreamSource::connect(config).await.unwrap();
    let handle = Consumer::new(name)
        .on_event("DonorSecured", move |cx: Context<()>| {
            let effects = effects.clone();
            async move { effects.apply(&cx).await.map(|_| ()) }
        })
        .outage_backoff(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(500),
        ))
        .park_into(world.inbox.clone())
        .spawn(source)
        .unwrap();
    eventually(WAIT, "the first event handled", || {
        let world = &world;
        async move { world.effects(name).await.len() == 1 }
    })
    .await;

    // A crash without persistence: the stream and the group are gone.
    server.restart().await;
    eventually(WAIT, "the lost connection reported", || {
        let errors = handle.report().receive_errors;
        async move { errors > 0 }
    })
    .await;
    let second = keyed("donor-2", 2);
    eventually(WAIT, "the second event published", || {
        let publisher = publisher.clone();
        let second = second.clone();
        async move { publisher.publish(&record(second)).await.is_ok() }
    })
    .await;
    eventually(WAIT, "the second event handled after the restart", || {
        let world = &world;
        async move { world.effects(name).await.len() == 2 }
    })
    .await;
    let report = handle.shutdown().await;
    assert_eq!(report.handled, 2, "{report:?}");
    let ids: Vec<String> = world
        .effects(name)
        .await
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(ids, vec![first.id().to_string(), second.id().to_string()]);
}
