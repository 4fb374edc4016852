//! [`MqttPublisher`]: publishes outbox events to an MQTT 5 broker.
//!
//! rumqttc 0.25 has no per-publish acknowledgement API: its event loop
//! assigns packet ids itself and reports them as events. A background task
//! (the [`Driver`]) polls the event loop and matches acknowledgements to
//! publishes:
//!
//! - a publish enters the client's request channel and the `queued` list in
//!   one step under a lock, so both keep the same order;
//! - the event loop takes requests in channel order, so each
//!   `Outgoing::Publish(pkid)` event (or `Outgoing::AwaitAck(pkid)` when the
//!   id is still taken) belongs to the first queued publish;
//! - PUBACK (QoS 1) or PUBCOMP (QoS 2) for that id completes it, and a
//!   refusal (an error reason code in PUBACK/PUBREC/PUBCOMP) fails it.
//!
//! Sessions are clean (MQTT 5 `clean_start`, no session expiry): when the
//! connection is lost, nothing in flight will ever be acknowledged. The
//! driver then fails every publish rumqttc held (in flight, or drained from
//! the channel into its resend queue, which it empties) with a transient
//! error at once, and reconnects with backoff. Publishes submitted after the
//! loss stay in the channel and go out on the next connection.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use proclaim_core::{CancellationToken, OutboxRecord, PublishError, Publisher};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, Publish,
    PublishProperties,
};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions, Request};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::time::Instant;
use uuid::Uuid;

use crate::connection::{ceil_secs, describe, poll};
use crate::encode::encode;
use crate::{MqttConfig, MqttError, TopicTemplate};

/// Largest packet MQTT can carry: the fixed header's length field encodes up
/// to 268,435,455 bytes after a header of at most 5 bytes.
const MQTT_MAX_PACKET: usize = 268_435_455 + 5;
/// First delay before reconnecting after a failure.
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest delay between reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connection that lived this long resets the backoff when it is lost; one
/// that died sooner (accepted, then dropped at once) keeps backing off.
const STABLE_CONNECTION: Duration = Duration::from_secs(1);
/// How long a dropped publisher waits to send its DISCONNECT.
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);

/// What the broker told us at CONNACK that bounds a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    /// The broker's maximum packet size, if it set one.
    max_packet_size: Option<u32>,
    /// The highest QoS the broker accepts.
    max_qos: u8,
}

impl Limits {
    fn of(connack: &ConnAck) -> Self {
        let props = connack.properties.as_ref();
        Limits {
            max_packet_size: props.and_then(|p| p.max_packet_size),
            max_qos: props.and_then(|p| p.max_qos).unwrap_or(2),
        }
    }
}

/// The connection as publishes see it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Link {
    Connected(Limits),
    Down { reason: String },
    Closed,
}

/// Why a submitted publish did not complete.
#[derive(Debug)]
enum Failure {
    /// The broker answered with an error reason code.
    Refused { reason: String, permanent: bool },
    /// The connection was lost before the acknowledgement.
    ConnectionLost(String),
    /// The publisher was dropped.
    Closed,
}

type Outcome = Result<(), Failure>;

/// A submitted publish awaiting its acknowledgement. Its permit bounds how
/// many there are; it is released when the entry is removed (acknowledged,
/// refused, or lost with the connection), not when the publish gives up, as
/// rumqttc still holds the message until then.
struct Waiter {
    event_id: Uuid,
    tx: oneshot::Sender<Outcome>,
    _permit: OwnedSemaphorePermit,
}

impl Waiter {
    fn finish(self, outcome: Outcome) {
        // The publish may have given up (timed out, or been cancelled).
        let _ = self.tx.send(outcome);
    }
}

/// Publishes whose acknowledgement is awaited.
#[derive(Default)]
struct Tracking {
    /// Submitted, packet id not known yet, in request-channel order.
    queued: VecDeque<Waiter>,
    /// Sent, by packet id.
    inflight: HashMap<u16, Waiter>,
    /// Taken from the channel, but its packet id was still in use
    /// (rumqttc's "collision"): sent once that id is acknowledged.
    collided: Option<(u16, Waiter)>,
}

impl Tracking {
    /// rumqttc sent the next queued publish (or a collided one) as `pkid`.
    fn sent(&mut self, pkid: u16) {
        let waiter = match self.collided.take_if(|(id, _)| *id == pkid) {
            Some((_, waiter)) => waiter,
            None => match self.queued.pop_front() {
                Some(waiter) => waiter,
                None => {
                    tracing::warn!(pkid, "MQTT publish sent that this publisher did not submit");
                    return;
                }
            },
        };
        if let Some(old) = self.inflight.insert(pkid, waiter) {
            // rumqttc reuses an id only once it is acknowledged: not expected.
            tracing::warn!(pkid, event_id = %old.event_id, "MQTT packet id reused before its ack");
            old.finish(Err(Failure::ConnectionLost(
                "its packet id was reused before the broker acknowledged it".into(),
            )));
        }
    }

    /// rumqttc took the next queued publish but must wait for `pkid` to be
    /// acknowledged before it can send it.
    fn collided(&mut self, pkid: u16) {
        if let Some(waiter) = self.queued.pop_front() {
            self.collided = Some((pkid, waiter));
        }
    }

    fn finish(&mut self, pkid: u16, outcome: Outcome) {
        match self.inflight.remove(&pkid) {
            Some(waiter) => {
                tracing::trace!(pkid, event_id = %waiter.event_id, ok = outcome.is_ok(), "MQTT ack");
                waiter.finish(outcome);
            }
            None => tracing::debug!(pkid, "MQTT ack for no awaited publish"),
        }
    }

    /// The connection is gone: everything sent, and the first `drained`
    /// queued publishes (which rumqttc took from its channel and dropped),
    /// will never be acknowledged. Returns how many publishes failed.
    fn lost(&mut self, drained: usize, reason: &str) -> usize {
        let mut failed = 0;
        let fail = |w: Waiter| w.finish(Err(Failure::ConnectionLost(reason.to_owned())));
        for (_, waiter) in self.inflight.drain() {
            fail(waiter);
            failed += 1;
        }
        if let Some((_, waiter)) = self.collided.take() {
            fail(waiter);
            failed += 1;
        }
        for _ in 0..drained {
            match self.queued.pop_front() {
                Some(waiter) => {
                    fail(waiter);
                    failed += 1;
                }
                None => break,
            }
        }
        failed
    }

    fn close(&mut self) {
        let all = self
            .inflight
            .drain()
            .map(|(_, w)| w)
            .chain(self.collided.take().map(|(_, w)| w))
            .chain(self.queued.drain(..));
        for waiter in all {
            waiter.finish(Err(Failure::Closed));
        }
    }
}

/// State shared by the publisher and its driver task.
struct Shared {
    tracking: Mutex<Tracking>,
    /// Set by a publish whose ack did not come in time; the driver then
    /// replaces the connection.
    reset_requested: AtomicBool,
    reset: Notify,
}

impl Shared {
    fn tracking(&self) -> MutexGuard<'_, Tracking> {
        // Nothing panics while holding the lock; if something did, the
        // bookkeeping is still consistent enough to go on.
        self.tracking.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Publishes outbox events to an MQTT 5 broker.
///
/// Each event goes to the topic rendered from
/// [`MqttConfig::topic_template`], with the configured QoS (1 or 2), retain
/// off, as a CloudEvent in the configured [`ContentMode`](crate::ContentMode).
/// [`Publisher::publish`] returns `Ok` only once the broker has acknowledged
/// the message: PUBACK for QoS 1, PUBCOMP for QoS 2.
///
/// Errors are classified for the relay: an outage (no connection within
/// [`MqttConfig::connect_timeout`], the connection lost before the
/// acknowledgement, no acknowledgement within [`MqttConfig::ack_timeout`], a
/// broker refusing for now) is transient; an event the broker can never
/// accept (its topic cannot be formed, it is larger than the broker's
/// maximum packet size, the broker calls its topic or payload invalid) is
/// permanent.
///
/// A background task drives the connection and reconnects after any loss,
/// backing off from 100 ms to 5 s; [`Publisher::ready`] reports whether it
/// is connected. The publisher is cheap to clone; clones share one
/// connection, which is closed (with a DISCONNECT) when the last clone is
/// dropped.
///
/// Note that an MQTT broker keeps a message only for subscribers that are
/// connected, or that have a persistent session with a subscription
/// (`clean_start = false` and a session expiry): the acknowledgement means
/// the broker took the message, not that anyone will read it.
#[derive(Clone)]
pub struct MqttPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    client: AsyncClient,
    shared: Arc<Shared>,
    link: watch::Receiver<Link>,
    permits: Arc<Semaphore>,
    config: MqttConfig,
    template: TopicTemplate,
    qos: QoS,
    url: String,
    client_id: String,
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl fmt::Debug for MqttPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttPublisher")
            .field("url", &self.inner.url)
            .field("client_id", &self.inner.client_id)
            .field("topic_template", &self.inner.template.as_str())
            .field("qos", &self.inner.config.qos)
            .field("mode", &self.inner.config.mode)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl MqttPublisher {
    /// Connects to [`MqttConfig::url`] and starts the task that drives the
    /// connection.
    ///
    /// The first connection is tried once and fails after
    /// [`MqttConfig::connect_timeout`] at most; once connected, the publisher
    /// reconnects by itself after any disconnection. Must be called within a
    /// Tokio runtime.
    pub async fn connect(config: MqttConfig) -> Result<Self, MqttError> {
        config.validate()?;
        let template = config.template()?;
        let broker = config.broker()?;
        let url = config.redacted_url();
        let qos = if config.qos == 2 {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        };
        let client_id = config.client_id.clone().unwrap_or_else(|| {
            let suffix = Uuid::new_v4().simple().to_string();
            format!("proclaim-{}", &suffix[..12])
        });
        // Each queued publish holds a permit, so the channel never fills.
        let capacity = usize::from(config.max_inflight) + 4;
        let mut options = MqttOptions::new(client_id.clone(), broker.host, broker.port);
        options
            .set_keep_alive(config.keep_alive)
            .set_clean_start(true)
            .set_connection_timeout(ceil_secs(config.connect_timeout))
            .set_outgoing_inflight_upper_limit(config.max_inflight)
            .set_request_channel_capacity(capacity);
        if let Some(user) = broker.username {
            options.set_credentials(user, broker.password.unwrap_or_default());
        }
        let (client, mut eventloop) = AsyncClient::new(options, capacity);

        let connect_timeout = config.connect_timeout;
        let connack = match tokio::time::timeout(connect_timeout, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(connack)))) => connack,
            Ok(Ok(other)) => {
                return Err(MqttError::Connect {
                    url,
                    reason: format!("expected CONNACK, got {other:?}"),
                    source: None,
                });
            }
            Ok(Err(e)) => {
                return Err(MqttError::Connect {
                    url,
                    reason: describe(&e, connect_timeout),
                    source: Some(e.into()),
                });
            }
            Err(_) => {
                return Err(MqttError::Connect {
                    url,
                    reason: format!("timed out after {connect_timeout:?}"),
                    source: None,
                });
            }
        };
        let limits = Limits::of(&connack);
        if limits.max_qos < config.qos {
            let _ = client.try_disconnect();
            let _ = tokio::time::timeout(DISCONNECT_GRACE, eventloop.poll()).await;
            return Err(MqttError::QosNotSupported {
                url,
                broker_max: limits.max_qos,
                configured: config.qos,
            });
        }
        tracing::info!(url = %url, client_id = %client_id, "connected to MQTT broker");

        let (link_tx, link) = watch::channel(Link::Connected(limits));
        let shared = Arc::new(Shared {
            tracking: Mutex::new(Tracking::default()),
            reset_requested: AtomicBool::new(false),
            reset: Notify::new(),
        });
        let stop = CancellationToken::new();
        let driver = Driver {
            eventloop,
            client: client.clone(),
            shared: shared.clone(),
            link: link_tx,
            stop: stop.clone(),
            url: url.clone(),
            connect_timeout,
            connected_at: Some(std::time::Instant::now()),
            backoff: BACKOFF_INITIAL,
        };
        tokio::spawn(driver.run());
        Ok(MqttPublisher {
            inner: Arc::new(Inner {
                client,
                shared,
                link,
                permits: Arc::new(Semaphore::new(usize::from(config.max_inflight))),
                config,
                template,
                qos,
                url,
                client_id,
                stop,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MqttConfig {
        &self.inner.config
    }

    /// The MQTT client identifier in use (generated unless configured).
    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// Whether the connection to the broker is up now.
    pub fn is_connected(&self) -> bool {
        matches!(*self.inner.link.borrow(), Link::Connected(_))
    }
}

impl Inner {
    /// Waits at most `connect_timeout` for a connection.
    async fn connected(&self, what: &str) -> Result<Limits, PublishError> {
        let mut link = self.link.clone();
        let waited = tokio::time::timeout(self.config.connect_timeout, async move {
            link.wait_for(|l| !matches!(l, Link::Down { .. }))
                .await
                .map(|state| state.clone())
        })
        .await;
        match waited {
            Ok(Ok(Link::Connected(limits))) => Ok(limits),
            Ok(_) => Err(PublishError::transient(format!(
                "{what}: the publisher is closed"
            ))),
            Err(_) => {
                let reason = match &*self.link.borrow() {
                    Link::Down { reason } => reason.clone(),
                    other => format!("{other:?}"),
                };
                Err(PublishError::transient(format!(
                    "{what}: not connected to the MQTT broker at {} within {:?} ({reason})",
                    self.url, self.config.connect_timeout
                )))
            }
        }
    }

    /// Hands the publish to the event loop and starts awaiting its ack.
    fn submit(
        &self,
        topic: String,
        payload: Bytes,
        properties: PublishProperties,
        event_id: Uuid,
        permit: OwnedSemaphorePermit,
    ) -> Result<oneshot::Receiver<Outcome>, String> {
        let (tx, rx) = oneshot::channel();
        // Under the lock, so that the queue has the channel's order.
        let mut tracking = self.shared.tracking();
        self.client
            .try_publish_with_properties(topic, self.qos, false, payload, properties)
            .map_err(|_| {
                "the MQTT client refused the request (its event loop is full or stopped)".to_owned()
            })?;
        tracking.queued.push_back(Waiter {
            event_id,
            tx,
            _permit: permit,
        });
        Ok(rx)
    }

    fn request_reset(&self) {
        self.shared.reset_requested.store(true, Ordering::SeqCst);
        self.shared.reset.notify_one();
    }

    fn ack_name(&self) -> &'static str {
        if self.qos == QoS::ExactlyOnce {
            "PUBCOMP"
        } else {
            "PUBACK"
        }
    }
}

impl Publisher for MqttPublisher {
    async fn publish(&self, record: &OutboxRecord) -> Result<(), PublishError> {
        let inner = &*self.inner;
        let event = &record.event;
        let id = event.id();
        let topic = inner
            .template
            .render(event)
            .map_err(|e| PublishError::permanent(format!("event {id} cannot be published: {e}")))?;
        let what = format!("cannot publish event {id} to {topic}");
        let (payload, properties) = encode(event, inner.config.mode);

        let limits = inner.connected(&what).await?;
        if limits.max_qos < inner.config.qos {
            return Err(PublishError::transient(format!(
                "{what}: the broker accepts QoS {} at most, but qos is {}",
                limits.max_qos, inner.config.qos
            )));
        }
        let size = packet_size(&topic, inner.qos, &payload, &properties);
        let max = limits
            .max_packet_size
            .and_then(|m| usize::try_from(m).ok())
            .unwrap_or(MQTT_MAX_PACKET);
        if size > max {
            return Err(PublishError::permanent(format!(
                "{what}: the message ({size} bytes) is larger than the broker's maximum packet \
                 size of {max} bytes"
            )));
        }

        let ack_timeout = inner.config.ack_timeout;
        let deadline = Instant::now() + ack_timeout;
        let permit =
            match tokio::time::timeout_at(deadline, inner.permits.clone().acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) => {
                    return Err(PublishError::transient(format!(
                        "{what}: the publisher is closed"
                    )));
                }
                Err(_) => {
                    inner.request_reset();
                    return Err(PublishError::transient(format!(
                        "{what}: {} publishes are awaiting their acknowledgement and none was \
                         acknowledged within {ack_timeout:?}",
                        inner.config.max_inflight
                    )));
                }
            };
        let rx = inner
            .submit(topic.clone(), payload, properties, id, permit)
            .map_err(|reason| PublishError::transient(format!("{what}: {reason}")))?;

        let result = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(Failure::Refused { reason, permanent }))) => {
                let message = format!("{what}: the broker refused it: {reason}");
                Err(if permanent {
                    PublishError::permanent(message)
                } else {
                    PublishError::transient(message)
                })
            }
            Ok(Ok(Err(Failure::ConnectionLost(reason)))) => Err(PublishError::transient(format!(
                "{what}: the connection to the MQTT broker was lost before the {} ({reason})",
                inner.ack_name()
            ))),
            Ok(Ok(Err(Failure::Closed)) | Err(_)) => Err(PublishError::transient(format!(
                "{what}: the publisher is closed"
            ))),
            Err(_) => {
                inner.request_reset();
                Err(PublishError::transient(format!(
                    "{what}: no {} within {ack_timeout:?}",
                    inner.ack_name()
                )))
            }
        };
        match &result {
            Ok(()) => tracing::debug!(
                event_id = %id,
                sequence = record.sequence,
                topic = %topic,
                "event published"
            ),
            Err(e) => tracing::debug!(
                event_id = %id,
                transient = e.is_transient(),
                error = %e.full_message(),
                "publish failed"
            ),
        }
        result
    }

    async fn ready(&self) -> Result<(), PublishError> {
        let link = self.inner.link.borrow().clone();
        match link {
            Link::Connected(_) => Ok(()),
            Link::Down { reason } => {
                tracing::debug!(url = %self.inner.url, %reason, "MQTT broker not ready");
                Err(PublishError::transient(format!(
                    "not connected to the MQTT broker at {}: {reason}",
                    self.inner.url
                )))
            }
            Link::Closed => Err(PublishError::transient("the MQTT publisher is closed")),
        }
    }
}

/// The background task: polls the event loop, completes publishes,
/// reconnects.
struct Driver {
    eventloop: EventLoop,
    client: AsyncClient,
    shared: Arc<Shared>,
    link: watch::Sender<Link>,
    stop: CancellationToken,
    url: String,
    connect_timeout: Duration,
    /// When the current connection came up; `None` while disconnected.
    connected_at: Option<std::time::Instant>,
    backoff: Duration,
}

impl Driver {
    async fn run(mut self) {
        loop {
            let connected = self.connected_at.is_some();
            tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                () = self.shared.reset.notified(), if connected => {
                    if self.shared.reset_requested.swap(false, Ordering::SeqCst) {
                        tracing::warn!(
                            url = %self.url,
                            "MQTT broker did not acknowledge in time: replacing the connection"
                        );
                        // Drops the connection; what was in flight moves to
                        // rumqttc's resend queue, which `lost` empties.
                        self.eventloop.clean();
                        self.lost("the broker did not acknowledge in time".into());
                    }
                }
                polled = poll(&mut self.eventloop, connected, self.connect_timeout) => {
                    match polled {
                        Ok(event) => self.handle(event),
                        Err(reason) => {
                            self.lost(reason);
                            let delay = self.backoff;
                            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                            tokio::select! {
                                () = self.stop.cancelled() => break,
                                () = tokio::time::sleep(delay) => {}
                            }
                        }
                    }
                }
            }
        }
        self.shutdown().await;
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Incoming(Packet::ConnAck(connack)) => {
                self.connected_at = Some(std::time::Instant::now());
                self.shared.reset_requested.store(false, Ordering::SeqCst);
                self.link
                    .send_replace(Link::Connected(Limits::of(&connack)));
                tracing::info!(url = %self.url, "reconnected to MQTT broker");
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => self.shared.tracking().sent(pkid),
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => self.shared.tracking().collided(pkid),
            Event::Incoming(Packet::PubAck(ack)) => {
                let outcome = puback_outcome(&ack);
                self.shared.tracking().finish(ack.pkid, outcome);
            }
            Event::Incoming(Packet::PubRec(rec)) => {
                // Success: the PUBCOMP completes it. A refusal ends it here
                // (rumqttc sends no PUBREL then).
                if let Err(failure) = pubrec_outcome(&rec) {
                    self.shared.tracking().finish(rec.pkid, Err(failure));
                }
            }
            Event::Incoming(Packet::PubComp(comp)) => {
                let outcome = pubcomp_outcome(&comp);
                self.shared.tracking().finish(comp.pkid, outcome);
            }
            Event::Incoming(Packet::Disconnect(disconnect)) => {
                tracing::debug!(url = %self.url, ?disconnect, "MQTT broker sent DISCONNECT");
            }
            _ => {}
        }
    }

    /// The connection failed (or was dropped): settles every publish that
    /// can no longer be acknowledged and reports the outage.
    fn lost(&mut self, reason: String) {
        // Events rumqttc recorded before the failure are real (acks it
        // processed, ids it assigned): apply them first.
        let buffered: Vec<Event> = self.eventloop.state.events.drain(..).collect();
        for event in buffered {
            self.handle(event);
        }
        if let Some(at) = self.connected_at.take()
            && at.elapsed() >= STABLE_CONNECTION
        {
            self.backoff = BACKOFF_INITIAL;
        }
        // With a clean session nothing is resent: drop rumqttc's resend queue
        // (and a collided publish, which its `clean` keeps), and fail what
        // they held. Publishes with packet id 0 came from the request
        // channel, i.e. they are the first queued ones.
        let pending = std::mem::take(&mut self.eventloop.pending);
        let drained = pending
            .iter()
            .filter(|r| matches!(r, Request::Publish(p) if p.pkid == 0))
            .count();
        self.eventloop.state.collision = None;
        let failed = self.shared.tracking().lost(drained, &reason);
        self.shared.reset_requested.store(false, Ordering::SeqCst);
        let was_up = matches!(*self.link.borrow(), Link::Connected(_));
        self.link.send_replace(Link::Down {
            reason: reason.clone(),
        });
        if was_up {
            tracing::warn!(url = %self.url, %reason, failed, "lost the MQTT connection; reconnecting");
        } else {
            tracing::debug!(url = %self.url, %reason, retry_in = ?self.backoff, "cannot reconnect to MQTT broker");
        }
    }

    async fn shutdown(mut self) {
        self.link.send_replace(Link::Closed);
        self.shared.tracking().close();
        if self.connected_at.is_some() && self.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
                loop {
                    match self.eventloop.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
        tracing::debug!(url = %self.url, "MQTT publisher closed");
    }
}

/// The size of the PUBLISH packet as sent.
fn packet_size(topic: &str, qos: QoS, payload: &Bytes, properties: &PublishProperties) -> usize {
    let mut publish = Publish::new(topic, qos, payload.clone(), Some(properties.clone()));
    publish.pkid = 1;
    publish.size()
}

fn puback_outcome(ack: &PubAck) -> Outcome {
    use PubAckReason as R;
    let reason_string = ack
        .properties
        .as_ref()
        .and_then(|p| p.reason_string.clone());
    let permanent = match ack.reason {
        R::Success | R::NoMatchingSubscribers => return Ok(()),
        R::TopicNameInvalid | R::PayloadFormatInvalid => true,
        R::UnspecifiedError
        | R::ImplementationSpecificError
        | R::NotAuthorized
        | R::PacketIdentifierInUse
        | R::QuotaExceeded => false,
    };
    Err(refusal("PUBACK", &ack.reason, reason_string, permanent))
}

fn pubrec_outcome(rec: &PubRec) -> Outcome {
    use PubRecReason as R;
    let reason_string = rec
        .properties
        .as_ref()
        .and_then(|p| p.reason_string.clone());
    let permanent = match rec.reason {
        R::Success | R::NoMatchingSubscribers => return Ok(()),
        R::TopicNameInvalid | R::PayloadFormatInvalid => true,
        R::UnspecifiedError
        | R::ImplementationSpecificError
        | R::NotAuthorized
        | R::PacketIdentifierInUse
        | R::QuotaExceeded => false,
    };
    Err(refusal("PUBREC", &rec.reason, reason_string, permanent))
}

fn pubcomp_outcome(comp: &PubComp) -> Outcome {
    let reason_string = comp
        .properties
        .as_ref()
        .and_then(|p| p.reason_string.clone());
    match comp.reason {
        PubCompReason::Success => Ok(()),
        PubCompReason::PacketIdentifierNotFound => {
            Err(refusal("PUBCOMP", &comp.reason, reason_string, false))
        }
    }
}

fn refusal(
    packet: &str,
    code: &dyn fmt::Debug,
    reason_string: Option<String>,
    permanent: bool,
) -> Failure {
    let reason = match reason_string {
        Some(text) => format!("{packet} {code:?} ({text})"),
        None => format!("{packet} {code:?}"),
    };
    Failure::Refused { reason, permanent }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_connect_timeouts_up_to_seconds() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(500)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
        assert_eq!(ceil_secs(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn classifies_reason_codes() {
        let ack = |reason| PubAck {
            pkid: 1,
            reason,
            properties: None,
        };
        assert!(puback_outcome(&ack(PubAckReason::Success)).is_ok());
        assert!(puback_outcome(&ack(PubAckReason::NoMatchingSubscribers)).is_ok());
        for (reason, permanent) in [
            (PubAckReason::TopicNameInvalid, true),
            (PubAckReason::PayloadFormatInvalid, true),
            (PubAckReason::QuotaExceeded, false),
            (PubAckReason::NotAuthorized, false),
            (PubAckReason::UnspecifiedError, false),
        ] {
            match puback_outcome(&ack(reason)) {
                Err(Failure::Refused {
                    permanent: p,
                    reason: text,
                }) => {
                    assert_eq!(p, permanent, "{reason:?}");
                    assert!(text.starts_with("PUBACK "), "{text}");
                }
                other => panic!("{reason:?}: {other:?}"),
            }
        }
        let comp = PubComp {
            pkid: 1,
            reason: PubCompReason::PacketIdentifierNotFound,
            properties: None,
        };
        assert!(matches!(
            pubcomp_outcome(&comp),
            Err(Failure::Refused {
                permanent: false,
                ..
            })
        ));
    }

    fn waiter(permits: &Arc<Semaphore>) -> (Waiter, oneshot::Receiver<Outcome>) {
        let (tx, rx) = oneshot::channel();
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(e) => panic!("no permit: {e}"),
        };
        (
            Waiter {
                event_id: Uuid::now_v7(),
                tx,
                _permit: permit,
            },
            rx,
        )
    }

    #[test]
    fn matches_acks_to_publishes_in_order() {
        let permits = Arc::new(Semaphore::new(4));
        let mut t = Tracking::default();
        let (a, mut ra) = waiter(&permits);
        let (b, mut rb) = waiter(&permits);
        let (c, mut rc) = waiter(&permits);
        let (d, mut rd) = waiter(&permits);
        t.queued.extend([a, b, c, d]);
        assert_eq!(permits.available_permits(), 0);

        t.sent(7); // a
        t.collided(7); // b waits for 7
        t.finish(7, Ok(())); // a acked
        assert!(matches!(ra.try_recv(), Ok(Ok(()))));
        t.sent(7); // b, sent once 7 was free
        t.sent(8); // c
        t.finish(8, Err(Failure::Closed));
        assert!(matches!(rc.try_recv(), Ok(Err(Failure::Closed))));
        assert!(rb.try_recv().is_err(), "b is still awaited");
        assert_eq!(permits.available_permits(), 2);

        // The connection drops with d drained from the channel.
        assert_eq!(t.lost(1, "reset"), 2);
        assert!(matches!(rb.try_recv(), Ok(Err(Failure::ConnectionLost(_)))));
        assert!(matches!(rd.try_recv(), Ok(Err(Failure::ConnectionLost(_)))));
        assert_eq!(permits.available_permits(), 4);
        assert!(t.queued.is_empty() && t.inflight.is_empty() && t.collided.is_none());
    }

    #[test]
    fn publishes_submitted_after_a_loss_stay_queued() {
        let permits = Arc::new(Semaphore::new(2));
        let mut t = Tracking::default();
        let (a, mut ra) = waiter(&permits);
        let (b, mut rb) = waiter(&permits);
        t.queued.extend([a, b]);
        // Only a was in the channel when rumqttc drained it.
        assert_eq!(t.lost(1, "reset"), 1);
        assert!(matches!(ra.try_recv(), Ok(Err(Failure::ConnectionLost(_)))));
        assert!(rb.try_recv().is_err());
        t.sent(1);
        t.finish(1, Ok(()));
        assert!(matches!(rb.try_recv(), Ok(Ok(()))));
    }
}
