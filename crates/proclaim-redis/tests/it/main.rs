//! Integration tests against a real Redis server (`PROCLAIM_TEST_REDIS_URL`,
//! default `redis://127.0.0.1:6379`). Each test uses keys of its own under a
//! unique prefix, deleted at the end even if the test fails; the tests that
//! crash, restart or stall a server run a private `redis-server` instead.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use proclaim_core::{Event, Publisher};
use proclaim_redis::redis::{self, Value};
use proclaim_redis::{DecodeError, RedisConfig, RedisError, RedisPublisher, decode_entry};
use proclaim_testkit::events::{donor_secured, keyed, n_of, record};
use proclaim_testkit::net::{SilentServer, free_addr};

mod conformance;
mod consumer;
mod support;

use support::{PrivateRedis, TestKeys, connection, entries, redis_url, xlen};

fn config_for(keys: &TestKeys) -> RedisConfig {
    RedisConfig::default()
        .with_url(redis_url())
        .with_stream(keys.key("events"))
}

fn text(value: &Value) -> String {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).unwrap(),
        other => panic!("not a bulk string: {other:?}"),
    }
}

#[tokio::test]
async fn publishes_the_documented_fields_and_decodes_them_back() {
    let keys = TestKeys::new();
    let publisher = RedisPublisher::connect(config_for(&keys)).await.unwrap();
    let event = donor_secured();

    publisher.ready().await.unwrap();
    publisher.publish(&record(event.clone())).await.unwrap();

    let mut conn = keys.connection().await;
    let stored = entries(&mut conn, &keys.key("events")).await;
    assert_eq!(stored.len(), 1);
    let entry = &stored[0];
    let id = event.id().to_string();
    let expected = [
        ("ce-specversion", "1.0"),
        ("ce-id", id.as_str()),
        ("ce-type", "DonorSecured"),
        ("ce-source", "campaign-finance"),
        ("ce-subject", "donor-42"),
        ("ce-time", &event.time_rfc3339()),
        ("ce-dataschema", "urn:campaign:donor-secured:v2"),
        ("ce-correlationid", "pledge-drive-7"),
        (
            "ce-traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("ce-tenant", "acme"),
        ("content-type", "application/json"),
        ("data", event.data().get()),
    ];
    for (field, value) in expected {
        assert_eq!(
            entry.map.get(field).map(text).as_deref(),
            Some(value),
            "field {field}"
        );
    }
    assert_eq!(entry.map.len(), expected.len(), "{:?}", entry.map.keys());

    let decoded = decode_entry(entry).unwrap();
    assert_eq!(decoded.event, event);
    assert_eq!(decoded.dedup_id, id);
    assert_eq!(decoded.entry_id, entry.id);
}

#[tokio::test]
async fn the_stream_template_picks_the_stream() {
    let keys = TestKeys::new();
    let config = config_for(&keys).with_stream(keys.key("{source}:{type}:{subject}"));
    let publisher = RedisPublisher::connect(config).await.unwrap();
    let a = keyed("k-a", 1);
    let b = keyed("k-b", 2);
    publisher.publish(&record(a.clone())).await.unwrap();
    publisher.publish(&record(b.clone())).await.unwrap();
    let stream_a = keys.key("proclaim:DonorSecured:k-a");
    assert_eq!(publisher.stream_for(&a), stream_a);

    let mut conn = keys.connection().await;
    assert_eq!(
        support::keys_under(&mut conn, &keys.prefix).await,
        vec![stream_a.clone(), keys.key("proclaim:DonorSecured:k-b")]
    );
    let got = entries(&mut conn, &stream_a).await;
    assert_eq!(got.len(), 1);
    assert_eq!(decode_entry(&got[0]).unwrap().event, a);
}

#[tokio::test]
async fn a_redelivered_event_is_stored_twice_with_one_dedup_id() {
    let keys = TestKeys::new();
    let publisher = RedisPublisher::connect(config_for(&keys)).await.unwrap();
    let first = record(donor_secured());
    let mut again = first.clone();
    again.attempts = 2;
    publisher.publish(&first).await.unwrap();
    publisher.publish(&again).await.unwrap();

    let decoded = keys.decoded().await;
    assert_eq!(decoded.len(), 2, "Redis does not deduplicate");
    let id = first.event.id().to_string();
    assert!(decoded.iter().all(|d| d.dedup_id == id));
    assert_ne!(decoded[0].entry_id, decoded[1].entry_id);
}

#[tokio::test]
async fn max_len_trims_the_stream_approximately() {
    let keys = TestKeys::new();
    let config = config_for(&keys).with_max_len(Some(100));
    let publisher = RedisPublisher::connect(config).await.unwrap();
    for n in 0..1000 {
        publisher.publish(&record(keyed("k", n))).await.unwrap();
    }
    let mut conn = keys.connection().await;
    let len = xlen(&mut conn, &keys.key("events")).await;
    // `MAXLEN ~` drops whole macro nodes (100 entries each by default), so
    // the stream keeps at least 100 and somewhat more — far below 1000.
    assert!((100..=300).contains(&len), "XLEN is {len}");
    // What is kept is the newest entries, still in order.
    let kept: Vec<u64> = keys
        .decoded()
        .await
        .iter()
        .map(|d| n_of(&d.event))
        .collect();
    let len = usize::try_from(len).unwrap();
    assert_eq!(kept, (1000 - len as u64..1000).collect::<Vec<_>>());

    // Without max_len nothing is trimmed.
    let untrimmed = RedisPublisher::connect(config_for(&keys).with_stream(keys.key("all")))
        .await
        .unwrap();
    for n in 0..300 {
        untrimmed.publish(&record(keyed("k", n))).await.unwrap();
    }
    assert_eq!(xlen(&mut conn, &keys.key("all")).await, 300);
}

#[tokio::test]
async fn a_key_of_another_type_is_a_permanent_error_naming_the_key() {
    let keys = TestKeys::new();
    let key = keys.key("events");
    let mut conn = keys.connection().await;
    redis::cmd("SET")
        .arg(&key)
        .arg("not a stream")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let publisher = RedisPublisher::connect(config_for(&keys)).await.unwrap();
    let event = donor_secured();

    let err = publisher.publish(&record(event.clone())).await.unwrap_err();
    assert!(!err.is_transient(), "{}", err.full_message());
    assert_eq!(
        err.to_string(),
        format!(
            "cannot publish event {} to Redis stream {key}: the key {key} exists and is not a \
             stream (WRONGTYPE Operation against a key holding the wrong kind of value)",
            event.id()
        )
    );
    // The key is untouched, and the publisher still works for other keys.
    let value: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(value, "not a stream");
    publisher.ready().await.unwrap();
}

#[tokio::test]
async fn an_entry_over_max_entry_bytes_is_a_permanent_error_and_not_sent() {
    let keys = TestKeys::new();
    let config = config_for(&keys).with_max_entry_bytes(4096);
    let publisher = RedisPublisher::connect(config).await.unwrap();
    let big = Event::builder("DonorSecured")
        .subject("donor-42")
        .data(&serde_json::json!({ "blob": "x".repeat(5000) }))
        .build()
        .unwrap();
    let err = publisher.publish(&record(big.clone())).await.unwrap_err();
    assert!(!err.is_transient(), "{}", err.full_message());
    let text = err.to_string();
    assert!(text.contains(&big.id().to_string()), "{text}");
    assert!(
        text.contains("is larger than max_entry_bytes (4096 bytes)"),
        "{text}"
    );
    assert_eq!(keys.count().await, 0);

    let small = keyed("k", 1);
    publisher.publish(&record(small.clone())).await.unwrap();
    assert_eq!(keys.decoded().await[0].event, small);
}

#[tokio::test]
async fn an_entry_over_the_servers_bulk_limit_is_not_acknowledged() {
    // A server that takes arguments of at most 1 MiB (the lowest it allows).
    let server = PrivateRedis::start(&["--proto-max-bulk-len", "1mb"]).await;
    let config = RedisConfig::default()
        .with_url(server.url())
        .with_stream("events")
        .with_connect_timeout(Duration::from_secs(2))
        .with_response_timeout(Duration::from_secs(2));
    let publisher = RedisPublisher::connect(config).await.unwrap();
    let big = Event::builder("DonorSecured")
        .subject("donor-42")
        .data(&serde_json::json!({ "blob": "x".repeat(2 * 1024 * 1024) }))
        .build()
        .unwrap();
    let err = publisher.publish(&record(big.clone())).await.unwrap_err();
    tracing::info!(transient = err.is_transient(), error = %err.full_message(), "too large");
    assert!(!err.is_transient(), "{}", err.full_message());
    assert!(
        err.to_string().ends_with(&format!(
            "the data ({} bytes) is larger than the server's proto-max-bulk-len (1048576 bytes)",
            big.data().get().len()
        )),
        "{}",
        err.full_message()
    );
    // Nothing was sent: the connection is intact.
    publisher.publish(&record(keyed("k", 1))).await.unwrap();
    let mut conn = connection(&server.url()).await;
    assert_eq!(xlen(&mut conn, "events").await, 1);

    // A user that may not read the server's limit (CONFIG is forbidden to
    // it, as on many managed services): the server refuses the argument and
    // closes the connection, and the client sees either that refusal
    // (permanent) or only the reset (transient; the relay dead-letters the
    // event after its maximum attempts). Either way it is never acked, and
    // the publisher recovers.
    redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "relay",
            "on",
            ">relay-pw",
            "~*",
            "+@all",
            "-config",
        ])
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let config = RedisConfig::default()
        .with_url(format!("redis://relay:relay-pw@127.0.0.1:{}", server.port))
        .with_stream("events")
        .with_connect_timeout(Duration::from_secs(2))
        .with_response_timeout(Duration::from_secs(2));
    let restricted = RedisPublisher::connect(config).await.unwrap();
    let err = restricted.publish(&record(big)).await.unwrap_err();
    let text = err.full_message();
    assert!(
        text.contains("proto-max-bulk-len") || text.contains("the connection to Redis was lost"),
        "{text}"
    );
    assert!(!text.contains("relay-pw"), "{text}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match restricted.publish(&record(keyed("k", 2))).await {
            Ok(()) => break,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{}", e.full_message()),
        }
    }
    assert_eq!(xlen(&mut conn, "events").await, 2);
}

#[tokio::test]
async fn acl_users_authenticate_and_a_wrong_password_is_refused() {
    let server = PrivateRedis::start(&["--requirepass", "default-pw"]).await;
    let admin_url = format!("redis://:default-pw@127.0.0.1:{}", server.port);
    let mut conn = connection(&admin_url).await;
    redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "relay",
            "on",
            ">relay-pw",
            "~events",
            "+xadd",
            "+ping",
            "+config|get",
        ])
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let config = |url: String| {
        RedisConfig::default()
            .with_url(url)
            .with_stream("events")
            .with_connect_timeout(Duration::from_secs(2))
            .with_response_timeout(Duration::from_secs(2))
    };

    // The right user and password: events flow.
    let good = format!("redis://relay:relay-pw@127.0.0.1:{}", server.port);
    let publisher = RedisPublisher::connect(config(good)).await.unwrap();
    publisher.publish(&record(keyed("k", 1))).await.unwrap();
    assert_eq!(xlen(&mut conn, "events").await, 1);

    // A key outside the user's ACL: transient (an operator fixes the ACL;
    // the relay retries, then dead-letters after its maximum attempts).
    let other = format!("redis://relay:relay-pw@127.0.0.1:{}", server.port);
    let elsewhere = RedisPublisher::connect(config(other).with_stream("other"))
        .await
        .unwrap();
    let err = elsewhere.publish(&record(keyed("k", 2))).await.unwrap_err();
    assert!(err.is_transient(), "{}", err.full_message());
    assert!(
        err.to_string()
            .contains("the Redis user may not append to other"),
        "{err}"
    );

    // A wrong password, or none at all.
    for (url, variant) in [
        (
            format!("redis://relay:wrong-pw@127.0.0.1:{}", server.port),
            "auth",
        ),
        (
            format!("redis://:wrong-pw@127.0.0.1:{}", server.port),
            "auth",
        ),
        (format!("redis://127.0.0.1:{}", server.port), "noauth"),
    ] {
        let err = RedisPublisher::connect(config(url.clone()))
            .await
            .unwrap_err();
        assert!(matches!(err, RedisError::Auth { .. }), "{url}: {err:?}");
        let text = err.to_string();
        assert!(!text.contains("wrong-pw"), "{text}");
        if variant == "noauth" {
            assert_eq!(
                text,
                format!(
                    "cannot connect to Redis at redis://127.0.0.1:{}: authentication required: \
                     the server needs a password the URL does not give",
                    server.port
                )
            );
        } else {
            assert!(text.contains("authentication failed"), "{text}");
        }
    }
}

#[tokio::test]
async fn a_wrong_password_is_a_clear_error_without_the_password() {
    // This server has no `requirepass`: the default user needs no password.
    // Redis refuses `AUTH <password>` for it ("called without any password
    // configured"), and `AUTH <user> <password>` for a user that does not
    // exist (WRONGPASS); both must fail clearly, never leak the password.
    let host = redis_url().trim_start_matches("redis://").to_owned();
    for url in [
        format!("redis://:s3cret-pw@{host}"),
        format!("redis://no-such-user:s3cret-pw@{host}"),
    ] {
        let config = RedisConfig::default()
            .with_url(&url)
            .with_connect_timeout(Duration::from_secs(2));
        let started = Instant::now();
        let err = RedisPublisher::connect(config).await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(err, RedisError::Auth { .. }), "{url}: {err:?}");
        let text = err.to_string();
        assert_eq!(
            text,
            format!(
                "cannot connect to Redis at redis://***@{host}: authentication failed: the \
                 server refused the user name or password in the URL (WRONGPASS, or a password \
                 given to a server that has none)"
            )
        );
        let mut chain = format!("{err:?}");
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            chain.push_str(&s.to_string());
            source = s.source();
        }
        assert!(!chain.contains("s3cret"), "{chain}");
    }
}

#[tokio::test]
async fn an_unreachable_server_fails_fast_and_names_the_url() {
    let port = free_addr().port();
    let started = Instant::now();
    let config = RedisConfig::default()
        .with_url(format!("redis://relay:s3cret@127.0.0.1:{port}"))
        .with_connect_timeout(Duration::from_secs(2));
    let err = RedisPublisher::connect(config).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, RedisError::Connect { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("cannot connect to Redis at redis://***@127.0.0.1:{port}: connection refused")
    );
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_instead_of_hanging() {
    // Accepts TCP connections but never answers a command.
    let silent = SilentServer::start().await;
    let port = silent.port();

    let started = Instant::now();
    let config = RedisConfig::default()
        .with_url(format!("redis://127.0.0.1:{port}"))
        .with_connect_timeout(Duration::from_millis(500));
    let err = RedisPublisher::connect(config).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("cannot connect to Redis at redis://127.0.0.1:{port}: timed out after 500ms")
    );
}

#[tokio::test]
async fn an_invalid_config_is_rejected_before_connecting() {
    for config in [
        RedisConfig::default()
            .with_url("redis://127.0.0.1:1")
            .with_stream("p:{kind}"),
        RedisConfig::default().with_url("rediss://127.0.0.1:1"),
        RedisConfig::default().with_max_len(Some(0)),
    ] {
        let err = RedisPublisher::connect(config).await.unwrap_err();
        assert!(matches!(err, RedisError::Config(_)), "{err:?}");
    }
}

#[tokio::test]
async fn a_restarted_server_is_transient_then_the_same_publisher_works_again() {
    proclaim_testkit::init_tracing();
    let mut server = PrivateRedis::start(&[]).await;
    let config = RedisConfig::default()
        .with_url(server.url())
        .with_stream("events")
        .with_connect_timeout(Duration::from_secs(1))
        .with_response_timeout(Duration::from_secs(1));
    let publisher = RedisPublisher::connect(config).await.unwrap();
    publisher.publish(&record(keyed("k", 1))).await.unwrap();

    server.kill();
    for n in [2, 3] {
        let started = Instant::now();
        let err = publisher.publish(&record(keyed("k", n))).await.unwrap_err();
        assert!(err.is_transient(), "{}", err.full_message());
        assert!(
            started.elapsed() < Duration::from_secs(2) + Duration::from_millis(500),
            "took {:?}",
            started.elapsed()
        );
        tracing::info!(error = %err.full_message(), "server down");
    }
    let err = publisher.ready().await.unwrap_err();
    assert!(err.is_transient(), "{}", err.full_message());

    server.restart().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match publisher.publish(&record(keyed("k", 4))).await {
            Ok(()) => break,
            Err(e) => {
                assert!(e.is_transient(), "{}", e.full_message());
                assert!(
                    Instant::now() < deadline,
                    "no reconnect: {}",
                    e.full_message()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    publisher.ready().await.unwrap();
    let mut conn = connection(&server.url()).await;
    let ns: Vec<u64> = entries(&mut conn, "events")
        .await
        .iter()
        .map(|e| n_of(&decode_entry(e).unwrap().event))
        .collect();
    // Event 1 was acknowledged, and lost with the crash: this server runs
    // with `appendonly no` and no snapshots (see the crate docs on
    // durability).
    assert_eq!(ns, vec![4]);
}

#[tokio::test]
async fn a_server_busy_running_a_script_is_a_transient_error() {
    let server = PrivateRedis::start(&["--busy-reply-threshold", "100"]).await;
    let config = RedisConfig::default()
        .with_url(server.url())
        .with_stream("events")
        .with_connect_timeout(Duration::from_secs(2))
        .with_response_timeout(Duration::from_secs(2));
    let publisher = RedisPublisher::connect(config).await.unwrap();

    // A script that never ends, on a connection of its own.
    let url = server.url();
    let script = tokio::spawn(async move {
        let mut conn = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection_with_config(
                &redis::AsyncConnectionConfig::new().set_response_timeout(None),
            )
            .await
            .unwrap();
        redis::cmd("EVAL")
            .arg("while true do end")
            .arg(0)
            .query_async::<()>(&mut conn)
            .await
    });
    let mut probe = connection(&server.url()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = redis::cmd("PING").query_async::<String>(&mut probe).await;
        if reply.as_ref().is_err_and(|e| e.code() == Some("BUSY")) {
            break;
        }
        assert!(Instant::now() < deadline, "never busy: {reply:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let err = publisher.publish(&record(keyed("k", 1))).await.unwrap_err();
    assert!(err.is_transient(), "{}", err.full_message());
    assert!(
        err.to_string()
            .contains("Redis is busy running a script or function (BUSY"),
        "{err}"
    );
    assert!(publisher.ready().await.is_err());

    redis::cmd("SCRIPT")
        .arg("KILL")
        .query_async::<()>(&mut probe)
        .await
        .unwrap();
    let killed = script.await.unwrap().unwrap_err();
    tracing::info!(error = %killed, "script killed");
    publisher.publish(&record(keyed("k", 2))).await.unwrap();
    assert_eq!(xlen(&mut probe, "events").await, 1);
}

#[tokio::test]
async fn credentials_refused_on_reconnect_are_transient_and_recover() {
    proclaim_testkit::init_tracing();
    let server = PrivateRedis::start(&["--requirepass", "default-pw"]).await;
    let admin_url = format!("redis://:default-pw@127.0.0.1:{}", server.port);
    let mut admin = connection(&admin_url).await;
    let acl = |args: &'static [&'static str]| {
        let mut cmd = redis::cmd("ACL");
        cmd.arg(args);
        cmd
    };
    acl(&["SETUSER", "relay", "on", ">first-pw", "~*", "+@all"])
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    let config = RedisConfig::default()
        .with_url(format!("redis://relay:first-pw@127.0.0.1:{}", server.port))
        .with_stream("events")
        .with_connect_timeout(Duration::from_secs(1))
        .with_response_timeout(Duration::from_secs(1));
    let publisher = RedisPublisher::connect(config).await.unwrap();
    publisher.publish(&record(keyed("k", 1))).await.unwrap();

    // The password changes and the connection drops: reconnecting fails
    // with an authentication error, which the connection manager alone
    // would return for ever.
    acl(&["SETUSER", "relay", "resetpass", ">second-pw"])
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    redis::cmd("CLIENT")
        .arg(&["KILL", "USER", "relay"])
        .query_async::<u64>(&mut admin)
        .await
        .unwrap();
    let mut refused = false;
    for n in 2..20 {
        let err = publisher.publish(&record(keyed("k", n))).await.unwrap_err();
        assert!(err.is_transient(), "{}", err.full_message());
        assert!(
            !err.full_message().contains("first-pw"),
            "{}",
            err.full_message()
        );
        if err.to_string().contains("Redis refused the credentials") {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "never saw the credentials refused");

    // The operator puts the password back: the same publisher recovers.
    acl(&["SETUSER", "relay", "resetpass", ">first-pw"])
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match publisher.publish(&record(keyed("k", 100))).await {
            Ok(()) => break,
            Err(e) => {
                assert!(e.is_transient(), "{}", e.full_message());
                assert!(Instant::now() < deadline, "stuck: {}", e.full_message());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let ns: Vec<u64> = entries(&mut admin, "events")
        .await
        .iter()
        .map(|e| n_of(&decode_entry(e).unwrap().event))
        .collect();
    assert_eq!(ns, vec![1, 100]);
}

#[tokio::test]
async fn decoding_an_entry_that_lacks_a_field_names_it() {
    let keys = TestKeys::new();
    let key = keys.key("foreign");
    let mut conn = keys.connection().await;
    // An entry some other producer wrote: attributes, but no `ce-id`.
    let id: String = redis::cmd("XADD")
        .arg(&key)
        .arg("*")
        .arg(&[
            ("ce-specversion", "1.0"),
            ("ce-type", "DonorSecured"),
            ("ce-source", "elsewhere"),
            ("ce-subject", "donor-42"),
            ("ce-time", "2026-11-01T12:00:00Z"),
            ("data", "{}"),
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    let stored = entries(&mut conn, &key).await;
    let err = decode_entry(&stored[0]).unwrap_err();
    assert_eq!(
        err,
        DecodeError::MissingField {
            entry_id: id.clone(),
            field: "ce-id".into()
        }
    );
    assert_eq!(
        err.to_string(),
        format!("stream entry {id} lacks the ce-id field")
    );
}

#[tokio::test]
async fn test_keys_are_deleted_even_when_a_test_panics() {
    let mut conn = connection(&redis_url()).await;
    let keys = TestKeys::new();
    let prefix = keys.prefix.clone();
    let publisher = RedisPublisher::connect(config_for(&keys)).await.unwrap();
    publisher.publish(&record(keyed("k", 1))).await.unwrap();
    drop(keys);
    assert!(support::keys_under(&mut conn, &prefix).await.is_empty());

    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let keys = TestKeys::new();
        let publisher = RedisPublisher::connect(config_for(&keys)).await.unwrap();
        publisher.publish(&record(keyed("k", 1))).await.unwrap();
        tx.send(keys.prefix.clone()).unwrap();
        panic!("a failing test");
    });
    assert!(task.await.unwrap_err().is_panic());
    let prefix = rx.await.unwrap();
    assert!(
        support::keys_under(&mut conn, &prefix).await.is_empty(),
        "{prefix} survived a panic"
    );
}
