//! `leftovers`: schemas, databases, directories and streams a killed
//! benchmark left behind.
//!
//! Looks in each place a scenario may have created something: PostgreSQL
//! schemas `bench_*` (`--database-url`), MariaDB / MySQL databases `bench_*`
//! (`--mysql-url`), SQLite directories `proclaim_bench_*` (`--sqlite-dir`)
//! and JetStream streams `BENCH_*` (`--nats-url`). A service that cannot be
//! reached is reported as not checked, and the others are still checked.

use std::path::Path;

use anyhow::Context as _;
use async_nats::jetstream;
use clap::Args;
use futures::TryStreamExt;
use serde_json::json;
use sqlx::AssertSqlSafe;
use sqlx::mysql::MySqlPoolOptions;
use sqlx::postgres::PgPoolOptions;

use crate::Common;
use crate::db::{SCHEMA_PREFIX, SQLITE_DIR_PREFIX};
use crate::env::STREAM_PREFIX;
use crate::output::Output;

#[derive(Debug, Args)]
pub(crate) struct LeftoversArgs {
    /// Delete what is found (only `bench_*` schemas and databases,
    /// `proclaim_bench_*` directories and `BENCH_*` streams).
    #[arg(long)]
    delete: bool,
}

/// What one place holds, or why it was not checked.
type Found = Result<Vec<String>, String>;

pub(crate) async fn run(common: &Common, args: LeftoversArgs, out: Output) -> anyhow::Result<()> {
    let schemas = postgres_schemas(&common.database_url, args.delete).await?;
    let databases = mysql_databases(&common.mysql_url, args.delete).await?;
    let sqlite_dir = common.sqlite_dir();
    let directories = sqlite_dirs(&sqlite_dir, args.delete)?;
    let streams = nats_streams(&common.nats_url, args.delete).await?;

    let places = [
        ("schema", &schemas),
        ("database", &databases),
        ("directory", &directories),
        ("stream", &streams),
    ];
    for (kind, found) in places {
        for name in found.iter().flatten() {
            out.line(format!("{kind} {name}"))?;
        }
    }
    let mut not_checked = Vec::new();
    for (what, found) in [
        (format!("PostgreSQL at {}", common.database_url), &schemas),
        (
            format!("MariaDB / MySQL at {}", common.mysql_url),
            &databases,
        ),
        (
            format!("SQLite directory {}", sqlite_dir.display()),
            &directories,
        ),
        (format!("NATS at {}", common.nats_url), &streams),
    ] {
        if let Err(e) = found {
            out.line(format!("not checked: {what}: {e}"))?;
            not_checked.push(format!("{what}: {e}"));
        }
    }
    let count = |found: &Found| found.as_ref().map_or(0, Vec::len);
    let verb = if args.delete { "deleted" } else { "found" };
    out.line(format!(
        "{verb} {} schema(s) {SCHEMA_PREFIX}*, {} database(s) {SCHEMA_PREFIX}*, \
         {} SQLite director(ies) {SQLITE_DIR_PREFIX}* and {} stream(s) {STREAM_PREFIX}*",
        count(&schemas),
        count(&databases),
        count(&directories),
        count(&streams),
    ))?;
    let list = |found: &Found| found.clone().unwrap_or_default();
    out.json(&json!({
        "scenario": "leftovers",
        "deleted": args.delete,
        "schemas": list(&schemas),
        "mysql_databases": list(&databases),
        "sqlite_dirs": list(&directories),
        "streams": list(&streams),
        "not_checked": not_checked,
    }))?;
    Ok(())
}

/// PostgreSQL schemas `bench_*`; `Ok(Err(_))` when the server cannot be reached.
async fn postgres_schemas(url: &str, delete: bool) -> anyhow::Result<Found> {
    let pool = match PgPoolOptions::new().max_connections(1).connect(url).await {
        Ok(pool) => pool,
        Err(e) => return Ok(Err(format!("cannot connect: {e}"))),
    };
    let schemas: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname::text, $1) ORDER BY 1",
    )
    .bind(SCHEMA_PREFIX)
    .fetch_all(&pool)
    .await?;
    if delete {
        for schema in &schemas {
            sqlx::raw_sql(AssertSqlSafe(format!(r#"DROP SCHEMA "{schema}" CASCADE"#)))
                .execute(&pool)
                .await
                .with_context(|| format!("dropping schema {schema}"))?;
        }
    }
    pool.close().await;
    Ok(Ok(schemas))
}

/// MariaDB / MySQL databases `bench_*`; `Ok(Err(_))` when the server cannot be reached.
async fn mysql_databases(url: &str, delete: bool) -> anyhow::Result<Found> {
    let pool = match MySqlPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
    {
        Ok(pool) => pool,
        Err(e) => return Ok(Err(format!("cannot connect: {e}"))),
    };
    let mut databases: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(schema_name AS CHAR) FROM information_schema.schemata ORDER BY 1",
    )
    .fetch_all(&pool)
    .await?;
    databases.retain(|name| name.starts_with(SCHEMA_PREFIX));
    if delete {
        for database in &databases {
            sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE `{database}`")))
                .execute(&pool)
                .await
                .with_context(|| format!("dropping database {database}"))?;
        }
    }
    pool.close().await;
    Ok(Ok(databases))
}

/// Directories `proclaim_bench_*` under `root`; `Ok(Err(_))` when `root`
/// cannot be read.
fn sqlite_dirs(root: &Path, delete: bool) -> anyhow::Result<Found> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) => return Ok(Err(format!("cannot read it: {e}"))),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", root.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(SQLITE_DIR_PREFIX) && entry.file_type()?.is_dir() {
            dirs.push(name);
        }
    }
    dirs.sort();
    if delete {
        for dir in &dirs {
            let path = root.join(dir);
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing directory {}", path.display()))?;
        }
    }
    Ok(Ok(dirs))
}

/// JetStream streams `BENCH_*`; `Ok(Err(_))` when the server cannot be reached.
async fn nats_streams(url: &str, delete: bool) -> anyhow::Result<Found> {
    let client = match async_nats::connect(url).await {
        Ok(client) => client,
        Err(e) => return Ok(Err(format!("cannot connect: {e}"))),
    };
    let js = jetstream::new(client);
    let mut streams: Vec<String> = js
        .stream_names()
        .try_collect::<Vec<String>>()
        .await?
        .into_iter()
        .filter(|name| name.starts_with(STREAM_PREFIX))
        .collect();
    streams.sort();
    if delete {
        for stream in &streams {
            js.delete_stream(stream)
                .await
                .with_context(|| format!("deleting stream {stream}"))?;
        }
    }
    Ok(Ok(streams))
}
