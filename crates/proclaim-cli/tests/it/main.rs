//! The `proclaim` command, run as a process against the real PostgreSQL and NATS.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashSet;
use std::process::{Output, Stdio};
use std::time::Duration;

use proclaim::nats::decode_message;
use proclaim::postgres::{PgOutbox, PgOutboxOptions};
use proclaim::{Event, OutboxStore};
use proclaim_testkit::eventually;
use proclaim_testkit::nats::{TestStream, nats_url};
use proclaim_testkit::pg::{TestSchema, database_url};
use tokio::process::{Child, Command};

mod parked;
mod projections;

const WAIT: Duration = Duration::from_secs(60);

fn proclaim() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_proclaim"));
    for (key, _) in std::env::vars() {
        if key.starts_with("PROCLAIM_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "warn").kill_on_drop(true);
    cmd
}

/// A command bound to a test's own schema and stream.
fn bound(ts: &TestSchema, stream: Option<&TestStream>) -> Command {
    let mut cmd = proclaim();
    cmd.env("PROCLAIM_DATABASE_URL", database_url())
        .env("PROCLAIM_SCHEMA", &ts.name);
    if let Some(s) = stream {
        cmd.env("PROCLAIM_NATS_URL", nats_url())
            .env("PROCLAIM_STREAM", &s.name)
            .env("PROCLAIM_SUBJECT_PREFIX", &s.prefix);
    }
    cmd
}

async fn run(cmd: &mut Command, args: &[&str]) -> Output {
    cmd.args(args).stdin(Stdio::null()).output().await.unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a failure with the given exit code and a one-line error naming `needle`.
fn assert_fails(out: &Output, code: i32, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line of error expected, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "expected {needle:?} in: {err}");
}

async fn migrated(ts: &TestSchema) -> PgOutbox {
    let out = run(&mut bound(ts, None), &["migrate"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    PgOutbox::with_options(
        ts.pool.clone(),
        PgOutboxOptions::default().with_schema(&ts.name),
    )
    .unwrap()
}

#[tokio::test]
async fn emit_then_status_reports_the_pending_event() {
    let ts = TestSchema::new().await;
    migrated(&ts).await;
    let out = run(
        &mut bound(&ts, None),
        &[
            "emit",
            "--type",
            "DonorSecured",
            "--subject",
            "donor-1",
            "--data",
            r#"{"amount_cents":5000}"#,
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let id: uuid::Uuid = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(id.get_version_num(), 7);

    let out = run(&mut bound(&ts, None), &["status", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["pending"], 1);
    assert_eq!(status["in_flight"], 0);
    assert_eq!(status["dead_lettered"], 0);
    assert!(status["oldest_pending_age_ms"].is_u64());
}

#[tokio::test]
async fn bad_input_gives_one_line_and_exit_code_2() {
    let ts = TestSchema::new().await;
    migrated(&ts).await;
    let emit = |data: &'static str| {
        let mut cmd = bound(&ts, None);
        cmd.args(["emit", "--type", "T", "--subject", "k", "--data", data]);
        cmd
    };
    let out = run(&mut emit("{not json"), &[]).await;
    assert_fails(&out, 2, "not valid JSON");
    let out = run(
        &mut bound(&ts, None),
        &["emit", "--type", "", "--subject", "k"],
    )
    .await;
    assert_fails(&out, 2, "type");
    let out = run(&mut proclaim(), &["status"]).await;
    assert_fails(&out, 2, "no database URL");
    let out = run(
        &mut proclaim(),
        &["--database-url", "redis://127.0.0.1", "status"],
    )
    .await;
    assert_fails(&out, 2, "unsupported database URL");
    let out = run(&mut bound(&ts, None), &["--schema", "x; drop", "status"]).await;
    assert_fails(&out, 2, "not a valid identifier");
    let out = run(
        &mut bound(&ts, None),
        &["relay", "--destination", "gopher://127.0.0.1:70"],
    )
    .await;
    assert_fails(&out, 2, "unsupported scheme \"gopher\"");
    let out = run(
        &mut bound(&ts, None),
        &[
            "relay",
            "--destination",
            "amqp://u:s3cret@127.0.0.1:5672?exchnage=x",
        ],
    )
    .await;
    assert_fails(&out, 2, "unknown option \"exchnage\"");
    assert!(!stderr(&out).contains("s3cret"), "{}", stderr(&out));
    let out = run(&mut bound(&ts, None), &["relay", "--lease", "1s"]).await;
    assert_fails(&out, 2, "lease");
    let out = run(&mut bound(&ts, None), &["relay", "--lease", "soon"]).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap rejects a bad duration: {}",
        stderr(&out)
    );
    let out = run(
        &mut bound(&ts, None),
        &["--config", "/nonexistent/proclaim.toml", "status"],
    )
    .await;
    assert_fails(&out, 2, "does not exist");

    let dir = std::env::temp_dir().join(format!(
        "proclaim-cli-{}",
        proclaim_testkit::unique_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "[relay]\nbatch_sise = 10\n").unwrap();
    let out = run(
        &mut bound(&ts, None),
        &["--config", typo.to_str().unwrap(), "relay"],
    )
    .await;
    assert_fails(&out, 2, "batch_sise");
    let broken = dir.join("broken.toml");
    std::fs::write(&broken, "[relay\n").unwrap();
    let out = run(
        &mut bound(&ts, None),
        &["--config", broken.to_str().unwrap(), "status"],
    )
    .await;
    assert_fails(&out, 2, "invalid config file");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn unreachable_services_give_one_line_and_exit_code_1() {
    let ts = TestSchema::new().await;
    let out = run(
        &mut proclaim(),
        &[
            "--database-url",
            "postgres://postgres:secret@127.0.0.1:1/test",
            "status",
        ],
    )
    .await;
    assert_fails(
        &out,
        1,
        "cannot connect to the database at postgres://***@127.0.0.1:1/test",
    );
    assert!(!stderr(&out).contains("secret"));

    // Not migrated yet: a hint, not a stack trace.
    let out = run(&mut bound(&ts, None), &["status"]).await;
    assert_fails(&out, 1, "run `proclaim migrate`");

    migrated(&ts).await;
    let mut cmd = bound(&ts, None);
    cmd.env("PROCLAIM_NATS_URL", "nats://127.0.0.1:1");
    let out = run(&mut cmd, &["relay"]).await;
    assert_fails(&out, 1, "nats://127.0.0.1:1");
}

async fn wait_for_exit(child: &mut Child) -> std::process::ExitStatus {
    tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("relay did not exit")
        .unwrap()
}

fn sigterm(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
}

async fn write_events(outbox: &PgOutbox, count: usize, keys: usize) -> HashSet<uuid::Uuid> {
    let events: Vec<Event> = (0..count)
        .map(|n| {
            Event::builder("DonorSecured")
                .subject(format!("donor-{}", n % keys))
                .data(&serde_json::json!({ "n": n }))
                .build()
                .unwrap()
        })
        .collect();
    for chunk in events.chunks(1000) {
        let mut tx = outbox.pool().begin().await.unwrap();
        outbox.enqueue_batch(&mut tx, chunk).await.unwrap();
        tx.commit().await.unwrap();
    }
    events.iter().map(Event::id).collect()
}

async fn delivered_ids(stream: &TestStream) -> Vec<uuid::Uuid> {
    stream
        .messages()
        .await
        .iter()
        .map(|m| decode_message(m).unwrap().id())
        .collect()
}

async fn http_get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.ok()?;
    let mut body = String::new();
    conn.read_to_string(&mut body).await.ok()?;
    Some(body)
}

#[tokio::test]
async fn relay_delivers_serves_metrics_and_exits_0_on_sigterm() {
    let ts = TestSchema::new().await;
    let stream = TestStream::new().await;
    let outbox = migrated(&ts).await;
    let written = write_events(&outbox, 300, 7).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let mut relay = bound(&ts, Some(&stream))
        .args(["relay", "--metrics-addr", &metrics_addr])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    stream.wait_for_count(300, WAIT).await;
    let metrics =
        proclaim_testkit::eventually_value(WAIT, "published count in /metrics", || async {
            let body = http_get(&metrics_addr, "/metrics").await?;
            body.contains("proclaim_relay_events_published_total 300")
                .then_some(body)
        })
        .await;
    assert!(
        metrics.contains("proclaim_outbox_dead_lettered"),
        "{metrics}"
    );
    sigterm(&relay);
    let status = wait_for_exit(&mut relay).await;
    assert!(
        status.success(),
        "relay must exit 0 after SIGTERM: {status:?}"
    );
    let ids = delivered_ids(&stream).await;
    assert_eq!(ids.len(), 300);
    assert_eq!(ids.into_iter().collect::<HashSet<_>>(), written);
}

#[tokio::test]
async fn relay_killed_mid_batch_strands_nothing() {
    let ts = TestSchema::new().await;
    let stream = TestStream::new().await;
    let outbox = migrated(&ts).await;
    let written = write_events(&outbox, 20_000, 100).await;
    let relay_cmd = || {
        let mut cmd = bound(&ts, Some(&stream));
        cmd.args([
            "relay",
            "--lease",
            "2s",
            "--publish-timeout",
            "1s",
            "--batch-size",
            "100",
        ])
        .stdin(Stdio::null());
        cmd
    };
    let mut first = relay_cmd().spawn().unwrap();
    eventually(WAIT, "first relay has published some events", || async {
        stream.count().await >= 2_000
    })
    .await;
    first.start_kill().unwrap(); // SIGKILL: no chance to finish or release anything
    let status = wait_for_exit(&mut first).await;
    assert!(!status.success());
    let at_kill = outbox_stats(&outbox).await;
    assert!(
        at_kill.pending + at_kill.in_flight > 0,
        "killed before the end: {at_kill:?}"
    );

    let mut second = relay_cmd().spawn().unwrap();
    stream.wait_for_count(20_000, WAIT).await;
    eventually(WAIT, "outbox drained", || async {
        let s = outbox_stats(&outbox).await;
        s.pending + s.in_flight == 0
    })
    .await;
    sigterm(&second);
    assert!(wait_for_exit(&mut second).await.success());

    let ids = delivered_ids(&stream).await;
    let unique: HashSet<_> = ids.iter().copied().collect();
    assert_eq!(unique, written, "every event delivered after the restart");
    assert_eq!(
        ids.len(),
        20_000,
        "JetStream's duplicate window drops the republished ones"
    );
}

async fn outbox_stats(outbox: &PgOutbox) -> proclaim::OutboxStats {
    use proclaim::OutboxStore;
    outbox.stats().await.unwrap()
}

#[tokio::test]
async fn config_file_is_read_and_flags_and_environment_override_it() {
    let ts = TestSchema::new().await;
    let stream = TestStream::new().await;
    let outbox = migrated(&ts).await;
    write_events(&outbox, 20, 3).await;
    let dir = std::env::temp_dir().join(format!(
        "proclaim-cli-{}",
        proclaim_testkit::unique_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("proclaim.toml");
    std::fs::write(
        &file,
        format!(
            "database_url = {url:?}\nschema = {schema:?}\n\n[relay]\nbatch_size = 7\nlease = \"20s\"\n\n[nats]\nurl = {nats:?}\nstream = {stream:?}\nsubject_prefix = {prefix:?}\n",
            url = database_url(),
            schema = ts.name,
            nats = nats_url(),
            stream = stream.name,
            prefix = stream.prefix,
        ),
    )
    .unwrap();
    let config = file.to_str().unwrap();

    // Everything from the file.
    let out = run(&mut proclaim(), &["--config", config, "status", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["pending"], 20);

    // The environment overrides the file, and a flag overrides both.
    let mut cmd = proclaim();
    cmd.env("PROCLAIM_SCHEMA", "no_such_schema");
    let out = run(&mut cmd, &["--config", config, "status"]).await;
    assert_fails(&out, 1, "\"no_such_schema\".\"outbox\" does not exist");
    let mut cmd = proclaim();
    cmd.env("PROCLAIM_SCHEMA", "no_such_schema");
    let out = run(
        &mut cmd,
        &["--config", config, "--schema", &ts.name, "status"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));

    // The relay takes its stream and settings from the file.
    let mut relay = proclaim()
        .args(["--config", config, "relay"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    stream.wait_for_count(20, WAIT).await;
    sigterm(&relay);
    assert!(wait_for_exit(&mut relay).await.success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn demo_runs_on_the_embedded_default_and_loses_nothing() {
    let out = run(&mut proclaim(), &["demo", "--donors", "500"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let line = stdout.trim();
    assert!(
        line.starts_with("delivered 500/500, lost 0, duplicates "),
        "{line}"
    );
    assert_eq!(
        line.lines().count(),
        1,
        "one summary line, no progress bar when stdout is a pipe: {line:?}"
    );
}

/// The same commands on every store, chosen by the URL's scheme.
async fn emit_status_replay_on(url: &str) {
    let mut cmd = proclaim();
    cmd.env("PROCLAIM_DATABASE_URL", url);
    let out = run(&mut cmd, &["status"]).await;
    assert_fails(&out, 1, "run `proclaim migrate`");
    let mut cmd = proclaim();
    cmd.env("PROCLAIM_DATABASE_URL", url);
    let out = run(&mut cmd, &["migrate"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    for n in 0..3 {
        let mut cmd = proclaim();
        cmd.env("PROCLAIM_DATABASE_URL", url);
        let data = format!(r#"{{"n":{n}}}"#);
        let out = run(
            &mut cmd,
            &[
                "emit",
                "--type",
                "DonorSecured",
                "--subject",
                "donor-1",
                "--data",
                &data,
            ],
        )
        .await;
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let mut cmd = proclaim();
    cmd.env("PROCLAIM_DATABASE_URL", url);
    let out = run(&mut cmd, &["status", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["pending"], 3, "{status}");
    let mut cmd = proclaim();
    cmd.env("PROCLAIM_DATABASE_URL", url);
    let out = run(&mut cmd, &["replay", "--all"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "replayed 0");

    // And the relay delivers them, in order, from this store too.
    let stream = TestStream::new().await;
    let mut relay = proclaim()
        .env("PROCLAIM_DATABASE_URL", url)
        .env("PROCLAIM_NATS_URL", nats_url())
        .env("PROCLAIM_STREAM", &stream.name)
        .env("PROCLAIM_SUBJECT_PREFIX", &stream.prefix)
        .args(["relay", "--poll-interval", "100ms"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    stream.wait_for_count(3, WAIT).await;
    sigterm(&relay);
    assert!(wait_for_exit(&mut relay).await.success());
    let delivered: Vec<u64> = stream
        .messages()
        .await
        .iter()
        .map(|m| {
            decode_message(m)
                .unwrap()
                .data_as::<serde_json::Value>()
                .unwrap()["n"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(delivered, vec![0, 1, 2]);
}

#[tokio::test]
async fn the_same_commands_work_on_sqlite() {
    let dir = std::env::temp_dir().join(format!(
        "proclaim-cli-{}",
        proclaim_testkit::unique_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("outbox.db").display());
    emit_status_replay_on(&url).await;
    let mut cmd = proclaim();
    cmd.env("PROCLAIM_DATABASE_URL", &url);
    let out = run(&mut cmd, &["--schema", "x", "status"]).await;
    assert_fails(&out, 2, "applies to PostgreSQL only");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_same_commands_work_on_mariadb() {
    let db = proclaim_testkit::mysql::TestMySqlDatabase::new().await;
    emit_status_replay_on(&db.url()).await;
}

#[tokio::test]
async fn chaos_rejects_bad_input_and_reports_unreachable_services() {
    let out = run(
        &mut proclaim(),
        &["--database-url", "sqlite://x.db", "chaos"],
    )
    .await;
    assert_fails(&out, 2, "needs a PostgreSQL");
    let ts = TestSchema::new().await;
    let out = run(&mut bound(&ts, None), &["chaos", "--faults", "db_explode"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unknown fault \"db_explode\"; known: db_blackhole"),
        "{}",
        stderr(&out)
    );
    let out = run(&mut bound(&ts, None), &["chaos", "--abort-ratio", "1.5"]).await;
    assert_fails(&out, 2, "--abort-ratio");
    let out = run(&mut bound(&ts, None), &["chaos", "--relays", "0"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    let out = run(
        &mut proclaim(),
        &[
            "--database-url",
            "postgres://postgres:secret@127.0.0.1:1/test",
            "chaos",
            "--duration",
            "1s",
        ],
    )
    .await;
    assert_fails(&out, 1, "database");
    assert!(!stderr(&out).contains("secret"));
    let out = run(
        &mut bound(&ts, None),
        &[
            "chaos",
            "--duration",
            "1s",
            "--nats-url",
            "nats://127.0.0.1:1",
        ],
    )
    .await;
    assert_fails(&out, 1, "nats://127.0.0.1:1");
}

/// `--destination` URLs, one per broker, routed by type: NATS takes every
/// event, Redis the donors, a webhook that is down the pledges. The two that
/// are up receive theirs, once, in per-subject order, while the pledges wait
/// in the webhook's own lane; SIGTERM still exits 0.
#[tokio::test]
async fn relay_fans_out_to_destination_urls_by_type() {
    use proclaim::redis::redis::{self, AsyncCommands};
    use proclaim::redis::{RedisConfig, RedisPublisher, decode_entry};

    let ts = TestSchema::new().await;
    let stream = TestStream::new().await;
    let outbox = migrated(&ts).await;
    let mut written = Vec::new();
    for n in 0..50 {
        let (event_type, key) = if n % 5 < 3 {
            ("DonorSecured", format!("donor-{}", n % 4))
        } else {
            ("PledgeMade", format!("pledge-{}", n % 3))
        };
        written.push(
            Event::builder(event_type)
                .subject(key)
                .data(&serde_json::json!({ "n": n }))
                .build()
                .unwrap(),
        );
    }
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox.enqueue_batch(&mut tx, &written).await.unwrap();
    tx.commit().await.unwrap();
    let donors: Vec<&Event> = written
        .iter()
        .filter(|e| e.event_type() == "DonorSecured")
        .collect();

    let redis_key = format!("proclaim-cli-test:{}", ts.name);
    let down = proclaim_testkit::net::free_addr();
    let metrics_addr = proclaim_testkit::net::free_addr().to_string();
    let destinations = [
        format!(
            "{}?stream={}&subject_prefix={}&name=bus",
            nats_url(),
            stream.name,
            stream.prefix
        ),
        format!("redis://127.0.0.1:6379?stream={redis_key}&types=Donor*&name=alerts"),
        format!("http://{down}/hook#types=Pledge*&name=hooks&timeout=1s"),
    ];
    let mut relay = proclaim();
    relay
        .env("PROCLAIM_DATABASE_URL", database_url())
        .env("PROCLAIM_SCHEMA", &ts.name)
        .args([
            "relay",
            "--poll-interval",
            "100ms",
            "--metrics-addr",
            &metrics_addr,
        ]);
    for d in &destinations {
        relay.args(["--destination", d]);
    }
    let mut relay = relay.stdin(Stdio::null()).spawn().unwrap();

    stream.wait_for_count(50, WAIT).await;
    let publisher = RedisPublisher::connect(RedisConfig::default())
        .await
        .unwrap();
    let mut conn = publisher.connection();
    let entries: Vec<Event> =
        proclaim_testkit::eventually_value(WAIT, "30 donors in the Redis stream", || {
            let mut conn = conn.clone();
            let key = redis_key.clone();
            let expected = donors.len();
            async move {
                let reply: redis::streams::StreamRangeReply = conn.xrange_all(&key).await.ok()?;
                (reply.ids.len() >= expected).then(|| {
                    reply
                        .ids
                        .iter()
                        .map(|entry| decode_entry(entry).unwrap().event)
                        .collect()
                })
            }
        })
        .await;
    let lane = |table: &str| {
        PgOutbox::with_options(
            ts.pool.clone(),
            PgOutboxOptions::default()
                .with_schema(&ts.name)
                .with_table(table),
        )
        .unwrap()
    };
    let hooks = lane("outbox_hooks");
    eventually(WAIT, "the pledges wait in the webhook's lane", || async {
        let stats = hooks.stats().await.unwrap();
        stats.pending + stats.in_flight == 20
    })
    .await;
    // Each relay's metrics carry its name.
    proclaim_testkit::eventually_value(WAIT, "per-destination counts in /metrics", || async {
        let body = http_get(&metrics_addr, "/metrics").await?;
        [
            r#"proclaim_relay_events_published_total{relay="fan-out"} 50"#,
            r#"proclaim_relay_events_published_total{relay="bus"} 50"#,
            r#"proclaim_relay_events_published_total{relay="alerts"} 30"#,
        ]
        .iter()
        .all(|line| body.contains(line))
        .then_some(())
    })
    .await;
    sigterm(&relay);
    let status = wait_for_exit(&mut relay).await;
    let _: () = conn.del(&redis_key).await.unwrap();
    assert!(
        status.success(),
        "relay must exit 0 after SIGTERM: {status:?}"
    );

    // Every event reached NATS once, in write order per subject.
    let to_nats = delivered_ids(&stream).await;
    assert_eq!(to_nats.len(), 50);
    assert_eq!(
        to_nats.iter().collect::<HashSet<_>>(),
        written
            .iter()
            .map(Event::id)
            .collect::<HashSet<_>>()
            .iter()
            .collect()
    );
    // Only the donors reached Redis, once each, each donor's events in
    // write order (one stream).
    let by_subject = |events: &mut dyn Iterator<Item = &Event>| {
        let mut map = std::collections::BTreeMap::<String, Vec<uuid::Uuid>>::new();
        for e in events {
            map.entry(e.subject().to_owned()).or_default().push(e.id());
        }
        map
    };
    assert_eq!(entries.len(), donors.len());
    assert_eq!(
        by_subject(&mut entries.iter()),
        by_subject(&mut written.iter().filter(|e| e.event_type() == "DonorSecured"))
    );
    // The main outbox is drained; the alerts lane too.
    assert_eq!(outbox.stats().await.unwrap().pending, 0);
    assert_eq!(lane("outbox_alerts").stats().await.unwrap().pending, 0);
}
