//! The effect consumer: proclaim's consumer runtime reading the run's stream
//! as a JetStream consumer group, applying each event's effect (one row in
//! `effects`) in the same transaction as its inbox pair, and acking after the
//! commit. Every handler error is transient and retried without end, so a
//! correct run parks nothing. It reaches PostgreSQL and NATS through fault
//! proxies of its own, which the network faults of the first round (and of
//! every other round after it) strike together with a relay's, and it is
//! killed abruptly now and then ([`FaultKind::ConsumerKill`]), every other
//! time right after a commit and before the ack.
//!
//! [`FaultKind::ConsumerKill`]: crate::faults::FaultKind::ConsumerKill

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use proclaim_core::consumer::{Consumer, ConsumerReport, Context, HandlerError};
use proclaim_core::inbox::{Inbox, InboxTx};
use proclaim_core::{Backoff, CancellationToken};
use proclaim_nats::{JetStreamSource, JetStreamSourceConfig, NatsConfig};
use proclaim_postgres::{PgInbox, PgInboxOptions};
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokio::task::{AbortHandle, JoinHandle};
use uuid::Uuid;

use crate::ChaosError;
use crate::faults::Link;
use crate::proxy::{FaultMode, FaultProxy};
use crate::scenario::{ChaosConfig, Resources, lock};

/// The consumer group: the durable JetStream consumer of the run's stream
/// (each run has its own stream), and the name effects are recorded under
/// in the inbox.
pub(crate) const GROUP: &str = "chaos-effects";
/// Handler calls at once (over 64 keys by default): a debug build on two
/// busy cores keeps up with the writers when its links are healthy.
const CONCURRENCY: usize = 32;
/// How long the broker waits for an ack before delivering a message again:
/// short, so the messages of a killed consumer come back within the run.
const ACK_WAIT: Duration = Duration::from_secs(4);

/// Creates the effect table (no unique constraint on `event_id`: an effect
/// applied twice is two rows) and the inbox tables, in the run's schema.
pub(crate) async fn prepare(pool: &PgPool, schema: &str) -> Result<(), ChaosError> {
    let db = |e: &dyn std::fmt::Display| ChaosError::Database(e.to_string());
    sqlx::raw_sql(AssertSqlSafe(format!(
        r#"CREATE TABLE "{schema}".effects (
               seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
               event_id   UUID        NOT NULL,
               applied_at TIMESTAMPTZ NOT NULL DEFAULT now());
           CREATE INDEX ON "{schema}".effects (event_id)"#
    )))
    .execute(pool)
    .await
    .map_err(|e| db(&e))?;
    inbox(pool.clone(), schema)?
        .migrate()
        .await
        .map_err(|e| db(&e))
}

fn inbox(pool: PgPool, schema: &str) -> Result<PgInbox, ChaosError> {
    PgInbox::with_options(pool, PgInboxOptions::default().with_schema(schema))
        .map_err(|e| ChaosError::Config(format!("inbox: {e}")))
}

/// Committed events (ledger rows) without an effect row yet.
pub(crate) async fn missing(pool: &PgPool, schema: &str) -> Result<u64, ChaosError> {
    sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!(
        r#"SELECT count(*) FROM "{schema}".ledger l
           WHERE NOT EXISTS (SELECT 1 FROM "{schema}".effects e WHERE e.event_id = l.id)"#
    )))
    .fetch_one(pool)
    .await
    .map(|n| n.max(0) as u64)
    .map_err(|e| ChaosError::Database(e.to_string()))
}

/// The event id of every effect row, and how many events were parked.
pub(crate) async fn applied(pool: &PgPool, schema: &str) -> Result<(Vec<Uuid>, u64), ChaosError> {
    let db = |e: &dyn std::fmt::Display| ChaosError::Database(e.to_string());
    let applied: Vec<Uuid> = sqlx::query_scalar(AssertSqlSafe(format!(
        r#"SELECT event_id FROM "{schema}".effects ORDER BY seq"#
    )))
    .fetch_all(pool)
    .await
    .map_err(|e| db(&e))?;
    let inbox = inbox(pool.clone(), schema)?;
    let parked: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {}",
        inbox.parked_table_name()
    )))
    .fetch_one(pool)
    .await
    .map_err(|e| db(&e))?;
    if parked > 0 {
        let reasons: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT reason FROM {} ORDER BY id LIMIT 3",
            inbox.parked_table_name()
        )))
        .fetch_all(pool)
        .await
        .map_err(|e| db(&e))?;
        tracing::warn!(parked, ?reasons, "the effect consumer parked events");
    }
    Ok((applied, parked.max(0) as u64))
}

/// Whether the group has nothing left at the broker: every message
/// delivered and acked.
pub(crate) async fn settled(js: &jetstream::Context, stream: &str) -> Result<bool, ChaosError> {
    let broker = |e: &dyn std::fmt::Display| ChaosError::Broker(format!("effect consumer: {e}"));
    let stream = js.get_stream(stream).await.map_err(|e| broker(&e))?;
    let info = stream.consumer_info(GROUP).await.map_err(|e| broker(&e))?;
    Ok(info.num_pending == 0 && info.num_ack_pending == 0)
}

/// The switch that crashes the consumer right after a handler's commit.
#[derive(Default)]
struct Crash {
    /// The next handler to commit crashes the consumer (once).
    armed: AtomicBool,
    /// Crashes that happened.
    fired: AtomicU64,
    /// The running consumer's task.
    task: Mutex<Option<AbortHandle>>,
}

/// The handler: the effect and the inbox pair in one transaction.
struct Apply {
    inbox: PgInbox,
    insert: String,
    crash: Arc<Crash>,
    /// Deliveries the inbox recognised as handled before.
    skipped: Arc<AtomicU64>,
    /// Off only in a test that shows what the check catches without it.
    use_inbox: bool,
}

impl Apply {
    async fn handle(&self, cx: Context<()>) -> Result<(), HandlerError> {
        // Every failure here is a database that is slow, cut off or down:
        // retry (the consumer never gives up, so nothing is parked).
        let transient =
            |what: &str, e: &dyn std::error::Error| HandlerError::transient(format!("{what}: {e}"));
        let id = cx.event.id();
        if self.use_inbox {
            let tx = self
                .inbox
                .begin(cx.consumer(), &cx.event)
                .await
                .map_err(|e| transient("cannot begin the inbox transaction", &e))?;
            let Some(mut tx) = tx else {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            };
            sqlx::query(AssertSqlSafe(self.insert.clone()))
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(|e| transient("cannot apply the effect", &e))?;
            tx.commit()
                .await
                .map_err(|e| transient("cannot commit the effect", &e))?;
        } else {
            let mut tx = self
                .inbox
                .pool()
                .begin()
                .await
                .map_err(|e| transient("cannot begin", &e))?;
            sqlx::query(AssertSqlSafe(self.insert.clone()))
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(|e| transient("cannot apply the effect", &e))?;
            tx.commit()
                .await
                .map_err(|e| transient("cannot commit the effect", &e))?;
        }
        if self.crash.armed.swap(false, Ordering::SeqCst) {
            let task = lock(&self.crash.task).clone();
            if let Some(task) = task {
                self.crash.fired.fetch_add(1, Ordering::SeqCst);
                tracing::info!(event_id = %id, "effect committed; crashing the consumer before its ack");
                task.abort();
                // Aborting the consumer's task aborts this handling too.
                std::future::pending::<()>().await;
            }
        }
        Ok(())
    }
}

/// The running consumer.
struct Running {
    task: JoinHandle<Option<ConsumerReport>>,
    stop: CancellationToken,
    /// Closed once the task is gone, as a dead process's connections are.
    pool: PgPool,
}

impl Running {
    async fn close_pool(&self) {
        if tokio::time::timeout(Duration::from_secs(5), self.pool.close())
            .await
            .is_err()
        {
            tracing::warn!("the effect consumer's connections did not close within 5s");
        }
    }
}

/// The effect consumer, its proxies, and what happened to it.
pub(crate) struct EffectConsumer {
    pub(crate) db: FaultProxy,
    pub(crate) broker: FaultProxy,
    db_options: PgConnectOptions,
    nats: NatsConfig,
    schema: String,
    crash: Arc<Crash>,
    skipped: Arc<AtomicU64>,
    running: Option<Running>,
    use_inbox: bool,
    /// Kills injected.
    pub(crate) kills: u64,
    /// Times the consumer stopped by itself (it should not).
    pub(crate) unexpected_exits: u64,
}

impl EffectConsumer {
    /// Starts the proxies; the consumer starts with [`EffectConsumer::start`].
    pub(crate) async fn new(config: &ChaosConfig, res: &Resources) -> Result<Self, ChaosError> {
        let db_url = url::Url::parse(&config.database_url)
            .map_err(|e| ChaosError::Config(format!("database URL: {e}")))?;
        let nats_url = url::Url::parse(&config.nats_url)
            .map_err(|e| ChaosError::Config(format!("NATS URL: {e}")))?;
        let db = crate::relays::proxy_to(&db_url, 5432).await?;
        let broker = crate::relays::proxy_to(&nats_url, 4222).await?;
        let db_options = PgConnectOptions::from_str(&crate::relays::through(&db_url, &db)?)
            .map_err(|e| ChaosError::Config(format!("database URL: {e}")))?
            .application_name(&format!("{}-effects", res.schema));
        let nats = NatsConfig::default()
            .with_url(crate::relays::through(&nats_url, &broker)?)
            .with_stream(&res.stream)
            .with_subject_prefix(&res.prefix)
            .with_connect_timeout(Duration::from_secs(2))
            .with_ack_timeout(Duration::from_secs(5));
        Ok(EffectConsumer {
            db,
            broker,
            db_options,
            nats,
            schema: res.schema.clone(),
            crash: Arc::default(),
            skipped: Arc::default(),
            running: None,
            use_inbox: true,
            kills: 0,
            unexpected_exits: 0,
        })
    }

    /// Starts the consumer (again): a new pool and a new connection to
    /// NATS, as a restarted process would have. Connecting is retried until
    /// it works.
    pub(crate) fn start(&mut self) -> Result<(), ChaosError> {
        if self.running.is_some() {
            return Ok(());
        }
        // Connections are made on first use: the database may be down now.
        // No ping before each handling: a connection a fault cut fails its
        // first statement instead, a transient error that is retried.
        let pool = PgPoolOptions::new()
            .max_connections(u32::try_from(CONCURRENCY).unwrap_or(16) + 4)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(false)
            .connect_lazy_with(self.db_options.clone());
        let inbox = inbox(pool.clone(), &self.schema)?;
        let apply = Arc::new(Apply {
            inbox: inbox.clone(),
            insert: format!(
                r#"INSERT INTO "{}".effects (event_id) VALUES ($1)"#,
                self.schema
            ),
            crash: self.crash.clone(),
            skipped: self.skipped.clone(),
            use_inbox: self.use_inbox,
        });
        let consumer = Consumer::new(GROUP)
            .on_event("*", move |cx: Context<()>| {
                let apply = apply.clone();
                async move { apply.handle(cx).await }
            })
            .concurrency(CONCURRENCY)
            .retry(
                Backoff::new(Duration::from_millis(50), Duration::from_secs(1)),
                u32::MAX,
            )
            .outage_backoff(Backoff::new(
                Duration::from_millis(50),
                Duration::from_secs(1),
            ))
            .handler_timeout(Duration::from_secs(10))
            .shutdown_timeout(Duration::from_secs(10))
            .park_into(inbox);
        consumer
            .validate()
            .map_err(|e| ChaosError::Config(format!("effect consumer: {e}")))?;
        let stop = CancellationToken::new();
        let nats = self.nats.clone();
        let task = tokio::spawn(serve(consumer, nats, stop.clone()));
        *lock(&self.crash.task) = Some(task.abort_handle());
        self.running = Some(Running { task, stop, pool });
        Ok(())
    }

    /// The proxy on `link`.
    pub(crate) fn proxy(&self, link: Link) -> &FaultProxy {
        match link {
            Link::Db => &self.db,
            Link::Broker => &self.broker,
        }
    }

    /// Both links pass.
    pub(crate) fn heal(&self) {
        self.db.set_mode(FaultMode::Pass);
        self.broker.set_mode(FaultMode::Pass);
    }

    /// Kills the consumer, holds it down for `hold`, and starts it again.
    /// Every other kill (the first included) waits, for at most `hold`, for
    /// a handler to commit and crashes the consumer right then, before the
    /// ack; the others strike wherever the consumer is.
    pub(crate) async fn kill_and_restart(&mut self, hold: Duration) -> Result<(), ChaosError> {
        self.kills += 1;
        if self.kills % 2 == 1 && self.running.is_some() {
            let fired = self.crashes_after_commit();
            self.crash.armed.store(true, Ordering::SeqCst);
            let started = Instant::now();
            while self.crashes_after_commit() == fired && started.elapsed() < hold {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if !self.crash.armed.swap(false, Ordering::SeqCst) {
                tracing::info!("the effect consumer crashed after a commit");
            } else {
                tracing::info!("no handler committed within {hold:?}; killing the effect consumer");
            }
        }
        self.abort().await;
        tokio::time::sleep(hold).await;
        self.start()
    }

    async fn abort(&mut self) {
        if let Some(mut running) = self.running.take() {
            running.task.abort();
            let _ = (&mut running.task).await;
            running.close_pool().await;
        }
        *lock(&self.crash.task) = None;
    }

    /// Starts the consumer again if it stopped by itself (it should not).
    pub(crate) async fn reap_unexpected_exit(&mut self) -> Result<Option<String>, ChaosError> {
        let finished = self.running.as_ref().is_some_and(|r| r.task.is_finished());
        if !finished {
            return Ok(None);
        }
        if let Some(running) = self.running.take() {
            running.close_pool().await;
        }
        self.unexpected_exits += 1;
        self.start()?;
        Ok(Some("the effect consumer stopped by itself".to_owned()))
    }

    /// Shuts the consumer down gracefully, waiting up to `grace`; whether
    /// it stopped in time.
    pub(crate) async fn stop(&mut self, grace: Duration) -> bool {
        let Some(mut running) = self.running.take() else {
            return true;
        };
        *lock(&self.crash.task) = None;
        running.stop.cancel();
        let stopped = tokio::time::timeout(grace, &mut running.task).await;
        if stopped.is_err() {
            running.task.abort();
        }
        running.close_pool().await;
        match stopped {
            Ok(Ok(report)) => {
                if let Some(report) = report {
                    tracing::info!(
                        handled = report.handled,
                        retried = report.retried,
                        parked = report.parked,
                        ack_failures = report.ack_failures,
                        "effect consumer stopped"
                    );
                }
                true
            }
            Ok(Err(_)) | Err(_) => false,
        }
    }

    /// Crashes right after a commit, before the ack.
    pub(crate) fn crashes_after_commit(&self) -> u64 {
        self.crash.fired.load(Ordering::SeqCst)
    }

    /// Deliveries the inbox skipped: events whose effect was already there.
    pub(crate) fn redeliveries_skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

impl Drop for EffectConsumer {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.task.abort();
        }
    }
}

/// Connects to the stream (retrying until it works or `stop`), then runs the
/// consumer until `stop`; `None` if stopped before it ran.
async fn serve(
    consumer: Consumer,
    nats: NatsConfig,
    stop: CancellationToken,
) -> Option<ConsumerReport> {
    let mut failures = 0u32;
    let source = loop {
        match JetStreamSource::connect(
            nats.clone(),
            JetStreamSourceConfig::new(GROUP).with_ack_wait(ACK_WAIT),
        )
        .await
        {
            Ok(source) => break source,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(error = %e, failures, "effect consumer cannot connect; retrying");
                }
                tokio::select! {
                    () = stop.cancelled() => return None,
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        }
    };
    match consumer.run(source, stop).await {
        Ok(report) => Some(report),
        Err(e) => {
            tracing::error!(error = %e, "the effect consumer cannot run");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::history::{Effects, Written};
    use proclaim_core::{Event, Publisher};
    use proclaim_nats::NatsPublisher;
    use proclaim_testkit::nats::TestStream;
    use proclaim_testkit::pg::{TestSchema, database_url};

    const DEADLINE: Duration = Duration::from_secs(60);

    /// A schema with a ledger and the effect tables, a stream, and an
    /// effect consumer on them (not started).
    async fn setup() -> (TestSchema, TestStream, EffectConsumer, Vec<Written>) {
        let schema = TestSchema::new().await;
        let stream = TestStream::new().await;
        sqlx::query(AssertSqlSafe(format!(
            r#"CREATE TABLE "{}".ledger (id UUID PRIMARY KEY)"#,
            schema.name
        )))
        .execute(&schema.pool)
        .await
        .unwrap();
        prepare(&schema.pool, &schema.name).await.unwrap();
        let config = ChaosConfig::new(
            database_url(),
            proclaim_testkit::nats::nats_url(),
            Default::default(),
        );
        let res = Resources {
            schema: schema.name.clone(),
            stream: stream.name.clone(),
            prefix: stream.prefix.clone(),
            dir: std::env::temp_dir(),
        };
        let consumer = EffectConsumer::new(&config, &res).await.unwrap();
        (schema, stream, consumer, Vec::new())
    }

    /// Commits `n` events to the ledger and publishes them (on 4 keys).
    async fn publish(
        schema: &TestSchema,
        stream: &TestStream,
        written: &mut Vec<Written>,
        n: usize,
    ) {
        let publisher = NatsPublisher::connect(
            NatsConfig::default()
                .with_url(proclaim_testkit::nats::nats_url())
                .with_stream(&stream.name)
                .with_subject_prefix(&stream.prefix),
        )
        .await
        .unwrap();
        for i in 0..n {
            let seq = written.len() as u64 + 1;
            let w = Written::new(Uuid::now_v7(), format!("k{}", i % 4), seq);
            sqlx::query(AssertSqlSafe(format!(
                r#"INSERT INTO "{}".ledger (id) VALUES ($1)"#,
                schema.name
            )))
            .bind(w.id)
            .execute(&schema.pool)
            .await
            .unwrap();
            let event = Event::builder("ChaosStep")
                .id(w.id)
                .source("proclaim-chaos")
                .subject(&w.key)
                .data(&serde_json::json!({ "seq": seq }))
                .build()
                .unwrap();
            publisher
                .publish(&proclaim_testkit::events::record(event))
                .await
                .unwrap();
            written.push(w);
        }
    }

    async fn wait_for_effects(schema: &TestSchema, stream: &TestStream) {
        proclaim_testkit::eventually(DEADLINE, "every effect applied and acked", || async {
            missing(&schema.pool, &schema.name).await.unwrap() == 0
                && settled(&stream.js, &stream.name).await.unwrap()
        })
        .await;
    }

    /// Kills the consumer right after a commit (before the ack) and starts
    /// it again; runs `publish` events before and after. Returns the check.
    async fn crash_after_commit(
        use_inbox: bool,
    ) -> (EffectConsumer, crate::history::EffectsVerdict) {
        let (schema, stream, mut consumer, mut written) = setup().await;
        consumer.use_inbox = use_inbox;
        consumer.start().unwrap();
        publish(&schema, &stream, &mut written, 40).await;
        wait_for_effects(&schema, &stream).await;
        // Armed while idle: the next commit crashes the consumer.
        let (schema_ref, stream_ref) = (&schema, &stream);
        let kill = consumer.kill_and_restart(Duration::from_secs(2));
        let more = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut more = Vec::new();
            publish(schema_ref, stream_ref, &mut more, 20).await;
            more
        };
        let (killed, more) = tokio::join!(kill, more);
        killed.unwrap();
        written.extend(more);
        wait_for_effects(&schema, &stream).await;
        assert!(consumer.stop(Duration::from_secs(20)).await);
        let (applied, parked) = applied(&schema.pool, &schema.name).await.unwrap();
        let verdict = Effects {
            committed: written,
            applied,
            parked,
        }
        .check();
        (consumer, verdict)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_between_commit_and_ack_leaves_one_effect() {
        proclaim_testkit::init_tracing();
        let (consumer, verdict) = crash_after_commit(true).await;
        assert_eq!(consumer.crashes_after_commit(), 1);
        // The message whose effect committed came back, and the inbox
        // skipped it.
        assert!(consumer.redeliveries_skipped() >= 1);
        assert_eq!(verdict.effects_applied, 60, "{verdict:?}");
        assert!(verdict.passed(), "{verdict:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_the_inbox_the_check_finds_the_duplicate() {
        proclaim_testkit::init_tracing();
        let (consumer, verdict) = crash_after_commit(false).await;
        assert_eq!(consumer.crashes_after_commit(), 1);
        assert!(verdict.effects_duplicated >= 1, "{verdict:?}");
        assert_eq!(verdict.effects_missing, 0, "{verdict:?}");
        assert!(!verdict.passed());
        assert!(
            verdict
                .examples
                .iter()
                .any(|e| e.contains("applied 2 times")),
            "{:?}",
            verdict.examples
        );
    }
}
