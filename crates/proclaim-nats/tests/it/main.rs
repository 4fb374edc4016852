//! Integration tests against a real NATS server with JetStream
//! (`PROCLAIM_TEST_NATS_URL`, default `nats://127.0.0.1:4222`). Each test
//! uses its own stream, deleted at the end even if the test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use async_nats::jetstream::stream::StorageType;
use proclaim_core::{Event, Publisher};
use proclaim_nats::{NatsConfig, NatsError, NatsPublisher, decode_message};
use proclaim_testkit::events::{donor_secured, record};
use proclaim_testkit::nats::{TestStream, nats_url};
use proclaim_testkit::net::SilentServer;

mod conformance;
mod consumer;
mod projector;
mod request;

fn config_for(ts: &TestStream) -> NatsConfig {
    NatsConfig::default()
        .with_url(nats_url())
        .with_stream(&ts.name)
        .with_subject_prefix(&ts.prefix)
}

async fn publisher_for(ts: &TestStream) -> NatsPublisher {
    NatsPublisher::connect(config_for(ts)).await.unwrap()
}

fn header<'a>(message: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    message.headers.as_ref()?.get(name).map(|v| v.as_str())
}

#[tokio::test]
async fn publishes_a_cloudevent_and_decodes_it_back() {
    let ts = TestStream::new().await;
    let publisher = publisher_for(&ts).await;
    let event = donor_secured();

    publisher.ready().await.unwrap();
    publisher.publish(&record(event.clone())).await.unwrap();

    let messages = ts.messages().await;
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(
        message.subject.as_str(),
        format!("{}.DonorSecured", ts.prefix)
    );
    assert_eq!(&message.payload[..], event.data().get().as_bytes());
    let id = event.id().to_string();
    let expected = [
        ("Nats-Msg-Id", id.as_str()),
        ("ce-specversion", "1.0"),
        ("ce-id", id.as_str()),
        ("ce-type", "DonorSecured"),
        ("ce-source", "campaign-finance"),
        ("ce-subject", "donor-42"),
        ("ce-time", &event.time_rfc3339()),
        ("ce-dataschema", "urn:campaign:donor-secured:v2"),
        ("content-type", "application/json"),
        ("ce-correlationid", "pledge-drive-7"),
        (
            "ce-traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("ce-tenant", "acme"),
    ];
    for (name, value) in expected {
        assert_eq!(header(message, name), Some(value), "header {name}");
    }
    assert_eq!(decode_message(message).unwrap(), event);
}

#[tokio::test]
async fn the_same_event_twice_is_stored_once() {
    let ts = TestStream::new().await;
    let publisher = publisher_for(&ts).await;
    let first = record(donor_secured());
    let mut again = first.clone();
    again.sequence = 2;
    again.attempts = 2;

    publisher.publish(&first).await.unwrap();
    publisher.publish(&again).await.unwrap();
    // Another event is stored: only the redelivery was dropped.
    let other = Event::builder("DonorSecured")
        .subject("donor-43")
        .build()
        .unwrap();
    publisher.publish(&record(other.clone())).await.unwrap();

    assert_eq!(ts.count().await, 2);
    let ids: Vec<_> = ts
        .messages()
        .await
        .iter()
        .map(|m| decode_message(m).unwrap().id())
        .collect();
    assert_eq!(ids, vec![first.event.id(), other.id()]);
}

#[tokio::test]
async fn an_event_whose_subject_cannot_be_formed_is_a_permanent_error() {
    let ts = TestStream::new().await;
    let config = config_for(&ts).with_subject_template("{prefix}.{subject}");
    let publisher = NatsPublisher::connect(config).await.unwrap();

    for subject in ["has space", "a..b", "orders.>", "*"] {
        let event = Event::builder("DonorSecured")
            .subject(subject)
            .build()
            .unwrap();
        let err = publisher.publish(&record(event.clone())).await.unwrap_err();
        assert!(!err.is_transient(), "{subject:?}: {err}");
        let text = err.to_string();
        assert!(text.contains(&event.id().to_string()), "{text}");
        assert!(text.contains(&format!("{subject:?}")), "{text}");
    }
    let err = publisher
        .publish(&record(
            Event::builder("T").subject("has space").build().unwrap(),
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().ends_with(
        "cannot be published: its subject \"has space\" cannot be used in a NATS subject: \
         it contains whitespace"
    ));

    // A valid event still goes through, to <prefix>.<subject>.
    let ok = Event::builder("DonorSecured")
        .subject("donor-42")
        .build()
        .unwrap();
    publisher.publish(&record(ok)).await.unwrap();
    let messages = ts.messages().await;
    assert_eq!(messages.len(), 1);
    assert_eq!(
        messages[0].subject.as_str(),
        format!("{}.donor-42", ts.prefix)
    );
}

#[tokio::test]
async fn an_unreachable_server_fails_fast_and_names_the_url() {
    let started = Instant::now();
    let config = NatsConfig::default()
        .with_url("nats://127.0.0.1:1")
        .with_connect_timeout(Duration::from_secs(2));
    let err = NatsPublisher::connect(config).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, NatsError::Connect { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "cannot connect to NATS at nats://127.0.0.1:1: connection refused"
    );
}

#[tokio::test]
async fn credentials_are_hidden_in_connect_errors() {
    let config = NatsConfig::default().with_url("nats://relay:s3cret@127.0.0.1:1");
    let err = NatsPublisher::connect(config).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot connect to NATS at nats://***@127.0.0.1:1: connection refused"
    );
}

#[tokio::test]
async fn a_missing_stream_is_an_error_unless_create_stream_is_set() {
    // Take a unique name and prefix (and the guarantee of deletion at the
    // end), then remove the stream so the publisher finds none.
    let ts = TestStream::new().await;
    ts.js.delete_stream(&ts.name).await.unwrap();

    let err = NatsPublisher::connect(config_for(&ts)).await.unwrap_err();
    assert!(matches!(err, NatsError::StreamMissing { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "JetStream stream {} does not exist (create it, or set create_stream)",
            ts.name
        )
    );
    let err = NatsPublisher::from_client(ts.client.clone(), config_for(&ts))
        .await
        .unwrap_err();
    assert!(matches!(err, NatsError::StreamMissing { .. }), "{err:?}");

    let config = config_for(&ts)
        .with_create_stream(true)
        .with_duplicate_window(Duration::from_secs(90));
    let publisher = NatsPublisher::connect(config.clone()).await.unwrap();
    let info = ts
        .js
        .get_stream(&ts.name)
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(info.config.subjects, vec![format!("{}.>", ts.prefix)]);
    assert_eq!(info.config.storage, StorageType::File);
    assert_eq!(info.config.duplicate_window, Duration::from_secs(90));

    publisher.publish(&record(donor_secured())).await.unwrap();
    assert_eq!(ts.count().await, 1);
    // With the stream there, create_stream leaves it (and its messages) alone.
    NatsPublisher::connect(config).await.unwrap();
    assert_eq!(ts.count().await, 1);
    // `ts` deletes the stream when dropped.
}

#[tokio::test]
async fn a_message_larger_than_max_payload_is_a_permanent_error() {
    let ts = TestStream::new().await;
    let publisher = publisher_for(&ts).await;
    let max_payload = publisher.client().server_info().max_payload;
    assert!(max_payload > 0);
    let blob = "x".repeat(max_payload + 1);
    let event = Event::builder("DonorSecured")
        .subject("donor-42")
        .data(&serde_json::json!({ "blob": blob }))
        .build()
        .unwrap();

    let err = publisher.publish(&record(event.clone())).await.unwrap_err();
    assert!(!err.is_transient(), "{}", err.full_message());
    let text = err.to_string();
    assert!(text.contains(&event.id().to_string()), "{text}");
    assert!(
        text.contains(&format!("max_payload of {max_payload} bytes")),
        "{text}"
    );
    assert_eq!(ts.count().await, 0);

    // A message just under the limit is fine.
    let fits = Event::builder("DonorSecured")
        .subject("donor-42")
        .data(&serde_json::json!({ "blob": "x".repeat(max_payload - 4096) }))
        .build()
        .unwrap();
    publisher.publish(&record(fits.clone())).await.unwrap();
    let messages = ts.messages().await;
    assert_eq!(messages.len(), 1);
    assert_eq!(decode_message(&messages[0]).unwrap(), fits);
}

#[tokio::test]
async fn a_stream_deleted_under_a_running_publisher_is_a_transient_error() {
    let ts = TestStream::new().await;
    let publisher = publisher_for(&ts).await;
    ts.js.delete_stream(&ts.name).await.unwrap();

    let err = publisher
        .publish(&record(donor_secured()))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{}", err.full_message());
    assert!(
        err.to_string()
            .contains("no JetStream stream captures the subject"),
        "{err}"
    );
}

#[tokio::test]
async fn from_client_reuses_a_connection() {
    let ts = TestStream::new().await;
    let publisher = NatsPublisher::from_client(ts.client.clone(), config_for(&ts))
        .await
        .unwrap();
    publisher.ready().await.unwrap();
    publisher.publish(&record(donor_secured())).await.unwrap();
    ts.wait_for_count(1, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_invalid_config_is_rejected_before_connecting() {
    let config = NatsConfig::default()
        .with_url("nats://127.0.0.1:1")
        .with_subject_template("{prefix}.{kind}");
    let err = NatsPublisher::connect(config).await.unwrap_err();
    assert!(matches!(err, NatsError::Config(_)), "{err:?}");
}

#[tokio::test]
async fn test_streams_are_deleted_even_when_a_test_panics() {
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);

    let ts = TestStream::new().await;
    let name = ts.name.clone();
    drop(ts);
    assert!(
        js.get_stream(&name).await.is_err(),
        "{name} survived its drop"
    );

    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let ts = TestStream::new().await;
        tx.send(ts.name.clone()).unwrap();
        panic!("a failing test");
    });
    assert!(task.await.unwrap_err().is_panic());
    let name = rx.await.unwrap();
    assert!(
        js.get_stream(&name).await.is_err(),
        "{name} survived a panic"
    );
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_instead_of_hanging() {
    // Accepts TCP connections but never sends the NATS INFO line.
    let silent = SilentServer::start().await;
    let port = silent.port();

    let started = Instant::now();
    let config = NatsConfig::default()
        .with_url(format!("nats://127.0.0.1:{port}"))
        .with_connect_timeout(Duration::from_millis(500));
    let err = NatsPublisher::connect(config).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("cannot connect to NATS at nats://127.0.0.1:{port}: timed out after 500ms")
    );
}
