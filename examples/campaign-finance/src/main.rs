//! Run with cargo run -p example-campaign-finance
//!
//! The CampaignFinance service records each donor in `campaign_donors` and a
//! `DonorSecured` event in the outbox, in ONE transaction. A proclaim relay
//! delivers the events to NATS JetStream, where the Volunteer Thank-You and
//! Fundraising Strategy services each read every one of them, as consumer
//! groups of proclaim's consumer runtime, each writing its effect through
//! the inbox.
//!
//! Then the tragedies: the message bus goes down (a fault proxy between the
//! relay and NATS refuses every connection) while donors are recorded. The
//! donors commit anyway and their events wait in the outbox; when the bus
//! comes back, every event reaches both services. A donor whose transaction
//! rolls back is never announced. The thank-you service crashes right after
//! writing a note, before its ack, and every event is delivered a second
//! time: still one thank-you note per donor, and a total equal to the
//! ledger's. Stdout tells the story; logs go to stderr.
#![allow(clippy::print_stdout)]

mod consumers;
mod donors;

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use async_nats::connection::State;
use async_nats::jetstream;
use clap::Parser;
use consumers::{STRATEGY, Service, THANK_YOU, fundraising_total, notes};
use donors::{DONOR_CAP_CENTS, Donor, SCHEMA, ledger, record_donor, reset_schema, sample_donor};
use proclaim::consumer::ConsumerReport;
use proclaim::nats::{NatsConfig, NatsPublisher};
use proclaim::postgres::{PgInbox, PgInboxOptions, PgOutbox, PgOutboxOptions};
use proclaim::{Backoff, OutboxStore, Relay, RelayConfig};
use proclaim_testkit::proxy::{FaultMode, FaultProxy};
use sqlx::PgPool;

#[derive(Parser)]
#[command(
    about = "Donors and DonorSecured events survive a message-bus outage, a crash and redelivery."
)]
struct Args {
    /// Donors recorded while the message bus is down.
    #[arg(long, env = "DONORS", default_value_t = 200)]
    donors: u32,
    /// PostgreSQL holding the donors, the outbox and the services' tables.
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
    let inbox = PgInbox::with_options(pool.clone(), PgInboxOptions::default().with_schema(SCHEMA))?;
    reset_schema(&pool, &outbox).await?;
    consumers::create_tables(&pool, &inbox).await?;
    let _ = js.delete_stream(&args.stream).await; // left over from an earlier run, if any

    let result = story(&args, &pool, &outbox, &inbox, &js).await;

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
    inbox: &PgInbox,
    js: &jetstream::Context,
) -> anyhow::Result<()> {
    // The relay reaches NATS through a proxy we can switch off; the services
    // connect directly (the bus itself is fine, only the relay's link breaks).
    let proxy = FaultProxy::start(args.nats_url.trim_start_matches("nats://")).await?;
    let bus = NatsConfig::default()
        .with_url(&args.nats_url)
        .with_stream(&args.stream)
        .with_subject_prefix("campaign") // events go to campaign.DonorSecured
        .with_create_stream(true);
    let publisher = NatsPublisher::connect(
        bus.clone()
            .with_url(format!("nats://127.0.0.1:{}", proxy.port())),
    )
    .await?;
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

    let n = i64::from(args.donors);
    let rejected = Donor {
        id: n + 2,
        name: "Max Overdrive".into(),
        amount_cents: DONOR_CAP_CENTS + 250_000,
    };
    let late = sample_donor(n + 3); // the donor whose thank-you "crashes"
    let (crashed_tx, crashed) = tokio::sync::oneshot::channel();
    let thank_you = Service::start(THANK_YOU, &bus, inbox, Some((late.id, crashed_tx))).await?;
    let strategy = Service::start(STRATEGY, &bus, inbox, None).await?;
    let mut reports: Vec<(&str, ConsumerReport)> = Vec::new();

    let outcome = async {
        println!("1. Business as usual: CampaignFinance records donor 1.");
        let start = Instant::now();
        record_donor(pool, outbox, &sample_donor(1)).await?;
        wait_until("both services to handle donor 1", || heard_by_both(pool, 1)).await?;
        println!("   both services handled it {:.0?} later", start.elapsed());
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
        match record_donor(pool, outbox, &rejected).await {
            Ok(()) => bail!("the over-the-cap donor was accepted"),
            Err(e) => println!("   donor {} rolled back: {e}", rejected.id),
        }
        tokio::time::sleep(Duration::from_secs(1)).await; // give an event every chance to slip out
        let stats = outbox.stats().await?;
        let waiting = stats.pending + stats.in_flight;
        let handled = [notes(pool).await?.1, fundraising_total(pool).await?.1];
        println!(
            "   donors committed: {}; events waiting in the outbox: {waiting} \
             ({} pending, {} in flight); handled since the outage: {:?}",
            ledger(pool).await?.0.len(),
            stats.pending,
            stats.in_flight,
            handled.map(|d| d - 1),
        );
        ensure!(
            waiting == u64::from(args.donors) && handled == [1, 1],
            "the outage should hold back every event"
        );

        println!("3. The message bus comes back.");
        let back = Instant::now();
        proxy.set_mode(FaultMode::Pass);
        wait_until("both services to handle every donor", || {
            heard_by_both(pool, n + 1)
        })
        .await?;
        println!(
            "   both services caught up {:.1?} after the bus returned",
            back.elapsed()
        );
        wait_until("the outbox to drain", || drained(outbox)).await?;
        anyhow::Ok(())
    }
    .await;
    let outcome = match outcome {
        Ok(()) => {
            redelivery(
                args,
                pool,
                outbox,
                inbox,
                js,
                &bus,
                &late,
                crashed,
                thank_you,
                strategy,
                &mut reports,
            )
            .await
        }
        Err(e) => {
            reports.push((THANK_YOU, thank_you.stop().await));
            reports.push((STRATEGY, strategy.stop().await));
            Err(e)
        }
    };

    // Whatever happened: bus back, relay stopped gracefully.
    proxy.set_mode(FaultMode::Pass);
    let relay_report = relay.shutdown().await;
    outcome?;
    summary(pool, relay_report.published, rejected.id, &reports).await
}

/// Step 4: the thank-you service crashes after writing a note, before its
/// ack; then every event in the stream is published once more. Stops both
/// services and hands back their reports (one per instance).
#[allow(clippy::too_many_arguments)]
async fn redelivery(
    args: &Args,
    pool: &PgPool,
    outbox: &PgOutbox,
    inbox: &PgInbox,
    js: &jetstream::Context,
    bus: &NatsConfig,
    late: &Donor,
    crashed: tokio::sync::oneshot::Receiver<()>,
    thank_you: Service,
    strategy: Service,
    reports: &mut Vec<(&'static str, ConsumerReport)>,
) -> anyhow::Result<()> {
    println!(
        "4. Donor {} arrives; Volunteer Thank-You crashes right after writing the note, before its ack.",
        late.id
    );
    record_donor(pool, outbox, late).await?;
    tokio::time::timeout(Duration::from_secs(30), crashed)
        .await
        .context("timed out waiting for the crash")?
        .context("the thank-you service stopped before the crash")?;
    reports.push((THANK_YOU, thank_you.kill().await));
    let thank_you = Service::start(THANK_YOU, bus, inbox, None).await?;
    println!("   restarted; JetStream delivers the unacked message again.");

    let stream = js.get_stream(&args.stream).await?;
    let last = stream.get_info().await?.state.last_sequence;
    println!(
        "5. All {last} events are published again, under new message ids (what a relay does when an ack \
         is lost and JetStream's dedup window has passed)."
    );
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await?;
        let mut headers = message.headers;
        let id = headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        headers.insert("Nats-Msg-Id", format!("{id}-again").as_str());
        js.publish_with_headers(message.subject, headers, message.payload)
            .await?
            .await?;
    }
    let expected = |group: &'static str| {
        let stream = &stream;
        async move {
            stream.consumer_info(group).await.is_ok_and(|info| {
                info.num_pending == 0
                    && info.num_ack_pending == 0
                    && info.delivered.stream_sequence >= 2 * last
            })
        }
    };
    wait_until("both services to settle every delivery", || async {
        expected(THANK_YOU).await && expected(STRATEGY).await
    })
    .await?;
    reports.push((THANK_YOU, thank_you.stop().await));
    reports.push((STRATEGY, strategy.stop().await));
    Ok(())
}

/// Step 6: what each service did, checked against the ledger.
async fn summary(
    pool: &PgPool,
    published: u64,
    rejected_id: i64,
    reports: &[(&str, ConsumerReport)],
) -> anyhow::Result<()> {
    let (committed, ledger_total) = ledger(pool).await?;
    println!("6. Summary (the relay published {published} events):");
    println!(
        "   donors committed: {}, ${:.2} in total",
        committed.len(),
        dollars(ledger_total)
    );
    let sum = |group: &str| {
        reports.iter().filter(|(g, _)| *g == group).fold(
            ConsumerReport::default(),
            |mut total, (_, r)| {
                total.handled += r.handled;
                total.duplicates += r.duplicates;
                total.parked += r.parked;
                total
            },
        )
    };
    let (noted, notes_total) = notes(pool).await?;
    let thanked: std::collections::HashSet<i64> = noted.iter().copied().collect();
    let thank_you = sum(THANK_YOU);
    println!(
        "   {THANK_YOU}: {} deliveries, {} redeliveries skipped by the inbox, {notes_total} notes for {} donors, rolled-back donor thanked: {}",
        thank_you.handled,
        thank_you.duplicates,
        thanked.len(),
        thanked.contains(&rejected_id),
    );
    let (total_cents, counted) = fundraising_total(pool).await?;
    let strategy = sum(STRATEGY);
    println!(
        "   {STRATEGY}: {} deliveries, {} redeliveries skipped by the inbox, ${:.2} raised from {counted} donors",
        strategy.handled,
        strategy.duplicates,
        dollars(total_cents),
    );
    let donors = i64::try_from(committed.len())?;
    ensure!(
        thanked == committed && notes_total == donors,
        "{THANK_YOU}: {notes_total} notes for {} donors; the ledger has {donors}",
        thanked.len()
    );
    ensure!(
        total_cents == ledger_total && counted == donors,
        "{STRATEGY}'s total is not the ledger's"
    );
    ensure!(
        thank_you.duplicates > committed.len() as u64
            && strategy.duplicates >= committed.len() as u64,
        "the redeliveries (and the crashed note's) did not reach the services"
    );
    ensure!(
        thank_you.parked == 0 && strategy.parked == 0,
        "events were parked"
    );
    println!("   One thank-you per donor; nothing lost, nothing invented, nothing counted twice.");
    Ok(())
}

/// Whether both services have the effect of `count` donors.
async fn heard_by_both(pool: &PgPool, count: i64) -> bool {
    let thanked = notes(pool).await.map(|(_, n)| n).unwrap_or(0);
    let counted = fundraising_total(pool).await.map(|(_, n)| n).unwrap_or(0);
    thanked >= count && counted >= count
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
