//! The [`Publisher`] trait: what the relay needs from a broker.

use std::future::Future;

use crate::OutboxRecord;
use crate::store::BoxError;

/// Whether a publish failure is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishErrorKind {
    /// The broker was unreachable, slow or refused for now: retry with backoff.
    Transient,
    /// The broker will never accept this event (bad subject, too large, …):
    /// dead-letter it at once.
    Permanent,
}

/// A failed publish, classified for the relay.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PublishError {
    kind: PublishErrorKind,
    message: String,
    retry_after: Option<std::time::Duration>,
    #[source]
    source: Option<BoxError>,
}

impl PublishError {
    /// A failure that may succeed if tried again later.
    pub fn transient(message: impl Into<String>) -> Self {
        PublishError {
            kind: PublishErrorKind::Transient,
            message: message.into(),
            retry_after: None,
            source: None,
        }
    }
    /// A failure that will never succeed for this event.
    pub fn permanent(message: impl Into<String>) -> Self {
        PublishError {
            kind: PublishErrorKind::Permanent,
            message: message.into(),
            retry_after: None,
            source: None,
        }
    }
    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }
    /// The broker's own word on when to try again (an HTTP `Retry-After`,
    /// say): the relay waits at least this long before the next attempt,
    /// or its own backoff if that is longer. Meaningful for transient errors.
    pub fn with_retry_after(mut self, delay: std::time::Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }
    /// The delay set by [`PublishError::with_retry_after`].
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.retry_after
    }
    /// The classification.
    pub fn kind(&self) -> PublishErrorKind {
        self.kind
    }
    /// True for [`PublishErrorKind::Transient`].
    pub fn is_transient(&self) -> bool {
        self.kind == PublishErrorKind::Transient
    }
    /// The message with every source in the chain, for the row's `last_error`.
    pub fn full_message(&self) -> String {
        let mut out = self.message.clone();
        let mut next = self
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static));
        while let Some(err) = next {
            let text = err.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            next = err.source();
        }
        out
    }
}

/// Sends events to a broker. Implemented by each publisher crate.
///
/// Contract: `publish` returns `Ok` only once the broker has durably accepted
/// the message (for JetStream, its publish ack). It is called concurrently for
/// events of different subjects, and one at a time, in order, for events of
/// the same subject. It must not hang: the relay also bounds each call with
/// its publish timeout.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes one event.
    fn publish(
        &self,
        record: &OutboxRecord,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;

    /// Whether the broker can take messages now. While it cannot, the relay
    /// claims nothing, so an outage does not burn events' attempts. The default
    /// is always ready.
    fn ready(&self) -> impl Future<Output = Result<(), PublishError>> + Send {
        async { Ok(()) }
    }
}

impl<P: Publisher> Publisher for std::sync::Arc<P> {
    fn publish(
        &self,
        record: &OutboxRecord,
    ) -> impl Future<Output = Result<(), PublishError>> + Send {
        (**self).publish(record)
    }
    fn ready(&self) -> impl Future<Output = Result<(), PublishError>> + Send {
        (**self).ready()
    }
}
