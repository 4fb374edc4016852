//! The consumer runtime on JetStream ([`JetStreamSource`]) with the real
//! PostgreSQL inbox: each test has a stream and a schema of its own, handlers
//! write one effect row per event through the inbox's transaction, and the
//! tests check that every event's effect happened exactly once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::Info;
use proclaim_core::consumer::{Consumer, Context, HandlerError};
use proclaim_core::inbox::Inbox;
use proclaim_core::{Backoff, CancellationToken, Event, Publisher};
use proclaim_nats::{
    JetStreamSource, JetStreamSourceConfig, JetStreamSourceError, NatsConfig, NatsPublisher,
};
use proclaim_postgres::PgInbox;
use proclaim_testkit::consumer::{Effects, EffectsDb, InFlight, Uuid, WAIT, round_robin};
use proclaim_testkit::events::{n_of, record};
use proclaim_testkit::eventually;
use proclaim_testkit::nats::{TestStream, nats_url};

/// A stream, a schema with the inbox tables and an `effects` table, and a
/// publisher to the stream.
struct Fixture {
    ts: TestStream,
    db: EffectsDb,
    publisher: NatsPublisher,
}

impl Fixture {
    async fn new() -> Self {
        proclaim_testkit::init_tracing();
        let ts = TestStream::new().await;
        let db = EffectsDb::new().await;
        let publisher = NatsPublisher::connect(nats_config(&ts)).await.unwrap();
        Fixture { ts, db, publisher }
    }

    fn inbox(&self) -> &PgInbox {
        &self.db.inbox
    }

    fn nats(&self) -> NatsConfig {
        nats_config(&self.ts)
    }

    async fn source(&self, config: JetStreamSourceConfig) -> JetStreamSource {
        JetStreamSource::connect(self.nats(), config).await.unwrap()
    }

    /// Publishes through the outbox's publisher, one at a time (so stream
    /// order is this order).
    async fn publish(&self, events: &[Event]) {
        for event in events {
            self.publisher
                .publish(&record(event.clone()))
                .await
                .unwrap();
        }
    }

    /// Publishes every message the stream holds once more, with another
    /// `Nats-Msg-Id`, so JetStream keeps both copies: the duplicates a relay
    /// causes when it publishes an event again after a failure.
    async fn publish_duplicates(&self) -> usize {
        let stored = self.ts.messages().await;
        for message in &stored {
            let mut headers = message.headers.clone().unwrap_or_default();
            let id = headers
                .get("Nats-Msg-Id")
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            headers.insert("Nats-Msg-Id", format!("{id}-again").as_str());
            self.ts
                .js
                .publish_with_headers(message.subject.clone(), headers, message.payload.clone())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        stored.len()
    }

    /// Waits until `consumer` has an effect for each of `events`, then
    /// checks there is exactly one each and none for anything else.
    async fn assert_effect_once(&self, consumer: &str, events: &[Event]) {
        let want: HashSet<Uuid> = events.iter().map(Event::id).collect();
        let what = format!(
            "{consumer} to have an effect for each of {} events",
            want.len()
        );
        eventually(WAIT, &what, || async {
            let have: HashSet<Uuid> = self.db.effect_counts(consumer).await.into_keys().collect();
            want.is_subset(&have)
        })
        .await;
        let counts = self.db.effect_counts(consumer).await;
        assert_eq!(
            counts.keys().copied().collect::<HashSet<_>>(),
            want,
            "{consumer}: effects for other events"
        );
        for (id, n) in &counts {
            assert_eq!(*n, 1, "{consumer}: event {id} had {n} effects");
        }
    }

    async fn consumer_info(&self, group: &str) -> Info {
        let stream = self.ts.js.get_stream(&self.ts.name).await.unwrap();
        stream.consumer_info(group).await.unwrap()
    }

    /// Waits until `group` has nothing left: every message delivered and
    /// acknowledged.
    async fn wait_settled(&self, group: &str) {
        let what = format!("consumer group {group} to have acked everything");
        eventually(WAIT, &what, || async {
            let info = self.consumer_info(group).await;
            info.num_ack_pending == 0 && info.num_pending == 0
        })
        .await;
    }
}

fn nats_config(ts: &TestStream) -> NatsConfig {
    NatsConfig::default()
        .with_url(nats_url())
        .with_stream(&ts.name)
        .with_subject_prefix(&ts.prefix)
}

/// Fast retries, so failing attempts do not slow the tests down.
fn consumer(name: &str, inbox: &PgInbox) -> Consumer {
    Consumer::new(name)
        .retry(
            Backoff::new(Duration::from_millis(10), Duration::from_millis(100)),
            5,
        )
        .outage_backoff(Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(500),
        ))
        .park_into(inbox.clone())
}

/// A consumer named `group` whose handler applies each event's effect once.
fn effect_consumer(group: &str, effects: &Effects) -> Consumer {
    effects.on(consumer(group, &effects.inbox), "*")
}

#[tokio::test]
async fn injected_duplicates_have_their_effect_once() {
    let fx = Fixture::new().await;
    let group = "volunteer-thank-you";
    let events = round_robin(8, 5);
    fx.publish(&events).await;
    // The same messages again under other Nats-Msg-Ids: JetStream keeps them.
    assert_eq!(fx.publish_duplicates().await, events.len());
    fx.ts.wait_for_count(2 * events.len() as u64, WAIT).await;

    let effects = fx.db.handler();
    let source = fx.source(JetStreamSourceConfig::new(group)).await;
    let handle = effect_consumer(group, &effects)
        .concurrency(8)
        .spawn(source)
        .unwrap();

    fx.assert_effect_once(group, &events).await;
    let total = 2 * events.len() as u64;
    eventually(WAIT, "every delivery handled", || async {
        handle.report().handled == total
    })
    .await;
    fx.wait_settled(group).await;
    let report = handle.shutdown().await;

    assert_eq!(effects.committed(), events.len() as u64);
    assert_eq!(effects.duplicates(), events.len() as u64);
    assert_eq!(report.handled, total);
    assert_eq!((report.parked, report.ack_failures), (0, 0), "{report:?}");
    for event in &events {
        assert!(fx.inbox().contains(group, event.id()).await.unwrap());
    }
    fx.assert_effect_once(group, &events).await;
}

#[tokio::test]
async fn a_handler_that_fails_mid_transaction_is_retried_and_has_its_effect_once() {
    let fx = Fixture::new().await;
    let group = "fundraising-strategy";
    let events = round_robin(6, 4);
    fx.publish(&events).await;

    let effects = fx.db.handler();
    let failed = Arc::new(AtomicU64::new(0));
    let handler = (effects.clone(), failed.clone());
    let source = fx.source(JetStreamSourceConfig::new(group)).await;
    let handle = consumer(group, fx.inbox())
        .on_event("*", move |cx: Context<()>| {
            let (effects, failed) = handler.clone();
            async move {
                let n = n_of(&cx.event);
                let Some(mut tx) = effects.begin(&cx).await? else {
                    return Ok(());
                };
                effects.write(&mut tx, &cx).await?;
                if cx.attempt == 1 && n.is_multiple_of(2) {
                    // The effect is written, not committed: the failure
                    // rolls it back with the inbox row.
                    failed.fetch_add(1, Ordering::SeqCst);
                    if n.is_multiple_of(4) {
                        panic!("crash in the middle of the transaction");
                    }
                    return Err(HandlerError::transient("lost the connection"));
                }
                effects.commit(tx).await
            }
        })
        .concurrency(4)
        .spawn(source)
        .unwrap();

    fx.assert_effect_once(group, &events).await;
    fx.wait_settled(group).await;
    let report = handle.shutdown().await;

    let failing = events.iter().filter(|e| n_of(e).is_multiple_of(2)).count() as u64;
    assert_eq!(failed.load(Ordering::SeqCst), failing);
    assert_eq!(report.retried, failing, "{report:?}");
    assert_eq!(report.handled, events.len() as u64, "{report:?}");
    assert_eq!(report.parked, 0, "{report:?}");
    fx.assert_effect_once(group, &events).await;
}

#[tokio::test]
async fn a_consumer_killed_between_commit_and_ack_gets_the_message_again_and_skips_it() {
    let fx = Fixture::new().await;
    let group = "receipts";
    let events = round_robin(2, 5);
    let victim = events[4].id(); // donor-0, n = 2
    fx.publish(&events).await;

    let effects = fx.db.handler();
    let committed = Arc::new(tokio::sync::Notify::new());
    let victim_deliveries = Arc::new(AtomicU32::new(0));
    let build = || {
        let state = (
            effects.clone(),
            committed.clone(),
            victim_deliveries.clone(),
        );
        consumer(group, fx.inbox()).on_event("*", move |cx: Context<()>| {
            let (effects, committed, victim_deliveries) = state.clone();
            async move {
                effects.apply(&cx).await?;
                if cx.event.id() == victim {
                    let delivery = cx.delivery_attempt.unwrap_or(0);
                    victim_deliveries.fetch_max(delivery, Ordering::SeqCst);
                    if delivery == 1 {
                        // Committed, not yet acked: the process dies here.
                        committed.notify_one();
                        std::future::pending::<()>().await;
                    }
                }
                Ok(())
            }
        })
    };
    let config = JetStreamSourceConfig::new(group).with_ack_wait(Duration::from_secs(1));

    let source = fx.source(config.clone()).await;
    let running = tokio::spawn(build().run(source, CancellationToken::new()));
    committed.notified().await;
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    assert_eq!(fx.db.effect_counts(group).await.get(&victim), Some(&1));
    assert!(fx.consumer_info(group).await.num_ack_pending >= 1);

    // The restarted consumer gets the victim again (after ack_wait); the
    // inbox recognises it.
    let source = fx.source(config).await;
    let handle = build().spawn(source).unwrap();
    fx.assert_effect_once(group, &events).await;
    fx.wait_settled(group).await;
    let report = handle.shutdown().await;

    assert!(victim_deliveries.load(Ordering::SeqCst) >= 2);
    assert!(effects.duplicates() >= 1, "the victim was not redelivered");
    // (Other handlings the abort cut short may have committed without
    // counting it: the effects table is the measure.)
    assert_eq!(report.parked, 0, "{report:?}");
    fx.assert_effect_once(group, &events).await;
}

#[tokio::test]
async fn events_of_one_subject_are_handled_in_publish_order_under_concurrency() {
    let fx = Fixture::new().await;
    let group = "ledger";
    let (subjects, per_subject) = (12, 8);
    let events = round_robin(subjects, per_subject);
    fx.publish(&events).await;

    let effects = fx.db.handler();
    let in_flight = InFlight::default();
    let state = (effects.clone(), in_flight.clone());
    let source = fx.source(JetStreamSourceConfig::new(group)).await;
    let handle = consumer(group, fx.inbox())
        .on_event("*", move |cx: Context<()>| {
            let (effects, in_flight) = state.clone();
            async move {
                in_flight
                    .track(async {
                        // A small delay that differs between events (0-6 ms).
                        let delay = (cx.event.id().as_u128() % 7) as u64;
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        effects.apply(&cx).await.map(|_| ())
                    })
                    .await
            }
        })
        .concurrency(8)
        .spawn(source)
        .unwrap();

    fx.assert_effect_once(group, &events).await;
    fx.wait_settled(group).await;
    let report = handle.shutdown().await;
    assert_eq!(report.handled, events.len() as u64, "{report:?}");

    fx.db
        .assert_order_per_subject(group, subjects, per_subject)
        .await;
    assert!(in_flight.peak() >= 2, "handlers never overlapped");
}

#[tokio::test]
async fn each_consumer_group_gets_every_event_and_a_group_shares_them() {
    let fx = Fixture::new().await;
    let events = round_robin(5, 8);

    // Two groups, one source each: both get everything.
    let thank_you = fx.db.handler();
    let strategy = fx.db.handler();
    // One group with two sources (two instances of one service).
    let ledger_a = fx.db.handler();
    let ledger_b = fx.db.handler();
    let ledger = JetStreamSourceConfig::new("ledger").with_batch_size(5);
    let handles = vec![
        effect_consumer("volunteer-thank-you", &thank_you)
            .spawn(
                fx.source(JetStreamSourceConfig::new("volunteer-thank-you"))
                    .await,
            )
            .unwrap(),
        effect_consumer("fundraising-strategy", &strategy)
            .spawn(
                fx.source(JetStreamSourceConfig::new("fundraising-strategy"))
                    .await,
            )
            .unwrap(),
        effect_consumer("ledger", &ledger_a)
            .spawn(fx.source(ledger.clone()).await)
            .unwrap(),
        effect_consumer("ledger", &ledger_b)
            .spawn(fx.source(ledger.clone()).await)
            .unwrap(),
    ];
    // Both ledger instances are waiting for messages before any arrives.
    eventually(WAIT, "both ledger sources to pull", || async {
        fx.consumer_info("ledger").await.num_waiting >= 2
    })
    .await;
    fx.publish(&events).await;

    for group in ["volunteer-thank-you", "fundraising-strategy", "ledger"] {
        fx.assert_effect_once(group, &events).await;
        fx.wait_settled(group).await;
    }
    for handle in handles {
        let report = handle.shutdown().await;
        assert_eq!(report.parked, 0, "{report:?}");
    }
    let total = events.len() as u64;
    assert_eq!(thank_you.committed(), total);
    assert_eq!(strategy.committed(), total);
    let (a, b) = (ledger_a.committed(), ledger_b.committed());
    assert!(a > 0 && b > 0, "one ledger instance got nothing: {a} / {b}");
    assert_eq!(a + b, total);
}

#[tokio::test]
async fn an_undecodable_message_is_parked_with_its_bytes_and_acked() {
    let fx = Fixture::new().await;
    let group = "audit";
    let good = round_robin(1, 2);
    fx.publish(&good[..1]).await;
    // No headers at all: not a CloudEvent.
    let garbage = b"not a cloudevent \xff".to_vec();
    fx.ts
        .js
        .publish(format!("{}.Garbage", fx.ts.prefix), garbage.clone().into())
        .await
        .unwrap()
        .await
        .unwrap();
    // A proclaim event's headers, but a body that is not JSON.
    let stored = fx.ts.messages().await;
    let mut headers = stored[0].headers.clone().unwrap();
    headers.insert("Nats-Msg-Id", "broken-body");
    let broken = b"{oops".to_vec();
    fx.ts
        .js
        .publish_with_headers(stored[0].subject.clone(), headers, broken.clone().into())
        .await
        .unwrap()
        .await
        .unwrap();
    // A well-formed event of a CloudEvents version this build does not know.
    let mut headers = stored[0].headers.clone().unwrap();
    headers.insert("Nats-Msg-Id", "unknown-version");
    headers.insert("ce-specversion", "2.0");
    let future = stored[0].payload.to_vec();
    fx.ts
        .js
        .publish_with_headers(stored[0].subject.clone(), headers, future.clone().into())
        .await
        .unwrap()
        .await
        .unwrap();
    fx.publish(&good[1..]).await;

    let effects = fx.db.handler();
    let source = fx.source(JetStreamSourceConfig::new(group)).await;
    let handle = effect_consumer(group, &effects).spawn(source).unwrap();

    fx.assert_effect_once(group, &good).await;
    let parked = fx.db.wait_parked(group, 3).await;
    assert_eq!(parked.len(), 3, "{parked:?}");
    fx.wait_settled(group).await;
    let report = handle.shutdown().await;

    assert_eq!((report.parked, report.handled), (3, 2), "{report:?}");
    assert!(parked.iter().all(|p| p.event.is_none() && p.attempts == 0));
    assert!(parked.iter().all(|p| p.consumer == group));
    // Undecodable messages have no ordering key: they may be parked in
    // either order.
    let by_raw = |raw: &[u8]| {
        parked
            .iter()
            .find(|p| p.raw == raw)
            .unwrap_or_else(|| panic!("nothing parked with {raw:?}"))
    };
    let reason = &by_raw(&garbage).reason;
    assert!(
        reason.starts_with("undecodable message: ") && reason.contains("has no headers"),
        "{reason}"
    );
    let reason = &by_raw(&broken).reason;
    assert!(
        reason.starts_with("undecodable message: ") && reason.contains("is not a valid event"),
        "{reason}"
    );
    let reason = &by_raw(&future).reason;
    assert!(
        reason.starts_with("undecodable message: ") && reason.contains("ce-specversion"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_deleted_durable_is_created_again_and_the_inbox_absorbs_the_replay() {
    let fx = Fixture::new().await;
    let group = "thank-you";
    let events = round_robin(3, 4);
    let (first, second) = events.split_at(6);
    fx.publish(first).await;

    let effects = fx.db.handler();
    let source = fx.source(JetStreamSourceConfig::new(group)).await;
    let handle = effect_consumer(group, &effects).spawn(source).unwrap();
    fx.assert_effect_once(group, first).await;
    fx.wait_settled(group).await;

    let stream = fx.ts.js.get_stream(&fx.ts.name).await.unwrap();
    stream.delete_consumer(group).await.unwrap();
    fx.publish(second).await;

    // The new durable delivers the whole stream again: the first events are
    // duplicates now.
    fx.assert_effect_once(group, &events).await;
    eventually(WAIT, "the replayed events to be recognised", || async {
        effects.duplicates() == first.len() as u64
    })
    .await;
    fx.wait_settled(group).await;
    let report = handle.shutdown().await;
    assert!(report.receive_errors >= 1, "{report:?}");
    assert_eq!(effects.committed(), events.len() as u64);
}

#[tokio::test]
async fn event_types_select_what_a_group_receives() {
    let fx = Fixture::new().await;
    let of = |t: &str, n: u64| {
        Event::builder(t)
            .subject("donor-1")
            .data(&serde_json::json!({ "n": n }))
            .build()
            .unwrap()
    };
    let all = vec![
        of("DonorSecured", 0),
        of("PledgeMade", 1),
        of("VolunteerJoined", 2),
        of("DonorSecured", 3),
    ];
    fx.publish(&all).await;

    // One type: the server selects it by subject.
    let one = fx
        .source(JetStreamSourceConfig::new("donors").with_event_types(["DonorSecured"]))
        .await;
    assert_eq!(
        fx.consumer_info("donors").await.config.filter_subject,
        format!("{}.DonorSecured", fx.ts.prefix)
    );
    // Several types: the source skips the others itself.
    let two = fx
        .source(
            JetStreamSourceConfig::new("money").with_event_types(["DonorSecured", "PledgeMade"]),
        )
        .await;
    assert_eq!(fx.consumer_info("money").await.config.filter_subject, "");

    let effects = fx.db.handler();
    let donors = effect_consumer("donors", &effects).spawn(one).unwrap();
    let money = effect_consumer("money", &effects).spawn(two).unwrap();
    let wanted = |types: &[&str]| -> Vec<Event> {
        all.iter()
            .filter(|e| types.contains(&e.event_type()))
            .cloned()
            .collect()
    };
    fx.assert_effect_once("donors", &wanted(&["DonorSecured"]))
        .await;
    fx.assert_effect_once("money", &wanted(&["DonorSecured", "PledgeMade"]))
        .await;
    fx.wait_settled("donors").await;
    fx.wait_settled("money").await;
    let (donors, money) = (donors.shutdown().await, money.shutdown().await);
    assert_eq!((donors.handled, donors.skipped), (2, 0), "{donors:?}");
    assert_eq!((money.handled, money.skipped), (3, 0), "{money:?}");
}

#[tokio::test]
async fn a_graceful_shutdown_hands_unsettled_messages_back_at_once() {
    let fx = Fixture::new().await;
    let group = "slow";
    let events = round_robin(1, 3);
    fx.publish(&events).await;

    // The first run fails every attempt and is stopped while it waits 2 s
    // to retry: the message is nacked with that delay, not left to ack_wait
    // (1 minute here, beyond the test's deadline).
    let config = JetStreamSourceConfig::new(group).with_ack_wait(Duration::from_secs(60));
    let source = fx.source(config.clone()).await;
    let handle = consumer(group, fx.inbox())
        .retry(
            Backoff::new(Duration::from_secs(2), Duration::from_secs(2)),
            5,
        )
        .on_event("*", |_cx: Context<()>| async {
            Err(HandlerError::transient("not yet"))
        })
        .spawn(source)
        .unwrap();
    eventually(WAIT, "a failed attempt", || async {
        handle.report().retried >= 1
    })
    .await;
    let report = handle.shutdown().await;
    assert!(report.released >= 1, "{report:?}");

    let effects = fx.db.handler();
    let source = fx.source(config).await;
    let handle = effect_consumer(group, &effects).spawn(source).unwrap();
    fx.assert_effect_once(group, &events).await;
    fx.wait_settled(group).await;
    handle.shutdown().await;
}

#[tokio::test]
async fn bad_settings_are_rejected_before_connecting() {
    let nats = NatsConfig::default().with_url("nats://127.0.0.1:1");
    for config in [
        JetStreamSourceConfig::new(""),
        JetStreamSourceConfig::new("thank.you"),
        JetStreamSourceConfig::new("a b"),
        JetStreamSourceConfig::new("ok").with_filter_subject("a.>.b"),
        JetStreamSourceConfig::new("ok").with_ack_wait(Duration::ZERO),
        JetStreamSourceConfig::new("ok").with_max_ack_pending(0),
    ] {
        let err = JetStreamSource::connect(nats.clone(), config.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                JetStreamSourceError::Nats(proclaim_nats::NatsError::Config(_))
            ),
            "{config:?}: {err:?}"
        );
    }
}

#[tokio::test]
async fn a_durable_without_explicit_acks_is_refused() {
    let ts = TestStream::new().await;
    let stream = ts.js.get_stream(&ts.name).await.unwrap();
    stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("careless".into()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let err = JetStreamSource::connect(nats_config(&ts), JetStreamSourceConfig::new("careless"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, JetStreamSourceError::Consumer { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "cannot use durable consumer careless of JetStream stream {}",
            ts.name
        )) && text.contains("explicit acks"),
        "{text}"
    );
}

#[tokio::test]
async fn a_slow_handler_is_kept_in_progress_instead_of_redelivered() {
    let fx = Fixture::new().await;
    let group = "slow-but-steady";
    let events = round_robin(1, 2);
    fx.publish(&events).await;

    // Each handling takes twice ack_wait, and the second message waits that
    // long in the queue; the source tells the server both are in progress,
    // so neither is delivered again.
    let effects = fx.db.handler();
    let redelivered = Arc::new(AtomicU64::new(0));
    let state = (effects.clone(), redelivered.clone());
    let config = JetStreamSourceConfig::new(group).with_ack_wait(Duration::from_secs(1));
    let source = fx.source(config).await;
    let handle = consumer(group, fx.inbox())
        .on_event("*", move |cx: Context<()>| {
            let (effects, redelivered) = state.clone();
            async move {
                if cx.delivery_attempt != Some(1) {
                    redelivered.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(2000)).await;
                effects.apply(&cx).await.map(|_| ())
            }
        })
        .concurrency(1)
        .spawn(source)
        .unwrap();

    fx.assert_effect_once(group, &events).await;
    fx.wait_settled(group).await;
    let report = handle.shutdown().await;
    assert_eq!(report.handled, events.len() as u64, "{report:?}");
    assert_eq!(redelivered.load(Ordering::SeqCst), 0);
    assert_eq!(effects.duplicates(), 0);
    assert_eq!(fx.consumer_info(group).await.num_redelivered, 0);
}

#[tokio::test]
async fn the_source_recovers_when_the_connection_is_lost() {
    use proclaim_testkit::proxy::{FaultMode, FaultProxy};

    let fx = Fixture::new().await;
    let group = "resilient";
    let events = round_robin(3, 4);
    let (before, during) = events.split_at(6);
    let broker = nats_url();
    let proxy = FaultProxy::start(broker.trim_start_matches("nats://"))
        .await
        .unwrap();
    let nats = fx.nats().with_url(format!("nats://{}", proxy.addr()));
    let config = JetStreamSourceConfig::new(group).with_ack_wait(Duration::from_secs(2));
    let source = JetStreamSource::connect(nats, config).await.unwrap();
    let effects = fx.db.handler();
    let handle = effect_consumer(group, &effects).spawn(source).unwrap();

    fx.publish(before).await;
    fx.assert_effect_once(group, before).await;

    // The server goes away for a moment; events keep arriving in the stream.
    proxy.set_mode(FaultMode::Refuse);
    fx.publish(during).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set_mode(FaultMode::Pass);

    fx.assert_effect_once(group, &events).await;
    fx.wait_settled(group).await;
    let report = handle.shutdown().await;
    assert_eq!(report.parked, 0, "{report:?}");
}

/// `Consumer::on_once`: the runtime opens the inbox transaction, skips
/// redeliveries without calling the handler, and commits what it returns;
/// a handler that fails after writing its effect leaves nothing behind.
#[tokio::test]
async fn on_once_skips_duplicates_without_calling_the_handler_and_rolls_back_failures() {
    let fx = Fixture::new().await;
    let group = "thank-you-once";
    let events = round_robin(4, 5);
    fx.publish(&events).await;
    assert_eq!(fx.publish_duplicates().await, events.len());
    fx.ts.wait_for_count(2 * events.len() as u64, WAIT).await;

    let table = format!(r#""{}".effects"#, fx.db.schema.name);
    let calls = Arc::new(AtomicU64::new(0));
    let failed_once = Arc::new(Mutex::new(HashSet::new()));
    let handler = {
        let (calls, failed_once) = (calls.clone(), failed_once.clone());
        move |cx: Context<serde_json::Value>, mut tx: proclaim_postgres::PgInboxTx| {
            let (calls, failed_once, table) = (calls.clone(), failed_once.clone(), table.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO {table} (consumer, event_id, subject, n) VALUES ($1, $2, $3, $4)"
                )))
                .bind(cx.consumer())
                .bind(cx.event.id())
                .bind(cx.event.subject())
                .bind(i64::try_from(n_of(&cx.event)).unwrap())
                .execute(&mut *tx)
                .await
                .map_err(|e| HandlerError::transient("insert").with_source(e))?;
                // Every event's first attempt fails after its effect was written.
                if failed_once.lock().unwrap().insert(cx.event.id()) {
                    return Err(HandlerError::transient("the mail server hung up"));
                }
                Ok(tx)
            }
        }
    };
    let source = fx.source(JetStreamSourceConfig::new(group)).await;
    let handle = consumer(group, fx.inbox())
        .on_once("*", fx.inbox().clone(), handler)
        .concurrency(4)
        .spawn(source)
        .unwrap();

    fx.assert_effect_once(group, &events).await;
    let total = 2 * events.len() as u64;
    eventually(WAIT, "every delivery handled", || async {
        handle.report().handled == total
    })
    .await;
    fx.wait_settled(group).await;
    let report = handle.shutdown().await;
    assert_eq!(report.parked, 0, "{report:?}");
    assert_eq!(report.retried, events.len() as u64, "{report:?}");
    assert_eq!(report.duplicates, events.len() as u64, "{report:?}");
    // Two calls per event (the failed first attempt and its retry); the
    // duplicate copies never reached the handler.
    assert_eq!(calls.load(Ordering::SeqCst), 2 * events.len() as u64);
    fx.assert_effect_once(group, &events).await;
}
