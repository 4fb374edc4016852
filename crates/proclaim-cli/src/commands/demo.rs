//! `proclaim demo`: the CampaignFinance scenario (seeds 000/001) on the
//! embedded default — a SQLite file and the in-process bus, no services.
//!
//! CampaignFinance records each donor and its `DonorSecured` event in one
//! transaction; a relay delivers the events; Volunteer Thank-You and
//! Fundraising Strategy each receive every one. Prints one summary line
//! `delivered N/N, lost L, duplicates D` and fails if anything was lost.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use proclaim::local::{InProcessBus, Subscription};
use proclaim::sqlite::SqliteOutbox;
use proclaim::{Event, OutboxStore, Relay, RelayConfig};
use tokio::sync::watch;
use uuid::Uuid;

use crate::args::DemoArgs;

/// What one consumer saw.
#[derive(Default, Clone)]
struct Seen {
    ids: HashSet<Uuid>,
    duplicates: u64,
}

/// Receives every DonorSecured event, acks it once handled, and reports
/// what it has seen so far.
fn consume(mut subscription: Subscription) -> watch::Receiver<Seen> {
    let (report, seen) = watch::channel(Seen::default());
    tokio::spawn(async move {
        let mut mine = Seen::default();
        while let Some(delivery) = subscription.next().await {
            if !mine.ids.insert(delivery.event.id()) {
                mine.duplicates += 1;
            }
            delivery.ack();
            report.send_replace(mine.clone());
        }
    });
    seen
}

struct TempDb(PathBuf);

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let (path, _temp) = match args.db {
        Some(path) => (path, None),
        None => {
            let path =
                std::env::temp_dir().join(format!("proclaim-demo-{}.db", Uuid::new_v4().simple()));
            (path.clone(), Some(TempDb(path)))
        }
    };
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let outbox = SqliteOutbox::connect(&url)
        .await
        .with_context(|| format!("cannot open the SQLite database {}", path.display()))?;
    proclaim::OutboxAdmin::migrate(&outbox).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS campaign_donors (
             id INTEGER PRIMARY KEY, name TEXT NOT NULL, amount_cents INTEGER NOT NULL)",
    )
    .execute(outbox.pool())
    .await?;

    let bus = InProcessBus::new();
    let thank_you = consume(bus.subscribe("volunteer-thank-you", ["DonorSecured"]));
    let strategy = consume(bus.subscribe("fundraising-strategy", ["DonorSecured"]));
    let config = RelayConfig::default().with_poll_interval(Duration::from_millis(100));
    let relay = Relay::new(outbox.clone(), bus.clone(), config)?.spawn();

    let bar = if std::io::stdout().is_terminal() {
        let bar = ProgressBar::with_draw_target(
            Some(u64::from(args.donors) * 2),
            ProgressDrawTarget::stdout(),
        );
        bar.set_style(
            ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };

    // CampaignFinance: one donor and its event per transaction.
    bar.set_message("recording");
    let mut committed = HashSet::with_capacity(args.donors as usize);
    let existing: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM campaign_donors")
        .fetch_one(outbox.pool())
        .await?;
    for n in 1..=i64::from(args.donors) {
        let id = existing + n;
        let amount_cents = 1_000 + (id * 7_919) % 500_000;
        let mut tx = outbox.pool().begin().await?;
        sqlx::query("INSERT INTO campaign_donors (id, name, amount_cents) VALUES (?, ?, ?)")
            .bind(id)
            .bind(format!("Donor {id}"))
            .bind(amount_cents)
            .execute(&mut *tx)
            .await?;
        let event = Event::builder("DonorSecured")
            .subject(format!("donor-{id}"))
            .source("campaign-finance")
            .data(&serde_json::json!({ "donor_id": id, "amount_cents": amount_cents }))
            .build()?;
        outbox.enqueue(&mut tx, &event).await?;
        tx.commit().await?;
        committed.insert(event.id());
        bar.inc(1);
    }

    // Wait for both consumers, as long as deliveries keep coming.
    bar.set_message("delivering");
    let everyone = |seen: &watch::Receiver<Seen>| seen.borrow().ids.len();
    let mut last = (0, tokio::time::Instant::now());
    loop {
        let delivered = everyone(&thank_you).min(everyone(&strategy));
        bar.set_position(u64::from(args.donors) + delivered as u64);
        if delivered >= committed.len() {
            break;
        }
        if delivered > last.0 {
            last = (delivered, tokio::time::Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(30) {
            break; // stalled: report what is missing
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bar.finish_and_clear();
    let report = relay.shutdown().await;
    let left = outbox.stats().await?;

    let (a, b) = (thank_you.borrow().clone(), strategy.borrow().clone());
    let delivered = committed
        .iter()
        .filter(|id| a.ids.contains(id) && b.ids.contains(id))
        .count();
    let phantom = a
        .ids
        .union(&b.ids)
        .filter(|id| !committed.contains(id))
        .count();
    let lost = committed.len() - delivered;
    let duplicates = a.duplicates + b.duplicates;
    writeln!(
        std::io::stdout(),
        "delivered {delivered}/{}, lost {lost}, duplicates {duplicates}",
        committed.len()
    )?;
    tracing::info!(
        published = report.published,
        pending = left.pending,
        "demo finished"
    );
    if lost > 0 || phantom > 0 {
        bail!(
            "{lost} events lost, {phantom} phantom events (outbox: {} pending)",
            left.pending
        );
    }
    Ok(())
}
