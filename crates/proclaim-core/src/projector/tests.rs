//! The projector runner against an in-memory checkpoint store that injects
//! faults: failed begins and commits (also commits that happened but
//! reported failure), transient and permanent apply errors, entries that do
//! not decode, a checkpoint moved under a running projector, and
//! concurrent runners.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

use super::*;
use crate::{Backoff, Event, StoreError};

/// What the mock database holds, committed.
#[derive(Default)]
struct Committed {
    positions: HashMap<String, u64>,
    /// Per projection: the ids of the events applied, in order.
    read_models: HashMap<String, Vec<Uuid>>,
}

#[derive(Default)]
struct Faults {
    /// `begin` fails (transiently) this many more times.
    begin: u32,
    /// `commit` fails this many more times, storing nothing.
    commit_lost: u32,
    /// `commit` stores everything, then reports a failure this many more
    /// times (the outcome a client sees when the connection drops during
    /// `COMMIT`).
    commit_ambiguous: u32,
    /// `begin` fails permanently.
    broken: bool,
}

#[derive(Clone, Default)]
struct Mock {
    committed: Arc<Mutex<Committed>>,
    faults: Arc<Mutex<Faults>>,
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    commits: Arc<AtomicU32>,
}

impl Mock {
    fn read_model(&self, projection: &str) -> Vec<Uuid> {
        let c = self.committed.lock().unwrap();
        c.read_models.get(projection).cloned().unwrap_or_default()
    }

    fn committed_position(&self, projection: &str) -> u64 {
        let c = self.committed.lock().unwrap();
        c.positions.get(projection).copied().unwrap_or(0)
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().unwrap()
    }
}

fn unavailable(what: &str) -> StoreError {
    StoreError::Unavailable(what.to_owned().into())
}

struct MockTx {
    store: Mock,
    projection: String,
    position: u64,
    applied: Vec<Uuid>,
    reset: bool,
    _lock: OwnedMutexGuard<()>,
}

impl CheckpointTx for MockTx {
    fn projection(&self) -> &str {
        &self.projection
    }

    fn position(&self) -> u64 {
        self.position
    }

    async fn set_position(&mut self, position: u64) -> Result<(), StoreError> {
        self.position = position;
        Ok(())
    }

    async fn commit(self) -> Result<(), StoreError> {
        {
            let mut faults = self.store.faults();
            if faults.commit_lost > 0 {
                faults.commit_lost -= 1;
                return Err(unavailable("connection reset before COMMIT"));
            }
        }
        {
            let mut c = self.store.committed.lock().unwrap();
            let model = c.read_models.entry(self.projection.clone()).or_default();
            if self.reset {
                model.clear();
            }
            model.extend(&self.applied);
            c.positions.insert(self.projection.clone(), self.position);
        }
        self.store.commits.fetch_add(1, Ordering::SeqCst);
        let mut faults = self.store.faults();
        if faults.commit_ambiguous > 0 {
            faults.commit_ambiguous -= 1;
            return Err(unavailable("connection reset during COMMIT"));
        }
        Ok(())
    }

    async fn rollback(self) -> Result<(), StoreError> {
        Ok(())
    }
}

impl CheckpointStore for Mock {
    type Tx = MockTx;

    async fn begin(&self, projection: &str) -> Result<MockTx, StoreError> {
        {
            let mut faults = self.faults();
            if faults.broken {
                return Err(StoreError::Database("no such table".into()));
            }
            if faults.begin > 0 {
                faults.begin -= 1;
                return Err(unavailable("connection refused"));
            }
        }
        let lock = self
            .locks
            .lock()
            .unwrap()
            .entry(projection.to_owned())
            .or_default()
            .clone();
        let guard = lock.lock_owned().await;
        let position = self.committed_position(projection);
        Ok(MockTx {
            store: self.clone(),
            projection: projection.to_owned(),
            position,
            applied: Vec::new(),
            reset: false,
            _lock: guard,
        })
    }

    async fn position(&self, projection: &str) -> Result<u64, StoreError> {
        Ok(self.committed_position(projection))
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        let c = self.committed.lock().unwrap();
        Ok(c.positions
            .iter()
            .map(|(projection, position)| Checkpoint {
                projection: projection.clone(),
                position: *position,
                updated_at: Utc::now(),
            })
            .collect())
    }
}

/// Records the id of each event it applies; fails as told, by event id.
#[derive(Clone, Default)]
struct Recorder {
    name: &'static str,
    /// Event id → (transient?, failures left).
    failures: Arc<Mutex<HashMap<Uuid, (bool, u32)>>>,
    /// Only events of this type, when set.
    only: Option<&'static str>,
    /// How long each apply takes.
    slow: Duration,
    calls: Arc<AtomicU32>,
}

impl Recorder {
    fn named(name: &'static str) -> Self {
        Recorder {
            name,
            ..Default::default()
        }
    }

    fn fail(&self, event: Uuid, transient: bool, times: u32) {
        self.failures
            .lock()
            .unwrap()
            .insert(event, (transient, times));
    }
}

impl Projection<MockTx> for Recorder {
    fn name(&self) -> &str {
        self.name
    }

    fn wants(&self, event: &Event) -> bool {
        self.only.is_none_or(|t| event.event_type() == t)
    }

    async fn apply(&self, tx: &mut MockTx, event: &Event) -> Result<(), ProjectionError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if !self.slow.is_zero() {
            tokio::time::sleep(self.slow).await;
        }
        tx.applied.push(event.id());
        let mut failures = self.failures.lock().unwrap();
        if let Some((transient, left)) = failures.get_mut(&event.id())
            && *left > 0
        {
            *left -= 1;
            return Err(if *transient {
                ProjectionError::transient("deadlock detected")
            } else {
                ProjectionError::permanent("amount is negative")
            });
        }
        Ok(())
    }

    async fn reset(&self, tx: &mut MockTx) -> Result<(), ProjectionError> {
        tx.reset = true;
        tx.applied.clear();
        Ok(())
    }
}

fn event(n: u64) -> Event {
    Event::builder("DonorSecured")
        .subject(format!("donor-{n}"))
        .data(&serde_json::json!({ "n": n }))
        .build()
        .unwrap()
}

/// A log of `n` events; their ids in order.
fn log_of(n: u64) -> (MemoryLog, Vec<Uuid>) {
    let log = MemoryLog::new();
    let ids = (1..=n)
        .map(|i| {
            let e = event(i);
            log.append(e.clone());
            e.id()
        })
        .collect();
    (log, ids)
}

fn quick() -> Backoff {
    Backoff::new(Duration::from_millis(1), Duration::from_millis(5))
}

fn projector(
    projection: Recorder,
    store: &Mock,
    log: &MemoryLog,
) -> Projector<Recorder, Mock, MemoryLog> {
    Projector::new(projection, store.clone(), log.clone())
        .batch_size(3)
        .backoff(quick())
}

#[tokio::test]
async fn catch_up_applies_every_event_once_in_order() {
    let (log, ids) = log_of(10);
    let store = Mock::default();
    let mut p = projector(Recorder::named("totals"), &store, &log);
    let report = p.catch_up().await.unwrap();
    assert_eq!(store.read_model("totals"), ids);
    assert_eq!(store.committed_position("totals"), 10);
    assert_eq!(
        report,
        ProjectorReport {
            position: 10,
            applied: 10,
            skipped: 0,
            batches: 4,
            retries: 0
        }
    );
    // Nothing new: nothing happens.
    p.catch_up().await.unwrap();
    assert_eq!(store.commits.load(Ordering::SeqCst), 4);

    // A new projector (a restart) continues after the checkpoint.
    log.append(event(11));
    let mut restarted = projector(Recorder::named("totals"), &store, &log);
    let report = restarted.catch_up().await.unwrap();
    assert_eq!((report.position, report.applied), (11, 1));
    assert_eq!(store.read_model("totals").len(), 11);
}

#[tokio::test]
async fn failed_commits_retry_the_batch_without_applying_twice() {
    let (log, ids) = log_of(9);
    let store = Mock::default();
    {
        let mut f = store.faults();
        f.begin = 2;
        f.commit_lost = 2;
        f.commit_ambiguous = 2;
    }
    let mut p = projector(Recorder::named("totals"), &store, &log);
    let report = p.catch_up().await.unwrap();
    assert_eq!(
        store.read_model("totals"),
        ids,
        "every event once, in order, although commits failed and one went through unseen"
    );
    assert_eq!(report.position, 9);
    assert_eq!(report.retries, 6);
}

#[tokio::test]
async fn a_transient_apply_error_rolls_back_and_retries() {
    let (log, ids) = log_of(6);
    let store = Mock::default();
    let recorder = Recorder::named("totals");
    recorder.fail(ids[4], true, 3);
    let mut p = projector(recorder.clone(), &store, &log);
    let report = p.catch_up().await.unwrap();
    assert_eq!(store.read_model("totals"), ids);
    assert_eq!(report.retries, 3);
    // Batch 4-6 failed 3 times at event 5 (after 4), then ran in full.
    assert_eq!(recorder.calls.load(Ordering::SeqCst), 3 + 3 * 2 + 3);
}

#[tokio::test]
async fn a_permanent_apply_error_stops_right_before_the_event() {
    let (log, ids) = log_of(8);
    let store = Mock::default();
    let recorder = Recorder::named("totals");
    recorder.fail(ids[5], false, u32::MAX);
    let mut p = Projector::new(recorder.clone(), store.clone(), log.clone())
        .batch_size(100)
        .backoff(quick());
    let err = p.catch_up().await.unwrap_err();
    assert_eq!(err.position(), Some(6), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("position 6") && text.contains("amount is negative"),
        "{text}"
    );
    assert!(matches!(err, ProjectorError::Apply { event_id, .. } if event_id == ids[5]));
    assert_eq!(
        store.read_model("totals"),
        ids[..5],
        "the events before it are committed"
    );
    assert_eq!(store.committed_position("totals"), 5);

    // Again (a restart, or the same projector): the same stop, nothing twice.
    let err = p.catch_up().await.unwrap_err();
    assert_eq!(err.position(), Some(6));
    let mut restarted = projector(recorder.clone(), &store, &log);
    assert_eq!(restarted.catch_up().await.unwrap_err().position(), Some(6));
    assert_eq!(store.read_model("totals"), ids[..5]);

    // Once the projection is fixed, it goes on from there.
    recorder.failures.lock().unwrap().clear();
    restarted.catch_up().await.unwrap();
    assert_eq!(store.read_model("totals"), ids);
}

#[tokio::test]
async fn an_undecodable_entry_stops_the_projector_at_its_position() {
    let (log, mut ids) = log_of(3);
    log.append_undecodable("missing ce-id header", b"{}".to_vec());
    for n in 5..=6 {
        let e = event(n);
        ids.push(e.id());
        log.append(e);
    }
    let store = Mock::default();
    let mut p = Projector::new(Recorder::named("totals"), store.clone(), log.clone())
        .batch_size(10)
        .backoff(quick());
    let err = p.catch_up().await.unwrap_err();
    assert!(
        matches!(&err, ProjectorError::Undecodable { position: 4, reason, .. } if reason == "missing ce-id header"),
        "{err:?}"
    );
    assert!(err.to_string().contains("never skips"), "{err}");
    assert_eq!(store.read_model("totals"), ids[..3]);
    assert_eq!(store.committed_position("totals"), 3);
    // It stays stopped there: nothing is skipped.
    assert_eq!(p.catch_up().await.unwrap_err().position(), Some(4));
    assert_eq!(store.committed_position("totals"), 3);
}

#[tokio::test]
async fn events_the_projection_does_not_want_advance_the_checkpoint() {
    let log = MemoryLog::new();
    let mut wanted = Vec::new();
    for n in 0..7 {
        let kind = if n % 2 == 0 {
            "DonorSecured"
        } else {
            "PledgeMade"
        };
        let e = Event::builder(kind).subject("d").build().unwrap();
        if n % 2 == 0 {
            wanted.push(e.id());
        }
        log.append(e);
    }
    let store = Mock::default();
    let recorder = Recorder {
        only: Some("DonorSecured"),
        ..Recorder::named("donors")
    };
    let mut p = projector(recorder, &store, &log);
    let report = p.catch_up().await.unwrap();
    assert_eq!(store.read_model("donors"), wanted);
    assert_eq!((report.position, report.applied, report.skipped), (7, 4, 3));
}

#[tokio::test]
async fn rebuild_resets_read_model_and_checkpoint_then_replays() {
    let (log, ids) = log_of(7);
    let store = Mock::default();
    let mut p = projector(Recorder::named("totals"), &store, &log);
    p.catch_up().await.unwrap();
    // The read model gets damaged behind the projector's back.
    store
        .committed
        .lock()
        .unwrap()
        .read_models
        .insert("totals".into(), vec![Uuid::nil()]);
    let report = p.rebuild().await.unwrap();
    assert_eq!(store.read_model("totals"), ids);
    assert_eq!(report.position, 7);
    assert_eq!(store.committed_position("totals"), 7);
}

#[tokio::test]
async fn a_checkpoint_moved_back_elsewhere_is_followed() {
    let (log, ids) = log_of(5);
    let store = Mock::default();
    let mut a = projector(Recorder::named("totals"), &store, &log);
    a.catch_up().await.unwrap();
    // Another process rebuilds: read model and checkpoint reset together…
    let mut tx = store.begin("totals").await.unwrap();
    Recorder::named("totals").reset(&mut tx).await.unwrap();
    tx.set_position(0).await.unwrap();
    tx.commit().await.unwrap();
    // …and `a`, which thinks it is at 5, notices at its next batch.
    let e = event(6);
    log.append(e.clone());
    a.catch_up().await.unwrap();
    let mut all = ids.clone();
    all.push(e.id());
    assert_eq!(store.read_model("totals"), all);
}

#[tokio::test]
async fn concurrent_runners_of_one_projection_apply_each_event_once() {
    let (log, ids) = log_of(200);
    let store = Mock::default();
    let slow = Recorder {
        slow: Duration::from_micros(200),
        ..Recorder::named("totals")
    };
    let runners: Vec<_> = (0..3)
        .map(|i| {
            let mut p = Projector::new(slow.clone(), store.clone(), log.clone())
                .batch_size(5 + i)
                .backoff(quick());
            tokio::spawn(async move { p.catch_up().await.unwrap() })
        })
        .collect();
    for r in runners {
        r.await.unwrap();
    }
    assert_eq!(store.read_model("totals"), ids);
}

#[tokio::test]
async fn projections_keep_separate_checkpoints() {
    let (log, ids) = log_of(4);
    let store = Mock::default();
    projector(Recorder::named("a"), &store, &log)
        .catch_up()
        .await
        .unwrap();
    assert_eq!(store.committed_position("b"), 0);
    log.append(event(5));
    projector(Recorder::named("b"), &store, &log)
        .catch_up()
        .await
        .unwrap();
    assert_eq!(store.committed_position("a"), 4);
    assert_eq!(store.committed_position("b"), 5);
    assert_eq!(store.read_model("a"), ids);
}

#[tokio::test]
async fn spawned_projector_follows_the_log_and_shuts_down_gracefully() {
    let (log, _) = log_of(3);
    let store = Mock::default();
    let handle = projector(Recorder::named("live"), &store, &log)
        .idle_wait(Duration::from_secs(30))
        .spawn()
        .unwrap();
    let wait_for = |n: u64| {
        let store = store.clone();
        async move {
            for _ in 0..500 {
                if store.committed_position("live") == n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("never reached position {n}");
        }
    };
    wait_for(3).await;
    // Appended while it waits: applied at once (not after the idle wait).
    log.append(event(4));
    log.append(event(5));
    wait_for(5).await;
    assert!(!handle.is_finished());
    let started = std::time::Instant::now();
    let report = handle.shutdown().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!((report.position, report.applied), (5, 5));
}

#[tokio::test]
async fn abort_mid_batch_rolls_the_batch_back() {
    let (log, ids) = log_of(6);
    let store = Mock::default();
    let slow = Recorder {
        slow: Duration::from_millis(100),
        ..Recorder::named("totals")
    };
    let handle = Projector::new(slow.clone(), store.clone(), log.clone())
        .batch_size(6)
        .spawn()
        .unwrap();
    while slow.calls.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    handle.abort().await;
    assert_eq!(store.committed_position("totals"), 0);
    assert!(store.read_model("totals").is_empty());
    // The next run applies all of it, once.
    projector(Recorder::named("totals"), &store, &log)
        .catch_up()
        .await
        .unwrap();
    assert_eq!(store.read_model("totals"), ids);
}

#[tokio::test]
async fn shutdown_interrupts_the_backoff_of_a_failing_store() {
    let (log, _) = log_of(2);
    let store = Mock::default();
    store.faults().begin = u32::MAX;
    let handle = Projector::new(Recorder::named("down"), store.clone(), log.clone())
        .backoff(Backoff::new(
            Duration::from_secs(60),
            Duration::from_secs(60),
        ))
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    let report = handle.shutdown().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(report.position, 0);
    assert!(report.retries >= 1);
}

#[tokio::test]
async fn max_attempts_gives_up_and_a_permanent_store_error_stops_at_once() {
    let (log, _) = log_of(2);
    let store = Mock::default();
    store.faults().begin = u32::MAX;
    let mut p = projector(Recorder::named("down"), &store, &log).max_attempts(3);
    let err = p.catch_up().await.unwrap_err();
    assert!(
        matches!(&err, ProjectorError::Store { source, .. } if source.is_transient()),
        "{err:?}"
    );
    assert_eq!(p.report().retries, 2);

    let broken = Mock::default();
    broken.faults().broken = true;
    let mut p = projector(Recorder::named("broken"), &broken, &log);
    let err = p.catch_up().await.unwrap_err();
    assert!(err.to_string().contains("no such table"), "{err}");
    assert_eq!(p.report().retries, 0);
}

/// A source that breaks its contract.
struct Backwards;

impl ReplaySource for Backwards {
    async fn read(
        &mut self,
        _after: u64,
        _max: usize,
        _wait: Duration,
    ) -> Result<Vec<ReplayEntry>, ReplayError> {
        Ok(vec![
            ReplayEntry::event(2, event(2)),
            ReplayEntry::event(1, event(1)),
        ])
    }

    async fn end(&mut self) -> Result<u64, ReplayError> {
        Ok(2)
    }
}

#[tokio::test]
async fn a_source_out_of_order_is_refused() {
    let store = Mock::default();
    let mut p = Projector::new(Recorder::named("x"), store.clone(), Backwards);
    let err = p.catch_up().await.unwrap_err();
    assert!(
        matches!(err, ProjectorError::OutOfOrder { position: 1, .. }),
        "{err:?}"
    );
    assert!(store.read_model("x").is_empty());
}

#[tokio::test]
async fn a_checkpoint_beyond_the_log_is_a_permanent_error() {
    let (log, _) = log_of(2);
    let store = Mock::default();
    store
        .committed
        .lock()
        .unwrap()
        .positions
        .insert("x".into(), 9);
    let mut p = projector(Recorder::named("x"), &store, &log);
    let err = p.catch_up().await.unwrap_err();
    assert!(
        err.to_string()
            .contains("beyond the end of the in-memory log"),
        "{err}"
    );
}

#[tokio::test]
async fn the_configuration_is_checked() {
    let log = MemoryLog::new();
    let store = Mock::default();
    let p = Projector::new(Recorder::named("x"), store.clone(), log.clone()).batch_size(0);
    assert!(p.validate().unwrap_err().0.contains("batch_size"));
    let p = Projector::new(Recorder::named("bad\nname"), store.clone(), log.clone());
    assert!(p.validate().is_err());
    let long: &'static str = Box::leak("p".repeat(256).into_boxed_str());
    let mut p = Projector::new(Recorder::named(long), store.clone(), log.clone());
    assert!(matches!(
        p.catch_up().await.unwrap_err(),
        ProjectorError::Config(_)
    ));
    let p = Projector::new(Recorder::named("x"), store.clone(), log.clone()).max_attempts(0);
    assert!(p.spawn().is_err());
    let p = Projector::new(Recorder::named("x"), store, log).idle_wait(Duration::ZERO);
    assert!(p.validate().unwrap_err().0.contains("idle_wait"));
}

#[tokio::test]
async fn memory_log_readers_wake_up_on_append() {
    let log = MemoryLog::new();
    let mut reader = log.clone();
    let waiting = tokio::spawn(async move { reader.read(0, 10, Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    log.append(event(1));
    let entries = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(entries.len(), 1);
    let mut reader = log.clone();
    let started = std::time::Instant::now();
    assert!(
        reader
            .read(1, 10, Duration::from_millis(30))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(started.elapsed() >= Duration::from_millis(30));
    assert_eq!(reader.end().await.unwrap(), 1);
}
