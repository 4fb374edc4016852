//! [`RabbitQueueSource`]: consumes a RabbitMQ queue, as a [`Source`] for
//! the consumer runtime ([`proclaim_core::consumer::Consumer`]).

use std::time::Duration;

use lapin::message::{Delivery, DeliveryResult};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use proclaim_core::consumer::{Acker, Incoming, Source, SourceError};
use proclaim_core::{CancellationToken, ConfigError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::Target;
use crate::connection::{self, describe_lapin, soft_error};
use crate::{RabbitConfig, RabbitError, decode_delivery};

/// The longest name AMQP 0-9-1 carries (a short string).
const MAX_NAME_LEN: usize = 255;
/// How long a source that is dropped waits for the broker to confirm the
/// connection's close before cutting it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The header a quorum queue counts redeliveries in.
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// Settings of a [`RabbitQueueSource`].
///
/// ```
/// use proclaim_rabbitmq::RabbitSourceConfig;
///
/// let config = RabbitSourceConfig::new("thank-you")
///     .with_url("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .with_declare_queue(true)
///     .with_binding("campaign", ["Donor*", "Pledge.#"])
///     .with_prefetch(512);
/// assert!(config.validate().is_ok());
/// assert!(RabbitSourceConfig::new("").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitSourceConfig {
    /// Broker URL (default `amqp://127.0.0.1:5672/%2f`), as
    /// [`RabbitConfig::url`]; the password is hidden in every message.
    pub url: String,
    /// The queue to consume (required).
    pub queue: String,
    /// Declare the queue, durable, if it does not exist (default `false`:
    /// a missing queue is an error, as queues are usually provisioned).
    pub declare_queue: bool,
    /// Bind the queue to this exchange with each of
    /// [`RabbitSourceConfig::binding_keys`] on every connection (default
    /// empty: no binding).
    pub exchange: String,
    /// The binding keys (default `#`, everything on a topic exchange);
    /// used when [`RabbitSourceConfig::exchange`] is set.
    pub binding_keys: Vec<String>,
    /// Declare the exchange (durable, of
    /// [`RabbitSourceConfig::exchange_kind`]) if it does not exist (default
    /// `false`).
    pub declare_exchange: bool,
    /// Type of a declared exchange (default `topic`).
    pub exchange_kind: String,
    /// Most unacknowledged messages the broker sends this consumer
    /// (`basic.qos`, default 1,024, the consumer's default `max_pending`).
    pub prefetch: u16,
    /// The consumer tag (default empty: the broker makes one up).
    pub consumer_tag: String,
    /// Upper bound of one connection attempt: TCP, TLS, the AMQP handshake,
    /// declarations and `basic.consume` (default 5 s).
    #[serde(with = "proclaim_core::duration::human")]
    pub connect_timeout: Duration,
}

impl Default for RabbitSourceConfig {
    fn default() -> Self {
        let base = RabbitConfig::default();
        RabbitSourceConfig {
            url: base.url,
            queue: String::new(),
            declare_queue: false,
            exchange: String::new(),
            binding_keys: vec!["#".into()],
            declare_exchange: false,
            exchange_kind: base.exchange_kind,
            prefetch: 1024,
            consumer_tag: String::new(),
            connect_timeout: base.connect_timeout,
        }
    }
}

impl RabbitSourceConfig {
    /// Consumes `queue`, with the other settings at their defaults.
    pub fn new(queue: impl Into<String>) -> Self {
        RabbitSourceConfig {
            queue: queue.into(),
            ..RabbitSourceConfig::default()
        }
    }

    /// Sets [`RabbitSourceConfig::url`].
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }
    /// Sets [`RabbitSourceConfig::queue`].
    pub fn with_queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }
    /// Sets [`RabbitSourceConfig::declare_queue`].
    pub fn with_declare_queue(mut self, declare: bool) -> Self {
        self.declare_queue = declare;
        self
    }
    /// Sets [`RabbitSourceConfig::exchange`] and
    /// [`RabbitSourceConfig::binding_keys`].
    pub fn with_binding<K: Into<String>>(
        mut self,
        exchange: impl Into<String>,
        keys: impl IntoIterator<Item = K>,
    ) -> Self {
        self.exchange = exchange.into();
        self.binding_keys = keys.into_iter().map(Into::into).collect();
        self
    }
    /// Sets [`RabbitSourceConfig::declare_exchange`].
    pub fn with_declare_exchange(mut self, declare: bool) -> Self {
        self.declare_exchange = declare;
        self
    }
    /// Sets [`RabbitSourceConfig::exchange_kind`].
    pub fn with_exchange_kind(mut self, kind: impl Into<String>) -> Self {
        self.exchange_kind = kind.into();
        self
    }
    /// Sets [`RabbitSourceConfig::prefetch`].
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }
    /// Sets [`RabbitSourceConfig::consumer_tag`].
    pub fn with_consumer_tag(mut self, tag: impl Into<String>) -> Self {
        self.consumer_tag = tag.into();
        self
    }
    /// Sets [`RabbitSourceConfig::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Checks every setting: the URL (as [`RabbitConfig::validate`] reads
    /// it), a queue name, names and keys AMQP can carry, at least one
    /// binding key when binding, an exchange to declare when asked to, a
    /// prefetch of at least 1 and a connect timeout above zero.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        let exchange_config = self.exchange_config();
        exchange_config.validate()?;
        let names = [
            ("queue", &self.queue),
            ("exchange", &self.exchange),
            ("consumer_tag", &self.consumer_tag),
        ];
        for (what, name) in names.into_iter().chain(
            self.binding_keys
                .iter()
                .map(|k| ("binding key", k))
                .filter(|_| !self.exchange.is_empty()),
        ) {
            if name.len() > MAX_NAME_LEN {
                return err(format!(
                    "{what} {name:?} is longer than {MAX_NAME_LEN} bytes"
                ));
            }
            if name.chars().any(char::is_control) {
                return err(format!("{what} {name:?} contains a control character"));
            }
        }
        if self.queue.is_empty() {
            return err("a RabbitMQ queue source needs a queue name".into());
        }
        if !self.exchange.is_empty() && self.binding_keys.is_empty() {
            return err(format!(
                "binding to exchange {:?} needs at least one binding key (\"\" for a fanout exchange)",
                self.exchange
            ));
        }
        if self.declare_exchange && self.exchange.is_empty() {
            return err("declare_exchange needs an exchange to declare (set exchange)".into());
        }
        if self.prefetch == 0 {
            return err("prefetch must be at least 1 (0 would mean no limit)".into());
        }
        Ok(())
    }

    /// [`RabbitSourceConfig::url`] with the credentials replaced by `***@`.
    pub fn redacted_url(&self) -> String {
        proclaim_core::redact_url(&self.url)
    }

    /// The URL, exchange and timeout as the publisher's settings read them.
    fn exchange_config(&self) -> RabbitConfig {
        RabbitConfig::default()
            .with_url(self.url.clone())
            .with_exchange(self.exchange.clone())
            .with_exchange_kind(self.exchange_kind.clone())
            .with_declare_exchange(self.declare_exchange)
            .with_connect_timeout(self.connect_timeout)
    }
}

/// Consumes a RabbitMQ queue for
/// [`Consumer::run`](proclaim_core::consumer::Consumer::run) and
/// [`Consumer::spawn`](proclaim_core::consumer::Consumer::spawn).
///
/// # The queue is the consumer group
///
/// Every queue bound to an exchange gets its own copy of each event: two
/// consumers that must both see every event read two queues (e.g.
/// `receipts` and `thank-you`, both bound to the `campaign` exchange).
/// Several processes consuming one queue share its messages. The source can
/// declare its queue (durable) and bind it to an exchange with binding keys
/// ([`RabbitSourceConfig::declare_queue`], [`RabbitSourceConfig::exchange`],
/// [`RabbitSourceConfig::binding_keys`]), or consume a queue operators
/// provisioned.
///
/// # Settling
///
/// Messages are consumed with manual acknowledgement, at most
/// [`RabbitSourceConfig::prefetch`] unacknowledged at once (`basic.qos`):
/// keep it at least the consumer's
/// [`max_pending`](proclaim_core::consumer::Consumer::max_pending).
///
/// - **ack** is `basic.ack`.
/// - **nack** is `basic.nack` with `requeue`: the message goes back to the
///   queue, at once. RabbitMQ has no delayed requeue without plugins, so the
///   delay the consumer asks for is ignored.
/// - An acker dropped without either leaves the message unacknowledged.
///   Messages not settled when the channel closes — the source was dropped,
///   the process crashed, the connection broke — go back to the queue by
///   the broker's own doing: that is the redelivery after a crash.
///
/// # Delivery count
///
/// A quorum queue counts redeliveries in the `x-delivery-count` header: the
/// delivery attempt is that count plus one. Other queues only flag a
/// redelivered message: its attempt is then given as 2 (at least the
/// second), otherwise 1.
///
/// # Failures
///
/// A lost connection or channel, or the broker cancelling the consumer (the
/// queue was deleted), is a [`SourceError`]; the next receive connects
/// anew (within [`RabbitSourceConfig::connect_timeout`]), declaring and
/// binding again as configured. A message that does not decode
/// ([`decode_delivery`]) is handed to the consumer as undecodable, with its
/// body as the bytes, and the consumer parks it.
///
/// The source holds one connection with one channel. Dropping it closes
/// the connection: the messages it had not settled return to the queue.
///
/// ```no_run
/// use proclaim_core::consumer::{Consumer, Context, HandlerError};
/// use proclaim_rabbitmq::{RabbitQueueSource, RabbitSourceConfig};
///
/// # async fn demo(parked: impl proclaim_core::inbox::ParkedEvents) -> Result<(), Box<dyn std::error::Error>> {
/// let config = RabbitSourceConfig::new("thank-you")
///     .with_url("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .with_declare_queue(true)
///     .with_binding("campaign", ["DonorSecured"]);
/// let source = RabbitQueueSource::connect(config).await?;
/// let handle = Consumer::new("thank-you")
///     .on_event("DonorSecured", |cx: Context<()>| async move {
///         // Open the inbox transaction, write the note, commit.
///         tracing::info!(id = %cx.event.id(), "thank you!");
///         Ok::<_, HandlerError>(())
///     })
///     .park_into(parked)
///     .spawn(source)?;
/// // … on SIGTERM:
/// let report = handle.shutdown().await;
/// # let _ = report;
/// # Ok(()) }
/// ```
pub struct RabbitQueueSource {
    config: RabbitSourceConfig,
    target: Target,
    /// The URL, password hidden.
    url: String,
    queue: ShortString,
    link: Option<Link>,
}

impl std::fmt::Debug for RabbitQueueSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitQueueSource")
            .field("url", &self.url)
            .field("queue", &self.config.queue)
            .field("connected", &self.link.as_ref().is_some_and(Link::alive))
            .finish_non_exhaustive()
    }
}

/// One connection, its channel and the consumer on it.
struct Link {
    connection: Connection,
    channel: Channel,
    /// Kept alive: dropping it would cancel the consumer.
    _consumer: lapin::Consumer,
    /// Deliveries in the order the broker sent them.
    deliveries: mpsc::UnboundedReceiver<DeliveryResult>,
    /// A second handle on the socket, to cut the connection at once.
    socket: std::net::TcpStream,
    /// Cancelled once the connection is lost or given up: acks still
    /// waiting on it fail then (lapin would leave them waiting).
    lost: CancellationToken,
}

impl Link {
    fn alive(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// Cuts the connection without a word to the broker, which then
    /// requeues what was not settled.
    fn cut(self) {
        self.lost.cancel();
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }

    /// Closes the connection properly, in the background when a runtime
    /// runs (the broker requeues what was not settled), or cuts it.
    fn close(self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.cut();
            return;
        };
        self.lost.cancel();
        runtime.spawn(async move {
            // Closing the connection closes the channel, and with it the
            // consumer, in one step on the broker's side.
            let closed = tokio::time::timeout(
                CLOSE_TIMEOUT,
                self.connection.close(200, "consumer stopped".into()),
            )
            .await;
            if !matches!(closed, Ok(Ok(()))) {
                tracing::debug!("the RabbitMQ connection did not close in time; cutting it");
            }
            self.cut();
        });
    }
}

impl RabbitQueueSource {
    /// Connects to [`RabbitSourceConfig::url`], declares and binds as
    /// configured (or checks that the queue exists), sets the prefetch and
    /// starts consuming.
    ///
    /// Fails after [`RabbitSourceConfig::connect_timeout`] at most. Once
    /// connected, a lost connection is made anew by the next receive.
    pub async fn connect(config: RabbitSourceConfig) -> Result<Self, RabbitError> {
        config.validate()?;
        let target = config.exchange_config().target()?;
        let queue = ShortString::try_new(config.queue.clone())
            .map_err(|e| ConfigError(format!("queue: {e}")))?;
        let mut source = RabbitQueueSource {
            url: config.redacted_url(),
            config,
            target,
            queue,
            link: None,
        };
        let timeout = source.config.connect_timeout;
        match tokio::time::timeout(timeout, source.open()).await {
            Ok(Ok(link)) => source.link = Some(link),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(RabbitError::Connect {
                    url: source.url.clone(),
                    reason: format!("timed out after {timeout:?}"),
                    source: None,
                });
            }
        }
        Ok(source)
    }

    /// The configuration.
    pub fn config(&self) -> &RabbitSourceConfig {
        &self.config
    }

    /// Whether the source holds a live connection now.
    pub fn is_connected(&self) -> bool {
        self.link.as_ref().is_some_and(Link::alive)
    }

    fn connect_error(&self, reason: String, source: Option<lapin::Error>) -> RabbitError {
        connection::connect_error(&self.url, reason, source)
    }

    /// Connects, declares, binds, and starts consuming.
    async fn open(&self) -> Result<Link, RabbitError> {
        let opened = connection::open(&self.target, &self.url, "proclaim-consumer").await?;
        let connection = &opened.connection;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| self.setup_error("open a channel", e))?;
        self.declare(&channel).await?;
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|e| self.setup_error("set the prefetch", e))?;
        let tag = ShortString::try_new(self.config.consumer_tag.clone())
            .map_err(|e| ConfigError(format!("consumer_tag: {e}")))?;
        let consumer = channel
            .basic_consume(
                self.queue.clone(),
                tag,
                BasicConsumeOptions {
                    no_ack: false,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| self.setup_error("consume the queue", e))?;
        let (sender, deliveries) = mpsc::unbounded_channel();
        let lost = CancellationToken::new();
        let lost_on_error = lost.clone();
        // The closure runs as each delivery arrives, in order (only the
        // future it returns is spawned).
        consumer.set_delegate(move |delivery: DeliveryResult| {
            if !matches!(delivery, Ok(Some(_))) {
                // The consumer is over (an error, or cancelled): so are the
                // acks of its deliveries.
                lost_on_error.cancel();
            }
            let _ = sender.send(delivery);
            std::future::ready(())
        });
        let (connection, socket) = opened.disarm(&self.url)?;
        tracing::info!(
            url = %self.url,
            queue = %self.config.queue,
            consumer_tag = %consumer.tag(),
            prefetch = self.config.prefetch,
            "consuming a RabbitMQ queue"
        );
        Ok(Link {
            connection,
            channel,
            _consumer: consumer,
            deliveries,
            socket,
            lost,
        })
    }

    fn setup_error(&self, action: &str, err: lapin::Error) -> RabbitError {
        self.connect_error(
            format!(
                "cannot {action} for queue {:?}: {}",
                self.config.queue,
                describe_lapin(&err)
            ),
            Some(err),
        )
    }

    /// Declares the exchange and the queue and binds them, as configured;
    /// without `declare_queue`, checks that the queue exists.
    async fn declare(&self, channel: &Channel) -> Result<(), RabbitError> {
        let config = &self.config;
        let exchange = ShortString::try_new(config.exchange.clone())
            .map_err(|e| ConfigError(format!("exchange: {e}")))?;
        if config.declare_exchange {
            let kind = match config.exchange_kind.as_str() {
                "direct" => ExchangeKind::Direct,
                "topic" => ExchangeKind::Topic,
                "fanout" => ExchangeKind::Fanout,
                "headers" => ExchangeKind::Headers,
                other => ExchangeKind::Custom(other.to_owned()),
            };
            channel
                .exchange_declare(
                    exchange.clone(),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    self.setup_error(&format!("declare exchange {:?}", config.exchange), e)
                })?;
        }
        let declared = channel
            .queue_declare(
                self.queue.clone(),
                QueueDeclareOptions {
                    passive: !config.declare_queue,
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(queue) => tracing::debug!(
                queue = %config.queue,
                messages = queue.message_count(),
                consumers = queue.consumer_count(),
                "RabbitMQ queue ready"
            ),
            Err(e) if !config.declare_queue && soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => {
                return Err(self.connect_error(
                    format!(
                        "queue {:?} does not exist (declare it, or set declare_queue)",
                        config.queue
                    ),
                    Some(e),
                ));
            }
            Err(e) => return Err(self.setup_error("declare the queue", e)),
        }
        if !config.exchange.is_empty() {
            for key in &config.binding_keys {
                let routing_key = ShortString::try_new(key.clone())
                    .map_err(|e| ConfigError(format!("binding key: {e}")))?;
                channel
                    .queue_bind(
                        self.queue.clone(),
                        exchange.clone(),
                        routing_key,
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| {
                        self.setup_error(
                            &format!("bind to exchange {:?} with key {key:?}", config.exchange),
                            e,
                        )
                    })?;
            }
        }
        Ok(())
    }

    /// Gives the current connection up: the broker requeues what it had
    /// not settled.
    fn drop_link(&mut self, why: &str) {
        if let Some(link) = self.link.take() {
            tracing::warn!(url = %self.url, queue = %self.config.queue, "dropping the RabbitMQ connection: {why}");
            link.cut();
        }
    }

    fn incoming(&self, delivery: Delivery, lost: CancellationToken) -> Incoming {
        let attempt = delivery_attempt(&delivery);
        let decoded = decode_delivery(&delivery);
        let Delivery {
            acker,
            data,
            delivery_tag,
            ..
        } = delivery;
        let acker = RabbitAcker {
            acker: Some(acker),
            delivery_tag,
            lost,
        };
        let incoming = match decoded {
            Ok(event) => Incoming::new(event, acker),
            Err(e) => {
                tracing::warn!(queue = %self.config.queue, delivery_tag, error = %e, "undecodable message");
                Incoming::undecodable(e.to_string(), data, acker)
            }
        };
        incoming.with_delivery_attempt(attempt)
    }
}

impl Drop for RabbitQueueSource {
    fn drop(&mut self) {
        if let Some(link) = self.link.take() {
            link.close();
        }
    }
}

impl Source for RabbitQueueSource {
    /// The next message; `Some(Err(_))` when the connection or the channel
    /// was lost or could not be made (the consumer backs off and calls
    /// again, which connects anew). Never `None`: the source is open until
    /// dropped.
    async fn receive(&mut self) -> Option<Result<Incoming, SourceError>> {
        if !self.link.as_ref().is_some_and(Link::alive) {
            self.drop_link("the connection or channel is closed");
            let timeout = self.config.connect_timeout;
            match tokio::time::timeout(timeout, self.open()).await {
                Ok(Ok(link)) => self.link = Some(link),
                Ok(Err(e)) => {
                    return Some(Err(SourceError::new(format!(
                        "cannot consume RabbitMQ queue {:?}",
                        self.config.queue
                    ))
                    .with_source(e)));
                }
                Err(_) => {
                    return Some(Err(SourceError::new(format!(
                        "cannot consume RabbitMQ queue {:?}: connecting to {} timed out after {timeout:?}",
                        self.config.queue, self.url
                    ))));
                }
            }
        }
        let link = self.link.as_mut()?;
        let failure = match link.deliveries.recv().await {
            Some(Ok(Some(delivery))) => {
                let lost = link.lost.clone();
                return Some(Ok(self.incoming(delivery, lost)));
            }
            Some(Ok(None)) => {
                "the broker cancelled the consumer (was the queue deleted?)".to_owned()
            }
            Some(Err(e)) => describe_lapin(&e),
            None => "the consumer stopped".to_owned(),
        };
        self.drop_link(&failure);
        Some(Err(SourceError::new(format!(
            "lost the consumer of RabbitMQ queue {:?} at {}: {failure}; reconnecting",
            self.config.queue, self.url
        ))))
    }
}

/// The delivery attempt of a message: a quorum queue's count plus one, or
/// 2 for a message flagged redelivered, or 1.
fn delivery_attempt(delivery: &Delivery) -> u32 {
    let counted = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(DELIVERY_COUNT_HEADER))
        .and_then(|value| match value {
            AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
            AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
            AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
            AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
            AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
            AMQPValue::LongUInt(n) => Some(u64::from(*n)),
            AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
            _ => None,
        });
    match counted {
        Some(n) => u32::try_from(n.saturating_add(1)).unwrap_or(u32::MAX),
        None if delivery.redelivered => 2,
        None => 1,
    }
}

/// Settles one delivery on its channel.
struct RabbitAcker {
    acker: Option<lapin::Acker>,
    delivery_tag: u64,
    /// The connection's [`Link::lost`].
    lost: CancellationToken,
}

impl RabbitAcker {
    /// Waits for `settle`, unless the connection is lost first.
    async fn settle(
        &self,
        action: &str,
        settle: impl Future<Output = lapin::Result<bool>>,
    ) -> Result<(), SourceError> {
        let done = tokio::select! {
            biased;
            () = self.lost.cancelled() => Ok(false),
            done = settle => done,
        };
        match done {
            Ok(true) => Ok(()),
            Ok(false) => Err(SourceError::new(format!(
                "cannot {action} delivery {}: its connection or channel is closed (the broker \
                 requeues it)",
                self.delivery_tag
            ))),
            Err(e) => Err(SourceError::new(format!(
                "cannot {action} delivery {}: {}",
                self.delivery_tag,
                describe_lapin(&e)
            ))
            .with_source(e)),
        }
    }
}

impl Acker for RabbitAcker {
    async fn ack(mut self) -> Result<(), SourceError> {
        let Some(acker) = self.acker.take() else {
            return Ok(());
        };
        self.settle("ack", acker.ack(BasicAckOptions { multiple: false }))
            .await
    }

    /// `basic.nack` with `requeue`: back to the queue at once, whatever
    /// `delay` (RabbitMQ has no delayed requeue without plugins).
    async fn nack(mut self, delay: Duration) -> Result<(), SourceError> {
        let Some(acker) = self.acker.take() else {
            return Ok(());
        };
        tracing::debug!(
            delivery_tag = self.delivery_tag,
            ?delay,
            "requeueing the message now"
        );
        let options = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        self.settle("nack", acker.nack(options)).await
    }
}

#[cfg(test)]
mod tests {
    use lapin::BasicProperties;

    use super::*;

    #[test]
    fn validates_settings() {
        let good = RabbitSourceConfig::new("q");
        assert_eq!(good.validate(), Ok(()));
        assert_eq!(
            good.clone()
                .with_declare_queue(true)
                .with_binding("x", ["a.*", "b.#"])
                .with_declare_exchange(true)
                .validate(),
            Ok(())
        );
        let bad = [
            RabbitSourceConfig::new(""),
            good.clone().with_url("http://h"),
            good.clone().with_queue("q".repeat(256)),
            good.clone().with_queue("a\nb"),
            good.clone().with_binding("x", Vec::<String>::new()),
            good.clone().with_binding("x", ["k".repeat(256)]),
            good.clone().with_declare_exchange(true),
            good.clone().with_prefetch(0),
            good.clone().with_connect_timeout(Duration::ZERO),
            good.clone().with_exchange_kind(""),
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?} was accepted");
        }
        assert_eq!(
            good.with_url("amqp://u:secret@h/%2f").redacted_url(),
            "amqp://***@h/%2f"
        );
    }

    #[test]
    fn deserializes_with_defaults() -> Result<(), serde_json::Error> {
        let config: RabbitSourceConfig = serde_json::from_str(
            r#"{"queue":"q","declare_queue":true,"exchange":"x","binding_keys":["a"],"connect_timeout":"2s"}"#,
        )?;
        assert_eq!(
            config,
            RabbitSourceConfig::new("q")
                .with_declare_queue(true)
                .with_binding("x", ["a"])
                .with_connect_timeout(Duration::from_secs(2))
        );
        assert_eq!(config.prefetch, 1024);
        assert!(serde_json::from_str::<RabbitSourceConfig>(r#"{"queue_name":"q"}"#).is_err());
        Ok(())
    }

    fn delivery(redelivered: bool, headers: Option<FieldTable>) -> Delivery {
        let mut d = Delivery::mock(1, "x".into(), "k".into(), redelivered, Vec::new());
        if let Some(headers) = headers {
            d.properties = BasicProperties::default().with_headers(headers);
        }
        d
    }

    #[test]
    fn reads_the_delivery_attempt() {
        assert_eq!(delivery_attempt(&delivery(false, None)), 1);
        assert_eq!(delivery_attempt(&delivery(true, None)), 2);
        let mut counted = FieldTable::default();
        counted.insert(DELIVERY_COUNT_HEADER.into(), AMQPValue::LongLongInt(4));
        assert_eq!(delivery_attempt(&delivery(true, Some(counted))), 5);
    }
}
