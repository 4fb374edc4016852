//! [`NatsRequests`]: request/reply over core NATS (not JetStream).
//!
//! # Wire format
//!
//! A query for service `S` is a core NATS request on `<prefix>.query.<S>`
//! (prefix [`DEFAULT_REQUEST_PREFIX`] unless set), with a reply inbox:
//!
//! - body: the query's JSON payload (empty for `null`);
//! - headers: [`QUERY_ID_HEADER`] (UUID), [`CORRELATION_ID_HEADER`],
//!   [`QUERY_TYPE_HEADER`], [`DEADLINE_HEADER`] (RFC 3339, UTC, informative)
//!   and [`TIMEOUT_MS_HEADER`] (milliseconds the caller still waits when it
//!   sends). Responders enforce the deadline from the last one, counted from
//!   receipt, so that clocks need not agree; a query whose time is up when
//!   a handler would start is dropped unanswered.
//!
//! The reply is a JSON object, the serde form of
//! [`QueryResult`]:
//!
//! ```json
//! {"id":"0192…","query_id":"0192…","correlation_id":"pledge-drive-7",
//!  "source_service":"identity-matrix","status":"success",
//!  "payload":{"verified":true},"timestamp":"2026-11-02T10:00:00.123Z"}
//! ```
//!
//! `status` is `success`, `not_found`, `error` or `timeout`; `message` is
//! there for `error` (the handler's message) and absent otherwise. Handlers
//! subscribe in a queue group named after the service, so the instances of
//! one service share its queries. Any NATS client can ask (`nats req
//! proclaim-rpc.query.S '{"donor":"donor-42"}'`: without headers the query gets
//! a fresh id, its id as correlation id and a 30 s limit) or answer.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::HeaderValue;
use async_nats::{
    Client, ConnectError, ConnectErrorKind, ConnectOptions, HeaderMap, Message, Request,
    RequestErrorKind, Subscriber,
};
use bytes::Bytes;
use chrono::SecondsFormat;
use proclaim_core::request::{
    Query, QueryHandler, QueryResult, QueryStatus, RegisterError, Registration, RequestReply,
    answer, next_or_cancelled,
};
use proclaim_core::{CancellationToken, ConfigError};
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

use crate::subject::check_tokens;
use crate::{NatsConfig, NatsError};

/// Default first token(s) of query subjects: `proclaim-rpc.query.<service>`.
///
/// Not `proclaim`, the default event prefix: a JetStream stream capturing
/// `proclaim.>` would store the queries and answer them with its publish
/// acknowledgements.
pub const DEFAULT_REQUEST_PREFIX: &str = "proclaim-rpc";
/// Header with the query's id (a UUID).
pub const QUERY_ID_HEADER: &str = "Proclaim-Query-Id";
/// Header with the query's correlation id.
pub const CORRELATION_ID_HEADER: &str = "Proclaim-Correlation-Id";
/// Header with the query's type (its name).
pub const QUERY_TYPE_HEADER: &str = "Proclaim-Query-Type";
/// Header with the caller's deadline, RFC 3339 in UTC (informative: clocks
/// may differ; responders go by [`TIMEOUT_MS_HEADER`]).
pub const DEADLINE_HEADER: &str = "Proclaim-Deadline";
/// Header with the milliseconds the caller still waits when it sends.
pub const TIMEOUT_MS_HEADER: &str = "Proclaim-Timeout-Ms";

/// Handlers' limit for a query that carries no [`TIMEOUT_MS_HEADER`] (one
/// sent by another NATS client).
const LIMIT_WITHOUT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`NatsRequests::with_max_in_flight`].
const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// Bound of the flushes that make a (un)subscription effective.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound of a closing registration's wait for the server to confirm its
/// unsubscription.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`RequestReply`] engine over core NATS request/reply.
///
/// [`dispatch_and_await`](RequestReply::dispatch_and_await) sends the query
/// to `<prefix>.query.<service>` and waits at most the deadline: no responder
/// is [`NotFound`](QueryStatus::NotFound) at once (the server's "no
/// responders" status), no answer in time is
/// [`Timeout`](QueryStatus::Timeout), a handler's error or panic is
/// [`Error`](QueryStatus::Error), and so is a query that cannot be sent
/// (invalid service name, too large, connection closed). Every result carries
/// the query's correlation id; a reply that answers another query is
/// rejected.
///
/// [`register_query_handler`](RequestReply::register_query_handler)
/// subscribes in the queue group `<service>`: each query reaches one
/// instance of the service. Up to
/// [`with_max_in_flight`](NatsRequests::with_max_in_flight) queries run at
/// once per registration, each under the caller's deadline. The wire format
/// is described in the [module documentation](crate::request).
///
/// Cheap to clone; clones share the connection.
///
/// ```no_run
/// use std::time::Duration;
/// use proclaim_core::request::{Query, Reply, RequestReply};
/// use proclaim_nats::NatsRequests;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = async_nats::connect("nats://127.0.0.1:4222").await?;
/// let requests = NatsRequests::new(client).with_prefix("campaign-rpc")?;
///
/// // In the identity service:
/// let _registration = requests
///     .register_query_handler("identity-matrix", |query: Query| async move {
///         let donor: String = query.payload_as()?;
///         Reply::found(&serde_json::json!({ "donor": donor, "verified": true }))
///     })
///     .await?;
///
/// // Anywhere else:
/// let query = Query::new("identity-matrix", "VerifyDonor").with_payload("donor-42")?;
/// let result = requests.dispatch_and_await(query, Duration::from_secs(2)).await;
/// let verdict: Option<serde_json::Value> = result.found()?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct NatsRequests {
    client: Client,
    prefix: String,
    max_in_flight: usize,
}

impl NatsRequests {
    /// An engine on a client the caller holds, with the prefix
    /// [`DEFAULT_REQUEST_PREFIX`].
    pub fn new(client: Client) -> Self {
        NatsRequests {
            client,
            prefix: DEFAULT_REQUEST_PREFIX.to_owned(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }

    /// Connects to [`NatsConfig::url`] within [`NatsConfig::connect_timeout`]
    /// (the other settings concern the publisher; the prefix stays
    /// [`DEFAULT_REQUEST_PREFIX`], see [`NatsRequests::with_prefix`]).
    ///
    /// ```no_run
    /// # use proclaim_nats::{NatsConfig, NatsRequests};
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let requests = NatsRequests::connect(&NatsConfig::default().with_url("nats://nats:4222")).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(config: &NatsConfig) -> Result<Self, NatsError> {
        config.validate()?;
        let url = config.redacted_url();
        let addrs = config.server_addrs()?;
        let options = ConnectOptions::new()
            .name("proclaim-requests")
            .connection_timeout(config.connect_timeout);
        let bound = config.connect_timeout.saturating_mul(2);
        match tokio::time::timeout(bound, options.connect(addrs)).await {
            Ok(Ok(client)) => {
                tracing::info!(url = %url, "connected to NATS for requests");
                Ok(Self::new(client))
            }
            Ok(Err(e)) => Err(NatsError::Connect {
                url,
                reason: describe_connect_error(&e, config.connect_timeout),
                source: Some(e.into()),
            }),
            Err(_) => Err(NatsError::Connect {
                url,
                reason: format!("timed out after {bound:?}"),
                source: None,
            }),
        }
    }

    /// Sets the first token(s) of query subjects (default
    /// [`DEFAULT_REQUEST_PREFIX`]): valid NATS subject tokens, no wildcards.
    /// Keep it outside the subjects of every JetStream stream.
    ///
    /// ```
    /// # use proclaim_nats::NatsRequests;
    /// # async fn run(client: async_nats::Client) -> Result<(), proclaim_core::ConfigError> {
    /// let requests = NatsRequests::new(client).with_prefix("acme.rpc")?;
    /// assert_eq!(requests.subject("identity-matrix").ok().as_deref(), Some("acme.rpc.query.identity-matrix"));
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Result<Self, ConfigError> {
        let prefix = prefix.into();
        check_tokens(&prefix).map_err(|reason| {
            ConfigError(format!(
                "request prefix {prefix:?} is not a valid NATS subject prefix: it {reason}"
            ))
        })?;
        self.prefix = prefix;
        Ok(self)
    }

    /// Sets how many queries one registration handles at once (default 64,
    /// at least 1); more wait in the subscription's buffer.
    pub fn with_max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = max.max(1);
        self
    }

    /// The NATS client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The subject prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The subject of `service`'s queries, `<prefix>.query.<service>`.
    /// A service name is one subject token: not empty, no `.`, `*`, `>`,
    /// whitespace or control character.
    pub fn subject(&self, service: &str) -> Result<String, RegisterError> {
        check_service(service)?;
        Ok(format!("{}.query.{service}", self.prefix))
    }

    /// Sends `query` and waits for its result; see
    /// [`RequestReply::dispatch_and_await`].
    pub async fn dispatch(&self, query: Query, deadline: Duration) -> QueryResult {
        let (query, left) = query.start_deadline(deadline);
        let result = self.send(&query, left).await;
        tracing::debug!(
            service = %query.target_service(),
            query_type = %query.query_type(),
            query_id = %query.id(),
            correlation_id = %query.correlation_id(),
            status = %result.status(),
            "query answered"
        );
        result
    }

    async fn send(&self, query: &Query, left: Duration) -> QueryResult {
        let subject = match self.subject(query.target_service()) {
            Ok(subject) => subject,
            Err(e) => return QueryResult::error(query, e.to_string()),
        };
        if left.is_zero() {
            return QueryResult::timeout(query, left);
        }
        let (headers, body) = match encode_query(query, left) {
            Ok(encoded) => encoded,
            Err(why) => {
                return QueryResult::error(query, format!("cannot send the query: {why}"));
            }
        };
        let request = Request::new()
            .headers(headers)
            .payload(body)
            .timeout(Some(left));
        // The client times the wait for the reply; this also bounds the
        // subscribe and publish steps (e.g. while disconnected).
        let sent = tokio::time::timeout(left, self.client.send_request(subject.clone(), request));
        match sent.await {
            Err(_) => QueryResult::timeout(query, left),
            Ok(Ok(message)) => decode_reply(query, &subject, &message),
            Ok(Err(e)) => match e.kind() {
                RequestErrorKind::NoResponders => {
                    QueryResult::no_handler(query, format!("no responders on {subject}"))
                }
                RequestErrorKind::TimedOut => QueryResult::timeout(query, left),
                _ => QueryResult::error(query, format!("cannot send the query to {subject}: {e}")),
            },
        }
    }

    /// Subscribes `handler` in the queue group `service`; see
    /// [`RequestReply::register_query_handler`]. Returns once the server
    /// has the subscription, so queries sent afterwards reach it.
    pub async fn register<H: QueryHandler>(
        &self,
        service: &str,
        handler: H,
    ) -> Result<Registration, RegisterError> {
        let subject = self.subject(service)?;
        let transport =
            |reason: String, source: Option<proclaim_core::BoxError>| RegisterError::Transport {
                service: service.to_owned(),
                reason,
                source,
            };
        let subscriber = self
            .client
            .queue_subscribe(subject.clone(), service.to_owned())
            .await
            .map_err(|e| {
                transport(
                    format!("cannot subscribe to {subject}: {e}"),
                    Some(e.into()),
                )
            })?;
        match tokio::time::timeout(FLUSH_TIMEOUT, self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(transport(
                    format!("the server did not confirm the subscription to {subject}: {e}"),
                    Some(e.into()),
                ));
            }
            Err(_) => {
                return Err(transport(
                    format!(
                        "the server did not confirm the subscription to {subject} within {FLUSH_TIMEOUT:?}"
                    ),
                    None,
                ));
            }
        }
        let active = CancellationToken::new();
        let server = Server {
            client: self.client.clone(),
            service: service.into(),
            handler: Arc::new(handler),
            max_in_flight: self.max_in_flight,
        };
        let task = tokio::spawn(server.run(subscriber, active.clone()));
        tracing::info!(service, subject = %subject, "query handler registered");
        Ok(Registration::new(service, active).with_task(task))
    }
}

impl RequestReply for NatsRequests {
    async fn dispatch_and_await(&self, query: Query, deadline: Duration) -> QueryResult {
        self.dispatch(query, deadline).await
    }

    async fn register_query_handler<H: QueryHandler>(
        &self,
        service: &str,
        handler: H,
    ) -> Result<Registration, RegisterError> {
        self.register(service, handler).await
    }
}

/// A service name is one subject token (and the queue group's name).
fn check_service(service: &str) -> Result<(), RegisterError> {
    let invalid = |reason: &str| RegisterError::InvalidService {
        service: service.to_owned(),
        reason: reason.to_owned(),
    };
    if service.contains('.') {
        return Err(invalid(
            "contains '.' (a service name is one NATS subject token)",
        ));
    }
    if service.contains(['*', '>']) {
        return Err(invalid("contains a NATS wildcard ('*' or '>')"));
    }
    check_tokens(service).map_err(invalid)
}

/// The headers and body of `query`, with `left` to wait.
fn encode_query(query: &Query, left: Duration) -> Result<(HeaderMap, Bytes), String> {
    let mut headers = HeaderMap::new();
    let mut put = |name: &'static str, text: &str| -> Result<(), String> {
        let value = text
            .parse::<HeaderValue>()
            .map_err(|_| format!("its {name} header {text:?} contains a line break"))?;
        headers.insert(name, value);
        Ok(())
    };
    put(QUERY_ID_HEADER, &query.id().to_string())?;
    put(CORRELATION_ID_HEADER, query.correlation_id())?;
    put(QUERY_TYPE_HEADER, query.query_type())?;
    if let Some(at) = query.deadline() {
        put(
            DEADLINE_HEADER,
            &at.to_rfc3339_opts(SecondsFormat::Millis, true),
        )?;
    }
    // Round up: a sub-millisecond remainder is still time to answer.
    let millis = left.as_micros().div_ceil(1000);
    put(TIMEOUT_MS_HEADER, &millis.to_string())?;
    let body = if query.payload().is_null() {
        Vec::new()
    } else {
        query.payload_to_vec().map_err(|e| e.to_string())?
    };
    Ok((headers, Bytes::from(body)))
}

/// The caller's result from a reply message.
fn decode_reply(query: &Query, subject: &str, message: &Message) -> QueryResult {
    match QueryResult::from_json_slice(&message.payload) {
        Ok(result)
            if result.query_id() == query.id()
                && result.correlation_id() == query.correlation_id() =>
        {
            result
        }
        Ok(result) => QueryResult::error(
            query,
            format!(
                "the reply on {subject} answers another query (id {}, correlation id {:?})",
                result.query_id(),
                result.correlation_id()
            ),
        ),
        Err(e) if looks_like_a_jetstream_ack(&message.payload) => QueryResult::error(
            query,
            format!(
                "a JetStream stream captures {subject} and acknowledged the query instead of \
                 a handler: use a request prefix outside every stream's subjects ({e})"
            ),
        ),
        Err(e) => QueryResult::error(
            query,
            format!("the reply on {subject} is not a query result: {e}"),
        ),
    }
}

/// A JetStream publish ack: `{"stream":"…","seq":…}`.
fn looks_like_a_jetstream_ack(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body);
    text.trim_start().starts_with('{') && text.contains("\"stream\"") && text.contains("\"seq\"")
}

/// The responder side of one registration.
struct Server {
    client: Client,
    service: Arc<str>,
    handler: Arc<dyn QueryHandler>,
    max_in_flight: usize,
}

impl Server {
    /// Answers queries until `active` is cancelled (or the subscription
    /// ends), then unsubscribes: drains, so the queries the server routed
    /// here before the unsubscription are still answered, and waits for the
    /// handlers that are running.
    async fn run(self, mut subscriber: Subscriber, active: CancellationToken) {
        let mut running = JoinSet::new();
        loop {
            while running.try_join_next().is_some() {}
            if running.len() >= self.max_in_flight {
                tokio::select! {
                    () = active.cancelled() => break,
                    _ = running.join_next() => continue,
                }
            }
            match next_or_cancelled(&mut subscriber, &active).await {
                Some(message) => {
                    running.spawn(self.respond(message, Instant::now()));
                }
                None if active.is_cancelled() => break,
                None => {
                    tracing::warn!(service = %self.service, "the query subscription ended");
                    break;
                }
            }
        }
        self.stop(subscriber, &mut running).await;
    }

    async fn stop(&self, mut subscriber: Subscriber, running: &mut JoinSet<()>) {
        // Drain: the server drops the subscription, then the client closes
        // the stream once what was routed here has been delivered.
        let never = CancellationToken::new();
        let mut drained = false;
        if subscriber.drain().await.is_ok() {
            let until = Instant::now() + DRAIN_TIMEOUT;
            loop {
                match tokio::time::timeout_at(until, next_or_cancelled(&mut subscriber, &never))
                    .await
                {
                    Ok(Some(message)) => {
                        running.spawn(self.respond(message, Instant::now()));
                    }
                    Ok(None) => {
                        drained = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        if !drained {
            tracing::warn!(
                service = %self.service,
                "the server did not confirm the unsubscription within {DRAIN_TIMEOUT:?}"
            );
            let _ = subscriber.unsubscribe().await;
        }
        while running.join_next().await.is_some() {}
        // Send the last replies before reporting the registration closed.
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, self.client.flush()).await;
        tracing::info!(service = %self.service, "query handler unregistered");
    }

    /// Handles one query message and publishes the result to its reply
    /// subject.
    fn respond(&self, message: Message, received: Instant) -> impl Future<Output = ()> + use<> {
        let client = self.client.clone();
        let service = self.service.clone();
        let handler = self.handler.clone();
        async move {
            let Some(reply) = message.reply.clone() else {
                tracing::warn!(
                    service = %service,
                    subject = %message.subject,
                    "a query without a reply subject was dropped"
                );
                return;
            };
            let (query, limit) = match decode_query(&service, &message) {
                Ok(decoded) => decoded,
                Err(result) => {
                    publish_result(&client, &reply, &result).await;
                    return;
                }
            };
            let left = limit.saturating_sub(received.elapsed());
            if left.is_zero() {
                tracing::debug!(
                    service = %service,
                    query_id = %query.id(),
                    "query expired before its handler started; dropped"
                );
                return;
            }
            let (query, left) = query.start_deadline(left);
            let query_id = query.id();
            let result = answer(&*handler, query, Some(left)).await;
            if result.status() == QueryStatus::Timeout {
                // The caller has stopped waiting.
                tracing::warn!(
                    service = %service,
                    query_id = %query_id,
                    "query handler still running at the deadline; cancelled"
                );
                return;
            }
            publish_result(&client, &reply, &result).await;
        }
    }
}

/// Rebuilds the query of `message`, with the time its caller allows; a
/// message that is not a valid query gives the error result to send back.
fn decode_query(service: &str, message: &Message) -> Result<(Query, Duration), Box<QueryResult>> {
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let mut query = Query::new(service, header(QUERY_TYPE_HEADER).unwrap_or_default());
    let mut problem = None;
    if let Some(text) = header(QUERY_ID_HEADER) {
        match Uuid::parse_str(&text) {
            Ok(id) => query = query.with_id(id),
            Err(e) => problem = Some(format!("its {QUERY_ID_HEADER} {text:?} is not a UUID: {e}")),
        }
    }
    if let Some(correlation_id) = header(CORRELATION_ID_HEADER) {
        query = query.with_correlation_id(correlation_id);
    }
    let mut limit = LIMIT_WITHOUT_TIMEOUT;
    if let Some(text) = header(TIMEOUT_MS_HEADER) {
        match text.trim().parse::<u64>() {
            Ok(ms) => limit = Duration::from_millis(ms),
            Err(e) => {
                problem = Some(format!(
                    "its {TIMEOUT_MS_HEADER} {text:?} is not a number of milliseconds: {e}"
                ));
            }
        }
    }
    let query = match query.clone().with_json_slice(&message.payload) {
        Ok(query) => query,
        Err(e) => {
            problem = Some(format!("its body is not JSON: {e}"));
            query
        }
    };
    match problem {
        None => Ok((query, limit)),
        Some(why) => {
            tracing::warn!(service, subject = %message.subject, "malformed query: {why}");
            Err(Box::new(QueryResult::error(
                &query,
                format!("malformed query: {why}"),
            )))
        }
    }
}

/// Publishes `result` as the reply; an answer too large for the server is
/// replaced by an error result saying so.
async fn publish_result(client: &Client, reply: &async_nats::Subject, result: &QueryResult) {
    let body = match result.to_json_vec() {
        Ok(body) => body,
        Err(e) => {
            tracing::error!("cannot write a query result: {e}");
            return;
        }
    };
    let max_payload = client.server_info().max_payload;
    let body = if max_payload > 0 && body.len() > max_payload {
        let too_large = QueryResult::error(
            &Query::new(result.source_service(), "")
                .with_id(result.query_id())
                .with_correlation_id(result.correlation_id()),
            format!(
                "the answer ({} bytes) is larger than the server's max_payload of {max_payload} bytes",
                body.len()
            ),
        );
        match too_large.to_json_vec() {
            Ok(body) => body,
            Err(_) => return,
        }
    } else {
        body
    };
    if let Err(e) = client.publish(reply.clone(), Bytes::from(body)).await {
        tracing::warn!(
            query_id = %result.query_id(),
            "cannot send the answer to a query: {e}"
        );
    }
}

/// A one-line reason for a failed initial connection.
fn describe_connect_error(err: &ConnectError, timeout: Duration) -> String {
    match err.kind() {
        ConnectErrorKind::TimedOut => format!("timed out after {timeout:?}"),
        ConnectErrorKind::Io => {
            let io = std::iter::successors(err.source(), |e| (*e).source())
                .find_map(|e| e.downcast_ref::<std::io::Error>());
            match io {
                Some(io) if io.raw_os_error().is_some() => io.kind().to_string(),
                Some(io) => io.to_string(),
                None => err.to_string(),
            }
        }
        _ => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_are_single_subject_tokens() {
        for good in ["identity-matrix", "ledger_v2", "A1"] {
            assert!(check_service(good).is_ok(), "{good:?}");
        }
        let reason = |s: &str| match check_service(s) {
            Err(RegisterError::InvalidService { reason, .. }) => reason,
            other => panic!("{s:?}: {other:?}"),
        };
        assert_eq!(reason(""), "is empty");
        assert_eq!(reason("a b"), "contains whitespace");
        assert_eq!(
            reason("a.b"),
            "contains '.' (a service name is one NATS subject token)"
        );
        assert_eq!(reason("a*"), "contains a NATS wildcard ('*' or '>')");
        assert_eq!(reason(">"), "contains a NATS wildcard ('*' or '>')");
    }

    #[test]
    fn queries_are_encoded_in_headers_and_body() {
        let query = Query::new("s", "VerifyDonor")
            .with_correlation_id("c-1")
            .with_json_slice(br#"{"donor":"donor-42"}"#)
            .map_err(|e| e.to_string());
        let Ok(query) = query else {
            panic!("{query:?}")
        };
        let (query, _) = query.start_deadline(Duration::from_millis(1500));
        let Ok((headers, body)) = encode_query(&query, Duration::from_micros(1_499_001)) else {
            panic!("cannot encode")
        };
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(get(QUERY_ID_HEADER), Some(query.id().to_string()));
        assert_eq!(get(CORRELATION_ID_HEADER).as_deref(), Some("c-1"));
        assert_eq!(get(QUERY_TYPE_HEADER).as_deref(), Some("VerifyDonor"));
        assert_eq!(get(TIMEOUT_MS_HEADER).as_deref(), Some("1500"));
        assert!(get(DEADLINE_HEADER).is_some_and(|d| d.ends_with('Z')));
        assert_eq!(&body[..], br#"{"donor":"donor-42"}"#);

        let bad = Query::new("s", "T").with_correlation_id("a\r\nb");
        assert_eq!(
            encode_query(&bad, Duration::from_secs(1)).err().as_deref(),
            Some("its Proclaim-Correlation-Id header \"a\\r\\nb\" contains a line break")
        );
    }

    #[test]
    fn recognizes_jetstream_acks() {
        assert!(looks_like_a_jetstream_ack(br#"{"stream":"T_1","seq":3}"#));
        assert!(!looks_like_a_jetstream_ack(b"not json"));
    }
}
