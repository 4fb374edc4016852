//! Integration tests against a real Kafka-protocol broker: tansu on
//! `PROCLAIM_TEST_KAFKA_ADDR` (default `127.0.0.1:9092`, started by
//! `scripts/services.sh kafka`), and private tansu processes for the outage
//! cases. Each test uses topics of its own, deleted at the end even if the
//! test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod conformance;
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proclaim_core::{Event, Publisher};
use proclaim_kafka::{
    DecodeError, KafkaConfig, KafkaError, KafkaPublisher, decode_message, dedup_id,
};
use proclaim_testkit::events::{donor_secured, keyed, n_of, of_type, record};
use proclaim_testkit::net::{SilentServer, free_addr};
use proclaim_testkit::proxy::{FaultMode, FaultProxy};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use support::{PrivateBroker, TestTopic, broker_addr, keys_and_partitions, route, router};

#[tokio::test]
async fn publishes_a_cloudevent_and_decodes_it_back() {
    proclaim_testkit::init_tracing();
    let topic = TestTopic::new().await;
    let publisher = KafkaPublisher::connect(topic.config()).await.unwrap();
    let event = donor_secured();
    publisher.ready().await.unwrap();
    publisher.publish(&record(event.clone())).await.unwrap();

    let messages = topic.messages(1, Duration::from_secs(10)).await;
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m.topic(), topic.name);
    assert_eq!(
        m.key(),
        Some("donor-42".as_bytes()),
        "the key is the subject"
    );
    assert_eq!(m.payload(), Some(event.data().get().as_bytes()));
    let headers: BTreeMap<String, String> = m
        .headers()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h.key.to_owned(),
                String::from_utf8(h.value.unwrap().to_vec()).unwrap(),
            )
        })
        .collect();
    let id = event.id().to_string();
    let time = event.time_rfc3339();
    let expected: BTreeMap<String, String> = [
        ("ce_specversion", "1.0"),
        ("ce_id", id.as_str()),
        ("ce_type", "DonorSecured"),
        ("ce_source", "campaign-finance"),
        ("ce_subject", "donor-42"),
        ("ce_time", time.as_str()),
        ("ce_dataschema", "urn:campaign:donor-secured:v2"),
        ("ce_correlationid", "pledge-drive-7"),
        (
            "ce_traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("ce_tenant", "acme"),
        ("content-type", "application/json"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(headers, expected);
    assert_eq!(
        decode_message(m).unwrap(),
        event,
        "decodes to the same event"
    );
    assert_eq!(dedup_id(m), Some(id));
}

#[tokio::test]
async fn events_of_one_subject_share_a_partition_and_keep_their_order() {
    proclaim_testkit::init_tracing();
    let topic = TestTopic::new().await;
    let publisher = KafkaPublisher::connect(topic.config()).await.unwrap();
    let subjects: Vec<String> = (0..12).map(|i| format!("donor-{i}")).collect();
    for round in 0..3 {
        for subject in &subjects {
            publisher
                .publish(&record(keyed(subject, round)))
                .await
                .unwrap();
        }
    }
    let total = subjects.len() * 3;
    let messages = topic.messages(total, Duration::from_secs(10)).await;
    assert_eq!(messages.len(), total);
    let mut partition_of: BTreeMap<String, i32> = BTreeMap::new();
    for (key, partition) in keys_and_partitions(&messages) {
        let first = *partition_of.entry(key.clone()).or_insert(partition);
        assert_eq!(first, partition, "{key} spans partitions");
    }
    let used: std::collections::BTreeSet<i32> = partition_of.values().copied().collect();
    assert!(
        used.len() > 1,
        "12 keys all hashed to one partition: {used:?}"
    );
    for subject in &subjects {
        let order: Vec<u64> = messages
            .iter()
            .map(|m| decode_message(m).unwrap())
            .filter(|e| e.subject() == subject)
            .map(|e| n_of(&e))
            .collect();
        assert_eq!(order, [0, 1, 2], "order of {subject}");
    }
}

#[tokio::test]
async fn many_concurrent_publishes_are_all_acknowledged() {
    proclaim_testkit::init_tracing();
    let topic = TestTopic::new().await;
    let publisher = KafkaPublisher::connect(topic.config()).await.unwrap();
    let publishes = (0..200_u64).map(|n| {
        let publisher = publisher.clone();
        async move {
            publisher
                .publish(&record(keyed(&format!("k-{n}"), n)))
                .await
        }
    });
    for result in futures::future::join_all(publishes).await {
        result.unwrap();
    }
    let messages = topic.messages(200, Duration::from_secs(10)).await;
    let mut ns: Vec<u64> = messages
        .iter()
        .map(|m| n_of(&decode_message(m).unwrap()))
        .collect();
    ns.sort_unstable();
    assert_eq!(ns, (0..200).collect::<Vec<_>>());
}

#[tokio::test]
async fn an_attribute_that_cannot_name_a_topic_is_a_permanent_error() {
    proclaim_testkit::init_tracing();
    let topic = TestTopic::new().await;
    let config = topic
        .config()
        .with_topic_template(format!("{}.{{subject}}", topic.prefix));
    let publisher = KafkaPublisher::connect(config).await.unwrap();
    let started = Instant::now();
    let event = keyed("donor/42", 1);
    let err = publisher.publish(&record(event.clone())).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        err.to_string(),
        format!(
            "event {} cannot be published: its subject \"donor/42\" cannot be used in a Kafka \
             topic name: it contains a character other than ASCII letters, digits, '.', '_' \
             and '-'",
            event.id()
        )
    );
    let too_long = keyed(&"s".repeat(250), 1);
    let err = publisher.publish(&record(too_long)).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(
        err.to_string().contains("is longer than 249 characters"),
        "{err}"
    );
}

#[tokio::test]
async fn a_missing_topic_is_a_permanent_error() {
    proclaim_testkit::init_tracing();
    let topic = TestTopic::new().await;
    let publisher = KafkaPublisher::connect(topic.config()).await.unwrap();
    let missing = of_type("NobodyListens");
    let started = Instant::now();
    let err = publisher
        .publish(&record(missing.clone()))
        .await
        .unwrap_err();
    tracing::info!(elapsed = ?started.elapsed(), error = %err.full_message(), "missing topic");
    assert!(!err.is_transient(), "{}", err.full_message());
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("{}.NobodyListens", topic.prefix)),
        "{err}"
    );
    // Known missing now: the next one fails at once.
    let started = Instant::now();
    let err = publisher.publish(&record(missing)).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // The topic that exists still works.
    publisher.publish(&record(keyed("k", 1))).await.unwrap();
    assert!(
        !support::topic_exists(&topic.servers, &format!("{}.NobodyListens", topic.prefix)).await
    );
}

#[tokio::test]
async fn a_message_too_large_is_a_permanent_error() {
    proclaim_testkit::init_tracing();
    let topic = TestTopic::new().await;
    let config = topic.config().with_property("message.max.bytes", "10000");
    let publisher = KafkaPublisher::connect(config).await.unwrap();
    let big = Event::builder("DonorSecured")
        .subject("k")
        .data(&serde_json::json!({ "blob": "x".repeat(20_000) }))
        .build()
        .unwrap();
    let err = publisher.publish(&record(big)).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("larger than"), "{err}");
    publisher.publish(&record(keyed("k", 1))).await.unwrap();
}

#[tokio::test]
async fn an_unreachable_broker_fails_fast_and_names_the_servers() {
    proclaim_testkit::init_tracing();
    let addr = free_addr();
    let started = Instant::now();
    let config = KafkaConfig::default()
        .with_bootstrap_servers(format!("kafka://{addr}"))
        .with_connect_timeout(Duration::from_secs(2));
    let err = KafkaPublisher::connect(config.clone()).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
    assert!(matches!(err, KafkaError::Connect { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("cannot connect to Kafka at {addr}: ")),
        "{text}"
    );
    assert!(text.contains("Connection refused"), "{text}");

    // A lazily built publisher reports it through publish and ready().
    let publisher = KafkaPublisher::new(config.with_ack_timeout(Duration::from_secs(1))).unwrap();
    let started = Instant::now();
    let err = publisher.publish(&record(keyed("k", 1))).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    proclaim_testkit::eventually(Duration::from_secs(5), "ready() to fail", || {
        let publisher = publisher.clone();
        async move { publisher.ready().await.is_err() }
    })
    .await;
    let err = publisher.ready().await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_instead_of_hanging() {
    proclaim_testkit::init_tracing();
    let silent = SilentServer::start().await;
    let config = KafkaConfig::default()
        .with_bootstrap_servers(format!("127.0.0.1:{}", silent.port()))
        .with_connect_timeout(Duration::from_millis(800))
        .with_ack_timeout(Duration::from_millis(800));
    let started = Instant::now();
    let err = KafkaPublisher::connect(config.clone()).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(800) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    assert!(
        err.to_string().contains("no broker answered within 800ms"),
        "{err}"
    );

    let publisher = KafkaPublisher::new(config).unwrap();
    let started = Instant::now();
    let err = publisher.publish(&record(keyed("k", 1))).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn every_connection_goes_through_the_proxy() {
    proclaim_testkit::init_tracing();
    // The set-up of the conformance suite's outage cases, checked on its own:
    // were any connection to bypass the proxy, cutting it would not stop
    // publishing.
    let proxy = FaultProxy::start(router()).await.unwrap();
    let broker = PrivateBroker::start(proxy.addr()).await;
    let client_id = format!("proclaim-test-{}", proclaim_testkit::unique_suffix());
    let _route = route(&client_id, broker.addr());
    let topic = TestTopic::on(proxy.addr().to_string(), client_id, false).await;
    let config = topic
        .config()
        .with_ack_timeout(Duration::from_secs(2))
        .with_connect_timeout(Duration::from_secs(2));
    let publisher = KafkaPublisher::connect(config).await.unwrap();
    publisher.publish(&record(keyed("k", 1))).await.unwrap();
    assert!(proxy.active_connections() >= 1);

    proxy.set_mode(FaultMode::Refuse);
    let started = Instant::now();
    let err = publisher.publish(&record(keyed("k", 2))).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.to_string()
            .contains("no acknowledgement from the in-sync replicas within 2s"),
        "{}",
        err.full_message()
    );
    proclaim_testkit::eventually(Duration::from_secs(10), "ready() to fail", || {
        let publisher = publisher.clone();
        async move { publisher.ready().await.is_err() }
    })
    .await;

    proxy.set_mode(FaultMode::Pass);
    proclaim_testkit::eventually(Duration::from_secs(15), "ready() to succeed", || {
        let publisher = publisher.clone();
        async move { publisher.ready().await.is_ok() }
    })
    .await;
    proclaim_testkit::eventually(Duration::from_secs(15), "publishing again", || {
        let publisher = publisher.clone();
        async move { publisher.publish(&record(keyed("k", 3))).await.is_ok() }
    })
    .await;
    let ns: Vec<u64> = topic
        .messages(2, Duration::from_secs(10))
        .await
        .iter()
        .map(|m| n_of(&decode_message(m).unwrap()))
        .collect();
    assert!(ns.contains(&1) && ns.contains(&3), "{ns:?}");
}

#[tokio::test]
async fn a_message_without_cloudevents_headers_is_a_clear_decode_error() {
    proclaim_testkit::init_tracing();
    let topic = TestTopic::new().await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &topic.servers)
        .set("client.id", &topic.client_id)
        .create()
        .unwrap();
    let send = |headers: Option<OwnedHeaders>| {
        let mut record = FutureRecord::<str, [u8]>::to(&topic.name)
            .key("k")
            .payload(b"{}")
            .partition(0);
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        producer.send(record, Duration::from_secs(5))
    };
    send(None).await.unwrap();
    let id = uuid::Uuid::now_v7().to_string();
    let partial = OwnedHeaders::new()
        .insert(Header {
            key: "ce_specversion",
            value: Some("1.0"),
        })
        .insert(Header {
            key: "ce_id",
            value: Some(id.as_str()),
        });
    send(Some(partial)).await.unwrap();

    let messages = topic.messages(2, Duration::from_secs(10)).await;
    assert_eq!(messages.len(), 2);
    let err = decode_message(&messages[0]).unwrap_err();
    assert_eq!(
        err,
        DecodeError::NoHeaders {
            topic: topic.name.clone(),
            partition: 0,
            offset: 0,
        }
    );
    assert_eq!(
        err.to_string(),
        format!(
            "message at {}/0@0 has no headers: it is not a CloudEvent in binary content mode",
            topic.name
        )
    );
    assert_eq!(dedup_id(&messages[0]), None);
    let err = decode_message(&messages[1]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "message at {}/0@1 is not a proclaim event: the message lacks the ce_type attribute",
            topic.name
        )
    );
    assert_eq!(dedup_id(&messages[1]), Some(id));
}

#[tokio::test]
async fn an_invalid_config_is_rejected_before_connecting() {
    proclaim_testkit::init_tracing();
    let config = KafkaConfig::default()
        .with_bootstrap_servers("127.0.0.1:1")
        .with_topic_template("{type}.{kind}");
    let err = KafkaPublisher::connect(config.clone()).await.unwrap_err();
    assert!(matches!(err, KafkaError::Config(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "invalid configuration: topic_template \"{type}.{kind}\" has an unknown placeholder \
         {kind} (known: {type}, {subject}, {source})"
    );
    assert!(matches!(
        KafkaPublisher::new(config),
        Err(KafkaError::Config(_))
    ));
    for (config, expected) in [
        (
            KafkaConfig::default().with_bootstrap_servers("amqp://127.0.0.1:9092"),
            "has the scheme \"amqp\"",
        ),
        (
            KafkaConfig::default().with_property("enable.idempotence", "false"),
            "the publisher relies on the idempotent producer",
        ),
        (
            KafkaConfig::default().with_property("linger.msec", "5"),
            "librdkafka rejects the producer settings",
        ),
        (
            KafkaConfig::default().with_ack_timeout(Duration::ZERO),
            "ack_timeout must be at least 1ms",
        ),
    ] {
        let err = KafkaPublisher::new(config).unwrap_err();
        assert!(matches!(err, KafkaError::Config(_)), "{err:?}");
        assert!(err.to_string().contains(expected), "{err}");
    }
}

#[tokio::test]
async fn test_topics_and_private_brokers_are_removed_even_when_a_test_panics() {
    proclaim_testkit::init_tracing();
    let servers = broker_addr().to_string();
    let topic = TestTopic::new().await;
    let name = topic.name.clone();
    assert!(support::topic_exists(&servers, &name).await);
    drop(topic);
    assert!(
        !support::topic_exists(&servers, &name).await,
        "{name} survived its drop"
    );

    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let topic = TestTopic::new().await;
        tx.send(topic.name.clone()).unwrap();
        panic!("a failing test");
    });
    assert!(task.await.unwrap_err().is_panic());
    let name = rx.await.unwrap();
    assert!(
        !support::topic_exists(&servers, &name).await,
        "{name} survived a panic"
    );

    let broker = PrivateBroker::start(free_addr()).await;
    let addr = broker.addr();
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    drop(broker);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "tansu survived its drop"
    );
}
