//! CloudEvents binary content mode over Kafka (the CloudEvents Kafka
//! protocol binding): the record headers of an event ([`headers`]), and back
//! ([`decode_message`]).

use proclaim_core::Event;
use proclaim_core::binary::{BinaryDecodeError, attributes, event_from_attributes};
use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders};

/// Prefix of every CloudEvents attribute header, as the CloudEvents Kafka
/// binding names them: `ce_id`, `ce_type`, `ce_source`, ….
pub const HEADER_PREFIX: &str = "ce_";

/// The header carrying the event's `datacontenttype`, as the CloudEvents
/// Kafka binding names it.
pub const CONTENT_TYPE_HEADER: &str = "content-type";

/// The header a consumer deduplicates by: the event id.
pub const DEDUP_HEADER: &str = "ce_id";

/// The record headers of `event`: every CloudEvents attribute as a `ce_*`
/// header (UTF-8 text) and the content type as `content-type`.
pub(crate) fn headers(event: &Event) -> OwnedHeaders {
    let pairs = attributes(event, HEADER_PREFIX);
    let mut headers = OwnedHeaders::new_with_capacity(pairs.len() + 1);
    for (name, value) in &pairs {
        headers = headers.insert(Header {
            key: name,
            value: Some(value.as_str()),
        });
    }
    headers.insert(Header {
        key: CONTENT_TYPE_HEADER,
        value: Some(event.datacontenttype()),
    })
}

/// Why a Kafka message is not a proclaim event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message has no headers, so no CloudEvents attributes.
    #[error(
        "message at {topic}/{partition}@{offset} has no headers: it is not a CloudEvent in \
         binary content mode"
    )]
    NoHeaders {
        /// The message's topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
    },
    /// The message has no value (a tombstone), so no event data.
    #[error(
        "message at {topic}/{partition}@{offset} has no value (a tombstone): it is not an event"
    )]
    NoValue {
        /// The message's topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
    },
    /// A CloudEvents header (or `content-type`) is not UTF-8 text.
    #[error("message at {topic}/{partition}@{offset} has a {header} header that is not UTF-8")]
    NotUtf8 {
        /// The message's topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
        /// The header, e.g. `ce_id`.
        header: String,
    },
    /// The attributes or the value do not form a valid event: an attribute
    /// is missing or invalid, or the value is not JSON.
    #[error("message at {topic}/{partition}@{offset} is not a proclaim event: {source}")]
    Invalid {
        /// The message's topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
        /// What is wrong, naming the header.
        #[source]
        source: BinaryDecodeError,
    },
}

/// Reads the [`Event`] a [`KafkaPublisher`](crate::KafkaPublisher)
/// published, from any consumed message (a
/// [`BorrowedMessage`](rdkafka::message::BorrowedMessage) of a consumer or an
/// [`OwnedMessage`](rdkafka::message::OwnedMessage)).
///
/// The attributes come from the `ce_*` headers (names matched
/// case-insensitively, the first of repeated headers wins, headers without
/// a value are ignored), the content type from the `content-type` header
/// (JSON when absent), extension attributes from the other `ce_*` headers,
/// and the JSON data from the message value, byte for byte. The key is not
/// read: it is a copy of the subject.
///
/// ```
/// use proclaim_core::Event;
/// use proclaim_kafka::decode_message;
/// use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
///
/// let event = Event::builder("DonorSecured").subject("donor-42").build()?;
/// let id = event.id().to_string();
/// let time = event.time_rfc3339();
/// let mut headers = OwnedHeaders::new();
/// for (key, value) in [
///     ("ce_specversion", "1.0"),
///     ("ce_id", id.as_str()),
///     ("ce_type", "DonorSecured"),
///     ("ce_source", event.source()),
///     ("ce_subject", "donor-42"),
///     ("ce_time", time.as_str()),
///     ("content-type", "application/json"),
/// ] {
///     headers = headers.insert(Header { key, value: Some(value) });
/// }
/// let message = OwnedMessage::new(
///     Some(event.data().get().as_bytes().to_vec()),
///     Some(b"donor-42".to_vec()),
///     "campaign".into(),
///     Timestamp::NotAvailable,
///     0,
///     7,
///     Some(headers),
/// );
/// assert_eq!(decode_message(&message)?, event);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn decode_message<M: Message>(message: &M) -> Result<Event, DecodeError> {
    let topic = message.topic().to_owned();
    let (partition, offset) = (message.partition(), message.offset());
    let Some(headers) = message.headers() else {
        return Err(DecodeError::NoHeaders {
            topic,
            partition,
            offset,
        });
    };
    let mut pairs = Vec::with_capacity(headers.count());
    let mut content_type = None;
    for header in headers.iter() {
        let is_attribute = header
            .key
            .get(..HEADER_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(HEADER_PREFIX));
        let is_content_type = header.key.eq_ignore_ascii_case(CONTENT_TYPE_HEADER);
        if !is_attribute && !is_content_type {
            continue;
        }
        let Some(value) = header.value else {
            continue;
        };
        let Ok(text) = std::str::from_utf8(value) else {
            return Err(DecodeError::NotUtf8 {
                topic,
                partition,
                offset,
                header: header.key.to_owned(),
            });
        };
        if is_content_type {
            content_type.get_or_insert(text);
        } else {
            pairs.push((header.key, text));
        }
    }
    let Some(body) = message.payload() else {
        return Err(DecodeError::NoValue {
            topic,
            partition,
            offset,
        });
    };
    event_from_attributes(pairs, HEADER_PREFIX, content_type, body).map_err(|source| {
        DecodeError::Invalid {
            topic,
            partition,
            offset,
            source,
        }
    })
}

/// The id a consumer deduplicates by: the `ce_id` header (the event id), if
/// the message has it as text.
///
/// ```
/// use proclaim_kafka::dedup_id;
/// use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
///
/// let headers = OwnedHeaders::new().insert(Header { key: "ce_id", value: Some("0192-…") });
/// let message = OwnedMessage::new(None, None, "t".into(), Timestamp::NotAvailable, 0, 0, Some(headers));
/// assert_eq!(dedup_id(&message).as_deref(), Some("0192-…"));
/// ```
pub fn dedup_id<M: Message>(message: &M) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(DEDUP_HEADER))
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{OwnedMessage, Timestamp};

    use super::*;

    fn donor() -> Result<Event, proclaim_core::EventError> {
        Event::builder("DonorSecured")
            .subject("donor-42")
            .source("campaign-finance")
            .dataschema("urn:donor-secured:v2")
            .datacontenttype("application/cloudevents+json; charset=utf-8")
            .correlation_id("pledge-drive-7")
            .extension("tenant", "acme")
            .json(r#"{"donor_id":42,  "amount_cents":250000}"#)
            .build()
    }

    fn message(headers: Option<OwnedHeaders>, value: Option<&[u8]>) -> OwnedMessage {
        OwnedMessage::new(
            value.map(<[u8]>::to_vec),
            Some(b"donor-42".to_vec()),
            "campaign".into(),
            Timestamp::NotAvailable,
            2,
            40,
            headers,
        )
    }

    fn header_map(headers: &OwnedHeaders) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|h| {
                (
                    h.key.to_owned(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn encodes_every_attribute_and_decodes_it_back() -> Result<(), Box<dyn std::error::Error>> {
        let event = donor()?;
        let h = headers(&event);
        let map = header_map(&h);
        let id = event.id().to_string();
        for (name, value) in [
            ("ce_specversion", "1.0"),
            ("ce_id", id.as_str()),
            ("ce_type", "DonorSecured"),
            ("ce_source", "campaign-finance"),
            ("ce_subject", "donor-42"),
            ("ce_time", event.time_rfc3339().as_str()),
            ("ce_dataschema", "urn:donor-secured:v2"),
            ("ce_correlationid", "pledge-drive-7"),
            ("ce_tenant", "acme"),
            (
                "content-type",
                "application/cloudevents+json; charset=utf-8",
            ),
        ] {
            assert!(
                map.contains(&(name.to_owned(), value.to_owned())),
                "{name} missing in {map:?}"
            );
        }
        let m = message(Some(h), Some(event.data().get().as_bytes()));
        assert_eq!(decode_message(&m)?, event);
        assert_eq!(dedup_id(&m), Some(id));
        Ok(())
    }

    #[test]
    fn reads_other_producers_spelling() -> Result<(), Box<dyn std::error::Error>> {
        let event = Event::builder("T").subject("k").build()?;
        let mut h = OwnedHeaders::new().insert(Header {
            key: "traceparent-ish",
            value: Some(&b"\xff"[..]),
        });
        for (name, value) in attributes(&event, "CE_") {
            h = h.insert(Header {
                key: &name,
                value: Some(value.as_str()),
            });
        }
        h = h.insert(Header::<&str> {
            key: "ce_nothing",
            value: None,
        });
        let back = decode_message(&message(Some(h), Some(b"null")))?;
        assert_eq!(back.id(), event.id());
        assert_eq!(back.datacontenttype(), "application/json");
        assert!(back.metadata().is_empty(), "{:?}", back.metadata());
        Ok(())
    }

    #[test]
    fn reports_what_is_missing_or_wrong() -> Result<(), Box<dyn std::error::Error>> {
        let event = donor()?;
        let body = event.data().get().as_bytes();
        let err = decode_message(&message(None, Some(body))).err();
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some(
                "message at campaign/2@40 has no headers: it is not a CloudEvent in binary \
                 content mode"
            )
        );
        let err = decode_message(&message(Some(headers(&event)), None)).err();
        assert!(matches!(err, Some(DecodeError::NoValue { .. })), "{err:?}");

        let mut without_id = OwnedHeaders::new();
        for (name, value) in attributes(&event, HEADER_PREFIX) {
            if name != "ce_id" {
                without_id = without_id.insert(Header {
                    key: &name,
                    value: Some(value.as_str()),
                });
            }
        }
        let err = decode_message(&message(Some(without_id), Some(body))).err();
        assert_eq!(
            err.as_ref().map(ToString::to_string).as_deref(),
            Some(
                "message at campaign/2@40 is not a proclaim event: the message lacks the ce_id \
                 attribute"
            )
        );
        assert!(matches!(
            err,
            Some(DecodeError::Invalid {
                source: BinaryDecodeError::Missing(_),
                ..
            })
        ));

        let binary_id = headers(&event).insert(Header {
            key: "ce_tenant",
            value: Some(&b"\xc3\x28"[..]),
        });
        let err = decode_message(&message(Some(binary_id), Some(body))).err();
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some("message at campaign/2@40 has a ce_tenant header that is not UTF-8")
        );

        let err = decode_message(&message(Some(headers(&event)), Some(b"{not json"))).err();
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
