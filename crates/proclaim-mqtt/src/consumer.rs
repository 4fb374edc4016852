//! [`MqttSource`]: the consumer runtime
//! ([`proclaim_core::consumer::Consumer`]) reads the events an
//! [`MqttPublisher`](crate::MqttPublisher) published, through an MQTT 5
//! shared subscription per consumer group.
//!
//! One MQTT 5 shared subscription (`$share/<group>/<filter>`) per consumer
//! group, a persistent session per instance, manual acks sent only once the
//! runtime acks (after the handler committed). The contract, the order and
//! the broker's limits are documented on [`MqttSource`]; the parts that work
//! around rumqttc 0.25 are:
//!
//! - acks are bound to the connection a message arrived on (a generation
//!   counter checked under the lock the driver takes when it marks the
//!   connection lost, and rumqttc's queued PUBACK/PUBREC dropped after a
//!   loss), since a packet id may stand for another message on the next
//!   connection;
//! - on a resumed QoS 2 session every packet id is marked as awaiting its
//!   PUBREL (`Driver::accept_any_pubrel`), as rumqttc would otherwise drop
//!   the connection over the PUBREL the broker resends.
//!
//! ```no_run
//! use proclaim_core::consumer::{Consumer, Context, HandlerError};
//! use proclaim_mqtt::{MqttSource, MqttSourceConfig};
//!
//! # async fn demo(parked: impl proclaim_core::inbox::ParkedEvents) -> Result<(), Box<dyn std::error::Error>> {
//! // The group's name: the share name at the broker, and the name the
//! // consumer records its events under in the inbox.
//! let group = "volunteer-thank-you";
//! let config = MqttSourceConfig::new(group, "pod-0")
//!     .with_url("mqtt://mqtt.internal:1883")
//!     .with_filter("campaign/#");
//! let source = MqttSource::connect(config).await?;
//! let handle = Consumer::new(group)
//!     .on_event("DonorSecured", |cx: Context<()>| async move {
//!         // Open the inbox transaction, write the note, commit.
//!         tracing::info!(id = %cx.event.id(), "thank you!");
//!         Ok::<_, HandlerError>(())
//!     })
//!     .park_into(parked)
//!     .spawn(source)?;
//! // … on SIGTERM:
//! let report = handle.shutdown().await;
//! # let _ = report;
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proclaim_core::consumer::{Acker, Incoming, Source, SourceError};
use proclaim_core::{Backoff, CancellationToken, ConfigError, redact_url};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnAck, Filter, Packet, Publish, SubAck, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Request};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::connection::{ceil_secs, describe, poll};
use crate::url::{self, BrokerUrl};
use crate::{MqttConfig, MqttError, TopicTemplate, decode_publish};

/// Largest packet MQTT can carry: a length of up to 268,435,455 bytes after
/// a fixed header of at most 5 bytes.
const MQTT_MAX_PACKET: u32 = 268_435_455 + 5;
/// The smallest [`MqttSourceConfig::max_packet_size`] accepted.
const MIN_PACKET_SIZE: u32 = 1024;
/// Longest string MQTT carries (a UTF-8 string with a 16-bit length).
const MAX_STRING_LEN: usize = 65_535;
/// A connection that lived this long resets the reconnection backoff when
/// it is lost; one that died sooner keeps backing off.
const STABLE_CONNECTION: Duration = Duration::from_secs(1);
/// How long a dropped source waits to send its acknowledgements and its
/// DISCONNECT.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);
/// Room in rumqttc's request channel beyond one ack per message in flight.
const REQUEST_HEADROOM: usize = 32;
/// Why an ack fails once the source is dropped.
const SOURCE_CLOSED: &str = "the source is closed; the broker delivers the message again at \
                             the next connection of this client id";
/// Why an ack fails when the connection drops before it is written.
const LOST_BEFORE_ACK: &str = "the connection was lost before the ack was written; the broker \
                               delivers the message again when the session resumes";

/// Settings of an [`MqttSource`].
///
/// [`MqttSourceConfig::new`] takes the two settings without a default, the
/// consumer group and the instance name; the others have defaults that
/// match the default [`MqttConfig`] of the publisher (its broker, and the
/// filter `proclaim/#` that covers its topic template `proclaim/{type}`).
///
/// ```
/// use std::time::Duration;
/// use proclaim_mqtt::{MqttConfig, MqttSourceConfig};
///
/// let publisher = MqttConfig::default().with_topic_template("campaign/{type}/{subject}");
/// let config = MqttSourceConfig::new("thank-you-notes", "pod-0")
///     .with_url("mqtt://mqtt.internal:1883")
///     .with_filter_for(&publisher.template()?)
///     .with_session_expiry(Duration::from_secs(3 * 24 * 3600));
/// assert_eq!(config.filters, ["campaign/#"]);
/// assert_eq!(config.client_id(), "thank-you-notes:pod-0");
/// assert_eq!(config.shared_filters(), ["$share/thank-you-notes/campaign/#"]);
/// assert!(config.validate().is_ok());
/// assert!(MqttSourceConfig::new("thank/you", "pod-0").validate().is_err());
/// # Ok::<(), proclaim_core::ConfigError>(())
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSourceConfig {
    /// Broker URL (default `mqtt://127.0.0.1:1883`), as [`MqttConfig::url`]:
    /// `mqtt://[user[:password]@]host[:port]`; credentials are hidden in
    /// every message. Plain TCP only.
    pub url: String,
    /// The consumer group (required): the share name of the subscription
    /// (`$share/<group>/…`). Every group gets every message; the instances
    /// of one group share them. Use the same name for the
    /// [`Consumer`](proclaim_core::consumer::Consumer), so the inbox records
    /// the group's events under it. It may not contain `/`, `+`, `#` (MQTT
    /// forbids them in share names), `:` (it separates the group from the
    /// instance in the client id) or control characters.
    pub group: String,
    /// This instance's name within the group (required unless
    /// [`client_id`](Self::client_id) is set), e.g. the host name or a
    /// StatefulSet ordinal. It must be the same when the instance restarts
    /// — the broker keeps the instance's session under it — and differ
    /// between the running instances of a group.
    pub instance: String,
    /// The MQTT client id. Default (`None`): `<group>:<instance>`. Two
    /// clients with one id take the session from each other.
    pub client_id: Option<String>,
    /// The topic filters to subscribe to (default `proclaim/#`, which covers
    /// the publisher's default topic template; see
    /// [`with_filter_for`](Self::with_filter_for)). MQTT wildcards are
    /// allowed (`+` for one level, `#` for the rest); a filter may not start
    /// with `$`. Each becomes `$share/<group>/<filter>`.
    pub filters: Vec<String>,
    /// Quality of service of the subscription: 1 (the default) or 2. A
    /// message arrives with the lower of its publish QoS and this one. QoS 2
    /// adds nothing to the inbox's deduplication but a handshake; 0 is
    /// rejected, as QoS 0 messages are not redelivered.
    pub qos: u8,
    /// How long the broker keeps this instance's session — its subscription
    /// and the messages queued for it — after it disconnects (default
    /// 7 days; whole seconds, at most 2³² − 1 s, which means forever). An
    /// instance that does not come back within this time loses the messages
    /// the broker queued for it.
    #[serde(with = "proclaim_core::duration::human")]
    pub session_expiry: Duration,
    /// Most messages the broker sends this instance unacknowledged at once
    /// (MQTT 5 receive maximum, default 64). The broker's own limit also
    /// applies (Mosquitto's `max_inflight_messages`, 20 by default). It
    /// bounds what the instance holds: messages being handled, waiting
    /// behind an earlier one of their subject, or retrying.
    pub receive_maximum: u16,
    /// Largest packet this instance accepts (default: the largest MQTT
    /// allows, 268,435,460 bytes; at least 1,024). The broker does not send
    /// larger messages to this instance at all: MQTT 5 has it discard them
    /// for this session, so they are lost to the group. Lower it only to
    /// bound memory, above the largest event you publish.
    pub max_packet_size: u32,
    /// MQTT keep-alive (default 30 s, 5 s to 65,535 s): a broker that does
    /// not answer a ping within this time again is taken as lost.
    #[serde(with = "proclaim_core::duration::human")]
    pub keep_alive: Duration,
    /// Upper bound of one connection attempt: TCP connect, CONNECT and
    /// CONNACK, and at the first connection the SUBACK (default 5 s).
    #[serde(with = "proclaim_core::duration::human")]
    pub connect_timeout: Duration,
    /// Delays between reconnection attempts after the connection is lost
    /// (default 100 ms doubling to 5 s, jittered).
    pub reconnect_backoff: Backoff,
}

impl Default for MqttSourceConfig {
    /// Settings without a group or an instance (which
    /// [`validate`](Self::validate) requires): use [`MqttSourceConfig::new`].
    fn default() -> Self {
        let publisher = MqttConfig::default();
        let filter = publisher
            .template()
            .map_or_else(|_| "proclaim/#".to_owned(), |t| t.filter());
        MqttSourceConfig {
            url: publisher.url,
            group: String::new(),
            instance: String::new(),
            client_id: None,
            filters: vec![filter],
            qos: 1,
            session_expiry: Duration::from_secs(7 * 24 * 3600),
            receive_maximum: 64,
            max_packet_size: MQTT_MAX_PACKET,
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            reconnect_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
        }
    }
}

/// Shows the URL with its credentials hidden.
impl fmt::Debug for MqttSourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSourceConfig")
            .field("url", &self.redacted_url())
            .field("group", &self.group)
            .field("instance", &self.instance)
            .field("client_id", &self.client_id)
            .field("filters", &self.filters)
            .field("qos", &self.qos)
            .field("session_expiry", &self.session_expiry)
            .field("receive_maximum", &self.receive_maximum)
            .field("max_packet_size", &self.max_packet_size)
            .field("keep_alive", &self.keep_alive)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_backoff", &self.reconnect_backoff)
            .finish()
    }
}

impl MqttSourceConfig {
    /// Instance `instance` of the consumer group `group`, with the other
    /// settings at their defaults.
    ///
    /// ```
    /// let config = proclaim_mqtt::MqttSourceConfig::new("receipts", "worker-1");
    /// assert_eq!(config.filters, ["proclaim/#"]);
    /// assert_eq!(config.qos, 1);
    /// ```
    pub fn new(group: impl Into<String>, instance: impl Into<String>) -> Self {
        MqttSourceConfig {
            group: group.into(),
            instance: instance.into(),
            ..MqttSourceConfig::default()
        }
    }

    /// Sets [`MqttSourceConfig::url`].
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }
    /// Sets [`MqttSourceConfig::group`].
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }
    /// Sets [`MqttSourceConfig::instance`].
    pub fn with_instance(mut self, instance: impl Into<String>) -> Self {
        self.instance = instance.into();
        self
    }
    /// Sets [`MqttSourceConfig::client_id`].
    pub fn with_client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = Some(client_id.into());
        self
    }
    /// Subscribes to `filter` alone (see [`MqttSourceConfig::filters`]).
    pub fn with_filter(mut self, filter: impl Into<String>) -> Self {
        self.filters = vec![filter.into()];
        self
    }
    /// Sets [`MqttSourceConfig::filters`].
    pub fn with_filters<S: Into<String>>(mut self, filters: impl IntoIterator<Item = S>) -> Self {
        self.filters = filters.into_iter().map(Into::into).collect();
        self
    }
    /// Subscribes to the one filter that covers every topic `template`
    /// renders ([`TopicTemplate::filter`]): the events of a publisher using
    /// that template.
    ///
    /// ```
    /// use proclaim_mqtt::{MqttSourceConfig, TopicTemplate};
    ///
    /// let template = TopicTemplate::parse("acme/events/{type}")?;
    /// let config = MqttSourceConfig::new("ledger", "a").with_filter_for(&template);
    /// assert_eq!(config.filters, ["acme/events/#"]);
    /// # Ok::<(), proclaim_core::ConfigError>(())
    /// ```
    pub fn with_filter_for(self, template: &TopicTemplate) -> Self {
        self.with_filter(template.filter())
    }
    /// Sets [`MqttSourceConfig::qos`] (1 or 2).
    pub fn with_qos(mut self, qos: u8) -> Self {
        self.qos = qos;
        self
    }
    /// Sets [`MqttSourceConfig::session_expiry`].
    pub fn with_session_expiry(mut self, expiry: Duration) -> Self {
        self.session_expiry = expiry;
        self
    }
    /// Sets [`MqttSourceConfig::receive_maximum`].
    pub fn with_receive_maximum(mut self, n: u16) -> Self {
        self.receive_maximum = n;
        self
    }
    /// Sets [`MqttSourceConfig::max_packet_size`].
    pub fn with_max_packet_size(mut self, bytes: u32) -> Self {
        self.max_packet_size = bytes;
        self
    }
    /// Sets [`MqttSourceConfig::keep_alive`].
    pub fn with_keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = keep_alive;
        self
    }
    /// Sets [`MqttSourceConfig::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
    /// Sets [`MqttSourceConfig::reconnect_backoff`].
    pub fn with_reconnect_backoff(mut self, backoff: Backoff) -> Self {
        self.reconnect_backoff = backoff;
        self
    }

    /// The MQTT client id: [`client_id`](Self::client_id) if set, otherwise
    /// `<group>:<instance>`.
    pub fn client_id(&self) -> String {
        match &self.client_id {
            Some(id) => id.clone(),
            None => format!("{}:{}", self.group, self.instance),
        }
    }

    /// The filters as subscribed: `$share/<group>/<filter>`.
    pub fn shared_filters(&self) -> Vec<String> {
        self.filters
            .iter()
            .map(|f| format!("$share/{}/{f}", self.group))
            .collect()
    }

    /// [`MqttSourceConfig::url`] with any credentials replaced by `***`.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Checks every setting: a plain `mqtt://` URL, a group usable as a
    /// share name, an instance name or a client id, at least one valid
    /// filter and no repeated one, QoS 1 or 2, a session expiry of 1 s to
    /// 2³² − 1 s, a receive maximum of at least 1, a packet size of at least
    /// 1,024 bytes, a keep-alive of 5 s to 65,535 s, a connect timeout above
    /// zero and a backoff that grows. Messages never show the password.
    ///
    /// ```
    /// use proclaim_mqtt::MqttSourceConfig;
    ///
    /// let err = MqttSourceConfig::new("ledger", "a").with_filter("a/#/b").validate();
    /// assert!(err.unwrap_err().0.contains("'#'"));
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        self.broker()?;
        check_group(&self.group)?;
        match &self.client_id {
            None => {
                if self.instance.trim().is_empty() {
                    return err(
                        "an MQTT source needs an instance name (instance), stable across \
                         restarts and unique within its group, or a client_id"
                            .into(),
                    );
                }
                if self.instance.chars().any(char::is_control) {
                    return err(format!(
                        "instance {:?} contains a control character",
                        self.instance
                    ));
                }
            }
            Some(id) => {
                if id.is_empty() {
                    return err("client_id is empty (leave it out for <group>:<instance>)".into());
                }
                if id.chars().any(char::is_control) {
                    return err(format!("client_id {id:?} contains a control character"));
                }
            }
        }
        if self.client_id().len() > MAX_STRING_LEN {
            return err(format!(
                "the client id is longer than {MAX_STRING_LEN} bytes"
            ));
        }
        if self.filters.is_empty() {
            return err("an MQTT source needs at least one topic filter (filters)".into());
        }
        let mut seen = HashSet::new();
        for filter in &self.filters {
            check_filter(filter).map_err(|reason| {
                ConfigError(format!(
                    "topic filter {filter:?} is not a valid MQTT filter: it {reason}"
                ))
            })?;
            if !seen.insert(filter) {
                return err(format!("the topic filter {filter:?} is listed twice"));
            }
            let shared_len = "$share/".len() + self.group.len() + 1 + filter.len();
            if shared_len > MAX_STRING_LEN {
                return err(format!(
                    "the shared subscription to {filter:?} is longer than {MAX_STRING_LEN} bytes"
                ));
            }
        }
        match self.qos {
            1 | 2 => {}
            0 => {
                return err(
                    "qos 0 is not allowed: QoS 0 messages are neither acknowledged nor \
                     redelivered, so delivery could not be at least once (use 1 or 2)"
                        .into(),
                );
            }
            n => return err(format!("qos {n} does not exist (use 1 or 2)")),
        }
        if self.session_expiry < Duration::from_secs(1)
            || self.session_expiry > Duration::from_secs(u64::from(u32::MAX))
        {
            return err(format!(
                "session_expiry {} is out of range (1s to 4294967295s): the session must \
                 outlive a disconnection for messages to be kept meanwhile",
                humantime::format_duration(self.session_expiry)
            ));
        }
        if self.receive_maximum == 0 {
            return err("receive_maximum must be at least 1".into());
        }
        if !(MIN_PACKET_SIZE..=MQTT_MAX_PACKET).contains(&self.max_packet_size) {
            return err(format!(
                "max_packet_size {} is out of range ({MIN_PACKET_SIZE} to {MQTT_MAX_PACKET} bytes)",
                self.max_packet_size
            ));
        }
        if self.keep_alive < Duration::from_secs(5) || self.keep_alive.as_secs() > 65_535 {
            return err(format!(
                "keep_alive {} is out of range (5s to 65535s)",
                humantime::format_duration(self.keep_alive)
            ));
        }
        if self.connect_timeout.is_zero() {
            return err("connect_timeout must be greater than zero".into());
        }
        let b = &self.reconnect_backoff;
        if b.initial.is_zero() || b.max < b.initial || b.multiplier.is_nan() || b.multiplier < 1.0 {
            return err(format!(
                "reconnect_backoff must start above zero, end at or above its start and grow \
                 by a multiplier of at least 1 (initial {:?}, max {:?}, multiplier {})",
                b.initial, b.max, b.multiplier
            ));
        }
        Ok(())
    }

    fn broker(&self) -> Result<BrokerUrl, ConfigError> {
        url::parse(&self.url)
            .map_err(|reason| ConfigError(format!("url {:?} {reason}", self.redacted_url())))
    }

    fn qos_level(&self) -> QoS {
        if self.qos == 2 {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        }
    }
}

fn check_group(group: &str) -> Result<(), ConfigError> {
    let fail = |reason: &str| ConfigError(format!("consumer group name {group:?} {reason}"));
    if group.trim().is_empty() {
        return Err(fail("is empty (an MQTT source needs a group)"));
    }
    if let Some(c) = group.chars().find(|c| matches!(c, '/' | '+' | '#')) {
        return Err(fail(&format!(
            "contains {c:?}, which MQTT does not allow in a shared subscription's name"
        )));
    }
    if group.contains(':') {
        return Err(fail(
            "contains ':', which separates the group from the instance in the client id",
        ));
    }
    if group.chars().any(char::is_control) {
        return Err(fail("contains a control character"));
    }
    Ok(())
}

/// Checks an MQTT topic filter: not empty, no control character, no leading
/// `$`, `#` only as the whole last level, `+` only as a whole level.
fn check_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("is empty");
    }
    if filter.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    if filter.starts_with('$') {
        return Err(
            "starts with '$' (broker topics cannot be shared; give the filter \
             without a $share/ prefix, the source adds it)",
        );
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err("has a '#' that is not the whole last level");
        }
        if level.contains('+') && *level != "+" {
            return Err("has a '+' that is not a whole level");
        }
    }
    Ok(())
}

/// The connection as acks see it.
#[derive(Debug, Default)]
struct LinkState {
    /// Counts connection losses: a message is acked only on the connection
    /// it arrived on.
    generation: u64,
    connected: bool,
    closed: bool,
    /// Acks handed to rumqttc on this connection and not yet written, by
    /// packet id.
    sending: HashMap<u16, oneshot::Sender<Result<(), &'static str>>>,
}

impl LinkState {
    /// rumqttc wrote the ack of `pkid` to the connection.
    fn sent(&mut self, pkid: u16) {
        if let Some(waiter) = self.sending.remove(&pkid) {
            let _ = waiter.send(Ok(()));
        }
    }

    /// Fails every ack not written yet.
    fn fail_sending(&mut self, reason: &'static str) {
        for (_, waiter) in self.sending.drain() {
            let _ = waiter.send(Err(reason));
        }
    }
}

/// What the source, its ackers and its driver task share.
struct Shared {
    client: AsyncClient,
    link: Mutex<LinkState>,
    url: String,
    client_id: String,
}

impl Shared {
    fn link(&self) -> MutexGuard<'_, LinkState> {
        // Nothing panics while holding the lock; if something did, the
        // state is still a valid one.
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the driver hands the source.
enum Item {
    Message(Incoming),
    Failed(SourceError),
}

/// Reads the messages of an MQTT 5 shared subscription for
/// [`Consumer::run`](proclaim_core::consumer::Consumer::run) and
/// [`Consumer::spawn`](proclaim_core::consumer::Consumer::spawn).
///
/// # Groups and instances
///
/// A consumer group is an MQTT 5 *shared subscription*: each instance of
/// the group subscribes to `$share/<group>/<filter>`, the broker hands each
/// message to one of them, and every group gets every message. An instance
/// is one MQTT client with a **persistent session** (`clean_start = false`
/// and a [session expiry](MqttSourceConfig::session_expiry)): while it is
/// disconnected, the broker keeps its subscription and queues its messages,
/// and delivers them when the same client id connects again. The client
/// id is made from the group and the
/// [instance name](MqttSourceConfig::instance), so the instance name must
/// be stable across restarts (a host name, a StatefulSet ordinal) and
/// unique among the running instances of the group.
///
/// # How it reads
///
/// [`MqttSource::connect`] connects with the client id
/// [`MqttSourceConfig::client_id`], `clean_start = false` and the
/// configured session expiry, subscribes to
/// [`MqttSourceConfig::shared_filters`] and returns once the broker granted
/// the subscriptions. A task of the source then drives the connection:
/// every message is decoded with [`decode_publish`] and queued for the
/// consumer, with delivery attempt 1, or 2 when the broker flags it as a
/// redelivery (MQTT's DUP flag tells no more than that). A message that is
/// not a proclaim event is handed over as undecodable, with its payload as
/// the bytes (the reason names its topic), and the consumer parks it.
///
/// # Settling
///
/// - **ack** sends the PUBACK (QoS 1) or PUBREC (QoS 2) on the connection
///   the message arrived on, and returns once it is written to that
///   connection (MQTT has no confirmation of an ack). If that connection is
///   gone, or goes before the ack is written, the ack fails: the broker
///   delivers the message again when the session resumes, and the inbox
///   skips it. Acks go out in the order handlings finish, not the order
///   messages arrived, which MQTT asks for but brokers such as Mosquitto do
///   not need.
/// - **nack** does nothing: MQTT has no negative acknowledgement. The
///   message stays unacknowledged in the session and the broker delivers it
///   again when this client id next connects. The consumer runtime nacks
///   only when it stops (a handler's retries happen while it holds the
///   message), so the delay it asks for does not apply: the redelivery comes
///   with the next run of the instance.
/// - An acker dropped without either behaves as a nack.
///
/// # Order
///
/// The broker delivers one instance's messages in the order they were
/// published (per topic, as MQTT promises; in practice overall), and the
/// consumer runtime handles the messages of one event subject one at a
/// time, in that order. Several instances of a group receive the messages
/// of one subject without regard to it — MQTT shared subscriptions do not
/// keep per-key order across instances — so two instances may handle events
/// of one subject at the same time and in either order (the inbox still
/// keeps each effect once); and a message held by an instance that went
/// down waits for it to come back, while later messages of its subject are
/// handled by the others. Where order matters, run one instance per group:
/// its resumed session redelivers the unacknowledged messages first, in
/// their order, so each subject keeps its order across restarts too.
///
/// # Failures and limits
///
/// A lost connection is reported once to the consumer as a [`SourceError`]
/// (counted as a receive error); the task reconnects by itself with
/// [`MqttSourceConfig::reconnect_backoff`], and the session resumes with
/// the messages kept meanwhile. If the broker lost the session (it expired,
/// or the broker restarted without persistence), the source subscribes
/// again and logs a warning: messages published in between are lost to this
/// instance. Other limits come from the broker:
///
/// - Mosquitto hands a shared subscription's messages round robin to all
///   the group's sessions, connected or not: an instance that is down gets
///   its share queued, and handled only when it comes back. An instance
///   name that never comes back loses what was queued for it when its
///   session expires.
/// - Mosquitto queues at most `max_queued_messages` (default 1,000) and
///   `max_queued_bytes` per client beyond those in flight, and drops the
///   rest: raise them (0 means no limit) for consumers that may fall behind
///   or be down for long.
/// - QoS 0 messages (published with QoS 0) are handed over too, but are
///   neither acknowledged nor redelivered.
/// - With QoS 2, a PUBREL the broker resends on a resumed session (the
///   previous run acked a message and stopped before the handshake ended)
///   is answered with PUBCOMP, for any packet id; rumqttc alone would drop
///   the connection over it, again at each reconnection.
///
/// Dropping the source stops its task: the acks queued so far are sent,
/// then a DISCONNECT, which keeps the session; messages not acked are
/// delivered again at the next connection of the same client id.
///
/// # Example
///
/// ```no_run
/// use proclaim_core::consumer::{Consumer, Context, HandlerError};
/// use proclaim_mqtt::{MqttConfig, MqttSource, MqttSourceConfig};
///
/// # async fn demo(parked: impl proclaim_core::inbox::ParkedEvents) -> Result<(), Box<dyn std::error::Error>> {
/// // What the relay publishes with…
/// let publisher = MqttConfig::default().with_topic_template("campaign/{type}");
/// // …and the instance of a consumer group that reads it.
/// let config = MqttSourceConfig::new("receipts", "pod-0")
///     .with_url("mqtt://127.0.0.1:1883")
///     .with_filter_for(&publisher.template()?);
/// let source = MqttSource::connect(config).await?;
/// let handle = Consumer::new("receipts")
///     .on_event("Donor*", |cx: Context<()>| async move {
///         tracing::info!(id = %cx.event.id(), "receipt");
///         Ok::<_, HandlerError>(())
///     })
///     .concurrency(8)
///     .park_into(parked)
///     .spawn(source)?;
/// # let _ = handle;
/// # Ok(()) }
/// ```
pub struct MqttSource {
    messages: mpsc::UnboundedReceiver<Item>,
    shared: Arc<Shared>,
    config: MqttSourceConfig,
    stop: CancellationToken,
    finished: CancellationToken,
}

impl fmt::Debug for MqttSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSource")
            .field("url", &self.shared.url)
            .field("client_id", &self.shared.client_id)
            .field("group", &self.config.group)
            .field("filters", &self.config.filters)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl MqttSource {
    /// Connects to [`MqttSourceConfig::url`] as
    /// [`MqttSourceConfig::client_id`] with a persistent session, subscribes
    /// to the group's shared filters, and starts the task that drives the
    /// connection. Returns once the broker granted every subscription, so
    /// everything published afterwards reaches the group.
    ///
    /// Fails on an invalid configuration, on a broker that cannot be reached
    /// or does not answer within [`MqttSourceConfig::connect_timeout`] (each
    /// step), that accepts a lower QoS than configured, or that refuses a
    /// subscription (e.g. no shared subscriptions, not authorised). Once
    /// connected, the source reconnects by itself. Must be called within a
    /// Tokio runtime.
    pub async fn connect(config: MqttSourceConfig) -> Result<Self, MqttError> {
        config.validate()?;
        let broker = config.broker()?;
        let url = config.redacted_url();
        let client_id = config.client_id();
        let capacity = usize::from(config.receive_maximum) + REQUEST_HEADROOM;
        let mut options = MqttOptions::new(client_id.clone(), broker.host, broker.port);
        options
            .set_keep_alive(config.keep_alive)
            .set_clean_start(false)
            .set_manual_acks(true)
            .set_connection_timeout(ceil_secs(config.connect_timeout))
            .set_session_expiry_interval(Some(expiry_secs(config.session_expiry)))
            .set_receive_maximum(Some(config.receive_maximum))
            .set_max_packet_size(Some(config.max_packet_size))
            .set_request_channel_capacity(capacity);
        if let Some(user) = broker.username {
            options.set_credentials(user, broker.password.unwrap_or_default());
        }
        let (client, eventloop) = AsyncClient::new(options, capacity);
        let shared = Arc::new(Shared {
            client,
            link: Mutex::new(LinkState::default()),
            url: url.clone(),
            client_id: client_id.clone(),
        });
        let (tx, messages) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let finished = CancellationToken::new();
        let mut driver = Driver {
            eventloop,
            shared: shared.clone(),
            tx,
            stop: stop.clone(),
            finished: finished.clone(),
            filters: config
                .shared_filters()
                .into_iter()
                .map(|f| Filter::new(f, config.qos_level()))
                .collect(),
            qos: config.qos,
            connect_timeout: config.connect_timeout,
            backoff: config.reconnect_backoff,
            failures: 0,
            connected_at: None,
            released: HashSet::new(),
        };
        if let Err(e) = driver.establish().await {
            driver.shutdown().await;
            return Err(e);
        }
        tracing::info!(
            url = %url,
            client_id = %client_id,
            filters = ?config.shared_filters(),
            "consuming an MQTT shared subscription"
        );
        tokio::spawn(driver.run());
        Ok(MqttSource {
            messages,
            shared,
            config,
            stop,
            finished,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MqttSourceConfig {
        &self.config
    }

    /// The MQTT client id in use.
    pub fn client_id(&self) -> &str {
        &self.shared.client_id
    }

    /// Whether the connection to the broker is up now.
    pub fn is_connected(&self) -> bool {
        let link = self.shared.link();
        link.connected && !link.closed
    }

    /// Resolves once the source's task has ended, which it does after the
    /// source was dropped and its last acks and DISCONNECT were sent (at
    /// most two seconds later). Take it before handing the source to the
    /// consumer, and await it after
    /// [`ConsumerHandle::shutdown`](proclaim_core::consumer::ConsumerHandle::shutdown),
    /// before the process exits: otherwise the last acks may not leave, and
    /// those messages come again at the next start (which the inbox
    /// absorbs).
    ///
    /// ```no_run
    /// # async fn demo(consumer: proclaim_core::consumer::Consumer) -> Result<(), Box<dyn std::error::Error>> {
    /// use proclaim_mqtt::{MqttSource, MqttSourceConfig};
    ///
    /// let source = MqttSource::connect(MqttSourceConfig::new("receipts", "pod-0")).await?;
    /// let closed = source.closed();
    /// let handle = consumer.spawn(source)?;
    /// // … on SIGTERM:
    /// handle.shutdown().await;
    /// closed.await;
    /// # Ok(()) }
    /// ```
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        self.finished.clone().cancelled_owned()
    }
}

impl Drop for MqttSource {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Source for MqttSource {
    /// The next message; `Some(Err(_))` once each time the connection was
    /// lost (the task is already reconnecting; the consumer backs off and
    /// calls again), or when the broker refused a subscription made again
    /// after it lost the session. `None` only if the source's task ended,
    /// which it does only when the source is dropped.
    async fn receive(&mut self) -> Option<Result<Incoming, SourceError>> {
        match self.messages.recv().await? {
            Item::Message(incoming) => Some(Ok(incoming)),
            Item::Failed(e) => Some(Err(e)),
        }
    }
}

/// Settles one message: a PUBACK or PUBREC on the connection it came on.
struct MqttAcker {
    shared: Arc<Shared>,
    generation: u64,
    pkid: u16,
    qos: QoS,
}

impl Acker for MqttAcker {
    async fn ack(self) -> Result<(), SourceError> {
        if self.qos == QoS::AtMostOnce {
            return Ok(()); // nothing to acknowledge
        }
        let what = |reason: &str| {
            SourceError::new(format!(
                "cannot acknowledge MQTT message {} from {}: {reason}",
                self.pkid, self.shared.url
            ))
        };
        let written = {
            // Checked and queued under the lock the driver takes to mark the
            // connection lost, so an ack never leaves on a later connection,
            // where its packet id may stand for another message.
            let mut link = self.shared.link();
            if link.closed {
                return Err(what(SOURCE_CLOSED));
            }
            if link.generation != self.generation || !link.connected {
                return Err(what(
                    "the connection it arrived on was lost; the broker delivers it again when \
                     the session resumes",
                ));
            }
            let mut publish = Publish::new("", self.qos, Bytes::new(), None);
            publish.pkid = self.pkid;
            if let Err(e) = self.shared.client.try_ack(&publish) {
                return Err(what(
                    "the MQTT client refused the request (its event loop is full or stopped)",
                )
                .with_source(e));
            }
            let (tx, rx) = oneshot::channel();
            link.sending.insert(self.pkid, tx);
            rx
        };
        match written.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(what(reason)),
            Err(_) => Err(what(SOURCE_CLOSED)),
        }
    }

    /// Leaves the message unacknowledged: MQTT has no negative
    /// acknowledgement. The broker delivers it again when this client id
    /// next connects, whatever `delay`.
    async fn nack(self, delay: Duration) -> Result<(), SourceError> {
        tracing::debug!(
            pkid = self.pkid,
            ?delay,
            "leaving the MQTT message unacknowledged; it is redelivered when the session resumes"
        );
        Ok(())
    }
}

/// The task that owns rumqttc's event loop: delivers messages, tracks the
/// connection, reconnects.
struct Driver {
    eventloop: EventLoop,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Item>,
    stop: CancellationToken,
    /// Cancelled when the task ends.
    finished: CancellationToken,
    filters: Vec<Filter>,
    qos: u8,
    connect_timeout: Duration,
    backoff: Backoff,
    /// Failed connection attempts since the last stable connection.
    failures: u32,
    /// When the current connection came up; `None` while disconnected.
    connected_at: Option<Instant>,
    /// QoS 2: packet ids whose PUBREC was sent and whose PUBREL has not
    /// been answered yet; a graceful shutdown waits for them.
    released: HashSet<u16>,
}

impl Driver {
    /// The first connection: CONNACK, then SUBACK, each within the connect
    /// timeout. Messages that come meanwhile (a resumed session) are
    /// delivered.
    async fn establish(&mut self) -> Result<(), MqttError> {
        let timeout = self.connect_timeout;
        let url = self.shared.url.clone();
        let fail = |reason: String, source: Option<ConnectionError>| MqttError::Connect {
            url: url.clone(),
            reason,
            source: source.map(Into::into),
        };
        let connack = match tokio::time::timeout(timeout, self.eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(connack)))) => connack,
            Ok(Ok(other)) => return Err(fail(format!("expected CONNACK, got {other:?}"), None)),
            Ok(Err(e)) => return Err(fail(describe(&e, timeout), Some(e))),
            Err(_) => return Err(fail(format!("timed out after {timeout:?}"), None)),
        };
        let props = connack.properties.as_ref();
        let max_qos = props.and_then(|p| p.max_qos).unwrap_or(2);
        if max_qos < self.qos {
            return Err(MqttError::QosNotSupported {
                url: url.clone(),
                broker_max: max_qos,
                configured: self.qos,
            });
        }
        if props.and_then(|p| p.shared_subscription_available) == Some(0) {
            return Err(fail(
                "the broker does not support shared subscriptions".into(),
                None,
            ));
        }
        self.connected(&connack);
        if connack.session_present {
            tracing::info!(
                url = %self.shared.url,
                client_id = %self.shared.client_id,
                "resumed the MQTT session: messages kept for it are delivered now"
            );
        }
        self.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(suback)))) => {
                    return match self.refused(&suback) {
                        None => Ok(()),
                        Some(reason) => Err(fail(reason, None)),
                    };
                }
                Ok(Ok(event)) => self.handle(event),
                Ok(Err(e)) => return Err(fail(describe(&e, timeout), Some(e))),
                Err(_) => {
                    return Err(fail(
                        format!("no SUBACK within {timeout:?} after subscribing"),
                        None,
                    ));
                }
            }
        }
    }

    async fn run(mut self) {
        loop {
            let connected = self.connected_at.is_some();
            tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                polled = poll(&mut self.eventloop, connected, self.connect_timeout) => match polled {
                    Ok(event) => self.handle(event),
                    Err(reason) => {
                        self.lost(reason);
                        let delay = self.backoff.delay(self.failures);
                        tokio::select! {
                            () = self.stop.cancelled() => break,
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                },
            }
        }
        self.shutdown().await;
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Incoming(Packet::Publish(publish)) => self.deliver(publish),
            Event::Incoming(Packet::ConnAck(connack)) => {
                self.connected(&connack);
                if connack.session_present {
                    tracing::info!(url = %self.shared.url, "reconnected to the MQTT broker; the session resumed");
                } else {
                    tracing::warn!(
                        url = %self.shared.url,
                        client_id = %self.shared.client_id,
                        "reconnected to the MQTT broker, which no longer had this session \
                         (expired, or lost in a restart): subscribing again; messages published \
                         meanwhile are lost to this instance"
                    );
                    self.subscribe();
                }
            }
            Event::Incoming(Packet::SubAck(suback)) => {
                if let Some(reason) = self.refused(&suback) {
                    tracing::error!(url = %self.shared.url, %reason, "subscribing again failed");
                    let _ = self.tx.send(Item::Failed(SourceError::new(format!(
                        "cannot subscribe again at {}: {reason}",
                        self.shared.url
                    ))));
                }
            }
            Event::Outgoing(Outgoing::PubAck(pkid)) => self.shared.link().sent(pkid),
            Event::Outgoing(Outgoing::PubRec(pkid)) => {
                self.released.insert(pkid);
                self.shared.link().sent(pkid);
            }
            Event::Outgoing(Outgoing::PubComp(pkid)) => {
                self.released.remove(&pkid);
            }
            Event::Incoming(Packet::Disconnect(disconnect)) => {
                tracing::debug!(url = %self.shared.url, ?disconnect, "MQTT broker sent DISCONNECT");
            }
            _ => {}
        }
    }

    /// Queues a message for the consumer, with an acker bound to this
    /// connection.
    fn deliver(&self, publish: Publish) {
        let generation = self.shared.link().generation;
        let acker = MqttAcker {
            shared: self.shared.clone(),
            generation,
            pkid: publish.pkid,
            qos: publish.qos,
        };
        let attempt = if publish.dup { 2 } else { 1 };
        let incoming = match decode_publish(&publish) {
            Ok(event) => Incoming::new(event, acker),
            Err(e) => {
                let properties = publish.properties.as_ref();
                tracing::warn!(
                    topic = %String::from_utf8_lossy(&publish.topic),
                    pkid = publish.pkid,
                    content_type = ?properties.and_then(|p| p.content_type.as_deref()),
                    user_properties = ?properties.map(|p| &p.user_properties),
                    error = %e,
                    "undecodable MQTT message"
                );
                Incoming::undecodable(e.to_string(), publish.payload.to_vec(), acker)
            }
        };
        // The receiver is gone only when the source was dropped: the
        // message then stays unacknowledged, for the next run.
        let _ = self
            .tx
            .send(Item::Message(incoming.with_delivery_attempt(attempt)));
    }

    fn connected(&mut self, connack: &ConnAck) {
        self.connected_at = Some(Instant::now());
        self.released.clear();
        if connack.session_present && self.qos == 2 {
            self.accept_any_pubrel();
        }
        self.shared.link().connected = true;
    }

    fn subscribe(&self) {
        if let Err(e) = self.shared.client.try_subscribe_many(self.filters.clone()) {
            // The channel has room for it; if not, the next loss retries.
            tracing::error!(url = %self.shared.url, error = %e, "cannot queue the MQTT subscription");
        }
    }

    /// Why the broker refused a subscription, if it did.
    fn refused(&self, suback: &SubAck) -> Option<String> {
        let reasons: Vec<String> = self
            .filters
            .iter()
            .zip(&suback.return_codes)
            .filter_map(|(filter, code)| match code {
                SubscribeReasonCode::Success(QoS::AtMostOnce) => Some(format!(
                    "{}: the broker granted QoS 0 only (no acknowledgements)",
                    filter.path
                )),
                SubscribeReasonCode::Success(_) => None,
                refused => Some(format!("{}: refused ({refused:?})", filter.path)),
            })
            .collect();
        let mut text = if !reasons.is_empty() {
            format!(
                "the broker refused the subscription: {}",
                reasons.join("; ")
            )
        } else if suback.return_codes.len() != self.filters.len() {
            format!(
                "the broker answered {} of {} subscriptions",
                suback.return_codes.len(),
                self.filters.len()
            )
        } else {
            return None;
        };
        if let Some(why) = suback
            .properties
            .as_ref()
            .and_then(|p| p.reason_string.as_ref())
        {
            text.push_str(&format!(" ({why})"));
        }
        Some(text)
    }

    /// QoS 2 on a resumed session: the broker sends PUBREL again for the
    /// messages whose PUBREC it had and whose PUBCOMP it did not (the
    /// connection, or the process, ended in between). rumqttc accepts a
    /// PUBREL only for a QoS 2 publish it saw on the current connection, and
    /// takes any other for a protocol error, dropping the connection — which
    /// the next PUBREL would drop again, for ever. So every packet id is
    /// marked as awaiting its PUBREL, through rumqttc's own handling of an
    /// incoming QoS 2 publish (whose event is taken back out): a PUBREL is
    /// then answered with PUBCOMP, as MQTT 5 asks even for an unknown one.
    fn accept_any_pubrel(&mut self) {
        let state = &mut self.eventloop.state;
        let before = state.events.len();
        for pkid in 1..=u16::MAX {
            let mut marker = Publish::new("", QoS::ExactlyOnce, Bytes::new(), None);
            marker.pkid = pkid;
            if let Err(e) = state.handle_incoming_packet(Packet::Publish(marker)) {
                tracing::debug!(pkid, error = %e, "cannot prepare for a QoS 2 PUBREL");
            }
            state.events.truncate(before);
        }
    }

    /// An event while shutting down: acks are tracked, messages arriving
    /// now stay unacknowledged.
    fn closing(&mut self, event: Event) {
        match event {
            Event::Outgoing(Outgoing::PubAck(pkid)) => self.shared.link().sent(pkid),
            Event::Outgoing(Outgoing::PubRec(pkid)) => {
                self.released.insert(pkid);
                self.shared.link().sent(pkid);
            }
            Event::Outgoing(Outgoing::PubComp(pkid)) => {
                self.released.remove(&pkid);
            }
            _ => {}
        }
    }

    /// The connection failed (or could not be made): acks of its messages
    /// can no longer be sent.
    fn lost(&mut self, reason: String) {
        // Packets rumqttc read before the failure are real: deliver them
        // (their acks fail, and the broker delivers them again).
        let buffered: Vec<Event> = self.eventloop.state.events.drain(..).collect();
        for event in buffered {
            self.handle(event);
        }
        let was_up = {
            let mut link = self.shared.link();
            let was_up = link.connected;
            link.connected = false;
            link.generation += 1;
            link.fail_sending(LOST_BEFORE_ACK);
            was_up
        };
        // An ack queued between rumqttc's own clean-up and the line above
        // is still in its request channel: `clean` drops queued PUBACKs. A
        // PUBREC it keeps for the next connection, where it is taken out
        // too: the broker delivers those messages again.
        self.eventloop.clean();
        self.eventloop
            .pending
            .retain(|r| !matches!(r, Request::PubAck(_) | Request::PubRec(_)));
        if let Some(at) = self.connected_at.take()
            && at.elapsed() >= STABLE_CONNECTION
        {
            self.failures = 0;
        }
        self.failures = self.failures.saturating_add(1);
        if was_up {
            tracing::warn!(url = %self.shared.url, %reason, "lost the MQTT connection; reconnecting");
            let _ = self.tx.send(Item::Failed(SourceError::new(format!(
                "lost the connection to the MQTT broker at {}: {reason} (reconnecting; \
                 unacknowledged messages are delivered again)",
                self.shared.url
            ))));
        } else {
            tracing::debug!(url = %self.shared.url, %reason, failures = self.failures, "cannot reconnect to the MQTT broker");
        }
    }

    /// Sends the acks queued so far, lets their QoS 2 handshakes finish
    /// (so the session keeps no PUBREL), sends a DISCONNECT (which keeps
    /// the session), and waits for the broker to close the connection,
    /// which it does once it has read them all; for at most
    /// [`DISCONNECT_GRACE`].
    async fn shutdown(mut self) {
        let was_up = {
            let mut link = self.shared.link();
            link.closed = true;
            link.connected
        };
        if was_up {
            let deadline = tokio::time::Instant::now() + DISCONNECT_GRACE;
            let mut open = true;
            while open && (!self.released.is_empty() || !self.shared.link().sending.is_empty()) {
                match tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
                    Ok(Ok(event)) => self.closing(event),
                    Ok(Err(_)) | Err(_) => open = false,
                }
            }
            if open && self.shared.client.try_disconnect().is_ok() {
                let _ = tokio::time::timeout_at(deadline, async {
                    while let Ok(event) = self.eventloop.poll().await {
                        self.closing(event);
                    }
                })
                .await;
            }
        }
        {
            let mut link = self.shared.link();
            link.connected = false;
            link.fail_sending(SOURCE_CLOSED);
        }
        self.finished.cancel();
        tracing::debug!(url = %self.shared.url, client_id = %self.shared.client_id, "MQTT source closed");
    }
}

/// The session expiry interval in whole seconds, rounded up (validated to
/// fit).
fn expiry_secs(d: Duration) -> u32 {
    u32::try_from(ceil_secs(d)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use rumqttc::v5::mqttbytes::v5::PubRel;
    use rumqttc::v5::{MqttState, StateError};

    use super::*;

    fn valid() -> MqttSourceConfig {
        MqttSourceConfig::new("thank-you", "pod-0")
    }

    fn error(config: &MqttSourceConfig) -> String {
        match config.validate() {
            Ok(()) => panic!("{config:?} was accepted"),
            Err(e) => e.0,
        }
    }

    #[test]
    fn defaults_match_the_default_publisher() {
        let config = valid();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.url, MqttConfig::default().url);
        let template = MqttConfig::default().template().ok().map(|t| t.filter());
        assert_eq!(Some(config.filters[0].clone()), template);
        assert_eq!(config.filters, ["proclaim/#"]);
        assert_eq!(config.qos, 1);
        assert_eq!(config.session_expiry, Duration::from_secs(604_800));
        assert_eq!(config.client_id(), "thank-you:pod-0");
        assert_eq!(config.shared_filters(), ["$share/thank-you/proclaim/#"]);
        assert_eq!(
            valid().with_client_id("c-1").client_id(),
            "c-1",
            "an explicit client id wins"
        );
        assert!(
            MqttSourceConfig::new("g", "")
                .with_client_id("c-1")
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn invalid_settings_are_named() {
        let cases: Vec<(MqttSourceConfig, &str)> = vec![
            (valid().with_url("mqtts://h"), "url"),
            (
                valid().with_url("mqtt://u:s3cret@h:x"),
                "url \"mqtt://***@h:x\"",
            ),
            (valid().with_group(""), "is empty"),
            (valid().with_group("a/b"), "'/'"),
            (valid().with_group("a+"), "'+'"),
            (valid().with_group("#"), "'#'"),
            (valid().with_group("a:b"), "':'"),
            (valid().with_instance(" "), "instance name"),
            (valid().with_instance("a\nb"), "control character"),
            (valid().with_client_id(""), "client_id is empty"),
            (
                valid().with_filters(Vec::<String>::new()),
                "at least one topic filter",
            ),
            (valid().with_filter(""), "is empty"),
            (valid().with_filter("a/#/b"), "'#'"),
            (valid().with_filter("a/b#"), "'#'"),
            (valid().with_filter("a/b+/c"), "'+'"),
            (valid().with_filter("$SYS/#"), "'$'"),
            (valid().with_filter("$share/g/a/#"), "'$'"),
            (valid().with_filters(["a/#", "a/#"]), "listed twice"),
            (valid().with_qos(0), "qos 0 is not allowed"),
            (valid().with_qos(3), "qos 3 does not exist"),
            (
                valid().with_session_expiry(Duration::ZERO),
                "session_expiry",
            ),
            (
                valid().with_session_expiry(Duration::from_secs(1 << 33)),
                "session_expiry",
            ),
            (valid().with_receive_maximum(0), "receive_maximum"),
            (valid().with_max_packet_size(10), "max_packet_size"),
            (
                valid().with_keep_alive(Duration::from_secs(1)),
                "keep_alive",
            ),
            (
                valid().with_connect_timeout(Duration::ZERO),
                "connect_timeout",
            ),
            (
                valid().with_reconnect_backoff(Backoff::new(Duration::ZERO, Duration::ZERO)),
                "reconnect_backoff",
            ),
            (
                valid().with_reconnect_backoff(Backoff::new(
                    Duration::from_secs(2),
                    Duration::from_secs(1),
                )),
                "reconnect_backoff",
            ),
        ];
        for (config, expected) in cases {
            let message = error(&config);
            assert!(message.contains(expected), "{config:?}: {message}");
            assert!(!message.contains("s3cret"), "{message}");
        }
        assert!(!format!("{:?}", valid().with_url("mqtt://u:s3cret@h")).contains("s3cret"));
    }

    #[test]
    fn filters_may_use_whole_level_wildcards() {
        for good in [
            "#",
            "a/#",
            "+/b",
            "a/+/c/#",
            "a//b",
            "campaign/DonorSecured",
        ] {
            assert_eq!(check_filter(good), Ok(()), "{good}");
        }
    }

    #[test]
    fn deserializes_with_defaults() -> Result<(), serde_json::Error> {
        let config: MqttSourceConfig = serde_json::from_str(
            r#"{"group":"g","instance":"i","filters":["a/#","b/+"],"qos":2,
                "session_expiry":"1h","reconnect_backoff":{"initial":"50ms","max":"2s"}}"#,
        )?;
        assert_eq!(
            config,
            MqttSourceConfig::new("g", "i")
                .with_filters(["a/#", "b/+"])
                .with_qos(2)
                .with_session_expiry(Duration::from_secs(3600))
                .with_reconnect_backoff(Backoff::new(
                    Duration::from_millis(50),
                    Duration::from_secs(2)
                ))
        );
        assert!(serde_json::from_str::<MqttSourceConfig>(r#"{"topic":"a"}"#).is_err());
        Ok(())
    }

    #[test]
    fn rounds_durations_up_to_seconds() {
        assert_eq!(expiry_secs(Duration::from_millis(1500)), 2);
        assert_eq!(
            expiry_secs(Duration::from_secs(u64::from(u32::MAX))),
            u32::MAX
        );
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
    }

    /// A driver that never connects (for its pure parts).
    fn driver(qos: u8, filters: &[&str]) -> Driver {
        let (client, eventloop) = AsyncClient::new(MqttOptions::new("unit", "127.0.0.1", 1), 10);
        let (tx, _rx) = mpsc::unbounded_channel();
        Driver {
            eventloop,
            shared: Arc::new(Shared {
                client,
                link: Mutex::new(LinkState::default()),
                url: "mqtt://127.0.0.1:1".into(),
                client_id: "unit".into(),
            }),
            tx,
            stop: CancellationToken::new(),
            finished: CancellationToken::new(),
            filters: filters
                .iter()
                .map(|f| Filter::new(*f, QoS::AtLeastOnce))
                .collect(),
            qos,
            connect_timeout: Duration::from_secs(1),
            backoff: Backoff::default(),
            failures: 0,
            connected_at: None,
            released: HashSet::new(),
        }
    }

    #[test]
    fn a_refused_subscription_is_explained() {
        let driver = driver(1, &["$share/g/a/#", "$share/g/b/#"]);
        let suback = |codes: Vec<SubscribeReasonCode>| SubAck {
            pkid: 1,
            return_codes: codes,
            properties: None,
        };
        let ok = SubscribeReasonCode::Success(QoS::AtLeastOnce);
        assert_eq!(driver.refused(&suback(vec![ok, ok])), None);
        assert_eq!(
            driver.refused(&suback(vec![
                ok,
                SubscribeReasonCode::SharedSubscriptionsNotSupported
            ])),
            Some(
                "the broker refused the subscription: $share/g/b/#: refused \
                 (SharedSubscriptionsNotSupported)"
                    .into()
            )
        );
        let qos0 = driver.refused(&suback(vec![
            SubscribeReasonCode::Success(QoS::AtMostOnce),
            ok,
        ]));
        assert!(qos0.is_some_and(|t| t.contains("$share/g/a/#: the broker granted QoS 0 only")));
        assert_eq!(
            driver.refused(&suback(vec![ok])),
            Some("the broker answered 1 of 2 subscriptions".into())
        );
    }

    /// The workaround for QoS 2 on a resumed session, against rumqttc's own
    /// state machine: a PUBREL for a packet id it did not see on this
    /// connection is an error to it, unless every id was marked.
    #[test]
    fn a_pubrel_on_a_resumed_session_is_answered_once_any_is_accepted() {
        let pubrel = |pkid| Packet::PubRel(PubRel::new(pkid, None));
        let mut state = MqttState::new(10, true);
        assert!(matches!(
            state.handle_incoming_packet(pubrel(7)),
            Err(StateError::Unsolicited(7))
        ));

        let mut driver = driver(2, &[]);
        let started = Instant::now();
        driver.accept_any_pubrel();
        let state = &mut driver.eventloop.state;
        assert!(state.events.is_empty(), "no marker leaks out as a message");
        for pkid in [1, 7, 40_000, u16::MAX] {
            assert!(matches!(
                state.handle_incoming_packet(pubrel(pkid)),
                Ok(Some(Packet::PubComp(_)))
            ));
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
    }
}
