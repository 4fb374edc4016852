//! `proclaim-bench`: benchmarks of the proclaim relay against a real
//! PostgreSQL (or SQLite, or MariaDB / MySQL) and a real NATS JetStream, each
//! figure next to a baseline measured in the same run on the same machine.
//!
//! Always build and run in release:
//!
//! ```text
//! # Throughput: how fast the relay empties a full outbox, against the bound
//! # H = 1/(1/a + 1/b) of a bare pipelined JetStream publish loop (a) and a bare
//! # claim-and-delete loop on the same table (b).
//! cargo run --release -p proclaim-bench -- drain --events 100000 --runs 5
//! cargo run --release -p proclaim-bench -- drain --events 100000 --runs 5 --batch-size 256 --relays 1
//!
//! # The same on the other stores (same baselines, measured the same way):
//! cargo run --release -p proclaim-bench -- drain --events 100000 --runs 5 --store sqlite
//! cargo run --release -p proclaim-bench -- drain --events 100000 --runs 5 --store mysql
//!
//! # Throughput per broker, measured as drain does: the relay with any
//! # destination URL's publisher (scheme = broker, query = publisher
//! # settings). Baseline (a') is proclaim's own publisher of that destination
//! # (not a raw client), so relay/H is the relay's overhead over its
//! # publisher; (b) is drain's claim-and-delete. Each run and role gets its
//! # own stream / exchange + queue / key / topic, removed afterwards; the URL
//! # only needs the broker's address. `http://127.0.0.1:0/PATH` (port 0)
//! # starts a local webhook sink that answers 204.
//! cargo run --release -p proclaim-bench -- broker --destination nats://127.0.0.1:4222
//! cargo run --release -p proclaim-bench -- broker --destination amqp://guest:guest@127.0.0.1:5672/%2f
//! cargo run --release -p proclaim-bench -- broker --destination redis://127.0.0.1:6379
//! cargo run --release -p proclaim-bench -- broker --destination mqtt://127.0.0.1:1883
//! cargo run --release -p proclaim-bench -- broker --destination http://127.0.0.1:0/events
//! cargo run --release -p proclaim-bench -- broker --destination redis://127.0.0.1:6379 --store sqlite --events 50000 --runs 3
//!
//! # Latency: commit → JetStream publish ack at a steady offered rate, with the
//! # NOTIFY wake-up (default) or polling only, against the COMMIT round trip
//! # and a bare JetStream publish → ack round trip at the same rate.
//! cargo run --release -p proclaim-bench -- latency --rate 1000 --seconds 10 --runs 3
//! cargo run --release -p proclaim-bench -- latency --rate 1000 --seconds 10 --runs 3 --no-wakeup
//! cargo run --release -p proclaim-bench -- latency --no-wakeup --poll-interval 250ms
//!
//! # Write cost: donor insert + enqueue against donor insert + a hand-written
//! # INSERT of the same outbox row (and the donor insert alone), 1 and 16 writers.
//! cargo run --release -p proclaim-bench -- write --writers 1,16 --seconds 5 --runs 5
//!
//! # Sustained drain with autovacuum off: 10 minutes at full speed on a
//! # backlog kept topped up, throughput per minute, last minute / first.
//! cargo run --release -p proclaim-bench -- soak --duration 10m --window 1m
//!
//! # Smoke tests for CI (a few seconds each):
//! cargo run --release -p proclaim-bench -- drain --quick
//! cargo run --release -p proclaim-bench -- drain --quick --store sqlite
//! cargo run --release -p proclaim-bench -- drain --quick --store mysql
//! cargo run --release -p proclaim-bench -- latency --quick
//! cargo run --release -p proclaim-bench -- latency --quick --no-wakeup
//! cargo run --release -p proclaim-bench -- write --quick
//! cargo run --release -p proclaim-bench -- soak --quick
//! cargo run --release -p proclaim-bench -- broker --quick --destination amqp://guest:guest@127.0.0.1:5672/%2f
//!
//! # Machine-readable: one JSON object per line on stdout (the table goes to stderr).
//! cargo run --release -p proclaim-bench -- drain --quick --json
//!
//! # Charts (SVG) from JSON lines: the latency distribution and the drain
//! # throughput per relay count.
//! cargo run --release -p proclaim-bench -- plot results.jsonl --out-dir docs/bench
//!
//! # Schemas and databases (bench_*), SQLite directories (proclaim_bench_*)
//! # and streams (BENCH_*) left behind by a killed run:
//! cargo run --release -p proclaim-bench -- leftovers
//! cargo run --release -p proclaim-bench -- leftovers --delete
//! ```
//!
//! Services: `--database-url` (env `PROCLAIM_BENCH_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`), `--mysql-url` (env
//! `PROCLAIM_BENCH_MYSQL_URL`, default `mysql://root@127.0.0.1:3306`, for
//! `--store mysql`), `--sqlite-dir` (env `PROCLAIM_BENCH_SQLITE_DIR`, default
//! the system's temporary directory, for `--store sqlite`) and `--nats-url`
//! (env `PROCLAIM_BENCH_NATS_URL`, default `nats://127.0.0.1:4222`). Each
//! scenario creates its own schema `bench_<scenario>_<unique>` (PostgreSQL),
//! database `bench_<scenario>_<unique>` (MariaDB / MySQL) or directory
//! `proclaim_bench_<scenario>_<unique>` holding a fresh database file
//! (SQLite), and its own file-storage streams
//! `BENCH_<SCENARIO>_<UNIQUE>_{RELAY,BARE}`, and removes them at the end, also
//! after an error, a panic or Ctrl-C. `broker` does not use `--nats-url`: it
//! connects to the broker of its `--destination`, where it creates streams
//! `BENCH_BROKER_<UNIQUE>_R<n>_{RELAY,BARE}` (NATS), exchanges and queues
//! `bench_broker_<unique>_r<n>_{relay,bare}[_q]` (RabbitMQ) or stream keys
//! `bench:broker_<unique>:r<n>:{relay,bare}` (Redis), each removed after its
//! run (and at the end, after an error or Ctrl-C); MQTT topics
//! `bench/broker_<unique>/r<n>/…` leave nothing behind. `leftovers` knows
//! only the streams of these. Log output (`RUST_LOG`, default `warn`) goes to
//! stderr.

mod db;

mod broker;
mod drain;
mod env;
mod latency;
mod leftovers;
mod output;
mod plot;
mod rates;
mod sink;
mod soak;
mod stats;
mod targets;
mod write;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, anyhow};
use clap::{Args, Parser, Subcommand};

use crate::db::StoreKind;
use crate::env::Env;
use crate::output::Output;

/// Benchmarks of the proclaim relay (PostgreSQL, SQLite or MariaDB → NATS JetStream, or any broker).
#[derive(Debug, Parser)]
#[command(name = "proclaim-bench", version)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

/// Options every scenario takes.
#[derive(Debug, Clone, Args)]
pub(crate) struct Common {
    /// PostgreSQL database to benchmark against.
    #[arg(
        long,
        global = true,
        env = "PROCLAIM_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pub(crate) database_url: String,
    /// MariaDB / MySQL server for `--store mysql` (each scenario creates a database of its own).
    #[arg(
        long,
        global = true,
        env = "PROCLAIM_BENCH_MYSQL_URL",
        default_value = "mysql://root@127.0.0.1:3306"
    )]
    pub(crate) mysql_url: String,
    /// Directory for `--store sqlite`'s database directories [default: the system's temporary directory].
    #[arg(long, global = true, env = "PROCLAIM_BENCH_SQLITE_DIR")]
    pub(crate) sqlite_dir: Option<PathBuf>,
    /// NATS server with JetStream enabled.
    #[arg(
        long,
        global = true,
        env = "PROCLAIM_BENCH_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub(crate) nats_url: String,
    /// Print one JSON object per line on stdout (the table then goes to stderr).
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

impl Common {
    /// `--sqlite-dir`, or the system's temporary directory.
    pub(crate) fn sqlite_dir(&self) -> PathBuf {
        self.sqlite_dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Throughput: time to drain a pre-written outbox, against bare baselines.
    Drain(drain::DrainArgs),
    /// Latency: commit → JetStream ack at a steady offered rate.
    Latency(latency::LatencyArgs),
    /// Write cost: a business transaction with `enqueue` against the same with a hand-written INSERT.
    Write(write::WriteArgs),
    /// Sustained drain: the relay at full speed for minutes on a backlog kept topped up, rate per window.
    Soak(soak::SoakArgs),
    /// Throughput per broker: time to drain a pre-written outbox into any destination URL.
    Broker(broker::BrokerArgs),
    /// SVG charts (latency distribution, drain throughput per relay count) from `--json` output.
    Plot(plot::PlotArgs),
    /// Lists (or deletes) schemas, databases, directories and streams left behind by killed runs.
    Leftovers(leftovers::LeftoversArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = Output::new(cli.common.json);
    match cli.command {
        Command::Drain(args) => {
            with_env("drain", &cli.common, args.store, move |env| {
                drain::run(env, args, out)
            })
            .await
        }
        Command::Latency(args) => {
            with_env("latency", &cli.common, StoreKind::Postgres, move |env| {
                latency::run(env, args, out)
            })
            .await
        }
        Command::Write(args) => {
            with_env("write", &cli.common, StoreKind::Postgres, move |env| {
                write::run(env, args, out)
            })
            .await
        }
        Command::Soak(args) => {
            with_env("soak", &cli.common, StoreKind::Postgres, move |env| {
                soak::run(env, args, out)
            })
            .await
        }
        Command::Broker(args) => {
            let env = Arc::new(broker::BrokerEnv::new(&cli.common, &args).await?);
            with_scratch("broker", env, move |env| broker::run(env, args, out)).await
        }
        Command::Plot(args) => plot::run(args, out),
        Command::Leftovers(args) => leftovers::run(&cli.common, args, out).await,
    }
}

/// What a scenario creates (a database, streams, queues, keys) and must
/// remove at the end.
pub(crate) trait Scratch: Send + Sync + 'static {
    /// Removes everything that is left; tries everything, then reports what
    /// failed.
    async fn cleanup(&self) -> anyhow::Result<()>;
}

/// Creates the scenario's database on `store` and its NATS connection, then
/// runs it as [`with_scratch`] does.
async fn with_env<F, Fut>(
    scenario: &str,
    common: &Common,
    store: StoreKind,
    body: F,
) -> anyhow::Result<()>
where
    F: FnOnce(Arc<Env>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let env = Arc::new(Env::new(scenario, common, store).await?);
    with_scratch(scenario, env, body).await
}

/// Runs the scenario on a task of its own, and removes what `env` holds
/// afterwards, whether it succeeded, failed, panicked or was interrupted
/// with Ctrl-C.
async fn with_scratch<S, F, Fut>(scenario: &str, env: Arc<S>, body: F) -> anyhow::Result<()>
where
    S: Scratch,
    F: FnOnce(Arc<S>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut task = tokio::spawn(body(env.clone()));
    let result = tokio::select! {
        joined = &mut task => match joined {
            Ok(result) => result,
            Err(e) => Err(anyhow!("the {scenario} scenario failed: {e}")),
        },
        signal = tokio::signal::ctrl_c() => {
            task.abort();
            signal.context("waiting for Ctrl-C")?;
            Err(anyhow!("interrupted"))
        }
    };
    let cleanup = env.cleanup().await;
    match (result, cleanup) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) => Err(e),
        (Ok(()), Err(c)) => Err(c.context("the benchmark ran, but cleaning up failed")),
        (Err(e), Err(c)) => Err(e.context(format!("cleaning up failed too: {c:#}"))),
    }
}
