//! `drain`: how fast the relay empties an outbox that already holds N events.
//!
//! Each run writes N events (not timed), starts the relay(s), and times until
//! the stream holds N messages and the outbox is empty. On the same events it
//! measures two baselines: (a) a bare async-nats loop publishing the same
//! messages with up to `--publish-window` acks in flight, and (b) a bare loop
//! claiming-and-deleting the same rows, `--batch-size` per statement. If the
//! relay did (a) and (b) one after the other with no overlap, it would reach
//! H = 1/(1/a + 1/b); the ratio relay/H shows how much it gains by pipelining
//! (above 1) or loses to its own overhead (below 1).
//!
//! The same measurement runs on each store (`--store`): the relay, the
//! writer and baseline (a) are the same code for all of them; baseline (b)
//! is each database's plain way to claim-and-delete a batch (see
//! [`BenchDb::claim_delete_all`]).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use async_nats::jetstream;
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::publish::PublishAck;
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use proclaim::nats::NatsPublisher;
use proclaim::{Event, Relay, RelayConfig, RelayReport};
use serde_json::json;
use tokio::time::{Instant, MissedTickBehavior};

use crate::db::{BenchDb, Db, StoreKind};
use crate::env::{BenchStream, Env, StopOnDrop, bare_headers, donor_events};
use crate::output::{Output, merge};
use crate::rates::{Rates, RatesSummary};

/// Events per transaction when pre-writing the outbox.
const WRITE_CHUNK: usize = 1000;
/// How often the end of a drain is checked.
/// The column of baseline (a).
const PUBLISH: &str = "(a) publish ev/s";
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Args)]
pub(crate) struct DrainArgs {
    /// The outbox store: PostgreSQL (`--database-url`), SQLite (a fresh file
    /// under `--sqlite-dir`) or MariaDB / MySQL (`--mysql-url`).
    #[arg(long, value_enum, default_value_t = StoreKind::Postgres)]
    pub(crate) store: StoreKind,
    /// Events per run [default: 100000, or 5000 with --quick].
    #[arg(long)]
    events: Option<usize>,
    /// Runs [default: 5, or 2 with --quick].
    #[arg(long)]
    runs: Option<usize>,
    /// The relay's batch size, and the claim-and-delete baseline's.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Relays draining the outbox at once, each with its own pools and NATS connection.
    #[arg(long, default_value_t = 1)]
    relays: usize,
    /// Distinct subjects (ordering keys) the events are spread over.
    #[arg(long, default_value_t = 1000)]
    subjects: usize,
    /// Publish acks in flight at once in the bare publish baseline.
    #[arg(long, default_value_t = 256)]
    publish_window: usize,
    /// Give up on a drain that takes longer than this.
    #[arg(long, default_value = "10m", value_parser = proclaim::parse_duration)]
    timeout: Duration,
    /// A seconds-long smoke test: 5000 events, 2 runs (unless given).
    #[arg(long)]
    quick: bool,
}

/// The figures of one run.
#[derive(Debug, Clone, Copy)]
struct RunResult {
    rates: Rates,
    duplicates: u64,
}

pub(crate) async fn run(env: Arc<Env>, args: DrainArgs, out: Output) -> anyhow::Result<()> {
    match &env.db {
        Db::Postgres(db) => run_on(&env, db, &args, out).await,
        Db::Sqlite(db) => run_on(&env, db, &args, out).await,
        Db::MySql(db) => run_on(&env, db.as_ref(), &args, out).await,
    }
}

async fn run_on<D: BenchDb>(
    env: &Env,
    db: &D,
    args: &DrainArgs,
    out: Output,
) -> anyhow::Result<()> {
    let events = args
        .events
        .unwrap_or(if args.quick { 5_000 } else { 100_000 });
    let runs = args.runs.unwrap_or(if args.quick { 2 } else { 5 });
    ensure!(
        events > 0 && runs > 0,
        "--events and --runs must be at least 1"
    );
    ensure!(args.relays > 0, "--relays must be at least 1");
    ensure!(
        args.publish_window > 0,
        "--publish-window must be at least 1"
    );
    let config = RelayConfig::default().with_batch_size(args.batch_size);
    config.validate()?;

    let relay_stream = env.create_stream("relay").await?;
    let bare_stream = env.create_stream("bare").await?;
    db.migrate().await?;

    out.line(format!(
        "drain on {}: {events} events per run, {runs} runs, batch size {}, {} relay(s), {} subjects; \
         {}, streams {} / {} (file storage)",
        D::NAME,
        args.batch_size,
        args.relays,
        args.subjects,
        db.describe(),
        relay_stream.name,
        bare_stream.name
    ))?;
    out.line(Rates::header(PUBLISH))?;
    let mut results = Vec::with_capacity(runs);
    for n in 1..=runs {
        let r = one_run(env, db, args, &config, &relay_stream, &bare_stream, events)
            .await
            .with_context(|| format!("run {n}"))?;
        let note = if r.duplicates > 0 {
            format!("  ({} duplicate publishes)", r.duplicates)
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
        "scenario": "drain",
        "store": D::NAME,
        "broker": "nats",
        "relays": args.relays,
        "events": events,
        "runs": runs,
        "batch_size": args.batch_size,
        "subjects": args.subjects,
        "per_run": results.iter().map(|r| {
            let mut run = r.rates.json();
            run.insert("duplicate_publishes".into(), r.duplicates.into());
            run
        }).collect::<Vec<_>>(),
    });
    merge(&mut line, summary.json());
    out.json(&line)?;
    Ok(())
}

async fn one_run<D: BenchDb>(
    env: &Env,
    db: &D,
    args: &DrainArgs,
    config: &RelayConfig,
    relay_stream: &BenchStream,
    bare_stream: &BenchStream,
    n: usize,
) -> anyhow::Result<RunResult> {
    // Fresh events (fresh ids) each run, so no run is deduplicated against another.
    let events = donor_events(n, args.subjects)?;

    // (b) bare claim-and-delete of the pre-written rows.
    write(db, &events).await?;
    let claim_delete = db.claim_delete_all(args.batch_size, n).await?;

    // The relay, on the same rows written again.
    write(db, &events).await?;
    let (relay, reports) = relay_drain(env, db, config, args, relay_stream, n).await?;
    let published: u64 = reports.iter().map(|r| r.published).sum();
    let dead: u64 = reports.iter().map(|r| r.dead_lettered).sum();
    ensure!(dead == 0, "the relay dead-lettered {dead} events");
    ensure!(
        published >= n as u64,
        "the relay reported {published} publishes for {n} events"
    );
    relay_stream.purge().await?;

    // (a) bare pipelined publish of the same messages.
    let publish = publish_bare(&env.js, bare_stream, &events, args.publish_window).await?;
    let stored = bare_stream.count().await?;
    ensure!(
        stored == n as u64,
        "the bare stream holds {stored} messages, not {n}"
    );
    bare_stream.purge().await?;

    Ok(RunResult {
        rates: Rates::of(n, relay, publish, claim_delete),
        duplicates: published - n as u64,
    })
}

/// Writes `events` with `enqueue_batch`, 1000 per transaction, then settles
/// the table (PostgreSQL: `VACUUM ANALYZE`), so every timed phase starts on
/// the same, clean table.
pub(crate) async fn write<D: BenchDb>(db: &D, events: &[Event]) -> anyhow::Result<()> {
    ensure!(
        db.is_empty().await?,
        "the outbox is not empty before writing"
    );
    for chunk in events.chunks(WRITE_CHUNK) {
        db.write_batch(chunk).await?;
    }
    let rows = db.rows().await?;
    ensure!(
        rows == events.len() as i64,
        "wrote {} events but the outbox holds {rows}",
        events.len()
    );
    db.settle().await
}

/// Runs the relay(s) from start until the stream holds `n` messages and the
/// outbox is empty; returns that time and the relays' reports.
async fn relay_drain<D: BenchDb>(
    env: &Env,
    db: &D,
    config: &RelayConfig,
    args: &DrainArgs,
    stream: &BenchStream,
    n: usize,
) -> anyhow::Result<(Duration, Vec<RelayReport>)> {
    // Connections and relays are made before the clock starts.
    let mut relays = Vec::with_capacity(args.relays);
    let mut outboxes = Vec::with_capacity(args.relays);
    for _ in 0..args.relays {
        let outbox = db.relay_outbox().await?;
        outboxes.push(outbox.clone());
        let publisher = NatsPublisher::connect(stream.nats_config(&env.nats_url)).await?;
        relays.push(Relay::new(outbox, publisher, config.clone())?);
    }

    let start = Instant::now();
    let handles: Vec<_> = relays.into_iter().map(Relay::spawn).collect();
    let _stop = StopOnDrop::new(handles.iter().map(|h| h.cancellation_token()));
    let drained = wait_drained(db, stream, n, start, args.timeout).await;
    let reports = futures::future::join_all(handles.into_iter().map(|h| h.shutdown())).await;
    for outbox in outboxes {
        D::close_relay_outbox(outbox).await;
    }
    Ok((drained?, reports))
}

async fn wait_drained<D: BenchDb>(
    db: &D,
    stream: &BenchStream,
    n: usize,
    start: Instant,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let n = n as u64;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let count = stream.count().await?;
        ensure!(
            count <= n,
            "the stream holds {count} messages, more than the {n} events"
        );
        if count == n && db.is_empty().await? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            let rows = db.rows().await?;
            bail!(
                "not drained after {timeout:?}: the stream holds {count} of {n} messages and the outbox {rows} rows"
            );
        }
    }
}

/// Baseline (a): publishes every event as the relay would (same subject,
/// headers and body) with up to `window` acks in flight; returns the time
/// from the first publish to the last ack.
async fn publish_bare(
    js: &jetstream::Context,
    stream: &BenchStream,
    events: &[Event],
    window: usize,
) -> anyhow::Result<Duration> {
    let check = |ack: Result<PublishAck, PublishError>| -> anyhow::Result<()> {
        let ack = ack.context("bare publish not acknowledged")?;
        ensure!(!ack.duplicate, "bare publish was a duplicate");
        Ok(())
    };
    let start = Instant::now();
    let mut acks = FuturesUnordered::new();
    for event in events {
        while acks.len() >= window {
            if let Some(ack) = acks.next().await {
                check(ack)?;
            }
        }
        let pending = js
            .publish_with_headers(
                stream.subject(event),
                bare_headers(event),
                Bytes::copy_from_slice(event.data().get().as_bytes()),
            )
            .await
            .context("bare publish")?;
        acks.push(pending.into_future());
    }
    while let Some(ack) = acks.next().await {
        check(ack)?;
    }
    Ok(start.elapsed())
}
