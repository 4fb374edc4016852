//! A fault-injecting TCP proxy. Tests and `proclaim chaos` put it between a
//! relay and PostgreSQL or NATS, then switch its [`FaultMode`] or cut its
//! connections to simulate outages:
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use proclaim_chaos::proxy::{FaultMode, FaultProxy};
//! let proxy = FaultProxy::start("127.0.0.1:5432").await?;
//! let url = format!("postgres://postgres@127.0.0.1:{}/test", proxy.port());
//! // ... connect the code under test to `url` ...
//! proxy.set_mode(FaultMode::Blackhole); // the database "hangs"
//! proxy.set_mode(FaultMode::Pass); // and comes back; held bytes flow again
//! proxy.reset_all(); // every live connection gets a TCP reset
//! proxy.drop_all(); // every live connection is closed cleanly (EOF)
//! # let _ = url;
//! # Ok(())
//! # }
//! ```
//!
//! Mode changes apply to live connections as well as to new ones. Dropping
//! the proxy stops its listener and closes every connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::watch;

/// What the proxy does with connections and the bytes on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultMode {
    /// Forward bytes both ways.
    Pass,
    /// Reset every current connection at once, and close new ones right
    /// after accepting them: clients see a reset or EOF (a server that is down).
    Refuse,
    /// Keep connections open but forward nothing in either direction, like a
    /// network partition: bytes are held (TCP backpressure) and flow again
    /// when the mode changes back. Clients hang until their own timeouts fire.
    Blackhole,
    /// Forward, but hold each chunk this long, in each direction.
    Delay(Duration),
}

/// The state every connection watches. `resets` counts `reset_all` and
/// `drop_all` calls; a connection dies once it differs from the value it
/// started with, with a reset unless the last cut was a clean `drop_all`.
#[derive(Clone, Copy, Debug)]
struct Control {
    mode: FaultMode,
    resets: u64,
    clean_close: bool,
}

/// A TCP proxy on `127.0.0.1:<ephemeral>` forwarding to one upstream address.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: Vec<SocketAddr>,
    /// Dropping this sender is the shutdown signal for every task.
    control: watch::Sender<Control>,
    active: Arc<AtomicUsize>,
    faults: AtomicU64,
}

impl FaultProxy {
    /// Resolves `upstream` (e.g. `"127.0.0.1:5432"`) and starts listening on
    /// `127.0.0.1:0` in [`FaultMode::Pass`].
    pub async fn start(upstream: impl ToSocketAddrs) -> io::Result<FaultProxy> {
        let upstream: Vec<SocketAddr> = tokio::net::lookup_host(upstream).await?.collect();
        if upstream.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "upstream resolved to no address",
            ));
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (control, rx) = watch::channel(Control {
            mode: FaultMode::Pass,
            resets: 0,
            clean_close: false,
        });
        let active = Arc::new(AtomicUsize::new(0));
        tokio::spawn(accept_loop(listener, upstream.clone(), rx, active.clone()));
        Ok(FaultProxy {
            addr,
            upstream,
            control,
            active,
            faults: AtomicU64::new(0),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to (on `127.0.0.1`).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The resolved upstream addresses.
    pub fn upstream(&self) -> &[SocketAddr] {
        &self.upstream
    }

    /// The current mode.
    pub fn mode(&self) -> FaultMode {
        self.control.borrow().mode
    }

    /// Switches the mode, for live connections as well as new ones. Counts as
    /// an injected fault when the mode actually changes to one other than
    /// [`FaultMode::Pass`].
    pub fn set_mode(&self, mode: FaultMode) {
        let mut old = mode;
        self.control
            .send_modify(|c| old = std::mem::replace(&mut c.mode, mode));
        if mode != FaultMode::Pass && mode != old {
            self.faults.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(proxy = %self.addr, ?mode, "fault proxy mode");
    }

    /// Resets every current connection once (the client sees `ECONNRESET`);
    /// the mode is unchanged and new connections work.
    pub fn reset_all(&self) {
        self.cut(false);
        tracing::debug!(proxy = %self.addr, "fault proxy reset all connections");
    }

    /// Closes every current connection cleanly once (the client reads EOF,
    /// as when a server closes idle connections or restarts gracefully); the
    /// mode is unchanged and new connections work.
    pub fn drop_all(&self) {
        self.cut(true);
        tracing::debug!(proxy = %self.addr, "fault proxy dropped all connections");
    }

    fn cut(&self, clean_close: bool) {
        self.control.send_modify(|c| {
            c.resets += 1;
            c.clean_close = clean_close;
        });
        self.faults.fetch_add(1, Ordering::Relaxed);
    }

    /// How many client connections are open through the proxy.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Faults injected so far: mode changes away from `Pass`, resets and drops.
    pub fn faults_injected(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }
}

/// Resolves once the proxy has been dropped.
async fn proxy_dropped(rx: &mut watch::Receiver<Control>) {
    while rx.changed().await.is_ok() {}
}

/// Resolves once a connection that started at reset count `resets` must die:
/// the mode is `Refuse`, `reset_all` was called, or the proxy was dropped.
async fn killed(rx: &mut watch::Receiver<Control>, resets: u64) {
    loop {
        let c = *rx.borrow_and_update();
        if c.mode == FaultMode::Refuse || c.resets != resets || rx.changed().await.is_err() {
            return;
        }
    }
}

/// Waits while the mode is `Blackhole`; returns the mode to apply next, or
/// `None` when the connection must die meanwhile.
async fn after_blackhole(rx: &mut watch::Receiver<Control>, resets: u64) -> Option<FaultMode> {
    loop {
        let c = *rx.borrow_and_update();
        if c.mode == FaultMode::Refuse || c.resets != resets {
            return None;
        }
        if c.mode != FaultMode::Blackhole {
            return Some(c.mode);
        }
        rx.changed().await.ok()?;
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: Vec<SocketAddr>,
    rx: watch::Receiver<Control>,
    active: Arc<AtomicUsize>,
) {
    let mut shutdown = rx.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = proxy_dropped(&mut shutdown) => return,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(e) => {
                tracing::warn!(error = %e, "fault proxy accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let control = *rx.borrow();
        if control.mode == FaultMode::Refuse {
            let _ = client.set_zero_linger();
            continue; // dropped: the client sees a reset
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (upstream, rx, active) = (upstream.clone(), rx.clone(), active.clone());
        tokio::spawn(async move {
            connection(client, &upstream, rx, control.resets).await;
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

async fn connection(
    mut client: TcpStream,
    upstream: &[SocketAddr],
    rx: watch::Receiver<Control>,
    resets: u64,
) {
    let mut server = match TcpStream::connect(upstream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, ?upstream, "fault proxy cannot reach upstream");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.split();
    let (sr, sw) = server.split();
    let result = tokio::try_join!(
        pump(cr, sw, rx.clone(), resets),
        pump(sr, cw, rx.clone(), resets)
    );
    let clean = {
        let c = *rx.borrow();
        c.clean_close && c.resets != resets && c.mode != FaultMode::Refuse
    };
    if result.is_err() && !clean {
        // Killed (or an I/O error): make the client see a reset, not a clean EOF.
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    } else if result.is_err() {
        let _ = client.shutdown().await;
    }
}

/// Copies `from` to `to` according to the mode until EOF (then half-closes
/// `to` and returns `Ok`), or until the connection is killed (`Err`).
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut rx: watch::Receiver<Control>,
    resets: u64,
) -> io::Result<()> {
    let aborted = || io::Error::from(io::ErrorKind::ConnectionAborted);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => r?,
            () = killed(&mut rx, resets) => return Err(aborted()),
        };
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        // Hold the chunk while the mode is Blackhole (a partition: nothing
        // more is read, so TCP backpressure builds up), then apply the new mode.
        let Some(mode) = after_blackhole(&mut rx, resets).await else {
            return Err(aborted());
        };
        match mode {
            FaultMode::Pass | FaultMode::Blackhole => {}
            FaultMode::Refuse => return Err(aborted()),
            FaultMode::Delay(d) => tokio::select! {
                () = tokio::time::sleep(d) => {}
                () = killed(&mut rx, resets) => return Err(aborted()),
            },
        }
        tokio::select! {
            w = to.write_all(&buf[..n]) => w?,
            () = killed(&mut rx, resets) => return Err(aborted()),
        }
    }
}
