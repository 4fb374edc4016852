//! The inbox conformance suite: one set of generic tests that every
//! consumer inbox ([`Inbox`] + [`ParkedEvents`]) runs, unchanged, against
//! its real database.
//!
//! A store crate implements [`InboxHarness`] in its integration tests and
//! stamps the suite with [`inbox_conformance!`](crate::inbox_conformance!):
//!
//! ```ignore
//! struct PgInboxHarness { /* a fresh schema, the inbox, an effects table */ }
//! impl proclaim_testkit::inbox_conformance::InboxHarness for PgInboxHarness { /* … */ }
//! proclaim_testkit::inbox_conformance!(PgInboxHarness);
//! ```
//!
//! The handler of every case writes one row into a test table of its own
//! (the *effect*) through the handling's transaction; the suite counts the
//! committed rows to check that each (consumer, event) has its effect
//! exactly once.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use proclaim_core::inbox::{Inbox, InboxTx, ParkedEvent, ParkedEvents};
use proclaim_core::{Event, StoreError};
use uuid::Uuid;

pub use crate::conformance::Capabilities;

/// How the suite drives one inbox. Every `setup` gives an inbox of its own
/// (own schema, own database, own file, …) and an empty effects table, both
/// removed when the harness drops.
pub trait InboxHarness: Send + Sync + Sized + 'static {
    /// The inbox under test.
    type Inbox: Inbox + ParkedEvents + Clone;

    /// What the database can do (`concurrent_writers`: handlings of
    /// different pairs can be open at the same time; not SQLite).
    const CAPABILITIES: Capabilities;

    /// A fresh, migrated inbox and an empty effects table.
    fn setup() -> impl Future<Output = Self> + Send;

    /// The inbox.
    fn inbox(&self) -> Self::Inbox;

    /// The same inbox through another connection pool (another process).
    fn second_inbox(&self) -> impl Future<Output = Self::Inbox> + Send;

    /// Runs the inbox's `migrate` again.
    fn migrate(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The handler's work: inserts one row (`consumer`, `event_id`) into the
    /// effects table through the handling's transaction (so through the
    /// transaction type's access to its connection).
    fn apply_effect(
        &self,
        tx: &mut <Self::Inbox as Inbox>::Tx,
        consumer: &str,
        event_id: Uuid,
    ) -> impl Future<Output = ()> + Send;

    /// How many committed effect rows (`consumer`, `event_id`) there are.
    fn effects(&self, consumer: &str, event_id: Uuid) -> impl Future<Output = u64> + Send;

    /// Makes the committed pair look handled `by` earlier than it was (for
    /// `purge`).
    fn backdate(
        &self,
        consumer: &str,
        event_id: Uuid,
        by: Duration,
    ) -> impl Future<Output = ()> + Send;

    /// Builds an inbox on the same database with these schema and table
    /// names (stores without schemas check `schema` like a table name and
    /// otherwise ignore it); must fail with [`StoreError::Config`] for names
    /// that are not plain identifiers. Never migrated by the suite.
    fn named(&self, schema: &str, table: &str) -> Result<Self::Inbox, StoreError>;
}

/// How long a test lets a handling hold its pair while another delivery of
/// the same event waits for it.
const HOLD: Duration = Duration::from_millis(300);
/// Deliveries of one event racing in `concurrent_duplicates_have_one_effect`.
const RACERS: usize = 8;

/// A fresh event (a new UUIDv7) whose data is `{"n": n}`.
pub fn event(n: u64) -> Event {
    Event::builder("DonorSecured")
        .subject(format!("donor-{n}"))
        .source("inbox-conformance")
        .data(&serde_json::json!({ "n": n }))
        .build()
        .unwrap()
}

/// Handles `event` for `consumer` as a consumer would: begin, the effect,
/// commit. True when it ran the handler, false for a duplicate.
pub async fn handle<H: InboxHarness>(
    h: &H,
    inbox: &H::Inbox,
    consumer: &str,
    event: &Event,
) -> bool {
    match inbox.begin(consumer, event).await.unwrap() {
        None => false,
        Some(mut tx) => {
            h.apply_effect(&mut tx, consumer, event.id()).await;
            tx.commit().await.unwrap();
            true
        }
    }
}

/// A time the stores keep exactly (microseconds).
fn now_micros() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap()
}

/// The first delivery runs the handler: begin → effect → commit leaves one
/// effect and the pair, for that consumer only.
pub async fn first_handling_commits_effect_and_pair<H: InboxHarness>() {
    let h = H::setup().await;
    let inbox = h.inbox();
    let e = event(1);
    assert!(!inbox.contains("mailer", e.id()).await.unwrap());
    let mut tx = inbox
        .begin("mailer", &e)
        .await
        .unwrap()
        .expect("a first delivery begins a handling");
    h.apply_effect(&mut tx, "mailer", e.id()).await;
    assert!(
        !inbox.contains("mailer", e.id()).await.unwrap(),
        "the pair is not visible before the commit"
    );
    assert_eq!(h.effects("mailer", e.id()).await, 0);
    tx.commit().await.unwrap();
    assert_eq!(h.effects("mailer", e.id()).await, 1);
    assert!(inbox.contains("mailer", e.id()).await.unwrap());
    assert!(!inbox.contains("ledger", e.id()).await.unwrap());
    assert!(!inbox.contains("mailer", Uuid::now_v7()).await.unwrap());
}

/// A redelivery after the commit is a duplicate: `begin` gives `None`, the
/// effect stays one — also through another pool.
pub async fn duplicate_after_commit_is_skipped<H: InboxHarness>() {
    let h = H::setup().await;
    let inbox = h.inbox();
    let e = event(1);
    assert!(handle(&h, &inbox, "mailer", &e).await);
    for _ in 0..3 {
        assert!(inbox.begin("mailer", &e).await.unwrap().is_none());
    }
    let other = h.second_inbox().await;
    assert!(other.begin("mailer", &e).await.unwrap().is_none());
    assert!(!handle(&h, &other, "mailer", &e).await);
    assert_eq!(h.effects("mailer", e.id()).await, 1);
}

/// A handler that fails (rollback) or crashes mid-transaction (the
/// transaction is dropped) leaves neither effect nor pair, and the
/// redelivery handles the event.
pub async fn rollback_and_drop_leave_nothing<H: InboxHarness>() {
    let h = H::setup().await;
    let inbox = h.inbox();
    let e = event(1);

    let mut tx = inbox.begin("mailer", &e).await.unwrap().unwrap();
    h.apply_effect(&mut tx, "mailer", e.id()).await;
    tx.rollback().await.unwrap();
    assert_eq!(h.effects("mailer", e.id()).await, 0);
    assert!(!inbox.contains("mailer", e.id()).await.unwrap());

    let mut tx = inbox
        .begin("mailer", &e)
        .await
        .unwrap()
        .expect("a rolled-back handling is handled again");
    h.apply_effect(&mut tx, "mailer", e.id()).await;
    drop(tx); // the handler's process "dies" mid-transaction
    assert_eq!(h.effects("mailer", e.id()).await, 0);
    assert!(!inbox.contains("mailer", e.id()).await.unwrap());

    // The redelivery waits for the dropped transaction's rollback if it has
    // not reached the database yet, then handles the event.
    assert!(
        handle(&h, &inbox, "mailer", &e).await,
        "a dropped handling is handled again"
    );
    assert_eq!(h.effects("mailer", e.id()).await, 1);
    assert!(inbox.contains("mailer", e.id()).await.unwrap());
    assert!(!handle(&h, &inbox, "mailer", &e).await);
    assert_eq!(h.effects("mailer", e.id()).await, 1);
}

/// Many deliveries of one event at the same moment, through two pools:
/// exactly one runs the handler, and the effect is there once.
pub async fn concurrent_duplicates_have_one_effect<H: InboxHarness>() {
    let h = Arc::new(H::setup().await);
    let inboxes = [h.inbox(), h.second_inbox().await];
    for round in 0..3 {
        let e = event(round);
        let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
        let mut tasks = Vec::new();
        for i in 0..RACERS {
            let (h, inbox, e, barrier) = (
                h.clone(),
                inboxes[i % 2].clone(),
                e.clone(),
                barrier.clone(),
            );
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                match inbox.begin("mailer", &e).await.unwrap() {
                    None => false,
                    Some(mut tx) => {
                        // Hold the pair a little, so the others pile up on it.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        h.apply_effect(&mut tx, "mailer", e.id()).await;
                        tx.commit().await.unwrap();
                        true
                    }
                }
            }));
        }
        let mut handled = 0;
        for task in tasks {
            if task.await.unwrap() {
                handled += 1;
            }
        }
        assert_eq!(handled, 1, "round {round}: exactly one delivery handles");
        assert_eq!(h.effects("mailer", e.id()).await, 1, "round {round}");
        assert!(inboxes[0].contains("mailer", e.id()).await.unwrap());
    }
}

/// A delivery of an event whose handling is open waits for it: it is a
/// duplicate when that handling commits, and takes over when it rolls back.
pub async fn duplicate_waits_for_open_handling<H: InboxHarness>() {
    let h = Arc::new(H::setup().await);
    let inbox = h.inbox();
    let other = h.second_inbox().await;
    for commit_first in [true, false] {
        let e = event(u64::from(commit_first));
        let mut first = inbox.begin("mailer", &e).await.unwrap().unwrap();
        h.apply_effect(&mut first, "mailer", e.id()).await;
        let second = {
            let (h, other, e) = (h.clone(), other.clone(), e.clone());
            tokio::spawn(async move {
                match other.begin("mailer", &e).await.unwrap() {
                    None => false,
                    Some(mut tx) => {
                        h.apply_effect(&mut tx, "mailer", e.id()).await;
                        tx.commit().await.unwrap();
                        true
                    }
                }
            })
        };
        tokio::time::sleep(HOLD).await;
        assert!(
            !second.is_finished(),
            "a second delivery must wait while the first handling is open"
        );
        if commit_first {
            first.commit().await.unwrap();
            assert!(
                !second.await.unwrap(),
                "after the first commits, the second is a duplicate"
            );
        } else {
            first.rollback().await.unwrap();
            assert!(
                second.await.unwrap(),
                "after the first rolls back, the second handles the event"
            );
        }
        assert_eq!(h.effects("mailer", e.id()).await, 1);
        assert!(inbox.contains("mailer", e.id()).await.unwrap());
    }
}

/// Handlings of different pairs do not wait for each other (databases with
/// concurrent writers only).
pub async fn independent_pairs_do_not_wait<H: InboxHarness>() {
    if !H::CAPABILITIES.concurrent_writers {
        return;
    }
    let h = H::setup().await;
    let inbox = h.inbox();
    let other = h.second_inbox().await;
    let (e1, e2) = (event(1), event(2));
    let mut a = inbox.begin("mailer", &e1).await.unwrap().unwrap();
    h.apply_effect(&mut a, "mailer", e1.id()).await;
    let quick = Duration::from_secs(10);
    let mut b = tokio::time::timeout(quick, other.begin("ledger", &e1))
        .await
        .expect("another consumer's pair does not wait")
        .unwrap()
        .unwrap();
    h.apply_effect(&mut b, "ledger", e1.id()).await;
    let mut c = tokio::time::timeout(quick, other.begin("mailer", &e2))
        .await
        .expect("another event's pair does not wait")
        .unwrap()
        .unwrap();
    h.apply_effect(&mut c, "mailer", e2.id()).await;
    c.commit().await.unwrap();
    b.commit().await.unwrap();
    a.commit().await.unwrap();
    for (consumer, id) in [
        ("mailer", e1.id()),
        ("ledger", e1.id()),
        ("mailer", e2.id()),
    ] {
        assert_eq!(h.effects(consumer, id).await, 1, "{consumer} {id}");
        assert!(inbox.contains(consumer, id).await.unwrap());
    }
}

/// Two consumers of one event each handle it once.
pub async fn consumers_handle_independently<H: InboxHarness>() {
    let h = H::setup().await;
    let inbox = h.inbox();
    let e = event(1);
    assert!(handle(&h, &inbox, "mailer", &e).await);
    assert!(!inbox.contains("ledger", e.id()).await.unwrap());
    assert!(handle(&h, &inbox, "ledger", &e).await);
    assert!(!handle(&h, &inbox, "mailer", &e).await);
    assert!(!handle(&h, &inbox, "ledger", &e).await);
    assert_eq!(h.effects("mailer", e.id()).await, 1);
    assert_eq!(h.effects("ledger", e.id()).await, 1);
    assert!(inbox.contains("mailer", e.id()).await.unwrap());
    assert!(inbox.contains("ledger", e.id()).await.unwrap());
}

/// `purge` deletes the pairs handled longer ago than its cut-off and no
/// others; a duplicate of a purged pair is handled again (as documented).
pub async fn purge_removes_only_old_pairs<H: InboxHarness>() {
    let h = H::setup().await;
    let inbox = h.inbox();
    let (old, recent, newest) = (event(1), event(2), event(3));
    for e in [&old, &recent, &newest] {
        assert!(handle(&h, &inbox, "mailer", e).await);
    }
    assert!(handle(&h, &inbox, "ledger", &old).await);
    let hour = Duration::from_secs(3600);
    h.backdate("mailer", old.id(), 2 * hour).await;
    h.backdate("ledger", old.id(), 2 * hour).await;
    h.backdate("mailer", recent.id(), hour / 2).await;

    assert_eq!(inbox.purge(Duration::MAX).await.unwrap(), 0);
    assert_eq!(inbox.purge(3 * hour).await.unwrap(), 0);
    assert_eq!(inbox.purge(hour).await.unwrap(), 2);
    assert!(!inbox.contains("mailer", old.id()).await.unwrap());
    assert!(!inbox.contains("ledger", old.id()).await.unwrap());
    assert!(inbox.contains("mailer", recent.id()).await.unwrap());
    assert!(inbox.contains("mailer", newest.id()).await.unwrap());
    assert_eq!(inbox.purge(hour).await.unwrap(), 0);

    let tx = inbox
        .begin("mailer", &old)
        .await
        .unwrap()
        .expect("a purged pair is handled again");
    tx.rollback().await.unwrap();
    assert!(
        inbox.begin("mailer", &recent).await.unwrap().is_none(),
        "a kept pair is still a duplicate"
    );
}

fn parked(
    consumer: &str,
    event: Option<Event>,
    raw: &[u8],
    reason: &str,
    attempts: u32,
) -> ParkedEvent {
    ParkedEvent {
        id: 0,
        consumer: consumer.into(),
        event,
        raw: raw.to_vec(),
        reason: reason.into(),
        attempts,
        parked_at: now_micros(),
    }
}

fn with_id(p: &ParkedEvent, id: i64) -> ParkedEvent {
    ParkedEvent { id, ..p.clone() }
}

/// A park retried after its insert committed (the reply was lost, or it
/// timed out) stores the parking once; the same event parked again later
/// (another `parked_at`, as after a replay) is a parking of its own.
pub async fn a_retried_park_is_stored_once<H: InboxHarness>() {
    let h = H::setup().await;
    let inbox = h.inbox();
    let decoded = parked("mailer", Some(event(1)), b"", "handler failed", 3);
    let garbage = parked("mailer", None, b"\xffnot json", "undecodable", 0);
    for p in [&decoded, &garbage, &decoded, &garbage, &decoded] {
        inbox.park(p).await.unwrap();
    }
    assert_eq!(inbox.parked(None, 10).await.unwrap().len(), 2);
    // The same parking under another consumer is that consumer's own.
    let other = ParkedEvent {
        consumer: "ledger".into(),
        ..decoded.clone()
    };
    inbox.park(&other).await.unwrap();
    // A later parking of the same event and of the same bytes.
    let later = decoded.parked_at + chrono::Duration::milliseconds(5);
    inbox
        .park(&ParkedEvent {
            parked_at: later,
            ..decoded.clone()
        })
        .await
        .unwrap();
    inbox
        .park(&ParkedEvent {
            parked_at: later,
            ..garbage.clone()
        })
        .await
        .unwrap();
    let all = inbox.parked(None, 10).await.unwrap();
    assert_eq!(all.len(), 5, "{all:?}");
    assert_eq!(inbox.parked(Some("mailer"), 10).await.unwrap().len(), 4);
}

/// Parked events — decoded ones and undecodable bytes — are listed oldest
/// first, by consumer and up to a limit, exactly as parked; `take` removes
/// and returns the named ones and ignores unknown ids.
pub async fn parked_events_list_and_take<H: InboxHarness>() {
    let h = H::setup().await;
    let inbox = h.inbox();
    assert!(inbox.parked(None, 10).await.unwrap().is_empty());
    let rich = Event::builder("DonorSecured")
        .subject("donor-9")
        .source("campaign-finance")
        .dataschema("urn:donor-secured:v2")
        .json(r#"{ "b": 1,   "a": [1, 2.50], "s": "ünïcødé \"q\"" }"#)
        .correlation_id("drive-7")
        .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .extension("tenant", "acme")
        .build()
        .unwrap();
    let originals = [
        parked(
            "mailer",
            Some(rich),
            b"",
            "handler failed: smtp 451 «try later»",
            5,
        ),
        parked(
            "ledger",
            None,
            &[0xff, 0xfe, 0x00, b'{', b'"', 0x80],
            "not a CloudEvent: expected value at line 1 column 1",
            0,
        ),
        parked("mailer", Some(event(3)), b"", "handler failed: timeout", 1),
    ];
    for p in &originals {
        inbox.park(p).await.unwrap();
    }

    let all = inbox.parked(None, 100).await.unwrap();
    assert_eq!(all.len(), 3);
    assert!(
        all.windows(2).all(|w| w[0].id < w[1].id),
        "oldest first: {:?}",
        all.iter().map(|p| p.id).collect::<Vec<_>>()
    );
    let ids: Vec<i64> = all.iter().map(|p| p.id).collect();
    for (listed, original) in all.iter().zip(&originals) {
        assert_eq!(
            listed,
            &with_id(original, listed.id),
            "stored exactly as parked"
        );
    }
    assert_eq!(
        all[0].event.as_ref().unwrap().data().get(),
        originals[0].event.as_ref().unwrap().data().get(),
        "payload bytes kept verbatim"
    );

    let mailer = inbox.parked(Some("mailer"), 100).await.unwrap();
    assert_eq!(mailer, vec![all[0].clone(), all[2].clone()]);
    let ledger = inbox.parked(Some("ledger"), 100).await.unwrap();
    assert_eq!(ledger, vec![all[1].clone()]);
    assert!(ledger[0].event.is_none());
    assert_eq!(inbox.parked(None, 2).await.unwrap(), all[..2].to_vec());
    assert_eq!(
        inbox.parked(Some("mailer"), 1).await.unwrap(),
        vec![all[0].clone()]
    );
    assert!(inbox.parked(Some("nobody"), 10).await.unwrap().is_empty());
    assert!(inbox.parked(None, 0).await.unwrap().is_empty());

    assert!(inbox.take(&[]).await.unwrap().is_empty());
    let unknown = ids.iter().max().unwrap() + 1_000_000;
    let taken = inbox.take(&[ids[2], unknown, ids[0], -1]).await.unwrap();
    assert_eq!(
        taken,
        vec![all[0].clone(), all[2].clone()],
        "taken intact, oldest first"
    );
    assert_eq!(inbox.parked(None, 100).await.unwrap(), vec![all[1].clone()]);
    assert!(
        inbox.take(&[ids[0], ids[2]]).await.unwrap().is_empty(),
        "a taken event is gone"
    );
    assert_eq!(inbox.take(&ids).await.unwrap(), vec![all[1].clone()]);
    assert!(inbox.parked(None, 100).await.unwrap().is_empty());

    // Ids are not handed out again.
    inbox
        .park(&parked("mailer", None, b"x", "again", 0))
        .await
        .unwrap();
    let again = inbox.parked(None, 10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert!(again[0].id > ids[2]);
}

/// The reason is stored as the outbox stores errors: NUL characters
/// dropped, cut to a bounded length at a character boundary.
pub async fn parked_reason_is_cleaned<H: InboxHarness>() {
    let h = H::setup().await;
    let inbox = h.inbox();
    let long = format!("bad\0byte {}", "é".repeat(5000));
    inbox
        .park(&parked("mailer", Some(event(1)), b"", &long, 2))
        .await
        .unwrap();
    let listed = inbox.parked(None, 10).await.unwrap();
    let reason = &listed[0].reason;
    assert!(
        reason.starts_with("badbyte é"),
        "{:?}",
        reason.chars().take(20).collect::<String>()
    );
    assert!(!reason.contains('\0'));
    assert!(reason.len() <= proclaim_core::store_support::MAX_ERROR_LEN + '…'.len_utf8());
    assert!(reason.ends_with('…'));
}

/// Concurrent takes of the same ids hand each parked event to one of them.
pub async fn take_is_exclusive<H: InboxHarness>() {
    let h = H::setup().await;
    let inbox = h.inbox();
    for n in 0..20 {
        inbox
            .park(&parked("mailer", Some(event(n)), b"", "failed", 3))
            .await
            .unwrap();
    }
    let ids: Vec<i64> = inbox
        .parked(None, 100)
        .await
        .unwrap()
        .iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(ids.len(), 20);
    let inboxes = [inbox.clone(), h.second_inbox().await];
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (inbox, ids) = (inboxes[i % 2].clone(), ids.clone());
        tasks.push(tokio::spawn(async move { inbox.take(&ids).await.unwrap() }));
    }
    let mut taken = Vec::new();
    for task in tasks {
        taken.extend(task.await.unwrap().into_iter().map(|p| p.id));
    }
    let unique: HashSet<i64> = taken.iter().copied().collect();
    assert_eq!(taken.len(), 20, "each parked event taken once: {taken:?}");
    assert_eq!(unique, ids.iter().copied().collect());
    assert!(inbox.parked(None, 100).await.unwrap().is_empty());
}

/// Schema and table names that are not plain identifiers are refused.
pub async fn identifiers_reject_injection<H: InboxHarness>() {
    let h = H::setup().await;
    for (schema, table) in [
        ("public; DROP TABLE x", "inbox"),
        ("proclaim", "inbox\" CASCADE --"),
        ("proclaim", "inbox`; DROP TABLE x; --"),
        ("Proclaim", "inbox"),
        ("proclaim", ""),
        ("proclaim", "1inbox"),
    ] {
        let err = h.named(schema, table).err();
        assert!(
            matches!(err, Some(StoreError::Config(_))),
            "{schema}.{table}: {err:?}"
        );
    }
    assert!(h.named("proclaim_ok", "inbox_ok").is_ok());
}

/// `migrate` is idempotent, also when run concurrently, and keeps what the
/// tables hold.
pub async fn migrate_is_idempotent<H: InboxHarness>() {
    let h = H::setup().await;
    let inbox = h.inbox();
    let e = event(1);
    assert!(handle(&h, &inbox, "mailer", &e).await);
    inbox
        .park(&parked("mailer", None, b"x", "kept", 0))
        .await
        .unwrap();
    let (a, b) = tokio::join!(h.migrate(), h.migrate());
    a.unwrap();
    b.unwrap();
    h.migrate().await.unwrap();
    assert!(inbox.contains("mailer", e.id()).await.unwrap());
    assert!(!handle(&h, &inbox, "mailer", &e).await);
    assert_eq!(inbox.parked(None, 10).await.unwrap().len(), 1);
}

/// [`InboxPurger`](proclaim_core::inbox::InboxPurger) purges at once, then
/// on every tick (pairs that age past the retention while it runs go too),
/// keeps the recent ones, and returns its total on shutdown.
pub async fn purger_purges_on_schedule_until_shutdown<H: InboxHarness>() {
    let h = H::setup().await;
    let inbox = h.inbox();
    let (old, later, recent) = (event(1), event(2), event(3));
    for e in [&old, &later, &recent] {
        assert!(handle(&h, &inbox, "mailer", e).await);
    }
    let hour = Duration::from_secs(3600);
    h.backdate("mailer", old.id(), 2 * hour).await;

    let shutdown = proclaim_core::CancellationToken::new();
    let purger =
        proclaim_core::inbox::InboxPurger::new(h.inbox(), hour).every(Duration::from_millis(50));
    let task = tokio::spawn(purger.run(shutdown.clone()));
    crate::eventually(Duration::from_secs(10), "the first purge", || async {
        !inbox.contains("mailer", old.id()).await.unwrap()
    })
    .await;
    assert!(inbox.contains("mailer", later.id()).await.unwrap());
    // A pair that ages past the retention goes at a later tick.
    h.backdate("mailer", later.id(), 2 * hour).await;
    crate::eventually(Duration::from_secs(10), "a later purge", || async {
        !inbox.contains("mailer", later.id()).await.unwrap()
    })
    .await;
    shutdown.cancel();
    let purged = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the purger stops on shutdown")
        .unwrap();
    assert_eq!(purged, 2);
    assert!(inbox.contains("mailer", recent.id()).await.unwrap());

    // Settings that cannot work are refused.
    let zero = proclaim_core::inbox::InboxPurger::new(h.inbox(), Duration::ZERO);
    assert!(zero.validate().is_err());
    assert_eq!(zero.run(proclaim_core::CancellationToken::new()).await, 0);
    assert!(inbox.contains("mailer", recent.id()).await.unwrap());
}

/// Stamps every inbox conformance case as a `#[tokio::test]` for a harness
/// type, in a module named `inbox_conformance` or the one given.
#[macro_export]
macro_rules! inbox_conformance {
    ($harness:ty) => {
        $crate::inbox_conformance!($harness, inbox_conformance);
    };
    ($harness:ty, $module:ident) => {
        $crate::inbox_conformance!(@cases $harness; $module;
            first_handling_commits_effect_and_pair,
            duplicate_after_commit_is_skipped,
            rollback_and_drop_leave_nothing,
            concurrent_duplicates_have_one_effect,
            duplicate_waits_for_open_handling,
            independent_pairs_do_not_wait,
            consumers_handle_independently,
            purge_removes_only_old_pairs,
            purger_purges_on_schedule_until_shutdown,
            parked_events_list_and_take,
            a_retried_park_is_stored_once,
            parked_reason_is_cleaned,
            take_is_exclusive,
            identifiers_reject_injection,
            migrate_is_idempotent,
        );
    };
    (@cases $harness:ty; $module:ident; $($case:ident),* $(,)?) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    $crate::inbox_conformance::$case::<$harness>().await;
                }
            )*
        }
    };
}
