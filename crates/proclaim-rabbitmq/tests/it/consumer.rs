//! The consumer runtime over [`RabbitQueueSource`], with the real inbox
//! (`PgInbox` in a schema of the test's own) and an exchange and queues of
//! the test's own: duplicates, failures mid-transaction, a crash between
//! commit and ack, per-subject order, two queues on one exchange,
//! undecodable messages, a lost connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use proclaim_core::consumer::{Consumer, Context};
use proclaim_core::inbox::Inbox;
use proclaim_core::{Backoff, CancellationToken, Event, Publisher};
use proclaim_rabbitmq::{RabbitPublisher, RabbitQueueSource, RabbitSourceConfig};
use proclaim_testkit::consumer::{
    EffectsDb, InFlight, Outcome, Recorder, WAIT, distinct_events, quick_retries, round_robin,
    wait_handled, wait_receive_error,
};
use proclaim_testkit::events::{keyed, n_of, record};
use proclaim_testkit::proxy::FaultProxy;
use proclaim_testkit::{eventually, eventually_value};

use crate::support::{TestQueue, amqp_url, broker_addr, url_via};

/// Publishes `events` to the test's exchange, in this order.
async fn publish(tq: &TestQueue, events: &[Event]) {
    let publisher = RabbitPublisher::connect(tq.config()).await.unwrap();
    for event in events {
        publisher.publish(&record(event.clone())).await.unwrap();
    }
}

async fn connect(config: RabbitSourceConfig) -> RabbitQueueSource {
    RabbitQueueSource::connect(config).await.unwrap()
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

#[tokio::test]
async fn duplicates_have_one_effect_and_every_message_is_acked() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let db = EffectsDb::new().await;
    let events = distinct_events(5);
    // Each event twice, as a relay may publish it after a failure.
    let twice: Vec<Event> = events.iter().flat_map(|e| [e.clone(), e.clone()]).collect();
    publish(&tq, &twice).await;

    let name = "dedup";
    let effects = db.handler();
    let source = connect(source_config(&tq.queue)).await;
    assert!(source.is_connected());
    let handle = effects
        .consumer(name, "DonorSecured")
        .spawn(source)
        .unwrap();

    wait_handled(&handle, 10).await;
    let report = handle.shutdown().await;
    assert_eq!(report.handled, 10, "{report:?}");
    assert_eq!(report.ack_failures, 0, "{report:?}");
    assert_eq!(report.parked, 0, "{report:?}");
    assert_drained(&tq.connection, &tq.queue).await;

    let counts = db.effect_counts(name).await;
    assert_eq!(counts.len(), 5, "{counts:?}");
    db.assert_each_once(name, &events).await;
    for event in &events {
        assert!(db.inbox.contains(name, event.id()).await.unwrap());
    }
    assert_eq!(effects.duplicates(), 5);
}

#[tokio::test]
async fn a_failure_before_commit_is_retried_and_takes_effect_once() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let db = EffectsDb::new().await;
    let event = keyed("donor-7", 7);
    publish(&tq, std::slice::from_ref(&event)).await;

    let name = "flaky";
    let calls = Arc::new(AtomicU32::new(0));
    let effects = db.handler();
    let counter = calls.clone();
    let source = connect(source_config(&tq.queue)).await;
    let handle = Consumer::new(name)
        .on_event("DonorSecured", move |cx: Context<()>| {
            let effects = effects.clone();
            let counter = counter.clone();
            async move {
                let first = counter.fetch_add(1, Ordering::SeqCst) == 0;
                effects.apply_or_fail(&cx, first).await.map(|_| ())
            }
        })
        .retry(quick_retries(), 5)
        .park_into(db.inbox.clone())
        .spawn(source)
        .unwrap();

    wait_handled(&handle, 1).await;
    let report = handle.shutdown().await;
    assert_eq!((report.handled, report.retried), (1, 1), "{report:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_drained(&tq.connection, &tq.queue).await;
    assert_eq!(
        db.effects(name).await,
        vec![(event.id(), "donor-7".to_owned(), 7)]
    );
}

#[tokio::test]
async fn a_crash_between_commit_and_ack_is_redelivered_on_channel_close_and_skipped() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let db = EffectsDb::new().await;
    let event = keyed("donor-9", 9);
    publish(&tq, std::slice::from_ref(&event)).await;
    let name = "crashy";

    // The first process: commits, then dies before the ack.
    let (committed_tx, mut committed) = tokio::sync::mpsc::unbounded_channel();
    let source = connect(source_config(&tq.queue)).await;
    let first = db
        .handler()
        .on_commit_then_hang(Consumer::new(name), "DonorSecured", committed_tx)
        .park_into(db.inbox.clone());
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
    assert!(db.inbox.contains(name, event.id()).await.unwrap());

    // The channel closed: the message is back in the queue.
    let redelivered = Recorder::default();
    let seen = redelivered.clone();
    let effects = db.handler();
    let source = connect(source_config(&tq.queue)).await;
    let handle = Consumer::new(name)
        .on_event("DonorSecured", move |cx: Context<()>| {
            let effects = effects.clone();
            let seen = seen.clone();
            async move {
                let outcome = effects.apply(&cx).await?;
                seen.push((cx.event.id(), cx.delivery_attempt, outcome));
                Ok(())
            }
        })
        .park_into(db.inbox.clone())
        .spawn(source)
        .unwrap();
    wait_handled(&handle, 1).await;
    let report = handle.shutdown().await;
    assert_eq!(report.handled, 1, "{report:?}");
    assert_drained(&tq.connection, &tq.queue).await;
    assert_eq!(
        redelivered.all(),
        vec![(event.id(), Some(2), Outcome::Duplicate)],
        "delivered a second time (flagged redelivered), and skipped by the inbox"
    );
    assert_eq!(db.effects(name).await.len(), 1);
}

#[tokio::test]
async fn each_subject_keeps_its_order_under_concurrency() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let db = EffectsDb::new().await;
    const SUBJECTS: u64 = 5;
    const PER_SUBJECT: u64 = 12;
    publish(&tq, &round_robin(SUBJECTS, PER_SUBJECT)).await;

    let name = "ordered";
    let effects = db.handler();
    let in_flight = InFlight::default();
    let tracker = in_flight.clone();
    let source = connect(source_config(&tq.queue).with_prefetch(64)).await;
    let handle = Consumer::new(name)
        .on_event("DonorSecured", move |cx: Context<()>| {
            let (effects, tracker) = (effects.clone(), tracker.clone());
            async move {
                tracker
                    .track(async {
                        // Uneven handling times, so that subjects overtake
                        // each other.
                        let n = n_of(&cx.event);
                        tokio::time::sleep(Duration::from_millis((n * 7 + 3) % 11)).await;
                        effects.apply(&cx).await.map(|_| ())
                    })
                    .await
            }
        })
        .concurrency(8)
        .max_pending(64)
        .park_into(db.inbox.clone())
        .spawn(source)
        .unwrap();

    db.wait_effects(name, usize::try_from(SUBJECTS * PER_SUBJECT).unwrap())
        .await;
    let report = handle.shutdown().await;
    assert_eq!(report.parked, 0, "{report:?}");
    db.assert_order_per_subject(name, SUBJECTS, PER_SUBJECT)
        .await;
    let peak = in_flight.peak();
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
    let db = EffectsDb::new().await;
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
        let handle = db
            .handler()
            .consumer(name, "DonorSecured")
            .spawn(connect(config).await)
            .unwrap();
        handles.push(handle);
    }
    let events = distinct_events(6);
    publish(&tq, &events).await;

    for (name, _) in &groups {
        db.wait_effects(name, events.len()).await;
    }
    for handle in handles {
        let report = handle.shutdown().await;
        assert_eq!(report.handled, 6, "{report:?}");
    }
    for (name, queue) in &groups {
        assert_drained(&tq.connection, queue).await;
        db.assert_each_once(name, &events).await;
    }
}

#[tokio::test]
async fn an_undecodable_message_is_parked_with_its_body_and_acked() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let db = EffectsDb::new().await;
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
    publish(&tq, &[keyed("donor-1", 1)]).await;

    let name = "strict";
    let source = connect(source_config(&tq.queue)).await;
    let handle = db
        .handler()
        .consumer(name, "DonorSecured")
        .spawn(source)
        .unwrap();

    let parked = db.wait_parked(name, 1).await;
    wait_handled(&handle, 1).await;
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
    assert_eq!(db.effects(name).await.len(), 1);
}
#[tokio::test]
async fn a_lost_connection_is_a_receive_error_and_the_source_reconnects() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let db = EffectsDb::new().await;
    let publisher = RabbitPublisher::connect(tq.config()).await.unwrap();
    let proxy = FaultProxy::start(broker_addr()).await.unwrap();
    let name = "resilient";
    let effects = db.handler();
    // The first handling commits, then waits for the test to cut the
    // connection, so that its ack meets a dead channel.
    let (committed_tx, mut committed) = tokio::sync::mpsc::unbounded_channel();
    let gate = Arc::new(tokio::sync::Notify::new());
    let first_call = Arc::new(AtomicU32::new(0));
    let (wait, calls) = (gate.clone(), first_call.clone());
    let config = RabbitSourceConfig::new(&tq.queue)
        .with_url(url_via(proxy.addr()))
        .with_connect_timeout(Duration::from_secs(2));
    let source = connect(config).await;
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
        .park_into(db.inbox.clone())
        .spawn(source)
        .unwrap();
    let first = keyed("donor-1", 1);
    publisher.publish(&record(first.clone())).await.unwrap();
    tokio::time::timeout(WAIT, committed.recv())
        .await
        .unwrap()
        .unwrap();

    proxy.reset_all();
    wait_receive_error(&handle).await;
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
    // The second event is handled after reconnecting.
    wait_handled(&handle, 3).await;
    let report = handle.shutdown().await;
    assert_eq!((report.handled, report.ack_failures), (3, 1), "{report:?}");
    assert_drained(&tq.connection, &tq.queue).await;
    let counts = db.effect_counts(name).await;
    assert_eq!(counts.len(), 2, "{counts:?}");
    db.assert_each_once(name, &[first, second]).await;
}

#[tokio::test]
async fn wrong_credentials_are_a_clear_error_without_the_password() {
    proclaim_testkit::init_tracing();
    let config = RabbitSourceConfig::new("never-declared").with_url(format!(
        "amqp://guest:not-the-password@{}/%2f",
        broker_addr()
    ));
    let err = RabbitQueueSource::connect(config).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("the broker refused the login (wrong user or password?)"),
        "{text}"
    );
    assert!(!text.contains("not-the-password"), "{text}");
    assert!(!format!("{err:?}").contains("not-the-password"), "{err:?}");
}
