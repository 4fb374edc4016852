//! [`KafkaConfig`]: where and how events are published.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use proclaim_core::ConfigError;
use serde::{Deserialize, Deserializer, Serialize};

use crate::TopicTemplate;

/// The port of a bootstrap server given without one.
const DEFAULT_PORT: u16 = 9092;

/// librdkafka's upper bound of `topic.metadata.propagation.max.ms`.
const MAX_MISSING_TOPIC_TIMEOUT: Duration = Duration::from_secs(3600);

/// Settings of a [`KafkaPublisher`](crate::KafkaPublisher).
///
/// Every field has a default; change what you need with the `with_*` methods.
/// [`KafkaConfig::validate`] runs when the publisher is built.
///
/// ```
/// use std::time::Duration;
/// use proclaim_kafka::KafkaConfig;
///
/// let config = KafkaConfig::default()
///     .with_bootstrap_servers("kafka://kafka-1.internal:9092,kafka-2.internal:9092")
///     .with_topic_template("campaign.{type}")
///     .with_client_id("billing-relay")
///     .with_ack_timeout(Duration::from_secs(10))
///     .with_property("compression.type", "zstd");
/// assert!(config.validate().is_ok());
/// assert_eq!(config.bootstrap_list()?, "kafka-1.internal:9092,kafka-2.internal:9092");
///
/// // The guarantees the publisher relies on cannot be switched off:
/// let weak = KafkaConfig::default().with_property("acks", "1");
/// assert!(weak.validate().is_err());
/// # Ok::<(), proclaim_core::ConfigError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// The brokers to learn the cluster from (default `127.0.0.1:9092`):
    /// `host:port` entries separated by commas, optionally in URL form
    /// (`kafka://host:port[,host:port]`). A missing port is 9092; IPv6
    /// addresses go in brackets (`[::1]:9092`). The client then talks to
    /// the brokers as the cluster advertises them.
    pub bootstrap_servers: String,
    /// How an event's topic is named (default `proclaim.events`); see
    /// [`TopicTemplate`] for the placeholders and the rules.
    pub topic_template: String,
    /// The client id the brokers see, in their logs and quotas (default
    /// `proclaim`).
    pub client_id: String,
    /// Upper bound of one publish, until the delivery report (default 30 s):
    /// librdkafka's `message.timeout.ms` (which includes its own retries)
    /// and `request.timeout.ms`. The relay's own `publish_timeout` (default
    /// 10 s) normally cuts a publish first; this bounds a publisher used
    /// without a relay.
    #[serde(with = "proclaim_core::duration::human")]
    pub ack_timeout: Duration,
    /// Upper bound of the connection check in
    /// [`KafkaPublisher::connect`](crate::KafkaPublisher::connect) and
    /// [`Publisher::ready`](proclaim_core::Publisher::ready), and of each TCP
    /// connection set-up (`socket.connection.setup.timeout.ms`, at least 1 s
    /// there) (default 5 s).
    #[serde(with = "proclaim_core::duration::human")]
    pub connect_timeout: Duration,
    /// How long a topic the cluster says does not exist is waited for (it
    /// may be being created) before its events fail with a permanent error
    /// (default 5 s): librdkafka's `topic.metadata.propagation.max.ms`,
    /// counted from the first event to that topic. Keep it below
    /// [`KafkaConfig::ack_timeout`], or the first events to a missing topic
    /// time out (a transient error) before it is declared missing.
    #[serde(with = "proclaim_core::duration::human")]
    pub missing_topic_timeout: Duration,
    /// Further librdkafka producer properties, passed through as they are
    /// (e.g. `compression.type`, `linger.ms`, `security.protocol`,
    /// `sasl.username`). Values given as numbers or booleans in a config
    /// file are taken as their text. Properties that have a field here, and
    /// those that would weaken delivery (`enable.idempotence`, `acks` other
    /// than `all`, `transactional.id`), are rejected. Values of properties
    /// whose name mentions a password or secret are hidden in `Debug`.
    #[serde(deserialize_with = "text_map")]
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: format!("127.0.0.1:{DEFAULT_PORT}"),
            topic_template: "proclaim.events".into(),
            client_id: "proclaim".into(),
            ack_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            missing_topic_timeout: Duration::from_secs(5),
            properties: BTreeMap::new(),
        }
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret(k) { "***" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topic_template", &self.topic_template)
            .field("client_id", &self.client_id)
            .field("ack_timeout", &self.ack_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("missing_topic_timeout", &self.missing_topic_timeout)
            .field("properties", &properties)
            .finish()
    }
}

impl KafkaConfig {
    /// Sets [`KafkaConfig::bootstrap_servers`].
    pub fn with_bootstrap_servers(mut self, servers: impl Into<String>) -> Self {
        self.bootstrap_servers = servers.into();
        self
    }
    /// Sets [`KafkaConfig::topic_template`].
    pub fn with_topic_template(mut self, template: impl Into<String>) -> Self {
        self.topic_template = template.into();
        self
    }
    /// Sets [`KafkaConfig::client_id`].
    pub fn with_client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }
    /// Sets [`KafkaConfig::ack_timeout`].
    pub fn with_ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }
    /// Sets [`KafkaConfig::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
    /// Sets [`KafkaConfig::missing_topic_timeout`].
    pub fn with_missing_topic_timeout(mut self, timeout: Duration) -> Self {
        self.missing_topic_timeout = timeout;
        self
    }
    /// Adds one of [`KafkaConfig::properties`].
    pub fn with_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }

    /// Checks every setting: the bootstrap servers parse, the topic template
    /// is valid, the client id is set, the durations are in range, and no
    /// extra property takes the place of a field or weakens delivery.
    /// (Whether librdkafka knows each extra property is checked when the
    /// publisher is built.)
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.servers()?;
        self.template()?;
        if self.client_id.trim().is_empty() {
            return Err(ConfigError("client_id must not be empty".into()));
        }
        if self.client_id.chars().any(char::is_control) {
            return Err(ConfigError(format!(
                "client_id {:?} contains a control character",
                self.client_id
            )));
        }
        millis("ack_timeout", self.ack_timeout)?;
        millis("connect_timeout", self.connect_timeout)?;
        if self.missing_topic_timeout > MAX_MISSING_TOPIC_TIMEOUT {
            return Err(ConfigError(format!(
                "missing_topic_timeout must be at most {MAX_MISSING_TOPIC_TIMEOUT:?}"
            )));
        }
        for (name, value) in &self.properties {
            check_property(name, value)?;
        }
        Ok(())
    }

    /// The parsed [`KafkaConfig::topic_template`].
    pub fn template(&self) -> Result<TopicTemplate, ConfigError> {
        TopicTemplate::parse(&self.topic_template)
    }

    /// The bootstrap servers as `host:port` entries, in the given order.
    ///
    /// ```
    /// use proclaim_kafka::KafkaConfig;
    /// let config = KafkaConfig::default().with_bootstrap_servers("kafka://a, b:9093, [::1]");
    /// assert_eq!(config.servers()?, ["a:9092", "b:9093", "[::1]:9092"]);
    /// # Ok::<(), proclaim_core::ConfigError>(())
    /// ```
    pub fn servers(&self) -> Result<Vec<String>, ConfigError> {
        parse_servers(&self.bootstrap_servers).map_err(|reason| {
            ConfigError(format!(
                "bootstrap_servers {:?} is invalid: {reason}",
                self.bootstrap_servers
            ))
        })
    }

    /// The bootstrap servers as librdkafka's `bootstrap.servers` takes them.
    pub fn bootstrap_list(&self) -> Result<String, ConfigError> {
        Ok(self.servers()?.join(","))
    }
}

/// `duration` in whole milliseconds as librdkafka takes it: 1 ms to
/// `i32::MAX` ms.
pub(crate) fn millis(name: &str, duration: Duration) -> Result<i32, ConfigError> {
    let ms = duration.as_millis();
    if ms == 0 {
        return Err(ConfigError(format!(
            "{name} must be at least 1ms (it is {duration:?})"
        )));
    }
    i32::try_from(ms).map_err(|_| {
        ConfigError(format!(
            "{name} must be at most {:?}",
            Duration::from_millis(i32::MAX.unsigned_abs().into())
        ))
    })
}

/// Whether a property's value is hidden in `Debug`.
fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "oauthbearer.config",
        "ssl.key.pem",
        "ssl_key",
    ]
    .iter()
    .any(|s| name.contains(s))
}

/// Rejects extra properties that a field sets, or that would weaken what
/// the publisher promises.
fn check_property(name: &str, value: &str) -> Result<(), ConfigError> {
    let fail = |reason: &str| {
        ConfigError(format!(
            "property {name:?} cannot be set in properties: {reason}"
        ))
    };
    let instead = |field: &str| fail(&format!("set {field} instead"));
    match name.trim() {
        "" => Err(ConfigError("properties has an empty property name".into())),
        "bootstrap.servers" | "metadata.broker.list" => Err(instead("bootstrap_servers")),
        "client.id" => Err(instead("client_id")),
        "message.timeout.ms" | "delivery.timeout.ms" => Err(instead("ack_timeout")),
        "socket.connection.setup.timeout.ms" => Err(instead("connect_timeout")),
        "topic.metadata.propagation.max.ms" => Err(instead("missing_topic_timeout")),
        "enable.idempotence" if value.trim() != "true" => Err(fail(
            "the publisher relies on the idempotent producer (no duplicates or reordering from \
             its own retries)",
        )),
        "acks" | "request.required.acks" if !matches!(value.trim(), "all" | "-1") => Err(fail(
            "the publisher acknowledges an event only once every in-sync replica has it (acks=all)",
        )),
        "transactional.id" => Err(fail("the publisher does not use Kafka transactions")),
        _ => Ok(()),
    }
}

/// Parses `bootstrap_servers` into `host:port` entries.
fn parse_servers(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for entry in text.split(',') {
        let entry = entry.trim();
        let entry = match entry.split_once("://") {
            Some(("kafka", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "{entry:?} has the scheme {scheme:?}; write host:port or kafka://host:port"
                ));
            }
            None => entry,
        };
        let entry = entry.strip_suffix('/').unwrap_or(entry);
        if entry.is_empty() {
            if text.trim().is_empty() {
                return Err("it names no server".into());
            }
            return Err("it has an empty entry".into());
        }
        if entry.contains(['/', '@', '?', '#']) || entry.chars().any(char::is_whitespace) {
            return Err(format!(
                "{entry:?} is not host:port (no credentials, path or query here; credentials \
                 go in properties, e.g. sasl.username)"
            ));
        }
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            let Some((ip, after)) = rest.split_once(']') else {
                return Err(format!("{entry:?} has a '[' without a matching ']'"));
            };
            if ip.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!(
                    "{entry:?} has {ip:?} in brackets, not an IPv6 address"
                ));
            }
            let port =
                match after {
                    "" => None,
                    p => Some(p.strip_prefix(':').ok_or_else(|| {
                        format!("{entry:?} has text after ']' that is not ':port'")
                    })?),
                };
            (format!("[{ip}]"), port)
        } else {
            match entry.split_once(':') {
                Some((host, port)) => {
                    if port.contains(':') {
                        return Err(format!(
                            "{entry:?} has several ':' (write an IPv6 address in brackets)"
                        ));
                    }
                    (host.to_owned(), Some(port))
                }
                None => (entry.to_owned(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("{entry:?} names no host"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => return Err(format!("{entry:?} has the port {p:?}, not 1 to 65535")),
            },
        };
        out.push(format!("{host}:{port}"));
    }
    Ok(out)
}

/// A property map whose values may be strings, numbers or booleans.
fn text_map<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        String(String),
        Bool(bool),
        Unsigned(u64),
        Signed(i64),
        Float(f64),
    }
    let map = BTreeMap::<String, Text>::deserialize(deserializer)?;
    Ok(map
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Text::String(s) => s,
                Text::Bool(b) => b.to_string(),
                Text::Unsigned(n) => n.to_string(),
                Text::Signed(n) => n.to_string(),
                Text::Float(n) => n.to_string(),
            };
            (k, v)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() -> Result<(), ConfigError> {
        let config = KafkaConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.bootstrap_list()?, "127.0.0.1:9092");
        assert_eq!(config.template()?.fixed(), Some("proclaim.events"));
        Ok(())
    }

    #[test]
    fn round_trips_through_serde_with_humantime() -> Result<(), serde_json::Error> {
        let config: KafkaConfig = serde_json::from_str(
            r#"{"bootstrap_servers":"kafka://k1:9092,k2","topic_template":"campaign.{type}",
                "client_id":"relay-1","ack_timeout":"10s","connect_timeout":"250ms",
                "missing_topic_timeout":"1s",
                "properties":{"linger.ms":5,"enable.ssl.certificate.verification":false,
                              "compression.type":"zstd"}}"#,
        )?;
        let expected = KafkaConfig::default()
            .with_bootstrap_servers("kafka://k1:9092,k2")
            .with_topic_template("campaign.{type}")
            .with_client_id("relay-1")
            .with_ack_timeout(Duration::from_secs(10))
            .with_connect_timeout(Duration::from_millis(250))
            .with_missing_topic_timeout(Duration::from_secs(1))
            .with_property("linger.ms", "5")
            .with_property("enable.ssl.certificate.verification", "false")
            .with_property("compression.type", "zstd");
        assert_eq!(config, expected);
        let json = serde_json::to_value(&expected)?;
        assert_eq!(json["ack_timeout"], "10s");
        assert_eq!(json["connect_timeout"], "250ms");
        let back: KafkaConfig = serde_json::from_value(json)?;
        assert_eq!(back, expected);

        let defaults = serde_json::to_value(KafkaConfig::default())?;
        assert_eq!(defaults["ack_timeout"], "30s");
        assert_eq!(defaults["topic_template"], "proclaim.events");
        assert_eq!(
            serde_json::from_str::<KafkaConfig>("{}")?,
            KafkaConfig::default()
        );
        assert!(serde_json::from_str::<KafkaConfig>(r#"{"brokers":"x"}"#).is_err());
        assert!(serde_json::from_str::<KafkaConfig>(r#"{"ack_timeout":"soon"}"#).is_err());
        assert!(
            serde_json::from_str::<KafkaConfig>(r#"{"properties":{"linger.ms":[1]}}"#).is_err()
        );
        Ok(())
    }

    #[test]
    fn reads_bootstrap_servers_in_every_form() -> Result<(), ConfigError> {
        let servers = |s: &str| KafkaConfig::default().with_bootstrap_servers(s).servers();
        assert_eq!(servers("127.0.0.1:9092")?, ["127.0.0.1:9092"]);
        assert_eq!(servers("kafka://a:1,b:2")?, ["a:1", "b:2"]);
        assert_eq!(servers("kafka://a:1,kafka://b:2/")?, ["a:1", "b:2"]);
        assert_eq!(servers(" a , b ")?, ["a:9092", "b:9092"]);
        assert_eq!(
            servers("[::1]:9093,[fe80::1]")?,
            ["[::1]:9093", "[fe80::1]:9092"]
        );
        for bad in [
            "",
            " ",
            "a,,b",
            "http://a:9092",
            "a:0",
            "a:99999",
            "a:port",
            ":9092",
            "::1:9092",
            "[::1",
            "[nope]:1",
            "[::1]9092",
            "kafka://user:pw@a:9092",
            "kafka://a:9092/topic",
            "a b:9092",
        ] {
            assert!(servers(bad).is_err(), "{bad:?} was accepted");
        }
        let msg = servers("http://a:9092").err().map(|e| e.to_string());
        assert_eq!(
            msg.as_deref(),
            Some(
                "invalid configuration: bootstrap_servers \"http://a:9092\" is invalid: \
                 \"http://a:9092\" has the scheme \"http\"; write host:port or kafka://host:port"
            )
        );
        Ok(())
    }

    #[test]
    fn rejects_bad_values_and_properties_that_weaken_delivery() {
        let base = KafkaConfig::default();
        let bad = [
            base.clone().with_topic_template("{kind}"),
            base.clone().with_topic_template("a/b"),
            base.clone().with_bootstrap_servers(""),
            base.clone().with_client_id(""),
            base.clone().with_client_id("a\nb"),
            base.clone().with_ack_timeout(Duration::ZERO),
            base.clone().with_ack_timeout(Duration::from_micros(10)),
            base.clone()
                .with_ack_timeout(Duration::from_secs(30 * 86_400)),
            base.clone().with_connect_timeout(Duration::ZERO),
            base.clone()
                .with_missing_topic_timeout(Duration::from_secs(7200)),
            base.clone().with_property("", "x"),
            base.clone().with_property("bootstrap.servers", "a:1"),
            base.clone().with_property("client.id", "x"),
            base.clone().with_property("message.timeout.ms", "1"),
            base.clone().with_property("delivery.timeout.ms", "1"),
            base.clone().with_property("enable.idempotence", "false"),
            base.clone().with_property("acks", "1"),
            base.clone().with_property("request.required.acks", "0"),
            base.clone().with_property("transactional.id", "t"),
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?} was accepted");
        }
        let good = [
            base.clone().with_property("acks", "all"),
            base.clone().with_property("acks", "-1"),
            base.clone().with_property("enable.idempotence", "true"),
            base.clone().with_property("linger.ms", "20"),
            base.clone().with_missing_topic_timeout(Duration::ZERO),
            base.clone().with_topic_template("{source}.{type}"),
        ];
        for config in good {
            assert_eq!(config.validate(), Ok(()), "{config:?}");
        }
        let msg = base
            .clone()
            .with_property("acks", "1")
            .validate()
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            msg.as_deref(),
            Some(
                "invalid configuration: property \"acks\" cannot be set in properties: the \
                 publisher acknowledges an event only once every in-sync replica has it \
                 (acks=all)"
            )
        );
    }

    #[test]
    fn hides_secret_properties_in_debug() {
        let config = KafkaConfig::default()
            .with_property("sasl.username", "relay")
            .with_property("sasl.password", "s3cret")
            .with_property("ssl.key.password", "s3cret2");
        let text = format!("{config:?}");
        assert!(text.contains("relay"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
}
