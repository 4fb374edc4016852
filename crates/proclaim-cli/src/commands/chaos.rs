use std::io::Write;

use anyhow::{Context, bail};
use proclaim_chaos::scenario::{ChaosConfig, run as run_chaos};

use crate::InputError;
use crate::args::ChaosArgs;
use crate::settings::StoreSettings;

/// `proclaim chaos`: runs the scenario against the database of `--database-url`
/// (PostgreSQL; the run uses a schema of its own) and NATS, prints the report
/// as one JSON line, and fails when the run did not pass.
pub(crate) async fn run(settings: &StoreSettings, args: ChaosArgs) -> anyhow::Result<()> {
    let url = &settings.database_url;
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(InputError(
            "proclaim chaos needs a PostgreSQL --database-url (postgres://…)".into(),
        )
        .into());
    }
    if !(0.0..1.0).contains(&args.abort_ratio) {
        return Err(InputError("--abort-ratio must be in [0, 1)".into()).into());
    }
    let program = std::env::current_exe().context("cannot find the proclaim executable")?;
    let nats_url = args
        .nats_url
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
    let mut config = ChaosConfig::new(url.clone(), nats_url, program);
    config.duration = args.duration;
    config.relays = usize::from(args.relays);
    config.writers = usize::from(args.writers);
    config.keys = usize::try_from(args.keys).unwrap_or(usize::MAX);
    config.rate = args.rate;
    config.abort_ratio = args.abort_ratio;
    if !args.faults.is_empty() {
        config.faults = args.faults;
    }
    config.fault_hold = args.fault_hold;
    config.lease = args.lease;
    config.keep = args.keep;
    config.broker_dedup = !args.no_broker_dedup;
    if let Some(seed) = args.seed {
        config.seed = seed;
    }
    // Ctrl-C / SIGTERM ends the fault phase early; the run still heals,
    // drains, stops its relays, checks and cleans up.
    let stop = config.stop.clone();
    tokio::spawn(async move {
        crate::commands::relay::wait_for_signal().await;
        tracing::warn!("interrupted: healing, draining and checking what was written so far");
        stop.cancel();
    });
    let report = run_chaos(config).await?;
    let line = serde_json::to_string(&report)?;
    writeln!(std::io::stdout().lock(), "{line}")?;
    if !report.passed {
        bail!("chaos run failed: {}", report.problems.join("; "));
    }
    Ok(())
}
