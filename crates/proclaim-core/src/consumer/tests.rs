//! The consumer runtime against a scripted source (acks and nacks are
//! logged), an in-memory parking lot that fails on command, and the
//! in-process bus (alone and behind a relay). No assertion depends on
//! timing: waits poll a condition against a deadline, and ordering is
//! shown by what handlers observed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::*;
use crate::inbox::{ParkedEvent, ParkedEvents};
use crate::local::InProcessBus;
use crate::{
    AckMode, BatchOutcome, ClaimedBatch, CompleteReport, Event, LeaseToken, OutboxRecord,
    OutboxStats, OutboxStore, Publisher, Relay, RelayConfig, StoreError,
};

// ---------------------------------------------------------------- doubles

/// What handlers record for the test to read.
type Recorded<T> = Arc<Mutex<T>>;

#[derive(Debug, Clone, PartialEq)]
enum Settled {
    Ack,
    Nack(Duration),
}

/// How each message (by label) was settled, in order.
#[derive(Default, Clone)]
struct Log(Arc<Mutex<Vec<(String, Settled)>>>);

impl Log {
    fn of(&self, label: &str) -> Vec<Settled> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(l, _)| l == label)
            .map(|(_, s)| s.clone())
            .collect()
    }
    fn acked(&self, label: &str) -> bool {
        self.of(label).contains(&Settled::Ack)
    }
    fn acks(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| *s == Settled::Ack)
            .count()
    }
    fn push(&self, label: String, settled: Settled) {
        self.0.lock().unwrap().push((label, settled));
    }
}

struct TestAcker {
    label: String,
    log: Log,
}

impl Acker for TestAcker {
    async fn ack(self) -> Result<(), SourceError> {
        self.log.push(self.label, Settled::Ack);
        Ok(())
    }
    async fn nack(self, delay: Duration) -> Result<(), SourceError> {
        self.log.push(self.label, Settled::Nack(delay));
        Ok(())
    }
}

/// A source fed through a channel; `Err` items are receive failures.
struct TestSource(mpsc::UnboundedReceiver<Result<Incoming, SourceError>>);

impl Source for TestSource {
    async fn receive(&mut self) -> Option<Result<Incoming, SourceError>> {
        self.0.recv().await
    }
}

struct Feed {
    tx: mpsc::UnboundedSender<Result<Incoming, SourceError>>,
    log: Log,
}

fn feed() -> (Feed, TestSource) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Feed {
            tx,
            log: Log::default(),
        },
        TestSource(rx),
    )
}

impl Feed {
    fn acker(&self, label: &str) -> TestAcker {
        TestAcker {
            label: label.to_owned(),
            log: self.log.clone(),
        }
    }
    fn send(&self, label: &str, event: Event) {
        let incoming = Incoming::new(event, self.acker(label));
        self.tx.send(Ok(incoming)).unwrap();
    }
    fn send_incoming(&self, incoming: Incoming) {
        self.tx.send(Ok(incoming)).unwrap();
    }
}

#[derive(Default)]
struct ParkedInner {
    entries: Mutex<Vec<ParkedEvent>>,
    /// Park calls still to fail.
    fail: AtomicU32,
    calls: AtomicU32,
    /// At each failed call: whether the label was acked at that moment.
    acked_at_failure: Mutex<Vec<bool>>,
    watch: Mutex<Option<(Log, String)>>,
}

/// An in-memory [`ParkedEvents`] that can fail on command.
#[derive(Default, Clone)]
struct MemoryParked(Arc<ParkedInner>);

impl MemoryParked {
    fn entries(&self) -> Vec<ParkedEvent> {
        self.0.entries.lock().unwrap().clone()
    }
    fn failing(times: u32, log: &Log, label: &str) -> Self {
        let parked = MemoryParked::default();
        parked.0.fail.store(times, Ordering::SeqCst);
        *parked.0.watch.lock().unwrap() = Some((log.clone(), label.to_owned()));
        parked
    }
}

impl ParkedEvents for MemoryParked {
    async fn park(&self, parked: &ParkedEvent) -> Result<(), StoreError> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .0
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            if let Some((log, label)) = &*self.0.watch.lock().unwrap() {
                self.0
                    .acked_at_failure
                    .lock()
                    .unwrap()
                    .push(log.acked(label));
            }
            return Err(StoreError::Unavailable("database down".into()));
        }
        let mut entries = self.0.entries.lock().unwrap();
        let mut entry = parked.clone();
        entry.id = entries.len() as i64 + 1;
        entries.push(entry);
        Ok(())
    }
    async fn parked(
        &self,
        consumer: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ParkedEvent>, StoreError> {
        Ok(self
            .entries()
            .into_iter()
            .filter(|p| consumer.is_none_or(|c| p.consumer == c))
            .take(limit as usize)
            .collect())
    }
    async fn take(&self, ids: &[i64]) -> Result<Vec<ParkedEvent>, StoreError> {
        let mut entries = self.0.entries.lock().unwrap();
        let (taken, kept) = entries.drain(..).partition(|p| ids.contains(&p.id));
        *entries = kept;
        Ok(taken)
    }
}

fn event(event_type: &str, subject: &str, n: u32) -> Event {
    Event::builder(event_type)
        .subject(subject)
        .data(&serde_json::json!({ "n": n }))
        .build()
        .unwrap()
}

#[derive(Debug, serde::Deserialize)]
struct Seq {
    n: u32,
}

/// A consumer with fast retries, parking into `parked`.
fn consumer(parked: &MemoryParked) -> Consumer {
    Consumer::new("test")
        .retry(
            Backoff::new(Duration::from_millis(1), Duration::from_millis(5)),
            3,
        )
        .outage_backoff(Backoff::new(
            Duration::from_millis(1),
            Duration::from_millis(5),
        ))
        .park_into(parked.clone())
}

/// Polls `done` until it holds; fails the test after a generous deadline
/// (a guard against hanging, not a timing assertion).
async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Runs `consumer` on `source` in a task; returns its stop token and task.
fn start(
    consumer: Consumer,
    source: impl Source,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<ConsumerReport, ConfigError>>,
) {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(source, shutdown.clone()));
    (shutdown, task)
}

async fn stop(
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<ConsumerReport, ConfigError>>,
) -> ConsumerReport {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the consumer did not stop")
        .unwrap()
        .unwrap()
}

// ---------------------------------------------------------------- order

#[derive(Default)]
struct OrderProbe {
    /// Handlers running now, per subject.
    running: Mutex<HashMap<String, u32>>,
    /// Handlers running now, in all.
    active: AtomicUsize,
    max_active: AtomicUsize,
    /// A second handler of one subject started while one ran.
    overlap: AtomicBool,
    /// (subject, n) in the order handlers finished.
    done: Mutex<Vec<(String, u32)>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_subject_is_handled_in_order_while_subjects_interleave() {
    const SUBJECTS: u32 = 12;
    const PER_SUBJECT: u32 = 25;
    const CONCURRENCY: usize = 6;
    let parked = MemoryParked::default();
    let (feed, source) = feed();
    // Round-robin over subjects, each subject's messages numbered in order.
    for n in 0..PER_SUBJECT {
        for s in 0..SUBJECTS {
            feed.send(&format!("s{s}/{n}"), event("Tick", &format!("s{s}"), n));
        }
    }
    let probe = Arc::new(OrderProbe::default());
    let consumer = consumer(&parked).concurrency(CONCURRENCY).on("Tick", {
        let probe = probe.clone();
        move |cx: Context<Seq>| {
            let probe = probe.clone();
            async move {
                let subject = cx.event.subject().to_owned();
                {
                    let mut running = probe.running.lock().unwrap();
                    let count = running.entry(subject.clone()).or_default();
                    *count += 1;
                    if *count > 1 {
                        probe.overlap.store(true, Ordering::SeqCst);
                    }
                }
                let active = probe.active.fetch_add(1, Ordering::SeqCst) + 1;
                probe.max_active.fetch_max(active, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_micros(fastrand::u64(0..2_000))).await;
                probe.active.fetch_sub(1, Ordering::SeqCst);
                *probe.running.lock().unwrap().get_mut(&subject).unwrap() -= 1;
                probe.done.lock().unwrap().push((subject, cx.data.n));
                Ok(())
            }
        }
    });
    let (shutdown, task) = start(consumer, source);
    let total = (SUBJECTS * PER_SUBJECT) as usize;
    wait_until("every message is acked", || feed.log.acks() == total).await;
    let report = stop(shutdown, task).await;

    assert_eq!(report.handled, total as u64);
    assert!(
        !probe.overlap.load(Ordering::SeqCst),
        "one subject ran twice at once"
    );
    let max_active = probe.max_active.load(Ordering::SeqCst);
    assert!(
        (2..=CONCURRENCY).contains(&max_active),
        "handlers at once: {max_active}"
    );
    let done = probe.done.lock().unwrap().clone();
    for s in 0..SUBJECTS {
        let subject = format!("s{s}");
        let order: Vec<u32> = done
            .iter()
            .filter(|(d, _)| *d == subject)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(order, (0..PER_SUBJECT).collect::<Vec<_>>(), "{subject}");
    }
    let switches = done.windows(2).filter(|w| w[0].0 != w[1].0).count();
    assert!(
        switches > SUBJECTS as usize,
        "subjects did not interleave: {switches} switches"
    );
    for s in 0..SUBJECTS {
        for n in 0..PER_SUBJECT {
            assert_eq!(feed.log.of(&format!("s{s}/{n}")), [Settled::Ack]);
        }
    }
}

// ---------------------------------------------------------------- ack after Ok

#[tokio::test]
async fn a_message_is_acked_once_and_only_after_the_handler_succeeds() {
    let parked = MemoryParked::default();
    let (feed, source) = feed();
    feed.send("m", event("DonorSecured", "donor-1", 1));
    let seen: Arc<Mutex<Vec<(u32, bool)>>> = Arc::default();
    let consumer = consumer(&parked)
        .retry(
            Backoff::new(Duration::from_millis(1), Duration::from_millis(2)),
            5,
        )
        .on_event("DonorSecured", {
            let (seen, log) = (seen.clone(), feed.log.clone());
            move |cx: Context<()>| {
                seen.lock()
                    .unwrap()
                    .push((cx.attempt, !log.of("m").is_empty()));
                let fail = cx.attempt <= 3;
                async move {
                    if fail {
                        Err(HandlerError::transient("inbox busy"))
                    } else {
                        Ok(())
                    }
                }
            }
        });
    let (shutdown, task) = start(consumer, source);
    wait_until("the message is acked", || feed.log.acked("m")).await;
    let report = stop(shutdown, task).await;

    assert_eq!(
        *seen.lock().unwrap(),
        [(1, false), (2, false), (3, false), (4, false)],
        "four attempts, none after a settlement"
    );
    assert_eq!(feed.log.of("m"), [Settled::Ack]);
    assert_eq!((report.handled, report.retried, report.parked), (1, 3, 0));
    assert!(parked.entries().is_empty());
}

// ---------------------------------------------------------------- retries exhausted

#[tokio::test]
async fn exhausted_retries_park_the_event_without_holding_back_other_subjects() {
    const OTHERS: usize = 10;
    let parked = MemoryParked::default();
    let (feed, source) = feed();
    let poison = event("DonorSecured", "poison", 1);
    let poison_id = poison.id();
    feed.send("p1", poison);
    feed.send("p2", event("DonorSecured", "poison", 2));
    for i in 0..OTHERS {
        feed.send(
            &format!("o{i}"),
            event("DonorSecured", &format!("other-{i}"), 0),
        );
    }
    let (others_done, others_seen) = watch::channel(0usize);
    let p2_saw: Arc<Mutex<Option<(usize, bool)>>> = Arc::default();
    let consumer = consumer(&parked).concurrency(4).on_event("DonorSecured", {
        let others_done = Arc::new(others_done);
        let (p2_saw, log, parked) = (p2_saw.clone(), feed.log.clone(), parked.clone());
        move |cx: Context<()>| {
            let (others_done, mut others_seen) = (others_done.clone(), others_seen.clone());
            let (p2_saw, log, parked) = (p2_saw.clone(), log.clone(), parked.clone());
            async move {
                match (cx.event.subject(), cx.data_n()) {
                    ("poison", 1) => {
                        if cx.attempt >= 2 {
                            // Retries wait for every other subject: if
                            // they were held back behind this one, this
                            // would never return.
                            let _ = others_seen.wait_for(|n| *n >= OTHERS).await;
                        }
                        Err(HandlerError::transient("CRM down"))
                    }
                    ("poison", _) => {
                        *p2_saw.lock().unwrap() = Some((parked.entries().len(), log.acked("p1")));
                        Ok(())
                    }
                    _ => {
                        others_done.send_modify(|n| *n += 1);
                        Ok(())
                    }
                }
            }
        }
    });
    let (shutdown, task) = start(consumer, source);
    wait_until("p2 is acked", || feed.log.acked("p2")).await;
    let report = stop(shutdown, task).await;

    let entries = parked.entries();
    assert_eq!(entries.len(), 1);
    let entry = &entries[0];
    assert_eq!(entry.reason, "gave up after 3 attempts: CRM down");
    assert_eq!(entry.attempts, 3);
    assert_eq!(entry.consumer, "test");
    assert_eq!(entry.event.as_ref().map(Event::id), Some(poison_id));
    assert!(entry.raw.is_empty());
    assert_eq!(feed.log.of("p1"), [Settled::Ack], "parked, then acked");
    assert_eq!(
        *p2_saw.lock().unwrap(),
        Some((1, true)),
        "p2 waited until p1 was parked and acked"
    );
    assert_eq!(report.parked, 1);
    assert_eq!(report.retried, 2);
    assert_eq!(report.handled, OTHERS as u64 + 1);
}

#[tokio::test]
async fn subjects_waiting_to_retry_take_no_slot_from_the_others() {
    const OTHERS: usize = 10;
    let parked = MemoryParked::default();
    let (feed, source) = feed();
    // As many failing subjects as slots, each retrying only in an hour.
    feed.send("p1", event("T", "poison-1", 1));
    feed.send("p2", event("T", "poison-2", 1));
    for i in 0..OTHERS {
        feed.send(&format!("o{i}"), event("T", &format!("other-{i}"), 0));
    }
    let poison_calls = Arc::new(AtomicU32::new(0));
    let consumer = consumer(&parked)
        .concurrency(2)
        .retry(
            Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600)),
            5,
        )
        .on_event("T", {
            let poison_calls = poison_calls.clone();
            move |cx: Context<()>| {
                let poison = cx.event.subject().starts_with("poison");
                if poison {
                    poison_calls.fetch_add(1, Ordering::SeqCst);
                }
                async move {
                    if poison {
                        Err(HandlerError::transient("CRM down"))
                    } else {
                        Ok(())
                    }
                }
            }
        });
    let (shutdown, task) = start(consumer, source);
    wait_until("every other subject is handled", || {
        (0..OTHERS).all(|i| feed.log.acked(&format!("o{i}")))
    })
    .await;
    assert_eq!(
        poison_calls.load(Ordering::SeqCst),
        2,
        "one attempt each so far"
    );
    let report = stop(shutdown, task).await;
    assert_eq!(report.handled, OTHERS as u64);
    for p in ["p1", "p2"] {
        let settled = feed.log.of(p);
        assert!(
            matches!(settled[..], [Settled::Nack(_)]),
            "{p}: {settled:?}"
        );
    }
}

trait DataN {
    fn data_n(&self) -> u32;
}

impl DataN for Context<()> {
    fn data_n(&self) -> u32 {
        self.event.data_as::<Seq>().map(|s| s.n).unwrap_or(u32::MAX)
    }
}

// ---------------------------------------------------------------- park at once

#[tokio::test]
async fn a_permanent_error_parks_at_once() {
    let parked = MemoryParked::default();
    let (feed, source) = feed();
    feed.send("m", event("PledgeMade", "pledge-9", 1));
    let calls = Arc::new(AtomicU32::new(0));
    let consumer = consumer(&parked).on_event("Pledge*", {
        let calls = calls.clone();
        move |_cx: Context<()>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                Err(HandlerError::permanent("unknown campaign")
                    .with_source(std::io::Error::other("campaign 7 not found")))
            }
        }
    });
    let (shutdown, task) = start(consumer, source);
    wait_until("the message is acked", || feed.log.acked("m")).await;
    let report = stop(shutdown, task).await;

    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let entries = parked.entries();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].reason,
        "permanent failure: unknown campaign: campaign 7 not found"
    );
    assert_eq!(entries[0].attempts, 1);
    assert_eq!((report.parked, report.retried), (1, 0));
}

#[tokio::test]
async fn an_undecodable_message_is_parked_at_once_with_its_bytes() {
    let parked = MemoryParked::default();
    let (feed, source) = feed();
    feed.send_incoming(
        Incoming::undecodable(
            "expected value at line 1 column 2",
            b"{oops".to_vec(),
            feed.acker("bad"),
        )
        .with_delivery_attempt(1),
    );
    let calls = Arc::new(AtomicU32::new(0));
    let consumer = consumer(&parked).on_event("*", {
        let calls = calls.clone();
        move |_cx: Context<()>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        }
    });
    let (shutdown, task) = start(consumer, source);
    wait_until("the message is acked", || feed.log.acked("bad")).await;
    let report = stop(shutdown, task).await;

    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let entries = parked.entries();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].reason,
        "undecodable message: expected value at line 1 column 2"
    );
    assert_eq!(entries[0].raw, b"{oops");
    assert!(entries[0].event.is_none());
    assert_eq!(entries[0].attempts, 0);
    assert_eq!(report.parked, 1);
}

#[derive(Debug, serde::Deserialize)]
struct Donation {
    #[allow(dead_code)]
    amount_cents: u64,
}

#[tokio::test]
async fn data_that_does_not_fit_the_handlers_type_is_parked_naming_the_type() {
    let parked = MemoryParked::default();
    let (feed, source) = feed();
    let bad = Event::builder("DonorSecured")
        .subject("donor-1")
        .data(&serde_json::json!({ "amount_cents": "lots" }))
        .build()
        .unwrap();
    feed.send("bad", bad);
    let calls = Arc::new(AtomicU32::new(0));
    let consumer = consumer(&parked).on("DonorSecured", {
        let calls = calls.clone();
        move |_cx: Context<Donation>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        }
    });
    let (shutdown, task) = start(consumer, source);
    wait_until("the message is acked", || feed.log.acked("bad")).await;
    let report = stop(shutdown, task).await;

    assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler never ran");
    let entries = parked.entries();
    assert_eq!(entries.len(), 1);
    let reason = &entries[0].reason;
    assert!(
        reason.starts_with("event data does not decode as ") && reason.contains("Donation"),
        "{reason}"
    );
    assert!(reason.contains("invalid type"), "{reason}");
    assert_eq!(entries[0].attempts, 0);
    assert_eq!((report.parked, report.retried, report.handled), (1, 0, 0));
}

// ---------------------------------------------------------------- routing

#[tokio::test]
async fn unmatched_types_are_skipped_and_the_first_matching_route_wins() {
    let parked = MemoryParked::default();
    let (feed, source) = feed();
    feed.send("secured", event("DonorSecured", "d", 1));
    feed.send("lost", event("DonorLost", "d", 2));
    feed.send("pledge", event("PledgeMade", "p", 1));
    let routed: Arc<Mutex<Vec<(&'static str, String)>>> = Arc::default();
    let route = |name: &'static str| {
        let routed = routed.clone();
        move |cx: Context<()>| {
            routed
                .lock()
                .unwrap()
                .push((name, cx.event.event_type().to_owned()));
            async { Ok(()) }
        }
    };
    let consumer = consumer(&parked)
        .on_event("DonorSecured", route("exact"))
        .on_event("Donor*", route("pattern"));
    let (shutdown, task) = start(consumer, source);
    wait_until("all are acked", || feed.log.acks() == 3).await;
    let report = stop(shutdown, task).await;

    let mut routed = routed.lock().unwrap().clone();
    routed.sort();
    assert_eq!(
        routed,
        [
            ("exact", "DonorSecured".to_owned()),
            ("pattern", "DonorLost".to_owned())
        ]
    );
    assert_eq!(feed.log.of("pledge"), [Settled::Ack]);
    assert_eq!((report.handled, report.skipped), (2, 1));
}

// ---------------------------------------------------------------- park failures

#[tokio::test]
async fn a_failed_park_is_retried_and_the_message_stays_unacked_meanwhile() {
    let (feed, source) = feed();
    let parked = MemoryParked::failing(3, &feed.log, "m");
    feed.send("m", event("DonorSecured", "d", 1));
    let consumer = consumer(&parked).on_event("*", |_cx: Context<()>| async {
        Err(HandlerError::permanent("no such donor"))
    });
    let (shutdown, task) = start(consumer, source);
    wait_until("the message is acked", || feed.log.acked("m")).await;
    let report = stop(shutdown, task).await;

    assert_eq!(parked.0.calls.load(Ordering::SeqCst), 4);
    assert_eq!(
        *parked.0.acked_at_failure.lock().unwrap(),
        [false, false, false],
        "never acked while parking failed"
    );
    assert_eq!(parked.entries().len(), 1);
    assert_eq!(feed.log.of("m"), [Settled::Ack]);
    assert_eq!((report.parked, report.park_failures), (1, 3));
}

// ---------------------------------------------------------------- shutdown

#[tokio::test]
async fn shutdown_finishes_in_flight_handlings_and_hands_back_the_rest() {
    let parked = MemoryParked::default();
    let (feed, source) = feed();
    feed.send("k1", event("Slow", "k", 1));
    feed.send("k2", event("Slow", "k", 2)); // waits behind k1
    feed.send("j1", event("Fast", "j", 1));
    let (started_tx, mut started) = watch::channel(false);
    let (gate_tx, gate) = watch::channel(false);
    let handled: Arc<Mutex<Vec<String>>> = Arc::default();
    let consumer = consumer(&parked)
        .on_event("Slow", {
            let (started_tx, gate, handled) = (Arc::new(started_tx), gate.clone(), handled.clone());
            move |cx: Context<()>| {
                let (started_tx, mut gate, handled) =
                    (started_tx.clone(), gate.clone(), handled.clone());
                async move {
                    started_tx.send_replace(true);
                    let _ = gate.wait_for(|open| *open).await;
                    handled.lock().unwrap().push(cx.event.subject().to_owned());
                    Ok(())
                }
            }
        })
        .on_event("Fast", |_cx: Context<()>| async { Ok(()) });
    let (shutdown, task) = start(consumer, source);
    started.wait_for(|s| *s).await.unwrap();
    // j1 came after k2: once it is acked, k2 has been received (and waits).
    wait_until("j1 is acked", || feed.log.acked("j1")).await;
    shutdown.cancel();
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert!(!task.is_finished(), "k1 is still being handled");
    gate_tx.send_replace(true);
    let report = stop(shutdown, task).await;

    assert_eq!(
        *handled.lock().unwrap(),
        ["k"],
        "k1 finished, k2 never started"
    );
    assert_eq!(feed.log.of("k1"), [Settled::Ack]);
    assert_eq!(feed.log.of("k2"), [Settled::Nack(Duration::ZERO)]);
    assert_eq!((report.handled, report.released), (2, 1));
}

#[tokio::test]
async fn shutdown_cuts_a_retry_wait_short_and_hands_the_message_back() {
    let parked = MemoryParked::default();
    let (feed, source) = feed();
    feed.send("m", event("DonorSecured", "d", 1));
    let calls = Arc::new(AtomicU32::new(0));
    let consumer = consumer(&parked)
        .retry(
            Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600)),
            5,
        )
        .on_event("*", {
            let calls = calls.clone();
            move |_cx: Context<()>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(HandlerError::transient("busy")) }
            }
        });
    let (shutdown, task) = start(consumer, source);
    wait_until("the handler failed once", || {
        calls.load(Ordering::SeqCst) == 1
    })
    .await;
    let report = stop(shutdown, task).await;

    let settled = feed.log.of("m");
    assert_eq!(settled.len(), 1, "{settled:?}");
    assert!(
        matches!(settled[0], Settled::Nack(d) if d >= Duration::from_secs(1800)),
        "redelivered after the backoff: {settled:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!((report.retried, report.released, report.parked), (1, 1, 0));
}

#[tokio::test]
async fn a_closed_source_stops_the_consumer_after_its_in_flight_work() {
    let parked = MemoryParked::default();
    let (feed, source) = feed();
    feed.send("a", event("T", "a", 1));
    feed.send("b", event("T", "b", 1));
    let Feed { tx, log } = feed;
    drop(tx);
    let report = Consumer::new("closing")
        .park_into(parked)
        .on_event("T", |_cx: Context<()>| async {
            tokio::task::yield_now().await;
            Ok(())
        })
        .run(source, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.handled, 2);
    assert_eq!(log.acks(), 2);
}

#[tokio::test]
async fn abort_cancels_handlings_where_they_stand_and_settles_nothing() {
    let parked = MemoryParked::default();
    let (feed, source) = feed();
    feed.send("done", event("T", "a", 1));
    feed.send("stuck", event("T", "b", 1));
    let (started, mut started_rx) = mpsc::unbounded_channel::<u32>();
    let finished = Arc::new(AtomicUsize::new(0));
    let handle = Consumer::new("aborted")
        .park_into(parked)
        .on_event("T", {
            let finished = finished.clone();
            move |cx: Context<()>| {
                let (started, finished) = (started.clone(), finished.clone());
                async move {
                    let stuck = cx.event.subject() == "b";
                    let _ = started.send(u32::from(stuck));
                    if stuck {
                        std::future::pending::<()>().await;
                    }
                    finished.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }
        })
        .spawn(source)
        .unwrap();
    let mut seen = vec![
        started_rx.recv().await.unwrap(),
        started_rx.recv().await.unwrap(),
    ];
    seen.sort_unstable();
    assert_eq!(seen, [0, 1]);
    wait_until("the first message acked", || feed.log.acked("done")).await;

    let report = handle.abort().await;
    assert_eq!(report.handled, 1);
    assert_eq!(finished.load(Ordering::SeqCst), 1);
    // The stuck message was neither acked nor handed back: the broker's ack
    // deadline brings it back, as after a crash.
    assert!(
        feed.log.of("stuck").is_empty(),
        "{:?}",
        feed.log.of("stuck")
    );
    assert_eq!(feed.log.of("done"), [Settled::Ack]);
}

// ---------------------------------------------------------------- robustness

#[tokio::test]
async fn a_panicking_handler_is_retried_then_parked_and_its_subject_goes_on() {
    let parked = MemoryParked::default();
    let (feed, source) = feed();
    feed.send("boom", event("T", "k", 1));
    feed.send("after", event("T", "k", 2));
    let consumer = consumer(&parked).on("T", |cx: Context<Seq>| async move {
        if cx.data.n == 1 {
            panic!("boom");
        }
        Ok(())
    });
    let (shutdown, task) = start(consumer, source);
    wait_until("both are acked", || feed.log.acks() == 2).await;
    let report = stop(shutdown, task).await;

    let entries = parked.entries();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].reason,
        "gave up after 3 attempts: handler panicked: boom"
    );
    assert_eq!((report.handled, report.parked, report.retried), (1, 1, 2));
}

#[tokio::test]
async fn a_hung_handler_times_out_into_a_retry() {
    let parked = MemoryParked::default();
    let (feed, source) = feed();
    feed.send("m", event("T", "k", 1));
    let consumer = consumer(&parked)
        .handler_timeout(Duration::from_millis(20))
        .retry(
            Backoff::new(Duration::from_millis(1), Duration::from_millis(1)),
            2,
        )
        .on_event("T", |_cx: Context<()>| std::future::pending());
    let (shutdown, task) = start(consumer, source);
    wait_until("the message is acked", || feed.log.acked("m")).await;
    let report = stop(shutdown, task).await;

    let entries = parked.entries();
    assert_eq!(
        entries[0].reason,
        "gave up after 2 attempts: handler did not finish within 20ms"
    );
    assert_eq!((report.parked, report.retried), (1, 1));
}

#[tokio::test]
async fn a_failed_receive_is_retried() {
    let parked = MemoryParked::default();
    let (feed, source) = feed();
    feed.tx
        .send(Err(SourceError::new("connection reset")))
        .unwrap();
    feed.send("m", event("T", "k", 1));
    let consumer = consumer(&parked).on_event("T", |_cx: Context<()>| async { Ok(()) });
    let (shutdown, task) = start(consumer, source);
    wait_until("the message is acked", || feed.log.acked("m")).await;
    let report = stop(shutdown, task).await;
    assert_eq!((report.receive_errors, report.handled), (1, 1));
}

#[tokio::test]
async fn the_context_carries_the_consumer_name_and_delivery_attempt() {
    let parked = MemoryParked::default();
    let (feed, source) = feed();
    // (consumer, delivery attempt, attempt)
    let seen: Recorded<Option<(String, Option<u32>, u32)>> = Arc::default();
    feed.send_incoming(Incoming::new(event("T", "k", 1), feed.acker("m")).with_delivery_attempt(3));
    let consumer = consumer(&parked).on_event("T", {
        let seen = seen.clone();
        move |cx: Context<()>| {
            *seen.lock().unwrap() =
                Some((cx.consumer().to_owned(), cx.delivery_attempt, cx.attempt));
            async { Ok(()) }
        }
    });
    let (shutdown, task) = start(consumer, source);
    wait_until("the message is acked", || feed.log.acked("m")).await;
    stop(shutdown, task).await;
    assert_eq!(*seen.lock().unwrap(), Some(("test".to_owned(), Some(3), 1)));
}

struct Counting(Arc<AtomicU32>);

impl Handler<Seq> for Counting {
    async fn handle(&self, cx: Context<Seq>) -> Result<(), HandlerError> {
        self.0.fetch_add(cx.data.n, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn a_handler_type_can_be_routed_and_spawned() {
    let parked = MemoryParked::default();
    let (feed, source) = feed();
    feed.send("a", event("T", "k", 2));
    feed.send("b", event("T", "j", 5));
    let sum = Arc::new(AtomicU32::new(0));
    let handle = consumer(&parked)
        .on_handler("T", Counting(sum.clone()))
        .spawn(source)
        .unwrap();
    wait_until("both are acked", || feed.log.acks() == 2).await;
    assert_eq!(handle.report().handled, 2);
    let report = handle.shutdown().await;
    assert_eq!(report.handled, 2);
    assert_eq!(sum.load(Ordering::SeqCst), 7);
}

#[tokio::test]
async fn configurations_that_cannot_work_are_refused_before_receiving() {
    let parked = MemoryParked::default();
    let ok = |c: Consumer| c.on_event("*", |_cx: Context<()>| async { Ok(()) });
    let cases: Vec<(Consumer, &str)> = vec![
        (Consumer::new("c").park_into(parked.clone()), "no handler"),
        (ok(Consumer::new("c")), "park_into"),
        (ok(Consumer::new(" ").park_into(parked.clone())), "name"),
        (
            Consumer::new("c")
                .park_into(parked.clone())
                .on_event("Donor Secured", |_cx: Context<()>| async { Ok(()) }),
            "whitespace",
        ),
        (ok(consumer(&parked)).concurrency(0), "concurrency"),
        (
            ok(consumer(&parked)).concurrency(8).max_pending(4),
            "max_pending",
        ),
        (
            ok(consumer(&parked)).retry(Backoff::default(), 0),
            "max_attempts",
        ),
    ];
    for (consumer, expected) in cases {
        let (feed, source) = feed();
        feed.send("m", event("T", "k", 1));
        let err = consumer
            .run(source, CancellationToken::new())
            .await
            .unwrap_err();
        assert!(err.0.contains(expected), "{expected}: {err}");
        assert!(feed.log.of("m").is_empty());
    }
}

#[test]
fn store_errors_convert_by_whether_a_retry_can_help() {
    let down: HandlerError = StoreError::Unavailable("connection refused".into()).into();
    assert!(down.is_transient());
    assert!(
        down.full_message().contains("connection refused"),
        "{}",
        down.full_message()
    );
    let broken: HandlerError = StoreError::Config("bad table".into()).into();
    assert!(!broken.is_transient());
}

// ---------------------------------------------------------------- in-process bus

fn record(sequence: i64, event: Event, attempts: u32) -> OutboxRecord {
    OutboxRecord {
        sequence,
        event,
        attempts,
        created_at: chrono::Utc::now(),
    }
}

#[tokio::test]
async fn an_in_process_subscription_feeds_the_consumer_and_publishes_complete_on_ack() {
    let bus = InProcessBus::new();
    let subscription = bus.subscribe("thank-you", Vec::<String>::new());
    let parked = MemoryParked::default();
    let amounts: Recorded<Vec<(u64, Option<u32>)>> = Arc::default();
    let consumer = consumer(&parked)
        .on("DonorSecured", {
            let amounts = amounts.clone();
            move |cx: Context<Donation>| {
                amounts
                    .lock()
                    .unwrap()
                    .push((cx.data.amount_cents, cx.delivery_attempt));
                async { Ok(()) }
            }
        })
        .on_event("Pledge*", |_cx: Context<()>| async {
            Err(HandlerError::permanent("pledges are not ours"))
        });
    let (shutdown, task) = start(consumer, subscription);

    let donor = |cents: u64| {
        Event::builder("DonorSecured")
            .subject("donor-1")
            .data(&serde_json::json!({ "amount_cents": cents }))
            .build()
            .unwrap()
    };
    // Publish returns only once the consumer has acked.
    bus.publish(&record(1, donor(100), 1)).await.unwrap();
    bus.publish(&record(2, donor(200), 2)).await.unwrap();
    assert_eq!(*amounts.lock().unwrap(), [(100, Some(1)), (200, Some(2))]);
    // Parked, then acked: the publish succeeds and the relay moves on.
    bus.publish(&record(3, event("PledgeMade", "p", 1), 1))
        .await
        .unwrap();
    assert_eq!(parked.entries().len(), 1);

    let report = stop(shutdown, task).await;
    assert_eq!((report.handled, report.parked), (2, 1));
}

#[tokio::test]
async fn a_message_handed_back_on_shutdown_fails_the_in_process_publish_with_a_delay() {
    let bus = InProcessBus::new();
    let subscription = bus.subscribe("c", Vec::<String>::new());
    let parked = MemoryParked::default();
    let calls = Arc::new(AtomicU32::new(0));
    let consumer = consumer(&parked)
        .retry(
            Backoff::new(Duration::from_secs(60), Duration::from_secs(60)),
            5,
        )
        .on_event("*", {
            let calls = calls.clone();
            move |_cx: Context<()>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(HandlerError::transient("busy")) }
            }
        });
    let (shutdown, task) = start(consumer, subscription);
    let publish = tokio::spawn({
        let bus = bus.clone();
        async move { bus.publish(&record(1, event("T", "k", 1), 1)).await }
    });
    wait_until("the handler failed once", || {
        calls.load(Ordering::SeqCst) == 1
    })
    .await;
    stop(shutdown, task).await;
    let err = publish.await.unwrap().unwrap_err();
    assert!(err.is_transient());
    let delay = err.retry_after().unwrap();
    assert!(delay >= Duration::from_secs(30), "{delay:?}");
}

/// An outbox in memory, enough for a relay: per-subject heads only, leases
/// ignored (one relay).
#[derive(Default, Clone)]
struct MemoryOutbox {
    rows: Arc<Mutex<Vec<Row>>>,
}

struct Row {
    record: OutboxRecord,
    in_flight: bool,
    due: tokio::time::Instant,
}

impl MemoryOutbox {
    fn with(events: Vec<Event>) -> Self {
        let now = tokio::time::Instant::now();
        let rows = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| Row {
                record: record(i as i64 + 1, event, 0),
                in_flight: false,
                due: now,
            })
            .collect();
        MemoryOutbox {
            rows: Arc::new(Mutex::new(rows)),
        }
    }
    fn len(&self) -> usize {
        self.rows.lock().unwrap().len()
    }
}

impl OutboxStore for MemoryOutbox {
    async fn claim(
        &self,
        _: LeaseToken,
        limit: usize,
        _: Duration,
    ) -> Result<ClaimedBatch, StoreError> {
        let now = tokio::time::Instant::now();
        let mut rows = self.rows.lock().unwrap();
        let mut blocked = HashSet::new();
        let mut batch = ClaimedBatch::default();
        for row in rows.iter_mut() {
            let subject = row.record.event.subject().to_owned();
            if batch.records.len() < limit
                && !row.in_flight
                && row.due <= now
                && !blocked.contains(&subject)
            {
                row.in_flight = true;
                row.record.attempts += 1;
                batch.records.push(row.record.clone());
            } else {
                blocked.insert(subject);
            }
        }
        Ok(batch)
    }
    async fn complete(
        &self,
        _: LeaseToken,
        outcome: &BatchOutcome,
        _: AckMode,
    ) -> Result<CompleteReport, StoreError> {
        let mut rows = self.rows.lock().unwrap();
        let gone: Vec<i64> = outcome
            .published
            .iter()
            .copied()
            .chain(outcome.dead.iter().map(|d| d.sequence))
            .collect();
        rows.retain(|r| !gone.contains(&r.record.sequence));
        for row in rows.iter_mut() {
            if let Some(retry) = outcome
                .retry
                .iter()
                .find(|r| r.sequence == row.record.sequence)
            {
                row.due = tokio::time::Instant::now() + retry.delay;
            }
            row.in_flight = false;
        }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_a_relay_delivers_through_the_bus_to_the_consumer_in_order() {
    const SUBJECTS: u32 = 4;
    const PER_SUBJECT: u32 = 15;
    let mut events = Vec::new();
    for n in 0..PER_SUBJECT {
        for s in 0..SUBJECTS {
            events.push(event("Tick", &format!("s{s}"), n));
        }
    }
    events.push(event("PledgeMade", "s0", 99));
    let outbox = MemoryOutbox::with(events);
    let bus = InProcessBus::new();
    let subscription = bus.subscribe("projector", Vec::<String>::new());
    let parked = MemoryParked::default();
    let seen: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let flaky = Arc::new(AtomicBool::new(true));
    let consumer = consumer(&parked)
        .on("Tick", {
            let (seen, flaky) = (seen.clone(), flaky.clone());
            move |cx: Context<Seq>| {
                // One transient failure, retried inside the consumer.
                let fail = cx.data.n == 7 && flaky.swap(false, Ordering::SeqCst);
                if !fail {
                    seen.lock()
                        .unwrap()
                        .push((cx.event.subject().to_owned(), cx.data.n));
                }
                async move {
                    if fail {
                        Err(HandlerError::transient("flaky"))
                    } else {
                        Ok(())
                    }
                }
            }
        })
        .on_event("Pledge*", |_cx: Context<()>| async {
            Err(HandlerError::permanent("not ours"))
        });
    let consumer = consumer.spawn(subscription).unwrap();
    let config = RelayConfig::default().with_poll_interval(Duration::from_millis(5));
    let relay = Relay::new(outbox.clone(), bus.clone(), config)
        .unwrap()
        .spawn();
    wait_until("the outbox is empty", || outbox.len() == 0).await;
    let relay_report = relay.shutdown().await;
    let report = consumer.shutdown().await;

    assert_eq!(relay_report.dead_lettered, 0);
    assert_eq!(report.handled, u64::from(SUBJECTS * PER_SUBJECT));
    assert_eq!((report.parked, report.retried), (1, 1));
    let seen = seen.lock().unwrap().clone();
    for s in 0..SUBJECTS {
        let subject = format!("s{s}");
        let order: Vec<u32> = seen
            .iter()
            .filter(|(d, _)| *d == subject)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(order, (0..PER_SUBJECT).collect::<Vec<_>>(), "{subject}");
    }
    assert_eq!(parked.entries()[0].reason, "permanent failure: not ours");
}
