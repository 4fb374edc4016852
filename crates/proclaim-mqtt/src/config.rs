//! [`MqttConfig`]: where and how events are published.

use std::time::Duration;

use proclaim_core::{ConfigError, redact_url};
use serde::{Deserialize, Serialize};

use crate::TopicTemplate;
use crate::url::{self, BrokerUrl};

/// How an event is laid out in an MQTT message (CloudEvents MQTT binding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentMode {
    /// Binary content mode (the default): the attributes in MQTT 5 user
    /// properties, the data's content type in the content type property, the
    /// JSON data unchanged as the payload. Needs MQTT 5 subscribers.
    #[default]
    Binary,
    /// Structured content mode: the whole event as one CloudEvents JSON
    /// document (`application/cloudevents+json`). MQTT 3.1.1 subscribers,
    /// which never see user properties, can read it.
    Structured,
}

/// Settings of an [`MqttPublisher`](crate::MqttPublisher).
///
/// Every field has a default; change what you need with the `with_*` methods.
/// [`MqttConfig::validate`] runs when the publisher connects.
///
/// ```
/// use std::time::Duration;
/// use proclaim_mqtt::{ContentMode, MqttConfig};
///
/// let config = MqttConfig::default()
///     .with_url("mqtt://mqtt.internal:1883")
///     .with_topic_template("campaign/{source}/{type}")
///     .with_qos(2)
///     .with_mode(ContentMode::Structured)
///     .with_connect_timeout(Duration::from_secs(2));
/// assert!(config.validate().is_ok());
/// assert!(MqttConfig::default().with_qos(0).validate().is_err());
/// assert!(MqttConfig::default().with_topic_template("campaign/#").validate().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker URL (default `mqtt://127.0.0.1:1883`): `mqtt://` or `tcp://`,
    /// an optional `user:password@` (percent-encoded), host and port
    /// (default 1883). Credentials are hidden in every message. TLS
    /// (`mqtts://`) is not supported.
    pub url: String,
    /// MQTT client identifier. Default (`None`): `proclaim-` and 12 random
    /// hex digits, drawn once per publisher and kept across its
    /// reconnections. Two clients with the same identifier take each other's
    /// connection over, so give every publisher (and every relay instance)
    /// its own.
    pub client_id: Option<String>,
    /// How an event's topic is built (default `proclaim/{type}`); see
    /// [`TopicTemplate`] for the placeholders.
    pub topic_template: String,
    /// Quality of service of every publish: 1 (at least once, acknowledged
    /// by PUBACK; the default) or 2 (exactly once between client and broker,
    /// acknowledged by PUBCOMP). 0 is rejected: it has no acknowledgement, so
    /// no at-least-once delivery.
    pub qos: u8,
    /// CloudEvents content mode (default binary).
    pub mode: ContentMode,
    /// Upper bound of a connection attempt: TCP connect, MQTT CONNECT and
    /// CONNACK (default 5 s). The first connection is tried once; after a
    /// disconnection the publisher reconnects by itself, forever, backing off
    /// from 100 ms to 5 s between attempts. A publish waits at most this long
    /// for a connection.
    #[serde(with = "proclaim_core::duration::human")]
    pub connect_timeout: Duration,
    /// Upper bound of a publish once connected: waiting for a free in-flight
    /// slot and for the broker's acknowledgement (default 30 s). When it
    /// passes, the publish fails (transient) and the connection is replaced,
    /// as a broker that does not acknowledge is unreachable in all but name.
    /// The relay's own `publish_timeout` (default 10 s) normally cuts a
    /// publish first; this bounds a publisher used without a relay.
    #[serde(with = "proclaim_core::duration::human")]
    pub ack_timeout: Duration,
    /// MQTT keep-alive (default 30 s, at least 5 s): the client pings the
    /// broker this often and drops a connection whose ping goes unanswered
    /// for as long again, so a silent broker is noticed even with nothing
    /// to publish.
    #[serde(with = "proclaim_core::duration::human")]
    pub keep_alive: Duration,
    /// Most publishes awaiting their acknowledgement at once (default 100).
    /// The broker's own receive maximum (Mosquitto: 20) also applies; the
    /// rest wait in order.
    pub max_inflight: u16,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: "mqtt://127.0.0.1:1883".into(),
            client_id: None,
            topic_template: "proclaim/{type}".into(),
            qos: 1,
            mode: ContentMode::Binary,
            connect_timeout: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(30),
            max_inflight: 100,
        }
    }
}

/// Shows the URL with its credentials hidden.
impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("url", &self.redacted_url())
            .field("client_id", &self.client_id)
            .field("topic_template", &self.topic_template)
            .field("qos", &self.qos)
            .field("mode", &self.mode)
            .field("connect_timeout", &self.connect_timeout)
            .field("ack_timeout", &self.ack_timeout)
            .field("keep_alive", &self.keep_alive)
            .field("max_inflight", &self.max_inflight)
            .finish()
    }
}

impl MqttConfig {
    /// Sets [`MqttConfig::url`].
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }
    /// Sets [`MqttConfig::client_id`].
    pub fn with_client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = Some(client_id.into());
        self
    }
    /// Sets [`MqttConfig::topic_template`].
    pub fn with_topic_template(mut self, template: impl Into<String>) -> Self {
        self.topic_template = template.into();
        self
    }
    /// Sets [`MqttConfig::qos`] (1 or 2).
    pub fn with_qos(mut self, qos: u8) -> Self {
        self.qos = qos;
        self
    }
    /// Sets [`MqttConfig::mode`].
    pub fn with_mode(mut self, mode: ContentMode) -> Self {
        self.mode = mode;
        self
    }
    /// Sets [`MqttConfig::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
    /// Sets [`MqttConfig::ack_timeout`].
    pub fn with_ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }
    /// Sets [`MqttConfig::keep_alive`].
    pub fn with_keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = keep_alive;
        self
    }
    /// Sets [`MqttConfig::max_inflight`].
    pub fn with_max_inflight(mut self, max_inflight: u16) -> Self {
        self.max_inflight = max_inflight;
        self
    }

    /// Checks every setting: the URL parses (a plain `mqtt://` URL), the
    /// client id is usable, the template is valid, QoS is 1 or 2, the
    /// timeouts are not zero, the keep-alive is between 5 s and 65535 s, and
    /// at least one publish may be in flight. Messages never show the
    /// password.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.broker()?;
        if let Some(id) = &self.client_id {
            if id.is_empty() {
                return Err(ConfigError(
                    "client_id is empty (leave it out for a generated one)".into(),
                ));
            }
            if id.len() > 65_535 || id.chars().any(char::is_control) {
                return Err(ConfigError(format!(
                    "client_id {id:?} is not a valid MQTT client identifier"
                )));
            }
        }
        self.template()?;
        match self.qos {
            1 | 2 => {}
            0 => {
                return Err(ConfigError(
                    "qos 0 is not allowed: the broker does not acknowledge QoS 0 messages, so \
                     delivery could not be at least once (use 1 or 2)"
                        .into(),
                ));
            }
            n => return Err(ConfigError(format!("qos {n} does not exist (use 1 or 2)"))),
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError(
                "connect_timeout must be greater than zero".into(),
            ));
        }
        if self.ack_timeout.is_zero() {
            return Err(ConfigError("ack_timeout must be greater than zero".into()));
        }
        if self.keep_alive < Duration::from_secs(5) || self.keep_alive.as_secs() > 65_535 {
            return Err(ConfigError(format!(
                "keep_alive {} is out of range (5s to 65535s)",
                humantime::format_duration(self.keep_alive)
            )));
        }
        if self.max_inflight == 0 {
            return Err(ConfigError("max_inflight must be at least 1".into()));
        }
        Ok(())
    }

    /// The parsed [`MqttConfig::topic_template`].
    pub fn template(&self) -> Result<TopicTemplate, ConfigError> {
        TopicTemplate::parse(&self.topic_template)
    }

    /// [`MqttConfig::url`] with any credentials replaced by `***`, for messages
    /// (see [`proclaim_core::redact_url`]).
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    pub(crate) fn broker(&self) -> Result<BrokerUrl, ConfigError> {
        url::parse(&self.url)
            .map_err(|reason| ConfigError(format!("url {:?} {reason}", self.redacted_url())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let config = MqttConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.qos, 1);
        assert_eq!(config.mode, ContentMode::Binary);
        assert_eq!(config.connect_timeout, Duration::from_secs(5));
        assert_eq!(config.ack_timeout, Duration::from_secs(30));
        assert_eq!(config.topic_template, "proclaim/{type}");
    }

    #[test]
    fn round_trips_through_serde_with_humantime() -> Result<(), serde_json::Error> {
        let config: MqttConfig = serde_json::from_str(
            r#"{"url":"mqtt://broker:1884","qos":2,"mode":"structured",
                "topic_template":"acme/{type}/{subject}","connect_timeout":"250ms",
                "ack_timeout":"1m","keep_alive":"10s","client_id":"relay-1","max_inflight":8}"#,
        )?;
        let expected = MqttConfig::default()
            .with_url("mqtt://broker:1884")
            .with_qos(2)
            .with_mode(ContentMode::Structured)
            .with_topic_template("acme/{type}/{subject}")
            .with_connect_timeout(Duration::from_millis(250))
            .with_ack_timeout(Duration::from_secs(60))
            .with_keep_alive(Duration::from_secs(10))
            .with_client_id("relay-1")
            .with_max_inflight(8);
        assert_eq!(config, expected);
        assert_eq!(config.validate(), Ok(()));

        let json = serde_json::to_value(MqttConfig::default())?;
        assert_eq!(json["connect_timeout"], "5s");
        assert_eq!(json["ack_timeout"], "30s");
        assert_eq!(json["mode"], "binary");
        assert_eq!(json["qos"], 1);
        let back: MqttConfig = serde_json::from_value(json)?;
        assert_eq!(back, MqttConfig::default());
        let back: MqttConfig = serde_json::from_str(&serde_json::to_string(&expected)?)?;
        assert_eq!(back, expected);

        // Absent fields take their defaults; unknown ones are refused.
        let partial: MqttConfig = serde_json::from_str(r#"{"qos":2}"#)?;
        assert_eq!(partial, MqttConfig::default().with_qos(2));
        assert!(serde_json::from_str::<MqttConfig>(r#"{"topic":"x"}"#).is_err());
        assert!(serde_json::from_str::<MqttConfig>(r#"{"mode":"json"}"#).is_err());
        assert!(serde_json::from_str::<MqttConfig>(r#"{"ack_timeout":"soon"}"#).is_err());
        Ok(())
    }

    #[test]
    fn rejects_qos_0_and_unknown_qos() {
        let zero = MqttConfig::default().with_qos(0).validate().err();
        assert!(
            zero.map(|e| e.to_string())
                .is_some_and(|m| m.contains("qos 0 is not allowed")),
        );
        assert!(MqttConfig::default().with_qos(3).validate().is_err());
        assert!(MqttConfig::default().with_qos(2).validate().is_ok());
    }

    #[test]
    fn rejects_bad_templates_urls_durations_and_ids() {
        let base = MqttConfig::default();
        for template in [
            "p/{kind}",
            "p/#",
            "p/+/{type}",
            "p//{type}",
            "$SYS/{type}",
            "",
        ] {
            assert!(
                base.clone()
                    .with_topic_template(template)
                    .validate()
                    .is_err(),
                "{template:?} was accepted"
            );
        }
        for url in ["", "127.0.0.1:1883", "mqtts://h", "http://h", "mqtt://h:0"] {
            assert!(
                base.clone().with_url(url).validate().is_err(),
                "{url:?} was accepted"
            );
        }
        assert!(
            base.clone()
                .with_connect_timeout(Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(
            base.clone()
                .with_ack_timeout(Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(
            base.clone()
                .with_keep_alive(Duration::from_secs(4))
                .validate()
                .is_err()
        );
        assert!(
            base.clone()
                .with_keep_alive(Duration::from_secs(70_000))
                .validate()
                .is_err()
        );
        assert!(base.clone().with_max_inflight(0).validate().is_err());
        assert!(base.clone().with_client_id("").validate().is_err());
        assert!(base.clone().with_client_id("a\nb").validate().is_err());
        assert!(base.with_url("tcp://[::1]:1884").validate().is_ok());
    }

    #[test]
    fn hides_passwords() {
        let config = MqttConfig::default().with_url("mqtt://relay:s3cret@broker:1883");
        assert_eq!(config.redacted_url(), "mqtt://***@broker:1883");
        assert_eq!(config.validate(), Ok(()));
        let bad = MqttConfig::default().with_url("mqtts://relay:s3cret@broker");
        let msg = bad
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("mqtts://***@broker") && !msg.contains("s3cret"),
            "{msg}"
        );
        let debug = format!("{:?} {config:?}", config.broker());
        assert!(!debug.contains("s3cret"), "{debug}");
    }
}
