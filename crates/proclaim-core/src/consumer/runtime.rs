//! The consumer's engine: the receive loop, the per-subject scheduler, and
//! one task per handling (attempts, backoff, park, ack).

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::{Notify, Semaphore};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::ConsumerReport;
use super::handler::{Context, DynHandler, Failure, HandlerError};
use super::source::{DynAcker, Incoming, Source};
use crate::fanout::TypePattern;
use crate::inbox::{ParkedEvent, ParkedEvents};
use crate::{Backoff, Event, StoreError};

/// Upper bound of one call to park an event; a park that takes longer is
/// a failed park (retried).
const PARK_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound of one ack or nack; the broker redelivers a message whose
/// ack did not get through.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// The object-safe face of [`ParkedEvents`]: the consumer only parks.
pub(crate) trait DynParked: Send + Sync {
    fn park<'a>(&'a self, parked: &'a ParkedEvent) -> BoxFuture<'a, Result<(), StoreError>>;
}

impl<P: ParkedEvents> DynParked for P {
    fn park<'a>(&'a self, parked: &'a ParkedEvent) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(ParkedEvents::park(self, parked))
    }
}

/// One route: a pattern over event types and its handler.
pub(crate) struct Route {
    pub(crate) pattern: TypePattern,
    pub(crate) handler: Box<dyn DynHandler>,
}

/// The consumer's tunables (see the builder methods for their meaning).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) concurrency: usize,
    pub(crate) max_pending: usize,
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) outage_backoff: Backoff,
    pub(crate) handler_timeout: Duration,
    pub(crate) shutdown_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            concurrency: 16,
            max_pending: 1024,
            max_attempts: 5,
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            outage_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(30)),
            handler_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    handled: AtomicU64,
    skipped: AtomicU64,
    retried: AtomicU64,
    parked: AtomicU64,
    released: AtomicU64,
    park_failures: AtomicU64,
    ack_failures: AtomicU64,
    receive_errors: AtomicU64,
    duplicates: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> ConsumerReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConsumerReport {
            handled: get(&self.handled),
            skipped: get(&self.skipped),
            retried: get(&self.retried),
            parked: get(&self.parked),
            released: get(&self.released),
            park_failures: get(&self.park_failures),
            ack_failures: get(&self.ack_failures),
            receive_errors: get(&self.receive_errors),
            duplicates: get(&self.duplicates),
        }
    }

    /// Counts a redelivery an inbox skipped.
    pub(crate) fn duplicate(&self) {
        self.duplicates.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything the handling tasks share.
pub(crate) struct Shared {
    pub(crate) name: Arc<str>,
    pub(crate) routes: Vec<Route>,
    pub(crate) parked: Box<dyn DynParked>,
    pub(crate) settings: Settings,
    pub(crate) counters: Arc<Counters>,
    /// Cancelled when shutdown starts: retry and park waits give up and
    /// hand their message back to the broker.
    pub(crate) stopping: CancellationToken,
    /// `consumer=<name>` on every metric.
    pub(crate) labels: Vec<metrics::Label>,
    /// One permit per handler call at once (`concurrency`).
    pub(crate) permits: Semaphore,
    /// Handlings sleeping before a retry or a new park attempt: they hold
    /// no slot, so other subjects go on.
    pub(crate) backing_off: AtomicUsize,
    /// Tells the receive loop a handling started backing off (a slot is
    /// free for another subject).
    pub(crate) slot_freed: Notify,
}

impl Shared {
    fn route_for(&self, event_type: &str) -> Option<usize> {
        self.routes
            .iter()
            .position(|r| r.pattern.matches(event_type))
    }

    fn count(&self, counter: &AtomicU64, metric: &'static str) {
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(metric, self.labels.clone()).increment(1);
    }

    /// Sleeps `delay` without holding a slot; `false` if shutdown began
    /// first.
    async fn back_off(&self, delay: Duration) -> bool {
        self.backing_off.fetch_add(1, Ordering::SeqCst);
        self.slot_freed.notify_one();
        let slept = tokio::select! {
            biased;
            () = self.stopping.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        };
        self.backing_off.fetch_sub(1, Ordering::SeqCst);
        slept
    }
}

/// A message waiting for its subject's earlier message to be settled.
struct Job {
    incoming: Incoming,
    route: Option<usize>,
}

/// Keeps per-subject order: at most one running task per subject, and the
/// subject's later messages queued behind it in arrival order.
#[derive(Default)]
struct Scheduler {
    /// The subject of each running task (`None`: a message outside any
    /// order — undecodable, or skipped).
    running: HashMap<tokio::task::Id, Option<String>>,
    /// Subjects with a running task → their messages waiting behind it.
    waiting: HashMap<String, VecDeque<Job>>,
    /// Messages in `waiting`.
    queued: usize,
}

impl Scheduler {
    /// Messages held unacknowledged: running and waiting.
    fn held(&self) -> usize {
        self.running.len() + self.queued
    }

    /// Starts `incoming` now, or queues it behind its subject's running one.
    fn dispatch(&mut self, shared: &Arc<Shared>, tasks: &mut JoinSet<()>, incoming: Incoming) {
        let (subject, route) = match &incoming.payload {
            Err(_) => (None, None),
            Ok(event) => match shared.route_for(event.event_type()) {
                // No handler: skipped at once, outside the subject's order.
                None => (None, None),
                Some(route) => (Some(event.subject().to_owned()), Some(route)),
            },
        };
        let job = Job { incoming, route };
        match subject {
            None => self.start(shared, tasks, None, job),
            Some(subject) => match self.waiting.get_mut(&subject) {
                Some(queue) => {
                    queue.push_back(job);
                    self.queued += 1;
                }
                None => {
                    self.waiting.insert(subject.clone(), VecDeque::new());
                    self.start(shared, tasks, Some(subject), job);
                }
            },
        }
    }

    fn start(
        &mut self,
        shared: &Arc<Shared>,
        tasks: &mut JoinSet<()>,
        subject: Option<String>,
        job: Job,
    ) {
        let span = match &job.incoming.payload {
            Ok(event) => info_span!(
                "consume",
                consumer = %shared.name,
                event_id = %event.id(),
                event_type = %event.event_type(),
                subject = %event.subject(),
            ),
            Err(_) => info_span!("consume", consumer = %shared.name, undecodable = true),
        };
        let task = handle_message(shared.clone(), job.incoming, job.route).instrument(span);
        let id = tasks.spawn(task).id();
        self.running.insert(id, subject);
    }

    /// Records a finished task and starts the next message of its subject.
    /// While stopping, nothing starts: the subject's waiting messages are
    /// returned, to be handed back to the broker.
    fn finished(
        &mut self,
        shared: &Arc<Shared>,
        tasks: &mut JoinSet<()>,
        done: Result<(tokio::task::Id, ()), JoinError>,
        stopping: bool,
    ) -> Vec<Incoming> {
        let id = match done {
            Ok((id, ())) => id,
            Err(e) => {
                if e.is_panic() {
                    error!(error = %e, "a handling task panicked; its message stays unacknowledged and will be redelivered");
                }
                e.id()
            }
        };
        let Some(Some(subject)) = self.running.remove(&id) else {
            return Vec::new();
        };
        if stopping {
            let queue = self.waiting.remove(&subject).unwrap_or_default();
            self.queued -= queue.len();
            return queue.into_iter().map(|job| job.incoming).collect();
        }
        match self.waiting.get_mut(&subject).and_then(VecDeque::pop_front) {
            Some(next) => {
                self.queued -= 1;
                self.start(shared, tasks, Some(subject), next);
            }
            None => {
                self.waiting.remove(&subject);
            }
        }
        Vec::new()
    }

    /// Every waiting message (after the running tasks were abandoned).
    fn take_waiting(&mut self) -> Vec<Incoming> {
        self.queued = 0;
        self.waiting
            .drain()
            .flat_map(|(_, queue)| queue.into_iter().map(|job| job.incoming))
            .collect()
    }
}

/// Receives until shutdown (or the source closes), then drains.
pub(crate) async fn run_loop<S: Source>(
    shared: Arc<Shared>,
    source: S,
    shutdown: CancellationToken,
) {
    let settings = &shared.settings;
    // A stream keeps a pending `receive` across loop turns, so a message
    // is never lost to a dropped future while the loop tends to tasks.
    let messages = futures::stream::unfold(source, |mut source| async move {
        let next = source.receive().await?;
        Some((next, source))
    });
    let mut messages = std::pin::pin!(messages);
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut scheduler = Scheduler::default();
    let mut receive_failures = 0u32;
    let mut resume_at: Option<Instant> = None;
    info!(
        routes = ?shared.routes.iter().map(|r| r.pattern.as_str()).collect::<Vec<_>>(),
        concurrency = settings.concurrency,
        max_attempts = settings.max_attempts,
        "consumer started"
    );

    loop {
        // Handlings waiting to retry hold no slot: other subjects go on.
        let active = tasks
            .len()
            .saturating_sub(shared.backing_off.load(Ordering::SeqCst));
        let can_receive = resume_at.is_none()
            && active < settings.concurrency
            && scheduler.held() < settings.max_pending;
        let resume = async {
            match resume_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                scheduler.finished(&shared, &mut tasks, done, false);
            }
            () = resume => resume_at = None,
            () = shared.slot_freed.notified() => {}
            next = messages.next(), if can_receive => match next {
                Some(Ok(incoming)) => {
                    receive_failures = 0;
                    scheduler.dispatch(&shared, &mut tasks, incoming);
                }
                Some(Err(e)) => {
                    receive_failures = receive_failures.saturating_add(1);
                    shared.count(
                        &shared.counters.receive_errors,
                        "proclaim_consumer_receive_errors_total",
                    );
                    if receive_failures == 1 || receive_failures.is_multiple_of(20) {
                        warn!(error = %e.full_message(), failures = receive_failures, "receiving failed; retrying");
                    }
                    resume_at =
                        Some(Instant::now() + settings.outage_backoff.delay(receive_failures));
                }
                None => {
                    info!("the source is closed; stopping");
                    break;
                }
            },
        }
    }

    shared.stopping.cancel();
    info!(
        in_flight = tasks.len(),
        waiting = scheduler.queued,
        "consumer stopping; finishing in-flight handlings"
    );
    let drain = async {
        while let Some(done) = tasks.join_next_with_id().await {
            for incoming in scheduler.finished(&shared, &mut tasks, done, true) {
                release(&shared, incoming.acker, Duration::ZERO).await;
            }
        }
    };
    if tokio::time::timeout(settings.shutdown_timeout, drain)
        .await
        .is_err()
    {
        warn!(
            in_flight = tasks.len(),
            "handlings did not finish within {:?}; abandoning them unacknowledged, the broker will redeliver them",
            settings.shutdown_timeout
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        for incoming in scheduler.take_waiting() {
            // Not nacked: the broker may be what is slow. Dropping the
            // acker leaves the message unacknowledged.
            drop(incoming);
            shared.count(
                &shared.counters.released,
                "proclaim_consumer_released_total",
            );
        }
    }
    let report = shared.counters.snapshot();
    info!(
        handled = report.handled,
        parked = report.parked,
        skipped = report.skipped,
        released = report.released,
        "consumer stopped"
    );
}

/// Handles one message to the end: the handler with retries, or a park,
/// or a skip; then the ack (or, when stopping first, a nack).
async fn handle_message(shared: Arc<Shared>, incoming: Incoming, route: Option<usize>) {
    let Incoming {
        payload,
        delivery_attempt,
        acker,
    } = incoming;
    let event = match payload {
        Ok(event) => event,
        Err(bad) => {
            warn!(reason = %bad.reason, "message does not decode; parking it");
            let reason = format!("undecodable message: {}", bad.reason);
            let parked = parked_event(&shared, None, bad.raw, reason, 0);
            park_then_ack(&shared, parked, acker, "undecodable").await;
            return;
        }
    };
    let Some(route) = route else {
        debug!("no handler for this event type; skipping it");
        shared.count(&shared.counters.skipped, "proclaim_consumer_skipped_total");
        ack(&shared, acker).await;
        return;
    };
    let handler = shared.routes[route].handler.as_ref();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let cx = Context::for_attempt(
            shared.name.clone(),
            event.clone(),
            (),
            attempt,
            delivery_attempt,
        );
        let result = {
            // The semaphore is never closed; without a permit, run anyway.
            let _permit = shared.permits.acquire().await.ok();
            let started = Instant::now();
            let result = call(handler, cx, shared.settings.handler_timeout).await;
            metrics::histogram!("proclaim_consumer_handle_seconds", shared.labels.clone())
                .record(started.elapsed().as_secs_f64());
            result
        };
        let error = match result {
            Ok(()) => {
                debug!(attempt, "handled");
                shared.count(&shared.counters.handled, "proclaim_consumer_handled_total");
                ack(&shared, acker).await;
                return;
            }
            Err(Failure::Decode(reason)) => {
                warn!(%reason, "event data does not decode; parking it");
                let parked = parked_event(&shared, Some(event), Vec::new(), reason, 0);
                park_then_ack(&shared, parked, acker, "decode").await;
                return;
            }
            Err(Failure::Handler(e)) => e,
        };
        let message = error.full_message();
        if !error.is_transient() {
            let reason = format!("permanent failure: {message}");
            let parked = parked_event(&shared, Some(event), Vec::new(), reason, attempt);
            park_then_ack(&shared, parked, acker, "permanent").await;
            return;
        }
        if attempt >= shared.settings.max_attempts {
            let reason = format!("gave up after {attempt} attempts: {message}");
            let parked = parked_event(&shared, Some(event), Vec::new(), reason, attempt);
            park_then_ack(&shared, parked, acker, "exhausted").await;
            return;
        }
        let delay = shared
            .settings
            .backoff
            .delay(attempt)
            .max(error.retry_after().unwrap_or_default());
        shared.count(&shared.counters.retried, "proclaim_consumer_retried_total");
        debug!(attempt, ?delay, error = %message, "handler failed; will retry");
        if !shared.back_off(delay).await {
            debug!("stopping; handing the message back to the broker instead of retrying");
            release(&shared, acker, delay).await;
            return;
        }
    }
}

/// One attempt: the handler bounded by `timeout`, a panic caught as a
/// transient failure.
async fn call(handler: &dyn DynHandler, cx: Context<()>, timeout: Duration) -> Result<(), Failure> {
    // The call itself (which decodes `data`) runs inside the guarded future.
    let attempt = AssertUnwindSafe(async move { handler.call(cx).await }).catch_unwind();
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => Err(Failure::Handler(HandlerError::transient(format!(
            "handler panicked: {}",
            panic_message(panic.as_ref())
        )))),
        Err(_) => Err(Failure::Handler(HandlerError::transient(format!(
            "handler did not finish within {timeout:?}"
        )))),
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

fn parked_event(
    shared: &Shared,
    event: Option<Event>,
    raw: Vec<u8>,
    reason: String,
    attempts: u32,
) -> ParkedEvent {
    ParkedEvent {
        id: 0,
        consumer: shared.name.to_string(),
        event,
        raw,
        reason,
        attempts,
        parked_at: Utc::now(),
    }
}

/// Parks, retrying until it works, then acks. The message stays
/// unacknowledged until the park is stored; on shutdown it is handed back.
async fn park_then_ack(
    shared: &Shared,
    parked: ParkedEvent,
    acker: Box<dyn DynAcker>,
    kind: &'static str,
) {
    let mut failures = 0u32;
    loop {
        let stored = match tokio::time::timeout(PARK_TIMEOUT, shared.parked.park(&parked)).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(
                format!("parking did not finish within {PARK_TIMEOUT:?}").into(),
            )),
        };
        match stored {
            Ok(()) => {
                shared.counters.parked.fetch_add(1, Ordering::Relaxed);
                let mut labels = shared.labels.clone();
                labels.push(metrics::Label::new("reason", kind));
                metrics::counter!("proclaim_consumer_parked_total", labels).increment(1);
                warn!(reason = %parked.reason, attempts = parked.attempts, "event parked");
                ack(shared, acker).await;
                return;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                shared.count(
                    &shared.counters.park_failures,
                    "proclaim_consumer_park_failures_total",
                );
                if failures == 1 || failures.is_multiple_of(20) {
                    error!(
                        error = %e,
                        failures,
                        "parking failed; the message stays unacknowledged and parking will be retried"
                    );
                }
                if !shared
                    .back_off(shared.settings.outage_backoff.delay(failures))
                    .await
                {
                    warn!(
                        "stopping before the event could be parked; handing it back to the broker"
                    );
                    release(shared, acker, Duration::ZERO).await;
                    return;
                }
            }
        }
    }
}

async fn ack(shared: &Shared, acker: Box<dyn DynAcker>) {
    let failure = match tokio::time::timeout(ACK_TIMEOUT, acker.ack()).await {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.full_message(),
        Err(_) => format!("not confirmed within {ACK_TIMEOUT:?}"),
    };
    shared.count(
        &shared.counters.ack_failures,
        "proclaim_consumer_ack_failures_total",
    );
    warn!(error = %failure, "ack failed; the broker may deliver the message again");
}

/// Hands a message back to the broker unsettled, for redelivery after
/// `delay`.
async fn release(shared: &Shared, acker: Box<dyn DynAcker>, delay: Duration) {
    shared.count(
        &shared.counters.released,
        "proclaim_consumer_released_total",
    );
    match tokio::time::timeout(ACK_TIMEOUT, acker.nack(delay)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            debug!(error = %e.full_message(), "nack failed; the broker redelivers the message after its own timeout");
        }
        Err(_) => debug!(
            "nack not confirmed in time; the broker redelivers the message after its own timeout"
        ),
    }
}
