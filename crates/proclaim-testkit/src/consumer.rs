//! Support for the consumer adapters' integration tests: the real inbox
//! (`PgInbox`) and an `effects` table in a schema of the test's own, a
//! handler that writes one effect row per event through the inbox
//! transaction, and the waits and checks those tests share.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proclaim_core::consumer::{Consumer, ConsumerHandle, Context, HandlerError};
use proclaim_core::inbox::{Inbox, InboxTx, ParkedEvent, ParkedEvents};
use proclaim_core::{Backoff, Event};
use proclaim_postgres::{PgInbox, PgInboxOptions, PgInboxTx};
use sqlx::AssertSqlSafe;
pub use uuid::Uuid;

use crate::events::{keyed, n_of};
use crate::pg::TestSchema;
use crate::{eventually, eventually_value};

/// Upper bound of every wait in the consumer tests (they normally finish in
/// a few seconds).
pub const WAIT: Duration = Duration::from_secs(20);

/// Fast retries, so that failing attempts do not slow the tests down.
pub fn quick_retries() -> Backoff {
    Backoff::new(Duration::from_millis(20), Duration::from_millis(100))
}

/// `count` events on distinct subjects: `donor-<n>` with n = 0, 1, ….
pub fn distinct_events(count: u64) -> Vec<Event> {
    (0..count)
        .map(|n| keyed(&format!("donor-{n}"), n))
        .collect()
}

/// `per_subject` events on each of `subjects` subjects, round robin:
/// subject `donor-<s>` gets n = 0, 1, … in order.
pub fn round_robin(subjects: u64, per_subject: u64) -> Vec<Event> {
    let mut out = Vec::new();
    for n in 0..per_subject {
        for s in 0..subjects {
            out.push(keyed(&format!("donor-{s}"), n));
        }
    }
    out
}

/// The real inbox and an `effects` table (no unique key on the event, so a
/// second effect would show), in a schema of the test's own.
pub struct EffectsDb {
    pub schema: TestSchema,
    pub inbox: PgInbox,
}

impl EffectsDb {
    /// Creates the schema, migrates the inbox into it and creates the
    /// effects table.
    pub async fn new() -> Self {
        let schema = TestSchema::new().await;
        let inbox = PgInbox::with_options(
            schema.pool.clone(),
            PgInboxOptions::default().with_schema(&schema.name),
        )
        .unwrap();
        inbox.migrate().await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            r#"CREATE TABLE "{}".effects (
                   seq      bigserial PRIMARY KEY,
                   consumer text   NOT NULL,
                   event_id uuid   NOT NULL,
                   subject  text   NOT NULL,
                   n        bigint NOT NULL
               )"#,
            schema.name
        )))
        .execute(&schema.pool)
        .await
        .unwrap();
        EffectsDb { schema, inbox }
    }

    /// A fresh handler side (with counters of its own) writing into this
    /// schema's effects table.
    pub fn handler(&self) -> Effects {
        Effects {
            inbox: self.inbox.clone(),
            table: format!(r#""{}".effects"#, self.schema.name),
            duplicates: Arc::default(),
            committed: Arc::default(),
        }
    }

    /// (event id, subject, n) of `consumer`'s effects, in commit order.
    pub async fn effects(&self, consumer: &str) -> Vec<(Uuid, String, i64)> {
        sqlx::query_as(AssertSqlSafe(format!(
            r#"SELECT event_id, subject, n FROM "{}".effects WHERE consumer = $1 ORDER BY seq"#,
            self.schema.name
        )))
        .bind(consumer)
        .fetch_all(&self.schema.pool)
        .await
        .unwrap()
    }

    /// How many effects each event has for `consumer`.
    pub async fn effect_counts(&self, consumer: &str) -> HashMap<Uuid, usize> {
        let mut counts = HashMap::new();
        for (id, _, _) in self.effects(consumer).await {
            *counts.entry(id).or_default() += 1;
        }
        counts
    }

    /// Checks that `consumer` has exactly one effect for each of `events`
    /// (it may have effects for other events too).
    pub async fn assert_each_once(&self, consumer: &str, events: &[Event]) {
        let counts = self.effect_counts(consumer).await;
        for event in events {
            assert_eq!(counts.get(&event.id()), Some(&1), "{consumer}: {counts:?}");
        }
    }

    /// Waits until `consumer` has `count` effects.
    pub async fn wait_effects(&self, consumer: &str, count: usize) {
        let what = format!("{consumer} to have {count} effects");
        eventually(WAIT, &what, || async {
            self.effects(consumer).await.len() == count
        })
        .await;
    }

    /// Waits until at least `count` events are parked for `consumer`, and
    /// returns them.
    pub async fn wait_parked(&self, consumer: &str, count: usize) -> Vec<ParkedEvent> {
        let what = format!("{count} parked events of {consumer}");
        eventually_value(WAIT, &what, || async {
            let parked = self.inbox.parked(Some(consumer), 10).await.unwrap();
            (parked.len() >= count).then_some(parked)
        })
        .await
    }

    /// Checks that each of `consumer`'s `subjects` subjects had its effects
    /// written in order n = 0 .. `per_subject`.
    pub async fn assert_order_per_subject(&self, consumer: &str, subjects: u64, per_subject: u64) {
        let mut by_subject: HashMap<String, Vec<i64>> = HashMap::new();
        for (_, subject, n) in self.effects(consumer).await {
            by_subject.entry(subject).or_default().push(n);
        }
        assert_eq!(by_subject.len(), usize::try_from(subjects).unwrap());
        let in_order: Vec<i64> = (0..i64::try_from(per_subject).unwrap()).collect();
        for (subject, ns) in &by_subject {
            assert_eq!(ns, &in_order, "{subject} was handled out of order");
        }
    }
}

/// What one handling of an event did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The effect was written and committed.
    Applied,
    /// The inbox recognised the event as handled before.
    Duplicate,
}

/// The handler's side of a test: the inbox, the effects table, and counters
/// of what it saw (shared by its clones).
#[derive(Clone)]
pub struct Effects {
    pub inbox: PgInbox,
    table: String,
    duplicates: Arc<AtomicU64>,
    committed: Arc<AtomicU64>,
}

impl Effects {
    /// Begins the inbox transaction; `None` (counted) for a duplicate.
    pub async fn begin(&self, cx: &Context<()>) -> Result<Option<PgInboxTx>, HandlerError> {
        let tx = self.inbox.begin(cx.consumer(), &cx.event).await?;
        if tx.is_none() {
            self.duplicates.fetch_add(1, Ordering::SeqCst);
        }
        Ok(tx)
    }

    /// Writes the event's effect row through the inbox transaction.
    pub async fn write(&self, tx: &mut PgInboxTx, cx: &Context<()>) -> Result<(), HandlerError> {
        let n = i64::try_from(n_of(&cx.event)).unwrap();
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (consumer, event_id, subject, n) VALUES ($1, $2, $3, $4)",
            self.table
        )))
        .bind(cx.consumer())
        .bind(cx.event.id())
        .bind(cx.event.subject())
        .bind(n)
        .execute(&mut **tx)
        .await
        .map_err(|e| HandlerError::transient("cannot write the effect").with_source(e))?;
        Ok(())
    }

    /// Commits `tx` and counts the committed effect.
    pub async fn commit(&self, tx: PgInboxTx) -> Result<(), HandlerError> {
        tx.commit().await?;
        self.committed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// The whole handling: inbox, effect, commit.
    pub async fn apply(&self, cx: &Context<()>) -> Result<Outcome, HandlerError> {
        self.apply_or_fail(cx, false).await
    }

    /// Like [`apply`](Self::apply), but with `fail` the effect is written and
    /// the handler then fails before the commit: the transaction is dropped,
    /// rolled back with the inbox row.
    pub async fn apply_or_fail(
        &self,
        cx: &Context<()>,
        fail: bool,
    ) -> Result<Outcome, HandlerError> {
        let Some(mut tx) = self.begin(cx).await? else {
            return Ok(Outcome::Duplicate);
        };
        self.write(&mut tx, cx).await?;
        if fail {
            drop(tx);
            return Err(HandlerError::transient("the CRM timed out"));
        }
        self.commit(tx).await?;
        Ok(Outcome::Applied)
    }

    /// Deliveries the inbox recognised as handled before.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::SeqCst)
    }

    /// Effects this handler committed.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// Adds to `consumer` a handler for `pattern` that applies each event's
    /// effect once.
    pub fn on(&self, consumer: Consumer, pattern: &str) -> Consumer {
        let effects = self.clone();
        consumer.on_event(pattern, move |cx: Context<()>| {
            let effects = effects.clone();
            async move { effects.apply(&cx).await.map(|_| ()) }
        })
    }

    /// A consumer `name` whose handler for `pattern` applies each event's
    /// effect once, parking into the inbox.
    pub fn consumer(&self, name: &str, pattern: &str) -> Consumer {
        self.on(Consumer::new(name), pattern)
            .park_into(self.inbox.clone())
    }

    /// Adds to `consumer` a handler for `pattern` that applies the effect,
    /// sends the event id to `committed`, then never returns: the message
    /// is handled but never acked, as when the process dies there.
    pub fn on_commit_then_hang(
        &self,
        consumer: Consumer,
        pattern: &str,
        committed: tokio::sync::mpsc::UnboundedSender<Uuid>,
    ) -> Consumer {
        let effects = self.clone();
        consumer.on_event(pattern, move |cx: Context<()>| {
            let effects = effects.clone();
            let committed = committed.clone();
            async move {
                effects.apply(&cx).await?;
                let _ = committed.send(cx.event.id());
                std::future::pending::<()>().await;
                Ok(())
            }
        })
    }
}

/// Values handlers record, in the order they were recorded.
#[derive(Debug)]
pub struct Recorder<T>(Arc<Mutex<Vec<T>>>);

impl<T> Clone for Recorder<T> {
    fn clone(&self) -> Self {
        Recorder(self.0.clone())
    }
}

impl<T> Default for Recorder<T> {
    fn default() -> Self {
        Recorder(Arc::default())
    }
}

impl<T: Clone> Recorder<T> {
    /// Records `value`.
    pub fn push(&self, value: T) {
        self.0.lock().unwrap().push(value);
    }

    /// Everything recorded so far.
    pub fn all(&self) -> Vec<T> {
        self.0.lock().unwrap().clone()
    }
}

/// Counts handlings running at once and remembers the most there were.
#[derive(Clone, Default)]
pub struct InFlight {
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl InFlight {
    /// Runs `work`, counted as in flight while it runs.
    pub async fn track<F: Future>(&self, work: F) -> F::Output {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let output = work.await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        output
    }

    /// The most handlings that ran at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

/// Waits until `handle` reports `count` handled events.
pub async fn wait_handled(handle: &ConsumerHandle, count: u64) {
    let what = format!("{count} events handled");
    eventually(WAIT, &what, || {
        let handled = handle.report().handled;
        async move { handled == count }
    })
    .await;
}

/// Waits until `handle` reports at least one receive error (a lost
/// connection).
pub async fn wait_receive_error(handle: &ConsumerHandle) {
    eventually(WAIT, "the lost connection reported", || {
        let errors = handle.report().receive_errors;
        async move { errors > 0 }
    })
    .await;
}
