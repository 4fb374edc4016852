//! Publishers that need no broker: an in-process bus for single-process
//! applications, and a JSON-lines writer for piping events into other tools.
//!
//! A [`Subscription`] of the bus is also a consumer [`Source`], so a
//! [`Consumer`](crate::consumer::Consumer) can read it with typed handlers,
//! per-subject order, retries and parking.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::consumer::{Acker, Incoming, Source, SourceError};
use crate::{Event, OutboxRecord, PublishError, Publisher};

/// An in-process publish/subscribe bus with the outbox's durability.
///
/// Each [`Subscription`] receives every event (of the types it asked for),
/// and [`Publisher::publish`] returns `Ok` only once **every** matching
/// subscription has [acknowledged](Delivery::ack) it. Until then the event
/// stays in the outbox: if the process dies, the relay delivers it again after
/// the restart, so subscribers see each event at least once (handle them
/// idempotently). With no matching subscriber, publishing fails transiently and
/// the event waits in the outbox.
///
/// ```
/// use proclaim_core::local::InProcessBus;
///
/// let bus = InProcessBus::new();
/// let mut thank_you = bus.subscribe("volunteer-thank-you", ["DonorSecured"]);
/// # let _ = &mut thank_you;
/// // Hand `bus.clone()` to a `Relay` as its publisher, then:
/// // while let Some(delivery) = thank_you.next().await { …; delivery.ack(); }
/// // or hand `thank_you` to a `proclaim_core::consumer::Consumer` as its source.
/// ```
#[derive(Clone, Default)]
pub struct InProcessBus {
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
    ack_timeout: Option<Duration>,
}

struct Subscriber {
    name: String,
    types: Option<Vec<String>>,
    sender: mpsc::Sender<Delivery>,
}

impl Subscriber {
    fn wants(&self, event_type: &str) -> bool {
        self.types
            .as_ref()
            .is_none_or(|types| types.iter().any(|t| t == event_type))
    }
}

/// Events for one subscriber; see [`InProcessBus::subscribe`]. Read them
/// with [`Subscription::next`], or hand the subscription to a
/// [`Consumer`](crate::consumer::Consumer) as its [`Source`].
pub struct Subscription {
    name: String,
    receiver: mpsc::Receiver<Delivery>,
}

/// One event handed to a subscriber. Call [`ack`](Delivery::ack) once it has
/// been handled; dropping it unacknowledged makes the publish fail, so the
/// relay retries it later ([`nack`](Delivery::nack) also says when).
#[derive(Debug)]
pub struct Delivery {
    /// The event.
    pub event: Event,
    /// Delivery attempts of the event so far, counting this one.
    pub attempt: u32,
    ack: oneshot::Sender<Reply>,
}

/// A subscriber's answer to one delivery.
#[derive(Debug)]
enum Reply {
    Ack,
    /// Deliver again, not before this delay.
    Nack(Duration),
}

impl Delivery {
    /// Confirms the event was handled.
    pub fn ack(self) {
        let _ = self.ack.send(Reply::Ack);
    }

    /// Refuses the event for now: the publish fails transiently asking the
    /// relay to wait at least `delay` (its `Retry-After`), and the relay
    /// delivers it again.
    ///
    /// ```
    /// # async fn demo(mut sub: proclaim_core::local::Subscription) {
    /// if let Some(delivery) = sub.next().await {
    ///     delivery.nack(std::time::Duration::from_secs(5)); // not now
    /// }
    /// # }
    /// ```
    pub fn nack(self, delay: Duration) {
        let _ = self.ack.send(Reply::Nack(delay));
    }
}

/// Settles a [`Delivery`] for the consumer runtime.
struct DeliveryAcker(oneshot::Sender<Reply>);

impl Acker for DeliveryAcker {
    async fn ack(self) -> Result<(), SourceError> {
        // A publisher that stopped waiting (its timeout, or the bus is
        // gone) retries the event on its side: nothing to report here.
        let _ = self.0.send(Reply::Ack);
        Ok(())
    }

    async fn nack(self, delay: Duration) -> Result<(), SourceError> {
        let _ = self.0.send(Reply::Nack(delay));
        Ok(())
    }
}

/// Each [`Delivery`] becomes an [`Incoming`] whose delivery attempt is the
/// relay's attempt count; `None` once the bus is gone.
///
/// ```no_run
/// use proclaim_core::CancellationToken;
/// use proclaim_core::consumer::{Consumer, Context};
/// use proclaim_core::local::InProcessBus;
/// # async fn demo(bus: InProcessBus, parked: impl proclaim_core::inbox::ParkedEvents)
/// # -> Result<(), proclaim_core::ConfigError> {
/// let subscription = bus.subscribe("audit", Vec::<String>::new());
/// let report = Consumer::new("audit")
///     .on_event("*", |cx: Context<()>| async move {
///         tracing::info!(id = %cx.event.id(), "audited");
///         Ok(())
///     })
///     .park_into(parked)
///     .run(subscription, CancellationToken::new())
///     .await?;
/// # let _ = report;
/// # Ok(()) }
/// ```
impl Source for Subscription {
    async fn receive(&mut self) -> Option<Result<Incoming, SourceError>> {
        let Delivery {
            event,
            attempt,
            ack,
        } = self.next().await?;
        Some(Ok(
            Incoming::new(event, DeliveryAcker(ack)).with_delivery_attempt(attempt)
        ))
    }
}

impl Subscription {
    /// The next event, or `None` once the bus is gone.
    pub async fn next(&mut self) -> Option<Delivery> {
        self.receiver.recv().await
    }

    /// The subscriber's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Debug for InProcessBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .subscribers
            .lock()
            .map(|s| s.iter().map(|s| s.name.clone()).collect())
            .unwrap_or_default();
        f.debug_struct("InProcessBus")
            .field("subscribers", &names)
            .finish()
    }
}

impl InProcessBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fails a publish whose subscribers have not all acknowledged within
    /// `timeout` (default: wait as long as the relay's publish timeout allows).
    pub fn with_ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = Some(timeout);
        self
    }

    /// Subscribes `name` to events of the given types (an empty list: all
    /// types). Up to 1,024 deliveries wait in its queue.
    pub fn subscribe<I, T>(&self, name: impl Into<String>, types: I) -> Subscription
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        let name = name.into();
        let types: Vec<String> = types.into_iter().map(Into::into).collect();
        let (sender, receiver) = mpsc::channel(1024);
        if let Ok(mut subscribers) = self.subscribers.lock() {
            subscribers.push(Subscriber {
                name: name.clone(),
                types: (!types.is_empty()).then_some(types),
                sender,
            });
        }
        Subscription { name, receiver }
    }

    fn matching(&self, event_type: &str) -> Vec<(String, mpsc::Sender<Delivery>)> {
        match self.subscribers.lock() {
            Ok(mut subscribers) => {
                subscribers.retain(|s| !s.sender.is_closed());
                subscribers
                    .iter()
                    .filter(|s| s.wants(event_type))
                    .map(|s| (s.name.clone(), s.sender.clone()))
                    .collect()
            }
            Err(_) => Vec::new(),
        }
    }
}

impl Publisher for InProcessBus {
    async fn publish(&self, record: &OutboxRecord) -> Result<(), PublishError> {
        let targets = self.matching(record.event.event_type());
        if targets.is_empty() {
            return Err(PublishError::transient(format!(
                "no in-process subscriber for {}",
                record.event.event_type()
            )));
        }
        let mut acks = Vec::with_capacity(targets.len());
        for (name, sender) in targets {
            let (ack, acked) = oneshot::channel();
            let delivery = Delivery {
                event: record.event.clone(),
                attempt: record.attempts,
                ack,
            };
            sender
                .send(delivery)
                .await
                .map_err(|_| PublishError::transient(format!("subscriber {name} is gone")))?;
            acks.push((name, acked));
        }
        for (name, acked) in acks {
            let wait = async {
                match acked.await {
                    Ok(Reply::Ack) => Ok(()),
                    Ok(Reply::Nack(delay)) => Err(PublishError::transient(format!(
                        "subscriber {name} asked for the event again later"
                    ))
                    .with_retry_after(delay)),
                    Err(_) => Err(PublishError::transient(format!(
                        "subscriber {name} dropped the event without acknowledging it"
                    ))),
                }
            };
            match self.ack_timeout {
                Some(t) => tokio::time::timeout(t, wait).await.map_err(|_| {
                    PublishError::transient(format!(
                        "subscriber {name} did not acknowledge within {t:?}"
                    ))
                })??,
                None => wait.await?,
            }
        }
        Ok(())
    }
}

/// Writes each event as one line of CloudEvents structured JSON, e.g. to
/// stdout for `jq` or another tool. A publish is acknowledged once the line is
/// written and flushed.
///
/// ```
/// use proclaim_core::local::JsonLinesPublisher;
///
/// let to_stdout = JsonLinesPublisher::new(tokio::io::stdout());
/// # let _ = to_stdout;
/// ```
pub struct JsonLinesPublisher<W> {
    writer: tokio::sync::Mutex<W>,
}

impl<W: AsyncWrite + Unpin + Send + 'static> JsonLinesPublisher<W> {
    /// Writes to `writer`.
    pub fn new(writer: W) -> Self {
        JsonLinesPublisher {
            writer: tokio::sync::Mutex::new(writer),
        }
    }

    /// Gives the writer back.
    pub fn into_inner(self) -> W {
        self.writer.into_inner()
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> Publisher for JsonLinesPublisher<W> {
    async fn publish(&self, record: &OutboxRecord) -> Result<(), PublishError> {
        let mut line = record.event.to_cloudevent_json();
        line.push('\n');
        let mut writer = self.writer.lock().await;
        let written = async {
            writer.write_all(line.as_bytes()).await?;
            writer.flush().await
        };
        written
            .await
            .map_err(|e| PublishError::transient("writing the event failed").with_source(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(event_type: &str, n: u64) -> OutboxRecord {
        OutboxRecord {
            sequence: n as i64,
            event: Event::builder(event_type)
                .subject("k")
                .data(&n)
                .build()
                .unwrap(),
            attempts: 1,
            created_at: chrono::Utc::now(),
        }
    }

    #[tokio::test]
    async fn publish_completes_only_when_every_subscriber_acks() {
        let bus = InProcessBus::new();
        let mut a = bus.subscribe("a", ["DonorSecured"]);
        let mut b = bus.subscribe("b", Vec::<String>::new());
        let mut other = bus.subscribe("other", ["PolicyRatified"]);
        let publish = tokio::spawn({
            let bus = bus.clone();
            async move { bus.publish(&record("DonorSecured", 1)).await }
        });
        let from_a = a.next().await.unwrap();
        assert_eq!(from_a.event.event_type(), "DonorSecured");
        from_a.ack();
        assert!(!publish.is_finished(), "b has not acknowledged yet");
        b.next().await.unwrap().ack();
        publish.await.unwrap().unwrap();
        assert!(
            other.receiver.try_recv().is_err(),
            "other types are not delivered"
        );
    }

    #[tokio::test]
    async fn no_subscriber_or_no_ack_keeps_the_event_in_the_outbox() {
        let bus = InProcessBus::new();
        let err = bus.publish(&record("DonorSecured", 1)).await.unwrap_err();
        assert!(err.is_transient());
        assert!(
            err.to_string().contains("no in-process subscriber"),
            "{err}"
        );

        let mut sub = bus.subscribe("careless", Vec::<String>::new());
        let publish = tokio::spawn({
            let bus = bus.clone();
            async move { bus.publish(&record("DonorSecured", 2)).await }
        });
        drop(sub.next().await.unwrap()); // dropped without ack
        let err = publish.await.unwrap().unwrap_err();
        assert!(err.is_transient());

        drop(sub);
        let err = bus.publish(&record("DonorSecured", 3)).await.unwrap_err();
        assert!(
            err.to_string().contains("no in-process subscriber"),
            "a dropped subscription unsubscribes: {err}"
        );
    }

    #[tokio::test]
    async fn a_nack_fails_the_publish_asking_for_the_subscribers_delay() {
        let bus = InProcessBus::new();
        let mut sub = bus.subscribe("later", Vec::<String>::new());
        let publish = tokio::spawn({
            let bus = bus.clone();
            async move { bus.publish(&record("T", 1)).await }
        });
        sub.next().await.unwrap().nack(Duration::from_secs(7));
        let err = publish.await.unwrap().unwrap_err();
        assert!(err.is_transient());
        assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
        assert!(err.to_string().contains("again later"), "{err}");
    }

    #[tokio::test]
    async fn ack_timeout_bounds_a_stuck_subscriber() {
        let bus = InProcessBus::new().with_ack_timeout(Duration::from_millis(50));
        let mut sub = bus.subscribe("slow", Vec::<String>::new());
        let publish = tokio::spawn({
            let bus = bus.clone();
            async move { bus.publish(&record("T", 1)).await }
        });
        let _held = sub.next().await.unwrap();
        let err = publish.await.unwrap().unwrap_err();
        assert!(
            err.to_string().contains("did not acknowledge within 50ms"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn json_lines_are_structured_cloudevents() {
        let publisher = JsonLinesPublisher::new(Vec::new());
        publisher.publish(&record("DonorSecured", 7)).await.unwrap();
        publisher.publish(&record("DonorSecured", 8)).await.unwrap();
        let out = String::from_utf8(publisher.into_inner()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        let back = Event::from_cloudevent_json(lines[1]).unwrap();
        assert_eq!(back.data().get(), "8");
        assert!(lines[0].contains(r#""specversion":"1.0""#));
    }
}
