//! `broker`: how fast the relay empties an outbox that already holds N
//! events into any broker proclaim publishes to, measured as `drain` does.
//!
//! The destination is a URL as for `proclaim relay --destination`
//! ([`NamedDestination::parse`]): the scheme picks the broker, query
//! parameters set the publisher (a webhook's go in the fragment). The bench
//! replaces the settings that name where messages go, so each run and role
//! sends to a destination of its own, created before and removed after (see
//! [`crate::targets`]); `http://127.0.0.1:0/…` sends to a local sink.
//!
//! Each run writes N events (not timed), starts one relay with the
//! destination's publisher (an [`AnyPublisher`], connected before the clock
//! starts) and times until the outbox is empty: the relay deletes a row only
//! once the broker has acknowledged its event, so an empty outbox means
//! every event was acknowledged. Afterwards the relay's report must say N
//! published and none dead-lettered; retries are reported. On the same
//! events it measures two baselines:
//!
//! - (a') **proclaim's own publisher**, not a raw client: the same N events
//!   published through a fresh [`AnyPublisher`] of the same destination,
//!   with no store, up to `--publish-window` publishes in flight but one at
//!   a time per subject (the order the relay keeps);
//! - (b) a bare loop claiming-and-deleting the same rows, `--batch-size` per
//!   statement, as in `drain` ([`BenchDb::claim_delete_all`]).
//!
//! H = 1/(1/a' + 1/b) is what the relay would reach doing (a') and (b) one
//! after the other with no overlap; relay/H is the relay's gain from
//! pipelining (above 1) or its overhead (below 1) **over its own
//! publisher**: unlike `drain`'s (a), (a') already includes the publisher's
//! cost, so this ratio does not compare proclaim with a raw client.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use clap::Args;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use proclaim::destination::{AnyPublisher, Destination, NamedDestination};
use proclaim::{Event, OutboxRecord, Publisher, Relay, RelayConfig, RelayHandle, RelayReport};
use serde_json::json;
use tokio::time::{Instant, MissedTickBehavior};

use crate::db::{BenchDb, Db, StoreKind};
use crate::drain::write;
use crate::env::{donor_events, unique_suffix};
use crate::output::{Output, merge};
use crate::rates::{Rates, RatesSummary};
use crate::targets::{Target, Targets};
use crate::{Common, Scratch};

/// How often the end of a drain is checked.
/// The column of baseline (a).
const PUBLISH: &str = "(a') publisher ev/s";
const POLL: Duration = Duration::from_millis(10);
/// How long the cleanup waits for a relay still running after Ctrl-C.
const SHUTDOWN: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub(crate) struct BrokerArgs {
    /// Where the relay publishes: a destination URL (`nats://…`, `amqp://…`,
    /// `redis://…`, `mqtt://…`, `http(s)://…`) with any publisher settings;
    /// the stream / exchange / key / topic are the bench's own per run.
    /// `http://127.0.0.1:0/PATH` starts a local sink that answers 204.
    #[arg(long)]
    destination: String,
    /// The outbox store: PostgreSQL (`--database-url`), SQLite (a fresh file
    /// under `--sqlite-dir`) or MariaDB / MySQL (`--mysql-url`).
    #[arg(long, value_enum, default_value_t = StoreKind::Postgres)]
    store: StoreKind,
    /// Events per run [default: 100000, or 5000 with --quick].
    #[arg(long)]
    events: Option<usize>,
    /// Runs [default: 5, or 2 with --quick].
    #[arg(long)]
    runs: Option<usize>,
    /// The relay's batch size, and the claim-and-delete baseline's.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Distinct subjects (ordering keys) the events are spread over.
    #[arg(long, default_value_t = 1000)]
    subjects: usize,
    /// Publishes in flight at once in the publisher baseline (a'), one per
    /// subject at most (the relay's own limit is its default
    /// `max_concurrent_publishes`, 256, per batch).
    #[arg(long, default_value_t = 256)]
    publish_window: usize,
    /// Give up on a drain that takes longer than this.
    #[arg(long, default_value = "10m", value_parser = proclaim::parse_duration)]
    timeout: Duration,
    /// A seconds-long smoke test: 5000 events, 2 runs (unless given).
    #[arg(long)]
    quick: bool,
}

/// The scenario's database and broker, and the relay while it runs.
pub(crate) struct BrokerEnv {
    db: Db,
    targets: Targets,
    /// Kept here rather than on the scenario's task, so that after Ctrl-C
    /// the cleanup stops it before removing its destination and table.
    relay: Mutex<Option<RelayHandle>>,
}

impl BrokerEnv {
    /// Parses the destination, connects to its broker and creates the
    /// scenario's database on `--store`.
    pub(crate) async fn new(common: &Common, args: &BrokerArgs) -> anyhow::Result<Self> {
        let destination = NamedDestination::parse(&args.destination)?.destination;
        let suffix = unique_suffix("broker");
        let targets = Targets::connect(destination, &suffix).await?;
        // Last, so that nothing is left to remove when an earlier step fails.
        let db = Db::create(args.store, common, &suffix).await?;
        Ok(BrokerEnv {
            db,
            targets,
            relay: Mutex::new(None),
        })
    }

    /// The running relay, if any, taken out of its slot.
    fn take_relay(&self) -> Option<RelayHandle> {
        self.relay.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// The running relay's report so far.
    fn relay_report(&self) -> Option<RelayReport> {
        let relay = self.relay.lock().unwrap_or_else(|e| e.into_inner());
        relay.as_ref().map(RelayHandle::report)
    }
}

impl Scratch for BrokerEnv {
    async fn cleanup(&self) -> anyhow::Result<()> {
        let mut failures = Vec::new();
        if let Some(relay) = self.take_relay()
            && tokio::time::timeout(SHUTDOWN, relay.shutdown())
                .await
                .is_err()
        {
            failures.push(format!("the relay did not stop within {SHUTDOWN:?}"));
        }
        failures.extend(self.targets.cleanup().await);
        if let Err(failure) = self.db.cleanup().await {
            failures.push(failure);
        }
        if !failures.is_empty() {
            bail!("could not remove {}", failures.join("; "));
        }
        Ok(())
    }
}

/// The figures of one run, in events per second, and the relay's retries.
#[derive(Debug, Clone, Copy)]
struct RunResult {
    rates: Rates,
    retried: u64,
    released: u64,
}

pub(crate) async fn run(env: Arc<BrokerEnv>, args: BrokerArgs, out: Output) -> anyhow::Result<()> {
    match &env.db {
        Db::Postgres(db) => run_on(&env, db, &args, out).await,
        Db::Sqlite(db) => run_on(&env, db, &args, out).await,
        Db::MySql(db) => run_on(&env, db.as_ref(), &args, out).await,
    }
}

async fn run_on<D: BenchDb>(
    env: &BrokerEnv,
    db: &D,
    args: &BrokerArgs,
    out: Output,
) -> anyhow::Result<()> {
    let targets = &env.targets;
    let events = args
        .events
        .unwrap_or(if args.quick { 5_000 } else { 100_000 });
    let runs = args.runs.unwrap_or(if args.quick { 2 } else { 5 });
    ensure!(
        events > 0 && runs > 0,
        "--events and --runs must be at least 1"
    );
    ensure!(
        args.publish_window > 0,
        "--publish-window must be at least 1"
    );
    let config = RelayConfig::default().with_batch_size(args.batch_size);
    config.validate()?;
    db.migrate().await?;

    out.line(format!(
        "broker on {} → {}: {events} events per run, {runs} runs, batch size {}, {} subjects, \
         publish window {}; {}; {}",
        D::NAME,
        targets.describe(),
        args.batch_size,
        args.subjects,
        args.publish_window,
        db.describe(),
        targets.naming(),
    ))?;
    out.line(
        "baseline (a') is proclaim's own publisher for this broker (a fresh AnyPublisher, no \
         store), not a raw client: relay/H is the relay's overhead over its own publisher",
    )?;
    out.line(Rates::header(PUBLISH))?;
    let mut results = Vec::with_capacity(runs);
    for n in 1..=runs {
        let r = one_run(env, db, args, &config, n, events)
            .await
            .with_context(|| format!("run {n}"))?;
        let note = if r.retried + r.released > 0 {
            format!(
                "  ({} retried, {} released by the relay)",
                r.retried, r.released
            )
        } else {
            String::new()
        };
        out.line(format!("{}{note}", r.rates.row(&n.to_string(), PUBLISH)))?;
        results.push(r);
    }

    let summary = RatesSummary::of(&results.iter().map(|r| r.rates).collect::<Vec<_>>());
    for line in summary.rows(PUBLISH) {
        out.line(line)?;
    }

    let mut line = json!({
        "scenario": "broker",
        "broker": targets.kind(),
        "destination": targets.describe(),
        "store": D::NAME,
        "events": events,
        "runs": runs,
        "batch_size": args.batch_size,
        "subjects": args.subjects,
        "publish_window": args.publish_window,
        // (a'): proclaim's own publisher, not a raw client.
        "baseline_publish_kind": "proclaim publisher",
        "retried": results.iter().map(|r| r.retried).sum::<u64>(),
        "per_run": results.iter().map(|r| {
            let mut run = r.rates.json();
            run.insert("retried".into(), r.retried.into());
            run.insert("released".into(), r.released.into());
            run
        }).collect::<Vec<_>>(),
    });
    merge(&mut line, summary.json());
    out.json(&line)?;
    Ok(())
}

async fn one_run<D: BenchDb>(
    env: &BrokerEnv,
    db: &D,
    args: &BrokerArgs,
    config: &RelayConfig,
    run: usize,
    n: usize,
) -> anyhow::Result<RunResult> {
    let targets = &env.targets;
    // Fresh events (fresh ids) each run.
    let events = donor_events(n, args.subjects)?;

    // (b) bare claim-and-delete of the pre-written rows.
    write(db, &events).await?;
    let claim_delete = db.claim_delete_all(args.batch_size, n).await?;

    // The relay, on the same rows written again, into a destination of its own.
    write(db, &events).await?;
    let target = targets.create(run, "relay").await?;
    let drained = relay_drain(env, db, config, &target, args.timeout)
        .await
        .and_then(|drained| check_sink(&target, n).map(|()| drained));
    let removed = targets.remove(target).await;
    let (relay, report) = drained?;
    removed?;
    ensure!(
        report.dead_lettered == 0,
        "the relay dead-lettered {} events",
        report.dead_lettered
    );
    ensure!(
        report.published == n as u64,
        "the relay reported {} publishes for {n} events",
        report.published
    );

    // (a') the same events through a fresh publisher of the same broker.
    let target = targets.create(run, "bare").await?;
    let published = publish_direct(&target, &events, args.publish_window, config)
        .await
        .and_then(|took| check_sink(&target, n).map(|()| took));
    let removed = targets.remove(target).await;
    let publish = published?;
    removed?;

    Ok(RunResult {
        rates: Rates::of(n, relay, publish, claim_delete),
        retried: report.retried,
        released: report.released,
    })
}

/// Runs one relay from start until the outbox is empty; returns that time
/// and the relay's report.
async fn relay_drain<D: BenchDb>(
    env: &BrokerEnv,
    db: &D,
    config: &RelayConfig,
    target: &Target,
    timeout: Duration,
) -> anyhow::Result<(Duration, RelayReport)> {
    // The pool and the publisher's connection are made before the clock starts.
    let outbox = db.relay_outbox().await?;
    let publisher = connect(&target.destination).await?;
    let relay = Relay::new(outbox.clone(), publisher, config.clone())?;

    let start = Instant::now();
    *env.relay.lock().unwrap_or_else(|e| e.into_inner()) = Some(relay.spawn());
    let drained = wait_drained(env, db, start, timeout).await;
    let report = match env.take_relay() {
        Some(relay) => Some(relay.shutdown().await),
        None => None,
    };
    D::close_relay_outbox(outbox).await;
    let drained = drained?;
    let report = report.context("the relay was stopped from elsewhere")?;
    Ok((drained, report))
}

/// Waits until the outbox is empty: every event acknowledged by the broker.
async fn wait_drained<D: BenchDb>(
    env: &BrokerEnv,
    db: &D,
    start: Instant,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let report = env.relay_report().unwrap_or_default();
        let dead = report.dead_lettered;
        ensure!(
            dead == 0,
            "the relay dead-lettered {dead} events (its warnings above say why)"
        );
        if db.is_empty().await? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            let rows = db.rows().await?;
            bail!(
                "not drained after {timeout:?}: the outbox holds {rows} rows; the relay published {}, \
                 retried {}",
                report.published,
                report.retried
            );
        }
    }
}

/// Baseline (a'): publishes every event through a fresh publisher of the
/// target (connected before the clock starts), up to `window` publishes in
/// flight, one at a time per subject in event order, each bounded by the
/// relay's `publish_timeout`; returns the time from the first publish to
/// the last acknowledgement.
async fn publish_direct(
    target: &Target,
    events: &[Event],
    window: usize,
    config: &RelayConfig,
) -> anyhow::Result<Duration> {
    let publisher = connect(&target.destination).await?;
    let chains = subject_chains(events);
    let start = Instant::now();
    let mut waiting = chains.iter();
    let mut publishing = FuturesUnordered::new();
    loop {
        while publishing.len() < window {
            let Some(chain) = waiting.next() else { break };
            publishing.push(publish_chain(&publisher, chain, config.publish_timeout));
        }
        match publishing.next().await {
            Some(done) => done?,
            None => return Ok(start.elapsed()),
        }
    }
}

/// The events as the records a store would hand the relay (sequence = the
/// position in `events`), grouped by subject, each group in order.
fn subject_chains(events: &[Event]) -> Vec<Vec<OutboxRecord>> {
    let created_at = chrono::Utc::now();
    let mut index = std::collections::HashMap::new();
    let mut chains: Vec<Vec<OutboxRecord>> = Vec::new();
    for (i, event) in events.iter().enumerate() {
        let slot = *index.entry(event.subject()).or_insert_with(|| {
            chains.push(Vec::new());
            chains.len() - 1
        });
        chains[slot].push(OutboxRecord {
            sequence: i as i64 + 1,
            event: event.clone(),
            attempts: 1,
            created_at,
        });
    }
    chains
}

/// Publishes one subject's records one after the other; the first failure ends it.
async fn publish_chain(
    publisher: &AnyPublisher,
    chain: &[OutboxRecord],
    limit: Duration,
) -> anyhow::Result<()> {
    for record in chain {
        match tokio::time::timeout(limit, publisher.publish(record)).await {
            Ok(published) => published
                .map_err(|e| anyhow::anyhow!("{}", e.full_message()))
                .with_context(|| format!("publishing event {}", record.sequence))?,
            Err(_) => bail!(
                "event {} was not acknowledged within {limit:?}",
                record.sequence
            ),
        }
    }
    Ok(())
}

async fn connect(destination: &Destination) -> anyhow::Result<AnyPublisher> {
    destination
        .clone()
        .connect()
        .await
        .with_context(|| format!("cannot connect to {}", destination.describe()))
}

/// For the local webhook sink: it answered at least `n` requests.
fn check_sink(target: &Target, n: usize) -> anyhow::Result<()> {
    if let Some(requests) = target.sink_requests() {
        ensure!(
            requests >= n as u64,
            "the local webhook sink answered {requests} requests for {n} events"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_keep_each_subject_in_order() -> anyhow::Result<()> {
        let events = donor_events(10, 3)?;
        let chains = subject_chains(&events);
        assert_eq!(chains.len(), 3);
        let sequences: Vec<Vec<i64>> = chains
            .iter()
            .map(|c| c.iter().map(|r| r.sequence).collect())
            .collect();
        assert_eq!(sequences, [vec![1, 4, 7, 10], vec![2, 5, 8], vec![3, 6, 9]]);
        for chain in &chains {
            assert!(
                chain
                    .iter()
                    .all(|r| r.event.subject() == chain[0].event.subject())
            );
        }
        Ok(())
    }
}
