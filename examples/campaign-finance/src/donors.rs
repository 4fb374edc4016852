//! The CampaignFinance service: the donor ledger and its `DonorSecured` event,
//! written in one transaction.

use std::collections::HashSet;

use anyhow::{Context, bail};
use proclaim::Event;
use proclaim::postgres::PgOutbox;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// The schema holding both the business table and the outbox.
pub(crate) const SCHEMA: &str = "campaign_finance";

/// The campaign's own cap on what one donor may give in total.
pub(crate) const DONOR_CAP_CENTS: i64 = 500_000;

/// A donor as the ledger stores it and as `DonorSecured` carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Donor {
    pub(crate) id: i64,
    pub(crate) name: String,
    pub(crate) amount_cents: i64,
}

/// Drops and recreates the schema, so every run starts clean.
pub(crate) async fn reset_schema(pool: &PgPool, outbox: &PgOutbox) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "DROP SCHEMA IF EXISTS campaign_finance CASCADE;
         CREATE SCHEMA campaign_finance;
         CREATE TABLE campaign_finance.campaign_donors (
             id           BIGINT PRIMARY KEY,
             name         TEXT NOT NULL,
             amount_cents BIGINT NOT NULL,
             recorded_at  TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .execute(pool)
    .await
    .context("creating the campaign_finance schema")?;
    // The outbox table lives next to the business table, in the same schema.
    outbox.migrate().await.context("migrating the outbox")?;
    Ok(())
}

/// Records a donor: the ledger row and the `DonorSecured` event commit
/// together, or neither does. The broker is not involved at all.
pub(crate) async fn record_donor(
    pool: &PgPool,
    outbox: &PgOutbox,
    donor: &Donor,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO campaign_finance.campaign_donors (id, name, amount_cents) VALUES ($1, $2, $3)",
    )
    .bind(donor.id)
    .bind(&donor.name)
    .bind(donor.amount_cents)
    .execute(&mut *tx)
    .await?;
    let event = Event::builder("DonorSecured")
        .subject(format!("donor-{}", donor.id))
        .source("campaign-finance")
        .data(donor)
        .build()?;
    outbox.enqueue(&mut tx, &event).await?;

    // A compliance check that reads the ledger inside the transaction, so it
    // counts the row just written. Failing it drops `tx`: a rollback that
    // takes the donor row and the event with it.
    let total: i64 = sqlx::query_scalar(
        "SELECT sum(amount_cents)::int8 FROM campaign_finance.campaign_donors WHERE name = $1",
    )
    .bind(&donor.name)
    .fetch_one(&mut *tx)
    .await?;
    if total > DONOR_CAP_CENTS {
        bail!(
            "{} would give ${} in total, over the campaign's cap",
            donor.name,
            total / 100
        );
    }
    tx.commit().await?;
    Ok(())
}

/// The ids of the donors in the ledger, and what they gave in total.
pub(crate) async fn ledger(pool: &PgPool) -> anyhow::Result<(HashSet<i64>, i64)> {
    let rows: Vec<(i64, i64)> =
        sqlx::query_as("SELECT id, amount_cents FROM campaign_finance.campaign_donors")
            .fetch_all(pool)
            .await?;
    Ok((
        rows.iter().map(|r| r.0).collect(),
        rows.iter().map(|r| r.1).sum(),
    ))
}

/// The `n`-th generated donor: 400 distinct names, $5 to $500 each.
pub(crate) fn sample_donor(n: i64) -> Donor {
    const FIRST: &str = "Ada Grace Alan Barbara Edsger Frances Donald Radia Ken Margaret \
                         Dennis Hedy Tim Katherine Linus Shafi Leslie Adele John Sophie";
    const LAST: &str = "Lovelace Hopper Turing Liskov Dijkstra Allen Knuth Perlman Thompson \
                        Hamilton Ritchie Lamarr Cerf Johnson Torvalds Goldwasser Lamport \
                        Goldberg McCarthy Wilson";
    let pick = |names: &str, i: i64| {
        names
            .split_whitespace()
            .nth(i as usize % 20)
            .unwrap_or_default()
            .to_owned()
    };
    Donor {
        id: n,
        name: format!("{} {}", pick(FIRST, n), pick(LAST, n / 20)),
        amount_cents: 500 + (n * 7_919) % 49_501,
    }
}
