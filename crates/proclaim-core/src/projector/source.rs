//! What a projector reads: a [`ReplaySource`] of [`ReplayEntry`]s, and the
//! in-memory [`MemoryLog`].

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use super::full_message;
use crate::Event;
use crate::store::BoxError;

/// An entry of the log that is not a proclaim event: the projector stops
/// at it (see the [module docs](super)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecodable {
    /// Why it does not decode.
    pub reason: String,
    /// Its bytes, as the log holds them.
    pub raw: Vec<u8>,
}

/// One entry of a replayable log: its position and its event (or why it is
/// not one).
///
/// ```
/// use proclaim_core::Event;
/// use proclaim_core::projector::ReplayEntry;
///
/// let entry = ReplayEntry::event(7, Event::builder("DonorSecured").subject("donor-42").build()?);
/// assert_eq!(entry.position, 7);
/// assert!(entry.payload.is_ok());
/// let bad = ReplayEntry::undecodable(8, "no ce-id header", b"{}".to_vec());
/// assert_eq!(bad.payload.unwrap_err().reason, "no ce-id header");
/// # Ok::<(), proclaim_core::EventError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayEntry {
    /// The entry's position in the log (1 for the first entry; positions
    /// grow, and may have gaps).
    pub position: u64,
    /// The event, or why the entry is not one.
    pub payload: Result<Event, Undecodable>,
}

impl ReplayEntry {
    /// An entry holding `event`.
    pub fn event(position: u64, event: Event) -> Self {
        ReplayEntry {
            position,
            payload: Ok(event),
        }
    }

    /// An entry that does not decode.
    pub fn undecodable(position: u64, reason: impl Into<String>, raw: impl Into<Vec<u8>>) -> Self {
        ReplayEntry {
            position,
            payload: Err(Undecodable {
                reason: reason.into(),
                raw: raw.into(),
            }),
        }
    }
}

/// A failure of a [`ReplaySource`]: transient (the log is unreachable; the
/// projector retries with backoff) or permanent (the position asked for
/// can no longer be read as it was — the projector stops).
///
/// ```
/// use proclaim_core::projector::ReplayError;
///
/// let down = ReplayError::transient("fetch failed").with_source(std::io::Error::other("reset"));
/// assert!(down.is_transient());
/// assert_eq!(down.full_message(), "fetch failed: reset");
/// assert!(!ReplayError::permanent("events 1..9 were purged").is_transient());
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ReplayError {
    transient: bool,
    message: String,
    #[source]
    source: Option<BoxError>,
}

impl ReplayError {
    /// A failure worth retrying.
    pub fn transient(message: impl Into<String>) -> Self {
        ReplayError {
            transient: true,
            message: message.into(),
            source: None,
        }
    }

    /// A failure that retrying will not fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        ReplayError {
            transient: false,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Whether retrying may succeed.
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// The message with every source in the chain.
    pub fn full_message(&self) -> String {
        full_message(&self.message, self.source.as_deref())
    }
}

/// An ordered log that can be read again from any position, as a
/// [`Projector`](super::Projector) reads it. Implemented by
/// `proclaim_nats::JetStreamReplay` (positions are stream sequences) and
/// [`MemoryLog`].
///
/// Contract:
/// - [`read`](ReplaySource::read) returns up to `max` entries whose
///   positions are greater than `after`, in ascending order, starting with
///   the first such entry the log holds (position 0 means "from the
///   start"). It returns at once with what the log holds; when it holds
///   nothing after `after`, it waits up to `wait` for a new entry and then
///   returns empty. An empty result with `wait` zero means: nothing after
///   `after` now.
/// - A position the log can no longer serve faithfully — `after` beyond
///   its end (the checkpoint belongs to another log), or entries after
///   `after` that were removed — is a permanent [`ReplayError`], never a
///   silent jump.
/// - A `read` whose future is dropped before it finished must not make the
///   next `read` lose entries (the projector drops a waiting `read` when it
///   shuts down).
///
/// ```
/// use std::time::Duration;
/// use proclaim_core::projector::{ReplayEntry, ReplayError, ReplaySource};
///
/// /// A fixed log of entries, e.g. loaded from a file.
/// struct Fixed(Vec<ReplayEntry>);
///
/// impl ReplaySource for Fixed {
///     async fn read(&mut self, after: u64, max: usize, _wait: Duration)
///         -> Result<Vec<ReplayEntry>, ReplayError>
///     {
///         Ok(self.0.iter().filter(|e| e.position > after).take(max).cloned().collect())
///     }
///
///     async fn end(&mut self) -> Result<u64, ReplayError> {
///         Ok(self.0.last().map_or(0, |e| e.position))
///     }
/// }
/// ```
pub trait ReplaySource: Send + 'static {
    /// Up to `max` entries after position `after` (see the contract above).
    fn read(
        &mut self,
        after: u64,
        max: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<ReplayEntry>, ReplayError>> + Send;

    /// The position of the log's last entry now (0 for an empty log): how
    /// far [`Projector::catch_up`](super::Projector::catch_up) goes, and the
    /// end the lag is measured to.
    fn end(&mut self) -> impl Future<Output = Result<u64, ReplayError>> + Send;
}

/// An append-only log in memory whose positions are 1, 2, 3, …: a
/// [`ReplaySource`] for tests and for single-process apps. Clones share the
/// log; readers waiting for new entries wake up when one is appended.
///
/// ```
/// use std::time::Duration;
/// use proclaim_core::Event;
/// use proclaim_core::projector::{MemoryLog, ReplaySource};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let log = MemoryLog::new();
/// assert_eq!(log.append(Event::builder("DonorSecured").subject("donor-1").build()?), 1);
/// assert_eq!(log.append_undecodable("not JSON", b"{oops".to_vec()), 2);
///
/// let mut reader = log.clone();
/// let entries = reader.read(0, 10, Duration::ZERO).await?;
/// assert_eq!(entries.iter().map(|e| e.position).collect::<Vec<_>>(), [1, 2]);
/// assert!(reader.read(2, 10, Duration::ZERO).await?.is_empty());
/// assert!(reader.read(3, 10, Duration::ZERO).await.is_err()); // beyond the end
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MemoryLog {
    inner: Arc<Inner>,
}

struct Inner {
    entries: Mutex<Vec<Result<Event, Undecodable>>>,
    /// The number of entries, for readers waiting for more.
    len: watch::Sender<u64>,
}

impl Default for MemoryLog {
    fn default() -> Self {
        MemoryLog {
            inner: Arc::new(Inner {
                entries: Mutex::new(Vec::new()),
                len: watch::Sender::new(0),
            }),
        }
    }
}

impl std::fmt::Debug for MemoryLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLog")
            .field("len", &self.len())
            .finish()
    }
}

impl MemoryLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `event`; returns its position.
    pub fn append(&self, event: Event) -> u64 {
        self.push(Ok(event))
    }

    /// Appends an entry that does not decode; returns its position.
    pub fn append_undecodable(&self, reason: impl Into<String>, raw: impl Into<Vec<u8>>) -> u64 {
        self.push(Err(Undecodable {
            reason: reason.into(),
            raw: raw.into(),
        }))
    }

    fn push(&self, entry: Result<Event, Undecodable>) -> u64 {
        let mut entries = self
            .inner
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        entries.push(entry);
        let len = entries.len() as u64;
        self.inner.len.send_replace(len);
        len
    }

    /// The number of entries (the position of the last one).
    pub fn len(&self) -> u64 {
        *self.inner.len.borrow()
    }

    /// True when nothing was appended yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn entries_after(&self, after: u64, max: usize) -> Result<Vec<ReplayEntry>, ReplayError> {
        let entries = self
            .inner
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let len = entries.len() as u64;
        if after > len {
            return Err(ReplayError::permanent(format!(
                "position {after} is beyond the end of the in-memory log ({len} entries)"
            )));
        }
        let start = usize::try_from(after).unwrap_or(usize::MAX);
        Ok(entries
            .iter()
            .enumerate()
            .skip(start)
            .take(max)
            .map(|(i, entry)| ReplayEntry {
                position: i as u64 + 1,
                payload: entry.clone(),
            })
            .collect())
    }
}

impl ReplaySource for MemoryLog {
    async fn read(
        &mut self,
        after: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReplayEntry>, ReplayError> {
        let entries = self.entries_after(after, max)?;
        if !entries.is_empty() || wait.is_zero() || max == 0 {
            return Ok(entries);
        }
        let mut len = self.inner.len.subscribe();
        // Appended between the read above and the subscription: seen at once.
        let _ = tokio::time::timeout(wait, len.wait_for(|n| *n > after)).await;
        self.entries_after(after, max)
    }

    async fn end(&mut self) -> Result<u64, ReplayError> {
        Ok(self.len())
    }
}
