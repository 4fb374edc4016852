//! `soak`: the relay at full speed for a long time (default 10 minutes) on a
//! backlog that never runs out, with its throughput reported per window
//! (default 1 minute), on PostgreSQL with autovacuum off for the outbox
//! table.
//!
//! Every delivered row stays behind as a dead tuple and a dead index entry
//! until VACUUM, which never runs here: the figure of merit is the last
//! window's rate over the first's (the speed issue's target is ≥ 0.9).
//!
//! A feeder writes events in transactions of 1,000 (`enqueue_batch`) so that
//! at least `--backlog` of them are always waiting; it shares the machine
//! with the relay in every window alike. Throughput is counted on the broker
//! side: the stream's last sequence, which grows by one per stored message
//! (a re-publish that JetStream deduplicates does not count). The stream
//! keeps only the newest messages, so a long soak does not fill the disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use clap::Args;
use proclaim::nats::NatsPublisher;
use proclaim::{CancellationToken, Relay, RelayConfig};
use serde_json::json;
use sqlx::AssertSqlSafe;
use tokio::time::Instant;

use crate::db::{BenchDb, PgDb};
use crate::env::{BenchStream, Env, StopOnDrop, donor_event};
use crate::output::{Output, round};

/// Events per feeder transaction.
const FEED_CHUNK: usize = 1000;
/// Messages the soak's stream keeps (older ones are discarded).
const STREAM_KEEP: i64 = 200_000;

#[derive(Debug, Args)]
pub(crate) struct SoakArgs {
    /// How long the relay runs [default: 10m, or 6s with --quick].
    #[arg(long, value_parser = proclaim::parse_duration)]
    duration: Option<Duration>,
    /// Throughput is reported per window [default: 1m, or 2s with --quick].
    #[arg(long, value_parser = proclaim::parse_duration)]
    window: Option<Duration>,
    /// Events always waiting in the outbox [default: 100000, or 5000 with --quick].
    #[arg(long)]
    backlog: Option<u64>,
    /// The relay's batch size.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Distinct subjects (ordering keys) the events are spread over.
    #[arg(long, default_value_t = 1000)]
    subjects: usize,
    /// A seconds-long smoke test.
    #[arg(long)]
    quick: bool,
}

pub(crate) async fn run(env: Arc<Env>, args: SoakArgs, out: Output) -> anyhow::Result<()> {
    let db = env.postgres()?;
    let duration = args.duration.unwrap_or(if args.quick {
        Duration::from_secs(6)
    } else {
        Duration::from_secs(600)
    });
    let window = args.window.unwrap_or(if args.quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(60)
    });
    let backlog = args
        .backlog
        .unwrap_or(if args.quick { 5_000 } else { 100_000 });
    ensure!(
        !window.is_zero() && duration >= window * 2,
        "--duration must hold at least two --window"
    );
    ensure!(backlog > 0, "--backlog must be at least 1");
    let config = RelayConfig::default().with_batch_size(args.batch_size);
    config.validate()?;

    let stream = env.create_capped_stream("soak", STREAM_KEEP).await?;
    db.migrate().await?;
    let table = db.table();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "ALTER TABLE {table} SET (autovacuum_enabled = false)"
    )))
    .execute(&db.pool)
    .await
    .context("turning autovacuum off for the outbox")?;
    out.line(format!(
        "soak on postgres: {}s, windows of {}s, backlog ≥ {backlog}, batch size {}, {} subjects; \
         autovacuum off for {table}; stream {}",
        duration.as_secs_f64(),
        window.as_secs_f64(),
        args.batch_size,
        args.subjects,
        stream.name
    ))?;

    // The starting backlog, on a clean table (not timed).
    let written = Arc::new(AtomicU64::new(0));
    while written.load(Ordering::Relaxed) < backlog {
        feed_chunk(db, &written, args.subjects).await?;
    }
    db.vacuum().await?;

    let outbox = db.outbox(true).await?;
    let publisher = NatsPublisher::connect(stream.nats_config(&env.nats_url)).await?;
    let relay = Relay::new(outbox.clone(), publisher, config)?;

    let stop_feeder = CancellationToken::new();
    let feeder = tokio::spawn(feed(
        db.clone(),
        stream.clone(),
        written.clone(),
        backlog,
        args.subjects,
        stop_feeder.clone(),
    ));
    let handle = relay.spawn();
    let _stop = StopOnDrop::new([handle.cancellation_token(), stop_feeder.clone()]);

    out.line(format!(
        "{:<8} {:>12} {:>14} {:>12}",
        "window", "end s", "delivered", "ev/s"
    ))?;
    let start = Instant::now();
    let mut rates = Vec::new();
    let mut last = stream.delivered().await?;
    let windows = (duration.as_secs_f64() / window.as_secs_f64()).floor() as u32;
    for i in 1..=windows {
        tokio::time::sleep_until(start + window * i).await;
        ensure!(!feeder.is_finished(), "the feeder stopped");
        let now = stream.delivered().await?;
        let rate = (now - last) as f64 / window.as_secs_f64();
        last = now;
        rates.push(rate);
        out.line(format!(
            "{:<8} {:>12.0} {:>14} {:>12.0}",
            i,
            (window * i).as_secs_f64(),
            now,
            rate
        ))?;
    }
    stop_feeder.cancel();
    let report = handle.shutdown().await;
    outbox.pool().close().await;
    feeder.await.context("the feeder panicked")??;
    ensure!(
        report.dead_lettered == 0,
        "the relay dead-lettered {} events",
        report.dead_lettered
    );

    let (first, final_rate) = (rates[0], rates[rates.len() - 1]);
    let ratio = if first > 0.0 { final_rate / first } else { 0.0 };
    let (dead_tuples, table_bytes) = db.dead_tuples().await?;
    out.line(format!(
        "first window {first:.0} ev/s, last {final_rate:.0} ev/s: last / first {ratio:.2}; \
         {} events delivered, {dead_tuples} dead tuples, table {:.0} MiB",
        last,
        table_bytes as f64 / (1024.0 * 1024.0)
    ))?;
    out.json(&json!({
        "scenario": "soak",
        "store": "postgres",
        "duration_s": duration.as_secs_f64(),
        "window_s": window.as_secs_f64(),
        "backlog": backlog,
        "events_per_s": rates.iter().map(|r| round(*r, 0)).collect::<Vec<_>>(),
        "first_events_per_s": round(first, 0),
        "last_events_per_s": round(final_rate, 0),
        "last_over_first": round(ratio, 3),
        "delivered": last,
        "dead_tuples": dead_tuples,
        "table_bytes": table_bytes,
    }))?;
    Ok(())
}

/// Keeps at least `backlog` events waiting until stopped.
async fn feed(
    db: PgDb,
    stream: BenchStream,
    written: Arc<AtomicU64>,
    backlog: u64,
    subjects: usize,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    while !stop.is_cancelled() {
        let waiting = written
            .load(Ordering::Relaxed)
            .saturating_sub(stream.delivered().await?);
        if waiting < backlog {
            feed_chunk(&db, &written, subjects).await?;
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(())
}

async fn feed_chunk(db: &PgDb, written: &AtomicU64, subjects: usize) -> anyhow::Result<()> {
    let first = written.load(Ordering::Relaxed) as usize;
    let events = (first..first + FEED_CHUNK)
        .map(|i| donor_event(i, subjects))
        .collect::<anyhow::Result<Vec<_>>>()?;
    db.write_batch(&events).await?;
    written.fetch_add(FEED_CHUNK as u64, Ordering::Relaxed);
    Ok(())
}
