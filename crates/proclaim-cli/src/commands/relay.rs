use anyhow::Context;
use proclaim::nats::NatsPublisher;
use proclaim::{CancellationToken, Relay};

use crate::args::RelayArgs;
use crate::settings::{FileConfig, StoreSettings, relay_settings};
use crate::store::with_outbox;

pub(crate) async fn run(
    settings: &StoreSettings,
    args: RelayArgs,
    file: FileConfig,
) -> anyhow::Result<()> {
    let (config, nats, metrics_addr) = relay_settings(&args, file)?;
    if let Some(addr) = metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!(%addr, "serving Prometheus metrics");
    }
    let pool_size = u32::try_from(config.max_batches_in_flight).unwrap_or(64) + 3;
    let outbox = crate::store::open(settings, pool_size).await?;
    with_outbox!(&outbox, s => s.verify_schema().await?);
    let publisher = NatsPublisher::connect(nats).await?;

    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; finishing in-flight work");
        signals.cancel();
    });
    let report = with_outbox!(outbox, s => Relay::new(s, publisher, config)?.run(shutdown).await);
    tracing::info!(
        published = report.published,
        retried = report.retried,
        dead_lettered = report.dead_lettered,
        "relay exited"
    );
    Ok(())
}

pub(crate) async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
