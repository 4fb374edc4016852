//! [`RedisPublisher`]: appends outbox events to Redis streams.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use proclaim_core::binary::attributes;
use proclaim_core::{OutboxRecord, PublishError, Publisher};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, FromRedisValue, ServerErrorKind};

use crate::config::scrub;
use crate::{DATA_FIELD, RedisConfig, RedisError, StreamTemplate};

/// Prefix of the CloudEvents attribute fields (`ce-id`, `ce-type`, …).
pub const CE_PREFIX: &str = "ce-";
/// The field holding the event's `datacontenttype`.
pub const CONTENT_TYPE_FIELD: &str = "content-type";

/// Reconnection attempts the connection manager makes, after the first, each
/// time the connection is lost; callers see an error once they fail (and
/// the next call tries again). The relay backs off by itself.
const RECONNECT_RETRIES: usize = 1;

/// Appends outbox events to Redis streams with `XADD`.
///
/// Each event goes to the stream rendered from [`RedisConfig::stream`], as
/// a CloudEvent in binary content mode (see the [crate] docs for the
/// fields), trimmed with `MAXLEN ~` when [`RedisConfig::max_len`] is set.
/// [`Publisher::publish`] returns `Ok` only once Redis has answered the
/// `XADD` with the new entry's id.
///
/// Errors are classified for the relay: connection failures, timeouts and a
/// server that cannot take writes for now (`LOADING`, `BUSY`, `TRYAGAIN`,
/// `MASTERDOWN`, `READONLY`, `OOM`, `NOAUTH`, `NOPERM`, …) are transient; an
/// event the server can never take (`WRONGTYPE`: the key holds another type;
/// an entry over [`RedisConfig::max_entry_bytes`] or the server's
/// `proto-max-bulk-len`; any other `ERR` reply, such as a script error) is
/// permanent. A server error code this crate does not know is transient:
/// the relay still dead-letters the event after its maximum attempts.
///
/// The connection is a [`ConnectionManager`]: one multiplexed connection,
/// re-established by itself after it drops (a server restart, a reset). A
/// command that times out, or a reconnection that fails for a reason other
/// than I/O, makes the publisher replace the connection, so a half-open
/// connection or a server that starts refusing the credentials cannot stall
/// it for good.
///
/// The publisher is cheap to clone; clones share one connection.
#[derive(Debug, Clone)]
pub struct RedisPublisher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: redis::Client,
    manager_config: ConnectionManagerConfig,
    /// The current connection and its generation, bumped on replacement.
    connection: Mutex<(u64, ConnectionManager)>,
    config: RedisConfig,
    template: StreamTemplate,
    url: String,
    /// The server's `proto-max-bulk-len` as read at connect time, when the
    /// user may read it.
    server_max_bulk: Option<u64>,
}

/// Why one call failed.
enum CallError {
    /// The call took longer than `connect_timeout + response_timeout`.
    TimedOut(Duration),
    /// The client or the server reported an error.
    Redis(redis::RedisError),
}

impl RedisPublisher {
    /// Connects to [`RedisConfig::url`] and checks with a `PING` that the
    /// server answers.
    ///
    /// Connecting fails after [`RedisConfig::connect_timeout`] at most (the
    /// `PING` then within [`RedisConfig::response_timeout`]); once connected,
    /// the publisher reconnects by itself after any disconnection. Streams
    /// need no set-up: the first `XADD` creates each one.
    pub async fn connect(config: RedisConfig) -> Result<Self, RedisError> {
        config.validate()?;
        let client = config.client()?;
        let template = config.template()?;
        let url = config.redacted_url();
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(1));
        let connect = ConnectionManager::new_with_config(client.clone(), manager_config.clone());
        let mut manager = match tokio::time::timeout(config.connect_timeout, connect).await {
            Ok(Ok(manager)) => manager,
            Ok(Err(e)) => return Err(connect_error(&config, &url, e)),
            Err(_) => {
                return Err(RedisError::Connect {
                    url,
                    reason: format!("timed out after {:?}", config.connect_timeout),
                    source: None,
                });
            }
        };
        let ping_cmd = redis::cmd("PING");
        let ping = ping_cmd.query_async::<String>(&mut manager);
        match tokio::time::timeout(config.response_timeout, ping).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(connect_error(&config, &url, e)),
            Err(_) => {
                return Err(RedisError::Connect {
                    url,
                    reason: format!(
                        "the server did not answer PING within {:?}",
                        config.response_timeout
                    ),
                    source: None,
                });
            }
        }
        let server_max_bulk = read_max_bulk(&mut manager, config.response_timeout).await;
        tracing::info!(
            url = %url,
            stream = %template,
            proto_max_bulk_len = ?server_max_bulk,
            "connected to Redis"
        );
        Ok(RedisPublisher {
            inner: Arc::new(Inner {
                client,
                manager_config,
                connection: Mutex::new((0, manager)),
                config,
                template,
                url,
                server_max_bulk,
            }),
        })
    }

    /// The connection events are published through now, e.g. for a
    /// consumer that reads them back with `XRANGE` or `XREADGROUP`. It is a
    /// cheap handle that reconnects by itself; commands sent on it are not
    /// bounded by the publisher's overall call timeout (only by the
    /// response timeout), and it is not replaced when the publisher replaces
    /// its own after a timeout.
    pub fn connection(&self) -> ConnectionManager {
        self.current().1
    }

    /// The configuration.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// The stream key `event` is appended to.
    pub fn stream_for(&self, event: &proclaim_core::Event) -> String {
        self.inner.template.render(event)
    }

    fn current(&self) -> (u64, ConnectionManager) {
        let guard = self
            .inner
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (guard.0, guard.1.clone())
    }

    /// Replaces the connection of generation `generation` with a new one
    /// (connected on first use), unless another call already did.
    fn replace_connection(&self, generation: u64, why: &str) {
        let fresh = match ConnectionManager::new_lazy_with_config(
            self.inner.client.clone(),
            self.inner.manager_config.clone(),
        ) {
            Ok(fresh) => fresh,
            Err(e) => {
                tracing::warn!(url = %self.inner.url, error = %e, "cannot replace the Redis connection");
                return;
            }
        };
        let mut guard = self
            .inner
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if guard.0 == generation {
            *guard = (generation.wrapping_add(1), fresh);
            tracing::info!(url = %self.inner.url, reason = why, "replacing the Redis connection");
        }
    }

    /// Runs one command, bounded by `connect_timeout + response_timeout`.
    async fn call<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, CallError> {
        let bound = self.inner.config.call_bound();
        let (generation, mut connection) = self.current();
        match tokio::time::timeout(bound, cmd.query_async::<T>(&mut connection)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if e.is_timeout() {
                    // The connection may be half-open: a dead peer that never
                    // resets it would time out every later command as well.
                    self.replace_connection(generation, "a command timed out");
                } else if is_stuck(&e) {
                    // The connection manager only retries after I/O errors;
                    // after any other failed connection attempt it would
                    // return the same error for ever.
                    self.replace_connection(generation, "the connection could not be set up");
                }
                Err(CallError::Redis(e))
            }
            Err(_) => {
                self.replace_connection(generation, "a call timed out");
                Err(CallError::TimedOut(bound))
            }
        }
    }

    /// Turns a failed call into a classified [`PublishError`].
    fn classify(&self, err: CallError, what: &str, stream: &str) -> PublishError {
        match err {
            CallError::TimedOut(bound) => PublishError::transient(format!(
                "{what}: no answer from Redis at {} within {bound:?}",
                self.inner.url
            )),
            CallError::Redis(e) => {
                let (transient, reason) = classify(&e, stream, &self.inner.config);
                let reason = scrub(&reason, &self.inner.config.url);
                let message = format!("{what}: {reason}");
                let error = if transient {
                    PublishError::transient(message)
                } else {
                    PublishError::permanent(message)
                };
                // The client's error carries no URL; scrub it all the same.
                let source = scrub(&e.to_string(), &self.inner.config.url);
                if reason.contains(&source) {
                    error
                } else {
                    error.with_source(source)
                }
            }
        }
    }
}

impl Publisher for RedisPublisher {
    async fn publish(&self, record: &OutboxRecord) -> Result<(), PublishError> {
        let event = &record.event;
        let id = event.id();
        let stream = self.inner.template.render(event);
        let what = format!("cannot publish event {id} to Redis stream {stream}");

        let mut fields = attributes(event, CE_PREFIX);
        fields.push((
            CONTENT_TYPE_FIELD.to_owned(),
            event.datacontenttype().to_owned(),
        ));
        let data = event.data().get().as_bytes();
        let size: u64 = fields
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .chain([DATA_FIELD.len() + data.len()])
            .map(|n| u64::try_from(n).unwrap_or(u64::MAX))
            .fold(0, u64::saturating_add);
        let limit = self.inner.config.max_entry_bytes;
        if size > limit {
            return Err(PublishError::permanent(format!(
                "{what}: the entry ({size} bytes) is larger than max_entry_bytes ({limit} bytes)"
            )));
        }
        // A server refuses a larger argument by closing the connection, which
        // the client may see as a reset (transient) rather than the refusal:
        // check first. The data is the largest argument by far.
        let data_len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        if let Some(max_bulk) = self.inner.server_max_bulk
            && data_len > max_bulk
        {
            return Err(PublishError::permanent(format!(
                "{what}: the data ({data_len} bytes) is larger than the server's \
                 proto-max-bulk-len ({max_bulk} bytes)"
            )));
        }

        let mut cmd = redis::cmd("XADD");
        cmd.arg(&stream);
        if let Some(max_len) = self.inner.config.max_len {
            cmd.arg("MAXLEN").arg("~").arg(max_len);
        }
        cmd.arg("*");
        for (name, value) in &fields {
            cmd.arg(name).arg(value);
        }
        cmd.arg(DATA_FIELD).arg(data);

        match self.call::<String>(&cmd).await {
            Ok(entry_id) => {
                tracing::debug!(
                    event_id = %id,
                    sequence = record.sequence,
                    stream = %stream,
                    entry_id = %entry_id,
                    "event published"
                );
                Ok(())
            }
            Err(e) => {
                let error = self.classify(e, &what, &stream);
                tracing::debug!(
                    event_id = %id,
                    transient = error.is_transient(),
                    error = %error.full_message(),
                    "publish failed"
                );
                Err(error)
            }
        }
    }

    /// `PING`s the server, within the publisher's timeouts.
    async fn ready(&self) -> Result<(), PublishError> {
        match self.call::<String>(&redis::cmd("PING")).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let what = format!("Redis at {} is not ready", self.inner.url);
                let error = self.classify(e, &what, "");
                tracing::debug!(error = %error.full_message(), "Redis not ready");
                // Whatever the reason, the server cannot take events now.
                Err(PublishError::transient(error.full_message()))
            }
        }
    }
}

/// The server's `proto-max-bulk-len`, or `None` when it cannot be read
/// (`CONFIG` is often forbidden by ACLs or disabled on managed services).
async fn read_max_bulk(manager: &mut ConnectionManager, timeout: Duration) -> Option<u64> {
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("GET").arg("proto-max-bulk-len");
    let reply = tokio::time::timeout(
        timeout,
        cmd.query_async::<std::collections::HashMap<String, String>>(manager),
    )
    .await;
    match reply {
        Ok(Ok(values)) => values.get("proto-max-bulk-len")?.parse().ok(),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "cannot read proto-max-bulk-len");
            None
        }
        Err(_) => {
            tracing::debug!("timed out reading proto-max-bulk-len");
            None
        }
    }
}

/// Whether the connection manager would keep returning this error without
/// trying to connect again: a failure to set up the connection that is not
/// an I/O error.
fn is_stuck(err: &redis::RedisError) -> bool {
    matches!(
        err.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::Parse | ErrorKind::RESP3NotSupported
    )
}

/// Whether `err` is worth retrying, and a one-line reason naming `stream`.
fn classify(err: &redis::RedisError, stream: &str, config: &RedisConfig) -> (bool, String) {
    let detail = err.detail().unwrap_or_default();
    let server = |what: &str| match err.code() {
        Some(code) => format!("{what} ({code} {detail})"),
        None => format!("{what} ({err})"),
    };
    match err.kind() {
        ErrorKind::Io => (true, describe_io(err, config)),
        ErrorKind::AuthenticationFailed => (
            true,
            "Redis refused the credentials while reconnecting".into(),
        ),
        ErrorKind::Parse => (true, format!("unreadable answer from Redis ({err})")),
        ErrorKind::Server(kind) => match kind {
            ServerErrorKind::BusyLoading => {
                (true, server("Redis is loading its data set into memory"))
            }
            ServerErrorKind::TryAgain
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask => (true, server("Redis cannot take writes for now")),
            ServerErrorKind::ReadOnly => (
                true,
                server("the server is a read-only replica (a failover in progress?)"),
            ),
            ServerErrorKind::NoPerm => (
                true,
                server(&format!(
                    "the Redis user may not append to {stream} (fix its ACL; the relay retries)"
                )),
            ),
            ServerErrorKind::ResponseError if is_transient_err_reply(detail) => {
                (true, server("Redis cannot take writes for now"))
            }
            ServerErrorKind::ResponseError if detail.contains("invalid bulk length") => (
                false,
                server("the entry is larger than the server's proto-max-bulk-len"),
            ),
            ServerErrorKind::ExecAbort | ServerErrorKind::NoScript => {
                (false, server("Redis rejected the command"))
            }
            _ => (false, server("Redis rejected the entry")),
        },
        ErrorKind::Extension => match err.code().unwrap_or_default() {
            "WRONGTYPE" => (
                false,
                format!("the key {stream} exists and is not a stream (WRONGTYPE {detail})"),
            ),
            "BUSY" => (true, server("Redis is busy running a script or function")),
            "LOADING" => (true, server("Redis is loading its data set into memory")),
            "OOM" => (true, server("Redis is out of memory (maxmemory)")),
            "MISCONF" => (true, server("Redis refuses writes: it cannot persist")),
            "NOAUTH" | "WRONGPASS" => (true, server("Redis refused the connection's credentials")),
            "NOREPLICAS" | "NOTREADY" | "UNBLOCKED" => {
                (true, server("Redis cannot take writes for now"))
            }
            // An error code this crate does not know: the server's state more
            // likely than the event's fault. The relay still dead-letters an
            // event after its maximum attempts.
            _ => (true, server("Redis refused the command")),
        },
        ErrorKind::UnexpectedReturnType | ErrorKind::InvalidClientConfig => {
            (false, format!("unexpected answer from Redis ({err})"))
        }
        _ => (true, err.to_string()),
    }
}

/// `ERR` replies that describe the server's state, not the command's fault.
fn is_transient_err_reply(detail: &str) -> bool {
    let detail = detail.to_ascii_lowercase();
    detail.contains("max number of clients")
        || detail.contains("server is shutting down")
        || detail.contains("loading")
}

/// A one-line reason for an I/O failure.
fn describe_io(err: &redis::RedisError, config: &RedisConfig) -> String {
    if err.is_connection_refusal() {
        return "connection refused".into();
    }
    if err.is_timeout() {
        return format!(
            "timed out (connect_timeout {:?}, response_timeout {:?})",
            config.connect_timeout, config.response_timeout
        );
    }
    if err.is_connection_dropped() {
        return format!("the connection to Redis was lost ({err})");
    }
    err.to_string()
}

/// The error of a failed initial connection.
fn connect_error(config: &RedisConfig, url: &str, err: redis::RedisError) -> RedisError {
    let code = err.code().unwrap_or_default();
    let auth = err.kind() == ErrorKind::AuthenticationFailed
        || matches!(code, "NOAUTH" | "WRONGPASS")
        || (code == "ERR" && err.detail().is_some_and(|d| d.contains("AUTH")));
    if auth {
        let reason = if code == "NOAUTH" {
            "authentication required: the server needs a password the URL does not give".into()
        } else {
            "authentication failed: the server refused the user name or password in the URL \
             (WRONGPASS, or a password given to a server that has none)"
                .to_owned()
        };
        return RedisError::Auth {
            url: url.to_owned(),
            reason,
            source: Some(scrub(&err.to_string(), &config.url).into()),
        };
    }
    let reason = if err.is_connection_refusal() {
        "connection refused".to_owned()
    } else if err.is_timeout() {
        format!("timed out after {:?}", config.connect_timeout)
    } else {
        scrub(&err.to_string(), &config.url)
    };
    RedisError::Connect {
        url: url.to_owned(),
        reason,
        source: Some(scrub(&err.to_string(), &config.url).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(kind: ServerErrorKind, detail: &str) -> redis::RedisError {
        redis::RedisError::from((ErrorKind::Server(kind), "server error", detail.to_owned()))
    }

    fn extension(code: &str, detail: &str) -> redis::RedisError {
        redis::make_extension_error(code.to_owned(), Some(detail.to_owned()))
    }

    fn transient(err: &redis::RedisError) -> bool {
        classify(err, "s", &RedisConfig::default()).0
    }

    #[test]
    fn outages_and_busy_servers_are_transient() {
        let io = |kind: std::io::ErrorKind| redis::RedisError::from(std::io::Error::from(kind));
        for err in [
            io(std::io::ErrorKind::ConnectionRefused),
            io(std::io::ErrorKind::ConnectionReset),
            io(std::io::ErrorKind::TimedOut),
            io(std::io::ErrorKind::UnexpectedEof),
            server_error(ServerErrorKind::BusyLoading, "Redis is loading"),
            server_error(ServerErrorKind::TryAgain, "try again"),
            server_error(ServerErrorKind::MasterDown, "link down"),
            server_error(ServerErrorKind::ReadOnly, "replica"),
            server_error(ServerErrorKind::NoPerm, "no permissions"),
            server_error(
                ServerErrorKind::ResponseError,
                "max number of clients reached",
            ),
            extension("BUSY", "Redis is busy running a script"),
            extension("LOADING", "Redis is loading"),
            extension("OOM", "command not allowed when used memory > 'maxmemory'"),
            extension("MISCONF", "RDB errors"),
            extension("NOAUTH", "Authentication required."),
            extension("SOMETHINGNEW", "?"),
        ] {
            assert!(transient(&err), "{err}");
        }
        let (_, reason) = classify(
            &io(std::io::ErrorKind::ConnectionRefused),
            "s",
            &RedisConfig::default(),
        );
        assert_eq!(reason, "connection refused");
    }

    #[test]
    fn events_redis_can_never_take_are_permanent() {
        for err in [
            extension(
                "WRONGTYPE",
                "Operation against a key holding the wrong kind of value",
            ),
            server_error(ServerErrorKind::ResponseError, "Error running script"),
            server_error(
                ServerErrorKind::ResponseError,
                "Protocol error: invalid bulk length",
            ),
            server_error(ServerErrorKind::ExecAbort, "aborted"),
            server_error(ServerErrorKind::NoScript, "no script"),
        ] {
            assert!(!transient(&err), "{err}");
        }
        let (_, reason) = classify(
            &extension(
                "WRONGTYPE",
                "Operation against a key holding the wrong kind of value",
            ),
            "orders:events",
            &RedisConfig::default(),
        );
        assert_eq!(
            reason,
            "the key orders:events exists and is not a stream \
             (WRONGTYPE Operation against a key holding the wrong kind of value)"
        );
    }
}
