//! Run with cargo run -p example-campaign-finance
//!
//! The CampaignFinance service records each donor in `campaign_donors` and a
//! `DonorSecured` event in the outbox, in ONE transaction. A proclaim relay
//! delivers the events to NATS JetStream, where the Volunteer Thank-You and
//! Fundraising Strategy services each read every one of them.
//!
//! Then the tragedy: the message bus goes down (a fault proxy between the
//! relay and NATS refuses every connection) while donors are recorded. The
//! donors commit anyway and their events wait in the outbox; when the bus
//! comes back, every event reaches both services. A donor whose transaction
//! rolls back is never announced. Stdout tells the story; logs go to stderr.
#![allow(clippy::print_stdout)]

mod consumers;
mod donors;

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use async_nats::connection::State;
use async_nats::jetstream;
use clap::Parser;
use consumers::{Consumer, add_to_total, thank_donor};
use donors::{DONOR_CAP_CENTS, Donor, SCHEMA, ledger, record_donor, reset_schema, sample_donor};
use proclaim::nats::{NatsConfig, NatsPublisher};
use proclaim::postgres::{PgOutbox, PgOutboxOptions};
use proclaim::{Backoff, OutboxStore, Relay, RelayConfig};
use proclaim_testkit::proxy::{FaultMode, FaultProxy};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "Donors and DonorSecured events survive a message-bus outage.")]
struct Args {
    /// Donors recorded while the message bus is down.
    #[arg(long, env = "DONORS", default_value_t = 200)]
    donors: u32,
    /// PostgreSQL holding the donors and the outbox.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
    /// NATS server with JetStream.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// JetStream stream of the campaign's events (deleted at start and end).
    #[arg(long, default_value = "CAMPAIGN")]
    stream: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info,sqlx=warn,async_nats=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    let pool = PgPool::connect(&args.database_url)
        .await
        .context("connecting to PostgreSQL")?;
    let nats = async_nats::connect(args.nats_url.as_str())
        .await
        .context("connecting to NATS")?;
    let js = jetstream::new(nats);
    let outbox =
        PgOutbox::with_options(pool.clone(), PgOutboxOptions::default().with_schema(SCHEMA))?;
    reset_schema(&pool, &outbox).await?;
    let _ = js.delete_stream(&args.stream).await; // left over from an earlier run, if any

    let result = story(&args, &pool, &outbox, &js).await;

    // Clean up whatever happened: the stream and the schema are ours alone.
    let deleted = js
        .delete_stream(&args.stream)
        .await
        .map(drop)
        .context("deleting the stream");
    let dropped = sqlx::raw_sql("DROP SCHEMA campaign_finance CASCADE")
        .execute(&pool)
        .await;
    pool.close().await;
    result
        .and(deleted)
        .and(dropped.map(drop).context("dropping the schema"))
}

async fn story(
    args: &Args,
    pool: &PgPool,
    outbox: &PgOutbox,
    js: &jetstream::Context,
) -> anyhow::Result<()> {
    // The relay reaches NATS through a proxy we can switch off; the consumers
    // connect directly (the bus itself is fine, only the relay's link breaks).
    let proxy = FaultProxy::start(args.nats_url.trim_start_matches("nats://")).await?;
    let config = NatsConfig::default()
        .with_url(format!("nats://127.0.0.1:{}", proxy.port()))
        .with_stream(&args.stream)
        .with_subject_prefix("campaign") // events go to campaign.DonorSecured
        .with_create_stream(true);
    let publisher = NatsPublisher::connect(config).await?;
    let relay_link = publisher.client().clone(); // to watch the outage begin
    let ms = Duration::from_millis;
    let relay_config = RelayConfig::default()
        .with_poll_interval(ms(200))
        .with_backoff(Backoff::new(ms(50), ms(500)))
        .with_outage_backoff(Backoff::new(ms(50), ms(300)))
        .with_publish_timeout(ms(2_000))
        .with_lease(ms(5_000))
        .with_shutdown_timeout(ms(5_000));
    let relay = Relay::new(outbox.clone(), publisher, relay_config)?.spawn();

    let stream = js.get_stream(&args.stream).await?;
    let stop = CancellationToken::new();
    let thank_you =
        Consumer::start(&stream, "volunteer-thank-you", thank_donor, stop.clone()).await?;
    let strategy =
        Consumer::start(&stream, "fundraising-strategy", add_to_total, stop.clone()).await?;
    let heard_by_both = |count: usize| {
        let (thank_you, strategy) = (&thank_you, &strategy);
        async move { thank_you.distinct().await >= count && strategy.distinct().await >= count }
    };

    let n = i64::from(args.donors);
    let outcome = async {
        println!("1. Business as usual: CampaignFinance records donor 1.");
        let start = Instant::now();
        record_donor(pool, outbox, &sample_donor(1)).await?;
        wait_until("both services to hear of donor 1", || heard_by_both(1)).await?;
        println!("   both services heard of it {:.0?} later", start.elapsed());
        wait_until("the outbox to drain", || drained(outbox)).await?;

        println!("2. The message bus goes down; CampaignFinance records {n} more donors.");
        proxy.set_mode(FaultMode::Refuse);
        wait_until("the relay to lose the bus", || async {
            relay_link.connection_state() != State::Connected
        })
        .await?;
        // The events of these donors wait in the outbox. (A relay that was
        // mid-claim when the bus went down may hold a few of them "in flight";
        // their failed publish is retried once the bus is back.)
        for id in 2..=n + 1 {
            record_donor(pool, outbox, &sample_donor(id)).await?;
        }
        let rejected = Donor {
            id: n + 2,
            name: "Max Overdrive".into(),
            amount_cents: DONOR_CAP_CENTS + 250_000,
        };
        match record_donor(pool, outbox, &rejected).await {
            Ok(()) => bail!("the over-the-cap donor was accepted"),
            Err(e) => println!("   donor {} rolled back: {e}", rejected.id),
        }
        tokio::time::sleep(Duration::from_secs(1)).await; // give an event every chance to slip out
        let stats = outbox.stats().await?;
        let waiting = stats.pending + stats.in_flight;
        let delivered = [thank_you.distinct().await, strategy.distinct().await];
        println!(
            "   donors committed: {}; events waiting in the outbox: {waiting} \
             ({} pending, {} in flight); delivered since the outage: {:?}",
            ledger(pool).await?.0.len(),
            stats.pending,
            stats.in_flight,
            delivered.map(|d| d - 1),
        );
        ensure!(
            waiting == u64::from(args.donors) && delivered == [1, 1],
            "the outage should hold back every event"
        );

        println!("3. The message bus comes back.");
        let back = Instant::now();
        proxy.set_mode(FaultMode::Pass);
        wait_until("both services to hear of every donor", || {
            heard_by_both(n as usize + 1)
        })
        .await?;
        println!(
            "   both services caught up {:.1?} after the bus returned",
            back.elapsed()
        );
        wait_until("the outbox to drain", || drained(outbox)).await?;
        tokio::time::sleep(Duration::from_millis(500)).await; // let any duplicate show up
        anyhow::Ok(rejected.id)
    }
    .await;

    // Whatever happened: bus back, relay stopped gracefully, consumers stopped.
    proxy.set_mode(FaultMode::Pass);
    let report = relay.shutdown().await;
    stop.cancel();
    let tallies = [
        (thank_you.name, thank_you.join().await?),
        (strategy.name, strategy.join().await?),
    ];
    let rejected_id = outcome?;

    let (committed, ledger_total) = ledger(pool).await?;
    println!(
        "4. Summary (the relay published {} events):",
        report.published
    );
    println!(
        "   donors committed: {}, ${:.2} in total",
        committed.len(),
        dollars(ledger_total)
    );
    let mut failures = Vec::new();
    for (name, tally) in tallies {
        let lost = committed.difference(&tally.donor_ids).count();
        let heard_rejected = tally.donor_ids.contains(&rejected_id);
        println!(
            "   {name}: delivered {}, duplicates {}, lost {lost}, rolled-back donor heard: {heard_rejected}",
            tally.event_ids.len(),
            tally.duplicates,
        );
        if lost > 0 || heard_rejected {
            failures.push(name);
        }
        if tally.total_cents > 0 {
            println!("   {name}: ${:.2} raised", dollars(tally.total_cents));
            ensure!(
                tally.total_cents == ledger_total,
                "{name}'s total is not the ledger's"
            );
        }
    }
    ensure!(
        failures.is_empty(),
        "events lost or invented at {failures:?}"
    );
    println!("   Nothing lost, nothing invented.");
    Ok(())
}

fn dollars(cents: i64) -> f64 {
    cents as f64 / 100.0
}

async fn drained(outbox: &PgOutbox) -> bool {
    outbox
        .stats()
        .await
        .is_ok_and(|s| s.pending + s.in_flight == 0)
}

/// Polls `done` every 50 ms, for at most 30 s.
async fn wait_until<F: Future<Output = bool>>(
    what: &str,
    mut done: impl FnMut() -> F,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done().await {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
