//! [`KafkaPublisher`]: publishes outbox events to Kafka topics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use proclaim_core::{ConfigError, OutboxRecord, PublishError, Publisher};
use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};

use crate::config::millis;
use crate::{KafkaConfig, KafkaError, TopicTemplate, message};

/// How much longer than the ack timeout a publish waits for librdkafka's
/// delivery report before giving up on it. The report is bounded by
/// `message.timeout.ms`, but librdkafka looks for timed-out messages only
/// once a second, so it may come up to a second late.
const DELIVERY_SLACK: Duration = Duration::from_secs(2);

/// The longest `request.timeout.ms` librdkafka takes.
const MAX_REQUEST_TIMEOUT_MS: i32 = 900_000;

/// The shortest `socket.connection.setup.timeout.ms` librdkafka takes.
const MIN_SETUP_TIMEOUT_MS: i32 = 1_000;

/// The producer type: librdkafka's, with this crate's client context.
type Producer = FutureProducer<Context>;

/// Publishes outbox events to Kafka.
///
/// Each event goes to the topic rendered from
/// [`KafkaConfig::topic_template`], as a record whose key is the event's
/// subject (so that every event of a subject lands in one partition, where
/// Kafka keeps their order), whose value is the event's JSON data byte for
/// byte, and whose headers carry the CloudEvents attributes in binary
/// content mode (`ce_id`, `ce_type`, …, and `content-type`; see
/// [`decode_message`](crate::decode_message)). The record timestamp is the
/// publish time (Kafka's retention works on it); the event time travels in
/// `ce_time`.
///
/// The producer is idempotent (`enable.idempotence=true`) with `acks=all`:
/// [`Publisher::publish`] returns `Ok` only once the partition leader has
/// the record and every in-sync replica has it too, and librdkafka's own
/// retries neither duplicate nor reorder records. Keys are hashed with
/// `murmur2` like the Java client, so events of a subject land in the same
/// partition whichever client wrote earlier ones.
///
/// Errors are classified for the relay (see the crate documentation for the
/// full list): an outage (brokers unreachable, no acknowledgement within
/// [`KafkaConfig::ack_timeout`], no leader, too few in-sync replicas, a full
/// queue) is transient; an event Kafka can never take (a topic name its
/// attributes cannot form, a message too large, a topic that does not exist
/// and is not created, no permission to write the topic) is permanent.
///
/// librdkafka keeps the connections to the brokers and makes them anew on
/// its own, with backoff; [`Publisher::ready`] asks the cluster for metadata
/// (within [`KafkaConfig::connect_timeout`]) only after librdkafka reported
/// every broker down. A producer that hits a fatal error (e.g. its
/// idempotence state became inconsistent) is replaced by a new one.
///
/// The publisher is cheap to clone; clones share one producer.
#[derive(Debug, Clone)]
pub struct KafkaPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    template: TopicTemplate,
    /// The bootstrap servers, for messages.
    servers: String,
    client_config: ClientConfig,
    health: Arc<Health>,
    /// The producer and how many producers were made before it; `None` only
    /// while the publisher is dropped.
    producer: RwLock<Option<(u64, Producer)>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("servers", &self.servers)
            .field("topic_template", &self.template.as_str())
            .field("client_id", &self.config.client_id)
            .finish_non_exhaustive()
    }
}

/// What librdkafka reported about the brokers as a whole.
#[derive(Debug, Default)]
struct Health {
    /// Set when librdkafka reports every broker down; cleared by a delivery
    /// or a successful metadata request.
    all_down: AtomicBool,
    /// The last client-wide error and when it came.
    last_error: Mutex<Option<(Instant, String)>>,
}

impl Health {
    fn up(&self) {
        self.all_down.store(false, Ordering::SeqCst);
    }

    fn is_down(&self) -> bool {
        self.all_down.load(Ordering::SeqCst)
    }

    fn record(&self, reason: &str) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((Instant::now(), reason.to_owned()));
    }

    /// The last client-wide error reported at or after `since`.
    fn error_since(&self, since: Instant) -> Option<String> {
        let last = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        last.as_ref()
            .filter(|(at, _)| *at >= since)
            .map(|(_, reason)| reason.clone())
    }
}

/// The client context: librdkafka's logs go to `tracing` (target
/// `librdkafka`), and its client-wide errors feed [`Health`].
struct Context {
    health: Arc<Health>,
    servers: String,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        // Connection failures are logged (synchronously, by the broker
        // thread) before the requests waiting on that connection fail: the
        // best reason to give for them.
        if fac == "FAIL" && !matches!(level, RDKafkaLogLevel::Debug) {
            self.health.record(log_message);
        }
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::error!(target: "librdkafka", facility = fac, "{log_message}");
            }
            RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, "{log_message}");
            }
            RDKafkaLogLevel::Notice => {
                tracing::info!(target: "librdkafka", facility = fac, "{log_message}");
            }
            RDKafkaLogLevel::Info => {
                tracing::debug!(target: "librdkafka", facility = fac, "{log_message}");
            }
            RDKafkaLogLevel::Debug => {
                tracing::trace!(target: "librdkafka", facility = fac, "{log_message}");
            }
        }
    }

    fn stats(&self, _statistics: rdkafka::Statistics) {}

    fn error(&self, error: RdKafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        if code != Some(RDKafkaErrorCode::AllBrokersDown) {
            // "1/1 brokers are down" says less than the error before it.
            self.health.record(reason);
        }
        match code {
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                self.health.all_down.store(true, Ordering::SeqCst);
                tracing::warn!(servers = %self.servers, "every Kafka broker is down: {reason}");
            }
            Some(RDKafkaErrorCode::Fatal) => {
                tracing::error!(servers = %self.servers, "the Kafka producer hit a fatal error: {reason}");
            }
            _ => {
                tracing::debug!(servers = %self.servers, error = %error, "Kafka client error: {reason}")
            }
        }
    }
}

impl KafkaPublisher {
    /// Builds the producer and checks that the cluster answers a metadata
    /// request within [`KafkaConfig::connect_timeout`].
    pub async fn connect(config: KafkaConfig) -> Result<Self, KafkaError> {
        let publisher = Self::new(config)?;
        let inner = &publisher.inner;
        let timeout = inner.config.connect_timeout;
        inner
            .probe(timeout)
            .await
            .map_err(|(reason, source)| KafkaError::Connect {
                servers: inner.servers.clone(),
                reason,
                source: source.map(Into::into),
            })?;
        tracing::info!(servers = %inner.servers, topic_template = %inner.template, "connected to Kafka");
        Ok(publisher)
    }

    /// Builds the producer without waiting for the cluster: librdkafka
    /// connects in the background, and the first publish (or
    /// [`Publisher::ready`]) reports an unreachable cluster. Only the
    /// configuration is checked here (librdkafka checks the extra
    /// properties).
    pub fn new(config: KafkaConfig) -> Result<Self, KafkaError> {
        config.validate()?;
        let template = config.template()?;
        let servers = config.bootstrap_list()?;
        let client_config = client_config(&config)?;
        let health = Arc::new(Health::default());
        let producer = create(&client_config, &health, &servers)?;
        let inner = Inner {
            config,
            template,
            servers,
            client_config,
            health,
            producer: RwLock::new(Some((0, producer))),
        };
        Ok(KafkaPublisher {
            inner: Arc::new(inner),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }
}

/// librdkafka's settings for `config` (already validated).
fn client_config(config: &KafkaConfig) -> Result<ClientConfig, ConfigError> {
    let ack_ms = millis("ack_timeout", config.ack_timeout)?;
    let connect_ms = millis("connect_timeout", config.connect_timeout)?;
    let missing_ms = config.missing_topic_timeout.as_millis();
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", config.bootstrap_list()?)
        .set("client.id", &config.client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", ack_ms.to_string())
        .set(
            "request.timeout.ms",
            ack_ms.min(MAX_REQUEST_TIMEOUT_MS).to_string(),
        )
        .set(
            "socket.connection.setup.timeout.ms",
            connect_ms.max(MIN_SETUP_TIMEOUT_MS).to_string(),
        )
        .set("topic.metadata.propagation.max.ms", missing_ms.to_string())
        // Java-compatible key hashing: a key maps to the same partition
        // whichever client wrote it.
        .set("partitioner", "murmur2_random")
        // Come back within 2 s of a broker's return (librdkafka's default
        // backs off up to 10 s).
        .set("reconnect.backoff.max.ms", "2000");
    for (name, value) in &config.properties {
        c.set(name.trim(), value);
    }
    // librdkafka tells why a connection failed at info level: keep those
    // lines coming (to `tracing` at debug level) for the error messages.
    if !matches!(c.log_level, RDKafkaLogLevel::Debug) {
        c.set_log_level(RDKafkaLogLevel::Info);
    }
    Ok(c)
}

/// A new producer with its own context.
fn create(
    client_config: &ClientConfig,
    health: &Arc<Health>,
    servers: &str,
) -> Result<Producer, ConfigError> {
    let context = Context {
        health: health.clone(),
        servers: servers.to_owned(),
    };
    client_config
        .create_with_context(context)
        .map_err(|e| ConfigError(format!("librdkafka rejects the producer settings: {e}")))
}

impl Inner {
    /// The current producer and its generation.
    fn producer(&self) -> Result<(u64, Producer), PublishError> {
        self.producer
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| PublishError::transient("the Kafka publisher is closed"))
    }

    /// Replaces the producer of generation `generation` with a new one if it
    /// cannot produce any more: it hit a fatal error, or the broker rejected
    /// its idempotence state (`code`, the error of a failed produce).
    ///
    /// The second happens with brokers that do not accept the epoch bump an
    /// idempotent librdkafka producer makes on its own after a message timed
    /// out (KIP-360; tansu 0.6 answers every later produce with
    /// `ProducerFenced`). A new producer gets a new producer id.
    fn renew_if_broken(
        &self,
        generation: u64,
        producer: &Producer,
        code: Option<RDKafkaErrorCode>,
    ) {
        let reason = match producer.client().fatal_error() {
            Some((code, reason)) => format!("it hit a fatal error ({code}): {reason}"),
            None => match code {
                Some(code) if rejects_idempotence_state(code) => {
                    format!("the broker rejects its producer id or epoch ({code})")
                }
                _ => return,
            },
        };
        let mut slot = self
            .producer
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let Some((current, _)) = slot.as_ref() else {
            return;
        };
        if *current != generation {
            return; // another caller replaced it already
        }
        match create(&self.client_config, &self.health, &self.servers) {
            Ok(fresh) => {
                tracing::warn!(servers = %self.servers, "replacing the Kafka producer: {reason}");
                if let Some((_, old)) = slot.replace((generation + 1, fresh)) {
                    dispose(old);
                }
            }
            Err(e) => {
                tracing::error!(servers = %self.servers, "cannot replace the Kafka producer ({reason}): {e}");
            }
        }
    }

    /// Asks the cluster for metadata (of the topic, when the template names
    /// a single one; of every topic otherwise) within `timeout`.
    async fn probe(&self, timeout: Duration) -> Result<(), (String, Option<RdKafkaError>)> {
        let (_, producer) = self.producer().map_err(|e| (e.to_string(), None))?;
        let topic = self.template.fixed().map(str::to_owned);
        let started = Instant::now();
        let fetch = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(topic.as_deref(), timeout)
                .map(|metadata| metadata.brokers().len())
        });
        let outcome = tokio::time::timeout(timeout + DELIVERY_SLACK, fetch).await;
        let failed = |what: String, source: Option<RdKafkaError>| {
            let reason = match self.health.error_since(started) {
                Some(last) => format!("{what} (last client error: {last})"),
                None => what,
            };
            Err((reason, source))
        };
        match outcome {
            Ok(Ok(Ok(brokers))) if brokers > 0 => {
                self.health.up();
                Ok(())
            }
            Ok(Ok(Ok(_))) => failed("the cluster advertises no broker".into(), None),
            Ok(Ok(Err(e))) => {
                // librdkafka reports a metadata request that found no broker
                // in time as a transport failure, like a refused connection.
                let timed_out = started.elapsed() + Duration::from_millis(10) >= timeout;
                let what = match e.rdkafka_error_code() {
                    _ if timed_out => format!("no broker answered within {timeout:?}"),
                    Some(
                        RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::AllBrokersDown,
                    ) => "no broker could be reached".to_owned(),
                    _ => format!("the metadata request failed: {e}"),
                };
                failed(what, Some(e))
            }
            Ok(Err(join)) => failed(format!("the metadata request was lost: {join}"), None),
            Err(_) => failed(format!("no broker answered within {timeout:?}"), None),
        }
    }

    /// Turns a failed produce into a classified [`PublishError`].
    fn classify(&self, err: RdKafkaError, what: &str, started: Instant) -> PublishError {
        let context = || {
            self.health
                .error_since(started)
                .map(|last| format!(" (last client error: {last})"))
                .unwrap_or_default()
        };
        let Some(code) = err.rdkafka_error_code() else {
            return PublishError::transient(format!("{what}: {err}{}", context())).with_source(err);
        };
        if let Some(reason) = permanent_reason(code) {
            return PublishError::permanent(format!("{what}: {reason} ({err})")).with_source(err);
        }
        let reason = match code {
            RDKafkaErrorCode::MessageTimedOut => format!(
                "no acknowledgement from the in-sync replicas within {:?}",
                self.config.ack_timeout
            ),
            RDKafkaErrorCode::QueueFull => {
                "the producer's queue is full (too many events in flight)".to_owned()
            }
            c if rejects_idempotence_state(c) => {
                format!(
                    "the broker rejects the producer's id or epoch, so the producer is made anew: {err}"
                )
            }
            _ => err.to_string(),
        };
        PublishError::transient(format!("{what}: {reason}{}", context())).with_source(err)
    }
}

/// Why an event can never be published, for the error codes that say so;
/// `None` for the rest (transient).
fn permanent_reason(code: RDKafkaErrorCode) -> Option<&'static str> {
    use RDKafkaErrorCode as C;
    Some(match code {
        C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge => {
            "the message is larger than the producer or the broker accepts (message.max.bytes, \
             max.message.bytes)"
        }
        C::InvalidTopic => "the broker rejects the topic name",
        C::UnknownTopic | C::UnknownTopicOrPartition => {
            "the topic does not exist and the cluster does not create it (create the topic, or \
             enable auto-creation on the brokers)"
        }
        C::UnknownPartition => "the partition does not exist",
        C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed => {
            "the client may not write to the topic"
        }
        C::InvalidRecord
        | C::InvalidRequiredAcks
        | C::UnsupportedForMessageFormat
        | C::PolicyViolation
        | C::InvalidArgument => "the broker or the client rejects the message",
        _ => return None,
    })
}

/// Whether a produce error says the broker no longer accepts the producer's
/// idempotence state (id, epoch, sequence numbers): only a new producer
/// helps.
fn rejects_idempotence_state(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::ProducerFenced
            | C::InvalidProducerEpoch
            | C::InvalidProducerIdMapping
            | C::UnknownProducerId
            | C::OutOfOrderSequenceNumber
    )
}

/// Drops a producer on a blocking thread where possible: librdkafka's
/// destruction purges, flushes for up to 500 ms and joins its threads.
fn dispose(producer: Producer) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn_blocking(move || drop(producer));
        }
        Err(_) => drop(producer),
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let slot = self
            .producer
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((_, producer)) = slot {
            dispose(producer);
        }
    }
}

impl Publisher for KafkaPublisher {
    async fn publish(&self, record: &OutboxRecord) -> Result<(), PublishError> {
        let inner = &*self.inner;
        let event = &record.event;
        let id = event.id();
        let topic = inner
            .template
            .render(event)
            .map_err(|e| PublishError::permanent(format!("event {id} cannot be published: {e}")))?;
        let what = format!("cannot publish event {id} to Kafka topic {topic:?}");
        let (generation, producer) = inner.producer()?;
        let future_record = FutureRecord::to(&topic)
            .key(event.subject().as_bytes())
            .payload(event.data().get().as_bytes())
            .headers(message::headers(event));
        let started = Instant::now();
        let outcome = match producer.send_result(future_record) {
            Err((e, _)) => Err(e),
            Ok(delivery) => {
                let bound = inner.config.ack_timeout + DELIVERY_SLACK;
                match tokio::time::timeout(bound, delivery).await {
                    Ok(Ok(Ok(_))) => Ok(()),
                    Ok(Ok(Err((e, _)))) => Err(e),
                    Ok(Err(_)) => {
                        return Err(PublishError::transient(format!(
                            "{what}: the producer was closed before the delivery report came"
                        )));
                    }
                    Err(_) => {
                        return Err(PublishError::transient(format!(
                            "{what}: no delivery report within {bound:?}"
                        )));
                    }
                }
            }
        };
        match outcome {
            Ok(()) => {
                inner.health.up();
                tracing::debug!(
                    event_id = %id,
                    sequence = record.sequence,
                    topic = %topic,
                    "event published"
                );
                Ok(())
            }
            Err(e) => {
                let code = e.rdkafka_error_code();
                let error = inner.classify(e, &what, started);
                inner.renew_if_broken(generation, &producer, code);
                tracing::debug!(
                    event_id = %id,
                    transient = error.is_transient(),
                    error = %error.full_message(),
                    "publish failed"
                );
                Err(error)
            }
        }
    }

    async fn ready(&self) -> Result<(), PublishError> {
        let inner = &*self.inner;
        let (generation, producer) = inner.producer()?;
        inner.renew_if_broken(generation, &producer, None);
        if !inner.health.is_down() {
            return Ok(());
        }
        inner
            .probe(inner.config.connect_timeout)
            .await
            .map_err(|(reason, source)| {
                tracing::debug!(servers = %inner.servers, %reason, "Kafka not ready");
                let error = PublishError::transient(format!(
                    "Kafka at {} is not reachable: {reason}",
                    inner.servers
                ));
                match source {
                    Some(source) => error.with_source(source),
                    None => error,
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_error_codes() {
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::UnknownTopic,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::InvalidTopic,
        ] {
            assert!(permanent_reason(code).is_some(), "{code:?}");
        }
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::LeaderNotAvailable,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::NotEnoughReplicasAfterAppend,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::NetworkException,
            RDKafkaErrorCode::OutOfOrderSequenceNumber,
            RDKafkaErrorCode::Fatal,
        ] {
            assert!(permanent_reason(code).is_none(), "{code:?}");
        }
    }

    #[test]
    fn sets_the_delivery_guarantees() -> Result<(), ConfigError> {
        let config = KafkaConfig::default()
            .with_bootstrap_servers("kafka://a:1,b")
            .with_ack_timeout(Duration::from_millis(2500))
            .with_connect_timeout(Duration::from_millis(200))
            .with_property(" linger.ms ", "20");
        let c = client_config(&config)?;
        for (key, value) in [
            ("bootstrap.servers", "a:1,b:9092"),
            ("client.id", "proclaim"),
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("message.timeout.ms", "2500"),
            ("request.timeout.ms", "2500"),
            ("socket.connection.setup.timeout.ms", "1000"),
            ("topic.metadata.propagation.max.ms", "5000"),
            ("partitioner", "murmur2_random"),
            ("linger.ms", "20"),
        ] {
            assert_eq!(c.get(key), Some(value), "{key}");
        }
        Ok(())
    }

    #[test]
    fn an_unknown_property_is_a_config_error() {
        let config = KafkaConfig::default().with_property("no.such.property", "1");
        let err = KafkaPublisher::new(config).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e
                .starts_with("invalid configuration: librdkafka rejects the producer settings:")
                && e.contains("no.such.property")),
            "{err:?}"
        );
    }
}
