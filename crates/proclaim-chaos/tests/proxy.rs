//! Behaviour of the fault-injecting proxy, against a tiny echo server on
//! loopback (no external services).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use proclaim_chaos::proxy::{FaultMode, FaultProxy};
use proclaim_testkit::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};

/// How long to wait for something that should happen promptly.
const DEADLINE: Duration = Duration::from_secs(5);

/// Starts an echo server on `127.0.0.1:0` and returns its address.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn start() -> FaultProxy {
    FaultProxy::start(echo_server().await).await.unwrap()
}

async fn connect(proxy: &FaultProxy) -> TcpStream {
    TcpStream::connect(proxy.addr()).await.unwrap()
}

/// Sends `msg` and asserts it comes back within the deadline.
async fn assert_echo(s: &mut TcpStream, msg: &[u8]) {
    let mut buf = vec![0; msg.len()];
    let (mut r, mut w) = s.split();
    let (read, write) = timeout(DEADLINE, async {
        tokio::join!(r.read_exact(&mut buf), w.write_all(msg))
    })
    .await
    .expect("echo timed out");
    write.unwrap();
    read.unwrap();
    assert_eq!(buf, msg);
}

/// Asserts the peer closes `s` (EOF or reset) within the deadline.
async fn assert_closed(s: &mut TcpStream) {
    let mut buf = [0; 64];
    match timeout(DEADLINE, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("expected the connection closed, read {n} bytes"),
        Err(_) => panic!("connection still open after {DEADLINE:?}"),
    }
}

/// Asserts nothing arrives on `s` for 300 ms.
async fn assert_silent(s: &mut TcpStream) {
    let mut buf = [0; 64];
    let r = timeout(Duration::from_millis(300), s.read(&mut buf)).await;
    assert!(r.is_err(), "expected the read to time out, got {r:?}");
}

async fn wait_active(proxy: &FaultProxy, n: usize) {
    eventually(DEADLINE, &format!("{n} active connections"), || async {
        proxy.active_connections() == n
    })
    .await;
}

#[tokio::test]
async fn pass_forwards_both_ways() {
    let proxy = start().await;
    assert_eq!(proxy.mode(), FaultMode::Pass);
    let mut a = connect(&proxy).await;
    let mut b = connect(&proxy).await;
    assert_echo(&mut a, b"hello").await;
    assert_echo(&mut b, &[7u8; 100_000]).await;
    wait_active(&proxy, 2).await;
    drop(a);
    wait_active(&proxy, 1).await;
    assert_eq!(proxy.faults_injected(), 0);
}

#[tokio::test]
async fn refuse_kills_live_connections_and_closes_new_ones() {
    let proxy = start().await;
    let mut live = connect(&proxy).await;
    assert_echo(&mut live, b"before").await;

    proxy.set_mode(FaultMode::Refuse);
    assert_closed(&mut live).await;
    wait_active(&proxy, 0).await;

    // The kernel may complete the handshake before the proxy closes it.
    if let Ok(mut fresh) = TcpStream::connect(proxy.addr()).await {
        let _ = fresh.write_all(b"anyone?").await;
        assert_closed(&mut fresh).await;
    }
    assert_eq!(proxy.faults_injected(), 1);

    proxy.set_mode(FaultMode::Pass);
    assert_echo(&mut connect(&proxy).await, b"after").await;
    assert_eq!(proxy.faults_injected(), 1);
}

#[tokio::test]
async fn blackhole_holds_bytes_until_pass() {
    let proxy = start().await;
    let mut live = connect(&proxy).await;
    assert_echo(&mut live, b"before").await;

    proxy.set_mode(FaultMode::Blackhole);
    live.write_all(b"held").await.unwrap();
    assert_silent(&mut live).await;
    let mut fresh = connect(&proxy).await;
    fresh.write_all(b"held too").await.unwrap();
    assert_silent(&mut fresh).await;
    wait_active(&proxy, 2).await; // held open, not closed

    // Like a healed partition: what was held arrives, and the connections
    // keep working.
    proxy.set_mode(FaultMode::Pass);
    let mut buf = [0u8; 8];
    timeout(DEADLINE, fresh.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"held too");
    let mut buf = [0u8; 4];
    timeout(DEADLINE, live.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"held");
    assert_echo(&mut live, b"live").await;
    assert_echo(&mut connect(&proxy).await, b"new").await;
    assert_eq!(proxy.faults_injected(), 1);
}

#[tokio::test]
async fn drop_all_closes_live_connections_cleanly() {
    let proxy = start().await;
    let mut live = connect(&proxy).await;
    assert_echo(&mut live, b"before").await;
    wait_active(&proxy, 1).await;

    proxy.drop_all();
    // A clean close: EOF, not a reset.
    let mut buf = [0; 16];
    let read = timeout(DEADLINE, live.read(&mut buf)).await.unwrap();
    assert!(matches!(read, Ok(0)), "expected EOF, got {read:?}");
    wait_active(&proxy, 0).await;
    assert_eq!(proxy.mode(), FaultMode::Pass);
    assert_eq!(proxy.faults_injected(), 1);
    assert_echo(&mut connect(&proxy).await, b"after").await;
}

#[tokio::test]
async fn reset_all_is_a_reset_not_an_eof() {
    let proxy = start().await;
    let mut live = connect(&proxy).await;
    assert_echo(&mut live, b"before").await;
    wait_active(&proxy, 1).await;

    proxy.reset_all();
    let mut buf = [0; 16];
    let read = timeout(DEADLINE, live.read(&mut buf)).await.unwrap();
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "expected a reset, got {read:?}"
    );
}

#[tokio::test]
async fn delay_holds_each_chunk() {
    let proxy = start().await;
    let mut s = connect(&proxy).await;
    assert_echo(&mut s, b"warm").await;

    proxy.set_mode(FaultMode::Delay(Duration::from_millis(200)));
    let started = Instant::now();
    assert_echo(&mut s, b"slow").await;
    let took = started.elapsed();
    // Held 200 ms on the way there and 200 ms on the way back.
    assert!(
        took >= Duration::from_millis(400),
        "round trip took {took:?}"
    );
    assert_eq!(proxy.faults_injected(), 1);
}

#[tokio::test]
async fn reset_all_closes_live_connections_once() {
    let proxy = start().await;
    let mut live = connect(&proxy).await;
    assert_echo(&mut live, b"before").await;
    wait_active(&proxy, 1).await;

    proxy.reset_all();
    assert_closed(&mut live).await;
    wait_active(&proxy, 0).await;
    assert_eq!(proxy.mode(), FaultMode::Pass);
    assert_eq!(proxy.faults_injected(), 1);

    let mut fresh = connect(&proxy).await;
    assert_echo(&mut fresh, b"after").await;
}

#[tokio::test]
async fn drop_closes_listener_and_connections() {
    let proxy = start().await;
    let addr = proxy.addr();
    let mut live = connect(&proxy).await;
    assert_echo(&mut live, b"before").await;

    drop(proxy);
    assert_closed(&mut live).await;
    eventually(DEADLINE, "the listener to close", || async {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
}
