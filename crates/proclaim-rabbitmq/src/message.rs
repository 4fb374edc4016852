//! CloudEvents binary content mode over AMQP 0-9-1: the message properties
//! and headers of an event ([`encode`]), and back ([`decode_delivery`]).

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use proclaim_core::Event;
use proclaim_core::binary::{BinaryDecodeError, attributes, event_from_attributes};

/// Prefix of every CloudEvents attribute header, as the CloudEvents AMQP
/// binding names application properties: `cloudEvents:id`,
/// `cloudEvents:type`, ….
pub const HEADER_PREFIX: &str = "cloudEvents:";

/// A prefix some AMQP 0-9-1 producers use instead, as `:` is awkward in
/// some clients' header names; read when no header has [`HEADER_PREFIX`].
const ALT_HEADER_PREFIX: &str = "cloudEvents_";

/// AMQP `delivery_mode` of a persistent message.
const PERSISTENT: u8 = 2;

/// Why an event cannot be written as an AMQP message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("its {what} cannot be written as an AMQP {field}: {reason}")]
pub(crate) struct EncodeError {
    what: String,
    field: &'static str,
    reason: String,
}

fn short(
    what: impl Into<String>,
    field: &'static str,
    text: &str,
) -> Result<ShortString, EncodeError> {
    ShortString::try_new(text).map_err(|e| EncodeError {
        what: what.into(),
        field,
        reason: e.to_string(),
    })
}

/// The properties of the message carrying `event`: persistent, the event id
/// as `message_id` (the id consumers deduplicate by), the event type as
/// `type`, its time as `timestamp`, `content_type` from the event, the
/// correlation id when it fits, and every CloudEvents attribute as a
/// `cloudEvents:*` long-string header.
pub(crate) fn encode(event: &Event) -> Result<BasicProperties, EncodeError> {
    let mut headers = FieldTable::default();
    for (name, value) in attributes(event, HEADER_PREFIX) {
        let key = short(format!("attribute name {name:?}"), "header name", &name)?;
        headers.insert(key, AMQPValue::LongString(LongString::from(value)));
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_message_id(short("id", "message_id", &event.id().to_string())?)
        .with_type(short("type", "type property", event.event_type())?)
        .with_content_type(short(
            "datacontenttype",
            "content_type",
            event.datacontenttype(),
        )?)
        .with_headers(headers);
    if let Ok(secs) = u64::try_from(event.time().timestamp()) {
        properties = properties.with_timestamp(secs);
    }
    // Also in the headers; the property is a convenience for AMQP tooling.
    if let Some(id) = event
        .correlation_id()
        .and_then(|c| ShortString::try_new(c).ok())
    {
        properties = properties.with_correlation_id(id);
    }
    Ok(properties)
}

/// Why an AMQP message is not a proclaim event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message has no headers, so no CloudEvents attributes.
    #[error(
        "message with routing key {routing_key:?} has no headers: it is not a CloudEvent in \
         binary content mode"
    )]
    NoHeaders {
        /// The message's routing key.
        routing_key: String,
    },
    /// A CloudEvents header has a value that is not text (nor a number,
    /// boolean or timestamp that reads as text).
    #[error(
        "message with routing key {routing_key:?} has a {header} header that is not a string \
         ({found})"
    )]
    NotAString {
        /// The message's routing key.
        routing_key: String,
        /// The header, e.g. `cloudEvents:id`.
        header: String,
        /// What the value is instead.
        found: String,
    },
    /// The attributes or the body do not form a valid event: an attribute is
    /// missing or invalid, or the body is not JSON.
    #[error("message with routing key {routing_key:?} is not a proclaim event: {source}")]
    Invalid {
        /// The message's routing key.
        routing_key: String,
        /// What is wrong, naming the header.
        #[source]
        source: BinaryDecodeError,
    },
}

/// Reads the [`Event`] a [`RabbitPublisher`](crate::RabbitPublisher)
/// published, from a delivery of `basic.consume` or `basic.get` (a
/// [`BasicGetMessage`](lapin::message::BasicGetMessage) derefs to a
/// [`Delivery`]): see [`decode_message`].
pub fn decode_delivery(delivery: &Delivery) -> Result<Event, DecodeError> {
    decode_message(
        delivery.routing_key.as_str(),
        &delivery.properties,
        &delivery.data,
    )
}

/// Reads an [`Event`] from an AMQP message in CloudEvents binary content
/// mode: the attributes from the `cloudEvents:*` headers (names matched
/// case-insensitively; `cloudEvents_*` is read when no `cloudEvents:*`
/// header is present), the content type from the `content_type` property
/// (JSON when absent), extension attributes from the other `cloudEvents:*`
/// headers, and the JSON data from the body, byte for byte. `routing_key`
/// only names the message in errors.
///
/// Header values may be long or short strings; numbers and booleans are
/// read as their text, and an AMQP timestamp as RFC 3339.
pub fn decode_message(
    routing_key: &str,
    properties: &BasicProperties,
    body: &[u8],
) -> Result<Event, DecodeError> {
    let Some(headers) = properties.headers().as_ref() else {
        return Err(DecodeError::NoHeaders {
            routing_key: routing_key.to_owned(),
        });
    };
    let has = |prefix: &str| {
        headers
            .inner()
            .keys()
            .any(|k| starts_with_ignore_case(k.as_str(), prefix))
    };
    let prefix = if !has(HEADER_PREFIX) && has(ALT_HEADER_PREFIX) {
        ALT_HEADER_PREFIX
    } else {
        HEADER_PREFIX
    };
    let mut pairs = Vec::new();
    for (name, value) in headers.inner() {
        let name = name.as_str();
        if !starts_with_ignore_case(name, prefix) {
            continue;
        }
        let text = text_of(value).map_err(|found| DecodeError::NotAString {
            routing_key: routing_key.to_owned(),
            header: name.to_owned(),
            found,
        })?;
        pairs.push((name, text));
    }
    let content_type = properties.content_type().as_ref().map(ShortString::as_str);
    event_from_attributes(
        pairs.iter().map(|(n, v)| (*n, v.as_str())),
        prefix,
        content_type,
        body,
    )
    .map_err(|source| DecodeError::Invalid {
        routing_key: routing_key.to_owned(),
        source,
    })
}

fn starts_with_ignore_case(name: &str, prefix: &str) -> bool {
    name.get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

/// The text of a header value, or what it is instead.
fn text_of(value: &AMQPValue) -> Result<String, String> {
    Ok(match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
            .map_err(|_| "a long string that is not UTF-8".to_owned())?
            .to_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(secs) => i64::try_from(*secs)
            .ok()
            .and_then(|s| DateTime::<Utc>::from_timestamp(s, 0))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .ok_or_else(|| format!("a timestamp out of range ({secs})"))?,
        other => return Err(format!("{:?}", other.get_type())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn donor() -> Result<Event, proclaim_core::EventError> {
        Event::builder("DonorSecured")
            .subject("donor-42")
            .source("campaign-finance")
            .dataschema("urn:donor-secured:v2")
            .datacontenttype("application/cloudevents+json; charset=utf-8")
            .correlation_id("pledge-drive-7")
            .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .extension("tenant", "acme")
            .json(r#"{"donor_id":42,  "amount_cents":250000}"#)
            .build()
    }

    fn header<'a>(p: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
        p.headers().as_ref()?.inner().get(name)
    }

    #[test]
    fn encodes_properties_and_headers() -> Result<(), Box<dyn std::error::Error>> {
        let event = donor()?;
        let p = encode(&event)?;
        let id = event.id().to_string();
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(
            p.message_id().as_ref().map(ShortString::as_str),
            Some(id.as_str())
        );
        assert_eq!(
            p.kind().as_ref().map(ShortString::as_str),
            Some("DonorSecured")
        );
        assert_eq!(
            p.content_type().as_ref().map(ShortString::as_str),
            Some("application/cloudevents+json; charset=utf-8")
        );
        assert_eq!(*p.timestamp(), u64::try_from(event.time().timestamp()).ok());
        assert_eq!(
            p.correlation_id().as_ref().map(ShortString::as_str),
            Some("pledge-drive-7")
        );
        for (name, value) in [
            ("cloudEvents:specversion", "1.0"),
            ("cloudEvents:id", id.as_str()),
            ("cloudEvents:type", "DonorSecured"),
            ("cloudEvents:source", "campaign-finance"),
            ("cloudEvents:subject", "donor-42"),
            ("cloudEvents:time", event.time_rfc3339().as_str()),
            ("cloudEvents:dataschema", "urn:donor-secured:v2"),
            ("cloudEvents:correlationid", "pledge-drive-7"),
            ("cloudEvents:tenant", "acme"),
        ] {
            assert_eq!(
                header(&p, name),
                Some(&AMQPValue::LongString(value.into())),
                "{name}"
            );
        }
        assert_eq!(
            decode_message("DonorSecured", &p, event.data().get().as_bytes())?,
            event
        );
        Ok(())
    }

    #[test]
    fn attributes_at_their_limits_fit() -> Result<(), Box<dyn std::error::Error>> {
        // The envelope bounds type and content type to what AMQP short
        // strings hold, and extension names to 20 characters.
        let event = Event::builder("T".repeat(255))
            .subject("k")
            .extension("x".repeat(20), "v")
            .build()?;
        let p = encode(&event)?;
        assert_eq!(p.kind().as_ref().map(|t| t.as_str().len()), Some(255));
        assert_eq!(decode_message("T", &p, b"null")?, event);
        // A correlation id too long for the property still travels in a header.
        let long_correlation = Event::builder("T")
            .subject("k")
            .correlation_id("c".repeat(300))
            .build()?;
        let p = encode(&long_correlation)?;
        assert_eq!(*p.correlation_id(), None);
        assert_eq!(decode_message("T", &p, b"null")?, long_correlation);
        Ok(())
    }

    #[test]
    fn reads_other_producers_headers() -> Result<(), Box<dyn std::error::Error>> {
        let event = Event::builder("T").subject("k").build()?;
        let mut headers = FieldTable::default();
        let secs = u64::try_from(event.time().timestamp())?;
        let whole_second = DateTime::<Utc>::from_timestamp(event.time().timestamp(), 0)
            .ok_or("time out of range")?;
        for (name, value) in [
            (
                "CloudEvents_SpecVersion",
                AMQPValue::ShortString("1.0".into()),
            ),
            (
                "cloudevents_id",
                AMQPValue::LongString(event.id().to_string().into()),
            ),
            ("cloudEvents_type", AMQPValue::LongString("T".into())),
            (
                "cloudEvents_source",
                AMQPValue::LongString(event.source().into()),
            ),
            ("cloudEvents_subject", AMQPValue::LongString("k".into())),
            ("cloudEvents_time", AMQPValue::Timestamp(secs)),
            ("cloudEvents_attempt", AMQPValue::LongInt(3)),
            ("x-other", AMQPValue::Boolean(true)),
        ] {
            headers.insert(name.into(), value);
        }
        let p = BasicProperties::default().with_headers(headers);
        let back = decode_message("T", &p, b"null")?;
        assert_eq!(back.id(), event.id());
        assert_eq!(back.time(), whole_second);
        assert_eq!(back.datacontenttype(), "application/json");
        assert_eq!(
            back.metadata().get("attempt").map(String::as_str),
            Some("3")
        );
        Ok(())
    }

    #[test]
    fn reports_what_is_missing_or_wrong() -> Result<(), Box<dyn std::error::Error>> {
        let event = donor()?;
        let body = event.data().get().as_bytes();
        assert_eq!(
            decode_message("rk", &BasicProperties::default(), body),
            Err(DecodeError::NoHeaders {
                routing_key: "rk".into()
            })
        );
        let full = encode(&event)?;
        let mut headers = full.headers().clone().unwrap_or_default();
        let without_id: FieldTable = headers
            .inner()
            .iter()
            .filter(|(k, _)| k.as_str() != "cloudEvents:id")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<std::collections::BTreeMap<_, _>>()
            .into();
        let err = decode_message("rk", &full.clone().with_headers(without_id), body).err();
        assert_eq!(
            err.as_ref().map(ToString::to_string).as_deref(),
            Some(
                "message with routing key \"rk\" is not a proclaim event: the message lacks the \
                 cloudEvents:id attribute"
            )
        );
        assert!(matches!(
            err,
            Some(DecodeError::Invalid {
                source: BinaryDecodeError::Missing(_),
                ..
            })
        ));

        headers.insert("cloudEvents:time".into(), AMQPValue::Double(1.5));
        let err = decode_message("rk", &full.clone().with_headers(headers), body).err();
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some(
                "message with routing key \"rk\" has a cloudEvents:time header that is not a \
                 string (Double)"
            )
        );

        let err = decode_message("rk", &full, b"{not json").err();
        assert!(
            matches!(
                err,
                Some(DecodeError::Invalid {
                    source: BinaryDecodeError::Event(_),
                    ..
                })
            ),
            "{err:?}"
        );
        Ok(())
    }
}
