//! The chaos run: writers, relays under faults, a consumer, then the checker.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use proclaim_core::{Event, OutboxStore};
use proclaim_postgres::{PgOutbox, PgOutboxOptions};
use serde::Serialize;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::ChaosError;
use crate::faults::{FaultKind, Link, Schedule};
use crate::history::{History, Written};
use crate::proxy::{FaultMode, FaultProxy};
use crate::relays::{RelayProcess, RelaySpec};

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
    /// The faults to inject, in order, round after round.
    pub faults: Vec<FaultKind>,
    /// How long a fault lasts (a pause lasts 1.5 leases).
    pub fault_hold: Duration,
    /// Healthy time between two faults.
    pub fault_gap: Duration,
    /// The relays' lease (short, so failover happens within the run).
    pub lease: Duration,
    /// How long to wait after the writers stop for every event to arrive.
    pub drain_timeout: Duration,
    /// Seed of the writers' and the fault victims' randomness.
    pub seed: u64,
    /// Keep the schema, the stream and the relay logs afterwards.
    pub keep: bool,
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
            seed: fastrand::u64(..),
            keep: false,
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

/// The outcome: the checker's counts first (the fields of the one JSON line
/// `proclaim chaos` prints), then what was injected and what the outbox did.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    /// Events committed (read from the business table).
    pub committed: u64,
    /// Events rolled back.
    pub aborted: u64,
    /// Committed events the consumer received.
    pub delivered_unique: u64,
    /// Committed events never received.
    pub lost: u64,
    /// Received events that were never committed.
    pub phantom: u64,
    /// First deliveries out of their key's commit order.
    pub order_violations: u64,
    /// Deliveries beyond the first.
    pub duplicates: u64,
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
    /// Outbox rows when the faults started, at most during the run, at the end.
    pub outbox_rows_start: u64,
    /// See `outbox_rows_start`.
    pub outbox_rows_max: u64,
    /// See `outbox_rows_start`. Only dead letters remain after a drain.
    pub outbox_rows_end: u64,
    /// Seconds of writing under faults.
    pub duration_s: f64,
    /// Seconds from the writers' stop until everything was delivered.
    pub drain_s: f64,
    /// The seed (rerun with `--seed` to get the same writes and victims).
    pub seed: u64,
    /// Every check held.
    pub passed: bool,
    /// Why it did not pass, and example ids.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// What one run set up, torn down at the end.
struct Resources {
    schema: String,
    stream: String,
    prefix: String,
    dir: PathBuf,
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
        .acquire_timeout(Duration::from_secs(10))
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
    let db = |e: sqlx::Error| ChaosError::Database(e.to_string());
    let outbox = PgOutbox::with_options(
        pool.clone(),
        PgOutboxOptions::default().with_schema(&res.schema),
    )
    .map_err(|e| ChaosError::Database(e.to_string()))?;
    outbox
        .migrate()
        .await
        .map_err(|e| ChaosError::Database(e.to_string()))?;
    sqlx::query(AssertSqlSafe(format!(
        r#"CREATE TABLE "{}".ledger (id UUID PRIMARY KEY, key TEXT NOT NULL, seq BIGINT NOT NULL)"#,
        res.schema
    )))
    .execute(pool)
    .await
    .map_err(db)?;
    js.create_stream(stream::Config {
        name: res.stream.clone(),
        subjects: vec![format!("{}.>", res.prefix)],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| ChaosError::Broker(format!("cannot create stream {}: {e}", res.stream)))?;
    std::fs::create_dir_all(&res.dir)
        .map_err(|e| ChaosError::Relay(format!("cannot create {}: {e}", res.dir.display())))?;

    let received = Arc::new(Mutex::new(Vec::<Uuid>::new()));
    let stop_consumer = CancellationToken::new();
    let consumer = tokio::spawn(consume(
        js.clone(),
        res.stream.clone(),
        received.clone(),
        stop_consumer.clone(),
    ));

    let mut relays = start_relays(config, res).await?;
    let rows_sql = format!(r#"SELECT count(*) FROM "{}".outbox"#, res.schema);
    let count_rows = || async {
        sqlx::query_scalar::<_, i64>(AssertSqlSafe(rows_sql.clone()))
            .fetch_one(pool)
            .await
            .map(|n| n.max(0) as u64)
    };
    let outbox_rows_start = count_rows().await.map_err(db)?;

    // Writers and the row sampler run while faults are injected.
    let stop_writers = CancellationToken::new();
    let writers: Vec<JoinHandle<WriterLog>> = (0..config.writers)
        .map(|w| {
            tokio::spawn(write(
                config.clone(),
                w,
                outbox.clone(),
                res.schema.clone(),
                stop_writers.clone(),
            ))
        })
        .collect();
    let max_rows = Arc::new(std::sync::atomic::AtomicU64::new(outbox_rows_start));
    let sampler = tokio::spawn(sample_rows(
        pool.clone(),
        rows_sql.clone(),
        max_rows.clone(),
        stop_writers.clone(),
    ));

    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(config.seed ^ 0x5eed);
    let mut schedule = Schedule::new(config.faults.clone());
    let mut faults_by_kind: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut unexpected_exits = 0;
    while started.elapsed() < config.duration {
        let Some(kind) = schedule.next_fault() else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let victim = rng.usize(..relays.len());
        let hold = kind.hold(config.fault_hold, config.lease);
        tracing::info!(fault = %kind, relay = victim, ?hold, "injecting");
        inject(&mut relays[victim], kind, hold).await?;
        *faults_by_kind.entry(kind.name()).or_default() += 1;
        tokio::time::sleep(config.fault_gap).await;
        for relay in &mut relays {
            if let Some(exit) = relay.reap_unexpected_exit()? {
                unexpected_exits += 1;
                problems.push(format!("{exit}; log: {}", relay.log().display()));
            }
        }
    }
    stop_writers.cancel();
    let duration_s = started.elapsed().as_secs_f64();
    let mut logs = WriterLog::default();
    for writer in writers {
        let log = writer
            .await
            .map_err(|e| ChaosError::Relay(format!("writer task failed: {e}")))?;
        logs.merge(log);
    }
    let _ = sampler.await;

    // Heal: every link passes, every relay runs; wait for the outbox to drain
    // and the consumer to have everything.
    for relay in &mut relays {
        relay.db.set_mode(FaultMode::Pass);
        relay.broker.set_mode(FaultMode::Pass);
        relay.set_paused(false);
        relay.start()?;
    }
    let drain_started = Instant::now();
    let ledger_sql = format!(r#"SELECT count(*) FROM "{}".ledger"#, res.schema);
    let committed_count: i64 = sqlx::query_scalar(AssertSqlSafe(ledger_sql))
        .fetch_one(pool)
        .await
        .map_err(db)?;
    let mut drained = false;
    while drain_started.elapsed() < config.drain_timeout {
        let stats = outbox
            .stats()
            .await
            .map_err(|e| ChaosError::Database(e.to_string()))?;
        let have = lock(&received).iter().collect::<HashSet<_>>().len();
        if stats.pending + stats.in_flight == 0 && have as i64 >= committed_count {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let drain_s = drain_started.elapsed().as_secs_f64();
    if !drained {
        problems.push(format!("not drained within {:?}", config.drain_timeout));
    }
    let mut unclean_stops = 0;
    for relay in &mut relays {
        if !relay.stop(Duration::from_secs(20)).await {
            unclean_stops += 1;
            problems.push(format!(
                "relay {} did not exit 0 on SIGTERM; log: {}",
                relay.index,
                relay.log().display()
            ));
        }
    }
    // Anything still in flight to the consumer arrives now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_consumer.cancel();
    if let Ok(Err(e)) = consumer.await {
        problems.push(format!("consumer: {e}"));
    }

    // The truth and the check.
    let committed = read_ledger(pool, &res.schema).await.map_err(db)?;
    let history = History {
        committed,
        aborted: logs.aborted,
        received: std::mem::take(&mut *lock(&received)),
    };
    let verdict = history.check();
    let dead = outbox
        .dead_letters(u32::MAX)
        .await
        .map_err(|e| ChaosError::Database(e.to_string()))?;
    let poison: HashSet<Uuid> = logs.poison.iter().copied().collect();
    let poison_dead: Vec<_> = dead.iter().filter(|d| poison.contains(&d.id)).collect();
    if let Some(first) = poison_dead.first() {
        tracing::info!(error = %first.last_error, "a poison event's dead-letter reason");
    }
    let poison_dead_lettered = poison_dead.len() as u64;
    let other_dead_lettered = dead.len() as u64 - poison_dead_lettered;
    let outbox_rows_end = count_rows().await.map_err(db)?;

    let relay_restarts = relays.iter().map(|r| r.restarts).sum();
    let faults_injected = faults_by_kind.values().sum();
    let missing: Vec<_> = config
        .faults
        .iter()
        .filter(|k| !faults_by_kind.contains_key(k.name()))
        .map(|k| k.name())
        .collect();
    if !missing.is_empty() {
        problems.push(format!(
            "fault kinds not injected (run longer than {:?}): {}",
            Schedule::new(config.faults.clone()).round(
                config.fault_hold,
                config.lease,
                config.fault_gap
            ),
            missing.join(", ")
        ));
    }
    if poison_dead_lettered != logs.poison.len() as u64 {
        problems.push(format!(
            "{} of {} malformed rows dead-lettered",
            poison_dead_lettered,
            logs.poison.len()
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
    if !verdict.passed() {
        problems.push("the history check failed".to_owned());
    }
    problems.extend(verdict.examples.iter().cloned());
    let passed = verdict.passed()
        && drained
        && missing.is_empty()
        && poison_dead_lettered == logs.poison.len() as u64
        && other_dead_lettered == 0
        && unexpected_exits == 0
        && unclean_stops == 0;
    Ok(ChaosReport {
        committed: verdict.committed,
        aborted: verdict.aborted,
        delivered_unique: verdict.delivered_unique,
        lost: verdict.lost,
        phantom: verdict.phantom,
        order_violations: verdict.order_violations,
        duplicates: verdict.duplicates,
        faults_injected,
        faults_by_kind,
        poison_injected: logs.poison.len() as u64,
        poison_dead_lettered,
        other_dead_lettered,
        relay_restarts,
        relay_unexpected_exits: unexpected_exits,
        relay_unclean_stops: unclean_stops,
        outbox_rows_start,
        outbox_rows_max: max_rows.load(std::sync::atomic::Ordering::Relaxed),
        outbox_rows_end,
        duration_s: round2(duration_s),
        drain_s: round2(drain_s),
        seed: config.seed,
        passed,
        problems,
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Injects one fault into one relay and heals it after `hold`.
async fn inject(
    relay: &mut RelayProcess,
    kind: FaultKind,
    hold: Duration,
) -> Result<(), ChaosError> {
    let proxy = match kind.link() {
        Some(Link::Db) => Some(&relay.db),
        Some(Link::Broker) => Some(&relay.broker),
        None => None,
    };
    match (kind, proxy) {
        (FaultKind::RelayKill, _) => {
            relay.kill().await;
            tokio::time::sleep(hold).await;
            relay.restarts += 1;
            relay.start()?;
        }
        (FaultKind::RelayPause, _) => {
            relay.set_paused(true);
            tokio::time::sleep(hold).await;
            relay.set_paused(false);
        }
        (FaultKind::DbDrop | FaultKind::BrokerDrop, Some(proxy)) => {
            // Cut twice: the live connections, then the ones made since.
            proxy.drop_all();
            tokio::time::sleep(hold / 2).await;
            proxy.drop_all();
            tokio::time::sleep(hold / 2).await;
        }
        (FaultKind::DbReset | FaultKind::BrokerReset, Some(proxy)) => {
            proxy.reset_all();
            tokio::time::sleep(hold / 2).await;
            proxy.reset_all();
            tokio::time::sleep(hold / 2).await;
        }
        (_, Some(proxy)) => {
            let mode = match kind {
                FaultKind::DbDelay | FaultKind::BrokerDelay => {
                    FaultMode::Delay(Duration::from_millis(200))
                }
                FaultKind::DbBlackhole | FaultKind::BrokerBlackhole => FaultMode::Blackhole,
                _ => FaultMode::Refuse,
            };
            proxy.set_mode(mode);
            tokio::time::sleep(hold).await;
            proxy.set_mode(FaultMode::Pass);
        }
        (_, None) => {}
    }
    Ok(())
}

/// Starts the relay processes, each behind its own proxies.
async fn start_relays(
    config: &ChaosConfig,
    res: &Resources,
) -> Result<Vec<RelayProcess>, ChaosError> {
    let db_url = url::Url::parse(&config.database_url)
        .map_err(|e| ChaosError::Config(format!("database URL: {e}")))?;
    let nats_url = url::Url::parse(&config.nats_url)
        .map_err(|e| ChaosError::Config(format!("NATS URL: {e}")))?;
    let toml = res.dir.join("relay.toml");
    std::fs::write(&toml, relay_toml(config))
        .map_err(|e| ChaosError::Relay(format!("cannot write {}: {e}", toml.display())))?;
    let mut relays = Vec::with_capacity(config.relays);
    for index in 0..config.relays {
        let db = proxy_to(&db_url, 5432).await?;
        let broker = proxy_to(&nats_url, 4222).await?;
        let spec = RelaySpec {
            program: config.relay_program.clone(),
            args: vec![
                "--config".into(),
                toml.display().to_string(),
                "--database-url".into(),
                through(&db_url, &db)?,
                "--schema".into(),
                res.schema.clone(),
                "relay".into(),
                "--nats-url".into(),
                through(&nats_url, &broker)?,
                "--stream".into(),
                res.stream.clone(),
                "--subject-prefix".into(),
                res.prefix.clone(),
            ],
            log: res.dir.join(format!("relay-{index}.log")),
        };
        let mut relay = RelayProcess::new(index, db, broker, spec);
        relay.start()?;
        relays.push(relay);
    }
    Ok(relays)
}

/// Relay settings for a run: a short lease and short backoffs so failover
/// and recovery happen within seconds, and attempts that never run out (a
/// well-formed event must never be dead-lettered by an injected fault).
fn relay_toml(config: &ChaosConfig) -> String {
    let lease = humantime::format_duration(config.lease);
    format!(
        r#"[relay]
batch_size = 64
lease = "{lease}"
publish_timeout = "1s"
poll_interval = "250ms"
max_attempts = 1000000
shutdown_timeout = "10s"
stats_interval = "5s"

[relay.backoff]
initial = "50ms"
max = "1s"

[relay.outage_backoff]
initial = "50ms"
max = "1s"

[nats]
connect_timeout = "2s"
"#
    )
}

async fn proxy_to(url: &url::Url, default_port: u16) -> Result<FaultProxy, ChaosError> {
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| {
        ChaosError::Config(format!(
            "{url} has no host (a socket path cannot be proxied)"
        ))
    })?;
    let port = url.port().unwrap_or(default_port);
    FaultProxy::start((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| ChaosError::Relay(format!("cannot start a proxy to {host}:{port}: {e}")))
}

/// `url` with its host and port replaced by the proxy's.
fn through(url: &url::Url, proxy: &FaultProxy) -> Result<String, ChaosError> {
    let original = url;
    let mut url = url.clone();
    let bad = |_| ChaosError::Config(format!("cannot point {original} at a proxy"));
    url.set_host(Some("127.0.0.1")).map_err(bad)?;
    url.set_port(Some(proxy.port()))
        .map_err(|()| ChaosError::Config("URL cannot have a port".into()))?;
    Ok(url.to_string())
}

/// What a writer did besides committing.
#[derive(Debug, Default)]
struct WriterLog {
    aborted: Vec<Written>,
    poison: Vec<Uuid>,
    errors: u64,
}

impl WriterLog {
    fn merge(&mut self, other: WriterLog) {
        self.aborted.extend(other.aborted);
        self.poison.extend(other.poison);
        self.errors += other.errors;
    }
}

/// One writer: owns keys `w, w + writers, …`, so within a key its sequence
/// numbers follow commit order.
async fn write(
    config: ChaosConfig,
    w: usize,
    outbox: PgOutbox,
    schema: String,
    stop: CancellationToken,
) -> WriterLog {
    let mut log = WriterLog::default();
    let mut rng = fastrand::Rng::with_seed(config.seed.wrapping_add(w as u64));
    let keys: Vec<String> = (w..config.keys)
        .step_by(config.writers)
        .map(|k| format!("k{k:04}"))
        .collect();
    let mut next_seq = vec![1u64; keys.len()];
    let period = Duration::from_secs_f64(config.writers as f64 / f64::from(config.rate));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_poison = config.poison_every.map(|p| Instant::now() + p);
    let ledger = format!(r#"INSERT INTO "{schema}".ledger (id, key, seq) VALUES ($1, $2, $3)"#);
    let poison_sql = format!(
        r#"INSERT INTO "{schema}".outbox (id, event_type, source, subject, event_time, datacontenttype, data, metadata)
           VALUES ($1, 'ChaosStep', 'proclaim-chaos', $2, now(), 'application/json', '{{}}', '{{"Not A Valid Name!": "x"}}')"#
    );
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return log,
        }
        let k = rng.usize(..keys.len());
        let key = &keys[k];
        if w == 0 && next_poison.is_some_and(|t| Instant::now() >= t) {
            next_poison = config.poison_every.map(|p| Instant::now() + p);
            let id = Uuid::now_v7();
            match sqlx::query(AssertSqlSafe(poison_sql.clone()))
                .bind(id)
                .bind(key)
                .execute(outbox.pool())
                .await
            {
                Ok(_) => log.poison.push(id),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write a poison row");
                    log.errors += 1;
                }
            }
        }
        let n = rng.u64(1..=3);
        let events: Vec<Written> = (0..n)
            .map(|i| Written::new(Uuid::now_v7(), key.clone(), next_seq[k] + i))
            .collect();
        next_seq[k] += n;
        let abort = rng.f64() < config.abort_ratio;
        match transaction(&outbox, &ledger, &events, abort).await {
            Ok(()) if abort => log.aborted.extend(events),
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "writer transaction failed");
                log.errors += 1;
            }
        }
    }
}

/// The business write and its events in one transaction.
async fn transaction(
    outbox: &PgOutbox,
    ledger: &str,
    events: &[Written],
    abort: bool,
) -> Result<(), ChaosError> {
    let err = |e: &dyn std::fmt::Display| ChaosError::Database(e.to_string());
    let mut tx = outbox.pool().begin().await.map_err(|e| err(&e))?;
    for w in events {
        sqlx::query(AssertSqlSafe(ledger.to_owned()))
            .bind(w.id)
            .bind(&w.key)
            .bind(i64::try_from(w.seq).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await
            .map_err(|e| err(&e))?;
        let event = Event::builder("ChaosStep")
            .id(w.id)
            .source("proclaim-chaos")
            .subject(&w.key)
            .data(&serde_json::json!({ "key": w.key, "seq": w.seq }))
            .build()
            .map_err(|e| err(&e))?;
        outbox.enqueue(&mut tx, &event).await.map_err(|e| err(&e))?;
    }
    if abort {
        tx.rollback().await.map_err(|e| err(&e))
    } else {
        tx.commit().await.map_err(|e| err(&e))
    }
}

async fn read_ledger(pool: &PgPool, schema: &str) -> Result<Vec<Written>, sqlx::Error> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        r#"SELECT id, key, seq FROM "{schema}".ledger ORDER BY key, seq"#
    )))
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let seq: i64 = r.try_get(2)?;
            Ok(Written::new(
                r.try_get(0)?,
                r.try_get::<String, _>(1)?,
                seq.max(0) as u64,
            ))
        })
        .collect()
}

/// Samples the outbox's row count every second, keeping the maximum.
async fn sample_rows(
    pool: PgPool,
    sql: String,
    max: Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        if let Ok(rows) = sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql.clone()))
            .fetch_one(&pool)
            .await
        {
            let rows = rows.max(0) as u64;
            max.fetch_max(rows, std::sync::atomic::Ordering::Relaxed);
            if n.is_multiple_of(10) {
                tracing::info!(outbox_rows = rows, "outbox size");
            }
        }
        n += 1;
    }
}

/// Reads every message of the stream in stream order and records its event id.
async fn consume(
    js: jetstream::Context,
    stream: String,
    received: Arc<Mutex<Vec<Uuid>>>,
    stop: CancellationToken,
) -> Result<(), ChaosError> {
    let broker = |e: &dyn std::fmt::Display| ChaosError::Broker(format!("consumer: {e}"));
    let stream = js.get_stream(&stream).await.map_err(|e| broker(&e))?;
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ack_policy: jetstream::consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .map_err(|e| broker(&e))?;
    let mut messages = consumer.messages().await.map_err(|e| broker(&e))?;
    loop {
        let next = tokio::select! {
            m = messages.next() => m,
            () = stop.cancelled() => return Ok(()),
        };
        match next {
            Some(Ok(message)) => match proclaim_nats::decode_message(&message) {
                Ok(event) => lock(&received).push(event.id()),
                Err(e) => tracing::warn!(error = %e, "undecodable message"),
            },
            Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
            None => return Err(broker(&"the message stream ended")),
        }
    }
}
