//! Relay processes: each a real `proclaim relay` child process, reaching the
//! database and the broker through its own pair of fault proxies.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::ChaosError;
use crate::faults::{FaultKind, Link};
use crate::proxy::{FaultMode, FaultProxy};
use crate::scenario::{ChaosConfig, Resources};

/// How to start one relay.
#[derive(Debug, Clone)]
pub(crate) struct RelaySpec {
    /// The `proclaim` executable.
    pub(crate) program: PathBuf,
    /// Arguments of `proclaim … relay …`.
    pub(crate) args: Vec<String>,
    /// Where its stderr goes (appended across restarts).
    pub(crate) log: PathBuf,
}

/// One relay process and its proxies.
#[derive(Debug)]
pub(crate) struct RelayProcess {
    pub(crate) index: usize,
    pub(crate) db: FaultProxy,
    pub(crate) broker: FaultProxy,
    spec: RelaySpec,
    child: Option<Child>,
    paused: bool,
    /// Starts after the first.
    pub(crate) restarts: u64,
}

impl RelayProcess {
    pub(crate) fn new(index: usize, db: FaultProxy, broker: FaultProxy, spec: RelaySpec) -> Self {
        RelayProcess {
            index,
            db,
            broker,
            spec,
            child: None,
            paused: false,
            restarts: 0,
        }
    }

    /// Starts the process (again, if it was killed).
    pub(crate) fn start(&mut self) -> Result<(), ChaosError> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = open_log(&self.spec.log)?;
        let child = Command::new(&self.spec.program)
            .args(&self.spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                ChaosError::Relay(format!("cannot start {}: {e}", self.spec.program.display()))
            })?;
        tracing::debug!(relay = self.index, pid = child.id(), "relay started");
        self.child = Some(child);
        Ok(())
    }

    /// Restarts a relay that exited by itself (it should not): the run goes
    /// on, and the exit is reported.
    pub(crate) fn reap_unexpected_exit(&mut self) -> Result<Option<String>, ChaosError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let Ok(Some(status)) = child.try_wait() else {
            return Ok(None);
        };
        self.child = None;
        self.restarts += 1;
        self.start()?;
        Ok(Some(format!(
            "relay {} exited by itself ({status})",
            self.index
        )))
    }

    /// `SIGKILL`s the process and waits for it to be gone.
    pub(crate) async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        self.paused = false;
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the process.
    pub(crate) fn set_paused(&mut self, paused: bool) {
        if let Some(pid) = self.pid() {
            let signal = if paused {
                Signal::SIGSTOP
            } else {
                Signal::SIGCONT
            };
            if let Err(e) = kill(pid, signal) {
                tracing::warn!(relay = self.index, %e, "cannot signal the relay");
            }
            self.paused = paused;
        }
    }

    /// Asks for a graceful shutdown (`SIGTERM`) and waits up to `grace`,
    /// then kills. Returns whether it exited cleanly in time.
    pub(crate) async fn stop(&mut self, grace: Duration) -> bool {
        if self.paused {
            self.set_paused(false);
        }
        let Some(pid) = self.pid() else {
            return true;
        };
        let _ = kill(pid, Signal::SIGTERM);
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        let clean = match tokio::time::timeout(grace, child.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => false,
        };
        self.kill().await;
        clean
    }

    fn pid(&self) -> Option<Pid> {
        let id = self.child.as_ref()?.id()?;
        Some(Pid::from_raw(i32::try_from(id).ok()?))
    }

    pub(crate) fn log(&self) -> &Path {
        &self.spec.log
    }
}

fn open_log(path: &Path) -> Result<std::fs::File, ChaosError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| ChaosError::Relay(format!("cannot open {}: {e}", path.display())))
}

/// Injects one fault into one relay and heals it after `hold`. A network
/// fault also strikes `also` (the effect consumer's proxy on the same link),
/// at the same moments.
pub(crate) async fn inject(
    relay: &mut RelayProcess,
    kind: FaultKind,
    hold: Duration,
    also: Option<&FaultProxy>,
) -> Result<(), ChaosError> {
    let proxy = match kind.link() {
        Some(Link::Db) => Some(&relay.db),
        Some(Link::Broker) => Some(&relay.broker),
        None => None,
    };
    match (kind, proxy) {
        (FaultKind::RelayKill, _) => {
            relay.kill().await;
            tokio::time::sleep(hold).await;
            relay.restarts += 1;
            relay.start()?;
        }
        (FaultKind::RelayPause, _) => {
            relay.set_paused(true);
            tokio::time::sleep(hold).await;
            relay.set_paused(false);
        }
        (_, Some(proxy)) => {
            let proxies: Vec<&FaultProxy> = std::iter::once(proxy).chain(also).collect();
            network_fault(&proxies, kind, hold).await;
        }
        (_, None) => {}
    }
    Ok(())
}

/// A network fault on `proxies`, healed after `hold`.
async fn network_fault(proxies: &[&FaultProxy], kind: FaultKind, hold: Duration) {
    match kind {
        FaultKind::DbDrop | FaultKind::BrokerDrop | FaultKind::DbReset | FaultKind::BrokerReset => {
            let clean = matches!(kind, FaultKind::DbDrop | FaultKind::BrokerDrop);
            // Cut twice: the live connections, then the ones made since.
            for _ in 0..2 {
                for proxy in proxies {
                    if clean {
                        proxy.drop_all();
                    } else {
                        proxy.reset_all();
                    }
                }
                tokio::time::sleep(hold / 2).await;
            }
        }
        _ => {
            let mode = match kind {
                FaultKind::DbDelay | FaultKind::BrokerDelay => {
                    FaultMode::Delay(Duration::from_millis(200))
                }
                FaultKind::DbBlackhole | FaultKind::BrokerBlackhole => FaultMode::Blackhole,
                _ => FaultMode::Refuse,
            };
            for proxy in proxies {
                proxy.set_mode(mode);
            }
            tokio::time::sleep(hold).await;
            for proxy in proxies {
                proxy.set_mode(FaultMode::Pass);
            }
        }
    }
}

/// Starts the relay processes, each behind its own proxies.
pub(crate) async fn start_relays(
    config: &ChaosConfig,
    res: &Resources,
) -> Result<Vec<RelayProcess>, ChaosError> {
    let db_url = url::Url::parse(&config.database_url)
        .map_err(|e| ChaosError::Config(format!("database URL: {e}")))?;
    let nats_url = url::Url::parse(&config.nats_url)
        .map_err(|e| ChaosError::Config(format!("NATS URL: {e}")))?;
    let toml = res.dir.join("relay.toml");
    std::fs::write(&toml, relay_toml(config))
        .map_err(|e| ChaosError::Relay(format!("cannot write {}: {e}", toml.display())))?;
    let mut relays = Vec::with_capacity(config.relays);
    for index in 0..config.relays {
        let db = proxy_to(&db_url, 5432).await?;
        let broker = proxy_to(&nats_url, 4222).await?;
        let spec = RelaySpec {
            program: config.relay_program.clone(),
            args: vec![
                "--config".into(),
                toml.display().to_string(),
                "--database-url".into(),
                through(&db_url, &db)?,
                "--schema".into(),
                res.schema.clone(),
                "relay".into(),
                "--nats-url".into(),
                through(&nats_url, &broker)?,
                "--stream".into(),
                res.stream.clone(),
                "--subject-prefix".into(),
                res.prefix.clone(),
            ],
            log: res.dir.join(format!("relay-{index}.log")),
        };
        let mut relay = RelayProcess::new(index, db, broker, spec);
        relay.start()?;
        relays.push(relay);
    }
    Ok(relays)
}

/// Relay settings for a run: a short lease and short backoffs so failover
/// and recovery happen within seconds, and attempts that never run out (a
/// well-formed event must never be dead-lettered by an injected fault).
fn relay_toml(config: &ChaosConfig) -> String {
    let lease = humantime::format_duration(config.lease);
    format!(
        r#"[relay]
batch_size = 64
lease = "{lease}"
publish_timeout = "1s"
poll_interval = "250ms"
max_attempts = 1000000
shutdown_timeout = "10s"
stats_interval = "5s"

[relay.backoff]
initial = "50ms"
max = "1s"

[relay.outage_backoff]
initial = "50ms"
max = "1s"

[nats]
connect_timeout = "2s"
"#
    )
}

pub(crate) async fn proxy_to(url: &url::Url, default_port: u16) -> Result<FaultProxy, ChaosError> {
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| {
        ChaosError::Config(format!(
            "{url} has no host (a socket path cannot be proxied)"
        ))
    })?;
    let port = url.port().unwrap_or(default_port);
    FaultProxy::start((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| ChaosError::Relay(format!("cannot start a proxy to {host}:{port}: {e}")))
}

/// `url` with its host and port replaced by the proxy's.
pub(crate) fn through(url: &url::Url, proxy: &FaultProxy) -> Result<String, ChaosError> {
    let original = url;
    let mut url = url.clone();
    let bad = |_| ChaosError::Config(format!("cannot point {original} at a proxy"));
    url.set_host(Some("127.0.0.1")).map_err(bad)?;
    url.set_port(Some(proxy.port()))
        .map_err(|()| ChaosError::Config("URL cannot have a port".into()))?;
    Ok(url.to_string())
}
