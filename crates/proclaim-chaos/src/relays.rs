//! Relay processes: each a real `proclaim relay` child process, reaching the
//! database and the broker through its own pair of fault proxies.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::ChaosError;
use crate::proxy::FaultProxy;

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
