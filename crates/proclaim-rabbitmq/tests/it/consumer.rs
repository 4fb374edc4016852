//! The consumer runtime over [`RabbitQueueSource`], with the real inbox
//! (`PgInbox` in a schema of the test's own) and an exchange and queues of
//! the test's own: duplicates, failures mid-transaction, a crash between
//! commit and ack, per-subject order, two queues on one exchange,
//! undecodable messages, a lost connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use proclaim_core::consumer::{Consumer, Context, HandlerError};
use proclaim_core::inbox::{Inbox, InboxTx, ParkedEvents};
use proclaim_core::{Backoff, CancellationToken, Event, Publisher};
use proclaim_postgres::{PgInbox, PgInboxOptions, PgInboxTx};
use proclaim_rabbitmq::{RabbitPublisher, RabbitQueueSource, RabbitSourceConfig};
use proclaim_testkit::events::{keyed, n_of, record};
use proclaim_testkit::pg::TestSchema;
use proclaim_testkit::proxy::FaultProxy;
use proclaim_testkit::{eventually, eventually_value};
use sqlx::AssertSqlSafe;

use crate::support::{TestQueue, amqp_url, broker_addr, url_via};

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
    async fn begin(&self, cx: &Context<()>) -> Result<Option<PgInboxTx>, HandlerError> {
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

fn source_config(queue: &str) -> RabbitSourceConfig {
    RabbitSourceConfig::new(queue).with_url(amqp_url())
}

/// (ready messages, consumers) of `queue`.
async fn queue_state(connection: &Connection, queue: &str) -> (u32, u32) {
    let channel = connection.create_channel().await.unwrap();
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = channel.close(200, "OK".into()).await;
    (q.message_count(), q.consumer_count())
}

/// Waits until `queue` has no consumer (its consumers' channels are
/// closed, which returns what they had not acked), then checks that it
/// holds no message: everything delivered was acked.
async fn assert_drained(connection: &Connection, queue: &str) {
    let (messages, _) = eventually_value(WAIT, "the consumer's channel closed", || async {
        let (messages, consumers) = queue_state(connection, queue).await;
        (consumers == 0).then_some((messages, consumers))
    })
    .await;
    assert_eq!(messages, 0, "messages left (unacked ones return on close)");
}

fn quick_retries() -> Backoff {
    Backoff::new(Duration::from_millis(20), Duration::from_millis(100))
}

#[tokio::test]
async fn duplicates_have_one_effect_and_every_message_is_acked() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let world = World::new().await;
    let publisher = RabbitPublisher::connect(tq.config()).await.unwrap();
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
    let source = RabbitQueueSource::connect(source_config(&tq.queue))
        .await
        .unwrap();
    assert!(source.is_connected());
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

    eventually(WAIT, "all ten messages handled", || {
        let handled = handle.report().handled;
        async move { handled == 10 }
    })
    .await;
    let report = handle.shutdown().await;
    assert_eq!(report.handled, 10, "{report:?}");
    assert_eq!(report.ack_failures, 0, "{report:?}");
    assert_eq!(report.parked, 0, "{report:?}");
    assert_drained(&tq.connection, &tq.queue).await;

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
    let tq = TestQueue::new().await;
    let world = World::new().await;
    let publisher = RabbitPublisher::connect(tq.config()).await.unwrap();
    let event = keyed("donor-7", 7);
    publisher.publish(&record(event.clone())).await.unwrap();

    let name = "flaky";
    let calls = Arc::new(AtomicU32::new(0));
    let effects = world.handler();
    let counter = calls.clone();
    let source = RabbitQueueSource::connect(source_config(&tq.queue))
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

    eventually(WAIT, "the message handled", || {
        let handled = handle.report().handled;
        async move { handled == 1 }
    })
    .await;
    let report = handle.shutdown().await;
    assert_eq!((report.handled, report.retried), (1, 1), "{report:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_drained(&tq.connection, &tq.queue).await;
    assert_eq!(
        world.effects(name).await,
        vec![(event.id().to_string(), "donor-7".to_owned(), 7)]
    );
}

#[tokio::test]
async fn a_crash_between_commit_and_ack_is_redelivered_on_channel_close_and_skipped() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let world = World::new().await;
    let publisher = RabbitPublisher::connect(tq.config()).await.unwrap();
    let event = keyed("donor-9", 9);
    publisher.publish(&record(event.clone())).await.unwrap();
    let name = "crashy";

    // The first process: commits, then dies before the ack.
    let (committed_tx, mut committed) = tokio::sync::mpsc::unbounded_channel();
    let effects = world.handler();
    let source = RabbitQueueSource::connect(source_config(&tq.queue))
        .await
        .unwrap();
    let first = Consumer::new(name)
        .on_event("DonorSecured", move |cx: Context<()>| {
            let effects = effects.clone();
            let committed = committed_tx.clone();
            async move {
                effects.apply(&cx).await?;
                let _ = committed.send(cx.event.id());
                std::future::pending::<()>().await;
                Ok(())
            }
        })
        .park_into(world.inbox.clone());
    let crashed = tokio::spawn(first.run(source, CancellationToken::new()));
    let id = tokio::time::timeout(WAIT, committed.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id, event.id());
    assert_eq!(
        queue_state(&tq.connection, &tq.queue).await,
        (0, 1),
        "delivered, unacked"
    );
    crashed.abort();
    assert!(crashed.await.unwrap_err().is_cancelled());
    assert!(world.inbox.contains(name, event.id()).await.unwrap());

    // The channel closed: the message is back in the queue.
    let redelivered = Arc::new(Mutex::new(Vec::new()));
    let seen = redelivered.clone();
    let effects = world.handler();
    let source = RabbitQueueSource::connect(source_config(&tq.queue))
        .await
        .unwrap();
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
    eventually(WAIT, "the message redelivered and handled", || {
        let handled = handle.report().handled;
        async move { handled == 1 }
    })
    .await;
    let report = handle.shutdown().await;
    assert_eq!(report.handled, 1, "{report:?}");
    assert_drained(&tq.connection, &tq.queue).await;
    assert_eq!(
        *redelivered.lock().unwrap(),
        vec![(event.id(), Some(2), Outcome::Duplicate)],
        "delivered a second time (flagged redelivered), and skipped by the inbox"
    );
    assert_eq!(world.effects(name).await.len(), 1);
}

#[tokio::test]
async fn each_subject_keeps_its_order_under_concurrency() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let world = World::new().await;
    let publisher = RabbitPublisher::connect(tq.config()).await.unwrap();
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
    let source = RabbitQueueSource::connect(source_config(&tq.queue).with_prefetch(64))
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
        .max_pending(64)
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
    let peak = most.load(Ordering::SeqCst);
    assert!(peak > 1, "subjects were handled concurrently");
    assert!(peak <= 8, "at most 8 at once, not {peak}");
    assert_drained(&tq.connection, &tq.queue).await;
}

/// A queue a test's source declares, deleted on drop (even if the test
/// panics), like [`TestQueue`]'s own.
struct DeclaredQueue(String);

impl Drop for DeclaredQueue {
    fn drop(&mut self) {
        let queue = self.0.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let delete = async {
                    let connection =
                        Connection::connect(&amqp_url(), ConnectionProperties::default())
                            .await
                            .map_err(|e| e.to_string())?;
                    let channel = connection
                        .create_channel()
                        .await
                        .map_err(|e| e.to_string())?;
                    channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await
                        .map_err(|e| e.to_string())?;
                    let _ = connection.close(200, "OK".into()).await;
                    Ok::<(), String>(())
                };
                tokio::time::timeout(Duration::from_secs(10), delete)
                    .await
                    .map_err(|_| "timed out".to_owned())?
            })
        })
        .join();
    }
}

#[tokio::test]
async fn two_queues_on_one_exchange_each_get_every_event() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let world = World::new().await;
    // The second "group": a queue the source declares and binds itself.
    let second = DeclaredQueue(format!("{}_thank_you", tq.exchange));
    let groups = [
        ("receipts", tq.queue.clone()),
        ("thank-you", second.0.clone()),
    ];

    let mut handles = Vec::new();
    for (name, queue) in &groups {
        let config = source_config(queue)
            .with_declare_queue(true)
            .with_binding(&tq.exchange, ["DonorSecured", "#.never"]);
        let effects = world.handler();
        let source = RabbitQueueSource::connect(config).await.unwrap();
        let handle = Consumer::new(*name)
            .on_event("DonorSecured", move |cx: Context<()>| {
                let effects = effects.clone();
                async move { effects.apply(&cx).await.map(|_| ()) }
            })
            .park_into(world.inbox.clone())
            .spawn(source)
            .unwrap();
        handles.push(handle);
    }
    let publisher = RabbitPublisher::connect(tq.config()).await.unwrap();
    let events: Vec<Event> = (0..6).map(|n| keyed(&format!("donor-{n}"), n)).collect();
    for event in &events {
        publisher.publish(&record(event.clone())).await.unwrap();
    }

    for (name, _) in &groups {
        eventually(WAIT, &format!("{name} handled every event"), || {
            let world = &world;
            let expected = events.len();
            async move { world.effects(name).await.len() == expected }
        })
        .await;
    }
    for handle in handles {
        let report = handle.shutdown().await;
        assert_eq!(report.handled, 6, "{report:?}");
    }
    for (name, queue) in &groups {
        assert_drained(&tq.connection, queue).await;
        let counts = world.effect_counts(name).await;
        for event in &events {
            assert_eq!(counts.get(&event.id().to_string()), Some(&1), "{name}");
        }
    }
}

#[tokio::test]
async fn an_undecodable_message_is_parked_with_its_body_and_acked() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let world = World::new().await;
    let mut headers = FieldTable::default();
    headers.insert(
        "cloudEvents:id".into(),
        AMQPValue::LongString(LongString::from("not-a-uuid")),
    );
    tq.channel
        .basic_publish(
            tq.exchange.as_str().into(),
            "DonorSecured".into(),
            BasicPublishOptions::default(),
            b"{oops",
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // A good event after it still goes through.
    let publisher = RabbitPublisher::connect(tq.config()).await.unwrap();
    publisher
        .publish(&record(keyed("donor-1", 1)))
        .await
        .unwrap();

    let name = "strict";
    let effects = world.handler();
    let source = RabbitQueueSource::connect(source_config(&tq.queue))
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

    let parked = eventually_value(WAIT, "the message parked", || {
        let inbox = world.inbox.clone();
        async move {
            let parked = inbox.parked(Some(name), 10).await.unwrap();
            (!parked.is_empty()).then_some(parked)
        }
    })
    .await;
    eventually(WAIT, "the good event handled", || {
        let handled = handle.report().handled;
        async move { handled == 1 }
    })
    .await;
    let report = handle.shutdown().await;
    assert_eq!((report.parked, report.handled), (1, 1), "{report:?}");
    assert_eq!(report.ack_failures, 0, "{report:?}");
    assert_drained(&tq.connection, &tq.queue).await;

    assert_eq!(parked.len(), 1);
    let entry = &parked[0];
    assert_eq!(entry.event, None);
    assert_eq!(entry.raw, b"{oops");
    assert!(entry.reason.contains("undecodable"), "{}", entry.reason);
    assert!(entry.reason.contains("DonorSecured"), "{}", entry.reason);
    assert_eq!(world.effects(name).await.len(), 1);
}

#[tokio::test]
async fn a_lost_connection_is_a_receive_error_and_the_source_reconnects() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let world = World::new().await;
    let publisher = RabbitPublisher::connect(tq.config()).await.unwrap();
    let proxy = FaultProxy::start(broker_addr()).await.unwrap();
    let name = "resilient";
    let effects = world.handler();
    // The first handling commits, then waits for the test to cut the
    // connection, so that its ack meets a dead channel.
    let (committed_tx, mut committed) = tokio::sync::mpsc::unbounded_channel();
    let gate = Arc::new(tokio::sync::Notify::new());
    let first_call = Arc::new(AtomicU32::new(0));
    let (wait, calls) = (gate.clone(), first_call.clone());
    let config = RabbitSourceConfig::new(&tq.queue)
        .with_url(url_via(proxy.addr()))
        .with_connect_timeout(Duration::from_secs(2));
    let source = RabbitQueueSource::connect(config).await.unwrap();
    let handle = Consumer::new(name)
        .on_event("DonorSecured", move |cx: Context<()>| {
            let effects = effects.clone();
            let (wait, calls, committed) = (wait.clone(), calls.clone(), committed_tx.clone());
            async move {
                effects.apply(&cx).await?;
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    let _ = committed.send(());
                    wait.notified().await;
                }
                Ok(())
            }
        })
        .outage_backoff(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(500),
        ))
        .park_into(world.inbox.clone())
        .spawn(source)
        .unwrap();
    let first = keyed("donor-1", 1);
    publisher.publish(&record(first.clone())).await.unwrap();
    tokio::time::timeout(WAIT, committed.recv())
        .await
        .unwrap()
        .unwrap();

    proxy.reset_all();
    eventually(WAIT, "the lost connection reported", || {
        let errors = handle.report().receive_errors;
        async move { errors > 0 }
    })
    .await;
    gate.notify_one();
    // Its ack fails at once (the channel is gone); the broker requeued the
    // message, the new connection gets it again, and the inbox skips it.
    eventually(WAIT, "the first event redelivered and skipped", || {
        let report = handle.report();
        async move { report.ack_failures == 1 && report.handled == 2 }
    })
    .await;
    let second = keyed("donor-2", 2);
    publisher.publish(&record(second.clone())).await.unwrap();
    eventually(WAIT, "the second event handled after reconnecting", || {
        let handled = handle.report().handled;
        async move { handled == 3 }
    })
    .await;
    let report = handle.shutdown().await;
    assert_eq!((report.handled, report.ack_failures), (3, 1), "{report:?}");
    assert_drained(&tq.connection, &tq.queue).await;
    let counts = world.effect_counts(name).await;
    assert_eq!(counts.len(), 2, "{counts:?}");
    for event in [&first, &second] {
        assert_eq!(counts.get(&event.id().to_string()), Some(&1), "{counts:?}");
    }
}
