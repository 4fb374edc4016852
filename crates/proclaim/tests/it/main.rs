//! End-to-end relay tests: real PostgreSQL → relay → real NATS JetStream.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use proclaim::nats::{NatsConfig, NatsPublisher, decode_message};
use proclaim::postgres::{PgOutbox, PgOutboxOptions};
use proclaim::{Backoff, Event, OutboxStore, PublishError, Relay, RelayConfig};
use proclaim_testkit::nats::TestStream;
use proclaim_testkit::pg::TestSchema;
use proclaim_testkit::proxy::{FaultMode, FaultProxy};
use proclaim_testkit::publisher::Instrumented;
use proclaim_testkit::{eventually, init_tracing};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

struct Harness {
    ts: TestSchema,
    stream: TestStream,
    outbox: PgOutbox,
    /// Number of the next event written, so each subject's numbers rise.
    next: std::sync::atomic::AtomicU64,
}

impl Harness {
    async fn new() -> Self {
        init_tracing();
        let ts = TestSchema::new().await;
        let stream = TestStream::new().await;
        let outbox = PgOutbox::with_options(
            ts.pool.clone(),
            PgOutboxOptions::default().with_schema(&ts.name),
        )
        .unwrap();
        outbox.migrate().await.unwrap();
        Harness {
            ts,
            stream,
            outbox,
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn nats_config(&self) -> NatsConfig {
        NatsConfig::default()
            .with_url(proclaim_testkit::nats::nats_url())
            .with_stream(&self.stream.name)
            .with_subject_prefix(&self.stream.prefix)
    }

    async fn publisher(&self) -> NatsPublisher {
        NatsPublisher::connect(self.nats_config()).await.unwrap()
    }

    /// Commits `count` events over `keys` subjects, `per_tx` per transaction.
    async fn write(&self, count: u64, keys: u64, per_tx: u64) -> Vec<Event> {
        let start = self
            .next
            .fetch_add(count, std::sync::atomic::Ordering::SeqCst);
        let events: Vec<Event> = (start..start + count)
            .map(|n| event(&format!("donor-{}", n % keys), n))
            .collect();
        for chunk in events.chunks(per_tx as usize) {
            let mut tx = self.ts.pool.begin().await.unwrap();
            for e in chunk {
                self.outbox.enqueue(&mut tx, e).await.unwrap();
            }
            tx.commit().await.unwrap();
        }
        events
    }

    /// Every message in the stream, decoded, in stream order.
    async fn delivered(&self) -> Vec<Event> {
        self.stream
            .messages()
            .await
            .iter()
            .map(|m| decode_message(m).unwrap())
            .collect()
    }

    async fn wait_until_drained(&self) {
        let outbox = self.outbox.clone();
        eventually(WAIT, "outbox drained", || {
            let outbox = outbox.clone();
            async move {
                let s = outbox.stats().await.unwrap();
                s.pending + s.in_flight == 0
            }
        })
        .await;
    }
}

fn event(subject: &str, n: u64) -> Event {
    Event::builder("DonorSecured")
        .subject(subject)
        .source("campaign-finance")
        .data(&serde_json::json!({ "n": n }))
        .build()
        .unwrap()
}

fn n_of(e: &Event) -> u64 {
    e.data_as::<serde_json::Value>().unwrap()["n"]
        .as_u64()
        .unwrap()
}

fn fast_config() -> RelayConfig {
    RelayConfig::default()
        .with_poll_interval(Duration::from_millis(200))
        .with_backoff(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(400),
        ))
        .with_outage_backoff(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(300),
        ))
}

/// Each subject's events arrive in the order they were written.
fn assert_per_key_order(delivered: &[Event]) {
    let mut last: HashMap<&str, u64> = HashMap::new();
    for e in delivered {
        let n = n_of(e);
        if let Some(prev) = last.insert(e.subject(), n) {
            assert!(
                prev < n,
                "subject {}: {n} arrived after {prev}",
                e.subject()
            );
        }
    }
}

fn ids(events: &[Event]) -> HashSet<Uuid> {
    events.iter().map(Event::id).collect()
}

#[tokio::test]
async fn every_committed_event_is_published_exactly_once_in_key_order() {
    let h = Harness::new().await;
    let written = h.write(1000, 25, 10).await;
    let relay = Relay::new(
        h.outbox.clone(),
        h.publisher().await,
        fast_config().with_batch_size(64),
    )
    .unwrap()
    .spawn();
    h.stream.wait_for_count(1000, WAIT).await;
    h.wait_until_drained().await;
    let report = relay.shutdown().await;

    let delivered = h.delivered().await;
    assert_eq!(delivered.len(), 1000);
    assert_eq!(ids(&delivered), ids(&written));
    assert_per_key_order(&delivered);
    assert_eq!(report.published, 1000);
    assert_eq!(report.dead_lettered, 0);
    assert_eq!(
        h.outbox.stats().await.unwrap().published_retained,
        0,
        "rows deleted on ack"
    );
    // Delivered as written, byte for byte.
    let by_id: HashMap<Uuid, &Event> = written.iter().map(|e| (e.id(), e)).collect();
    for d in &delivered {
        let w = by_id[&d.id()];
        assert_eq!(d.data().get(), w.data().get());
        assert_eq!(d.subject(), w.subject());
    }
}

#[tokio::test]
async fn rolled_back_events_are_never_published() {
    let h = Harness::new().await;
    let relay = Relay::new(h.outbox.clone(), h.publisher().await, fast_config())
        .unwrap()
        .spawn();
    let mut committed = Vec::new();
    for n in 0..40 {
        let e = event(&format!("donor-{n}"), n);
        let mut tx = h.ts.pool.begin().await.unwrap();
        h.outbox.enqueue(&mut tx, &e).await.unwrap();
        if n % 2 == 0 {
            tx.commit().await.unwrap();
            committed.push(e);
        } else {
            tx.rollback().await.unwrap();
        }
    }
    h.stream.wait_for_count(20, WAIT).await;
    h.wait_until_drained().await;
    relay.shutdown().await;
    let delivered = h.delivered().await;
    assert_eq!(ids(&delivered), ids(&committed));
    assert_eq!(delivered.len(), 20);
}

#[tokio::test]
async fn late_committing_transaction_is_still_delivered() {
    let h = Harness::new().await;
    let relay = Relay::new(h.outbox.clone(), h.publisher().await, fast_config())
        .unwrap()
        .spawn();
    let late = event("donor-late", 1);
    let mut t1 = h.ts.pool.begin().await.unwrap();
    h.outbox.enqueue(&mut t1, &late).await.unwrap();
    let early = h.write(5, 5, 1).await;
    h.stream.wait_for_count(5, WAIT).await;
    t1.commit().await.unwrap();
    h.stream.wait_for_count(6, WAIT).await;
    relay.shutdown().await;
    let delivered = h.delivered().await;
    let mut expected = ids(&early);
    expected.insert(late.id());
    assert_eq!(ids(&delivered), expected);
}

#[tokio::test]
async fn broker_outage_loses_nothing() {
    let h = Harness::new().await;
    let upstream = proclaim_testkit::nats::nats_url()
        .trim_start_matches("nats://")
        .to_owned();
    let proxy = FaultProxy::start(upstream).await.unwrap();
    let publisher = NatsPublisher::connect(
        h.nats_config()
            .with_url(format!("nats://127.0.0.1:{}", proxy.port())),
    )
    .await
    .unwrap();
    let config = fast_config()
        .with_publish_timeout(Duration::from_millis(500))
        .with_lease(Duration::from_secs(2))
        .with_max_attempts(1000);
    let relay = Relay::new(h.outbox.clone(), publisher, config)
        .unwrap()
        .spawn();

    // Black hole: the client still believes it is connected; publishes time
    // out and are retried with backoff.
    proxy.set_mode(FaultMode::Blackhole);
    let mut written = h.write(100, 10, 5).await;
    let pool = h.ts.pool.clone();
    let errors_sql = format!(
        r#"SELECT count(*) FROM "{}".outbox WHERE last_error IS NOT NULL"#,
        h.ts.name
    );
    eventually(
        WAIT,
        "failed attempts recorded while the broker is unreachable",
        || {
            let (pool, sql) = (pool.clone(), errors_sql.clone());
            async move {
                let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                n > 0
            }
        },
    )
    .await;
    // Refused: the client knows it is disconnected; the relay claims nothing.
    proxy.set_mode(FaultMode::Refuse);
    written.extend(h.write(100, 10, 5).await);
    assert_eq!(
        h.stream.count().await,
        0,
        "nothing can arrive during the outage"
    );
    assert_eq!(h.outbox.stats().await.unwrap().dead_lettered, 0);

    proxy.set_mode(FaultMode::Pass);
    h.stream.wait_for_count(200, WAIT).await;
    h.wait_until_drained().await;
    relay.shutdown().await;
    let delivered = h.delivered().await;
    assert_eq!(
        delivered.len(),
        200,
        "JetStream dedup leaves each event once"
    );
    assert_eq!(ids(&delivered), ids(&written));
    assert_per_key_order(&delivered);
}

#[tokio::test]
async fn poison_events_are_dead_lettered_while_others_flow() {
    let h = Harness::new().await;
    // A subject that cannot be a NATS subject token: the real publisher refuses it permanently.
    let nats = h
        .nats_config()
        .with_subject_template("{prefix}.{type}.{subject}");
    let real = NatsPublisher::connect(nats).await.unwrap();
    // And an event the broker keeps failing transiently.
    let publisher = Instrumented::new(real).failing(|r| {
        (r.event.event_type() == "Flaky").then(|| PublishError::transient("broker busy (injected)"))
    });
    let publisher = Arc::new(publisher);
    let config = fast_config().with_max_attempts(3);

    let mut tx = h.ts.pool.begin().await.unwrap();
    let poison = Event::builder("DonorSecured")
        .subject("bad subject")
        .data(&1)
        .build()
        .unwrap();
    let flaky = Event::builder("Flaky")
        .subject("donor-f")
        .data(&serde_json::json!({"n": 0}))
        .build()
        .unwrap();
    h.outbox.enqueue(&mut tx, &poison).await.unwrap();
    h.outbox.enqueue(&mut tx, &flaky).await.unwrap();
    tx.commit().await.unwrap();
    let after_flaky = event("donor-f", 1);
    let mut tx = h.ts.pool.begin().await.unwrap();
    h.outbox.enqueue(&mut tx, &after_flaky).await.unwrap();
    tx.commit().await.unwrap();
    let others = h.write(50, 10, 5).await;

    let relay = Relay::new(h.outbox.clone(), publisher.clone(), config)
        .unwrap()
        .spawn();
    h.stream.wait_for_count(51, WAIT).await;
    h.wait_until_drained().await;
    let report = relay.shutdown().await;

    let stats = h.outbox.stats().await.unwrap();
    assert_eq!(stats.dead_lettered, 2);
    let dead = h.outbox.dead_letters(10).await.unwrap();
    let by_id: HashMap<Uuid, _> = dead.iter().map(|d| (d.id, d)).collect();
    assert!(
        by_id[&poison.id()]
            .last_error
            .starts_with("permanent failure"),
        "{}",
        by_id[&poison.id()].last_error
    );
    assert_eq!(
        by_id[&poison.id()].attempts,
        1,
        "a permanent failure is not retried"
    );
    assert!(
        by_id[&flaky.id()]
            .last_error
            .contains("gave up after 3 attempts"),
        "{}",
        by_id[&flaky.id()].last_error
    );
    assert_eq!(by_id[&flaky.id()].attempts, 3);
    assert_eq!(publisher.calls()[&flaky.id()], 3);
    assert_eq!(report.dead_lettered, 2);

    let delivered = h.delivered().await;
    let mut expected = ids(&others);
    expected.insert(after_flaky.id());
    assert_eq!(ids(&delivered), expected, "everything else is delivered");
    // The event behind the flaky one on its subject waited for it to be given up on.
    assert_eq!(publisher.calls()[&after_flaky.id()], 1);
}

#[tokio::test]
async fn two_relays_never_publish_one_event_concurrently_and_lose_none() {
    let h = Harness::new().await;
    let written = h.write(2000, 40, 50).await;
    let shared = Arc::new(Instrumented::new(h.publisher().await));
    let second_outbox = PgOutbox::with_options(
        h.ts.another_pool().await,
        PgOutboxOptions::default().with_schema(&h.ts.name),
    )
    .unwrap();
    let config = fast_config().with_batch_size(50);
    let a = Relay::new(h.outbox.clone(), shared.clone(), config.clone())
        .unwrap()
        .spawn();
    let b = Relay::new(second_outbox, shared.clone(), config)
        .unwrap()
        .spawn();
    h.stream.wait_for_count(2000, WAIT).await;
    h.wait_until_drained().await;
    let (ra, rb) = (a.shutdown().await, b.shutdown().await);

    assert_eq!(
        shared.overlaps(),
        0,
        "an event was published by two relays at once"
    );
    assert!(
        ra.published > 0 && rb.published > 0,
        "both relays worked: {} / {}",
        ra.published,
        rb.published
    );
    assert_eq!(ra.published + rb.published, 2000);
    assert!(
        shared.calls().values().all(|&n| n == 1),
        "no event published twice"
    );
    let delivered = h.delivered().await;
    assert_eq!(delivered.len(), 2000);
    assert_eq!(ids(&delivered), ids(&written));
    assert_per_key_order(&delivered);
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_work() {
    let h = Harness::new().await;
    h.write(300, 300, 50).await;
    let slow = Arc::new(Instrumented::new(h.publisher().await).delayed(Duration::from_millis(20)));
    let config = fast_config()
        .with_batch_size(100)
        .with_max_concurrent_publishes(10);
    let relay = Relay::new(h.outbox.clone(), slow.clone(), config)
        .unwrap()
        .spawn();
    eventually(WAIT, "relay is mid-way", || async {
        slow.total_calls() >= 30
    })
    .await;
    let report = relay.shutdown().await;

    let stats = h.outbox.stats().await.unwrap();
    assert_eq!(
        stats.in_flight, 0,
        "nothing left leased after a graceful stop"
    );
    assert!(
        report.published >= 30 && report.published < 300,
        "{report:?}"
    );
    assert_eq!(stats.pending, 300 - report.published);
    assert_eq!(h.stream.count().await, report.published);
}

#[tokio::test]
async fn retention_keeps_published_rows_then_purges_them() {
    let h = Harness::new().await;
    h.write(20, 5, 5).await;
    let config = fast_config()
        .with_retention(Some(Duration::from_millis(300)))
        .with_purge_interval(Duration::from_millis(100));
    let relay = Relay::new(h.outbox.clone(), h.publisher().await, config)
        .unwrap()
        .spawn();
    h.stream.wait_for_count(20, WAIT).await;
    let outbox = h.outbox.clone();
    eventually(WAIT, "published rows purged after retention", || {
        let outbox = outbox.clone();
        async move {
            let s = outbox.stats().await.unwrap();
            s.pending + s.in_flight + s.published_retained == 0
        }
    })
    .await;
    let report = relay.shutdown().await;
    assert_eq!(report.published, 20);
}

/// Writers with a `NOTIFY` debounce window: the first transaction notifies,
/// the next one within the window does not. Its event, committed after the
/// relay already claimed on the wake-up, is delivered by the relay's
/// follow-up claim, not by polling (the poll interval here is a minute).
/// Returns how many events the stream holds 1.5 s after the second commit.
async fn debounced_second_commit(followup: Duration) -> u64 {
    let h = Harness::new().await;
    let writer = PgOutbox::with_options(
        h.ts.pool.clone(),
        PgOutboxOptions::default()
            .with_schema(&h.ts.name)
            .with_notify_debounce(Duration::from_secs(60)),
    )
    .unwrap();
    let config = fast_config()
        .with_poll_interval(Duration::from_secs(60))
        .with_wakeup_followup(followup);
    let relay = Relay::new(h.outbox.clone(), h.publisher().await, config)
        .unwrap()
        .spawn();
    tokio::time::sleep(Duration::from_millis(300)).await; // past its first claim

    let mut first = h.ts.pool.begin().await.unwrap();
    writer.enqueue(&mut first, &event("a", 1)).await.unwrap(); // notifies
    let mut second = h.ts.pool.begin().await.unwrap();
    writer.enqueue(&mut second, &event("b", 2)).await.unwrap(); // debounced
    first.commit().await.unwrap();
    h.stream.wait_for_count(1, WAIT).await; // the wake-up delivered the first
    // Its outcome recorded, and then time for the claim the relay makes when
    // a batch finishes, so that claim cannot be the one that finds the second.
    let outbox = h.outbox.clone();
    eventually(WAIT, "the first event's outcome recorded", || {
        let outbox = outbox.clone();
        async move {
            let s = outbox.stats().await.unwrap();
            s.pending + s.in_flight == 0
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    second.commit().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let delivered = h.stream.count().await;
    relay.shutdown().await;
    delivered
}

#[tokio::test]
async fn the_followup_claim_delivers_a_debounced_commit() {
    let delivered = debounced_second_commit(Duration::from_millis(500)).await;
    assert_eq!(
        delivered, 2,
        "the follow-up claim picked up the second event"
    );
}

#[tokio::test]
async fn without_the_followup_a_debounced_commit_waits_for_the_poll() {
    let delivered = debounced_second_commit(Duration::ZERO).await;
    assert_eq!(delivered, 1, "nothing else wakes the relay within 1.5 s");
}

/// Fan-out: one outbox, two destinations (two JetStream streams), one of
/// them unreachable for a while. The healthy one receives every event once,
/// in per-key order, while the other is down; the other receives every event
/// once it is back; nothing is published twice to the healthy one.
#[tokio::test]
async fn fan_out_keeps_delivery_state_per_destination() {
    use proclaim::fanout::{FanOut, Lane, TypePattern, Unrouted};

    let h = Harness::new().await;
    let slow_stream = TestStream::new().await;
    let lane = |table: &str| {
        PgOutbox::with_options(
            h.ts.pool.clone(),
            PgOutboxOptions::default()
                .with_schema(&h.ts.name)
                .with_table(table),
        )
        .unwrap()
    };
    let (fast_lane, slow_lane) = (lane("lane_fast"), lane("lane_slow"));
    fast_lane.migrate().await.unwrap();
    slow_lane.migrate().await.unwrap();
    let fan_out = FanOut::new(
        vec![
            Lane {
                name: "fast".into(),
                pattern: TypePattern::parse("Donor*").unwrap(),
                stage: fast_lane.clone(),
            },
            Lane {
                name: "slow".into(),
                pattern: TypePattern::parse("*").unwrap(),
                stage: slow_lane.clone(),
            },
        ],
        Unrouted::DeadLetter,
    )
    .unwrap();

    let fast = Arc::new(Instrumented::new(h.publisher().await));
    let upstream = proclaim_testkit::nats::nats_url()
        .trim_start_matches("nats://")
        .to_owned();
    let proxy = FaultProxy::start(upstream).await.unwrap();
    let slow = NatsPublisher::connect(
        NatsConfig::default()
            .with_url(format!("nats://127.0.0.1:{}", proxy.port()))
            .with_stream(&slow_stream.name)
            .with_subject_prefix(&slow_stream.prefix),
    )
    .await
    .unwrap();
    proxy.set_mode(FaultMode::Refuse);

    let config = fast_config()
        .with_publish_timeout(Duration::from_millis(500))
        .with_max_attempts(1000);
    let relays = [
        Relay::new(h.outbox.clone(), fan_out, config.clone())
            .unwrap()
            .spawn(),
        Relay::new(fast_lane.clone(), fast.clone(), config.clone())
            .unwrap()
            .spawn(),
        Relay::new(slow_lane.clone(), slow, config).unwrap().spawn(),
    ];

    let written = h.write(120, 7, 4).await;
    h.stream.wait_for_count(120, WAIT).await;
    h.wait_until_drained().await;
    assert_eq!(slow_stream.count().await, 0, "the slow destination is down");
    let waiting = slow_lane.stats().await.unwrap();
    assert_eq!(
        waiting.pending + waiting.in_flight,
        120,
        "all in the slow lane"
    );

    proxy.set_mode(FaultMode::Pass);
    slow_stream.wait_for_count(120, WAIT).await;
    for relay in relays {
        relay.shutdown().await;
    }

    let to_fast = h.delivered().await;
    assert_eq!(ids(&to_fast), ids(&written));
    assert_per_key_order(&to_fast);
    let calls = fast.calls();
    assert_eq!(calls.len(), 120);
    assert!(
        calls.values().all(|n| *n == 1),
        "no event was sent twice to the healthy destination"
    );
    let to_slow: Vec<Event> = slow_stream
        .messages()
        .await
        .iter()
        .map(|m| decode_message(m).unwrap())
        .collect();
    assert_eq!(to_slow.len(), 120);
    assert_eq!(ids(&to_slow), ids(&written));
    assert_per_key_order(&to_slow);
}
