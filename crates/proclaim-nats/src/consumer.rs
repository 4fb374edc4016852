//! [`JetStreamSource`]: the consumer runtime reads a JetStream stream through
//! a durable pull consumer, one per consumer group.
//!
//! A *consumer group* is a JetStream durable consumer: the server remembers
//! which messages the group has acknowledged, so every group receives every
//! event of the stream (Volunteer Thank-You and Fundraising Strategy each get
//! every `DonorSecured`), and the [`JetStreamSource`]s of one group — the
//! instances of one service — share its events between them. The durable is
//! created on first use (explicit acks, delivering the whole stream); an
//! existing one is used as it is.
//!
//! A task of the source pulls the group's messages ahead of the consumer,
//! at most [`batch_size`](JetStreamSourceConfig::batch_size) at a time. Each
//! message becomes an [`Incoming`]: the event read by [`decode_message`], the
//! server's delivery count, and an acker that sends `+ACK` once the handler
//! has succeeded and waits for the server to confirm it, or `-NAK` with a
//! delay when the consumer hands the message back on shutdown. A message that
//! is not a proclaim event is handed over as undecodable, with its body, for
//! the consumer to park. While a message is held (queued in the source, being
//! handled, retried, or waiting behind an earlier message of its subject), the
//! source tells the server it is still in progress every third of
//! [`ack_wait`](JetStreamSourceConfig::ack_wait), so a slow handler does not
//! cause a redelivery; a consumer that dies stops doing so, and the server
//! redelivers its messages once `ack_wait` has passed.
//!
//! **Exactly-once effect.** JetStream delivers at least once: after a crash
//! between the handler's commit and its ack, or when the relay published an
//! event twice, a handler sees the event again. A handler makes its effect
//! exactly once with an [`Inbox`](proclaim_core::inbox::Inbox): it begins the
//! inbox transaction for `(cx.consumer(), &cx.event)`, does its work through
//! that transaction, commits, and only then returns `Ok` (after which the
//! message is acked). A duplicate finds its inbox row and is skipped; a
//! handler that fails or dies rolls its work back together with the row.
//!
//! **Order.** JetStream delivers a group's messages in stream order to each
//! pull request, and the consumer runtime handles the messages of one event
//! subject one at a time, in that order. With one running source per group,
//! each subject's events are handled in publish order. Several sources of one
//! group share messages without regard to subject, so two instances may then
//! handle events of one subject at the same time (the inbox still keeps each
//! effect once).
//!
//! ```no_run
//! use proclaim_core::consumer::{Consumer, Context, HandlerError};
//! use proclaim_core::inbox::{Inbox, InboxTx};
//! use proclaim_nats::{JetStreamSource, JetStreamSourceConfig, NatsConfig};
//! use proclaim_postgres::PgInbox;
//!
//! #[derive(serde::Deserialize)]
//! struct DonorSecured {
//!     donor_id: i64,
//!     amount_cents: i64,
//! }
//!
//! # async fn run(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let inbox = PgInbox::new(pool);
//! inbox.migrate().await?;
//!
//! let nats = NatsConfig::default()
//!     .with_url("nats://127.0.0.1:4222")
//!     .with_stream("CAMPAIGN")
//!     .with_subject_prefix("campaign");
//! // The group's name: the durable consumer at the broker, and the name the
//! // consumer records its events under in the inbox.
//! let group = "volunteer-thank-you";
//! let source = JetStreamSource::connect(
//!     nats,
//!     JetStreamSourceConfig::new(group).with_event_types(["DonorSecured"]),
//! )
//! .await?;
//!
//! let notes = inbox.clone();
//! let handle = Consumer::new(group)
//!     .on("DonorSecured", move |cx: Context<DonorSecured>| {
//!         let inbox = notes.clone();
//!         async move {
//!             // 1. Record the event in the inbox, in a new transaction.
//!             let Some(mut tx) = inbox.begin(cx.consumer(), &cx.event).await? else {
//!                 return Ok(()); // handled before: a duplicate, nothing to do
//!             };
//!             // 2. The effect, through the same transaction.
//!             sqlx::query("INSERT INTO campaign.thank_you_notes (donor_id, cents) VALUES ($1, $2)")
//!                 .bind(cx.data.donor_id)
//!                 .bind(cx.data.amount_cents)
//!                 .execute(&mut *tx)
//!                 .await
//!                 .map_err(|e| HandlerError::transient("cannot write the note").with_source(e))?;
//!             // 3. Commit the note and the inbox row together…
//!             tx.commit().await?;
//!             // 4. …then return Ok: the consumer acks the message.
//!             Ok(())
//!         }
//!     })
//!     .concurrency(16)
//!     .park_into(inbox) // what the handler gives up on, and undecodable messages
//!     .spawn(source)?;
//!
//! tokio::signal::ctrl_c().await?;
//! let report = handle.shutdown().await;
//! tracing::info!(handled = report.handled, parked = report.parked, "stopped");
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, AckKind};
use async_nats::{Client, Subject};
use futures::StreamExt;
use proclaim_core::consumer::{Acker, Incoming, Source, SourceError};
use proclaim_core::template::{Placeholder, Template};
use proclaim_core::{Backoff, BoxError, ConfigError, Event};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::subject::{check_filter, check_tokens};
use crate::{NatsConfig, NatsError, NatsPublisher, decode_message};

/// How long one pull request waits at the server for messages; then the
/// source asks again.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// How often the source checks the connection while a pull request waits:
/// after a reconnection it asks again at once.
const CONNECTION_CHECK: Duration = Duration::from_millis(500);
/// JetStream's longest consumer name.
const MAX_GROUP_LEN: usize = 255;
/// Upper bound of the wait for the server's confirmation of an ack or a
/// nack (or [`NatsConfig::ack_timeout`] if shorter). The consumer handles
/// the next message of the subject only after it, and an unconfirmed ack
/// only means a possible redelivery, which the inbox absorbs.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// The shortest redelivery delay of a nack. The consumer nacks only when it
/// stops; until its source is dropped, the source may still be pulling and
/// could take an immediate redelivery back. A stopping consumer drops its
/// source well within this delay.
const MIN_NACK_DELAY: Duration = Duration::from_secs(1);

/// Settings of a [`JetStreamSource`]: the consumer group and how its durable
/// JetStream consumer is created. Where the server and the stream are comes
/// from a [`NatsConfig`].
///
/// ```
/// use std::time::Duration;
/// use proclaim_nats::JetStreamSourceConfig;
///
/// let config = JetStreamSourceConfig::new("fundraising-strategy")
///     .with_event_types(["DonorSecured", "PledgeMade"])
///     .with_ack_wait(Duration::from_secs(60))
///     .with_max_ack_pending(4096);
/// assert!(config.validate().is_ok());
/// assert!(JetStreamSourceConfig::new("thank.you").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JetStreamSourceConfig {
    /// The consumer group: the name of the durable JetStream consumer
    /// (required). Letters, digits, `-` and `_` are safe; `.`, `*`, `>`,
    /// `/`, `\`, whitespace and control characters are not allowed. Use the
    /// same name for the [`Consumer`](proclaim_core::consumer::Consumer), so
    /// the inbox records the group's events under it.
    pub group: String,
    /// Only messages on NATS subjects matching this filter (wildcards
    /// allowed: `campaign.*`, `campaign.>`), selected by the server. It must
    /// lie within the stream's subjects.
    pub filter_subject: Option<String>,
    /// Only events of these types (empty: all). A single type whose subject
    /// the [`NatsConfig::subject_template`] renders from the prefix and the
    /// type alone is selected by the server; otherwise the source acks the
    /// events of other types itself, without handing them to the consumer.
    pub event_types: Vec<String>,
    /// How long the server waits for the ack of a message before delivering
    /// it again (default 30 s). The source extends it for the messages the
    /// consumer holds; it bounds how soon the messages of a consumer that
    /// died are redelivered.
    #[serde(with = "proclaim_core::duration::human")]
    pub ack_wait: Duration,
    /// Messages the server lets the group hold unacknowledged, across all its
    /// sources (default 2,048). Keep it at or above the consumer's
    /// [`max_pending`](proclaim_core::consumer::Consumer::max_pending)
    /// (default 1,024) plus [`batch_size`](Self::batch_size), times the
    /// number of sources of the group, or sources wait for each other.
    pub max_ack_pending: u32,
    /// Deliveries of one message at most (default: no limit). Once reached,
    /// the server stops delivering the message and it is neither handled nor
    /// parked, so leave it unset unless something else watches for that:
    /// the consumer parks what it cannot handle.
    pub max_deliver: Option<u32>,
    /// Messages the source pulls ahead of the consumer (default 64): it
    /// asks the server for no more than this many at a time, and keeps
    /// those it holds in progress at the server until the consumer takes
    /// them. Of the group's messages, one source holds at most this many
    /// plus those the consumer is working on.
    pub batch_size: u32,
}

impl Default for JetStreamSourceConfig {
    /// Settings without a group name (which [`validate`](Self::validate)
    /// requires): use [`JetStreamSourceConfig::new`].
    fn default() -> Self {
        JetStreamSourceConfig {
            group: String::new(),
            filter_subject: None,
            event_types: Vec::new(),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 2048,
            max_deliver: None,
            batch_size: 64,
        }
    }
}

impl JetStreamSourceConfig {
    /// Default settings for the consumer group `group`.
    ///
    /// ```
    /// let config = proclaim_nats::JetStreamSourceConfig::new("volunteer-thank-you");
    /// assert_eq!(config.group, "volunteer-thank-you");
    /// assert_eq!(config.ack_wait, std::time::Duration::from_secs(30));
    /// ```
    pub fn new(group: impl Into<String>) -> Self {
        JetStreamSourceConfig {
            group: group.into(),
            ..Default::default()
        }
    }

    /// Sets [`JetStreamSourceConfig::filter_subject`].
    pub fn with_filter_subject(mut self, filter: impl Into<String>) -> Self {
        self.filter_subject = Some(filter.into());
        self
    }

    /// Sets [`JetStreamSourceConfig::event_types`].
    pub fn with_event_types<I, T>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.event_types = types.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`JetStreamSourceConfig::ack_wait`].
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// Sets [`JetStreamSourceConfig::max_ack_pending`].
    pub fn with_max_ack_pending(mut self, n: u32) -> Self {
        self.max_ack_pending = n;
        self
    }

    /// Sets [`JetStreamSourceConfig::max_deliver`].
    pub fn with_max_deliver(mut self, n: u32) -> Self {
        self.max_deliver = Some(n);
        self
    }

    /// Sets [`JetStreamSourceConfig::batch_size`].
    pub fn with_batch_size(mut self, n: u32) -> Self {
        self.batch_size = n;
        self
    }

    /// Checks the group name, the filters and the limits.
    ///
    /// ```
    /// use proclaim_nats::JetStreamSourceConfig;
    ///
    /// let err = JetStreamSourceConfig::new("ledger").with_filter_subject("a.>.b").validate();
    /// assert!(err.unwrap_err().0.contains("filter_subject"));
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_group(&self.group)?;
        if let Some(filter) = &self.filter_subject {
            check_filter(filter).map_err(|reason| {
                ConfigError(format!(
                    "filter_subject {filter:?} is not a valid NATS subject filter: it {reason}"
                ))
            })?;
        }
        if self.event_types.iter().any(|t| t.trim().is_empty()) {
            return Err(ConfigError("event_types has an empty type".into()));
        }
        if self.ack_wait < Duration::from_millis(100) {
            return Err(ConfigError(format!(
                "ack_wait must be at least 100ms, not {:?}",
                self.ack_wait
            )));
        }
        if self.max_ack_pending == 0 {
            return Err(ConfigError("max_ack_pending must be at least 1".into()));
        }
        if self.max_deliver == Some(0) {
            return Err(ConfigError(
                "max_deliver must be at least 1 (or unset for no limit)".into(),
            ));
        }
        if self.batch_size == 0 {
            return Err(ConfigError("batch_size must be at least 1".into()));
        }
        Ok(())
    }

    /// The filter the server applies: the configured filter subject, or the
    /// subject of the only event type when the template makes it from the
    /// prefix and the type alone.
    fn server_filter(&self, nats: &NatsConfig) -> Result<Option<String>, ConfigError> {
        if let Some(filter) = &self.filter_subject {
            return Ok(Some(filter.clone()));
        }
        let [only] = self.event_types.as_slice() else {
            return Ok(None);
        };
        let all = [
            Placeholder::Prefix,
            Placeholder::Type,
            Placeholder::Subject,
            Placeholder::Source,
        ];
        let template = Template::parse(&nats.subject_template, &all).map_err(|e| {
            ConfigError(format!("subject_template {:?} {e}", nats.subject_template))
        })?;
        if template
            .placeholders()
            .any(|p| !matches!(p, Placeholder::Prefix | Placeholder::Type))
        {
            return Ok(None);
        }
        let subject = template.render_with(|p| match p {
            Placeholder::Prefix => nats.subject_prefix.as_str(),
            _ => only.as_str(),
        });
        check_tokens(&subject).map_err(|reason| {
            ConfigError(format!(
                "event type {only:?} cannot be selected by subject: {subject:?} {reason}"
            ))
        })?;
        Ok(Some(subject))
    }

    /// The durable consumer to create when it is missing.
    fn consumer_config(&self, filter: Option<String>) -> pull::Config {
        pull::Config {
            durable_name: Some(self.group.clone()),
            description: Some("proclaim consumer group".into()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver.map_or(-1, i64::from),
            filter_subject: filter.unwrap_or_default(),
            max_ack_pending: i64::from(self.max_ack_pending),
            ..Default::default()
        }
    }
}

fn check_group(group: &str) -> Result<(), ConfigError> {
    let fail = |reason: &str| ConfigError(format!("consumer group name {group:?} {reason}"));
    if group.is_empty() {
        return Err(fail("is empty"));
    }
    if group.len() > MAX_GROUP_LEN {
        return Err(fail(&format!("is longer than {MAX_GROUP_LEN} bytes")));
    }
    if group.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(fail("contains whitespace or a control character"));
    }
    if let Some(c) = group
        .chars()
        .find(|c| matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err(fail(&format!(
            "contains {c:?} (not allowed in JetStream consumer names)"
        )));
    }
    Ok(())
}

/// Why a [`JetStreamSource`] could not be built.
///
/// ```
/// use proclaim_nats::{JetStreamSource, JetStreamSourceConfig, JetStreamSourceError, NatsConfig};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // Settings are checked before connecting.
/// let err = JetStreamSource::connect(NatsConfig::default(), JetStreamSourceConfig::new("a.b")).await;
/// assert!(matches!(err, Err(JetStreamSourceError::Nats(proclaim_nats::NatsError::Config(_)))));
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JetStreamSourceError {
    /// A setting is invalid, the server cannot be reached, or the stream is
    /// missing (as for [`NatsPublisher::connect`]).
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// The durable consumer could not be looked up or created, or exists in
    /// a form the source cannot use.
    #[error("cannot {action} durable consumer {group} of JetStream stream {stream}: {reason}")]
    Consumer {
        /// The consumer group (the durable's name).
        group: String,
        /// The stream's name.
        stream: String,
        /// `create or look up`, or `use`.
        action: &'static str,
        /// What went wrong.
        reason: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },
}

impl From<ConfigError> for JetStreamSourceError {
    fn from(e: ConfigError) -> Self {
        JetStreamSourceError::Nats(NatsError::Config(e))
    }
}

/// The messages one source holds unsettled, kept in progress at the server.
#[derive(Default)]
struct InProgress {
    next_id: AtomicU64,
    held: Mutex<HashMap<u64, (Subject, Instant)>>,
}

impl InProgress {
    fn hold(self: &Arc<Self>, reply: Subject) -> Held {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, (reply, Instant::now()));
        Held {
            id,
            registry: self.clone(),
        }
    }

    /// The reply subjects of the messages held for at least `age`.
    fn held_for(&self, age: Duration) -> Vec<Subject> {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|(_, since)| since.elapsed() >= age)
            .map(|(reply, _)| reply.clone())
            .collect()
    }
}

/// A message's place in [`InProgress`], given up when dropped.
struct Held {
    id: u64,
    registry: Arc<InProgress>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.registry
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// Tells the server, every `interval`, that the held messages are still in
/// progress; ends once the source and all its ackers are gone.
async fn keep_in_progress(client: Client, registry: Weak<InProgress>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        // Held for half an interval or more: the first in-progress comes
        // at most one and a half intervals (half of ack_wait) after receipt.
        let Some(due) = registry.upgrade().map(|r| r.held_for(interval / 2)) else {
            return;
        };
        for reply in due {
            if let Err(e) = client.publish(reply, AckKind::Progress.into()).await {
                tracing::debug!(error = %e, "cannot send in-progress to JetStream");
                break;
            }
        }
    }
}

/// Settles one JetStream message: `+ACK` or `-NAK`, confirmed by the server.
struct JetStreamAcker {
    client: Client,
    reply: Subject,
    timeout: Duration,
    _held: Held,
}

impl JetStreamAcker {
    async fn settle(self, kind: AckKind, what: &str) -> Result<(), SourceError> {
        let JetStreamAcker {
            client,
            reply,
            timeout,
            _held: held,
        } = self;
        // No longer in progress: if the ack is lost, the server redelivers
        // the message after ack_wait (and the inbox skips it).
        drop(held);
        let request = async_nats::Request::new()
            .payload(kind.into())
            .timeout(Some(timeout));
        client
            .send_request(reply, request)
            .await
            .map(drop)
            .map_err(|e| {
                SourceError::new(format!("JetStream did not confirm the {what}")).with_source(e)
            })
    }
}

impl Acker for JetStreamAcker {
    async fn ack(self) -> Result<(), SourceError> {
        self.settle(AckKind::Ack, "ack").await
    }

    /// Asks for a redelivery after `delay`, and after one second at least
    /// (see `MIN_NACK_DELAY`).
    async fn nack(self, delay: Duration) -> Result<(), SourceError> {
        let delay = delay.max(MIN_NACK_DELAY);
        self.settle(AckKind::Nak(Some(delay)), "nack").await
    }
}

/// A message the puller received, waiting for the consumer to take it.
struct Pulled {
    /// The event, or why the message is not one (and its body).
    payload: Result<Event, (String, Vec<u8>)>,
    /// The server's delivery count.
    attempt: Option<u32>,
    acker: JetStreamAcker,
}

impl Pulled {
    fn into_incoming(self) -> Incoming {
        let incoming = match self.payload {
            Ok(event) => Incoming::new(event, self.acker),
            Err((reason, raw)) => Incoming::undecodable(reason, raw, self.acker),
        };
        match self.attempt {
            Some(attempt) => incoming.with_delivery_attempt(attempt),
            None => incoming,
        }
    }
}

type Pulls = mpsc::Sender<Result<Pulled, SourceError>>;

/// Why the durable consumer could not be looked up, created or used.
struct DurableFailure {
    /// `create or look up`, or `use`.
    action: &'static str,
    reason: String,
    source: Option<BoxError>,
}

/// The task that pulls the group's messages into the source's queue. It
/// asks the server for no more messages than the queue has room for, so
/// every message the server has delivered is either in the queue or held by
/// the consumer — and kept in progress in both places.
struct Puller {
    client: Client,
    jetstream: jetstream::Context,
    stream: String,
    group: String,
    wanted: pull::Config,
    types: Vec<String>,
    settle_timeout: Duration,
    in_progress: Arc<InProgress>,
    consumer: Option<PullConsumer>,
}

impl Puller {
    /// Looks up the durable consumer, creating it if it is missing, and
    /// checks that it can be used.
    async fn durable(&self) -> Result<PullConsumer, DurableFailure> {
        let lookup = |e: BoxError| DurableFailure {
            action: "create or look up",
            reason: e.to_string(),
            source: Some(e),
        };
        let stream = self
            .jetstream
            .get_stream(&self.stream)
            .await
            .map_err(|e| lookup(e.into()))?;
        let consumer = stream
            .get_or_create_consumer(&self.group, self.wanted.clone())
            .await
            .map_err(|e| lookup(e.into()))?;
        let found = &consumer.cached_info().config;
        if found.ack_policy != AckPolicy::Explicit {
            return Err(DurableFailure {
                action: "use",
                reason: format!(
                    "it acknowledges with policy {:?}, and a consumer group needs explicit acks \
                     (delete it, or choose another group name)",
                    found.ack_policy
                ),
                source: None,
            });
        }
        let wanted = &self.wanted;
        if found.filter_subject != wanted.filter_subject
            || found.ack_wait != wanted.ack_wait
            || found.max_ack_pending != wanted.max_ack_pending
            || found.max_deliver != wanted.max_deliver
        {
            tracing::warn!(
                stream = %self.stream,
                group = %self.group,
                filter_subject = %found.filter_subject,
                ack_wait = ?found.ack_wait,
                max_ack_pending = found.max_ack_pending,
                max_deliver = found.max_deliver,
                "the durable consumer exists with other settings than configured; it keeps \
                 its own (update or delete it to change them)"
            );
        }
        Ok(consumer)
    }

    /// Pulls until the source is gone. A failure is reported to the
    /// consumer (as a failed receive) and followed by a fresh start after a
    /// backoff: the durable is looked up again, and created again if it was
    /// deleted.
    async fn run(mut self, queue: Pulls) {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut failures = 0u32;
        loop {
            let room = queue.capacity();
            if room == 0 {
                // Wait for the consumer to take a message.
                match queue.reserve().await {
                    Ok(permit) => drop(permit),
                    Err(_) => return,
                }
                continue;
            }
            match self.pull(room, &queue).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    self.consumer = None;
                    failures = failures.saturating_add(1);
                    tracing::debug!(error = %e.full_message(), failures, "pulling from JetStream failed; starting over");
                    if queue.send(Err(e)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(backoff.delay(failures)).await;
                }
            }
            if queue.is_closed() {
                return;
            }
        }
    }

    fn failure(&self, what: &str, e: impl Into<BoxError>) -> SourceError {
        let e = e.into();
        SourceError::new(format!(
            "{what} durable consumer {} of JetStream stream {}: {e}",
            self.group, self.stream
        ))
        .with_source(e)
    }

    /// One pull request for up to `room` messages, forwarded to `queue` as
    /// they arrive; ends when the request is done or expires, or when the
    /// connection came back after a loss (the request may be gone).
    async fn pull(&mut self, room: usize, queue: &Pulls) -> Result<(), SourceError> {
        let consumer = match &self.consumer {
            Some(consumer) => consumer.clone(),
            None => {
                let consumer = self.durable().await.map_err(|f| {
                    let error = SourceError::new(format!(
                        "cannot {} durable consumer {} of JetStream stream {}: {}",
                        f.action, self.group, self.stream, f.reason
                    ));
                    match f.source {
                        Some(source) => error.with_source(source),
                        None => error,
                    }
                })?;
                self.consumer = Some(consumer.clone());
                consumer
            }
        };
        let mut batch = consumer
            .batch()
            .max_messages(room)
            .expires(PULL_EXPIRES)
            .messages()
            .await
            .map_err(|e| self.failure("cannot pull from", e))?;
        // A reconnection may lose the pull request at the server: ask anew.
        let connects = self.client.statistics().connects.load(Ordering::Relaxed);
        let mut checks = tokio::time::interval(CONNECTION_CHECK);
        loop {
            tokio::select! {
                next = batch.next() => match next {
                    Some(Ok(message)) => {
                        if !self.forward(message, queue).await {
                            return Ok(());
                        }
                    }
                    Some(Err(e)) if e.to_string().contains("Consumer Deleted") => {
                        return Err(SourceError::new(format!(
                            "durable consumer {} of JetStream stream {} was deleted; it is \
                             created again and delivers the stream from its start (the inbox \
                             skips what was handled)",
                            self.group, self.stream
                        ))
                        .with_source(e));
                    }
                    Some(Err(e)) => return Err(self.failure("receiving from", e)),
                    None => return Ok(()),
                },
                _ = checks.tick() => {
                    let now = self.client.statistics().connects.load(Ordering::Relaxed);
                    if now != connects && self.client.connection_state() == State::Connected {
                        tracing::debug!(group = %self.group, "reconnected to NATS; pulling anew");
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Hands one message to the queue, or acks it here when its type is not
    /// one the group reads. `false` once the queue is gone.
    async fn forward(&self, message: jetstream::Message, queue: &Pulls) -> bool {
        let attempt = message
            .info()
            .ok()
            .and_then(|info| u32::try_from(info.delivered).ok());
        let mut message = message.message;
        let Some(reply) = message.reply.take() else {
            tracing::warn!(subject = %message.subject, "a message without a reply subject; ignoring it");
            return true;
        };
        let acker = JetStreamAcker {
            client: self.client.clone(),
            timeout: self.settle_timeout,
            _held: self.in_progress.hold(reply.clone()),
            reply,
        };
        let payload = match decode_message(&message) {
            Ok(event) => {
                if !self.types.is_empty() && !self.types.iter().any(|t| t == event.event_type()) {
                    tracing::debug!(event_id = %event.id(), event_type = event.event_type(), "an event of a type this group does not read; acking it");
                    if let Err(e) = acker.ack().await {
                        tracing::debug!(error = %e.full_message(), "ack of a skipped event failed; it is redelivered");
                    }
                    return true;
                }
                Ok(event)
            }
            Err(e) => Err((e.to_string(), message.payload.to_vec())),
        };
        queue
            .send(Ok(Pulled {
                payload,
                attempt,
                acker,
            }))
            .await
            .is_ok()
    }
}

/// A consumer [`Source`] reading a JetStream stream as one member of a
/// consumer group (a durable pull consumer); see the [module docs](self).
///
/// A task of its own pulls the group's messages into a queue of
/// [`batch_size`](JetStreamSourceConfig::batch_size) messages, asking the
/// server for no more than the queue has room for; the consumer takes them
/// with [`receive`](Source::receive). Failures — the durable deleted, the
/// stream gone — come out of `receive` as [`SourceError`]s, and the task
/// starts over: it looks the durable up again (creating it anew if it was
/// deleted, which delivers the whole stream again for the inbox to skip).
/// After a lost connection the client reconnects by itself and the task
/// pulls again. Dropping the source stops the task and hands the queued
/// messages back to the server at once.
///
/// ```no_run
/// use proclaim_core::consumer::{Consumer, Context};
/// use proclaim_nats::{JetStreamSource, JetStreamSourceConfig, NatsConfig};
///
/// # async fn demo(parked: impl proclaim_core::inbox::ParkedEvents) -> Result<(), Box<dyn std::error::Error>> {
/// let nats = NatsConfig::default().with_stream("CAMPAIGN").with_subject_prefix("campaign");
/// let source =
///     JetStreamSource::connect(nats, JetStreamSourceConfig::new("fundraising-strategy")).await?;
/// let handle = Consumer::new(source.group())
///     .on_event("*", |cx: Context<()>| async move {
///         tracing::info!(id = %cx.event.id(), kind = cx.event.event_type(), "seen");
///         Ok(())
///     })
///     .park_into(parked)
///     .spawn(source)?;
/// # let _ = handle;
/// # Ok(()) }
/// ```
pub struct JetStreamSource {
    client: Client,
    stream: String,
    group: String,
    filter_subject: String,
    queue: Option<mpsc::Receiver<Result<Pulled, SourceError>>>,
    puller: Option<tokio::task::JoinHandle<()>>,
}

impl fmt::Debug for JetStreamSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamSource")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("filter_subject", &self.filter_subject)
            .finish_non_exhaustive()
    }
}

impl JetStreamSource {
    /// Connects to [`NatsConfig::url`] (within
    /// [`NatsConfig::connect_timeout`]), checks the stream (creating it
    /// with [`NatsConfig::create_stream`]) as [`NatsPublisher::connect`]
    /// does, looks up the group's durable consumer, creating it if it is
    /// missing, and starts pulling.
    ///
    /// An existing durable keeps its own settings: a difference from
    /// `config` is logged, and one that cannot work (not a pull consumer,
    /// acks not explicit) is an error.
    pub async fn connect(
        nats: NatsConfig,
        config: JetStreamSourceConfig,
    ) -> Result<Self, JetStreamSourceError> {
        config.validate()?;
        config.server_filter(&nats)?;
        let connection = NatsPublisher::connect(nats).await?;
        Self::start(connection, config).await
    }

    /// Like [`JetStreamSource::connect`], on a client the caller already
    /// holds ([`NatsConfig::url`] is then only used in messages).
    pub async fn from_client(
        client: Client,
        nats: NatsConfig,
        config: JetStreamSourceConfig,
    ) -> Result<Self, JetStreamSourceError> {
        config.validate()?;
        config.server_filter(&nats)?;
        let connection = NatsPublisher::from_client(client, nats).await?;
        Self::start(connection, config).await
    }

    async fn start(
        connection: NatsPublisher,
        config: JetStreamSourceConfig,
    ) -> Result<Self, JetStreamSourceError> {
        let nats = connection.config();
        let filter = config.server_filter(nats)?;
        let mut puller = Puller {
            client: connection.client().clone(),
            jetstream: connection.jetstream().clone(),
            stream: nats.stream.clone(),
            group: config.group.clone(),
            wanted: config.consumer_config(filter),
            types: config.event_types.clone(),
            settle_timeout: nats.ack_timeout.min(SETTLE_TIMEOUT),
            in_progress: Arc::default(),
            consumer: None,
        };
        let consumer = puller
            .durable()
            .await
            .map_err(|f| JetStreamSourceError::Consumer {
                group: puller.group.clone(),
                stream: puller.stream.clone(),
                action: f.action,
                reason: f.reason,
                source: f.source,
            })?;
        let filter_subject = consumer.cached_info().config.filter_subject.clone();
        tracing::info!(
            stream = %puller.stream,
            group = %puller.group,
            %filter_subject,
            "JetStream consumer group ready"
        );
        puller.consumer = Some(consumer);
        let interval = (config.ack_wait / 3).max(Duration::from_millis(10));
        tokio::spawn(keep_in_progress(
            puller.client.clone(),
            Arc::downgrade(&puller.in_progress),
            interval,
        ));
        let capacity = usize::try_from(config.batch_size).unwrap_or(usize::MAX);
        let (queue, received) =
            mpsc::channel(capacity.clamp(1, tokio::sync::Semaphore::MAX_PERMITS));
        Ok(JetStreamSource {
            client: puller.client.clone(),
            stream: puller.stream.clone(),
            group: puller.group.clone(),
            filter_subject,
            queue: Some(received),
            puller: Some(tokio::spawn(puller.run(queue))),
        })
    }

    /// The consumer group (the durable consumer's name).
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The stream the group reads.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The NATS client.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl Source for JetStreamSource {
    async fn receive(&mut self) -> Option<Result<Incoming, SourceError>> {
        match self.queue.as_mut()?.recv().await {
            Some(Ok(pulled)) => Some(Ok(pulled.into_incoming())),
            Some(Err(e)) => Some(Err(e)),
            None => {
                tracing::error!(group = %self.group, "the JetStream pulling task stopped");
                None
            }
        }
    }
}

impl Drop for JetStreamSource {
    /// Stops pulling, then hands the queued messages the consumer never
    /// took back to the server with an immediate nack: they are redelivered
    /// to the group's other sources (or to the next start) at once instead
    /// of after `ack_wait`.
    fn drop(&mut self) {
        let (Some(puller), Some(mut queue)) = (self.puller.take(), self.queue.take()) else {
            return;
        };
        puller.abort();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone();
        runtime.spawn(async move {
            // Once the task is gone, its pull request is unsubscribed: the
            // server sends the redeliveries elsewhere, not back here.
            let _ = puller.await;
            queue.close();
            let mut unread = Vec::new();
            while let Ok(item) = queue.try_recv() {
                unread.extend(item.ok());
            }
            if unread.is_empty() {
                return;
            }
            tracing::debug!(unread = unread.len(), "handing back unread messages");
            for pulled in &unread {
                let reply = pulled.acker.reply.clone();
                if let Err(e) = client.publish(reply, AckKind::Nak(None).into()).await {
                    tracing::debug!(error = %e, "cannot hand back an unread message; it is redelivered after ack_wait");
                    return;
                }
            }
            if let Err(e) = client.flush().await {
                tracing::debug!(error = %e, "cannot flush the nacks of unread messages");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_are_checked() {
        for good in ["volunteer-thank-you", "Ledger_2", "a"] {
            assert_eq!(
                JetStreamSourceConfig::new(good).validate(),
                Ok(()),
                "{good}"
            );
        }
        let long = "g".repeat(MAX_GROUP_LEN + 1);
        for bad in [
            "",
            "a.b",
            "a*",
            "a>",
            "a/b",
            "a\\b",
            "a b",
            "a\tb",
            long.as_str(),
        ] {
            assert!(
                JetStreamSourceConfig::new(bad).validate().is_err(),
                "{bad:?} was accepted"
            );
        }
        let err = JetStreamSourceConfig::new("thank.you").validate().err();
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some(
                "invalid configuration: consumer group name \"thank.you\" contains '.' \
                 (not allowed in JetStream consumer names)"
            )
        );
    }

    #[test]
    fn filters_and_limits_are_checked() {
        let base = JetStreamSourceConfig::new("g");
        for good in ["a", "a.*", "a.>", "a.*.c", ">", "*"] {
            assert_eq!(
                base.clone().with_filter_subject(good).validate(),
                Ok(()),
                "{good}"
            );
        }
        for bad in ["", "a..b", ".a", "a.", "a.>.b", "a b"] {
            assert!(
                base.clone().with_filter_subject(bad).validate().is_err(),
                "{bad:?} was accepted"
            );
        }
        assert!(base.clone().with_event_types([" "]).validate().is_err());
        assert!(
            base.clone()
                .with_ack_wait(Duration::from_millis(99))
                .validate()
                .is_err()
        );
        assert!(base.clone().with_max_ack_pending(0).validate().is_err());
        assert!(base.clone().with_max_deliver(0).validate().is_err());
        assert!(base.clone().with_batch_size(0).validate().is_err());
        assert_eq!(base.with_max_deliver(3).validate(), Ok(()));
    }

    #[test]
    fn one_event_type_becomes_a_server_filter_when_the_template_allows() {
        let nats = NatsConfig::default().with_subject_prefix("campaign");
        let filter = |config: JetStreamSourceConfig, nats: &NatsConfig| config.server_filter(nats);
        let g = JetStreamSourceConfig::new("g");

        assert_eq!(filter(g.clone(), &nats), Ok(None));
        assert_eq!(
            filter(g.clone().with_event_types(["DonorSecured"]), &nats),
            Ok(Some("campaign.DonorSecured".into()))
        );
        // Several types: the source filters them itself.
        assert_eq!(
            filter(
                g.clone().with_event_types(["DonorSecured", "PledgeMade"]),
                &nats
            ),
            Ok(None)
        );
        // A template that uses more than the type: no subject selects a type.
        let per_subject = nats
            .clone()
            .with_subject_template("{prefix}.{type}.{subject}");
        assert_eq!(
            filter(g.clone().with_event_types(["DonorSecured"]), &per_subject),
            Ok(None)
        );
        let fixed = nats.clone().with_subject_template("events.{type}");
        assert_eq!(
            filter(g.clone().with_event_types(["DonorSecured"]), &fixed),
            Ok(Some("events.DonorSecured".into()))
        );
        // An explicit filter wins.
        assert_eq!(
            filter(
                g.clone()
                    .with_filter_subject("campaign.>")
                    .with_event_types(["DonorSecured"]),
                &nats
            ),
            Ok(Some("campaign.>".into()))
        );
        // A type that cannot be a subject token cannot be selected by subject.
        assert!(filter(g.with_event_types(["Donor Secured"]), &nats).is_err());
    }

    #[test]
    fn creates_a_durable_with_explicit_acks_from_the_start() {
        let config = JetStreamSourceConfig::new("ledger")
            .with_ack_wait(Duration::from_secs(45))
            .with_max_ack_pending(100);
        let wanted = config.consumer_config(Some("campaign.>".into()));
        assert_eq!(wanted.durable_name.as_deref(), Some("ledger"));
        assert_eq!(wanted.ack_policy, AckPolicy::Explicit);
        assert_eq!(wanted.deliver_policy, DeliverPolicy::All);
        assert_eq!(wanted.ack_wait, Duration::from_secs(45));
        assert_eq!((wanted.max_ack_pending, wanted.max_deliver), (100, -1));
        assert_eq!(wanted.filter_subject, "campaign.>");
        let limited = JetStreamSourceConfig::new("ledger").with_max_deliver(7);
        assert_eq!(limited.consumer_config(None).max_deliver, 7);
        assert_eq!(limited.consumer_config(None).filter_subject, "");
    }

    #[test]
    fn deserializes_with_defaults_and_humantime() -> Result<(), serde_json::Error> {
        let config: JetStreamSourceConfig = serde_json::from_str(
            r#"{"group":"ledger","event_types":["DonorSecured"],"ack_wait":"1m","batch_size":8}"#,
        )?;
        assert_eq!(
            config,
            JetStreamSourceConfig::new("ledger")
                .with_event_types(["DonorSecured"])
                .with_ack_wait(Duration::from_secs(60))
                .with_batch_size(8)
        );
        let json = serde_json::to_value(JetStreamSourceConfig::new("g"))?;
        assert_eq!(json["ack_wait"], "30s");
        assert!(serde_json::from_str::<JetStreamSourceConfig>(r#"{"durable":"x"}"#).is_err());
        Ok(())
    }

    #[test]
    fn held_messages_are_listed_once_old_enough_and_forgotten_when_dropped() {
        let registry = Arc::<InProgress>::default();
        let first = registry.hold(Subject::from("$JS.ACK.s.c.1.1.1.0.0"));
        let second = registry.hold(Subject::from("$JS.ACK.s.c.1.2.2.0.0"));
        assert_eq!(registry.held_for(Duration::ZERO).len(), 2);
        assert!(registry.held_for(Duration::from_secs(3600)).is_empty());
        drop(first);
        let left = registry.held_for(Duration::ZERO);
        assert_eq!(left, vec![Subject::from("$JS.ACK.s.c.1.2.2.0.0")]);
        drop(second);
        assert!(registry.held_for(Duration::ZERO).is_empty());
    }
}
