//! What the publisher and the consumer source share about their rumqttc
//! connection: polling the event loop with a connect timeout, and one-line
//! reasons for connection failures.

use std::time::Duration;

use rumqttc::v5::mqttbytes::Error as MqttBytesError;
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use rumqttc::v5::{ConnectionError, Event, EventLoop, StateError};

/// Polls the event loop; while disconnected the poll is a connection
/// attempt, bounded by `connect_timeout`.
pub(crate) async fn poll(
    eventloop: &mut EventLoop,
    connected: bool,
    connect_timeout: Duration,
) -> Result<Event, String> {
    if connected {
        eventloop
            .poll()
            .await
            .map_err(|e| describe(&e, connect_timeout))
    } else {
        match tokio::time::timeout(connect_timeout, eventloop.poll()).await {
            Ok(result) => result.map_err(|e| describe(&e, connect_timeout)),
            Err(_) => Err(format!("connecting timed out after {connect_timeout:?}")),
        }
    }
}

/// Whole seconds, rounded up, at least 1 (rumqttc's connection timeout unit).
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// A one-line reason for a failed connection.
pub(crate) fn describe(err: &ConnectionError, timeout: Duration) -> String {
    match err {
        ConnectionError::Io(io)
        | ConnectionError::MqttState(
            StateError::Io(io) | StateError::Deserialization(MqttBytesError::Io(io)),
        ) => {
            // OS errors read best by kind ("connection refused").
            if io.raw_os_error().is_some() {
                io.kind().to_string()
            } else {
                io.to_string()
            }
        }
        ConnectionError::Timeout(_) => format!("timed out after {timeout:?}"),
        ConnectionError::ConnectionRefused(code) => {
            format!("the broker refused the connection ({code:?})")
        }
        ConnectionError::MqttState(StateError::ConnectionAborted) => {
            "the broker closed the connection".into()
        }
        ConnectionError::MqttState(StateError::AwaitPingResp) => {
            "the broker did not answer a keep-alive ping".into()
        }
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::SessionTakenOver,
            ..
        }) => "another client connected with this client id and took the session over \
               (do two instances of the group share one instance name?)"
            .into(),
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code,
            reason_string,
        }) => match reason_string {
            Some(text) => format!("the broker disconnected ({reason_code:?}: {text})"),
            None => format!("the broker disconnected ({reason_code:?})"),
        },
        ConnectionError::NotConnAck(packet) => {
            format!("the broker answered {packet:?} instead of CONNACK")
        }
        other => other.to_string(),
    }
}
