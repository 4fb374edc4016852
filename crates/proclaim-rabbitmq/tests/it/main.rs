//! Integration tests against a real RabbitMQ (`PROCLAIM_TEST_AMQP_ADDR`,
//! default `127.0.0.1:5672`, guest/guest). Each test uses its own exchange
//! and queue, deleted at the end even if the test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod conformance;
mod consumer;
mod support;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ExchangeDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, ExchangeKind};
use proclaim_core::{Event, Publisher};
use proclaim_rabbitmq::{DecodeError, RabbitConfig, RabbitError, RabbitPublisher, decode_delivery};
use proclaim_testkit::events::{donor_secured, keyed, of_type, record};
use proclaim_testkit::net::SilentServer;
use proclaim_testkit::proxy::{FaultMode, FaultProxy};
use support::{TestQueue, amqp_url, broker_addr, exchange_exists, url_via};

fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

fn short(value: &Option<ShortString>) -> Option<&str> {
    value.as_ref().map(ShortString::as_str)
}

#[tokio::test]
async fn publishes_a_cloudevent_and_decodes_it_back() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let publisher = RabbitPublisher::connect(tq.config()).await.unwrap();
    let event = donor_secured();
    publisher.ready().await.unwrap();
    assert!(publisher.is_connected().await);
    publisher.publish(&record(event.clone())).await.unwrap();

    let messages = tq.messages().await;
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m.delivery.exchange.as_str(), tq.exchange);
    assert_eq!(m.delivery.routing_key.as_str(), "DonorSecured");
    assert_eq!(m.delivery.data, event.data().get().as_bytes());
    let p = &m.delivery.properties;
    let id = event.id().to_string();
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    assert_eq!(short(p.message_id()), Some(id.as_str()));
    assert_eq!(short(p.kind()), Some("DonorSecured"));
    assert_eq!(short(p.content_type()), Some("application/json"));
    assert_eq!(short(p.correlation_id()), Some("pledge-drive-7"));
    assert_eq!(
        *p.timestamp(),
        Some(u64::try_from(event.time().timestamp()).unwrap())
    );
    let expected = [
        ("cloudEvents:specversion", "1.0"),
        ("cloudEvents:id", id.as_str()),
        ("cloudEvents:type", "DonorSecured"),
        ("cloudEvents:source", "campaign-finance"),
        ("cloudEvents:subject", "donor-42"),
        ("cloudEvents:time", &event.time_rfc3339()),
        ("cloudEvents:dataschema", "urn:campaign:donor-secured:v2"),
        ("cloudEvents:correlationid", "pledge-drive-7"),
        (
            "cloudEvents:traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("cloudEvents:tenant", "acme"),
    ];
    for (name, value) in expected {
        assert_eq!(
            header(p, name),
            Some(&AMQPValue::LongString(LongString::from(value))),
            "header {name}"
        );
    }
    assert_eq!(p.headers().as_ref().unwrap().inner().len(), expected.len());
    assert_eq!(decode_delivery(m).unwrap(), event);
}

#[tokio::test]
async fn the_routing_key_follows_the_template() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::with(
        ExchangeKind::Topic,
        &["campaign-finance.DonorSecured.*"],
        FieldTable::default(),
    )
    .await;
    let config = tq
        .config()
        .with_routing_key_template("{source}.{type}.{subject}");
    let publisher = RabbitPublisher::connect(config).await.unwrap();
    publisher.publish(&record(donor_secured())).await.unwrap();
    let messages = tq.messages().await;
    assert_eq!(messages.len(), 1);
    assert_eq!(
        messages[0].delivery.routing_key.as_str(),
        "campaign-finance.DonorSecured.donor-42"
    );

    // A subject that makes the routing key longer than AMQP allows can never
    // be published: a permanent error, before anything is sent.
    let long = Event::builder("DonorSecured")
        .subject("s".repeat(300))
        .source("campaign-finance")
        .build()
        .unwrap();
    let err = publisher.publish(&record(long.clone())).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "event {} cannot be published: its routing key would be 330 bytes long, more than \
             AMQP allows (255 bytes)",
            long.id()
        )
    );
    assert_eq!(tq.count().await, 1);
}

#[tokio::test]
async fn an_unroutable_event_is_a_permanent_error_naming_key_and_exchange() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let publisher = RabbitPublisher::connect(tq.config()).await.unwrap();
    let event = of_type("NobodyListens");
    let err = publisher.publish(&record(event.clone())).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot publish event {} to exchange {:?} with routing key \"NobodyListens\": no \
             queue is bound for routing key \"NobodyListens\" on exchange {:?} (the broker \
             returned it: 312 NO_ROUTE)",
            event.id(),
            tq.exchange,
            tq.exchange
        )
    );
    // The channel stays usable: a routable event right after goes through.
    publisher.publish(&record(donor_secured())).await.unwrap();
    assert_eq!(tq.count().await, 1);
}

#[tokio::test]
async fn the_default_exchange_routes_by_queue_name() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let config = tq
        .config()
        .with_exchange("")
        .with_routing_key_template(tq.queue.as_str());
    let publisher = RabbitPublisher::connect(config).await.unwrap();
    publisher.publish(&record(donor_secured())).await.unwrap();
    assert_eq!(tq.count().await, 1);

    let config = tq
        .config()
        .with_exchange("")
        .with_routing_key_template("{type}");
    let publisher = RabbitPublisher::connect(config).await.unwrap();
    let err = publisher
        .publish(&record(donor_secured()))
        .await
        .unwrap_err();
    assert!(!err.is_transient());
    assert!(
        err.to_string().contains(
            "no queue is named \"DonorSecured\" (the default exchange routes by queue name)"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_credentials_give_a_clear_error_without_the_password() {
    proclaim_testkit::init_tracing();
    let config = RabbitConfig::default()
        .with_url(format!(
            "amqp://guest:not-the-password@{}/%2f",
            broker_addr()
        ))
        .with_exchange("amq.topic");
    let started = Instant::now();
    let err = RabbitPublisher::connect(config).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err, RabbitError::Connect { .. }), "{err:?}");
    let text = err.to_string();
    assert!(!text.contains("not-the-password"), "{text}");
    assert!(
        text.starts_with(&format!(
            "cannot connect to RabbitMQ at amqp://***@{}/%2f: ",
            broker_addr()
        )),
        "{text}"
    );
    assert!(text.contains("ACCESS_REFUSED"), "{text}");
    tracing::info!(%text, "wrong credentials");
    assert!(!format!("{err:?}").contains("not-the-password"), "{err:?}");
}

#[tokio::test]
async fn an_unknown_virtual_host_is_a_clear_error() {
    proclaim_testkit::init_tracing();
    let config = RabbitConfig::default()
        .with_url(format!(
            "amqp://guest:guest@{}/no-such-vhost",
            broker_addr()
        ))
        .with_exchange("amq.topic");
    let err = RabbitPublisher::connect(config).await.unwrap_err();
    let text = err.to_string();
    tracing::info!(%text, "unknown virtual host");
    assert!(text.contains("no-such-vhost"), "{text}");
    assert!(!text.contains("guest:guest"), "{text}");
}

#[tokio::test]
async fn an_unreachable_broker_fails_fast_and_names_the_url() {
    proclaim_testkit::init_tracing();
    let started = Instant::now();
    let config = RabbitConfig::default()
        .with_url("amqp://relay:s3cret@127.0.0.1:1/%2f")
        .with_connect_timeout(Duration::from_secs(2));
    let err = RabbitPublisher::connect(config).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, RabbitError::Connect { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "cannot connect to RabbitMQ at amqp://***@127.0.0.1:1/%2f: connection refused"
    );
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_instead_of_hanging() {
    proclaim_testkit::init_tracing();
    // Accepts TCP connections but never answers the AMQP protocol header.
    let mut silent = SilentServer::start().await;
    let port = silent.port();

    let started = Instant::now();
    let config = RabbitConfig::default()
        .with_url(format!("amqp://127.0.0.1:{port}/%2f"))
        .with_connect_timeout(Duration::from_millis(500));
    let err = RabbitPublisher::connect(config.clone()).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("cannot connect to RabbitMQ at amqp://127.0.0.1:{port}/%2f: timed out after 500ms")
    );
    // The abandoned attempt's socket is closed, not left to linger.
    assert!(
        silent
            .wait_for_close(Duration::from_secs(2))
            .await
            .is_some(),
        "the abandoned connection was not closed"
    );

    // A lazily built publisher reports the same through ready() and publish.
    let publisher = RabbitPublisher::new(config).unwrap();
    assert!(!publisher.is_connected().await);
    let started = Instant::now();
    let err = publisher.ready().await.unwrap_err();
    assert!(err.is_transient());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(err.to_string().ends_with("timed out after 500ms"), "{err}");
}

#[tokio::test]
async fn a_missing_exchange_is_an_error_unless_declare_exchange_is_set() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let name = format!("{}_declared", tq.exchange);
    let config = tq.config().with_exchange(&name);

    let err = RabbitPublisher::connect(config.clone()).await.unwrap_err();
    assert!(
        matches!(err, RabbitError::ExchangeMissing { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "RabbitMQ exchange {name:?} does not exist at amqp://***@{}/%2f (declare it, \
             or set declare_exchange)",
            broker_addr()
        )
    );

    let declared = config
        .clone()
        .with_declare_exchange(true)
        .with_exchange_kind("direct");
    let publisher = RabbitPublisher::connect(declared.clone()).await.unwrap();
    assert!(exchange_exists(&name).await);
    // Declaring again is a no-op; declaring it with another type is an error.
    RabbitPublisher::connect(declared.clone()).await.unwrap();
    let err = RabbitPublisher::connect(declared.with_exchange_kind("fanout"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RabbitError::Exchange {
                action: "declare",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("inequivalent arg 'type'"), "{err}");
    // Nothing is bound to the new exchange: events are returned, not lost.
    let err = publisher
        .publish(&record(donor_secured()))
        .await
        .unwrap_err();
    assert!(!err.is_transient());

    tq.channel
        .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn an_exchange_deleted_under_a_running_publisher_is_a_transient_error() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let publisher = RabbitPublisher::connect(tq.config()).await.unwrap();
    publisher.publish(&record(keyed("k", 1))).await.unwrap();
    tq.channel
        .exchange_delete(
            tq.exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    let err = publisher.publish(&record(keyed("k", 2))).await.unwrap_err();
    assert!(err.is_transient(), "{}", err.full_message());
    assert!(err.to_string().contains("the exchange is missing"), "{err}");
    assert!(err.to_string().contains("no exchange"), "{err}");
    // Still so on the next try (a new channel, same connection).
    let err = publisher.publish(&record(keyed("k", 2))).await.unwrap_err();
    assert!(err.is_transient(), "{}", err.full_message());

    // With declare_exchange, the publisher declares it again: the next
    // publish reaches the exchange, which has lost its binding, so the
    // event comes back unroutable.
    let config = tq.config().with_declare_exchange(true);
    let declaring = RabbitPublisher::connect(config).await.unwrap();
    tq.channel
        .exchange_delete(
            tq.exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    let err = declaring.publish(&record(keyed("k", 3))).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    let err = declaring.publish(&record(keyed("k", 3))).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("no queue is bound"), "{err}");
    assert_eq!(tq.count().await, 1);
}

#[tokio::test]
async fn a_nack_is_a_transient_error() {
    proclaim_testkit::init_tracing();
    // A queue that holds one message and refuses more: the broker nacks.
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(1));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let tq = TestQueue::with(ExchangeKind::Topic, &["DonorSecured"], arguments).await;
    let publisher = RabbitPublisher::connect(tq.config()).await.unwrap();
    publisher.publish(&record(keyed("k", 1))).await.unwrap();
    let err = publisher.publish(&record(keyed("k", 2))).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(
        err.to_string()
            .ends_with("the broker nacked the message (it could not take it now)"),
        "{err}"
    );
    assert_eq!(tq.count().await, 1);
}

#[tokio::test]
async fn many_concurrent_publishes_share_few_channels() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let publisher = RabbitPublisher::connect(tq.config().with_max_channels(3))
        .await
        .unwrap();
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
    assert_eq!(tq.count().await, 200);
    let mut ns: Vec<u64> = tq
        .messages()
        .await
        .iter()
        .map(|m| {
            decode_delivery(m)
                .unwrap()
                .data_as::<serde_json::Value>()
                .unwrap()["n"]
                .as_u64()
                .unwrap()
        })
        .collect();
    ns.sort_unstable();
    assert_eq!(ns, (0..200).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_reset_connection_is_made_anew_by_the_next_publish() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let proxy = FaultProxy::start(broker_addr()).await.unwrap();
    let config = tq
        .config()
        .with_url(url_via(proxy.addr()))
        .with_connect_timeout(Duration::from_secs(2))
        .with_confirm_timeout(Duration::from_secs(2));
    let publisher = RabbitPublisher::connect(config).await.unwrap();
    publisher.publish(&record(keyed("k", 1))).await.unwrap();

    for round in 0..3 {
        proxy.reset_all();
        // Until lapin notices the reset, a publish may fail: transiently.
        proclaim_testkit::eventually(Duration::from_secs(10), "publishing again", || {
            let publisher = publisher.clone();
            async move {
                match publisher.publish(&record(keyed("k", 2 + round))).await {
                    Ok(()) => true,
                    Err(e) => {
                        assert!(e.is_transient(), "{e}");
                        false
                    }
                }
            }
        })
        .await;
        assert!(publisher.is_connected().await);
    }
    tq.wait_for(4, Duration::from_secs(5)).await;
    assert!(tq.count().await >= 4);
    // A publisher whose broker stays down says so through ready(), quickly.
    proxy.set_mode(FaultMode::Refuse);
    let started = Instant::now();
    proclaim_testkit::eventually(Duration::from_secs(10), "ready() to fail", || {
        let publisher = publisher.clone();
        async move { publisher.ready().await.is_err() }
    })
    .await;
    let err = publisher.ready().await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    proxy.set_mode(FaultMode::Pass);
    proclaim_testkit::eventually(Duration::from_secs(10), "ready() to succeed", || {
        let publisher = publisher.clone();
        async move { publisher.ready().await.is_ok() }
    })
    .await;
}

#[tokio::test]
async fn a_message_without_cloudevents_attributes_is_a_clear_decode_error() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let (channel, exchange) = (&tq.channel, tq.exchange.as_str());
    let publish = |properties: BasicProperties| async move {
        channel
            .basic_publish(
                exchange.into(),
                "DonorSecured".into(),
                BasicPublishOptions::default(),
                b"{}",
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    };
    publish(BasicProperties::default()).await;
    let mut partial = FieldTable::default();
    partial.insert(
        "cloudEvents:specversion".into(),
        AMQPValue::LongString("1.0".into()),
    );
    partial.insert(
        "cloudEvents:id".into(),
        AMQPValue::LongString(uuid::Uuid::now_v7().to_string().into()),
    );
    publish(BasicProperties::default().with_headers(partial)).await;
    tq.wait_for(2, Duration::from_secs(5)).await;

    let messages = tq.messages().await;
    assert_eq!(messages.len(), 2);
    let err = decode_delivery(&messages[0]).unwrap_err();
    assert_eq!(
        err,
        DecodeError::NoHeaders {
            routing_key: "DonorSecured".into()
        }
    );
    assert_eq!(
        err.to_string(),
        "message with routing key \"DonorSecured\" has no headers: it is not a CloudEvent in \
         binary content mode"
    );
    let err = decode_delivery(&messages[1]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "message with routing key \"DonorSecured\" is not a proclaim event: the message lacks \
         the cloudEvents:type attribute"
    );
}

#[tokio::test]
async fn an_invalid_config_is_rejected_before_connecting() {
    proclaim_testkit::init_tracing();
    let config = RabbitConfig::default()
        .with_url("amqp://127.0.0.1:1/%2f")
        .with_routing_key_template("{type}.{kind}");
    let err = RabbitPublisher::connect(config.clone()).await.unwrap_err();
    assert!(matches!(err, RabbitError::Config(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "invalid configuration: routing_key_template \"{type}.{kind}\" has an unknown \
         placeholder {kind} (known: {type}, {subject}, {source})"
    );
    assert!(matches!(
        RabbitPublisher::new(config),
        Err(RabbitError::Config(_))
    ));
    let err =
        RabbitPublisher::new(RabbitConfig::default().with_url("amqp://user:s3cret@")).unwrap_err();
    assert!(!err.to_string().contains("s3cret"), "{err}");
}

#[tokio::test]
async fn a_lazy_publisher_connects_on_first_use() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let publisher = RabbitPublisher::new(tq.config()).unwrap();
    assert!(!publisher.is_connected().await);
    publisher.publish(&record(donor_secured())).await.unwrap();
    assert!(publisher.is_connected().await);
    publisher.ready().await.unwrap();
    assert_eq!(tq.count().await, 1);
    assert_eq!(amqp_url(), url_via(broker_addr()));
}

#[tokio::test]
async fn test_queues_are_deleted_even_when_a_test_panics() {
    proclaim_testkit::init_tracing();
    let tq = TestQueue::new().await;
    let (exchange, queue) = (tq.exchange.clone(), tq.queue.clone());
    drop(tq);
    assert!(
        !exchange_exists(&exchange).await,
        "{exchange} survived its drop"
    );
    assert!(
        !support::queue_exists(&queue).await,
        "{queue} survived its drop"
    );

    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let tq = TestQueue::new().await;
        tx.send((tq.exchange.clone(), tq.queue.clone())).unwrap();
        panic!("a failing test");
    });
    assert!(task.await.unwrap_err().is_panic());
    let (exchange, queue) = rx.await.unwrap();
    assert!(
        !exchange_exists(&exchange).await,
        "{exchange} survived a panic"
    );
    assert!(
        !support::queue_exists(&queue).await,
        "{queue} survived a panic"
    );
}
