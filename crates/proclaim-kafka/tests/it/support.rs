//! Test topics on the real Kafka-protocol broker (tansu), private tansu
//! brokers for the outage cases, and the router that puts those behind a
//! fault proxy.
//!
//! Kafka clients bootstrap from one address, then connect to the brokers as
//! the cluster *advertises* them, so a fault proxy in front of the shared
//! broker would be bypassed after the first metadata request. For the
//! outage cases each test gets a private tansu (in-memory storage, cheap to
//! start) whose advertised listener is the proxy's address: every
//! connection then goes through the proxy. The proxy forwards to one fixed
//! upstream, the [`router`], which reads the client id from the first
//! request header of each connection and forwards the connection to the
//! private broker registered for that client id ([`route`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use proclaim_kafka::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Partitions of every test topic: several, so that per-key order is
/// checked across partitions.
pub(crate) const PARTITIONS: i32 = 3;

/// The shared broker tests use: `PROCLAIM_TEST_KAFKA_ADDR` (`host:port`), or
/// the local tansu (`scripts/services.sh kafka`).
pub(crate) fn broker_addr() -> SocketAddr {
    let addr =
        std::env::var("PROCLAIM_TEST_KAFKA_ADDR").unwrap_or_else(|_| "127.0.0.1:9092".into());
    addr.parse()
        .unwrap_or_else(|e| panic!("PROCLAIM_TEST_KAFKA_ADDR {addr:?} is not <ip>:<port>: {e}"))
}

/// The tansu binary `scripts/services.sh kafka` installs.
pub(crate) fn tansu_bin() -> PathBuf {
    let dir = std::env::var_os("PROCLAIM_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/proclaim/tools")
        });
    dir.join("bin/tansu")
}

/// A client configuration for `servers`, named `client_id`.
fn client(servers: &str, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", servers)
        .set("client.id", client_id)
        .set("socket.connection.setup.timeout.ms", "5000");
    config
}

fn admin(servers: &str, client_id: &str) -> AdminClient<DefaultClientContext> {
    client(servers, client_id).create().unwrap()
}

/// Creates `name` with [`PARTITIONS`] partitions.
pub(crate) async fn create_topic(servers: &str, client_id: &str, name: &str) {
    let admin = admin(servers, client_id);
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(
            &[NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1))],
            &options,
        )
        .await
        .unwrap_or_else(|e| panic!("cannot create topic {name} on {servers}: {e}"));
    for result in results {
        result.unwrap_or_else(|(topic, code)| panic!("cannot create topic {topic}: {code}"));
    }
}

/// Deletes `name`.
pub(crate) async fn delete_topic(servers: &str, client_id: &str, name: &str) -> Result<(), String> {
    let admin = admin(servers, client_id);
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .delete_topics(&[name], &options)
        .await
        .map_err(|e| e.to_string())?;
    for result in results {
        result.map_err(|(topic, code)| format!("{topic}: {code}"))?;
    }
    Ok(())
}

/// Whether the cluster at `servers` knows topic `name`.
pub(crate) async fn topic_exists(servers: &str, name: &str) -> bool {
    let (servers, name) = (servers.to_owned(), name.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client(&servers, "proclaim-test-check").create().unwrap();
        let metadata = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .unwrap();
        metadata.topics().iter().any(|t| t.name() == name)
    })
    .await
    .unwrap()
}

/// Reads every partition of `topic` from the start until at least `n`
/// messages came or `wait` has passed; messages of one partition are in
/// partition order.
pub(crate) async fn read(
    servers: &str,
    client_id: &str,
    topic: &str,
    n: usize,
    wait: Duration,
) -> Vec<OwnedMessage> {
    let (servers, client_id, topic) = (servers.to_owned(), client_id.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        // Partitions are assigned, not subscribed: the group (librdkafka
        // needs one) never rebalances, and nothing is committed.
        let consumer: BaseConsumer = client(&servers, &client_id)
            .set("group.id", &client_id)
            .set("session.timeout.ms", "6000")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        let mut partitions = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            partitions
                .add_partition_offset(&topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&partitions).unwrap();
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => out.push(message.detach()),
                Some(Err(e)) => tracing::debug!("reading {topic}: {e}"),
                None => {}
            }
        }
        out
    })
    .await
    .unwrap()
}

/// A topic of its own for one test, `t_<suffix>.DonorSecured` (the type
/// every event of the suite has), on the shared broker or a private one;
/// on the shared broker it is deleted when dropped, even if the test panics.
pub(crate) struct TestTopic {
    /// `t_<suffix>`: the topic template is `<prefix>.{type}`.
    pub(crate) prefix: String,
    /// `<prefix>.DonorSecured`.
    pub(crate) name: String,
    /// Where it lives, as a bootstrap list.
    pub(crate) servers: String,
    /// The client id every client of the test uses.
    pub(crate) client_id: String,
    delete: bool,
}

impl TestTopic {
    /// A topic on the shared broker.
    pub(crate) async fn new() -> Self {
        let client_id = format!("proclaim-test-{}", proclaim_testkit::unique_suffix());
        Self::on(broker_addr().to_string(), client_id, true).await
    }

    /// A topic on the broker at `servers`, made by a client named
    /// `client_id`; deleted on drop if `delete`.
    pub(crate) async fn on(servers: String, client_id: String, delete: bool) -> Self {
        let prefix = format!("t_{}", proclaim_testkit::unique_suffix());
        let name = format!("{prefix}.DonorSecured");
        create_topic(&servers, &client_id, &name).await;
        TestTopic {
            prefix,
            name,
            servers,
            client_id,
            delete,
        }
    }

    /// A publisher configuration for this topic (template `<prefix>.{type}`)
    /// with short timeouts.
    pub(crate) fn config(&self) -> KafkaConfig {
        KafkaConfig::default()
            .with_bootstrap_servers(&self.servers)
            .with_topic_template(format!("{}.{{type}}", self.prefix))
            .with_client_id(&self.client_id)
            .with_ack_timeout(Duration::from_secs(5))
            .with_connect_timeout(Duration::from_secs(5))
            .with_missing_topic_timeout(Duration::from_millis(500))
    }

    /// What the topic holds once it holds at least `n` messages or `wait`
    /// has passed.
    pub(crate) async fn messages(&self, n: usize, wait: Duration) -> Vec<OwnedMessage> {
        read(&self.servers, &self.client_id, &self.name, n, wait).await
    }
}

impl Drop for TestTopic {
    /// Deletes the topic from a thread of its own (with its own runtime), so
    /// it works inside any runtime and while a test is panicking.
    fn drop(&mut self) {
        if !self.delete {
            return;
        }
        let (servers, client_id, name) = (
            self.servers.clone(),
            self.client_id.clone(),
            self.name.clone(),
        );
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                tokio::time::timeout(
                    Duration::from_secs(15),
                    delete_topic(&servers, &client_id, &name),
                )
                .await
                .map_err(|_| "timed out".to_owned())?
            })
        })
        .join();
        match deleted {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(topic = %self.name, "cannot delete test topic: {e}"),
            Err(_) => tracing::warn!(topic = %self.name, "deleting the test topic panicked"),
        }
    }
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A tansu broker of its own (in-memory storage) on a free loopback port,
/// advertising another address; killed when dropped.
pub(crate) struct PrivateBroker {
    child: Child,
    addr: SocketAddr,
}

impl PrivateBroker {
    /// Starts tansu and waits until it accepts connections.
    pub(crate) async fn start(advertised: SocketAddr) -> Self {
        let bin = tansu_bin();
        assert!(
            bin.exists(),
            "{} is missing: run scripts/services.sh kafka",
            bin.display()
        );
        for _ in 0..5 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let child = Command::new(&bin)
                .args([
                    "broker",
                    "--listener-url",
                    &format!("tcp://{addr}"),
                    "--advertised-listener-url",
                    &format!("tcp://{advertised}"),
                    "--storage-engine",
                    "memory://tansu/",
                    "--silent",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
            let mut broker = PrivateBroker { child, addr };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if TcpStream::connect(addr).await.is_ok() {
                    return broker;
                }
                if broker.child.try_wait().unwrap().is_some() {
                    break; // e.g. the port was taken meanwhile: try another
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("tansu did not start listening (tried 5 ports)");
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The router: one loopback port, for the whole test process.
struct Router {
    addr: SocketAddr,
    routes: Arc<Mutex<HashMap<String, SocketAddr>>>,
}

static ROUTER: OnceLock<Router> = OnceLock::new();

/// The router's address, started on first use (on a thread and runtime of
/// its own, as each test has its own runtime).
pub(crate) fn router() -> SocketAddr {
    ROUTER
        .get_or_init(|| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap();
            let routes = Arc::new(Mutex::new(HashMap::new()));
            let table = routes.clone();
            std::thread::Builder::new()
                .name("kafka-test-router".into())
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    runtime.block_on(async move {
                        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                        loop {
                            if let Ok((socket, _)) = listener.accept().await {
                                tokio::spawn(forward(socket, table.clone()));
                            }
                        }
                    });
                })
                .unwrap();
            Router { addr, routes }
        })
        .addr
}

/// Sends connections of clients named `client_id` to `to` until dropped.
pub(crate) struct Route(String);

pub(crate) fn route(client_id: &str, to: SocketAddr) -> Route {
    router();
    if let Some(router) = ROUTER.get() {
        router
            .routes
            .lock()
            .unwrap()
            .insert(client_id.to_owned(), to);
    }
    Route(client_id.to_owned())
}

impl Drop for Route {
    fn drop(&mut self) {
        if let Some(router) = ROUTER.get() {
            router
                .routes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&self.0);
        }
    }
}

/// Reads the first request header of a Kafka connection (size, API key,
/// version, correlation id, then the client id as an int16-length string,
/// in every header version), and forwards the connection, those bytes
/// included, to the broker routed for that client id.
async fn forward(mut client: TcpStream, routes: Arc<Mutex<HashMap<String, SocketAddr>>>) {
    let mut head = [0_u8; 14];
    if client.read_exact(&mut head).await.is_err() {
        return;
    }
    let Ok(len) = usize::try_from(i16::from_be_bytes([head[12], head[13]])) else {
        tracing::warn!("router: a request without client id");
        return;
    };
    let mut id = vec![0_u8; len];
    if client.read_exact(&mut id).await.is_err() {
        return;
    }
    let client_id = String::from_utf8_lossy(&id).into_owned();
    let target = routes.lock().unwrap().get(&client_id).copied();
    let Some(target) = target else {
        tracing::warn!(%client_id, "router: no broker for this client id");
        return;
    };
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    if upstream.write_all(&head).await.is_err() || upstream.write_all(&id).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Events of `messages` as `(key, partition)`, for checks of the partitioning.
pub(crate) fn keys_and_partitions(messages: &[OwnedMessage]) -> Vec<(String, i32)> {
    messages
        .iter()
        .map(|m| {
            (
                String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                m.partition(),
            )
        })
        .collect()
}
