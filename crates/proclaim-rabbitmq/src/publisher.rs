//! [`RabbitPublisher`]: publishes outbox events to a RabbitMQ exchange.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ErrorKind, ExchangeKind};
use proclaim_core::{OutboxRecord, PublishError, Publisher};
use tokio::sync::{RwLock, Semaphore};
use tokio::time::Instant;

use crate::config::Target;
use crate::connection::{self, describe_lapin, soft_error};
use crate::{RabbitConfig, RabbitError, RoutingKeyTemplate, message};

/// After a failed connection attempt, callers within this gap get its error
/// instead of a new attempt, so that a burst of publishes during an outage
/// makes one attempt, not one each.
const RECONNECT_GAP: Duration = Duration::from_millis(500);

/// Publishes outbox events to a RabbitMQ exchange.
///
/// Each event is published to [`RabbitConfig::exchange`] with the routing key
/// rendered from [`RabbitConfig::routing_key_template`], as a CloudEvent in
/// binary content mode: the attributes in `cloudEvents:*` headers, the
/// content type in the `content_type` property, the JSON data as the body,
/// byte for byte. The message is persistent (`delivery_mode` 2) and carries
/// the event id as `message_id`, the id consumers deduplicate by (RabbitMQ
/// itself does not drop repeated messages).
///
/// [`Publisher::publish`] returns `Ok` only once the broker has confirmed the
/// message (publisher confirms: for a durable queue, once it is written to
/// disk). Messages are published as `mandatory`: one that no queue is bound
/// to receive comes back and is a permanent error, never a silent success.
///
/// Errors are classified for the relay: an outage (connection refused or
/// lost, no confirm within [`RabbitConfig::confirm_timeout`], a nack, the
/// exchange missing) is transient; an event the broker can never take (no
/// queue bound for its routing key, a routing key or attribute too long for
/// AMQP, a message the broker rejects as too large) is permanent.
///
/// One connection is shared by every publish, each with a channel of its
/// own until its confirm arrives (channels are reused, up to
/// [`RabbitConfig::max_channels`]). Per-subject order holds because the
/// relay publishes the next event of a subject only after the previous one
/// was confirmed, i.e. is in its queues. When the connection dies (broker
/// restart, network cut) the next publish or [`Publisher::ready`] connects
/// anew, within [`RabbitConfig::connect_timeout`]; nothing reconnects in the
/// background.
///
/// The publisher is cheap to clone; clones share one connection.
#[derive(Debug, Clone)]
pub struct RabbitPublisher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: RabbitConfig,
    target: Target,
    template: RoutingKeyTemplate,
    /// The URL with the password hidden, for messages.
    url: String,
    exchange: ShortString,
    kind: ExchangeKind,
    state: RwLock<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The current connection, if any (possibly dead: check [`Link::alive`]).
    link: Option<Arc<Link>>,
    /// Connection attempts made so far.
    attempts: u64,
    /// When the last attempt failed, and why (cleared by a success).
    last_failure: Option<(Instant, String)>,
}

/// One AMQP connection and its channels.
#[derive(Debug)]
struct Link {
    connection: Connection,
    /// A second handle on the connection's socket, to cut it at once when
    /// the connection is given up (lapin's I/O thread then ends).
    socket: std::net::TcpStream,
    /// Channels in confirm mode, free for the next publish.
    idle: Mutex<Vec<Channel>>,
    /// Bounds the channels in use.
    permits: Semaphore,
    /// Set when the connection is given up (e.g. a confirm never came).
    poisoned: AtomicBool,
}

impl Link {
    fn alive(&self) -> bool {
        !self.poisoned.load(Ordering::SeqCst) && self.connection.status().connected()
    }

    /// Gives the connection up: later publishes make a new one.
    fn poison(&self, why: &str) {
        if !self.poisoned.swap(true, Ordering::SeqCst) {
            tracing::warn!("dropping the RabbitMQ connection: {why}");
            let _ = self.socket.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Publishes on a channel of its own and waits for the confirm.
    async fn publish(
        &self,
        exchange: &ShortString,
        routing_key: ShortString,
        body: &[u8],
        properties: BasicProperties,
    ) -> lapin::Result<Confirmation> {
        // The semaphore is never closed.
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(std::io::Error::other)?;
        let channel = match self.take_idle() {
            Some(channel) => channel,
            None => {
                let channel = self.connection.create_channel().await?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
                channel
            }
        };
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let confirmation = channel
            .basic_publish(exchange.clone(), routing_key, options, body, properties)
            .await?
            .await?;
        if channel.status().connected() {
            self.idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(channel);
        }
        Ok(confirmation)
    }

    fn take_idle(&self) -> Option<Channel> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(channel) = idle.pop() {
            if channel.status().connected() {
                return Some(channel);
            }
        }
        None
    }
}

impl RabbitPublisher {
    /// Connects to [`RabbitConfig::url`] and checks (or, with
    /// [`RabbitConfig::declare_exchange`], declares) the exchange.
    ///
    /// Fails after [`RabbitConfig::connect_timeout`] at most. Once connected,
    /// a lost connection is made anew by the next publish.
    pub async fn connect(config: RabbitConfig) -> Result<Self, RabbitError> {
        let publisher = Self::new(config)?;
        let inner = &publisher.inner;
        let timeout = inner.config.connect_timeout;
        let link = match tokio::time::timeout(timeout, inner.open()).await {
            Ok(link) => link?,
            Err(_) => return Err(inner.connect_error(format!("timed out after {timeout:?}"), None)),
        };
        let mut state = inner.state.write().await;
        state.attempts += 1;
        state.link = Some(Arc::new(link));
        drop(state);
        Ok(publisher)
    }

    /// Builds a publisher without connecting: the first publish (or
    /// [`Publisher::ready`]) connects and checks the exchange. Only the
    /// configuration is checked here.
    pub fn new(config: RabbitConfig) -> Result<Self, RabbitError> {
        config.validate()?;
        let target = config.target()?;
        let template = config.template()?;
        let exchange = ShortString::try_new(config.exchange.clone())
            .map_err(|e| proclaim_core::ConfigError(format!("exchange: {e}")))?;
        let inner = Inner {
            url: config.redacted_url(),
            kind: config.kind(),
            target,
            template,
            exchange,
            config,
            state: RwLock::new(State::default()),
        };
        Ok(RabbitPublisher {
            inner: Arc::new(inner),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RabbitConfig {
        &self.inner.config
    }

    /// Whether the publisher holds a live connection now (it does not try
    /// to connect; [`Publisher::ready`] does).
    pub async fn is_connected(&self) -> bool {
        let state = self.inner.state.read().await;
        state.link.as_ref().is_some_and(|link| link.alive())
    }
}

impl Inner {
    fn connect_error(&self, reason: String, source: Option<lapin::Error>) -> RabbitError {
        connection::connect_error(&self.url, reason, source)
    }

    /// The live connection, made anew if there is none (within the connect
    /// timeout, waiting for another caller's attempt included).
    async fn link(&self) -> Result<Arc<Link>, PublishError> {
        let seen = {
            let state = self.state.read().await;
            if let Some(link) = state.link.as_ref().filter(|l| l.alive()) {
                return Ok(link.clone());
            }
            state.attempts
        };
        let deadline = Instant::now() + self.config.connect_timeout;
        self.reconnect(seen, deadline).await
    }

    async fn reconnect(&self, seen: u64, deadline: Instant) -> Result<Arc<Link>, PublishError> {
        let timeout = self.config.connect_timeout;
        let timed_out = || {
            PublishError::transient(format!(
                "cannot connect to RabbitMQ at {}: timed out after {timeout:?}",
                self.url
            ))
        };
        let Ok(mut state) = tokio::time::timeout_at(deadline, self.state.write()).await else {
            return Err(timed_out());
        };
        if let Some(link) = state.link.as_ref().filter(|l| l.alive()) {
            return Ok(link.clone());
        }
        if let Some((at, reason)) = &state.last_failure
            && (state.attempts != seen || at.elapsed() < RECONNECT_GAP)
        {
            // Another caller just tried, and failed.
            return Err(PublishError::transient(reason.clone()));
        }
        state.attempts += 1;
        if let Some(old) = state.link.take() {
            old.poison("the connection was lost");
        }
        tracing::debug!(url = %self.url, attempt = state.attempts, "connecting to RabbitMQ");
        let outcome = match tokio::time::timeout_at(deadline, self.open()).await {
            Ok(Ok(link)) => Ok(link),
            Ok(Err(e)) => Err(PublishError::transient(e.to_string()).with_source(e)),
            Err(_) => Err(timed_out()),
        };
        match outcome {
            Ok(link) => {
                let link = Arc::new(link);
                state.link = Some(link.clone());
                state.last_failure = None;
                Ok(link)
            }
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e.full_message(), "cannot connect to RabbitMQ");
                state.last_failure = Some((Instant::now(), e.to_string()));
                Err(e)
            }
        }
    }

    /// Makes a connection and checks (or declares) the exchange.
    async fn open(&self) -> Result<Link, RabbitError> {
        let opened = connection::open(&self.target, &self.url, "proclaim").await?;
        self.ensure_exchange(&opened.connection).await?;
        let (connection, socket) = opened.disarm(&self.url)?;
        tracing::info!(url = %self.url, exchange = %self.exchange, "connected to RabbitMQ");
        Ok(Link {
            connection,
            socket,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(self.config.max_channels),
            poisoned: AtomicBool::new(false),
        })
    }

    /// Checks that the exchange exists, or declares it.
    async fn ensure_exchange(&self, connection: &Connection) -> Result<(), RabbitError> {
        if self.exchange.as_str().is_empty() {
            return Ok(()); // the default exchange always exists
        }
        let declare = self.config.declare_exchange;
        let action = if declare { "declare" } else { "check" };
        let failed = |e: lapin::Error| RabbitError::Exchange {
            exchange: self.config.exchange.clone(),
            action,
            reason: describe_lapin(&e),
            source: Some(e.into()),
        };
        let channel = connection.create_channel().await.map_err(failed)?;
        let options = ExchangeDeclareOptions {
            passive: !declare,
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let result = channel
            .exchange_declare(
                self.exchange.clone(),
                self.kind.clone(),
                options,
                FieldTable::default(),
            )
            .await;
        match result {
            Ok(()) => {
                tracing::debug!(exchange = %self.exchange, action, "RabbitMQ exchange ready");
                Ok(())
            }
            Err(e) if !declare && soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => {
                Err(RabbitError::ExchangeMissing {
                    exchange: self.config.exchange.clone(),
                    url: self.url.clone(),
                })
            }
            Err(e) => Err(failed(e)),
        }
    }

    /// Turns a failed publish into a classified [`PublishError`].
    async fn classify(&self, err: lapin::Error, what: &str) -> PublishError {
        let transient = |reason: String| PublishError::transient(format!("{what}: {reason}"));
        let error = match err.kind() {
            ErrorKind::ProtocolError(amqp) => match amqp.kind() {
                // The broker refused this message (e.g. larger than its
                // max_message_size): it never will take it.
                AMQPErrorKind::Soft(
                    AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::CONTENTTOOLARGE,
                ) => PublishError::permanent(format!(
                    "{what}: the broker rejected the message: {}",
                    amqp.get_message()
                )),
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => {
                    if self.config.declare_exchange {
                        // Deleted under us: declare it again for the retry.
                        if let Ok(link) = self.link().await {
                            let bound = self.config.connect_timeout;
                            let redeclared =
                                tokio::time::timeout(bound, self.ensure_exchange(&link.connection))
                                    .await;
                            tracing::info!(exchange = %self.exchange, ok = matches!(redeclared, Ok(Ok(()))), "declared the RabbitMQ exchange again");
                        }
                    }
                    transient(format!("the exchange is missing: {}", amqp.get_message()))
                }
                AMQPErrorKind::Soft(_) => transient(format!(
                    "the broker closed the channel: {}",
                    amqp.get_message()
                )),
                AMQPErrorKind::Hard(_) => transient(format!(
                    "the broker closed the connection: {}",
                    amqp.get_message()
                )),
            },
            _ => transient(format!(
                "the connection to RabbitMQ failed: {}",
                describe_lapin(&err)
            )),
        };
        error.with_source(err)
    }

    fn returned(&self, returned: &BasicReturnMessage, what: &str) -> PublishError {
        let routing_key = returned.delivery.routing_key.as_str();
        let reason = if self.exchange.as_str().is_empty() {
            format!("no queue is named {routing_key:?} (the default exchange routes by queue name)")
        } else {
            format!(
                "no queue is bound for routing key {routing_key:?} on exchange {:?}",
                self.exchange.as_str()
            )
        };
        PublishError::permanent(format!(
            "{what}: {reason} (the broker returned it: {} {})",
            returned.reply_code, returned.reply_text
        ))
    }
}

impl Publisher for RabbitPublisher {
    async fn publish(&self, record: &OutboxRecord) -> Result<(), PublishError> {
        let inner = &*self.inner;
        let event = &record.event;
        let id = event.id();
        let routing_key = inner
            .template
            .render(event)
            .map_err(|e| PublishError::permanent(format!("event {id} cannot be published: {e}")))?;
        let what = format!(
            "cannot publish event {id} to exchange {:?} with routing key {routing_key:?}",
            inner.exchange.as_str()
        );
        let properties = message::encode(event)
            .map_err(|e| PublishError::permanent(format!("{what}: {e}")).with_source(e))?;
        let key = ShortString::try_new(routing_key.clone())
            .map_err(|e| PublishError::permanent(format!("{what}: {e}")))?;
        let link = inner.link().await.map_err(|e| prefixed(e, &what))?;
        let body = event.data().get().as_bytes();
        let timeout = inner.config.confirm_timeout;
        let outcome = tokio::time::timeout(
            timeout,
            link.publish(&inner.exchange, key, body, properties),
        )
        .await;
        let result = match outcome {
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)))) => Err(inner.returned(&returned, &what)),
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::transient(format!(
                "{what}: the broker nacked the message (it could not take it now)"
            ))),
            Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::transient(format!(
                "{what}: the channel was not in confirm mode"
            ))),
            Ok(Err(e)) => Err(inner.classify(e, &what).await),
            Err(_) => {
                link.poison(&format!("no publisher confirm within {timeout:?}"));
                Err(PublishError::transient(format!(
                    "{what}: no publisher confirm within {timeout:?} (the connection is dropped \
                     and made anew)"
                )))
            }
        };
        match &result {
            Ok(()) => tracing::debug!(
                event_id = %id,
                sequence = record.sequence,
                exchange = %inner.exchange,
                routing_key = %routing_key,
                "event published"
            ),
            Err(error) => tracing::debug!(
                event_id = %id,
                transient = error.is_transient(),
                error = %error.full_message(),
                "publish failed"
            ),
        }
        result
    }

    async fn ready(&self) -> Result<(), PublishError> {
        let inner = &*self.inner;
        let link = inner.link().await?;
        if link.connection.status().blocked() {
            tracing::debug!(url = %inner.url, "RabbitMQ blocks publishing");
            return Err(PublishError::transient(format!(
                "RabbitMQ at {} blocks publishing for now (a memory or disk alarm)",
                inner.url
            )));
        }
        Ok(())
    }
}

/// `err` with `what` in front of its message.
fn prefixed(err: PublishError, what: &str) -> PublishError {
    let message = format!("{what}: {err}");
    if err.is_transient() {
        PublishError::transient(message).with_source(err)
    } else {
        PublishError::permanent(message).with_source(err)
    }
}
