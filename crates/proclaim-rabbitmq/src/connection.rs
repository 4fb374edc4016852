//! The AMQP connection both ends make: the TCP socket is opened here rather
//! than by lapin (lapin's URL parser reads an IP address as `localhost`),
//! and a second handle on it lets an abandoned attempt or a connection
//! given up later be cut, which ends lapin's I/O for it.

use std::sync::{Arc, Mutex, PoisonError};

use async_compat::Compat;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::tcp::TLSConfig;
use lapin::{AsyncTcpStream, Connection, ConnectionProperties, ErrorKind};
use tokio::net::TcpStream;

use crate::RabbitError;
use crate::config::Target;

/// A connection just made, with the guard that cuts its socket if the
/// caller's setup (declarations, consuming) fails before it
/// [disarms](Opened::disarm) it.
pub(crate) struct Opened {
    pub(crate) connection: Connection,
    guard: SocketGuard,
}

impl Opened {
    /// The socket handle, kept by the caller to cut the connection later.
    pub(crate) fn disarm(
        self,
        url: &str,
    ) -> Result<(Connection, std::net::TcpStream), RabbitError> {
        match self.guard.disarm() {
            Some(socket) => Ok((self.connection, socket)),
            None => Err(connect_error(
                url,
                "the socket handle was lost".into(),
                None,
            )),
        }
    }
}

/// Connects to `target` (shown as `url` in errors) and completes the AMQP
/// handshake, naming the connection `name` at the broker.
pub(crate) async fn open(target: &Target, url: &str, name: &str) -> Result<Opened, RabbitError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(connect_error(
            url,
            "not called within a tokio runtime".into(),
            None,
        ));
    }
    let io_error = |e: std::io::Error| connect_error(url, describe_io(&e), Some(e.into()));
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(io_error)?;
    let _ = tcp.set_nodelay(true);
    let std_tcp = tcp.into_std().map_err(io_error)?;
    let guard = SocketGuard(Some(std_tcp.try_clone().map_err(io_error)?));
    let tcp = TcpStream::from_std(std_tcp).map_err(io_error)?;
    let slot = Arc::new(Mutex::new(Some(tcp)));
    let tls_host = target.tls.then(|| target.host.clone());
    let connect = async move |_uri, _runtime| {
        let taken = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
        let tcp = taken.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the connection to RabbitMQ was lost",
            )
        })?;
        let stream = AsyncTcpStream::Plain(Compat::new(tcp));
        match &tls_host {
            None => Ok(stream),
            Some(host) => Ok(stream.into_tls(host, TLSConfig::default()).await?),
        }
    };
    let runtime = lapin::runtime::default_runtime()
        .map_err(|e| connect_error(url, e.to_string(), Some(e)))?;
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let connection = Connection::connector(target.uri.clone(), runtime, connect, properties)
        .await
        .map_err(|e| connect_error(url, describe_connect(&e), Some(e)))?;
    Ok(Opened { connection, guard })
}

/// A connection failure at `url`.
pub(crate) fn connect_error(
    url: &str,
    reason: String,
    source: Option<lapin::Error>,
) -> RabbitError {
    RabbitError::Connect {
        url: url.to_owned(),
        reason,
        source: source.map(Into::into),
    }
}

/// Cuts a socket when dropped, unless disarmed: an abandoned connection
/// attempt takes lapin's I/O with it.
struct SocketGuard(Option<std::net::TcpStream>);

impl SocketGuard {
    fn disarm(mut self) -> Option<std::net::TcpStream> {
        self.0.take()
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Some(socket) = self.0.take() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The channel-level AMQP error in `err`, if it is one.
pub(crate) fn soft_error(err: &lapin::Error) -> Option<AMQPSoftError> {
    match err.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// A one-line reason for an I/O failure.
pub(crate) fn describe_io(err: &std::io::Error) -> String {
    // OS errors: the kind reads best ("connection refused").
    if err.raw_os_error().is_some() {
        err.kind().to_string()
    } else {
        err.to_string()
    }
}

/// A one-line reason for a lapin failure.
pub(crate) fn describe_lapin(err: &lapin::Error) -> String {
    match err.kind() {
        ErrorKind::IOError(io) => describe_io(io),
        ErrorKind::ProtocolError(amqp) => amqp.get_message().to_string(),
        _ => err.to_string(),
    }
}

/// A one-line reason for a failed AMQP handshake.
fn describe_connect(err: &lapin::Error) -> String {
    match err.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => format!(
                "the broker refused the login (wrong user or password?): {}",
                amqp.get_message()
            ),
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => format!(
                "the virtual host does not exist or the user may not open it: {}",
                amqp.get_message()
            ),
            _ => amqp.to_string(),
        },
        _ => describe_lapin(err),
    }
}
