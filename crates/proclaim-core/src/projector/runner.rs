//! The projector's engine: read ahead from the log, lock the checkpoint,
//! apply a batch, advance the checkpoint, commit — with retries, stops and
//! graceful shutdown.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, error, info, info_span, warn};
use uuid::Uuid;

use super::{
    CheckpointStore, CheckpointTx, MAX_PROJECTION_NAME_LEN, Projection, ProjectionError,
    ReplayEntry, ReplayError, ReplaySource,
};
use crate::{Backoff, ConfigError, StoreError};

/// How often at most the lag gauge is refreshed while batches are applied
/// (it is also refreshed whenever the projector has caught up).
const LAG_INTERVAL: Duration = Duration::from_secs(1);

/// Why a projector stopped (or could not start). Every variant names the
/// projection; those about an entry name its position.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectorError {
    /// An entry of the log is not an event. The entries before it are
    /// applied and committed; the checkpoint stays just before it.
    #[error(
        "projection {projection}: the entry at position {position} is not an event ({reason}); \
         stopped before it — a projection never skips an entry"
    )]
    Undecodable {
        /// The projection.
        projection: String,
        /// The entry's position.
        position: u64,
        /// Why it does not decode.
        reason: String,
    },
    /// [`Projection::apply`] failed permanently (or transiently more often
    /// than [`Projector::max_attempts`] allows). The entries before it are
    /// applied and committed; the checkpoint stays just before it.
    #[error(
        "projection {projection}: event {event_id} ({event_type}) at position {position} \
         could not be applied: {}; stopped before it", .source.full_message()
    )]
    Apply {
        /// The projection.
        projection: String,
        /// The entry's position.
        position: u64,
        /// The event's id.
        event_id: Uuid,
        /// The event's type.
        event_type: String,
        /// The projection's error.
        #[source]
        source: ProjectionError,
    },
    /// [`Projection::reset`] failed: nothing was reset, the checkpoint is
    /// unchanged.
    #[error("projection {projection}: resetting the read model failed: {}", .source.full_message())]
    Reset {
        /// The projection.
        projection: String,
        /// The projection's error.
        #[source]
        source: ProjectionError,
    },
    /// The log could not be read (permanently: e.g. the entries after the
    /// checkpoint are gone, or the checkpoint is beyond the log's end).
    #[error("projection {projection}: reading the log after position {after} failed: {}", .source.full_message())]
    Source {
        /// The projection.
        projection: String,
        /// The position the projector read after.
        after: u64,
        /// The source's error.
        #[source]
        source: ReplayError,
    },
    /// The log returned entries out of order, or not after the position
    /// asked for: a broken [`ReplaySource`].
    #[error(
        "projection {projection}: the log returned position {position} when asked for entries \
         after {after} in ascending order"
    )]
    OutOfOrder {
        /// The projection.
        projection: String,
        /// The position asked for.
        after: u64,
        /// The offending entry's position.
        position: u64,
    },
    /// The checkpoint store failed (permanently: a missing table,
    /// permissions, a position it cannot keep, …).
    #[error("projection {projection}: the checkpoint store failed: {source}")]
    Store {
        /// The projection.
        projection: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The projector's task ended without a result (it panicked).
    #[error("projection {projection}: the projector task failed: {reason}")]
    Task {
        /// The projection.
        projection: String,
        /// What happened.
        reason: String,
    },
    /// The projector is configured wrongly.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl ProjectorError {
    /// The position of the entry the projector stopped before, when the
    /// error is about one.
    ///
    /// ```
    /// use proclaim_core::projector::ProjectorError;
    ///
    /// let err = ProjectorError::Undecodable {
    ///     projection: "donor-totals".into(),
    ///     position: 42,
    ///     reason: "no ce-id header".into(),
    /// };
    /// assert_eq!(err.position(), Some(42));
    /// assert!(err.to_string().contains("position 42"));
    /// ```
    pub fn position(&self) -> Option<u64> {
        match self {
            ProjectorError::Undecodable { position, .. }
            | ProjectorError::Apply { position, .. } => Some(*position),
            _ => None,
        }
    }
}

/// Totals since the projector was made (also across
/// [`catch_up`](Projector::catch_up), [`rebuild`](Projector::rebuild) and
/// [`run`](Projector::run) calls).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProjectorReport {
    /// The checkpoint: the position of the last entry applied (or skipped)
    /// as last committed or read by this projector.
    pub position: u64,
    /// Events applied to the read model.
    pub applied: u64,
    /// Events the projection did not want ([`Projection::wants`]).
    pub skipped: u64,
    /// Batches committed.
    pub batches: u64,
    /// Failed attempts that were followed by a retry.
    pub retries: u64,
}

#[derive(Default)]
struct Counters {
    position: AtomicU64,
    applied: AtomicU64,
    skipped: AtomicU64,
    batches: AtomicU64,
    retries: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ProjectorReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ProjectorReport {
            position: get(&self.position),
            applied: get(&self.applied),
            skipped: get(&self.skipped),
            batches: get(&self.batches),
            retries: get(&self.retries),
        }
    }
}

#[derive(Debug, Clone)]
struct Settings {
    batch_size: usize,
    backoff: Backoff,
    max_attempts: Option<u32>,
    idle_wait: Duration,
    shutdown_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            batch_size: 256,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(30)),
            max_attempts: None,
            idle_wait: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// What the projector knows between batches.
#[derive(Default)]
struct State {
    /// The committed checkpoint as last seen (`None`: not read yet).
    cursor: Option<u64>,
    /// Entries read after `cursor`, not applied yet, in log order.
    buffer: VecDeque<ReplayEntry>,
    /// An entry whose apply failed permanently inside a batch: the entries
    /// before it are committed first, then the projector stops with this
    /// error.
    poisoned: Option<(u64, ProjectorError)>,
    /// When the lag gauge was last refreshed.
    lag_at: Option<Instant>,
}

/// How one step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// A batch was committed.
    Applied,
    /// The log has nothing after the checkpoint (now, or within the wait).
    Idle,
    /// The checkpoint was not where this projector left it (another runner,
    /// a rebuild elsewhere, a commit whose outcome was unknown), or a batch
    /// was cut short: go again at once.
    Again,
    /// Shutdown was asked for while waiting.
    Stopped,
}

enum Failure {
    Transient(ProjectorError),
    Permanent(ProjectorError),
}

/// Builds a read model from a [`ReplaySource`] with its checkpoint in a
/// [`CheckpointStore`]; see the [module docs](super).
///
/// ```no_run
/// use std::time::Duration;
/// use proclaim_core::projector::{CheckpointStore, Projection, Projector, ReplaySource};
///
/// # async fn demo<C, P, S>(projection: P, checkpoints: C, log: S) -> Result<(), Box<dyn std::error::Error>>
/// # where C: CheckpointStore, P: Projection<C::Tx>, S: ReplaySource {
/// let projector = Projector::new(projection, checkpoints, log)
///     .batch_size(500)        // events per transaction
///     .max_attempts(20);      // give up on a failure that keeps coming back
/// let handle = projector.spawn()?; // catches up, then follows the log
/// // … on SIGTERM: finish the batch in flight, then stop.
/// let report = handle.shutdown().await?;
/// tracing::info!(position = report.position, applied = report.applied, "projector stopped");
/// # Ok(()) }
/// ```
pub struct Projector<P, C, S> {
    projection: P,
    checkpoints: C,
    source: S,
    name: Arc<str>,
    labels: Vec<metrics::Label>,
    settings: Settings,
    state: State,
    counters: Arc<Counters>,
}

impl<P, C, S> fmt::Debug for Projector<P, C, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Projector")
            .field("projection", &self.name)
            .field("settings", &self.settings)
            .field("position", &self.state.cursor)
            .field("buffered", &self.state.buffer.len())
            .finish_non_exhaustive()
    }
}

impl<P, C, S> Projector<P, C, S>
where
    C: CheckpointStore,
    P: Projection<C::Tx>,
    S: ReplaySource,
{
    /// A projector applying `source`'s entries to `projection`, with its
    /// checkpoint in `checkpoints` under [`Projection::name`].
    pub fn new(projection: P, checkpoints: C, source: S) -> Self {
        let name: Arc<str> = Arc::from(projection.name());
        Projector {
            labels: vec![metrics::Label::new("projection", name.to_string())],
            name,
            projection,
            checkpoints,
            source,
            settings: Settings::default(),
            state: State::default(),
            counters: Arc::default(),
        }
    }

    /// Applies up to `n` entries per transaction (default 256). Larger
    /// batches commit less often; a failure rolls back and repeats the
    /// whole batch.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.settings.batch_size = n;
        self
    }

    /// The wait between retries of a failed batch (default 100 ms doubling
    /// to 30 s).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.settings.backoff = backoff;
        self
    }

    /// Stops after `n` failed attempts in a row at one batch (default: keep
    /// retrying transient failures for ever — an outage of the database or
    /// the log only pauses the projector).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.settings.max_attempts = Some(n);
        self
    }

    /// How long one wait for new entries lasts when the projector has
    /// caught up (default 5 s); it wakes up earlier for a new entry or a
    /// shutdown. Each wait ends with a refresh of the lag gauge.
    pub fn idle_wait(mut self, wait: Duration) -> Self {
        self.settings.idle_wait = wait;
        self
    }

    /// How long [`ProjectorHandle::shutdown`] waits for the batch in flight
    /// (default 30 s); then the batch is abandoned and rolled back.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.settings.shutdown_timeout = timeout;
        self
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// The checkpoint store.
    pub fn checkpoints(&self) -> &C {
        &self.checkpoints
    }

    /// The checkpoint as this projector last saw it (`None` before it read
    /// it).
    pub fn position(&self) -> Option<u64> {
        self.state.cursor
    }

    /// The totals so far.
    pub fn report(&self) -> ProjectorReport {
        self.counters.snapshot()
    }

    /// Checks the configuration: a projection name of 1-255 bytes without
    /// control characters, a batch size and `max_attempts` of at least 1,
    /// and an `idle_wait` above zero.
    ///
    /// ```
    /// use proclaim_core::projector::{MemoryLog, Projection, ProjectionError, Projector};
    /// # use proclaim_core::projector::{Checkpoint, CheckpointStore, CheckpointTx};
    /// # use proclaim_core::{Event, StoreError};
    /// # struct Tx;
    /// # impl CheckpointTx for Tx {
    /// #     fn projection(&self) -> &str { "" }
    /// #     fn position(&self) -> u64 { 0 }
    /// #     async fn set_position(&mut self, _: u64) -> Result<(), StoreError> { Ok(()) }
    /// #     async fn commit(self) -> Result<(), StoreError> { Ok(()) }
    /// #     async fn rollback(self) -> Result<(), StoreError> { Ok(()) }
    /// # }
    /// # struct Store;
    /// # impl CheckpointStore for Store {
    /// #     type Tx = Tx;
    /// #     async fn begin(&self, _: &str) -> Result<Tx, StoreError> { Ok(Tx) }
    /// #     async fn position(&self, _: &str) -> Result<u64, StoreError> { Ok(0) }
    /// #     async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> { Ok(Vec::new()) }
    /// # }
    /// struct Unnamed;
    /// impl Projection<Tx> for Unnamed {
    ///     fn name(&self) -> &str { "" }
    ///     async fn apply(&self, _: &mut Tx, _: &Event) -> Result<(), ProjectionError> { Ok(()) }
    ///     async fn reset(&self, _: &mut Tx) -> Result<(), ProjectionError> { Ok(()) }
    /// }
    /// let projector = Projector::new(Unnamed, Store, MemoryLog::new());
    /// assert!(projector.validate().unwrap_err().0.contains("name"));
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = &*self.name;
        if name.trim().is_empty() {
            return Err(ConfigError("a projection needs a name".into()));
        }
        if name.len() > MAX_PROJECTION_NAME_LEN {
            return Err(ConfigError(format!(
                "projection name {:?}… is longer than {MAX_PROJECTION_NAME_LEN} bytes",
                name.chars().take(32).collect::<String>()
            )));
        }
        if name.chars().any(char::is_control) {
            return Err(ConfigError(format!(
                "projection name {name:?} contains a control character"
            )));
        }
        if self.settings.batch_size == 0 {
            return Err(ConfigError("batch_size must be at least 1".into()));
        }
        if self.settings.max_attempts == Some(0) {
            return Err(ConfigError("max_attempts must be at least 1".into()));
        }
        if self.settings.idle_wait.is_zero() {
            return Err(ConfigError(
                "idle_wait must be above zero (a caught-up projector would poll without pause)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Applies the log up to its end as of the call, then returns — for
    /// tests, batch jobs and a start-up that must not serve a stale read
    /// model. Entries appended meanwhile may or may not be applied.
    ///
    /// Cancel-safe: dropping the future rolls back the batch in flight.
    pub async fn catch_up(&mut self) -> Result<ProjectorReport, ProjectorError> {
        self.validate()?;
        let span = info_span!("projector", projection = %self.name);
        self.catch_up_inner().instrument(span).await
    }

    /// Rebuilds the read model from scratch: in one transaction,
    /// [`Projection::reset`] and the checkpoint back to 0; then the log is
    /// replayed from its start, as [`catch_up`](Projector::catch_up) does.
    /// Another runner of the projection (e.g. in another process) notices
    /// the reset at its next batch and replays from the start too.
    pub async fn rebuild(&mut self) -> Result<ProjectorReport, ProjectorError> {
        self.validate()?;
        let span = info_span!("projector", projection = %self.name);
        async {
            let mut failures = 0u32;
            loop {
                match self.reset_once().await {
                    Ok(()) => break,
                    Err(Failure::Permanent(e)) => return Err(self.stopped(e)),
                    Err(Failure::Transient(e)) => {
                        failures = failures.saturating_add(1);
                        if !self.back_off(e, failures, None).await? {
                            return Ok(self.counters.snapshot());
                        }
                    }
                }
            }
            metrics::counter!("proclaim_projector_rebuilds_total", self.labels.clone())
                .increment(1);
            info!("read model reset; replaying the log from the start");
            self.catch_up_inner().await
        }
        .instrument(span)
        .await
    }

    /// Catches up, then follows the log, until `shutdown` is cancelled
    /// (then it finishes the batch in flight, and returns the totals) or a
    /// permanent failure stops it.
    pub async fn run(
        mut self,
        shutdown: CancellationToken,
    ) -> Result<ProjectorReport, ProjectorError> {
        self.validate()?;
        let span = info_span!("projector", projection = %self.name);
        self.run_loop(&shutdown).instrument(span).await
    }

    /// Runs the projector on a new task, as [`run`](Projector::run) does,
    /// until [`ProjectorHandle::shutdown`].
    pub fn spawn(self) -> Result<ProjectorHandle, ConfigError> {
        self.validate()?;
        let token = CancellationToken::new();
        let counters = self.counters.clone();
        let name = self.name.clone();
        let shutdown_timeout = self.settings.shutdown_timeout;
        let span = info_span!("projector", projection = %self.name);
        let task = tokio::spawn({
            let token = token.clone();
            let mut projector = self;
            async move { projector.run_loop(&token).await }.instrument(span)
        });
        Ok(ProjectorHandle {
            name,
            token,
            task: Some(task),
            counters,
            shutdown_timeout,
        })
    }

    async fn run_loop(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<ProjectorReport, ProjectorError> {
        info!(batch_size = self.settings.batch_size, "projector started");
        let mut caught_up = false;
        while !shutdown.is_cancelled() {
            match self.advance(self.settings.idle_wait, Some(shutdown)).await {
                Ok(Step::Stopped) => break,
                Ok(Step::Idle) => {
                    if !caught_up {
                        caught_up = true;
                        info!(
                            position = self.state.cursor.unwrap_or(0),
                            "caught up; following the log"
                        );
                    }
                    self.refresh_lag(true).await;
                }
                Ok(Step::Applied | Step::Again) => self.refresh_lag(false).await,
                Err(e) => return Err(e),
            }
        }
        let report = self.counters.snapshot();
        info!(
            position = report.position,
            applied = report.applied,
            "projector stopped"
        );
        Ok(report)
    }

    async fn catch_up_inner(&mut self) -> Result<ProjectorReport, ProjectorError> {
        let target = self.log_end().await?;
        loop {
            if self.state.cursor.is_some_and(|c| c >= target) {
                break;
            }
            match self.advance(Duration::ZERO, None).await? {
                Step::Idle | Step::Stopped => break,
                Step::Applied | Step::Again => self.refresh_lag(false).await,
            }
        }
        self.refresh_lag(true).await;
        let report = self.counters.snapshot();
        debug!(position = report.position, target, "caught up");
        Ok(report)
    }

    /// The log's end, retrying transient failures.
    async fn log_end(&mut self) -> Result<u64, ProjectorError> {
        let mut failures = 0u32;
        loop {
            match self.source.end().await {
                Ok(end) => return Ok(end),
                Err(e) => {
                    let error = ProjectorError::Source {
                        projection: self.name.to_string(),
                        after: self.state.cursor.unwrap_or(0),
                        source: e,
                    };
                    if !is_transient_source(&error) {
                        return Err(self.stopped(error));
                    }
                    failures = failures.saturating_add(1);
                    if !self.back_off(error, failures, None).await? {
                        return Ok(self.state.cursor.unwrap_or(0));
                    }
                }
            }
        }
    }

    /// One step, with transient failures retried after a backoff.
    async fn advance(
        &mut self,
        wait: Duration,
        shutdown: Option<&CancellationToken>,
    ) -> Result<Step, ProjectorError> {
        let mut failures = 0u32;
        loop {
            match self.step(wait, shutdown).await {
                Ok(step) => return Ok(step),
                Err(Failure::Permanent(e)) => return Err(self.stopped(e)),
                Err(Failure::Transient(e)) => {
                    failures = failures.saturating_add(1);
                    if !self.back_off(e, failures, shutdown).await? {
                        return Ok(Step::Stopped);
                    }
                }
            }
        }
    }

    /// Counts a retry and sleeps before it; `Err` once `max_attempts` is
    /// reached, `Ok(false)` when shutdown came first.
    async fn back_off(
        &mut self,
        error: ProjectorError,
        failures: u32,
        shutdown: Option<&CancellationToken>,
    ) -> Result<bool, ProjectorError> {
        let delay = self.retry_delay(error, failures)?;
        Ok(sleep_unless_cancelled(delay, shutdown).await)
    }

    /// The delay before the next attempt (counted as a retry), or the
    /// error once `max_attempts` is reached.
    fn retry_delay(
        &self,
        error: ProjectorError,
        failures: u32,
    ) -> Result<Duration, ProjectorError> {
        if self
            .settings
            .max_attempts
            .is_some_and(|max| failures >= max)
        {
            warn!(attempts = failures, "giving up after repeated failures");
            return Err(self.stopped(error));
        }
        self.counters.retries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("proclaim_projector_retries_total", self.labels.clone()).increment(1);
        let delay = self.settings.backoff.delay(failures);
        if failures == 1 || failures.is_multiple_of(10) {
            warn!(error = %error, failures, ?delay, "batch failed; rolled back, retrying");
        } else {
            debug!(error = %error, failures, ?delay, "batch failed; rolled back, retrying");
        }
        Ok(delay)
    }

    /// Logs and counts a stop.
    fn stopped(&self, error: ProjectorError) -> ProjectorError {
        metrics::counter!("proclaim_projector_failures_total", self.labels.clone()).increment(1);
        error!(error = %error, "projector stopped");
        error
    }

    /// Reads ahead if nothing is buffered, then applies one batch.
    async fn step(
        &mut self,
        wait: Duration,
        shutdown: Option<&CancellationToken>,
    ) -> Result<Step, Failure> {
        let cursor = match self.state.cursor {
            Some(cursor) => cursor,
            None => {
                let position = self
                    .checkpoints
                    .position(&self.name)
                    .await
                    .map_err(|e| self.store_failure(e))?;
                self.moved_to(position);
                debug!(position, "checkpoint read");
                position
            }
        };
        if self.state.buffer.is_empty() {
            let read = self.source.read(cursor, self.settings.batch_size, wait);
            let read = match shutdown {
                Some(token) => tokio::select! {
                    biased;
                    () = token.cancelled() => return Ok(Step::Stopped),
                    read = read => read,
                },
                None => read.await,
            };
            let entries = read.map_err(|e| {
                let transient = e.is_transient();
                let error = ProjectorError::Source {
                    projection: self.name.to_string(),
                    after: cursor,
                    source: e,
                };
                if transient {
                    Failure::Transient(error)
                } else {
                    Failure::Permanent(error)
                }
            })?;
            let mut previous = cursor;
            for entry in &entries {
                if entry.position <= previous {
                    return Err(Failure::Permanent(ProjectorError::OutOfOrder {
                        projection: self.name.to_string(),
                        after: cursor,
                        position: entry.position,
                    }));
                }
                previous = entry.position;
            }
            if entries.is_empty() {
                return Ok(Step::Idle);
            }
            self.state.buffer.extend(entries);
        }
        let span = debug_span!("projector_batch", projection = %self.name, after = cursor);
        self.apply_batch(cursor).instrument(span).await
    }

    /// Locks the checkpoint, applies the buffered entries after it (up to
    /// the batch size), advances it and commits.
    async fn apply_batch(&mut self, cursor: u64) -> Result<Step, Failure> {
        let started = Instant::now();
        let mut tx = self
            .checkpoints
            .begin(&self.name)
            .await
            .map_err(|e| self.store_failure(e))?;
        let locked = tx.position();
        if locked != cursor {
            metrics::counter!(
                "proclaim_projector_checkpoint_moved_total",
                self.labels.clone()
            )
            .increment(1);
            let beyond_buffer = self
                .state
                .buffer
                .back()
                .is_none_or(|last| last.position <= locked);
            if locked < cursor || beyond_buffer {
                // Back (a rebuild elsewhere, a hand-set checkpoint) or past
                // everything read: read again from there.
                info!(
                    expected = cursor,
                    found = locked,
                    "the checkpoint moved; reading the log again from it"
                );
                rollback(tx).await;
                self.moved_to(locked);
                return Ok(Step::Again);
            }
            // Forward, within what was read: another runner (or a commit
            // whose outcome was unknown) applied up to `locked`.
            debug!(
                expected = cursor,
                found = locked,
                "the checkpoint moved forward; applying what follows it"
            );
            while self
                .state
                .buffer
                .front()
                .is_some_and(|e| e.position <= locked)
            {
                self.state.buffer.pop_front();
            }
            self.state.cursor = Some(locked);
        }
        if self
            .state
            .poisoned
            .as_ref()
            .is_some_and(|(position, _)| *position <= locked)
        {
            self.state.poisoned = None;
        }

        let limit = self.batch_limit();
        if limit == 0 {
            // The entry that failed is next: everything before it is in.
            rollback(tx).await;
            if let Some((_, error)) = self.state.poisoned.take() {
                return Err(Failure::Permanent(error));
            }
            return Ok(Step::Again);
        }

        let mut applied = 0u64;
        let mut skipped = 0u64;
        let mut last = None;
        let mut taken = 0usize;
        for i in 0..limit {
            let entry = &self.state.buffer[i];
            let position = entry.position;
            let event = match &entry.payload {
                Ok(event) => event,
                Err(bad) => {
                    if last.is_none() {
                        let error = ProjectorError::Undecodable {
                            projection: self.name.to_string(),
                            position,
                            reason: bad.reason.clone(),
                        };
                        rollback(tx).await;
                        return Err(Failure::Permanent(error));
                    }
                    // Commit what comes before it; the next step stops at it.
                    break;
                }
            };
            if self.projection.wants(event) {
                if let Err(e) = self.projection.apply(&mut tx, event).await {
                    let transient = e.is_transient();
                    let error = ProjectorError::Apply {
                        projection: self.name.to_string(),
                        position,
                        event_id: event.id(),
                        event_type: event.event_type().to_owned(),
                        source: e,
                    };
                    rollback(tx).await;
                    if transient {
                        return Err(Failure::Transient(error));
                    }
                    if i == 0 {
                        return Err(Failure::Permanent(error));
                    }
                    // Apply the entries before it in a batch of their own
                    // first, so the checkpoint stops right before it.
                    debug!(
                        position,
                        "an event failed permanently; committing the entries before it first"
                    );
                    self.state.poisoned = Some((position, error));
                    return Ok(Step::Again);
                }
                applied += 1;
            } else {
                skipped += 1;
            }
            last = Some(position);
            taken = i + 1;
        }
        let Some(last) = last else {
            rollback(tx).await;
            return Ok(Step::Again);
        };
        if let Err(e) = tx.set_position(last).await {
            drop(tx);
            return Err(self.store_failure(e));
        }
        if let Err(e) = tx.commit().await {
            // The outcome is unknown: the next attempt reads the checkpoint
            // under the lock and goes on from whatever committed.
            return Err(self.store_failure(e));
        }
        self.state.buffer.drain(..taken);
        self.state.cursor = Some(last);
        let c = &self.counters;
        c.position.store(last, Ordering::Relaxed);
        c.applied.fetch_add(applied, Ordering::Relaxed);
        c.skipped.fetch_add(skipped, Ordering::Relaxed);
        c.batches.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("proclaim_projector_position", self.labels.clone()).set(last as f64);
        metrics::counter!(
            "proclaim_projector_events_applied_total",
            self.labels.clone()
        )
        .increment(applied);
        metrics::counter!(
            "proclaim_projector_events_skipped_total",
            self.labels.clone()
        )
        .increment(skipped);
        metrics::counter!("proclaim_projector_batches_total", self.labels.clone()).increment(1);
        metrics::histogram!("proclaim_projector_batch_seconds", self.labels.clone())
            .record(started.elapsed().as_secs_f64());
        debug!(position = last, applied, skipped, "batch committed");
        Ok(Step::Applied)
    }

    /// Entries of the next batch: up to the batch size, and before a
    /// poisoned entry.
    fn batch_limit(&self) -> usize {
        let limit = self.settings.batch_size.min(self.state.buffer.len());
        match &self.state.poisoned {
            Some((poisoned, _)) => self
                .state
                .buffer
                .iter()
                .take(limit)
                .take_while(|e| e.position < *poisoned)
                .count(),
            None => limit,
        }
    }

    fn store_failure(&self, e: StoreError) -> Failure {
        let transient = e.is_transient();
        let error = ProjectorError::Store {
            projection: self.name.to_string(),
            source: e,
        };
        if transient {
            Failure::Transient(error)
        } else {
            Failure::Permanent(error)
        }
    }

    /// The checkpoint is at `position`: forget what was read ahead.
    fn moved_to(&mut self, position: u64) {
        self.state.cursor = Some(position);
        self.state.buffer.clear();
        self.state.poisoned = None;
        self.counters.position.store(position, Ordering::Relaxed);
        metrics::gauge!("proclaim_projector_position", self.labels.clone()).set(position as f64);
    }

    /// Resets the read model and the checkpoint in one transaction.
    async fn reset_once(&mut self) -> Result<(), Failure> {
        let mut tx = self
            .checkpoints
            .begin(&self.name)
            .await
            .map_err(|e| self.store_failure(e))?;
        let before = tx.position();
        if let Err(e) = self.projection.reset(&mut tx).await {
            rollback(tx).await;
            let transient = e.is_transient();
            let error = ProjectorError::Reset {
                projection: self.name.to_string(),
                source: e,
            };
            return Err(if transient {
                Failure::Transient(error)
            } else {
                Failure::Permanent(error)
            });
        }
        if let Err(e) = tx.set_position(0).await {
            drop(tx);
            return Err(self.store_failure(e));
        }
        tx.commit().await.map_err(|e| self.store_failure(e))?;
        info!(from = before, "read model reset and checkpoint set to 0");
        self.moved_to(0);
        Ok(())
    }

    /// Sets the lag gauge from the log's end, at most every second unless
    /// `now`; a failure only skips the update.
    async fn refresh_lag(&mut self, now: bool) {
        if !now
            && self
                .state
                .lag_at
                .is_some_and(|at| at.elapsed() < LAG_INTERVAL)
        {
            return;
        }
        self.state.lag_at = Some(Instant::now());
        let Some(position) = self.state.cursor else {
            return;
        };
        match self.source.end().await {
            Ok(end) => {
                metrics::gauge!("proclaim_projector_lag", self.labels.clone())
                    .set(end.saturating_sub(position) as f64);
            }
            Err(e) => debug!(error = %e.full_message(), "cannot read the log's end for the lag"),
        }
    }
}

/// Sleeps `delay`; `false` if `shutdown` was cancelled first.
async fn sleep_unless_cancelled(delay: Duration, shutdown: Option<&CancellationToken>) -> bool {
    match shutdown {
        Some(token) => tokio::select! {
            biased;
            () = token.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        },
        None => {
            tokio::time::sleep(delay).await;
            true
        }
    }
}

fn is_transient_source(error: &ProjectorError) -> bool {
    matches!(error, ProjectorError::Source { source, .. } if source.is_transient())
}

/// Rolls back; a failure only means the connection is closed instead of
/// reused (nothing was committed either way).
async fn rollback<T: CheckpointTx>(tx: T) {
    if let Err(e) = tx.rollback().await {
        debug!(error = %e, "rollback failed; the transaction ends with its connection");
    }
}

/// A projector running on its own task; see [`Projector::spawn`].
/// Dropping the handle asks the projector to stop, as
/// [`ProjectorHandle::shutdown`] does, without waiting for it.
#[must_use = "dropping a ProjectorHandle stops the projector"]
pub struct ProjectorHandle {
    name: Arc<str>,
    token: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<ProjectorReport, ProjectorError>>>,
    counters: Arc<Counters>,
    shutdown_timeout: Duration,
}

impl fmt::Debug for ProjectorHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectorHandle")
            .field("projection", &self.name)
            .field("report", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl Drop for ProjectorHandle {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

impl ProjectorHandle {
    /// Asks the projector to stop, waits for the batch in flight (at most
    /// the shutdown timeout; then it is abandoned and rolled back), and
    /// returns its totals — or the error that had stopped it already.
    pub async fn shutdown(mut self) -> Result<ProjectorReport, ProjectorError> {
        self.token.cancel();
        let Some(mut task) = self.task.take() else {
            return Ok(self.counters.snapshot());
        };
        match tokio::time::timeout(self.shutdown_timeout, &mut task).await {
            Ok(joined) => self.joined(joined),
            Err(_) => {
                warn!(
                    projection = %self.name,
                    "the batch in flight did not finish within {:?}; abandoning it (rolled back)",
                    self.shutdown_timeout
                );
                task.abort();
                let _ = task.await;
                Ok(self.counters.snapshot())
            }
        }
    }

    /// Stops the projector at once, as a crash would: the batch in flight
    /// is abandoned and rolled back (its entries are applied again by the
    /// next run). Returns when the task has ended.
    pub async fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// The totals so far, while the projector runs.
    pub fn report(&self) -> ProjectorReport {
        self.counters.snapshot()
    }

    /// The token that stops the projector when cancelled.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Whether the projector has stopped (shut down, or stopped by a
    /// failure: [`shutdown`](ProjectorHandle::shutdown) returns its error).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    fn joined(
        &self,
        joined: Result<Result<ProjectorReport, ProjectorError>, tokio::task::JoinError>,
    ) -> Result<ProjectorReport, ProjectorError> {
        joined.unwrap_or_else(|e| {
            Err(ProjectorError::Task {
                projection: self.name.to_string(),
                reason: e.to_string(),
            })
        })
    }
}
