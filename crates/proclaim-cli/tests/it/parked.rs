//! `proclaim status --parked` and `proclaim replay --parked…`: the events
//! consumers parked in their inbox's table, listed and put back in line.

use proclaim::inbox::{ParkedEvent, ParkedEvents};
use proclaim::postgres::{PgInbox, PgInboxOptions, PgOutbox};
use proclaim::{Event, OutboxAdmin, OutboxStore};
use proclaim_testkit::pg::TestSchema;

use super::{assert_fails, bound, migrated, run, stderr};

/// The consumers' inbox in the test's schema, migrated.
async fn inbox(ts: &TestSchema) -> PgInbox {
    let inbox = PgInbox::with_options(
        ts.pool.clone(),
        PgInboxOptions::default().with_schema(&ts.name),
    )
    .unwrap();
    inbox.migrate().await.unwrap();
    inbox
}

/// The bytes of an undecodable message (17 of them).
const RAW: &[u8] = b"\xff\xfe not a message!";

fn event(subject: &str) -> Event {
    Event::builder("DonorSecured")
        .subject(subject)
        .data(&serde_json::json!({ "donor": subject }))
        .build()
        .unwrap()
}

/// A parked `event` (or, without one, undecodable bytes) of `consumer`.
fn parked(consumer: &str, event: Option<&Event>, reason: &str) -> ParkedEvent {
    ParkedEvent {
        id: 0,
        consumer: consumer.into(),
        event: event.cloned(),
        raw: if event.is_some() {
            Vec::new()
        } else {
            RAW.to_vec()
        },
        reason: reason.into(),
        attempts: if event.is_some() { 5 } else { 0 },
        parked_at: event.map_or_else(|| self::event("x").time(), Event::time),
    }
}

/// Parks `event` (or, without one, undecodable bytes) for `consumer`;
/// returns its id in the parked table.
async fn park(inbox: &PgInbox, consumer: &str, event: Option<&Event>, reason: &str) -> i64 {
    inbox.park(&parked(consumer, event, reason)).await.unwrap();
    let all = inbox.parked(None, 1000).await.unwrap();
    all.last().unwrap().id
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn status_json(ts: &TestSchema, args: &[&str]) -> serde_json::Value {
    let mut argv = vec!["status", "--json"];
    argv.extend_from_slice(args);
    let out = run(&mut bound(ts, None), &argv).await;
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The ids of the outbox's rows, in order.
async fn outbox_ids(ts: &TestSchema) -> Vec<uuid::Uuid> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        r#"SELECT id FROM "{}"."outbox" ORDER BY sequence"#,
        ts.name
    )))
    .fetch_all(&ts.pool)
    .await
    .unwrap()
}

async fn parked_ids(inbox: &PgInbox) -> Vec<i64> {
    inbox
        .parked(None, 1000)
        .await
        .unwrap()
        .iter()
        .map(|p| p.id)
        .collect()
}

#[tokio::test]
async fn status_lists_parked_events_and_filters_by_consumer() {
    let ts = TestSchema::new().await;
    migrated(&ts).await;
    let inbox = inbox(&ts).await;
    let first = event("donor-1");
    let third = event("donor-3");
    let a = park(&inbox, "thank-you", Some(&first), "smtp: 550\nmailbox full").await;
    let b = park(&inbox, "strategy", None, "not a CloudEvent").await;
    let c = park(&inbox, "thank-you", Some(&third), "timeout").await;

    // Text: one line per parked event, oldest first.
    let out = run(&mut bound(&ts, None), &["status", "--parked", "10"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("parked #")).collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with(&format!(
            "parked #{a} consumer=thank-you {} DonorSecured subject=donor-1 attempts=5 parked_at=",
            first.id()
        )),
        "{text}"
    );
    assert!(
        lines[0].ends_with("reason=smtp: 550 mailbox full"),
        "{text}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "parked #{b} consumer=strategy undecodable, 17 bytes attempts=0"
        )),
        "{text}"
    );
    assert!(lines[2].starts_with(&format!("parked #{c} ")), "{text}");
    assert!(
        text.contains(&format!(
            "parked in       \"{}\".\"inbox_parked\" (3 listed)",
            ts.name
        )),
        "{text}"
    );

    // JSON: a `parked` array.
    let status = status_json(&ts, &["--parked", "10"]).await;
    let parked = status["parked"].as_array().unwrap();
    assert_eq!(parked.len(), 3, "{status}");
    assert_eq!(parked[0]["id"], a);
    assert_eq!(parked[0]["consumer"], "thank-you");
    assert_eq!(parked[0]["decodable"], true);
    assert_eq!(parked[0]["event_id"], first.id().to_string());
    assert_eq!(parked[0]["event_type"], "DonorSecured");
    assert_eq!(parked[0]["subject"], "donor-1");
    assert_eq!(parked[0]["attempts"], 5);
    assert_eq!(parked[0]["reason"], "smtp: 550\nmailbox full");
    assert!(parked[0]["parked_at"].is_string(), "{status}");
    assert_eq!(parked[1]["id"], b);
    assert_eq!(parked[1]["decodable"], false);
    assert!(parked[1]["event_id"].is_null());
    assert_eq!(parked[1]["raw_bytes"], 17);
    assert_eq!(
        status["parked_table"],
        format!("\"{}\".\"inbox_parked\"", ts.name)
    );

    // Of one consumer; the limit keeps the oldest.
    let status = status_json(&ts, &["--parked", "10", "--consumer", "thank-you"]).await;
    let ids: Vec<_> = status["parked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [a, c]);
    let status = status_json(&ts, &["--parked", "1"]).await;
    assert_eq!(status["parked"].as_array().unwrap().len(), 1);
    assert_eq!(status["parked"][0]["id"], a);
    let status = status_json(&ts, &["--parked", "5", "--consumer", "nobody"]).await;
    assert_eq!(status["parked"], serde_json::json!([]));

    // Without --parked, nothing about them.
    let status = status_json(&ts, &[]).await;
    assert!(status.get("parked").is_none(), "{status}");
}

#[tokio::test]
async fn replay_parked_id_enqueues_the_same_event_and_unparks_it() {
    let ts = TestSchema::new().await;
    let outbox = migrated(&ts).await;
    let inbox = inbox(&ts).await;
    let kept = event("donor-1");
    let replayed = event("donor-2");
    let stays = park(&inbox, "thank-you", Some(&kept), "boom").await;
    let goes = park(&inbox, "thank-you", Some(&replayed), "boom").await;

    let out = run(
        &mut bound(&ts, None),
        &["replay", "--parked", &goes.to_string()],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "replayed 1");
    assert_eq!(stderr(&out).trim(), "");

    // In the outbox, pending, with the same id; gone from the parked table.
    assert_eq!(outbox_ids(&ts).await, [replayed.id()]);
    assert_eq!(outbox.stats().await.unwrap().pending, 1);
    assert_eq!(parked_ids(&inbox).await, [stays]);
    let status = status_json(&ts, &[]).await;
    assert_eq!(status["pending"], 1);

    // Replayed already: nothing to do, and it says so.
    let out = run(
        &mut bound(&ts, None),
        &["replay", "--parked", &goes.to_string()],
    )
    .await;
    assert_fails(
        &out,
        1,
        &format!("not parked (replayed already, or no such id): #{goes}"),
    );
    assert_eq!(stdout(&out).trim(), "replayed 0");
}

#[tokio::test]
async fn replay_parked_all_replays_one_consumer_or_all() {
    let ts = TestSchema::new().await;
    let outbox = migrated(&ts).await;
    let inbox = inbox(&ts).await;
    let (e1, e2, e3) = (event("donor-1"), event("donor-2"), event("donor-3"));
    park(&inbox, "thank-you", Some(&e1), "boom").await;
    let other = park(&inbox, "strategy", Some(&e2), "boom").await;
    park(&inbox, "thank-you", Some(&e3), "boom").await;
    // The same event parked by a second consumer is enqueued once.
    park(&inbox, "strategy", Some(&e1), "boom").await;

    let out = run(
        &mut bound(&ts, None),
        &["replay", "--parked-all", "--consumer", "thank-you"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "replayed 2");
    assert_eq!(outbox_ids(&ts).await, [e1.id(), e3.id()]);
    assert_eq!(parked_ids(&inbox).await.len(), 2);

    // The strategy consumer's copy of e1: its id is in the outbox still.
    let out = run(&mut bound(&ts, None), &["replay", "--parked-all"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "replayed 1");
    assert_eq!(outbox_ids(&ts).await, [e1.id(), e3.id(), e2.id()]);
    assert!(
        stderr(&out).contains(&format!("still holds its event {}", e1.id())),
        "{}",
        stderr(&out)
    );
    assert!(!parked_ids(&inbox).await.contains(&other));
    assert_eq!(outbox.stats().await.unwrap().pending, 3);

    // Nothing of this consumer parked: nothing to do, not a failure.
    let out = run(
        &mut bound(&ts, None),
        &["replay", "--parked-all", "--consumer", "nobody"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "replayed 0");
}

#[tokio::test]
async fn undecodable_parked_events_stay_parked() {
    let ts = TestSchema::new().await;
    migrated(&ts).await;
    let inbox = inbox(&ts).await;
    let good = event("donor-1");
    let bad = park(&inbox, "strategy", None, "not a CloudEvent").await;
    let ok = park(&inbox, "strategy", Some(&good), "boom").await;

    // The decodable one is replayed; the other stays, said on stderr.
    let out = run(&mut bound(&ts, None), &["replay", "--parked-all"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "replayed 1");
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "warning: 1 undecodable parked event cannot be replayed (there is no event to \
             enqueue) and stays parked: #{bad} (17 bytes)"
        )),
        "{err}"
    );
    assert_eq!(outbox_ids(&ts).await, [good.id()]);
    assert_eq!(parked_ids(&inbox).await, [bad]);
    assert!(!parked_ids(&inbox).await.contains(&ok));

    // Only it: nothing could be replayed, exit code 1.
    let out = run(
        &mut bound(&ts, None),
        &["replay", "--parked", &bad.to_string()],
    )
    .await;
    assert_fails(&out, 1, "nothing replayed: 1 undecodable parked event");
    assert!(stderr(&out).contains(&format!("#{bad} (17 bytes)")));
    assert_eq!(parked_ids(&inbox).await, [bad]);
}

#[tokio::test]
async fn an_event_still_in_the_outbox_stays_parked_and_says_why() {
    let ts = TestSchema::new().await;
    let outbox: PgOutbox = migrated(&ts).await;
    let inbox = inbox(&ts).await;
    let held = event("donor-1");
    // The relay keeps published rows for its retention: the id is taken.
    outbox
        .enqueue_standalone(std::slice::from_ref(&held))
        .await
        .unwrap();
    let id = park(&inbox, "thank-you", Some(&held), "boom").await;

    let out = run(
        &mut bound(&ts, None),
        &["replay", "--parked", &id.to_string()],
    )
    .await;
    assert_fails(
        &out,
        1,
        &format!(
            "nothing replayed: parked #{id} stays parked: the outbox \"{}\".\"outbox\" still holds its event {}",
            ts.name,
            held.id()
        ),
    );
    assert!(stderr(&out).contains("retention"), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "replayed 0");
    assert_eq!(parked_ids(&inbox).await, [id]);
    assert_eq!(outbox_ids(&ts).await, [held.id()]);

    // Once the row is gone, it can be replayed.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        r#"DELETE FROM "{}"."outbox""#,
        ts.name
    )))
    .execute(&ts.pool)
    .await
    .unwrap();
    let out = run(
        &mut bound(&ts, None),
        &["replay", "--parked", &id.to_string()],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "replayed 1");
    assert_eq!(outbox_ids(&ts).await, [held.id()]);
    assert!(parked_ids(&inbox).await.is_empty());
}

#[tokio::test]
async fn without_inbox_tables_parked_events_are_a_clear_error() {
    let ts = TestSchema::new().await;
    migrated(&ts).await;
    // Status alone does not need them.
    let out = run(&mut bound(&ts, None), &["status"]).await;
    assert!(out.status.success(), "{}", stderr(&out));

    let table = format!("\"{}\".\"inbox_parked\" does not exist", ts.name);
    let out = run(&mut bound(&ts, None), &["status", "--parked", "10"]).await;
    assert_fails(&out, 1, &table);
    assert!(
        stderr(&out).contains("PgInbox::migrate"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("no consumer has parked anything"),
        "{}",
        stderr(&out)
    );
    let out = run(&mut bound(&ts, None), &["replay", "--parked-all"]).await;
    assert_fails(&out, 1, &table);
    let out = run(&mut bound(&ts, None), &["replay", "--parked", "1"]).await;
    assert_fails(&out, 1, &table);

    // Another inbox table, by flag or environment.
    let custom = PgInbox::with_options(
        ts.pool.clone(),
        PgInboxOptions::default()
            .with_schema(&ts.name)
            .with_table("billing_inbox"),
    )
    .unwrap();
    custom.migrate().await.unwrap();
    let e = event("donor-9");
    let id = park(&custom, "billing", Some(&e), "boom").await;
    let status = status_json(&ts, &["--inbox-table", "billing_inbox", "--parked", "5"]).await;
    assert_eq!(status["parked"][0]["id"], id);
    let mut cmd = bound(&ts, None);
    cmd.env("PROCLAIM_INBOX_TABLE", "billing_inbox");
    let out = run(&mut cmd, &["replay", "--parked", &id.to_string()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "replayed 1");

    // A bad name is bad input.
    let out = run(
        &mut bound(&ts, None),
        &["--inbox-table", "x; drop", "status", "--parked", "5"],
    )
    .await;
    assert_fails(&out, 2, "not a valid identifier");
}

/// The same listing and replay on another store: `url` is its database,
/// `inbox` its inbox there (not migrated yet), `migrate` the inbox's
/// `migrate()` and `hint` its name in the error.
async fn parked_commands_on<P: ParkedEvents>(
    url: &str,
    inbox: &P,
    migrate: impl std::future::Future<Output = ()>,
    hint: &str,
) {
    let cmd = || {
        let mut cmd = super::proclaim();
        cmd.env("PROCLAIM_DATABASE_URL", url);
        cmd
    };
    let out = run(&mut cmd(), &["migrate"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&mut cmd(), &["status", "--parked", "5"]).await;
    assert_fails(&out, 1, "proclaim_inbox_parked");
    assert!(stderr(&out).contains(hint), "{}", stderr(&out));
    let out = run(&mut cmd(), &["replay", "--parked-all"]).await;
    assert_fails(&out, 1, "does not exist");

    migrate.await;
    let good = event("donor-1");
    let park = |consumer: &str, event: Option<&Event>| ParkedEvent {
        id: 0,
        consumer: consumer.into(),
        event: event.cloned(),
        raw: if event.is_some() {
            Vec::new()
        } else {
            RAW.to_vec()
        },
        reason: "boom".into(),
        attempts: 1,
        parked_at: good.time(),
    };
    inbox.park(&park("thank-you", Some(&good))).await.unwrap();
    inbox.park(&park("strategy", None)).await.unwrap();

    let out = run(&mut cmd(), &["status", "--json", "--parked", "5"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let parked = status["parked"].as_array().unwrap();
    assert_eq!(parked.len(), 2, "{status}");
    assert_eq!(parked[0]["event_id"], good.id().to_string());
    assert_eq!(parked[1]["decodable"], false);
    assert_eq!(parked[1]["raw_bytes"], RAW.len());
    let out = run(
        &mut cmd(),
        &["status", "--parked", "5", "--consumer", "strategy"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out)
            .lines()
            .filter(|l| l.starts_with("parked #"))
            .count(),
        1
    );

    let out = run(&mut cmd(), &["replay", "--parked-all"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "replayed 1");
    assert!(stderr(&out).contains("1 undecodable parked event"));
    let left = inbox.parked(None, 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert!(left[0].event.is_none());
    let out = run(&mut cmd(), &["status", "--json"]).await;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["pending"], 1, "{status}");

    // Parked again while the outbox still holds it: the store's unique
    // key says so, and it stays parked.
    inbox.park(&park("thank-you", Some(&good))).await.unwrap();
    let again = inbox.parked(Some("thank-you"), 10).await.unwrap();
    let id = again[0].id.to_string();
    let out = run(&mut cmd(), &["replay", "--parked", &id]).await;
    assert_fails(&out, 1, &format!("still holds its event {}", good.id()));
    assert_eq!(inbox.parked(None, 10).await.unwrap().len(), 2);
}

#[tokio::test]
async fn parked_events_on_sqlite() {
    let dir = std::env::temp_dir().join(format!(
        "proclaim-cli-parked-{}",
        proclaim_testkit::unique_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("outbox.db").display());
    let pool = proclaim::sqlite::SqliteOutbox::connect(&url)
        .await
        .unwrap()
        .pool()
        .clone();
    let inbox = proclaim::sqlite::SqliteInbox::new(pool);
    let migrate = async { inbox.migrate().await.unwrap() };
    parked_commands_on(&url, &inbox, migrate, "SqliteInbox::migrate").await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn parked_events_on_mariadb() {
    let db = proclaim_testkit::mysql::TestMySqlDatabase::new().await;
    let inbox = proclaim::mysql::MySqlInbox::new(db.pool.clone());
    let migrate = async { inbox.migrate().await.unwrap() };
    parked_commands_on(&db.url(), &inbox, migrate, "MySqlInbox::migrate").await;
}

/// More parked events than one round takes (500), with some that stay at
/// the head of the listing: every one is looked at once.
#[tokio::test]
async fn replay_reads_past_what_stays_parked_in_rounds() {
    let ts = TestSchema::new().await;
    let outbox = migrated(&ts).await;
    let inbox = inbox(&ts).await;
    let bad = park(&inbox, "strategy", None, "not a CloudEvent").await;
    let mut events = Vec::new();
    for n in 0..620 {
        let e = event(&format!("donor-{n}"));
        inbox
            .park(&parked("thank-you", Some(&e), "boom"))
            .await
            .unwrap();
        events.push(e);
    }
    // One id far down the table: found without --parked-all.
    let last = *parked_ids(&inbox).await.last().unwrap();
    let out = run(
        &mut bound(&ts, None),
        &["replay", "--parked", &last.to_string()],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "replayed 1");

    let out = run(&mut bound(&ts, None), &["replay", "--parked-all"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "replayed 619");
    assert!(stderr(&out).contains(&format!("#{bad} (17 bytes)")));
    assert_eq!(parked_ids(&inbox).await, [bad]);
    assert_eq!(outbox.stats().await.unwrap().pending, 620);
    let mut expected: Vec<_> = events.iter().map(Event::id).collect();
    let moved = expected.pop().unwrap();
    expected.insert(0, moved);
    assert_eq!(outbox_ids(&ts).await, expected, "oldest first, once each");
}
