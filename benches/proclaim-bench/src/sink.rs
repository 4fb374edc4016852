//! A local webhook endpoint for `broker`: an HTTP server on 127.0.0.1 (a
//! free port) that reads each request's body and answers `204 No Content`,
//! counting the requests. It stands in for a webhook receiver that does no
//! work, so the figures show the sending side only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use proclaim::CancellationToken;

/// A running sink; it stops when dropped.
pub(crate) struct Sink {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Sink {
    /// Starts a sink on 127.0.0.1, on a port the system picks.
    pub(crate) async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot start the local webhook sink on 127.0.0.1")?;
        let addr = listener
            .local_addr()
            .context("the local webhook sink's address")?;
        let requests = Arc::new(AtomicU64::new(0));
        let app = Router::new().fallback(accept).with_state(requests.clone());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "the local webhook sink failed");
            }
        });
        Ok(Sink {
            addr,
            requests,
            stop,
        })
    }

    /// `host:port` it listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Every request, on any path and method: read the body, answer 204.
async fn accept(State(requests): State<Arc<AtomicU64>>, _body: Bytes) -> StatusCode {
    requests.fetch_add(1, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}
