//! The broker side of `broker`: from the destination the user gave (a
//! broker address, with any publisher settings), a destination of its own
//! for each run and role, created before and removed after, so that runs do
//! not see each other's messages and nothing is left behind.
//!
//! | broker | per run and role (`relay`, `bare`) | removed with |
//! |---|---|---|
//! | NATS JetStream | stream `BENCH_<SUFFIX>_R<n>_<ROLE>` (file storage) on `bench_<suffix>_r<n>_<role>.>` | stream delete |
//! | RabbitMQ | topic exchange `bench_<suffix>_r<n>_<role>` and a durable queue `…_q` bound with `#` (the publisher sends `mandatory`) | queue and exchange delete |
//! | Redis Streams | stream key `bench:<suffix>:r<n>:<role>` | `DEL` |
//! | MQTT | topic `bench/<suffix>/r<n>/<role>/{type}`, client id `bench_<suffix>_r<n>_<role>` (QoS 1 without subscribers, clean session: nothing stays) | nothing to remove |
//! | Kafka | topic `bench.<suffix>.r<n>.<role>` (3 partitions, replication 1) | topic delete |
//! | webhook | with port 0 in the URL (`http://127.0.0.1:0/events`): a local [`Sink`] on a free port | the sink stops |
//!
//! The settings that name where messages go (stream, subject prefix,
//! exchange, stream key, topic, client id) are replaced; every other
//! setting of the URL (timeouts, `max_channels`, `qos`, `mode`, …) is kept.
//! A webhook URL with a real port is used as given: the bench sends to that
//! endpoint and has nothing to create or remove there.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use proclaim::destination::Destination;
use proclaim::kafka::rdkafka::ClientConfig;
use proclaim::kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use proclaim::kafka::rdkafka::client::DefaultClientContext;
use proclaim::rabbitmq::lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use proclaim::rabbitmq::lapin::types::FieldTable;
use proclaim::rabbitmq::lapin::uri::AMQPUri;
use proclaim::rabbitmq::lapin::{self, Connection, ConnectionProperties, ExchangeKind};
use proclaim::redact_url;
use proclaim::redis::redis;

use crate::env::{BenchStream, Streams};
use crate::sink::Sink;

/// How long removing one thing from the broker may take.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Partitions of each Kafka topic the bench creates.
const KAFKA_PARTITIONS: i32 = 3;

/// The broker of the scenario, and what it created there that is not
/// removed yet.
pub(crate) struct Targets {
    /// The destination as the user gave it.
    base: Destination,
    suffix: String,
    admin: Admin,
    /// Created and not removed yet (NATS streams are kept by [`Streams`]).
    created: Mutex<Vec<Resource>>,
}

/// The bench's own connection to the broker, to create and remove things.
enum Admin {
    Nats(Streams),
    RabbitMq(Connection),
    Redis(redis::aio::MultiplexedConnection),
    Kafka(AdminClient<DefaultClientContext>),
    Mqtt,
    /// `sink`: the URL asks for a local sink (port 0).
    Webhook {
        sink: bool,
    },
}

/// Something created on the broker for one run and role (NATS streams:
/// see [`Target::stream`]).
#[derive(Clone, PartialEq, Eq)]
enum Resource {
    Exchange { exchange: String, queue: String },
    StreamKey(String),
    Topic(String),
    Nothing,
}

/// The destination of one run and role, and what backs it.
pub(crate) struct Target {
    /// The publisher's settings, pointing at this target only.
    pub(crate) destination: Destination,
    resource: Resource,
    stream: Option<BenchStream>,
    sink: Option<Sink>,
}

impl Targets {
    /// Connects to the broker of `base` (nothing is created yet); names
    /// will be made from `suffix`.
    pub(crate) async fn connect(base: Destination, suffix: &str) -> anyhow::Result<Self> {
        let admin = match &base {
            Destination::Nats(c) => {
                let client = async_nats::connect(c.url.as_str())
                    .await
                    .with_context(|| format!("cannot connect to NATS at {}", c.redacted_url()))?;
                Admin::Nats(Streams::new(async_nats::jetstream::new(client), suffix))
            }
            Destination::RabbitMq(c) => {
                let uri = amqp_uri(&c.url)?;
                let connection = Connection::connect_uri(uri, ConnectionProperties::default())
                    .await
                    .with_context(|| {
                        format!("cannot connect to RabbitMQ at {}", redact_url(&c.url))
                    })?;
                Admin::RabbitMq(connection)
            }
            Destination::Redis(c) => {
                let shown = redact_url(&c.url);
                let client = redis::Client::open(c.url.as_str())
                    .map_err(|e| anyhow!("the Redis URL {shown} is invalid: {e}"))?;
                let connection = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| anyhow!("cannot connect to Redis at {shown}: {e}"))?;
                Admin::Redis(connection)
            }
            Destination::Kafka(c) => {
                let servers = c
                    .bootstrap_servers
                    .split(',')
                    .map(|s| s.trim().trim_start_matches("kafka://"))
                    .collect::<Vec<_>>()
                    .join(",");
                let admin = ClientConfig::new()
                    .set("bootstrap.servers", &servers)
                    .set("client.id", format!("bench_{suffix}_admin"))
                    .create()
                    .with_context(|| format!("cannot make a Kafka admin client for {servers}"))?;
                Admin::Kafka(admin)
            }
            Destination::Mqtt(_) => Admin::Mqtt,
            Destination::Webhook(c) => Admin::Webhook {
                sink: sink_path(&c.url)?.is_some(),
            },
            other => bail!("the bench does not know the broker {}", other.broker()),
        };
        Ok(Targets {
            base,
            suffix: suffix.to_owned(),
            admin,
            created: Mutex::new(Vec::new()),
        })
    }

    /// The broker kind (`nats`, `rabbitmq`, …).
    pub(crate) fn kind(&self) -> &'static str {
        self.base.kind()
    }

    /// The destination as given, credentials hidden.
    pub(crate) fn describe(&self) -> String {
        match self.admin {
            Admin::Webhook { sink: true } => format!("{} (a local sink)", self.base.describe()),
            _ => self.base.describe(),
        }
    }

    /// What each run sends to, for the header line.
    pub(crate) fn naming(&self) -> String {
        let s = &self.suffix;
        match self.admin {
            Admin::Nats(_) => format!(
                "streams BENCH_{}_R<n>_{{RELAY,BARE}} (file storage)",
                s.to_uppercase()
            ),
            Admin::RabbitMq(_) => format!(
                "topic exchanges bench_{s}_r<n>_{{relay,bare}}, each with a durable queue bound with #"
            ),
            Admin::Redis(_) => format!("stream keys bench:{s}:r<n>:{{relay,bare}}"),
            Admin::Kafka(_) => {
                format!("topics bench.{s}.r<n>.{{relay,bare}} ({KAFKA_PARTITIONS} partitions)")
            }
            Admin::Mqtt => format!("topics bench/{s}/r<n>/{{relay,bare}}/{{type}}"),
            Admin::Webhook { sink: true } => {
                "a local sink per run and role (127.0.0.1, answers 204)".to_owned()
            }
            Admin::Webhook { sink: false } => "the endpoint as given".to_owned(),
        }
    }

    /// Creates the destination of run `run` for `role` (`relay` or `bare`).
    pub(crate) async fn create(&self, run: usize, role: &str) -> anyhow::Result<Target> {
        let s = &self.suffix;
        let mut target = Target {
            destination: self.base.clone(),
            resource: Resource::Nothing,
            stream: None,
            sink: None,
        };
        match (&self.admin, &mut target.destination) {
            (Admin::Nats(streams), Destination::Nats(c)) => {
                let stream = streams.create(&format!("r{run}_{role}"), -1).await?;
                *c = stream.configure(c.clone());
                target.stream = Some(stream);
            }
            (Admin::RabbitMq(connection), Destination::RabbitMq(c)) => {
                let exchange = format!("bench_{s}_r{run}_{role}");
                let queue = format!("{exchange}_q");
                let resource = Resource::Exchange {
                    exchange: exchange.clone(),
                    queue: queue.clone(),
                };
                self.register(resource.clone());
                declare_bound_queue(connection, &exchange, &queue).await?;
                c.exchange = exchange;
                c.exchange_kind = "topic".to_owned();
                c.declare_exchange = false;
                target.resource = resource;
            }
            (Admin::Redis(_), Destination::Redis(c)) => {
                let key = format!("bench:{s}:r{run}:{role}");
                let resource = Resource::StreamKey(key.clone());
                self.register(resource.clone());
                c.stream = key;
                target.resource = resource;
            }
            (Admin::Kafka(admin), Destination::Kafka(c)) => {
                let topic = format!("bench.{s}.r{run}.{role}");
                let resource = Resource::Topic(topic.clone());
                self.register(resource.clone());
                create_topic(admin, &topic).await?;
                c.topic_template = topic;
                c.client_id = format!("bench_{s}_r{run}_{role}");
                target.resource = resource;
            }
            (Admin::Mqtt, Destination::Mqtt(c)) => {
                c.topic_template = format!("bench/{s}/r{run}/{role}/{{type}}");
                c.client_id = Some(format!("bench_{s}_r{run}_{role}"));
            }
            (Admin::Webhook { sink: true }, Destination::Webhook(c)) => {
                let sink = Sink::start().await?;
                let path = sink_path(&c.url)?.unwrap_or_default();
                c.url = format!("http://{}{path}", sink.addr());
                target.sink = Some(sink);
            }
            (Admin::Webhook { sink: false }, Destination::Webhook(_)) => {}
            _ => bail!("the destination and the bench's connection are of different brokers"),
        }
        target
            .destination
            .validate()
            .with_context(|| format!("the {role} destination of run {run}"))?;
        Ok(target)
    }

    /// Removes what `target` created on the broker.
    pub(crate) async fn remove(&self, target: Target) -> anyhow::Result<()> {
        if let (Admin::Nats(streams), Some(stream)) = (&self.admin, &target.stream) {
            return streams.delete(stream).await;
        }
        if let Some(failure) = self.remove_resource(&target.resource).await {
            bail!("could not remove {failure}");
        }
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|r| *r != target.resource);
        Ok(())
    }

    /// Removes everything still there (after an error or Ctrl-C); returns
    /// what could not be removed.
    pub(crate) async fn cleanup(&self) -> Vec<String> {
        let mut failures = match &self.admin {
            Admin::Nats(streams) => streams.cleanup().await,
            _ => Vec::new(),
        };
        let created = std::mem::take(&mut *self.created.lock().unwrap_or_else(|e| e.into_inner()));
        for resource in &created {
            failures.extend(self.remove_resource(resource).await);
        }
        if let Admin::RabbitMq(connection) = &self.admin {
            let _ = connection.close(200, "OK".into()).await;
        }
        failures
    }

    fn register(&self, resource: Resource) {
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(resource);
    }

    /// Removes one resource (gone already is fine); `Some` says why not.
    async fn remove_resource(&self, resource: &Resource) -> Option<String> {
        let remove = async {
            match (&self.admin, resource) {
                (Admin::RabbitMq(connection), Resource::Exchange { exchange, queue }) => {
                    delete_exchange_and_queue(connection, exchange, queue)
                        .await
                        .map_err(|e| format!("exchange {exchange} / queue {queue}: {e:#}"))
                }
                (Admin::Redis(connection), Resource::StreamKey(key)) => {
                    let mut connection = connection.clone();
                    redis::cmd("DEL")
                        .arg(key)
                        .query_async::<i64>(&mut connection)
                        .await
                        .map(|_| ())
                        .map_err(|e| format!("Redis key {key}: {e}"))
                }
                (Admin::Kafka(admin), Resource::Topic(topic)) => delete_topic(admin, topic).await,
                (_, Resource::Nothing) => Ok(()),
                _ => Err("a resource of another broker".to_owned()),
            }
        };
        match tokio::time::timeout(REMOVE_TIMEOUT, remove).await {
            Ok(removed) => removed.err(),
            Err(_) => Some(format!("{}: timed out", resource.name())),
        }
    }
}

impl Resource {
    fn name(&self) -> String {
        match self {
            Resource::Exchange { exchange, queue } => {
                format!("exchange {exchange} / queue {queue}")
            }
            Resource::StreamKey(key) => format!("Redis key {key}"),
            Resource::Topic(topic) => format!("Kafka topic {topic}"),
            Resource::Nothing => "nothing".to_owned(),
        }
    }
}

impl Target {
    /// Requests the local webhook sink answered, if this target is one.
    pub(crate) fn sink_requests(&self) -> Option<u64> {
        self.sink.as_ref().map(Sink::requests)
    }
}

fn admin_options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))
}

async fn create_topic(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
) -> anyhow::Result<()> {
    let new = NewTopic::new(topic, KAFKA_PARTITIONS, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(&[new], &admin_options())
        .await
        .with_context(|| format!("cannot create the Kafka topic {topic}"))?;
    for result in results {
        result.map_err(|(name, code)| anyhow!("cannot create the Kafka topic {name}: {code}"))?;
    }
    Ok(())
}

async fn delete_topic(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
) -> Result<(), String> {
    let results = admin
        .delete_topics(&[topic], &admin_options())
        .await
        .map_err(|e| format!("Kafka topic {topic}: {e}"))?;
    for result in results {
        result.map_err(|(name, code)| format!("Kafka topic {name}: {code}"))?;
    }
    Ok(())
}

/// For a webhook URL with port 0 (`http://127.0.0.1:0/events/{type}`), what
/// follows its host and port (`/events/{type}`), to send to the local sink;
/// `None` for any other port.
fn sink_path(url: &str) -> anyhow::Result<Option<&str>> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok(None);
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host_port.rsplit_once(':').map(|(_, port)| port) != Some("0") {
        return Ok(None);
    }
    if !scheme.eq_ignore_ascii_case("http") {
        bail!(
            "port 0 asks for the local webhook sink, which speaks plain http:// (not {scheme}://)"
        );
    }
    Ok(Some(tail))
}

/// The AMQP URI of `url`, with its host read by the `url` crate (lapin's
/// parser reads any IP address as `localhost`), as proclaim-rabbitmq does.
fn amqp_uri(url: &str) -> anyhow::Result<AMQPUri> {
    let shown = redact_url(url);
    let parsed = url::Url::parse(url).map_err(|e| anyhow!("AMQP URL {shown}: {e}"))?;
    let host = match parsed.host() {
        Some(url::Host::Domain(name)) if !name.is_empty() => name.to_owned(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        _ => bail!("AMQP URL {shown} names no host"),
    };
    let mut uri: AMQPUri = url
        .parse()
        .map_err(|e: String| anyhow!("AMQP URL {shown}: {}", e.replace(url, &shown)))?;
    if let Some(port) = parsed.port() {
        uri.authority.port = port;
    }
    uri.authority.host = host;
    Ok(uri)
}

/// Declares a durable topic exchange and a durable queue bound to it with
/// `#` (every routing key), so the publisher's `mandatory` messages are
/// routed.
async fn declare_bound_queue(
    connection: &Connection,
    exchange: &str,
    queue: &str,
) -> anyhow::Result<()> {
    let channel = connection
        .create_channel()
        .await
        .context("opening a RabbitMQ channel")?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring the exchange {exchange}"))?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.into(), durable, FieldTable::default())
        .await
        .with_context(|| format!("declaring the queue {queue}"))?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("binding the queue {queue} to {exchange}"))?;
    close(&channel).await;
    Ok(())
}

/// Deletes the queue, then the exchange (RabbitMQ: either gone already is fine).
async fn delete_exchange_and_queue(
    connection: &Connection,
    exchange: &str,
    queue: &str,
) -> anyhow::Result<()> {
    let channel = connection
        .create_channel()
        .await
        .context("opening a RabbitMQ channel")?;
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .context("queue delete")?;
    channel
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await
        .context("exchange delete")?;
    close(&channel).await;
    Ok(())
}

async fn close(channel: &lapin::Channel) {
    let _ = channel.close(200, "OK".into()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_asks_for_the_sink() -> anyhow::Result<()> {
        assert_eq!(
            sink_path("http://127.0.0.1:0/events/{type}?k={subject}")?,
            Some("/events/{type}?k={subject}")
        );
        assert_eq!(sink_path("http://local:0")?, Some(""));
        assert_eq!(sink_path("http://user:pw@[::1]:0/in")?, Some("/in"));
        assert_eq!(sink_path("http://127.0.0.1:8080/in")?, None);
        assert_eq!(sink_path("http://[::1]/in")?, None);
        assert_eq!(sink_path("https://hooks.example.com/in")?, None);
        assert!(sink_path("https://127.0.0.1:0/in").is_err());
        Ok(())
    }
}
