//! The publisher conformance suite: one set of generic tests that every
//! publisher runs, unchanged, against its real broker on this machine.
//!
//! A publisher crate implements [`PublisherHarness`] in its integration tests
//! and stamps the suite with [`publisher_conformance!`]:
//!
//! ```ignore
//! struct Rabbit { /* a queue of its own, the publisher */ }
//! impl proclaim_testkit::publisher_conformance::PublisherHarness for Rabbit { /* … */ }
//! proclaim_testkit::publisher_conformance!(Rabbit);
//! ```
//!
//! Broker outages are simulated with the fault proxy ([`crate::proxy`]) in
//! front of the real broker, so tests running in parallel never take the
//! shared broker down. [`PublisherCapabilities`] relax what a broker cannot
//! do (only some brokers drop a repeated message by its id).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proclaim_core::{Event, PublishError, Publisher};

use crate::events::{donor_secured, keyed, n_of, record_at};
use crate::proxy::{FaultMode, FaultProxy};

/// What a broker can do; the suite skips or relaxes the rest.
#[derive(Debug, Clone, Copy)]
pub struct PublisherCapabilities {
    /// The broker drops a second message with the same dedup id (JetStream's
    /// `Nats-Msg-Id` within its window). Without it, both arrive, each
    /// carrying the id so that consumers can deduplicate.
    pub broker_dedup: bool,
    /// The harness can name an event the destination cannot route
    /// ([`PublisherHarness::unroutable`]).
    pub unroutable: bool,
}

/// One message as the destination holds it, decoded back.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// The CloudEvent the message carries.
    pub event: Event,
    /// The id a consumer deduplicates by, as the broker carries it (a header,
    /// a field, a message id).
    pub dedup_id: Option<String>,
}

/// How the suite drives one publisher. Every `setup` gives a destination of
/// its own (stream, queue, key prefix, topic, …) that is removed when the
/// harness drops.
pub trait PublisherHarness: Send + Sync + Sized + 'static {
    /// The publisher under test.
    type Publisher: Publisher;

    /// What the broker can do.
    const CAPABILITIES: PublisherCapabilities;

    /// The address of the real broker on this machine.
    fn broker() -> SocketAddr;

    /// A fresh destination and a publisher to it that reaches the broker at
    /// `via` (the broker itself, or a fault proxy in front of it). The
    /// publisher's own timeouts (connect, ack) must be at most `timeout`.
    fn setup(via: SocketAddr, timeout: Duration) -> impl Future<Output = Self> + Send;

    /// The publisher.
    fn publisher(&self) -> &Self::Publisher;

    /// Another publisher to the same destination through `via`, with the
    /// same timeouts; `Err` with the error's text if it cannot connect.
    fn connect(
        &self,
        via: SocketAddr,
    ) -> impl Future<Output = Result<Self::Publisher, String>> + Send;

    /// What the destination holds, decoded, in the broker's order, once it
    /// holds at least `n` messages or `wait` has passed.
    fn received(&self, n: usize, wait: Duration) -> impl Future<Output = Vec<Delivered>> + Send;

    /// An event this destination cannot route (with the `unroutable`
    /// capability).
    fn unroutable(&self) -> Option<Event> {
        None
    }
}

/// The publisher's own timeout in these tests.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long the suite waits for a publish that must fail before it calls it
/// a hang: the publisher's timeout and some slack for a slow machine.
const HANG: Duration = Duration::from_secs(12);
/// How long messages may take to show up.
const WAIT: Duration = Duration::from_secs(15);

async fn started_proxy<H: PublisherHarness>() -> FaultProxy {
    FaultProxy::start(H::broker())
        .await
        .expect("start the fault proxy")
}

/// Publishes, expecting a failure within [`HANG`]; returns it.
async fn publish_fails<P: Publisher>(publisher: &P, event: Event, what: &str) -> PublishError {
    let started = Instant::now();
    match tokio::time::timeout(HANG, publisher.publish(&record_at(2, event))).await {
        Ok(Ok(())) => panic!("{what}: publish returned Ok, but the broker cannot hold it"),
        Ok(Err(e)) => {
            tracing::info!(elapsed = ?started.elapsed(), error = %e.full_message(), "{what}");
            e
        }
        Err(_) => {
            panic!("{what}: publish hung for {HANG:?} (the publisher's timeout is {TIMEOUT:?})")
        }
    }
}

/// An acked event arrives once, with its CloudEvents attributes, extensions,
/// data bytes and dedup id intact.
pub async fn an_acked_event_arrives_intact<H: PublisherHarness>() {
    crate::init_tracing();
    let h = H::setup(H::broker(), TIMEOUT).await;
    let sent = donor_secured();
    h.publisher().ready().await.unwrap();
    h.publisher()
        .publish(&record_at(1, sent.clone()))
        .await
        .unwrap();
    let got = h.received(1, WAIT).await;
    assert_eq!(got.len(), 1, "exactly one message: {got:?}");
    let got = &got[0];
    let e = &got.event;
    assert_eq!(e.id(), sent.id());
    assert_eq!(e.event_type(), sent.event_type());
    assert_eq!(e.source(), sent.source());
    assert_eq!(e.subject(), sent.subject());
    assert_eq!(e.time(), sent.time());
    assert_eq!(e.datacontenttype(), sent.datacontenttype());
    assert_eq!(e.dataschema(), sent.dataschema());
    assert_eq!(e.data().get(), sent.data().get(), "data bytes unchanged");
    let expected: BTreeMap<String, String> = sent.metadata().clone();
    assert_eq!(e.metadata(), &expected, "extensions");
    assert_eq!(
        got.dedup_id.as_deref(),
        Some(sent.id().to_string().as_str())
    );
}

/// Events of one key published one after another arrive in that order, while
/// other keys are published concurrently.
pub async fn per_key_order_is_kept<H: PublisherHarness>() {
    crate::init_tracing();
    let h = H::setup(H::broker(), TIMEOUT).await;
    let keys = ["k-a", "k-b", "k-c"];
    let per_key = 20_u64;
    let publisher = h.publisher();
    let lanes = keys.iter().enumerate().map(|(i, key)| async move {
        for n in 0..per_key {
            let sequence = i64::try_from(n).unwrap() * 3 + i64::try_from(i).unwrap();
            publisher
                .publish(&record_at(sequence, keyed(key, n)))
                .await
                .unwrap();
        }
    });
    futures::future::join_all(lanes).await;
    let total = keys.len() * usize::try_from(per_key).unwrap();
    let got = h.received(total, WAIT).await;
    assert_eq!(got.len(), total);
    for key in keys {
        let order: Vec<u64> = got
            .iter()
            .filter(|d| d.event.subject() == key)
            .map(|d| n_of(&d.event))
            .collect();
        assert_eq!(order, (0..per_key).collect::<Vec<_>>(), "order of {key}");
    }
}

/// The same event published twice (a relay's redelivery) reaches the
/// consumer once where the broker deduplicates, else twice with one dedup id.
pub async fn a_redelivery_carries_the_same_dedup_id<H: PublisherHarness>() {
    crate::init_tracing();
    let h = H::setup(H::broker(), TIMEOUT).await;
    let event = keyed("k", 1);
    h.publisher()
        .publish(&record_at(1, event.clone()))
        .await
        .unwrap();
    h.publisher()
        .publish(&record_at(1, event.clone()))
        .await
        .unwrap();
    let expected = if H::CAPABILITIES.broker_dedup { 1 } else { 2 };
    // Wait for one more than expected, to see an extra copy if there is one.
    let got = h.received(expected + 1, Duration::from_secs(2)).await;
    assert_eq!(got.len(), expected, "{got:?}");
    let id = event.id().to_string();
    assert!(
        got.iter()
            .all(|d| d.dedup_id.as_deref() == Some(id.as_str()))
    );
}

/// A broker that refuses connections (down, restarting) gives a transient
/// error within the publisher's timeout, never a hang and never `Ok`; once
/// it is back, the same publisher delivers again without being rebuilt.
pub async fn an_outage_is_transient_and_the_publisher_reconnects<H: PublisherHarness>() {
    crate::init_tracing();
    let proxy = started_proxy::<H>().await;
    let h = H::setup(proxy.addr(), TIMEOUT).await;
    h.publisher()
        .publish(&record_at(1, keyed("k", 1)))
        .await
        .unwrap();

    proxy.set_mode(FaultMode::Refuse);
    let err = publish_fails(h.publisher(), keyed("k", 2), "broker down").await;
    assert!(err.is_transient(), "an outage is transient: {err:?}");

    proxy.set_mode(FaultMode::Pass);
    let back = crate::eventually_value(Duration::from_secs(30), "publishing works again", || {
        let publisher = h.publisher();
        async move {
            match publisher.publish(&record_at(3, keyed("k", 3))).await {
                Ok(()) => Some(()),
                Err(e) => {
                    assert!(e.is_transient(), "while reconnecting: {e:?}");
                    None
                }
            }
        }
    })
    .await;
    let () = back;
    let got = h.received(2, WAIT).await;
    let ns: Vec<u64> = got.iter().map(|d| n_of(&d.event)).collect();
    assert!(ns.contains(&1) && ns.contains(&3), "{ns:?}");
}

/// A broker that accepts bytes but never answers (a partition) gives a
/// transient error within the publisher's timeout, never a hang.
pub async fn a_broker_that_never_answers_is_a_transient_error<H: PublisherHarness>() {
    crate::init_tracing();
    let proxy = started_proxy::<H>().await;
    let h = H::setup(proxy.addr(), TIMEOUT).await;
    h.publisher()
        .publish(&record_at(1, keyed("k", 1)))
        .await
        .unwrap();
    proxy.set_mode(FaultMode::Blackhole);
    let err = publish_fails(h.publisher(), keyed("k", 2), "broker silent").await;
    assert!(err.is_transient(), "a partition is transient: {err:?}");
    proxy.set_mode(FaultMode::Pass);
}

/// Connecting to an address where no broker listens fails with an error
/// within the timeout (or gives a publisher whose publish fails transiently).
pub async fn an_unreachable_broker_fails_fast<H: PublisherHarness>() {
    crate::init_tracing();
    let h = H::setup(H::broker(), TIMEOUT).await;
    // A port that was just free: nothing listens there.
    let addr = crate::net::free_addr();
    match tokio::time::timeout(HANG, h.connect(addr)).await {
        Err(_) => panic!("connecting to {addr} hung for {HANG:?}"),
        Ok(Err(message)) => {
            assert!(!message.is_empty());
            tracing::info!(%message, "connect refused");
        }
        Ok(Ok(publisher)) => {
            let err = publish_fails(&publisher, keyed("k", 1), "no broker").await;
            assert!(err.is_transient(), "{err:?}");
        }
    }
}

/// An event the broker cannot route is an error, never a silent success.
pub async fn an_unroutable_event_is_an_error<H: PublisherHarness>() {
    crate::init_tracing();
    if !H::CAPABILITIES.unroutable {
        return;
    }
    let h = H::setup(H::broker(), TIMEOUT).await;
    let event = h
        .unroutable()
        .expect("the unroutable capability needs an unroutable event");
    let err = publish_fails(h.publisher(), event, "unroutable").await;
    tracing::info!(error = %err.full_message(), transient = err.is_transient(), "unroutable");
}

/// Stamps every publisher conformance case as a `#[tokio::test]` for a
/// harness type, in a module named `publisher_conformance` or the one given.
#[macro_export]
macro_rules! publisher_conformance {
    ($harness:ty) => {
        $crate::publisher_conformance!($harness, publisher_conformance);
    };
    ($harness:ty, $module:ident) => {
        $crate::publisher_conformance!(@cases $harness; $module;
            an_acked_event_arrives_intact,
            per_key_order_is_kept,
            a_redelivery_carries_the_same_dedup_id,
            an_outage_is_transient_and_the_publisher_reconnects,
            a_broker_that_never_answers_is_a_transient_error,
            an_unreachable_broker_fails_fast,
            an_unroutable_event_is_an_error,
        );
    };
    (@cases $harness:ty; $module:ident; $($case:ident),* $(,)?) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    $crate::publisher_conformance::$case::<$harness>().await;
                }
            )*
        }
    };
}
