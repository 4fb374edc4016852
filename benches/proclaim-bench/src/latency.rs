//! `latency`: commit → JetStream publish ack of each event, at a steady
//! offered rate of one event per transaction.
//!
//! A relay runs on the outbox. The writer starts one transaction per tick of
//! a schedule computed from the start time (so the offered rate is exact even
//! when a commit is slow: transactions overlap, up to `--writers` at once) and
//! records the instant `COMMIT` returned. The relay's publisher is wrapped in
//! [`AckRecorder`], which records the instant the inner publish returned `Ok`
//! (the JetStream ack): commit → ack is the latency reported. An ordered
//! JetStream consumer, started before writing, records when each message
//! arrives (commit → delivery), and checks that every event was delivered.
//!
//! Baselines of the same run: the `COMMIT` round trip of the writer's own
//! transactions, and a bare JetStream publish → ack round trip, one at a
//! time at the same rate, after the relay phase.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use async_nats::jetstream::consumer::{DeliverPolicy, push};
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use proclaim::nats::NatsPublisher;
use proclaim::postgres::{PgOutbox, PgOutboxOptions};
use proclaim::{Event, OutboxRecord, PublishError, Publisher, Relay, RelayConfig};
use serde_json::json;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use uuid::Uuid;

use crate::env::{BenchStream, Env, StopOnDrop, bare_headers, donor_event};
use crate::output::{Output, round};
use crate::stats::{Percentiles, Spread, ms};

#[derive(Debug, Args)]
pub(crate) struct LatencyArgs {
    /// Offered rate: events (= transactions) per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of writing per run, warm-up included [default: 10, or 2 with --quick].
    #[arg(long)]
    seconds: Option<u64>,
    /// Runs [default: 3, or 1 with --quick].
    #[arg(long)]
    runs: Option<usize>,
    /// Events scheduled in this first part of each run are not counted.
    #[arg(long, default_value = "1s", value_parser = proclaim::parse_duration)]
    warmup: Duration,
    /// Build the outbox without NOTIFY, so the relay only polls.
    #[arg(long)]
    no_wakeup: bool,
    /// The relay's poll interval [default: RelayConfig's, 1s].
    #[arg(long, value_parser = proclaim::parse_duration)]
    poll_interval: Option<Duration>,
    /// Distinct subjects (ordering keys) the events are spread over.
    #[arg(long, default_value_t = 1000)]
    subjects: usize,
    /// Writer connections: transactions that may be open at once.
    #[arg(long, default_value_t = 16)]
    writers: u32,
    /// A seconds-long smoke test: 2 seconds, 1 run (unless given).
    #[arg(long)]
    quick: bool,
}

/// When each event's ack (or delivery) was seen, by event id.
#[derive(Clone, Default)]
struct Stamps(Arc<Mutex<HashMap<Uuid, Instant>>>);

impl Stamps {
    /// Records the first time `id` was seen.
    fn record(&self, id: Uuid, at: Instant) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id)
            .or_insert(at);
    }
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
    fn take(&self) -> HashMap<Uuid, Instant> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// A [`Publisher`] that records when the inner publisher acknowledged each event.
struct AckRecorder<P> {
    inner: P,
    acks: Stamps,
}

impl<P: Publisher> Publisher for AckRecorder<P> {
    async fn publish(&self, record: &OutboxRecord) -> Result<(), PublishError> {
        self.inner.publish(record).await?;
        self.acks.record(record.event.id(), Instant::now());
        Ok(())
    }

    async fn ready(&self) -> Result<(), PublishError> {
        self.inner.ready().await
    }
}

/// One committed event, as the writer saw it.
struct Written {
    id: Uuid,
    /// When it was scheduled, from the start of writing.
    offset: Duration,
    /// When `COMMIT` returned.
    committed: Instant,
    /// The `COMMIT` round trip.
    commit: Duration,
    /// How late the transaction began, against its schedule.
    lag: Duration,
}

/// The figures of one run, in milliseconds unless named otherwise.
#[derive(Debug, Clone)]
struct RunResult {
    events: usize,
    achieved_rate: f64,
    lag_max: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    deliver_p50: f64,
    deliver_p99: f64,
    commit_p50: f64,
    commit_p99: f64,
    publish_p50: f64,
    publish_p99: f64,
    /// Commit → ack in ms at each of [`CURVE`]'s quantiles (for `plot`).
    curve: Vec<f64>,
}

/// The quantiles of the latency distribution written to JSON (`curve_ms`).
const CURVE: [f64; 14] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0,
];

pub(crate) async fn run(env: Arc<Env>, args: LatencyArgs, out: Output) -> anyhow::Result<()> {
    let seconds = args.seconds.unwrap_or(if args.quick { 2 } else { 10 });
    let runs = args.runs.unwrap_or(if args.quick { 1 } else { 3 });
    ensure!(
        args.rate > 0 && runs > 0,
        "--rate and --runs must be at least 1"
    );
    ensure!(
        Duration::from_secs(seconds) > args.warmup,
        "--seconds must be longer than the warm-up ({:?})",
        args.warmup
    );
    ensure!(args.writers > 0, "--writers must be at least 1");
    let wakeup = !args.no_wakeup;
    let mut config = RelayConfig::default();
    if let Some(poll) = args.poll_interval {
        config = config.with_poll_interval(poll);
    }
    config.validate()?;

    let pg = env.postgres()?;
    let relay_stream = env.create_stream("relay").await?;
    let bare_stream = env.create_stream("bare").await?;
    let writer_pool = PgPoolOptions::new()
        .max_connections(args.writers)
        .connect(&pg.database_url)
        .await
        .context("cannot connect the writers' pool")?;
    let writer = PgOutbox::with_options(
        writer_pool.clone(),
        PgOutboxOptions::default()
            .with_schema(&pg.schema)
            .with_notify(wakeup),
    )?;
    writer.migrate().await.context("migrating the outbox")?;

    out.line(format!(
        "latency: {} ev/s offered (one event per transaction) for {seconds} s per run ({:?} warm-up excluded), \
         {runs} runs, wake-up {}, poll interval {:?}, {} subjects; schema {}, streams {} / {} (file storage)",
        args.rate,
        args.warmup,
        if wakeup { "on (NOTIFY)" } else { "off (polling only)" },
        config.poll_interval,
        args.subjects,
        pg.schema,
        relay_stream.name,
        bare_stream.name
    ))?;
    out.line(format!(
        "{:<8} {:>6} {:>8} {:>8} | {:>33} | {:>15} | {:>15} | {:>15}",
        "",
        "",
        "achieved",
        "writer",
        "commit → relay's JetStream ack ms",
        "commit → deliv.",
        "COMMIT rtt ms",
        "bare pub→ack ms"
    ))?;
    out.line(format!(
        "{:<8} {:>6} {:>8} {:>8} | {:>7} {:>7} {:>8} {:>8} | {:>7} {:>7} | {:>7} {:>7} | {:>7} {:>7}",
        "run", "events", "ev/s", "lag max", "p50", "p99", "p99.9", "max", "p50", "p99", "p50", "p99", "p50", "p99"
    ))?;

    let result = async {
        let mut results = Vec::with_capacity(runs);
        for n in 1..=runs {
            let r = one_run(
                &env,
                &args,
                &config,
                &writer,
                &relay_stream,
                &bare_stream,
                seconds,
            )
            .await
            .with_context(|| format!("run {n}"))?;
            out.line(row(&n.to_string(), &r))?;
            results.push(r);
        }
        anyhow::Ok(results)
    }
    .await;
    writer_pool.close().await;
    let results = result?;

    let median = summarize(&results, |s| s.median);
    out.line(row("median", &median))?;
    out.line(row("min", &summarize(&results, |s| s.min)))?;
    out.line(row("max", &summarize(&results, |s| s.max)))?;

    let r2 = |x: f64| round(x, 3);
    out.json(&json!({
        "scenario": "latency",
        "store": "postgres",
        "broker": "nats",
        "rate": args.rate,
        "seconds": seconds,
        "warmup_ms": r2(ms(args.warmup)),
        "wakeup": wakeup,
        "poll_interval_ms": r2(ms(config.poll_interval)),
        "runs": runs,
        "events": results.iter().map(|r| r.events).sum::<usize>(),
        "achieved_rate": round(median.achieved_rate, 1),
        "p50_ms": r2(median.p50),
        "p99_ms": r2(median.p99),
        "p999_ms": r2(median.p999),
        "max_ms": r2(median.max),
        "deliver_p50_ms": r2(median.deliver_p50),
        "deliver_p99_ms": r2(median.deliver_p99),
        "commit_p50_ms": r2(median.commit_p50),
        "commit_p99_ms": r2(median.commit_p99),
        "publish_ack_p50_ms": r2(median.publish_p50),
        "publish_ack_p99_ms": r2(median.publish_p99),
        "curve_quantiles": CURVE,
        "curve_ms": median.curve.iter().map(|&x| r2(x)).collect::<Vec<_>>(),
        "per_run": results.iter().map(|r| json!({
            "events": r.events,
            "achieved_rate": round(r.achieved_rate, 1),
            "writer_lag_max_ms": r2(r.lag_max),
            "p50_ms": r2(r.p50),
            "p99_ms": r2(r.p99),
            "p999_ms": r2(r.p999),
            "max_ms": r2(r.max),
            "deliver_p50_ms": r2(r.deliver_p50),
            "deliver_p99_ms": r2(r.deliver_p99),
            "commit_p50_ms": r2(r.commit_p50),
            "commit_p99_ms": r2(r.commit_p99),
            "publish_ack_p50_ms": r2(r.publish_p50),
            "publish_ack_p99_ms": r2(r.publish_p99),
        })).collect::<Vec<_>>(),
    }))?;
    Ok(())
}

/// One figure per field over the runs: `pick` chooses the median, min or max.
fn summarize(results: &[RunResult], pick: impl Fn(Spread) -> f64) -> RunResult {
    let s = |f: fn(&RunResult) -> f64| pick(Spread::by(results, f));
    RunResult {
        events: s(|r| r.events as f64) as usize,
        achieved_rate: s(|r| r.achieved_rate),
        lag_max: s(|r| r.lag_max),
        p50: s(|r| r.p50),
        p99: s(|r| r.p99),
        p999: s(|r| r.p999),
        max: s(|r| r.max),
        deliver_p50: s(|r| r.deliver_p50),
        deliver_p99: s(|r| r.deliver_p99),
        commit_p50: s(|r| r.commit_p50),
        commit_p99: s(|r| r.commit_p99),
        publish_p50: s(|r| r.publish_p50),
        publish_p99: s(|r| r.publish_p99),
        curve: (0..CURVE.len())
            .map(|i| {
                pick(Spread::of(
                    &results.iter().map(|r| r.curve[i]).collect::<Vec<_>>(),
                ))
            })
            .collect(),
    }
}

fn row(label: &str, r: &RunResult) -> String {
    format!(
        "{:<8} {:>6} {:>8.1} {:>8.1} | {:>7.2} {:>7.2} {:>8.2} {:>8.2} | {:>7.2} {:>7.2} | {:>7.2} {:>7.2} | {:>7.2} {:>7.2}",
        label,
        r.events,
        r.achieved_rate,
        r.lag_max,
        r.p50,
        r.p99,
        r.p999,
        r.max,
        r.deliver_p50,
        r.deliver_p99,
        r.commit_p50,
        r.commit_p99,
        r.publish_p50,
        r.publish_p99
    )
}

async fn one_run(
    env: &Env,
    args: &LatencyArgs,
    config: &RelayConfig,
    writer: &PgOutbox,
    relay_stream: &BenchStream,
    bare_stream: &BenchStream,
    seconds: u64,
) -> anyhow::Result<RunResult> {
    let total = usize::try_from(args.rate * seconds)?;
    let pg = env.postgres()?;
    ensure!(pg.outbox_is_empty().await?, "the outbox is not empty");
    pg.vacuum().await?;

    // The consumer first, then the relay, then the writer.
    let delivered = Stamps::default();
    let mut consumer = start_consumer(env, relay_stream, delivered.clone()).await?;
    let acks = Stamps::default();
    let outbox = pg.outbox(!args.no_wakeup).await?;
    let relay_pool = outbox.pool().clone();
    let publisher = AckRecorder {
        inner: NatsPublisher::connect(relay_stream.nats_config(&env.nats_url)).await?,
        acks: acks.clone(),
    };
    let relay = Relay::new(outbox, publisher, config.clone())?.spawn();
    let _stop = StopOnDrop::new([relay.cancellation_token()]);
    // Let it open its LISTEN connection and make its first, empty claim.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let measured = async {
        let (written, elapsed) = write_steadily(writer, args.rate, total, args.subjects).await?;
        let deadline = Instant::now() + Duration::from_secs(30) + config.poll_interval * 3;
        loop {
            let (a, d) = (acks.len(), delivered.len());
            if a >= total && d >= total {
                break;
            }
            if Instant::now() > deadline {
                bail!("after writing {total} events, only {a} were acked and {d} delivered");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::Ok((written, elapsed))
    }
    .await;
    let report = relay.shutdown().await;
    relay_pool.close().await;
    consumer.abort_all();
    let (written, elapsed) = measured?;

    ensure!(
        report.dead_lettered == 0,
        "the relay dead-lettered {} events",
        report.dead_lettered
    );
    ensure!(
        report.published >= total as u64,
        "the relay reported {} publishes for {total} events",
        report.published
    );
    ensure!(
        pg.outbox_is_empty().await?,
        "the outbox is not empty after the run"
    );
    let stored = relay_stream.count().await?;
    ensure!(
        stored == total as u64,
        "the stream holds {stored} messages, not {total}"
    );
    relay_stream.purge().await?;

    let (acks, delivered) = (acks.take(), delivered.take());
    let mut to_ack = Vec::with_capacity(total);
    let mut to_deliver = Vec::with_capacity(total);
    let mut commits = Vec::with_capacity(total);
    for w in written.iter().filter(|w| w.offset >= args.warmup) {
        let ack = acks
            .get(&w.id)
            .with_context(|| format!("event {} was never acked", w.id))?;
        let got = delivered
            .get(&w.id)
            .with_context(|| format!("event {} was never delivered", w.id))?;
        // An ack can be seen before the writer's task has resumed after COMMIT: count it as 0.
        to_ack.push(ack.saturating_duration_since(w.committed));
        to_deliver.push(got.saturating_duration_since(w.committed));
        commits.push(w.commit);
    }
    let lag_max = written.iter().map(|w| w.lag).max().unwrap_or_default();
    let publish = bare_round_trips(env, bare_stream, args, total).await?;
    bare_stream.purge().await?;

    let (ack, deliver, commit) = (
        Percentiles::new(to_ack),
        Percentiles::new(to_deliver),
        Percentiles::new(commits),
    );
    Ok(RunResult {
        events: ack.len(),
        achieved_rate: total as f64 / elapsed.as_secs_f64(),
        lag_max: ms(lag_max),
        p50: ack.ms(0.50),
        p99: ack.ms(0.99),
        p999: ack.ms(0.999),
        max: ack.max_ms(),
        deliver_p50: deliver.ms(0.50),
        deliver_p99: deliver.ms(0.99),
        commit_p50: commit.ms(0.50),
        commit_p99: commit.ms(0.99),
        publish_p50: publish.ms(0.50),
        publish_p99: publish.ms(0.99),
        curve: CURVE.iter().map(|&q| ack.ms(q)).collect(),
    })
}

/// An ordered push consumer on `stream` that records when each event arrives.
async fn start_consumer(
    env: &Env,
    stream: &BenchStream,
    delivered: Stamps,
) -> anyhow::Result<JoinSet<anyhow::Result<()>>> {
    let consumer = env
        .js
        .get_stream(&stream.name)
        .await?
        .create_consumer(push::OrderedConfig {
            deliver_subject: env.nats.new_inbox(),
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .context("creating the consumer")?;
    let mut messages = consumer.messages().await?;
    let mut task = JoinSet::new();
    task.spawn(async move {
        while let Some(message) = messages.next().await {
            let message = message.context("consuming")?;
            let now = Instant::now();
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get("ce-id"))
                .and_then(|v| Uuid::parse_str(v.as_str()).ok())
                .context("a delivered message has no ce-id header")?;
            delivered.record(id, now);
        }
        Ok(())
    });
    Ok(task)
}

/// Commits `total` events, one per transaction, transaction `i` starting
/// at `start + i / rate`. Returns what was written and the time from the
/// start to the last commit.
async fn write_steadily(
    writer: &PgOutbox,
    rate: u64,
    total: usize,
    subjects: usize,
) -> anyhow::Result<(Vec<Written>, Duration)> {
    let start = Instant::now() + Duration::from_millis(20);
    let mut tasks = JoinSet::new();
    let mut written = Vec::with_capacity(total);
    for i in 0..total {
        let offset = Duration::from_nanos((i as u64).saturating_mul(1_000_000_000) / rate);
        tokio::time::sleep_until(start + offset).await;
        let event = donor_event(i, subjects)?;
        tasks.spawn(commit_one(writer.clone(), event, offset, start + offset));
        while let Some(done) = tasks.try_join_next() {
            written.push(done??);
        }
    }
    while let Some(done) = tasks.join_next().await {
        written.push(done??);
    }
    let last = written.iter().map(|w| w.committed).max().unwrap_or(start);
    Ok((written, last.saturating_duration_since(start)))
}

async fn commit_one(
    writer: PgOutbox,
    event: Event,
    offset: Duration,
    scheduled: Instant,
) -> anyhow::Result<Written> {
    let began = Instant::now();
    let pool: &PgPool = writer.pool();
    let mut tx = pool.begin().await?;
    writer.enqueue(&mut tx, &event).await?;
    let commit_at = Instant::now();
    tx.commit().await?;
    let committed = Instant::now();
    Ok(Written {
        id: event.id(),
        offset,
        committed,
        commit: committed - commit_at,
        lag: began.saturating_duration_since(scheduled),
    })
}

/// Baseline: publish → ack round trips to a bare stream with async-nats, one
/// at a time at the same rate (same subject, headers and body as the relay).
async fn bare_round_trips(
    env: &Env,
    stream: &BenchStream,
    args: &LatencyArgs,
    total: usize,
) -> anyhow::Result<Percentiles> {
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / args.rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut samples = Vec::with_capacity(total);
    let start = Instant::now();
    for i in 0..total {
        let event = donor_event(i, args.subjects)?;
        let (subject, headers) = (stream.subject(&event), bare_headers(&event));
        let payload = Bytes::copy_from_slice(event.data().get().as_bytes());
        tick.tick().await;
        let sent = Instant::now();
        let ack = env
            .js
            .publish_with_headers(subject, headers, payload)
            .await
            .context("bare publish")?
            .await
            .context("bare publish not acknowledged")?;
        let rtt = sent.elapsed();
        ensure!(!ack.duplicate, "bare publish was a duplicate");
        if sent.saturating_duration_since(start) >= args.warmup {
            samples.push(rtt);
        }
    }
    let stored = stream.count().await?;
    ensure!(
        stored == total as u64,
        "the bare stream holds {stored} messages, not {total}"
    );
    Ok(Percentiles::new(samples))
}
