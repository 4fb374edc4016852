//! The two services that hear about donors. Each is a proclaim [`Consumer`]
//! reading JetStream as a consumer group of its own (so each receives every
//! `DonorSecured` event) and recording its effect through the inbox, in
//! the same transaction as the (service, event id) pair: a redelivered
//! event is recognised and skipped, so every donor is thanked once and
//! counted once, however often the message arrives.

use std::time::Duration;

use anyhow::Context as _;
use proclaim::Backoff;
use proclaim::consumer::{Consumer, ConsumerHandle, ConsumerReport, Context, HandlerError};
use proclaim::nats::{JetStreamSource, JetStreamSourceConfig, NatsConfig};
use proclaim::postgres::{PgInbox, PgInboxTx};
use sqlx::PgPool;

use crate::donors::Donor;

/// The Volunteer Thank-You service's consumer group.
pub(crate) const THANK_YOU: &str = "volunteer-thank-you";
/// The Fundraising Strategy service's consumer group.
pub(crate) const STRATEGY: &str = "fundraising-strategy";

/// How long JetStream waits for an ack before it delivers a message again:
/// short, so the crash in the story is redelivered within seconds.
const ACK_WAIT: Duration = Duration::from_secs(2);

/// Creates the services' tables: the thank-you notes (deliberately without a
/// unique key on the donor, so a second note would show) and the running
/// total, next to the inbox.
pub(crate) async fn create_tables(pool: &PgPool, inbox: &PgInbox) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "CREATE TABLE campaign_finance.thank_you_notes (
             seq      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             donor_id BIGINT NOT NULL,
             note     TEXT NOT NULL);
         CREATE TABLE campaign_finance.fundraising_total (
             id          BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
             total_cents BIGINT NOT NULL,
             donors      BIGINT NOT NULL);
         INSERT INTO campaign_finance.fundraising_total VALUES (true, 0, 0)",
    )
    .execute(pool)
    .await
    .context("creating the services' tables")?;
    inbox.migrate().await.context("migrating the inbox")?;
    Ok(())
}

/// A database error in a handler: retried (the transaction rolls back with
/// the inbox row, so the retry starts clean).
fn db_error(e: sqlx::Error) -> HandlerError {
    HandlerError::transient("database error").with_source(e)
}

/// Volunteer Thank-You: writes one note per donor.
async fn thank_donor(cx: Context<Donor>, mut tx: PgInboxTx) -> Result<PgInboxTx, HandlerError> {
    let donor = cx.data;
    sqlx::query("INSERT INTO campaign_finance.thank_you_notes (donor_id, note) VALUES ($1, $2)")
        .bind(donor.id)
        .bind(format!("Thank you, {}!", donor.name))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    tracing::info!(
        consumer = THANK_YOU,
        donor = donor.id,
        "thank you, {}",
        donor.name
    );
    Ok(tx)
}

/// Fundraising Strategy: keeps the running total.
async fn add_to_total(cx: Context<Donor>, mut tx: PgInboxTx) -> Result<PgInboxTx, HandlerError> {
    sqlx::query(
        "UPDATE campaign_finance.fundraising_total
            SET total_cents = total_cents + $1, donors = donors + 1",
    )
    .bind(cx.data.amount_cents)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    Ok(tx)
}

/// A running service.
pub(crate) struct Service {
    handle: ConsumerHandle,
}

impl Service {
    /// Starts `name` (one of [`THANK_YOU`], [`STRATEGY`]) on the stream.
    /// With `crash_on`, the service "crashes" right after committing that
    /// donor's note, before the ack: its handler never returns, as if the
    /// process died there, so JetStream delivers the message again.
    pub(crate) async fn start(
        name: &'static str,
        nats: &NatsConfig,
        inbox: &PgInbox,
        crash_on: Option<(i64, tokio::sync::oneshot::Sender<()>)>,
    ) -> anyhow::Result<Self> {
        let source = JetStreamSource::connect(
            nats.clone(),
            JetStreamSourceConfig::new(name)
                .with_event_types(["DonorSecured"])
                .with_ack_wait(ACK_WAIT),
        )
        .await
        .with_context(|| format!("starting {name}'s consumer group"))?;
        let consumer = Consumer::new(name)
            .concurrency(8)
            .retry(
                Backoff::new(Duration::from_millis(50), Duration::from_secs(2)),
                10,
            )
            .park_into(inbox.clone());
        let consumer = match (name, crash_on) {
            (THANK_YOU, Some((donor_id, crashed))) => {
                let crashed = std::sync::Mutex::new(Some(crashed));
                consumer.on_once(
                    "DonorSecured",
                    inbox.clone(),
                    move |cx: Context<Donor>, tx| {
                        // Commit the note ourselves, then hang before returning.
                        let crash = cx.data.id == donor_id;
                        let crashed = crash
                            .then(|| crashed.lock().ok().and_then(|mut c| c.take()))
                            .flatten();
                        async move {
                            let tx = thank_donor(cx, tx).await?;
                            let Some(crashed) = crashed else {
                                return Ok(tx);
                            };
                            proclaim::inbox::InboxTx::commit(tx).await?;
                            let _ = crashed.send(());
                            std::future::pending::<Result<PgInboxTx, HandlerError>>().await
                        }
                    },
                )
            }
            (THANK_YOU, None) => consumer.on_once("DonorSecured", inbox.clone(), thank_donor),
            _ => consumer.on_once("DonorSecured", inbox.clone(), add_to_total),
        };
        let handle = consumer.spawn(source)?;
        Ok(Service { handle })
    }

    /// Stops the service gracefully.
    pub(crate) async fn stop(self) -> ConsumerReport {
        self.handle.shutdown().await
    }

    /// Kills the service where it stands, as a crash would: nothing it holds
    /// is acked.
    pub(crate) async fn kill(self) -> ConsumerReport {
        self.handle.abort().await
    }
}

/// The thank-you notes per donor: (donors with a note, notes in all).
pub(crate) async fn notes(pool: &PgPool) -> anyhow::Result<(Vec<i64>, i64)> {
    let donors: Vec<i64> = sqlx::query_scalar(
        "SELECT DISTINCT donor_id FROM campaign_finance.thank_you_notes ORDER BY donor_id",
    )
    .fetch_all(pool)
    .await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM campaign_finance.thank_you_notes")
        .fetch_one(pool)
        .await?;
    Ok((donors, total))
}

/// The fundraising total: (cents, donors counted).
pub(crate) async fn fundraising_total(pool: &PgPool) -> anyhow::Result<(i64, i64)> {
    Ok(
        sqlx::query_as("SELECT total_cents, donors FROM campaign_finance.fundraising_total")
            .fetch_one(pool)
            .await?,
    )
}
