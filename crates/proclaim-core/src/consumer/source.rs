//! What a broker adapter offers the consumer: a [`Source`] of [`Incoming`]
//! messages, each with an [`Acker`].

use std::fmt;
use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::Event;
use crate::store::BoxError;

/// A failure of a [`Source`]: receiving, acknowledging or asking for a
/// redelivery. The consumer logs it and carries on (a failed receive is
/// retried with backoff; a failed ack leaves the message to the broker's
/// redelivery).
///
/// ```
/// use proclaim_core::consumer::SourceError;
///
/// let io = std::io::Error::other("connection reset");
/// let err = SourceError::new("fetching messages failed").with_source(io);
/// assert_eq!(err.full_message(), "fetching messages failed: connection reset");
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    message: String,
    #[source]
    source: Option<BoxError>,
}

impl SourceError {
    /// A failure described by `message`.
    pub fn new(message: impl Into<String>) -> Self {
        SourceError {
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The message with every source in the chain.
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

/// Settles one received message with its broker.
///
/// The consumer calls exactly one of the two methods, once: [`ack`] after the
/// handler succeeded (or the message was parked or skipped), [`nack`] when it
/// stops before the message is settled (shutdown, or an interrupted retry),
/// so that the broker delivers it again. Dropping an acker without calling
/// either must leave the message unacknowledged: the broker redelivers it
/// (JetStream's ack wait, RabbitMQ's channel close, the in-process bus's
/// failed publish).
///
/// [`ack`]: Acker::ack
/// [`nack`]: Acker::nack
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use proclaim_core::consumer::{Acker, SourceError};
///
/// struct Flag(Arc<AtomicBool>);
///
/// impl Acker for Flag {
///     async fn ack(self) -> Result<(), SourceError> {
///         self.0.store(true, Ordering::SeqCst);
///         Ok(())
///     }
///     // `nack` keeps its default: drop, and let the broker redeliver.
/// }
/// ```
pub trait Acker: Send + 'static {
    /// Tells the broker the message is done with: it will not be delivered
    /// again (a failed ack means it may be, which the inbox absorbs).
    fn ack(self) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Asks the broker to deliver the message again, not before `delay` if
    /// it can. The default drops the acker, leaving the redelivery to the
    /// broker's own timeout.
    fn nack(self, delay: Duration) -> impl Future<Output = Result<(), SourceError>> + Send
    where
        Self: Sized,
    {
        let _ = delay;
        drop(self);
        async { Ok(()) }
    }
}

/// The object-safe face of [`Acker`], so [`Incoming`] can hold any of them.
pub(crate) trait DynAcker: Send {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>>;
    fn nack(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), SourceError>>;
}

impl<A: Acker> DynAcker for A {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(Acker::ack(*self))
    }
    fn nack(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(Acker::nack(*self, delay))
    }
}

/// A message that could not be decoded into an [`Event`]: the consumer
/// parks it at once, with the reason and the bytes, and acks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecodable {
    /// Why it did not decode (bad JSON, a missing attribute, an unknown
    /// spec version, …).
    pub reason: String,
    /// The message's bytes, kept with the parked entry.
    pub raw: Vec<u8>,
}

/// One message from a [`Source`]: the decoded event (or why it did not
/// decode), the broker's delivery attempt if it counts them, and the
/// [`Acker`] that settles it.
///
/// ```
/// use proclaim_core::Event;
/// use proclaim_core::consumer::{Acker, Incoming, SourceError};
///
/// struct Noop;
/// impl Acker for Noop {
///     async fn ack(self) -> Result<(), SourceError> { Ok(()) }
/// }
///
/// let event = Event::builder("DonorSecured").subject("donor-42").build()?;
/// let incoming = Incoming::new(event, Noop).with_delivery_attempt(2);
/// assert_eq!(incoming.delivery_attempt(), Some(2));
///
/// let garbage = Incoming::undecodable("expected value at line 1", b"{oops".to_vec(), Noop);
/// assert!(garbage.event().is_none());
/// # Ok::<(), proclaim_core::EventError>(())
/// ```
pub struct Incoming {
    pub(crate) payload: Result<Event, Undecodable>,
    pub(crate) delivery_attempt: Option<u32>,
    pub(crate) acker: Box<dyn DynAcker>,
}

impl Incoming {
    /// A message that decoded into `event`.
    pub fn new(event: Event, acker: impl Acker) -> Self {
        Incoming {
            payload: Ok(event),
            delivery_attempt: None,
            acker: Box::new(acker),
        }
    }

    /// A message that did not decode: `reason` says why, `raw` is its body.
    pub fn undecodable(
        reason: impl Into<String>,
        raw: impl Into<Vec<u8>>,
        acker: impl Acker,
    ) -> Self {
        Incoming {
            payload: Err(Undecodable {
                reason: reason.into(),
                raw: raw.into(),
            }),
            delivery_attempt: None,
            acker: Box::new(acker),
        }
    }

    /// Sets the broker's delivery count of this message (1 the first time).
    pub fn with_delivery_attempt(mut self, attempt: u32) -> Self {
        self.delivery_attempt = Some(attempt);
        self
    }

    /// The event, when the message decoded.
    pub fn event(&self) -> Option<&Event> {
        self.payload.as_ref().ok()
    }

    /// Why the message did not decode, when it did not.
    pub fn decode_failure(&self) -> Option<&Undecodable> {
        self.payload.as_ref().err()
    }

    /// The broker's delivery count, if it keeps one.
    pub fn delivery_attempt(&self) -> Option<u32> {
        self.delivery_attempt
    }
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Incoming");
        match &self.payload {
            Ok(event) => s
                .field("event_id", &event.id())
                .field("type", &event.event_type()),
            Err(bad) => s.field("undecodable", &bad.reason),
        };
        s.field("delivery_attempt", &self.delivery_attempt)
            .finish_non_exhaustive()
    }
}

/// A broker subscription as the consumer reads it. Implemented by each
/// broker adapter (and by [`Subscription`](crate::local::Subscription) of
/// the in-process bus).
///
/// Contract: `receive` returns the next message, `Some(Err(_))` for a
/// failure worth retrying (the consumer backs off and calls it again), and
/// `None` once the subscription is closed for good (the consumer then stops
/// as on shutdown). The consumer never drops a pending `receive` call
/// except when it stops; a message being received at that moment must
/// stay unacknowledged at the broker.
///
/// ```
/// use proclaim_core::consumer::{Incoming, Source, SourceError};
/// use tokio::sync::mpsc;
///
/// /// Messages from a channel, e.g. fed by a broker client's callback.
/// struct Channel(mpsc::Receiver<Incoming>);
///
/// impl Source for Channel {
///     async fn receive(&mut self) -> Option<Result<Incoming, SourceError>> {
///         self.0.recv().await.map(Ok)
///     }
/// }
/// ```
pub trait Source: Send + 'static {
    /// The next message; `None` when the subscription is closed.
    fn receive(&mut self) -> impl Future<Output = Option<Result<Incoming, SourceError>>> + Send;
}
