//! Integration tests against a real MQTT 5 broker (Mosquitto,
//! `PROCLAIM_TEST_MQTT_ADDR`, default `127.0.0.1:1883`). Each test uses
//! topics under a prefix of its own, so tests run in parallel; MQTT keeps
//! nothing for them once their clients disconnect (retain is off). The
//! consumer tests create persistent sessions, then end each one and check
//! that the broker kept nothing for it.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proclaim_core::{Event, Publisher};
use proclaim_mqtt::rumqttc::v5::mqttbytes::QoS;
use proclaim_mqtt::rumqttc::v5::mqttbytes::v5::{Packet, Publish, SubscribeReasonCode};
use proclaim_mqtt::rumqttc::v5::{AsyncClient, Event as MqttEvent, MqttOptions};
use proclaim_mqtt::{ContentMode, MqttConfig, MqttError, MqttPublisher, decode_publish, dedup_id};
use proclaim_testkit::events::{donor_secured, keyed, record};
use proclaim_testkit::net::{SilentServer, free_addr};
use proclaim_testkit::proxy::{FaultMode, FaultProxy};
use proclaim_testkit::{eventually, unique_suffix};

mod conformance;
mod consumer;

/// The broker's address.
pub fn broker_addr() -> SocketAddr {
    let text = std::env::var("PROCLAIM_TEST_MQTT_ADDR").unwrap_or_else(|_| "127.0.0.1:1883".into());
    text.parse()
        .unwrap_or_else(|e| panic!("PROCLAIM_TEST_MQTT_ADDR {text:?} is not <ip>:<port>: {e}"))
}

/// A topic prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("proclaim-test/{}", unique_suffix())
}

/// A subscriber that records, in arrival order, every message on `filter`.
/// It connects to the broker directly and is subscribed when `start`
/// returns, so it sees everything published afterwards.
pub struct Subscriber {
    _client: AsyncClient,
    messages: Arc<Mutex<Vec<Publish>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    pub async fn start(filter: &str, qos: QoS) -> Subscriber {
        proclaim_testkit::init_tracing();
        let addr = broker_addr();
        let id = format!("proclaim-sub-{}", unique_suffix());
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(Some(64 * 1024 * 1024));
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        client.subscribe(filter, qos).await.unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let (subscribed, granted) = tokio::sync::oneshot::channel();
        let sink = messages.clone();
        let filter_name = filter.to_owned();
        let task = tokio::spawn(async move {
            let mut subscribed = Some(subscribed);
            loop {
                match eventloop.poll().await {
                    Ok(MqttEvent::Incoming(Packet::SubAck(ack))) => {
                        if let Some(tx) = subscribed.take() {
                            let _ = tx.send(ack.return_codes);
                        }
                    }
                    Ok(MqttEvent::Incoming(Packet::Publish(p))) => sink.lock().unwrap().push(p),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(filter = %filter_name, error = %e, "test subscriber lost its connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        let codes = tokio::time::timeout(Duration::from_secs(10), granted)
            .await
            .expect("SUBACK within 10 s")
            .unwrap();
        assert_eq!(
            codes,
            vec![SubscribeReasonCode::Success(qos)],
            "subscribe {filter}"
        );
        Subscriber {
            _client: client,
            messages,
            task,
        }
    }

    /// What arrived so far, once at least `n` messages did or `wait` passed.
    pub async fn wait_for(&self, n: usize, wait: Duration) -> Vec<Publish> {
        let deadline = Instant::now() + wait;
        loop {
            let got = self.messages.lock().unwrap().clone();
            if got.len() >= n || Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn config(prefix: &str) -> MqttConfig {
    MqttConfig::default()
        .with_url(format!("mqtt://{}", broker_addr()))
        .with_topic_template(format!("{prefix}/{{type}}"))
}

fn user_property<'a>(message: &'a Publish, name: &str) -> Option<&'a str> {
    message
        .properties
        .as_ref()?
        .user_properties
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn publishes_a_cloudevent_in_binary_mode_and_decodes_it_back() {
    let prefix = unique_prefix();
    let subscriber = Subscriber::start(&format!("{prefix}/#"), QoS::AtLeastOnce).await;
    let publisher = MqttPublisher::connect(config(&prefix)).await.unwrap();
    let event = donor_secured();

    publisher.ready().await.unwrap();
    assert!(publisher.is_connected());
    publisher.publish(&record(event.clone())).await.unwrap();

    let got = subscriber.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    let message = &got[0];
    assert_eq!(
        &message.topic[..],
        format!("{prefix}/DonorSecured").as_bytes()
    );
    assert_eq!(message.qos, QoS::AtLeastOnce);
    assert!(!message.retain);
    assert_eq!(&message.payload[..], event.data().get().as_bytes());
    let properties = message.properties.as_ref().unwrap();
    assert_eq!(properties.content_type.as_deref(), Some("application/json"));
    let id = event.id().to_string();
    let expected = [
        ("specversion", "1.0"),
        ("id", id.as_str()),
        ("type", "DonorSecured"),
        ("source", "campaign-finance"),
        ("subject", "donor-42"),
        ("time", &event.time_rfc3339()),
        ("dataschema", "urn:campaign:donor-secured:v2"),
        ("correlationid", "pledge-drive-7"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("tenant", "acme"),
    ];
    for (name, value) in expected {
        assert_eq!(
            user_property(message, name),
            Some(value),
            "user property {name}"
        );
    }
    assert_eq!(decode_publish(message).unwrap(), event);
    assert_eq!(dedup_id(message), Some(id));
}

#[tokio::test]
async fn qos_2_works_end_to_end() {
    let prefix = unique_prefix();
    let subscriber = Subscriber::start(&format!("{prefix}/#"), QoS::ExactlyOnce).await;
    let publisher = MqttPublisher::connect(config(&prefix).with_qos(2))
        .await
        .unwrap();

    // Two keys concurrently, each in order, as the relay does.
    let lanes = ["k-a", "k-b"].map(|key| {
        let publisher = publisher.clone();
        async move {
            for n in 0..25 {
                publisher.publish(&record(keyed(key, n))).await.unwrap();
            }
        }
    });
    futures::future::join_all(lanes).await;

    let got = subscriber.wait_for(50, Duration::from_secs(10)).await;
    // Wait a little for any extra copy.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got_after = subscriber.wait_for(51, Duration::ZERO).await;
    assert_eq!(got.len(), 50);
    assert_eq!(got_after.len(), 50, "QoS 2 delivers each message once");
    for message in &got {
        assert_eq!(message.qos, QoS::ExactlyOnce);
    }
    for key in ["k-a", "k-b"] {
        let ns: Vec<u64> = got
            .iter()
            .map(|m| decode_publish(m).unwrap())
            .filter(|e| e.subject() == key)
            .map(|e| {
                e.data_as::<serde_json::Value>().unwrap()["n"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ns, (0..25).collect::<Vec<_>>(), "order of {key}");
    }
}

#[tokio::test]
async fn structured_mode_round_trips() {
    let prefix = unique_prefix();
    let subscriber = Subscriber::start(&format!("{prefix}/#"), QoS::AtLeastOnce).await;
    let publisher = MqttPublisher::connect(config(&prefix).with_mode(ContentMode::Structured))
        .await
        .unwrap();
    let event = donor_secured();
    publisher.publish(&record(event.clone())).await.unwrap();

    let got = subscriber.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    let message = &got[0];
    let properties = message.properties.as_ref().unwrap();
    assert_eq!(
        properties.content_type.as_deref(),
        Some("application/cloudevents+json; charset=utf-8")
    );
    assert!(properties.user_properties.is_empty());
    // What an MQTT 3.1.1 consumer sees: the payload alone.
    let json = std::str::from_utf8(&message.payload).unwrap();
    assert_eq!(Event::from_cloudevent_json(json).unwrap(), event);
    let value: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(value["id"], event.id().to_string());
    assert_eq!(value["specversion"], "1.0");
    assert_eq!(decode_publish(message).unwrap(), event);
    assert_eq!(
        decode_publish(message).unwrap().data().get(),
        event.data().get()
    );
    assert_eq!(dedup_id(message), Some(event.id().to_string()));
}

#[tokio::test]
async fn a_topic_that_cannot_be_formed_is_a_permanent_error() {
    let prefix = unique_prefix();
    let subscriber = Subscriber::start(&format!("{prefix}/#"), QoS::AtLeastOnce).await;
    let config = config(&prefix).with_topic_template(format!("{prefix}/{{subject}}"));
    let publisher = MqttPublisher::connect(config).await.unwrap();

    for subject in ["a/+/b", "#", "orders/#", "a+b", "a//b", "/lead", "trail/"] {
        let event = Event::builder("DonorSecured")
            .subject(subject)
            .build()
            .unwrap();
        let started = Instant::now();
        let err = publisher.publish(&record(event.clone())).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(!err.is_transient(), "{subject:?}: {err}");
        let text = err.to_string();
        assert!(text.contains(&event.id().to_string()), "{text}");
        assert!(text.contains(&format!("{subject:?}")), "{text}");
    }
    let err = publisher
        .publish(&record(Event::builder("T").subject("a/+").build().unwrap()))
        .await
        .unwrap_err();
    assert!(
        err.to_string().ends_with(
            "cannot be published: its subject \"a/+\" cannot be used in an MQTT topic: it \
             contains an MQTT wildcard character ('+' or '#')"
        ),
        "{err}"
    );

    // A valid event still goes through, to <prefix>/<subject>, on levels.
    let ok = Event::builder("DonorSecured")
        .subject("donors/42")
        .build()
        .unwrap();
    publisher.publish(&record(ok.clone())).await.unwrap();
    let got = subscriber.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got_after = subscriber.wait_for(2, Duration::ZERO).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got_after.len(), 1, "nothing else was published");
    assert_eq!(&got[0].topic[..], format!("{prefix}/donors/42").as_bytes());
    assert_eq!(decode_publish(&got[0]).unwrap(), ok);
}

#[tokio::test]
async fn an_unreachable_broker_fails_fast_and_names_the_url() {
    let started = Instant::now();
    let config = MqttConfig::default()
        .with_url("mqtt://127.0.0.1:1")
        .with_connect_timeout(Duration::from_secs(2));
    let err = MqttPublisher::connect(config).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, MqttError::Connect { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "cannot connect to MQTT broker at mqtt://127.0.0.1:1: connection refused"
    );
}

#[tokio::test]
async fn credentials_are_hidden_in_connect_errors() {
    let config = MqttConfig::default().with_url("mqtt://relay:s3cret@127.0.0.1:1");
    let err = MqttPublisher::connect(config).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot connect to MQTT broker at mqtt://***@127.0.0.1:1: connection refused"
    );
    assert!(!format!("{err:?}").contains("s3cret"));
}

#[tokio::test]
async fn an_invalid_config_is_rejected_before_connecting() {
    for config in [
        MqttConfig::default().with_qos(0),
        MqttConfig::default().with_topic_template("proclaim/#"),
        MqttConfig::default().with_url("mqtts://127.0.0.1:1"),
        MqttConfig::default().with_keep_alive(Duration::from_secs(1)),
    ] {
        let err = MqttPublisher::connect(config.clone()).await.unwrap_err();
        assert!(matches!(err, MqttError::Config(_)), "{config:?}: {err:?}");
    }
}

#[tokio::test]
async fn a_broker_that_never_answers_times_out_instead_of_hanging() {
    // Accepts TCP connections but never sends CONNACK.
    let silent = SilentServer::start().await;
    let port = silent.port();

    let started = Instant::now();
    let config = MqttConfig::default()
        .with_url(format!("mqtt://127.0.0.1:{port}"))
        .with_connect_timeout(Duration::from_millis(500));
    let err = MqttPublisher::connect(config).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("cannot connect to MQTT broker at mqtt://127.0.0.1:{port}: timed out after 500ms")
    );
}

#[tokio::test]
async fn an_in_flight_publish_fails_as_soon_as_the_connection_drops() {
    let prefix = unique_prefix();
    let subscriber = Subscriber::start(&format!("{prefix}/#"), QoS::AtLeastOnce).await;
    let proxy = FaultProxy::start(broker_addr()).await.unwrap();
    let config = config(&prefix)
        .with_url(format!("mqtt://{}", proxy.addr()))
        .with_connect_timeout(Duration::from_secs(1))
        .with_ack_timeout(Duration::from_secs(30));
    let publisher = MqttPublisher::connect(config).await.unwrap();

    // The PUBLISH is held by the proxy, so no PUBACK comes; then the
    // connection is reset.
    proxy.set_mode(FaultMode::Blackhole);
    let pending = tokio::spawn({
        let publisher = publisher.clone();
        async move {
            let started = Instant::now();
            let result = publisher.publish(&record(keyed("k", 1))).await;
            (result, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set_mode(FaultMode::Refuse);
    let (result, elapsed) = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("the in-flight publish must not wait for the 30 s ack timeout")
        .unwrap();
    let err = result.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(
        err.to_string().contains("was lost before the PUBACK"),
        "{}",
        err.full_message()
    );

    // While the broker is unreachable the publisher says so.
    eventually(Duration::from_secs(5), "ready() reports the outage", || {
        let publisher = publisher.clone();
        async move { publisher.ready().await.is_err() }
    })
    .await;
    let err = publisher.ready().await.unwrap_err();
    assert!(err.is_transient());
    assert!(
        err.to_string()
            .starts_with("not connected to the MQTT broker at mqtt://127.0.0.1:"),
        "{err}"
    );

    // Back: the same publisher delivers again.
    proxy.set_mode(FaultMode::Pass);
    eventually(Duration::from_secs(15), "publishing works again", || {
        let publisher = publisher.clone();
        async move { publisher.publish(&record(keyed("k", 2))).await.is_ok() }
    })
    .await;
    publisher.ready().await.unwrap();
    let got = subscriber.wait_for(1, Duration::from_secs(10)).await;
    assert!(
        got.iter()
            .any(|m| { decode_publish(m).unwrap().data().get() == r#"{"n":2}"# })
    );
}

#[tokio::test]
async fn a_silent_broker_is_detected_and_the_connection_replaced() {
    let prefix = unique_prefix();
    let proxy = FaultProxy::start(broker_addr()).await.unwrap();
    let config = config(&prefix)
        .with_url(format!("mqtt://{}", proxy.addr()))
        .with_connect_timeout(Duration::from_secs(1))
        .with_ack_timeout(Duration::from_secs(1));
    let publisher = MqttPublisher::connect(config).await.unwrap();
    publisher.publish(&record(keyed("k", 1))).await.unwrap();

    proxy.set_mode(FaultMode::Blackhole);
    let started = Instant::now();
    let err = publisher.publish(&record(keyed("k", 2))).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().ends_with("no PUBACK within 1s"), "{err}");
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    // The unacknowledged connection is dropped, so the relay stops claiming.
    eventually(
        Duration::from_secs(5),
        "ready() reports the silent broker",
        || {
            let publisher = publisher.clone();
            async move { publisher.ready().await.is_err() }
        },
    )
    .await;

    proxy.set_mode(FaultMode::Pass);
    eventually(Duration::from_secs(15), "publishing works again", || {
        let publisher = publisher.clone();
        async move { publisher.publish(&record(keyed("k", 3))).await.is_ok() }
    })
    .await;
}

/// A TCP front for the broker that counts connection attempts and, when
/// `refuse` is set, closes new and current connections at once.
struct CountingFront {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    refuse: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingFront {
    async fn start() -> CountingFront {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let refuse = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let accepted = accepted.clone();
            let refuse = refuse.clone();
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    if refuse.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let refuse = refuse.clone();
                    tokio::spawn(async move {
                        let Ok(mut upstream) = tokio::net::TcpStream::connect(broker_addr()).await
                        else {
                            return;
                        };
                        let watch_refuse = async {
                            while !refuse.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                            () = watch_refuse => {}
                        }
                    });
                }
            }
        });
        CountingFront {
            addr,
            accepted,
            refuse,
            task,
        }
    }
}

impl Drop for CountingFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn reconnecting_backs_off_instead_of_spinning() {
    let front = CountingFront::start().await;
    let config = config(&unique_prefix())
        .with_url(format!("mqtt://{}", front.addr))
        .with_connect_timeout(Duration::from_secs(1));
    let publisher = MqttPublisher::connect(config).await.unwrap();
    assert_eq!(front.accepted.load(Ordering::SeqCst), 1);

    front.refuse.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Backoff 100 ms, 200 ms, 400 ms, 800 ms, 1.6 s: about five attempts.
    let attempts = front.accepted.load(Ordering::SeqCst) - 1;
    assert!(
        (2..=8).contains(&attempts),
        "{attempts} reconnection attempts in 3 s"
    );
    assert!(publisher.ready().await.is_err());

    front.refuse.store(false, Ordering::SeqCst);
    eventually(Duration::from_secs(10), "reconnected", || {
        let publisher = publisher.clone();
        async move { publisher.ready().await.is_ok() }
    })
    .await;
    publisher.publish(&record(keyed("k", 1))).await.unwrap();
}

/// A Mosquitto of its own, with a small maximum packet size.
struct SmallBroker {
    child: tokio::process::Child,
    port: u16,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl SmallBroker {
    async fn start(max_packet_size: u32) -> SmallBroker {
        let port = free_addr().port();
        let dir = std::env::temp_dir().join(format!("proclaim-mqtt-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_packet_size {max_packet_size}\nlog_dest none\n"
            ),
        )
        .unwrap();
        let child = tokio::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start mosquitto");
        eventually(
            Duration::from_secs(10),
            "mosquitto listens",
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
        SmallBroker {
            child,
            port,
            _dir: TempDir(dir),
        }
    }
}

impl Drop for SmallBroker {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test]
async fn a_message_larger_than_the_brokers_maximum_packet_size_is_a_permanent_error() {
    let broker = SmallBroker::start(2048).await;
    let config = MqttConfig::default()
        .with_url(format!("mqtt://127.0.0.1:{}", broker.port))
        .with_topic_template("big/{type}");
    let publisher = MqttPublisher::connect(config).await.unwrap();
    let blob = "x".repeat(4096);
    let event = Event::builder("DonorSecured")
        .subject("donor-42")
        .data(&serde_json::json!({ "blob": blob }))
        .build()
        .unwrap();
    let err = publisher.publish(&record(event.clone())).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains(&event.id().to_string()), "{err}");
    assert!(
        err.to_string()
            .contains("is larger than the broker's maximum packet size of 2048 bytes"),
        "{err}"
    );
    // The connection is unharmed: a small event still goes through.
    publisher.publish(&record(keyed("k", 1))).await.unwrap();
    publisher.ready().await.unwrap();
}

/// Many publishes in flight while the connection is reset again and again:
/// a publish that returned `Ok` must have reached the broker (no
/// acknowledgement is ever matched to the wrong publish), none may hang, and
/// per-key order of first arrival holds.
async fn resets_never_yield_a_false_ack(qos: u8) {
    proclaim_testkit::init_tracing();
    let prefix = unique_prefix();
    let sub_qos = if qos == 2 {
        QoS::ExactlyOnce
    } else {
        QoS::AtLeastOnce
    };
    let subscriber = Subscriber::start(&format!("{prefix}/#"), sub_qos).await;
    let proxy = Arc::new(FaultProxy::start(broker_addr()).await.unwrap());
    let config = config(&prefix)
        .with_url(format!("mqtt://{}", proxy.addr()))
        .with_qos(qos)
        .with_max_inflight(16)
        .with_connect_timeout(Duration::from_secs(2))
        .with_ack_timeout(Duration::from_secs(3));
    let publisher = MqttPublisher::connect(config).await.unwrap();

    // Publishing goes on for as long as the resets do.
    let chaos_done = Arc::new(AtomicBool::new(false));
    let chaos = tokio::spawn({
        let proxy = proxy.clone();
        let chaos_done = chaos_done.clone();
        async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                proxy.reset_all();
            }
            chaos_done.store(true, Ordering::SeqCst);
        }
    });
    let keys: Vec<String> = (0..8).map(|i| format!("k-{i}")).collect();
    let failures = Arc::new(AtomicUsize::new(0));
    let lanes = keys.iter().map(|key| {
        let publisher = publisher.clone();
        let chaos_done = chaos_done.clone();
        let failures = failures.clone();
        async move {
            let mut acked = Vec::new();
            let mut n = 0;
            while n < 10 || !chaos_done.load(Ordering::SeqCst) {
                let event = keyed(key, n);
                loop {
                    // publish() waits at most connect_timeout + ack_timeout.
                    let attempt = tokio::time::timeout(
                        Duration::from_secs(10),
                        publisher.publish(&record(event.clone())),
                    )
                    .await
                    .expect("a publish hung");
                    match attempt {
                        Ok(()) => break,
                        Err(e) => {
                            assert!(e.is_transient(), "{e}");
                            failures.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                acked.push(event.id());
                n += 1;
            }
            (key.clone(), acked)
        }
    });
    let per_lane: Vec<(String, Vec<uuid::Uuid>)> = futures::future::join_all(lanes).await;
    chaos.await.unwrap();
    let acked: Vec<uuid::Uuid> = per_lane.iter().flat_map(|(_, ids)| ids.clone()).collect();
    // Some publishes were in flight when a connection was reset.
    assert!(
        failures.load(Ordering::SeqCst) > 0,
        "no publish met a reset"
    );

    let expected = acked.len();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = std::collections::HashSet::new();
    let mut got = Vec::new();
    while Instant::now() < deadline {
        got = subscriber
            .wait_for(expected, Duration::from_millis(200))
            .await;
        seen = got
            .iter()
            .map(|m| decode_publish(m).unwrap().id())
            .collect();
        if acked.iter().all(|id| seen.contains(id)) {
            break;
        }
    }
    let missing: Vec<_> = acked.iter().filter(|id| !seen.contains(id)).collect();
    assert!(missing.is_empty(), "acked but never delivered: {missing:?}");
    for (key, ids) in &per_lane {
        let count = u64::try_from(ids.len()).unwrap();
        let mut first_seen: Vec<u64> = Vec::new();
        for m in &got {
            let e = decode_publish(m).unwrap();
            if e.subject() == key {
                let n = e.data_as::<serde_json::Value>().unwrap()["n"]
                    .as_u64()
                    .unwrap();
                if !first_seen.contains(&n) {
                    first_seen.push(n);
                }
            }
        }
        assert_eq!(
            first_seen,
            (0..count).collect::<Vec<_>>(),
            "first arrivals of {key}"
        );
    }
    tracing::info!(
        delivered = got.len(),
        acked = expected,
        failures = failures.load(Ordering::SeqCst),
        "duplicates after resets: {}",
        got.len() - expected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_never_yield_a_false_ack_qos_1() {
    resets_never_yield_a_false_ack(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_never_yield_a_false_ack_qos_2() {
    resets_never_yield_a_false_ack(2).await;
}
