//! `proclaim relay`: one destination directly, or several through the
//! fan-out (one lane table and one relay per destination).

use std::time::Duration;

use anyhow::Context;
use proclaim::destination::{AnyPublisher, NamedDestination};
use proclaim::fanout::{FanOut, Lane, Stage};
use proclaim::{Backoff, CancellationToken, OutboxStore, Relay, RelayConfig, RelayReport};

use crate::args::RelayArgs;
use crate::settings::{FileConfig, RelaySettings, StoreSettings, relay_settings};
use crate::store::{LaneStore, with_outbox};

/// The name of the fan-out relay in logs and metrics (`relay="fan-out"`);
/// each lane's relay is named after its destination. Destination names
/// cannot contain `-`, so they never clash with it.
const FAN_OUT: &str = "fan-out";

pub(crate) async fn run(
    settings: &StoreSettings,
    args: RelayArgs,
    file: FileConfig,
) -> anyhow::Result<()> {
    let relay = relay_settings(&args, file)?;
    if let Some(addr) = relay.metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!(%addr, "serving Prometheus metrics");
    }
    // Every relay (the fan-out's and one per lane) may hold a connection
    // per batch in flight.
    let relays = if relay.is_direct() {
        1
    } else {
        relay.destinations.len() + 1
    };
    let per_relay = u32::try_from(relay.relay.max_batches_in_flight).unwrap_or(64);
    let pool_size = per_relay
        .saturating_mul(u32::try_from(relays).unwrap_or(u32::MAX))
        .saturating_add(3);
    let outbox = crate::store::open(settings, pool_size).await?;
    with_outbox!(&outbox, s => s.verify_schema().await?);

    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; finishing in-flight work");
        signals.cancel();
    });
    let reports = if relay.is_direct() {
        with_outbox!(outbox, s => direct(s, relay, shutdown).await?)
    } else {
        with_outbox!(outbox, s => fan_out(s, settings, relay, shutdown).await?)
    };
    for (name, report) in reports {
        tracing::info!(
            relay = %name,
            published = report.published,
            retried = report.retried,
            dead_lettered = report.dead_lettered,
            "relay exited"
        );
    }
    Ok(())
}

/// One destination that takes every event: publish straight from the
/// outbox. Its broker must be reachable at start.
async fn direct<S>(
    store: S,
    settings: RelaySettings,
    shutdown: CancellationToken,
) -> anyhow::Result<Vec<(String, RelayReport)>>
where
    S: OutboxStore,
{
    let Some(destination) = settings.destinations.into_iter().next() else {
        anyhow::bail!("no destination");
    };
    tracing::info!(
        destination = %destination.name,
        to = %destination.destination.describe(),
        "relaying"
    );
    let publisher = destination.destination.connect().await?;
    let report = Relay::new(store, publisher, settings.relay)?
        .run(shutdown)
        .await;
    Ok(vec![(destination.name, report)])
}

/// Several destinations (or one that takes only some types): the fan-out
/// relay stages each event into the lane of every destination whose types
/// match, and one relay per lane delivers from it. A destination that is
/// down at start does not hold up the others: its relay keeps trying to
/// connect while its lane fills.
async fn fan_out<S>(
    main: S,
    store: &StoreSettings,
    settings: RelaySettings,
    shutdown: CancellationToken,
) -> anyhow::Result<Vec<(String, RelayReport)>>
where
    S: OutboxStore + Stage + LaneStore + Clone,
{
    let mut lanes = Vec::new();
    let mut lane_relays = Vec::new();
    for destination in settings.destinations {
        let lane = main.lane(store, &destination.name)?;
        lane.migrate_lane()
            .await
            .with_context(|| format!("cannot create the lane table {}", lane.table()))?;
        tracing::info!(
            destination = %destination.name,
            types = %destination.types.as_str(),
            to = %destination.destination.describe(),
            lane = %lane.table(),
            "relaying through a lane"
        );
        lanes.push(Lane {
            name: destination.name.clone(),
            pattern: destination.types.clone(),
            stage: lane.clone(),
        });
        let config = settings.relay.clone();
        let token = shutdown.clone();
        let name = destination.name.clone();
        lane_relays.push((
            name,
            tokio::spawn(lane_relay(lane, destination, config, token)),
        ));
    }
    let fan_out = FanOut::new(lanes, settings.unrouted)?;
    let fan_out_relay = Relay::new(main, fan_out, settings.relay)?
        .with_name(FAN_OUT)
        .spawn();

    shutdown.cancelled().await;
    let mut reports = vec![(FAN_OUT.to_owned(), fan_out_relay.shutdown().await)];
    for (name, task) in lane_relays {
        match task.await {
            Ok(Ok(report)) => reports.push((name, report)),
            Ok(Err(e)) => {
                tracing::error!(destination = %name, error = %format!("{e:#}"), "lane relay failed")
            }
            Err(e) => tracing::error!(destination = %name, error = %e, "lane relay panicked"),
        }
    }
    Ok(reports)
}

/// Connects the destination's publisher, retrying until it can or shutdown
/// is requested, then relays from its lane until shutdown.
async fn lane_relay<S: OutboxStore + Clone>(
    lane: S,
    destination: NamedDestination,
    config: RelayConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<RelayReport> {
    let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut attempt = 0_u32;
    let publisher: AnyPublisher = loop {
        match destination.destination.clone().connect().await {
            Ok(publisher) => break publisher,
            Err(e) => {
                attempt = attempt.saturating_add(1);
                let wait = backoff.delay(attempt);
                tracing::warn!(
                    destination = %destination.name,
                    error = %e,
                    retry_in = ?wait,
                    "cannot connect; events wait in the destination's lane"
                );
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(RelayReport::default()),
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    };
    tracing::info!(destination = %destination.name, "connected");
    Ok(Relay::new(lane, publisher, config)?
        .with_name(destination.name)
        .run(shutdown)
        .await)
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
