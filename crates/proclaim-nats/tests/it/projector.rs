//! Projectors over JetStream ([`JetStreamReplay`]) with their checkpoints
//! in the real PostgreSQL ([`PgCheckpoints`]): each test has a stream and a
//! schema of its own. The end-to-end test builds a per-donor total table,
//! kills the projector mid-way, restarts it, follows live publishes and
//! rebuilds a damaged read model — and the totals are right every time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proclaim_core::projector::{
    CheckpointStore, Projection, ProjectionError, Projector, ProjectorError, ReplaySource,
};
use proclaim_core::{Event, Publisher};
use proclaim_nats::{JetStreamReplay, JetStreamReplayConfig, NatsPublisher};
use proclaim_postgres::{PgCheckpointOptions, PgCheckpointTx, PgCheckpoints, projection_error};
use proclaim_testkit::events::record;
use proclaim_testkit::eventually;
use proclaim_testkit::nats::TestStream;
use proclaim_testkit::pg::TestSchema;

use super::config_for;

const WAIT: Duration = Duration::from_secs(30);

fn donation(donor: i64, cents: i64) -> Event {
    Event::builder("DonorSecured")
        .subject(format!("donor-{donor}"))
        .source("campaign-finance")
        .data(&serde_json::json!({ "donor_id": donor, "amount_cents": cents }))
        .build()
        .unwrap()
}

/// `n` donations from 20 donors, amounts varying.
fn donations(from: usize, n: usize) -> Vec<Event> {
    (from..from + n)
        .map(|i| donation((i % 20) as i64, 100 + (i as i64 * 37) % 1000))
        .collect()
}

/// Totals per donor: (cents, donations).
fn expected(events: &[Event]) -> BTreeMap<i64, (i64, i64)> {
    let mut out = BTreeMap::new();
    for e in events {
        let data: serde_json::Value = e.data_as().unwrap();
        let entry = out
            .entry(data["donor_id"].as_i64().unwrap())
            .or_insert((0, 0));
        entry.0 += data["amount_cents"].as_i64().unwrap();
        entry.1 += 1;
    }
    out
}

async fn publish(publisher: &NatsPublisher, events: &[Event]) {
    for e in events {
        publisher.publish(&record(e.clone())).await.unwrap();
    }
}

async fn replay(ts: &TestStream, config: JetStreamReplayConfig) -> JetStreamReplay {
    JetStreamReplay::connect(config_for(ts), config)
        .await
        .unwrap()
}

fn positions(entries: &[proclaim_core::projector::ReplayEntry]) -> Vec<u64> {
    entries.iter().map(|e| e.position).collect()
}

/// The read model: `donor_totals (donor_id, cents, donations)` in the
/// test's schema.
struct DonorTotals {
    table: String,
    /// Time each apply takes, so a test can stop the projector mid-way.
    delay: Duration,
}

#[derive(serde::Deserialize)]
struct DonorSecured {
    donor_id: i64,
    amount_cents: i64,
}

impl Projection<PgCheckpointTx> for DonorTotals {
    fn name(&self) -> &str {
        "donor-totals"
    }

    fn wants(&self, event: &Event) -> bool {
        event.event_type() == "DonorSecured"
    }

    async fn apply(&self, tx: &mut PgCheckpointTx, event: &Event) -> Result<(), ProjectionError> {
        let d: DonorSecured = event
            .data_as()
            .map_err(|e| ProjectionError::permanent("not a DonorSecured").with_source(e))?;
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {t} (donor_id, cents, donations) VALUES ($1, $2, 1) \
             ON CONFLICT (donor_id) DO UPDATE \
             SET cents = {t}.cents + EXCLUDED.cents, donations = {t}.donations + 1",
            t = self.table
        )))
        .bind(d.donor_id)
        .bind(d.amount_cents)
        .execute(&mut **tx)
        .await
        .map_err(projection_error)?;
        Ok(())
    }

    async fn reset(&self, tx: &mut PgCheckpointTx) -> Result<(), ProjectionError> {
        sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {}", self.table)))
            .execute(&mut **tx)
            .await
            .map_err(projection_error)?;
        Ok(())
    }
}

/// A stream, a schema with the checkpoint table and `donor_totals`, and a
/// publisher to the stream.
struct Fixture {
    ts: TestStream,
    db: TestSchema,
    publisher: NatsPublisher,
}

impl Fixture {
    async fn new() -> Self {
        proclaim_testkit::init_tracing();
        let ts = TestStream::new().await;
        let db = TestSchema::new().await;
        let publisher = NatsPublisher::connect(config_for(&ts)).await.unwrap();
        let f = Fixture { ts, db, publisher };
        f.checkpoints(f.db.pool.clone()).migrate().await.unwrap();
        f.create_read_model().await;
        f
    }

    fn table(&self) -> String {
        format!(r#""{}".donor_totals"#, self.db.name)
    }

    async fn create_read_model(&self) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {} (donor_id BIGINT PRIMARY KEY, cents BIGINT NOT NULL, \
             donations BIGINT NOT NULL)",
            self.table()
        )))
        .execute(&self.db.pool)
        .await
        .unwrap();
    }

    fn checkpoints(&self, pool: sqlx::PgPool) -> PgCheckpoints {
        PgCheckpoints::with_options(
            pool,
            PgCheckpointOptions::default().with_schema(&self.db.name),
        )
        .unwrap()
    }

    fn projection(&self, delay: Duration) -> DonorTotals {
        DonorTotals {
            table: self.table(),
            delay,
        }
    }

    /// A projector as a fresh process would build it: its own pool, its
    /// own connection to NATS.
    async fn projector(
        &self,
        delay: Duration,
        batch_size: usize,
    ) -> Projector<DonorTotals, PgCheckpoints, JetStreamReplay> {
        let checkpoints = self.checkpoints(self.db.another_pool().await);
        let log = replay(&self.ts, JetStreamReplayConfig::default()).await;
        Projector::new(self.projection(delay), checkpoints, log)
            .batch_size(batch_size)
            .idle_wait(Duration::from_secs(30))
    }

    async fn position(&self) -> u64 {
        self.checkpoints(self.db.pool.clone())
            .position("donor-totals")
            .await
            .unwrap()
    }

    async fn totals(&self) -> BTreeMap<i64, (i64, i64)> {
        let rows: Vec<(i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT donor_id, cents, donations FROM {}",
            self.table()
        )))
        .fetch_all(&self.db.pool)
        .await
        .unwrap();
        rows.into_iter().map(|(d, c, n)| (d, (c, n))).collect()
    }
}

#[tokio::test]
async fn positions_are_stream_sequences() {
    let f = Fixture::new().await;
    let events = donations(0, 5);
    publish(&f.publisher, &events).await;
    let mut log = replay(&f.ts, JetStreamReplayConfig::default()).await;
    assert_eq!(log.stream(), f.ts.name);
    assert_eq!(log.end().await.unwrap(), 5);

    let all = log.read(0, 10, Duration::ZERO).await.unwrap();
    assert_eq!(positions(&all), [1, 2, 3, 4, 5]);
    for (entry, event) in all.iter().zip(&events) {
        assert_eq!(entry.payload.as_ref().unwrap(), event);
    }
    assert!(log.read(5, 10, Duration::ZERO).await.unwrap().is_empty());
    // From anywhere, in pieces.
    assert_eq!(
        positions(&log.read(2, 2, Duration::ZERO).await.unwrap()),
        [3, 4]
    );
    assert_eq!(
        positions(&log.read(4, 2, Duration::ZERO).await.unwrap()),
        [5]
    );
    assert_eq!(
        positions(&log.read(0, 1, Duration::ZERO).await.unwrap()),
        [1]
    );

    // A checkpoint beyond the stream's end belongs to another stream.
    let err = log.read(9, 10, Duration::ZERO).await.unwrap_err();
    assert!(!err.is_transient());
    assert!(
        err.to_string()
            .contains("beyond the end of JetStream stream"),
        "{err}"
    );
}

#[tokio::test]
async fn a_waiting_read_wakes_up_for_a_new_message() {
    let f = Fixture::new().await;
    let mut log = replay(&f.ts, JetStreamReplayConfig::default()).await;
    let started = Instant::now();
    let waiting = tokio::spawn(async move {
        let entries = log.read(0, 10, Duration::from_secs(20)).await.unwrap();
        (entries, log)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish(&f.publisher, &donations(0, 1)).await;
    let (entries, mut log) = waiting.await.unwrap();
    assert_eq!(positions(&entries), [1]);
    assert!(started.elapsed() < Duration::from_secs(10));
    // Nothing more: an empty read after the wait.
    let started = Instant::now();
    let none = log.read(1, 10, Duration::from_millis(300)).await.unwrap();
    assert!(none.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(250));
}

/// A read dropped while its pull request waits at the server (as when a
/// projector shuts down while following the stream): the message published
/// next is still read. (A message already on its way to the dropped request
/// would be lost to the reading consumer, which acknowledges nothing; the
/// source therefore starts a new consumer at the position asked for after
/// any read that did not finish. A single server also drops a waiting
/// request whose reader is gone, so this test passes either way.)
#[tokio::test]
async fn a_dropped_read_loses_nothing() {
    let f = Fixture::new().await;
    publish(&f.publisher, &donations(0, 2)).await;
    let mut log = replay(&f.ts, JetStreamReplayConfig::default()).await;
    assert_eq!(
        positions(&log.read(0, 10, Duration::ZERO).await.unwrap()),
        [1, 2]
    );
    let dropped = tokio::time::timeout(
        Duration::from_millis(300),
        log.read(2, 10, Duration::from_secs(30)),
    )
    .await;
    assert!(dropped.is_err(), "nothing to read yet");
    // The pull request of the dropped read is still pending at the server.
    publish(&f.publisher, &donations(2, 1)).await;
    let next = log.read(2, 10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(positions(&next), [3]);
}

#[tokio::test]
async fn removed_messages_are_refused_unless_truncation_is_allowed() {
    let f = Fixture::new().await;
    publish(&f.publisher, &donations(0, 3)).await;
    let stream = f.ts.js.get_stream(&f.ts.name).await.unwrap();
    stream.purge().await.unwrap();
    publish(&f.publisher, &donations(3, 1)).await;

    let mut log = replay(&f.ts, JetStreamReplayConfig::default()).await;
    let err = log.read(0, 10, Duration::ZERO).await.unwrap_err();
    assert!(!err.is_transient());
    assert!(
        err.to_string().contains("no longer holds sequences 1..=3"),
        "{err}"
    );
    // After the gap, reading goes on.
    assert_eq!(
        positions(&log.read(3, 10, Duration::ZERO).await.unwrap()),
        [4]
    );

    // A projector stops with that error instead of skipping.
    let mut p = Projector::new(
        f.projection(Duration::ZERO),
        f.checkpoints(f.db.pool.clone()),
        log,
    );
    let err = p.catch_up().await.unwrap_err();
    assert!(
        matches!(&err, ProjectorError::Source { after: 0, .. }),
        "{err:?}"
    );
    assert_eq!(f.position().await, 0);

    let mut allowed = replay(
        &f.ts,
        JetStreamReplayConfig::default().with_allow_truncated(true),
    )
    .await;
    assert_eq!(
        positions(&allowed.read(0, 10, Duration::ZERO).await.unwrap()),
        [4]
    );
}

#[tokio::test]
async fn a_message_that_is_not_an_event_stops_the_projector_at_its_sequence() {
    let f = Fixture::new().await;
    let events = donations(0, 2);
    publish(&f.publisher, &events).await;
    f.ts.js
        .publish(format!("{}.Junk", f.ts.prefix), "not an event".into())
        .await
        .unwrap()
        .await
        .unwrap();
    publish(&f.publisher, &donations(2, 1)).await;

    let mut log = replay(&f.ts, JetStreamReplayConfig::default()).await;
    let entries = log.read(0, 10, Duration::ZERO).await.unwrap();
    let bad = entries[2].payload.as_ref().unwrap_err();
    assert!(bad.reason.contains("no headers"), "{}", bad.reason);
    assert_eq!(bad.raw, b"not an event");

    let mut p = f.projector(Duration::ZERO, 10).await;
    let err = p.catch_up().await.unwrap_err();
    assert!(
        matches!(&err, ProjectorError::Undecodable { position: 3, .. }),
        "{err:?}"
    );
    assert_eq!(f.position().await, 2, "the events before it are applied");
    assert_eq!(f.totals().await, expected(&events));
}

#[tokio::test]
async fn a_filter_subject_reads_only_its_messages() {
    let f = Fixture::new().await;
    let pledge = Event::builder("PledgeMade").subject("x").build().unwrap();
    let mut events = donations(0, 2);
    publish(&f.publisher, &events).await;
    publish(&f.publisher, &[pledge]).await;
    let last = donations(2, 1);
    publish(&f.publisher, &last).await;
    events.extend(last);

    let filter = format!("{}.DonorSecured", f.ts.prefix);
    let mut log = replay(
        &f.ts,
        JetStreamReplayConfig::default().with_filter_subject(&filter),
    )
    .await;
    assert_eq!(
        positions(&log.read(0, 10, Duration::ZERO).await.unwrap()),
        [1, 2, 4]
    );
    let mut p = Projector::new(
        f.projection(Duration::ZERO),
        f.checkpoints(f.db.pool.clone()),
        log,
    );
    let report = p.catch_up().await.unwrap();
    assert_eq!((report.position, report.applied), (4, 3));
    assert_eq!(f.totals().await, expected(&events));
}

/// The per-donor totals of seed 004's projector, end to end: JetStream,
/// the projector, PostgreSQL.
#[tokio::test]
async fn donor_totals_survive_kills_follow_live_and_rebuild() {
    let f = Fixture::new().await;
    let mut events = donations(0, 200);
    publish(&f.publisher, &events).await;

    // 1. A projector is killed mid-way (its batch in flight is lost with
    //    it): the read model matches its checkpoint exactly.
    let slow = f
        .projector(Duration::from_millis(2), 10)
        .await
        .spawn()
        .unwrap();
    eventually(WAIT, "the first projector to get going", || async {
        f.position().await >= 50
    })
    .await;
    slow.abort().await;
    let killed_at = f.position().await;
    assert!(
        (50..200).contains(&killed_at),
        "killed mid-way, at {killed_at}"
    );
    let prefix = usize::try_from(killed_at).unwrap();
    assert_eq!(
        f.totals().await,
        expected(&events[..prefix]),
        "read model and checkpoint committed together"
    );

    // 2. A restart catches up from there: every donation once.
    let mut restarted = f.projector(Duration::ZERO, 25).await;
    let report = restarted.catch_up().await.unwrap();
    assert_eq!(report.position, 200);
    assert_eq!(report.applied, 200 - killed_at);
    assert_eq!(f.totals().await, expected(&events));

    // 3. Running, it applies what is published meanwhile.
    let running = restarted.spawn().unwrap();
    let live = donations(200, 50);
    publish(&f.publisher, &live).await;
    events.extend(live);
    eventually(WAIT, "the live donations to be applied", || async {
        f.position().await == 250
    })
    .await;
    assert_eq!(f.totals().await, expected(&events));
    let started = Instant::now();
    let report = running.shutdown().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a waiting projector stops at once"
    );
    assert_eq!(report.position, 250);

    // 4. The read model is tampered with: rebuild restores it.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DELETE FROM {t} WHERE donor_id % 2 = 0; \
         UPDATE {t} SET cents = 1 WHERE donor_id = 1; \
         INSERT INTO {t} VALUES (999, 5, 5)",
        t = f.table()
    )))
    .execute(&f.db.pool)
    .await
    .unwrap();
    assert_ne!(f.totals().await, expected(&events));
    let report = f
        .projector(Duration::ZERO, 50)
        .await
        .rebuild()
        .await
        .unwrap();
    assert_eq!(report.position, 250);
    assert_eq!(f.totals().await, expected(&events));

    // 5. The read model is dropped and created again, empty: rebuild
    //    restores it too.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE {}", f.table())))
        .execute(&f.db.pool)
        .await
        .unwrap();
    f.create_read_model().await;
    assert!(f.totals().await.is_empty());
    f.projector(Duration::ZERO, 100)
        .await
        .rebuild()
        .await
        .unwrap();
    assert_eq!(f.totals().await, expected(&events));
    assert_eq!(f.position().await, 250);
}
