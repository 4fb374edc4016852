//! The consumer runtime over [`RedisStreamSource`], with the real inbox
//! (`PgInbox` in a schema of the test's own) and streams of the test's own:
//! duplicates, failures mid-transaction, a crash between commit and ack,
//! per-subject order, several groups, undecodable entries.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use proclaim_core::consumer::{Consumer, ConsumerHandle, Context};
use proclaim_core::inbox::Inbox;
use proclaim_core::{Backoff, CancellationToken, Event, Publisher};
use proclaim_redis::redis::streams::StreamPendingReply;
use proclaim_redis::redis::{self, aio::MultiplexedConnection};
use proclaim_redis::{
    GroupStart, RedisConfig, RedisPublisher, RedisSourceConfig, RedisStreamSource,
};
use proclaim_testkit::consumer::{
    EffectsDb, InFlight, Outcome, Recorder, Uuid, WAIT, distinct_events, quick_retries,
    round_robin, wait_receive_error,
};
use proclaim_testkit::events::{keyed, n_of, record};
use proclaim_testkit::eventually;

use crate::support::{TestKeys, redis_url};

fn publisher_config(keys: &TestKeys) -> RedisConfig {
    RedisConfig::default()
        .with_url(redis_url())
        .with_stream(keys.key("events"))
}

/// Publishes `events` to the test's stream, in this order.
async fn publish(keys: &TestKeys, events: &[Event]) {
    let publisher = RedisPublisher::connect(publisher_config(keys))
        .await
        .unwrap();
    for event in events {
        publisher.publish(&record(event.clone())).await.unwrap();
    }
}

fn source_config(keys: &TestKeys, group: &str, consumer: &str) -> RedisSourceConfig {
    RedisSourceConfig::new(keys.key("events"), group, consumer)
        .with_url(redis_url())
        .with_block(Duration::from_millis(200))
}

async fn connect(config: RedisSourceConfig) -> RedisStreamSource {
    RedisStreamSource::connect(config).await.unwrap()
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

/// Waits until `handle` has handled `count` entries and `group` has none
/// pending on the test's stream.
async fn wait_handled_and_acked(handle: &ConsumerHandle, count: u64, keys: &TestKeys, group: &str) {
    let conn = keys.connection().await;
    let stream = keys.key("events");
    let what = format!("{count} entries handled and acked");
    eventually(WAIT, &what, || {
        let handled = handle.report().handled;
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move { handled == count && pending(&mut conn, &stream, group).await == 0 }
    })
    .await;
}

/// Starts the first process of a crash test: it commits the one entry's
/// effect as `pod-a`, then is killed before the ack.
async fn crash_after_commit(keys: &TestKeys, db: &EffectsDb, name: &str) -> Uuid {
    let (tx, mut committed) = tokio::sync::mpsc::unbounded_channel();
    let source = connect(source_config(keys, name, "pod-a")).await;
    let first = db
        .handler()
        .on_commit_then_hang(Consumer::new(name), "DonorSecured", tx)
        .park_into(db.inbox.clone());
    let crashed = tokio::spawn(first.run(source, CancellationToken::new()));
    let id = tokio::time::timeout(WAIT, committed.recv())
        .await
        .unwrap()
        .unwrap();
    crashed.abort();
    assert!(crashed.await.unwrap_err().is_cancelled());
    id
}

#[tokio::test]
async fn duplicates_have_one_effect_and_every_entry_is_acked() {
    proclaim_testkit::init_tracing();
    let keys = TestKeys::new();
    let db = EffectsDb::new().await;
    let events = distinct_events(5);
    // Each event twice, as a relay may publish it after a failure.
    let twice: Vec<Event> = events.iter().flat_map(|e| [e.clone(), e.clone()]).collect();
    publish(&keys, &twice).await;

    let name = "dedup";
    let effects = db.handler();
    let source = connect(source_config(&keys, name, "c1")).await;
    let handle = effects
        .consumer(name, "DonorSecured")
        .spawn(source)
        .unwrap();

    wait_handled_and_acked(&handle, 10, &keys, name).await;
    let report = handle.shutdown().await;
    assert_eq!(report.handled, 10, "{report:?}");
    assert_eq!(report.ack_failures, 0, "{report:?}");
    assert_eq!(report.parked, 0, "{report:?}");

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
    let keys = TestKeys::new();
    let db = EffectsDb::new().await;
    let event = keyed("donor-7", 7);
    publish(&keys, std::slice::from_ref(&event)).await;

    let name = "flaky";
    let calls = std::sync::Arc::new(AtomicU32::new(0));
    let effects = db.handler();
    let counter = calls.clone();
    let source = connect(source_config(&keys, name, "c1")).await;
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

    wait_handled_and_acked(&handle, 1, &keys, name).await;
    let report = handle.shutdown().await;
    assert_eq!((report.handled, report.retried), (1, 1), "{report:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        db.effects(name).await,
        vec![(event.id(), "donor-7".to_owned(), 7)]
    );
}

#[tokio::test]
async fn a_crash_between_commit_and_ack_is_redelivered_by_xautoclaim_and_skipped() {
    proclaim_testkit::init_tracing();
    let keys = TestKeys::new();
    let db = EffectsDb::new().await;
    let event = keyed("donor-9", 9);
    publish(&keys, std::slice::from_ref(&event)).await;
    let name = "crashy";
    let stream = keys.key("events");
    let mut conn = keys.connection().await;

    // The first process: commits, then dies before the ack.
    let id = crash_after_commit(&keys, &db, name).await;
    assert_eq!(id, event.id());
    assert!(db.inbox.contains(name, event.id()).await.unwrap());
    assert_eq!(pending(&mut conn, &stream, name).await, 1, "left unacked");

    // Its replacement, under another name, takes the idle entry over.
    let redelivered = Recorder::default();
    let seen = redelivered.clone();
    let effects = db.handler();
    let config = source_config(&keys, name, "pod-b").with_claim_idle(Duration::from_millis(300));
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
        .spawn(connect(config).await)
        .unwrap();
    wait_handled_and_acked(&handle, 1, &keys, name).await;
    let report = handle.shutdown().await;
    assert_eq!(report.handled, 1, "{report:?}");
    assert_eq!(
        redelivered.all(),
        vec![(event.id(), Some(2), Outcome::Duplicate)],
        "delivered a second time, and skipped by the inbox"
    );
    assert_eq!(db.effect_counts(name).await.len(), 1);
    assert_eq!(db.effects(name).await.len(), 1);
}

#[tokio::test]
async fn a_restart_under_the_same_name_gets_its_pending_entries_at_once() {
    proclaim_testkit::init_tracing();
    let keys = TestKeys::new();
    let db = EffectsDb::new().await;
    publish(&keys, &[keyed("donor-3", 3)]).await;
    let name = "restarts";
    crash_after_commit(&keys, &db, name).await;

    // Same name, and a claim_idle far beyond the test: only the read of its
    // own pending entries can bring the entry back.
    let effects = db.handler();
    let config = source_config(&keys, name, "pod-a").with_claim_idle(Duration::from_secs(600));
    let handle = effects
        .consumer(name, "DonorSecured")
        .spawn(connect(config).await)
        .unwrap();
    wait_handled_and_acked(&handle, 1, &keys, name).await;
    handle.shutdown().await;
    assert_eq!(
        (effects.duplicates(), effects.committed()),
        (1, 0),
        "the one handling was a duplicate"
    );
    assert_eq!(db.effects(name).await.len(), 1);
}

#[tokio::test]
async fn each_subject_keeps_its_order_under_concurrency() {
    proclaim_testkit::init_tracing();
    let keys = TestKeys::new();
    let db = EffectsDb::new().await;
    const SUBJECTS: u64 = 5;
    const PER_SUBJECT: u64 = 12;
    publish(&keys, &round_robin(SUBJECTS, PER_SUBJECT)).await;

    let name = "ordered";
    let effects = db.handler();
    let in_flight = InFlight::default();
    let tracker = in_flight.clone();
    let source = connect(source_config(&keys, name, "c1").with_count(16)).await;
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
        .park_into(db.inbox.clone())
        .spawn(source)
        .unwrap();

    db.wait_effects(name, usize::try_from(SUBJECTS * PER_SUBJECT).unwrap())
        .await;
    let report = handle.shutdown().await;
    assert_eq!(report.parked, 0, "{report:?}");
    db.assert_order_per_subject(name, SUBJECTS, PER_SUBJECT)
        .await;
    assert!(in_flight.peak() > 1, "subjects were handled concurrently");
    assert!(in_flight.peak() <= 8, "at most 8 at once");
}

#[tokio::test]
async fn two_groups_each_get_every_event() {
    proclaim_testkit::init_tracing();
    let keys = TestKeys::new();
    let db = EffectsDb::new().await;
    // Published before either group exists: the groups start at the
    // beginning of the stream by default.
    let events = distinct_events(6);
    publish(&keys, &events).await;

    let mut handles = Vec::new();
    for name in ["receipts", "thank-you"] {
        let config = source_config(&keys, name, "c1").with_start(GroupStart::Beginning);
        let handle = db
            .handler()
            .consumer(name, "DonorSecured")
            .spawn(connect(config).await)
            .unwrap();
        handles.push(handle);
    }
    let conn = keys.connection().await;
    let stream = keys.key("events");
    for name in ["receipts", "thank-you"] {
        eventually(WAIT, &format!("{name} handled every event"), || {
            let db = &db;
            let mut conn = conn.clone();
            let stream = stream.clone();
            let expected = events.len();
            async move {
                db.effects(name).await.len() == expected
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
        db.assert_each_once(name, &events).await;
    }
}

#[tokio::test]
async fn an_undecodable_entry_is_parked_with_its_fields_and_acked() {
    proclaim_testkit::init_tracing();
    let keys = TestKeys::new();
    let db = EffectsDb::new().await;
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
    publish(&keys, &[keyed("donor-1", 1)]).await;

    let name = "strict";
    let source = connect(source_config(&keys, name, "c1")).await;
    let handle = db
        .handler()
        .consumer(name, "DonorSecured")
        .spawn(source)
        .unwrap();

    let parked = db.wait_parked(name, 1).await;
    wait_handled_and_acked(&handle, 1, &keys, name).await;
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
    assert_eq!(db.effects(name).await.len(), 1);
}

#[tokio::test]
async fn a_server_restart_is_a_receive_error_and_the_source_recovers() {
    proclaim_testkit::init_tracing();
    let mut server = crate::support::PrivateRedis::start(&[]).await;
    let db = EffectsDb::new().await;
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

    let config = RedisSourceConfig::new(stream, name, "c1")
        .with_url(server.url())
        .with_block(Duration::from_millis(200))
        .with_connect_timeout(Duration::from_millis(500))
        .with_response_timeout(Duration::from_secs(2));
    let handle = db
        .handler()
        .consumer(name, "DonorSecured")
        .outage_backoff(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(500),
        ))
        .spawn(connect(config).await)
        .unwrap();
    db.wait_effects(name, 1).await;

    // A crash without persistence: the stream and the group are gone.
    server.restart().await;
    wait_receive_error(&handle).await;
    let second = keyed("donor-2", 2);
    eventually(WAIT, "the second event published", || {
        let publisher = publisher.clone();
        let second = second.clone();
        async move { publisher.publish(&record(second)).await.is_ok() }
    })
    .await;
    db.wait_effects(name, 2).await;
    let report = handle.shutdown().await;
    assert_eq!(report.handled, 2, "{report:?}");
    let ids: Vec<_> = db
        .effects(name)
        .await
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(ids, vec![first.id(), second.id()]);
}
