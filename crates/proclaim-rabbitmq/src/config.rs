//! [`RabbitConfig`]: where and how events are published.

use std::time::Duration;

use lapin::ExchangeKind;
use lapin::uri::{AMQPScheme, AMQPUri};
use proclaim_core::{ConfigError, redact_url};
use serde::{Deserialize, Serialize};

use crate::RoutingKeyTemplate;

/// The longest exchange name AMQP 0-9-1 can carry (a short string).
const MAX_EXCHANGE_LEN: usize = 255;

/// Settings of a [`RabbitPublisher`](crate::RabbitPublisher).
///
/// Every field has a default; change what you need with the `with_*` methods.
/// [`RabbitConfig::validate`] runs when the publisher is built.
///
/// ```
/// use std::time::Duration;
/// use proclaim_rabbitmq::RabbitConfig;
///
/// let config = RabbitConfig::default()
///     .with_url("amqp://relay:secret@rabbit.internal:5672/%2f")
///     .with_exchange("campaign")
///     .with_exchange_kind("topic")
///     .with_declare_exchange(true)
///     .with_routing_key_template("{source}.{type}")
///     .with_connect_timeout(Duration::from_secs(2));
/// assert!(config.validate().is_ok());
/// assert_eq!(config.redacted_url(), "amqp://***@rabbit.internal:5672/%2f");
/// assert!(RabbitConfig::default().with_routing_key_template("{kind}").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitConfig {
    /// Broker URL (default `amqp://127.0.0.1:5672/%2f`): `amqp://` or
    /// `amqps://` (TLS), `user:password@` (default guest/guest), the virtual
    /// host as the path (`%2f` is `/`), and lapin's query parameters
    /// (`heartbeat`, `frame_max`, `channel_max`). The user name and password
    /// are hidden in every message.
    pub url: String,
    /// Exchange events are published to (default `proclaim`). The empty name
    /// is the default exchange, which routes to the queue named by the
    /// routing key.
    pub exchange: String,
    /// Type of an exchange declared by this publisher (default `topic`):
    /// `direct`, `topic`, `fanout`, `headers`, or a plugin's type such as
    /// `x-consistent-hash`.
    pub exchange_kind: String,
    /// Declare the exchange (durable, of [`RabbitConfig::exchange_kind`]) at
    /// start-up and after each reconnection if it does not exist (default
    /// `false`: a missing exchange is an error, as exchanges and their queue
    /// bindings are usually provisioned by operators).
    pub declare_exchange: bool,
    /// How an event's routing key is built (default `{type}`); see
    /// [`RoutingKeyTemplate`] for the placeholders.
    pub routing_key_template: String,
    /// Upper bound of one connection attempt: TCP, TLS, the AMQP handshake
    /// and the exchange check (default 5 s).
    #[serde(with = "proclaim_core::duration::human")]
    pub connect_timeout: Duration,
    /// Upper bound of one publish once connected, until the broker's
    /// publisher confirm (default 30 s). A connection whose confirm does not
    /// come in time is dropped and made anew by the next publish. The relay's
    /// own `publish_timeout` (default 10 s) normally cuts a publish first;
    /// this bounds a publisher used without a relay.
    #[serde(with = "proclaim_core::duration::human")]
    pub confirm_timeout: Duration,
    /// Most channels open at once on the connection (default 32): each
    /// publish has a channel to itself until its confirm arrives, so this
    /// bounds the publishes in flight; more wait for a free channel.
    pub max_channels: usize,
}

impl Default for RabbitConfig {
    fn default() -> Self {
        RabbitConfig {
            url: "amqp://127.0.0.1:5672/%2f".into(),
            exchange: "proclaim".into(),
            exchange_kind: "topic".into(),
            declare_exchange: false,
            routing_key_template: "{type}".into(),
            connect_timeout: Duration::from_secs(5),
            confirm_timeout: Duration::from_secs(30),
            max_channels: 32,
        }
    }
}

impl RabbitConfig {
    /// Sets [`RabbitConfig::url`].
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }
    /// Sets [`RabbitConfig::exchange`].
    pub fn with_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }
    /// Sets [`RabbitConfig::exchange_kind`].
    pub fn with_exchange_kind(mut self, kind: impl Into<String>) -> Self {
        self.exchange_kind = kind.into();
        self
    }
    /// Sets [`RabbitConfig::declare_exchange`].
    pub fn with_declare_exchange(mut self, declare: bool) -> Self {
        self.declare_exchange = declare;
        self
    }
    /// Sets [`RabbitConfig::routing_key_template`].
    pub fn with_routing_key_template(mut self, template: impl Into<String>) -> Self {
        self.routing_key_template = template.into();
        self
    }
    /// Sets [`RabbitConfig::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
    /// Sets [`RabbitConfig::confirm_timeout`].
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }
    /// Sets [`RabbitConfig::max_channels`].
    pub fn with_max_channels(mut self, channels: usize) -> Self {
        self.max_channels = channels;
        self
    }

    /// Checks every setting: the URL parses as an AMQP URL with a host, the
    /// exchange name and kind are usable, the routing key template is valid,
    /// the durations are not zero and at least one channel is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.target()?;
        self.check_exchange()?;
        self.template()?;
        if self.connect_timeout.is_zero() {
            return Err(ConfigError(
                "connect_timeout must be greater than zero".into(),
            ));
        }
        if self.confirm_timeout.is_zero() {
            return Err(ConfigError(
                "confirm_timeout must be greater than zero".into(),
            ));
        }
        if self.max_channels == 0 {
            return Err(ConfigError("max_channels must be at least 1".into()));
        }
        Ok(())
    }

    /// The parsed [`RabbitConfig::routing_key_template`].
    pub fn template(&self) -> Result<RoutingKeyTemplate, ConfigError> {
        RoutingKeyTemplate::parse(&self.routing_key_template)
    }

    /// [`RabbitConfig::url`] with the credentials (`user:password@`) replaced
    /// by `***@`, for messages (see [`proclaim_core::redact_url`]).
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// [`RabbitConfig::exchange_kind`] as lapin names it.
    pub(crate) fn kind(&self) -> ExchangeKind {
        match self.exchange_kind.as_str() {
            "direct" => ExchangeKind::Direct,
            "topic" => ExchangeKind::Topic,
            "fanout" => ExchangeKind::Fanout,
            "headers" => ExchangeKind::Headers,
            other => ExchangeKind::Custom(other.to_owned()),
        }
    }

    /// Where to connect: the parsed URL, and the host and port for TCP.
    pub(crate) fn target(&self) -> Result<Target, ConfigError> {
        let redacted = self.redacted_url();
        let fail = |reason: String| {
            // A parser may quote the URL: never let the password through.
            let reason = reason.replace(&self.url, &redacted);
            ConfigError(format!("url {redacted:?} is invalid: {reason}"))
        };
        let url = url::Url::parse(&self.url).map_err(|e| fail(e.to_string()))?;
        let tls = match url.scheme() {
            "amqp" => false,
            "amqps" => true,
            other => {
                return Err(fail(format!(
                    "the scheme is {other:?}, not \"amqp\" or \"amqps\""
                )));
            }
        };
        // lapin's own URL parser takes any IP address for `localhost`: the
        // host is read here, and TCP connections are made by this crate.
        let host = match url.host() {
            Some(url::Host::Domain(name)) if !name.is_empty() => name.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            _ => return Err(fail("it names no host".into())),
        };
        let mut uri: AMQPUri = self.url.parse().map_err(fail)?;
        let port = url.port().unwrap_or(uri.authority.port);
        uri.authority.host = host.clone();
        uri.authority.port = port;
        debug_assert_eq!(uri.scheme == AMQPScheme::AMQPS, tls);
        Ok(Target {
            uri,
            host,
            port,
            tls,
        })
    }

    fn check_exchange(&self) -> Result<(), ConfigError> {
        let name = &self.exchange;
        if name.len() > MAX_EXCHANGE_LEN {
            return Err(ConfigError(format!(
                "exchange name {name:?} is longer than {MAX_EXCHANGE_LEN} bytes"
            )));
        }
        if name.chars().any(char::is_control) {
            return Err(ConfigError(format!(
                "exchange name {name:?} contains a control character"
            )));
        }
        if name.is_empty() && self.declare_exchange {
            return Err(ConfigError(
                "the default exchange (empty name) always exists and cannot be declared: \
                 unset declare_exchange or name an exchange"
                    .into(),
            ));
        }
        let kind = &self.exchange_kind;
        if kind.is_empty() || kind.len() > MAX_EXCHANGE_LEN || kind.chars().any(char::is_control) {
            return Err(ConfigError(format!(
                "exchange_kind {kind:?} is not an exchange type (direct, topic, fanout, headers \
                 or a plugin's type)"
            )));
        }
        Ok(())
    }
}

/// A parsed [`RabbitConfig::url`].
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The URL as lapin reads it (credentials, virtual host, tuning).
    pub(crate) uri: AMQPUri,
    /// Host name or IP address to connect to.
    pub(crate) host: String,
    /// TCP port.
    pub(crate) port: u16,
    /// `amqps`: TLS over the TCP connection.
    pub(crate) tls: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() -> Result<(), ConfigError> {
        let config = RabbitConfig::default();
        assert_eq!(config.validate(), Ok(()));
        let target = config.target()?;
        assert_eq!((target.host.as_str(), target.port), ("127.0.0.1", 5672));
        assert_eq!(target.uri.vhost, "/");
        assert_eq!(target.uri.authority.userinfo.username, "guest");
        assert!(!target.tls);
        assert_eq!(config.kind(), ExchangeKind::Topic);
        Ok(())
    }

    #[test]
    fn round_trips_through_serde_with_humantime() -> Result<(), serde_json::Error> {
        let config: RabbitConfig = serde_json::from_str(
            r#"{"exchange":"campaign","declare_exchange":true,"exchange_kind":"direct",
                "routing_key_template":"{source}.{type}","connect_timeout":"250ms",
                "confirm_timeout":"1m","max_channels":4}"#,
        )?;
        let expected = RabbitConfig::default()
            .with_exchange("campaign")
            .with_declare_exchange(true)
            .with_exchange_kind("direct")
            .with_routing_key_template("{source}.{type}")
            .with_connect_timeout(Duration::from_millis(250))
            .with_confirm_timeout(Duration::from_secs(60))
            .with_max_channels(4);
        assert_eq!(config, expected);
        let json = serde_json::to_value(&expected)?;
        assert_eq!(json["connect_timeout"], "250ms");
        assert_eq!(json["confirm_timeout"], "1m");
        let back: RabbitConfig = serde_json::from_value(json)?;
        assert_eq!(back, expected);

        let defaults = serde_json::to_value(RabbitConfig::default())?;
        assert_eq!(defaults["connect_timeout"], "5s");
        assert_eq!(defaults["confirm_timeout"], "30s");
        assert_eq!(defaults["routing_key_template"], "{type}");
        assert_eq!(
            serde_json::from_str::<RabbitConfig>("{}")?,
            RabbitConfig::default()
        );
        assert!(serde_json::from_str::<RabbitConfig>(r#"{"exchange_name":"X"}"#).is_err());
        assert!(serde_json::from_str::<RabbitConfig>(r#"{"confirm_timeout":"soon"}"#).is_err());
        Ok(())
    }

    #[test]
    fn rejects_bad_templates_urls_exchanges_and_limits() {
        let base = RabbitConfig::default();
        let bad = [
            base.clone().with_routing_key_template("{kind}"),
            base.clone().with_routing_key_template("{type"),
            base.clone().with_url(""),
            base.clone().with_url("http://127.0.0.1:5672"),
            base.clone().with_url("amqp://"),
            base.clone()
                .with_url("amqp://127.0.0.1:5672/?heartbeat=often"),
            base.clone().with_exchange("x".repeat(256)),
            base.clone().with_exchange("a\nb"),
            base.clone().with_exchange("").with_declare_exchange(true),
            base.clone().with_exchange_kind(""),
            base.clone().with_connect_timeout(Duration::ZERO),
            base.clone().with_confirm_timeout(Duration::ZERO),
            base.clone().with_max_channels(0),
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?} was accepted");
        }
        let good = [
            base.clone().with_exchange(""),
            base.clone().with_exchange_kind("x-consistent-hash"),
            base.clone().with_routing_key_template(""),
            base.clone().with_url("amqps://rabbit.example.com/prod"),
            base.clone().with_url("amqp://[::1]:5673/%2f?heartbeat=10"),
        ];
        for config in good {
            assert_eq!(config.validate(), Ok(()), "{config:?}");
        }
        assert_eq!(
            base.with_exchange_kind("x-consistent-hash").kind(),
            ExchangeKind::Custom("x-consistent-hash".into())
        );
    }

    #[test]
    fn reads_hosts_ports_and_virtual_hosts() -> Result<(), ConfigError> {
        let t = RabbitConfig::default()
            .with_url("amqps://u:p@10.1.2.3/prod")
            .target()?;
        assert_eq!((t.host.as_str(), t.port, t.tls), ("10.1.2.3", 5671, true));
        assert_eq!(t.uri.vhost, "prod");
        assert_eq!(t.uri.authority.userinfo.password, "p");
        let t = RabbitConfig::default()
            .with_url("amqp://[::1]:5673")
            .target()?;
        assert_eq!((t.host.as_str(), t.port), ("::1", 5673));
        assert_eq!(t.uri.vhost, "/");
        let t = RabbitConfig::default()
            .with_url("amqp://rabbit.internal")
            .target()?;
        assert_eq!((t.host.as_str(), t.port), ("rabbit.internal", 5672));
        Ok(())
    }

    #[test]
    fn hides_credentials() {
        for url in [
            "ftp://user:s3cret@a",
            "amqp://user:s3cret@a/?heartbeat=x",
            "amqp://user:s3cret@",
        ] {
            let err = RabbitConfig::default().with_url(url).validate().err();
            let msg = err.map(|e| e.to_string()).unwrap_or_default();
            assert!(
                msg.contains("://***@") && !msg.contains("user:") && !msg.contains("s3cret"),
                "{url}: {msg}"
            );
        }
    }
}
