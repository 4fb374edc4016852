//! The resources of one scenario: its database (a PostgreSQL schema, a
//! SQLite file or a MariaDB / MySQL database, see [`crate::db`]) and its
//! JetStream streams, created at the start and removed at the end.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use async_nats::HeaderMap;
use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::{self, stream};
use proclaim::nats::NatsConfig;
use proclaim::{CancellationToken, Event};

use crate::Common;
use crate::db::{Db, PgDb, SCHEMA_PREFIX, StoreKind};

/// Prefix of every stream the benchmarks create.
pub(crate) const STREAM_PREFIX: &str = "BENCH_";
/// Duplicate window of the streams: the same as `NatsConfig`'s default.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// One scenario's database and streams, and the connections that manage them.
pub(crate) struct Env {
    pub(crate) nats_url: String,
    /// Client for baselines, consumers and stream checks (not used by the relay).
    pub(crate) nats: async_nats::Client,
    pub(crate) js: jetstream::Context,
    /// The scenario's database.
    pub(crate) db: Db,
    streams: Streams,
}

/// The streams of one scenario on one NATS server: created with unique
/// names, registered before they exist, and deleted by [`Streams::cleanup`].
pub(crate) struct Streams {
    js: jetstream::Context,
    suffix: String,
    names: Mutex<Vec<String>>,
}

/// A JetStream stream of the scenario (file storage), capturing `<prefix>.>`.
#[derive(Clone)]
pub(crate) struct BenchStream {
    pub(crate) name: String,
    pub(crate) prefix: String,
    stream: stream::Stream,
}

impl Env {
    /// Connects to NATS and creates the scenario's database on `store`.
    pub(crate) async fn new(
        scenario: &str,
        common: &Common,
        store: StoreKind,
    ) -> anyhow::Result<Self> {
        let suffix = unique_suffix(scenario);
        let nats = async_nats::connect(&common.nats_url)
            .await
            .with_context(|| format!("cannot connect to NATS at {}", common.nats_url))?;
        let js = jetstream::new(nats.clone());
        // Last, so that nothing is left to remove when an earlier step fails.
        let db = Db::create(store, common, &suffix).await?;
        Ok(Env {
            nats_url: common.nats_url.clone(),
            nats,
            streams: Streams::new(js.clone(), &suffix),
            js,
            db,
        })
    }

    /// The scenario's PostgreSQL schema, for scenarios that only run on PostgreSQL.
    pub(crate) fn postgres(&self) -> anyhow::Result<&PgDb> {
        match &self.db {
            Db::Postgres(pg) => Ok(pg),
            _ => bail!("this scenario runs on PostgreSQL only"),
        }
    }

    /// Creates the stream `BENCH_<SUFFIX>_<ROLE>` (file storage, the
    /// publisher's default duplicate window), deleted by [`Env::cleanup`].
    pub(crate) async fn create_stream(&self, role: &str) -> anyhow::Result<BenchStream> {
        self.streams.create(role, -1).await
    }

    /// Like [`Env::create_stream`], but the stream keeps only the newest
    /// `max_messages` messages (for long runs; count with
    /// [`BenchStream::delivered`]).
    pub(crate) async fn create_capped_stream(
        &self,
        role: &str,
        max_messages: i64,
    ) -> anyhow::Result<BenchStream> {
        self.streams.create(role, max_messages).await
    }

    /// Deletes the streams and removes the database; tries everything, then
    /// reports what failed.
    pub(crate) async fn cleanup(&self) -> anyhow::Result<()> {
        let mut failures = self.streams.cleanup().await;
        if let Err(failure) = self.db.cleanup().await {
            failures.push(failure);
        }
        if !failures.is_empty() {
            bail!("could not remove {}", failures.join("; "));
        }
        Ok(())
    }
}

impl crate::Scratch for Env {
    async fn cleanup(&self) -> anyhow::Result<()> {
        Env::cleanup(self).await
    }
}

impl Streams {
    /// No streams yet, on the server of `js`; names are made from `suffix`.
    pub(crate) fn new(js: jetstream::Context, suffix: &str) -> Self {
        Streams {
            js,
            suffix: suffix.to_owned(),
            names: Mutex::new(Vec::new()),
        }
    }

    /// Creates the stream `BENCH_<SUFFIX>_<ROLE>` capturing
    /// `bench_<suffix>_<role>.>` (file storage, the publisher's default
    /// duplicate window), keeping the newest `max_messages` messages (-1: all).
    pub(crate) async fn create(
        &self,
        role: &str,
        max_messages: i64,
    ) -> anyhow::Result<BenchStream> {
        let name = format!("{STREAM_PREFIX}{}_{}", self.suffix, role).to_uppercase();
        let prefix = format!("{SCHEMA_PREFIX}{}_{}", self.suffix, role).to_lowercase();
        // Registered before it exists, so a half-done creation is cleaned up too.
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.clone());
        let stream = self
            .js
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![format!("{prefix}.>")],
                storage: stream::StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                max_messages,
                ..Default::default()
            })
            .await
            .with_context(|| format!("cannot create stream {name}"))?;
        Ok(BenchStream {
            name,
            prefix,
            stream,
        })
    }

    /// Deletes one stream now (rather than at [`Streams::cleanup`]).
    pub(crate) async fn delete(&self, stream: &BenchStream) -> anyhow::Result<()> {
        if let Some(failure) = self.delete_named(&stream.name).await {
            bail!("could not remove {failure}");
        }
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name| *name != stream.name);
        Ok(())
    }

    /// Deletes every stream still registered; returns what failed.
    pub(crate) async fn cleanup(&self) -> Vec<String> {
        let names = std::mem::take(&mut *self.names.lock().unwrap_or_else(|e| e.into_inner()));
        let mut failures = Vec::new();
        for name in names {
            failures.extend(self.delete_named(&name).await);
        }
        failures
    }

    /// Deletes the stream `name` (gone already is fine); `Some` says why not.
    async fn delete_named(&self, name: &str) -> Option<String> {
        let deleted =
            tokio::time::timeout(Duration::from_secs(30), self.js.delete_stream(name)).await;
        match deleted {
            Ok(Ok(_)) => None,
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    jetstream::context::DeleteStreamErrorKind::JetStream(ref js)
                        if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                None
            }
            Ok(Err(e)) => Some(format!("stream {name}: {e}")),
            Err(_) => Some(format!("stream {name}: timed out")),
        }
    }
}

impl BenchStream {
    /// Messages the stream holds now.
    pub(crate) async fn count(&self) -> anyhow::Result<u64> {
        Ok(self.state().await?.messages)
    }

    /// Messages ever stored (the stream's last sequence): unlike
    /// [`BenchStream::count`], not capped by the stream's limit.
    pub(crate) async fn delivered(&self) -> anyhow::Result<u64> {
        Ok(self.state().await?.last_sequence)
    }

    async fn state(&self) -> anyhow::Result<stream::State> {
        let info = self
            .stream
            .get_info()
            .await
            .with_context(|| format!("stream info of {}", self.name))?;
        Ok(info.state)
    }

    /// Removes every message (between runs; not timed).
    pub(crate) async fn purge(&self) -> anyhow::Result<()> {
        self.stream
            .purge()
            .await
            .with_context(|| format!("purging stream {}", self.name))?;
        Ok(())
    }

    /// The configuration of a `NatsPublisher` on this stream.
    pub(crate) fn nats_config(&self, url: &str) -> NatsConfig {
        self.configure(NatsConfig::default().with_url(url))
    }

    /// `config` publishing to this stream: its stream, subject prefix and
    /// duplicate window set, `create_stream` off; the rest kept.
    pub(crate) fn configure(&self, config: NatsConfig) -> NatsConfig {
        config
            .with_stream(&self.name)
            .with_subject_prefix(&self.prefix)
            .with_duplicate_window(DUPLICATE_WINDOW)
            .with_create_stream(false)
    }

    /// The subject the relay publishes `event` to (`{prefix}.{type}`, the
    /// publisher's default template).
    pub(crate) fn subject(&self, event: &Event) -> String {
        format!("{}.{}", self.prefix, event.event_type())
    }
}

/// A name part unique to this run of the tool: `<scenario>_<pid>_<time>`.
pub(crate) fn unique_suffix(scenario: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{scenario}_{}_{:x}", std::process::id(), nanos % (1 << 40))
}

/// The headers the bare baselines send: the same names and values as the
/// NATS publisher sends (`Nats-Msg-Id` and the CloudEvents attributes).
pub(crate) fn bare_headers(event: &Event) -> HeaderMap {
    let id = event.id().to_string();
    let mut headers = HeaderMap::new();
    headers.insert(NATS_MESSAGE_ID, id.as_str());
    headers.insert("ce-specversion", proclaim::SPEC_VERSION);
    headers.insert("ce-id", id.as_str());
    headers.insert("ce-type", event.event_type());
    headers.insert("ce-source", event.source());
    headers.insert("ce-subject", event.subject());
    headers.insert("ce-time", event.time_rfc3339().as_str());
    headers.insert("content-type", event.datacontenttype());
    headers
}

/// `n` `DonorSecured` events over `subjects` subjects, with ~100 bytes of JSON data.
pub(crate) fn donor_events(n: usize, subjects: usize) -> anyhow::Result<Vec<Event>> {
    (0..n).map(|i| donor_event(i, subjects)).collect()
}

/// Event number `i` of [`donor_events`].
pub(crate) fn donor_event(i: usize, subjects: usize) -> anyhow::Result<Event> {
    let donor = i % subjects.max(1);
    let data = serde_json::json!({
        "donor_id": donor,
        "campaign": "spring-pledge-drive",
        "amount_cents": 250_000 + (i % 9_973),
        "currency": "EUR",
        "n": i,
    });
    Ok(Event::builder("DonorSecured")
        .subject(format!("donor-{donor}"))
        .source("campaign-finance")
        .data(&data)
        .build()?)
}

/// Stops relays when dropped, so a scenario task that is aborted (Ctrl-C)
/// or fails stops its relays before the schema is dropped under them.
pub(crate) struct StopOnDrop(Vec<CancellationToken>);

impl StopOnDrop {
    pub(crate) fn new(tokens: impl IntoIterator<Item = CancellationToken>) -> Self {
        StopOnDrop(tokens.into_iter().collect())
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        for token in &self.0 {
            token.cancel();
        }
    }
}
