//! A publisher decorator for tests: wraps a real publisher, records every
//! call, detects concurrent publishes of one event, and can inject failures
//! or delays for chosen events.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use proclaim_core::{OutboxRecord, PublishError, Publisher};
use uuid::Uuid;

type FailFn = Box<dyn Fn(&OutboxRecord) -> Option<PublishError> + Send + Sync>;

pub struct Instrumented<P> {
    inner: P,
    fail: Option<FailFn>,
    delay: Duration,
    in_flight: Mutex<HashSet<Uuid>>,
    calls: Mutex<HashMap<Uuid, u32>>,
    overlaps: AtomicU64,
}

impl<P: Publisher> Instrumented<P> {
    pub fn new(inner: P) -> Self {
        Instrumented {
            inner,
            fail: None,
            delay: Duration::ZERO,
            in_flight: Mutex::new(HashSet::new()),
            calls: Mutex::new(HashMap::new()),
            overlaps: AtomicU64::new(0),
        }
    }

    /// Fails the events for which `f` returns an error, instead of publishing them.
    pub fn failing(
        mut self,
        f: impl Fn(&OutboxRecord) -> Option<PublishError> + Send + Sync + 'static,
    ) -> Self {
        self.fail = Some(Box::new(f));
        self
    }

    /// Waits this long before each publish.
    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Times one event was published while another publish of it was in flight.
    pub fn overlaps(&self) -> u64 {
        self.overlaps.load(Ordering::SeqCst)
    }

    /// Publish calls per event id.
    pub fn calls(&self) -> HashMap<Uuid, u32> {
        self.calls.lock().unwrap().clone()
    }

    pub fn total_calls(&self) -> u64 {
        self.calls
            .lock()
            .unwrap()
            .values()
            .map(|n| u64::from(*n))
            .sum()
    }
}

impl<P: Publisher> Publisher for Instrumented<P> {
    async fn publish(&self, record: &OutboxRecord) -> Result<(), PublishError> {
        let id = record.event.id();
        *self.calls.lock().unwrap().entry(id).or_default() += 1;
        if !self.in_flight.lock().unwrap().insert(id) {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        let result = async {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            if let Some(err) = self.fail.as_ref().and_then(|f| f(record)) {
                return Err(err);
            }
            self.inner.publish(record).await
        }
        .await;
        self.in_flight.lock().unwrap().remove(&id);
        result
    }

    async fn ready(&self) -> Result<(), PublishError> {
        self.inner.ready().await
    }
}
