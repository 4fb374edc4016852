//! The [`Relay`]: claims committed events, publishes them, records the outcome.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::{
    BatchOutcome, ClaimedBatch, ConfigError, DeadLetter, LeaseToken, OutboxRecord, OutboxStore,
    PublishError, Publisher, RelayConfig, Retry, Wakeups,
};

/// Totals of one relay run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayReport {
    /// Batches claimed.
    pub batches: u64,
    /// Events published and acknowledged.
    pub published: u64,
    /// Failed attempts that will be retried.
    pub retried: u64,
    /// Events dead-lettered.
    pub dead_lettered: u64,
    /// Events handed back without an attempt.
    pub released: u64,
    /// Outcomes that found their lease taken over by another relay.
    pub leases_lost: u64,
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    published: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    released: AtomicU64,
    leases_lost: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> RelayReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RelayReport {
            batches: get(&self.batches),
            published: get(&self.published),
            retried: get(&self.retried),
            dead_lettered: get(&self.dead_lettered),
            released: get(&self.released),
            leases_lost: get(&self.leases_lost),
        }
    }
}

struct Shared<S, P> {
    store: S,
    publisher: P,
    config: RelayConfig,
    counters: Arc<Counters>,
    /// Cancelled when shutdown starts: chains stop taking new events.
    stopping: CancellationToken,
    /// Labels on every metric: `relay=<name>` for a named relay.
    labels: Vec<metrics::Label>,
}

/// Delivers every committed outbox event to a [`Publisher`] at least once.
///
/// The loop: claim a batch under a lease → publish it (different subjects
/// concurrently, the same subject strictly in order) → record the outcome in
/// one statement per kind. While one batch is being published the next one
/// is claimed. A failed event is retried with jittered exponential backoff and
/// dead-lettered after `max_attempts`; until then it holds back only later
/// events of its own subject. When the broker is not ready the relay claims
/// nothing, so an outage burns no attempts. Several relays may run on one
/// table: the store's leases keep them apart.
///
/// ```no_run
/// # async fn demo<S: proclaim_core::OutboxStore, P: proclaim_core::Publisher>(store: S, publisher: P)
/// # -> Result<(), proclaim_core::ConfigError> {
/// use proclaim_core::{Relay, RelayConfig};
///
/// let relay = Relay::new(store, publisher, RelayConfig::default())?.spawn();
/// // … later, e.g. on SIGTERM: finish in-flight work and stop.
/// let report = relay.shutdown().await;
/// println!("published {}", report.published);
/// # Ok(()) }
/// ```
pub struct Relay<S, P> {
    shared: Shared<S, P>,
}

/// A relay running on its own task; see [`Relay::spawn`]. Dropping the
/// handle asks the relay to stop, as [`RelayHandle::shutdown`] does, without
/// waiting for it.
#[must_use = "dropping a RelayHandle stops the relay"]
pub struct RelayHandle {
    token: CancellationToken,
    task: Option<tokio::task::JoinHandle<RelayReport>>,
    counters: Arc<Counters>,
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

impl RelayHandle {
    /// Asks the relay to stop, waits for in-flight batches to finish
    /// (at most `shutdown_timeout`), and returns its totals.
    pub async fn shutdown(mut self) -> RelayReport {
        self.token.cancel();
        match self.task.take() {
            Some(task) => task.await.unwrap_or_else(|e| {
                error!(error = %e, "relay task failed");
                self.counters.snapshot()
            }),
            None => self.counters.snapshot(),
        }
    }

    /// The totals so far, while the relay runs.
    pub fn report(&self) -> RelayReport {
        self.counters.snapshot()
    }

    /// The token that stops the relay when cancelled.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Stops the relay at once, abandoning in-flight batches (their leases
    /// expire and the events are published again): a crash, for tests.
    pub fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl<S: OutboxStore, P: Publisher> Relay<S, P> {
    /// Builds a relay; fails if the configuration cannot work.
    pub fn new(store: S, publisher: P, config: RelayConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Relay {
            shared: Shared {
                store,
                publisher,
                config,
                counters: Arc::default(),
                stopping: CancellationToken::new(),
                labels: Vec::new(),
            },
        })
    }

    /// Names the relay: its metrics carry the label `relay="<name>"` and its
    /// logs the field `relay`, so several relays in one process (a fan-out
    /// and its lanes) can be told apart. Unnamed relays' metrics carry no
    /// label.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.shared.labels = vec![metrics::Label::new("relay", name.into())];
        self
    }

    /// Runs the relay on a new task until [`RelayHandle::shutdown`].
    pub fn spawn(self) -> RelayHandle {
        let token = CancellationToken::new();
        let counters = self.shared.counters.clone();
        let task = tokio::spawn(self.run(token.clone()));
        RelayHandle {
            token,
            task: Some(task),
            counters,
        }
    }

    /// Runs until `shutdown` is cancelled, then finishes in-flight batches
    /// (for at most `shutdown_timeout`) and returns the totals.
    pub async fn run(self, shutdown: CancellationToken) -> RelayReport {
        let shared = Arc::new(self.shared);
        let span = match shared.labels.first() {
            Some(name) => info_span!("relay", relay = %name.value()),
            None => info_span!("relay"),
        };
        run_loop(shared.clone(), shutdown).instrument(span).await;
        shared.counters.snapshot()
    }
}

async fn run_loop<S: OutboxStore, P: Publisher>(
    shared: Arc<Shared<S, P>>,
    shutdown: CancellationToken,
) {
    let config = &shared.config;
    let mut wakeups: Option<Wakeups> = match shared.store.wakeups().await {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "wake-ups unavailable; polling every {:?}", config.poll_interval);
            None
        }
    };
    let mut batches: JoinSet<()> = JoinSet::new();
    let mut outage_failures = 0u32;
    let mut next_purge = Instant::now();
    let mut next_stats = Instant::now();
    // A claim due shortly after the last burst of wake-ups.
    let mut followup_at: Option<tokio::time::Instant> = None;
    // Claims in a row that found nothing, since the last that found something.
    let mut empty_claims = 0u32;
    info!(
        batch_size = config.batch_size,
        lease = ?config.lease,
        wakeups = wakeups.is_some(),
        "relay started"
    );

    loop {
        while let Some(done) = batches.try_join_next() {
            log_join(done);
        }
        if shutdown.is_cancelled() {
            break;
        }
        if let Some(retention) = config.retention
            && Instant::now() >= next_purge
        {
            next_purge = Instant::now() + config.purge_interval;
            match shared.store.purge_published(retention).await {
                Ok(0) => {}
                Ok(n) => debug!(purged = n, "purged published events past retention"),
                Err(e) => warn!(error = %e, "purge failed"),
            }
        }

        if Instant::now() >= next_stats {
            next_stats = Instant::now() + config.stats_interval;
            record_stats(&shared.store, &shared.labels).await;
        }

        let mut claimed_full = false;
        if batches.len() < config.max_batches_in_flight {
            if let Err(e) = shared.publisher.ready().await {
                outage_failures = outage_failures.saturating_add(1);
                if outage_failures == 1 || outage_failures.is_multiple_of(20) {
                    warn!(error = %e.full_message(), "broker not ready; claiming nothing until it is");
                }
                metrics::counter!(
                    "proclaim_relay_broker_not_ready_total",
                    shared.labels.clone()
                )
                .increment(1);
                pause(&shutdown, config.outage_backoff.delay(outage_failures)).await;
                continue;
            }
            let token = LeaseToken::new();
            let claimed_at = Instant::now();
            match shared
                .store
                .claim(token, config.batch_size, config.lease)
                .await
            {
                Ok(batch) => {
                    if outage_failures > 0 {
                        info!("database and broker reachable again");
                    }
                    outage_failures = 0;
                    debug!(claimed = batch.len(), elapsed = ?claimed_at.elapsed(), "claim");
                    empty_claims = if batch.is_empty() {
                        empty_claims.saturating_add(1)
                    } else {
                        0
                    };
                    if batch.len() < config.batch_size && followup_at.is_none() {
                        followup_at = busy_followup(config, empty_claims)
                            .map(|delay| tokio::time::Instant::now() + delay);
                    }
                    if !batch.is_empty() {
                        claimed_full = batch.len() >= config.batch_size;
                        shared.counters.batches.fetch_add(1, Ordering::Relaxed);
                        let deadline = claimed_at + config.lease;
                        let s = shared.clone();
                        batches.spawn(
                            async move { process_batch(s, token, batch, deadline).await }
                                .in_current_span(),
                        );
                    }
                }
                Err(e) => {
                    outage_failures = outage_failures.saturating_add(1);
                    if outage_failures == 1 || outage_failures.is_multiple_of(20) {
                        warn!(error = %e, "claim failed; retrying");
                    }
                    metrics::counter!("proclaim_relay_claim_errors_total", shared.labels.clone())
                        .increment(1);
                    pause(&shutdown, config.outage_backoff.delay(outage_failures)).await;
                    continue;
                }
            }
        }
        if claimed_full && batches.len() < config.max_batches_in_flight {
            continue;
        }

        let wakeup = async {
            match wakeups.as_mut() {
                Some(w) => w.next().await,
                None => std::future::pending().await,
            }
        };
        let followup = async {
            match followup_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(done) = batches.join_next(), if !batches.is_empty() => log_join(done),
            () = followup => followup_at = None,
            hint = wakeup => {
                match hint {
                    // Coalesce a burst of hints into one claim, and claim once
                    // more shortly after the burst (debounced writers).
                    Some(()) => if let Some(w) = wakeups.as_mut() {
                        while let Some(Some(())) = w.next().now_or_never() {}
                        if !config.wakeup_followup.is_zero() {
                            followup_at = Some(tokio::time::Instant::now() + config.wakeup_followup);
                        }
                    },
                    None => {
                        warn!("wake-up stream ended; polling every {:?}", config.poll_interval);
                        wakeups = None;
                    }
                }
            }
            _ = tokio::time::sleep(config.poll_interval) => {}
        }
    }

    info!(
        in_flight_batches = batches.len(),
        "relay stopping; finishing in-flight work"
    );
    let drain = async {
        while let Some(done) = batches.join_next().await {
            log_join(done);
        }
    };
    if tokio::time::timeout(config.shutdown_timeout, drain)
        .await
        .is_err()
    {
        warn!(
            "in-flight batches did not finish within {:?}; their leases will expire and the events will be published again",
            config.shutdown_timeout
        );
        batches.abort_all();
    }
    let report = shared.counters.snapshot();
    info!(
        published = report.published,
        dead_lettered = report.dead_lettered,
        "relay stopped"
    );
}

async fn record_stats<S: OutboxStore>(store: &S, labels: &[metrics::Label]) {
    match store.stats().await {
        Ok(s) => {
            metrics::gauge!("proclaim_outbox_pending", labels.to_vec()).set(s.pending as f64);
            metrics::gauge!("proclaim_outbox_in_flight", labels.to_vec()).set(s.in_flight as f64);
            metrics::gauge!("proclaim_outbox_dead_lettered", labels.to_vec())
                .set(s.dead_lettered as f64);
            metrics::gauge!(
                "proclaim_outbox_oldest_pending_age_seconds",
                labels.to_vec()
            )
            .set(s.oldest_pending_age_ms as f64 / 1000.0);
        }
        Err(e) => debug!(error = %e, "reading outbox counts failed"),
    }
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        error!(error = %e, "a batch task panicked; its leases will expire and its events will be published again");
    }
}

async fn pause(shutdown: &CancellationToken, delay: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

/// When to claim again after a claim that was not full, although nothing
/// woke the relay: events may be waiting behind another relay's in-flight
/// events of their subject, or a debounced writer did not notify. Right
/// after work, soon (`wakeup_followup`); each empty claim doubles the delay,
/// and after six of them only wake-ups and the poll interval remain, so an
/// idle relay costs nothing extra.
fn busy_followup(config: &RelayConfig, empty_claims: u32) -> Option<Duration> {
    const MAX_EMPTY: u32 = 6;
    if config.wakeup_followup.is_zero() || empty_claims > MAX_EMPTY {
        return None;
    }
    Some(
        config
            .wakeup_followup
            .saturating_mul(1 << empty_claims)
            .min(config.poll_interval),
    )
}

async fn process_batch<S: OutboxStore, P: Publisher>(
    shared: Arc<Shared<S, P>>,
    token: LeaseToken,
    batch: ClaimedBatch,
    deadline: Instant,
) {
    let started = Instant::now();
    let config = &shared.config;
    let mut outcome = BatchOutcome::default();
    for bad in batch.malformed {
        warn!(sequence = bad.sequence, error = %bad.error, "malformed outbox row; dead-lettering it");
        outcome.dead.push(DeadLetter {
            sequence: bad.sequence,
            error: format!("malformed outbox row: {}", bad.error),
        });
    }

    // Group by subject, keeping each group in sequence order.
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut groups: Vec<Vec<OutboxRecord>> = Vec::new();
    for record in batch.records {
        let slot = *index
            .entry(record.event.subject().to_owned())
            .or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
        groups[slot].push(record);
    }
    let chains: Vec<BatchOutcome> = futures::stream::iter(
        groups
            .into_iter()
            .map(|group| publish_chain(&shared, group, deadline)),
    )
    .buffer_unordered(config.max_concurrent_publishes)
    .collect()
    .await;
    for chain in chains {
        outcome.published.extend(chain.published);
        outcome.retry.extend(chain.retry);
        outcome.dead.extend(chain.dead);
        outcome.released.extend(chain.released);
    }

    let counters = &shared.counters;
    counters
        .published
        .fetch_add(outcome.published.len() as u64, Ordering::Relaxed);
    counters
        .retried
        .fetch_add(outcome.retry.len() as u64, Ordering::Relaxed);
    counters
        .dead_lettered
        .fetch_add(outcome.dead.len() as u64, Ordering::Relaxed);
    counters
        .released
        .fetch_add(outcome.released.len() as u64, Ordering::Relaxed);
    metrics::counter!(
        "proclaim_relay_events_published_total",
        shared.labels.clone()
    )
    .increment(outcome.published.len() as u64);
    metrics::counter!("proclaim_relay_events_retried_total", shared.labels.clone())
        .increment(outcome.retry.len() as u64);
    metrics::counter!(
        "proclaim_relay_events_dead_lettered_total",
        shared.labels.clone()
    )
    .increment(outcome.dead.len() as u64);
    metrics::counter!(
        "proclaim_relay_events_released_total",
        shared.labels.clone()
    )
    .increment(outcome.released.len() as u64);
    for dead in &outcome.dead {
        warn!(sequence = dead.sequence, error = %dead.error, "event dead-lettered");
    }

    let mut failures = 0u32;
    loop {
        match shared
            .store
            .complete(token, &outcome, config.ack_mode())
            .await
        {
            Ok(report) => {
                if report.lost > 0 {
                    counters.leases_lost.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("proclaim_relay_leases_lost_total", shared.labels.clone())
                        .increment(1);
                    warn!(
                        lost = report.lost,
                        "lease expired before the outcome was recorded; another relay took over these events, which may be published twice"
                    );
                }
                break;
            }
            Err(e) if Instant::now() < deadline => {
                failures += 1;
                warn!(error = %e, "recording the batch outcome failed; retrying");
                tokio::time::sleep(config.outage_backoff.delay(failures)).await;
            }
            Err(e) => {
                error!(
                    error = %e,
                    "could not record the batch outcome before its lease expired; its events will be published again"
                );
                break;
            }
        }
    }
    metrics::histogram!("proclaim_relay_batch_seconds", shared.labels.clone())
        .record(started.elapsed().as_secs_f64());
    debug!(
        published = outcome.published.len(),
        retried = outcome.retry.len(),
        dead = outcome.dead.len(),
        released = outcome.released.len(),
        elapsed = ?started.elapsed(),
        "batch done"
    );
}

/// Publishes the events of one subject in order. The first event that fails
/// and will be retried stops the chain: the later ones are released, so they
/// can never overtake it. On shutdown, publishes already started finish and
/// the rest are released.
async fn publish_chain<S: OutboxStore, P: Publisher>(
    shared: &Shared<S, P>,
    group: Vec<OutboxRecord>,
    deadline: Instant,
) -> BatchOutcome {
    let config = &shared.config;
    let mut out = BatchOutcome::default();
    let mut records = group.into_iter();
    while let Some(record) = records.next() {
        // Stop before the lease could run out mid-publish, or when shutting
        // down; what is left goes back to the outbox without an attempt.
        if shared.stopping.is_cancelled() || Instant::now() + config.publish_timeout >= deadline {
            out.released.push(record.sequence);
            out.released.extend(records.map(|r| r.sequence));
            break;
        }
        let result =
            match tokio::time::timeout(config.publish_timeout, shared.publisher.publish(&record))
                .await
            {
                Ok(result) => result,
                Err(_) => Err(PublishError::transient(format!(
                    "publish not acknowledged within {:?}",
                    config.publish_timeout
                ))),
            };
        match result {
            Ok(()) => out.published.push(record.sequence),
            Err(e) => {
                let kind = if e.is_transient() {
                    "transient"
                } else {
                    "permanent"
                };
                let mut labels = shared.labels.clone();
                labels.push(metrics::Label::new("kind", kind));
                metrics::counter!("proclaim_relay_publish_failures_total", labels).increment(1);
                let message = e.full_message();
                if e.is_transient() && record.attempts < config.max_attempts {
                    // The broker's own `Retry-After`, if longer than the backoff.
                    let delay = config
                        .backoff
                        .delay(record.attempts)
                        .max(e.retry_after().unwrap_or_default());
                    debug!(
                        sequence = record.sequence,
                        attempts = record.attempts,
                        ?delay,
                        error = %message,
                        "publish failed; will retry"
                    );
                    out.retry.push(Retry {
                        sequence: record.sequence,
                        delay,
                        error: message,
                    });
                    out.released.extend(records.map(|r| r.sequence));
                    break;
                }
                let error = if e.is_transient() {
                    format!("gave up after {} attempts: {message}", record.attempts)
                } else {
                    format!("permanent failure: {message}")
                };
                out.dead.push(DeadLetter {
                    sequence: record.sequence,
                    error,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    //! The relay's per-batch decisions, with a fake store that records the
    //! outcome and a publisher that fails on command (fault injection only;
    //! the real stores and brokers are tested in their own crates).
    use std::sync::Mutex;

    use super::*;
    use crate::{
        AckMode, Backoff, CompleteReport, Event, MalformedRecord, OutboxStats, StoreError,
    };

    #[derive(Default)]
    struct RecordingStore {
        outcomes: Mutex<Vec<BatchOutcome>>,
        /// Set when the store is dropped, i.e. when the relay holding it ended.
        dropped: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Drop for RecordingStore {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    impl OutboxStore for RecordingStore {
        async fn claim(
            &self,
            _: LeaseToken,
            _: usize,
            _: Duration,
        ) -> Result<ClaimedBatch, StoreError> {
            Ok(ClaimedBatch::default())
        }
        async fn complete(
            &self,
            _: LeaseToken,
            outcome: &BatchOutcome,
            _: AckMode,
        ) -> Result<CompleteReport, StoreError> {
            self.outcomes.lock().unwrap().push(outcome.clone());
            Ok(CompleteReport {
                applied: outcome.len() as u64,
                lost: 0,
            })
        }
        async fn purge_published(&self, _: Duration) -> Result<u64, StoreError> {
            Ok(0)
        }
        async fn stats(&self) -> Result<OutboxStats, StoreError> {
            Ok(OutboxStats::default())
        }
    }

    /// Fails sequence numbers as told; `hang` never answers.
    struct ScriptedPublisher {
        transient: Vec<i64>,
        permanent: Vec<i64>,
        hang: Vec<i64>,
        /// Transient, with the broker asking for this delay.
        retry_after: Vec<(i64, Duration)>,
        order: Mutex<Vec<i64>>,
    }

    impl Publisher for ScriptedPublisher {
        async fn publish(&self, record: &OutboxRecord) -> Result<(), PublishError> {
            let seq = record.sequence;
            self.order.lock().unwrap().push(seq);
            if self.hang.contains(&seq) {
                std::future::pending::<()>().await;
            }
            if self.transient.contains(&seq) {
                return Err(PublishError::transient("busy"));
            }
            if self.permanent.contains(&seq) {
                return Err(PublishError::permanent("too large"));
            }
            if let Some((_, delay)) = self.retry_after.iter().find(|(s, _)| *s == seq) {
                return Err(PublishError::transient("429").with_retry_after(*delay));
            }
            Ok(())
        }
    }

    fn publisher(transient: &[i64], permanent: &[i64], hang: &[i64]) -> ScriptedPublisher {
        ScriptedPublisher {
            transient: transient.to_vec(),
            permanent: permanent.to_vec(),
            hang: hang.to_vec(),
            retry_after: Vec::new(),
            order: Mutex::new(Vec::new()),
        }
    }

    fn record(sequence: i64, subject: &str, attempts: u32) -> OutboxRecord {
        OutboxRecord {
            sequence,
            event: Event::builder("T").subject(subject).build().unwrap(),
            attempts,
            created_at: chrono::Utc::now(),
        }
    }

    async fn run_batch(
        publisher: ScriptedPublisher,
        config: RelayConfig,
        batch: ClaimedBatch,
        lease_left: Duration,
    ) -> (BatchOutcome, Vec<i64>) {
        let relay = Relay::new(RecordingStore::default(), publisher, config).unwrap();
        let shared = Arc::new(relay.shared);
        process_batch(
            shared.clone(),
            LeaseToken::new(),
            batch,
            Instant::now() + lease_left,
        )
        .await;
        let mut outcome = shared.store.outcomes.lock().unwrap().pop().unwrap();
        outcome.published.sort_unstable();
        outcome.released.sort_unstable();
        let order = shared.publisher.order.lock().unwrap().clone();
        (outcome, order)
    }

    fn batch(records: Vec<OutboxRecord>) -> ClaimedBatch {
        ClaimedBatch {
            records,
            malformed: Vec::new(),
        }
    }

    #[test]
    fn after_a_claim_that_was_not_full_the_relay_claims_again_soon_then_less_often() {
        let config = RelayConfig::default()
            .with_wakeup_followup(Duration::from_millis(10))
            .with_poll_interval(Duration::from_millis(500));
        let delay = |empty| busy_followup(&config, empty);
        assert_eq!(delay(0), Some(Duration::from_millis(10)), "after work");
        assert_eq!(delay(1), Some(Duration::from_millis(20)));
        assert_eq!(delay(5), Some(Duration::from_millis(320)));
        assert_eq!(
            delay(6),
            Some(Duration::from_millis(500)),
            "capped at the poll"
        );
        assert_eq!(delay(7), None, "idle: wake-ups and polls only");
        let off = config.clone().with_wakeup_followup(Duration::ZERO);
        assert_eq!(busy_followup(&off, 0), None);
    }

    fn config() -> RelayConfig {
        RelayConfig::default()
            .with_max_attempts(3)
            .with_backoff(Backoff::new(Duration::from_secs(1), Duration::from_secs(8)))
    }

    #[tokio::test]
    async fn a_retried_event_holds_back_only_later_events_of_its_subject() {
        let records = vec![
            record(1, "k", 1),
            record(2, "k", 1),
            record(3, "j", 1),
            record(4, "k", 1),
        ];
        let (out, order) = run_batch(
            publisher(&[2], &[], &[]),
            config(),
            batch(records),
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(out.published, vec![1, 3]);
        assert_eq!(out.retry.len(), 1);
        assert_eq!(out.retry[0].sequence, 2);
        assert!(
            out.retry[0].delay >= Duration::from_millis(500)
                && out.retry[0].delay <= Duration::from_secs(1)
        );
        assert_eq!(out.released, vec![4], "4 must not overtake 2");
        assert!(!order.contains(&4));
        assert!(out.dead.is_empty());
    }

    #[tokio::test]
    async fn a_permanent_failure_is_dead_lettered_and_its_subject_goes_on() {
        let records = vec![record(1, "k", 1), record(2, "k", 1), record(3, "k", 1)];
        let (out, order) = run_batch(
            publisher(&[], &[2], &[]),
            config(),
            batch(records),
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(out.published, vec![1, 3]);
        assert_eq!(out.dead.len(), 1);
        assert!(
            out.dead[0]
                .error
                .starts_with("permanent failure: too large"),
            "{}",
            out.dead[0].error
        );
        assert_eq!(
            order,
            vec![1, 2, 3],
            "one subject is published strictly in order"
        );
    }

    #[tokio::test]
    async fn the_last_allowed_attempt_dead_letters_with_the_error() {
        let records = vec![record(1, "k", 3), record(2, "k", 1)];
        let (out, _) = run_batch(
            publisher(&[1], &[], &[]),
            config(),
            batch(records),
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(out.dead.len(), 1);
        assert_eq!(out.dead[0].error, "gave up after 3 attempts: busy");
        assert_eq!(out.published, vec![2]);
    }

    #[tokio::test]
    async fn a_broker_asking_for_a_longer_delay_than_the_backoff_gets_it() {
        // Backoff of a first attempt: 1 s (see `config`).
        let mut scripted = publisher(&[], &[], &[]);
        scripted.retry_after = vec![(1, Duration::from_secs(30)), (2, Duration::from_millis(10))];
        let records = vec![record(1, "k", 1), record(2, "j", 1)];
        let (mut out, _) =
            run_batch(scripted, config(), batch(records), Duration::from_secs(30)).await;
        out.retry.sort_by_key(|r| r.sequence);
        assert_eq!(out.retry.len(), 2);
        assert_eq!(out.retry[0].delay, Duration::from_secs(30), "Retry-After");
        // The backoff of a first attempt is 0.5–1 s (jittered): above 10 ms.
        let backoff = out.retry[1].delay;
        assert!(
            (Duration::from_millis(500)..=Duration::from_secs(1)).contains(&backoff),
            "the backoff, not the shorter Retry-After: {backoff:?}"
        );
    }

    #[tokio::test]
    async fn a_hung_publish_times_out_into_a_retry() {
        let config = config()
            .with_publish_timeout(Duration::from_millis(50))
            .with_lease(Duration::from_secs(1));
        let records = vec![record(1, "k", 1), record(2, "j", 1)];
        let (out, _) = run_batch(
            publisher(&[], &[], &[1]),
            config,
            batch(records),
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(out.published, vec![2]);
        assert_eq!(out.retry.len(), 1);
        assert!(
            out.retry[0].error.contains("not acknowledged within 50ms"),
            "{}",
            out.retry[0].error
        );
    }

    #[tokio::test]
    async fn events_are_released_rather_than_published_past_the_lease() {
        let config = config().with_publish_timeout(Duration::from_secs(1));
        let records = vec![record(1, "k", 1), record(2, "k", 1)];
        // Less lease left than one publish may take: publish nothing.
        let (out, order) = run_batch(
            publisher(&[], &[], &[]),
            config,
            batch(records),
            Duration::from_millis(500),
        )
        .await;
        assert_eq!(out.released, vec![1, 2]);
        assert!(order.is_empty());
    }

    #[tokio::test]
    async fn malformed_rows_are_dead_lettered() {
        let mut claimed = batch(vec![record(2, "k", 1)]);
        claimed.malformed.push(MalformedRecord {
            sequence: 1,
            error: "metadata: bad".into(),
        });
        let (out, _) = run_batch(
            publisher(&[], &[], &[]),
            config(),
            claimed,
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(out.published, vec![2]);
        assert_eq!(out.dead.len(), 1);
        assert_eq!(out.dead[0].error, "malformed outbox row: metadata: bad");
    }

    #[tokio::test]
    async fn dropping_the_handle_stops_the_relay() {
        let store = RecordingStore::default();
        let dropped = store.dropped.clone();
        let config = config().with_poll_interval(Duration::from_millis(10));
        let handle = Relay::new(store, publisher(&[], &[], &[]), config)
            .unwrap()
            .spawn();
        assert_eq!(handle.report(), RelayReport::default());
        drop(handle);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dropped.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "the relay kept running after its handle was dropped"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
