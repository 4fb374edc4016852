//! [`JetStreamReplay`]: a JetStream stream as a projector's replayable log.
//!
//! A projector (`proclaim_core::projector::Projector`) reads the stream
//! from its checkpoint: the position of an entry is the message's **stream
//! sequence**, so a checkpoint says exactly where in the stream a read
//! model is, and position 0 replays the stream from its start. The source
//! reads through an ephemeral pull consumer that acknowledges nothing
//! (`AckPolicy::None`, in memory), created at the position asked for
//! (`DeliverPolicy::ByStartSequence`) and kept while reads go on from where
//! the last one ended; any other position, an error or an interrupted read
//! makes the next read start a new consumer there. Nothing is left at the
//! server: the consumer is deleted when the source moves on or is dropped,
//! and expires after two idle minutes otherwise. Each message is read back
//! with [`decode_message`]; one that is not a proclaim event becomes an
//! undecodable entry, at which the projector stops.
//!
//! **Nothing skipped silently.** A read after a position the stream no
//! longer holds the next messages of — removed by the stream's limits
//! (`max_msgs`, `max_age`, …) or a purge — fails permanently, naming the
//! missing sequences, unless [`JetStreamReplayConfig::allow_truncated`]
//! says to start at the oldest message still there. A read after a position
//! beyond the stream's last sequence (a checkpoint of another stream, or of
//! a stream deleted and created again) fails permanently too: rebuild the
//! projection. A stream re-created and already refilled past the checkpoint
//! cannot be told apart from the original.
//!
//! With a [`filter_subject`](JetStreamReplayConfig::filter_subject) only
//! the matching messages are read, so positions have gaps; the lag the
//! projector reports still counts every message of the stream.
//!
//! ```no_run
//! use proclaim_core::projector::{CheckpointStore, Projection, Projector};
//! use proclaim_nats::{JetStreamReplay, JetStreamReplayConfig, NatsConfig};
//!
//! # async fn demo<C: CheckpointStore, P: Projection<C::Tx>>(projection: P, checkpoints: C)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! let nats = NatsConfig::default()
//!     .with_url("nats://127.0.0.1:4222")
//!     .with_stream("CAMPAIGN")
//!     .with_subject_prefix("campaign");
//! let log = JetStreamReplay::connect(
//!     nats,
//!     JetStreamReplayConfig::default().with_filter_subject("campaign.DonorSecured"),
//! )
//! .await?;
//! let handle = Projector::new(projection, checkpoints, log).spawn()?; // catch up, then follow
//! # let _ = handle;
//! # Ok(()) }
//! ```

use std::fmt;
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use proclaim_core::ConfigError;
use proclaim_core::projector::{ReplayEntry, ReplayError, ReplaySource};
use serde::{Deserialize, Serialize};

use crate::subject::check_filter;
use crate::{NatsConfig, NatsError, NatsPublisher, decode_message};

/// How long the server keeps a reading consumer nobody pulls from.
const INACTIVE_THRESHOLD: Duration = Duration::from_secs(120);

/// Settings of a [`JetStreamReplay`]. Where the server and the stream are
/// comes from a [`NatsConfig`].
///
/// ```
/// use std::time::Duration;
/// use proclaim_nats::JetStreamReplayConfig;
///
/// let config = JetStreamReplayConfig::default()
///     .with_filter_subject("campaign.Donor*")
///     .with_request_timeout(Duration::from_secs(5));
/// assert!(config.validate().is_err()); // `Donor*` is not a NATS wildcard token
/// assert!(config.with_filter_subject("campaign.*").validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JetStreamReplayConfig {
    /// Only messages on NATS subjects matching this filter (wildcards
    /// allowed: `campaign.DonorSecured`, `campaign.>`), selected by the
    /// server. Default: every message of the stream.
    pub filter_subject: Option<String>,
    /// Start at the oldest message the stream still holds when the ones
    /// after the checkpoint were removed (by the stream's limits or a
    /// purge), instead of failing (default `false`: a read model that
    /// silently misses events is wrong).
    pub allow_truncated: bool,
    /// Upper bound of one request to the server (default 10 s): a read,
    /// the stream's state, creating the reading consumer.
    #[serde(with = "proclaim_core::duration::human")]
    pub request_timeout: Duration,
}

impl Default for JetStreamReplayConfig {
    fn default() -> Self {
        JetStreamReplayConfig {
            filter_subject: None,
            allow_truncated: false,
            request_timeout: Duration::from_secs(10),
        }
    }
}

impl JetStreamReplayConfig {
    /// Sets [`JetStreamReplayConfig::filter_subject`].
    pub fn with_filter_subject(mut self, filter: impl Into<String>) -> Self {
        self.filter_subject = Some(filter.into());
        self
    }

    /// Sets [`JetStreamReplayConfig::allow_truncated`].
    pub fn with_allow_truncated(mut self, allow: bool) -> Self {
        self.allow_truncated = allow;
        self
    }

    /// Sets [`JetStreamReplayConfig::request_timeout`].
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Checks the filter subject and the timeout.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(filter) = &self.filter_subject {
            check_filter(filter).map_err(|reason| {
                ConfigError(format!(
                    "filter_subject {filter:?} is not a valid NATS subject filter: it {reason}"
                ))
            })?;
        }
        if self.request_timeout < Duration::from_millis(100) {
            return Err(ConfigError(format!(
                "request_timeout must be at least 100ms, not {:?}",
                self.request_timeout
            )));
        }
        Ok(())
    }
}

/// A JetStream stream read as a projector's log ([`ReplaySource`]); see the
/// [module docs](self).
///
/// ```no_run
/// use std::time::Duration;
/// use proclaim_core::projector::ReplaySource;
/// use proclaim_nats::{JetStreamReplay, JetStreamReplayConfig, NatsConfig};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let nats = NatsConfig::default().with_stream("CAMPAIGN").with_subject_prefix("campaign");
/// let mut log = JetStreamReplay::connect(nats, JetStreamReplayConfig::default()).await?;
/// // The first 100 messages of the stream, by stream sequence.
/// for entry in log.read(0, 100, Duration::ZERO).await? {
///     match entry.payload {
///         Ok(event) => tracing::info!(seq = entry.position, kind = event.event_type(), "event"),
///         Err(bad) => tracing::warn!(seq = entry.position, reason = %bad.reason, "not an event"),
///     }
/// }
/// tracing::info!(last = log.end().await?, "stream end");
/// # Ok(()) }
/// ```
pub struct JetStreamReplay {
    client: Client,
    stream: stream::Stream,
    stream_name: String,
    config: JetStreamReplayConfig,
    /// The reading consumer, positioned right after `returned`.
    reader: Option<PullConsumer>,
    /// The position of the last entry returned by the reader (or the one it
    /// was created after).
    returned: u64,
    /// Set while a read runs: still set at the next read when the last one
    /// was dropped half-way, whose messages may be lost to the reader.
    reading: bool,
}

impl fmt::Debug for JetStreamReplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamReplay")
            .field("stream", &self.stream_name)
            .field("filter_subject", &self.config.filter_subject)
            .field("position", &self.returned)
            .finish_non_exhaustive()
    }
}

impl JetStreamReplay {
    /// Connects to [`NatsConfig::url`] (within
    /// [`NatsConfig::connect_timeout`]) and checks the stream (creating it
    /// with [`NatsConfig::create_stream`]) as
    /// [`NatsPublisher::connect`] does.
    pub async fn connect(
        nats: NatsConfig,
        config: JetStreamReplayConfig,
    ) -> Result<Self, NatsError> {
        config.validate()?;
        let connection = NatsPublisher::connect(nats).await?;
        Self::start(connection, config).await
    }

    /// Like [`JetStreamReplay::connect`], on a client the caller already
    /// holds ([`NatsConfig::url`] is then only used in messages).
    pub async fn from_client(
        client: Client,
        nats: NatsConfig,
        config: JetStreamReplayConfig,
    ) -> Result<Self, NatsError> {
        config.validate()?;
        let connection = NatsPublisher::from_client(client, nats).await?;
        Self::start(connection, config).await
    }

    async fn start(
        connection: NatsPublisher,
        config: JetStreamReplayConfig,
    ) -> Result<Self, NatsError> {
        let stream_name = connection.config().stream.clone();
        let stream = connection
            .jetstream()
            .get_stream(&stream_name)
            .await
            .map_err(|e| NatsError::Stream {
                stream: stream_name.clone(),
                action: "look up",
                reason: e.to_string(),
                source: Some(e.into()),
            })?;
        tracing::debug!(stream = %stream_name, filter_subject = ?config.filter_subject, "JetStream replay ready");
        Ok(JetStreamReplay {
            client: connection.client().clone(),
            stream,
            stream_name,
            config,
            reader: None,
            returned: 0,
            reading: false,
        })
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.stream_name
    }

    /// The NATS client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn failure(&self, what: &str, e: impl Into<proclaim_core::BoxError>) -> ReplayError {
        let e = e.into();
        ReplayError::transient(format!("{what} JetStream stream {}: {e}", self.stream_name))
            .with_source(e)
    }

    fn timed_out(&self, what: &str) -> ReplayError {
        ReplayError::transient(format!(
            "{what} JetStream stream {} did not finish within {:?}",
            self.stream_name, self.config.request_timeout
        ))
    }

    /// The stream's state now.
    async fn state(&mut self) -> Result<stream::State, ReplayError> {
        let timeout = self.config.request_timeout;
        match tokio::time::timeout(timeout, self.stream.info()).await {
            Ok(Ok(info)) => Ok(info.state.clone()),
            Ok(Err(e)) => Err(self.failure("cannot read the state of", e)),
            Err(_) => Err(self.timed_out("reading the state of")),
        }
    }

    /// Drops the reading consumer (deleted at the server in the
    /// background).
    fn discard_reader(&mut self) {
        let Some(reader) = self.reader.take() else {
            return;
        };
        let name = reader.cached_info().name.clone();
        let stream = self.stream.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = stream.delete_consumer(&name).await {
                    tracing::debug!(consumer = %name, error = %e, "cannot delete a replay consumer; it expires by itself");
                }
            });
        }
    }

    /// Starts a reading consumer right after `after`, once the stream is
    /// known to still hold what follows it.
    async fn reposition(&mut self, after: u64) -> Result<(), ReplayError> {
        self.discard_reader();
        let state = self.state().await?;
        let (first, last) = (state.first_sequence, state.last_sequence);
        if after > last {
            return Err(ReplayError::permanent(format!(
                "position {after} is beyond the end of JetStream stream {} (last sequence {last}): \
                 the checkpoint belongs to another stream, or the stream was deleted and created \
                 again — rebuild the projection",
                self.stream_name
            )));
        }
        if after.saturating_add(1) < first {
            let missing = format!("{}..={}", after + 1, first - 1);
            if !self.config.allow_truncated {
                return Err(ReplayError::permanent(format!(
                    "JetStream stream {} no longer holds sequences {missing} (removed by its limits \
                     or a purge): reading after position {after} would skip them; set \
                     allow_truncated to start at sequence {first} instead",
                    self.stream_name
                )));
            }
            tracing::warn!(stream = %self.stream_name, missing = %missing, first, "the stream no longer holds the messages after the position; starting at its oldest (allow_truncated)");
        }
        let config = pull::Config {
            description: Some("proclaim projector replay".into()),
            deliver_policy: if after == 0 {
                DeliverPolicy::All
            } else {
                DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                }
            },
            ack_policy: AckPolicy::None,
            filter_subject: self.config.filter_subject.clone().unwrap_or_default(),
            inactive_threshold: INACTIVE_THRESHOLD,
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        };
        let timeout = self.config.request_timeout;
        let reader = match tokio::time::timeout(timeout, self.stream.create_consumer(config)).await
        {
            Ok(Ok(reader)) => reader,
            Ok(Err(e)) => return Err(self.failure("cannot create a reading consumer on", e)),
            Err(_) => return Err(self.timed_out("creating a reading consumer on")),
        };
        tracing::debug!(stream = %self.stream_name, after, consumer = %reader.cached_info().name, "replaying");
        self.reader = Some(reader);
        self.returned = after;
        Ok(())
    }

    /// Up to `max` messages from the reader: those there now, or (when
    /// there are none) the first to arrive within `wait` and those right
    /// behind it.
    async fn read_positioned(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReplayEntry>, ReplayError> {
        let Some(reader) = self.reader.clone() else {
            return Err(ReplayError::transient("no reading consumer"));
        };
        let mut entries = Vec::new();
        self.pull(&reader, max, None, &mut entries).await?;
        if entries.is_empty() && !wait.is_zero() {
            self.pull(&reader, 1, Some(wait), &mut entries).await?;
            if !entries.is_empty() && max > 1 {
                self.pull(&reader, max - 1, None, &mut entries).await?;
            }
        }
        Ok(entries)
    }

    /// One pull request: for the messages there now (`wait` `None`), or
    /// waiting up to `wait` for them.
    async fn pull(
        &self,
        reader: &PullConsumer,
        max: usize,
        wait: Option<Duration>,
        entries: &mut Vec<ReplayEntry>,
    ) -> Result<(), ReplayError> {
        let request = self.config.request_timeout;
        let batch = match wait {
            None => reader.fetch().max_messages(max).messages().await,
            Some(wait) => {
                reader
                    .batch()
                    .max_messages(max)
                    .expires(wait)
                    .messages()
                    .await
            }
        };
        let mut batch = batch.map_err(|e| self.failure("cannot pull from", e))?;
        let bound = request + wait.unwrap_or_default();
        let drained = tokio::time::timeout(bound, async {
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| self.failure("cannot read from", e))?;
                let entry = self.entry(&message)?;
                let previous = entries.last().map_or(self.returned, |e| e.position);
                if entry.position <= previous {
                    return Err(ReplayError::transient(format!(
                        "JetStream stream {} delivered sequence {} after {previous}",
                        self.stream_name, entry.position
                    )));
                }
                entries.push(entry);
            }
            Ok(())
        })
        .await;
        match drained {
            Ok(result) => result,
            Err(_) => Err(self.timed_out("reading")),
        }
    }

    fn entry(&self, message: &jetstream::Message) -> Result<ReplayEntry, ReplayError> {
        let position = message
            .info()
            .map_err(|e| self.failure("a message without its sequence from", e))?
            .stream_sequence;
        Ok(match decode_message(message) {
            Ok(event) => ReplayEntry::event(position, event),
            Err(e) => ReplayEntry::undecodable(position, e.to_string(), message.payload.to_vec()),
        })
    }
}

impl ReplaySource for JetStreamReplay {
    async fn read(
        &mut self,
        after: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReplayEntry>, ReplayError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        if self.reading || self.reader.is_none() || after != self.returned {
            self.reposition(after).await?;
        }
        self.reading = true;
        match self.read_positioned(max, wait).await {
            Ok(entries) => {
                if let Some(last) = entries.last() {
                    self.returned = last.position;
                }
                self.reading = false;
                Ok(entries)
            }
            Err(e) => {
                // The reader may have moved past messages not returned.
                self.discard_reader();
                self.reading = false;
                Err(e)
            }
        }
    }

    async fn end(&mut self) -> Result<u64, ReplayError> {
        Ok(self.state().await?.last_sequence)
    }
}

impl Drop for JetStreamReplay {
    fn drop(&mut self) {
        self.discard_reader();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_and_timeouts_are_checked() {
        let base = JetStreamReplayConfig::default();
        assert_eq!(base.validate(), Ok(()));
        for good in ["a", "a.*", "a.>", "a.*.c", ">", "*"] {
            assert_eq!(
                base.clone().with_filter_subject(good).validate(),
                Ok(()),
                "{good}"
            );
        }
        for bad in ["", "a..b", ".a", "a.", "a.>.b", "a b", "a.b*", "a.>b"] {
            assert!(
                base.clone().with_filter_subject(bad).validate().is_err(),
                "{bad:?} was accepted"
            );
        }
        assert!(
            base.with_request_timeout(Duration::from_millis(10))
                .validate()
                .is_err()
        );
    }

    #[test]
    fn deserializes_with_defaults() -> Result<(), serde_json::Error> {
        let config: JetStreamReplayConfig =
            serde_json::from_str(r#"{"filter_subject": "campaign.>", "request_timeout": "3s"}"#)?;
        assert_eq!(config.filter_subject.as_deref(), Some("campaign.>"));
        assert_eq!(config.request_timeout, Duration::from_secs(3));
        assert!(!config.allow_truncated);
        assert!(serde_json::from_str::<JetStreamReplayConfig>(r#"{"nope": 1}"#).is_err());
        Ok(())
    }
}
