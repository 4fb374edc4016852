//! Destinations: a broker chosen at run time, from a URL or a config section.
//!
//! A [`Destination`] is the settings of one publisher (NATS JetStream,
//! RabbitMQ, Redis Streams, MQTT, an HTTP webhook, Kafka), whichever it is;
//! [`Destination::connect`] gives an [`AnyPublisher`], which the relay drives
//! like any other [`Publisher`]. `proclaim relay --destination URL` and the
//! config file's `[[destination]]` sections are built on this.
//!
//! # Destination URLs
//!
//! The scheme chooses the broker; query parameters set the publisher's
//! settings (any field of its config, by name); `name` and `types` name the
//! destination and choose the event types it takes (a [`TypePattern`]).
//!
//! | scheme | broker | example |
//! |---|---|---|
//! | `nats://` | NATS JetStream | `nats://127.0.0.1:4222?stream=PROCLAIM&create_stream=true` |
//! | `amqp://`, `amqps://` | RabbitMQ | `amqp://guest:guest@127.0.0.1:5672/%2f?exchange=events&routing_key={type}` |
//! | `redis://` | Redis Streams | `redis://127.0.0.1:6379?stream=orders:{type}&maxlen=100000` |
//! | `mqtt://` | MQTT 5 | `mqtt://127.0.0.1:1883?topic=campaign/{type}&qos=1` |
//! | `http://`, `https://` | webhook | `https://hooks.example.com/events#secret_env=HOOK_SECRET&types=Donor*` |
//! | `kafka://` | Kafka | `kafka://127.0.0.1:9092,127.0.0.1:9093?topic=campaign.{type}` |
//!
//! A webhook's query belongs to its endpoint, so its settings go in the
//! fragment (`#…`), which is never sent. `secret_env=VAR` reads the signing
//! secret from the environment variable `VAR`, so it never appears on a
//! command line. Parameters the broker's own URL syntax defines (AMQP's
//! `heartbeat`, `channel_max`, `frame_max`, `connection_timeout`,
//! `auth_mechanism`; Redis' `protocol`) stay in the URL; any other unknown
//! parameter is an error naming the ones accepted.
//!
//! ```
//! use proclaim::destination::NamedDestination;
//!
//! let d = NamedDestination::parse("nats://127.0.0.1:4222?stream=ORDERS&types=Order*")?;
//! assert_eq!(d.name, "nats");
//! assert_eq!(d.types.as_str(), "Order*");
//! assert!(d.types.matches("OrderPlaced"));
//! assert_eq!(d.destination.broker(), "NATS JetStream");
//!
//! let err = NamedDestination::parse("nats://127.0.0.1:4222?strem=ORDERS").unwrap_err();
//! assert!(err.to_string().contains("unknown option \"strem\""), "{err}");
//! # Ok::<(), proclaim::ConfigError>(())
//! ```

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::fanout::TypePattern;
use crate::{ConfigError, OutboxRecord, PublishError, Publisher, redact_url};

#[cfg(feature = "kafka")]
use crate::kafka::{KafkaConfig, KafkaError, KafkaPublisher};
#[cfg(feature = "mqtt")]
use crate::mqtt::{MqttConfig, MqttError, MqttPublisher};
#[cfg(feature = "nats")]
use crate::nats::{NatsConfig, NatsError, NatsPublisher};
#[cfg(feature = "rabbitmq")]
use crate::rabbitmq::{RabbitConfig, RabbitError, RabbitPublisher};
#[cfg(feature = "redis")]
use crate::redis::{RedisConfig, RedisError, RedisPublisher};
#[cfg(feature = "webhook")]
use crate::webhook::{WebhookConfig, WebhookError, WebhookPublisher, WebhookSecret};

/// The settings of one publisher, whichever broker it speaks to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Destination {
    /// NATS JetStream (feature `nats`).
    #[cfg(feature = "nats")]
    Nats(NatsConfig),
    /// RabbitMQ (feature `rabbitmq`).
    #[cfg(feature = "rabbitmq")]
    RabbitMq(RabbitConfig),
    /// Redis Streams (feature `redis`).
    #[cfg(feature = "redis")]
    Redis(RedisConfig),
    /// MQTT 5 (feature `mqtt`).
    #[cfg(feature = "mqtt")]
    Mqtt(MqttConfig),
    /// An HTTP webhook (feature `webhook`).
    #[cfg(feature = "webhook")]
    Webhook(WebhookConfig),
    /// Kafka (feature `kafka`).
    #[cfg(feature = "kafka")]
    Kafka(KafkaConfig),
}

/// Why a [`Destination`] could not be connected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DestinationError {
    /// NATS.
    #[cfg(feature = "nats")]
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// RabbitMQ.
    #[cfg(feature = "rabbitmq")]
    #[error(transparent)]
    RabbitMq(#[from] RabbitError),
    /// Redis.
    #[cfg(feature = "redis")]
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// MQTT.
    #[cfg(feature = "mqtt")]
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    /// Webhook.
    #[cfg(feature = "webhook")]
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    /// Kafka.
    #[cfg(feature = "kafka")]
    #[error(transparent)]
    Kafka(#[from] KafkaError),
}

/// The publisher of a [`Destination`], whichever broker it is.
// One per destination, living as long as its relay: the size of the largest
// variant costs nothing, and boxing it would add a pointer hop per publish.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
#[non_exhaustive]
pub enum AnyPublisher {
    /// NATS JetStream.
    #[cfg(feature = "nats")]
    Nats(NatsPublisher),
    /// RabbitMQ.
    #[cfg(feature = "rabbitmq")]
    RabbitMq(RabbitPublisher),
    /// Redis Streams.
    #[cfg(feature = "redis")]
    Redis(RedisPublisher),
    /// MQTT.
    #[cfg(feature = "mqtt")]
    Mqtt(MqttPublisher),
    /// Webhook.
    #[cfg(feature = "webhook")]
    Webhook(WebhookPublisher),
    /// Kafka.
    #[cfg(feature = "kafka")]
    Kafka(KafkaPublisher),
}

/// Runs `$body` with `$p` bound to the inner value of whichever variant.
macro_rules! each {
    ($enum:ident, $value:expr, $p:ident => $body:expr) => {
        match $value {
            #[cfg(feature = "nats")]
            $enum::Nats($p) => $body,
            #[cfg(feature = "rabbitmq")]
            $enum::RabbitMq($p) => $body,
            #[cfg(feature = "redis")]
            $enum::Redis($p) => $body,
            #[cfg(feature = "mqtt")]
            $enum::Mqtt($p) => $body,
            #[cfg(feature = "webhook")]
            $enum::Webhook($p) => $body,
            #[cfg(feature = "kafka")]
            $enum::Kafka($p) => $body,
        }
    };
}

impl Publisher for AnyPublisher {
    async fn publish(&self, record: &OutboxRecord) -> Result<(), PublishError> {
        each!(AnyPublisher, self, p => p.publish(record).await)
    }

    async fn ready(&self) -> Result<(), PublishError> {
        each!(AnyPublisher, self, p => p.ready().await)
    }
}

impl Destination {
    /// Parses a destination URL (see the [module docs](self)); `name` and
    /// `types` parameters are not accepted here, see [`NamedDestination`].
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let named = NamedDestination::parse(url)?;
        if named.name != named.destination.kind() || named.types.as_str() != "*" {
            return Err(ConfigError(format!(
                "destination {}: name and types are not settings of a single destination",
                redact_url(url)
            )));
        }
        Ok(named.destination)
    }

    /// The broker, for messages (`NATS JetStream`, `RabbitMQ`, …).
    pub fn broker(&self) -> &'static str {
        match self {
            #[cfg(feature = "nats")]
            Destination::Nats(_) => "NATS JetStream",
            #[cfg(feature = "rabbitmq")]
            Destination::RabbitMq(_) => "RabbitMQ",
            #[cfg(feature = "redis")]
            Destination::Redis(_) => "Redis Streams",
            #[cfg(feature = "mqtt")]
            Destination::Mqtt(_) => "MQTT",
            #[cfg(feature = "webhook")]
            Destination::Webhook(_) => "webhook",
            #[cfg(feature = "kafka")]
            Destination::Kafka(_) => "Kafka",
        }
    }

    /// A short lower-case name of the broker kind, the default destination
    /// name (`nats`, `rabbitmq`, `redis`, `mqtt`, `webhook`).
    pub fn kind(&self) -> &'static str {
        match self {
            #[cfg(feature = "nats")]
            Destination::Nats(_) => "nats",
            #[cfg(feature = "rabbitmq")]
            Destination::RabbitMq(_) => "rabbitmq",
            #[cfg(feature = "redis")]
            Destination::Redis(_) => "redis",
            #[cfg(feature = "mqtt")]
            Destination::Mqtt(_) => "mqtt",
            #[cfg(feature = "webhook")]
            Destination::Webhook(_) => "webhook",
            #[cfg(feature = "kafka")]
            Destination::Kafka(_) => "kafka",
        }
    }

    /// Where it sends, with credentials hidden, for logs.
    pub fn describe(&self) -> String {
        let url = each!(Destination, self, c => c.address());
        format!("{} at {}", self.broker(), redact_url(url))
    }

    /// Checks the settings, as connecting would.
    pub fn validate(&self) -> Result<(), ConfigError> {
        each!(Destination, self, c => c.validate())
    }

    /// Connects the destination's publisher.
    pub async fn connect(self) -> Result<AnyPublisher, DestinationError> {
        Ok(match self {
            #[cfg(feature = "nats")]
            Destination::Nats(c) => AnyPublisher::Nats(NatsPublisher::connect(c).await?),
            #[cfg(feature = "rabbitmq")]
            Destination::RabbitMq(c) => AnyPublisher::RabbitMq(RabbitPublisher::connect(c).await?),
            #[cfg(feature = "redis")]
            Destination::Redis(c) => AnyPublisher::Redis(RedisPublisher::connect(c).await?),
            #[cfg(feature = "mqtt")]
            Destination::Mqtt(c) => AnyPublisher::Mqtt(MqttPublisher::connect(c).await?),
            #[cfg(feature = "webhook")]
            Destination::Webhook(c) => AnyPublisher::Webhook(WebhookPublisher::new(c)?),
            #[cfg(feature = "kafka")]
            Destination::Kafka(c) => AnyPublisher::Kafka(KafkaPublisher::connect(c).await?),
        })
    }
}

/// Where a publisher's config says it connects.
trait Address {
    fn address(&self) -> &str;
}

macro_rules! address {
    ($($feature:literal, $config:ty, $field:ident;)*) => {$(
        #[cfg(feature = $feature)]
        impl Address for $config {
            fn address(&self) -> &str {
                &self.$field
            }
        }
    )*};
}

address! {
    "nats", NatsConfig, url;
    "rabbitmq", RabbitConfig, url;
    "redis", RedisConfig, url;
    "mqtt", MqttConfig, url;
    "webhook", WebhookConfig, url;
    "kafka", KafkaConfig, bootstrap_servers;
}

/// A destination with its name and the event types it takes: one
/// `--destination` or one `[[destination]]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedDestination {
    /// Its name: lower-case letters, digits and `_`, at most 32 characters,
    /// starting with a letter (it names the destination's lane table).
    pub name: String,
    /// The event types it takes (`*` for all).
    pub types: TypePattern,
    /// The publisher's settings.
    pub destination: Destination,
}

/// The longest destination name.
pub const MAX_NAME_LEN: usize = 32;

/// Checks a destination name: `^[a-z][a-z0-9_]{0,31}$`.
pub fn check_name(name: &str) -> Result<(), ConfigError> {
    let valid = name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(ConfigError(format!(
            "destination name {name:?} must be 1 to {MAX_NAME_LEN} lower-case letters, digits \
             or '_', starting with a letter (it names the destination's lane table)"
        )))
    }
}

impl NamedDestination {
    /// Parses a destination URL with its optional `name` and `types`
    /// parameters (see the [module docs](self)). The name defaults to the
    /// broker kind, the types to `*`.
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let url = url.trim();
        let shown = redact_url(url);
        let fail = |reason: String| ConfigError(format!("destination {shown}: {reason}"));
        let Some((scheme, _)) = url.split_once("://") else {
            return Err(fail(format!(
                "not a URL; expected one of {}",
                supported_schemes()
            )));
        };
        let scheme = scheme.to_ascii_lowercase();
        let is_http = scheme == "http" || scheme == "https";
        // Settings: the query, or for a webhook the fragment.
        let (base, options) = if is_http {
            match url.split_once('#') {
                Some((base, fragment)) => (base.to_owned(), pairs(fragment)),
                None => (url.to_owned(), Vec::new()),
            }
        } else {
            match url.split_once('?') {
                Some((base, query)) => (base.to_owned(), pairs(query)),
                None => (url.to_owned(), Vec::new()),
            }
        };
        let mut name = None;
        let mut types = None;
        let mut settings = Vec::new();
        for (key, value) in options {
            match key.as_str() {
                "name" => name = Some(value),
                "types" => types = Some(value),
                _ => settings.push((key, value)),
            }
        }
        let destination = match scheme.as_str() {
            #[cfg(feature = "nats")]
            "nats" => {
                let base_config = NatsConfig::default().with_url(&base);
                Destination::Nats(apply(&base_config, &base, settings, &[], &[], &shown)?)
            }
            #[cfg(feature = "rabbitmq")]
            "amqp" | "amqps" => {
                let native = [
                    "heartbeat",
                    "channel_max",
                    "frame_max",
                    "connection_timeout",
                    "auth_mechanism",
                ];
                let aliases = [("routing_key", "routing_key_template")];
                let (config, url) = apply_keeping_native(
                    RabbitConfig::default(),
                    &base,
                    settings,
                    &aliases,
                    &native,
                    &shown,
                )?;
                Destination::RabbitMq(RabbitConfig { url, ..config })
            }
            #[cfg(feature = "redis")]
            "redis" => {
                let aliases = [("maxlen", "max_len")];
                let (config, url) = apply_keeping_native(
                    RedisConfig::default(),
                    &base,
                    settings,
                    &aliases,
                    &["protocol"],
                    &shown,
                )?;
                Destination::Redis(RedisConfig { url, ..config })
            }
            #[cfg(feature = "mqtt")]
            "mqtt" => {
                let base_config = MqttConfig::default().with_url(&base);
                let aliases = [("topic", "topic_template")];
                Destination::Mqtt(apply(&base_config, &base, settings, &aliases, &[], &shown)?)
            }
            #[cfg(feature = "webhook")]
            "http" | "https" => {
                let mut secret = None;
                settings.retain(|(key, value)| {
                    if key == "secret_env" {
                        secret = Some(value.clone());
                        false
                    } else {
                        true
                    }
                });
                let mut config: WebhookConfig = apply(
                    &WebhookConfig::new(&base),
                    &base,
                    settings,
                    &[],
                    &[],
                    &shown,
                )?;
                if let Some(var) = secret {
                    let text = std::env::var(&var).map_err(|_| {
                        fail(format!(
                            "secret_env names the environment variable {var}, which is not set"
                        ))
                    })?;
                    config = config.with_secret(
                        WebhookSecret::new(text).map_err(|e| fail(format!("{var}: {}", e.0)))?,
                    );
                }
                Destination::Webhook(config)
            }
            #[cfg(feature = "kafka")]
            "kafka" => {
                let base_config = KafkaConfig::default().with_bootstrap_servers(&base);
                let aliases = [("topic", "topic_template")];
                Destination::Kafka(apply(&base_config, &base, settings, &aliases, &[], &shown)?)
            }
            other => {
                return Err(fail(format!(
                    "unsupported scheme {other:?}; expected one of {}",
                    supported_schemes()
                )));
            }
        };
        destination.validate().map_err(|e| fail(e.0))?;
        let name = name.unwrap_or_else(|| destination.kind().to_owned());
        check_name(&name).map_err(|e| fail(e.0))?;
        let types = TypePattern::parse(types.as_deref().unwrap_or("*")).map_err(|e| fail(e.0))?;
        Ok(NamedDestination {
            name,
            types,
            destination,
        })
    }
}

/// One `[[destination]]` section of a config file: a name, the event types
/// it takes, and either a destination URL or one broker section with the
/// publisher's settings (its config, field by field).
///
/// ```
/// use proclaim::destination::DestinationSection;
///
/// let section: DestinationSection = serde_json::from_value(serde_json::json!({
///     "name": "alerts",
///     "types": "Donor*",
///     "nats": { "url": "nats://127.0.0.1:4222", "stream": "ALERTS" },
/// }))?;
/// let d = section.resolve()?;
/// assert_eq!((d.name.as_str(), d.types.as_str()), ("alerts", "Donor*"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DestinationSection {
    /// The destination's name (default: the broker kind, e.g. `nats`).
    pub name: Option<String>,
    /// The event types it takes (default `*`).
    pub types: Option<String>,
    /// A destination URL, as for `--destination`.
    pub url: Option<String>,
    /// NATS JetStream settings.
    #[cfg(feature = "nats")]
    pub nats: Option<NatsConfig>,
    /// RabbitMQ settings.
    #[cfg(feature = "rabbitmq")]
    pub rabbitmq: Option<RabbitConfig>,
    /// Redis Streams settings.
    #[cfg(feature = "redis")]
    pub redis: Option<RedisConfig>,
    /// MQTT settings.
    #[cfg(feature = "mqtt")]
    pub mqtt: Option<MqttConfig>,
    /// Webhook settings.
    #[cfg(feature = "webhook")]
    pub webhook: Option<WebhookConfig>,
    /// Kafka settings.
    #[cfg(feature = "kafka")]
    pub kafka: Option<KafkaConfig>,
}

impl DestinationSection {
    /// Checks the section and gives the destination it describes.
    pub fn resolve(self) -> Result<NamedDestination, ConfigError> {
        let label = self.name.clone().unwrap_or_else(|| "(unnamed)".into());
        let fail = |reason: String| ConfigError(format!("[[destination]] {label}: {reason}"));
        let mut found: Vec<Destination> = Vec::new();
        #[cfg(feature = "nats")]
        found.extend(self.nats.map(Destination::Nats));
        #[cfg(feature = "rabbitmq")]
        found.extend(self.rabbitmq.map(Destination::RabbitMq));
        #[cfg(feature = "redis")]
        found.extend(self.redis.map(Destination::Redis));
        #[cfg(feature = "mqtt")]
        found.extend(self.mqtt.map(Destination::Mqtt));
        #[cfg(feature = "webhook")]
        found.extend(self.webhook.map(Destination::Webhook));
        #[cfg(feature = "kafka")]
        found.extend(self.kafka.map(Destination::Kafka));
        let sections = || format!("url or one of the broker sections ({})", broker_sections());
        let mut named = match (self.url, found.len()) {
            (Some(url), 0) => NamedDestination::parse(&url)?,
            (None, 1) => {
                let destination = found.remove(0);
                destination.validate().map_err(|e| fail(e.0))?;
                NamedDestination {
                    name: destination.kind().to_owned(),
                    types: TypePattern::parse("*")?,
                    destination,
                }
            }
            (None, 0) => return Err(fail(format!("says nowhere to send: set {}", sections()))),
            _ => {
                return Err(fail(format!(
                    "names more than one broker: set only {}",
                    sections()
                )));
            }
        };
        if let Some(name) = self.name {
            check_name(&name).map_err(|e| fail(e.0))?;
            named.name = name;
        }
        if let Some(types) = self.types {
            named.types = TypePattern::parse(&types).map_err(|e| fail(e.0))?;
        }
        Ok(named)
    }
}

/// The broker sections this build supports, for messages.
fn broker_sections() -> String {
    let sections: &[&str] = &[
        #[cfg(feature = "nats")]
        "nats",
        #[cfg(feature = "rabbitmq")]
        "rabbitmq",
        #[cfg(feature = "redis")]
        "redis",
        #[cfg(feature = "mqtt")]
        "mqtt",
        #[cfg(feature = "webhook")]
        "webhook",
        #[cfg(feature = "kafka")]
        "kafka",
    ];
    sections.join(", ")
}

/// The schemes this build supports, for messages.
fn supported_schemes() -> String {
    let schemes: &[&str] = &[
        #[cfg(feature = "nats")]
        "nats://",
        #[cfg(feature = "rabbitmq")]
        "amqp://",
        #[cfg(feature = "rabbitmq")]
        "amqps://",
        #[cfg(feature = "redis")]
        "redis://",
        #[cfg(feature = "mqtt")]
        "mqtt://",
        #[cfg(feature = "webhook")]
        "http://",
        #[cfg(feature = "webhook")]
        "https://",
        #[cfg(feature = "kafka")]
        "kafka://",
    ];
    schemes.join(", ")
}

/// The config fields that hold the address, which the URL itself gives.
const ADDRESS_FIELDS: &[&str] = &["url", "bootstrap_servers"];

/// Decoded `key=value` pairs of a query or fragment.
fn pairs(text: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(text.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// [`apply`] for brokers whose own URL syntax has query parameters: those in
/// `native` stay in the URL, which is returned with them.
#[cfg(any(feature = "rabbitmq", feature = "redis"))]
fn apply_keeping_native<C: Serialize + DeserializeOwned>(
    base_config: C,
    base: &str,
    settings: Vec<(String, String)>,
    aliases: &[(&str, &str)],
    native: &[&str],
    shown: &str,
) -> Result<(C, String), ConfigError> {
    let (kept, ours): (Vec<_>, Vec<_>) = settings
        .into_iter()
        .partition(|(key, _)| native.contains(&key.as_str()));
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(kept)
            .finish();
        format!("{base}?{query}")
    };
    let config = apply(&base_config, &url, ours, aliases, native, shown)?;
    Ok((config, url))
}

/// Sets each `key=value` of `settings` on `base_config`, a publisher's config,
/// by field name (after `aliases`), converting the text to the field's type
/// (a flag, a number, a duration such as `5s`, a string). The `url` field is
/// `url`. An unknown key is an error that lists the keys accepted.
fn apply<C: Serialize + DeserializeOwned>(
    base_config: &C,
    url: &str,
    settings: Vec<(String, String)>,
    aliases: &[(&str, &str)],
    native: &[&str],
    shown: &str,
) -> Result<C, ConfigError> {
    let fail = |reason: String| ConfigError(format!("destination {shown}: {reason}"));
    let mut fields = match serde_json::to_value(base_config) {
        Ok(Value::Object(map)) => map,
        _ => return Err(fail("its settings cannot be read".into())),
    };
    if let Some(address) = ADDRESS_FIELDS.iter().find(|f| fields.contains_key(**f)) {
        fields.insert((*address).into(), Value::String(url.to_owned()));
    }
    let known = || {
        let mut keys: Vec<&str> = fields
            .keys()
            .map(String::as_str)
            .filter(|k| !ADDRESS_FIELDS.contains(k))
            .chain(aliases.iter().map(|(alias, _)| *alias))
            .chain(native.iter().copied())
            .chain(["name", "types"])
            .collect();
        keys.sort_unstable();
        keys.join(", ")
    };
    let mut numeric_options = Vec::new();
    let mut updates = Map::new();
    for (key, text) in settings {
        let field = aliases
            .iter()
            .find(|(alias, _)| *alias == key)
            .map_or(key.as_str(), |(_, field)| *field);
        let value = match fields.get(field) {
            None => {
                return Err(fail(format!(
                    "unknown option {key:?}; this broker takes {}",
                    known()
                )));
            }
            Some(_) if ADDRESS_FIELDS.contains(&field) => {
                return Err(fail(format!(
                    "unknown option {key:?}; the URL itself is the address (this broker takes {})",
                    known()
                )));
            }
            Some(Value::Object(_) | Value::Array(_)) => {
                return Err(fail(format!(
                    "option {key:?} cannot be set in a URL; use the config file"
                )));
            }
            Some(Value::Bool(_)) => match text.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" | "" => Value::Bool(true),
                "false" | "0" | "no" | "off" => Value::Bool(false),
                _ => return Err(fail(format!("option {key}={text:?} is not true or false"))),
            },
            Some(Value::Number(_)) => match text.parse::<u64>() {
                Ok(n) => Value::from(n),
                Err(_) => return Err(fail(format!("option {key}={text:?} is not a number"))),
            },
            Some(Value::Null) => {
                if let Ok(n) = text.parse::<u64>() {
                    numeric_options.push(field.to_owned());
                    Value::from(n)
                } else {
                    Value::String(text)
                }
            }
            Some(Value::String(_)) => Value::String(text),
        };
        updates.insert(field.to_owned(), value);
    }
    let merge = |updates: &Map<String, Value>| {
        let mut merged = fields.clone();
        merged.extend(updates.clone());
        serde_json::from_value::<C>(Value::Object(merged))
    };
    match merge(&updates) {
        Ok(config) => Ok(config),
        Err(first) => {
            // An optional field given digits may be a string after all (a
            // client id `42`): try those as text before giving up.
            let mut as_text = updates.clone();
            for field in &numeric_options {
                if let Some(v) = as_text.get_mut(field) {
                    *v = Value::String(v.to_string());
                }
            }
            merge(&as_text).map_err(|_| fail(first.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> NamedDestination {
        match NamedDestination::parse(url) {
            Ok(d) => d,
            Err(e) => panic!("{url}: {e}"),
        }
    }

    fn error(url: &str) -> String {
        match NamedDestination::parse(url) {
            Ok(d) => panic!("{url} was accepted: {d:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[cfg(feature = "nats")]
    #[test]
    fn nats_urls_set_any_setting_by_name() {
        let d = parse(
            "nats://127.0.0.1:4222?stream=ORDERS&create_stream=true&ack_timeout=3s&subject_prefix=shop",
        );
        let Destination::Nats(c) = d.destination else {
            panic!("{d:?}")
        };
        assert_eq!(c.url, "nats://127.0.0.1:4222");
        assert_eq!(c.stream, "ORDERS");
        assert!(c.create_stream);
        assert_eq!(c.ack_timeout, std::time::Duration::from_secs(3));
        assert_eq!(c.subject_prefix, "shop");
        assert_eq!((d.name.as_str(), d.types.as_str()), ("nats", "*"));
    }

    #[cfg(feature = "nats")]
    #[test]
    fn bad_options_are_errors_that_say_what_is_accepted() {
        let err = error("nats://127.0.0.1:4222?strem=X");
        assert!(err.contains("unknown option \"strem\""), "{err}");
        assert!(err.contains("stream, subject_prefix"), "{err}");
        let err = error("nats://127.0.0.1:4222?create_stream=maybe");
        assert!(
            err.contains("create_stream=\"maybe\" is not true or false"),
            "{err}"
        );
        let err = error("nats://127.0.0.1:4222?ack_timeout=soon");
        assert!(err.contains("ack_timeout"), "{err}");
        let err = error("nats://127.0.0.1:4222?url=nats://elsewhere");
        assert!(err.contains("unknown option \"url\""), "{err}");
        let err = error("nats://u:secret@127.0.0.1:4222?name=Bad-Name");
        assert!(err.contains("destination name \"Bad-Name\""), "{err}");
        assert!(!err.contains("secret"), "{err}");
        let err = error("nats://127.0.0.1:4222?stream=a.b");
        assert!(err.contains("stream name"), "{err}");
        let err = error("gopher://127.0.0.1");
        assert!(err.contains("unsupported scheme \"gopher\""), "{err}");
        assert!(error("127.0.0.1:4222").contains("not a URL"));
    }

    #[cfg(feature = "rabbitmq")]
    #[test]
    fn amqp_urls_keep_their_own_parameters() {
        let d = parse(
            "amqp://guest:guest@127.0.0.1:5672/%2f?exchange=events&routing_key={type}.{subject}&heartbeat=10&name=audit&types=Donor*",
        );
        let Destination::RabbitMq(c) = &d.destination else {
            panic!("{d:?}")
        };
        assert_eq!(c.url, "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10");
        assert_eq!(c.exchange, "events");
        assert_eq!(c.routing_key_template, "{type}.{subject}");
        assert_eq!(d.name, "audit");
        assert!(d.types.matches("DonorSecured") && !d.types.matches("PledgeMade"));
        assert_eq!(
            d.destination.describe(),
            "RabbitMQ at amqp://***@127.0.0.1:5672/%2f?heartbeat=10"
        );
    }

    #[cfg(feature = "redis")]
    #[test]
    fn redis_urls_take_a_stream_and_a_cap() {
        let d = parse("redis://127.0.0.1:6379/0?stream=orders:{type}&maxlen=1000");
        let Destination::Redis(c) = d.destination else {
            panic!("{d:?}")
        };
        assert_eq!(c.url, "redis://127.0.0.1:6379/0");
        assert_eq!(c.stream, "orders:{type}");
        assert_eq!(c.max_len, Some(1000));
    }

    #[cfg(feature = "mqtt")]
    #[test]
    fn mqtt_urls_take_a_topic_and_qos() {
        let d =
            parse("mqtt://127.0.0.1:1883?topic=campaign/{type}&qos=2&client_id=42&mode=structured");
        let Destination::Mqtt(c) = d.destination else {
            panic!("{d:?}")
        };
        assert_eq!(c.topic_template, "campaign/{type}");
        assert_eq!(c.qos, 2);
        assert_eq!(c.client_id.as_deref(), Some("42"));
        assert_eq!(c.mode, crate::mqtt::ContentMode::Structured);
        let err = error("mqtt://127.0.0.1:1883?qos=3");
        assert!(err.contains("qos"), "{err}");
    }

    #[cfg(feature = "webhook")]
    #[test]
    fn webhook_settings_go_in_the_fragment() {
        let d = parse("https://hooks.example.com/in?key=k#mode=structured&timeout=2s&types=Donor*");
        let Destination::Webhook(c) = d.destination else {
            panic!("{d:?}")
        };
        assert_eq!(c.url, "https://hooks.example.com/in?key=k");
        assert_eq!(c.mode, crate::webhook::ContentMode::Structured);
        assert_eq!(c.timeout, std::time::Duration::from_secs(2));
        assert_eq!(d.types.as_str(), "Donor*");
        let err = error("https://hooks.example.com/in#secret_env=PROCLAIM_TEST_SURELY_UNSET_VAR");
        assert!(
            err.contains("PROCLAIM_TEST_SURELY_UNSET_VAR, which is not set"),
            "{err}"
        );
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn kafka_urls_take_brokers_and_a_topic() {
        let d = parse("kafka://127.0.0.1:9092,127.0.0.1:9093?topic=campaign.{type}&ack_timeout=5s");
        assert_eq!(
            d.destination.describe(),
            "Kafka at kafka://127.0.0.1:9092,127.0.0.1:9093"
        );
        let Destination::Kafka(c) = d.destination else {
            panic!("{d:?}")
        };
        assert_eq!(c.topic_template, "campaign.{type}");
        assert_eq!(c.ack_timeout, std::time::Duration::from_secs(5));
        let err = error("kafka://127.0.0.1:9092?bootstrap_servers=elsewhere:9092");
        assert!(err.contains("the URL itself is the address"), "{err}");
        let err = error("kafka://127.0.0.1:9092?properties=x");
        assert!(err.contains("cannot be set in a URL"), "{err}");
    }

    #[test]
    fn names_are_identifiers() {
        for good in ["nats", "a", "audit_2", "x23456789012345678901234567890ab"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "2nats",
            "Nats",
            "a-b",
            "a b",
            "x234567890123456789012345678901ab",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
