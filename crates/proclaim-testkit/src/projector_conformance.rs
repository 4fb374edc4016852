//! The projector conformance suite: one set of generic tests that every
//! [`CheckpointStore`] runs, unchanged, against its real database — the
//! store's transactions directly, and the [`Projector`] on top of them.
//!
//! A store crate implements [`CheckpointHarness`] in its integration tests
//! and stamps the suite with
//! [`projector_conformance!`](crate::projector_conformance!):
//!
//! ```ignore
//! struct PgCheckpointHarness { /* a fresh schema, the store, a donations table */ }
//! impl proclaim_testkit::projector_conformance::CheckpointHarness for PgCheckpointHarness { /* … */ }
//! proclaim_testkit::projector_conformance!(PgCheckpointHarness);
//! ```
//!
//! The read model of every case is a `donations` table of the harness's
//! own: one row (projection, event id, donor, cents) per applied event,
//! with no unique constraint, so an event applied twice shows as two rows.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use proclaim_core::projector::{
    CheckpointStore, CheckpointTx, MemoryLog, Projection, ProjectionError, Projector,
    ProjectorError,
};
use proclaim_core::{Backoff, Event, StoreError};
use uuid::Uuid;

pub use crate::conformance::Capabilities;

/// The transaction type of a harness's store.
pub type TxOf<H> = <<H as CheckpointHarness>::Store as CheckpointStore>::Tx;

/// How the suite drives one checkpoint store. Every `setup` gives a store of
/// its own (own schema, own database, own file, …), migrated, and an empty
/// `donations` table, both removed when the harness drops.
pub trait CheckpointHarness: Send + Sync + Sized + 'static {
    /// The checkpoint store under test.
    type Store: CheckpointStore + Clone;

    /// What the database can do (`concurrent_writers`: batches of different
    /// projections can be open at the same time; not SQLite).
    const CAPABILITIES: Capabilities;

    /// A fresh, migrated store and an empty donations table.
    fn setup() -> impl Future<Output = Self> + Send;

    /// The store.
    fn store(&self) -> Self::Store;

    /// The same store through another connection pool (another process).
    fn second_store(&self) -> impl Future<Output = Self::Store> + Send;

    /// Runs the store's `migrate` again.
    fn migrate(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Builds a store on the same database with these schema and table
    /// names (stores without schemas check `schema` like a table name and
    /// otherwise ignore it); must fail with [`StoreError::Config`] for names
    /// that are not plain identifiers. Never migrated by the suite.
    fn named(&self, schema: &str, table: &str) -> Result<Self::Store, StoreError>;

    /// The projection's write: inserts one donations row through the
    /// batch's transaction (so through the transaction type's access to its
    /// connection).
    fn insert(
        &self,
        tx: &mut TxOf<Self>,
        projection: &str,
        event_id: Uuid,
        donor: &str,
        cents: i64,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// The projection's reset: deletes its donations rows through the
    /// transaction.
    fn clear(
        &self,
        tx: &mut TxOf<Self>,
        projection: &str,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// The committed donations rows of `projection`: (event id, donor,
    /// cents), in insertion order.
    fn rows(&self, projection: &str) -> impl Future<Output = Vec<(Uuid, String, i64)>> + Send;
}

/// How long a test lets a batch hold a checkpoint while another waits.
const HOLD: Duration = Duration::from_millis(300);
/// How long something that must not wait may take.
const QUICK: Duration = Duration::from_secs(10);

/// A `DonorSecured` event: `{"donor": donor, "cents": cents}`.
pub fn donation(donor: &str, cents: i64) -> Event {
    Event::builder("DonorSecured")
        .subject(donor)
        .source("projector-conformance")
        .data(&serde_json::json!({ "donor": donor, "cents": cents }))
        .build()
        .unwrap()
}

/// A `DonorSecured` event the conformance projection refuses permanently.
pub fn poison() -> Event {
    Event::builder("DonorSecured")
        .subject("poison")
        .data(&serde_json::json!({ "poison": true }))
        .build()
        .unwrap()
}

/// An event the conformance projection does not want.
pub fn other() -> Event {
    Event::builder("PledgeMade").subject("x").build().unwrap()
}

/// The suite's projection: one donations row per `DonorSecured` event,
/// through the harness.
pub struct Donations<H> {
    h: Arc<H>,
    name: String,
}

impl<H: CheckpointHarness> Donations<H> {
    /// The projection `name` writing through `h`.
    pub fn new(h: &Arc<H>, name: &str) -> Self {
        Donations {
            h: h.clone(),
            name: name.to_owned(),
        }
    }
}

impl<H: CheckpointHarness> Projection<TxOf<H>> for Donations<H> {
    fn name(&self) -> &str {
        &self.name
    }

    fn wants(&self, event: &Event) -> bool {
        event.event_type() == "DonorSecured"
    }

    async fn apply(&self, tx: &mut TxOf<H>, event: &Event) -> Result<(), ProjectionError> {
        let data: serde_json::Value = event
            .data_as()
            .map_err(|e| ProjectionError::permanent("not JSON").with_source(e))?;
        if data["poison"] == true {
            return Err(ProjectionError::permanent("a poisoned donation"));
        }
        let (Some(donor), Some(cents)) = (data["donor"].as_str(), data["cents"].as_i64()) else {
            return Err(ProjectionError::permanent("no donor or cents"));
        };
        self.h
            .insert(tx, &self.name, event.id(), donor, cents)
            .await
    }

    async fn reset(&self, tx: &mut TxOf<H>) -> Result<(), ProjectionError> {
        self.h.clear(tx, &self.name).await
    }
}

/// A projector of [`Donations`] named `name` over `log`, with small batches
/// and a quick backoff.
pub fn projector<H: CheckpointHarness>(
    h: &Arc<H>,
    store: H::Store,
    name: &str,
    log: &MemoryLog,
    batch_size: usize,
) -> Projector<Donations<H>, H::Store, MemoryLog> {
    Projector::new(Donations::new(h, name), store, log.clone())
        .batch_size(batch_size)
        .backoff(Backoff::new(
            Duration::from_millis(5),
            Duration::from_millis(100),
        ))
}

/// A log of `n` donations from five donors; the events in order.
pub fn log_of(n: usize) -> (MemoryLog, Vec<Event>) {
    let log = MemoryLog::new();
    let events: Vec<Event> = (0..n)
        .map(|i| donation(&format!("donor-{}", i % 5), (i as i64 + 1) * 100))
        .collect();
    for e in &events {
        log.append(e.clone());
    }
    (log, events)
}

/// Checks that `projection`'s rows are exactly one per event of `events`
/// (those the projection wants), in order.
pub async fn assert_applied_once<H: CheckpointHarness>(h: &H, projection: &str, events: &[Event]) {
    let rows = h.rows(projection).await;
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    for (id, _, _) in &rows {
        *seen.entry(*id).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{projection}: applied more than once: {twice:?}"
    );
    let want: Vec<Uuid> = events
        .iter()
        .filter(|e| e.event_type() == "DonorSecured")
        .map(Event::id)
        .collect();
    let have: Vec<Uuid> = rows.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(have, want, "{projection}: one row per event, in log order");
}

/// Totals per donor of the committed rows.
pub async fn totals<H: CheckpointHarness>(h: &H, projection: &str) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for (_, donor, cents) in h.rows(projection).await {
        *out.entry(donor).or_default() += cents;
    }
    out
}

/// A projection nobody wrote yet is at 0, also inside a transaction; a
/// rolled-back first transaction leaves it there.
pub async fn checkpoint_starts_at_zero<H: CheckpointHarness>() {
    let h = H::setup().await;
    let store = h.store();
    assert_eq!(store.position("totals").await.unwrap(), 0);
    assert!(store.checkpoints().await.unwrap().is_empty());
    let tx = store.begin("totals").await.unwrap();
    assert_eq!(tx.position(), 0);
    assert_eq!(tx.projection(), "totals");
    tx.rollback().await.unwrap();
    assert_eq!(store.position("totals").await.unwrap(), 0);
    let tx = store.begin("totals").await.unwrap();
    assert_eq!(tx.position(), 0);
    tx.commit().await.unwrap();
    assert_eq!(store.position("totals").await.unwrap(), 0);
}

/// The read model's writes and the new checkpoint are invisible until the
/// commit, then visible together — also through another pool.
pub async fn read_model_and_checkpoint_commit_together<H: CheckpointHarness>() {
    let h = H::setup().await;
    let store = h.store();
    let other = h.second_store().await;
    let (a, b) = (donation("ada", 100), donation("bob", 250));
    let mut tx = store.begin("totals").await.unwrap();
    h.insert(&mut tx, "totals", a.id(), "ada", 100)
        .await
        .unwrap();
    h.insert(&mut tx, "totals", b.id(), "bob", 250)
        .await
        .unwrap();
    tx.set_position(2).await.unwrap();
    assert_eq!(tx.position(), 2);
    assert_eq!(other.position("totals").await.unwrap(), 0);
    assert!(
        h.rows("totals").await.is_empty(),
        "nothing before the commit"
    );
    tx.commit().await.unwrap();
    assert_eq!(other.position("totals").await.unwrap(), 2);
    assert_eq!(store.position("totals").await.unwrap(), 2);
    assert_eq!(
        h.rows("totals").await,
        vec![(a.id(), "ada".into(), 100), (b.id(), "bob".into(), 250)]
    );
    let listed = other.checkpoints().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].projection.as_str(), listed[0].position),
        ("totals", 2)
    );
    let age = chrono::Utc::now() - listed[0].updated_at;
    assert!(age.num_seconds().abs() < 60, "updated_at is now-ish: {age}");
    let tx = other.begin("totals").await.unwrap();
    assert_eq!(
        tx.position(),
        2,
        "a new batch starts at the committed position"
    );
    tx.rollback().await.unwrap();
}

/// A rolled-back batch, and one whose transaction is dropped (a crash),
/// leave neither the read model's writes nor the checkpoint; the next batch
/// can begin.
pub async fn rollback_and_drop_leave_both<H: CheckpointHarness>() {
    let h = H::setup().await;
    let store = h.store();
    let first = donation("ada", 100);
    let mut tx = store.begin("totals").await.unwrap();
    h.insert(&mut tx, "totals", first.id(), "ada", 100)
        .await
        .unwrap();
    tx.set_position(1).await.unwrap();
    tx.commit().await.unwrap();

    let e = donation("bob", 5);
    let mut tx = store.begin("totals").await.unwrap();
    h.insert(&mut tx, "totals", e.id(), "bob", 5).await.unwrap();
    tx.set_position(7).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(store.position("totals").await.unwrap(), 1);
    assert_eq!(h.rows("totals").await.len(), 1);

    let mut tx = store.begin("totals").await.unwrap();
    assert_eq!(tx.position(), 1);
    h.insert(&mut tx, "totals", e.id(), "bob", 5).await.unwrap();
    tx.set_position(7).await.unwrap();
    drop(tx); // the process "dies" mid-batch
    assert_eq!(store.position("totals").await.unwrap(), 1);
    assert_eq!(h.rows("totals").await.len(), 1);

    // The next batch waits for the dropped transaction's rollback if it has
    // not reached the database yet, then starts from the committed position.
    let other = h.second_store().await;
    let tx = tokio::time::timeout(QUICK, other.begin("totals"))
        .await
        .expect("a dropped batch releases the checkpoint")
        .unwrap();
    assert_eq!(tx.position(), 1);
    tx.rollback().await.unwrap();
}

/// A second batch of the same projection waits while the first holds the
/// checkpoint, then reads what the first committed (or, after a rollback,
/// what was there before): this is what keeps two runners from applying an
/// entry twice.
pub async fn begin_waits_for_the_open_batch<H: CheckpointHarness>() {
    let h = Arc::new(H::setup().await);
    let store = h.store();
    let other = h.second_store().await;
    for commit_first in [true, false] {
        let before = store.position("totals").await.unwrap();
        let mut first = store.begin("totals").await.unwrap();
        let e = donation("ada", 1);
        h.insert(&mut first, "totals", e.id(), "ada", 1)
            .await
            .unwrap();
        first.set_position(before + 10).await.unwrap();
        let second = {
            let other = other.clone();
            tokio::spawn(async move {
                let tx = other.begin("totals").await.unwrap();
                let seen = tx.position();
                tx.rollback().await.unwrap();
                seen
            })
        };
        tokio::time::sleep(HOLD).await;
        assert!(
            !second.is_finished(),
            "a second batch of the projection must wait while the first is open"
        );
        let expected = if commit_first {
            first.commit().await.unwrap();
            before + 10
        } else {
            first.rollback().await.unwrap();
            before
        };
        let seen = tokio::time::timeout(QUICK, second)
            .await
            .expect("the second batch goes on once the first ended")
            .unwrap();
        assert_eq!(seen, expected, "commit_first = {commit_first}");
    }
}

/// Batches of different projections do not wait for each other (databases
/// with concurrent writers only).
pub async fn independent_projections_do_not_wait<H: CheckpointHarness>() {
    if !H::CAPABILITIES.concurrent_writers {
        return;
    }
    let h = H::setup().await;
    let store = h.store();
    let other = h.second_store().await;
    let mut a = store.begin("a").await.unwrap();
    a.set_position(3).await.unwrap();
    let mut b = tokio::time::timeout(QUICK, other.begin("b"))
        .await
        .expect("another projection's checkpoint does not wait")
        .unwrap();
    b.set_position(5).await.unwrap();
    b.commit().await.unwrap();
    a.commit().await.unwrap();
    assert_eq!(store.position("a").await.unwrap(), 3);
    assert_eq!(store.position("b").await.unwrap(), 5);
}

/// Two projections over one log keep checkpoints and read models of their
/// own; `checkpoints` lists both by name.
pub async fn projections_keep_separate_checkpoints<H: CheckpointHarness>() {
    let h = Arc::new(H::setup().await);
    let (log, mut events) = log_of(4);
    projector(&h, h.store(), "a", &log, 3)
        .catch_up()
        .await
        .unwrap();
    for cents in [7, 9] {
        let e = donation("carol", cents);
        log.append(e.clone());
        events.push(e);
    }
    projector(&h, h.second_store().await, "b", &log, 3)
        .catch_up()
        .await
        .unwrap();
    let store = h.store();
    assert_eq!(store.position("a").await.unwrap(), 4);
    assert_eq!(store.position("b").await.unwrap(), 6);
    assert_applied_once(&*h, "a", &events[..4]).await;
    assert_applied_once(&*h, "b", &events).await;
    let listed: Vec<(String, u64)> = store
        .checkpoints()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.projection, c.position))
        .collect();
    assert_eq!(listed, vec![("a".into(), 4), ("b".into(), 6)]);
}

/// The projector applies each event once across batches and restarts (a
/// new projector on another pool continues after the checkpoint); events
/// the projection does not want advance the checkpoint.
pub async fn projector_applies_each_event_once_across_restarts<H: CheckpointHarness>() {
    let h = Arc::new(H::setup().await);
    let (log, mut events) = log_of(25);
    log.append(other());
    events.push(other());
    let mut p = projector(&h, h.store(), "totals", &log, 4);
    let report = p.catch_up().await.unwrap();
    assert_eq!(
        (report.position, report.applied, report.skipped),
        (26, 25, 1)
    );
    assert_eq!(report.batches, 7);
    for i in 0..10 {
        let e = donation("dave", 1000 + i);
        log.append(e.clone());
        events.push(e);
    }
    drop(p);
    let mut restarted = projector(&h, h.second_store().await, "totals", &log, 4);
    let report = restarted.catch_up().await.unwrap();
    assert_eq!((report.position, report.applied), (36, 10));
    assert_applied_once(&*h, "totals", &events).await;
    let totals = totals(&*h, "totals").await;
    let want: i64 = (1..=25).map(|i| i * 100).sum::<i64>() + (0..10).map(|i| 1000 + i).sum::<i64>();
    assert_eq!(totals.values().sum::<i64>(), want);
    assert_eq!(h.store().position("totals").await.unwrap(), 36);
}

/// Several runners of one projection, on two pools, catching up at the same
/// time: every event is applied exactly once, in order.
pub async fn concurrent_runners_do_not_double_apply<H: CheckpointHarness>() {
    let h = Arc::new(H::setup().await);
    let (log, events) = log_of(120);
    let stores = [h.store(), h.second_store().await];
    let mut runners = Vec::new();
    for i in 0..4 {
        let mut p = projector(&h, stores[i % 2].clone(), "totals", &log, 3 + i * 2);
        runners.push(tokio::spawn(async move { p.catch_up().await.unwrap() }));
    }
    for r in runners {
        r.await.unwrap();
    }
    assert_applied_once(&*h, "totals", &events).await;
    assert_eq!(h.store().position("totals").await.unwrap(), 120);
}

/// Rebuild: resetting the read model and the checkpoint is one transaction
/// (a rolled-back reset leaves both), and `Projector::rebuild` restores a
/// tampered read model from the log.
pub async fn rebuild_resets_read_model_and_checkpoint<H: CheckpointHarness>() {
    let h = Arc::new(H::setup().await);
    let store = h.store();
    let (log, events) = log_of(10);
    let mut p = projector(&h, store.clone(), "totals", &log, 4);
    p.catch_up().await.unwrap();
    let good = totals(&*h, "totals").await;

    // A reset that rolls back changes nothing.
    let mut tx = store.begin("totals").await.unwrap();
    h.clear(&mut tx, "totals").await.unwrap();
    tx.set_position(0).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(store.position("totals").await.unwrap(), 10);
    assert_eq!(totals(&*h, "totals").await, good);

    // The read model is damaged behind the projector's back (the
    // checkpoint is not touched): rows lost, a bogus row added.
    let mut tx = store.begin("totals").await.unwrap();
    h.clear(&mut tx, "totals").await.unwrap();
    h.insert(&mut tx, "totals", Uuid::now_v7(), "mallory", 1_000_000)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(store.position("totals").await.unwrap(), 10);
    assert_ne!(totals(&*h, "totals").await, good);

    let report = p.rebuild().await.unwrap();
    assert_eq!(report.position, 10);
    assert_eq!(totals(&*h, "totals").await, good);
    assert_applied_once(&*h, "totals", &events).await;
    assert_eq!(store.position("totals").await.unwrap(), 10);

    // Another runner that was at 10 notices the rebuild and does not apply
    // anything twice.
    let mut elsewhere = projector(&h, h.second_store().await, "totals", &log, 4);
    elsewhere.catch_up().await.unwrap();
    p.rebuild().await.unwrap();
    let e = donation("erin", 42);
    log.append(e.clone());
    elsewhere.catch_up().await.unwrap();
    let mut all = events.clone();
    all.push(e);
    assert_applied_once(&*h, "totals", &all).await;
}

/// A permanent failure stops the projector right before the event, with
/// the events before it committed; a restart stops there again and applies
/// nothing twice.
pub async fn permanent_failure_stops_before_the_event<H: CheckpointHarness>() {
    let h = Arc::new(H::setup().await);
    let log = MemoryLog::new();
    let mut events = Vec::new();
    for i in 0..3 {
        let e = donation("ada", i + 1);
        log.append(e.clone());
        events.push(e);
    }
    let bad = poison();
    log.append(bad.clone());
    log.append(donation("bob", 9));
    let mut p = projector(&h, h.store(), "totals", &log, 10);
    let err = p.catch_up().await.unwrap_err();
    assert!(
        matches!(&err, ProjectorError::Apply { position: 4, event_id, .. } if *event_id == bad.id()),
        "{err:?}"
    );
    assert!(err.to_string().contains("position 4"), "{err}");
    assert_eq!(h.store().position("totals").await.unwrap(), 3);
    assert_applied_once(&*h, "totals", &events).await;

    let mut restarted = projector(&h, h.second_store().await, "totals", &log, 2);
    assert_eq!(restarted.catch_up().await.unwrap_err().position(), Some(4));
    assert_eq!(h.store().position("totals").await.unwrap(), 3);
    assert_applied_once(&*h, "totals", &events).await;
}

/// An entry that does not decode stops the projector at its position, after
/// committing the entries before it.
pub async fn undecodable_entry_stops_at_its_position<H: CheckpointHarness>() {
    let h = Arc::new(H::setup().await);
    let log = MemoryLog::new();
    let first = donation("ada", 1);
    log.append(first.clone());
    log.append_undecodable("missing ce-type header", b"{}".to_vec());
    log.append(donation("bob", 2));
    let mut p = projector(&h, h.store(), "totals", &log, 10);
    let err = p.catch_up().await.unwrap_err();
    assert!(
        matches!(&err, ProjectorError::Undecodable { position: 2, .. }),
        "{err:?}"
    );
    assert_eq!(h.store().position("totals").await.unwrap(), 1);
    assert_applied_once(&*h, "totals", &[first]).await;
}

/// Positions up to `i64::MAX` are kept exactly; larger ones are refused
/// without touching the stored one.
pub async fn positions_round_trip<H: CheckpointHarness>() {
    let h = H::setup().await;
    let store = h.store();
    for position in [1, u64::from(u32::MAX) + 7, i64::MAX as u64, 0] {
        let mut tx = store.begin("p").await.unwrap();
        tx.set_position(position).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(store.position("p").await.unwrap(), position);
        let tx = store.begin("p").await.unwrap();
        assert_eq!(tx.position(), position);
        tx.rollback().await.unwrap();
    }
    let mut tx = store.begin("p").await.unwrap();
    let err = tx.set_position(i64::MAX as u64 + 1).await.unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    tx.rollback().await.unwrap();
    assert_eq!(store.position("p").await.unwrap(), 0);
    // Names are kept as given.
    let name = "Donor totals ✓ (v2)";
    let mut tx = store.begin(name).await.unwrap();
    tx.set_position(3).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(store.position(name).await.unwrap(), 3);
    assert_eq!(store.position("donor totals ✓ (v2)").await.unwrap(), 0);
}

/// Schema and table names that are not plain identifiers are refused.
pub async fn identifiers_reject_injection<H: CheckpointHarness>() {
    let h = H::setup().await;
    for (schema, table) in [
        ("public; DROP TABLE x", "checkpoints"),
        ("proclaim", "checkpoints\" CASCADE --"),
        ("proclaim", "checkpoints`; DROP TABLE x; --"),
        ("Proclaim", "checkpoints"),
        ("proclaim", ""),
        ("proclaim", "1checkpoints"),
    ] {
        let err = h.named(schema, table).err();
        assert!(
            matches!(err, Some(StoreError::Config(_))),
            "{schema}.{table}: {err:?}"
        );
    }
    assert!(h.named("proclaim_ok", "checkpoints_ok").is_ok());
}

/// `migrate` is idempotent, also when run concurrently, and keeps the
/// checkpoints.
pub async fn migrate_is_idempotent<H: CheckpointHarness>() {
    let h = H::setup().await;
    let store = h.store();
    let mut tx = store.begin("p").await.unwrap();
    tx.set_position(12).await.unwrap();
    tx.commit().await.unwrap();
    let (a, b) = tokio::join!(h.migrate(), h.migrate());
    a.unwrap();
    b.unwrap();
    h.migrate().await.unwrap();
    assert_eq!(store.position("p").await.unwrap(), 12);
}

/// Stamps every projector conformance case as a `#[tokio::test]` for a
/// harness type, in a module named `projector_conformance` or the one
/// given.
#[macro_export]
macro_rules! projector_conformance {
    ($harness:ty) => {
        $crate::projector_conformance!($harness, projector_conformance);
    };
    ($harness:ty, $module:ident) => {
        $crate::projector_conformance!(@cases $harness; $module;
            checkpoint_starts_at_zero,
            read_model_and_checkpoint_commit_together,
            rollback_and_drop_leave_both,
            begin_waits_for_the_open_batch,
            independent_projections_do_not_wait,
            projections_keep_separate_checkpoints,
            projector_applies_each_event_once_across_restarts,
            concurrent_runners_do_not_double_apply,
            rebuild_resets_read_model_and_checkpoint,
            permanent_failure_stops_before_the_event,
            undecodable_entry_stops_at_its_position,
            positions_round_trip,
            identifiers_reject_injection,
            migrate_is_idempotent,
        );
    };
    (@cases $harness:ty; $module:ident; $($case:ident),* $(,)?) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    $crate::projector_conformance::$case::<$harness>().await;
                }
            )*
        }
    };
}
