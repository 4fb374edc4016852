//! JetStream test streams: each test gets its own stream, deleted when the
//! [`TestStream`] is dropped, even if the test panics.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, stream};
use futures::StreamExt;

/// The NATS server tests use: `PROCLAIM_TEST_NATS_URL`, or the local one.
pub fn nats_url() -> String {
    std::env::var("PROCLAIM_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A JetStream stream of its own for one test: named `T_<suffix>`, capturing
/// `<prefix>.>` with `prefix` = `t<suffix>`, file storage.
pub struct TestStream {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub name: String,
    pub prefix: String,
}

impl TestStream {
    /// Connects and creates a fresh stream.
    pub async fn new() -> Self {
        let suffix = crate::unique_suffix();
        let name = format!("T_{suffix}");
        let prefix = format!("t{suffix}");
        let client = async_nats::connect(nats_url())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to NATS at {}: {e}", nats_url()));
        let js = jetstream::new(client.clone());
        js.create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.>")],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("cannot create test stream {name}: {e}"));
        TestStream {
            client,
            js,
            name,
            prefix,
        }
    }

    /// Number of messages the stream holds now.
    pub async fn count(&self) -> u64 {
        let stream = self.js.get_stream(&self.name).await.unwrap();
        stream.cached_info().state.messages
    }

    /// Every message the stream holds now, in stream order (read by an
    /// ephemeral pull consumer that acknowledges nothing).
    pub async fn messages(&self) -> Vec<jetstream::Message> {
        let stream = self.js.get_stream(&self.name).await.unwrap();
        let consumer = stream
            .create_consumer(pull::Config {
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut out = Vec::new();
        loop {
            let mut batch = consumer.fetch().max_messages(256).messages().await.unwrap();
            let mut got = 0;
            while let Some(message) = batch.next().await {
                out.push(message.unwrap());
                got += 1;
            }
            let pending = consumer.get_info().await.unwrap().num_pending;
            if pending == 0 || got == 0 {
                break;
            }
        }
        let _ = stream.delete_consumer(&consumer.cached_info().name).await;
        out
    }

    /// Waits until the stream holds exactly `n` messages.
    pub async fn wait_for_count(&self, n: u64, deadline: Duration) {
        let what = format!("stream {} to hold {n} messages", self.name);
        crate::eventually(deadline, &what, || async move { self.count().await == n }).await;
    }
}

impl Drop for TestStream {
    /// Deletes the stream from a thread of its own (with its own runtime), so
    /// it works inside any runtime and while a test is panicking.
    fn drop(&mut self) {
        let name = self.name.clone();
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let delete = async {
                    let client = async_nats::connect(nats_url())
                        .await
                        .map_err(|e| e.to_string())?;
                    jetstream::new(client)
                        .delete_stream(&name)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                };
                tokio::time::timeout(Duration::from_secs(10), delete)
                    .await
                    .map_err(|_| "timed out".to_owned())?
            })
        })
        .join();
        match deleted {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(stream = %self.name, "cannot delete test stream: {e}"),
            Err(_) => tracing::warn!(stream = %self.name, "deleting the test stream panicked"),
        }
    }
}
