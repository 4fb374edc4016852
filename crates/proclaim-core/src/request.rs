//! Request/reply: a caller asks one service a question and waits, up to a
//! deadline, for its answer.
//!
//! Events are the default way services talk; some questions cannot wait
//! ("is this donor's identity verified?"). For those a [`Query`] goes to one
//! target service and a [`QueryResult`] comes back with the query's
//! correlation id and a [`QueryStatus`]: [`Success`](QueryStatus::Success)
//! with a JSON payload, [`NotFound`](QueryStatus::NotFound),
//! [`Error`](QueryStatus::Error) with the handler's message, or
//! [`Timeout`](QueryStatus::Timeout). The deadline is always enforced: a
//! caller never waits longer than it asked, whatever the handler does (sleeps,
//! panics, never answers).
//!
//! [`RequestReply`] is the engine: [`InProcessRequests`] here, for a single
//! process; `proclaim_nats::NatsRequests` over core NATS request/reply.
//!
//! ```
//! use std::time::Duration;
//! use proclaim_core::request::{InProcessRequests, Query, QueryStatus, Reply, RequestReply};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let engine = InProcessRequests::new();
//! let _registration = engine.register("identity-matrix", |query: Query| async move {
//!     let donor: String = query.payload_as()?;
//!     Reply::found(&serde_json::json!({ "donor": donor, "verified": true }))
//! })?;
//!
//! let query = Query::new("identity-matrix", "VerifyDonor").with_payload(&"donor-42")?;
//! let result = engine.dispatch_and_await(query, Duration::from_secs(2)).await;
//! assert_eq!(result.status(), QueryStatus::Success);
//! let answer: Option<serde_json::Value> = result.found()?;
//! assert_eq!(answer.map(|a| a["verified"].clone()), Some(true.into()));
//! # Ok(())
//! # }
//! ```

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::BoxError;

// ---------------------------------------------------------------------------
// Query
// ---------------------------------------------------------------------------

/// A question for one target service.
///
/// Built with [`Query::new`] and the `with_*` methods. Its id is a fresh
/// UUIDv7; its correlation id defaults to that id (as text) and may be set to
/// anything, e.g. the correlation id of the event being handled, so that the
/// whole exchange can be traced. Its deadline is set by the engine when it is
/// dispatched (the earlier of any deadline it already has and now + the
/// dispatch timeout); handlers read it with [`Query::remaining`].
///
/// ```
/// use proclaim_core::request::Query;
///
/// let query = Query::new("identity-matrix", "VerifyDonor")
///     .with_payload(&serde_json::json!({ "donor": "donor-42" }))?
///     .with_correlation_id("pledge-drive-7");
/// assert_eq!(query.target_service(), "identity-matrix");
/// assert_eq!(query.query_type(), "VerifyDonor");
/// assert_eq!(query.correlation_id(), "pledge-drive-7");
/// assert_eq!(query.payload()["donor"], "donor-42");
///
/// let plain = Query::new("identity-matrix", "Ping");
/// assert_eq!(plain.correlation_id(), plain.id().to_string());
/// # Ok::<(), proclaim_core::request::PayloadError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Query {
    id: Uuid,
    correlation_id: String,
    target_service: String,
    query_type: String,
    #[serde(default)]
    payload: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deadline: Option<DateTime<Utc>>,
}

impl Query {
    /// A query of type `query_type` (its name, e.g. `VerifyDonor`) for
    /// `target_service`, with a `null` payload, a fresh UUIDv7 id and that id
    /// as correlation id.
    pub fn new(target_service: impl Into<String>, query_type: impl Into<String>) -> Self {
        let id = Uuid::now_v7();
        Query {
            id,
            correlation_id: id.to_string(),
            target_service: target_service.into(),
            query_type: query_type.into(),
            payload: Value::Null,
            deadline: None,
        }
    }

    /// Sets the payload to `payload` serialized as JSON.
    ///
    /// ```
    /// # use proclaim_core::request::Query;
    /// #[derive(serde::Serialize)]
    /// struct VerifyDonor { donor: String }
    ///
    /// let query = Query::new("identity-matrix", "VerifyDonor")
    ///     .with_payload(&VerifyDonor { donor: "donor-42".into() })?;
    /// assert_eq!(query.payload(), &serde_json::json!({ "donor": "donor-42" }));
    /// # Ok::<(), proclaim_core::request::PayloadError>(())
    /// ```
    pub fn with_payload<T: Serialize + ?Sized>(self, payload: &T) -> Result<Self, PayloadError> {
        let payload = serde_json::to_value(payload).map_err(|e| PayloadError::serialize::<T>(e))?;
        Ok(self.with_json(payload))
    }

    /// Sets the payload to a JSON value.
    ///
    /// ```
    /// # use proclaim_core::request::Query;
    /// let query = Query::new("s", "T").with_json(serde_json::json!([1, 2]));
    /// assert_eq!(query.payload()[1], 2);
    /// ```
    pub fn with_json(mut self, payload: Value) -> Self {
        self.payload = payload;
        self
    }

    /// Sets the correlation id (default: the query id).
    ///
    /// ```
    /// # use proclaim_core::request::Query;
    /// assert_eq!(Query::new("s", "T").with_correlation_id("c-1").correlation_id(), "c-1");
    /// ```
    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = correlation_id.into();
        self
    }

    /// Sets the id, e.g. when an engine rebuilds a query it received. A
    /// correlation id that was the old id follows the new one.
    ///
    /// ```
    /// # use proclaim_core::request::Query;
    /// let id = uuid::Uuid::now_v7();
    /// let query = Query::new("s", "T").with_id(id);
    /// assert_eq!((query.id(), query.correlation_id()), (id, id.to_string().as_str()));
    /// ```
    pub fn with_id(mut self, id: Uuid) -> Self {
        if self.correlation_id == self.id.to_string() {
            self.correlation_id = id.to_string();
        }
        self.id = id;
        self
    }

    /// Sets the deadline. [`RequestReply::dispatch_and_await`] keeps the
    /// earlier of this and its own timeout.
    ///
    /// ```
    /// # use proclaim_core::request::Query;
    /// let at = chrono::Utc::now() + chrono::Duration::seconds(5);
    /// assert_eq!(Query::new("s", "T").with_deadline(at).deadline(), Some(at));
    /// ```
    pub fn with_deadline(mut self, deadline: DateTime<Utc>) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Starts the clock for a dispatch with `timeout`: the deadline becomes
    /// the earlier of the query's own and now + `timeout`. Returns the query
    /// and the time it has left. For engines; callers pass the timeout to
    /// [`RequestReply::dispatch_and_await`].
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use proclaim_core::request::Query;
    /// let (query, left) = Query::new("s", "T").start_deadline(Duration::from_secs(2));
    /// assert_eq!(left, Duration::from_secs(2));
    /// assert!(query.deadline().is_some());
    /// ```
    pub fn start_deadline(mut self, timeout: Duration) -> (Self, Duration) {
        let left = self.remaining().map_or(timeout, |own| own.min(timeout));
        let at = chrono::Duration::from_std(left)
            .ok()
            .and_then(|d| Utc::now().checked_add_signed(d));
        if let Some(at) = at {
            self.deadline = Some(self.deadline.map_or(at, |own| own.min(at)));
        }
        (self, left)
    }

    /// The id (UUIDv7).
    pub fn id(&self) -> Uuid {
        self.id
    }
    /// The correlation id every result of this query carries.
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }
    /// The service asked.
    pub fn target_service(&self) -> &str {
        &self.target_service
    }
    /// The query's type (its name), e.g. `VerifyDonor`.
    pub fn query_type(&self) -> &str {
        &self.query_type
    }
    /// The JSON payload.
    pub fn payload(&self) -> &Value {
        &self.payload
    }
    /// The deadline, once set.
    pub fn deadline(&self) -> Option<DateTime<Utc>> {
        self.deadline
    }

    /// Time left until the deadline (zero once it has passed), or `None`
    /// without a deadline. Handlers may use it to bound their own calls.
    ///
    /// ```
    /// # use proclaim_core::request::Query;
    /// assert_eq!(Query::new("s", "T").remaining(), None);
    /// let past = Query::new("s", "T").with_deadline(chrono::Utc::now() - chrono::Duration::seconds(1));
    /// assert_eq!(past.remaining(), Some(std::time::Duration::ZERO));
    /// ```
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|at| (at - Utc::now()).to_std().unwrap_or(Duration::ZERO))
    }

    /// The payload read as `T`.
    ///
    /// ```
    /// # use proclaim_core::request::Query;
    /// let query = Query::new("s", "T").with_payload(&42)?;
    /// assert_eq!(query.payload_as::<u32>()?, 42);
    /// assert!(query.payload_as::<String>().is_err());
    /// # Ok::<(), proclaim_core::request::PayloadError>(())
    /// ```
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, PayloadError> {
        T::deserialize(&self.payload).map_err(PayloadError::deserialize::<T>)
    }

    /// The payload as JSON bytes, e.g. a message body.
    ///
    /// ```
    /// # use proclaim_core::request::Query;
    /// let query = Query::new("s", "T").with_json(serde_json::json!({ "a": 1 }));
    /// assert_eq!(query.payload_to_vec()?, br#"{"a":1}"#);
    /// # Ok::<(), proclaim_core::request::PayloadError>(())
    /// ```
    pub fn payload_to_vec(&self) -> Result<Vec<u8>, PayloadError> {
        serde_json::to_vec(&self.payload).map_err(PayloadError::serialize::<Value>)
    }

    /// Sets the payload from JSON bytes, e.g. a message body; no bytes at all
    /// are a `null` payload.
    ///
    /// ```
    /// # use proclaim_core::request::Query;
    /// let query = Query::new("s", "T").with_json_slice(br#"{"a":1}"#)?;
    /// assert_eq!(query.payload()["a"], 1);
    /// assert!(Query::new("s", "T").with_json_slice(b"")?.payload().is_null());
    /// assert!(Query::new("s", "T").with_json_slice(b"{").is_err());
    /// # Ok::<(), proclaim_core::request::PayloadError>(())
    /// ```
    pub fn with_json_slice(self, bytes: &[u8]) -> Result<Self, PayloadError> {
        if bytes.is_empty() {
            return Ok(self.with_json(Value::Null));
        }
        let payload = serde_json::from_slice(bytes).map_err(PayloadError::deserialize::<Value>)?;
        Ok(self.with_json(payload))
    }

    /// The query without its payload: what a result needs to refer to it.
    fn head(&self) -> Query {
        Query {
            id: self.id,
            correlation_id: self.correlation_id.clone(),
            target_service: self.target_service.clone(),
            query_type: self.query_type.clone(),
            payload: Value::Null,
            deadline: self.deadline,
        }
    }
}

// ---------------------------------------------------------------------------
// QueryResult
// ---------------------------------------------------------------------------

/// How a query ended.
///
/// ```
/// use proclaim_core::request::QueryStatus;
///
/// assert_eq!(QueryStatus::NotFound.to_string(), "not_found");
/// assert_eq!(serde_json::to_string(&QueryStatus::Timeout)?, "\"timeout\"");
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryStatus {
    /// The service answered; the answer is the payload.
    Success,
    /// The service does not know what was asked about, or no service
    /// answers this kind of query.
    NotFound,
    /// The handler failed (an error or a panic), or the query could not be
    /// sent; the message says why.
    Error,
    /// No answer came before the deadline.
    Timeout,
}

impl QueryStatus {
    /// The name used on the wire: `success`, `not_found`, `error`, `timeout`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueryStatus::Success => "success",
            QueryStatus::NotFound => "not_found",
            QueryStatus::Error => "error",
            QueryStatus::Timeout => "timeout",
        }
    }
}

impl fmt::Display for QueryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer to a [`Query`]: always returned, whatever happened.
///
/// It carries the query's id and correlation id, the service that answered
/// (or was asked, when none answered), the [`QueryStatus`], the JSON payload
/// (`null` unless [`Success`](QueryStatus::Success)), a message and the time
/// it was formed. The message says why for [`Error`](QueryStatus::Error)
/// and [`Timeout`](QueryStatus::Timeout); for
/// [`NotFound`](QueryStatus::NotFound) it is set when no handler was there at
/// all, and `None` when a handler answered "not found" itself.
///
/// ```
/// use proclaim_core::request::{Query, QueryResult, QueryStatus};
///
/// let query = Query::new("identity-matrix", "VerifyDonor").with_correlation_id("c-7");
/// let result = QueryResult::success(&query, serde_json::json!({ "verified": true }));
/// assert_eq!(result.status(), QueryStatus::Success);
/// assert_eq!(result.correlation_id(), "c-7");
/// assert_eq!(result.query_id(), query.id());
/// assert_eq!(result.source_service(), "identity-matrix");
///
/// let failed = QueryResult::error(&query, "ledger offline");
/// assert_eq!(failed.message(), Some("ledger offline"));
/// assert!(failed.found::<serde_json::Value>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryResult {
    id: Uuid,
    query_id: Uuid,
    correlation_id: String,
    source_service: String,
    status: QueryStatus,
    #[serde(default)]
    payload: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    timestamp: DateTime<Utc>,
}

impl QueryResult {
    fn new(query: &Query, status: QueryStatus, payload: Value, message: Option<String>) -> Self {
        QueryResult {
            id: Uuid::now_v7(),
            query_id: query.id,
            correlation_id: query.correlation_id.clone(),
            source_service: query.target_service.clone(),
            status,
            payload,
            message,
            timestamp: Utc::now(),
        }
    }

    /// A [`Success`](QueryStatus::Success) answer to `query`.
    ///
    /// ```
    /// # use proclaim_core::request::{Query, QueryResult};
    /// let result = QueryResult::success(&Query::new("s", "T"), 7.into());
    /// assert_eq!(result.found::<u8>()?, Some(7));
    /// # Ok::<(), proclaim_core::request::QueryFailure>(())
    /// ```
    pub fn success(query: &Query, payload: Value) -> Self {
        Self::new(query, QueryStatus::Success, payload, None)
    }

    /// A [`NotFound`](QueryStatus::NotFound) answer from a handler.
    ///
    /// ```
    /// # use proclaim_core::request::{Query, QueryResult};
    /// let result = QueryResult::not_found(&Query::new("s", "T"));
    /// assert_eq!(result.found::<u8>()?, None);
    /// # Ok::<(), proclaim_core::request::QueryFailure>(())
    /// ```
    pub fn not_found(query: &Query) -> Self {
        Self::new(query, QueryStatus::NotFound, Value::Null, None)
    }

    /// A [`NotFound`](QueryStatus::NotFound) result because no handler of the
    /// target service is there; `why` says so.
    ///
    /// ```
    /// # use proclaim_core::request::{Query, QueryResult};
    /// let result = QueryResult::no_handler(&Query::new("s", "T"), "no handler for s");
    /// assert_eq!(result.message(), Some("no handler for s"));
    /// ```
    pub fn no_handler(query: &Query, why: impl Into<String>) -> Self {
        Self::new(query, QueryStatus::NotFound, Value::Null, Some(why.into()))
    }

    /// An [`Error`](QueryStatus::Error) result with its message.
    ///
    /// ```
    /// # use proclaim_core::request::{Query, QueryResult, QueryStatus};
    /// assert_eq!(QueryResult::error(&Query::new("s", "T"), "boom").status(), QueryStatus::Error);
    /// ```
    pub fn error(query: &Query, message: impl Into<String>) -> Self {
        Self::new(query, QueryStatus::Error, Value::Null, Some(message.into()))
    }

    /// A [`Timeout`](QueryStatus::Timeout) result: no answer within `after`.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use proclaim_core::request::{Query, QueryResult};
    /// let result = QueryResult::timeout(&Query::new("s", "T"), Duration::from_millis(200));
    /// assert_eq!(result.message(), Some("no answer from s within 200ms"));
    /// ```
    pub fn timeout(query: &Query, after: Duration) -> Self {
        let message = format!(
            "no answer from {} within {}",
            query.target_service,
            humantime::format_duration(after)
        );
        Self::new(query, QueryStatus::Timeout, Value::Null, Some(message))
    }

    /// The result of a handler's outcome.
    ///
    /// ```
    /// # use proclaim_core::request::{Query, QueryError, QueryResult, QueryStatus, Reply};
    /// let query = Query::new("s", "T");
    /// let ok = QueryResult::from_outcome(&query, Ok(Reply::NotFound));
    /// assert_eq!(ok.status(), QueryStatus::NotFound);
    /// let failed = QueryResult::from_outcome(&query, Err(QueryError::new("boom")));
    /// assert_eq!(failed.message(), Some("boom"));
    /// ```
    pub fn from_outcome(query: &Query, outcome: Result<Reply, QueryError>) -> Self {
        match outcome {
            Ok(Reply::Found(payload)) => Self::success(query, payload),
            Ok(Reply::NotFound) => Self::not_found(query),
            Err(e) => Self::error(query, e.message),
        }
    }

    /// Sets the service named as the source (default: the query's target).
    ///
    /// ```
    /// # use proclaim_core::request::{Query, QueryResult};
    /// let result = QueryResult::not_found(&Query::new("s", "T")).with_source_service("s-eu");
    /// assert_eq!(result.source_service(), "s-eu");
    /// ```
    pub fn with_source_service(mut self, service: impl Into<String>) -> Self {
        self.source_service = service.into();
        self
    }

    /// The result's own id (UUIDv7).
    pub fn id(&self) -> Uuid {
        self.id
    }
    /// The id of the query answered.
    pub fn query_id(&self) -> Uuid {
        self.query_id
    }
    /// The query's correlation id.
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }
    /// The service that answered, or was asked when none answered.
    pub fn source_service(&self) -> &str {
        &self.source_service
    }
    /// How the query ended.
    pub fn status(&self) -> QueryStatus {
        self.status
    }
    /// True for [`QueryStatus::Success`].
    pub fn is_success(&self) -> bool {
        self.status == QueryStatus::Success
    }
    /// The JSON payload (`null` unless [`Success`](QueryStatus::Success)).
    pub fn payload(&self) -> &Value {
        &self.payload
    }
    /// Why the query failed, timed out or found no handler.
    pub fn message(&self) -> Option<&str> {
        self.message.as_deref()
    }
    /// When the result was formed.
    pub fn timestamp(&self) -> DateTime<Utc> {
        self.timestamp
    }

    /// The payload read as `T`, whatever the status.
    ///
    /// ```
    /// # use proclaim_core::request::{Query, QueryResult};
    /// let result = QueryResult::success(&Query::new("s", "T"), serde_json::json!({ "n": 1 }));
    /// #[derive(serde::Deserialize)]
    /// struct Answer { n: u32 }
    /// assert_eq!(result.payload_as::<Answer>()?.n, 1);
    /// # Ok::<(), proclaim_core::request::PayloadError>(())
    /// ```
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, PayloadError> {
        T::deserialize(&self.payload).map_err(PayloadError::deserialize::<T>)
    }

    /// The result as JSON bytes (its serde form), e.g. a reply body.
    ///
    /// ```
    /// # use proclaim_core::request::{Query, QueryResult};
    /// let result = QueryResult::not_found(&Query::new("s", "T"));
    /// let bytes = result.to_json_vec()?;
    /// assert_eq!(QueryResult::from_json_slice(&bytes)?, result);
    /// # Ok::<(), proclaim_core::request::PayloadError>(())
    /// ```
    pub fn to_json_vec(&self) -> Result<Vec<u8>, PayloadError> {
        serde_json::to_vec(self).map_err(PayloadError::serialize::<QueryResult>)
    }

    /// Reads a result written by [`QueryResult::to_json_vec`].
    pub fn from_json_slice(bytes: &[u8]) -> Result<Self, PayloadError> {
        serde_json::from_slice(bytes).map_err(PayloadError::deserialize::<QueryResult>)
    }

    /// The answer as the caller usually wants it: `Some(T)` on success,
    /// `None` for [`NotFound`](QueryStatus::NotFound), an error for
    /// [`Error`](QueryStatus::Error), [`Timeout`](QueryStatus::Timeout) or a
    /// payload that is not a `T`.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use proclaim_core::request::{Query, QueryResult, QueryStatus};
    /// let query = Query::new("s", "T");
    /// assert_eq!(QueryResult::success(&query, "x".into()).found::<String>()?, Some("x".into()));
    /// assert_eq!(QueryResult::not_found(&query).found::<String>()?, None);
    /// let err = QueryResult::timeout(&query, Duration::from_secs(1)).found::<String>().unwrap_err();
    /// assert_eq!(err.status(), QueryStatus::Timeout);
    /// # Ok::<(), proclaim_core::request::QueryFailure>(())
    /// ```
    pub fn found<T: DeserializeOwned>(&self) -> Result<Option<T>, QueryFailure> {
        match self.status {
            QueryStatus::Success => self
                .payload_as()
                .map(Some)
                .map_err(|e| QueryFailure::new(self, e.to_string())),
            QueryStatus::NotFound => Ok(None),
            QueryStatus::Error | QueryStatus::Timeout => Err(QueryFailure::new(
                self,
                self.message.clone().unwrap_or_default(),
            )),
        }
    }
}

/// Why [`QueryResult::found`] has no answer: the query failed, timed out, or
/// its payload could not be read.
///
/// ```
/// # use proclaim_core::request::{Query, QueryResult};
/// let query = Query::new("identity-matrix", "VerifyDonor").with_correlation_id("c-7");
/// let err = QueryResult::error(&query, "ledger offline").found::<u8>().unwrap_err();
/// assert_eq!(err.to_string(), "query c-7 to identity-matrix: error: ledger offline");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("query {correlation_id} to {service}: {status}: {message}")]
pub struct QueryFailure {
    status: QueryStatus,
    service: String,
    correlation_id: String,
    message: String,
}

impl QueryFailure {
    fn new(result: &QueryResult, message: String) -> Self {
        QueryFailure {
            status: result.status,
            service: result.source_service.clone(),
            correlation_id: result.correlation_id.clone(),
            message,
        }
    }
    /// The result's status (`Success` when only its payload was unreadable).
    pub fn status(&self) -> QueryStatus {
        self.status
    }
    /// What went wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// A payload that could not be converted to or from JSON.
///
/// ```
/// # use proclaim_core::request::Query;
/// let err = Query::new("s", "T").with_json("x".into()).payload_as::<u32>().unwrap_err();
/// assert!(err.to_string().starts_with("cannot read the payload as u32: "), "{err}");
/// ```
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} the payload as {type_name}: {source}")]
pub struct PayloadError {
    action: &'static str,
    type_name: &'static str,
    #[source]
    source: serde_json::Error,
}

impl PayloadError {
    fn serialize<T: ?Sized>(source: serde_json::Error) -> Self {
        PayloadError {
            action: "write",
            type_name: std::any::type_name::<T>(),
            source,
        }
    }
    fn deserialize<T>(source: serde_json::Error) -> Self {
        PayloadError {
            action: "read",
            type_name: std::any::type_name::<T>(),
            source,
        }
    }
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

/// A handler's answer when it has one: found (with a payload) or not found.
/// A failure is a [`QueryError`] instead.
///
/// ```
/// use proclaim_core::request::Reply;
///
/// let reply = Reply::found(&serde_json::json!({ "verified": true }))?;
/// assert!(matches!(reply, Reply::Found(_)));
/// # Ok::<(), proclaim_core::request::QueryError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The answer, as JSON.
    Found(Value),
    /// Nothing is known about what was asked.
    NotFound,
}

impl Reply {
    /// A found answer: `payload` serialized as JSON. A payload that cannot be
    /// serialized is a [`QueryError`], so handlers can use `?` or return it.
    ///
    /// ```
    /// # use proclaim_core::request::Reply;
    /// assert_eq!(Reply::found(&[1, 2])?, Reply::Found(serde_json::json!([1, 2])));
    /// # Ok::<(), proclaim_core::request::QueryError>(())
    /// ```
    pub fn found<T: Serialize + ?Sized>(payload: &T) -> Result<Reply, QueryError> {
        serde_json::to_value(payload)
            .map(Reply::Found)
            .map_err(|e| QueryError::new(PayloadError::serialize::<T>(e)))
    }
}

/// A handler's failure: the caller gets a result with status
/// [`Error`](QueryStatus::Error) and this message.
///
/// ```
/// use proclaim_core::request::QueryError;
///
/// let err = QueryError::new("ledger offline");
/// assert_eq!(err.message(), "ledger offline");
/// // Any error (or anything displayable) converts with `map_err`:
/// let parsed: Result<u32, QueryError> = "x".parse::<u32>().map_err(QueryError::new);
/// assert_eq!(parsed.unwrap_err().message(), "invalid digit found in string");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct QueryError {
    message: String,
}

impl QueryError {
    /// A failure with `message` (any [`Display`](fmt::Display) value, such as
    /// an error).
    pub fn new(message: impl fmt::Display) -> Self {
        QueryError {
            message: message.to_string(),
        }
    }
    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<PayloadError> for QueryError {
    fn from(err: PayloadError) -> Self {
        QueryError::new(err)
    }
}

/// Answers the queries of one service. Implemented for every
/// `Fn(Query) -> impl Future<Output = Result<Reply, QueryError>>` that is
/// `Send + Sync + 'static`, so an `async` closure-like `|query| async move {…}`
/// is a handler.
///
/// ```
/// use proclaim_core::request::{Query, QueryError, QueryHandler, Reply};
///
/// fn assert_handler(_: impl QueryHandler) {}
/// assert_handler(|query: Query| async move {
///     match query.payload_as::<String>()?.as_str() {
///         "donor-42" => Reply::found(&true),
///         "donor-0" => Err(QueryError::new("the ledger is offline")),
///         _ => Ok(Reply::NotFound),
///     }
/// });
/// ```
pub trait QueryHandler: Send + Sync + 'static {
    /// Answers `query`.
    fn handle(&self, query: Query) -> BoxFuture<'static, Result<Reply, QueryError>>;
}

impl<F, Fut> QueryHandler for F
where
    F: Fn(Query) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Reply, QueryError>> + Send + 'static,
{
    fn handle(&self, query: Query) -> BoxFuture<'static, Result<Reply, QueryError>> {
        Box::pin(self(query))
    }
}

/// Runs `handler` on `query` and turns whatever happens into a result: its
/// reply, its error, its panic (an [`Error`](QueryStatus::Error) result
/// naming the panic) or, past `limit`, a [`Timeout`](QueryStatus::Timeout)
/// result (the handler's future is dropped). For engines.
///
/// ```
/// # use std::time::Duration;
/// # use proclaim_core::request::{answer, Query, QueryHandler, QueryStatus, Reply};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let handler = |_: Query| async move { panic!("bad ledger"); #[allow(unreachable_code)] Ok(Reply::NotFound) };
/// let result = answer(&handler, Query::new("s", "T"), Some(Duration::from_secs(1))).await;
/// assert_eq!(result.status(), QueryStatus::Error);
/// assert_eq!(result.message(), Some("the handler of s panicked: bad ledger"));
/// # }
/// ```
pub async fn answer(
    handler: &dyn QueryHandler,
    query: Query,
    limit: Option<Duration>,
) -> QueryResult {
    let head = query.head();
    let run = async {
        // The handler's synchronous part runs here too: catch its panics.
        let future = std::panic::catch_unwind(AssertUnwindSafe(|| handler.handle(query)))?;
        AssertUnwindSafe(future).catch_unwind().await
    };
    let outcome = match limit {
        Some(limit) => match tokio::time::timeout(limit, run).await {
            Ok(outcome) => outcome,
            Err(_) => return QueryResult::timeout(&head, limit),
        },
        None => run.await,
    };
    match outcome {
        Ok(outcome) => QueryResult::from_outcome(&head, outcome),
        Err(panic) => {
            let why = panic_message(&*panic);
            tracing::error!(
                service = %head.target_service,
                query_type = %head.query_type,
                query_id = %head.id,
                "query handler panicked: {why}"
            );
            QueryResult::error(
                &head,
                format!("the handler of {} panicked: {why}", head.target_service),
            )
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a non-text panic".to_owned()
    }
}

/// The next item of `stream`, or `None` when it ends or `cancel` fires
/// first. Cancel-safe when `stream` is (an item is either returned or left in
/// the stream). For engines that receive queries from a stream (the NATS
/// engine reads its subscription with it).
///
/// ```
/// # use proclaim_core::request::next_or_cancelled;
/// # use proclaim_core::CancellationToken;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let mut numbers = futures::stream::iter([1, 2]);
/// let cancel = CancellationToken::new();
/// assert_eq!(next_or_cancelled(&mut numbers, &cancel).await, Some(1));
/// cancel.cancel();
/// assert_eq!(next_or_cancelled(&mut numbers, &cancel).await, None);
/// # }
/// ```
pub async fn next_or_cancelled<S>(stream: &mut S, cancel: &CancellationToken) -> Option<S::Item>
where
    S: Stream + Unpin,
{
    tokio::select! {
        biased;
        () = cancel.cancelled() => None,
        item = stream.next() => item,
    }
}

// ---------------------------------------------------------------------------
// The engine trait and registrations
// ---------------------------------------------------------------------------

/// A request/reply engine: sends queries and waits for their results, and
/// runs the handlers of the services it serves.
///
/// ```
/// use std::time::Duration;
/// use proclaim_core::request::{Query, QueryResult, RequestReply};
///
/// /// Works with any engine: in-process, NATS, …
/// async fn is_verified(engine: &impl RequestReply, donor: &str) -> Option<bool> {
///     let query = Query::new("identity-matrix", "VerifyDonor").with_payload(donor).ok()?;
///     let result: QueryResult = engine.dispatch_and_await(query, Duration::from_secs(2)).await;
///     result.found().ok().flatten()
/// }
/// ```
pub trait RequestReply: Send + Sync {
    /// Sends `query` to its target service and waits for the result, at
    /// most `deadline` (and no later than the query's own deadline, if it
    /// has one). Never fails and never waits longer: every outcome is a
    /// [`QueryResult`] carrying the query's correlation id — a
    /// [`Timeout`](QueryStatus::Timeout) one when the deadline passes,
    /// [`NotFound`](QueryStatus::NotFound) when no handler is registered,
    /// [`Error`](QueryStatus::Error) when the query cannot be sent or the
    /// handler fails or panics.
    fn dispatch_and_await(
        &self,
        query: Query,
        deadline: Duration,
    ) -> impl Future<Output = QueryResult> + Send;

    /// Registers `handler` to answer the queries sent to `service`, until the
    /// returned [`Registration`] is dropped or [closed](Registration::close).
    /// Several registrations of one service share its queries.
    fn register_query_handler<H: QueryHandler>(
        &self,
        service: &str,
        handler: H,
    ) -> impl Future<Output = Result<Registration, RegisterError>> + Send;
}

/// Why a handler could not be registered.
///
/// ```
/// use proclaim_core::request::{InProcessRequests, Query, RegisterError, Reply};
///
/// let engine = InProcessRequests::new();
/// let err = engine.register("", |_: Query| async { Ok(Reply::NotFound) }).unwrap_err();
/// assert!(matches!(err, RegisterError::InvalidService { .. }));
/// assert_eq!(err.to_string(), "service name \"\" is invalid: it is empty");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// The service name cannot be used by this engine.
    #[error("service name {service:?} is invalid: it {reason}")]
    InvalidService {
        /// The name given.
        service: String,
        /// Why, e.g. `contains whitespace`.
        reason: String,
    },
    /// The engine's transport refused or failed.
    #[error("cannot register a handler for {service}: {reason}")]
    Transport {
        /// The service.
        service: String,
        /// What went wrong.
        reason: String,
        /// The transport's error.
        #[source]
        source: Option<BoxError>,
    },
}

/// A registered handler: it answers queries until this is dropped or
/// [closed](Registration::close).
///
/// Dropping stops new queries from reaching the handler (at once in process;
/// as soon as the transport has unsubscribed for a broker).
/// [`close`](Registration::close) does the same and waits until that is done
/// and the queries already received have been answered.
///
/// ```
/// # use std::time::Duration;
/// # use proclaim_core::request::{InProcessRequests, Query, QueryStatus, Reply, RequestReply};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let engine = InProcessRequests::new();
/// let registration = engine.register("s", |_: Query| async { Reply::found(&1) })?;
/// assert_eq!(registration.service(), "s");
/// registration.close().await;
/// let result = engine.dispatch_and_await(Query::new("s", "T"), Duration::from_secs(1)).await;
/// assert_eq!(result.status(), QueryStatus::NotFound);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
#[must_use = "the handler is unregistered when the registration is dropped"]
pub struct Registration {
    service: String,
    active: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Registration {
    /// A registration of `service` that ends when `active` is cancelled
    /// (which dropping or closing it does). For engines.
    ///
    /// ```
    /// # use proclaim_core::request::Registration;
    /// # use proclaim_core::CancellationToken;
    /// let active = CancellationToken::new();
    /// drop(Registration::new("s", active.clone()));
    /// assert!(active.is_cancelled());
    /// ```
    pub fn new(service: impl Into<String>, active: CancellationToken) -> Self {
        Registration {
            service: service.into(),
            active,
            task: None,
        }
    }

    /// The task serving the handler, which [`Registration::close`] awaits
    /// after cancelling. For engines; the task must end soon after the
    /// token is cancelled.
    pub fn with_task(mut self, task: JoinHandle<()>) -> Self {
        self.task = Some(task);
        self
    }

    /// The service served.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// True until dropped or closed (or until the engine's task ended).
    pub fn is_active(&self) -> bool {
        !self.active.is_cancelled() && self.task.as_ref().is_none_or(|t| !t.is_finished())
    }

    /// Unregisters the handler and waits until no new query can reach it and
    /// the queries it already received are answered.
    pub async fn close(mut self) {
        self.active.cancel();
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            tracing::warn!(service = %self.service, "the query handler task failed: {e}");
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.active.cancel();
    }
}

// ---------------------------------------------------------------------------
// In-process engine
// ---------------------------------------------------------------------------

/// A [`RequestReply`] engine inside one process: handlers in a map by
/// service, each query run on a task of its own under its deadline.
///
/// No handler for the target service: [`NotFound`](QueryStatus::NotFound) at
/// once. Several registrations of one service take turns. A handler that
/// errs gives [`Error`](QueryStatus::Error) with its message; one that panics
/// gives [`Error`](QueryStatus::Error) naming the panic; one that is still
/// running at the deadline gives [`Timeout`](QueryStatus::Timeout) and is
/// cancelled (its task is aborted). Cheap to clone; clones share handlers.
///
/// ```
/// use std::time::Duration;
/// use proclaim_core::request::{InProcessRequests, Query, QueryStatus, RequestReply};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let engine = InProcessRequests::new();
/// let result = engine.dispatch_and_await(Query::new("nobody", "T"), Duration::from_secs(1)).await;
/// assert_eq!(result.status(), QueryStatus::NotFound);
/// assert_eq!(result.message(), Some("no handler is registered for service nobody"));
/// # }
/// ```
#[derive(Clone, Default)]
pub struct InProcessRequests {
    inner: Arc<Handlers>,
}

#[derive(Default)]
struct Handlers {
    by_service: Mutex<HashMap<String, Vec<Entry>>>,
    turn: AtomicUsize,
}

struct Entry {
    handler: Arc<dyn QueryHandler>,
    active: CancellationToken,
}

impl fmt::Debug for InProcessRequests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut services: Vec<String> = self.inner.lock().keys().cloned().collect();
        services.sort();
        f.debug_struct("InProcessRequests")
            .field("services", &services)
            .finish()
    }
}

impl Handlers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Entry>>> {
        // The map is consistent after every operation: a panic elsewhere
        // while it was held leaves nothing half-done.
        self.by_service
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl InProcessRequests {
    /// An engine with no handlers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for `service` (any non-empty name) at once; see
    /// [`RequestReply::register_query_handler`].
    ///
    /// ```
    /// # use proclaim_core::request::{InProcessRequests, Query, Reply};
    /// let engine = InProcessRequests::new();
    /// let registration = engine.register("s", |_: Query| async { Ok(Reply::NotFound) })?;
    /// assert!(registration.is_active());
    /// # Ok::<(), proclaim_core::request::RegisterError>(())
    /// ```
    pub fn register<H: QueryHandler>(
        &self,
        service: &str,
        handler: H,
    ) -> Result<Registration, RegisterError> {
        if service.is_empty() {
            return Err(RegisterError::InvalidService {
                service: service.to_owned(),
                reason: "is empty".into(),
            });
        }
        let active = CancellationToken::new();
        let mut map = self.inner.lock();
        map.retain(|_, entries| {
            entries.retain(|e| !e.active.is_cancelled());
            !entries.is_empty()
        });
        map.entry(service.to_owned()).or_default().push(Entry {
            handler: Arc::new(handler),
            active: active.clone(),
        });
        tracing::debug!(service, "query handler registered");
        Ok(Registration::new(service, active))
    }

    /// The handler whose turn it is for `service`, if any is registered.
    fn pick(&self, service: &str) -> Option<Arc<dyn QueryHandler>> {
        let mut map = self.inner.lock();
        let entries = map.get_mut(service)?;
        entries.retain(|e| !e.active.is_cancelled());
        if entries.is_empty() {
            map.remove(service);
            return None;
        }
        let turn = self.inner.turn.fetch_add(1, Ordering::Relaxed);
        entries.get(turn % entries.len()).map(|e| e.handler.clone())
    }

    /// Sends `query` to its service's handler; see
    /// [`RequestReply::dispatch_and_await`].
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use proclaim_core::request::{InProcessRequests, Query, QueryError, QueryStatus};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let engine = InProcessRequests::new();
    /// let _r = engine.register("ledger", |_: Query| async { Err(QueryError::new("offline")) })?;
    /// let result = engine.dispatch(Query::new("ledger", "Balance"), Duration::from_secs(1)).await;
    /// assert_eq!((result.status(), result.message()), (QueryStatus::Error, Some("offline")));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn dispatch(&self, query: Query, deadline: Duration) -> QueryResult {
        let (query, left) = query.start_deadline(deadline);
        let Some(handler) = self.pick(query.target_service()) else {
            let why = format!(
                "no handler is registered for service {}",
                query.target_service()
            );
            return QueryResult::no_handler(&query, why);
        };
        if left.is_zero() {
            return QueryResult::timeout(&query, left);
        }
        let head = query.head();
        // A task of its own: a handler that blocks its thread cannot keep
        // the caller (on another worker) past the deadline, and the task is
        // aborted when the caller stops waiting.
        let task = tokio::spawn(async move { answer(&*handler, query, None).await });
        let _abort = AbortOnDrop(task.abort_handle());
        match tokio::time::timeout(left, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => QueryResult::error(&head, format!("the handler task failed: {e}")),
            Err(_) => {
                tracing::debug!(
                    service = %head.target_service,
                    query_id = %head.id,
                    "query timed out after {left:?}"
                );
                QueryResult::timeout(&head, left)
            }
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl RequestReply for InProcessRequests {
    async fn dispatch_and_await(&self, query: Query, deadline: Duration) -> QueryResult {
        self.dispatch(query, deadline).await
    }

    async fn register_query_handler<H: QueryHandler>(
        &self,
        service: &str,
        handler: H,
    ) -> Result<Registration, RegisterError> {
        self.register(service, handler)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::HashSet;

    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Verify {
        donor: String,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Verdict {
        donor: String,
        verified: bool,
    }

    const SECOND: Duration = Duration::from_secs(1);

    fn identity_matrix(engine: &InProcessRequests) -> Registration {
        engine
            .register("identity-matrix", |query: Query| async move {
                let ask: Verify = query.payload_as()?;
                match ask.donor.as_str() {
                    "donor-0" => Err(QueryError::new("the ledger is offline")),
                    "unknown" => Ok(Reply::NotFound),
                    donor => Reply::found(&Verdict {
                        donor: donor.to_owned(),
                        verified: true,
                    }),
                }
            })
            .unwrap()
    }

    fn verify(donor: &str) -> Query {
        Query::new("identity-matrix", "VerifyDonor")
            .with_payload(&Verify {
                donor: donor.into(),
            })
            .unwrap()
    }

    #[tokio::test]
    async fn success_with_a_typed_payload() {
        let engine = InProcessRequests::new();
        let _r = identity_matrix(&engine);
        let query = verify("donor-42").with_correlation_id("pledge-drive-7");
        let id = query.id();

        let result = engine.dispatch_and_await(query, SECOND).await;
        assert_eq!(result.status(), QueryStatus::Success);
        assert_eq!(result.query_id(), id);
        assert_eq!(result.correlation_id(), "pledge-drive-7");
        assert_eq!(result.source_service(), "identity-matrix");
        assert_eq!(result.message(), None);
        assert_ne!(result.id(), id);
        assert_eq!(
            result.found::<Verdict>().unwrap(),
            Some(Verdict {
                donor: "donor-42".into(),
                verified: true
            })
        );
    }

    #[tokio::test]
    async fn the_correlation_id_defaults_to_the_query_id() {
        let engine = InProcessRequests::new();
        let _r = identity_matrix(&engine);
        let query = verify("donor-42");
        let id = query.id();
        let result = engine.dispatch_and_await(query, SECOND).await;
        assert_eq!(result.correlation_id(), id.to_string());
    }

    #[tokio::test]
    async fn no_handler_is_not_found_at_once() {
        let engine = InProcessRequests::new();
        let _other = engine
            .register("ledger", |_: Query| async { Reply::found(&1) })
            .unwrap();
        let query = verify("donor-42");
        // "At once": the answer is ready on the first poll, no timer involved.
        let result = engine
            .dispatch_and_await(query.clone(), SECOND)
            .now_or_never()
            .expect("NotFound needs no waiting");
        assert_eq!(result.status(), QueryStatus::NotFound);
        assert_eq!(result.correlation_id(), query.correlation_id());
        assert_eq!(
            result.message(),
            Some("no handler is registered for service identity-matrix")
        );
        assert_eq!(result.found::<Verdict>().unwrap(), None);
    }

    #[tokio::test]
    async fn a_handler_may_answer_not_found() {
        let engine = InProcessRequests::new();
        let _r = identity_matrix(&engine);
        let result = engine.dispatch_and_await(verify("unknown"), SECOND).await;
        assert_eq!(result.status(), QueryStatus::NotFound);
        assert_eq!(result.message(), None);
    }

    #[tokio::test]
    async fn a_handler_error_is_an_error_with_its_message() {
        let engine = InProcessRequests::new();
        let _r = identity_matrix(&engine);
        let query = verify("donor-0");
        let result = engine.dispatch_and_await(query.clone(), SECOND).await;
        assert_eq!(result.status(), QueryStatus::Error);
        assert_eq!(result.message(), Some("the ledger is offline"));
        assert_eq!(result.correlation_id(), query.correlation_id());
        let err = result.found::<Verdict>().unwrap_err();
        assert_eq!(err.status(), QueryStatus::Error);
        assert_eq!(err.message(), "the ledger is offline");

        // A payload the handler cannot read is its error too.
        let bad = Query::new("identity-matrix", "VerifyDonor").with_json(5.into());
        let result = engine.dispatch_and_await(bad, SECOND).await;
        assert_eq!(result.status(), QueryStatus::Error);
        assert!(
            result
                .message()
                .unwrap()
                .starts_with("cannot read the payload as "),
            "{result:?}"
        );
    }

    // No virtual time here: tokio's `test-util` feature is not enabled for
    // this crate's tests. The deadline is short and the handler never
    // answers, so nothing depends on how long anything takes.
    #[tokio::test]
    async fn a_slow_handler_times_out_at_the_deadline_and_is_cancelled() {
        let engine = InProcessRequests::new();
        let (started_tx, started_rx) = tokio::sync::mpsc::unbounded_channel();
        let (dropped_tx, mut dropped_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let _r = engine
            .register("slow", move |_: Query| {
                let started = started_tx.clone();
                // Dropped with the handler's future, when its task is aborted.
                let on_drop = dropped_tx.clone();
                async move {
                    let _on_drop = on_drop;
                    let _ = started.send(());
                    std::future::pending::<()>().await;
                    Ok(Reply::NotFound)
                }
            })
            .unwrap();
        let query = Query::new("slow", "T").with_correlation_id("c-slow");
        let result = engine
            .dispatch_and_await(query.clone(), Duration::from_millis(50))
            .await;
        assert_eq!(result.status(), QueryStatus::Timeout);
        assert_eq!(result.correlation_id(), "c-slow");
        assert_eq!(result.query_id(), query.id());
        assert_eq!(result.source_service(), "slow");
        assert_eq!(result.message(), Some("no answer from slow within 50ms"));
        let err = result.found::<()>().unwrap_err();
        assert_eq!(err.status(), QueryStatus::Timeout);

        // The handler ran and was then cancelled: its future is dropped (the
        // channel closes once the registration's clone is gone too).
        drop(started_rx);
        drop(_r);
        drop(engine);
        let closed = tokio::time::timeout(Duration::from_secs(30), dropped_rx.recv()).await;
        assert_eq!(closed, Ok(None), "the handler's future was not dropped");
    }

    #[tokio::test]
    async fn an_earlier_deadline_of_the_query_wins() {
        let engine = InProcessRequests::new();
        let _r = engine
            .register("slow", |_: Query| async {
                std::future::pending::<()>().await;
                Ok(Reply::NotFound)
            })
            .unwrap();
        // A deadline already past: Timeout without calling the handler, even
        // with a long dispatch timeout.
        let query =
            Query::new("slow", "T").with_deadline(Utc::now() - chrono::Duration::seconds(1));
        let result = engine
            .dispatch_and_await(query, Duration::from_secs(3600))
            .now_or_never()
            .expect("an expired query needs no waiting");
        assert_eq!(result.status(), QueryStatus::Timeout);
        let result = engine
            .dispatch_and_await(Query::new("slow", "T"), Duration::ZERO)
            .now_or_never()
            .expect("a zero deadline needs no waiting");
        assert_eq!(result.status(), QueryStatus::Timeout);
    }

    #[tokio::test]
    async fn a_panicking_handler_is_an_error_and_the_caller_is_not_hung() {
        let engine = InProcessRequests::new();
        let _async_panic = engine
            .register("panics", |query: Query| async move {
                if query.query_type() == "Boom" {
                    panic!("the ledger exploded");
                }
                Ok(Reply::NotFound)
            })
            .unwrap();
        let _sync_panic = engine
            .register("panics-early", |_: Query| -> BoxFuture<'static, _> {
                panic!("before any await")
            })
            .unwrap();

        let query = Query::new("panics", "Boom");
        let result = engine.dispatch_and_await(query.clone(), SECOND).await;
        assert_eq!(result.status(), QueryStatus::Error);
        assert_eq!(result.correlation_id(), query.correlation_id());
        assert_eq!(
            result.message(),
            Some("the handler of panics panicked: the ledger exploded")
        );
        let result = engine
            .dispatch_and_await(Query::new("panics-early", "T"), SECOND)
            .await;
        assert_eq!(
            result.message(),
            Some("the handler of panics-early panicked: before any await")
        );
        // The handler is still registered and answers the next query.
        let result = engine
            .dispatch_and_await(Query::new("panics", "Calm"), SECOND)
            .await;
        assert_eq!(result.status(), QueryStatus::NotFound);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hundred_concurrent_requests_each_get_their_own_answer() {
        let engine = InProcessRequests::new();
        let _r = engine
            .register("echo", |query: Query| async move {
                let n: u64 = query.payload_as()?;
                // Answer out of order.
                tokio::time::sleep(Duration::from_millis(100 - n % 100)).await;
                Reply::found(&serde_json::json!({ "n": n, "correlation": query.correlation_id() }))
            })
            .unwrap();

        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..100u64 {
            let engine = engine.clone();
            tasks.spawn(async move {
                let query = Query::new("echo", "Echo")
                    .with_payload(&n)
                    .unwrap()
                    .with_correlation_id(format!("c-{n}"));
                let id = query.id();
                let result = engine
                    .dispatch_and_await(query, Duration::from_secs(30))
                    .await;
                (n, id, result)
            });
        }
        let mut seen = HashSet::new();
        while let Some(joined) = tasks.join_next().await {
            let (n, id, result) = joined.unwrap();
            assert_eq!(result.status(), QueryStatus::Success, "{result:?}");
            assert_eq!(result.query_id(), id);
            assert_eq!(result.correlation_id(), format!("c-{n}"));
            assert_eq!(result.payload()["n"], n);
            assert_eq!(result.payload()["correlation"], format!("c-{n}"));
            assert!(seen.insert(n));
        }
        assert_eq!(seen.len(), 100);
    }

    #[tokio::test]
    async fn dropping_the_registration_unregisters_and_instances_take_turns() {
        let engine = InProcessRequests::new();
        let first = engine
            .register("svc", |_: Query| async { Reply::found(&"first") })
            .unwrap();
        let second = engine
            .register_query_handler("svc", |_: Query| async { Reply::found(&"second") })
            .await
            .unwrap();
        let mut answers = HashSet::new();
        for _ in 0..4 {
            let result = engine
                .dispatch_and_await(Query::new("svc", "T"), SECOND)
                .await;
            answers.insert(result.found::<String>().unwrap().unwrap());
        }
        assert_eq!(answers, HashSet::from(["first".into(), "second".into()]));

        drop(first);
        for _ in 0..4 {
            let result = engine
                .dispatch_and_await(Query::new("svc", "T"), SECOND)
                .await;
            assert_eq!(result.found::<String>().unwrap().as_deref(), Some("second"));
        }
        assert!(second.is_active());
        second.close().await;
        let result = engine
            .dispatch_and_await(Query::new("svc", "T"), SECOND)
            .await;
        assert_eq!(result.status(), QueryStatus::NotFound);
        assert_eq!(format!("{engine:?}"), "InProcessRequests { services: [] }");
    }

    #[test]
    fn results_round_trip_through_json() {
        let query = Query::new("s", "T").with_correlation_id("c-1");
        let result = QueryResult::error(&query, "boom").with_source_service("s-eu");
        let json = serde_json::to_value(&result).unwrap();
        assert_eq!(json["status"], "error");
        assert_eq!(json["correlation_id"], "c-1");
        assert_eq!(json["query_id"], query.id().to_string());
        assert_eq!(json["source_service"], "s-eu");
        assert_eq!(json["message"], "boom");
        let back: QueryResult = serde_json::from_value(json).unwrap();
        assert_eq!(back, result);

        let success = QueryResult::success(&query, serde_json::json!({ "a": 1 }));
        let json = serde_json::to_value(&success).unwrap();
        assert!(json.get("message").is_none());
        let back: Query = serde_json::from_value(serde_json::to_value(&query).unwrap()).unwrap();
        assert_eq!(back, query);
    }

    #[test]
    fn registering_an_empty_service_name_fails() {
        let engine = InProcessRequests::new();
        assert!(matches!(
            engine.register("", |_: Query| async { Ok(Reply::NotFound) }),
            Err(RegisterError::InvalidService { .. })
        ));
    }
}
