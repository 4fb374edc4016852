//! The two services that hear about donors: each has its own durable
//! JetStream consumer, so each receives every `DonorSecured` event.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::anyhow;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::stream::Stream;
use futures::StreamExt;
use proclaim::nats::decode_message;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::donors::Donor;

/// What one consumer has seen so far.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Distinct event ids.
    pub(crate) event_ids: HashSet<Uuid>,
    /// Deliveries of an event id already seen.
    pub(crate) duplicates: u64,
    /// Donors heard about.
    pub(crate) donor_ids: HashSet<i64>,
    /// Sum of the amounts (kept by the fundraising-strategy service).
    pub(crate) total_cents: i64,
}

/// What a service does with each new donor.
pub(crate) type Handler = fn(&Donor, &mut Tally);

/// Volunteer Thank-You: thanks every donor.
pub(crate) fn thank_donor(donor: &Donor, _: &mut Tally) {
    tracing::info!(
        consumer = "volunteer-thank-you",
        donor = donor.id,
        "thank you, {}",
        donor.name
    );
}

/// Fundraising Strategy: keeps the running total.
pub(crate) fn add_to_total(donor: &Donor, tally: &mut Tally) {
    tally.total_cents += donor.amount_cents;
}

/// A running consumer.
pub(crate) struct Consumer {
    pub(crate) name: &'static str,
    tally: Arc<Mutex<Tally>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Consumer {
    /// Creates the durable consumer `name` and hands each new donor to
    /// `handle`, on a task, until `stop` is cancelled.
    pub(crate) async fn start(
        stream: &Stream,
        name: &'static str,
        handle: Handler,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        let config = pull::Config {
            durable_name: Some(name.into()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            filter_subject: "campaign.DonorSecured".into(),
            ..Default::default()
        };
        let consumer = stream.get_or_create_consumer(name, config).await?;
        let mut messages = consumer.messages().await?;
        let tally = Arc::new(Mutex::new(Tally::default()));
        let shared = tally.clone();
        let task = tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    next = messages.next() => match next {
                        Some(message) => message?,
                        None => return Ok(()),
                    },
                };
                let event = decode_message(&message)?;
                let donor: Donor = event.data_as()?;
                let mut tally = shared.lock().await;
                if tally.event_ids.insert(event.id()) {
                    tally.donor_ids.insert(donor.id);
                    handle(&donor, &mut tally);
                } else {
                    tally.duplicates += 1;
                    tracing::warn!(consumer = name, event = %event.id(), "duplicate delivery");
                }
                drop(tally);
                // Acknowledge only once the event is handled: a crash before
                // this line means JetStream delivers the message again.
                message
                    .ack()
                    .await
                    .map_err(|e| anyhow!("{name}: ack failed: {e}"))?;
            }
        });
        Ok(Consumer { name, tally, task })
    }

    /// Distinct events received so far.
    pub(crate) async fn distinct(&self) -> usize {
        self.tally.lock().await.event_ids.len()
    }

    /// Waits for the task to end (after `stop` was cancelled).
    pub(crate) async fn join(self) -> anyhow::Result<Tally> {
        self.task.await??;
        let tally = std::mem::take(&mut *self.tally.lock().await);
        Ok(tally)
    }
}
