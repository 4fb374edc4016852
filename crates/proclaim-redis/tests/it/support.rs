//! Test resources: keys of their own on the shared Redis, deleted on drop
//! (even when a test panics), and private `redis-server` processes for the
//! tests that restart or stall a server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use proclaim_redis::redis::aio::MultiplexedConnection;
use proclaim_redis::redis::streams::{StreamId, StreamRangeReply};
use proclaim_redis::redis::{self, AsyncConnectionConfig};
use proclaim_redis::{DecodedEntry, decode_entry};
use proclaim_testkit::publisher_conformance::Delivered;

/// The Redis server tests use: `PROCLAIM_TEST_REDIS_URL`, or the local one.
pub(crate) fn redis_url() -> String {
    std::env::var("PROCLAIM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The address of [`redis_url`] (which must be `redis://<ip>:<port>`).
pub(crate) fn redis_addr() -> SocketAddr {
    let url = redis_url();
    let host_port = url.trim_start_matches("redis://").trim_end_matches('/');
    host_port
        .parse()
        .unwrap_or_else(|e| panic!("{url} is not redis://<ip>:<port>: {e}"))
}

/// A connection for checking what the server holds.
pub(crate) async fn connection(url: &str) -> MultiplexedConnection {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to Redis at {url}: {e}"))
}

/// Every key under `prefix` (SCAN MATCH `<prefix>*`).
pub(crate) async fn keys_under(conn: &mut MultiplexedConnection, prefix: &str) -> Vec<String> {
    let mut cursor = 0_u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys
}

/// Every entry of `stream`, in order.
pub(crate) async fn entries(conn: &mut MultiplexedConnection, stream: &str) -> Vec<StreamId> {
    let reply: StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    reply.ids
}

/// `XLEN stream`.
pub(crate) async fn xlen(conn: &mut MultiplexedConnection, stream: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(conn)
        .await
        .unwrap()
}

/// An entry id's (milliseconds, sequence), for ordering across streams.
fn entry_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// Keys of their own for one test: everything under `t:<suffix>:` is
/// deleted when this is dropped, even if the test panics.
pub(crate) struct TestKeys {
    pub(crate) url: String,
    pub(crate) prefix: String,
}

impl TestKeys {
    pub(crate) fn new() -> Self {
        TestKeys {
            url: redis_url(),
            prefix: format!("t:{}:", proclaim_testkit::unique_suffix()),
        }
    }

    /// `<prefix><name>`.
    pub(crate) fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub(crate) async fn connection(&self) -> MultiplexedConnection {
        connection(&self.url).await
    }

    /// Every entry of every stream under the prefix, decoded, in entry-id
    /// order (one stream: its own order).
    pub(crate) async fn decoded(&self) -> Vec<DecodedEntry> {
        let mut conn = self.connection().await;
        let mut all = Vec::new();
        for key in keys_under(&mut conn, &self.prefix).await {
            for entry in entries(&mut conn, &key).await {
                all.push(decode_entry(&entry).unwrap());
            }
        }
        all.sort_by_key(|d| entry_order(&d.entry_id));
        all
    }

    /// Total entries under the prefix.
    pub(crate) async fn count(&self) -> u64 {
        let mut conn = self.connection().await;
        let mut total = 0;
        for key in keys_under(&mut conn, &self.prefix).await {
            total += xlen(&mut conn, &key).await;
        }
        total
    }

    /// What the conformance suite receives: at least `n` entries, or what
    /// there is after `wait`.
    pub(crate) async fn delivered(&self, n: usize, wait: Duration) -> Vec<Delivered> {
        let n = u64::try_from(n).unwrap();
        let deadline = tokio::time::Instant::now() + wait;
        while self.count().await < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.decoded()
            .await
            .into_iter()
            .map(|d| Delivered {
                event: d.event,
                dedup_id: Some(d.dedup_id),
            })
            .collect()
    }
}

impl Drop for TestKeys {
    /// Deletes the keys from a thread of its own (with its own runtime), so
    /// it works inside any runtime and while a test is panicking.
    fn drop(&mut self) {
        let url = self.url.clone();
        let prefix = self.prefix.clone();
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let delete = async {
                    let mut conn = redis::Client::open(url.as_str())
                        .map_err(|e| e.to_string())?
                        .get_multiplexed_async_connection()
                        .await
                        .map_err(|e| e.to_string())?;
                    let mut cursor = 0_u64;
                    loop {
                        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(format!("{prefix}*"))
                            .arg("COUNT")
                            .arg(1000)
                            .query_async(&mut conn)
                            .await
                            .map_err(|e| e.to_string())?;
                        if !batch.is_empty() {
                            redis::cmd("UNLINK")
                                .arg(&batch)
                                .query_async::<u64>(&mut conn)
                                .await
                                .map_err(|e| e.to_string())?;
                        }
                        if next == 0 {
                            return Ok::<(), String>(());
                        }
                        cursor = next;
                    }
                };
                tokio::time::timeout(Duration::from_secs(10), delete)
                    .await
                    .map_err(|_| "timed out".to_owned())?
            })
        })
        .join();
        match deleted {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(prefix = %self.prefix, "cannot delete test keys: {e}"),
            Err(_) => tracing::warn!(prefix = %self.prefix, "deleting the test keys panicked"),
        }
    }
}

/// A `redis-server` of its own on a free loopback port, without
/// persistence, killed (and its directory removed) on drop.
pub(crate) struct PrivateRedis {
    pub(crate) port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts a server with these extra arguments (e.g.
    /// `["--busy-reply-threshold", "100"]`) and waits until it answers.
    pub(crate) async fn start(args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "proclaim-redis-test-{}",
            proclaim_testkit::unique_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = PrivateRedis {
            port: 0,
            dir,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
        };
        // A port that was just free; another process may take it meanwhile,
        // so try a few.
        for _ in 0..5 {
            server.port = proclaim_testkit::net::free_addr().port();
            if server.spawn().await {
                return server;
            }
        }
        panic!("cannot start a private redis-server");
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the process on `self.port`; true once it answers PING.
    async fn spawn(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-server (is it installed?)");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return false; // exited: the port was taken
            }
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut conn) = client.get_multiplexed_async_connection().await
                // Any answer will do (NOAUTH from a server with a password).
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .map_or_else(|e| e.code().is_some(), |_| true)
            {
                self.child = Some(child);
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Kills the server (SIGKILL: a crash; nothing is saved).
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port.
    pub(crate) async fn restart(&mut self) {
        self.kill();
        for _ in 0..50 {
            if self.spawn().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "cannot restart the private redis-server on port {}",
            self.port
        );
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
