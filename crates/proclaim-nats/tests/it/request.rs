//! Request/reply over core NATS ([`NatsRequests`]) against the real server.
//! Each test uses a subject prefix of its own, so tests run in parallel.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proclaim_core::request::{
    Query, QueryError, QueryStatus, RegisterError, Registration, Reply, RequestReply,
};
use proclaim_nats::request::{
    CORRELATION_ID_HEADER, QUERY_ID_HEADER, QUERY_TYPE_HEADER, TIMEOUT_MS_HEADER,
};
use proclaim_nats::{NatsConfig, NatsRequests};
use proclaim_testkit::nats::{TestStream, nats_url};
use proclaim_testkit::{eventually, unique_suffix};
use serde::{Deserialize, Serialize};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Verify {
    donor: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Verdict {
    donor: String,
    verified: bool,
}

fn prefix() -> String {
    format!("t{}-rpc", unique_suffix())
}

async fn client() -> async_nats::Client {
    async_nats::connect(nats_url()).await.unwrap()
}

async fn engine_with(prefix: &str) -> NatsRequests {
    NatsRequests::new(client().await)
        .with_prefix(prefix)
        .unwrap()
}

async fn engine() -> NatsRequests {
    engine_with(&prefix()).await
}

async fn identity_matrix(engine: &NatsRequests) -> Registration {
    engine
        .register_query_handler("identity-matrix", |query: Query| async move {
            let ask: Verify = query.payload_as()?;
            match ask.donor.as_str() {
                "donor-0" => Err(QueryError::new("the ledger is offline")),
                "unknown" => Ok(Reply::NotFound),
                "explode" => panic!("the ledger exploded"),
                donor => Reply::found(&Verdict {
                    donor: donor.to_owned(),
                    verified: true,
                }),
            }
        })
        .await
        .unwrap()
}

fn verify(donor: &str) -> Query {
    Query::new("identity-matrix", "VerifyDonor")
        .with_payload(&Verify {
            donor: donor.into(),
        })
        .unwrap()
}

#[tokio::test]
async fn success_with_a_typed_payload() {
    let engine = engine().await;
    let _registration = identity_matrix(&engine).await;
    let query = verify("donor-42").with_correlation_id("pledge-drive-7");
    let id = query.id();

    let result = engine.dispatch_and_await(query, DEADLINE).await;
    assert_eq!(result.status(), QueryStatus::Success, "{result:?}");
    assert_eq!(result.query_id(), id);
    assert_eq!(result.correlation_id(), "pledge-drive-7");
    assert_eq!(result.source_service(), "identity-matrix");
    assert_eq!(result.message(), None);
    assert_eq!(
        result.found::<Verdict>().unwrap(),
        Some(Verdict {
            donor: "donor-42".into(),
            verified: true
        })
    );

    // The correlation id defaults to the query id.
    let query = verify("donor-43");
    let id = query.id();
    let result = engine.dispatch_and_await(query, DEADLINE).await;
    assert_eq!(result.correlation_id(), id.to_string());
}

#[tokio::test]
async fn no_responder_is_not_found() {
    let engine = engine().await;
    let query = verify("donor-42").with_correlation_id("c-nobody");
    let result = engine.dispatch_and_await(query.clone(), DEADLINE).await;
    assert_eq!(result.status(), QueryStatus::NotFound, "{result:?}");
    assert_eq!(result.correlation_id(), "c-nobody");
    assert_eq!(result.query_id(), query.id());
    assert_eq!(
        result.message(),
        Some(format!("no responders on {}.query.identity-matrix", engine.prefix()).as_str())
    );

    // A handler's own NotFound carries no message.
    let _registration = identity_matrix(&engine).await;
    let result = engine.dispatch_and_await(verify("unknown"), DEADLINE).await;
    assert_eq!(result.status(), QueryStatus::NotFound, "{result:?}");
    assert_eq!(result.message(), None);
    assert_eq!(result.found::<Verdict>().unwrap(), None);
}

#[tokio::test]
async fn a_handler_error_is_an_error_with_its_message() {
    let engine = engine().await;
    let _registration = identity_matrix(&engine).await;
    let query = verify("donor-0");
    let result = engine.dispatch_and_await(query.clone(), DEADLINE).await;
    assert_eq!(result.status(), QueryStatus::Error, "{result:?}");
    assert_eq!(result.message(), Some("the ledger is offline"));
    assert_eq!(result.correlation_id(), query.correlation_id());
    let err = result.found::<Verdict>().unwrap_err();
    assert_eq!(err.message(), "the ledger is offline");
}

#[tokio::test]
async fn a_panicking_handler_is_an_error_and_keeps_serving() {
    let engine = engine().await;
    let _registration = identity_matrix(&engine).await;
    let result = engine.dispatch_and_await(verify("explode"), DEADLINE).await;
    assert_eq!(result.status(), QueryStatus::Error, "{result:?}");
    assert_eq!(
        result.message(),
        Some("the handler of identity-matrix panicked: the ledger exploded")
    );
    let result = engine
        .dispatch_and_await(verify("donor-42"), DEADLINE)
        .await;
    assert_eq!(result.status(), QueryStatus::Success, "{result:?}");
}

#[tokio::test]
async fn a_handler_slower_than_the_deadline_times_out() {
    let engine = engine().await;
    let finished = Arc::new(AtomicUsize::new(0));
    let _registration = engine
        .register_query_handler("slow", {
            let finished = finished.clone();
            move |_: Query| {
                let finished = finished.clone();
                async move {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                    Ok(Reply::NotFound)
                }
            }
        })
        .await
        .unwrap();
    let query = Query::new("slow", "T").with_correlation_id("c-slow");
    let started = Instant::now();
    let result = engine
        .dispatch_and_await(query.clone(), Duration::from_millis(200))
        .await;
    // Loose bound: only "it did not wait for the handler's 10 s".
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(result.status(), QueryStatus::Timeout, "{result:?}");
    assert_eq!(result.correlation_id(), "c-slow");
    assert_eq!(result.query_id(), query.id());
    assert_eq!(result.message(), Some("no answer from slow within 200ms"));
    assert_eq!(finished.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn the_handler_sees_the_callers_deadline() {
    let engine = engine().await;
    let _registration = engine
        .register_query_handler("clock", |query: Query| async move {
            let left = query
                .remaining()
                .ok_or_else(|| QueryError::new("no deadline"))?;
            Reply::found(&(left.as_millis() as u64))
        })
        .await
        .unwrap();
    let result = engine
        .dispatch_and_await(Query::new("clock", "Left"), Duration::from_secs(3))
        .await;
    let left: u64 = result.found().unwrap().unwrap();
    assert!(left > 0 && left <= 3000, "{left}");
}

#[tokio::test]
async fn concurrent_requests_each_get_their_own_answer() {
    let engine = engine().await;
    let _registration = engine
        .register_query_handler("echo", |query: Query| async move {
            let n: u64 = query.payload_as()?;
            // Answer out of order.
            tokio::time::sleep(Duration::from_millis(50 - n % 50)).await;
            Reply::found(&json!({ "n": n, "correlation": query.correlation_id() }))
        })
        .await
        .unwrap();

    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..100u64 {
        let engine = engine.clone();
        tasks.spawn(async move {
            let query = Query::new("echo", "Echo")
                .with_payload(&n)
                .unwrap()
                .with_correlation_id(format!("c-{n}"));
            let id = query.id();
            (
                n,
                id,
                engine
                    .dispatch_and_await(query, Duration::from_secs(30))
                    .await,
            )
        });
    }
    let mut seen = HashSet::new();
    while let Some(joined) = tasks.join_next().await {
        let (n, id, result) = joined.unwrap();
        assert_eq!(result.status(), QueryStatus::Success, "{result:?}");
        assert_eq!(result.query_id(), id);
        assert_eq!(result.correlation_id(), format!("c-{n}"));
        assert_eq!(result.payload()["n"], n);
        assert_eq!(result.payload()["correlation"], format!("c-{n}"));
        assert!(seen.insert(n));
    }
    assert_eq!(seen.len(), 100);
}

#[tokio::test]
async fn instances_of_a_service_share_its_queries() {
    let prefix = prefix();
    let counts = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let mut registrations = Vec::new();
    for (instance, count) in counts.iter().enumerate() {
        // Each instance on its own connection, as in two processes.
        let engine = engine_with(&prefix).await;
        let count = count.clone();
        let registration = engine
            .register_query_handler("ledger", move |_: Query| {
                let count = count.clone();
                async move {
                    count.fetch_add(1, Ordering::SeqCst);
                    Reply::found(&instance)
                }
            })
            .await
            .unwrap();
        registrations.push(registration);
    }
    let caller = engine_with(&prefix).await;
    let mut answered_by = HashSet::new();
    for _ in 0..40 {
        let result = caller
            .dispatch_and_await(Query::new("ledger", "Balance"), DEADLINE)
            .await;
        answered_by.insert(result.found::<usize>().unwrap().unwrap());
    }
    let counts: Vec<usize> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    // Each query reached exactly one instance, and both instances got some.
    assert_eq!(counts.iter().sum::<usize>(), 40, "{counts:?}");
    assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
    assert_eq!(answered_by, HashSet::from([0, 1]));
}

#[tokio::test]
async fn closing_or_dropping_the_registration_unregisters() {
    let engine = engine().await;
    let registration = identity_matrix(&engine).await;
    assert!(registration.is_active());
    let result = engine
        .dispatch_and_await(verify("donor-42"), DEADLINE)
        .await;
    assert_eq!(result.status(), QueryStatus::Success);

    // close() returns once the server has dropped the subscription.
    registration.close().await;
    let result = engine
        .dispatch_and_await(verify("donor-42"), DEADLINE)
        .await;
    assert_eq!(result.status(), QueryStatus::NotFound, "{result:?}");

    // Dropping unsubscribes in the background.
    let registration = identity_matrix(&engine).await;
    let result = engine
        .dispatch_and_await(verify("donor-42"), DEADLINE)
        .await;
    assert_eq!(result.status(), QueryStatus::Success);
    drop(registration);
    eventually(Duration::from_secs(10), "NotFound after the drop", || {
        let engine = engine.clone();
        async move {
            let result = engine
                .dispatch_and_await(verify("donor-42"), DEADLINE)
                .await;
            result.status() == QueryStatus::NotFound
        }
    })
    .await;
}

#[tokio::test]
async fn the_wire_format_is_plain_json_with_headers() {
    let engine = engine().await;
    let _registration = identity_matrix(&engine).await;
    let subject = format!("{}.query.identity-matrix", engine.prefix());
    let raw = client().await;

    // A query as another NATS client would send it.
    let id = uuid::Uuid::now_v7();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(QUERY_ID_HEADER, id.to_string().as_str());
    headers.insert(CORRELATION_ID_HEADER, "c-raw");
    headers.insert(QUERY_TYPE_HEADER, "VerifyDonor");
    headers.insert(TIMEOUT_MS_HEADER, "2000");
    let reply = raw
        .request_with_headers(subject.clone(), headers, r#"{"donor":"donor-42"}"#.into())
        .await
        .unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["status"], "success");
    assert_eq!(reply["query_id"], id.to_string());
    assert_eq!(reply["correlation_id"], "c-raw");
    assert_eq!(reply["source_service"], "identity-matrix");
    assert_eq!(
        reply["payload"],
        json!({ "donor": "donor-42", "verified": true })
    );
    assert!(reply.get("message").is_none());
    assert!(
        reply["id"]
            .as_str()
            .is_some_and(|s| s.parse::<uuid::Uuid>().is_ok())
    );
    assert!(
        reply["timestamp"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z'))
    );

    // Without headers: a fresh id, used as correlation id.
    let reply = raw
        .request(subject.clone(), r#"{"donor":"donor-0"}"#.into())
        .await
        .unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["status"], "error");
    assert_eq!(reply["message"], "the ledger is offline");
    assert_eq!(reply["correlation_id"], reply["query_id"]);

    // A body that is not JSON: an error result, not silence.
    let reply = raw.request(subject, "{nope".into()).await.unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["status"], "error");
    assert!(
        reply["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("malformed query: its body is not JSON")),
        "{reply}"
    );
}

#[tokio::test]
async fn invalid_service_names_are_rejected() {
    let engine = engine().await;
    for bad in ["", "a.b", "a b", "*", ">"] {
        let err = engine
            .register_query_handler(bad, |_: Query| async { Ok(Reply::NotFound) })
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegisterError::InvalidService { .. }),
            "{bad:?}: {err}"
        );
        let result = engine
            .dispatch_and_await(Query::new(bad, "T"), DEADLINE)
            .await;
        assert_eq!(result.status(), QueryStatus::Error, "{bad:?}");
        assert!(
            result.message().is_some_and(|m| m.contains("is invalid")),
            "{result:?}"
        );
    }
    assert!(
        NatsRequests::new(client().await)
            .with_prefix("a..b")
            .is_err()
    );
    assert!(
        NatsRequests::new(client().await)
            .with_prefix("a.>")
            .is_err()
    );
}

#[tokio::test]
async fn a_prefix_captured_by_a_jetstream_stream_is_reported() {
    // The stream captures <prefix>.>: JetStream answers the request with a
    // publish ack, which must not pass for the handler's answer.
    let ts = TestStream::new().await;
    let engine = NatsRequests::new(ts.client.clone())
        .with_prefix(&ts.prefix)
        .unwrap();
    let result = engine
        .dispatch_and_await(Query::new("identity-matrix", "T"), DEADLINE)
        .await;
    assert_eq!(result.status(), QueryStatus::Error, "{result:?}");
    assert!(
        result
            .message()
            .is_some_and(|m| m.contains("a JetStream stream captures")),
        "{result:?}"
    );
}

#[tokio::test]
async fn connect_uses_the_config_url() {
    let engine = NatsRequests::connect(&NatsConfig::default().with_url(nats_url()))
        .await
        .unwrap();
    assert_eq!(engine.prefix(), proclaim_nats::DEFAULT_REQUEST_PREFIX);
    let err = NatsRequests::connect(&NatsConfig::default().with_url("nats://127.0.0.1:1"))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot connect to NATS at nats://127.0.0.1:1: connection refused"
    );
}
