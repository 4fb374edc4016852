//! The chaos run: writers, relays under faults, two consumers (one recording
//! what the broker delivers, one applying effects through an inbox), then the
//! checkers.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use proclaim_core::{DeadLetterEntry, OutboxStore};
use proclaim_postgres::{PgOutbox, PgOutboxOptions};
use serde::Serialize;
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::ChaosError;
use crate::effects::EffectConsumer;
use crate::faults::{FaultKind, Schedule};
use crate::history::{Effects, EffectsVerdict, History, Verdict};
use crate::proxy::FaultMode;
use crate::relays::RelayProcess;
use crate::writers::WriterLog;

/// Everything a chaos run needs. [`ChaosConfig::new`] gives the defaults
/// `proclaim chaos` uses.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// PostgreSQL; the run creates its own schema there and drops it after.
    pub database_url: String,
    /// NATS with JetStream; the run creates its own stream and deletes it after.
    pub nats_url: String,
    /// The `proclaim` executable the relays run as (`proclaim relay`).
    pub relay_program: PathBuf,
    /// How long writers write while faults are injected.
    pub duration: Duration,
    /// Relay processes (default 3).
    pub relays: usize,
    /// Concurrent writers (default 4). Each owns a share of the keys.
    pub writers: usize,
    /// Ordering keys (CloudEvents subjects) written to (default 64).
    pub keys: usize,
    /// Transactions per second over all writers (default 200); each writes
    /// 1–3 events of one key.
    pub rate: u32,
    /// Share of transactions rolled back (default 0.1).
    pub abort_ratio: f64,
    /// A malformed outbox row is written this often (default 5 s); each must
    /// end up dead-lettered without holding up its key.
    pub poison_every: Option<Duration>,
    /// The faults to inject, in order, round after round (default: every
    /// kind, [`FaultKind::ALL`]).
    pub faults: Vec<FaultKind>,
    /// How long a fault lasts (a pause lasts 1.5 leases).
    pub fault_hold: Duration,
    /// Healthy time between two faults.
    pub fault_gap: Duration,
    /// The relays' lease (short, so failover happens within the run).
    pub lease: Duration,
    /// How long to wait after the writers stop for every event to arrive
    /// (default 120 s); then as long as the effect consumer makes progress,
    /// for at most this long without progress and at most this or the run's
    /// duration (whichever is longer) in all, for every effect to be applied.
    /// The effect consumer lags behind after faults on its own links, more so
    /// the longer the run.
    pub drain_timeout: Duration,
    /// Let JetStream drop re-published events by their id (default true).
    /// Off, every re-publish after a fault reaches the consumer as a
    /// duplicate, which shows how often faults make the relays publish again.
    pub broker_dedup: bool,
    /// Seed of the writers' and the fault victims' randomness.
    pub seed: u64,
    /// Keep the schema, the stream and the relay logs afterwards.
    pub keep: bool,
    /// Cancel to end the fault phase early (e.g. on Ctrl-C); the run then
    /// heals, drains and checks as usual.
    pub stop: CancellationToken,
}

impl ChaosConfig {
    /// The defaults, for the given services and executable.
    pub fn new(database_url: String, nats_url: String, relay_program: PathBuf) -> Self {
        ChaosConfig {
            database_url,
            nats_url,
            relay_program,
            duration: Duration::from_secs(60),
            relays: 3,
            writers: 4,
            keys: 64,
            rate: 200,
            abort_ratio: 0.1,
            poison_every: Some(Duration::from_secs(5)),
            faults: FaultKind::ALL.to_vec(),
            fault_hold: Duration::from_millis(2500),
            fault_gap: Duration::from_millis(1000),
            lease: Duration::from_secs(3),
            drain_timeout: Duration::from_secs(120),
            broker_dedup: true,
            seed: fastrand::u64(..),
            keep: false,
            stop: CancellationToken::new(),
        }
    }

    fn validate(&self) -> Result<(), ChaosError> {
        let bad = |m: &str| Err(ChaosError::Config(m.to_owned()));
        if self.relays == 0 || self.writers == 0 || self.keys == 0 || self.rate == 0 {
            return bad("relays, writers, keys and rate must be at least 1");
        }
        if self.keys < self.writers {
            return bad("keys must be at least the number of writers (each writer owns keys)");
        }
        if !(0.0..1.0).contains(&self.abort_ratio) {
            return bad("abort ratio must be in [0, 1)");
        }
        if self.lease < Duration::from_secs(1) {
            return bad("lease must be at least 1s");
        }
        Ok(())
    }
}

/// The outcome: the checkers' counts first (the fields of the one JSON line
/// `proclaim chaos` prints), then what was injected and what the outbox did.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    /// What the history checker found (committed, aborted,
    /// delivered_unique, lost, phantom, order_violations, duplicates).
    #[serde(flatten)]
    pub verdict: Verdict,
    /// What the effect check found (effects_applied, effects_duplicated,
    /// effects_missing, effects_phantom, effects_parked).
    #[serde(flatten)]
    pub effects: EffectsVerdict,
    /// Faults injected, all kinds.
    pub faults_injected: u64,
    /// Faults injected per kind.
    pub faults_by_kind: BTreeMap<&'static str, u64>,
    /// Malformed rows written.
    pub poison_injected: u64,
    /// Malformed rows that ended up dead-lettered.
    pub poison_dead_lettered: u64,
    /// Well-formed events that ended up dead-lettered (should be 0).
    pub other_dead_lettered: u64,
    /// Relay restarts (after kills, or after exiting by themselves).
    pub relay_restarts: u64,
    /// Relays that exited by themselves (should be 0).
    pub relay_unexpected_exits: u64,
    /// Relays that did not exit 0 within the grace period on SIGTERM at the end.
    pub relay_unclean_stops: u64,
    /// Times the effect consumer was killed (`consumer_kill`).
    pub consumer_kills: u64,
    /// Kills that struck right after a handler committed its effect, before
    /// the message was acked.
    pub consumer_crashes_after_commit: u64,
    /// Deliveries the effect consumer's inbox recognised as already handled
    /// and skipped (redeliveries after kills, lost acks, re-publishes).
    pub consumer_duplicates_skipped: u64,
    /// Times the effect consumer stopped by itself (should be 0).
    pub consumer_unexpected_exits: u64,
    /// Outbox rows when the faults started, at most during the run, at the end.
    pub outbox_rows_start: u64,
    /// See `outbox_rows_start`.
    pub outbox_rows_max: u64,
    /// See `outbox_rows_start`. Only dead letters remain after a drain.
    pub outbox_rows_end: u64,
    /// On-disk size of the outbox table and its indexes when the faults
    /// started and at the end. Deleted rows leave dead tuples until VACUUM,
    /// so this can grow while the row count stays flat.
    pub outbox_bytes_start: u64,
    /// See `outbox_bytes_start`.
    pub outbox_bytes_end: u64,
    /// Seconds of writing under faults.
    pub duration_s: f64,
    /// Seconds from the writers' stop until everything was delivered.
    pub drain_s: f64,
    /// Seconds from the writers' stop until every effect was applied and
    /// the effect consumer had acked everything (it lags behind the relays
    /// after faults on its own links).
    pub effects_drain_s: f64,
    /// The seed (rerun with `--seed` to get the same writes and victims).
    pub seed: u64,
    /// Every check held.
    pub passed: bool,
    /// Why it did not pass, and example ids.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// What one run set up, torn down at the end.
pub(crate) struct Resources {
    pub(crate) schema: String,
    pub(crate) stream: String,
    pub(crate) prefix: String,
    pub(crate) dir: PathBuf,
}

/// Runs the scenario and checks the history.
///
/// The returned report says whether the run passed; an `Err` means the run
/// itself could not happen (services unreachable, bad config).
pub async fn run(config: ChaosConfig) -> Result<ChaosReport, ChaosError> {
    config.validate()?;
    let suffix = Uuid::new_v4().simple().to_string()[..10].to_owned();
    let res = Resources {
        schema: format!("chaos_{suffix}"),
        stream: format!("CHAOS_{}", suffix.to_uppercase()),
        prefix: format!("chaos{suffix}"),
        dir: std::env::temp_dir().join(format!("proclaim-chaos-{suffix}")),
    };
    let pool = PgPoolOptions::new()
        .max_connections(u32::try_from(config.writers).unwrap_or(64) + 4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&config.database_url)
        .await
        .map_err(|e| ChaosError::Database(format!("cannot connect: {e}")))?;
    let nats = async_nats::connect(&config.nats_url)
        .await
        .map_err(|e| ChaosError::Broker(format!("cannot connect to {}: {e}", config.nats_url)))?;
    let js = jetstream::new(nats);

    let outcome = run_in(&config, &res, &pool, &js).await;
    let passed = matches!(&outcome, Ok(r) if r.passed);
    if !config.keep {
        let _ = sqlx::query(AssertSqlSafe(format!(
            r#"DROP SCHEMA IF EXISTS "{}" CASCADE"#,
            res.schema
        )))
        .execute(&pool)
        .await;
        let _ = js.delete_stream(&res.stream).await;
        if passed {
            let _ = std::fs::remove_dir_all(&res.dir);
        }
    }
    if !passed {
        tracing::warn!(dir = %res.dir.display(), "relay logs kept");
    }
    pool.close().await;
    outcome
}

async fn run_in(
    config: &ChaosConfig,
    res: &Resources,
    pool: &PgPool,
    js: &jetstream::Context,
) -> Result<ChaosReport, ChaosError> {
    let outbox = prepare(config, res, pool, js).await?;
    let received = Arc::new(Mutex::new(Vec::<Uuid>::new()));
    let stop_consumer = CancellationToken::new();
    let consumer = tokio::spawn(crate::consumer::consume(
        js.clone(),
        res.stream.clone(),
        received.clone(),
        stop_consumer.clone(),
    ));
    let mut effects = EffectConsumer::new(config, res).await?;
    effects.start()?;
    let mut relays = crate::relays::start_relays(config, res).await?;
    let rows = RowCounter::new(pool, &res.schema);
    let outbox_rows_start = rows.count().await?;
    let outbox_bytes_start = rows.bytes().await?;

    // Writers and the row sampler run while faults are injected.
    let stop_writers = CancellationToken::new();
    let writers: Vec<JoinHandle<WriterLog>> = (0..config.writers)
        .map(|w| {
            tokio::spawn(crate::writers::write(
                config.clone(),
                w,
                outbox.clone(),
                res.schema.clone(),
                stop_writers.clone(),
            ))
        })
        .collect();
    let sampler = tokio::spawn(rows.clone().sample(outbox_rows_start, stop_writers.clone()));
    let started = Instant::now();
    let mut faults = inject_faults(config, &mut relays, &mut effects).await?;
    stop_writers.cancel();
    let duration_s = started.elapsed().as_secs_f64();
    let mut logs = WriterLog::default();
    for writer in writers {
        let log = writer
            .await
            .map_err(|e| ChaosError::Relay(format!("writer task failed: {e}")))?;
        logs.merge(log);
    }
    let outbox_rows_max = sampler.await.unwrap_or(outbox_rows_start);

    // Heal: every link passes, every relay and the effect consumer run; wait
    // until everything committed has arrived and has its effect, then stop
    // the relays gracefully.
    for relay in &mut relays {
        relay.db.set_mode(FaultMode::Pass);
        relay.broker.set_mode(FaultMode::Pass);
        relay.set_paused(false);
        relay.start()?;
    }
    effects.heal();
    effects.start()?;
    let drained = drain(
        config,
        res,
        &outbox,
        &received,
        &mut effects,
        js,
        &mut faults,
    )
    .await?;
    let lacking = drained.lacking;
    if let Some(lacking) = &lacking {
        faults.problems.push(format!(
            "not drained after {:?}: {lacking}",
            drained.applied
        ));
    }
    let mut unclean_stops = 0;
    for relay in &mut relays {
        if !relay.stop(Duration::from_secs(20)).await {
            unclean_stops += 1;
            faults.problems.push(format!(
                "relay {} did not exit 0 on SIGTERM; log: {}",
                relay.index,
                relay.log().display()
            ));
        }
    }
    // Anything still on its way to the consumer arrives now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_consumer.cancel();
    if let Ok(Err(e)) = consumer.await {
        faults.problems.push(format!("consumer: {e}"));
    }
    let effects_stopped = effects.stop(Duration::from_secs(30)).await;
    if !effects_stopped {
        faults
            .problems
            .push("the effect consumer did not shut down within 30s".to_owned());
    }

    // The truth and the checks.
    let committed = crate::writers::read_ledger(pool, &res.schema)
        .await
        .map_err(|e| ChaosError::Database(e.to_string()))?;
    let (applied, parked) = crate::effects::applied(pool, &res.schema).await?;
    let effect_verdict = Effects {
        committed: committed.clone(),
        applied,
        parked,
    }
    .check();
    let history = History {
        committed,
        aborted: std::mem::take(&mut logs.aborted),
        received: std::mem::take(&mut *lock(&received)),
    };
    let dead = outbox
        .dead_letters(u32::MAX)
        .await
        .map_err(|e| ChaosError::Database(e.to_string()))?;
    let mut report = judge(config, &history, effect_verdict, &logs, &dead, faults);
    report.relay_restarts = relays.iter().map(|r| r.restarts).sum();
    report.relay_unclean_stops = unclean_stops;
    report.consumer_kills = effects.kills;
    report.consumer_crashes_after_commit = effects.crashes_after_commit();
    report.consumer_duplicates_skipped = effects.redeliveries_skipped();
    report.consumer_unexpected_exits = effects.unexpected_exits;
    report.outbox_rows_start = outbox_rows_start;
    report.outbox_rows_max = outbox_rows_max;
    report.outbox_rows_end = rows.count().await?;
    report.outbox_bytes_start = outbox_bytes_start;
    report.outbox_bytes_end = rows.bytes().await?;
    report.duration_s = round2(duration_s);
    report.drain_s = round2(drained.delivered.as_secs_f64());
    report.effects_drain_s = round2(drained.applied.as_secs_f64());
    report.passed = report.passed
        && lacking.is_none()
        && unclean_stops == 0
        && effects_stopped
        && effects.unexpected_exits == 0;
    Ok(report)
}

/// The run's outbox table, its business table, the effect consumer's tables
/// and its stream.
async fn prepare(
    config: &ChaosConfig,
    res: &Resources,
    pool: &PgPool,
    js: &jetstream::Context,
) -> Result<PgOutbox, ChaosError> {
    let db = |e: &dyn std::fmt::Display| ChaosError::Database(e.to_string());
    let outbox = PgOutbox::with_options(
        pool.clone(),
        PgOutboxOptions::default().with_schema(&res.schema),
    )
    .map_err(|e| db(&e))?;
    outbox.migrate().await.map_err(|e| db(&e))?;
    sqlx::query(AssertSqlSafe(format!(
        r#"CREATE TABLE "{}".ledger (id UUID PRIMARY KEY, key TEXT NOT NULL, seq BIGINT NOT NULL)"#,
        res.schema
    )))
    .execute(pool)
    .await
    .map_err(|e| db(&e))?;
    crate::effects::prepare(pool, &res.schema).await?;
    js.create_stream(stream::Config {
        name: res.stream.clone(),
        subjects: vec![format!("{}.>", res.prefix)],
        storage: stream::StorageType::File,
        duplicate_window: if config.broker_dedup {
            Duration::from_secs(120)
        } else {
            Duration::from_millis(100)
        },
        ..Default::default()
    })
    .await
    .map_err(|e| ChaosError::Broker(format!("cannot create stream {}: {e}", res.stream)))?;
    std::fs::create_dir_all(&res.dir)
        .map_err(|e| ChaosError::Relay(format!("cannot create {}: {e}", res.dir.display())))?;
    Ok(outbox)
}

/// What the fault phase did.
#[derive(Debug, Default)]
struct FaultLog {
    by_kind: BTreeMap<&'static str, u64>,
    unexpected_exits: u64,
    problems: Vec<String>,
}

/// Injects faults one after another until the run's duration is over: each
/// network fault into a random relay's link (in the first round and every
/// other round after it, into the effect consumer's link of the same kind
/// too: it catches up in the rounds between), each relay fault into a random
/// relay, each consumer kill into the effect consumer.
async fn inject_faults(
    config: &ChaosConfig,
    relays: &mut [RelayProcess],
    effects: &mut EffectConsumer,
) -> Result<FaultLog, ChaosError> {
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(config.seed ^ 0x5eed);
    let mut schedule = Schedule::new(config.faults.clone());
    let mut log = FaultLog::default();
    let mut injected = 0usize;
    while started.elapsed() < config.duration && !config.stop.is_cancelled() {
        let Some(kind) = schedule.next_fault() else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let round = injected / config.faults.len().max(1);
        injected += 1;
        let victim = rng.usize(..relays.len());
        let hold = kind.hold(config.fault_hold, config.lease);
        if kind == FaultKind::ConsumerKill {
            tracing::info!(fault = %kind, ?hold, "injecting into the effect consumer");
            effects.kill_and_restart(hold).await?;
        } else {
            let also = kind
                .link()
                .filter(|_| round.is_multiple_of(2))
                .map(|link| effects.proxy(link));
            tracing::info!(fault = %kind, relay = victim, effect_consumer = also.is_some(), ?hold, "injecting");
            crate::relays::inject(&mut relays[victim], kind, hold, also).await?;
        }
        *log.by_kind.entry(kind.name()).or_default() += 1;
        tokio::time::sleep(config.fault_gap).await;
        for relay in relays.iter_mut() {
            if let Some(exit) = relay.reap_unexpected_exit()? {
                log.unexpected_exits += 1;
                log.problems
                    .push(format!("{exit}; log: {}", relay.log().display()));
            }
        }
        if let Some(exit) = effects.reap_unexpected_exit().await? {
            log.problems.push(exit);
        }
    }
    Ok(log)
}

/// How the drain went.
struct Drained {
    /// Until everything was delivered (or the timeout).
    delivered: Duration,
    /// Until every effect was applied and acked (or the timeout).
    applied: Duration,
    /// On timeout, what was still lacking.
    lacking: Option<String>,
}

/// Waits until the outbox has nothing left to deliver and the recording
/// consumer has as many distinct events as were committed (at most the drain
/// timeout), then until every committed event has its effect and the effect
/// consumer's group has nothing left unacknowledged at the broker (as long
/// as effects are being applied, see [`ChaosConfig::drain_timeout`]).
async fn drain(
    config: &ChaosConfig,
    res: &Resources,
    outbox: &PgOutbox,
    received: &Mutex<Vec<Uuid>>,
    effects: &mut EffectConsumer,
    js: &jetstream::Context,
    faults: &mut FaultLog,
) -> Result<Drained, ChaosError> {
    let db = |e: &dyn std::fmt::Display| ChaosError::Database(e.to_string());
    let committed: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        r#"SELECT count(*) FROM "{}".ledger"#,
        res.schema
    )))
    .fetch_one(outbox.pool())
    .await
    .map_err(|e| db(&e))?;
    let committed = committed.max(0) as u64;
    let started = Instant::now();
    let cap = config.drain_timeout.max(config.duration);
    let mut delivered = None;
    let mut lacking = String::from("nothing checked yet");
    // The fewest effects missing so far, and when that count last fell.
    let mut progress = (u64::MAX, Instant::now());
    loop {
        let waited = match delivered {
            None => started.elapsed() >= config.drain_timeout,
            Some(_) => started.elapsed() >= cap || progress.1.elapsed() >= config.drain_timeout,
        };
        if waited {
            break;
        }
        if let Some(exit) = effects.reap_unexpected_exit().await? {
            faults.problems.push(exit);
        }
        if delivered.is_none() {
            let stats = outbox.stats().await.map_err(|e| db(&e))?;
            let have = lock(received).iter().collect::<HashSet<_>>().len() as u64;
            if stats.pending + stats.in_flight > 0 {
                lacking = format!(
                    "{} outbox rows not delivered",
                    stats.pending + stats.in_flight
                );
            } else if have < committed {
                lacking = format!("the consumer received {have} of {committed} committed events");
            } else {
                delivered = Some(started.elapsed());
            }
        }
        if delivered.is_some() {
            let missing = crate::effects::missing(outbox.pool(), &res.schema).await?;
            if missing < progress.0 {
                progress = (missing, Instant::now());
            }
            lacking = if missing > 0 {
                format!("{missing} of {committed} committed events without an effect")
            } else {
                match crate::effects::settled(js, &res.stream).await {
                    Ok(true) => {
                        return Ok(Drained {
                            delivered: delivered.unwrap_or_default(),
                            applied: started.elapsed(),
                            lacking: None,
                        });
                    }
                    Ok(false) => {
                        "the effect consumer's group has messages not yet acknowledged".to_owned()
                    }
                    Err(e) => e.to_string(),
                }
            };
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(Drained {
        delivered: delivered.unwrap_or_else(|| started.elapsed()),
        applied: started.elapsed(),
        lacking: Some(lacking),
    })
}

/// The report: the checkers' verdicts, the dead letters, the faults.
fn judge(
    config: &ChaosConfig,
    history: &History,
    mut effects: EffectsVerdict,
    logs: &WriterLog,
    dead: &[DeadLetterEntry],
    faults: FaultLog,
) -> ChaosReport {
    let mut verdict = history.check();
    let mut problems = faults.problems;
    let poison: HashSet<Uuid> = logs.poison.iter().copied().collect();
    let poison_dead: Vec<_> = dead.iter().filter(|d| poison.contains(&d.id)).collect();
    if let Some(first) = poison_dead.first() {
        tracing::info!(error = %first.last_error, "a malformed row's dead-letter reason");
    }
    let poison_injected = logs.poison.len() as u64;
    let poison_dead_lettered = poison_dead.len() as u64;
    let other_dead_lettered = dead.len() as u64 - poison_dead_lettered;
    let missing: Vec<_> = config
        .faults
        .iter()
        .filter(|k| !faults.by_kind.contains_key(k.name()))
        .map(|k| k.name())
        .collect();
    if !missing.is_empty() {
        let round = Schedule::new(config.faults.clone()).round(
            config.fault_hold,
            config.lease,
            config.fault_gap,
        );
        problems.push(format!(
            "fault kinds not injected (a round takes {round:?}): {}",
            missing.join(", ")
        ));
    }
    if poison_dead_lettered != poison_injected {
        problems.push(format!(
            "{poison_dead_lettered} of {poison_injected} malformed rows dead-lettered"
        ));
    }
    if other_dead_lettered > 0 {
        problems.push(format!(
            "{other_dead_lettered} well-formed events dead-lettered"
        ));
    }
    if logs.errors > 0 {
        problems.push(format!("{} writer transactions failed", logs.errors));
    }
    if verdict.committed == 0 {
        problems.push("nothing was committed, so nothing was checked".to_owned());
    }
    if !verdict.passed() {
        problems.push("the history check failed".to_owned());
    }
    problems.extend(std::mem::take(&mut verdict.examples));
    if effects.effects_duplicated > 0 {
        problems.push(format!(
            "{} effects applied more than once",
            effects.effects_duplicated
        ));
    }
    if effects.effects_missing > 0 {
        problems.push(format!(
            "{} committed events without an effect",
            effects.effects_missing
        ));
    }
    if effects.effects_phantom > 0 {
        problems.push(format!(
            "{} effects of events never committed",
            effects.effects_phantom
        ));
    }
    if effects.effects_parked > 0 {
        problems.push(format!(
            "{} events parked by the effect consumer",
            effects.effects_parked
        ));
    }
    problems.extend(std::mem::take(&mut effects.examples));
    let passed = verdict.passed()
        && effects.passed()
        && verdict.committed > 0
        && missing.is_empty()
        && poison_dead_lettered == poison_injected
        && other_dead_lettered == 0
        && faults.unexpected_exits == 0
        && logs.errors == 0;
    ChaosReport {
        verdict,
        effects,
        faults_injected: faults.by_kind.values().sum(),
        faults_by_kind: faults.by_kind,
        poison_injected,
        poison_dead_lettered,
        other_dead_lettered,
        relay_restarts: 0,
        relay_unexpected_exits: faults.unexpected_exits,
        relay_unclean_stops: 0,
        consumer_kills: 0,
        consumer_crashes_after_commit: 0,
        consumer_duplicates_skipped: 0,
        consumer_unexpected_exits: 0,
        outbox_rows_start: 0,
        outbox_rows_max: 0,
        outbox_rows_end: 0,
        outbox_bytes_start: 0,
        outbox_bytes_end: 0,
        duration_s: 0.0,
        drain_s: 0.0,
        effects_drain_s: 0.0,
        seed: config.seed,
        passed,
        problems,
    }
}

/// Counts the rows of the run's outbox table and measures its size.
#[derive(Clone)]
struct RowCounter {
    pool: PgPool,
    sql: String,
    size_sql: String,
}

impl RowCounter {
    fn new(pool: &PgPool, schema: &str) -> Self {
        RowCounter {
            pool: pool.clone(),
            sql: format!(r#"SELECT count(*) FROM "{schema}".outbox"#),
            size_sql: format!(r#"SELECT pg_total_relation_size('"{schema}".outbox')"#),
        }
    }

    async fn bytes(&self) -> Result<u64, ChaosError> {
        sqlx::query_scalar::<_, i64>(AssertSqlSafe(self.size_sql.clone()))
            .fetch_one(&self.pool)
            .await
            .map(|n| n.max(0) as u64)
            .map_err(|e| ChaosError::Database(e.to_string()))
    }

    async fn count(&self) -> Result<u64, ChaosError> {
        sqlx::query_scalar::<_, i64>(AssertSqlSafe(self.sql.clone()))
            .fetch_one(&self.pool)
            .await
            .map(|n| n.max(0) as u64)
            .map_err(|e| ChaosError::Database(e.to_string()))
    }

    /// Counts every second until `stop`, logging every tenth count; returns
    /// the largest.
    async fn sample(self, start: u64, stop: CancellationToken) -> u64 {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut max = start;
        for n in 0u64.. {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => break,
            }
            if let Ok(rows) = self.count().await {
                max = max.max(rows);
                if n.is_multiple_of(10) {
                    tracing::info!(outbox_rows = rows, "outbox size");
                }
            }
        }
        max
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Written;

    fn config() -> ChaosConfig {
        ChaosConfig::new(String::new(), String::new(), PathBuf::new())
    }

    fn every_fault_once() -> FaultLog {
        FaultLog {
            by_kind: FaultKind::ALL.iter().map(|k| (k.name(), 1)).collect(),
            ..FaultLog::default()
        }
    }

    fn history(n: u64) -> History {
        let committed: Vec<Written> = (1..=n)
            .map(|seq| Written::new(Uuid::now_v7(), "k", seq))
            .collect();
        let received = committed.iter().map(|w| w.id).collect();
        History {
            committed,
            aborted: vec![],
            received,
        }
    }

    /// Every committed event's effect, once.
    fn effects(history: &History) -> EffectsVerdict {
        Effects {
            committed: history.committed.clone(),
            applied: history.committed.iter().map(|w| w.id).collect(),
            parked: 0,
        }
        .check()
    }

    #[test]
    fn the_json_line_starts_with_the_checker_fields_in_order() {
        let report = judge(
            &config(),
            &history(3),
            effects(&history(3)),
            &WriterLog::default(),
            &[],
            every_fault_once(),
        );
        assert!(report.passed, "{:?}", report.problems);
        let line = serde_json::to_string(&report).unwrap();
        let expected = [
            "committed",
            "aborted",
            "delivered_unique",
            "lost",
            "phantom",
            "order_violations",
            "duplicates",
            "effects_applied",
            "effects_duplicated",
            "effects_missing",
            "effects_phantom",
            "effects_parked",
            "faults_injected",
            "relay_unclean_stops",
            "consumer_kills",
            "consumer_crashes_after_commit",
            "consumer_duplicates_skipped",
            "consumer_unexpected_exits",
            "outbox_rows_start",
            "seed",
            "passed",
        ];
        let mut at = 0;
        for key in expected {
            let pos = line[at..]
                .find(&format!("\"{key}\":"))
                .unwrap_or_else(|| panic!("{key} missing or out of order in {line}"));
            at += pos;
        }
        assert!(line.contains("\"faults_by_kind\":{"), "{line}");
        assert!(line.starts_with("{\"committed\":3,"), "{line}");
        assert!(line.contains("\"faults_injected\":13"), "{line}");
        assert!(line.contains("\"consumer_kill\":1"), "{line}");
        assert!(
            line.contains(
                "\"effects_applied\":3,\"effects_duplicated\":0,\"effects_missing\":0,\"effects_phantom\":0,\"effects_parked\":0"
            ),
            "{line}"
        );
    }

    #[test]
    fn a_run_fails_on_what_the_checker_cannot_see() {
        let mut missing = every_fault_once();
        missing.by_kind.remove("relay_pause");
        let report = judge(
            &config(),
            &history(3),
            effects(&history(3)),
            &WriterLog::default(),
            &[],
            missing,
        );
        assert!(!report.passed);
        assert!(
            report.problems[0].contains("relay_pause"),
            "{:?}",
            report.problems
        );

        let poisoned = WriterLog {
            poison: vec![Uuid::now_v7()],
            ..WriterLog::default()
        };
        let report = judge(
            &config(),
            &history(3),
            effects(&history(3)),
            &poisoned,
            &[],
            every_fault_once(),
        );
        assert!(!report.passed);
        assert!(
            report.problems[0].contains("0 of 1 malformed rows"),
            "{:?}",
            report.problems
        );

        let report = judge(
            &config(),
            &history(0),
            effects(&history(0)),
            &WriterLog::default(),
            &[],
            every_fault_once(),
        );
        assert!(!report.passed, "a run that checked nothing does not pass");

        let mut lossy = history(3);
        lossy.received.pop();
        let report = judge(
            &config(),
            &lossy,
            effects(&lossy),
            &WriterLog::default(),
            &[],
            every_fault_once(),
        );
        assert!(!report.passed);
        assert_eq!(report.verdict.lost, 1);
        assert!(
            report.problems.iter().any(|p| p.starts_with("lost")),
            "{:?}",
            report.problems
        );
    }

    #[test]
    fn a_run_fails_when_an_effect_is_duplicated_missing_phantom_or_parked() {
        let h = history(4);
        let c = |i: usize| h.committed[i].id;
        let judged = |applied: Vec<Uuid>, parked: u64| {
            let effects = Effects {
                committed: h.committed.clone(),
                applied,
                parked,
            }
            .check();
            judge(
                &config(),
                &h,
                effects,
                &WriterLog::default(),
                &[],
                every_fault_once(),
            )
        };

        // The history check passes, but event 1's effect was applied twice.
        let twice = judged(vec![c(0), c(1), c(2), c(3), c(1)], 0);
        assert!(twice.verdict.passed());
        assert!(!twice.passed);
        assert_eq!(twice.effects.effects_duplicated, 1);
        assert!(
            twice.problems[0].contains("1 effects applied more than once"),
            "{:?}",
            twice.problems
        );
        assert!(
            twice.problems.iter().any(|p| p.contains(&c(1).to_string())),
            "{:?}",
            twice.problems
        );
        let line = serde_json::to_string(&twice).unwrap();
        assert!(line.contains("\"effects_duplicated\":1,"), "{line}");
        assert!(line.contains("\"passed\":false"), "{line}");

        let missing = judged(vec![c(0), c(1), c(2)], 0);
        assert!(!missing.passed);
        assert_eq!(missing.effects.effects_missing, 1);
        assert!(
            missing.problems[0].contains("1 committed events without an effect"),
            "{:?}",
            missing.problems
        );

        let phantom = judged(vec![c(0), c(1), c(2), c(3), Uuid::now_v7()], 0);
        assert!(!phantom.passed);
        assert_eq!(phantom.effects.effects_phantom, 1);

        let parked = judged(vec![c(0), c(1), c(2), c(3)], 2);
        assert!(!parked.passed);
        assert!(
            parked.problems[0].contains("2 events parked"),
            "{:?}",
            parked.problems
        );

        let exactly_once = judged(vec![c(3), c(2), c(1), c(0)], 0);
        assert!(exactly_once.passed, "{:?}", exactly_once.problems);
    }
}
