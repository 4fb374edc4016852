//! Network stand-ins for tests: a [`SilentServer`] that accepts connections
//! and never answers (to test connect and request timeouts), and
//! [`free_addr`], an address where nothing listens (to test a refused
//! connection).
//!
//! ```no_run
//! # async fn demo() {
//! use proclaim_testkit::net::{SilentServer, free_addr};
//!
//! let silent = SilentServer::start().await;
//! let url = format!("nats://127.0.0.1:{}", silent.port());
//! // … connect to `url` and expect a timeout …
//!
//! let refused = format!("redis://{}", free_addr());
//! // … connect to `refused` and expect "connection refused" …
//! # let _ = (url, refused);
//! # }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

/// A TCP server on a loopback port that accepts every connection and holds
/// it open without ever sending a byte: a client waiting for a greeting
/// (NATS `INFO`, MQTT `CONNACK`, the AMQP handshake, a Redis or HTTP reply)
/// waits until its own timeout.
///
/// What clients send is read and discarded, so the server notices when a
/// client closes its side; [`SilentServer::wait_for_close`] reports it (e.g.
/// to check that an abandoned connection attempt does not linger).
///
/// Dropping the server stops it and closes every connection it holds.
#[derive(Debug)]
pub struct SilentServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: mpsc::UnboundedReceiver<SocketAddr>,
    task: JoinHandle<()>,
}

impl SilentServer {
    /// Binds `127.0.0.1:0` and starts accepting connections.
    pub async fn start() -> SilentServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (closed_tx, closed) = mpsc::unbounded_channel();
        let task = tokio::spawn({
            let accepted = accepted.clone();
            async move {
                // Dropped (and with it every connection task) when the
                // server is.
                let mut connections = JoinSet::new();
                while let Ok((mut socket, peer)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    while connections.try_join_next().is_some() {}
                    let closed = closed_tx.clone();
                    connections.spawn(async move {
                        let mut buf = [0_u8; 1024];
                        // Read until the client closes (or resets).
                        while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
                        let _ = closed.send(peer);
                    });
                }
            }
        });
        SilentServer {
            addr,
            accepted,
            closed,
            task,
        }
    }

    /// The address it listens on (`127.0.0.1:<port>`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many connections it has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits up to `within` for a client to close a connection (one not
    /// reported before); returns the client's address, or `None` when none
    /// closed in time.
    pub async fn wait_for_close(&mut self, within: Duration) -> Option<SocketAddr> {
        tokio::time::timeout(within, self.closed.recv())
            .await
            .ok()
            .flatten()
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An address on the loopback interface where nothing listens: a port that
/// was free a moment ago (bound, noted, released). Connecting to it is
/// refused — unless another process took the port meanwhile, which is rare.
pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    #[tokio::test]
    async fn a_silent_server_holds_connections_and_reports_closes() {
        let mut silent = SilentServer::start().await;
        assert_eq!(silent.addr().port(), silent.port());
        let mut client = TcpStream::connect(silent.addr()).await.unwrap();
        client.write_all(b"hello?").await.unwrap();
        // Nothing comes back.
        let mut buf = [0_u8; 8];
        let read = tokio::time::timeout(Duration::from_millis(200), async {
            use tokio::io::AsyncReadExt;
            client.read(&mut buf).await
        })
        .await;
        assert!(read.is_err(), "the server answered: {read:?}");
        assert_eq!(silent.accepted(), 1);
        assert_eq!(silent.wait_for_close(Duration::from_millis(50)).await, None);

        let local = client.local_addr().unwrap();
        drop(client);
        assert_eq!(
            silent.wait_for_close(Duration::from_secs(2)).await,
            Some(local)
        );
    }

    #[tokio::test]
    async fn dropping_a_silent_server_closes_its_connections() {
        let silent = SilentServer::start().await;
        let mut client = TcpStream::connect(silent.addr()).await.unwrap();
        drop(silent);
        let mut buf = [0_u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(2), async {
            use tokio::io::AsyncReadExt;
            client.read(&mut buf).await
        })
        .await
        .expect("the connection stayed open");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    #[tokio::test]
    async fn nothing_listens_at_a_free_addr() {
        let err = TcpStream::connect(free_addr()).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}
