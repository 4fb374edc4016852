//! The consumer runtime: the receiving end of the outbox (seed 002's
//! `EventSubscriber.subscribe(event_type, handler)`).
//!
//! A [`Consumer`] reads messages from a broker adapter's [`Source`] and hands
//! each event to the handler whose [`TypePattern`] matches its type, with its
//! `data` decoded into the handler's own type. It keeps the relay's
//! promises on the way in:
//!
//! - **Ack after the effect.** A message is acknowledged only after its
//!   handler returned `Ok`; the handler commits its own transaction first
//!   (with an [`Inbox`] row, which makes redeliveries
//!   harmless). A consumer that dies mid-handling leaves the message
//!   unacknowledged and the broker delivers it again.
//! - **Per-subject order.** Messages of one subject (the ordering key) are
//!   handled one at a time, in arrival order; other subjects proceed
//!   concurrently, up to [`Consumer::concurrency`] at once. A subject whose
//!   handler is retrying holds back only its own later messages.
//! - **Retries, then park.** A transient [`HandlerError`] is retried with
//!   [`Backoff`] up to `max_attempts`; then the event is parked in
//!   [`ParkedEvents`] with the last error, and acked. A permanent error, a
//!   message that does not decode, and `data` that does not decode into the
//!   handler's type are parked at once. Parking that fails is retried and
//!   the message stays unacknowledged meanwhile: nothing is lost.
//! - **No handler, no harm.** An event whose type no route matches is acked
//!   and counted as skipped.
//! - **Graceful shutdown.** On shutdown the consumer stops receiving,
//!   finishes in-flight handlings (bounded by
//!   [`Consumer::shutdown_timeout`]), asks the broker to redeliver what it
//!   had not started or was waiting to retry, and returns a
//!   [`ConsumerReport`].
//!
//! Metrics (label `consumer`): `proclaim_consumer_handled_total`,
//! `_retried_total`, `_parked_total` (also labelled `reason`: `permanent`,
//! `exhausted`, `decode`, `undecodable`), `_skipped_total`,
//! `_released_total`, `_park_failures_total`, `_ack_failures_total`,
//! `_receive_errors_total`, `_duplicates_total` (redeliveries an
//! [`on_once`](Consumer::on_once) inbox skipped), and the histogram
//! `proclaim_consumer_handle_seconds`. Each handling runs in a `consume`
//! span with the consumer's name and the event's id, type and subject.
//!
//! ```no_run
//! use proclaim_core::CancellationToken;
//! use proclaim_core::consumer::{Consumer, Context, HandlerError};
//! use proclaim_core::inbox::ParkedEvents;
//! use proclaim_core::local::InProcessBus;
//!
//! #[derive(serde::Deserialize)]
//! struct DonorSecured { donor_id: u64, amount_cents: u64 }
//!
//! # async fn demo(bus: InProcessBus, parked: impl ParkedEvents) -> Result<(), proclaim_core::ConfigError> {
//! let subscription = bus.subscribe("volunteer-thank-you", Vec::<String>::new());
//! let consumer = Consumer::new("volunteer-thank-you")
//!     .on("DonorSecured", |cx: Context<DonorSecured>| async move {
//!         // Open the inbox transaction, write the note, commit; then return Ok.
//!         tracing::info!(donor = cx.data.donor_id, cents = cx.data.amount_cents, "thank you!");
//!         Ok::<_, HandlerError>(())
//!     })
//!     .on_event("Pledge*", |cx: Context<()>| async move {
//!         tracing::info!(event = %cx.event.id(), "pledge seen");
//!         Ok(())
//!     })
//!     .concurrency(32)
//!     .park_into(parked);
//! let shutdown = CancellationToken::new();
//! let report = consumer.run(subscription, shutdown).await?;
//! println!("handled {}, parked {}", report.handled, report.parked);
//! # Ok(()) }
//! ```

mod handler;
mod once;
mod runtime;
mod source;

#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info_span};

pub use handler::{Context, Handler, HandlerError, HandlerErrorKind};
pub use source::{Acker, Incoming, Source, SourceError, Undecodable};

use crate::fanout::TypePattern;
use crate::inbox::{Inbox, ParkedEvents};
use crate::{Backoff, ConfigError};
use handler::{DynHandler, Raw, Typed};
use once::Once;
use runtime::{Counters, DynParked, Route, Settings, Shared};

/// Totals of one consumer run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerReport {
    /// Messages whose handler succeeded (then acked).
    pub handled: u64,
    /// Messages no route matched (acked without a handler).
    pub skipped: u64,
    /// Failed attempts that were followed by a retry.
    pub retried: u64,
    /// Messages parked (then acked).
    pub parked: u64,
    /// Messages handed back to the broker unsettled on shutdown (not
    /// started, or waiting for a retry or a park).
    pub released: u64,
    /// Attempts to park that failed (each is retried).
    pub park_failures: u64,
    /// Acks the broker did not confirm (it may redeliver those messages).
    pub ack_failures: u64,
    /// Failed receives from the source (each is retried after a backoff).
    pub receive_errors: u64,
    /// Redeliveries an [`on_once`](Consumer::on_once) route's inbox
    /// recognised as handled before and skipped (also counted in
    /// `handled`: they are acked).
    pub duplicates: u64,
}

/// Handles events from a [`Source`] by event type, in per-subject order,
/// with retries and parking; see the [module docs](self).
///
/// Routes are tried in the order they were added: the first whose pattern
/// matches the event's type handles it.
///
/// ```no_run
/// use std::time::Duration;
/// use proclaim_core::{Backoff, CancellationToken};
/// use proclaim_core::consumer::{Consumer, Context, HandlerError};
/// # async fn demo(
/// #     source: impl proclaim_core::consumer::Source,
/// #     parked: impl proclaim_core::inbox::ParkedEvents,
/// # ) -> Result<(), proclaim_core::ConfigError> {
/// let handle = Consumer::new("fundraising-strategy")
///     .on("Donor*", |cx: Context<serde_json::Value>| async move {
///         if cx.data.get("amount_cents").is_none() {
///             return Err(HandlerError::permanent("no amount"));
///         }
///         Ok(())
///     })
///     .retry(Backoff::new(Duration::from_millis(200), Duration::from_secs(10)), 5)
///     .park_into(parked)
///     .spawn(source)?;
/// // … on SIGTERM:
/// let report = handle.shutdown().await;
/// # let _ = report;
/// # Ok(()) }
/// ```
pub struct Consumer {
    name: String,
    routes: Vec<Route>,
    errors: Vec<String>,
    parked: Option<Box<dyn DynParked>>,
    settings: Settings,
    /// Shared with the [`on_once`](Consumer::on_once) routes, which count
    /// the duplicates they skip.
    counters: Arc<Counters>,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let patterns: Vec<&str> = self.routes.iter().map(|r| r.pattern.as_str()).collect();
        f.debug_struct("Consumer")
            .field("name", &self.name)
            .field("routes", &patterns)
            .field("parks", &self.parked.is_some())
            .field("settings", &self.settings)
            .finish()
    }
}

impl Consumer {
    /// A consumer named `name`: the consumer group at the broker, the name
    /// its events are recorded under in the inbox, and the `consumer` of its
    /// parked events, metrics and logs.
    pub fn new(name: impl Into<String>) -> Self {
        Consumer {
            name: name.into(),
            routes: Vec::new(),
            errors: Vec::new(),
            parked: None,
            settings: Settings::default(),
            counters: Arc::default(),
        }
    }

    /// The consumer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Handles the events whose type matches `pattern` (see
    /// [`TypePattern`]: `DonorSecured`, `Donor*`, `*`) with `handler`, their
    /// `data` decoded as `T`. Data that does not decode as `T` is a
    /// permanent failure: the event is parked with a reason naming `T`.
    ///
    /// ```
    /// use proclaim_core::consumer::{Consumer, Context, HandlerError};
    ///
    /// #[derive(serde::Deserialize)]
    /// struct Pledge { cents: u64 }
    ///
    /// let consumer = Consumer::new("ledger").on("PledgeMade", |cx: Context<Pledge>| async move {
    ///     tracing::info!(cents = cx.data.cents, "pledge");
    ///     Ok::<_, HandlerError>(())
    /// });
    /// # let _ = consumer;
    /// ```
    pub fn on<T, F, Fut>(self, pattern: &str, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Context<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.route(pattern, Box::new(Typed::new(handler)))
    }

    /// Handles the events whose type matches `pattern` with `handler`, which
    /// reads the [`Event`](crate::Event) itself (`cx.event`).
    ///
    /// ```
    /// use proclaim_core::consumer::{Consumer, Context};
    ///
    /// let audit = Consumer::new("audit").on_event("*", |cx: Context<()>| async move {
    ///     tracing::info!(id = %cx.event.id(), kind = cx.event.event_type(), "seen");
    ///     Ok(())
    /// });
    /// # let _ = audit;
    /// ```
    pub fn on_event<F, Fut>(self, pattern: &str, handler: F) -> Self
    where
        F: Fn(Context<()>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.route(pattern, Box::new(Raw::new(handler)))
    }

    /// Like [`Consumer::on`], with a value implementing [`Handler`] (a type
    /// that holds its own resources) instead of a closure.
    ///
    /// ```
    /// use proclaim_core::consumer::{Consumer, Context, Handler, HandlerError};
    ///
    /// struct Projector;
    /// impl Handler<serde_json::Value> for Projector {
    ///     async fn handle(&self, _cx: Context<serde_json::Value>) -> Result<(), HandlerError> {
    ///         Ok(())
    ///     }
    /// }
    /// let consumer = Consumer::new("projector").on_handler("Donor*", Projector);
    /// # let _ = consumer;
    /// ```
    pub fn on_handler<T, H>(self, pattern: &str, handler: H) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        H: Handler<T>,
    {
        self.route(pattern, Box::new(Typed::new(handler)))
    }

    /// Like [`Consumer::on`], with the effect made exactly-once by `inbox`:
    /// for each event the consumer begins an inbox transaction recording
    /// (consumer, event id), hands it to `handler`, which writes its effect
    /// through it and returns it, and commits it. An event this consumer
    /// already handled (a redelivery) is skipped without calling `handler`
    /// (counted in `proclaim_consumer_duplicates_total`). A handler error
    /// drops the transaction, rolling back the effect with the inbox row, so
    /// the retry starts clean.
    ///
    /// ```
    /// use proclaim_core::consumer::{Consumer, Context, HandlerError};
    /// use proclaim_core::inbox::Inbox;
    ///
    /// #[derive(serde::Deserialize)]
    /// struct DonorSecured { donor_id: i64 }
    ///
    /// fn thank_you<I: Inbox>(inbox: I) -> Consumer {
    ///     Consumer::new("volunteer-thank-you").on_once(
    ///         "DonorSecured",
    ///         inbox,
    ///         |cx: Context<DonorSecured>, tx: I::Tx| async move {
    ///             // Write the note through `tx` (with a store's inbox, the
    ///             // transaction derefs to its database connection).
    ///             tracing::info!(donor = cx.data.donor_id, "thank-you note written");
    ///             Ok::<_, HandlerError>(tx)
    ///         },
    ///     )
    /// }
    /// ```
    pub fn on_once<T, I, F, Fut>(self, pattern: &str, inbox: I, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        I: Inbox,
        F: Fn(Context<T>, I::Tx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<I::Tx, HandlerError>> + Send + 'static,
    {
        let counters = self.counters.clone();
        self.route(
            pattern,
            Box::new(Typed::new(Once::new(inbox, handler, counters))),
        )
    }

    fn route(mut self, pattern: &str, handler: Box<dyn DynHandler>) -> Self {
        match TypePattern::parse(pattern) {
            Ok(pattern) => self.routes.push(Route { pattern, handler }),
            Err(e) => self.errors.push(e.0),
        }
        self
    }

    /// Handler calls at once, across subjects (default 16); messages of one
    /// subject are always handled one at a time. A message waiting for its
    /// retry (or for its park to be retried) takes no slot, so subjects
    /// that keep failing do not hold the others back. The consumer receives
    /// while fewer than this many messages are being worked on.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.settings.concurrency = n;
        self
    }

    /// Messages held unacknowledged at most (default 1,024): those being
    /// handled and those waiting behind an earlier message of their subject.
    /// When reached, the consumer stops receiving until one is settled, so
    /// a subject with a long backlog behind a retrying message eventually
    /// pauses the others too; keep it below the broker's own limit of
    /// unacknowledged messages (e.g. JetStream's `max_ack_pending`).
    pub fn max_pending(mut self, n: usize) -> Self {
        self.settings.max_pending = n;
        self
    }

    /// Retries a transient failure with `backoff`, for at most
    /// `max_attempts` attempts in all, then parks the event (default:
    /// 500 ms doubling to 30 s, 5 attempts). A handler's
    /// [`HandlerError::with_retry_after`] lengthens a delay.
    pub fn retry(mut self, backoff: Backoff, max_attempts: u32) -> Self {
        self.settings.backoff = backoff;
        self.settings.max_attempts = max_attempts;
        self
    }

    /// The backoff between retries of a failed park and of a failed receive
    /// (default 100 ms doubling to 30 s).
    pub fn outage_backoff(mut self, backoff: Backoff) -> Self {
        self.settings.outage_backoff = backoff;
        self
    }

    /// Upper bound of one handler call (default 60 s): a handler still
    /// running then is cancelled (dropping its transaction rolls it back)
    /// and the attempt counts as a transient failure.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.settings.handler_timeout = timeout;
        self
    }

    /// How long a graceful shutdown waits for in-flight handlings (default
    /// 30 s). Those still running then are abandoned unacknowledged, so the
    /// broker redelivers them.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.settings.shutdown_timeout = timeout;
        self
    }

    /// Where events the consumer gives up on are parked (required).
    pub fn park_into(mut self, parked: impl ParkedEvents) -> Self {
        self.parked = Some(Box::new(parked));
        self
    }

    /// Checks the configuration: a name, at least one route, valid
    /// patterns, a place to park, and limits that can work.
    ///
    /// ```
    /// use proclaim_core::consumer::Consumer;
    ///
    /// let err = Consumer::new("c").validate().unwrap_err();
    /// assert!(err.0.contains("no handler"), "{err}");
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        if let Some(first) = self.errors.first() {
            return err(first.clone());
        }
        if self.name.trim().is_empty() {
            return err("a consumer needs a name".into());
        }
        if self.routes.is_empty() {
            return err(format!(
                "consumer {:?} has no handler: add one with on, on_event or on_handler",
                self.name
            ));
        }
        if self.parked.is_none() {
            return err(format!(
                "consumer {:?} has nowhere to park events it gives up on: call park_into",
                self.name
            ));
        }
        let s = &self.settings;
        if !(1..=tokio::sync::Semaphore::MAX_PERMITS).contains(&s.concurrency) {
            return err(format!(
                "concurrency must be at least 1, not {}",
                s.concurrency
            ));
        }
        if s.max_pending < s.concurrency {
            return err(format!(
                "max_pending ({}) must be at least concurrency ({})",
                s.max_pending, s.concurrency
            ));
        }
        if s.max_attempts == 0 {
            return err("max_attempts must be at least 1".into());
        }
        if s.handler_timeout.is_zero() {
            return err("handler_timeout must be above zero".into());
        }
        Ok(())
    }

    fn into_shared(self) -> Result<Shared, ConfigError> {
        self.validate()?;
        let parked = self
            .parked
            .ok_or_else(|| ConfigError("no place to park events".into()))?;
        let concurrency = self.settings.concurrency;
        Ok(Shared {
            labels: vec![metrics::Label::new("consumer", self.name.clone())],
            name: Arc::from(self.name),
            routes: self.routes,
            parked,
            settings: self.settings,
            counters: self.counters,
            stopping: CancellationToken::new(),
            permits: tokio::sync::Semaphore::new(concurrency),
            backing_off: std::sync::atomic::AtomicUsize::new(0),
            slot_freed: tokio::sync::Notify::new(),
        })
    }

    /// Runs until `shutdown` is cancelled or the source closes, then
    /// finishes in-flight handlings (for at most the shutdown timeout) and
    /// returns the totals. Fails at once, before receiving anything, if the
    /// configuration cannot work ([`Consumer::validate`]).
    pub async fn run<S: Source>(
        self,
        source: S,
        shutdown: CancellationToken,
    ) -> Result<ConsumerReport, ConfigError> {
        let shared = Arc::new(self.into_shared()?);
        let span = info_span!("consumer", consumer = %shared.name);
        runtime::run_loop(shared.clone(), source, shutdown)
            .instrument(span)
            .await;
        Ok(shared.counters.snapshot())
    }

    /// Runs the consumer on a new task until [`ConsumerHandle::shutdown`].
    pub fn spawn<S: Source>(self, source: S) -> Result<ConsumerHandle, ConfigError> {
        let counters = self.counters.clone();
        let shared = Arc::new(self.into_shared()?);
        let token = CancellationToken::new();
        let span = info_span!("consumer", consumer = %shared.name);
        let task = tokio::spawn({
            let token = token.clone();
            async move {
                runtime::run_loop(shared.clone(), source, token).await;
                shared.counters.snapshot()
            }
            .instrument(span)
        });
        Ok(ConsumerHandle {
            token,
            task: Some(task),
            counters,
        })
    }
}

/// A consumer running on its own task; see [`Consumer::spawn`]. Dropping
/// the handle asks the consumer to stop, as [`ConsumerHandle::shutdown`]
/// does, without waiting for it.
#[must_use = "dropping a ConsumerHandle stops the consumer"]
pub struct ConsumerHandle {
    token: CancellationToken,
    task: Option<tokio::task::JoinHandle<ConsumerReport>>,
    counters: Arc<Counters>,
}

impl fmt::Debug for ConsumerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerHandle")
            .field("report", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl Drop for ConsumerHandle {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

impl ConsumerHandle {
    /// Asks the consumer to stop, waits for in-flight handlings (at most
    /// the shutdown timeout), and returns its totals.
    pub async fn shutdown(mut self) -> ConsumerReport {
        self.token.cancel();
        match self.task.take() {
            Some(task) => task.await.unwrap_or_else(|e| {
                error!(error = %e, "consumer task failed");
                self.counters.snapshot()
            }),
            None => self.counters.snapshot(),
        }
    }

    /// Stops the consumer at once, as if its process died: in-flight
    /// handlings are cancelled where they stand and nothing more is acked
    /// or handed back, so the broker delivers those messages again once its
    /// ack deadline passes. For tests and demonstrations of crash recovery;
    /// a service stops with [`shutdown`](Self::shutdown). Returns the totals
    /// up to then.
    pub async fn abort(mut self) -> ConsumerReport {
        if let Some(task) = self.task.take() {
            task.abort();
            // Wait until the task and the handlings it owns are gone.
            let _ = task.await;
        }
        self.counters.snapshot()
    }

    /// The totals so far, while the consumer runs.
    pub fn report(&self) -> ConsumerReport {
        self.counters.snapshot()
    }

    /// The token that stops the consumer when cancelled.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Whether the consumer has stopped (shut down, or its source closed).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }
}
