//! Handlers: what they receive ([`Context`]), what they return
//! ([`HandlerError`]), and the [`Handler`] trait closures implement.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;

use crate::store::BoxError;
use crate::{Event, StoreError};

/// Whether a handler failure is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerErrorKind {
    /// A dependency was down, a transaction conflicted, …: the consumer
    /// retries with backoff, then parks the event.
    Transient,
    /// The event can never be handled (it breaks an invariant, refers to
    /// something that does not exist, …): the consumer parks it at once.
    Permanent,
}

/// A failed handling, classified for the consumer.
///
/// `?` on a [`StoreError`] (e.g. from an [`Inbox`](crate::inbox::Inbox))
/// gives a transient error when the database was unavailable and a
/// permanent one otherwise.
///
/// ```
/// use std::time::Duration;
/// use proclaim_core::consumer::HandlerError;
///
/// let busy = HandlerError::transient("CRM rate limit").with_retry_after(Duration::from_secs(5));
/// assert!(busy.is_transient());
/// assert_eq!(busy.retry_after(), Some(Duration::from_secs(5)));
///
/// let invalid = HandlerError::permanent("pledge for an unknown campaign");
/// assert!(!invalid.is_transient());
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    kind: HandlerErrorKind,
    message: String,
    retry_after: Option<Duration>,
    #[source]
    source: Option<BoxError>,
}

impl HandlerError {
    /// A failure that may succeed if tried again later.
    pub fn transient(message: impl Into<String>) -> Self {
        HandlerError {
            kind: HandlerErrorKind::Transient,
            message: message.into(),
            retry_after: None,
            source: None,
        }
    }

    /// A failure that will never succeed for this event.
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError {
            kind: HandlerErrorKind::Permanent,
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

    /// Waits at least `delay` before the next attempt (or the consumer's
    /// backoff if that is longer). Meaningful for transient errors.
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// The delay set by [`HandlerError::with_retry_after`].
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The classification.
    pub fn kind(&self) -> HandlerErrorKind {
        self.kind
    }

    /// True for [`HandlerErrorKind::Transient`].
    pub fn is_transient(&self) -> bool {
        self.kind == HandlerErrorKind::Transient
    }

    /// The message with every source in the chain, as kept with a parked
    /// event.
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

impl From<StoreError> for HandlerError {
    fn from(e: StoreError) -> Self {
        let error = if e.is_transient() {
            HandlerError::transient("store unavailable")
        } else {
            HandlerError::permanent("store error")
        };
        error.with_source(e)
    }
}

/// What a handler receives: the event, its `data` decoded as `T` (`()` for
/// [`Consumer::on_event`](super::Consumer::on_event) handlers), and where
/// this handling stands.
///
/// ```
/// use proclaim_core::Event;
/// use proclaim_core::consumer::Context;
///
/// // Handlers can be unit-tested with a hand-made context.
/// let event = Event::builder("DonorSecured").subject("donor-42").data(&250_000).build()?;
/// let cx = Context::new("volunteer-thank-you", event, 250_000u64);
/// assert_eq!(cx.consumer(), "volunteer-thank-you");
/// assert_eq!((cx.data, cx.attempt), (250_000, 1));
/// # Ok::<(), proclaim_core::EventError>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Context<T> {
    /// The event.
    pub event: Event,
    /// Its `data`, decoded.
    pub data: T,
    /// The consumer's attempt at handling this message (1 the first time;
    /// it grows with each retry in the consumer).
    pub attempt: u32,
    /// The broker's delivery count of the message, if it keeps one (above 1
    /// when it was delivered before, e.g. to a consumer that crashed).
    pub delivery_attempt: Option<u32>,
    consumer: Arc<str>,
}

impl<T> Context<T> {
    /// A context for `consumer`'s first attempt at `event` (for tests of
    /// handlers; the consumer builds its own).
    pub fn new(consumer: &str, event: Event, data: T) -> Self {
        Context {
            event,
            data,
            attempt: 1,
            delivery_attempt: None,
            consumer: Arc::from(consumer),
        }
    }

    /// The consumer's name: the name to record the event under in an
    /// [`Inbox`](crate::inbox::Inbox).
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The context of one attempt, as the runtime builds it.
    pub(crate) fn for_attempt(
        consumer: Arc<str>,
        event: Event,
        data: T,
        attempt: u32,
        delivery_attempt: Option<u32>,
    ) -> Self {
        Context {
            event,
            data,
            attempt,
            delivery_attempt,
            consumer,
        }
    }

    fn with_data<U>(self, data: U) -> Context<U> {
        Context {
            event: self.event,
            data,
            attempt: self.attempt,
            delivery_attempt: self.delivery_attempt,
            consumer: self.consumer,
        }
    }
}

/// Handles the events of one route of a [`Consumer`](super::Consumer).
///
/// Implemented for every `Fn(Context<T>) -> impl Future<Output =
/// Result<(), HandlerError>>`, and implementable by hand for a type that
/// holds its resources.
///
/// Contract: return `Ok` only once the effect is durable (e.g. the handler's
/// transaction, with its inbox row, is committed): the consumer acks the
/// message right after. The handler may run more than once for one event
/// (retries, redeliveries), so make it idempotent, e.g. with an inbox.
///
/// ```
/// use proclaim_core::consumer::{Context, Handler, HandlerError};
///
/// struct ThankYou { /* a pool, a mailer, … */ }
///
/// impl Handler<serde_json::Value> for ThankYou {
///     async fn handle(&self, cx: Context<serde_json::Value>) -> Result<(), HandlerError> {
///         tracing::info!(donor = %cx.data["donor_id"], "thank-you note queued");
///         Ok(())
///     }
/// }
/// ```
pub trait Handler<T>: Send + Sync + 'static {
    /// Handles one event.
    fn handle(&self, cx: Context<T>) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

impl<T, F, Fut> Handler<T> for F
where
    F: Fn(Context<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    fn handle(&self, cx: Context<T>) -> impl Future<Output = Result<(), HandlerError>> + Send {
        self(cx)
    }
}

/// Why one call of a route failed.
pub(crate) enum Failure {
    /// `data` did not decode into the route's type: permanent, and the
    /// handler did not run.
    Decode(String),
    /// The handler returned an error (or panicked, or timed out).
    Handler(HandlerError),
}

/// The object-safe face of a route's handler: decodes `data`, then calls it.
pub(crate) trait DynHandler: Send + Sync {
    fn call(&self, cx: Context<()>) -> BoxFuture<'static, Result<(), Failure>>;
}

/// A handler of events whose `data` decodes as `T`.
pub(crate) struct Typed<T, H> {
    handler: Arc<H>,
    _data: PhantomData<fn() -> T>,
}

impl<T, H> Typed<T, H> {
    pub(crate) fn new(handler: H) -> Self {
        Typed {
            handler: Arc::new(handler),
            _data: PhantomData,
        }
    }
}

impl<T, H> DynHandler for Typed<T, H>
where
    T: DeserializeOwned + Send + 'static,
    H: Handler<T>,
{
    fn call(&self, cx: Context<()>) -> BoxFuture<'static, Result<(), Failure>> {
        let data = match serde_json::from_str::<T>(cx.event.data().get()) {
            Ok(data) => data,
            Err(e) => {
                let reason = format!(
                    "event data does not decode as {}: {e}",
                    std::any::type_name::<T>()
                );
                return Box::pin(std::future::ready(Err(Failure::Decode(reason))));
            }
        };
        let handler = self.handler.clone();
        let cx = cx.with_data(data);
        Box::pin(async move { handler.handle(cx).await.map_err(Failure::Handler) })
    }
}

/// A handler of raw events (`data` not decoded).
pub(crate) struct Raw<H> {
    handler: Arc<H>,
}

impl<H> Raw<H> {
    pub(crate) fn new(handler: H) -> Self {
        Raw {
            handler: Arc::new(handler),
        }
    }
}

impl<H: Handler<()>> DynHandler for Raw<H> {
    fn call(&self, cx: Context<()>) -> BoxFuture<'static, Result<(), Failure>> {
        let handler = self.handler.clone();
        Box::pin(async move { handler.handle(cx).await.map_err(Failure::Handler) })
    }
}
