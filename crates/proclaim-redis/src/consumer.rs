//! [`RedisStreamSource`]: reads Redis streams through a consumer group, as
//! a [`Source`] for the consumer runtime
//! ([`proclaim_core::consumer::Consumer`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use proclaim_core::ConfigError;
use proclaim_core::consumer::{Acker, Incoming, Source, SourceError};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};
use redis::{ErrorKind, FromRedisValue, Value};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::scrub;
use crate::{RedisConfig, RedisError, decode_entry};

/// Reconnection attempts a connection makes, after the first, each time it
/// is lost; the consumer backs off between receives by itself.
const RECONNECT_RETRIES: usize = 1;
/// Most entry ids in one `XCLAIM` (keep-alive) or `XPENDING` pipeline.
const ID_BATCH: usize = 256;
/// Shortest pause between keep-alive rounds.
const MIN_KEEP_ALIVE: Duration = Duration::from_millis(10);

/// Where a new consumer group starts reading its streams.
///
/// ```
/// use proclaim_redis::GroupStart;
///
/// assert_eq!(GroupStart::default(), GroupStart::Beginning);
/// assert_eq!(GroupStart::End.as_id(), "$");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupStart {
    /// `0`: every entry the stream holds (default), so nothing appended
    /// before the group existed is missed.
    #[default]
    Beginning,
    /// `$`: only entries appended after the group was created.
    End,
}

impl GroupStart {
    /// The id `XGROUP CREATE` is given: `0` or `$`.
    pub fn as_id(self) -> &'static str {
        match self {
            GroupStart::Beginning => "0",
            GroupStart::End => "$",
        }
    }
}

/// Settings of a [`RedisStreamSource`].
///
/// ```
/// use std::time::Duration;
/// use proclaim_redis::{GroupStart, RedisSourceConfig};
///
/// let config = RedisSourceConfig::new("campaign:events", "thank-you-notes", "worker-1")
///     .with_url("redis://redis.internal:6379")
///     .with_start(GroupStart::End)
///     .with_claim_idle(Duration::from_secs(120));
/// assert!(config.validate().is_ok());
/// assert!(RedisSourceConfig::new("s", "", "c").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSourceConfig {
    /// Server URL (default `redis://127.0.0.1:6379`), as
    /// [`RedisConfig::url`]; credentials are hidden in every message.
    pub url: String,
    /// The stream keys to read (default `proclaim:events`, the publisher's
    /// default stream). Each is created empty if it does not exist.
    pub streams: Vec<String>,
    /// The consumer group (required): every group gets every entry; the
    /// consumers of one group share them. Usually the consumer's name.
    pub group: String,
    /// This consumer's name within the group (required), e.g. the host
    /// name: a restarted process with the same name gets its own pending
    /// entries back at once.
    pub consumer: String,
    /// Where a group this source creates starts (default
    /// [`GroupStart::Beginning`]). An existing group keeps its position.
    pub start: GroupStart,
    /// Longest wait of one `XREADGROUP … BLOCK` for new entries (default
    /// 2 s); the source then checks for entries to reclaim and reads again.
    #[serde(with = "proclaim_core::duration::human")]
    pub block: Duration,
    /// Most entries one read takes from each stream (default 64).
    pub count: usize,
    /// Entries of the group pending for longer than this are taken over
    /// with `XAUTOCLAIM` and delivered again (default 60 s). It is also the
    /// delay of a nack. Entries this source holds are kept fresh, so this
    /// needs to exceed only the time a live process may lose Redis for.
    #[serde(with = "proclaim_core::duration::human")]
    pub claim_idle: Duration,
    /// Upper bound of one connection attempt (default 5 s).
    #[serde(with = "proclaim_core::duration::human")]
    pub connect_timeout: Duration,
    /// Upper bound of waiting for one answer, beyond the block time of a
    /// read (default 10 s).
    #[serde(with = "proclaim_core::duration::human")]
    pub response_timeout: Duration,
}

impl Default for RedisSourceConfig {
    fn default() -> Self {
        let base = RedisConfig::default();
        RedisSourceConfig {
            url: base.url,
            streams: vec![base.stream],
            group: String::new(),
            consumer: String::new(),
            start: GroupStart::default(),
            block: Duration::from_secs(2),
            count: 64,
            claim_idle: Duration::from_secs(60),
            connect_timeout: base.connect_timeout,
            response_timeout: base.response_timeout,
        }
    }
}

impl RedisSourceConfig {
    /// Reads `stream` as `consumer` of `group`, with the other settings at
    /// their defaults.
    pub fn new(
        stream: impl Into<String>,
        group: impl Into<String>,
        consumer: impl Into<String>,
    ) -> Self {
        RedisSourceConfig {
            streams: vec![stream.into()],
            group: group.into(),
            consumer: consumer.into(),
            ..RedisSourceConfig::default()
        }
    }

    /// Sets [`RedisSourceConfig::url`].
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }
    /// Sets [`RedisSourceConfig::streams`].
    pub fn with_streams<S: Into<String>>(mut self, streams: impl IntoIterator<Item = S>) -> Self {
        self.streams = streams.into_iter().map(Into::into).collect();
        self
    }
    /// Sets [`RedisSourceConfig::group`].
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }
    /// Sets [`RedisSourceConfig::consumer`].
    pub fn with_consumer(mut self, consumer: impl Into<String>) -> Self {
        self.consumer = consumer.into();
        self
    }
    /// Sets [`RedisSourceConfig::start`].
    pub fn with_start(mut self, start: GroupStart) -> Self {
        self.start = start;
        self
    }
    /// Sets [`RedisSourceConfig::block`].
    pub fn with_block(mut self, block: Duration) -> Self {
        self.block = block;
        self
    }
    /// Sets [`RedisSourceConfig::count`].
    pub fn with_count(mut self, count: usize) -> Self {
        self.count = count;
        self
    }
    /// Sets [`RedisSourceConfig::claim_idle`].
    pub fn with_claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }
    /// Sets [`RedisSourceConfig::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
    /// Sets [`RedisSourceConfig::response_timeout`].
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Checks every setting: a Redis URL the client accepts, at least one
    /// stream and no empty or repeated one, a group and a consumer name,
    /// `count` between 1 and 10,000, and durations of at least a
    /// millisecond.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        self.client()?;
        if self.streams.is_empty() {
            return err("a Redis stream source needs at least one stream".into());
        }
        let mut seen = HashSet::new();
        for stream in &self.streams {
            if stream.is_empty() {
                return err("a stream key is empty".into());
            }
            if !seen.insert(stream) {
                return err(format!("the stream {stream:?} is listed twice"));
            }
        }
        if self.group.trim().is_empty() {
            return err("a Redis stream source needs a consumer group (group)".into());
        }
        if self.consumer.trim().is_empty() {
            return err("a Redis stream source needs a consumer name (consumer)".into());
        }
        if !(1..=10_000).contains(&self.count) {
            return err(format!(
                "count must be between 1 and 10000, not {}",
                self.count
            ));
        }
        for (name, value) in [
            ("block", self.block),
            ("claim_idle", self.claim_idle),
            ("connect_timeout", self.connect_timeout),
            ("response_timeout", self.response_timeout),
        ] {
            if value < Duration::from_millis(1) {
                return err(format!("{name} must be at least 1 ms"));
            }
        }
        Ok(())
    }

    /// [`RedisSourceConfig::url`] with credentials replaced by `***`.
    pub fn redacted_url(&self) -> String {
        self.as_redis_config().redacted_url()
    }

    fn as_redis_config(&self) -> RedisConfig {
        RedisConfig::default()
            .with_url(self.url.clone())
            .with_connect_timeout(self.connect_timeout)
            .with_response_timeout(self.response_timeout)
    }

    fn client(&self) -> Result<redis::Client, ConfigError> {
        self.as_redis_config().client()
    }
}

/// Reads Redis streams through a consumer group, for
/// [`Consumer::run`](proclaim_core::consumer::Consumer::run) and
/// [`Consumer::spawn`](proclaim_core::consumer::Consumer::spawn).
///
/// # How it reads
///
/// The source joins a consumer group ([`RedisSourceConfig::group`], created
/// with `XGROUP CREATE … MKSTREAM` on every stream if it does not exist) as
/// one named consumer ([`RedisSourceConfig::consumer`]). Each receive takes,
/// in this order:
///
/// 1. once, at start: the entries already pending for this consumer name
///    (`XREADGROUP … 0`), i.e. what a previous run under the same name read
///    and never acknowledged;
/// 2. on start and then every half [`RedisSourceConfig::claim_idle`]: the
///    group's entries idle for longer than `claim_idle`, taken over with
///    `XAUTOCLAIM` — the pending entries of a consumer that crashed, or that
///    this one handed back;
/// 3. new entries, `XREADGROUP … BLOCK <block> COUNT <count> … >`.
///
/// Every entry is decoded with [`decode_entry`]; one that does not decode is
/// handed to the consumer as undecodable, with its stream, id and fields as
/// JSON bytes (`{"stream":…,"id":…,"fields":{…}}`; a value that is not
/// UTF-8 is written `{"hex":"…"}`), and the consumer parks it.
///
/// # Settling
///
/// - **ack** is `XACK`: the entry leaves the group's pending entries list.
/// - **nack** leaves the entry pending: Redis has no negative acknowledgement
///   and no delayed redelivery. The entry is delivered again once it has been
///   idle for `claim_idle` (by `XAUTOCLAIM`, to this consumer or another one
///   of the group), or at once to the next run under the same consumer name.
///   The delay the consumer asks for is therefore ignored; the redelivery
///   comes after `claim_idle`.
/// - An acker dropped without either behaves as a nack.
///
/// While this source holds an entry (received, not yet settled), it resets
/// the entry's idle time every third of `claim_idle` (`XCLAIM … JUSTID`,
/// which leaves the delivery count alone), so a slow handling, or a message
/// waiting behind a retrying one, is not taken over by another consumer of
/// the group. Keep `claim_idle` well above the time a healthy process may be
/// unable to reach Redis.
///
/// # Delivery count
///
/// New entries are delivery 1; an entry read again from the pending list or
/// taken over with `XAUTOCLAIM` carries Redis's delivery count (`XPENDING`),
/// which the consumer shows handlers as
/// [`Context::delivery_attempt`](proclaim_core::consumer::Context).
///
/// # Order
///
/// Within one stream, new entries arrive in stream order, so the runtime
/// keeps each subject's order. Redelivered entries (taken over or read again
/// from the pending list) come when they are reclaimed, possibly after later
/// entries of their subject; the inbox makes a duplicate harmless but cannot
/// restore the order of a first handling. Several streams are read together
/// with no order between them.
///
/// # Failures
///
/// A lost connection, a timeout or an error reply is a [`SourceError`]; the
/// consumer backs off and receives again, and the connection is made anew
/// by itself. A consumer group that vanished (a Redis restart without
/// persistence) is created again on the next receive.
///
/// # Example
///
/// ```no_run
/// use proclaim_core::consumer::{Consumer, Context, HandlerError};
/// use proclaim_redis::{RedisSourceConfig, RedisStreamSource};
///
/// # async fn demo(parked: impl proclaim_core::inbox::ParkedEvents) -> Result<(), Box<dyn std::error::Error>> {
/// let config = RedisSourceConfig::new("campaign:events", "thank-you-notes", "worker-1")
///     .with_url("redis://127.0.0.1:6379");
/// let source = RedisStreamSource::connect(config).await?;
/// let handle = Consumer::new("thank-you-notes")
///     .on_event("DonorSecured", |cx: Context<()>| async move {
///         // Open the inbox transaction, write the note, commit.
///         tracing::info!(id = %cx.event.id(), "thank you!");
///         Ok::<_, HandlerError>(())
///     })
///     .park_into(parked)
///     .spawn(source)?;
/// // … on SIGTERM:
/// let report = handle.shutdown().await;
/// # let _ = report;
/// # Ok(()) }
/// ```
pub struct RedisStreamSource {
    shared: Arc<Shared>,
    /// The connection of the blocking reads (a blocked connection would
    /// hold up acks sent on it).
    reader: ConnectionManager,
    /// Entries read but not yet handed out.
    buffer: VecDeque<Incoming>,
    /// Per stream: where the next read of this consumer's own pending
    /// entries starts; `None` once they are all read.
    history: Vec<Option<String>>,
    /// Per stream: the `XAUTOCLAIM` cursor.
    claim_cursors: Vec<String>,
    /// When the next reclaim round is due.
    next_claim: Instant,
    /// False until the groups are known to exist (again).
    groups_ready: bool,
    keep_alive: tokio::task::AbortHandle,
}

impl std::fmt::Debug for RedisStreamSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamSource")
            .field("url", &self.shared.url)
            .field("streams", &self.shared.config.streams)
            .field("group", &self.shared.config.group)
            .field("consumer", &self.shared.config.consumer)
            .field("buffered", &self.buffer.len())
            .finish_non_exhaustive()
    }
}

/// What the source, its ackers and its keep-alive task share.
struct Shared {
    config: RedisSourceConfig,
    /// The URL, credentials hidden.
    url: String,
    client: redis::Client,
    reader_config: ConnectionManagerConfig,
    control_config: ConnectionManagerConfig,
    /// The connection of everything but the blocking reads, and its
    /// generation (bumped when it is replaced).
    control: Mutex<(u64, ConnectionManager)>,
    /// Entries read and not settled yet: (stream index, entry id).
    held: Mutex<HashSet<(usize, String)>>,
}

/// Why one call failed.
enum CallError {
    TimedOut(Duration),
    Redis(redis::RedisError),
}

impl CallError {
    fn is_no_group(&self) -> bool {
        matches!(self, CallError::Redis(e) if e.code() == Some("NOGROUP"))
    }

    fn describe(&self, url: &str, secret_source: &str) -> String {
        match self {
            CallError::TimedOut(bound) => format!("no answer from Redis at {url} within {bound:?}"),
            CallError::Redis(e) => {
                let text = if e.is_connection_refusal() {
                    format!("connection to Redis at {url} refused")
                } else if e.is_connection_dropped() {
                    format!("the connection to Redis at {url} was lost ({e})")
                } else {
                    e.to_string()
                };
                scrub(&text, secret_source)
            }
        }
    }
}

/// Whether a connection would keep failing without trying to connect again
/// (the connection manager only retries after I/O errors).
fn is_stuck(err: &redis::RedisError) -> bool {
    err.is_timeout()
        || matches!(
            err.kind(),
            ErrorKind::AuthenticationFailed | ErrorKind::Parse | ErrorKind::RESP3NotSupported
        )
}

impl Shared {
    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashSet<(usize, String)>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn current(&self) -> (u64, ConnectionManager) {
        let guard = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        (guard.0, guard.1.clone())
    }

    fn fresh_connection(&self, config: &ConnectionManagerConfig) -> Option<ConnectionManager> {
        match ConnectionManager::new_lazy_with_config(self.client.clone(), config.clone()) {
            Ok(fresh) => Some(fresh),
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e, "cannot replace the Redis connection");
                None
            }
        }
    }

    /// Runs one command on the control connection, bounded by the connect
    /// and response timeouts; replaces a connection that timed out or got
    /// stuck.
    async fn call<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, CallError> {
        let bound = self
            .config
            .connect_timeout
            .saturating_add(self.config.response_timeout);
        let (generation, mut connection) = self.current();
        let outcome = tokio::time::timeout(bound, cmd.query_async::<T>(&mut connection)).await;
        let error = match outcome {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => {
                if !is_stuck(&e) {
                    return Err(CallError::Redis(e));
                }
                CallError::Redis(e)
            }
            Err(_) => CallError::TimedOut(bound),
        };
        if let Some(fresh) = self.fresh_connection(&self.control_config) {
            let mut guard = self.control.lock().unwrap_or_else(PoisonError::into_inner);
            if guard.0 == generation {
                *guard = (generation.wrapping_add(1), fresh);
                tracing::info!(url = %self.url, "replacing the Redis connection");
            }
        }
        Err(error)
    }

    fn source_error(&self, what: &str, err: &CallError) -> SourceError {
        SourceError::new(format!(
            "{what}: {}",
            err.describe(&self.url, &self.config.url)
        ))
    }

    /// Creates the group on every stream that lacks it.
    async fn ensure_groups(&self) -> Result<(), (String, CallError)> {
        for stream in &self.config.streams {
            let mut cmd = redis::cmd("XGROUP");
            cmd.arg("CREATE")
                .arg(stream)
                .arg(&self.config.group)
                .arg(self.config.start.as_id())
                .arg("MKSTREAM");
            match self.call::<Value>(&cmd).await {
                Ok(_) => tracing::info!(
                    stream = %stream,
                    group = %self.config.group,
                    start = self.config.start.as_id(),
                    "created the consumer group"
                ),
                Err(CallError::Redis(e)) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => {
                    let what = format!(
                        "cannot create consumer group {:?} on Redis stream {stream:?}",
                        self.config.group
                    );
                    return Err((what, e));
                }
            }
        }
        Ok(())
    }

    /// The delivery counts of `ids` in `stream`, by id; empty if they
    /// cannot be read (the entries are delivered without one).
    async fn delivery_counts(&self, stream: usize, ids: &[&str]) -> HashMap<String, u32> {
        let mut counts = HashMap::new();
        let key = &self.config.streams[stream];
        for chunk in ids.chunks(ID_BATCH) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("XPENDING")
                    .arg(key)
                    .arg(&self.config.group)
                    .arg(*id)
                    .arg(*id)
                    .arg(1);
            }
            let bound = self
                .config
                .connect_timeout
                .saturating_add(self.config.response_timeout);
            let (_, mut connection) = self.current();
            let replies = tokio::time::timeout(
                bound,
                pipe.query_async::<Vec<StreamPendingCountReply>>(&mut connection),
            )
            .await;
            match replies {
                Ok(Ok(replies)) => {
                    for pending in replies.into_iter().flat_map(|r| r.ids) {
                        let n = u32::try_from(pending.times_delivered).unwrap_or(u32::MAX);
                        counts.insert(pending.id, n.max(1));
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "cannot read delivery counts (XPENDING)");
                }
                Err(_) => tracing::debug!("timed out reading delivery counts (XPENDING)"),
            }
        }
        counts
    }

    /// Resets the idle time of the entries this source holds that have been
    /// idle for a third of `claim_idle`, so no other consumer takes them
    /// over; leaves alone entries another consumer took meanwhile.
    async fn keep_held_fresh(&self, min_idle: Duration) {
        let mut by_stream: HashMap<usize, Vec<String>> = HashMap::new();
        for (stream, id) in self.lock_held().iter() {
            by_stream.entry(*stream).or_default().push(id.clone());
        }
        let min_idle = u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX);
        for (stream, ids) in by_stream {
            for chunk in ids.chunks(ID_BATCH) {
                let mut cmd = redis::cmd("XCLAIM");
                cmd.arg(&self.config.streams[stream])
                    .arg(&self.config.group)
                    .arg(&self.config.consumer)
                    .arg(min_idle)
                    .arg(chunk)
                    .arg("JUSTID");
                match self.call::<Vec<String>>(&cmd).await {
                    Ok(kept) if !kept.is_empty() => {
                        tracing::trace!(stream = %self.config.streams[stream], kept = kept.len(), "kept held entries fresh");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(
                        error = %e.describe(&self.url, &self.config.url),
                        "cannot refresh the idle time of held entries"
                    ),
                }
            }
        }
    }
}

impl RedisStreamSource {
    /// Connects to [`RedisSourceConfig::url`], checks with a `PING` that the
    /// server answers, and creates the consumer group on every stream that
    /// lacks it (`XGROUP CREATE … MKSTREAM`, from
    /// [`RedisSourceConfig::start`]).
    ///
    /// Fails after the connect timeout plus the response timeout at most;
    /// once connected, the source reconnects by itself.
    pub async fn connect(config: RedisSourceConfig) -> Result<Self, RedisError> {
        config.validate()?;
        let client = config.client()?;
        let url = config.redacted_url();
        let base = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(1));
        let control_config = base
            .clone()
            .set_response_timeout(Some(config.response_timeout));
        let reader_config =
            base.set_response_timeout(Some(config.block.saturating_add(config.response_timeout)));
        let connect_error = |reason: String, source: Option<redis::RedisError>| {
            let source = source.map(|e| scrub(&e.to_string(), &config.url).into());
            RedisError::Connect {
                url: url.clone(),
                reason,
                source,
            }
        };
        let connect = ConnectionManager::new_with_config(client.clone(), control_config.clone());
        let mut control = match tokio::time::timeout(config.connect_timeout, connect).await {
            Ok(Ok(manager)) => manager,
            Ok(Err(e)) => {
                let reason = if e.is_connection_refusal() {
                    "connection refused".to_owned()
                } else {
                    scrub(&e.to_string(), &config.url)
                };
                return Err(connect_error(reason, Some(e)));
            }
            Err(_) => {
                return Err(connect_error(
                    format!("timed out after {:?}", config.connect_timeout),
                    None,
                ));
            }
        };
        let ping = redis::cmd("PING");
        match tokio::time::timeout(
            config.response_timeout,
            ping.query_async::<String>(&mut control),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(connect_error(scrub(&e.to_string(), &config.url), Some(e))),
            Err(_) => {
                return Err(connect_error(
                    format!(
                        "the server did not answer PING within {:?}",
                        config.response_timeout
                    ),
                    None,
                ));
            }
        }
        let reader = ConnectionManager::new_lazy_with_config(client.clone(), reader_config.clone())
            .map_err(|e| connect_error(scrub(&e.to_string(), &config.url), Some(e)))?;
        let streams = config.streams.len();
        let shared = Arc::new(Shared {
            url: url.clone(),
            client,
            reader_config,
            control_config,
            control: Mutex::new((0, control)),
            held: Mutex::new(HashSet::new()),
            config,
        });
        if let Err((what, e)) = shared.ensure_groups().await {
            return Err(RedisError::Connect {
                reason: format!("{what}: {}", e.describe(&url, &shared.config.url)),
                url,
                source: None,
            });
        }
        let keep_alive = tokio::spawn(keep_alive(shared.clone())).abort_handle();
        tracing::info!(
            url = %url,
            streams = ?shared.config.streams,
            group = %shared.config.group,
            consumer = %shared.config.consumer,
            "reading Redis streams"
        );
        Ok(RedisStreamSource {
            shared,
            reader,
            buffer: VecDeque::new(),
            history: vec![Some("0".to_owned()); streams],
            claim_cursors: vec!["0-0".to_owned(); streams],
            next_claim: Instant::now(),
            groups_ready: true,
            keep_alive,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RedisSourceConfig {
        &self.shared.config
    }

    /// Reads more entries into the buffer (possibly none).
    async fn fill(&mut self) -> Result<(), SourceError> {
        if !self.groups_ready {
            self.shared
                .ensure_groups()
                .await
                .map_err(|(what, e)| self.shared.source_error(&what, &e))?;
            self.groups_ready = true;
        }
        if let Some(stream) = self.history.iter().position(Option::is_some) {
            return self.read_history(stream).await;
        }
        if Instant::now() >= self.next_claim {
            self.reclaim().await?;
            if !self.buffer.is_empty() {
                return Ok(());
            }
        }
        self.read_new().await
    }

    /// A failed call: a vanished group is created again before the next
    /// read.
    fn failed(&mut self, what: &str, err: &CallError) -> SourceError {
        if err.is_no_group() {
            self.groups_ready = false;
            // The group is new: whatever this consumer had pending is gone.
            self.claim_cursors
                .iter_mut()
                .for_each(|c| *c = "0-0".into());
            return SourceError::new(format!(
                "{what}: the consumer group {:?} is gone (Redis restarted without persistence?); \
                 creating it again",
                self.shared.config.group
            ));
        }
        self.shared.source_error(what, err)
    }

    /// The next batch of this consumer's own pending entries of `stream`.
    async fn read_history(&mut self, stream: usize) -> Result<(), SourceError> {
        let config = &self.shared.config;
        let key = &config.streams[stream];
        let from = self.history[stream].clone().unwrap_or_else(|| "0".into());
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&config.group)
            .arg(&config.consumer)
            .arg("COUNT")
            .arg(config.count)
            .arg("STREAMS")
            .arg(key)
            .arg(&from);
        let what = format!("cannot read the pending entries of Redis stream {key:?}");
        let reply = match self.shared.call::<Option<StreamReadReply>>(&cmd).await {
            Ok(reply) => reply,
            Err(e) => return Err(self.failed(&what, &e)),
        };
        let entries: Vec<StreamId> = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect();
        let Some(last) = entries.last().map(|e| e.id.clone()) else {
            self.history[stream] = None;
            return Ok(());
        };
        self.history[stream] = Some(last);
        tracing::info!(
            stream = %key,
            entries = entries.len(),
            "delivering entries left pending by an earlier run of this consumer"
        );
        self.deliver(stream, entries, true).await;
        Ok(())
    }

    /// One `XAUTOCLAIM` round over every stream.
    async fn reclaim(&mut self) -> Result<(), SourceError> {
        let idle = u64::try_from(self.shared.config.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let mut more = false;
        for stream in 0..self.shared.config.streams.len() {
            let config = &self.shared.config;
            let key = &config.streams[stream];
            let mut cmd = redis::cmd("XAUTOCLAIM");
            cmd.arg(key)
                .arg(&config.group)
                .arg(&config.consumer)
                .arg(idle)
                .arg(&self.claim_cursors[stream])
                .arg("COUNT")
                .arg(config.count);
            let what = format!("cannot reclaim idle entries of Redis stream {key:?}");
            let reply = match self.shared.call::<StreamAutoClaimReply>(&cmd).await {
                Ok(reply) => reply,
                Err(e) => return Err(self.failed(&what, &e)),
            };
            if !reply.deleted_ids.is_empty() {
                tracing::warn!(
                    stream = %key,
                    ids = ?reply.deleted_ids,
                    "pending entries were deleted from the stream before they were handled (trimmed?)"
                );
            }
            let claimed: Vec<StreamId> = {
                let held = self.shared.lock_held();
                reply
                    .claimed
                    .into_iter()
                    .filter(|e| !held.contains(&(stream, e.id.clone())))
                    .collect()
            };
            if !claimed.is_empty() {
                tracing::info!(
                    stream = %key,
                    entries = claimed.len(),
                    "took over entries idle for longer than claim_idle"
                );
                self.deliver(stream, claimed, true).await;
            }
            more |= reply.next_stream_id != "0-0";
            self.claim_cursors[stream] = reply.next_stream_id;
        }
        self.next_claim = if more {
            Instant::now()
        } else {
            Instant::now() + claim_interval(self.shared.config.claim_idle)
        };
        Ok(())
    }

    /// New entries of every stream, blocking for a while if there are none.
    async fn read_new(&mut self) -> Result<(), SourceError> {
        let shared = self.shared.clone();
        let config = &shared.config;
        let until_claim = self.next_claim.saturating_duration_since(Instant::now());
        let block = config.block.min(until_claim).max(Duration::from_millis(1));
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&config.group)
            .arg(&config.consumer)
            .arg("COUNT")
            .arg(config.count)
            .arg("BLOCK")
            .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX))
            .arg("STREAMS")
            .arg(&config.streams);
        for _ in &config.streams {
            cmd.arg(">");
        }
        let bound = block
            .saturating_add(config.connect_timeout)
            .saturating_add(config.response_timeout);
        let outcome = tokio::time::timeout(
            bound,
            cmd.query_async::<Option<StreamReadReply>>(&mut self.reader),
        )
        .await;
        let error = match outcome {
            Ok(Ok(reply)) => {
                let Some(reply) = reply else {
                    return Ok(()); // nothing new within the block time
                };
                for key in reply.keys {
                    let Some(stream) = config.streams.iter().position(|s| *s == key.key) else {
                        tracing::warn!(stream = %key.key, "entries of a stream that was not asked for");
                        continue;
                    };
                    self.deliver(stream, key.ids, false).await;
                }
                return Ok(());
            }
            Ok(Err(e)) => CallError::Redis(e),
            Err(_) => CallError::TimedOut(bound),
        };
        let replace = match &error {
            CallError::TimedOut(_) => true,
            CallError::Redis(e) => is_stuck(e),
        };
        if replace && let Some(fresh) = self.shared.fresh_connection(&self.shared.reader_config) {
            tracing::info!(url = %self.shared.url, "replacing the Redis reading connection");
            self.reader = fresh;
        }
        Err(self.failed("cannot read new entries from Redis", &error))
    }

    /// Decodes `entries` of `stream` into the buffer. `redelivered`: read
    /// from the pending entries list, so their delivery counts are looked up.
    async fn deliver(&mut self, stream: usize, entries: Vec<StreamId>, redelivered: bool) {
        let key = self.shared.config.streams[stream].clone();
        // An entry deleted from the stream (trimmed) while pending comes back
        // without fields: nothing to deliver, only to acknowledge.
        let (gone, entries): (Vec<StreamId>, Vec<StreamId>) =
            entries.into_iter().partition(|e| e.map.is_empty());
        if !gone.is_empty() {
            let ids: Vec<&str> = gone.iter().map(|e| e.id.as_str()).collect();
            tracing::warn!(stream = %key, ids = ?ids, "pending entries no longer exist (trimmed?); acknowledging them");
            let mut cmd = redis::cmd("XACK");
            cmd.arg(&key).arg(&self.shared.config.group).arg(&ids);
            if let Err(e) = self.shared.call::<u64>(&cmd).await {
                tracing::debug!(error = %e.describe(&self.shared.url, &self.shared.config.url), "cannot acknowledge deleted entries");
            }
        }
        let counts = if redelivered {
            let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            self.shared.delivery_counts(stream, &ids).await
        } else {
            HashMap::new()
        };
        {
            let mut held = self.shared.lock_held();
            for entry in &entries {
                held.insert((stream, entry.id.clone()));
            }
        }
        for entry in entries {
            let acker = RedisAcker {
                shared: self.shared.clone(),
                stream,
                id: entry.id.clone(),
            };
            let attempt = if redelivered {
                counts.get(&entry.id).copied()
            } else {
                Some(1)
            };
            let incoming = match decode_entry(&entry) {
                Ok(decoded) => Incoming::new(decoded.event, acker),
                Err(e) => {
                    tracing::warn!(stream = %key, entry_id = %entry.id, error = %e, "undecodable stream entry");
                    Incoming::undecodable(e.to_string(), entry_json(&key, &entry), acker)
                }
            };
            self.buffer.push_back(match attempt {
                Some(n) => incoming.with_delivery_attempt(n),
                None => incoming,
            });
        }
    }
}

impl Drop for RedisStreamSource {
    fn drop(&mut self) {
        self.keep_alive.abort();
    }
}

impl Source for RedisStreamSource {
    /// The next entry; `Some(Err(_))` when Redis could not be read (the
    /// consumer backs off and calls again). Never `None`: the source is
    /// open until dropped.
    async fn receive(&mut self) -> Option<Result<Incoming, SourceError>> {
        loop {
            if let Some(next) = self.buffer.pop_front() {
                return Some(Ok(next));
            }
            if let Err(e) = self.fill().await {
                return Some(Err(e));
            }
        }
    }
}

/// How often held entries are refreshed and idle ones reclaimed.
fn claim_interval(claim_idle: Duration) -> Duration {
    (claim_idle / 2).max(MIN_KEEP_ALIVE)
}

/// Keeps the entries the source holds from going idle, until aborted.
async fn keep_alive(shared: Arc<Shared>) {
    let every = (shared.config.claim_idle / 3).max(MIN_KEEP_ALIVE);
    loop {
        tokio::time::sleep(every).await;
        shared.keep_held_fresh(every).await;
    }
}

/// Settles one stream entry: `XACK`, or (nack, drop) leave it pending.
struct RedisAcker {
    shared: Arc<Shared>,
    stream: usize,
    id: String,
}

impl Drop for RedisAcker {
    fn drop(&mut self) {
        // Settled or handed back: no longer kept fresh, so a nacked entry
        // goes idle and is reclaimed after claim_idle.
        self.shared
            .lock_held()
            .remove(&(self.stream, std::mem::take(&mut self.id)));
    }
}

impl Acker for RedisAcker {
    async fn ack(self) -> Result<(), SourceError> {
        let key = &self.shared.config.streams[self.stream];
        let mut cmd = redis::cmd("XACK");
        cmd.arg(key).arg(&self.shared.config.group).arg(&self.id);
        match self.shared.call::<u64>(&cmd).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.shared.source_error(
                &format!(
                    "cannot acknowledge entry {} of Redis stream {key:?}",
                    self.id
                ),
                &e,
            )),
        }
    }

    /// Leaves the entry pending: Redis has no negative acknowledgement. It
    /// is delivered again once idle for `claim_idle` (whatever `delay`), or
    /// at once to the next run under the same consumer name.
    async fn nack(self, delay: Duration) -> Result<(), SourceError> {
        tracing::debug!(
            stream = %self.shared.config.streams[self.stream],
            entry_id = %self.id,
            ?delay,
            "leaving the entry pending; it is redelivered after claim_idle"
        );
        drop(self);
        Ok(())
    }
}

/// An undecodable entry as JSON bytes: its stream, id and fields (sorted
/// by name; a value that is not UTF-8 as `{"hex": "…"}`).
fn entry_json(stream: &str, entry: &StreamId) -> Vec<u8> {
    let mut out = String::from("{\"stream\":");
    json_string(&mut out, stream);
    out.push_str(",\"id\":");
    json_string(&mut out, &entry.id);
    out.push_str(",\"fields\":{");
    let mut fields: Vec<(&String, &Value)> = entry.map.iter().collect();
    fields.sort_by(|a, b| a.0.cmp(b.0));
    for (i, (name, value)) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json_string(&mut out, name);
        out.push(':');
        let bytes: Option<&[u8]> = match value {
            Value::BulkString(bytes) => Some(bytes),
            Value::SimpleString(text) => Some(text.as_bytes()),
            Value::VerbatimString { text, .. } => Some(text.as_bytes()),
            _ => None,
        };
        match bytes {
            Some(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => json_string(&mut out, text),
                Err(_) => {
                    out.push_str("{\"hex\":\"");
                    for b in bytes {
                        let _ = write!(out, "{b:02x}");
                    }
                    out.push_str("\"}");
                }
            },
            None => json_string(&mut out, &format!("{value:?}")),
        }
    }
    out.push_str("}}");
    out.into_bytes()
}

fn json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_settings() {
        let good = RedisSourceConfig::new("s", "g", "c");
        assert_eq!(good.validate(), Ok(()));
        let bad = [
            good.clone().with_url("http://x"),
            good.clone().with_streams(Vec::<String>::new()),
            good.clone().with_streams(["a", "a"]),
            good.clone().with_streams([""]),
            good.clone().with_group(" "),
            good.clone().with_consumer(""),
            good.clone().with_count(0),
            good.clone().with_block(Duration::ZERO),
            good.clone().with_claim_idle(Duration::ZERO),
            good.clone().with_connect_timeout(Duration::ZERO),
            good.clone()
                .with_response_timeout(Duration::from_micros(10)),
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?} was accepted");
        }
        assert_eq!(
            RedisSourceConfig::default()
                .with_url("redis://u:pw@h:1")
                .redacted_url(),
            "redis://***@h:1"
        );
    }

    #[test]
    fn deserializes_with_defaults() -> Result<(), serde_json::Error> {
        let config: RedisSourceConfig = serde_json::from_str(
            r#"{"streams":["a","b"],"group":"g","consumer":"c","start":"end","claim_idle":"2m"}"#,
        )?;
        assert_eq!(
            config,
            RedisSourceConfig::new("a", "g", "c")
                .with_streams(["a", "b"])
                .with_start(GroupStart::End)
                .with_claim_idle(Duration::from_secs(120))
        );
        assert!(serde_json::from_str::<RedisSourceConfig>(r#"{"stream":"a"}"#).is_err());
        Ok(())
    }

    #[test]
    fn undecodable_entries_keep_their_fields_as_json() -> Result<(), serde_json::Error> {
        let entry = StreamId {
            id: "5-1".into(),
            map: [
                ("data".to_owned(), Value::BulkString(b"{oops \"\n".to_vec())),
                ("blob".to_owned(), Value::BulkString(vec![0xff, 0x01])),
                ("n".to_owned(), Value::Int(3)),
            ]
            .into_iter()
            .collect(),
            milliseconds_elapsed_from_delivery: None,
            delivered_count: None,
        };
        let json: serde_json::Value = serde_json::from_slice(&entry_json("s:1", &entry))?;
        assert_eq!(
            json,
            serde_json::json!({
                "stream": "s:1",
                "id": "5-1",
                "fields": {"blob": {"hex": "ff01"}, "data": "{oops \"\n", "n": "int(3)"},
            })
        );
        Ok(())
    }
}
