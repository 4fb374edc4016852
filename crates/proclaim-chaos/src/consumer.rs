//! The consumer: reads the stream and records what arrived, in order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::ChaosError;
use crate::scenario::lock;

/// Reads every message of the stream in stream order and records its event id.
pub(crate) async fn consume(
    js: jetstream::Context,
    stream: String,
    received: Arc<Mutex<Vec<Uuid>>>,
    stop: CancellationToken,
) -> Result<(), ChaosError> {
    let broker = |e: &dyn std::fmt::Display| ChaosError::Broker(format!("consumer: {e}"));
    let stream = js.get_stream(&stream).await.map_err(|e| broker(&e))?;
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ack_policy: jetstream::consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .map_err(|e| broker(&e))?;
    let mut messages = consumer.messages().await.map_err(|e| broker(&e))?;
    loop {
        let next = tokio::select! {
            m = messages.next() => m,
            () = stop.cancelled() => return Ok(()),
        };
        match next {
            Some(Ok(message)) => match proclaim_nats::decode_message(&message) {
                Ok(event) => lock(&received).push(event.id()),
                Err(e) => tracing::warn!(error = %e, "undecodable message"),
            },
            Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
            None => return Err(broker(&"the message stream ended")),
        }
    }
}
