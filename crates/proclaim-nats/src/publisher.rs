//! [`NatsPublisher`]: publishes outbox events to JetStream.

use std::error::Error as _;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::{
    CreateStreamError, CreateStreamErrorKind, GetStreamError, GetStreamErrorKind,
    PublishError as JsPublishError, PublishErrorKind as JsPublishErrorKind, RequestError,
    RequestErrorKind,
};
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, ConnectError, ConnectErrorKind, ConnectOptions};
use bytes::Bytes;
use proclaim_core::{OutboxRecord, PublishError, Publisher};

use crate::{NatsConfig, NatsError, SubjectTemplate, headers};

/// Publishes outbox events to a JetStream stream.
///
/// Each event goes to the subject rendered from
/// [`NatsConfig::subject_template`], as a CloudEvent in binary content mode:
/// the attributes in `ce-*` headers, the content type in `content-type`, the
/// JSON data as the body, byte for byte. The `Nats-Msg-Id` header carries the
/// event id, so JetStream drops a redelivery that arrives within the stream's
/// duplicate window. [`Publisher::publish`] returns `Ok` only once JetStream
/// has acknowledged the message.
///
/// Errors are classified for the relay: an outage (connection lost, timeout,
/// no stream captures the subject, stream full or sealed) is transient; an
/// event the broker can never accept (its subject cannot be formed, it is
/// larger than the server's `max_payload`) is permanent.
///
/// The publisher is cheap to clone; clones share one connection.
#[derive(Debug, Clone)]
pub struct NatsPublisher {
    client: Client,
    jetstream: jetstream::Context,
    config: NatsConfig,
    template: SubjectTemplate,
    url: String,
}

impl NatsPublisher {
    /// Connects to [`NatsConfig::url`] and checks (or, with
    /// [`NatsConfig::create_stream`], creates) the stream.
    ///
    /// The initial connection is tried once and fails after
    /// [`NatsConfig::connect_timeout`] at most; once connected, the client
    /// reconnects by itself after any disconnection.
    pub async fn connect(config: NatsConfig) -> Result<Self, NatsError> {
        config.validate()?;
        let url = config.redacted_url();
        let addrs = config.server_addrs()?;
        let options = ConnectOptions::new()
            .name("proclaim")
            .connection_timeout(config.connect_timeout);
        // The client bounds each connection attempt; this also bounds name
        // resolution and the case of several addresses per host.
        let bound = config.connect_timeout.saturating_mul(2);
        let client = match tokio::time::timeout(bound, options.connect(addrs)).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return Err(NatsError::Connect {
                    url,
                    reason: describe_connect_error(&e, config.connect_timeout),
                    source: Some(e.into()),
                });
            }
            Err(_) => {
                return Err(NatsError::Connect {
                    url,
                    reason: format!("timed out after {bound:?}"),
                    source: None,
                });
            }
        };
        tracing::info!(url = %url, "connected to NATS");
        Self::from_client(client, config).await
    }

    /// Builds a publisher on a client the caller already holds, checking (or
    /// creating) the stream as [`NatsPublisher::connect`] does.
    /// [`NatsConfig::url`] is then only used in messages.
    pub async fn from_client(client: Client, config: NatsConfig) -> Result<Self, NatsError> {
        config.validate()?;
        let template = config.template()?;
        let url = config.redacted_url();
        let mut jetstream = jetstream::new(client.clone());
        // The relay bounds each publish with its own `publish_timeout`; the
        // client's default 5 s ack timeout would otherwise cut it short.
        jetstream.set_timeout(config.ack_timeout);
        let publisher = NatsPublisher {
            client,
            jetstream,
            config,
            template,
            url,
        };
        publisher.ensure_stream().await?;
        Ok(publisher)
    }

    /// The NATS client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The JetStream context events are published through.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// The configuration.
    pub fn config(&self) -> &NatsConfig {
        &self.config
    }

    async fn ensure_stream(&self) -> Result<(), NatsError> {
        let name = &self.config.stream;
        let stream = if self.config.create_stream {
            let wanted = StreamConfig {
                name: name.clone(),
                subjects: self.config.stream_subjects(),
                storage: StorageType::File,
                duplicate_window: self.config.duplicate_window,
                ..Default::default()
            };
            self.jetstream
                .get_or_create_stream(wanted)
                .await
                .map_err(|e| self.create_error(e))?
        } else {
            self.jetstream
                .get_stream(name)
                .await
                .map_err(|e| self.lookup_error(e))?
        };
        let subjects = &stream.cached_info().config.subjects;
        let prefix = &self.config.subject_prefix;
        if self.template.is_under_prefix() && !subjects.iter().any(|f| covers_prefix(f, prefix)) {
            tracing::warn!(
                stream = %name,
                ?subjects,
                "JetStream stream {name} does not capture every subject under {prefix}.>: \
                 events it does not capture fail to publish until it does"
            );
        }
        tracing::debug!(stream = %name, ?subjects, "JetStream stream ready");
        Ok(())
    }

    fn lookup_error(&self, err: GetStreamError) -> NatsError {
        match err.kind() {
            GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                NatsError::StreamMissing {
                    stream: self.config.stream.clone(),
                }
            }
            GetStreamErrorKind::JetStream(e) if is_jetstream_disabled(e.error_code()) => {
                self.unavailable(e.to_string(), err)
            }
            GetStreamErrorKind::Request if is_no_responders(&err) => {
                self.unavailable(NO_JETSTREAM.into(), err)
            }
            _ => self.stream_error("look up", err),
        }
    }

    fn create_error(&self, err: CreateStreamError) -> NatsError {
        match err.kind() {
            CreateStreamErrorKind::JetStreamUnavailable => {
                self.unavailable(NO_JETSTREAM.into(), err)
            }
            CreateStreamErrorKind::JetStream(e) if is_jetstream_disabled(e.error_code()) => {
                self.unavailable(e.to_string(), err)
            }
            _ => self.stream_error("create", err),
        }
    }

    fn unavailable(
        &self,
        reason: String,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> NatsError {
        NatsError::JetStreamUnavailable {
            url: self.url.clone(),
            reason,
            source: Some(source.into()),
        }
    }

    fn stream_error(
        &self,
        action: &'static str,
        err: impl std::error::Error + Send + Sync + 'static,
    ) -> NatsError {
        NatsError::Stream {
            stream: self.config.stream.clone(),
            action,
            reason: err.to_string(),
            source: Some(err.into()),
        }
    }

    /// Turns a JetStream publish failure into a classified [`PublishError`].
    fn classify(&self, err: JsPublishError, what: &str, message_size: usize) -> PublishError {
        let (transient, reason) = match err.kind() {
            JsPublishErrorKind::StreamNotFound => (
                true,
                "no JetStream stream captures the subject (no responders)".to_owned(),
            ),
            JsPublishErrorKind::TimedOut => {
                (true, "timed out waiting for the JetStream ack".into())
            }
            JsPublishErrorKind::BrokenPipe => (
                true,
                "the connection to NATS was lost before the JetStream ack".into(),
            ),
            JsPublishErrorKind::MaxAckPending => (
                true,
                "too many publishes are awaiting their JetStream ack".into(),
            ),
            JsPublishErrorKind::MaxPayloadExceeded => (
                false,
                format!(
                    "the message ({message_size} bytes with headers) is larger than the server's \
                     max_payload of {} bytes",
                    self.client.max_payload()
                ),
            ),
            JsPublishErrorKind::WrongLastMessageId | JsPublishErrorKind::WrongLastSequence => {
                (false, err.to_string())
            }
            JsPublishErrorKind::Other => classify_other(&err),
        };
        let message = format!("{what}: {reason}");
        let error = if transient {
            PublishError::transient(message)
        } else {
            PublishError::permanent(message)
        };
        error.with_source(err)
    }
}

impl Publisher for NatsPublisher {
    async fn publish(&self, record: &OutboxRecord) -> Result<(), PublishError> {
        let event = &record.event;
        let id = event.id();
        let subject = self
            .template
            .render(&self.config.subject_prefix, event)
            .map_err(|e| PublishError::permanent(format!("event {id} cannot be published: {e}")))?;
        let what = format!("cannot publish event {id} to {subject}");
        let headers = headers::encode(event)
            .map_err(|e| PublishError::permanent(format!("{what}: {e}")).with_source(e))?;
        let payload = Bytes::copy_from_slice(event.data().get().as_bytes());
        let size = payload.len() + headers_len(&headers);
        let ack = match self
            .jetstream
            .publish_with_headers(subject.clone(), headers, payload)
            .await
        {
            Ok(pending) => pending.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(ack) => {
                tracing::debug!(
                    event_id = %id,
                    sequence = record.sequence,
                    subject = %subject,
                    stream = %ack.stream,
                    stream_sequence = ack.sequence,
                    duplicate = ack.duplicate,
                    "event published"
                );
                Ok(())
            }
            Err(e) => {
                let error = self.classify(e, &what, size);
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
        match self.client.connection_state() {
            State::Connected => Ok(()),
            state => {
                tracing::debug!(url = %self.url, %state, "NATS not ready");
                Err(PublishError::transient(format!(
                    "not connected to NATS at {}",
                    self.url
                )))
            }
        }
    }
}

const NO_JETSTREAM: &str = "no JetStream API responded (is JetStream enabled on the server?)";

fn is_jetstream_disabled(code: ErrorCode) -> bool {
    code == ErrorCode::JETSTREAM_NOT_ENABLED || code == ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
}

fn is_no_responders(err: &GetStreamError) -> bool {
    err.source()
        .and_then(|s| s.downcast_ref::<RequestError>())
        .is_some_and(|r| r.kind() == RequestErrorKind::NoResponders)
}

/// Classifies a publish failure the client reports as "other".
fn classify_other(err: &JsPublishError) -> (bool, String) {
    let source = err.source();
    if source.is_some_and(|s| s.is::<async_nats::SubjectError>()) {
        return (false, "the subject is not a valid NATS subject".into());
    }
    if let Some(js) = source.and_then(|s| s.downcast_ref::<jetstream::Error>()) {
        // The event itself is too large for the stream: it never fits. Any
        // other refusal (storage full, stream sealed, …) is the stream's
        // state, not the event's fault.
        let permanent = js.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
            || js.error_code() == ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM;
        let verb = if permanent { "rejected" } else { "refused" };
        return (!permanent, format!("JetStream {verb} the message: {js}"));
    }
    (true, err.to_string())
}

/// Size of the header block as sent (`NATS/1.0`, one line per value, blank line).
fn headers_len(headers: &async_nats::HeaderMap) -> usize {
    let mut len = "NATS/1.0\r\n\r\n".len();
    for (name, values) in headers.iter() {
        for value in values {
            len += name.to_string().len() + ": ".len() + value.as_str().len() + "\r\n".len();
        }
    }
    len
}

/// A one-line reason for a failed initial connection.
fn describe_connect_error(err: &ConnectError, timeout: Duration) -> String {
    match err.kind() {
        ConnectErrorKind::TimedOut => format!("timed out after {timeout:?}"),
        ConnectErrorKind::Io => {
            let io = std::iter::successors(err.source(), |e| (*e).source())
                .find_map(|e| e.downcast_ref::<std::io::Error>());
            match io {
                // OS errors: the kind reads best ("connection refused").
                Some(io) if io.raw_os_error().is_some() => io.kind().to_string(),
                Some(io) => io.to_string(),
                None => err.to_string(),
            }
        }
        _ => err.to_string(),
    }
}

/// Whether the stream subject filter `filter` matches every subject under
/// `<prefix>.>`.
fn covers_prefix(filter: &str, prefix: &str) -> bool {
    let wanted: Vec<&str> = prefix.split('.').chain(std::iter::once(">")).collect();
    for (i, token) in filter.split('.').enumerate() {
        let Some(want) = wanted.get(i) else {
            return false;
        };
        match (token, *want) {
            (">", _) => return true,
            (_, ">") => return false,
            ("*", _) => {}
            (a, b) if a == b => {}
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_which_filters_cover_the_prefix() {
        assert!(covers_prefix("proclaim.>", "proclaim"));
        assert!(covers_prefix(">", "proclaim"));
        assert!(covers_prefix("*.>", "proclaim"));
        assert!(covers_prefix("acme.>", "acme.events"));
        assert!(covers_prefix("acme.*.>", "acme.events"));
        assert!(!covers_prefix("proclaim.*", "proclaim"));
        assert!(!covers_prefix("proclaim", "proclaim"));
        assert!(!covers_prefix("other.>", "proclaim"));
        assert!(!covers_prefix("acme.events.orders.>", "acme.events"));
    }

    #[test]
    fn header_length_matches_the_wire_format() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("ce-id", "abc");
        assert_eq!(
            headers_len(&headers),
            "NATS/1.0\r\nce-id: abc\r\n\r\n".len()
        );
    }
}
