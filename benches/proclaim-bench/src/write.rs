//! `write`: what `enqueue` costs a business transaction.
//!
//! `W` writers, each on a connection of its own, run the same business
//! transaction for a fixed time — insert a donor row, then write the donor's
//! event — in three variants, measured in one run in rotating order:
//!
//! - **enqueue**: `PgOutbox::enqueue` (with its per-subject advisory lock and
//!   its `NOTIFY`), the code under test;
//! - **hand-written**: a plain `INSERT` of the same outbox row, the
//!   unavoidable cost of writing it (the baseline);
//! - **business only**: the donor insert alone, no event.
//!
//! `ratio = enqueue tx/s ÷ hand-written tx/s` (target ≥ 0.9, i.e. enqueue
//! costs at most 1.1× the bare insert). Between measurements the tables are
//! truncated (not timed) so every variant starts on the same table.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use proclaim::Event;
use proclaim::postgres::{PgOutbox, PgOutboxOptions};
use serde_json::json;
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::time::Instant;

use crate::env::{Env, donor_event};
use crate::output::{Output, round};
use crate::stats::Spread;

/// Subjects the writers' events spread over.
const SUBJECTS: usize = 1000;

#[derive(Debug, Args)]
pub(crate) struct WriteArgs {
    /// Concurrent writers, comma-separated: one measurement per count.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16])]
    writers: Vec<usize>,
    /// Seconds each variant runs per run [default: 5, or 1 with --quick].
    #[arg(long)]
    seconds: Option<f64>,
    /// Runs [default: 5, or 2 with --quick].
    #[arg(long)]
    runs: Option<usize>,
    /// A seconds-long smoke run.
    #[arg(long)]
    quick: bool,
    /// Enqueue without the `NOTIFY` wake-up (shows what it costs writers).
    #[arg(long)]
    no_wakeup: bool,
    /// At most one `NOTIFY` per this window from the writers
    /// (`PgOutboxOptions::notify_debounce`; 0s: every transaction notifies).
    #[arg(long, default_value = "1ms", value_parser = proclaim::parse_duration)]
    notify_debounce: Duration,
}

/// One variant of the business transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Enqueue,
    HandWritten,
    BusinessOnly,
}

const VARIANTS: [Variant; 3] = [
    Variant::Enqueue,
    Variant::HandWritten,
    Variant::BusinessOnly,
];

/// Transactions per second of each variant in one run.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    enqueue: f64,
    hand_written: f64,
    business_only: f64,
}

pub(crate) async fn run(env: Arc<Env>, args: WriteArgs, out: Output) -> anyhow::Result<()> {
    let pg = env.postgres()?;
    let seconds = args.seconds.unwrap_or(if args.quick { 1.0 } else { 5.0 });
    let runs = args.runs.unwrap_or(if args.quick { 2 } else { 5 }).max(1);
    anyhow::ensure!(seconds > 0.0, "--seconds must be positive");
    anyhow::ensure!(
        args.writers.iter().all(|&w| (1..=256).contains(&w)),
        "--writers must be between 1 and 256"
    );
    // Migrates the outbox table.
    pg.outbox(true).await?;
    let donors = format!(r#""{}".donors"#, pg.schema);
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE {donors} (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
         name TEXT NOT NULL, amount_cents BIGINT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )))
    .execute(&pg.pool)
    .await
    .context("creating the donors table")?;
    let sql = Statements::new(&donors, &pg.table());

    out.line(format!(
        "write: donor insert + event, {seconds} s per variant, {runs} runs, PostgreSQL"
    ))?;
    out.line("writers | enqueue tx/s | hand-written tx/s | business only tx/s | enqueue / hand-written (min – max) | enqueue / business")?;
    for &writers in &args.writers {
        let pool = PgPoolOptions::new()
            .max_connections(u32::try_from(writers).unwrap_or(256))
            .min_connections(u32::try_from(writers).unwrap_or(256))
            .connect(&pg.database_url)
            .await
            .context("cannot connect the writers' pool")?;
        let writer_outbox = PgOutbox::with_options(
            pool.clone(),
            PgOutboxOptions::default()
                .with_schema(&pg.schema)
                .with_notify(!args.no_wakeup)
                .with_notify_debounce(args.notify_debounce),
        )?;
        let mut results = Vec::with_capacity(runs);
        for r in 0..runs {
            let mut run = Run::default();
            for v in 0..VARIANTS.len() {
                let variant = VARIANTS[(r + v) % VARIANTS.len()];
                sqlx::raw_sql(AssertSqlSafe(sql.truncate.clone()))
                    .execute(&pg.pool)
                    .await?;
                let rate = measure(&pool, &writer_outbox, &sql, variant, writers, seconds).await?;
                match variant {
                    Variant::Enqueue => run.enqueue = rate,
                    Variant::HandWritten => run.hand_written = rate,
                    Variant::BusinessOnly => run.business_only = rate,
                }
            }
            results.push(run);
        }
        pool.close().await;
        report(&out, writers, runs, &results)?;
    }
    Ok(())
}

fn report(out: &Output, writers: usize, runs: usize, results: &[Run]) -> anyhow::Result<()> {
    let enqueue = Spread::by(results, |r| r.enqueue);
    let hand = Spread::by(results, |r| r.hand_written);
    let business = Spread::by(results, |r| r.business_only);
    let ratio = Spread::by(results, |r| {
        r.enqueue / r.hand_written.max(f64::MIN_POSITIVE)
    });
    let vs_business = Spread::by(results, |r| {
        r.enqueue / r.business_only.max(f64::MIN_POSITIVE)
    });
    out.line(format!(
        "{writers:>7} | {:>12.0} | {:>17.0} | {:>18.0} | {:.3} ({:.3} – {:.3}) | {:.3}",
        enqueue.median,
        hand.median,
        business.median,
        ratio.median,
        ratio.min,
        ratio.max,
        vs_business.median
    ))?;
    out.json(&json!({
        "scenario": "write",
        "store": "postgres",
        "writers": writers,
        "tx_per_s": round(enqueue.median, 0),
        "tx_per_s_min": round(enqueue.min, 0),
        "tx_per_s_max": round(enqueue.max, 0),
        "baseline_tx_per_s": round(hand.median, 0),
        "business_only_tx_per_s": round(business.median, 0),
        "ratio": round(ratio.median, 3),
        "ratio_min": round(ratio.min, 3),
        "ratio_max": round(ratio.max, 3),
        "ratio_vs_business_only": round(vs_business.median, 3),
        "runs": runs,
    }))
}

/// The SQL of the variants.
struct Statements {
    donor: String,
    hand_written: String,
    truncate: String,
}

impl Statements {
    fn new(donors: &str, outbox: &str) -> Self {
        Statements {
            donor: format!("INSERT INTO {donors} (name, amount_cents) VALUES ($1, $2)"),
            hand_written: format!(
                "INSERT INTO {outbox} (id, event_type, source, subject, event_time, \
                 datacontenttype, dataschema, data, metadata) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8::json, $9::jsonb)"
            ),
            truncate: format!("TRUNCATE {donors}, {outbox}"),
        }
    }
}

/// Runs `writers` writers for `seconds`; returns committed transactions per second.
async fn measure(
    pool: &PgPool,
    outbox: &PgOutbox,
    sql: &Statements,
    variant: Variant,
    writers: usize,
    seconds: f64,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(writers);
    for w in 0..writers {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        let (donor, hand) = (sql.donor.clone(), sql.hand_written.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let mut i = w;
            while Instant::now() < deadline {
                let event = donor_event(i, SUBJECTS)?;
                transaction(&pool, &outbox, &donor, &hand, variant, &event, i).await?;
                done += 1;
                i += writers;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0u64;
    for task in tasks {
        total += task.await.context("a writer panicked")??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn transaction(
    pool: &PgPool,
    outbox: &PgOutbox,
    donor: &str,
    hand_written: &str,
    variant: Variant,
    event: &Event,
    i: usize,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(AssertSqlSafe(donor.to_owned()))
        .bind(format!("donor {i}"))
        .bind(i64::try_from(i).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
    match variant {
        Variant::Enqueue => outbox.enqueue(&mut tx, event).await?,
        Variant::HandWritten => {
            sqlx::query(AssertSqlSafe(hand_written.to_owned()))
                .bind(event.id())
                .bind(event.event_type())
                .bind(event.source())
                .bind(event.subject())
                .bind(event.time())
                .bind(event.datacontenttype())
                .bind(event.dataschema())
                .bind(event.data().get())
                .bind(proclaim::store_support::metadata_json(event))
                .execute(&mut *tx)
                .await?;
        }
        Variant::BusinessOnly => {}
    }
    tx.commit().await?;
    Ok(())
}
