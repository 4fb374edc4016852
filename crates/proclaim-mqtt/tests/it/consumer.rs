//! The consumer runtime over [`MqttSource`] against Mosquitto, with the real
//! inbox (`PgInbox` in a schema of the test's own), topics under a prefix of
//! the test's own and group names with a suffix of its own: duplicates, a
//! failure mid-transaction, a crash between commit and ack, an ack on a lost
//! connection, per-subject order, groups and instances, undecodable
//! messages, QoS 2. Every test ends the MQTT sessions it made, checking on
//! the way that the broker kept no message for them (all were acked).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use proclaim_core::consumer::{Consumer, ConsumerHandle, Context};
use proclaim_core::inbox::Inbox;
use proclaim_core::{Backoff, CancellationToken, Event, Publisher};
use proclaim_mqtt::rumqttc::v5::mqttbytes::QoS;
use proclaim_mqtt::rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use proclaim_mqtt::rumqttc::v5::{AsyncClient, Event as MqttEvent, MqttOptions};
use proclaim_mqtt::{MqttConfig, MqttError, MqttPublisher, MqttSource, MqttSourceConfig};
use proclaim_testkit::consumer::{
    EffectsDb, InFlight, Outcome, Recorder, WAIT, distinct_events, quick_retries, round_robin,
    wait_handled, wait_receive_error,
};
use proclaim_testkit::events::{keyed, n_of, record};
use proclaim_testkit::proxy::FaultProxy;
use proclaim_testkit::unique_suffix;

use crate::{broker_addr, unique_prefix};

/// A test's topics and names.
struct Scope {
    prefix: String,
    suffix: String,
}

impl Scope {
    fn new() -> Scope {
        proclaim_testkit::init_tracing();
        Scope {
            prefix: unique_prefix(),
            suffix: unique_suffix(),
        }
    }

    /// A group name no other test uses (it is also the consumer's name).
    fn group(&self, name: &str) -> String {
        format!("{name}-{}", self.suffix)
    }

    fn publisher_config(&self) -> MqttConfig {
        MqttConfig::default()
            .with_url(format!("mqtt://{}", broker_addr()))
            .with_topic_template(format!("{}/{{type}}", self.prefix))
    }

    /// Publishes `events`, in this order, each once acknowledged.
    async fn publish(&self, events: &[Event]) {
        self.publish_with(self.publisher_config(), events).await;
    }

    async fn publish_with(&self, config: MqttConfig, events: &[Event]) {
        let publisher = MqttPublisher::connect(config).await.unwrap();
        for event in events {
            publisher.publish(&record(event.clone())).await.unwrap();
        }
    }

    /// Instance `instance` of `group`, reading what the test's publisher
    /// writes, with short timeouts and a session that outlives the test
    /// by little if it fails before ending it.
    fn source_config(&self, group: &str, instance: &str) -> MqttSourceConfig {
        let template = self.publisher_config().template().unwrap();
        MqttSourceConfig::new(group, instance)
            .with_url(format!("mqtt://{}", broker_addr()))
            .with_filter_for(&template)
            .with_session_expiry(Duration::from_secs(30))
            .with_connect_timeout(Duration::from_secs(2))
            .with_reconnect_backoff(Backoff::new(
                Duration::from_millis(50),
                Duration::from_millis(500),
            ))
    }
}

async fn connect(config: MqttSourceConfig) -> MqttSource {
    MqttSource::connect(config).await.unwrap()
}

/// Waits until a dropped source has sent its last acks and DISCONNECT.
async fn wait_closed(closed: impl Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("the source's task ends within 5 s of its drop");
}

/// Resumes the session of `client_id` and ends it (no session expiry: the
/// broker deletes it at the disconnect), returning the messages the broker
/// still held for it: those not acknowledged, and those queued.
async fn end_session(client_id: &str) -> Vec<Publish> {
    let addr = broker_addr();
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options
        .set_clean_start(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(Some(1 << 20));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let mut held = Vec::new();
    let connack = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let MqttEvent::Incoming(Packet::ConnAck(connack)) = eventloop.poll().await.unwrap() {
                return connack;
            }
        }
    })
    .await
    .expect("CONNACK within 5 s");
    assert!(connack.session_present, "{client_id}: no session to end");
    // What the broker kept comes at once; wait a little for it.
    let _ = tokio::time::timeout(Duration::from_millis(400), async {
        loop {
            if let MqttEvent::Incoming(Packet::Publish(p)) = eventloop.poll().await.unwrap() {
                held.push(p);
            }
        }
    })
    .await;
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    held
}

/// Ends the session of `client_id`, checking that every message was acked.
async fn assert_all_acked(client_id: &str) {
    let held = end_session(client_id).await;
    assert!(
        held.is_empty(),
        "{client_id}: the broker still held {} messages: {held:?}",
        held.len()
    );
}

/// Publishes `payload` as is (no properties) to `topic`, with QoS 1.
async fn publish_raw(topic: &str, payload: &'static [u8]) {
    let addr = broker_addr();
    let id = format!("proclaim-raw-{}", unique_suffix());
    let (client, mut eventloop) =
        AsyncClient::new(MqttOptions::new(id, addr.ip().to_string(), addr.port()), 10);
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let MqttEvent::Incoming(Packet::PubAck(_)) = eventloop.poll().await.unwrap() {
                break;
            }
        }
    })
    .await
    .expect("PUBACK within 5 s");
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

/// Shuts `handle` down and waits for its source to close.
async fn stop(
    handle: ConsumerHandle,
    closed: impl Future<Output = ()>,
) -> proclaim_core::consumer::ConsumerReport {
    let report = handle.shutdown().await;
    wait_closed(closed).await;
    report
}

#[tokio::test]
async fn every_event_is_handled_and_duplicates_have_one_effect() {
    let started = Instant::now();
    let scope = Scope::new();
    let db = EffectsDb::new().await;
    let name = scope.group("dedup");
    let source = connect(scope.source_config(&name, "c1")).await;
    let client_id = source.client_id().to_owned();
    assert_eq!(client_id, format!("{name}:c1"));
    assert!(source.is_connected());
    let closed = source.closed();
    let effects = db.handler();
    let handle = effects
        .consumer(&name, "DonorSecured")
        .spawn(source)
        .unwrap();

    // Each event twice, as a relay may publish it after a failure.
    let events = distinct_events(5);
    let twice: Vec<Event> = events.iter().flat_map(|e| [e.clone(), e.clone()]).collect();
    scope.publish(&twice).await;

    wait_handled(&handle, 10).await;
    let report = stop(handle, closed).await;
    assert_eq!(report.handled, 10, "{report:?}");
    assert_eq!(
        (report.ack_failures, report.parked, report.receive_errors),
        (0, 0, 0),
        "{report:?}"
    );
    let counts = db.effect_counts(&name).await;
    assert_eq!(counts.len(), 5, "{counts:?}");
    db.assert_each_once(&name, &events).await;
    for event in &events {
        assert!(db.inbox.contains(&name, event.id()).await.unwrap());
    }
    assert_eq!((effects.committed(), effects.duplicates()), (5, 5));
    assert_all_acked(&client_id).await;
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn a_failure_before_commit_is_retried_and_takes_effect_once() {
    let scope = Scope::new();
    let db = EffectsDb::new().await;
    let name = scope.group("flaky");
    let source = connect(scope.source_config(&name, "c1")).await;
    let client_id = source.client_id().to_owned();
    let closed = source.closed();
    let calls = Arc::new(AtomicU32::new(0));
    let effects = db.handler();
    let counter = calls.clone();
    let handle = Consumer::new(&name)
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
    let event = keyed("donor-7", 7);
    scope.publish(std::slice::from_ref(&event)).await;

    wait_handled(&handle, 1).await;
    let report = stop(handle, closed).await;
    assert_eq!((report.handled, report.retried), (1, 1), "{report:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        db.effects(&name).await,
        vec![(event.id(), "donor-7".to_owned(), 7)]
    );
    assert_all_acked(&client_id).await;
}

#[tokio::test]
async fn a_crash_between_commit_and_ack_is_redelivered_when_the_session_resumes_and_skipped() {
    let scope = Scope::new();
    let db = EffectsDb::new().await;
    let name = scope.group("crashy");
    let first = keyed("donor-9", 9);
    let second = keyed("donor-9", 10);

    // The first process: commits the effect, then dies before the ack.
    let (tx, mut committed) = tokio::sync::mpsc::unbounded_channel();
    let source = connect(scope.source_config(&name, "pod-a")).await;
    let client_id = source.client_id().to_owned();
    let closed = source.closed();
    let doomed = db
        .handler()
        .on_commit_then_hang(Consumer::new(&name), "DonorSecured", tx)
        .park_into(db.inbox.clone());
    let crashed = tokio::spawn(doomed.run(source, CancellationToken::new()));
    scope.publish(std::slice::from_ref(&first)).await;
    let id = tokio::time::timeout(WAIT, committed.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id, first.id());
    crashed.abort();
    assert!(crashed.await.unwrap_err().is_cancelled());
    wait_closed(closed).await;
    assert!(db.inbox.contains(&name, first.id()).await.unwrap());

    // Published while no instance of the group is connected: the broker
    // keeps it for the session.
    scope.publish(std::slice::from_ref(&second)).await;

    // The process starts again under the same instance name.
    let seen = Recorder::default();
    let recorder = seen.clone();
    let effects = db.handler();
    let source = connect(scope.source_config(&name, "pod-a")).await;
    assert_eq!(source.client_id(), client_id);
    let closed = source.closed();
    let handle = Consumer::new(&name)
        .on_event("DonorSecured", move |cx: Context<()>| {
            let effects = effects.clone();
            let recorder = recorder.clone();
            async move {
                let outcome = effects.apply(&cx).await?;
                recorder.push((cx.event.id(), cx.delivery_attempt, outcome));
                Ok(())
            }
        })
        .park_into(db.inbox.clone())
        .spawn(source)
        .unwrap();
    wait_handled(&handle, 2).await;
    let report = stop(handle, closed).await;
    assert_eq!((report.handled, report.ack_failures), (2, 0), "{report:?}");
    assert_eq!(
        seen.all(),
        vec![
            (first.id(), Some(2), Outcome::Duplicate),
            (second.id(), Some(1), Outcome::Applied),
        ],
        "the unacked event came again (flagged DUP) and was skipped; the kept one was handled"
    );
    let ns: Vec<i64> = db.effects(&name).await.iter().map(|e| e.2).collect();
    assert_eq!(ns, vec![9, 10], "one effect each, in order");
    assert_all_acked(&client_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_on_a_lost_connection_fails_and_the_redelivery_is_skipped() {
    let scope = Scope::new();
    let db = EffectsDb::new().await;
    let name = scope.group("cut");
    let proxy = FaultProxy::start(broker_addr()).await.unwrap();
    let source = connect(
        scope
            .source_config(&name, "c1")
            .with_url(format!("mqtt://{}", proxy.addr())),
    )
    .await;
    let client_id = source.client_id().to_owned();
    let closed = source.closed();

    // The first handling commits, then waits until the connection it came
    // on is gone before returning (and so before the ack).
    let release = Arc::new(tokio::sync::Notify::new());
    let (tx, mut committed) = tokio::sync::mpsc::unbounded_channel();
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Recorder::default();
    let (effects, recorder, gate, counter) =
        (db.handler(), seen.clone(), release.clone(), calls.clone());
    let handle = Consumer::new(&name)
        .on_event("DonorSecured", move |cx: Context<()>| {
            let (effects, recorder, gate, counter, tx) = (
                effects.clone(),
                recorder.clone(),
                gate.clone(),
                counter.clone(),
                tx.clone(),
            );
            async move {
                let outcome = effects.apply(&cx).await?;
                recorder.push((cx.event.id(), cx.delivery_attempt, outcome));
                if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                    let _ = tx.send(());
                    gate.notified().await;
                }
                Ok(())
            }
        })
        .outage_backoff(Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(100),
        ))
        .park_into(db.inbox.clone())
        .spawn(source)
        .unwrap();
    let event = keyed("donor-3", 3);
    scope.publish(std::slice::from_ref(&event)).await;
    tokio::time::timeout(WAIT, committed.recv())
        .await
        .unwrap()
        .unwrap();

    proxy.reset_all();
    wait_receive_error(&handle).await;
    release.notify_one();

    wait_handled(&handle, 2).await;
    let report = stop(handle, closed).await;
    assert_eq!(
        (report.handled, report.ack_failures),
        (2, 1),
        "the first ack failed: {report:?}"
    );
    assert!(report.receive_errors >= 1, "{report:?}");
    assert_eq!(
        seen.all(),
        vec![
            (event.id(), Some(1), Outcome::Applied),
            (event.id(), Some(2), Outcome::Duplicate),
        ],
        "redelivered on the resumed session, and skipped by the inbox"
    );
    assert_eq!(db.effects(&name).await.len(), 1);
    assert_all_acked(&client_id).await;
}

#[tokio::test]
async fn each_subject_keeps_its_order_under_concurrency_with_one_instance() {
    let scope = Scope::new();
    let db = EffectsDb::new().await;
    const SUBJECTS: u64 = 5;
    const PER_SUBJECT: u64 = 12;
    let name = scope.group("ordered");
    let source = connect(scope.source_config(&name, "c1")).await;
    let client_id = source.client_id().to_owned();
    let closed = source.closed();
    let effects = db.handler();
    let in_flight = InFlight::default();
    let tracker = in_flight.clone();
    let handle = Consumer::new(&name)
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
    scope.publish(&round_robin(SUBJECTS, PER_SUBJECT)).await;

    db.wait_effects(&name, usize::try_from(SUBJECTS * PER_SUBJECT).unwrap())
        .await;
    let report = stop(handle, closed).await;
    assert_eq!(report.handled, SUBJECTS * PER_SUBJECT, "{report:?}");
    assert_eq!(report.parked, 0, "{report:?}");
    db.assert_order_per_subject(&name, SUBJECTS, PER_SUBJECT)
        .await;
    assert!(in_flight.peak() > 1, "subjects were handled concurrently");
    assert!(in_flight.peak() <= 8, "at most 8 at once");
    assert_all_acked(&client_id).await;
}

#[tokio::test]
async fn two_groups_each_get_every_event() {
    let scope = Scope::new();
    let db = EffectsDb::new().await;
    let names = [scope.group("receipts"), scope.group("thank-you")];
    let mut running = Vec::new();
    for name in &names {
        let source = connect(scope.source_config(name, "c1")).await;
        let client_id = source.client_id().to_owned();
        let closed = source.closed();
        let handle = db
            .handler()
            .consumer(name, "DonorSecured")
            .spawn(source)
            .unwrap();
        running.push((name, client_id, handle, closed));
    }
    let events = distinct_events(6);
    scope.publish(&events).await;

    for (name, client_id, handle, closed) in running {
        wait_handled(&handle, 6).await;
        let report = stop(handle, closed).await;
        assert_eq!(report.handled, 6, "{name}: {report:?}");
        db.assert_each_once(name, &events).await;
        assert_eq!(db.effects(name).await.len(), 6);
        assert_all_acked(&client_id).await;
    }
}

#[tokio::test]
async fn instances_of_one_group_share_its_events() {
    let scope = Scope::new();
    let db = EffectsDb::new().await;
    let name = scope.group("shared");
    let mut running = Vec::new();
    for instance in ["a", "b"] {
        let source = connect(scope.source_config(&name, instance)).await;
        let client_id = source.client_id().to_owned();
        let closed = source.closed();
        let handle = db
            .handler()
            .consumer(&name, "DonorSecured")
            .spawn(source)
            .unwrap();
        running.push((client_id, handle, closed));
    }
    let events = distinct_events(10);
    scope.publish(&events).await;

    db.wait_effects(&name, 10).await;
    db.assert_each_once(&name, &events).await;
    let mut handled = Vec::new();
    for (client_id, handle, closed) in running {
        let report = stop(handle, closed).await;
        handled.push(report.handled);
        assert_all_acked(&client_id).await;
    }
    assert_eq!(handled.iter().sum::<u64>(), 10, "{handled:?}");
    assert!(
        handled.iter().all(|&n| n > 0),
        "both instances got a share: {handled:?}"
    );
}

#[tokio::test]
async fn an_undecodable_message_is_parked_with_its_payload_and_acked() {
    let scope = Scope::new();
    let db = EffectsDb::new().await;
    let name = scope.group("strict");
    let source = connect(scope.source_config(&name, "c1")).await;
    let client_id = source.client_id().to_owned();
    let closed = source.closed();
    let handle = db
        .handler()
        .consumer(&name, "DonorSecured")
        .spawn(source)
        .unwrap();
    let topic = format!("{}/Garbage", scope.prefix);
    publish_raw(&topic, b"{oops").await;
    // A good event after it still goes through.
    scope.publish(&[keyed("donor-1", 1)]).await;

    let parked = db.wait_parked(&name, 1).await;
    wait_handled(&handle, 1).await;
    let report = stop(handle, closed).await;
    assert_eq!((report.parked, report.handled), (1, 1), "{report:?}");
    assert_eq!(parked.len(), 1);
    let entry = &parked[0];
    assert_eq!(entry.event, None);
    assert_eq!(entry.attempts, 0);
    assert_eq!(entry.raw, b"{oops");
    assert!(entry.reason.contains("undecodable"), "{}", entry.reason);
    assert!(entry.reason.contains(&topic), "{}", entry.reason);
    assert_eq!(db.effects(&name).await.len(), 1);
    assert_all_acked(&client_id).await;
}

#[tokio::test]
async fn qos_2_handles_each_event_once() {
    let scope = Scope::new();
    let db = EffectsDb::new().await;
    let name = scope.group("exactly");
    let source = connect(scope.source_config(&name, "c1").with_qos(2)).await;
    let client_id = source.client_id().to_owned();
    let closed = source.closed();
    let handle = db
        .handler()
        .consumer(&name, "DonorSecured")
        .spawn(source)
        .unwrap();
    let events = round_robin(3, 5);
    scope
        .publish_with(scope.publisher_config().with_qos(2), &events)
        .await;

    wait_handled(&handle, 15).await;
    let report = stop(handle, closed).await;
    assert_eq!((report.handled, report.ack_failures), (15, 0), "{report:?}");
    db.assert_each_once(&name, &events).await;
    db.assert_order_per_subject(&name, 3, 5).await;
    assert_all_acked(&client_id).await;
}

/// A process that acked a QoS 2 message (PUBREC) and died before answering
/// the broker's PUBREL leaves the PUBREL in its session: the next run gets
/// it first thing, and must answer it instead of dropping the connection
/// over it (rumqttc's own reaction) again and again.
#[tokio::test]
async fn a_qos_2_handshake_left_open_by_a_crash_is_finished_by_the_next_run() {
    let scope = Scope::new();
    let db = EffectsDb::new().await;
    let name = scope.group("half-done");
    let config = scope.source_config(&name, "c1").with_qos(2);
    let client_id = config.client_id();
    let publisher = scope.publisher_config().with_qos(2);

    // The crashed run, played by a bare client with the source's session.
    let addr = broker_addr();
    let mut options = MqttOptions::new(&client_id, addr.ip().to_string(), addr.port());
    options
        .set_clean_start(false)
        .set_manual_acks(true)
        .set_session_expiry_interval(Some(30))
        .set_max_packet_size(Some(1 << 20));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client
        .subscribe(config.shared_filters()[0].clone(), QoS::ExactlyOnce)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let MqttEvent::Incoming(Packet::SubAck(_)) = eventloop.poll().await.unwrap() {
                break;
            }
        }
    })
    .await
    .expect("SUBACK within 5 s");
    scope
        .publish_with(publisher.clone(), &[keyed("donor-1", 1)])
        .await;
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await.unwrap() {
                MqttEvent::Incoming(Packet::Publish(p)) => client.try_ack(&p).unwrap(),
                // The PUBREC is out: die before the PUBREL is answered.
                MqttEvent::Outgoing(proclaim_mqtt::rumqttc::Outgoing::PubRec(_)) => break,
                _ => {}
            }
        }
    })
    .await
    .expect("a QoS 2 message within 5 s");
    drop((client, eventloop));

    // The next run resumes the session, with the PUBREL still due.
    let source = connect(config).await;
    let closed = source.closed();
    let handle = db
        .handler()
        .consumer(&name, "DonorSecured")
        .spawn(source)
        .unwrap();
    let event = keyed("donor-2", 2);
    scope
        .publish_with(publisher, std::slice::from_ref(&event))
        .await;
    wait_handled(&handle, 1).await;
    let report = stop(handle, closed).await;
    assert_eq!(
        (report.handled, report.receive_errors, report.ack_failures),
        (1, 0, 0),
        "the connection held: {report:?}"
    );
    assert_eq!(db.effects(&name).await.len(), 1);
    assert_all_acked(&client_id).await;
}

#[tokio::test]
async fn a_lost_connection_is_a_receive_error_and_the_source_reconnects() {
    let scope = Scope::new();
    let db = EffectsDb::new().await;
    let name = scope.group("survivor");
    let proxy = FaultProxy::start(broker_addr()).await.unwrap();
    let source = connect(
        scope
            .source_config(&name, "c1")
            .with_url(format!("mqtt://{}", proxy.addr())),
    )
    .await;
    let client_id = source.client_id().to_owned();
    let closed = source.closed();
    let handle = db
        .handler()
        .consumer(&name, "DonorSecured")
        .outage_backoff(Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(100),
        ))
        .spawn(source)
        .unwrap();
    let first = keyed("donor-1", 1);
    scope.publish(std::slice::from_ref(&first)).await;
    db.wait_effects(&name, 1).await;

    proxy.reset_all();
    wait_receive_error(&handle).await;
    // Published around the reconnection: kept by the session if it comes
    // while the instance is away.
    let second = keyed("donor-2", 2);
    scope.publish(std::slice::from_ref(&second)).await;
    db.wait_effects(&name, 2).await;
    let report = stop(handle, closed).await;
    assert_eq!(report.handled, 2, "{report:?}");
    assert!(report.receive_errors >= 1, "{report:?}");
    let ids: Vec<_> = db.effects(&name).await.into_iter().map(|e| e.0).collect();
    assert_eq!(ids, vec![first.id(), second.id()]);
    assert_all_acked(&client_id).await;
}

#[tokio::test]
async fn invalid_settings_and_unreachable_brokers_fail_connect() {
    let valid = MqttSourceConfig::new("g", "i").with_url(format!("mqtt://{}", broker_addr()));
    for config in [
        valid.clone().with_qos(0),
        valid.clone().with_group(""),
        valid.clone().with_group("a/b"),
        valid.clone().with_instance(""),
        valid.clone().with_filter("a/#/b"),
        valid.clone().with_filter("$SYS/#"),
        valid.clone().with_url("mqtts://127.0.0.1:1"),
        valid.clone().with_session_expiry(Duration::ZERO),
        valid.clone().with_receive_maximum(0),
    ] {
        let err = MqttSource::connect(config.clone()).await.unwrap_err();
        assert!(matches!(err, MqttError::Config(_)), "{config:?}: {err:?}");
    }

    let started = Instant::now();
    let config = MqttSourceConfig::new("g", "i")
        .with_url("mqtt://relay:s3cret@127.0.0.1:1")
        .with_connect_timeout(Duration::from_secs(2));
    let err = MqttSource::connect(config).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        err.to_string(),
        "cannot connect to MQTT broker at mqtt://***@127.0.0.1:1: connection refused"
    );
}
