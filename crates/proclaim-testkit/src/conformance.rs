//! The store conformance suite: one set of generic tests that every outbox
//! store runs, unchanged, against its real database.
//!
//! A store crate implements [`StoreHarness`] in its integration tests and
//! stamps the suite with [`store_conformance!`]:
//!
//! ```ignore
//! struct Pg { /* a fresh schema, the store */ }
//! impl proclaim_testkit::conformance::StoreHarness for Pg { /* … */ }
//! proclaim_testkit::store_conformance!(Pg);
//! ```
//!
//! [`Capabilities`] relax what a database cannot do (SQLite has one writer at
//! a time, so a transaction can never commit "late" there).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use proclaim_core::{
    AckMode, BatchOutcome, ClaimedBatch, DeadLetter, Event, LeaseToken, OutboxAdmin, OutboxStore,
    Retry, StoreError,
};

use proclaim_core::fanout::Stage;

use crate::eventually_value;

/// What a store's database can do; the suite skips or relaxes the rest.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// Several write transactions can be open at once, so one that started
    /// first can commit last (PostgreSQL, MySQL; not SQLite).
    pub concurrent_writers: bool,
}

/// A transaction left open by [`StoreHarness::write_open`].
pub trait OpenTransaction: Send {
    /// Commits it.
    fn commit(self: Box<Self>) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// How the suite drives one store. Every `setup` gives a store of its own
/// (own schema, own database file, …) that is removed when the harness drops.
pub trait StoreHarness: Send + Sync + Sized + 'static {
    /// The store under test.
    type Store: OutboxStore + OutboxAdmin + Stage + Clone;

    /// What the database can do.
    const CAPABILITIES: Capabilities;

    /// A fresh, migrated store.
    fn setup() -> impl Future<Output = Self> + Send;

    /// The store.
    fn store(&self) -> Self::Store;

    /// The same outbox through another connection pool (another process).
    fn second_store(&self) -> impl Future<Output = Self::Store> + Send;

    /// Writes `events` with the store's `enqueue` inside one business
    /// transaction that also inserts a row of its own, then commits it or
    /// rolls it back.
    fn write(&self, events: &[Event], commit: bool) -> impl Future<Output = ()> + Send;

    /// Writes `events` in a transaction that stays open until the returned
    /// handle commits it (only called with `concurrent_writers`).
    fn write_open(&self, events: &[Event])
    -> impl Future<Output = Box<dyn OpenTransaction>> + Send;

    /// Builds a store on the same database with these schema and table names
    /// (stores without schemas may ignore `schema`); must fail with
    /// [`StoreError::Config`] for names that are not plain identifiers.
    fn named(&self, schema: &str, table: &str) -> Result<Self::Store, StoreError>;
}

const LEASE: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(20);

/// An event of type `DonorSecured` on `subject` whose data is `{"n": n}`.
pub fn numbered(subject: &str, n: u64) -> Event {
    Event::builder("DonorSecured")
        .subject(subject)
        .source("conformance")
        .data(&serde_json::json!({ "n": n }))
        .build()
        .unwrap()
}

/// The `n` of each claimed record, in claim order.
pub fn numbers(batch: &ClaimedBatch) -> Vec<u64> {
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

async fn claim<S: OutboxStore>(store: &S, limit: usize) -> ClaimedBatch {
    store.claim(LeaseToken::new(), limit, LEASE).await.unwrap()
}

/// Claims until something comes back (e.g. after a retry delay or an expired lease).
async fn claim_eventually<S: OutboxStore + Clone>(store: &S, what: &str) -> ClaimedBatch {
    eventually_value(WAIT, what, || {
        let store = store.clone();
        async move {
            let b = claim(&store, 100).await;
            (!b.is_empty()).then_some(b)
        }
    })
    .await
}

/// G1: a rolled-back transaction leaves no event; a committed one does.
pub async fn rollback_leaves_no_event<H: StoreHarness>() {
    let h = H::setup().await;
    let store = h.store();
    h.write(&[numbered("donor-1", 1)], false).await;
    h.write(&[numbered("donor-2", 2), numbered("donor-2", 3)], false)
        .await;
    h.write(&[numbered("donor-3", 4)], true).await;
    let batch = claim(&store, 100).await;
    assert_eq!(numbers(&batch), vec![4]);
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.in_flight), (0, 1));
}

/// An event comes back from the store exactly as written.
pub async fn stored_event_round_trips<H: StoreHarness>() {
    let h = H::setup().await;
    let original = Event::builder("DonorSecured")
        .subject("donor-9")
        .source("campaign-finance")
        .dataschema("urn:donor-secured:v2")
        .json(r#"{ "b": 1,   "a": [1, 2.50], "s": "ünïcødé \"q\"" }"#)
        .correlation_id("drive-7")
        .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .build()
        .unwrap();
    h.write(std::slice::from_ref(&original), true).await;
    let batch = claim(&h.store(), 10).await;
    let back = &batch.records[0];
    assert_eq!(back.event.id(), original.id());
    assert_eq!(back.event.event_type(), original.event_type());
    assert_eq!(back.event.source(), original.source());
    assert_eq!(back.event.subject(), original.subject());
    assert_eq!(
        back.event.time().timestamp_micros(),
        original.time().timestamp_micros()
    );
    assert_eq!(back.event.dataschema(), original.dataschema());
    assert_eq!(
        back.event.data().get(),
        original.data().get(),
        "payload bytes kept verbatim"
    );
    assert_eq!(back.event.metadata(), original.metadata());
    assert_eq!(back.attempts, 1);
}

/// Watermill #311: a transaction that took its sequence first but commits
/// last is still claimed.
pub async fn late_commit_is_not_skipped<H: StoreHarness>() {
    if !H::CAPABILITIES.concurrent_writers {
        return;
    }
    let h = H::setup().await;
    let store = h.store();
    let late = h.write_open(&[numbered("a", 1)]).await;
    h.write(&[numbered("b", 2)], true).await;
    let first = claim(&store, 100).await;
    assert_eq!(numbers(&first), vec![2]);
    late.commit().await;
    let second = claim(&store, 100).await;
    assert_eq!(
        numbers(&second),
        vec![1],
        "the late commit must still be claimed"
    );
}

/// Events of one transaction keep their order; claims return sequence order.
pub async fn claims_come_in_write_order<H: StoreHarness>() {
    let h = H::setup().await;
    let events: Vec<Event> = (0..50)
        .map(|n| numbered(&format!("k{}", n % 3), n))
        .collect();
    h.write(&events, true).await;
    let batch = claim(&h.store(), 100).await;
    assert_eq!(numbers(&batch), (0..50).collect::<Vec<_>>());
    let sequences: Vec<i64> = batch.records.iter().map(|r| r.sequence).collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]));
}

/// G4: nothing later of a subject is claimed while an earlier event of it is
/// leased or waiting for a retry; other subjects flow.
pub async fn claims_respect_per_subject_order<H: StoreHarness>() {
    let h = H::setup().await;
    let store = h.store();
    h.write(
        &[
            numbered("k", 1),
            numbered("k", 2),
            numbered("other", 3),
            numbered("k", 4),
        ],
        true,
    )
    .await;
    let a = LeaseToken::new();
    let first = store.claim(a, 1, LEASE).await.unwrap();
    assert_eq!(numbers(&first), vec![1]);
    let second = claim(&store, 100).await;
    assert_eq!(
        numbers(&second),
        vec![3],
        "k is leased; only other subjects may go"
    );

    let outcome = BatchOutcome {
        retry: vec![Retry {
            sequence: first.records[0].sequence,
            delay: Duration::from_millis(400),
            error: "broker said no".into(),
        }],
        ..Default::default()
    };
    store.complete(a, &outcome, AckMode::Delete).await.unwrap();
    let blocked = claim(&store, 100).await;
    assert!(
        blocked.is_empty(),
        "k waits behind its failing head: {:?}",
        numbers(&blocked)
    );

    let again = claim_eventually(&store, "the retry becomes due").await;
    assert_eq!(numbers(&again), vec![1, 2, 4]);
    assert_eq!(again.records[0].attempts, 2);
}

/// Ack, retry, dead letter and release each do what they say, only under the
/// claim's token (fencing); dead letters are listed and replayable.
pub async fn outcomes_and_fencing<H: StoreHarness>() {
    let h = H::setup().await;
    let store = h.store();
    h.write(
        &[
            numbered("a", 1),
            numbered("b", 2),
            numbered("c", 3),
            numbered("d", 4),
        ],
        true,
    )
    .await;
    let token = LeaseToken::new();
    let batch = store.claim(token, 100, LEASE).await.unwrap();
    let seq: Vec<i64> = batch.records.iter().map(|r| r.sequence).collect();
    assert_eq!(seq.len(), 4);

    let stale = BatchOutcome {
        published: seq.clone(),
        ..Default::default()
    };
    let report = store
        .complete(LeaseToken::new(), &stale, AckMode::Delete)
        .await
        .unwrap();
    assert_eq!(
        (report.applied, report.lost),
        (0, 4),
        "a stale token applies nothing"
    );

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
    let report = store
        .complete(token, &outcome, AckMode::Delete)
        .await
        .unwrap();
    assert_eq!((report.applied, report.lost), (4, 0));

    let stats = store.stats().await.unwrap();
    assert_eq!(stats.pending, 2, "retrying + released");
    assert_eq!(stats.in_flight, 0);
    assert_eq!(stats.dead_lettered, 1);
    assert_eq!(stats.published_retained, 0, "published rows are deleted");
    let dead = store.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_error, "poisonwith nul");
    assert_eq!(dead[0].subject, "c");
    assert_eq!(dead[0].attempts, 1);

    let next = claim(&store, 100).await;
    assert_eq!(
        numbers(&next),
        vec![4],
        "released comes back; the retry waits an hour"
    );
    assert_eq!(next.records[0].attempts, 1, "a release counts no attempt");

    assert_eq!(store.replay_dead_letters(None).await.unwrap(), 1);
    let replayed = claim(&store, 100).await;
    assert_eq!(numbers(&replayed), vec![3]);
    assert_eq!(store.stats().await.unwrap().dead_lettered, 0);
}

/// Replay by id puts back only the named dead letters.
pub async fn replay_by_id<H: StoreHarness>() {
    let h = H::setup().await;
    let store = h.store();
    let events = [numbered("a", 1), numbered("b", 2)];
    h.write(&events, true).await;
    let token = LeaseToken::new();
    let batch = store.claim(token, 10, LEASE).await.unwrap();
    let dead = batch
        .records
        .iter()
        .map(|r| DeadLetter {
            sequence: r.sequence,
            error: "x".into(),
        })
        .collect();
    store
        .complete(
            token,
            &BatchOutcome {
                dead,
                ..Default::default()
            },
            AckMode::Delete,
        )
        .await
        .unwrap();
    let replayed = store
        .replay_dead_letters(Some(&[events[1].id()]))
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    assert_eq!(numbers(&claim(&store, 10).await), vec![2]);
    assert_eq!(store.stats().await.unwrap().dead_lettered, 1);
}

/// A relay that dies holds its events only until the lease expires.
pub async fn expired_lease_is_reclaimed<H: StoreHarness>() {
    let h = H::setup().await;
    let store = h.store();
    h.write(&[numbered("a", 1), numbered("a", 2)], true).await;
    let dead_relay = store
        .claim(LeaseToken::new(), 100, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(dead_relay.len(), 2);
    assert!(claim(&store, 100).await.is_empty());
    let taken_over = claim_eventually(&store, "the lease expires").await;
    assert_eq!(numbers(&taken_over), vec![1, 2]);
    assert!(taken_over.records.iter().all(|r| r.attempts == 2));
}

/// Concurrent claimers (two pools, six tasks) never get the same event,
/// together get every event, and "publish" each subject's events in write
/// order (G4 across relays: a subject's next event is claimable only once the
/// one before it is acknowledged).
pub async fn concurrent_claimers_never_overlap<H: StoreHarness>() {
    let h = H::setup().await;
    let events: Vec<Event> = (0..1000)
        .map(|n| numbered(&format!("k{}", n % 97), n))
        .collect();
    for chunk in events.chunks(250) {
        h.write(chunk, true).await;
    }
    let stores = [h.store(), h.second_store().await];
    let published_log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let store = stores[i % 2].clone();
        let published_log = published_log.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let token = LeaseToken::new();
                let batch = store.claim(token, 37, LEASE).await.unwrap();
                if batch.is_empty() {
                    let s = store.stats().await.unwrap();
                    if s.pending + s.in_flight == 0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                let published: Vec<i64> = batch.records.iter().map(|r| r.sequence).collect();
                seen.extend(batch.records.iter().map(|r| r.event.id()));
                {
                    let mut log = published_log.lock().unwrap();
                    for (record, n) in batch.records.iter().zip(numbers(&batch)) {
                        log.push((record.event.subject().to_owned(), n));
                    }
                }
                let outcome = BatchOutcome {
                    published,
                    ..Default::default()
                };
                let report = store
                    .complete(token, &outcome, AckMode::Delete)
                    .await
                    .unwrap();
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
    assert_eq!(all.len(), 1000, "every event claimed exactly once");
    assert_eq!(unique.len(), 1000);
    let mut last: std::collections::HashMap<String, u64> = Default::default();
    for (subject, n) in published_log.lock().unwrap().iter() {
        if let Some(before) = last.insert(subject.clone(), *n) {
            assert!(
                before < *n,
                "subject {subject}: {n} published after {before}"
            );
        }
    }
}

/// G7: with retention, published rows stay (not claimable) until purged.
pub async fn retention_purge<H: StoreHarness>() {
    let h = H::setup().await;
    let store = h.store();
    h.write(&[numbered("a", 1), numbered("b", 2)], true).await;
    let token = LeaseToken::new();
    let batch = store.claim(token, 10, LEASE).await.unwrap();
    let outcome = BatchOutcome {
        published: batch.records.iter().map(|r| r.sequence).collect(),
        ..Default::default()
    };
    store
        .complete(token, &outcome, AckMode::Retain)
        .await
        .unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.published_retained), (0, 2));
    assert!(claim(&store, 10).await.is_empty());
    assert_eq!(
        store
            .purge_published(Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    let purged = eventually_value(WAIT, "retained rows age past 50ms", || {
        let store = store.clone();
        async move {
            let n = store
                .purge_published(Duration::from_millis(50))
                .await
                .unwrap();
            (n > 0).then_some(n)
        }
    })
    .await;
    assert_eq!(purged, 2);
    assert_eq!(store.stats().await.unwrap().published_retained, 0);
}

/// Schema and table names that are not plain identifiers are refused.
pub async fn identifiers_reject_injection<H: StoreHarness>() {
    let h = H::setup().await;
    for (schema, table) in [
        ("public; DROP TABLE x", "outbox"),
        ("proclaim", "outbox\" CASCADE --"),
        ("proclaim", "outbox`; DROP TABLE x; --"),
        ("Proclaim", "outbox"),
        ("proclaim", ""),
        ("proclaim", "1outbox"),
    ] {
        let err = h.named(schema, table).err();
        assert!(
            matches!(err, Some(StoreError::Config(_))),
            "{schema}.{table}: {err:?}"
        );
    }
    assert!(h.named("proclaim_ok", "outbox_ok").is_ok());
}

/// `migrate` is idempotent, also when run concurrently; `verify_schema`
/// explains a missing table.
pub async fn migrate_is_idempotent<H: StoreHarness>() {
    let h = H::setup().await;
    let fresh = h.named("proclaim_fresh", "never_migrated").unwrap();
    let err = fresh.verify_schema().await.unwrap_err();
    assert!(err.to_string().contains("proclaim migrate"), "{err}");
    let store = h.store();
    let (a, b) = tokio::join!(store.migrate(), store.migrate());
    a.unwrap();
    b.unwrap();
    store.verify_schema().await.unwrap();
}

/// Stats count pending, in-flight and the age of the oldest undelivered event.
pub async fn stats_count_what_is_there<H: StoreHarness>() {
    let h = H::setup().await;
    let store = h.store();
    let empty = store.stats().await.unwrap();
    assert_eq!(
        (empty.pending, empty.in_flight, empty.oldest_pending_age_ms),
        (0, 0, 0)
    );
    h.write(
        &[numbered("a", 1), numbered("b", 2), numbered("c", 3)],
        true,
    )
    .await;
    let age = eventually_value(WAIT, "the oldest event ages", || {
        let store = store.clone();
        async move {
            let s = store.stats().await.unwrap();
            (s.oldest_pending_age_ms >= 20).then_some(s)
        }
    })
    .await;
    assert_eq!(age.pending, 3);
    store.claim(LeaseToken::new(), 2, LEASE).await.unwrap();
    let s = store.stats().await.unwrap();
    assert_eq!((s.pending, s.in_flight), (1, 2));
}

/// A fan-out lane: staging stores an event in a transaction of its own,
/// once per id however often it is staged, in staging order.
pub async fn staging_is_idempotent<H: StoreHarness>() {
    let h = H::setup().await;
    let store = h.store();
    let (a, b) = (numbered("k", 1), numbered("k", 2));
    store.stage(&a).await.unwrap();
    store.stage(&a).await.unwrap();
    store.stage(&b).await.unwrap();
    store.stage(&a).await.unwrap();
    let batch = claim(&store, 100).await;
    assert_eq!(numbers(&batch), vec![1, 2]);
    let ids: Vec<_> = batch.records.iter().map(|r| r.event.id()).collect();
    assert_eq!(ids, vec![a.id(), b.id()]);
}

/// Stamps every conformance case as a `#[tokio::test]` for a harness type,
/// in a module named `conformance` or the one given (to run the suite again
/// with the store configured another way in the same test file).
#[macro_export]
macro_rules! store_conformance {
    ($harness:ty) => {
        $crate::store_conformance!($harness, conformance);
    };
    ($harness:ty, $module:ident) => {
        $crate::store_conformance!(@cases $harness; $module;
            rollback_leaves_no_event,
            stored_event_round_trips,
            late_commit_is_not_skipped,
            claims_come_in_write_order,
            claims_respect_per_subject_order,
            outcomes_and_fencing,
            replay_by_id,
            expired_lease_is_reclaimed,
            concurrent_claimers_never_overlap,
            retention_purge,
            identifiers_reject_injection,
            migrate_is_idempotent,
            stats_count_what_is_there,
            staging_is_idempotent,
        );
    };
    (@cases $harness:ty; $module:ident; $($case:ident),* $(,)?) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    $crate::conformance::$case::<$harness>().await;
                }
            )*
        }
    };
}
