//! `leftovers`: schemas and streams a killed benchmark left behind.

use anyhow::Context as _;
use async_nats::jetstream;
use clap::Args;
use futures::TryStreamExt;
use serde_json::json;
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPoolOptions;

use crate::Common;
use crate::env::{SCHEMA_PREFIX, STREAM_PREFIX};
use crate::output::Output;

#[derive(Debug, Args)]
pub(crate) struct LeftoversArgs {
    /// Delete what is found (only `bench_*` schemas and `BENCH_*` streams).
    #[arg(long)]
    delete: bool,
}

pub(crate) async fn run(common: &Common, args: LeftoversArgs, out: Output) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&common.database_url)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {}", common.database_url))?;
    let schemas: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname::text, $1) ORDER BY 1",
    )
    .bind(SCHEMA_PREFIX)
    .fetch_all(&pool)
    .await?;

    let client = async_nats::connect(&common.nats_url)
        .await
        .with_context(|| format!("cannot connect to NATS at {}", common.nats_url))?;
    let js = jetstream::new(client);
    let mut streams: Vec<String> = js
        .stream_names()
        .try_collect::<Vec<String>>()
        .await?
        .into_iter()
        .filter(|name| name.starts_with(STREAM_PREFIX))
        .collect();
    streams.sort();

    for schema in &schemas {
        out.line(format!("schema {schema}"))?;
        if args.delete {
            sqlx::raw_sql(AssertSqlSafe(format!(r#"DROP SCHEMA "{schema}" CASCADE"#)))
                .execute(&pool)
                .await
                .with_context(|| format!("dropping schema {schema}"))?;
        }
    }
    for stream in &streams {
        out.line(format!("stream {stream}"))?;
        if args.delete {
            js.delete_stream(stream)
                .await
                .with_context(|| format!("deleting stream {stream}"))?;
        }
    }
    let verb = if args.delete { "deleted" } else { "found" };
    out.line(format!(
        "{verb} {} schema(s) {SCHEMA_PREFIX}* and {} stream(s) {STREAM_PREFIX}*",
        schemas.len(),
        streams.len()
    ))?;
    out.json(&json!({
        "scenario": "leftovers",
        "deleted": args.delete,
        "schemas": schemas,
        "streams": streams,
    }))?;
    pool.close().await;
    Ok(())
}
